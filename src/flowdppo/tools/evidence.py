"""``flowdppo bench``: the paper's comparisons at small scale on the embedded shapes world, rerunnable.

Each *part* is a list of settings (a preset plus ``--set`` overrides); each setting runs for several
seeds, every run an ordinary run directory (``flowdppo report`` works on it) under
``<out>/<part>/<setting>/seed<k>``. Every method samples the same images per iteration (same
``prompts_per_iter x group_size`` and iterations): equal rollout budgets. Runs are resumable: a finished
run is skipped, an interrupted one resumes from its last checkpoint, so ``flowdppo bench`` can be
stopped and restarted at any time.

After the runs, each one is exported compactly (the evaluation lines and a thinned set of metrics) to
``<results>/raw/<part>/<setting>/seed<k>.json``; ``flowdppo bench --report`` rebuilds the tables, the
figures and ``RESULTS.md`` from those exports alone, without rerunning anything. A run whose finished
export is already there (committed by an earlier machine; same preset, overrides and shipped weights)
is not run again, so the bench can be completed piecewise (``--part``, ``--setting``) across machines.

Parts (the paper's figure or table each stands for):

- ``methods`` (Table 4 / Table 2): the five presets; held-out strict and soft accuracy, out-of-domain
  accuracy (the forgetting proxy), KL to the reference at the end; also the KL-efficiency curves
  (accuracy against KL to the reference) and the live ratio-noise measurements (Section 3.2);
- ``multi-epoch`` (Figure 5): two passes over each batch (I2) for flow-dppo, flow-grpo and their CPS
  variants; I1 is the ``methods`` run of the same preset;
- ``ablations`` (Figure 3): symmetric mask, delta over three decades, beta;
- ``multi-reward``: the graded compositional reward plus a conflicting colour-saturation score,
  weighted sum against GDPO.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from flowdppo.training.runlog import read_jsonl

#: the bench's training geometry: the defaults' (8 prompts x 16 samples, lr 3e-4, one pass per batch unless a
#: setting says otherwise), 80 iterations, so that a run takes ~10-14 minutes on one thread
COMMON = (
    "train.iterations=80",
    "eval.every=20",
    "eval.ratio_noise_every=10",
    "log.checkpoint_every=10",
    "log.tensorboard=false",
    "log.progress=false",
)

#: ``--quick``: the same parts on a tiny geometry (a smoke run of the harness, minutes on 2 cores)
QUICK = (
    "train.iterations=2",
    "train.prompts_per_iter=2",
    "train.group_size=4",
    "train.minibatch_size=8",
    "train.micro_batch_size=8",
    "train.rollout_batch_size=8",
    "sampling.num_steps=4",
    "steps.num_sde_steps=2",
    "eval.every=1",
    "eval.num_prompts=4",
    "eval.samples_per_prompt=1",
    "eval.grid_prompts=1",
    "eval.ratio_noise_every=1",
    "eval.ratio_noise_samples=4",
    "log.checkpoint_every=1",
    "log.tensorboard=false",
    "log.progress=false",
)

#: the metrics kept in the compact export (everything the figures and verdicts read)
KEEP_METRICS = (
    "kl_ref",
    "kl_mean",
    "masked_frac",
    "clip_frac",
    "clip_high_frac",
    "clip_low_frac",
    "reward/total",
    "policy_loss",
    "grad_norm",
)


@dataclass(frozen=True)
class Setting:
    """One configuration of a part: a preset and ``--set`` overrides."""

    part: str
    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    label: str = ""  # how tables and figures name it (default: ``name``)

    @property
    def title(self) -> str:
        return self.label or self.name


#: Flow-DPPO's KL threshold on the shapes world (the presets' 1e-5 is the official recipe's for SD3.5; on the
#: shapes model one optimizer step moves the per-step mean-reduced KL to ~1e-8 on average and ~1e-7 to 1e-6
#: at its largest entries, so 1e-5 never binds there; docs/shapes-demo.md). The same for both samplers:
#: their KL per unit of velocity change is nearly the same (docs/flow-dppo.md).
DELTA = 1e-7


def _dppo(*overrides: str, delta: float = DELTA) -> tuple[str, ...]:
    return (f"algorithm.delta={delta:g}", *overrides)


def _settings() -> dict[str, list[Setting]]:
    methods = ["flow-dppo", "flow-grpo", "flow-dppo-cps", "flow-cps", "grpo-guard"]  # run in this order

    def tuned(m: str, *o: str) -> tuple[str, ...]:
        return _dppo(*o) if m.startswith("flow-dppo") else o

    return {
        "methods": [Setting("methods", m, m, tuned(m)) for m in methods],
        "multi-epoch": [
            Setting("multi-epoch", f"{m}-I2", m, tuned(m, "train.inner_epochs=2"), label=f"{m} I2")
            for m in ("flow-dppo", "flow-grpo", "flow-dppo-cps", "flow-cps")
        ],
        "ablations": [
            Setting(
                "ablations", "dppo-symmetric", "flow-dppo", _dppo("algorithm.loss=dppo-symmetric"), "symmetric mask"
            ),
            Setting("ablations", "delta-1e-8", "flow-dppo", _dppo(delta=1e-8), "delta 1e-8"),
            Setting("ablations", "delta-1e-6", "flow-dppo", _dppo(delta=1e-6), "delta 1e-6"),
            # KL to the reference ends near 1e-4..1e-3 on the demo geometry: beta * KL_ref is then comparable
            # to the surrogate at about 1e-1
            Setting("ablations", "beta-1e-2", "flow-dppo", _dppo("algorithm.beta=1e-2"), "beta 1e-2"),
            Setting("ablations", "beta-1e-1", "flow-dppo", _dppo("algorithm.beta=1e-1"), "beta 1e-1"),
        ],
        "multi-reward": [
            Setting(
                "multi-reward", "sum", "flow-dppo", _dppo(*MULTI_REWARD, "algorithm.multi_reward=sum"), "weighted sum"
            ),
            Setting("multi-reward", "gdpo", "flow-dppo", _dppo(*MULTI_REWARD, "algorithm.multi_reward=gdpo"), "GDPO"),
        ],
    }


#: the multi-reward part: the shapes reward's graded compositional score (Soft-TIFA atom level) plus a
#: conflicting colour-saturation score
MULTI_REWARD = (
    "reward.name=flowdppo.tools.evidence:shapes_and_saturation",
    "reward.weights={tifa_atom: 1.0, saturation: 1.0}",
)

PARTS = ("methods", "multi-epoch", "ablations", "multi-reward")

#: ``--quick`` runs one or two settings of each part: every code path of the harness, in minutes
QUICK_SETTINGS = {
    "methods": ("flow-dppo", "flow-grpo"),
    "multi-epoch": ("flow-dppo-I2",),
    "ablations": ("dppo-symmetric",),
    "multi-reward": ("gdpo",),
}


def shapes_and_saturation():
    """The shapes reward's components plus ``saturation``: the mean HSV saturation of the image.

    The shapes world draws on a grey background; a saturated background makes the detector refuse the
    image, so the two components pull against each other (the multi-reward part's conflict).
    """
    import torch

    from flowdppo.rewards import REWARDS

    shapes = REWARDS.get("shapes")()

    def fn(prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(shapes(prompts, images))
        x = images.detach().float().clamp(0, 1)
        mx, mn = x.max(dim=1).values, x.min(dim=1).values
        out["saturation"] = ((mx - mn) / mx.clamp_min(1e-6)).mean(dim=(1, 2))
        return out

    return fn


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    out: Path
    parts: list[str]
    seeds: list[int]
    quick: bool = False
    extra: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)  # setting names to run (empty: all of the parts')

    def runs(self) -> list[tuple[Setting, int, Path]]:
        table = _settings()
        chosen = [s for p in self.parts for s in table[p] if not self.quick or s.name in QUICK_SETTINGS[p]]
        if self.only:
            chosen = [s for s in chosen if s.name in self.only]
        # seed-major: an interrupted bench has every setting at the same number of seeds
        return [(s, seed, self.out / s.part / s.name / f"seed{seed}") for seed in self.seeds for s in chosen]

    def overrides(self, s: Setting, seed: int, run_dir: Path) -> list[str]:
        base = list(QUICK if self.quick else COMMON)
        return base + list(s.overrides) + self.extra + [f"train.seed={seed}", f"log.run_dir={run_dir.parent}"]


def _stamp_path(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.bench.json"


def _code_version() -> str | None:
    """The git commit of the code the bench runs (None outside a git checkout)."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _stamp(run_dir: Path) -> dict[str, Any]:
    """What the bench wrote beside a run directory when it started it (``{}`` if nothing readable)."""
    try:
        return json.loads(_stamp_path(run_dir).read_text())
    except (OSError, ValueError):
        return {}


def run_state(run_dir: Path, fp: str | None = None) -> str:
    """``"done"`` (finished: its final adapter is exported), ``"partial"`` (a checkpoint to resume) or ``"new"``.
    With ``fp``, a run directory the bench started for another configuration (another fingerprint, or none
    recorded) is ``"new"``: it is rerun from scratch, never resumed, skipped or exported as this one."""
    if fp is not None and run_dir.exists() and _stamp(run_dir).get("fingerprint") != fp:
        return "new"
    if (run_dir / "adapter").exists() and (run_dir / "report.md").exists():
        return "done"
    if (run_dir / "checkpoints" / "latest").exists():
        return "partial"
    return "new"


def _train_command(plan: Plan, s: Setting, seed: int, run_dir: Path, fp: str) -> list[str]:
    """The run's command: resume its own partial run (fingerprint ``fp``), else start it afresh."""
    cmd = [sys.executable, "-m", "flowdppo.cli", "train"]
    if run_state(run_dir, fp) == "partial":
        return cmd + ["--resume", str(run_dir)]
    cmd += ["--preset", s.preset, "--name", run_dir.name, "--overwrite"]
    for o in plan.overrides(s, seed, run_dir):
        cmd += ["--set", o]
    return cmd


def fingerprint(plan: Plan, s: Setting, seed: int) -> str:
    """What a run's result depends on: its preset and overrides (the bench's and the user's) and the
    shipped model's weights. An export with another fingerprint is stale and is rerun."""
    h = hashlib.sha256()
    h.update(json.dumps([s.preset, plan.overrides(s, seed, Path("-"))]).encode())
    h.update(_shipped_model_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def _shipped_model_bytes() -> bytes:
    """The shipped shapes model's files (name + content each, sorted), read once per process."""
    from flowdppo.models.shapes_model import ASSET_DIR

    return b"".join(f.name.encode() + f.read_bytes() for f in sorted(ASSET_DIR.glob("*")))


def export_path(results: Path, s: Setting, seed: int) -> Path:
    return results / "raw" / s.part / s.name / f"seed{seed}.json"


def exported(plan: Plan, results: Path | None, s: Setting, seed: int) -> bool:
    """A finished run of this configuration is already exported to ``results`` (e.g. committed by an
    earlier session): the bench need not run it again, even without its run directory."""
    if results is None or not export_path(results, s, seed).exists():
        return False
    rec = json.loads(export_path(results, s, seed).read_text())
    return bool(rec.get("complete")) and rec.get("fingerprint") == fingerprint(plan, s, seed)


def run_plan(plan: Plan, jobs: int = 1, progress: bool = True, results: Path | None = None) -> list[Path]:
    """Run (or resume) every run of the plan that is not finished (nor, with ``results``, exported there
    by a finished run of the same configuration); ``jobs`` runs at a time, one thread each when
    ``jobs > 1``. Each run's output goes to ``<run_dir>.log``. Returns the run directories."""
    runs = [(s, seed, d, fingerprint(plan, s, seed)) for s, seed, d in plan.runs()]
    todo = [r for r in runs if run_state(r[2], r[3]) != "done" and not exported(plan, results, r[0], r[1])]
    version = _code_version() if todo else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        parts = ", ".join(dict.fromkeys(r[0].part for r in runs))
        print(
            f"bench: {len(todo)} of {len(runs)} runs to do ({parts}; the others are finished or exported), "
            f"{jobs} at a time",
            file=sys.stderr,
            flush=True,
        )

        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="bench", unit="run")
    env = dict(os.environ)
    if jobs > 1:  # one thread per run (the children's thread choice reads FLOWDPPO_THREADS first)
        env["FLOWDPPO_THREADS"] = "1"
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    running: list[tuple[subprocess.Popen, Path, Any]] = []
    failures: list[str] = []

    def reap(block: bool) -> None:
        for proc, d, fh in list(running):
            if block or proc.poll() is not None:
                rc = proc.wait()
                fh.close()
                running.remove((proc, d, fh))
                if rc != 0:
                    failures.append(f"{d} (exit {rc}; see {d}.log)")
                if bar is not None:
                    bar.update(1)

    try:
        for s, seed, d, fp in todo:
            while len(running) >= jobs:
                reap(block=False)
                time.sleep(0.5)
            d.parent.mkdir(parents=True, exist_ok=True)
            cmd = _train_command(plan, s, seed, d, fp)
            if "--resume" not in cmd:  # a fresh start: record which configuration (and code) the directory holds
                _stamp_path(d).write_text(json.dumps({"fingerprint": fp, "commit": version}))
            fh = open(f"{d}.log", "a")
            running.append((subprocess.Popen(cmd, stdout=fh, stderr=fh, env=env), d, fh))
        while running:
            reap(block=True)
    finally:
        # interrupted: stop the children; a run checkpoints on SIGTERM and resumes. Not SIGINT: a bench started
        # in the background (``&``, nohup) hands its children an ignored SIGINT, and they would never stop
        for proc, _, fh in running:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            fh.close()
        if bar is not None:
            bar.close()
    if failures:
        raise RuntimeError("bench runs failed: " + "; ".join(failures))
    return [d for _, _, d in plan.runs()]


# --------------------------------------------------------------------------------------------
# export and aggregation
# --------------------------------------------------------------------------------------------


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved configuration as written beside it (``config.yaml``), or ``{}``."""
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def export_run(run_dir: Path, setting: Setting, seed: int, fingerprint: str = "") -> dict[str, Any]:
    """The compact record of one run: its evaluation lines and a thinned set of per-iteration metrics."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    keep = []
    for m in metrics:
        row = {"iteration": m["iteration"]}
        row.update({k: m[k] for k in KEEP_METRICS if k in m})
        row.update({k: v for k, v in m.items() if k.startswith(("ratio_noise/", "reward/"))})
        row["seconds"] = sum(v for k, v in m.items() if k.startswith("time/"))
        keep.append(row)
    return {
        "part": setting.part,
        "setting": setting.name,
        "label": setting.title,
        "preset": setting.preset,
        "overrides": list(setting.overrides),
        "seed": seed,
        "complete": run_state(run_dir) == "done",
        "fingerprint": fingerprint,
        "commit": _stamp(run_dir).get("commit"),
        "ratio_noise_samples": _run_config(run_dir).get("eval", {}).get("ratio_noise_samples"),
        "evals": evals,
        "metrics": keep,
    }


def export_plan(plan: Plan, results: Path) -> list[Path]:
    """Export every run of the plan that has a run directory (a finished export of the same configuration
    is kept: an unfinished rerun never replaces it). Returns the paths of the plan's exports."""
    paths = []
    for s, seed, d in plan.runs():
        p, fp = export_path(results, s, seed), fingerprint(plan, s, seed)
        state = run_state(d, fp)  # "new" for a directory of another configuration
        if (
            (d / "metrics.jsonl").exists()
            and state != "new"
            and not (exported(plan, results, s, seed) and state != "done")
        ):
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(export_run(d, s, seed, fp), separators=(",", ":")))
            os.replace(tmp, p)
        if p.exists():
            paths.append(p)
    return paths


