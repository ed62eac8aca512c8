"""The embedded compositional world: 32x32 RGB scenes of coloured shapes, a GenEval-style prompt
grammar, and an exact rule-based detector/scorer.

- Scenes: up to four non-overlapping objects (``SHAPES`` x ``COLORS``) on a plain grey background.
  Coordinates are pixel units, ``x`` to the right, ``y`` down; ``size`` is the half-extent (circle
  radius, half the side of a square, half the base = half the height of an apex-up triangle), so
  every object's bounding box is ``[cx - size, cx + size] x [cy - size, cy + size]``.
- Images: ``[H, W, 3]`` float32 in ``[0, 1]`` (anti-aliased by 4x4 supersampling).
- Prompts: a small word-level grammar, one category per template (``CATEGORIES``, plus the
  out-of-domain ``count_color`` template); :func:`parse_prompt` is its exact inverse.
- Detector: every pixel is placed on the segment ``BACKGROUND -> colour`` of each palette colour
  (blur towards the background keeps its colour): more than halfway along a segment and close to it =
  that colour, off every segment and away from the background = unknown. 8-connected components are
  objects (specks under ``MIN_AREA`` px ignored); the colour is the clear majority; the shape is the
  best of three templates (matched in area and centroid, optionally blurred) by soft IoU, with a lead
  over the runner-up and agreeing second moments. Anything unclear gets ``None`` -> strict score 0.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from itertools import permutations, product
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.12, 0.78, 0.12),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
BACKGROUND: tuple[float, float, float] = (0.5, 0.5, 0.5)
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
OOD_CATEGORIES: tuple[str, ...] = ("colors", "color_attr", "count_color")
SPLITS: tuple[str, ...] = ("train", "eval", "ood")
RELATIONS: dict[str, str] = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
# Colour-shape pairs never named in train/eval text (their images still occur, e.g. for "a triangle").
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})

EVAL_FRACTION = 0.25  # share of a category's strings held out for "eval" ...
MIN_SPLIT = 8  # ... when it has at least this many strings (else train and eval share them)
# Position's eval split: for each shape pair one relation word, held out in *both* word orders, so the
# training split never holds a held-out string's swapped twin (same words, opposite layout); each pair
# keeps three relation words and each of these words two other pairs, in both orders, for training.
HELDOUT_RELATIONS: dict[frozenset[str], str] = {
    frozenset({"circle", "square"}): "left",
    frozenset({"circle", "triangle"}): "above",
    frozenset({"square", "triangle"}): "below",
}
POS_THRESHOLD = 0.1  # GenEval-style relation margin, in units of the two objects' extents
# detector thresholds (colour distances are Euclidean in RGB [0, 1])
TAU_RES = 0.2  # max distance of a pixel from its colour's segment
TAU_BG = 0.25  # an off-segment pixel this close to the background is background
MIN_AREA = 8  # components smaller than this (at 32x32) are specks and ignored
COLOR_SHARE = 0.75  # the majority colour must hold this share of a component's pixels
IOU_MIN, IOU_MARGIN = 0.75, 0.05  # shape: best template soft-IoU, and its lead over the runner-up
HALO_MIN = 0.2  # soft coverage below this is ignored in the shape IoU
BLURS = (0.0, 0.5, 0.8, 1.1)  # Gaussian blurs (px) tried on the shape templates
SIZE_RANGE = (2.5, 10.5)  # plausible half-extents (px, at 32x32); scenes use 4..7
CORR_TOL = 0.2  # max |x-y correlation| difference, blob vs template (skewed blobs are merged pairs)
# calibrated against eye labels of model samples (docs/shapes-demo.md): templates are stretched to the blob's
# aspect ratio (estimated from its second moments, up to ASPECT_FIT), and a shape counts if that aspect is
# within ASPECT_MAX (height:width either way), so a slightly tall triangle or a 1.2:1 "square" is read as a
# person reads it, while a merged pair (about 2:1, or skewed) is still refused. The square is also tried with
# rounded corners (radius ROUNDING x its half-side): a rounded square is a square to the eye.
ASPECT_MAX: dict[str, float] = {"circle": 1.2, "square": 1.3, "triangle": 1.35}
ASPECT_FIT = 1.6
ROUNDING = 0.4
# graded (Soft-TIFA-style) confidences: smooth ramps around the detector's hard thresholds (see tifa_score)
SOFT_IOU = (0.6, 0.8)  # shape confidence ramps up over this template-IoU range ...
SOFT_MARGIN = 0.08  # ... and over a lead of 0 -> this over the runner-up shape
SOFT_COLOR = (0.5, 0.9)  # colour confidence ramps up over this soft share of the blob's pixels
SOFT_COLOR_SCALE = TAU_RES / 3  # a pixel's colour probabilities: softmax of -res^2 / (2 scale^2) (+ unknown at TAU_RES)
SOFT_RELATION = 0.03  # relation confidence = sigmoid(signed margin / this)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class Prompt:
    """A grammar prompt. ``shapes``/``colors`` list the named objects in order (colour ``None`` =
    any); ``count`` for counting templates; ``relation`` in ``RELATIONS`` keys for position."""

    text: str
    category: str
    shapes: tuple[str, ...]
    colors: tuple[str | None, ...]
    count: int | None = None
    relation: str | None = None


@dataclass
class Detection:
    """One connected component: ``shape``/``color`` ``None`` = unrecognised; ``cx, cy, size`` of the
    matched template (bounding-box centre and half-extent), ``area`` in pixels; ``iou`` = the soft IoU of
    the best-fitting shape template (a graded measure of how cleanly the blob is drawn)."""

    shape: str | None
    color: str | None
    cx: float
    cy: float
    size: float
    area: int
    iou: float = 0.0
    shape_conf: dict[str, float] = field(default_factory=dict)
    color_conf: dict[str, float] = field(default_factory=dict)

    def conf(self, shape: str, color: str | None = None) -> float:
        """Graded confidence in [0, 1] that this blob is a ``color`` ``shape`` (``None`` = any palette colour)."""
        c = self.color_conf.get(color, 0.0) if color is not None else max(self.color_conf.values(), default=0.0)
        return self.shape_conf.get(shape, 0.0) * c


@dataclass
class Score:
    """``strict`` = 1.0 iff every atom holds; ``soft`` = share of atoms that hold; ``atoms`` by readable name
    (e.g. ``"red circle"``, ``"count(square)=2"``, ``"circle to the left of square"``, ``"recognised"``).
    ``tifa_atom`` / ``tifa_prompt``: the graded Soft-TIFA-style scores of :func:`tifa_score` (atom level =
    mean confidence, prompt level = product), ``tifa_atoms`` the confidences by atom."""

    strict: float
    soft: float
    atoms: dict[str, bool]
    category: str
    detections: list[Detection] = field(default_factory=list)
    tifa_atom: float = 0.0
    tifa_prompt: float = 0.0
    tifa_atoms: dict[str, float] = field(default_factory=dict)

    @property
    def quality(self) -> float:
        """The detections' :func:`drawing_quality`."""
        return drawing_quality(self.detections)


