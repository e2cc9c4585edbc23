"""Shared helpers: optional Triton import, backend dispatch, argument validation."""

import functools
import os

import torch

try:  # Triton is Linux-only; without it every public function uses its torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on platforms without Triton
    triton = None
    tl = None

FORCE_TRITON_ENV = "KVPRESS_FORCE_TRITON"

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
TRITON_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernel should run: CUDA tensors, or `KVPRESS_FORCE_TRITON=1` (interpreter tests)."""
    if triton is None:
        return False
    if tensor.is_cuda:
        return True
    return os.environ.get(FORCE_TRITON_ENV, "0") == "1"


def ensure_launchable(kernel, tensor: torch.Tensor) -> None:
    """Fail clearly when a CPU tensor is forced onto a kernel that was compiled for the GPU.

    Triton decides between compiling and interpreting when `@triton.jit` runs, i.e. when this package is first
    imported; setting TRITON_INTERPRET=1 after that has no effect.
    """
    if tensor.is_cuda:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"{FORCE_TRITON_ENV}=1 with CPU tensors needs TRITON_INTERPRET=1 set before kvpress_kernels is imported"
        )


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in under the CPU interpreter (keeps tests fast)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_tensor(t, name: str, ndim: int | None = None, dtypes=None, device: torch.device | None = None) -> None:
    """Raise ValueError naming `name` when `t` is not a tensor of the expected rank, dtype family or device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as the other inputs)")


def check_shape(t: torch.Tensor, name: str, shape: tuple) -> None:
    """Raise ValueError naming `name` unless `t.shape == shape` (None entries match anything)."""
    ok = t.dim() == len(shape) and all(e is None or s == e for s, e in zip(t.shape, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
