"""Fault injection for the tests of interrupted runs: ``FLOWDPPO_FAULT=PHASE:ITERATION:ACTION``.

At the named phase of iteration ``ITERATION`` (0-based) the trainer calls :func:`at`, which then

- ``raise``: raises ``RuntimeError("injected fault ...")``;
- ``sigint`` / ``sigterm`` / ``sigkill``: sends that signal to this process.

Phases: ``rollout`` (before the rollout), ``reward`` (before scoring), ``anchor`` (before the anchor
replay), ``train`` (after the first optimizer step: a half-updated model), ``eval`` (before the
evaluation of an evaluating iteration), ``checkpoint`` (between the two files of the checkpoint written
after that iteration). Unset (the normal case), :func:`at` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ACTIONS = ("raise", "sigint", "sigterm", "sigkill")
PHASES = ("rollout", "reward", "anchor", "train", "eval", "checkpoint")


def at(phase: str, iteration: int) -> None:
    spec = os.environ.get("FLOWDPPO_FAULT")
    if not spec:
        return
    want_phase, want_it, action = spec.split(":")
    if want_phase != phase or int(want_it) != iteration:
        return
    os.environ.pop("FLOWDPPO_FAULT")  # once
    if action == "raise":
        raise RuntimeError(f"injected fault at {phase} of iteration {iteration}")
    sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[action]
    os.kill(os.getpid(), sig)
