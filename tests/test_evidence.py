"""The evidence bench's harness: runs, resumes, exports and aggregates (a smaller --quick)."""

import json

import yaml

from flowdppo.tools import evidence


def test_quick_bench_runs_exports_and_aggregates(tmp_path):
    out, results = tmp_path / "bench", tmp_path / "results"
    plan = evidence.Plan(out=out, parts=["methods"], seeds=[0, 1], quick=True)
    runs = evidence.run_plan(plan, progress=False)
    assert len(runs) == 4 and all(evidence.run_state(d) == "done" for d in runs)
    for d in runs:  # each is an ordinary run directory
        assert (d / "report.md").exists() and (d / "config.yaml").exists()
    # a finished plan is not rerun: the run directories stay as they are
    stamp = [(d / "metrics.jsonl").stat().st_mtime_ns for d in runs]
    evidence.run_plan(plan, progress=False)
    assert stamp == [(d / "metrics.jsonl").stat().st_mtime_ns for d in runs]

    paths = evidence.export_plan(plan, results)
    assert len(paths) == 4
    records = evidence.load_exports(results)
    table = evidence.aggregate(records)
    assert set(table) == {("methods", "flow-dppo"), ("methods", "flow-grpo")}
    for (_, setting), row in table.items():
        assert row["seeds"] == [0, 1]
        per_seed = [evidence.final_scores(r) for r in records if r["setting"] == setting]
        for key in ("heldout_strict", "ood_strict", "kl_ref"):
            vals = [sc[key] for sc in per_seed]
            mean, std, n = row[key]
            # mean and sample std over the two seeds' last evaluation / last iteration
            assert n == 2 and abs(mean - sum(vals) / 2) < 1e-12 and abs(std - abs(vals[0] - vals[1]) / 2**0.5) < 1e-12
        assert 0 <= row["heldout_strict"][0] <= 1 and row["kl_ref"][0] > 0  # trained: the policy left the reference
    # the seeds are different runs: their KL to the reference differs
    kl = {r["seed"]: r["metrics"][-1]["kl_ref"] for r in records if r["setting"] == "flow-dppo"}
    assert kl[0] != kl[1]
    # both methods sampled the same number of images per iteration (equal rollout budgets)
    cfgs = [yaml.safe_load((d / "config.yaml").read_text()) for d in runs]
    assert (
        len({(c["train"]["prompts_per_iter"], c["train"]["group_size"], c["train"]["iterations"]) for c in cfgs}) == 1
    )

    # a run directory belongs to the configuration that started it: for another one it is "new" (rerun, not
    # resumed, skipped or exported as that configuration's), and each export names the code that ran it
    other = evidence.Plan(out=out, parts=["methods"], seeds=[0, 1], quick=True, extra=["train.lr=1e-4"])
    s0 = evidence._settings()["methods"][0]
    assert evidence.run_state(runs[0], evidence.fingerprint(plan, s0, 0)) == "done"
    assert evidence.run_state(runs[0], evidence.fingerprint(other, s0, 0)) == "new"
    assert evidence.export_plan(other, tmp_path / "other") == []
    assert all(r["commit"] == evidence._code_version() for r in records)  # None outside a git checkout

    # committed exports carry a finished plan across machines: without the run directories nothing reruns
    assert all(r["complete"] and len(r["fingerprint"]) == 16 for r in records)
    import shutil

    shutil.rmtree(out)
    assert evidence.run_plan(plan, progress=False, results=results) and not out.exists()
    # ... but an export of another configuration is stale
    assert evidence.exported(plan, results, s0, 0) and not evidence.exported(other, results, s0, 0)
    # an unfinished export is not reused nor aggregated
    p = evidence.export_path(results, s0, 0)
    rec = json.loads(p.read_text())
    p.write_text(json.dumps({**rec, "complete": False}))
    assert not evidence.exported(plan, results, s0, 0)
    assert len(evidence.load_exports(results)) == 3 and len(evidence.load_exports(results, complete_only=False)) == 4
    p.write_text(json.dumps(rec))

    doc = evidence.write_results(results, tmp_path / "RESULTS.md", tmp_path / "figures")
    text = doc.read_text()
    assert "| flow-dppo | 2 |" in text and "## Verdicts" in text
    assert "flow-dppo reaches higher held-out accuracy than flow-grpo" in text
    # the ratio-noise table (flow-grpo's live analyses): one row per analysed SDE step, measured next to predicted
    noise = evidence.ratio_noise_samples(records)
    assert set(noise) == {"flow-grpo"} and noise["flow-grpo"]
    rows = [ln for ln in text.splitlines() if ln.startswith("| flow-grpo | ") and ln.count("|") == 11]
    assert len(rows) == len(noise["flow-grpo"])
    # the page states the schedule these runs measured on (the quick geometry's), not the full bench's
    assert records[0]["ratio_noise_samples"] == 4
    assert "iterations (1 in these runs)" in text and "`eval.ratio_noise_samples` (4)" in text
    assert (tmp_path / "figures" / "bench_methods.png").exists()


