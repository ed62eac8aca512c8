"""SD3, FLUX.1 and FLUX.2 [klein] adapters against stock diffusers pipelines (tiny random components, offline).

Each tiny pipeline is built in code (`flowdppo.models.tiny_pipelines`), written with ``save_pretrained`` to a
temporary folder and loaded back through ``model.path``, exactly as a real checkpoint would be.
Nothing here downloads anything.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # tiny tokenizers are built from in-memory vocabularies
    pytest.skip("the tiny pipelines need transformers >= 5", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flowdppo.config import ModelConfig, from_dict, load_config  # noqa: E402
from flowdppo.models import FlowModel, build_model  # noqa: E402
from flowdppo.models.tiny_pipelines import IMAGE_SIZE, save_tiny_pipeline  # noqa: E402
from flowdppo.training.distributed import enable_gradient_checkpointing  # noqa: E402
from flowdppo.training.rollout import ode_sample  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cat", "blue dogs"]  # short: the tiny CLIP tokenizers are character-level, 16 tokens
SEQ = 16  # T5 tokens in the tests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads
    waiting on each other make every tiny matmul ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd3": save_tiny_pipeline("sd3", str(root / "sd3")),
        "flux": save_tiny_pipeline("flux", str(root / "flux")),
        "sd3-dynamic": save_tiny_pipeline("sd3", str(root / "sd3-dynamic"), dynamic_shift=True),
        "flux-schnell": save_tiny_pipeline("flux", str(root / "flux-schnell"), guidance_embeds=False),
        "flux2-klein": save_tiny_pipeline("flux2-klein", str(root / "flux2-klein")),
    }


def seq_len(name: str) -> int:
    return 48 if name == "flux2-klein" else SEQ  # the Qwen chat template alone is ~40 byte tokens


def model_cfg(paths, name: str, **kw) -> ModelConfig:
    family = "flux" if name.startswith("flux") else "sd3"
    base = ModelConfig(
        family=family,
        path=paths[name],
        resolution=IMAGE_SIZE,
        max_sequence_length=seq_len(name),
        lora_rank=4,
        lora_alpha=8.0,
    )
    return replace(base, **kw)


def stock_pipeline(paths, name: str):
    from diffusers import Flux2KleinPipeline, FluxPipeline, StableDiffusion3Pipeline

    cls = (
        Flux2KleinPipeline
        if name == "flux2-klein"
        else FluxPipeline
        if name.startswith("flux")
        else StableDiffusion3Pipeline
    )
    pipe = cls.from_pretrained(paths[name])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize(params, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def stock_velocity(pipe, x, sigma, cond, guidance: float) -> torch.Tensor:
    """The velocity exactly as the stock pipeline's denoising loop calls its transformer (no CFG)."""
    from diffusers import Flux2KleinPipeline, FluxPipeline

    with torch.no_grad():
        if isinstance(pipe, Flux2KleinPipeline):
            b, c, h, w = x.shape
            ids = Flux2KleinPipeline._prepare_latent_ids(x)
            pe = cond["prompt_embeds"]
            out = pipe.transformer(
                hidden_states=Flux2KleinPipeline._pack_latents(x),
                timestep=(sigma * 1000) / 1000,
                guidance=None,
                encoder_hidden_states=pe,
                txt_ids=Flux2KleinPipeline._prepare_text_ids(pe),
                img_ids=ids,
                return_dict=False,
            )[0][:, : h * w]
            return Flux2KleinPipeline._unpack_latents_with_ids(out, ids, h, w)
        if isinstance(pipe, FluxPipeline):
            b, c, h, w = x.shape
            t = (sigma * 1000).to(x.dtype)
            g = (
                torch.full([1], guidance, dtype=torch.float32).expand(b)
                if pipe.transformer.config.guidance_embeds
                else None
            )
            out = pipe.transformer(
                hidden_states=FluxPipeline._pack_latents(x, b, c, h, w),
                timestep=t / 1000,
                guidance=g,
                pooled_projections=cond["pooled_prompt_embeds"],
                encoder_hidden_states=cond["prompt_embeds"],
                txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
                return_dict=False,
            )[0]
            return FluxPipeline._unpack_latents(
                out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor
            )
        return pipe.transformer(
            hidden_states=x,
            timestep=sigma * 1000,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]


