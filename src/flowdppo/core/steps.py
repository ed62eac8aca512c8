"""Which denoising steps are stochastic (SDE) and trained (docs/flow-dppo.md, section "Step selection").

A step index ``k`` is the transition ``sigmas[k] -> sigmas[k+1]`` of an ``N``-step schedule. Every
strategy returns a sorted list of indices; all other steps are Euler ODE steps and are not trained.

- ``random``  (default, the paper): ``k`` indices drawn without replacement from
  ``range(int(start*N), int(end*N))`` by a generator seeded with ``(seed, iteration)``, the same for
  the whole rollout batch, so a resumed run draws the same;
- ``window``  (MixGRPO): a contiguous window of ``size`` steps that slides by ``stride`` every
  ``every`` iterations over the pool, wrapping around;
- ``fraction`` (Flow-GRPO's ``timestep_fraction``): every step in ``range(int(end*N))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("random", "window", "fraction")


@dataclass(frozen=True)
class StepSelection:
    strategy: str = "random"
    num_sde_steps: int = 3
    start: float = 0.0
    end: float = 0.5
    window_stride: int = 1
    window_every: int = 25

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown step strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ValueError(f"need 0 <= start < end <= 1, got start={self.start}, end={self.end}")
        if self.num_sde_steps < 1:
            raise ValueError(f"num_sde_steps must be >= 1, got {self.num_sde_steps}")

    def pool(self, num_steps: int) -> list[int]:
        pool = list(range(int(self.start * num_steps), int(self.end * num_steps)))
        if not pool:
            raise ValueError(f"the step window [{self.start}, {self.end}) of {num_steps} steps is empty")
        return pool

    def select(self, num_steps: int, seed: int, iteration: int) -> list[int]:
        """The trained step indices for this iteration."""
        pool = self.pool(num_steps)
        if self.strategy == "fraction":
            return pool
        k = self.num_sde_steps
        if k > len(pool):
            raise ValueError(f"num_sde_steps={k} exceeds the {len(pool)} steps of the window {pool}")
        if self.strategy == "random":
            rng = np.random.default_rng([int(seed), int(iteration)])
            return sorted(int(i) for i in rng.choice(pool, size=k, replace=False))
        # sliding window
        n_positions = len(pool) - k + 1
        pos = ((iteration // self.window_every) * self.window_stride) % n_positions
        return pool[pos : pos + k]