# ----------------------------------------------------------------------------------- rendering


def _coverage(
    shape: str,
    cx: float,
    cy: float,
    s: float,
    x0: int,
    y0: int,
    h: int,
    w: int,
    ss: int = 4,
    sy: float | None = None,
    rounding: float = 0.0,
) -> np.ndarray:
    """Fraction ``[h, w]`` of each pixel of the window at ``(y0, x0)`` covered by the shape (``ss x ss`` samples).

    ``s`` is the half-width and ``sy`` the half-height (default ``s``: the scenes' shapes); ``rounding``
    rounds a square's corners with a radius of that fraction of its smaller half-side."""
    sy = s if sy is None else sy
    off = (np.arange(ss) + 0.5) / ss
    xs = (x0 + np.arange(w)[:, None] + off[None, :]).reshape(-1) - cx  # [w * ss]
    ys = (y0 + np.arange(h)[:, None] + off[None, :]).reshape(-1) - cy  # [h * ss]
    X, Y = xs[None, :], ys[:, None]
    if shape == "circle":
        inside = (X / s) ** 2 + (Y / sy) ** 2 <= 1.0
    elif shape == "square":
        inside = (np.abs(X) <= s) & (np.abs(Y) <= sy)
        if rounding > 0:
            rc = rounding * min(s, sy)
            ex, ey = np.maximum(np.abs(X) - (s - rc), 0), np.maximum(np.abs(Y) - (sy - rc), 0)
            inside &= ex**2 + ey**2 <= rc * rc
    elif shape == "triangle":
        inside = (Y <= sy) & (np.abs(X) <= s * (Y + sy) / (2 * sy))
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as an image ``[size, size, 3]`` float32 in ``[0, 1]``; coordinates scale by ``size / IMAGE_SIZE``;
    later objects paint over earlier ones."""
    k = size / IMAGE_SIZE
    img = np.broadcast_to(np.asarray(BACKGROUND, np.float64), (size, size, 3)).copy()
    for o in scene.objects:
        a = _coverage(o.shape, o.cx * k, o.cy * k, o.size * k, 0, 0, size, size)[..., None]
        img = img * (1 - a) + a * np.asarray(COLORS[o.color])
    return img.astype(np.float32)


# ----------------------------------------------------------------------------------- detection

_PALETTE = np.array(list(COLORS.values()))  # [K, 3]
_DIRS = _PALETTE - np.asarray(BACKGROUND)  # [K, 3]
_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}  # area / size**2
_VARIANTS: dict[str, tuple[tuple[float, float], ...]] = {  # (corner rounding, area / size**2) tried per shape
    "circle": ((0.0, math.pi),),
    "square": ((0.0, 4.0), (ROUNDING, 4.0 - (4.0 - math.pi) * ROUNDING**2)),
    "triangle": ((0.0, 2.0),),
}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3}  # (centroid - centre) / size, in y


def _pixel_labels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``img [..., 3]`` -> (labels ``[...]`` int: ``k`` = colour ``k``, ``-1`` = background, ``-2`` = unknown;
    alpha ``[..., K]``: each pixel's (unclipped) position along the segment background -> colour ``k``;
    res ``[..., K]``: its distance from that segment)."""
    d = img[..., None, :] - np.asarray(BACKGROUND)  # [..., 1, 3]
    alpha = (d * _DIRS).sum(-1) / (_DIRS**2).sum(-1)  # [..., K]
    ac = np.clip(alpha, 0.0, 1.5)
    res = np.linalg.norm(d - ac[..., None] * _DIRS, axis=-1)  # [..., K]
    best = res.argmin(-1)
    r = np.take_along_axis(res, best[..., None], -1)[..., 0]
    a = np.take_along_axis(ac, best[..., None], -1)[..., 0]
    near_bg = np.linalg.norm(d[..., 0, :], axis=-1) <= TAU_BG
    return np.where(r <= TAU_RES, np.where(a >= 0.5, best, -1), np.where(near_bg, -1, -2)), alpha, res


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of ``mask [B, H, W]``: labels ``[B, H, W]`` (-1 outside the mask; a label is
    the smallest flat index of its component's pixels). Min-propagation with pointer jumping."""
    b, h, w = mask.shape
    big = b * h * w
    lab = np.where(mask, np.arange(big).reshape(b, h, w), big)
    while True:
        p = np.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        new = lab.copy()
        for dy in range(3):
            for dx in range(3):
                new = np.minimum(new, p[:, dy : dy + h, dx : dx + w])
        new = np.where(mask, new, big)
        new = np.where(mask, np.append(new.reshape(-1), big)[new], big)  # pointer jumping
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


@lru_cache(maxsize=512)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``[n, n]``: Gaussian blur along one axis (zero outside the window); identity for ``sigma = 0``."""
    if sigma == 0:
        return np.eye(n)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.exp(-0.5 * (d / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)


def _moments(a: np.ndarray) -> tuple[float, float]:
    """Anisotropy of a non-negative map ``a [h, w]``: (log(var_y / var_x), correlation of x and y)."""
    yy, xx = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    m = max(float(a.sum()), 1e-9)
    mx, my = float((a * xx).sum()) / m, float((a * yy).sum()) / m
    vx, vy = float((a * (xx - mx) ** 2).sum()) / m, float((a * (yy - my) ** 2).sum()) / m
    cxy = float((a * (xx - mx) * (yy - my)).sum()) / m
    return math.log(max(vy, 1e-9) / max(vx, 1e-9)), cxy / max(math.sqrt(vx * vy), 1e-9)


def _ramp(x: float, lo: float, hi: float) -> float:
    """Smoothstep from 0 (``x <= lo``) to 1 (``x >= hi``), C1-continuous."""
    t = min(max((x - lo) / (hi - lo), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _shape_confidences(
    ious: Sequence[float], sizes: Sequence[float], shape_err: Sequence[tuple[float, float]]
) -> dict[str, float]:
    """Graded confidence per shape from the detector's own measurements: the template IoU, its lead over the
    best other shape, the aspect ratio (``|log aspect|``) and the x-y correlation error of the blob, and the
    size, each a smooth ramp across the hard test's threshold (so confidence falls continuously as a drawing
    degrades)."""
    out = {}
    for i, shape in enumerate(SHAPES):
        lead = ious[i] - max(ious[j] for j in range(len(SHAPES)) if j != i)
        da, dc = shape_err[i]
        lim = math.log(ASPECT_MAX[shape])
        out[shape] = (
            _ramp(ious[i], *SOFT_IOU)
            * _ramp(lead, 0.0, SOFT_MARGIN)
            * _ramp(-da, -lim - 0.06, -lim + 0.08)
            * _ramp(-dc, -2 * CORR_TOL, -CORR_TOL)
            * _ramp(sizes[i], SIZE_RANGE[0] - 1.0, SIZE_RANGE[0])
            * _ramp(-sizes[i], -SIZE_RANGE[1] - 1.0, -SIZE_RANGE[1])
        )
    return out


def _classify_shape(
    amap: np.ndarray, y0: int, x0: int
) -> tuple[str | None, float, float, float, float, dict[str, float]]:
    """Soft coverage ``amap [h, w]`` of one blob in the window at ``(y0, x0)`` -> (shape or None, cx, cy, size,
    best template IoU, graded confidence per shape).

    Each shape's template has the blob's mass (area) and centroid and its aspect ratio (from the second
    moments, clipped to ``ASPECT_FIT``; squares also with rounded corners), is blurred by the best of
    ``BLURS``, and is compared with the blob by soft IoU (values below ``HALO_MIN`` dropped on both sides).
    The best shape wins if its IoU is at least ``IOU_MIN``, leads the runner-up by ``IOU_MARGIN``, its size
    is in ``SIZE_RANGE``, the blob's aspect is within ``ASPECT_MAX`` and its x-y correlation matches the
    template's (merged blobs are elongated or skewed)."""
    h, w = amap.shape
    mass = max(float(amap.sum()), 1.0)
    my = float((amap.sum(1) * (np.arange(h) + 0.5)).sum()) / mass + y0
    mx = float((amap.sum(0) * (np.arange(w) + 0.5)).sum()) / mass + x0
    a = np.where(amap >= HALO_MIN, np.minimum(amap, 1.0), 0.0)
    ab, cb = _moments(a)
    ious, params, errs = [], [], []
    for shape in SHAPES:
        best, best_p, best_e = -1.0, (mx, my, 0.0), (0.0, 0.0)
        for rounding, area in _VARIANTS[shape]:
            s = math.sqrt(mass / area)
            at, _ = _moments(_coverage(shape, mx, my - _CENTROID_DY[shape] * s, s, x0, y0, h, w, rounding=rounding))
            log_asp = (ab - at) / 2  # var_y / var_x grows with (height / width)^2
            fit = min(max(log_asp, -math.log(ASPECT_FIT)), math.log(ASPECT_FIT))
            sx, sy = s * math.exp(-fit / 2), s * math.exp(fit / 2)
            cy = my - _CENTROID_DY[shape] * sy
            t0 = _coverage(shape, mx, cy, sx, x0, y0, h, w, sy=sy, rounding=rounding)
            for sigma in BLURS:
                t = _blur_matrix(h, sigma) @ t0 @ _blur_matrix(w, sigma).T
                t = np.where(t >= HALO_MIN, t, 0.0)
                iou = float(np.minimum(a, t).sum() / max(np.maximum(a, t).sum(), 1e-9))
                if iou > best:
                    best, best_p, best_e = iou, (mx, cy, s), (abs(log_asp), abs(cb - _moments(t)[1]))
        ious.append(best)
        params.append(best_p)
        errs.append(best_e)
    i, j = np.argsort(ious)[::-1][:2]
    ok = (
        ious[i] >= IOU_MIN
        and ious[i] - ious[j] >= IOU_MARGIN
        and SIZE_RANGE[0] <= params[i][2] <= SIZE_RANGE[1]
        and errs[i][0] <= math.log(ASPECT_MAX[SHAPES[i]])
        and errs[i][1] <= CORR_TOL
    )
    cx, cy, s = params[i]
    conf = _shape_confidences(ious, [p[2] for p in params], errs)
    return (SHAPES[i] if ok else None), float(cx), float(cy), float(s), float(ious[i]), conf


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """``[h, w]`` bool dilated by a ``(2r+1)^2`` square."""
    h, w = mask.shape
    p = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def _detect_many(images: np.ndarray) -> list[list[Detection]]:
    """Detections for ``images [B, H, W, 3]`` in ``[0, 1]``."""
    images = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    b, h, w, _ = images.shape
    labels, alpha, res = _pixel_labels(images)  # [B, H, W], [B, H, W, K], [B, H, W, K]
    # graded colour evidence: each pixel's probabilities over the palette and "unknown" (at distance TAU_RES)
    logits = np.concatenate([-(res**2), np.full(res.shape[:-1] + (1,), -(TAU_RES**2))], -1) / (2 * SOFT_COLOR_SCALE**2)
    logits -= logits.max(-1, keepdims=True)
    prob = np.exp(logits)
    prob = prob[..., :-1] / prob.sum(-1, keepdims=True)  # [B, H, W, K]
    comps = _components(labels != -1)
    min_area = MIN_AREA * h * w / IMAGE_SIZE**2
    names = list(COLORS)
    out: list[list[Detection]] = []
    for i in range(b):
        ids, areas = np.unique(comps[i][comps[i] >= 0], return_counts=True)
        dets = []
        for cid, area in zip(ids, areas):
            if area < min_area:
                continue
            comp = comps[i] == cid
            counts = np.bincount(labels[i][comp] + 2, minlength=len(names) + 2)[2:]  # colour pixels only
            k = int(counts.argmax())
            color = names[k] if counts[k] >= COLOR_SHARE * area else None
            ys, xs = np.nonzero(comp)
            y0, y1 = max(ys.min() - 3, 0), min(ys.max() + 4, h)
            x0, x1 = max(xs.min() - 3, 0), min(xs.max() + 4, w)
            own, al = comp[y0:y1, x0:x1], alpha[i, y0:y1, x0:x1]  # [h', w'], [h', w', K]
            # the soft edge: background pixels within 2 px that do not lean towards another colour
            other = (al.argmax(-1) != k) & (al.max(-1) >= HALO_MIN)
            edge = (comps[i, y0:y1, x0:x1] < 0) & ~other & _dilate(own, 2)
            # normalised by the blob's typical intensity, so faded or over-saturated colours keep their shape
            peak = min(max(float(np.quantile(al[..., k][own], 0.75)), 0.5), 1.0)
            amap = np.clip(np.where(own | edge, al[..., k] / peak, 0.0), -0.5, 1.5) if counts[k] else own.astype(float)
            shape, cx, cy, s, iou, shape_conf = _classify_shape(amap, y0, x0)
            shares = prob[i][comp].mean(0)  # [K] soft share of each colour among the blob's pixels
            color_conf = {n: _ramp(float(v), *SOFT_COLOR) for n, v in zip(names, shares)}
            dets.append(Detection(shape, color, cx, cy, s, int(area), iou, shape_conf, color_conf))
        out.append(dets)
    return out


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in ``image [H, W, 3]`` float in ``[0, 1]`` (values outside are clipped)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"detect expects an image [H, W, 3], got shape {image.shape}")
    return _detect_many(image[None])[0]


