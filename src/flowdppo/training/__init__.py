"""The training loop: rollout and replay, the RL iteration, multi-process plumbing."""
