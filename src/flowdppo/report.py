"""The run report: plots from ``metrics.jsonl`` / ``eval.jsonl`` and image grids, in ``report.md``.

``python -m flowdppo.report runs/<name>`` (or ``flowdppo report runs/<name>``) rebuilds it at any
time, also for a run that is still going or was interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from flowdppo.training.runlog import read_jsonl


def _plot(ax, xs, ys, label):
    ys = np.asarray(ys, dtype=float)
    if len(ys) and np.isfinite(ys).any():
        ax.plot(xs, ys, label=label)


def _save(fig, run_dir: Path, name: str, title: str, figs: list[tuple[str, str]]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(run_dir / name, dpi=90)
    plt.close(fig)
    figs.append((title, name))


def write_report(run_dir: str | Path) -> Path:
    """Write ``plots.png``-style figures and ``report.md`` into ``run_dir``; returns the report path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    its = [m["iteration"] for m in metrics]
    figs = []

    # reward and evaluation accuracy
    fig, ax = plt.subplots(1, 3, figsize=(16, 3.6))
    for k in sorted({k for m in metrics for k in m if k.startswith("reward/") and "zero_std" not in k}):
        _plot(ax[0], its, [m.get(k, np.nan) for m in metrics], k.split("/", 1)[1])
    ax[0].set_title("training reward (rollout mean)")
    ax[0].set_xlabel("iteration")
    ax[0].legend(fontsize=8)
    eval_keys = sorted({k for e in evals for k in e if k.count("/") == 2 and k.startswith("eval/")})
    for k in eval_keys:
        _plot(ax[1], [e["iteration"] + 1 for e in evals], [e.get(k, np.nan) for e in evals], k[5:])
    ax[1].set_title("evaluation (deterministic ODE samples)")
    ax[1].set_xlabel("iterations trained")
    if eval_keys:
        ax[1].legend(fontsize=8)
    # the trust region's activity beside the accuracy it shapes (a 10-iteration running mean)
    for k, lab in (("masked_frac", "masked (Flow-DPPO)"), ("clip_frac", "clipped (PPO clip)")):
        if any(k in m for m in metrics):
            vals = np.asarray([m.get(k, np.nan) for m in metrics], dtype=float)
            w = min(10, len(vals))
            smooth = np.convolve(np.nan_to_num(vals), np.ones(w) / w, mode="valid")
            _plot(ax[2], its[w - 1 :], smooth, f"{lab}, mean of {w}")
            ax[2].legend(fontsize=8)
    ax[2].set_title("share of loss entries the trust region removes")
    ax[2].set_xlabel("iteration")
    _save(fig, run_dir, "plot_reward.png", "Reward, evaluation and trust-region activity", figs)

    # KL to reference, trust-region activity
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    measured = [m for m in metrics if "kl_ref" in m]  # every train.ref_kl_every iterations at beta = 0
    _plot(ax[0], [m["iteration"] for m in measured], [m["kl_ref"] for m in measured], "KL to reference (mean-reduced)")
    _plot(ax[0], its, [m.get("kl_mean", np.nan) for m in metrics], "old/new KL D (mean)")
    ax[0].set_yscale("symlog", linthresh=1e-8)
    ax[0].set_xlabel("iteration")
    ax[0].legend(fontsize=8)
    ax[0].set_title("divergences")
    for k, lab in [
        ("masked_frac", "masked (Flow-DPPO)"),
        ("masked_pos_adv_frac", "masked, A>0"),
        ("masked_neg_adv_frac", "masked, A<0"),
        ("clip_frac", "clipped"),
        ("clip_high_frac", "clipped, r>1+eps"),
        ("clip_low_frac", "clipped, r<1-eps"),
        ("kl_above_delta_frac", "D > delta"),
    ]:
        if any(k in m for m in metrics):
            _plot(ax[1], its, [m.get(k, np.nan) for m in metrics], lab)
    ax[1].set_title("trust region activity")
    ax[1].set_xlabel("iteration")
    ax[1].legend(fontsize=8)
    _save(fig, run_dir, "plot_trust_region.png", "KL and trust region", figs)

    # accuracy against KL to reference
    kl_by_it = {m["iteration"]: m.get("kl_ref") for m in metrics}
    acc_key = next((k for k in ("eval/eval/strict", "eval/eval/soft") if any(k in e for e in evals)), None)
    if acc_key:
        pts = [(kl_by_it.get(e["iteration"]), e[acc_key]) for e in evals if kl_by_it.get(e["iteration"]) is not None]
        if pts:
            fig, ax = plt.subplots(figsize=(5, 3.6))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
            ax.set_xlabel("KL to reference (at the anchor of that iteration)")
            ax.set_ylabel(acc_key[5:])
            ax.set_title("reward per unit of KL")
            _save(fig, run_dir, "plot_acc_vs_kl.png", "Accuracy against KL to the reference", figs)

    # ratio noise (docs/flow-dppo.md, section "Ratio noise") measured live: std[log r] against sqrt(2 KL),
    # and PPO-0.2 clip fractions
    noise = [m for m in metrics if any(k.startswith("ratio_noise/") for k in m)]
    if noise:
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
        steps = sorted({int(k.split("/")[1][4:]) for m in noise for k in m if k.startswith("ratio_noise/")})
        for st in steps:
            pre = f"ratio_noise/step{st}/"
            rows = [m for m in noise if pre + "log_r_std" in m]
            xs = [m["iteration"] for m in rows]
            (line,) = ax[0].plot(xs, [m[pre + "log_r_std"] for m in rows], "o-", label=f"step {st} measured")
            ax[0].plot(
                xs,
                [m[pre + "log_r_std_pred"] for m in rows],
                "--",
                color=line.get_color(),
                label=f"step {st} sqrt(2 KL)",
            )
            ax[1].plot(
                xs,
                [m[pre + "clip_low_frac"] + m[pre + "clip_high_frac"] for m in rows],
                "o-",
                color=line.get_color(),
                label=f"step {st}",
            )
        ax[0].set_title("std of the exact log-ratio after the update")
        ax[0].set_xlabel("iteration")
        ax[0].legend(fontsize=7)
        ax[1].set_title("fraction a PPO clip of 0.2 would cut (exact ratio)")
        ax[1].set_xlabel("iteration")
        ax[1].legend(fontsize=7)
        _save(fig, run_dir, "plot_ratio_noise.png", "Ratio noise (measured on the live run)", figs)

    lines = [f"# flowdppo run `{run_dir.name}`", ""]
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text())
        lines += [
            f"Preset `{cfg.get('preset')}`: sampler `{cfg['sampling']['sampler']}` (eta {cfg['sampling']['eta']}), "
            f"loss `{cfg['algorithm']['loss']}` (delta {cfg['algorithm']['delta']}, "
            f"clip {cfg['algorithm']['clip_eps']}, "
            f"beta {cfg['algorithm']['beta']}), {cfg['train']['prompts_per_iter']} prompts x "
            f"{cfg['train']['group_size']} "
            f"samples per iteration, {cfg['train']['iterations']} iterations. Full config: `config.yaml`.",
            "",
        ]
    if metrics:
        secs = sum(v for m in metrics for k, v in m.items() if k.startswith("time/"))
        lines += [
            f"{len(metrics)} iterations logged; {secs / 60:.1f} min in rollout, reward, anchor, training "
            "and evaluation.",
            "",
        ]
    if evals:
        first, last = evals[0], evals[-1]
        keys = sorted(k for k in first if k.startswith("eval/"))
        lines += [
            "## Evaluation",
            "",
            f"| metric | before (iteration {first['iteration'] + 1}) "
            f"| after (iteration {last['iteration'] + 1}) | change |",
            "|---|---|---|---|",
        ]
        for k in keys:
            a, b = first.get(k), last.get(k)
            if a is None or b is None:
                continue
            lines.append(f"| `{k[5:]}` | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
        lines.append("")
    for title, fn in figs:
        lines += [f"## {title}", "", f"![{title}]({fn})", ""]
    for title, fn in [("Samples before training", "grid_before.png"), ("Samples after training", "grid_after.png")]:
        if (run_dir / fn).exists():
            lines += [
                f"## {title}",
                "",
                "Same prompts and seeds (deterministic ODE sampling).",
                "",
                f"![{title}]({fn})",
                "",
            ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    print(write_report(sys.argv[1]))
