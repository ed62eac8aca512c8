import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from tiny_rewards import save_tiny_clip  # noqa: E402

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def _hand(folder, prompts, images):
    """cos(image, text) and exp(logit_scale) straight from the model, pixels normalised by hand."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tok = CLIPTokenizer.from_pretrained(folder)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(images - mean) / std).pooler_output
        rows = [model.get_text_features(**tok([p], return_tensors="pt")).pooler_output[0] for p in prompts]
        txt = torch.stack(rows)
    cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    return cos, model.logit_scale.exp().item(), F.normalize(img, dim=-1)


PROMPTS = ["a red cube", "a blue ball on grass", "a red cube", "night"]


def test_pickscore_clipscore_hpsv2_match_hand_computation(tiny_clip):
    from flowdppo.rewards.learned import CLIPScore, HPSv2, PickScore

    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)  # the model's size: no resize, so the hand computation is exact
    cos, scale, _ = _hand(tiny_clip, PROMPTS, images)
    assert cos.abs().min() > 1e-3  # not a degenerate model
    ps = PickScore(model=str(tiny_clip), processor=str(tiny_clip), device="cpu", batch_size=3)
    got = ps(PROMPTS, images)
    assert set(got) == {"pickscore"} and got["pickscore"].shape == (4,)
    torch.testing.assert_close(got["pickscore"], scale * cos / 26, atol=1e-5, rtol=1e-4)
    cs = CLIPScore(model=str(tiny_clip), device="cpu")
    torch.testing.assert_close(cs(PROMPTS, images)["clipscore"], scale * cos / 30, atol=1e-5, rtol=1e-4)
    hp = HPSv2(model=str(tiny_clip), processor=str(tiny_clip), device="cpu")
    torch.testing.assert_close(hp(PROMPTS, images)["hpsv2"], cos, atol=1e-5, rtol=1e-4)
    # the score follows the pairing: swapping prompts changes it
    assert not torch.allclose(ps(PROMPTS[::-1], images)["pickscore"], got["pickscore"])


def test_clip_resize_matches_the_processor(tiny_clip):
    """A 64x48 image goes through resize + centre crop on the tensor like the HF processor on PIL."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from flowdppo.rewards.learned import ImageTransform

    proc = AutoImageProcessor.from_pretrained(tiny_clip)
    torch.manual_seed(1)
    img = torch.rand(1, 3, 48, 64)
    img = F.interpolate(img, scale_factor=0.25, mode="bilinear")
    img = F.interpolate(img, size=(48, 64), mode="bilinear")  # smooth: resampling kernels agree closely
    ours = ImageTransform(proc)(img)
    pil = Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    ref = torch.as_tensor(np.asarray(proc(images=pil, return_tensors="np")["pixel_values"]))
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert (ours - ref).abs().mean() < 0.03


def test_aesthetic_matches_mlp_on_embeddings(tiny_clip, tmp_path):
    from flowdppo.rewards.learned import Aesthetic, AestheticHead

    torch.manual_seed(2)
    head = AestheticHead(16)
    path = tmp_path / "head.pth"
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    path.write_bytes(buf.getvalue())
    images = torch.rand(3, 3, 32, 32)
    _, _, img = _hand(tiny_clip, ["x"] * 3, images)
    lay = head.layers
    want = lay[7](lay[6](lay[4](lay[2](lay[0](img))))).squeeze(-1)  # the five linear layers, no activation
    got = Aesthetic(head=str(path), model=str(tiny_clip), device="cpu")(["x"] * 3, images)["aesthetic"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no file at"):
        Aesthetic(head=str(tmp_path / "missing.pth"), model=str(tiny_clip), device="cpu")
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        Aesthetic(head=str(tmp_path / "bad.pth"), model=str(tiny_clip), device="cpu")


def test_missing_dependency_names_the_extra(monkeypatch):
    import importlib.util

    from flowdppo.rewards import learned

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "transformers" else real(m, *a))
    with pytest.raises(ImportError, match=r'pip install "flowdppo\[rewards\]"'):
        learned.PickScore(device="cpu")


def test_bad_dtype_and_device_are_one_line():
    from flowdppo.rewards.learned import resolve_device_dtype

    with pytest.raises(ValueError, match="valid: float32, float16, bfloat16"):
        resolve_device_dtype("cpu", "float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device_dtype("cuda", None)