# ------------------------------------------------------------------------------------------ protocol


@pytest.mark.parametrize("name", ["sd3", "flux", "flux2-klein"])
def test_protocol_latents_and_schedule(paths, name):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    m = build_model(model_cfg(paths, name))
    assert isinstance(m, FlowModel)
    assert m.latent_shape == ((16, 8, 8) if name == "flux2-klein" else (4, 16, 16))
    pipe = stock_pipeline(paths, name)
    n = 6
    base = list(torch.linspace(1, 1 / n, n).double().numpy())
    if name == "sd3":
        pipe.scheduler.set_timesteps(n)
    elif name == "flux":  # what FluxPipeline.__call__ does: base sigmas linspace(1, 1/N, N), mu from the packed length
        c = pipe.scheduler.config
        mu = calculate_shift(8 * 8, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        pipe.scheduler.set_timesteps(n, sigmas=base, mu=mu)
    else:  # Flux2KleinPipeline: the same base sigmas, an empirical mu(length, steps)
        pipe.scheduler.set_timesteps(n, sigmas=base, mu=compute_empirical_mu(8 * 8, n))
    for schedule in ("model", "diffusers"):
        torch.testing.assert_close(m.sigmas(n, schedule), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="valid: model, diffusers"):  # the trainer builds uniform-shift itself
        m.sigmas(n, "uniform-shift")

    g = 3.5 if name == "flux" else 1.0  # FLUX.1: a guidance embedding, never a negative prompt
    cond = m.encode_prompts(PROMPTS, g)
    assert cond.batch_size == 2 and "negative_prompt_embeds" not in cond
    x = torch.randn(2, *m.latent_shape)
    v = m.velocity(x, torch.tensor([1.0, 0.5]), cond, g)
    assert v.dtype == torch.float32 and v.shape == x.shape
    # the prompt cache returns the same tensors, and a batch is row-for-row the single prompts
    again = m.encode_prompts([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    torch.testing.assert_close(again["prompt_embeds"][1], cond["prompt_embeds"][0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="latents must be"):
        m.velocity(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 0.5]), cond)


def test_sd3_cfg_conditioning_and_bf16(paths):
    m = build_model(model_cfg(paths, "sd3", dtype="bfloat16", gradient_checkpointing=True))
    assert enable_gradient_checkpointing(m)  # what the trainer does for model.gradient_checkpointing
    assert m.module.gradient_checkpointing
    cond = m.encode_prompts(PROMPTS, 4.0)
    assert {"negative_prompt_embeds", "negative_pooled_prompt_embeds"} <= set(cond.tensors)
    assert cond["prompt_embeds"].dtype == torch.bfloat16
    lora = m.trainable_parameters()
    assert lora and all(p.dtype == torch.float32 for p in lora)  # fp32 master weights
    assert all(
        p.dtype == torch.bfloat16 for n, p in m.module.named_parameters() if "lora_" not in n and "norm" not in n
    )
    x = torch.randn(2, *m.latent_shape)
    v = m.velocity(x, torch.tensor([0.9, 0.3]), cond, 4.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.sum().backward()
    assert all(p.grad is not None for p in lora[:4])


# ------------------------------------------------------------------------------ stock pipeline parity


@pytest.mark.parametrize(
    "name,guidance",
    [
        ("sd3", 1.0),
        ("sd3", 4.0),
        ("sd3-dynamic", 1.0),
        ("flux", 3.5),
        ("flux-schnell", 0.0),
        ("flux2-klein", 1.0),
        ("flux2-klein", 4.0),
    ],
)
def test_eta0_rollout_matches_stock_pipeline(paths, name, guidance):
    """Our ODE rollout (eta = 0) over model.sigmas, decoded, equals the stock pipeline's images for the
    same initial noise, schedule and guidance."""
    from flowdppo.models.flux import pack_latents

    m = build_model(model_cfg(paths, name))
    n = 5
    noise = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = m.decode(ode_sample(m, m.encode_prompts(PROMPTS, guidance), m.sigmas(n, "model"), noise, guidance))
    pipe = stock_pipeline(paths, name)
    latents = pack_latents(noise) if name in ("flux", "flux-schnell") else noise
    ref = pipe(
        prompt=PROMPTS,
        num_inference_steps=n,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=guidance,
        latents=latents,
        max_sequence_length=seq_len(name),
        output_type="pt",
    ).images
    assert ours.shape == ref.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert ours.dtype == torch.float32 and 0 <= float(ours.min()) and float(ours.max()) <= 1
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["sd3", "flux", "flux2-klein"])
def test_lora_export_loads_into_stock_pipeline(paths, name, tmp_path):
    """The exported adapter, loaded with ``load_lora_weights`` into a stock pipeline, reproduces our
    velocity; with the adapter disabled our model is the stock base model bit for bit."""
    m = build_model(model_cfg(paths, name))
    randomize(m.trainable_parameters())
    m.save_adapter(str(tmp_path / "adapter"))
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"pytorch_lora_weights.safetensors", "flowdppo_adapter.json"} <= files
    info = json.loads((tmp_path / "adapter" / "flowdppo_adapter.json").read_text())
    assert info["family"] == m.family and info["kind"] == "lora" and info["lora"]["alpha"] == 8.0

    g = 3.5 if name == "flux" else 1.0
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([1.0, 0.37])
    cond = m.encode_prompts(PROMPTS, g)
    with torch.no_grad():
        v = m.velocity(x, sigma, cond, g)
        with m.disable_adapter():
            v_ref = m.velocity(x, sigma, cond, g)
        v_after = m.velocity(x, sigma, cond, g)
    assert torch.equal(v, v_after)  # the context restores the adapter
    assert (v - v_ref).abs().max() > 1e-3  # the randomised LoRA does change the model

    pipe = stock_pipeline(paths, name)
    base = stock_velocity(pipe, x, sigma, cond, g)
    assert torch.equal(v_ref, base)  # reference policy = pretrained model, exactly
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    torch.testing.assert_close(stock_velocity(pipe, x, sigma, cond, g), v, atol=1e-5, rtol=1e-5)


def test_full_finetune_reference_and_export(paths, tmp_path):
    from flowdppo.tools.sample import load_pipeline_with_adapter

    m = build_model(model_cfg(paths, "flux", lora=False))
    n_all = sum(p.numel() for p in m.module.parameters())
    assert sum(p.numel() for p in m.trainable_parameters()) == n_all
    x = torch.randn(1, *m.latent_shape)
    sigma, cond = torch.tensor([0.6]), m.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        v0 = m.velocity(x, sigma, cond, 3.5)
    randomize(m.trainable_parameters(), scale=0.02)
    with torch.no_grad():
        v1 = m.velocity(x, sigma, cond, 3.5)
        with m.disable_adapter():
            assert torch.equal(m.velocity(x, sigma, cond, 3.5), v0)
    assert (v1 - v0).abs().max() > 1e-3
    m.save_adapter(str(tmp_path / "full"))
    assert (tmp_path / "full" / "transformer").is_dir()
    pipe = load_pipeline_with_adapter("flux", paths["flux"], str(tmp_path / "full"), torch.float32, "cpu")
    torch.testing.assert_close(stock_velocity(pipe, x, sigma, cond, 3.5), v1, atol=1e-5, rtol=1e-5)


def test_pack_unpack_match_pipeline():
    from diffusers import FluxPipeline

    from flowdppo.models.flux import image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 16, 8, 12)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), x)
    assert torch.equal(unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 64, 96, 8))
    assert torch.equal(
        image_ids(8, 12, torch.device("cpu"), torch.float32),
        FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32),
    )


