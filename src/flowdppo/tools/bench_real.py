"""GPU benchmark of Flow-DPPO on an SD3.5-medium-sized model (random weights, no download).

    python -m flowdppo.tools.bench_real                 # SD3.5-medium transformer + SD3 VAE, 512², LoRA r32, bf16, CUDA
    python -m flowdppo.tools.bench_real --tiny          # a tiny model on the CPU: a smoke check of the same code path
    flowdppo bench-real --json out.json ...       # the same through the CLI

What it builds: diffusers' ``SD3Transformer2DModel`` from the public config of
``stabilityai/stable-diffusion-3.5-medium`` (24 MMDiT-X layers, 24 heads of 64, 13 dual-attention
layers, qk rms-norm, joint_attention_dim 4096, pooled 2048) and an ``AutoencoderKL`` with the SD3 VAE
config, both randomly initialised, wrapped in the real :class:`flowdppo.models.sd3.SD3FlowModel` (the
LoRA setup, velocity, schedule and decoding the trainer uses). The text encoders are replaced by
seeded random prompt embeddings of the real shapes (77 CLIP + ``max_sequence_length`` T5 tokens of
4096, pooled 2048): text encoding is a one-off per prompt (cached) and not part of an iteration.

What it measures (recipe: 10 steps, 3 SDE steps in the first half, no CFG, group 16):

- **rollout images/s**: :func:`flowdppo.training.rollout.rollout` alone (transformer steps + the kernel), and the
  VAE decode time per image;
- **training time per iteration**: :meth:`flowdppo.training.trainer.Trainer.iteration_step` (rollout + decode +
  reward + anchor replay + reference KL + training pass + optimizer step), split as the trainer logs it;
- **peak memory** (``torch.cuda.max_memory_allocated``; on CPU the process's max RSS);
- **model-FLOP utilisation**: transformer FLOPs counted exactly with ``torch.utils.flop_counter`` on a
  meta-device copy (LoRA included; the backward of a frozen base computes activation gradients only),
  divided by time and by the GPU's dense bf16 peak (H100/H200 SXM 989 TFLOP/s; ``--peak-tflops`` for
  others). Gradient-checkpointing recomputation is not counted (it is not model FLOPs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import tempfile
import time
import zlib
from types import SimpleNamespace
from typing import Any

import torch

from flowdppo.models.base import DTYPES

log = logging.getLogger("flowdppo")

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": tuple(range(13)),
}
# the SD3 / SD3.5 VAE (vae/config.json)
SD3_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD35_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
CLIP_TOKENS = 77

TINY_TRANSFORMER: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 16,
    "qk_norm": "rms_norm",
    "dual_attention_layers": (0,),
}
TINY_VAE: dict[str, Any] = dict(
    SD3_VAE,
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
)
TINY_CLIP_TOKENS = 8

# dense bf16 tensor-core peaks, TFLOP/s
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0)]


def _sd3_model_class():
    from flowdppo.models.sd3 import SD3FlowModel

    class RandomTextSD3(SD3FlowModel):
        """SD3FlowModel whose prompt encoder is a seeded random embedding of the real shapes."""

        clip_tokens: int = CLIP_TOKENS

        def _encode_batch(self, prompts):
            cfg = self.transformer.config
            n_tok = self.clip_tokens + self.max_sequence_length
            pe, pooled = [], []
            for p in prompts:
                g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                pe.append(torch.randn(1, n_tok, cfg.joint_attention_dim, generator=g))
                pooled.append(torch.randn(1, cfg.pooled_projection_dim, generator=g))
            return {
                "prompt_embeds": torch.cat(pe).to(self.device, self.dtype),
                "pooled_prompt_embeds": torch.cat(pooled).to(self.device, self.dtype),
            }

    return RandomTextSD3


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    prev = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(prev)


def _fmt_flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.3f} {unit}"
    return f"{f:.0f} FLOP"


def build_bench_model(model_cfg: Any, tiny: bool, seed: int = 0):
    """The SD3.5-medium-sized (or tiny) model with random weights, as an SD3FlowModel."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from flowdppo.models.base import torch_dtype

    device, dtype = torch.device(model_cfg.device), torch_dtype(model_cfg.dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**(TINY_TRANSFORMER if tiny else SD35_MEDIUM_TRANSFORMER))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD3_VAE))
    if dtype != torch.float32:
        with _quiet_diffusers():  # "modules to keep in fp32: []" notice of ModelMixin.to
            transformer.to(dtype)
            vae.to(dtype)
    pipe = SimpleNamespace(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
    )
    cls = _sd3_model_class()
    cls.clip_tokens = TINY_CLIP_TOKENS if tiny else CLIP_TOKENS
    return cls(pipe, model_cfg)


