"""Tools around the loop: pretraining the shapes model, sampling, benchmarks, gradient-signal measurement."""