# ----------------------------------------------------------------------------------- scoring


def relation_margin(
    a: tuple[float, float, float],
    b: tuple[float, float, float],
    relation: str,
    threshold: float = POS_THRESHOLD,
    cos: float = 0.5,
) -> float:
    """Signed margin of the GenEval-style relation test (> 0 iff :func:`relation_holds`): the centre offset of
    ``a = (cx, cy, size)`` from ``b``, shrunk by ``threshold`` times the two extents and divided by the
    distance, projected on the relation's axis, minus ``cos``. Continuous in the positions."""
    off = np.array([a[0] - b[0], a[1] - b[1]])
    norm = float(np.linalg.norm(off))
    if norm == 0:
        return -cos
    dx, dy = np.sign(off) * np.maximum(np.abs(off) - threshold * 2 * (a[2] + b[2]), 0) / norm
    return float({"left": -dx, "right": dx, "above": -dy, "below": dy}[relation] - cos)


def relation_holds(
    a: tuple[float, float, float],
    b: tuple[float, float, float],
    relation: str,
    threshold: float = POS_THRESHOLD,
    cos: float = 0.5,
) -> bool:
    """GenEval-style: is object ``a = (cx, cy, size)`` ``relation`` of ``b``? The centre offset is shrunk by
    ``threshold`` times the two extents, then its direction must be within ``acos(cos)`` of the axis."""
    return relation_margin(a, b, relation, threshold, cos) > 0


