import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_rewards import save_tiny_qwen2vl  # noqa: E402

pytest.importorskip("transformers")

PROMPTS = {
    "a red cube": ["is there a red cube ?", "is the cube red ?"],
    "two blue balls": ["is there a blue ball ?", ["how many ball ?", "two"], "is the ball blue ?"],
}


@pytest.fixture(scope="module")
def judge_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    model = save_tiny_qwen2vl(root / "model")
    qfile = root / "questions.jsonl"
    qfile.write_text("\n".join(json.dumps({"prompt": p, "questions": q}) for p, q in PROMPTS.items()) + "\n")
    return model, qfile


def _hand_prob(model_dir, image: np.ndarray, question: str, answer_tokens: list[str]) -> float:
    """One (image, question) at a time, no padding: the softmax of the last logits at the answer tokens."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ip = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    vision = ip(images=[image], return_tensors="pt")
    n = int(vision["image_grid_thw"].prod()) // 4
    pads = "<|image_pad|>" * n
    text = f"<|im_start|> user <|vision_start|>{pads}<|vision_end|> {question} Answer yes or no. "
    text += "<|im_end|> <|im_start|> assistant "
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        logits = model(**ids, **vision, mm_token_type_ids=(ids["input_ids"] == pad_id).long()).logits[0, -1]
    probs = torch.softmax(logits.float(), -1)
    return float(sum(probs[tok.convert_tokens_to_ids(t)] for t in answer_tokens))


def test_vqa_judge_is_soft_tifa_of_the_models_probabilities(judge_files):
    from flowdppo.rewards.vqa import VQAJudge

    model, qfile = judge_files
    judge = VQAJudge(model=str(model), questions=str(qfile), device="cpu", batch_size=3)  # 9 pairs: 3 forwards
    torch.manual_seed(0)
    images = torch.rand(3, 3, 56, 84)
    prompts = ["a red cube", "two blue balls", "a red cube"]
    got = judge(prompts, images)
    assert set(got) == {"vqa", "vqa_gm", "vqa_all"} and all(v.shape == (3,) for v in got.values())
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for b, p in enumerate(prompts):
        atoms = [(q, "yes") if isinstance(q, str) else tuple(q) for q in PROMPTS[p]]
        probs = torch.tensor(
            [_hand_prob(model, arr[b], q, ["yes", "Yes"] if a == "yes" else [a]) for q, a in atoms], dtype=torch.float64
        )
        assert 0 < probs.min() and probs.max() < 1
        torch.testing.assert_close(got["vqa"][b].double(), probs.mean(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["vqa_all"][b].double(), probs.prod(), atol=1e-7, rtol=1e-3)
        torch.testing.assert_close(got["vqa_gm"][b].double(), probs.prod() ** (1 / len(probs)), atol=1e-5, rtol=1e-4)


def test_vqa_judge_bad_inputs_are_one_line(judge_files, tmp_path):
    from flowdppo.rewards.vqa import VQAJudge, load_questions

    model, qfile = judge_files
    judge = VQAJudge(model=str(model), questions=str(qfile), device="cpu")
    with pytest.raises(ValueError, match="'a green cone' has no questions in"):
        judge(["a green cone"], torch.rand(1, 3, 56, 56))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "questions": [1]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected"):
        load_questions(str(bad))
    with pytest.raises(ValueError, match="no questions file"):
        load_questions(str(tmp_path / "none.jsonl"))
    # GenEval 2's own format is read too
    g2 = tmp_path / "g2.jsonl"
    g2.write_text(json.dumps({"prompt": "p", "vqa_list": [["Are there cows?", "Yes"]], "atom_count": 1}) + "\n")
    assert load_questions(str(g2)) == {"p": [("Are there cows?", "Yes")]}
