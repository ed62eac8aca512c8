"""Test-wide settings: the test models are tiny, where one intra-op thread beats several (and the
suite must run on 2 shared cores)."""

import torch

torch.set_num_threads(1)
