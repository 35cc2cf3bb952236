"""The numerics run in float32 or float64 whatever the caller's autocast state (METHOD.md section 6).

The model's own forward and backward run as the user asked (autocast included); from the captured tensors
on (token pairs, block sums, Lanczos, eigh, directions), every product is taken in the compute dtype.
The one deliberate exception: the Lanczos products on CUDA may use TF32 tensor cores (inputs rounded to 10
mantissa bits, float32 accumulation, `cuda_matmul_precision(device, tf32=True)`), and the eigenvalues are then
re-measured with full float32 products; every other product is kept in full float32 even when the user turned
TF32 on globally.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
F = TypeVar("F", bound=Callable)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type this build does not know
        return False


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Autocast disabled on every device type where it is on (and nothing entered where it is off), and float32
    products on CUDA in full float32 even when TF32 is on globally."""
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICE_TYPES:
            if _autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        if torch.cuda.is_initialized():
            stack.enter_context(cuda_matmul_precision(torch.device("cuda"), tf32=False))
        yield


def full_precision(fn: F) -> F:
    """Runs `fn` under `autocast_off`: its matrix products and eigen-solves stay in their inputs' dtype."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def cuda_matmul_precision(device: torch.device, tf32: bool = False) -> Iterator[None]:
    """float32 matrix products on CUDA in TF32 (`tf32`) or in full float32 within the block, whatever the global
    setting (training scripts often turn TF32 on, which would cost Lanczos its orthogonality); restored after.
    Elsewhere (CPU) a no-op.

    Uses the newer `fp32_precision` setting where torch has it (mixing it with the legacy `allow_tf32` raises).
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        name, value = "fp32_precision", "tf32" if tf32 else "ieee"
    else:
        name, value = "allow_tf32", tf32
    try:
        previous = getattr(matmul, name)
        setattr(matmul, name, value)
    except RuntimeError:  # the user mixed the legacy and new TF32 settings: leave them as they are
        yield
        return
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def round_to_tf32(tensor: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32 (10 explicit mantissa bits, to nearest, ties away from zero): the inputs a
    TF32 tensor core multiplies. For measuring the effect of TF32 products on a machine without one."""
    if tensor.dtype != torch.float32:
        raise TypeError(f"TF32 rounding needs float32, got {tensor.dtype}")
    bits = tensor.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF  # add half of the dropped 13 bits, then drop them
    return torch.where(torch.isfinite(tensor), rounded.view(torch.float32), tensor)
