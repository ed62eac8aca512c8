"""The embedded shapes world: rendering, grammar and splits, and the exact rule-based detector/scorer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flowdppo.worlds import shapes as S
from flowdppo.worlds.shapes import Prompt, Scene
from flowdppo.worlds.shapes import SceneObject as O

ALL_POOLS = (
    [(c, "train") for c in S.CATEGORIES] + [(c, "eval") for c in S.CATEGORIES] + [(c, "ood") for c in S.OOD_CATEGORIES]
)
BG = np.asarray(S.BACKGROUND)


def blank() -> np.ndarray:
    return S.render(Scene(()))


def recolour(img: np.ndarray, src: str, rgb) -> np.ndarray:
    """Repaint the ``src``-coloured pixels of ``img [H, W, 3]`` (and their anti-aliased edges) with ``rgb``."""
    d = np.asarray(S.COLORS[src]) - BG
    alpha = np.clip(((img - BG) @ d) / (d @ d), 0, 1)[..., None]
    return (BG + alpha * (np.asarray(rgb) - BG)).astype(np.float32)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``[B, H, W, 3]`` over H and W (edges replicated)."""
    r = np.arange(-3, 4)
    k = np.exp(-0.5 * (r / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    x = sum(k[i] * p[:, i : i + h, :] for i in range(7))
    return sum(k[i] * x[:, :, i : i + w] for i in range(7))


@pytest.fixture(scope="module")
def gt():
    """600 ground-truth (prompt, scene, image) over every category of every split."""
    rng = np.random.default_rng(123)
    prompts = [S.sample_prompt(rng, *ALL_POOLS[i % len(ALL_POOLS)]) for i in range(600)]
    scenes = [S.scene_for_prompt(p, rng) for p in prompts]
    return prompts, scenes, np.stack([S.render(s) for s in scenes])


# ------------------------------------------------------------------------------------------ world


def test_constants():
    assert len(S.SHAPES) >= 3 and len(S.COLORS) >= 4 and S.IMAGE_SIZE == 32
    assert S.CATEGORIES == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    pal = np.array(list(S.COLORS.values()))
    dist = np.linalg.norm(pal[:, None] - pal[None], axis=-1)
    assert dist[~np.eye(len(pal), dtype=bool)].min() > 0.5
    assert np.linalg.norm(pal - BG, axis=-1).min() > 0.5


def test_render():
    img = S.render(Scene((O("square", "red", 10.0, 12.0, 5.0), O("circle", "blue", 24.0, 20.0, 4.5))))
    assert img.shape == (32, 32, 3) and img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
    assert np.allclose(img[12, 10], S.COLORS["red"]) and np.allclose(img[20, 24], S.COLORS["blue"])
    assert np.allclose(img[0, 0], S.BACKGROUND) and np.allclose(img[28, 3], S.BACKGROUND)
    assert S.render(Scene((O("square", "red", 10.0, 12.0, 5.0),)), size=64).shape == (64, 64, 3)


def test_scene_for_prompt_layout(gt):
    prompts, scenes, _ = gt
    for p, sc in zip(prompts, scenes):
        n = p.count or len(p.shapes)
        assert len(sc.objects) == n and 1 <= n <= 4
        assert sorted(o.shape for o in sc.objects) == sorted(p.shapes * (n if p.count else 1))
        for o, c in zip(sc.objects, p.colors * (n if p.count else 1)):
            assert c is None or o.color == c
            assert o.cx - o.size >= 1 and o.cx + o.size <= 31 and o.cy - o.size >= 1 and o.cy + o.size <= 31
        for a, b in itertools.combinations(sc.objects, 2):  # bounding boxes >= 2 px apart
            assert abs(a.cx - b.cx) >= a.size + b.size + 2 or abs(a.cy - b.cy) >= a.size + b.size + 2


# ------------------------------------------------------------------------------------------ detector accuracy


def _accuracy(prompts, images) -> float:
    return float(np.mean([s.strict for s in S.score_batch(prompts, images)]))


def test_ground_truth_scores_one(gt):
    prompts, _, images = gt
    rng = np.random.default_rng(0)
    clean = _accuracy(prompts, images)
    noisy = _accuracy(prompts, np.clip(images + rng.normal(0, 0.05, images.shape), 0, 1))
    print(f"ground truth strict accuracy: clean {clean:.4f}, noise 0.05 {noisy:.4f}")
    assert clean >= 0.99 and noisy >= 0.99


def test_ground_truth_mild_blur_and_fading(gt):
    prompts, _, images = gt
    blurred = _accuracy(prompts, blur(images, 0.7))
    faded = _accuracy(prompts, (BG + 0.7 * (images - BG)).astype(np.float32))  # colours 70% of the way
    print(f"ground truth strict accuracy: blur 0.7 px {blurred:.4f}, faded 0.7 {faded:.4f}")
    assert blurred >= 0.98 and faded >= 0.99


def test_detections_match_scene(gt):
    _, scenes, images = gt
    for sc, img in zip(scenes[:60], images[:60]):
        dets = S.detect(img)
        assert len(dets) == len(sc.objects)
        for o in sc.objects:
            d = min(dets, key=lambda d: (d.cx - o.cx) ** 2 + (d.cy - o.cy) ** 2)
            assert (d.shape, d.color) == (o.shape, o.color)
            assert abs(d.cx - o.cx) < 0.5 and abs(d.cy - o.cy) < 0.5 and abs(d.size - o.size) < 0.5


def test_drawing_quality_is_high_on_clean_scenes_and_drops_with_degradation(gt):
    prompts, _, images = gt
    clean = [S.score(p, im) for p, im in zip(prompts[:60], images[:60])]
    assert min(s.quality for s in clean) > 0.85
    assert all(0.0 <= d.iou <= 1.0 for s in clean for d in s.detections)
    # a blurrier drawing fits its template worse; an empty image has quality 0
    rough = [S.score(p, im) for p, im in zip(prompts[:60], blur(images[:60], 1.5))]
    assert np.mean([s.quality for s in rough]) < np.mean([s.quality for s in clean]) - 0.05
    assert S.score("a circle", blank()).quality == 0.0
    merged = S.score(
        "a circle", S.render(Scene((O("circle", "red", 14.5, 16.0, 5.0), O("circle", "red", 17.5, 16.0, 5.0))))
    )
    assert merged.quality < min(s.quality for s in clean)


# ------------------------------------------------------------------------------------------ ambiguity and wrong scenes


def test_off_palette_colour_is_unrecognised():
    img = S.render(Scene((O("square", "red", 16.0, 16.0, 6.0),)))
    for rgb in [(1.0, 0.55, 0.0), (0.6, 0.1, 0.8), (1.0, 1.0, 1.0), (0.1, 0.85, 0.85), (0.15, 0.15, 0.15)]:
        off = recolour(img, "red", rgb)
        (d,) = S.detect(off)
        assert d.color is None
        for text in ("a square", "one square", "a red square", "a yellow square"):
            s = S.score(text, off)
            assert s.strict == 0 and not s.atoms["recognised"]


def test_merged_objects_are_unrecognised():
    cases = {
        "two circles": [O("circle", "red", 13.0, 16.0, 5.0), O("circle", "red", 19.0, 16.0, 5.0)],
        "a circle": [O("circle", "red", 14.5, 16.0, 5.0), O("circle", "red", 17.5, 16.0, 5.0)],
        "two squares": [O("square", "blue", 13.0, 13.0, 4.5), O("square", "blue", 17.0, 17.0, 4.5)],
        "a square": [O("square", "blue", 14.0, 16.0, 5.0), O("square", "blue", 18.0, 16.0, 5.0)],
        "a triangle and a circle": [O("triangle", "green", 13.0, 16.0, 5.0), O("circle", "green", 19.0, 16.0, 5.0)],
        "a red circle and a blue square": [O("circle", "red", 13.0, 16.0, 5.0), O("square", "blue", 19.0, 16.0, 5.0)],
    }
    for text, objs in cases.items():
        s = S.score(text, S.render(Scene(tuple(objs))))
        assert len(s.detections) == 1 and s.strict == 0 and not s.atoms["recognised"], text


def test_noise_empty_and_full_images_score_zero():
    rng = np.random.default_rng(0)
    images = {
        "uniform": rng.uniform(0, 1, (32, 32, 3)),
        "gauss": np.clip(BG + rng.normal(0, 0.3, (32, 32, 3)), 0, 1),
        "empty": blank(),
        "black": np.zeros((32, 32, 3)),
        "red": np.broadcast_to(S.COLORS["red"], (32, 32, 3)),
    }
    prompts = [p for c, sp in ALL_POOLS for p in S.prompt_pool(c, sp)]
    for name, img in images.items():
        scores = S.score_batch(prompts, np.repeat(np.asarray(img, np.float32)[None], len(prompts), 0))
        assert max(s.strict for s in scores) == 0, name


def test_wrong_scenes_score_zero():
    def strict(text, *objs):
        return S.score(text, S.render(Scene(objs))).strict

    c, q = O("circle", "red", 8.0, 16.0, 5.0), O("square", "blue", 24.0, 16.0, 5.0)
    t = O("triangle", "yellow", 16.0, 26.0, 4.5)
    assert strict("a circle to the left of a square", c, q) == 1
    assert strict("a circle to the right of a square", c, q) == 0  # swapped position
    assert strict("a square to the left of a circle", c, q) == 0
    assert strict("a circle above a square", c, q) == 0  # horizontal pair: no vertical relation
    assert strict("a triangle below a circle", c, t) == 1 and strict("a triangle above a circle", c, t) == 0
    assert strict("a red circle and a blue square", c, q) == 1
    assert strict("a blue circle and a red square", c, q) == 0  # colours swapped
    assert strict("a green circle", c) == 0 and strict("a red circle", c) == 1  # wrong colour
    assert strict("a circle and a triangle", c, q) == 0  # missing object
    assert strict("a triangle", c, q) == 0
    tri = [O("triangle", "green", x, y, 4.5) for x, y in ((7, 7), (24, 7), (7, 24))]
    assert strict("three triangles", *tri) == 1
    assert strict("two triangles", *tri) == 0 and strict("four triangles", *tri) == 0  # wrong count
    assert strict("three green triangles", *tri) == 1 and strict("three red triangles", *tri) == 0
    assert strict("two green triangles", *tri[:2], O("triangle", "red", 7.0, 24.0, 4.5)) == 1
    # unnamed extra objects of another shape are allowed (GenEval counts only the named class)
    assert strict("two triangles", *tri[:2], O("square", "red", 7.0, 24.0, 4.5)) == 1


def test_extra_unrecognised_blob_breaks_strict():
    img = S.render(Scene((O("circle", "red", 8.0, 16.0, 5.0), O("square", "blue", 24.0, 16.0, 5.0))))
    orange = recolour(S.render(Scene((O("triangle", "red", 16.0, 5.0, 3.5),))), "red", (1.0, 0.55, 0.0))
    img = np.where(np.abs(orange - BG).sum(-1, keepdims=True) > 1e-6, orange, img)
    s = S.score("a circle and a square", img)
    assert s.strict == 0 and s.atoms == {"circle": True, "square": True, "recognised": False}
    assert s.soft == pytest.approx(2 / 3)


def test_soft_is_fraction_of_atoms():
    img = S.render(Scene((O("circle", "red", 24.0, 10.0, 5.0), O("triangle", "green", 12.0, 24.0, 5.0))))
    s = S.score("a red circle and a blue triangle", img)
    assert s.atoms == {"red circle": True, "blue triangle": False, "recognised": True}
    assert (s.strict, s.soft, s.category) == (0.0, pytest.approx(2 / 3), "color_attr")
    s = S.score("a circle to the left of a triangle", img)
    assert s.atoms == {"circle": True, "triangle": True, "circle to the left of triangle": False, "recognised": True}
    assert (s.strict, s.soft) == (0.0, 0.75)
    s = S.score("a circle above a triangle", img)
    assert (s.strict, s.soft) == (1.0, 1.0)
    s = S.score("two circles", img)
    assert s.atoms == {"count(circle)=2": False, "recognised": True} and s.soft == 0.5
    assert S.score("a square", blank()).soft == 0.5  # only "recognised" holds


def test_relation_holds_geneval_style():
    a, b = (8.0, 16.0, 4.0), (24.0, 16.0, 4.0)
    assert S.relation_holds(a, b, "left") and S.relation_holds(b, a, "right")
    assert not S.relation_holds(a, b, "right") and not S.relation_holds(a, b, "above")
    assert not S.relation_holds((15.0, 16.0, 5.0), (16.0, 16.0, 5.0), "left")  # within the margin
    assert S.relation_holds((10.0, 10.0, 4.0), (20.0, 20.0, 4.0), "left") and S.relation_holds(
        (10.0, 10.0, 4.0), (20.0, 20.0, 4.0), "above"
    )  # diagonal: both, as GenEval


def test_score_batch_layouts():
    prompts = ["a red circle", "two squares"]
    imgs = np.stack(
        [
            S.render(Scene((O("circle", "red", 16.0, 16.0, 6.0),))),
            S.render(Scene((O("square", "red", 8.0, 8.0, 5.0), O("square", "green", 22.0, 22.0, 5.0)))),
        ]
    )
    ref = [S.score(p, im) for p, im in zip(prompts, imgs)]
    assert [s.strict for s in ref] == [1.0, 1.0]
    for batch in (imgs, imgs.transpose(0, 3, 1, 2), torch.from_numpy(imgs).permute(0, 3, 1, 2)):
        out = S.score_batch([S.parse_prompt(p) for p in prompts], batch)
        assert [(s.strict, s.soft, s.atoms) for s in out] == [(s.strict, s.soft, s.atoms) for s in ref]
    with pytest.raises(ValueError):
        S.score_batch(prompts[:1], imgs)


# ------------------------------------------------------------------------------------------ grammar and splits


def test_parse_prompt_roundtrip():
    rng = np.random.default_rng(0)
    for c, sp in ALL_POOLS:
        for p in S.prompt_pool(c, sp):
            assert S.parse_prompt(p.text) == p
        p = S.sample_prompt(rng, c, sp)
        assert S.parse_prompt(p.text) == p and S.parse_prompt("  " + p.text.upper() + " ") == p
    assert S.parse_prompt("three triangles") == Prompt("three triangles", "counting", ("triangle",), (None,), 3)
    assert S.parse_prompt("a circle below a square").relation == "below"
    for bad in ("", "a purple circle", "two circle", "a circle and a circle", "five squares", "a photo of a circle"):
        with pytest.raises(ValueError, match=repr(bad)):
            S.parse_prompt(bad)


def test_one_example_per_category():
    examples = {
        "single_object": "a circle",
        "two_object": "a circle and a square",
        "counting": "one circle",
        "colors": "a blue triangle",
        "position": "a circle to the left of a square",
        "color_attr": "a red circle and a blue triangle",
        "count_color": "two red squares",
    }
    for cat, text in examples.items():
        assert S.parse_prompt(text).category == cat


def test_splits_disjoint_and_ood_unseen():
    train = {p.text for c in S.CATEGORIES for p in S.prompt_pool(c, "train")}
    ood = {p.text for c in S.OOD_CATEGORIES for p in S.prompt_pool(c, "ood")}
    for c in S.CATEGORIES:
        tr, ev = {p.text for p in S.prompt_pool(c, "train")}, {p.text for p in S.prompt_pool(c, "eval")}
        assert tr and ev
        if c in ("single_object", "two_object"):  # too few strings to split: shared, by design
            assert tr == ev
        else:
            assert not tr & ev
    evals = {p.text for c in S.CATEGORIES for p in S.prompt_pool(c, "eval")}
    assert not ood & train and not ood & evals
    for p in (p for c in S.CATEGORIES for p in S.prompt_pool(c, "train")):  # held-out pairs never named in training
        assert not any((col, sh) in S.HELDOUT_PAIRS for sh, col in zip(p.shapes, p.colors))
    with pytest.raises(ValueError):
        S.sample_prompt(np.random.default_rng(0), "counting", "ood")


def test_position_eval_has_no_swapped_twin_in_training():
    """A held-out position string's same-words twin (objects swapped, opposite layout) is held out too, so
    word order must be learnt; every pair and every relation word is still trained, in both orders."""
    train, ev = S.prompt_pool("position", "train"), S.prompt_pool("position", "eval")
    train_keys = {(p.shapes, p.relation) for p in train}
    for p in ev:
        assert (p.shapes[::-1], p.relation) not in train_keys
        assert (p.shapes[::-1], p.relation) in {(q.shapes, q.relation) for q in ev}
    for rel in S.RELATIONS:
        assert sum(p.relation == rel for p in train) >= 4
    for pair in itertools.combinations(S.SHAPES, 2):
        orders = {p.shapes for p in train if set(p.shapes) == set(pair)}
        assert orders == {pair, pair[::-1]}
    assert len(ev) == 6 and len(train) == 18


def test_prompt_sets_deterministic_and_balanced():
    a, b, c = S.prompt_sets(seed=0), S.prompt_sets(seed=0), S.prompt_sets(seed=1)
    assert a == b and a["train"] != c["train"]
    assert set(a) == {"train", "eval", "ood"}
    assert len(a["train"]) == 600 and len(a["eval"]) == 120 and len(a["ood"]) == 60
    for split, cats in (("train", S.CATEGORIES), ("eval", S.CATEGORIES), ("ood", S.OOD_CATEGORIES)):
        pool = {p for cat in cats for p in S.prompt_pool(cat, split)}
        assert set(a[split]) <= pool
        first = [p.category for p in a[split][: len(cats) * 4]]
        assert all(first.count(cat) == 4 for cat in cats)


def test_vocabulary_covers_every_prompt():
    vocab = set(S.vocabulary())
    rng = np.random.default_rng(1)
    words = {w for c, sp in ALL_POOLS for p in S.prompt_pool(c, sp) for w in p.text.split()}
    words |= {w for c, sp in ALL_POOLS for _ in range(20) for w in S.sample_prompt(rng, c, sp).text.split()}
    assert words <= vocab and len(S.vocabulary()) == len(vocab)


# ------------------------------------------------------------------------------------------ calibration


def _superellipse(p: float, ratio: float = 1.0, r: float = 6.0, color: str = "red") -> np.ndarray:
    """|x/a|^p + |y/b|^p <= 1 centred (p = 2 circle, large p square), b / a = ``ratio``, anti-aliased."""
    ss = 4
    c = (np.arange(32)[:, None] + (np.arange(ss) + 0.5) / ss).reshape(-1) - 16.0
    x, y = c[None, :] / (r / np.sqrt(ratio)), c[:, None] / (r * np.sqrt(ratio))
    a = ((np.abs(x) ** p + np.abs(y) ** p) <= 1).reshape(32, ss, 32, ss).mean((1, 3))[..., None]
    return (BG * (1 - a) + a * np.asarray(S.COLORS[color])).astype(np.float32)


def _tall_triangle(ratio: float) -> np.ndarray:
    """An apex-up triangle of half-base 5.5 and half-height 5.5 * ``ratio`` (1 = the scenes' triangle)."""
    img = blank().astype(np.float64)
    a = S._coverage("triangle", 16.0, 16.0, 5.5, 0, 0, 32, 32, sy=5.5 * ratio)[..., None]
    return (img * (1 - a) + a * np.asarray(S.COLORS["blue"])).astype(np.float32)


def test_calibrated_shapes_read_as_a_person_reads_them():
    shape = lambda img: [d.shape for d in S.detect(img)]  # noqa: E731
    # a rounded square is a square, a squircle halfway to a circle is refused, a circle is a circle
    assert shape(_superellipse(5)) == ["square"] and shape(_superellipse(4)) == ["square"]
    assert shape(_superellipse(3)) == [None] and shape(_superellipse(2)) == ["circle"]
    # a 1.2:1 rectangle is a square, 1.5:1 is not; an ellipse of 1.1:1 is a circle, 1.4:1 is not
    assert shape(_superellipse(30, 1.2)) == ["square"] and shape(_superellipse(30, 1.5)) == [None]
    assert shape(_superellipse(2, 1.1)) == ["circle"] and shape(_superellipse(2, 1.4)) == [None]
    # a slightly tall (or squat) triangle is a triangle; one twice as tall is not
    assert shape(_tall_triangle(1.2)) == ["triangle"] and shape(_tall_triangle(0.85)) == ["triangle"]
    assert shape(_tall_triangle(2.0)) == [None]


def test_judge_agrees_with_eye_labels_of_model_samples():
    """240 samples of the first shipped model labelled by eye (tests/data/judge_labels.json): the calibrated
    detector agrees on >= 90% (it was 79.6% before calibration) and passes at most 1 image the eye rejects."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    meta = __import__("json").loads((data / "judge_labels.json").read_text())
    images = np.load(data / "judge_samples.npz")["images"].astype(np.float32) / 255.0
    labels = np.array(meta["labels"])
    texts = [meta["prompts"][i // 8] for i in range(len(images))]
    det = np.array([s.strict for s in S.score_batch(texts, images)])
    assert len(labels) == len(images) == 240
    assert np.mean(det == labels) >= 0.90
    assert int(((det == 1) & (labels == 0)).sum()) <= 1