def _atoms(p: Prompt, dets: list[Detection]) -> dict[str, bool]:
    ok = [d for d in dets if d.shape is not None and d.color is not None]
    has = lambda s, c=None: [d for d in ok if d.shape == s and (c is None or d.color == c)]  # noqa: E731
    name = lambda s, c: f"{c} {s}" if c else s  # noqa: E731
    atoms: dict[str, bool] = {}
    if p.category in ("counting", "count_color"):
        s, c = p.shapes[0], p.colors[0]
        atoms[f"count({name(s, c)})={p.count}"] = len(has(s, c)) == p.count
    else:
        for s, c in zip(p.shapes, p.colors):
            atoms[name(s, c)] = bool(has(s, c))
    if p.category == "position":
        a, b = p.shapes
        atoms[f"{a} {RELATIONS[p.relation]} {b}"] = any(
            relation_holds((da.cx, da.cy, da.size), (db.cx, db.cy, db.size), p.relation)
            for da in has(a)
            for db in has(b)
        )
    atoms["recognised"] = len(ok) == len(dets)
    return atoms


def score(prompt: Prompt | str, image: np.ndarray) -> Score:
    """GenEval-style score of ``image [H, W, 3]`` in ``[0, 1]``: strict = every atom holds, soft = share of atoms."""
    return _score(prompt if isinstance(prompt, Prompt) else parse_prompt(prompt), detect(image))


