"""Every row of docs/errors.md: the bad input on the command line prints exactly the message in the
table, as one line (``flowdppo <command>: error: ...``), with no traceback.

The rows run in this process through :func:`flowdppo.cli.main`; ``{tmp}`` stands for a folder holding
the files the rows name (:func:`bad_inputs`).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from flowdppo import cli

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"


def table_rows() -> list[tuple[str, str]]:
    """``(command line, message)`` of each row of the table in docs/errors.md."""
    rows = []
    for ln in DOC.read_text().splitlines():
        m = re.match(r"^\| *\d+ *\| *[^|]+\| *`(.+?)` *\| *`(.+)` *\|$", ln)
        if m:
            rows.append((m.group(1).replace("\\|", "|"), m.group(2).replace("\\|", "|")))
    return rows


def bad_inputs(tmp: Path) -> None:
    """The files and run folders the rows name."""
    (tmp / "bad.yaml").write_text("train: {lr: [1, 2\n")
    (tmp / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00")
    (tmp / "list.yaml").write_text("- train\n- eval\n")
    (tmp / "a-file").write_text("not a folder\n")
    runs = tmp / "runs"
    (runs / "used").mkdir(parents=True)
    (runs / "used" / "metrics.jsonl").write_text('{"iteration": 0}\n')
    (runs / "bad-config").mkdir()
    (runs / "bad-config" / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")
    from flowdppo.config import load_config

    for name in ("no-checkpoint", "corrupt"):
        (runs / name).mkdir()
        cfg = load_config(overrides=[f"log.run_dir={runs}", f"log.name={name}", "log.tensorboard=false"])
        (runs / name / "config.yaml").write_text(cfg.to_yaml())
    ck = runs / "corrupt" / "checkpoints" / "ckpt-000001"
    ck.mkdir(parents=True)
    (ck / "adapter.safetensors").write_bytes(b"\x00" * 16)
    (ck / "state.pt").write_bytes(b"\x00" * 16)
    (ck.parent / "latest").write_text(ck.name)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    bad_inputs(d)
    return d


def run_line(line: str, tmp: Path, capsys) -> tuple[int, str]:
    argv = shlex.split(line.replace("{tmp}", str(tmp)))
    assert argv[0] == "flowdppo"
    rc = cli.main(argv[1:])
    err = capsys.readouterr().err
    return rc, err


def test_the_table_has_at_least_25_rows():
    assert len(table_rows()) >= 25


@pytest.mark.parametrize(("line", "message"), table_rows(), ids=[r[0][9:60] for r in table_rows()])
def test_each_bad_input_prints_its_one_line(line, message, tmp, capsys):
    if "model.device=cuda" in line:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU: model.device=cuda is valid here")
    rc, err = run_line(line, tmp, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("flowdppo ")]  # log records may precede it
    assert "Traceback" not in err
    assert lines == [message.replace("{tmp}", str(tmp))], err
    assert rc == 2


def test_read_only_run_directory(tmp_path, monkeypatch, capsys):
    """A run directory that cannot be created (read-only file system, as root cannot be refused by mode bits)."""
    import errno
    import os

    real = Path.mkdir

    def mkdir(self, *a, **k):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, err = run_line(f"flowdppo train --set log.run_dir={tmp_path}/ro", tmp_path, capsys)
    assert rc == 2
    assert err.strip() == (
        f"flowdppo train: error: cannot write the run directory {tmp_path}/ro/flowdppo: read-only file system"
    )


def test_debug_shows_the_traceback(capsys):
    rc = cli.main(["--debug", "train", "--set", "train.lr=inf"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and err.strip().endswith("valid: a finite number > 0")


@pytest.mark.parametrize("action", [pytest.param("sigint", marks=pytest.mark.slow), "sigterm"])
def test_ctrl_c_and_sigterm_print_one_line(tmp_path, action):
    """Through the installed entry point: the run stops in iteration 1, checkpoints iteration 0, and
    prints one line saying so and how to resume; the resumed run finishes."""
    import os
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from test_cli import TINY_SETS, entry_point

    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWDPPO_FAULT": f"train:1:{action}"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    argv = [entry_point(), "train", *TINY_SETS, "--set", "train.iterations=2", "--set", f"log.run_dir={tmp_path}"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 130
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("flowdppo")]
    what = "interrupted" if action == "sigint" else "terminated (SIGTERM)"
    run = tmp_path / "flowdppo"
    assert ours == [
        f"flowdppo train: {what}; iterations 0..0 checkpointed in {run}/checkpoints/ckpt-000001; "
        f"continue with: flowdppo train --resume {run}"
    ]
    assert "Traceback" not in r.stderr
