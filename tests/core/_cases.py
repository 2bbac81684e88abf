"""Random inputs for every kernel form, 2-D and 3-D (the form table, stn_triton.kernels.forms), the
float64 oracle (PyTorch's affine_grid/grid_sample), and the check of one case against it."""

import zlib

import torch
import torch.nn.functional as F

import stn_triton as st
from stn_triton import reference
from stn_triton.kernels import flow as flow_form
from stn_triton.kernels.forms import FORMS as TABLE

# the displacement-field forms (flow, flow3d) are the grid forms' kernels with the base grid added to
# the coordinate: tests/core/test_flow.py checks them in a matrix of their own, not in every one here
FORMS = tuple(name for name, f in TABLE.items() if f.ndim == 2 and not f.frame)  # affine, projective, basis, grid
FORMS3 = tuple(name for name, f in TABLE.items() if f.ndim == 3 and not f.frame)  # affine3d, basis3d, grid3d
MODES = ("bilinear", "nearest")
PADDINGS = ("zeros", "border", "reflection")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last", "strided")
LAYOUTS3 = ("contiguous", "channels_last_3d", "strided")
# (rtol, atol) on values of order 1, per dtype of the input map
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# the default geometry of check_case per number of spatial dimensions: (input shape, output size)
GEOMETRY = {2: ((2, 3, 7, 13), (5, 11)), 3: ((1, 3, 5, 6, 7), (4, 5, 6))}


def ndim(form):
    """The form's number of spatial dimensions (2 or 3), from the form table."""
    return TABLE[form].ndim


def gen_for(request, salt=""):
    """A generator seeded from the test id: fresh random inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32((request.node.nodeid + salt).encode()))


def make_input(shape, dtype, layout, device, gen):
    """A random input map (N, C, H, W) or (N, C, D, H, W): contiguous, channels_last(_3d) (either name
    for either rank) or strided (a view with arbitrary strides)."""
    if layout == "strided":
        if len(shape) == 4:  # every other row, shifted columns
            N, C, H, W = shape
            big = torch.randn(N, C + 2, 2 * H, W + 3, generator=gen).to(device=device, dtype=dtype)
            x = big[:, 1:C + 1, ::2, 2:W + 2]
        else:
            N, C, D, H, W = shape
            big = torch.randn(N, C + 1, D + 1, 2 * H, W + 2, generator=gen).to(device=device, dtype=dtype)
            x = big[:, 1:, 1:, ::2, 1:W + 1]
        last = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=last)
        return x
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if layout in ("channels_last", "channels_last_3d"):
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x


def make_params(form, N, K, size, align_corners, dtype, device, gen, spread=1.0):
    """Parameters of a form (2-D or 3-D), (N, K, ...), near the identity with random scale, shear and
    shift. ``spread`` scales the random part: 1 gives coordinates reaching a little outside the image.
    The grid forms' grid is in ``dtype``; every other parameter float32."""
    n = ndim(form)
    kind = TABLE[form].kind
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    scale = 0.35 if n == 2 else 0.3
    theta = torch.eye(n, n + 1, dtype=torch.float64).expand(N, K, n, n + 1) * 1.1 + spread * scale * rnd(N, K, n, n + 1)
    if kind == "affine":
        return (theta.to(device=device, dtype=torch.float32),)
    if kind == "projective":
        h = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(N, K, 1, 3)], dim=2)
        h[:, :, 2, :2] += 0.15 * rnd(N, K, 2)
        return (h.to(device=device, dtype=torch.float32),)
    base = reference.base_grid(size, align_corners, torch.float64, "cpu").T  # (n + 1, P)
    P = base.shape[1]
    if kind == "basis":
        D = n + 3  # 5 in 2-D, 6 in 3-D
        basis = torch.cat([base, 0.3 * rnd(D - n - 1, P)], dim=0)
        m = torch.cat([theta, (0.5 if n == 2 else 0.4) * rnd(N, K, n, D - n - 1)], dim=3)
        return (m.to(device=device, dtype=torch.float32), basis.to(device=device, dtype=torch.float32))
    if kind == "affine_flow":  # theta, and a displacement of up to a few pixels on top of its grid
        u = 0.15 * spread * rnd(N, K, *size, n)
        return theta.to(device=device, dtype=torch.float32), u.to(device=device, dtype=dtype)
    grid = torch.einsum("nkcj,jp->nkpc", theta, base).reshape(N, K, *size, n)
    if kind == "flow":  # the displacement from the identity grid to that one
        grid = grid - base[:n].T.reshape(*size, n)
    return (grid.to(device=device, dtype=dtype),)


def run(form, x, params, size, **opts):
    """The public function of a form (2-D or 3-D: the same function), on (N, K, ...) parameters."""
    kind = TABLE[form].kind
    if kind == "affine":
        return st.affine_sample(x, params[0], size, **opts)
    if kind == "projective":
        return st.projective_sample(x, params[0], size, **opts)
    if kind == "basis":
        return st.basis_sample(x, params[0], params[1], size, **opts)
    if kind == "flow":
        return st.flow_sample(x, params[0], layout="grid", units="normalized", **opts)
    if kind == "affine_flow":
        return st.flow_sample(x, params[1], params[0], layout="grid", units="normalized", **opts)
    return st.grid_sample(x, params[0], **opts)


