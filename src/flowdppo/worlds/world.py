"""The world interface: where the trainer's prompts come from, and what a world adds to evaluation.

A *world* is a prompt source with named prompt sets (a ``train`` split and evaluation sets) and,
optionally, its own breakdown of evaluation scores (the shapes world: strict accuracy per prompt
category). The trainer looks a world up by name (``train.world``) and never imports one itself, so a
new world is one class with these two methods, registered in :data:`WORLDS` or named by an import
path ``package.module:object`` (a class or a factory taking no arguments).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from flowdppo.registry import Registry


class World(Protocol):
    def prompt_sets(self) -> dict[str, list[str]]:
        """Named prompt lists, e.g. ``{"train": [...], "eval": [...], "ood": [...]}``."""
        ...

    def breakdown(self, prompts: Sequence[str], scores: dict[str, torch.Tensor]) -> dict[str, float]:
        """Extra evaluation metrics for ``prompts`` (one row per sample) and their reward components ``[B]``;
        the evaluator logs each as ``eval/<set>/<key>``. Return ``{}`` for none."""
        ...


@runtime_checkable
class CategorizedWorld(World, Protocol):
    """A world whose prompts fall into named categories (what ``train.category_weights`` weighs)."""

    def categories(self) -> list[str]:
        """The category names, in a fixed order."""
        ...

    def category(self, prompt: str) -> str:
        """The category of one of the world's prompts."""
        ...


class ShapesWorld:
    """The embedded shapes world (:mod:`flowdppo.worlds.shapes`): its fixed train / eval / ood prompt
    lists (``prompt_sets(seed=0)``) and strict accuracy per prompt category."""

    def prompt_sets(self) -> dict[str, list[str]]:
        from flowdppo.worlds import shapes

        return {name: [p.text for p in ps] for name, ps in shapes.prompt_sets(seed=0).items()}

    def categories(self) -> list[str]:
        from flowdppo.worlds import shapes

        return list(shapes.CATEGORIES)

    def category(self, prompt: str) -> str:
        from flowdppo.worlds import shapes

        return shapes.parse_prompt(prompt).category

    def breakdown(self, prompts: Sequence[str], scores: dict[str, torch.Tensor]) -> dict[str, float]:
        from flowdppo.worlds import shapes

        if "strict" not in scores:
            return {}
        cats = [shapes.parse_prompt(p).category for p in prompts]
        out = {}
        for cat in sorted(set(cats)):
            sel = torch.tensor([c == cat for c in cats])
            out[f"strict/{cat}"] = float(scores["strict"][sel].mean())
        return out


# a registered name, or an import path "package.module:object" (a World class or a factory without arguments)
WORLDS: Registry = Registry("world", "train.world")
WORLDS.register("shapes", ShapesWorld)


def build_world(name: str) -> World:
    """The world registered as ``name``, or the object at the import path ``package.module:object``."""
    return WORLDS.get(name)()
