import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels, if any are run, on the CPU

sys.path.insert(0, os.path.dirname(__file__))