def test_t_quantile_matches_student_tables():
    # two-sided 5% critical values of Student's t (standard tables)
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (1000, 1.962)):
        assert abs(evidence.t_quantile(df) - t) < 2e-3, df
    assert abs(evidence.t_quantile(4, 0.95) - 2.132) < 2e-3


def test_verdict_rule():
    # Welch's test: 2.5 standard errors is not enough with 3 seeds a side (df 4 needs 2.78), enough with 30
    se3, se30 = (2 * 0.01 / 3) ** 0.5, (2 * 0.01 / 30) ** 0.5
    assert evidence.compare((0.3 + 2.5 * se3, 0.1, 3), (0.3, 0.1, 3))[0] == "inconclusive"
    assert evidence.compare((0.3 + 2.5 * se30, 0.1, 30), (0.3, 0.1, 30))[0] == "reproduced"
    assert evidence.compare((0.3 + 3.0 * se3, 0.1, 3), (0.3, 0.1, 3))[0] == "reproduced"
    # a difference of differences (I1 -> I2 drops) keeps every mean's own term: unequal seed counts count
    d = evidence.Estimate.of((0.6, 0.1, 3)) - evidence.Estimate.of((0.5, 0.1, 5))
    assert abs(d.value - 0.1) < 1e-12 and d.n == 3 and len(d.terms) == 2
    assert abs(sum(v for v, _ in d.terms) - (0.01 / 3 + 0.01 / 5)) < 1e-15
    assert evidence.compare((0.5, 0.01, 3), (0.3, 0.01, 3))[0] == "reproduced"
    assert evidence.compare((0.3, 0.01, 3), (0.5, 0.01, 3))[0] == "not reproduced"
    assert evidence.compare((0.31, 0.1, 3), (0.3, 0.1, 3))[0] == "inconclusive"
    assert evidence.compare(None, (0.3, 0.1, 3))[0] == "not run"
    assert evidence.compare((0.3, 0.0, 1), (0.3, 0.1, 3))[0] == "inconclusive"
    # lower is better (e.g. a drop): the sign flips
    assert evidence.compare((0.1, 0.01, 3), (0.3, 0.01, 3), higher_is_better=False)[0] == "reproduced"


def test_saturation_conflicts_with_grey_background():
    import torch

    fn = evidence.shapes_and_saturation()
    grey = torch.full((1, 3, 32, 32), 0.5)
    red = grey.clone()
    red[:, 1:] = 0.1
    s = fn(["a red circle"] * 2, torch.cat([grey, red]))
    assert s["saturation"][0] < 0.01 < 0.5 < s["saturation"][1]
    assert {"strict", "soft", "saturation"} <= set(s)


