"""A VQA judge: GenEval 2's Soft-TIFA scoring with a transformers vision-language model.

Each prompt comes with its atoms' questions (a JSONL file, one prompt a line)::

    {"prompt": "two red cubes", "questions": ["Are there cubes in the image?", "Are the cubes red?",
                                              ["How many cubes are in the image?", "two"]]}

A plain string is a yes/no question whose expected answer is "yes"; a ``[question, answer]`` pair
(GenEval 2's ``vqa_list`` format, also read under that key) expects ``answer``. For each image and
question the model sees the image and the question (``template``) as one user turn of its chat
template, and the atom's soft score is the probability its next token is the expected answer: the
full-vocabulary softmax at the first answer position, summed over the answer's single-token spellings
(as given, lower-case, capitalised: "yes", "Yes"). Components:

- ``vqa``: the mean of the atom scores (Soft-TIFA AM, GenEval 2's atom-level score);
- ``vqa_gm``: their geometric mean (Soft-TIFA GM, GenEval 2's prompt-level score);
- ``vqa_all``: their product (the probability that every atom holds, if atoms were independent).

Models: the Qwen2-VL / Qwen2.5-VL / Qwen3-VL families (``Qwen/Qwen2.5-VL-7B-Instruct`` ...), loaded
with ``AutoModelForImageTextToText``; their image processor and tokenizer (with its chat template) are
used directly, so no video processor (and no torchvision) is needed. Needs ``transformers``
(``pip install "flowdppo[rewards]"``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flowdppo.rewards.learned import require, resolve_device_dtype, shared_model


def load_questions(path: str) -> dict[str, list[tuple[str, str]]]:
    """``prompt -> [(question, expected answer), ...]`` from a JSONL file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"vqa-judge: no questions file at {path!r} (JSONL of {{'prompt': ..., 'questions': [...]}})")
    out: dict[str, list[tuple[str, str]]] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qs = row.get("questions", row.get("vqa_list"))
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not isinstance(qs, list) or not qs:
                raise ValueError
            atoms = []
            for q in qs:
                if isinstance(q, str):
                    atoms.append((q, "yes"))
                elif isinstance(q, list) and len(q) == 2 and all(isinstance(x, str) for x in q):
                    atoms.append((q[0], q[1]))
                else:
                    raise ValueError
        except (ValueError, KeyError, AttributeError, TypeError):
            raise ValueError(
                f"{path}:{n}: expected {{'prompt': str, 'questions': [question or [question, answer], ...]}}"
            ) from None
        out[prompt] = atoms
    if not out:
        raise ValueError(f"vqa-judge: {path!r} holds no prompts")
    return out


class VQAJudge:
    """``vqa-judge``: Soft-TIFA with a vision-language model (see the module docstring for the score).

    ``model``: hub id or folder; ``questions``: the JSONL file; ``template``: how a question is put
    (``{question}`` is replaced); ``batch_size``: (image, question) pairs per forward.
    """

    components = ("vqa", "vqa_gm", "vqa_all")

    def __init__(
        self,
        model: str | None = None,
        questions: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        template: str = "{question} Answer yes or no.",
        image_token: str = "<|image_pad|>",
    ):
        require("transformers")
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        if not model or not questions:
            raise ValueError("vqa-judge needs model=<hub id or folder of a Qwen-VL model> and questions=<JSONL file>")
        if "{question}" not in template:
            raise ValueError(f"vqa-judge: template must contain '{{question}}', got {template!r}")
        if batch_size < 1:
            raise ValueError(f"vqa-judge: batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        if dtype is None and self.device.type == "cuda":
            self.dtype = torch.bfloat16  # VLMs are trained in bf16; fp16 overflows some of them
        self.questions = load_questions(questions)
        self.questions_file = questions
        self.template, self.batch_size = template, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"  # the answer position is the last one in every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"vqa-judge: the tokenizer of {model!r} has no chat template")
        self.image_processor = AutoImageProcessor.from_pretrained(model)
        self.model = shared_model(
            ("vlm", model, str(self.device), str(self.dtype)),
            lambda: AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype).to(self.device).eval(),
        )
        self.image_token = image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"vqa-judge: the tokenizer of {model!r} has no image token {image_token!r}")
        self._answer_ids: dict[str, list[int]] = {}

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of the answer's single-token spellings (as given, lower-case, capitalised)."""
        if answer not in self._answer_ids:
            ids = []
            for variant in dict.fromkeys([answer, answer.lower(), answer.capitalize()]):
                enc = self.tokenizer.encode(variant, add_special_tokens=False)
                if len(enc) == 1 and enc[0] != self.tokenizer.unk_token_id and enc[0] not in ids:
                    ids.append(enc[0])
            if not ids:  # no single-token spelling: the first token of the answer as given
                ids = self.tokenizer.encode(answer, add_special_tokens=False)[:1]
            self._answer_ids[answer] = ids
        return self._answer_ids[answer]

    def prompt_text(self, question: str) -> str:
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.template.format(question=question)}],
            }
        ]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def atom_probs(
        self, images: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str]
    ) -> torch.Tensor:
        """P(expected answer) for each (uint8 HWC image, question, answer) triple, batched."""
        out = []
        for i in range(0, len(images), self.batch_size):
            imgs, qs, ans = (
                images[i : i + self.batch_size],
                questions[i : i + self.batch_size],
                answers[i : i + self.batch_size],
            )
            vision = self.image_processor(images=list(imgs), return_tensors="pt")
            per_image = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
            texts = [
                self.prompt_text(q).replace(self.image_token, self.image_token * int(n), 1)
                for q, n in zip(qs, per_image)
            ]
            tok = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = {k: v.to(self.device) for k, v in {**tok, **vision}.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).long()
            logits = self.model(**inputs).logits[:, -1].float()
            probs = torch.softmax(logits, -1)
            for row, a in zip(probs, ans):
                out.append(row[self.answer_ids(a)].sum())
        return torch.stack(out).cpu()

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        missing = [p for p in prompts if p not in self.questions]
        if missing:
            raise ValueError(f"vqa-judge: prompt {missing[0]!r} has no questions in {self.questions_file!r}")
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        flat_img, flat_q, flat_a, owner = [], [], [], []
        for b, p in enumerate(prompts):
            for q, a in self.questions[p]:
                flat_img.append(arr[b])
                flat_q.append(q)
                flat_a.append(a)
                owner.append(b)
        probs = self.atom_probs(flat_img, flat_q, flat_a)
        owner_t = torch.tensor(owner)
        mean, gm, prod = [], [], []
        for b in range(len(prompts)):
            p = probs[owner_t == b].double()
            mean.append(p.mean())
            prod.append(p.prod())
            gm.append(p.clamp_min(1e-30).log().mean().exp())
        as_t = lambda xs: torch.stack(xs).float()  # noqa: E731
        return {"vqa": as_t(mean), "vqa_gm": as_t(gm), "vqa_all": as_t(prod)}
