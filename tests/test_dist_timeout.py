"""A stalled rank ends a multi-process job with a message naming it (train.dist_timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent


def test_a_stalled_rank_ends_the_job_naming_the_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWDPPO_DIST_TIMEOUT": "2"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    tic = time.perf_counter()
    r = subprocess.run(
        cmd + [str(HERE / "dist_stall_worker.py"), str(tmp_path), "60"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    elapsed = time.perf_counter() - tic
    assert r.returncode != 0  # the job ends instead of waiting out rank 1's 60 s
    assert elapsed < 55, f"the job waited for the stalled rank ({elapsed:.0f} s)"
    msg = (tmp_path / "rank0.txt").read_text()
    assert msg.startswith("rank 0: collective #2 (all_gather) waited more than 2 s; rank 1 ")
    assert "did not arrive: stalled or dead" in msg and "train.dist_timeout=2 s" in msg
    assert "\n" not in msg


def test_one_process_needs_no_group_and_keeps_the_timeout():
    from flowdppo.training.distributed import Dist

    d = Dist.from_env("cpu", timeout_s=5)
    assert not d.active and d.timeout_s == 5
