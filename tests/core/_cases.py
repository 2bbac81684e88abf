"""Random inputs for every kernel form, and the float64 oracle (PyTorch's affine_grid/grid_sample)."""

import torch
import torch.nn.functional as F

from stn_triton import reference

FORMS = ("affine", "projective", "basis", "grid")
MODES = ("bilinear", "nearest")
PADDINGS = ("zeros", "border", "reflection")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last", "strided")
# (rtol, atol) on values of order 1, per dtype of the input map
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def make_input(shape, dtype, layout, device, gen):
    N, C, H, W = shape
    if layout == "strided":  # a view with arbitrary strides: every other row, shifted columns
        big = torch.randn(N, C + 2, 2 * H, W + 3, generator=gen).to(device=device, dtype=dtype)
        x = big[:, 1:C + 1, ::2, 2:W + 2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_params(form, N, K, size, align_corners, dtype, device, gen, spread=1.0):
    """Parameters of a form, (N, K, ...), near the identity with random scale, shear and shift.

    ``spread`` scales the random part: 1 gives coordinates reaching a little outside the image.
    """
    Ho, Wo = size
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    theta = torch.eye(2, 3, dtype=torch.float64).expand(N, K, 2, 3) * 1.1 + spread * 0.35 * rnd(N, K, 2, 3)
    if form == "affine":
        return (theta.to(device=device, dtype=torch.float32),)
    if form == "projective":
        h = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(N, K, 1, 3)], dim=2)
        h[:, :, 2, :2] += 0.15 * rnd(N, K, 2)
        return (h.to(device=device, dtype=torch.float32),)
    base = reference.base_grid(size, align_corners, torch.float64, "cpu").T  # (3, P)
    if form == "basis":
        D = 5
        basis = torch.cat([base, 0.3 * rnd(D - 3, Ho * Wo)], dim=0)
        m = torch.cat([theta, 0.5 * rnd(N, K, 2, D - 3)], dim=3)
        return (m.to(device=device, dtype=torch.float32), basis.to(device=device, dtype=torch.float32))
    grid = torch.einsum("nkcj,jp->nkpc", theta, base).reshape(N, K, Ho, Wo, 2)
    return (grid.to(device=device, dtype=dtype),)


def run(form, x, params, size, **opts):
    """The public function of a form, on (N, K, ...) parameters."""
    import stn_triton as st

    if form == "affine":
        return st.affine_sample(x, params[0], size, **opts)
    if form == "projective":
        return st.projective_sample(x, params[0], size, **opts)
    if form == "basis":
        return st.basis_sample(x, params[0], params[1], size, **opts)
    return st.grid_sample(x, params[0], **opts)


def oracle(form, x, params, size, mode, padding_mode, align_corners):
    """float64 reference on CPU: PyTorch's affine_grid / grid_sample (non-finite coordinates
    following the CUDA kernel, see stn_triton.reference)."""
    x64 = x.detach().cpu().double().requires_grad_(x.requires_grad)
    p64 = [p.detach().cpu().double().requires_grad_(p.requires_grad) for p in params]
    out = reference.form_sample(form, x64, p64, size, mode, padding_mode, align_corners)
    return out, x64, p64


def affine_oracle(x, theta, size, mode, padding_mode, align_corners):
    """PyTorch itself, float64, for finite coordinates: the law."""
    N, K = theta.shape[:2]
    xs = x.double()[:, None].expand(N, K, *x.shape[1:]).reshape(N * K, *x.shape[1:])
    grid = F.affine_grid(theta.double().reshape(N * K, 2, 3), (N * K, x.shape[1], *size), align_corners=align_corners)
    out = F.grid_sample(xs, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return out.reshape(N, K, x.shape[1], *size)


def assert_close(actual, expected, dtype, name, scale_by_max=False, equal_nan=False, tol_scale=1.0):
    """Every element compared (NaN poisoning makes an unwritten one fail)."""
    rtol, atol = (t * tol_scale for t in TOL[dtype])
    expected = expected.detach().cpu().double()
    actual = actual.detach().cpu().double()
    if scale_by_max:  # sums over many pixels: tolerance relative to the largest entry
        atol = atol * max(1.0, expected[torch.isfinite(expected)].abs().max().item() if expected.numel() else 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{name}: {m}")
