"""Switches for speed experiments on a GPU, shared by bench_train.py and bench_inference.py
(nothing in training or inference uses them)."""
from __future__ import annotations

import contextlib

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def sdpa_backend(name: str):
    """Context that makes scaled_dot_product_attention use one backend (an experiment: which
    kernel suits SD2.1's head size 64 best on a GPU); "auto" leaves torch's choice."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))
