"""Thread settings chosen by the CLI before torch starts its pools (flowdppo.threads)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowdppo import threads

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_configure_sets_only_what_is_unset():
    n = threads.available_cpus()
    env: dict[str, str] = {}
    chosen = threads.configure(environ=env, busy=False)
    assert chosen == {"GOMP_SPINCOUNT": "10000", "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
    assert env == {**chosen, "FLOWDPPO_CHOSEN": "GOMP_SPINCOUNT,MKL_NUM_THREADS,OMP_NUM_THREADS"}

    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    threads.configure(environ=env, busy=True)  # the user's wait policy stands, busy or not
    assert env == {
        "OMP_WAIT_POLICY": "ACTIVE",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "FLOWDPPO_CHOSEN": "MKL_NUM_THREADS",
    }

    env = {"GOMP_SPINCOUNT": "1000", "MKL_NUM_THREADS": "7", "OMP_NUM_THREADS": "3"}
    assert threads.configure(environ=env) == {}  # the user's spin count stands for the wait policy
    assert env == {"GOMP_SPINCOUNT": "1000", "MKL_NUM_THREADS": "7", "OMP_NUM_THREADS": "3"}

    # an explicit count set twice (two commands in one process) changes nothing the second time
    env = {}
    assert threads.configure(threads="1", environ=env, busy=False)["OMP_NUM_THREADS"] == "1"
    first = dict(env)
    assert threads.configure(threads="1", environ=env, busy=False) == {} and env == first
    assert threads.configure(threads="2", environ=env, busy=False) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def test_a_busy_machine_gets_sleeping_idle_workers_and_the_same_thread_count():
    n = threads.available_cpus()
    quiet, busy = {}, {}
    threads.configure(environ=quiet, busy=False)
    threads.configure(environ=busy, busy=True)
    assert busy["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in busy
    assert quiet["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in quiet
    # the thread count never follows the load: results must not change with it
    assert busy["OMP_NUM_THREADS"] == quiet["OMP_NUM_THREADS"] == str(n)
    # a fresh process started by a flowdppo tool chooses again; what the user set is passed on
    user = {"OMP_NUM_THREADS": "1", "PATH": "/bin"}
    threads.configure(environ=user, busy=False)
    assert threads.without_choices(user) == {"OMP_NUM_THREADS": "1", "PATH": "/bin"}


def test_cpu_busy_share_reads_the_usable_cpus_of_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    first = "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu1 5 0 5 40 0 0 0 0 0 0\nintr 1\n"
    # over the interval cpu0 was busy 90 of 100 jiffies, cpu1 10 of 100
    second = "cpu  110 0 10 180 0 0 0 0 0 0\ncpu0 95 0 5 50 0 0 0 0 0 0\ncpu1 15 0 5 130 0 0 0 0 0 0\nintr 2\n"
    snapshots: list[str] = []
    real_open = open

    def fake_open(path, *a, **k):
        if str(path) == str(stat):
            stat.write_text(snapshots.pop(0))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    for cpus, share in (({0, 1}, 0.5), ({0}, 0.9), ({1}, 0.1)):  # only the CPUs this process may use count
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid, c=cpus: c, raising=False)
        snapshots[:] = [first, second]
        assert threads.cpu_busy_share(0.0, str(stat)) == pytest.approx(share)
    snapshots[:] = [first, first]
    assert threads.cpu_busy_share(0.0, str(stat)) is None  # no time passed: unknown
    assert threads.cpu_busy_share(0.0, str(tmp_path / "missing")) is None


def test_a_nested_omp_setting_of_the_user_is_left_alone():
    env = {"OMP_NUM_THREADS": "4,2"}  # OpenMP's nested form: not a count we parse, and not an error
    threads.configure(environ=env)
    assert env["OMP_NUM_THREADS"] == "4,2" and env["MKL_NUM_THREADS"] == str(threads.available_cpus())


def test_explicit_thread_count_overrides():
    env = {"OMP_NUM_THREADS": "4", "FLOWDPPO_THREADS": "2"}
    threads.configure(environ=env)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    threads.configure("3", environ=env)  # the flag wins over FLOWDPPO_THREADS
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    env = {"FLOWDPPO_THREADS": "auto"}
    threads.configure(environ=env)
    assert env["OMP_NUM_THREADS"] == str(threads.available_cpus())
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            threads.configure(bad, environ={})


def _cli_then_torch(args: list[str], env_extra: dict[str, str]) -> dict:
    """Run the CLI in a fresh interpreter, then import torch there and report what its pools got."""
    env = {
        k: v for k, v in os.environ.items() if k not in (*threads.THREAD_VARS, *threads.WAIT_VARS, "FLOWDPPO_THREADS")
    }
    env.update(env_extra, PYTHONPATH=SRC)
    code = (
        "import json, os, sys\n"
        "from flowdppo import cli\n"
        "assert 'torch' not in sys.modules\n"
        f"rc = cli.main({args!r})\n"
        "import torch\n"
        "print(json.dumps({'rc': rc, 'threads': torch.get_num_threads(),"
        " 'env': {k: os.environ[k] for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'OMP_NUM_THREADS',"
        " 'MKL_NUM_THREADS') if k in os.environ}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_sets_thread_environment_before_torch_only_when_unset():
    n = threads.available_cpus()
    res = _cli_then_torch(["presets"], {})
    # the wait policy depends on the machine's load at start (a test above checks each choice)
    wait = {k: res["env"].pop(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in res["env"]}
    assert wait in ({"GOMP_SPINCOUNT": "10000"}, {"OMP_WAIT_POLICY": "PASSIVE"})
    assert res["env"] == {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
    assert res["threads"] == n
    res = _cli_then_torch(["presets"], {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"})
    assert res["env"] == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert res["threads"] == 1
    res = _cli_then_torch(["--threads", "1", "presets"], {"OMP_NUM_THREADS": "2"})
    assert res["env"]["OMP_NUM_THREADS"] == "1" and res["threads"] == 1


def test_cli_rejects_bad_thread_count():
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run(
        [sys.executable, "-m", "flowdppo.cli", "--threads", "zero", "presets"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--threads" in out.stderr and "positive integer or 'auto'" in out.stderr