def load_exports(results: Path, complete_only: bool = True) -> list[dict[str, Any]]:
    """The exported runs (by default only finished ones: a partial run's last evaluation is not its end)."""
    recs = [json.loads(p.read_text()) for p in sorted((results / "raw").glob("*/*/seed*.json"))]
    return [r for r in recs if r.get("complete", False) or not complete_only]


def final_scores(rec: dict[str, Any]) -> dict[str, float]:
    """Accuracy at the end (last evaluation) and at the start, KL to the reference at the end, trust-region
    activity (mean over iterations), wall seconds."""
    evals, ms = rec["evals"], rec["metrics"]
    out: dict[str, float] = {}
    if evals:
        first, last = evals[0], evals[-1]
        for key, name in (
            ("eval/eval/strict", "heldout_strict"),
            ("eval/eval/soft", "heldout_soft"),
            ("eval/ood/strict", "ood_strict"),
            ("eval/ood/soft", "ood_soft"),
            ("eval/eval/saturation", "heldout_saturation"),
            ("eval/eval/tifa_atom", "heldout_tifa_atom"),
        ):
            if key in last:
                out[name] = float(last[key])
                out[name + "_start"] = float(first[key])
    if ms:
        if "kl_ref" in ms[-1]:
            out["kl_ref"] = float(ms[-1]["kl_ref"])
        for k in ("masked_frac", "clip_frac"):
            vals = [m[k] for m in ms if k in m]
            if vals:
                out[k] = float(np.mean(vals))
        out["seconds"] = float(sum(m.get("seconds", 0.0) for m in ms))
    return out


