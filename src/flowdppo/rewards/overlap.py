"""Scoring that overlaps sampling: each rollout chunk's images are scored in a background thread while
the next chunk samples (flow_grpo scores asynchronously the same way); the scores are joined before
advantages are computed, so training never sees a partial batch.

The chunk's final latents are decoded on the calling thread (the model's device is driven by one
thread only); the reward (a learned scorer on its own device, an OCR engine, an HTTP server) runs in
the worker thread. A reward that raises re-raises at :meth:`ChunkScorer.join`, before any advantage or
optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class ChunkScorer:
    """``submit(prompts, final_latents)`` per chunk, then ``join()`` -> ``{key: Tensor[B]}`` in submit order.

    ``background=False`` scores the chunks at ``join()`` on the calling thread, after the rollout (the same
    calls and results, no overlap: what the trainer did before).
    """

    def __init__(
        self,
        reward_fn: Callable[[Sequence[str], torch.Tensor], dict[str, torch.Tensor]],
        decode: Callable[[torch.Tensor], torch.Tensor],
        background: bool = True,
    ):
        self.reward_fn, self.decode = reward_fn, decode
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="reward") if background else None
        self.parts: list[Future | tuple[list[str], torch.Tensor]] = []
        # the current CUDA device is per thread: the worker uses this process's one (torchrun's local rank)
        self.cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def _score(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)
        with torch.no_grad():
            out = self.reward_fn(prompts, images)
        return {k: torch.as_tensor(v).detach().float().cpu() for k, v in out.items()}

    def submit(self, prompts: Sequence[str], final_latents: torch.Tensor) -> None:
        with torch.no_grad():
            images = self.decode(final_latents).float().cpu()
        if self.pool is None:
            self.parts.append((list(prompts), images))
        else:
            self.parts.append(self.pool.submit(self._score, list(prompts), images))

    def join(self) -> dict[str, torch.Tensor]:
        try:
            results = [p.result() if isinstance(p, Future) else self._score(*p) for p in self.parts]
        finally:
            self.close()
        if not results:
            raise ValueError("no chunk was scored")
        keys = list(results[0])
        for r in results[1:]:
            if list(r) != keys:
                raise ValueError(f"the reward returned keys {list(r)} for one chunk and {keys} for another")
        return {k: torch.cat([r[k].reshape(-1) for r in results]) for k in keys}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
