"""CPU thread settings that degrade gracefully on a busy machine. Imports no torch: it must run first.

OpenMP (which torch's CPU kernels use) by default keeps its worker threads spinning for a while after
each parallel region so that the next one starts a few microseconds earlier. On a machine whose
cores are also used by other processes, the spinning threads compete with those processes and with
each other, and an iteration can become ten times slower instead of twice. :func:`configure` picks,
before torch loads its thread pools (they read the environment once, when the library loads):

- the wait policy of idle workers, unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``:
  ``GOMP_SPINCOUNT=10000`` (spin briefly, then sleep) when the CPUs this process may use are quiet at
  start, ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) when other work already keeps at least half of
  them busy (:func:`cpu_busy_share`, 0.1 s of ``/proc/stat``). On the shapes demo geometry (2 cores),
  quiet: spin 10000 ran an iteration in 2.77 s against 2.60 s for the default spinning and 3.72 s for
  ``PASSIVE``; beside a competing 2-thread matmul loop: spin 10000 7.8 s, spin 100000 16.3 s,
  ``PASSIVE`` 5.7 s (docs/BENCHMARKS.md, "CPU threads"). The wait policy changes no result, only
  how idle threads wait; load that arrives after the start is not followed;
- ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) = the CPUs this process may actually run on (its CPU
  affinity, capped by a cgroup CPU quota such as a container's), unless the user set them (an unset
  ``MKL_NUM_THREADS`` follows a user's ``OMP_NUM_THREADS``). An explicit
  count (``--threads N`` on the command line or ``FLOWDPPO_THREADS=N``) overrides both the default and
  any value in the environment.

``FLOWDPPO_THREADS=auto`` (or ``--threads auto``) is the default behaviour described above. Settings
already in the environment are never overwritten except by an explicit thread count. From Python,
call :func:`configure` before the first ``import torch`` of the process to get the same behaviour.
What :func:`configure` chose is listed in ``FLOWDPPO_CHOSEN`` (comma-separated names), so that a tool
starting a fresh process can let that process choose for itself (:func:`without_choices`).

The thread count is never chosen by load: results of some kernels depend on it, and a run must not
change with the machine's load.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, MutableMapping

ENV_THREADS = "FLOWDPPO_THREADS"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = "10000"  # spin this many times before sleeping: near full speed when quiet, no collapse when busy
CHOSEN = "FLOWDPPO_CHOSEN"  # the names configure() set (not the user's)
BUSY_SHARE = 0.5  # other work on at least this share of the usable CPUs at start: idle workers sleep at once


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


def _cpu_times(stat_text: str, cpus: set[int] | None) -> tuple[int, int]:
    """(total, idle) jiffies summed over ``cpus`` (all when None) from the text of ``/proc/stat``."""
    total = idle = 0
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        vals = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(vals)
        idle += vals[3] + vals[4]
    return total, idle


def cpu_busy_share(interval: float = 0.1, stat_path: str = "/proc/stat") -> float | None:
    """Share in [0, 1] of the time the CPUs this process may run on were busy over ``interval`` seconds
    (``/proc/stat``); None where that cannot be read (not Linux)."""
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    try:
        with open(stat_path) as f:
            t0, i0 = _cpu_times(f.read(), cpus)
        time.sleep(interval)
        with open(stat_path) as f:
            t1, i1 = _cpu_times(f.read(), cpus)
    except (OSError, ValueError, IndexError):
        return None
    return None if t1 <= t0 else min(1.0, max(0.0, 1.0 - (i1 - i0) / (t1 - t0)))


def without_choices(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` without the settings :func:`configure` chose (``FLOWDPPO_CHOSEN``): a fresh
    process started with it chooses again, as a user's command would (the user's own settings stay)."""
    chosen = {k for k in environ.get(CHOSEN, "").split(",") if k}
    return {k: v for k, v in environ.items() if k not in chosen and k != CHOSEN}


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


def configure(
    threads: str | int | None = None, environ: MutableMapping[str, str] | None = None, busy: bool | None = None
) -> dict[str, str]:
    """Set the thread environment for this process (see the module doc); returns what it set.

    ``threads`` (the ``--threads`` flag) wins over ``FLOWDPPO_THREADS``, which wins over the automatic
    choice. ``busy`` says whether other work keeps the CPUs busy (None: measure it, only when the wait
    policy is to be chosen). Warns on stderr when torch is already imported: its pools then keep their
    settings.
    """
    env = os.environ if environ is None else environ
    explicit = parse_threads(threads) if threads is not None else parse_threads(env.get(ENV_THREADS))
    changed: dict[str, str] = {}
    if not any(env.get(k) for k in WAIT_VARS):
        if busy is None:
            share = cpu_busy_share()
            busy = share is not None and share >= BUSY_SHARE
        if busy:
            changed["OMP_WAIT_POLICY"] = "PASSIVE"
        else:
            changed["GOMP_SPINCOUNT"] = SPIN_COUNT
    # an explicit count, else the user's OMP_NUM_THREADS (MKL follows it), else the CPUs available
    n = explicit if explicit is not None else (_user_threads(env.get("OMP_NUM_THREADS")) or available_cpus())
    for k in THREAD_VARS:
        if (explicit is not None or not env.get(k)) and env.get(k) != str(n):  # only what actually changes
            changed[k] = str(n)
    for k, v in changed.items():
        env[k] = v
    if changed:
        env[CHOSEN] = ",".join(sorted({*env.get(CHOSEN, "").split(","), *changed} - {""}))
    if environ is None and changed and "torch" in sys.modules:
        print(
            "flowdppo: torch was imported before the thread settings were chosen; "
            f"{', '.join(f'{k}={v}' for k, v in changed.items())} may not take effect",
            file=sys.stderr,
        )
    return changed
