"""Two gloo processes where rank 1 stalls before a collective (tests/test_dist_timeout.py).

    torchrun --standalone --nproc_per_node 2 tests/dist_stall_worker.py OUT_DIR STALL_SECONDS

Both join with ``Dist.from_env`` (timeout from ``FLOWDPPO_DIST_TIMEOUT``) and all-gather once in
step; then rank 1 sleeps ``STALL_SECONDS`` before the second all-gather. Rank 0 writes the error it
got to ``OUT_DIR/rank0.txt`` and exits 1.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from flowdppo.training.distributed import Dist, DistributedError

out, stall = Path(sys.argv[1]), float(sys.argv[2])
d = Dist.from_env("cpu")
d.all_gather_cat(torch.ones(1))  # both arrive
if d.rank == 1:
    time.sleep(stall)
try:
    d.all_gather_cat(torch.ones(1))
except DistributedError as e:
    (out / f"rank{d.rank}.txt").write_text(str(e))
    sys.exit(1)
(out / f"rank{d.rank}.txt").write_text("ok")
