"""The public functions: validate, then dispatch to the fused ops or the reference.

Every check runs before any kernel; an error names the argument and what was expected. Its type is
:class:`ArgumentError` (a ``ValueError`` and a ``RuntimeError``: code written for PyTorch's
``grid_sample``, whose shape checks raise ``RuntimeError``, catches ours too) or
:class:`ArgumentTypeError` (also a ``TypeError``).
"""

import numbers
import warnings

import torch
import triton

from . import ops
from .kernels import forms
from .kernels.flow import frame as _frame
from ._backend import backend

MODES = ("bilinear", "nearest", "bicubic")  # on 5-D input: trilinear, nearest, tricubic
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


def _check_input(x, name="x", no_3d=None):
    """x must be a 4-D float tensor (N, C, H, W) with non-empty H, W. ``no_3d``: the function's name,
    when a 5-D input deserves to hear that the function has no 3-D form."""
    _check_tensor(name, x)
    if x.dim() != 4:
        why = f" ({no_3d} has no 3-D form)" if no_3d and x.dim() == 5 else ""
        raise ArgumentError(f"{name}: expected a 4-D input (N, C, H, W){why}, got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ArgumentError(f"{name}: expected non-empty height and width, got shape {tuple(x.shape)}")


def _check_input_nd(x, name="x"):
    """x must be a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) float tensor with non-empty spatial
    dimensions. Returns the number of spatial dimensions: 2 or 3."""
    _check_tensor(name, x)
    if x.dim() == 4:
        _check_input(x, name)
        return 2
    if x.dim() != 5:
        raise ArgumentError(f"{name}: expected a 4-D input (N, C, H, W) or a 5-D input (N, C, D, H, W), "
                            f"got shape {tuple(x.shape)}")
    if min(x.shape[2:]) < 1:
        raise ArgumentError(f"{name}: expected non-empty depth, height and width, got shape {tuple(x.shape)}")
    return 3


def _check_options_nd(nd, mode, padding_mode, align_corners, name="x"):
    """:func:`_check_options` for an input of ``nd`` spatial dimensions. Every mode serves both: on
    5-D input ``"bilinear"`` is trilinear and ``"bicubic"`` tricubic (64 taps, PyTorch's cubic
    convolution on each axis)."""
    return _check_options(mode, padding_mode, align_corners)


def _check_options(mode, padding_mode, align_corners):
    """Returns align_corners as a bool (None means False, as in PyTorch).

    Accepts every mode of :data:`MODES`, for 4-D and 5-D input alike."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ArgumentError(f"mode: expected one of {MODES}, got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ArgumentError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
    if align_corners is None:
        return False
    if not isinstance(align_corners, bool):
        raise ArgumentTypeError(f"align_corners: expected a bool or None, got {type(align_corners).__name__}")
    return align_corners


def _check_size(size, x):
    """size: None (the input's spatial size), an int, or one int >= 0 per spatial dimension of x
    (Ho, Wo for a 4-D input; Do, Ho, Wo for a 5-D one) -> a list of ints."""
    nd = x.dim() - 2
    if size is None:
        return [int(s) for s in x.shape[2:]]
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size,) * nd
    names = "(Ho, Wo) as two ints" if nd == 2 else "(Do, Ho, Wo) as three ints for a 5-D input"
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != nd
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size)):
        raise ArgumentError(f"size: expected the output size {names}, got {size!r}")
    if any(s < 0 for s in size):
        what = "height and width" if nd == 2 else "depth, height and width"
        raise ArgumentError(f"size: expected a non-negative output {what}, got {tuple(size)}")
    return [int(s) for s in size]


def _check_params(name, t, x, tail, what, other=None):
    """t must be (N, *tail) or (N, K, *tail) on x's device; returns (t as (N, K, *tail), had_k).
    ``other``: (the other dimensionality's tail, a hint) to add when t has that shape instead."""
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
        hint = ""
        if other is not None and t.dim() >= len(other[0]) + 1 and shape[-len(other[0]):] == tuple(other[0]):
            hint = f"; {other[1]}"
        raise ArgumentError(f"{name}: expected {what} of shape (N, {dims}) or (N, K, {dims}), got {shape}{hint}")
    if t.shape[0] != x.shape[0]:
        raise ArgumentError(f"{name}: batch size {t.shape[0]} does not match the batch size of x, {x.shape[0]}")
    return t, had_k


_FOR_5D = "that shape is for a 5-D input (N, C, D, H, W)"
_FOR_4D = "that shape is for a 4-D input (N, C, H, W)"
# per spatial dimensions of x: (what the expected shape is for, the hint when the other one's is given)
_INPUT = {2: ("", _FOR_5D), 3: (" for a 5-D input", _FOR_4D)}


def _run(form, x, params, size, mode, padding_mode, align_corners, had_k):
    if backend(x) == "reference":  # plain autograd (any order of derivatives), the ops' autocast and layout
        out = ops.reference_forward(form, x, params, size, mode, padding_mode, align_corners)
    else:
        out = ops.ops_for(form)[0](x, *params, size, mode, padding_mode, align_corners)
    return out if had_k else out.squeeze(1)


def affine_sample(x, theta, size=None, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample ``x`` on the grid of the affine maps ``theta``, fused.

    Equals ``F.grid_sample(x, F.affine_grid(theta, (N, C, *size), align_corners), mode, padding_mode,
    align_corners)``. ``x``: (N, C, H, W); ``theta``: (N, 2, 3) -> output (N, C, Ho, Wo), or (N, K, 2, 3)
    for K parallel transforms -> (N, K, C, Ho, Wo). ``size`` = (Ho, Wo), default the input's (H, W).

    Volumetric: ``x`` (N, C, D, H, W), ``theta`` (N, 3, 4) or (N, K, 3, 4), ``size`` = (Do, Ho, Wo)
    -> (N, C, Do, Ho, Wo) or (N, K, C, Do, Ho, Wo); ``mode="bilinear"`` is trilinear, as in PyTorch.
    """
    nd = _check_input_nd(x)
    align_corners = _check_options_nd(nd, mode, padding_mode, align_corners)
    size = _check_size(size, x)
    f, other = forms.find("affine", nd), forms.find("affine", 5 - nd)
    theta, had_k = _check_params("theta", theta, x, (f.rows, f.cols), "affine matrices" + _INPUT[nd][0],
                                 ((other.rows, other.cols), _INPUT[nd][1]))
    return _run(f.name, x, (theta,), size, mode, padding_mode, align_corners, had_k)


def projective_sample(x, h, size=None, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample ``x`` through the homographies ``h`` ((N, 3, 3) or (N, K, 3, 3)), fused.

    The output pixel with base coordinate (x, y) (``affine_grid``'s) samples at
    ``(u / w, v / w)`` with ``[u, v, w] = h @ [x, y, 1]``.
    """
    _check_input(x, no_3d="projective_sample")
    align_corners = _check_options(mode, padding_mode, align_corners)
    size = _check_size(size, x)
    h, had_k = _check_params("h", h, x, (3, 3), "homographies")
    return _run("projective", x, (h,), size, mode, padding_mode, align_corners, had_k)


def basis_sample(x, m, basis, size, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample ``x`` at ``m @ basis``: ``m`` (N, 2, D) or (N, K, 2, D), ``basis`` (D, Ho*Wo).

    Column p of ``basis`` describes output pixel p (row-major); the sampling coordinate of pixel p is
    ``m @ basis[:, p]`` (normalised, as ``grid_sample``'s grid). ``size`` = (Ho, Wo) is required.

    Volumetric: ``x`` (N, C, D, H, W), ``m`` (N, 3, Dm) or (N, K, 3, Dm), ``basis`` (Dm, Do*Ho*Wo)
    (voxels row-major: depth, row, column), ``size`` = (Do, Ho, Wo); coordinates (x, y, z).
    """
    nd = _check_input_nd(x)
    align_corners = _check_options_nd(nd, mode, padding_mode, align_corners)
    sizes = "(Ho, Wo); basis has Ho*Wo columns" if nd == 2 else "(Do, Ho, Wo); basis has Do*Ho*Wo columns"
    if size is None:
        raise ArgumentError(f"size: basis_sample needs the output size {sizes}")
    size = _check_size(size, x)
    _check_tensor("basis", basis)
    if basis.device != x.device:
        raise ArgumentError(f"basis: expected a tensor on {x.device} (the device of x), got {basis.device}")
    P = 1
    for s in size:
        P *= s
    cols = "Ho*Wo" if nd == 2 else "Do*Ho*Wo"
    if basis.dim() != 2 or basis.shape[1] != P:
        raise ArgumentError(f"basis: expected shape (D, {cols}) = (D, {P}) for size {tuple(size)}, "
                            f"got {tuple(basis.shape)}")
    if basis.numel() > _MAX_BASIS_NUMEL:
        raise ArgumentError(f"basis: at most 2^31 - 1 elements are supported, got {basis.numel()}")
    D = basis.shape[0]
    f, other = forms.find("basis", nd), forms.find("basis", 5 - nd)
    m, had_k = _check_params("m", m, x, (f.rows, D), f"coefficient matrices for D={D}" + _INPUT[nd][0].replace(
        " for", " and"), ((other.rows, D), _INPUT[nd][1]))
    return _run(f.name, x, (m, basis), size, mode, padding_mode, align_corners, had_k)


def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
    """Drop-in for ``F.grid_sample``: ``grid`` (N, Ho, Wo, 2) -> (N, C, Ho, Wo) on 4-D input,
    ``grid`` (N, Do, Ho, Wo, 3) -> (N, C, Do, Ho, Wo) on 5-D input (coordinates (x, y, z);
    ``mode="bilinear"`` is trilinear).

    The same signature and semantics as PyTorch's (``align_corners=None`` means False, with PyTorch's
    warning); also takes ``grid`` (N, K, Ho, Wo, 2) (5-D input: (N, K, Do, Ho, Wo, 3)) for K grids over
    one input -> (N, K, C, Ho, Wo) (or (N, K, C, Do, Ho, Wo)). The grid may have another floating dtype
    than the input (PyTorch requires the same).
    """
    if align_corners is None:
        warnings.warn(_ALIGN_CORNERS_WARNING, UserWarning, stacklevel=2)
    x = input
    nd = _check_input_nd(x, "input")
    align_corners = _check_options_nd(nd, mode, padding_mode, align_corners, "input")
    _check_tensor("grid", grid)
    if grid.device != x.device:
        raise ArgumentError(f"grid: expected a tensor on {x.device} (the device of input), got {grid.device}")
    if nd == 2:
        expected = "(N, Ho, Wo, 2) or (N, K, Ho, Wo, 2)"
        hint = f"; {_FOR_5D}" if grid.dim() in (5, 6) and grid.shape[-1] == 3 else ""
    else:
        expected = "(N, Do, Ho, Wo, 3) or (N, K, Do, Ho, Wo, 3) for a 5-D input"
        hint = f"; {_FOR_4D}" if grid.dim() in (4, 5) and grid.shape[-1] == 2 else ""
    if grid.dim() not in (nd + 2, nd + 3) or grid.shape[-1] != nd:
        raise ArgumentError(f"grid: expected shape {expected}, got {tuple(grid.shape)}{hint}")
    if grid.shape[0] != x.shape[0]:
        raise ArgumentError(f"grid: batch size {grid.shape[0]} does not match the batch size of input, {x.shape[0]}")
    had_k = grid.dim() == nd + 3
    grid = grid if had_k else grid.unsqueeze(1)
    size = [int(s) for s in grid.shape[2:2 + nd]]
    return _run(forms.find("grid", nd).name, x, (grid,), size, mode, padding_mode, align_corners, had_k)


FLOW_LAYOUTS = ("channels_first", "grid")
FLOW_UNITS = ("pixels", "normalized")


def flow_sample(input, flow, theta=None, mode="bilinear", padding_mode="zeros", align_corners=False,
                layout="channels_first", units="pixels"):
    """Warp ``input`` by a dense displacement field: output pixel p samples the input at p + u(p), the
    warp of image registration (VoxelMorph's and MONAI's layers; PyTorch's ``base grid + u`` then
    ``grid_sample``), fused: the field is read at each output pixel, no sampling grid is made.

    ``flow``: one vector per output pixel, its spatial size the output's; K fields per input give
    (N, K, C, ...).

    - ``theta`` (optional): affine maps applied first, ``A x + u(x)`` (an affine pre-alignment and a
      deformation in one warp): (N, 2, 3) / (N, 3, 4) or with K, in ``affine_grid``'s normalised
      coordinates; its gradient flows too. K fields and K maps must agree, or either may come without K
      (shared by the other's K).
    - ``layout="channels_first"``: (N, [K,] 2, Ho, Wo) on 4-D input, (N, [K,] 3, Do, Ho, Wo) on 5-D, as a
      convolution outputs it; ``layout="grid"``: (N, [K,] Ho, Wo, 2) / (N, [K,] Do, Ho, Wo, 3), as
      ``grid_sample``'s grid.
    - ``units="pixels"``: displacements in input pixels, in index order ((dy, dx); 3-D (dz, dy, dx)):
      VoxelMorph's and MONAI's convention (with ``align_corners=True``, theirs, the results are
      theirs); ``units="normalized"``: ``grid_sample``'s units and (x, y[, z]) order.

    Every layout and unit is read in place, whatever its strides (nothing converted, nothing copied):
    the kernels scale each component as they read it. Gradients flow to ``input``, to ``flow`` (per
    pixel, returned in the field's own layout and dtype) and to ``theta``, forward and backward fused;
    every mode (``"bicubic"`` on 5-D input is tricubic), padding and ``align_corners``; a deterministic
    backward under ``torch.use_deterministic_algorithms(True)``.
    """
    x = input
    nd = _check_input_nd(x, "input")
    align_corners = _check_options_nd(nd, mode, padding_mode, align_corners, "input")
    if layout not in FLOW_LAYOUTS:
        raise ArgumentError(f"layout: expected one of {FLOW_LAYOUTS}, got {layout!r}")
    if units not in FLOW_UNITS:
        raise ArgumentError(f"units: expected one of {FLOW_UNITS}, got {units!r}")
    _check_tensor("flow", flow)
    if flow.device != x.device:
        raise ArgumentError(f"flow: expected a tensor on {x.device} (the device of input), got {flow.device}")
    sp = "Ho, Wo" if nd == 2 else "Do, Ho, Wo"
    rank_ok = flow.dim() in (nd + 2, nd + 3)
    first_ok, grid_ok = rank_ok and flow.shape[-nd - 1] == nd, rank_ok and flow.shape[-1] == nd
    if layout == "channels_first":
        expected, ok = f"(N, {nd}, {sp}) or (N, K, {nd}, {sp})", first_ok
        hint = "; that is the grid layout: pass layout='grid'" if grid_ok and not ok else ""
    else:
        expected, ok = f"(N, {sp}, {nd}) or (N, K, {sp}, {nd})", grid_ok
        hint = "; that is the channels-first layout: pass layout='channels_first'" if first_ok and not ok else ""
    had_k = flow.dim() == nd + 3
    if not ok:
        what = "a 5-D input" if nd == 3 else "a 4-D input"
        raise ArgumentError(f"flow: expected shape {expected} for {what} with layout={layout!r}, got "
                            f"{tuple(flow.shape)}{hint}")
    if flow.shape[0] != x.shape[0]:
        raise ArgumentError(f"flow: batch size {flow.shape[0]} does not match the batch size of input, {x.shape[0]}")
    u = flow if had_k else flow.unsqueeze(1)
    if layout == "channels_first":
        u = u.movedim(2, -1)  # a view: (N, K, *size, nd), components strided apart
    if units == "pixels":
        sizes = x.shape[2:]  # index order: (H, W) or (D, H, W)
        if align_corners and min(sizes) == 1:
            raise ArgumentError(f"units: with align_corners=True an input axis of size 1 has no pixel scale "
                                f"(input shape {tuple(x.shape)}); pass units='normalized'")
        scale = [2.0 / (s - 1) if align_corners else 2.0 / s for s in sizes][::-1]  # (x, y[, z]) order
        frm = _frame(nd, scale, index_order=True)
    else:
        frm = _frame(nd)
    frm = ops.constant(frm, x.device)
    size = [int(s) for s in u.shape[2:2 + nd]]
    if theta is None:
        return _run(forms.find("flow", nd).name, x, (u, frm), size, mode, padding_mode, align_corners, had_k)
    f = forms.find("affine_flow", nd)
    other = forms.find("affine", 5 - nd)
    theta, theta_k = _check_params("theta", theta, x, (f.rows, f.cols), "affine matrices" + _INPUT[nd][0],
                                   ((other.rows, other.cols), _INPUT[nd][1]))
    K = max(theta.shape[1], u.shape[1])
    if theta_k and had_k and theta.shape[1] != u.shape[1]:
        raise ArgumentError(f"theta: {theta.shape[1]} affine maps per input do not match the {u.shape[1]} fields of "
                            "flow (give as many, or give either without K)")
    theta = theta.expand(theta.shape[0], K, *theta.shape[2:])
    u = u.expand(u.shape[0], K, *u.shape[2:])  # a shared field is read in place (a zero stride)
    return _run(f.name, x, (theta, u, frm), size, mode, padding_mode, align_corners, had_k or theta_k)


def _jit_types():
    """What ``@triton.jit`` makes: a JITFunction, or in Triton's interpreter an InterpretedFunction."""
    types = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        types.append(InterpretedFunction)
    except ImportError:
        pass
    return tuple(types)


_JIT_TYPES = _jit_types()


def prepare_family(family):
    """Check a plugin family's Triton functions and make its form and ops (once per class): the form's
    row. Done before tracing (``SpatialTransformer`` does it when built): ``torch.compile`` traces the
    use of an op, not its definition."""
    label = f"family {family.name!r}" if getattr(family, "name", "") else f"family {type(family).__qualname__}"
    for attr, required in (("triton_coords", True), ("triton_grad", False)):
        fn = getattr(type(family), attr, None)
        if (fn is not None or required) and not isinstance(fn, _JIT_TYPES):
            raise ArgumentTypeError(f"transform: {label}: {attr} must be a @triton.jit function, got "
                                    f"{type(fn).__name__}")
    f = forms.plugin_form(family)
    ops.ops_for(f.name)
    return f, label


def family_sample(x, theta, family, size=None, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample ``x`` through a plugin family's own Triton map, fused (:mod:`stn_triton.kernels.plugin`):
    ``theta`` (N, num_params) -> (N, C, *size), or (N, K, num_params) -> (N, K, C, *size). Equals
    ``grid_sample`` on ``family.grid(theta)``; the forward never makes that grid. ``family``: an instance
    whose class defines ``triton_coords`` (and optionally ``triton_grad``)."""
    nd = _check_input_nd(x)
    align_corners = _check_options_nd(nd, mode, padding_mode, align_corners)
    size = _check_size(size, x)
    f, label = prepare_family(family)
    if f.ndim != nd:
        raise ArgumentError(f"transform: {label} is {f.ndim}-D and takes a {f.ndim + 2}-D x, got x of shape "
                            f"{tuple(x.shape)}")
    theta, had_k = _check_params("theta", theta, x, (family.num_params,), f"parameters of {label}")
    if backend(x) != "reference" and not torch.compiler.is_compiling():
        ops.check_family_counts(f.name, x.device)
    return _run(f.name, x, (theta,), size, mode, padding_mode, align_corners, had_k)