def test_missing_path_is_a_clear_error():
    with pytest.raises(ValueError, match="needs model.path"):
        build_model(ModelConfig(family="sd3", path=None))


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("name", ["sd3", "flux", "flux2-klein"])
def test_two_training_iterations(paths, name, tmp_path):
    """The real trainer on the tiny pipeline: two iterations run; the first mini-batch has ratio = 1 and
    D = 0; the LoRA moves; the run exports an adapter."""
    from flowdppo.training.trainer import Trainer

    mc = model_cfg(paths, name)
    cfg = from_dict(
        {
            "model": {
                k: getattr(mc, k)
                for k in ("family", "path", "resolution", "max_sequence_length", "lora_rank", "lora_alpha")
            },
            "sampling": {"num_steps": 4, "guidance_scale": 3.5 if name == "flux" else 2.0},  # true CFG for sd3 / klein
            "steps": {"num_sde_steps": 2},
            "reward": {"weights": {"brightness": 1.0}},
            "train": {
                "iterations": 2,
                "prompts_per_iter": 2,
                "group_size": 2,
                "minibatch_size": 2,
                "micro_batch_size": 1,
                "rollout_batch_size": 4,
                "lr": 1e-2,
            },
            "eval": {"every": 0, "ratio_noise_every": 0},
            "log": {
                "run_dir": str(tmp_path),
                "name": "run",
                "tensorboard": False,
                "checkpoint_every": 0,
                "progress": False,
            },
        }
    )

    def reward(prompts, images):
        return {"brightness": images.mean(dim=(1, 2, 3))}

    trainer = Trainer(cfg, reward_fn=reward, prompts=PROMPTS + ["green tree"], eval_sets={})
    before = {k: v.clone() for k, v in trainer.model.adapter_state_dict().items()}
    run = trainer.run()
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["iteration"] for ln in lines] == [0, 1]
    first = lines[0]
    assert first["first_mb/ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert first["first_mb/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert first["first_mb/kl_max"] == pytest.approx(0.0, abs=1e-10)
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-12)  # LoRA B = 0 at the first anchor
    assert first["replay/logp_abs_diff_max"] < 1e-3  # rollout and replay agree
    after = trainer.model.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").exists()


