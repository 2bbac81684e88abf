"""bfloat16 ``atomic_add`` for Triton's interpreter, which has none ("Unsupported data type").

Compiled for sm_90 the same ``tl.atomic_add`` is a 16-byte vector reduction (``REDG.E.ADD.BF16x8``,
see ``stn-bench --static``): each element becomes ``round_to_nearest_even(old + value)``. This emulates
exactly that, element by element in lane order, so that the interpreter runs the kernels' own bfloat16
accumulation path instead of the float32 fallback the launcher would otherwise pick. Test-only: the
library never installs it (:func:`stn_triton.kernels.launch.half_accumulation` probes the interpreter).
"""

import ctypes

import numpy as np
import triton.language as tl


def _bf16_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def _f32_to_bf16(values):
    """Round float32 to the nearest bfloat16 (ties to even), NaN kept a NaN."""
    u = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def install():
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_stn_bf16_atomics", False):
        return
    original = builder.create_atomic_rmw

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        if rmwOp != ir.ATOMIC_OP.FADD or val.dtype.scalar != tl.bfloat16:
            return original(self, rmwOp, ptr, val, mask, sem, scope)
        addrs = np.broadcast_to(ptr.data, val.data.shape).ravel()
        live = np.broadcast_to(mask.data, val.data.shape).ravel()
        add = val.data.ravel()
        old = np.zeros(add.shape, dtype=np.uint16)
        for n in np.flatnonzero(live):
            cell = ctypes.c_uint16.from_address(int(addrs[n]))
            old[n] = cell.value
            cell.value = int(_f32_to_bf16(_bf16_to_f32(old[n]) + _bf16_to_f32(add[n])))
        return interpreter.TensorHandle(old.reshape(val.data.shape), val.dtype.scalar)

    builder.create_atomic_rmw = create_atomic_rmw
    builder._stn_bf16_atomics = True
