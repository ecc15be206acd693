"""Without a GPU, Triton kernels run through Triton's interpreter, which must be
switched on before any kernel is defined: set it here, before test modules import
dps_fast's Triton backend. (backend="auto" never picks the interpreter.)"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
