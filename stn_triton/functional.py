"""The public functions: validate, then dispatch to the fused ops or the reference.

Every check runs before any kernel; an error names the argument and what was expected. Its type is
:class:`ArgumentError` (a ``ValueError`` and a ``RuntimeError``: code written for PyTorch's
``grid_sample``, whose shape checks raise ``RuntimeError``, catches ours too) or
:class:`ArgumentTypeError` (also a ``TypeError``).
"""

import numbers
import warnings

import torch

from . import ops
from ._backend import backend

MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")
_MAX_BASIS_NUMEL = 2**31 - 1
_ALIGN_CORNERS_WARNING = (  # PyTorch's own, word for word, so that filters written for it match ours
    "Default grid_sample and affine_grid behavior has changed to align_corners=False since 1.3.0. Please specify "
    "align_corners=True if the old behavior is desired. See the documentation of grid_sample for details.")


class ArgumentError(ValueError, RuntimeError):
    """A bad argument to one of the public functions. Both ``except ValueError`` and ``except
    RuntimeError`` (what PyTorch's ``grid_sample`` raises for bad shapes) catch it."""


class ArgumentTypeError(TypeError, ArgumentError):
    """An argument of the wrong type (a ``TypeError``, ``ValueError`` and ``RuntimeError``)."""


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ArgumentTypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                                f"got dtype {t.dtype}")


def _check_input(x, name="x"):
    _check_tensor(name, x)
    if x.dim() != 4:
        raise ArgumentError(f"{name}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ArgumentError(f"{name}: expected non-empty height and width, got shape {tuple(x.shape)}")


def _check_options(mode, padding_mode, align_corners):
    """Returns align_corners as a bool (None means False, as in PyTorch)."""
    if mode not in MODES:
        raise ArgumentError(f"mode: expected one of {MODES}, got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ArgumentError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
    if align_corners is None:
        return False
    if not isinstance(align_corners, bool):
        raise ArgumentTypeError(f"align_corners: expected a bool or None, got {type(align_corners).__name__}")
    return align_corners


def _check_size(size, x):
    """size: None (the input's H, W), an int, or a pair of ints >= 0 -> [Ho, Wo]."""
    if size is None:
        return [int(x.shape[2]), int(x.shape[3])]
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size)):
        raise ArgumentError(f"size: expected the output size (Ho, Wo) as two ints, got {size!r}")
    if size[0] < 0 or size[1] < 0:
        raise ArgumentError(f"size: expected a non-negative output height and width, got {tuple(size)}")
    return [int(size[0]), int(size[1])]


def _check_params(name, t, x, tail, what):
    """t must be (N, *tail) or (N, K, *tail) on x's device; returns (t as (N, K, *tail), had_k)."""
    _check_tensor(name, t)
    if t.device != x.device:
        raise ArgumentError(f"{name}: expected a tensor on {x.device} (the device of x), got {t.device}")
    shape = tuple(t.shape)
    tail = tuple(tail)
    if t.dim() == len(tail) + 1 and shape[1:] == tail:
        t, had_k = t.unsqueeze(1), False
    elif t.dim() == len(tail) + 2 and shape[2:] == tail:
        had_k = True
    else:
        dims = ", ".join(str(d) for d in tail)
        raise ArgumentError(f"{name}: expected {what} of shape (N, {dims}) or (N, K, {dims}), got {shape}")
    if t.shape[0] != x.shape[0]:
        raise ArgumentError(f"{name}: batch size {t.shape[0]} does not match the batch size of x, {x.shape[0]}")
    return t, had_k


def _run(form, x, params, size, mode, padding_mode, align_corners, had_k):
    if backend(x) == "reference":  # plain autograd (any order of derivatives), the ops' autocast and layout
        out = ops.reference_forward(form, x, params, size, mode, padding_mode, align_corners)
    else:
        out = ops.OPS[form][0](x, *params, size, mode, padding_mode, align_corners)
    return out if had_k else out.squeeze(1)