def count_flops(tiny: bool, model_cfg: Any, text_tokens: int) -> dict[str, float]:
    """Transformer FLOPs per sample: one forward, and one forward + backward of a training step
    (LoRA or full), counted on a meta-device copy."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    tcfg = TINY_TRANSFORMER if tiny else SD35_MEDIUM_TRANSFORMER
    vsf = 2 ** (len((TINY_VAE if tiny else SD3_VAE)["block_out_channels"]) - 1)
    side = model_cfg.resolution // vsf
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**tcfg)
        if model_cfg.lora:
            tr.add_adapter(
                LoraConfig(
                    r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, target_modules=list(model_cfg.lora_targets)
                )
            )
        for n, p in tr.named_parameters():
            p.requires_grad_(("lora_" in n) if model_cfg.lora else True)
        x = torch.randn(1, tcfg["in_channels"], side, side)
        pe = torch.randn(1, text_tokens, tcfg["joint_attention_dim"])
        pooled = torch.randn(1, tcfg["pooled_projection_dim"])
        t = torch.full((1,), 500.0)

    def fwd():
        return tr(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled, timestep=t, return_dict=False)[
            0
        ]

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fwd()
    f_fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        fwd().float().sum().backward()
    return {
        "forward": float(f_fwd),
        "train_step": float(fc.get_total_flops()),
        "params": float(sum(p.numel() for p in tr.parameters())),
        "trainable_params": float(sum(p.numel() for p in tr.parameters() if p.requires_grad)),
    }


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flowdppo bench-real", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (smoke check)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="default: bfloat16 (float32 with --tiny)",
    )
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 32 with --tiny)")
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--sde-steps", type=int, default=3)
    p.add_argument("--group-size", type=int, default=None, help="default 16 (2 with --tiny)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per iteration (batch = prompts * group size)")
    p.add_argument(
        "--micro-batch", type=int, default=None, help="samples per training forward (default 4; 2 with --tiny)"
    )
    p.add_argument("--rollout-batch", type=int, default=None, help="samples per rollout forward (default: the batch)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--full-finetune", action="store_true", help="train every transformer weight instead of LoRA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default 256; 8 with --tiny)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for the MFU")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from flowdppo.config import ModelConfig, from_dict
    from flowdppo.training.rollout import rollout
    from flowdppo.training.trainer import Trainer

    tiny = args.tiny
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench-real: CUDA is not available; run with --tiny (CPU smoke check) or --device cpu")
    dtype = args.dtype or ("float32" if tiny else "bfloat16")
    res = args.resolution or (32 if tiny else 512)
    group = args.group_size or (2 if tiny else 16)
    batch = group * args.prompts
    micro = min(args.micro_batch or (2 if tiny else 4), batch)
    rollout_batch = args.rollout_batch or batch
    seq = args.max_sequence_length or (8 if tiny else 256)
    rank = args.lora_rank
    model_cfg = ModelConfig(
        family="sd3",
        lora=not args.full_finetune,
        lora_rank=rank,
        lora_alpha=2.0 * rank,
        dtype=dtype,
        device=str(device),
        gradient_checkpointing=args.gradient_checkpointing,
        resolution=res,
        max_sequence_length=seq,
    )
    text_tokens = (TINY_CLIP_TOKENS if tiny else CLIP_TOKENS) + seq

    tic = time.perf_counter()
    model = build_bench_model(model_cfg, tiny, args.seed)
    build_s = time.perf_counter() - tic
    flops = count_flops(tiny, model_cfg, text_tokens)

    cfg = from_dict(
        {
            "model": {
                k: getattr(model_cfg, k)
                for k in (
                    "family",
                    "lora",
                    "lora_rank",
                    "lora_alpha",
                    "dtype",
                    "device",
                    "gradient_checkpointing",
                    "resolution",
                    "max_sequence_length",
                )
            },
            "sampling": {"num_steps": args.num_steps, "guidance_scale": 1.0, "schedule": "model"},
            "steps": {"num_sde_steps": args.sde_steps},
            "reward": {"weights": {"score": 1.0}},
            "train": {
                "iterations": args.warmup + args.iters,
                "prompts_per_iter": args.prompts,
                "group_size": group,
                "minibatch_size": batch,
                "micro_batch_size": micro,
                "rollout_batch_size": rollout_batch,
                "seed": args.seed,
            },
            "eval": {"every": 0, "ratio_noise_every": 0},
            "log": {"tensorboard": False, "progress": False, "checkpoint_every": 0},
        }
    )
    prompts = [f"benchmark prompt {i}" for i in range(max(args.prompts, 4))]

    def reward(ps, images):
        return {"score": images.float().mean(dim=(1, 2, 3))}

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, model=model, reward_fn=reward, prompts=prompts, eval_sets={}, run_dir=run_dir)

        # rollout alone (transformer + kernel), then the VAE decode
        sde_steps = trainer.step_sel.select(args.num_steps, args.seed, 0)
        chosen = prompts[: args.prompts]
        cond = trainer.encode(chosen).repeat_interleave(group)
        group_ids = torch.arange(len(chosen)).repeat_interleave(group)
        roll_times, dec_times = [], []
        model.module.eval()
        for i in range(args.warmup + args.iters):
            _sync(device)
            t0 = time.perf_counter()
            traj = rollout(
                model,
                trainer.kernel,
                [p for p in chosen for _ in range(group)],
                group_ids,
                cond,
                trainer.sigmas,
                sde_steps,
                1.0,
                torch.Generator().manual_seed(i),
                rollout_batch,
            )
            _sync(device)
            t1 = time.perf_counter()
            model.decode(traj.final)
            _sync(device)
            t2 = time.perf_counter()
            if i >= args.warmup:
                roll_times.append(t1 - t0)
                dec_times.append(t2 - t1)
            del traj

        # full training iterations
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        iters = []
        for it in range(args.warmup + args.iters):
            _sync(device)
            t0 = time.perf_counter()
            m = trainer.iteration_step(it)
            _sync(device)
            if it >= args.warmup:
                iters.append(
                    {
                        "total": time.perf_counter() - t0,
                        **{k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("time/")},
                    }
                )
        peak_mem = _peak_memory_gib(device)

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    roll_s, dec_s = mean(roll_times), mean(dec_times)
    it_s = mean([r["total"] for r in iters])
    parts = {k: mean([r[k] for r in iters]) for k in iters[0] if k != "total"}
    s = args.sde_steps
    n_ref = 2 if cfg.train.log_ref_kl else 1
    rollout_flops = batch * args.num_steps * flops["forward"]
    iter_flops = rollout_flops + batch * s * (n_ref * flops["forward"] + flops["train_step"])
    peak = peak_tflops(device, args.peak_tflops)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny" if tiny else "sd3.5-medium (random weights)",
        "resolution": res,
        "dtype": dtype,
        "lora_rank": None if args.full_finetune else rank,
        "gradient_checkpointing": args.gradient_checkpointing,
        "num_steps": args.num_steps,
        "sde_steps": s,
        "batch": batch,
        "micro_batch": micro,
        "rollout_batch": rollout_batch,
        "text_tokens": text_tokens,
        "params": flops["params"],
        "trainable_params": flops["trainable_params"],
        "flops_forward_per_sample": flops["forward"],
        "flops_train_step_per_sample": flops["train_step"],
        "build_s": build_s,
        "rollout_s": roll_s,
        "rollout_images_per_s": batch / roll_s,
        "decode_s_per_image": dec_s / batch,
        "iteration_s": it_s,
        "iteration_parts_s": parts,
        "peak_memory_gib": peak_mem,
        "rollout_tflops_per_s": rollout_flops / roll_s / 1e12,
        "iteration_tflops_per_s": iter_flops / it_s / 1e12,
        "peak_tflops": peak,
    }
    if peak:
        out["rollout_mfu"] = out["rollout_tflops_per_s"] / peak
        out["iteration_mfu"] = out["iteration_tflops_per_s"] / peak
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"device: {r['device']} (torch {r['torch']}); model: {r['model']}, {r['params'] / 1e6:.1f} M params, "
        f"{r['trainable_params'] / 1e6:.2f} M trainable",
        f"setup: {r['resolution']}², {r['dtype']}, LoRA r{r['lora_rank']}, grad ckpt {r['gradient_checkpointing']}, "
        f"{r['num_steps']} steps / {r['sde_steps']} SDE, batch {r['batch']} (micro {r['micro_batch']}), "
        f"{r['text_tokens']} text tokens, no CFG",
        f"transformer FLOPs per sample: forward {_fmt_flops(r['flops_forward_per_sample'])}, "
        f"training step (fwd + bwd) {_fmt_flops(r['flops_train_step_per_sample'])}",
        f"rollout: {r['rollout_images_per_s']:.2f} images/s ({r['rollout_s']:.2f} s per batch), "
        f"VAE decode {r['decode_s_per_image'] * 1e3:.1f} ms/image",
        f"iteration: {r['iteration_s']:.2f} s ("
        + ", ".join(f"{k} {v:.2f}" for k, v in r["iteration_parts_s"].items())
        + ")",
        f"peak memory: {r['peak_memory_gib']:.2f} GiB",
        f"throughput: rollout {_fmt_flops(r['rollout_tflops_per_s'] * 1e12)}/s, "
        f"iteration {_fmt_flops(r['iteration_tflops_per_s'] * 1e12)}/s",
    ]
    if "rollout_mfu" in r:
        lines.append(
            f"MFU (peak {r['peak_tflops']:.0f} TFLOP/s): rollout {100 * r['rollout_mfu']:.1f}%, "
            f"iteration {100 * r['iteration_mfu']:.1f}%"
        )
    else:
        lines.append("MFU: no known peak for this device (pass --peak-tflops)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
