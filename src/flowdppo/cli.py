"""The ``flowdppo`` command line.

flowdppo train [--config FILE] [--preset NAME] [--set key=value ...] [--name NAME] [--overwrite]
flowdppo train --resume runs/<name> [--set train.iterations=N ...]
flowdppo pretrain ...        # the embedded shapes model (flowdppo.tools.pretrain)
flowdppo sample ...          # images from a base model plus an adapter (flowdppo.tools.sample)
flowdppo report runs/<name>  # rebuild a run's report.md and plots
flowdppo presets             # list the presets and what they set
flowdppo bench losses        # Flow-DPPO vs PPO-clip loss time
flowdppo bench speed         # per-phase time, FLOP/s vs peak, Flow-DPPO/Flow-GRPO ratio, memory per process
flowdppo bench-real ...      # GPU benchmark of an SD3.5-sized transformer
flowdppo reward-server       # serve a reward over HTTP (reward.name=http on the trainer side)

``flowdppo --threads N ...`` fixes the CPU thread count (default: the CPUs available, see
:mod:`flowdppo.threads`; torch is imported only after the thread settings are chosen).

Every error is one line, ``flowdppo <command>: error: ...``, with exit status 2 for a bad input and 1
for any other failure; ``--debug`` (anywhere on the line, or ``FLOWDPPO_DEBUG=1``) adds the traceback.
Ctrl-C and SIGTERM stop a training run at once; the completed iterations are checkpointed and the one
line printed says how to resume (exit status 130).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback

import yaml

# command -> (module with main(argv), help)
DELEGATED: dict[str, tuple[str, str]] = {
    "pretrain": ("flowdppo.tools.pretrain", "pretrain the embedded shapes model"),
    "sample": ("flowdppo.tools.sample", "sample images from a model (+ adapter)"),
    "bench": ("flowdppo.tools.bench", "the paper's comparisons (bench speed, losses, log-ratio: other benchmarks)"),
    "bench-real": ("flowdppo.tools.bench_real", "GPU benchmark of a SD3.5-sized transformer"),
    "reward-server": ("flowdppo.rewards.http", "serve a reward over HTTP"),
}


def _train(args: argparse.Namespace) -> int:
    from flowdppo.config import ConfigError, load_config
    from flowdppo.training.trainer import Trainer, resume

    if args.resume:
        if args.config or args.preset or args.name or args.overwrite:
            raise ConfigError("--resume takes the run's own config.yaml and folder; pass changes with --set")
        trainer = resume(args.resume, args.set)
    else:
        cfg = load_config(args.config, args.preset, args.set)
        if args.name:
            cfg.log.name = args.name
        trainer = Trainer(cfg, overwrite=args.overwrite)
    run_dir = trainer.run()
    if trainer.dist.is_main:  # one line per run, not per process (torchrun / accelerate launch)
        print(f"run directory: {run_dir}")
        if (run_dir / "report.md").exists():
            print(f"report: {run_dir / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowdppo.errors import UserError
    from flowdppo.report import write_report

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise UserError(f"{args.run_dir} is not a flowdppo run directory (no metrics.jsonl)")
    print(write_report(args.run_dir))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from flowdppo.config import PRESETS

    print(yaml.safe_dump(PRESETS, sort_keys=False))
    return 0


def _is_user_error(e: BaseException) -> bool:
    from flowdppo.errors import UserError

    if isinstance(e, (UserError, yaml.YAMLError, UnicodeDecodeError, FileNotFoundError, IsADirectoryError)):
        return True
    return type(e).__name__ == "ConfigError"


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    from flowdppo.errors import Interrupted

    raise Interrupted("SIGTERM")


def _guarded(command: str, fn, debug: bool) -> int:
    """Run ``fn()``; any failure becomes one line on stderr (and the traceback with ``--debug``)."""
    from flowdppo.errors import one_line

    prog = f"flowdppo {command}" if command else "flowdppo"
    previous = None
    if command in ("train", "bench"):
        # SIGTERM like Ctrl-C: the trainer checkpoints the completed iterations; the bench stops its runs so
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread
            previous = None
    try:
        return int(fn() or 0)
    except SystemExit:
        raise
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        what = "terminated (SIGTERM)" if str(e) == "SIGTERM" else "interrupted"
        note = getattr(e, "flowdppo_note", None)
        print(f"{prog}: {what}" + (f"; {note}" if note else ""), file=sys.stderr, flush=True)
        return 130
    except BaseException as e:  # noqa: BLE001 - the one place every error becomes one line
        if debug:
            traceback.print_exc()
        hint = "" if debug or _is_user_error(e) else " (rerun with --debug for the traceback)"
        note = getattr(e, "flowdppo_note", None)  # what an interrupted run saved, and how to resume
        print(f"{prog}: error: {one_line(e)}{hint}" + (f"; {note}" if note else ""), file=sys.stderr, flush=True)
        return 2 if _is_user_error(e) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowdppo",
        description="Online RL for flow-matching image generators (Flow-DPPO).",
        epilog="--debug (anywhere on the command line) prints the traceback of an error.",
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

    for name, (_, help_) in DELEGATED.items():  # listed here; their own parsers take the arguments
        sub.add_parser(name, help=help_ + f" (flowdppo {name} --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLOWDPPO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    n_threads = None  # the top-level --threads N (before the command)
    while argv and (argv[0] == "--threads" and len(argv) > 1 or argv[0].startswith("--threads=")):
        n_threads, argv = (argv[0].split("=", 1)[1], argv[1:]) if "=" in argv[0] else (argv[1], argv[2:])
    from flowdppo import threads

    try:  # before anything imports torch: OpenMP reads these once, when torch loads
        threads.configure(n_threads)
    except ValueError as e:
        print(f"flowdppo: error: --threads / {threads.ENV_THREADS}: {e}", file=sys.stderr)
        return 2
    if argv and argv[0] in DELEGATED:
        # the tool's own parser sees every argument (including --help); its prog is "flowdppo <name>"
        module = DELEGATED[argv[0]][0]
        rest = argv[1:]
        return _guarded(argv[0], lambda: importlib.import_module(module).main(rest), debug)
    args = _parser().parse_args(argv)
    return _guarded(args.command, lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