def affine_sample(x, theta, size=None, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample ``x`` on the grid of the affine maps ``theta``, fused.

    Equals ``F.grid_sample(x, F.affine_grid(theta, (N, C, *size), align_corners), mode, padding_mode,
    align_corners)``. ``x``: (N, C, H, W); ``theta``: (N, 2, 3) -> output (N, C, Ho, Wo), or (N, K, 2, 3)
    for K parallel transforms -> (N, K, C, Ho, Wo). ``size`` = (Ho, Wo), default the input's (H, W).
    """
    _check_input(x)
    align_corners = _check_options(mode, padding_mode, align_corners)
    size = _check_size(size, x)
    theta, had_k = _check_params("theta", theta, x, (2, 3), "affine matrices")
    return _run("affine", x, (theta,), size, mode, padding_mode, align_corners, had_k)


def projective_sample(x, h, size=None, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample ``x`` through the homographies ``h`` ((N, 3, 3) or (N, K, 3, 3)), fused.

    The output pixel with base coordinate (x, y) (``affine_grid``'s) samples at
    ``(u / w, v / w)`` with ``[u, v, w] = h @ [x, y, 1]``.
    """
    _check_input(x)
    align_corners = _check_options(mode, padding_mode, align_corners)
    size = _check_size(size, x)
    h, had_k = _check_params("h", h, x, (3, 3), "homographies")
    return _run("projective", x, (h,), size, mode, padding_mode, align_corners, had_k)


def basis_sample(x, m, basis, size, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample ``x`` at ``m @ basis``: ``m`` (N, 2, D) or (N, K, 2, D), ``basis`` (D, Ho*Wo).

    Column p of ``basis`` describes output pixel p (row-major); the sampling coordinate of pixel p is
    ``m @ basis[:, p]`` (normalised, as ``grid_sample``'s grid). ``size`` = (Ho, Wo) is required.
    """
    _check_input(x)
    align_corners = _check_options(mode, padding_mode, align_corners)
    if size is None:
        raise ArgumentError("size: basis_sample needs the output size (Ho, Wo); basis has Ho*Wo columns")
    size = _check_size(size, x)
    _check_tensor("basis", basis)
    if basis.device != x.device:
        raise ArgumentError(f"basis: expected a tensor on {x.device} (the device of x), got {basis.device}")
    P = size[0] * size[1]
    if basis.dim() != 2 or basis.shape[1] != P:
        raise ArgumentError(f"basis: expected shape (D, Ho*Wo) = (D, {P}) for size {tuple(size)}, "
                            f"got {tuple(basis.shape)}")
    if basis.numel() > _MAX_BASIS_NUMEL:
        raise ArgumentError(f"basis: at most 2^31 - 1 elements are supported, got {basis.numel()}")
    m, had_k = _check_params("m", m, x, (2, basis.shape[0]), f"coefficient matrices for D={basis.shape[0]}")
    return _run("basis", x, (m, basis), size, mode, padding_mode, align_corners, had_k)


def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
    """Drop-in for ``F.grid_sample`` on 4-D input: ``grid`` (N, Ho, Wo, 2) -> (N, C, Ho, Wo).

    The same signature and semantics as PyTorch's (``align_corners=None`` means False, with PyTorch's
    warning); also takes ``grid`` (N, K, Ho, Wo, 2) for K grids over one input -> (N, K, C, Ho, Wo).
    The grid may have another floating dtype than the input (PyTorch requires the same).
    """
    if align_corners is None:
        warnings.warn(_ALIGN_CORNERS_WARNING, UserWarning, stacklevel=2)
    x = input
    _check_input(x, "input")
    align_corners = _check_options(mode, padding_mode, align_corners)
    _check_tensor("grid", grid)
    if grid.device != x.device:
        raise ArgumentError(f"grid: expected a tensor on {x.device} (the device of input), got {grid.device}")
    if grid.dim() not in (4, 5) or grid.shape[-1] != 2:
        raise ArgumentError(f"grid: expected shape (N, Ho, Wo, 2) or (N, K, Ho, Wo, 2), got {tuple(grid.shape)}")
    if grid.shape[0] != x.shape[0]:
        raise ArgumentError(f"grid: batch size {grid.shape[0]} does not match the batch size of input, {x.shape[0]}")
    had_k = grid.dim() == 5
    grid = grid if had_k else grid.unsqueeze(1)
    size = [int(grid.shape[2]), int(grid.shape[3])]
    return _run("grid", x, (grid,), size, mode, padding_mode, align_corners, had_k)