def _by_setting(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``(part, setting) -> `` its records (one per seed)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["part"], r["setting"]), []).append(r)
    return groups


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(part, setting) -> {"label", "seeds", metric: (mean, std, n)}`` over seeds."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for key, recs in _by_setting(records).items():
        scores = [final_scores(r) for r in recs]
        row: dict[str, Any] = {"label": recs[0]["label"], "seeds": sorted(r["seed"] for r in recs)}
        for name in sorted({k for s in scores for k in s}):
            vals = np.array([s[name] for s in scores if name in s], dtype=float)
            row[name] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals))
        table[key] = row
    return table


def _fmt(cell: tuple[float, float, int] | None, pct: bool = False, sci: bool = False) -> str:
    if cell is None:
        return "—"
    m, s, _ = cell
    if sci:
        return f"{m:.2e} ± {s:.1e}"
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.3f} ± {s:.3f}"


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds (or a difference or ratio of such means) with the terms of its variance: one
    ``(s^2 / n, n)`` per independent mean it is made of, as Welch's test needs them."""

    value: float
    terms: tuple[tuple[float, int], ...]

    @classmethod
    def of(cls, cell: tuple[float, float, int] | Estimate) -> Estimate:
        if isinstance(cell, Estimate):
            return cell
        m, sd, n = cell
        return cls(m, ((sd * sd / n, n),))

    def __sub__(self, other: Estimate) -> Estimate:
        return Estimate(self.value - other.value, self.terms + other.terms)

    @property
    def n(self) -> int:
        return min(n for _, n in self.terms)


