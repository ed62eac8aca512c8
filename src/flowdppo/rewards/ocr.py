"""OCR reward (flow_grpo's text-rendering reward) with RapidOCR on ONNX Runtime.

The PP-OCR detection and recognition models ship inside the ``rapidocr`` wheel, so this runs offline.
Needs ``pip install "flowdppo[rewards]"`` (``rapidocr``, ``onnxruntime``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flowdppo.rewards.learned import require


def quoted_text(prompt: str) -> str:
    """The text to render: what stands between the prompt's first pair of double quotes."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise ValueError(
            f'ocr reward: the prompt must quote the text to render, e.g. a sign saying "OPEN"; got {prompt!r}'
        )
    return parts[1]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognised: str, target: str) -> float:
    """flow_grpo's definition: spaces removed and lower-cased on both sides; 1 if the target occurs in
    the recognised text, else ``1 - min(edit distance, len(target)) / len(target)``."""
    rec = recognised.replace(" ", "").lower()
    tgt = target.replace(" ", "").lower()
    if not tgt:
        raise ValueError("ocr reward: the quoted text is empty")
    dist = 0 if tgt in rec else min(edit_distance(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


class OCRReward:
    """``ocr``: 1 − normalised edit distance between the recognised text and the prompt's quoted text.

    Matches flow_grpo's ``ocr_score`` (which uses PaddleOCR; here RapidOCR runs the PP-OCR models on
    ONNX Runtime). The recognised text is every detected line with confidence > 0, concatenated.
    Runs on the CPU, one image at a time (the OCR engine is not batched).
    """

    components = ("ocr",)

    def __init__(self, params: dict | None = None):
        require("rapidocr", "onnxruntime")
        from rapidocr import RapidOCR

        self.engine = RapidOCR(params={"Global.log_level": "critical", **(params or {})})

    def recognise(self, image: np.ndarray) -> str:
        out = self.engine(image)
        txts, scores = out.txts or (), out.scores or ()
        return "".join(t for t, s in zip(txts, scores) if s > 0)

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = [quoted_text(p) for p in prompts]
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        scores = [ocr_score(self.recognise(np.ascontiguousarray(a[..., ::-1])), t) for a, t in zip(arr, targets)]
        return {"ocr": torch.tensor(scores, dtype=torch.float32)}