def drawing_quality(dets: Sequence[Detection]) -> float:
    """Mean best-template IoU of the detected blobs (0 for an empty image): how cleanly the shapes are
    drawn, whatever the prompt. A graded signal under the all-or-nothing shape test."""
    return float(np.mean([d.iou for d in dets])) if dets else 0.0


def _exactly(probs: Sequence[float], n: int) -> float:
    """P(exactly ``n`` of independent events with these probabilities hold) (Poisson-binomial)."""
    dist = np.zeros(len(probs) + 2)
    dist[0] = 1.0
    for q in probs:
        dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        dist[0] *= 1 - q
    return float(dist[n]) if n <= len(probs) else 0.0


def tifa_atoms(p: Prompt, dets: Sequence[Detection]) -> dict[str, float]:
    """Soft-TIFA-style atoms of ``p``, each a confidence in [0, 1] from the detector's graded measurements
    (:attr:`Detection.conf` = shape confidence x colour confidence of a blob):

    - object present (``"circle"``): the best blob's confidence of being that shape (any palette colour);
    - attribute binding (``"circle is red"``, colour prompts): the best blob's confidence of being a red circle;
    - count (``"count(circle)=3"``): the probability that exactly ``n`` blobs are the named class, the blobs'
      confidences taken as independent probabilities (one off lowers it by about the off blob's confidence);
    - relation (``"circle to the left of square"``): the best pair's ``conf(a) conf(b) sigmoid(margin / s)``
      with :func:`relation_margin` (``s = SOFT_RELATION``), continuous as an object slides across the line.

    Presence, binding and relation atoms are maxima over blobs: removing a blob never raises them, so no
    atom rewards leaving out what the prompt asks for (a count atom falls for a missing *and* an extra object).
    """
    atoms: dict[str, float] = {}
    for s, c in dict.fromkeys(zip(p.shapes, p.colors)):
        atoms[s] = max((d.conf(s) for d in dets), default=0.0)
        if c is not None:
            atoms[f"{s} is {c}"] = max((d.conf(s, c) for d in dets), default=0.0)
    if p.count is not None:
        s, c = p.shapes[0], p.colors[0]
        name = f"{c} {s}" if c else s
        atoms[f"count({name})={p.count}"] = _exactly([d.conf(s, c) for d in dets], p.count)
    if p.relation is not None:
        a, b = p.shapes
        atoms[f"{a} {RELATIONS[p.relation]} {b}"] = max(
            (
                da.conf(a)
                * db.conf(b)
                / (
                    1.0
                    + math.exp(
                        -relation_margin((da.cx, da.cy, da.size), (db.cx, db.cy, db.size), p.relation) / SOFT_RELATION
                    )
                )
                for da in dets
                for db in dets
                if da is not db
            ),
            default=0.0,
        )
    return atoms


