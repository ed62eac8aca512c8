"""The graded, prompt-aware Soft-TIFA-style score of the shapes world (``tifa_atom`` / ``tifa_prompt``).

A test per atom kind walks an image across that atom's boundary (blur, a colour shift, an object sliding
across the relation line, a merged pair separating, a count off by one, a square stretched) and checks that
the atom's confidence moves monotonically, through intermediate values, from high to low.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowdppo.worlds import shapes as S
from flowdppo.worlds.shapes import Scene
from flowdppo.worlds.shapes import SceneObject as O

BG = np.asarray(S.BACKGROUND)
ALL_POOLS = (
    [(c, "train") for c in S.CATEGORIES] + [(c, "eval") for c in S.CATEGORIES] + [(c, "ood") for c in S.OOD_CATEGORIES]
)


def render(*objs: O) -> np.ndarray:
    return S.render(Scene(tuple(objs)))


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``[H, W, 3]`` towards the background (zero-padded difference image)."""
    if sigma == 0:
        return img
    r = np.arange(-5, 6)
    k = np.exp(-0.5 * (r / sigma) ** 2)
    k /= k.sum()
    d = np.pad(img - BG, ((5, 5), (5, 5), (0, 0)))
    h, w = img.shape[:2]
    d = sum(k[i] * d[i : i + h, :] for i in range(11))
    d = sum(k[i] * d[:, i : i + w] for i in range(11))
    return (BG + d).astype(np.float32)


def recolour(img: np.ndarray, src: str, rgb) -> np.ndarray:
    """Repaint the ``src``-coloured pixels (and their anti-aliased edges) with ``rgb``."""
    d = np.asarray(S.COLORS[src]) - BG
    alpha = np.clip(((img - BG) @ d) / (d @ d), 0, 1)[..., None]
    return (BG + alpha * (np.asarray(rgb) - BG)).astype(np.float32)


def rectangle(half_w: float, half_h: float, color: str = "red") -> np.ndarray:
    """An axis-aligned rectangle centred in the image, anti-aliased like :func:`shapes.render`."""
    ss = 4
    c = (np.arange(32)[:, None] + (np.arange(ss) + 0.5) / ss).reshape(-1) - 16.0
    inside = (np.abs(c[None, :]) <= half_w) & (np.abs(c[:, None]) <= half_h)
    a = inside.reshape(32, ss, 32, ss).mean((1, 3))[..., None]
    return (BG * (1 - a) + a * np.asarray(S.COLORS[color])).astype(np.float32)


def atoms(text: str, img: np.ndarray) -> dict[str, float]:
    return S.score(text, img).tifa_atoms


def assert_walk(values: list[float], decreasing: bool = True, tol: float = 0.02) -> None:
    """Monotone (within ``tol``), from >= 0.9 to <= 0.1, through at least one value strictly in between."""
    v = np.asarray(values if decreasing else values[::-1])
    assert v[0] >= 0.9 and v[-1] <= 0.1, values
    assert np.all(np.diff(v) <= tol), values
    assert np.any((v > 0.1) & (v < 0.9)), values  # a continuous walk, not a step


@pytest.fixture(scope="module")
def gt():
    rng = np.random.default_rng(7)
    prompts = [S.sample_prompt(rng, *ALL_POOLS[i % len(ALL_POOLS)]) for i in range(450)]
    scenes = [S.scene_for_prompt(p, rng) for p in prompts]
    return prompts, scenes, np.stack([S.render(s) for s in scenes])


def test_high_on_rendered_ground_truth(gt):
    prompts, _, images = gt
    scores = S.score_batch(prompts, images)
    assert min(s.tifa_atom for s in scores) > 0.95
    assert np.mean([s.tifa_prompt > 0.9 for s in scores]) >= 0.99
    assert np.mean([s.tifa_prompt for s in scores]) > 0.98
    for s in scores:  # bounded, and the prompt level is the product of the atoms
        assert all(0.0 <= v <= 1.0 for v in s.tifa_atoms.values())
        assert s.tifa_prompt == pytest.approx(float(np.prod(list(s.tifa_atoms.values()))))


def test_atom_kinds_per_category():
    img = render(O("circle", "red", 8, 16, 5), O("square", "blue", 24, 16, 5))
    assert set(atoms("a red circle and a blue square", img)) == {"circle", "circle is red", "square", "square is blue"}
    assert set(atoms("a circle to the left of a square", img)) == {"circle", "square", "circle to the left of square"}
    assert set(atoms("two red circles", img)) == {"circle", "circle is red", "count(red circle)=2"}
    assert set(atoms("a circle and a square", img)) == {"circle", "square"}
    # a wrong binding keeps the presence atoms and loses the binding ones
    a = atoms("a blue circle and a red square", img)
    assert a["circle"] > 0.9 and a["square"] > 0.9 and a["circle is blue"] < 0.05 and a["square is red"] < 0.05


def test_blur_lowers_confidence_monotonically():
    img = render(O("circle", "red", 9, 10, 6), O("square", "blue", 22, 21, 5.5))
    walk = [S.score("a red circle and a blue square", blur(img, s)) for s in np.arange(0.0, 3.01, 0.25)]
    assert_walk([s.tifa_prompt for s in walk])
    assert_walk([s.tifa_atoms["square"] for s in walk])
    # the atom level too, within 0.05: past 1.75 px (no shape passes the hard test any more) the circle's
    # confidence wobbles by up to 0.1 as the blurred blobs grow rounder
    atom = [s.tifa_atom for s in walk]
    assert atom[0] == pytest.approx(1.0) and atom[-1] < 0.1 and np.all(np.diff(atom) <= 0.05), atom


