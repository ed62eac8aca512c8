"""The ``flowdppo`` command line.

flowdppo train [--config FILE] [--preset NAME] [--set key=value ...] [--name NAME] [--overwrite]
flowdppo train --resume runs/<name> [--set train.iterations=N ...]
flowdppo pretrain ...        # the embedded shapes model (flowdppo.tools.pretrain)
flowdppo sample ...          # images from a base model plus an adapter (flowdppo.tools.sample)
flowdppo report runs/<name>  # rebuild a run's report.md and plots
flowdppo presets             # list the presets and what they set
flowdppo bench losses        # Flow-DPPO vs PPO-clip loss time
flowdppo bench speed         # per-phase time, FLOP/s vs peak, Flow-DPPO/Flow-GRPO ratio, memory per process
flowdppo reward-server       # serve a reward over HTTP (reward.name=http on the trainer side)

``flowdppo --threads N ...`` fixes the CPU thread count (default: the CPUs available, see
:mod:`flowdppo.threads`; torch is imported only after the thread settings are chosen).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import yaml


def _train(args: argparse.Namespace) -> int:
    from flowdppo.config import ConfigError, load_config
    from flowdppo.training.trainer import Trainer, resume

    try:
        if args.resume:
            if args.config or args.preset:
                raise ConfigError("--resume takes the run's own config.yaml; pass changes with --set")
            trainer = resume(args.resume, args.set)
        else:
            cfg = load_config(args.config, args.preset, args.set)
            if args.name:
                cfg.log.name = args.name
            trainer = Trainer(cfg, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError) as e:
        print(f"flowdppo train: error: {e}", file=sys.stderr)
        return 2
    run_dir = trainer.run()
    if trainer.dist.is_main:  # one line per run, not per process (torchrun / accelerate launch)
        print(f"run directory: {run_dir}")
        if (run_dir / "report.md").exists():
            print(f"report: {run_dir / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from flowdppo.report import write_report

    print(write_report(args.run_dir))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from flowdppo.config import PRESETS

    print(yaml.safe_dump(PRESETS, sort_keys=False))
    return 0


def _delegate(module: str):
    def run(args: argparse.Namespace) -> int:
        mod = importlib.import_module(module)
        return mod.main(args.rest) or 0

    return run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="flowdppo", description="Online RL for flow-matching image generators (Flow-DPPO)."
    )
    p.add_argument(
        "--threads",
        default=None,
        metavar="N",
        help="CPU threads for torch (default: FLOWDPPO_THREADS, OMP_NUM_THREADS, else the CPUs available)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with a preset / config (default: Flow-DPPO on the embedded shapes world)")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--preset", help="flow-dppo (default), flow-dppo-cps, flow-grpo, flow-cps, grpo-guard")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-4"
    )
    t.add_argument("--name", help="run name (runs/<name>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory of that name")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.set_defaults(func=_train)

    r = sub.add_parser("report", help="rebuild a run's report")
    r.add_argument("run_dir")
    r.set_defaults(func=_report)

    pr = sub.add_parser("presets", help="list the presets")
    pr.set_defaults(func=_presets)

    for name, module, help_ in [
        ("pretrain", "flowdppo.tools.pretrain", "pretrain the embedded shapes model"),
        ("sample", "flowdppo.tools.sample", "sample images from a model (+ adapter)"),
        ("bench", "flowdppo.tools.bench", "benchmarks (losses, speed)"),
        ("bench-real", "flowdppo.tools.bench_real", "GPU benchmark of a SD3.5-sized transformer"),
        ("reward-server", "flowdppo.rewards.http", "serve a reward over HTTP"),
    ]:
        d = sub.add_parser(name, help=help_, add_help=False)
        d.add_argument("rest", nargs=argparse.REMAINDER)
        d.set_defaults(func=_delegate(module))

    args = p.parse_args(argv)
    from flowdppo import threads

    try:  # before anything imports torch: OpenMP reads these once, when torch loads
        threads.configure(args.threads)
    except ValueError as e:
        p.error(f"--threads / {threads.ENV_THREADS}: {e}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