def tifa_score(p: Prompt, dets: Sequence[Detection]) -> tuple[float, float, dict[str, float]]:
    """``(atom level, prompt level, atoms)``: the mean and the product of :func:`tifa_atoms`, the graded
    analogues of ``soft`` and ``strict`` (GenEval 2's Soft-TIFA reports the same two levels). 0 for an
    empty image."""
    atoms = tifa_atoms(p, dets)
    vals = list(atoms.values())
    return float(np.mean(vals)), float(np.prod(vals)), atoms


def _score(p: Prompt, dets: list[Detection]) -> Score:
    atoms = _atoms(p, dets)
    t_atom, t_prompt, t_atoms = tifa_score(p, dets)
    return Score(
        float(all(atoms.values())), sum(atoms.values()) / len(atoms), atoms, p.category, dets, t_atom, t_prompt, t_atoms
    )


def score_batch(prompts: Sequence[Prompt | str], images: np.ndarray | torch.Tensor) -> list[Score]:
    """Scores for ``images [B, 3, H, W]`` or ``[B, H, W, 3]`` (numpy or torch) in ``[0, 1]``; prompts may be strings."""
    if not isinstance(images, np.ndarray):
        images = images.detach().float().cpu().numpy()
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"score_batch expects images [B, 3, H, W] or [B, H, W, 3], got {images.shape}")
    if images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    parsed = [p if isinstance(p, Prompt) else parse_prompt(p) for p in prompts]
    return [_score(p, d) for p, d in zip(parsed, _detect_many(images))]


