"""Tiny random-weight reward checkpoints saved to a folder, loaded by the rewards like a hub id."""

from __future__ import annotations

from pathlib import Path

import torch


def byte_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return vocab


def save_tiny_clip(folder: Path, image_size: int = 32, projection_dim: int = 16, seed: int = 0) -> Path:
    """A 2-layer CLIPModel, a byte-level CLIP tokenizer and a CLIP image processor in ``folder``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = byte_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **common
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **common),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # exp = 7.39: a non-trivial scale the test must apply
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder
