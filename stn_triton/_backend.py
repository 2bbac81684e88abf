"""Which path a tensor takes: compiled Triton kernels, Triton's interpreter, or the reference."""

import os

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORCE_REFERENCE_ENV = "STN_TRITON_FORCE_REFERENCE"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def backend(x):
    """The path ``x`` would take: ``"triton"`` (compiled kernels, CUDA), ``"interpreter"`` (the same
    Triton kernels in Triton's CPU interpreter, when ``TRITON_INTERPRET=1``), or ``"reference"``
    (pure PyTorch: CPU tensors, float64 tensors, or any tensor when ``STN_TRITON_FORCE_REFERENCE=1``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"backend: expected a tensor, got {type(x).__name__}")
    if _env_flag(FORCE_REFERENCE_ENV) or x.dtype not in KERNEL_DTYPES:
        return "reference"
    if x.device.type == "cuda":
        return "interpreter" if _env_flag("TRITON_INTERPRET") else "triton"
    if x.device.type == "cpu" and _env_flag("TRITON_INTERPRET"):
        return "interpreter"
    return "reference"
