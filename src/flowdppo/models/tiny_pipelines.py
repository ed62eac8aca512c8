"""Tiny random SD3, FLUX.1 and FLUX.2 [klein] diffusers pipelines, built entirely offline (tests, smoke runs,
benchmarks).

Every component is built from a config in code with seeded random weights: the CLIP and T5 text
encoders, the VAE, the transformer and the flow-matching scheduler. The tokenizers are built from an
in-code character vocabulary (no vocabulary file is downloaded). Pipelines are real
``StableDiffusion3Pipeline`` / ``FluxPipeline`` objects, so ``save_pretrained`` writes a folder that
``from_pretrained`` (and ``flowdppo.models.build_model`` through ``model.path``) loads like a hub
checkpoint.

Sizes: 32x32 pixel images, a VAE with scale factor 2 (16x16 latents), 4 latent channels; SD3 uses a
patch of 2 (64 image tokens), FLUX packs 2x2 (64 tokens of 16 channels). Building a pipeline takes
well under a second on a CPU.

:func:`bench_sd3_pipeline` is the speed benchmark's SD3 geometry instead (``flowdppo bench speed
--save-sd3 DIR``): 64x64 images, a VAE of scale factor 8 with 16 latent channels (16x8x8 latents, as
SD3's), CLIP encoders of SD3's 77 tokens, a 4-layer transformer of hidden size 128 (2 heads of 64). It is
sized so that other trainers (flow_grpo's, which encodes 77 CLIP tokens and 128 T5 tokens) run on it too.

Run as a script: ``python -m flowdppo.models.tiny_pipelines OUT_DIR [sd3|flux|flux2-klein|bench-sd3]``.
"""

from __future__ import annotations

import string

import torch

CHARS = list(string.ascii_lowercase + string.digits + ".,!?'-")
CLIP_MAX_LEN = 16  # tokens of the tiny CLIP tokenizers (SD3 and FLUX use tokenizer.model_max_length)
IMAGE_SIZE = 32  # pixels
LATENT_CHANNELS = 4


def clip_tokenizer(max_len: int = CLIP_MAX_LEN):
    """A character-level CLIP BPE tokenizer (no merges) with ``model_max_length = max_len``."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def t5_tokenizer():
    """A character-level T5 unigram tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -2.5) for c in CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_config(hidden: int, projection: int, vocab_size: int, max_len: int = CLIP_MAX_LEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        layer_norm_eps=1e-5,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_len,
        projection_dim=projection,
        hidden_act="gelu",
    )


def _t5_encoder(d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _vae(
    shift_factor: float,
    scaling_factor: float,
    levels: int = 2,
    latent_channels: int = LATENT_CHANNELS,
    image_size: int = IMAGE_SIZE,
):
    """A random VAE of scale factor ``2 ** (levels - 1)``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) + (16,) * (levels - 1),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=image_size,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _sd3_pipeline(seed: int, clip_len: int, clip_dim: int, t5_dim: int, transformer: dict, vae: dict, scheduler: dict):
    """A random ``StableDiffusion3Pipeline``: two CLIP encoders of width ``clip_dim`` (their hidden states are
    zero-padded to the T5 width ``t5_dim``, as in SD3), a T5 encoder, and the given transformer, VAE and
    scheduler settings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok_t5 = clip_tokenizer(clip_len), t5_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_config(clip_dim, clip_dim, len(tok), clip_len))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(clip_dim, clip_dim, len(tok), clip_len))
    text_encoder_3 = _t5_encoder(t5_dim, len(tok_t5))
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            patch_size=2, joint_attention_dim=t5_dim, pooled_projection_dim=2 * clip_dim, **transformer
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **scheduler),
        vae=_vae(0.0609, 1.5305, **vae),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(clip_len),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok_t5,
    )


def tiny_sd3_pipeline(seed: int = 0, dynamic_shift: bool = False):
    """A random ``StableDiffusion3Pipeline`` (SD3.5-style: qk rms-norm, one dual-attention layer, shift 3).

    ``dynamic_shift=True`` gives the scheduler resolution-dependent shifting (``mu`` from the image size).
    """
    transformer = dict(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    sched = {}
    if dynamic_shift:
        sched = dict(
            use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.16
        )
    return _sd3_pipeline(seed, CLIP_MAX_LEN, 16, 48, transformer, {}, sched)


def _flux_scheduler(**extra):
    """FLUX's flow-matching scheduler settings (resolution-dependent shift), with ``extra`` on top."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        **extra,
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A random ``FluxPipeline``: FLUX.1-dev-style (distilled guidance embedding) or, with
    ``guidance_embeds=False``, schnell-style. The scheduler uses FLUX's dynamic shift."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok, tok_t5 = clip_tokenizer(), t5_tokenizer()
    clip_dim, t5_dim = 16, 32
    text_encoder = CLIPTextModel(_clip_config(clip_dim, clip_dim, len(tok)))
    text_encoder_2 = _t5_encoder(t5_dim, len(tok_t5))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = _flux_scheduler()
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(0.1159, 0.3611),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_t5,
        transformer=transformer,
    )


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer():
    """A byte-level Qwen2 BPE tokenizer without merges (one token per byte) and a Qwen3-style chat template."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = Qwen2TokenizerFast(
        vocab=vocab,
        merges=[],
        unk_token=None,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """A random ``Flux2KleinPipeline`` (FLUX.2 [klein] base by default: true CFG, no guidance embedding).

    The Qwen3 text encoder has 27 layers so that the pipeline's default hidden-state layers (9, 18, 27)
    exist; the VAE's batch-norm statistics are randomised so decoding exercises them.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    hidden = 16
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
    )
    transformer = Flux2Transformer2DModel(
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.3)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    scheduler = _flux_scheduler(time_shift_type="exponential")
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
        is_distilled=is_distilled,
    )


def bench_sd3_pipeline(seed: int = 0):
    """The speed benchmark's random ``StableDiffusion3Pipeline`` (see the module doc): 64x64 images, 16x8x8
    latents, 77 CLIP tokens, a 4-layer transformer of hidden size 128 (2.3 M parameters)."""
    transformer = dict(
        sample_size=8,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=64,
        num_attention_heads=2,
        caption_projection_dim=128,
        pos_embed_max_size=8,
    )
    vae = dict(levels=4, latent_channels=16, image_size=64)
    return _sd3_pipeline(seed, 77, 32, 64, transformer, vae, {})


PIPELINES = {
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "flux2-klein": tiny_flux2_klein_pipeline,
    "bench-sd3": bench_sd3_pipeline,
}


def save_tiny_pipeline(family: str, directory: str, **kwargs) -> str:
    """Build the pipeline ``family`` of :data:`PIPELINES` and ``save_pretrained`` it to ``directory``."""
    build = PIPELINES[family]
    pipe = build(**kwargs)
    pipe.save_pretrained(directory)
    return directory


if __name__ == "__main__":  # python -m flowdppo.models.tiny_pipelines OUT_DIR [sd3|flux|flux2-klein|bench-sd3]
    import sys

    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in PIPELINES):
        sys.exit(f"usage: python -m flowdppo.models.tiny_pipelines OUT_DIR [{'|'.join(PIPELINES)}]")
    print(save_tiny_pipeline(sys.argv[2] if len(sys.argv) == 3 else "sd3", sys.argv[1]))
