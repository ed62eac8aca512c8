"""CPU thread settings that degrade gracefully on a busy machine. Imports no torch: it must run first.

OpenMP (which torch's CPU kernels use) by default keeps its worker threads spinning for a while after
each parallel region so that the next one starts a few microseconds earlier. On a machine whose
cores are also used by other processes, the spinning threads compete with those processes and with
each other, and an iteration can become ten times slower instead of twice. :func:`configure` picks,
before torch loads its thread pools (they read the environment once, when the library loads):

- ``GOMP_SPINCOUNT=10000`` (idle workers spin briefly, then sleep), unless the user set
  ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``. On the shapes demo geometry (2 cores) this kept a quiet
  machine's iteration within ~7% of the default spinning (2.77 s vs 2.60 s) where ``PASSIVE`` cost
  ~40% (3.72 s), and with a competing 2-thread matmul loop it ran 7.8 s against 16.3 s at a spin
  count of 100000 (``PASSIVE``: 5.7 s); docs/BENCHMARKS.md, "CPU threads";
- ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) = the CPUs this process may actually run on (its CPU
  affinity, capped by a cgroup CPU quota such as a container's), unless the user set them (an unset
  ``MKL_NUM_THREADS`` follows a user's ``OMP_NUM_THREADS``). An explicit
  count (``--threads N`` on the command line or ``FLOWDPPO_THREADS=N``) overrides both the default and
  any value in the environment.

``FLOWDPPO_THREADS=auto`` (or ``--threads auto``) is the default behaviour described above. Settings
already in the environment are never overwritten except by an explicit thread count. From Python,
call :func:`configure` before the first ``import torch`` of the process to get the same behaviour.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

ENV_THREADS = "FLOWDPPO_THREADS"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = "10000"  # spin this many times before sleeping: near full speed when quiet, no collapse when busy


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2/v1 CPU quota (>= 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "<quota|max> <period>"
            quota, period = f.read().split()[:2]
        return None if quota == "max" else float(quota) / float(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = float(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = float(f.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def parse_threads(value: str | int | None) -> int | None:
    """``None``/``"auto"``/``""`` -> None (choose automatically); a positive integer -> itself."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"thread count must be a positive integer or 'auto', got {value!r}")
    return n


def _user_threads(value: str | None) -> int | None:
    """The user's own ``OMP_NUM_THREADS`` as a count, or None when unset or in a form OpenMP reads and we do
    not (e.g. the nested ``"4,2"``; then it is left as it is)."""
    try:
        return parse_threads(value)
    except ValueError:
        return None


def configure(threads: str | int | None = None, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the thread environment for this process (see the module doc); returns what it set.

    ``threads`` (the ``--threads`` flag) wins over ``FLOWDPPO_THREADS``, which wins over the automatic
    choice. Warns on stderr when torch is already imported: its pools then keep their settings.
    """
    env = os.environ if environ is None else environ
    explicit = parse_threads(threads) if threads is not None else parse_threads(env.get(ENV_THREADS))
    changed: dict[str, str] = {}
    if not any(env.get(k) for k in WAIT_VARS):
        changed["GOMP_SPINCOUNT"] = SPIN_COUNT
    # an explicit count, else the user's OMP_NUM_THREADS (MKL follows it), else the CPUs available
    n = explicit if explicit is not None else (_user_threads(env.get("OMP_NUM_THREADS")) or available_cpus())
    for k in THREAD_VARS:
        if explicit is not None or not env.get(k):
            changed[k] = str(n)
    for k, v in changed.items():
        env[k] = v
    if environ is None and changed and "torch" in sys.modules:
        print(
            "flowdppo: torch was imported before the thread settings were chosen; "
            f"{', '.join(f'{k}={v}' for k, v in changed.items())} may not take effect",
            file=sys.stderr,
        )
    return changed
