"""Where a run's prompts come from: the training prompts, the evaluation sets and their breakdown.

In order of precedence, for each of the two:

- training prompts: the ``prompts`` argument, else ``train.prompts_file`` (one prompt a line), else the
  world's ``train.prompt_split`` set;
- evaluation sets: the ``eval_sets`` argument, else ``{"eval": eval.prompts_file}``, else the world's
  ``eval.sets`` -- but only when the training prompts came from the world too (a run that brings its
  own training prompts and no evaluation prompts is not evaluated).

The world (``train.world``, :mod:`flowdppo.worlds.world`) is built only when one of them is needed;
its per-category breakdown applies only to the sets it supplied. Every set is cut to ``eval.num_prompts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flowdppo.config import Config, ConfigError
from flowdppo.worlds.world import CategorizedWorld, World, build_world

Breakdown = Callable[[Sequence[str], dict[str, torch.Tensor]], dict[str, float]]


@dataclass
class PromptSource:
    train: list[str]
    eval_sets: dict[str, list[str]]
    breakdown: Breakdown | None = None  # the world's, when it supplied the evaluation sets
    # the draw probability of each training prompt (train.category_weights); None = uniform
    train_probs: list[float] | None = None


def read_lines(path: str) -> list[str]:
    """The non-empty, stripped lines of a prompts file."""
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def prompt_source(
    cfg: Config, prompts: Sequence[str] | None = None, eval_sets: dict[str, list[str]] | None = None
) -> PromptSource:
    if prompts is None and cfg.train.prompts_file:
        prompts = read_lines(cfg.train.prompts_file)
    if eval_sets is None and cfg.eval.prompts_file:
        eval_sets = {"eval": read_lines(cfg.eval.prompts_file)}
    if eval_sets is None and prompts is not None:
        eval_sets = {}  # own training prompts, no evaluation prompts: no evaluation
    breakdown = None
    weights = cfg.train.category_weights
    if weights and prompts is not None:
        raise ConfigError(
            "train.category_weights weighs the world's training prompts; it cannot be used with "
            "train.prompts_file or prompts of one's own (valid: {} with those)"
        )
    probs = None
    if prompts is None or eval_sets is None:
        if not cfg.train.world:
            raise ConfigError("train.prompts_file is required when train.world is null")
        try:
            world = build_world(cfg.train.world)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        sets = world.prompt_sets()
        if prompts is None:
            if cfg.train.prompt_split not in sets:
                raise ConfigError(
                    f"train.prompt_split {cfg.train.prompt_split!r} is not valid; valid: {', '.join(sets)}"
                )
            prompts = sets[cfg.train.prompt_split]
            if weights:
                probs = _category_probs(world, prompts, weights, cfg.train.prompts_per_iter)
        if eval_sets is None:
            unknown = [n for n in cfg.eval.sets if n not in sets]
            if unknown:
                raise ConfigError(f"eval.sets: {unknown[0]!r} is not valid; valid: {', '.join(sets)}")
            eval_sets = {n: sets[n] for n in cfg.eval.sets}
            breakdown = world.breakdown
    if not prompts:
        raise ConfigError("no training prompts")
    n = cfg.eval.num_prompts
    return PromptSource(list(prompts), {k: list(v)[:n] for k, v in eval_sets.items()}, breakdown, probs)


def _category_probs(world: World, prompts: Sequence[str], weights: dict[str, float], per_iter: int) -> list[float]:
    """Each prompt's draw probability: its category's weight (1 when not named), normalised."""
    if not isinstance(world, CategorizedWorld):
        raise ConfigError(
            f"train.category_weights: the world {type(world).__name__} has no prompt categories; valid: {{}}"
        )
    valid = list(world.categories())
    for cat in weights:
        if cat not in valid:
            raise ConfigError(f"train.category_weights: {cat!r} is not a category; valid: {', '.join(valid)}")
    w = [float(weights.get(world.category(p), 1.0)) for p in prompts]
    positive = sum(x > 0 for x in w)
    needed = per_iter if len(prompts) >= per_iter else 1  # an iteration draws without replacement when it can
    if positive < needed:
        raise ConfigError(
            f"train.category_weights leave {positive} training prompts with a weight > 0, fewer than "
            f"the {needed} an iteration draws (train.prompts_per_iter); valid: weights that keep at least {needed}"
        )
    total = sum(w)
    return [x / total for x in w]