# ----------------------------------------------------------------------------------- grammar


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _enumerate(category: str) -> list[Prompt]:
    """Every prompt of a template, in a fixed order."""
    P, out = Prompt, []
    if category == "single_object":
        out = [P(f"a {s}", category, (s,), (None,)) for s in SHAPES]
    elif category == "two_object":
        out = [P(f"a {a} and a {b}", category, (a, b), (None, None)) for a, b in permutations(SHAPES, 2)]
    elif category == "counting":
        out = [P(f"{NUMBERS[n - 1]} {_plural(s, n)}", category, (s,), (None,), n) for s in SHAPES for n in range(1, 5)]
    elif category == "colors":
        out = [P(f"a {c} {s}", category, (s,), (c,)) for c in COLORS for s in SHAPES]
    elif category == "position":
        out = [
            P(f"a {a} {RELATIONS[r]} a {b}", category, (a, b), (None, None), None, r)
            for (a, b), r in product(permutations(SHAPES, 2), RELATIONS)
        ]
    elif category == "color_attr":
        out = [
            P(f"a {c1} {s1} and a {c2} {s2}", category, (s1, s2), (c1, c2))
            for (s1, s2), (c1, c2) in product(permutations(SHAPES, 2), permutations(COLORS, 2))
        ]
    elif category == "count_color":
        out = [
            P(f"{NUMBERS[n - 1]} {c} {_plural(s, n)}", category, (s,), (c,), n)
            for c in COLORS
            for s in SHAPES
            for n in range(1, 5)
        ]
    else:
        raise ValueError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES + ('count_color',))}")
    return out


def _heldout(p: Prompt) -> bool:
    return any((c, s) in HELDOUT_PAIRS for s, c in zip(p.shapes, p.colors))