def op_params(form, params):
    """The op's parameters from :func:`make_params`' (the public function's): the flow forms' fields
    come in normalised units and (x, y[, z]) order, the frame that says so appended."""
    if not TABLE[form].frame:
        return list(params)
    frame = torch.tensor(flow_form.frame(ndim(form)), dtype=torch.float64, device=params[0].device)
    return [*params, frame]


def oracle(form, x, params, size, mode, padding_mode, align_corners):
    """float64 reference on CPU: PyTorch's affine_grid / grid_sample (non-finite coordinates
    following the CUDA kernel, see stn_triton.reference; 5-D bicubic its tricubic)."""
    x64 = x.detach().cpu().double().requires_grad_(x.requires_grad)
    p64 = [p.detach().cpu().double().requires_grad_(p.requires_grad) for p in params]
    out = reference.form_sample(form, x64, op_params(form, p64), size, mode, padding_mode, align_corners)
    return out, x64, p64


# per dimension: (input shape, K, output size) of the non-finite cases
NONFINITE = {2: ((2, 3, 7, 8), 3, (5, 6)), 3: ((2, 3, 4, 5, 6), 2, (3, 4, 5))}


def nonfinite_params(form, device, huge=False):
    """Parameters of a form (NONFINITE's geometry) where some (n, k) contain NaN, +inf or -inf; with
    ``huge``, the grid forms also get finite coordinates far past int32 once unnormalised."""
    _, K, size = NONFINITE[ndim(form)]
    gen = torch.Generator().manual_seed(7)
    params = make_params(form, 2, K, size, False, torch.float32, device, gen)
    p0 = params[0].clone()
    if form == "grid":
        p0[0, 0, 1, 2, 0] = float("nan")
        p0[0, 1, 2, :, 1] = float("inf")
        p0[1, 0, :, 3, 0] = -float("inf")
        p0[1, 2, 4, 5, :] = float("nan")
        if huge:
            p0[1, 1, 0, :, 0] = 3e38
    elif form == "grid3d":
        p0[0, 0, 1, 2, 0, 0] = float("nan")
        p0[0, 1, 2, :, 1, 1] = float("inf")
        p0[1, 0, :, 3, 0, 2] = -float("inf")
        p0[1, 1, 0, 2, 4, :] = float("nan")
        if huge:
            p0[1, 1, 1, 1, 1] = torch.tensor([3e38, -1e9, 2e9])
    elif ndim(form) == 2:
        p0[0, 0, 0, 0] = float("nan")
        p0[0, 1, 1, 2] = float("inf")
        p0[1, 0, 0, 1] = -float("inf")
    else:
        p0[0, 0, 0, 0] = float("nan")
        p0[0, 1, 1, 3] = float("inf")
        p0[1, 0, 2, 1] = -float("inf")
    return (p0, *params[1:])


def _pytorch_has_tricubic():
    try:
        F.grid_sample(torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 3), mode="bicubic", align_corners=False)
    except RuntimeError:
        return False
    return True


PYTORCH_TRICUBIC = _pytorch_has_tricubic()  # this torch's grid_sample takes bicubic on 5-D input


def pytorch_has(form, mode):
    """Whether :func:`pytorch` can judge this form and mode: PyTorch builds the form's grid (not the
    projective one) and its grid_sample has the mode (tricubic only in newer torches)."""
    return TABLE[form].kind != "projective" and (mode != "bicubic" or ndim(form) == 2 or PYTORCH_TRICUBIC)