def test_colour_shift_lowers_the_binding_monotonically():
    img = render(O("circle", "red", 16, 16, 6))
    red, orange = np.asarray(S.COLORS["red"]), np.array([0.92, 0.62, 0.12])
    walk = [atoms("a red circle", recolour(img, "red", red + t * (orange - red))) for t in np.linspace(0, 1, 41)]
    assert_walk([a["circle is red"] for a in walk])


def test_object_sliding_across_the_relation_line():
    # the circle slides, above the square's level (no overlap), from well left of it to well right of it
    walk = [
        atoms("a circle to the left of a square", render(O("circle", "red", x, 9, 5), O("square", "blue", 22, 22, 5)))
        for x in np.arange(5.0, 27.01, 0.5)
    ]
    assert all(a["circle"] > 0.9 and a["square"] > 0.9 for a in walk)
    assert_walk([a["circle to the left of square"] for a in walk])
    # and the reversed relation mirrors it
    back = [
        atoms("a circle to the right of a square", render(O("circle", "red", x, 9, 5), O("square", "blue", 10, 22, 5)))
        for x in np.arange(5.0, 27.01, 0.5)
    ]
    assert_walk([a["circle to the right of square"] for a in back], decreasing=False)


def test_merged_pair_separating_raises_the_count():
    walk = [
        atoms("two circles", render(O("circle", "green", 16 - d / 2, 16, 5), O("circle", "green", 16 + d / 2, 16, 5)))
        for d in np.arange(4.0, 16.01, 0.5)
    ]
    counts = [a["count(circle)=2"] for a in walk]
    assert counts[0] < 0.05 and counts[-1] > 0.9  # merged: ambiguous, about 0; apart: about 1
    assert np.all(np.diff(counts) >= -0.02), counts


def test_count_off_by_one_is_low():
    grid = [(9, 9), (23, 9), (9, 23), (23, 23)]
    conf = {
        n: atoms("three squares", render(*[O("square", "yellow", x, y, 4.5) for x, y in grid[:n]]))["count(square)=3"]
        for n in range(5)
    }
    assert conf[3] > 0.95 and max(conf[0], conf[1], conf[2], conf[4]) < 0.05, conf
    # an extra square that shrinks to a speck counts less and less: the count walks from "one too many" to right
    walk = [
        atoms(
            "three squares",
            render(*[O("square", "yellow", x, y, 4.5) for x, y in grid[:3]], O("square", "yellow", 23, 23, r)),
        )["count(square)=3"]
        for r in np.arange(4.5, 0.99, -0.1)
    ]
    assert_walk(walk, decreasing=False)


def test_stretched_square_loses_squareness_monotonically():
    walk = [atoms("a square", rectangle(5 / np.sqrt(r), 5 * np.sqrt(r)))["square"] for r in np.arange(1.0, 2.21, 0.05)]
    assert_walk(walk)


def test_zero_on_empty_and_ambiguous_images():
    rng = np.random.default_rng(0)
    prompts = [p for c, sp in ALL_POOLS for p in S.prompt_pool(c, sp)]
    images = {
        "empty": S.render(Scene(())),
        "uniform noise": rng.uniform(0, 1, (32, 32, 3)),
        "gauss noise": np.clip(BG + rng.normal(0, 0.3, (32, 32, 3)), 0, 1),
        "black": np.zeros((32, 32, 3)),
        "all red": np.broadcast_to(S.COLORS["red"], (32, 32, 3)),
        "off-palette square": recolour(render(O("square", "red", 16, 16, 6)), "red", (0.6, 0.1, 0.8)),
    }
    for name, img in images.items():
        scores = S.score_batch(prompts, np.repeat(np.asarray(img, np.float32)[None], len(prompts), 0))
        assert max(s.tifa_prompt for s in scores) < 0.02, name
        assert max(s.tifa_atom for s in scores) < 0.05, name
    empty = S.score("a red circle and a blue square", S.render(Scene(())))
    assert empty.tifa_atom == 0.0 and empty.tifa_prompt == 0.0
    merged = render(O("circle", "red", 14.5, 16.0, 5.0), O("circle", "red", 17.5, 16.0, 5.0))
    for text in ("a circle", "two circles", "a red circle"):
        assert S.score(text, merged).tifa_atom < 0.05, text


def test_leaving_out_a_named_object_never_pays(gt):
    """Removing any one object of a ground-truth scene never raises the graded score (and lowers it, except
    for counts where the prompt asks for fewer objects than the scene holds — never in ground truth)."""
    prompts, scenes, images = gt
    full = S.score_batch(prompts, images)
    checked = 0
    for p, sc, s in zip(prompts[:150], scenes[:150], full[:150]):
        for k in range(len(sc.objects)):
            img = S.render(Scene(sc.objects[:k] + sc.objects[k + 1 :]))
            less = S.score(p, img)
            assert less.tifa_prompt < s.tifa_prompt - 0.5, (p.text, k)
            assert less.tifa_atom < s.tifa_atom - 0.1, (p.text, k)
            checked += 1
    assert checked > 200
