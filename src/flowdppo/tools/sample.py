"""``flowdppo sample``: images from a base model plus a trained adapter.

    flowdppo sample --model-family sd3 --model-path stabilityai/stable-diffusion-3.5-medium \\
        --adapter runs/<name>/adapter --prompt "a red cube on a blue sphere" --out samples/
    flowdppo sample --adapter runs/<name>/adapter --prompt "..."      # family and base model from the adapter
    flowdppo sample --model-family shapes --adapter runs/<name>/adapter --prompt "two red circles"

SD3 and FLUX run the *stock* diffusers pipeline: a LoRA export is loaded with
``pipe.load_lora_weights(adapter)`` and a full fine-tune replaces ``pipe.transformer``; what you get is
what anyone gets from the exported files. The embedded shapes model uses its own adapter format.
Unset options take the values recorded in the adapter's ``flowdppo_adapter.json`` (base model,
resolution, T5 length) or the pipeline's defaults (steps, guidance). Writes one PNG per image and
``samples.json`` (prompts, seeds, settings) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from flowdppo.models.base import DTYPES

FAMILY_PIPELINE = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TRANSFORMERS = {
    "StableDiffusion3Pipeline": "SD3Transformer2DModel",
    "FluxPipeline": "FluxTransformer2DModel",
    "Flux2KleinPipeline": "Flux2Transformer2DModel",
}


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "empty"


def _adapter_info(adapter: str | None) -> dict[str, Any]:
    if not adapter:
        return {}
    p = Path(adapter) / "flowdppo_adapter.json"
    return json.loads(p.read_text()) if p.exists() else {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flowdppo sample", description="Sample images from a base model plus an adapter.")
    p.add_argument(
        "--model-family",
        choices=["sd3", "flux", "shapes"],
        default=None,
        help="default: the adapter's family (flowdppo_adapter.json), else shapes",
    )
    p.add_argument(
        "--model-path", default=None, help="local diffusers folder or hub id (default: the adapter's base model)"
    )
    p.add_argument("--adapter", default=None, help="adapter directory written by training (runs/<name>/adapter)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--num-steps", type=int, default=None, help="default: the pipeline's (10 for shapes)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels (default: the adapter's, else the pipeline's)",
    )
    p.add_argument(
        "--max-sequence-length", type=int, default=None, help="T5 tokens (default: the adapter's, else the pipeline's)"
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of a LoRA adapter")
    p.add_argument("--seed", type=int, default=0, help="image j of the run uses seed + j")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument("--out", default="samples", help="output directory")
    return p.parse_args(argv)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise SystemExit("flowdppo sample: give at least one --prompt or a --prompts-file")
    return prompts


def load_pipeline_with_adapter(
    family: str, model_path: str, adapter: str | None, dtype: torch.dtype, device: str, lora_scale: float = 1.0
) -> Any:
    """The stock diffusers pipeline of ``family`` with the adapter loaded (LoRA or full transformer).

    The pipeline class is the one ``model_path`` declares (``model_index.json``), so ``family="flux"``
    covers FLUX.1 and FLUX.2 [klein]."""
    import diffusers

    from flowdppo.models.diffusers_common import FULL_TRANSFORMER_DIR, LORA_WEIGHT_NAME, _dtype_kwarg
    from flowdppo.models.flux import pipeline_class_name

    pipe_name = pipeline_class_name(model_path) or FAMILY_PIPELINE[family]
    if pipe_name not in TRANSFORMERS:
        raise SystemExit(f"flowdppo sample: {model_path} is a {pipe_name}; supported: {', '.join(TRANSFORMERS)}")
    pipe_cls, transformer_name = getattr(diffusers, pipe_name), TRANSFORMERS[pipe_name]
    kwargs: dict[str, Any] = dict(_dtype_kwarg(dtype))
    adir = Path(adapter) if adapter else None
    if adir is not None and (adir / FULL_TRANSFORMER_DIR).is_dir():
        kwargs["transformer"] = getattr(diffusers, transformer_name).from_pretrained(
            str(adir / FULL_TRANSFORMER_DIR), **_dtype_kwarg(dtype)
        )
    pipe = pipe_cls.from_pretrained(model_path, **kwargs).to(device)
    if adir is not None and "transformer" not in kwargs:
        if not (adir / LORA_WEIGHT_NAME).exists():
            raise SystemExit(f"flowdppo sample: {adir} has neither {LORA_WEIGHT_NAME} nor {FULL_TRANSFORMER_DIR}/")
        pipe.load_lora_weights(str(adir), adapter_name="flowdppo")
        if lora_scale != 1.0:
            pipe.set_adapters(["flowdppo"], adapter_weights=[lora_scale])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample_diffusers(args, family, prompts, info, device, dtype) -> list[tuple[str, int, Any]]:
    model_path = args.model_path or info.get("base_model")
    if not model_path:
        raise SystemExit("flowdppo sample: --model-path is required (the adapter does not record its base model)")
    pipe = load_pipeline_with_adapter(family, model_path, args.adapter, dtype, device, args.lora_scale)
    res = args.resolution or info.get("resolution")
    call: dict[str, Any] = {}
    if res:
        call.update(height=int(res), width=int(res))
    if args.num_steps:
        call["num_inference_steps"] = args.num_steps
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    seq = args.max_sequence_length or info.get("max_sequence_length")
    if seq:
        call["max_sequence_length"] = int(seq)
    jobs = [(p, args.seed + j) for j, p in enumerate(p for p in prompts for _ in range(args.num_images))]
    out = []
    for i in range(0, len(jobs), args.batch_size):
        chunk = jobs[i : i + args.batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        images = pipe(prompt=[p for p, _ in chunk], generator=gens, output_type="pil", **call).images
        out += [(p, s, im) for (p, s), im in zip(chunk, images)]
    return out


def _sample_shapes(args, prompts, device, dtype) -> list[tuple[str, int, Any]]:
    from PIL import Image

    from flowdppo.models.shapes_model import ShapesFlowModel

    model = ShapesFlowModel.from_pretrained(args.model_path, device=device, dtype=dtype)
    if args.adapter:
        model.load_adapter(args.adapter)
    out = []
    for j, p in enumerate(p for p in prompts for _ in range(args.num_images)):
        seed = args.seed + j
        img = model.generate(
            [p],
            num_steps=args.num_steps or 10,
            guidance_scale=args.guidance_scale or 1.0,
            generator=torch.Generator().manual_seed(seed),
        )[0]
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        out.append((p, seed, Image.fromarray(arr)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = _adapter_info(args.adapter)
    family = args.model_family or info.get("family") or "shapes"
    prompts = _prompts(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from flowdppo.models.base import torch_dtype

    dtype = torch_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if family in FAMILY_PIPELINE:
        results = _sample_diffusers(args, family, prompts, info, device, dtype)
    else:
        results = _sample_shapes(args, prompts, device, dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for k, (prompt, seed, image) in enumerate(results):
        name = f"{k:04d}_{_slug(prompt)}.png"
        image.save(out / name)
        records.append({"file": name, "prompt": prompt, "seed": seed})
    meta = {
        "family": family,
        "model_path": args.model_path or info.get("base_model"),
        "adapter": args.adapter,
        "num_steps": args.num_steps,
        "guidance_scale": args.guidance_scale,
        "lora_scale": args.lora_scale,
        "images": records,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {len(records)} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