def pytorch(form, x, params, size, mode, padding_mode, align_corners):
    """PyTorch itself in float64, for finite coordinates: the law. F.affine_grid for the affine forms,
    the basis' product for the basis forms, the grid itself for the grid forms; then F.grid_sample."""
    n, kind = ndim(form), TABLE[form].kind
    N, K = params[0].shape[:2]
    xs = x.detach().cpu().double()[:, None].expand(N, K, *x.shape[1:]).reshape(N * K, *x.shape[1:])
    p = [t.detach().cpu().double() for t in params]
    if kind == "affine":
        grid = F.affine_grid(p[0].reshape(N * K, n, n + 1), (N * K, x.shape[1], *size), align_corners=align_corners)
    elif kind == "basis":
        grid = torch.einsum("nkcd,dp->nkpc", p[0], p[1]).reshape(N * K, *size, n)
    elif kind == "grid":
        grid = p[0].reshape(N * K, *size, n)
    elif kind == "flow":  # PyTorch's identity grid plus the field
        eye = torch.eye(n, n + 1, dtype=torch.float64)[None].expand(N * K, n, n + 1)
        grid = F.affine_grid(eye, (N * K, 1, *size), align_corners=align_corners) + p[0].reshape(N * K, *size, n)
    elif kind == "affine_flow":  # PyTorch's affine grid plus the field
        grid = (F.affine_grid(p[0].reshape(N * K, n, n + 1), (N * K, 1, *size), align_corners=align_corners)
                + p[1].reshape(N * K, *size, n))
    else:
        raise ValueError(f"PyTorch has no {form} grid")
    out = F.grid_sample(xs, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return out.reshape(N, K, x.shape[1], *size)


def affine_oracle(x, theta, size, mode, padding_mode, align_corners):
    """PyTorch itself, float64, for finite coordinates, on (N, K, 2, 3) or (N, K, 3, 4) theta."""
    return pytorch("affine" if theta.shape[-1] == 3 else "affine3d", x, (theta,), size, mode, padding_mode,
                   align_corners)


def assert_close(actual, expected, dtype, name, scale_by_max=False, equal_nan=False, tol_scale=1.0):
    """Every element compared (NaN poisoning makes an unwritten one fail)."""
    rtol, atol = (t * tol_scale for t in TOL[dtype])
    expected = expected.detach().cpu().double()
    actual = actual.detach().cpu().double()
    if scale_by_max:  # sums over many pixels: tolerance relative to the largest entry
        atol = atol * max(1.0, expected[torch.isfinite(expected)].abs().max().item() if expected.numel() else 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{name}: {m}")


def check_case(request, device, form, mode, padding_mode, align_corners, dtype, layout,
               shape=None, K=2, size=None, spread=1.0, grads=True, tol_scale=1.0, salt=""):
    """One case of any form, 2-D or 3-D: random input and parameters (seeded by the test id), then
    :func:`check_given`. ``shape`` and ``size`` default to GEOMETRY's for the form's dimension."""
    shape = GEOMETRY[ndim(form)][0] if shape is None else shape
    size = GEOMETRY[ndim(form)][1] if size is None else size
    assert len(shape) == ndim(form) + 2 and len(size) == ndim(form), (form, shape, size)
    gen = gen_for(request, salt)
    x = make_input(shape, dtype, layout, device, gen)
    params = make_params(form, shape[0], K, size, align_corners, dtype, device, gen, spread)
    return check_given(form, x, params, size, mode, padding_mode, align_corners, gen, grads, tol_scale)


def check_given(form, x, params, size, mode, padding_mode, align_corners, gen, grads=True, tol_scale=1.0):
    """The kernels on (x, params) against the float64 oracle and F.grid_sample (where PyTorch has the
    form's grid and the mode, see :func:`pytorch_has`), forward and, with ``grads``, every gradient."""
    dtype, device = x.dtype, x.device
    K = params[0].shape[1]
    assert st.backend(x) != "reference", "the kernels must be under test, not the reference"
    x.requires_grad_(grads)
    for p in params:
        p.requires_grad_(grads)
    opts = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    out = run(form, x, params, size, **opts)
    ref, x64, p64 = oracle(form, x, params, size, **opts)
    assert out.dtype == dtype and out.shape == ref.shape == (x.shape[0], K, x.shape[1], *size)
    assert_close(out, ref, dtype, "output", tol_scale=tol_scale)
    if pytorch_has(form, mode):  # and against PyTorch itself, not only our reference
        assert_close(out, pytorch(form, x, params, size, **opts), dtype, "output vs F.grid_sample",
                     tol_scale=tol_scale)
    if not grads:
        return out
    grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, (x, *params), grad_out)
    want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert got[0].dtype == dtype and got[0].stride() == torch.empty_like(x).stride()
    assert_close(got[0], want[0], dtype, "grad x", tol_scale=tol_scale)
    for name, g, w, p in zip(("grad params[0]", "grad params[1]"), got[1:], want[1:], params):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert_close(g, w, dtype, name, scale_by_max=True, tol_scale=tol_scale)
    return out


def check_double_backward(form, x, params, size, mode, padding_mode, align_corners, gen):
    """Second derivatives through the kernels' first order (the op's double backward), against the
    float64 oracle's: with respect to the incoming gradient (a variable too), the input and the
    parameters, weighted by random second-order gradients (a weight dropped, or taken as ones, shows)."""
    out = run(form, x, params, size, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    w = torch.randn(out.shape, generator=gen).to(x.device).requires_grad_()
    first = torch.autograd.grad(out, (x, *params), w, create_graph=True)
    ref, x64, p64 = oracle(form, x, params, size, mode, padding_mode, align_corners)
    w64 = w.detach().double().requires_grad_()
    first64 = torch.autograd.grad(ref, (x64, *p64), w64, create_graph=True)
    for a, b in zip(first, first64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
    v = [torch.randn(t.shape, generator=gen).to(x.device) for t in first]
    second = torch.autograd.grad(first, (w, x, *params), v, allow_unused=True)
    second64 = torch.autograd.grad(first64, (w64, x64, *p64), [t.double() for t in v], allow_unused=True)
    assert_second(second, second64)


def assert_second(ours, want):
    """Second derivatives, float32 against float64; None (no dependence) equals zeros."""
    for a, b in zip(ours, want):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a.double()
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1.0, b.abs().max().item()))
