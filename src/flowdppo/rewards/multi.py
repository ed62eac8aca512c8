"""Several rewards at once: ``reward.components`` (training) and ``reward.eval_components`` (evaluation).

    reward:
      components:
        - {name: pickscore, args: {device: cuda}, weight: 1.0}
        - {name: ocr, weight: 0.5}
        - {name: mypkg.rewards:brand_score, args: {brand: ACME}, weights: {logo: 1.0, colour: 0.2}}
      eval_components:               # optional: evaluate on other rewards (Flow-Factory's eval_rewards)
        - {name: hpsv2, args: {model: /models/hpsv2.1-hf}}

Each component is a registered reward or an import path, built with its ``args``. Its keys are logged
as ``reward/<key>``; ``weight`` (default 1) weighs every key it returns, ``weights`` weighs keys one
by one (a key given no weight is logged only); ``label`` renames a single-key component's key (or
prefixes ``label/`` to each key of a multi-key one) so two components returning the same key can
coexist. The weighted keys are combined as ``algorithm.multi_reward`` says: a weighted sum, or GDPO
(each key normalised within its group before the weighted sum).

Components with the same ``name`` and ``args`` (in training and in evaluation) are one instance; the
learned scorers also share one loaded model between components that load the same weights on the same
device in the same dtype (e.g. PickScore at two scales).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

KEYS = {"name", "args", "weight", "weights", "label"}


@dataclass
class Component:
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    weights: dict[str, float] | None = None
    label: str | None = None

    @property
    def cache_key(self) -> str:
        return json.dumps([self.name, self.args], sort_keys=True, default=str)


def parse_components(items: Any, key: str = "reward.components") -> list[Component]:
    """Validate a list of component mappings; one-line errors naming ``key[i]``."""
    import math

    if not isinstance(items, list):
        raise ValueError(f"{key} must be a list of {{name, args, weight}} mappings, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"{where} must be a mapping with a 'name' (a reward name or 'pkg.mod:obj'), got {item!r}")
        extra = set(item) - KEYS
        if extra:
            raise ValueError(f"{where} has unknown keys {sorted(extra)}; valid: {', '.join(sorted(KEYS))}")
        args = item.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError(f"{where}.args must be a mapping, got {args!r}")
        w = item.get("weight", 1.0)
        ws = item.get("weights")
        for label, v in [("weight", w), *((f"weights.{k}", x) for k, x in (ws or {}).items())]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{where}.{label} must be a finite number, got {v!r}")
        if ws is not None and not isinstance(ws, dict):
            raise ValueError(f"{where}.weights must map keys to numbers, got {ws!r}")
        out.append(Component(str(item["name"]), dict(args), float(w), dict(ws) if ws else None, item.get("label")))
    return out


class MultiReward:
    """The components' rewards as one reward function (keys merged; weights per key in ``weights``)."""

    def __init__(self, parts: list[tuple[Component, Any]]):
        self.parts = parts
        self.weights: dict[str, float] = {}
        self._keys: list[str] | None = None
        self._per_part: list[list[str]] | None = None
        known = [getattr(fn, "components", None) for _, fn in parts]
        if all(known):
            self._set_keys([list(k) for k in known])

    @property
    def components(self) -> list[str] | None:
        return self._keys

    def _rename(self, comp: Component, keys: Sequence[str]) -> list[str]:
        if comp.label is None:
            return list(keys)
        return [comp.label] if len(keys) == 1 else [f"{comp.label}/{k}" for k in keys]

    def _set_keys(self, per_part: list[list[str]]) -> None:
        owner: dict[str, str] = {}
        weights: dict[str, float] = {}
        for (comp, _), keys in zip(self.parts, per_part):
            for raw, k in zip(keys, self._rename(comp, keys)):
                if k in owner:
                    raise ValueError(
                        f"reward components {owner[k]!r} and {comp.name!r} both return {k!r}; "
                        "give one of them a 'label'"
                    )
                owner[k] = comp.name
                if comp.weights is None:
                    weights[k] = comp.weight
                elif raw in comp.weights:
                    weights[k] = comp.weight * comp.weights[raw]
            if comp.weights:
                unknown = set(comp.weights) - set(keys)
                if unknown:
                    raise ValueError(
                        f"reward component {comp.name!r}: weights name {sorted(unknown)}, "
                        f"which it does not return; it returns {', '.join(keys)}"
                    )
        self._keys, self.weights, self._per_part = list(owner), weights, per_part

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [fn(prompts, images) for _, fn in self.parts]
        per_part = [list(o) for o in outs]
        if per_part != self._per_part:
            self._set_keys(per_part)
        merged: dict[str, torch.Tensor] = {}
        for (comp, _), o in zip(self.parts, outs):
            for raw, k in zip(o, self._rename(comp, list(o))):
                merged[k] = o[raw]
        return merged


def build_multi(items: Any, key: str = "reward.components", cache: dict[str, Any] | None = None) -> MultiReward:
    """Build each component through the reward registry; identical ``name`` + ``args`` share an instance."""
    from flowdppo.rewards import build_reward_by_name

    cache = {} if cache is None else cache
    parts = []
    for comp in parse_components(items, key):
        if comp.cache_key not in cache:
            cache[comp.cache_key] = build_reward_by_name(comp.name, comp.args)
        parts.append((comp, cache[comp.cache_key]))
    if not parts:
        raise ValueError(f"{key} is empty")
    return MultiReward(parts)