def test_setting_filter_and_seed_major_order(tmp_path, capsys):
    import pytest

    plan = evidence.Plan(
        out=tmp_path, parts=["methods", "multi-epoch"], seeds=[0, 1], only=["flow-dppo", "flow-grpo-I2"]
    )
    runs = [(s.name, seed) for s, seed, _ in plan.runs()]
    # seed-major: an interrupted bench has every chosen setting at the same number of seeds
    assert runs == [("flow-dppo", 0), ("flow-grpo-I2", 0), ("flow-dppo", 1), ("flow-grpo-I2", 1)]
    with pytest.raises(SystemExit) as e:
        evidence.main(["--part", "methods", "--setting", "flow-grpo-I2", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--setting flow-grpo-I2: not a setting of the chosen parts; valid:" in capsys.readouterr().err


def _record(part, setting, seed, start, end, kl, extra_end=None):
    """A synthetic export: two evaluations (start, end) and one metrics line."""
    evals = [
        {"iteration": -1, "eval/eval/strict": start, "eval/ood/strict": 0.25},
        {"iteration": 79, "eval/eval/strict": end, "eval/ood/strict": 0.25, **(extra_end or {})},
    ]
    if extra_end:
        evals[0].update({k: 0.1 for k in extra_end})
    return {
        "part": part,
        "setting": setting,
        "label": setting,
        "preset": "flow-dppo",
        "seed": seed,
        "evals": evals,
        "metrics": [{"iteration": 79, "kl_ref": kl, "seconds": 1.0}],
    }


def test_ablation_and_multi_reward_verdicts_read_the_right_settings():
    recs = []
    for seed, eps in enumerate((0.0, 0.01, -0.01)):
        recs += [
            _record("methods", "flow-dppo", seed, 0.5, 0.60 + eps, 1e-4),
            _record("ablations", "delta-1e-8", seed, 0.5, 0.65 + eps, 1e-5),
            _record("ablations", "delta-1e-6", seed, 0.5, 0.55 + eps, 1e-3),
            # beta: closer to the reference (lower KL) but no higher accuracy
            _record("ablations", "beta-1e-2", seed, 0.5, 0.60 - eps, 1e-5 * (1 + eps)),
            # GDPO: the compositional reward rises, saturation falls
            _record(
                "multi-reward",
                "gdpo",
                seed,
                0.5,
                0.6,
                1e-4,
                {"eval/eval/tifa_atom": 0.3 + eps, "eval/eval/saturation": 0.05 + eps},
            ),
        ]
    text = evidence.results_markdown(recs, [], "figures")
    verdict = {ln.split(" | ")[0].lstrip("| "): ln.split(" | ")[1] for ln in text.splitlines() if "| **" in ln}

    def find(start):
        (v,) = [v for k, v in verdict.items() if k.startswith(start)]
        return v

    assert find("a tighter KL threshold ends higher") == "**reproduced**"
    assert find("a KL penalty to the reference (beta 1e-2) ends closer") == "**reproduced**"
    assert find("a small KL penalty (beta 1e-2) reaches higher") == "**inconclusive**"
    assert find("balanced multi-reward training: under GDPO the tifa_atom") == "**reproduced**"
    assert find("balanced multi-reward training: under GDPO the saturation") == "**not reproduced**"
    assert find("GDPO keeps the graded compositional reward") == "**not run**"  # no weighted-sum runs


def test_sigterm_stops_a_background_bench_and_its_runs_resumably(tmp_path):
    """A bench started in the background inherits an ignored SIGINT (so do its runs): SIGTERM must still stop
    the bench, stop its run (which checkpoints), and leave it resumable."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bench"
    env = {**os.environ, "FLOWDPPO_THREADS": "1"}
    cmd = [sys.executable, "-m", "flowdppo.cli", "bench", "--quick", "--seeds", "1", "--part", "methods"]
    cmd += ["--setting", "flow-dppo", "--out", str(out), "--set", "train.iterations=200"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `cmd &` in a script does
        start_new_session=True,  # its own process group: whatever happens, nothing outlives the test
    )
    run_dir = out / "methods" / "flow-dppo" / "seed0"
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the bench's run never checkpointed"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 130 and "flowdppo bench: terminated (SIGTERM)" in err
    log = (out / "methods" / "flow-dppo" / "seed0.log").read_text()
    assert "flowdppo train: terminated (SIGTERM)" in log
    assert evidence.run_state(run_dir) == "partial"
