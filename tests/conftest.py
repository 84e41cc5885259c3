import os
import sys

import torch

# Tests import `model` and run the top-level scripts from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny test models are latency-bound: one thread is as fast as two, and it does not thrash when
# a test runs subprocesses (torchrun ranks) beside the pytest process on a 2-core machine.
torch.set_num_threads(1)