# ------------------------------------------------------------------------------------------ commands


def test_sample_command_with_adapter(paths, tmp_path):
    from flowdppo.tools.sample import main

    m = build_model(model_cfg(paths, "flux"))
    randomize(m.trainable_parameters())
    m.save_adapter(str(tmp_path / "adapter"))
    out = tmp_path / "samples"
    rc = main(
        [
            "--adapter",
            str(tmp_path / "adapter"),
            "--prompt",
            "a red cat",
            "--prompt",
            "a dog",
            "--num-steps",
            "2",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    meta = json.loads((out / "samples.json").read_text())
    assert meta["family"] == "flux" and meta["model_path"] == paths["flux"]  # taken from the adapter
    assert [r["seed"] for r in meta["images"]] == [5, 6]
    from PIL import Image

    for r in meta["images"]:
        assert Image.open(out / r["file"]).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_configs_follow_the_recipe():
    sd35 = load_config(str(ROOT / "configs" / "sd35_medium.yaml"))
    assert (sd35.model.family, sd35.model.resolution, sd35.model.lora_rank, sd35.model.lora_alpha) == (
        "sd3",
        512,
        32,
        64,
    )
    assert (sd35.sampling.num_steps, sd35.steps.num_sde_steps, sd35.steps.end) == (10, 3, 0.5)
    assert (sd35.train.group_size, sd35.train.lr, sd35.algorithm.loss) == (16, 3e-4, "flow-dppo")
    flux = load_config(str(ROOT / "configs" / "flux1_dev.yaml"))
    assert (flux.model.family, flux.model.resolution, flux.train.group_size, flux.steps.num_sde_steps) == (
        "flux",
        512,
        16,
        3,
    )
    assert flux.reward.name == sd35.reward.name == "http"


def test_bench_real_tiny_smoke(tmp_path):
    from flowdppo.tools.bench_real import main

    out = tmp_path / "bench.json"
    assert main(["--tiny", "--iters", "1", "--warmup", "0", "--json", str(out)]) == 0  # 10 steps, 3 SDE steps
    r = json.loads(out.read_text())
    assert r["rollout_images_per_s"] > 0 and r["iteration_s"] > 0
    assert 0 < r["flops_forward_per_sample"] < r["flops_train_step_per_sample"]
    assert (r["num_steps"], r["sde_steps"], r["lora_rank"]) == (10, 3, 32)
