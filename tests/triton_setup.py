"""Imported first by every test that runs triton kernels. Triton decides between compiling
and interpreting when a kernel module is imported, so without a GPU TRITON_INTERPRET=1 must
be set before that. triton is a test dependency: a missing install fails these tests rather
than skipping them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402,F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