@cache
def prompt_pool(category: str, split: str = "train") -> tuple[Prompt, ...]:
    """All distinct prompts of ``category`` in ``split`` (see the module README for the split rules)."""
    if split == "ood":
        if category not in OOD_CATEGORIES:
            raise ValueError(f"category {category!r} has no ood prompts; valid: {', '.join(OOD_CATEGORIES)}")
        return tuple(p for p in _enumerate(category) if category == "count_color" or _heldout(p))
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is not in split {split!r}; valid: {', '.join(CATEGORIES)}")
    pool = [p for p in _enumerate(category) if not _heldout(p)]
    if category == "position":
        chosen = {p for p in pool if HELDOUT_RELATIONS[frozenset(p.shapes)] == p.relation}
        return tuple(p for p in pool if (p in chosen) == (split == "eval"))
    if len(pool) < MIN_SPLIT:
        return tuple(pool)
    ranked = sorted(pool, key=lambda p: zlib.crc32(p.text.encode()))
    n_eval = math.ceil(EVAL_FRACTION * len(pool))
    chosen = set(ranked[:n_eval]) if split == "eval" else set(ranked[n_eval:])
    return tuple(p for p in pool if p in chosen)


def sample_prompt(rng: np.random.Generator, category: str, split: str = "train") -> Prompt:
    """A uniform draw from :func:`prompt_pool` ``(category, split)``."""
    pool = prompt_pool(category, split)
    return pool[int(rng.integers(len(pool)))]


def prompt_sets(seed: int = 0, n_train: int = 600, n_eval: int = 120, n_ood: int = 60) -> dict[str, list[Prompt]]:
    """Category-balanced prompt lists ``{"train", "eval", "ood"}``, deterministic for ``seed``: categories
    take turns (so any prefix is balanced), each cycling through its pool in a seeded order."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Prompt]] = {}
    plan = (("train", n_train, CATEGORIES), ("eval", n_eval, CATEGORIES), ("ood", n_ood, OOD_CATEGORIES))
    for split, n, cats in plan:
        pools = [[prompt_pool(c, split)[j] for j in rng.permutation(len(prompt_pool(c, split)))] for c in cats]
        out[split] = [pools[i % len(cats)][(i // len(cats)) % len(pools[i % len(cats)])] for i in range(n)]
    return out


@lru_cache(maxsize=1)
def _by_text() -> dict[str, Prompt]:
    return {p.text: p for c in CATEGORIES + ("count_color",) for p in _enumerate(c)}


def parse_prompt(text: str) -> Prompt:
    """The :class:`Prompt` for a grammar string (case and spacing normalised); ``ValueError`` otherwise."""
    p = _by_text().get(" ".join(str(text).lower().split()))
    if p is None:
        raise ValueError(f"prompt {text!r} is not in the shapes grammar")
    return p


def vocabulary() -> list[str]:
    """Every word the grammar can produce (all splits), sorted."""
    return sorted({w for t in _by_text() for w in t.split()})


# ----------------------------------------------------------------------------------- ground truth


def scene_for_prompt(prompt: Prompt, rng: np.random.Generator, gap: float = 2.0, border: float = 1.0) -> Scene:
    """A random scene satisfying ``prompt`` with only the named objects (unnamed colours drawn uniformly):
    bounding boxes at least ``gap`` px apart and ``border`` px inside the image; position prompts hold
    with twice GenEval's margin."""
    n = prompt.count or len(prompt.shapes)
    specs = list(zip(prompt.shapes, prompt.colors)) * (n if prompt.count else 1)
    lo, hi = {1: (4.5, 7.0), 2: (4.5, 7.0), 3: (4.0, 6.0), 4: (4.0, 5.0)}[n]
    names = list(COLORS)
    for _ in range(1000):
        objs: list[SceneObject] = []
        for shape, color in specs:
            s = float(rng.uniform(lo, hi))
            for _ in range(50):
                cx, cy = rng.uniform(border + s, IMAGE_SIZE - border - s, size=2)
                if all(abs(cx - o.cx) >= s + o.size + gap or abs(cy - o.cy) >= s + o.size + gap for o in objs):
                    col = color or names[int(rng.integers(len(names)))]
                    objs.append(SceneObject(shape, col, float(cx), float(cy), s))
                    break
        if len(objs) < n:
            continue
        if prompt.relation is not None:
            a, b = objs
            if not relation_holds((a.cx, a.cy, a.size), (b.cx, b.cy, b.size), prompt.relation, 2 * POS_THRESHOLD, 0.6):
                continue
        return Scene(tuple(objs))
    raise RuntimeError(f"could not place a scene for {prompt.text!r}")
