"""Which chunk tensors host-only kernels (numpy, numba) may read in place: CPU tensors that are
not the engine's device twin (engine/device.py); every other tensor takes the torch path."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["on_host", "kernel_view", "host_copy", "same_device", "div_scalar_", "TWIN_FLAG"]

#: Class attribute that marks a tensor type as "device memory" although it lives on the CPU
#: (the engine's CPU twin of the device path, used by tests to run that path here).
TWIN_FLAG = "moemerge_device_twin"


def on_host(t: torch.Tensor) -> bool:
    """Whether numpy/numba may read `t` in place (a plain CPU tensor)."""
    return t.device.type == "cpu" and not getattr(t, TWIN_FLAG, False)


def kernel_view(t: torch.Tensor) -> np.ndarray:
    """The elements of host tensor `t` as the numba kernels take them, in place: bf16 as its
    uint16 bits (numba has no bfloat16), any other dtype as numpy has it."""
    import numpy
    import torch

    if t.dtype == torch.bfloat16:
        bits: np.ndarray = t.view(torch.int16).numpy().view(numpy.uint16)
        return bits
    values: np.ndarray = t.numpy()
    return values


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when on the host, else a plain CPU copy of it (same values, same bits)."""
    return t if on_host(t) else t.detach().cpu()


def same_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` (a small host tensor: coefficients computed on the host) where `like` lives; the
    values are copied unchanged, so the math that uses them is the same on every device."""
    if on_host(like):
        return t
    return like.new_empty(t.shape, dtype=t.dtype).copy_(t)


def div_scalar_(x: torch.Tensor, s: float) -> torch.Tensor:
    """`x.div_(s)`, correctly rounded on every device: CUDA divides by a host scalar as a
    multiply by its reciprocal (up to 1 ulp off); a 0-d tensor on x's device divides."""
    if on_host(x):
        return x.div_(s)
    return x.div_(x.new_full((), s))
