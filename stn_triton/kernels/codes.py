"""The kernels' compile-time codes, named once: sampling modes and padding modes.

Host code (launchers, ops, the static report) takes a code from the dicts by PyTorch's string name;
kernel code compares a ``MODE`` or ``PAD`` constexpr with the ``tl.constexpr`` twins below, never with
a bare number. Forms have no code: a form is its own coordinate map, passed to the kernels as a
compile-time function (:mod:`stn_triton.kernels.forms`).
"""

import triton.language as tl

# padding: what a coordinate outside the image reads
PAD_ZEROS = tl.constexpr(0)
PAD_BORDER = tl.constexpr(1)
PAD_REFLECTION = tl.constexpr(2)
PADDING_CODES = {"zeros": 0, "border": 1, "reflection": 2}

# sampling: how many taps per axis, and their weights (linear: 2, nearest: 1, cubic: 4)
MODE_LINEAR = tl.constexpr(0)  # PyTorch's "bilinear" (trilinear on 5-D input)
MODE_NEAREST = tl.constexpr(1)
MODE_CUBIC = tl.constexpr(2)  # PyTorch's "bicubic" (tricubic on 5-D input)
MODE_CODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
TAPS_PER_AXIS = {"bilinear": 2, "nearest": 1, "bicubic": 4}


def taps(mode, ndim):
    """Contributions (taps) per output pixel: 4 / 8 bilinear, 1 nearest, 16 / 64 bicubic."""
    return TAPS_PER_AXIS[mode] ** ndim


def log2_taps(mode, ndim):
    return (taps(mode, ndim)).bit_length() - 1
