import io

import numpy as np
import pytest
import torch


def test_jpeg_matches_pil_byte_count():
    from PIL import Image

    from flowdppo.rewards.jpeg import JPEGCompressibility

    torch.manual_seed(0)
    smooth = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    images = torch.cat([smooth, torch.rand(1, 3, 64, 64)])
    want = []
    for a in (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        want.append(len(buf.getvalue()))
    got = JPEGCompressibility()(["", ""], images)["jpeg"]
    torch.testing.assert_close(got, -torch.tensor(want, dtype=torch.float32) / 1000 / 500)
    assert got[0] > got[1]  # the smooth image compresses better: higher reward
    ddpo = JPEGCompressibility(quality=50, scale=1)(["", ""], images)["jpeg"]
    assert ddpo[1] < ddpo[0] < 0
    with pytest.raises(ValueError, match="quality must be in 1..100"):
        JPEGCompressibility(quality=0)


def test_ocr_score_definition():
    from flowdppo.rewards.ocr import edit_distance, ocr_score, quoted_text

    assert edit_distance("kitten", "sitting") == 3
    assert quoted_text('a sign saying "Open Late" at night') == "Open Late"
    assert ocr_score("OPENLATE", "Open Late") == 1.0
    assert ocr_score("xxOPENLATExx", "open late") == 1.0  # contained: no penalty for extra text
    assert ocr_score("OPENLATF", "open late") == pytest.approx(1 - 1 / 8)
    assert ocr_score("", "open") == 0.0
    assert ocr_score("a very long unrelated text", "open") == 0.0  # distance capped at len(target)
    with pytest.raises(ValueError, match="must quote the text"):
        quoted_text("a sign with no quotes")


def _word_image(word: str, size: int) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), (250, 245, 235))
    font = ImageFont.load_default(size=size // 6)
    ImageDraw.Draw(img).text((size // 10, size // 3), word, fill=(20, 20, 60), font=font)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None] / 255


@pytest.mark.parametrize("sizes", [(256,), pytest.param((128, 512), marks=pytest.mark.slow)])
def test_ocr_reads_a_rendered_word_with_the_wheel_models(sizes):
    pytest.importorskip("rapidocr")
    pytest.importorskip("onnxruntime")
    from flowdppo.rewards.ocr import OCRReward

    reward = OCRReward()
    for size in sizes:
        images = _word_image("HELLO", size).expand(2, -1, -1, -1)
        got = reward(['a sign saying "hello"', 'a sign saying "GOODBYE"'], images)["ocr"]
        assert got.shape == (2,)
        assert got[0] >= 0.9 and got[1] <= 0.5, (size, got)
