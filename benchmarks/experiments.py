"""Switches for speed experiments on a GPU, shared by bench_train.py and bench_inference.py
(nothing in training or inference uses them)."""
from __future__ import annotations

import contextlib

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


@contextlib.contextmanager
def sdpa_backend(name: str):
    """Context in which the attention of ControlNet and UNet (ldm.modules.attention.CrossAttention,
    SD2.1's heads of 64 channels) runs on one scaled_dot_product_attention backend (an experiment:
    which kernel suits them best on a GPU); a backend that cannot run their shapes fails. "auto"
    leaves torch's choice.

    Only there: the text encoder (float32, with a causal mask) and the VAE's attention (one head
    of 512 channels for SD2.1) keep torch's choice, since neither flash nor cuDNN attention can
    run them on a GPU - forcing every SDPA call failed in those, not in what is measured.
    CrossAttention.forward is wrapped for the duration, so captured CUDA graphs and the recompute
    of gradient checkpointing run the same backend."""
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm.modules.attention import CrossAttention

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])
    forward = CrossAttention.forward

    def forced(self, *args, **kwargs):
        with sdpa_kernel(backend):
            return forward(self, *args, **kwargs)

    CrossAttention.forward = forced
    try:
        yield
    finally:
        CrossAttention.forward = forward