def t_quantile(df: float, level: float = 0.975) -> float:
    """The ``level`` quantile of Student's t with ``df`` degrees of freedom (fractional df too, as Welch's):
    bisection on the CDF, whose density is integrated with Simpson's rule (error far below 1e-4 for df >= 1)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 2001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        w = np.ones_like(x)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return 0.5 + float((w * f).sum()) * (t / 2000) / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < level:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < level else (lo, mid)
    return (lo + hi) / 2


def compare(
    a: tuple[float, float, int] | Estimate | None,
    b: tuple[float, float, int] | Estimate | None,
    higher_is_better: bool = True,
):
    """Verdict on "a beats b" by Welch's two-sided test at the 5% level: ``reproduced`` when the mean
    difference exceeds its standard error times the t quantile for the Welch-Satterthwaite degrees of
    freedom (2.78 for two settings of 3 seeds with equal spread, i.e. 4 degrees of freedom; up to 4.3 when
    one side's spread dominates; 1.96 with many seeds), ``not reproduced`` when it is that far the other
    way, else ``inconclusive``. Returns (verdict, text)."""
    if a is None or b is None:
        return "not run", "a setting it compares was not run"
    ea, eb = Estimate.of(a), Estimate.of(b)
    if ea.n < 2 or eb.n < 2:
        return "inconclusive", "fewer than 2 seeds"
    d = ea - eb
    diff = d.value * (1 if higher_is_better else -1)
    var = sum(v for v, _ in d.terms)
    se = math.sqrt(var)
    ns = f"n = {ea.n} and {eb.n}"
    if se == 0:
        text = f"difference {d.value:+.4g} (no spread over seeds, {ns})"
        return ("reproduced" if diff > 0 else "not reproduced" if diff < 0 else "inconclusive"), text
    df = var * var / sum(v * v / (n - 1) for v, n in d.terms if v > 0)
    crit = t_quantile(df)
    text = f"difference {d.value:+.4g} (standard error {se:.2g}, Welch df {df:.1f}, needs {crit:.2f} s.e.; {ns})"
    if diff > crit * se:
        return "reproduced", text
    if diff < -crit * se:
        return "not reproduced", text
    return "inconclusive", text


# --------------------------------------------------------------------------------------------
# figures and RESULTS.md
# --------------------------------------------------------------------------------------------


def _curves(
    records: list[dict[str, Any]], key: str
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per setting: iterations, mean and std over seeds of an evaluation key."""
    out = {}
    for g, recs in _by_setting(records).items():
        series = [{e["iteration"] + 1: e[key] for e in r["evals"] if key in e} for r in recs]
        its = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if not its:
            continue
        vals = np.array([[s[i] for i in its] for s in series], dtype=float)
        out[g] = (np.array(its), vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else 0 * vals[0])
    return out


def _kl_curves(records: list[dict[str, Any]], key: str):
    """Per setting: KL to the reference at each evaluation (mean over seeds) against accuracy (mean, std)."""
    out = {}
    for g, recs in _by_setting(records).items():
        rows = []
        for r in recs:
            kl = {m["iteration"]: m.get("kl_ref") for m in r["metrics"]}
            rows.append({e["iteration"]: (kl.get(e["iteration"]), e[key]) for e in r["evals"] if key in e})
        its = sorted(i for i in set.intersection(*(set(x) for x in rows)) if all(x[i][0] is not None for x in rows))
        if not its:
            continue
        kls = np.array([[x[i][0] for i in its] for x in rows], dtype=float)
        accs = np.array([[x[i][1] for i in its] for x in rows], dtype=float)
        out[g] = (kls.mean(0), accs.mean(0), accs.std(0, ddof=1) if len(accs) > 1 else 0 * accs[0])
    return out


#: what the trainer's ratio-noise analysis logs per SDE step (``ratio_noise/step<k>/<key>``): the exact
#: per-sample KL D, the measured mean and std of the exact, sum-reduced log-ratio, its predicted std
#: sqrt(2 D), and the fractions a PPO clip of 0.2 would cut on each side
RATIO_NOISE_KEYS = ("kl_mean", "log_r_mean", "log_r_std", "log_r_std_pred", "clip_low_frac", "clip_high_frac")


def ratio_noise_samples(records: list[dict[str, Any]]) -> dict[str, dict[int, list[dict[str, float]]]]:
    """``setting label -> SDE step -> `` one dict of :data:`RATIO_NOISE_KEYS` per logged analysis (every seed
    and analysed iteration), for the settings of the clipping methods (flow-grpo and flow-cps presets)."""
    steps: dict[str, dict[int, list[dict[str, float]]]] = {}
    for r in records:
        if r["preset"] not in ("flow-grpo", "flow-cps"):
            continue
        for m in r["metrics"]:
            for k in m:
                if k.startswith("ratio_noise/") and k.endswith("/kl_mean"):
                    pre = k.removesuffix("kl_mean")
                    st = int(pre.split("/")[1].removeprefix("step"))
                    row = {key: float(m[pre + key]) for key in RATIO_NOISE_KEYS}
                    steps.setdefault(r["label"], {}).setdefault(st, []).append(row)
    return steps


def ratio_noise_schedule(records: list[dict[str, Any]]) -> tuple[str, str]:
    """How often the analysed runs measured ratio noise (from the iterations that logged it) and on how many
    samples (the run's config as exported; for older exports the bench's overrides, else the config
    default), as text for the results page."""
    from flowdppo.config import EvalConfig

    gaps, sizes = set(), set()
    for r in records:
        if r["preset"] not in ("flow-grpo", "flow-cps"):
            continue
        its = sorted(m["iteration"] for m in r["metrics"] if any(k.startswith("ratio_noise/") for k in m))
        gaps.update(b - a for a, b in zip(its, its[1:]))
        given = [o.split("=", 1)[1] for o in (*COMMON, *r["overrides"]) if o.startswith("eval.ratio_noise_samples=")]
        sizes.add(str(r.get("ratio_noise_samples") or (given[-1] if given else EvalConfig().ratio_noise_samples)))
    return " or ".join(str(g) for g in sorted(gaps)) or "once", " or ".join(sorted(sizes))


def ratio_noise_markdown(records: list[dict[str, Any]]) -> list[str]:
    """A table per clipping method: per SDE step, the measured ratio statistics (mean over every logged
    analysis) next to Gaussian theory's predictions (E[log r] = -D, std[log r] = sqrt(2 D))."""
    steps = ratio_noise_samples(records)
    if not steps:
        return []
    every, n = ratio_noise_schedule(records)
    lines = [
        "## Ratio noise on live runs (Section 3.2)",
        "",
        f"Every `eval.ratio_noise_every` iterations ({every} in these runs) the trainer replays "
        f"`eval.ratio_noise_samples` ({n}) of the batch's stored actions through the updated policy and compares "
        "it with the rollout's (old) policy. The log-ratio here is the exact one, *sum-reduced* over the "
        "latent's dimensions (the paper's analysis), computed from the two means; D is the exact per-sample KL. "
        "Each cell is the mean over every analysed iteration and seed. The clip columns count the samples a PPO "
        "clip of eps = 0.2 would cut. The trainer's own clip is different: it reads the *mean-reduced* ratio "
        "with clip_eps 1e-4, and its fraction is the table's *clipped* column above.",
        "",
        "| setting | SDE step | analyses | D (exact KL) | -E[log r] measured | std[log r] measured | "
        "sqrt(2 D) predicted | measured / predicted std | r < 0.8 | r > 1.2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lab, per in sorted(steps.items()):
        for st, rows in sorted(per.items()):
            mean = {k: float(np.mean([row[k] for row in rows])) for k in RATIO_NOISE_KEYS}
            ratio = float(np.mean([row["log_r_std"] / row["log_r_std_pred"] for row in rows if row["log_r_std_pred"]]))
            lines.append(
                f"| {lab} | {st} | {len(rows)} | {mean['kl_mean']:.2e} | {-mean['log_r_mean']:.2e} | "
                f"{mean['log_r_std']:.2e} | {mean['log_r_std_pred']:.2e} | {ratio:.2f} | "
                f"{mean['clip_low_frac']:.3f} | {mean['clip_high_frac']:.3f} |"
            )
    lines.append("")
    return lines


def write_figures(records: list[dict[str, Any]], fig_dir: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []
    by_part = {p: [r for r in records if r["part"] == p] for p in PARTS}
    label = {(r["part"], r["setting"]): r["label"] for r in records}

    def save(fig, name, title):
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=90)
        plt.close(fig)
        made.append((title, name))

    def band(ax, xs, m, s, lab):
        (line,) = ax.plot(xs, m, "o-", ms=3, label=lab)
        ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.2)

    if by_part["methods"]:
        fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
        for i, (key, title) in enumerate(
            [("eval/eval/strict", "held-out strict"), ("eval/ood/strict", "out-of-domain strict")]
        ):
            for g, (its, m, s) in _curves(by_part["methods"], key).items():
                band(ax[i], its, m, s, label[g])
            ax[i].set_title(f"{title} (mean ± std over seeds)")
            ax[i].set_xlabel("iterations trained")
            ax[i].legend(fontsize=7)
        for g, (kl, m, s) in _kl_curves(by_part["methods"], "eval/eval/strict").items():
            band(ax[2], kl, m, s, label[g])
        ax[2].set_xscale("symlog", linthresh=1e-6)
        ax[2].set_title("held-out strict against KL to the reference")
        ax[2].set_xlabel("KL to the reference (mean-reduced)")
        ax[2].legend(fontsize=7)
        save(fig, "bench_methods.png", "Methods: accuracy curves and KL efficiency")

        steps = ratio_noise_samples(by_part["methods"])
        if steps:
            fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
            for lab, per in steps.items():
                for st, rows in sorted(per.items()):
                    a = np.array([[row[k] for k in RATIO_NOISE_KEYS] for row in rows])
                    (line,) = ax[0].plot(a[:, 3], a[:, 2], "o", ms=3, label=f"{lab} step {st}")
                    ax[1].plot(a[:, 0], -a[:, 1], "o", ms=3, color=line.get_color(), label=f"{lab} step {st}")
            for axis in ax:
                lo, hi = axis.get_xlim()
                axis.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
                axis.legend(fontsize=6)
            ax[0].set_xlabel("sqrt(2 D) (predicted)")
            ax[0].set_ylabel("measured std[log r]")
            ax[1].set_xlabel("D (exact KL, sum-reduced)")
            ax[1].set_ylabel("measured -E[log r]")
            ax[0].set_title("ratio noise: std of the exact log-ratio")
            ax[1].set_title("ratio bias: mean of the exact log-ratio")
            save(fig, "bench_ratio_noise.png", "Ratio noise on live flow-grpo / flow-cps runs")

    if by_part["multi-epoch"] and by_part["methods"]:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        i1 = _curves(by_part["methods"], "eval/eval/strict")
        for g, (its, m, s) in _curves(by_part["multi-epoch"], "eval/eval/strict").items():
            preset = g[1].removesuffix("-I2")
            if ("methods", preset) in i1:
                band(ax, *i1[("methods", preset)], f"{preset} I1")
            band(ax, its, m, s, label[g])
        ax.set_title("multi-epoch: held-out strict, I1 vs I2")
        ax.set_xlabel("iterations trained")
        ax.legend(fontsize=7)
        save(fig, "bench_multi_epoch.png", "Multi-epoch training (I1 vs I2)")

    if by_part["ablations"]:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        base = _curves([r for r in by_part["methods"] if r["setting"] == "flow-dppo"], "eval/eval/strict")
        for g, c in {**base, **_curves(by_part["ablations"], "eval/eval/strict")}.items():
            band(ax, *c, label.get(g, g[1]))
        ax.set_title("ablations of flow-dppo: held-out strict")
        ax.set_xlabel("iterations trained")
        ax.legend(fontsize=7)
        save(fig, "bench_ablations.png", "Ablations (mask symmetry, delta, beta)")

    if by_part["multi-reward"]:
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
        for i, key in enumerate(["eval/eval/tifa_atom", "eval/eval/saturation"]):
            for g, c in _curves(by_part["multi-reward"], key).items():
                band(ax[i], *c, label[g])
            ax[i].set_title(f"multi-reward: {key.split('/')[-1]} (held-out)")
            ax[i].set_xlabel("iterations trained")
            ax[i].legend(fontsize=7)
        save(fig, "bench_multi_reward.png", "Multi-reward balance (weighted sum vs GDPO)")
    return made


def results_markdown(
    records: list[dict[str, Any]], figures: list[tuple[str, str]], fig_rel: str, header: str = ""
) -> str:
    """``RESULTS.md``: per-part tables (mean ± std over seeds), the verdict of each claim, the figures."""
    table = aggregate(records)
    lines = ["# Results: the paper's claims at small scale", ""]
    if header:
        lines += [header, ""]

    def row(part: str, setting: str) -> dict[str, Any] | None:
        return table.get((part, setting))

    def cell(part: str, setting: str, key: str):
        r = row(part, setting)
        return r.get(key) if r else None

    lines += [
        "Each cell is the mean ± sample standard deviation over seeds. *KL to ref (end)* is the mean-reduced "
        "per-step KL of the policy to the shipped model on the last iteration's samples; at beta = 0 it is "
        "measured on the policy that sampled that iteration, i.e. before its update (one update of the run's "
        "last, two at I2), at beta > 0 during the update's training forwards. *masked* and *clipped* are the "
        "mean share of loss entries the trust region removed, over all iterations.",
        "",
    ]
    for part in PARTS:
        keys = sorted(s for p, s in table if p == part)
        if not keys:
            continue
        lines += [
            f"## {part}",
            "",
            "| setting | seeds | held-out strict % | held-out soft % | OOD strict % | KL to ref (end) | "
            "masked | clipped | minutes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in keys:
            r = table[(part, s)]
            mins = f"{r['seconds'][0] / 60:.1f}" if "seconds" in r else "—"
            lines.append(
                f"| {r['label']} | {len(r['seeds'])} | {_fmt(r.get('heldout_strict'), pct=True)} | "
                f"{_fmt(r.get('heldout_soft'), pct=True)} | {_fmt(r.get('ood_strict'), pct=True)} | "
                f"{_fmt(r.get('kl_ref'), sci=True)} | {_fmt(r.get('masked_frac'))} | {_fmt(r.get('clip_frac'))} | "
                f"{mins} |"
            )
        start = next((table[(part, s)].get("heldout_strict_start") for s in keys), None)
        if start:
            lines += ["", f"Before training (the same for every run): held-out strict {100 * start[0]:.1f}%."]
        lines.append("")

    claims = []
    for a, b in (("flow-dppo", "flow-grpo"), ("flow-dppo-cps", "flow-cps"), ("flow-dppo", "grpo-guard")):
        claims.append(
            (
                f"{a} reaches higher held-out accuracy than {b} (Table 4)",
                compare(cell("methods", a, "heldout_strict"), cell("methods", b, "heldout_strict")),
            )
        )
        claims.append(
            (
                f"{a} forgets less than {b}: higher out-of-domain accuracy (PickScore-OOD analogue)",
                compare(cell("methods", a, "ood_strict"), cell("methods", b, "ood_strict")),
            )
        )

    def efficiency(part, s):
        r = row(part, s)
        if not r or "heldout_strict" not in r or "kl_ref" not in r:
            return None
        # gain / KL, its variance by the delta method (the start is the same shipped model for every seed)
        (acc, s_acc, n_acc), (kl, s_kl, n_kl) = r["heldout_strict"], r["kl_ref"]
        gain, kl = acc - r["heldout_strict_start"][0], max(kl, 1e-12)
        q = gain / kl
        return Estimate(
            q, ((q * q * s_acc**2 / max(gain * gain, 1e-24) / n_acc, n_acc), (q * q * s_kl**2 / kl**2 / n_kl, n_kl))
        )

    for a, b in (("flow-dppo", "flow-grpo"), ("flow-dppo-cps", "flow-cps")):
        claims.append(
            (
                f"{a} gains more held-out accuracy per unit of KL to the reference than {b}",
                compare(efficiency("methods", a), efficiency("methods", b)),
            )
        )

    def drop(preset):
        i1, i2 = cell("methods", preset, "heldout_strict"), cell("multi-epoch", f"{preset}-I2", "heldout_strict")
        if i1 is None or i2 is None:
            return None
        return Estimate.of(i2) - Estimate.of(i1)

    for a, b in (("flow-dppo", "flow-grpo"), ("flow-dppo-cps", "flow-cps")):
        claims.append((f"going from I1 to I2, {a} keeps more accuracy than {b} (Figure 5)", compare(drop(a), drop(b))))
    claims.append(
        (
            "the asymmetric mask beats the symmetric one (Figure 3)",
            compare(
                cell("methods", "flow-dppo", "heldout_strict"), cell("ablations", "dppo-symmetric", "heldout_strict")
            ),
        )
    )
    claims.append(
        (
            "a tighter KL threshold ends higher: delta 1e-8 against 1e-6 (Figure 3: the smallest delta is the "
            "most stable and slightly best, the largest the least stable)",
            compare(
                cell("ablations", "delta-1e-8", "heldout_strict"), cell("ablations", "delta-1e-6", "heldout_strict")
            ),
        )
    )
    for beta in ("1e-2", "1e-1"):
        claims.append(
            (
                f"a KL penalty to the reference (beta {beta}) ends closer to the reference than beta 0 (App. G.3.2)",
                compare(
                    cell("ablations", f"beta-{beta}", "kl_ref"),
                    cell("methods", "flow-dppo", "kl_ref"),
                    higher_is_better=False,
                ),
            )
        )
    claims.append(
        (
            "a small KL penalty (beta 1e-2) reaches higher held-out accuracy than beta 0 (App. G.3.2: beta 1e-3 "
            "is best on FLUX2)",
            compare(cell("ablations", "beta-1e-2", "heldout_strict"), cell("methods", "flow-dppo", "heldout_strict")),
        )
    )
    gdpo = ("multi-reward", "gdpo")
    for comp in ("tifa_atom", "saturation"):
        claims.append(
            (
                f"balanced multi-reward training: under GDPO the {comp} reward rises over training",
                compare(cell(*gdpo, f"heldout_{comp}"), cell(*gdpo, f"heldout_{comp}_start")),
            )
        )
    claims.append(
        (
            "GDPO keeps the graded compositional reward (tifa_atom) higher than the weighted sum",
            compare(
                cell("multi-reward", "gdpo", "heldout_tifa_atom"), cell("multi-reward", "sum", "heldout_tifa_atom")
            ),
        )
    )

    lines += ratio_noise_markdown(records)
    lines += [
        "## Verdicts",
        "",
        "A claim is *reproduced* when Welch's two-sided t-test at the 5% level finds the mean difference over "
        "seeds in the paper's direction (the difference exceeds its standard error times the t quantile for "
        "the Welch-Satterthwaite degrees of freedom: about 2.8-4.3 standard errors with 3 seeds per setting), "
        "*not reproduced* when it finds it in the other direction, and *inconclusive at this scale* otherwise. "
        "Ratios (accuracy gained per unit of KL) take their standard error from the delta method.",
        "",
        "| claim | verdict | numbers |",
        "|---|---|---|",
    ]
    for claim, (verdict, text) in claims:
        lines.append(f"| {claim} | **{verdict}** | {text} |")
    lines.append("")
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({fig_rel}/{name})", ""]
    return "\n".join(lines)


def write_results(results: Path, doc: Path, fig_dir: Path, header: str = "") -> Path:
    """Tables, figures and verdicts from the exports; ``header`` (default: ``<results>/README.md``, where
    the commands, the machine and the wall times of the runs are recorded by hand) opens the page."""
    if not header and (results / "README.md").exists():
        header = (results / "README.md").read_text().strip()
    records = load_exports(results)
    if not records:
        raise FileNotFoundError(f"no exported runs under {results / 'raw'}: run the bench first")
    figures = write_figures(records, fig_dir)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(results_markdown(records, figures, os.path.relpath(fig_dir, doc.parent), header))
    return doc


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="flowdppo bench",
        description="Rerun the paper's comparisons on the embedded shapes world (each part resumable).",
        epilog="Other benchmarks, each with its own --help: `flowdppo bench speed` (per-phase time, FLOP/s, "
        "Flow-DPPO/Flow-GRPO ratio, memory per process), `flowdppo bench losses` (loss time), "
        "`flowdppo bench log-ratio` (fp32 log-ratio error).",
    )
    p.add_argument("--part", action="append", choices=PARTS + ("all",), help="part(s) to run (default: all)")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME",
        help="only this setting of the chosen parts (repeatable), e.g. flow-dppo or flow-grpo-I2",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run of the harness (minutes)")
    p.add_argument("--out", default=None, help="run directories (default runs/bench, or runs/bench-quick)")
    p.add_argument("--results", default=None, help="compact exports (default docs/results, quick: <out>/results)")
    p.add_argument("--doc", default=None, help="the results page (default docs/RESULTS.md, quick: <out>/RESULTS.md)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each when > 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    p.add_argument("--report", action="store_true", help="only rebuild the tables, figures and RESULTS.md")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if args.seeds < 1 or args.jobs < 1:
        p.error("--seeds and --jobs must be >= 1")
    parts = list(PARTS) if not args.part or "all" in args.part else list(dict.fromkeys(args.part))
    out = Path(args.out or ("runs/bench-quick" if args.quick else "runs/bench"))
    results = Path(args.results or (out / "results" if args.quick else "docs/results"))
    doc = Path(args.doc or (out / "RESULTS.md" if args.quick else "docs/RESULTS.md"))
    known = {st.name for part in parts for st in _settings()[part]}
    unknown = [n for n in args.setting if n not in known]
    if unknown:
        p.error(f"--setting {', '.join(unknown)}: not a setting of the chosen parts; valid: {', '.join(sorted(known))}")
    plan = Plan(
        out=out,
        parts=parts,
        seeds=list(range(args.seeds)),
        quick=args.quick,
        extra=list(args.set),
        only=list(args.setting),
    )
    if not args.report:
        tic = time.perf_counter()
        try:
            run_plan(plan, jobs=args.jobs, results=results)
        finally:  # what finished is kept even when the bench is interrupted
            export_plan(plan, results)
        print(f"bench: {len(plan.runs())} runs finished in {(time.perf_counter() - tic) / 60:.1f} min")
    path = write_results(results, doc, doc.parent / "figures" if not args.quick else out / "figures")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
