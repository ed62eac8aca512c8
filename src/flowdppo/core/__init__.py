"""Core maths: schedules and transition kernels, exact KL, trust-region losses, advantages, step selection,
ratio-noise analysis. Pure functions on tensors; no I/O, no models."""
