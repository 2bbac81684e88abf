"""Providers: the implementations a benchmark row times, all computing the same kind of transform.

Every provider belongs to a transform *family* (affine, projective, basis, flow), which fixes the
parameters the run draws for it (:func:`draw_params`) and the minimum bytes of a row. A provider then

- ``prepare(params, x, case)``: turns the family's float32 parameters into the leaf tensors it
  differentiates (outside any timing: e.g. kornia's pixel matrices, eager's theta in the input's
  dtype), and
- ``build(case, dtype, device)``: returns ``apply(x, leaves) -> output`` for that case (once per
  case and dtype, so ``torch.compile`` compiles once for all modes).

Outputs are (N, C, Ho, Wo) for K = 1 and (N, K, C, Ho, Wo) otherwise, as ``st.affine_sample`` gives.
Every provider samples with the case's interpolation (``case.sampling``, ``F.grid_sample``'s mode);
``samplings`` lists those it has.

Volumetric cases (``case.is_3d``: input (N, C, D, H, W), output (N[, K], C, Do, Ho, Wo), trilinear):
the affine family draws theta (N[, K], 3, 4) and every affine provider has a 3-D form (eager's and
``torch.compile``'s 5-D ``F.affine_grid`` + ``F.grid_sample``, ours fused and on an explicit grid,
kornia's ``warp_affine3d``); a provider without one says why in ``no_3d`` and gets a skipped row.

Displacement-field cases (``case.field``) run the flow family's providers only (and they run on no
other case): a smooth field (N[, K], [Do,] Ho, Wo, 2|3) in ``grid_sample``'s units, sampled by ours
(``st.flow_sample``, the field read in place), by eager PyTorch as registration code does it (the
identity grid, made once outside the timing, plus the field, then ``F.grid_sample``), by
``torch.compile`` of that, and, on the field as registration networks give it (pixels, index order,
channels first), by ours and by MONAI's ``Warp`` and VoxelMorph's ``SpatialTransformer`` layers (where
installed).
"""

import importlib
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import stn_triton as st
from transforms_registry import get_transform

TPS_GRID = (4, 4)  # the paper's 4 x 4 control points: D = 16 + 3 basis rows
PLUGIN_FAMILIES = ("logpolar", "lens")  # plugin families with cases of their own (published by plugins/)


@dataclass
class Provider:
    name: str
    description: str
    family: str  # "affine", "projective", "basis" or "flow": which parameters it takes
    ours: bool  # one of this library's kernels (gets the deterministic-backward row)
    make_apply: callable  # (case, dtype, device) -> apply(x, leaves)
    prepare: callable = None  # (params, x, case) -> leaves; default: the family's params as they are
    requires: str = None  # a module that must be importable
    cpu_default: bool = True  # part of the default CPU run
    samplings: tuple = ("bilinear", "nearest", "bicubic")  # the interpolations it has (case.sampling)
    no_3d: str = None  # why it has no volumetric (5-D) form; None: it has one
    _built: dict = field(default_factory=dict, repr=False)

    def available(self):
        """(True, "") or (False, why)."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return False, f"{self.requires} not installed"
        return True, ""

    def runs_on(self, case):
        """Whether ``case`` is of this provider's kind at all: displacement-field cases for the flow
        family, a plugin family's cases for its providers, the others for every other family (no row,
        not even a skipped one, otherwise)."""
        plugin = f"plugin:{self.family}" if self.family in PLUGIN_FAMILIES else "matrix"
        mine = "flow" if self.family == "flow" else plugin
        return mine == getattr(case, "kind", "flow" if getattr(case, "field", False) else "matrix")

    def applies(self, case):
        """(True, "") or (False, why this provider has no row for ``case``)."""
        if case.is_3d and self.no_3d:
            return False, self.no_3d
        if case.sampling not in self.samplings:
            return False, f"{self.name} has no {case.sampling} sampling"
        return True, ""

    def leaves(self, params, x, case):
        leaves = self.prepare(params, x, case) if self.prepare else list(params)
        return [t.detach().requires_grad_(True) for t in leaves]

    def reset(self):
        """Forget built (and compiled) functions."""
        self._built.clear()

    def build(self, case, dtype, device):
        """``apply`` for this case and dtype, built once and reused by every mode."""
        key = (case, dtype, str(device))
        if key not in self._built:
            self._built.clear()  # one case at a time: drop the previous case's compiled code
            self._built[key] = self.make_apply(case, dtype, device)
        return self._built[key]


# --- the parameters each family draws --------------------------------------------------------------

def _lead(case):
    return (case.N,) if case.K == 1 else (case.N, case.K)


def draw_params(family, case, device, generator):
    """Near-identity transforms (so most samples land inside the input), float32.

    Returns [theta (N[, K], 2, 3)] (affine), [h (N[, K], 3, 3)] with a small perspective row
    (projective), or [m (N[, K], 2, D)] of a 4 x 4 thin plate spline with jittered control points
    (basis; its basis is :func:`tps_basis`). A volumetric case: [theta (N[, K], 3, 4)] (affine only).
    """
    lead = _lead(case)

    def noise(*shape, scale):
        return scale * torch.randn(*shape, generator=generator, device=device)

    if family == "logpolar":  # the origin, near the image's centre
        return [noise(*lead, 2, scale=0.1)]
    if family == "lens":  # barrel distortion about a centre near the image's
        return [torch.tensor([0.2, -0.05, 0.0, 0.0], device=device).expand(*lead, 4) + noise(*lead, 4, scale=0.03)]
    if family == "flow":  # a smooth field, normalised units: coarse noise upsampled, a few pixels at most
        nd = len(case.out_size)
        coarse = noise(*lead, nd, *[4] * nd, scale=0.05)
        flat = coarse.reshape(-1, nd, *[4] * nd)
        up = F.interpolate(flat, size=case.out_size, mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
        return [up.reshape(*lead, nd, *case.out_size).movedim(len(lead), -1).contiguous()]
    if case.is_3d:
        if family != "affine":
            raise ValueError(f"family {family!r} has no volumetric form in the benchmarks (affine has)")
        return [torch.eye(3, 4, device=device).expand(*lead, 3, 4) + noise(*lead, 3, 4, scale=0.1)]
    if family == "affine":
        theta = torch.eye(2, 3, device=device).expand(*lead, 2, 3) + noise(*lead, 2, 3, scale=0.1)
        return [theta]
    if family == "projective":
        h = torch.eye(3, device=device).expand(*lead, 3, 3).clone()
        h[..., :2, :] += noise(*lead, 2, 3, scale=0.1)
        h[..., 2, :2] += noise(*lead, 2, scale=0.02)
        return [h]
    if family == "basis":
        tps = get_transform("tps", grid_size=TPS_GRID)
        theta = tps.identity().to(device) + noise(case.N * case.K, tps.num_params, scale=0.05)
        form = tps.kernel_form(theta, (case.Ho, case.Wo))
        return [form.m.reshape(*lead, 2, form.basis.shape[0])]
    raise ValueError(f"family: expected affine, projective or basis, got {family!r}")


def basis_dim():
    """D of the thin plate spline basis: 1, x, y and one radial term per control point."""
    return get_transform("tps", grid_size=TPS_GRID).num_params // 2 + 3


def tps_basis(case, device):
    """The (fixed) thin plate spline basis (D, Ho*Wo), float32, for ``align_corners=False``."""
    tps = get_transform("tps", grid_size=TPS_GRID)
    return tps.kernel_form(tps.identity()[None].to(device), (case.Ho, case.Wo)).basis.contiguous()


# --- helpers shared by the unfused providers -------------------------------------------------------

def repeat_k(x, K):
    """x (N, C, H, W) -> (N*K, C, H, W), image n repeated K times in a row, keeping x's layout (a
    volume (N, C, D, H, W) likewise, channels-last-3d kept).

    This is what a user of ``F.grid_sample`` does to apply K transforms to one image (one copy of
    the input per transform); it is part of the unfused providers' timed work.
    """
    if K == 1:
        return x
    N, C, *S = x.shape
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
        last = x.movedim(1, -1)  # (N, *S, C), contiguous
        return last[:, None].expand(N, K, *S, C).reshape(N * K, *S, C).movedim(-1, 1)
    return x[:, None].expand(N, K, C, *S).reshape(N * K, C, *S)


def _unflatten_k(out, case):
    return out if case.K == 1 else out.unflatten(0, (case.N, case.K))


def _theta_flat(theta, case):
    return theta.reshape(case.N * case.K, *theta.shape[-2:])  # (N*K, 2, 3), or (N*K, 3, 4) for a volume


def _grid_size(case):
    """affine_grid's size argument for the N*K flattened transforms."""
    return (case.N * case.K, case.C, *case.out_size)


def _eager_apply(case, align_corners):
    def apply(x, leaves):
        (theta,) = leaves  # already in x's dtype (F.grid_sample wants the grid in the input's dtype)
        xs = repeat_k(x, case.K)
        grid = F.affine_grid(_theta_flat(theta, case), _grid_size(case), align_corners=align_corners)
        return _unflatten_k(F.grid_sample(xs, grid, mode=case.sampling, align_corners=align_corners), case)

    return apply


def _params_in_input_dtype(params, x, case):  # theta, or a field: F.grid_sample wants the input's dtype
    return [params[0].to(x.dtype)]


def theta_to_kornia(theta, in_size, out_size, align_corners=False):
    """Normalised theta (affine_grid's: output -> input) -> kornia's pixel matrix M (input -> output).

    kornia's ``warp_affine(src, M, dsize, align_corners=ac)`` normalises M with its own pixel <->
    normalised matrices S(size) (``normalize_homography``) and samples with
    ``affine_grid(inverse(S_out M S_in^-1))``. Asking that inverse to be T = [theta; 0 0 1] gives
    ``M = S_out^-1 T^-1 S_in``, which is exactly kornia's ``denormalize_homography(T^-1, in, out)``;
    using kornia's own function keeps the conversion right for the convention of the installed
    version (kornia >= 0.9 forwards ``align_corners`` to it; earlier versions are corner-aligned).
    """
    import inspect

    from kornia.geometry.conversions import denormalize_homography

    flat = theta.detach().reshape(-1, 2, 3).double()
    T = torch.cat([flat, flat.new_tensor([0.0, 0.0, 1.0]).expand(flat.shape[0], 1, 3)], dim=1)  # (B, 3, 3)
    kw = {}
    if "align_corners" in inspect.signature(denormalize_homography).parameters:
        kw["align_corners"] = align_corners
    M = denormalize_homography(torch.linalg.inv(T), tuple(in_size), tuple(out_size), **kw)
    return M[:, :2, :].to(theta.dtype).reshape(theta.shape)


def theta_to_kornia3d(theta, in_size, out_size):
    """Normalised 3-D theta (affine_grid's, (..., 3, 4): output -> input) -> kornia's voxel matrix M
    (..., 3, 4) (input -> output) for ``warp_affine3d(src, M, dsize, align_corners=False)``.

    ``warp_affine3d`` normalises M with ``normalize_homography3d`` (always corner-aligned frames
    N(size), whatever ``align_corners``) and samples with ``affine_grid(inverse(N_out M N_in^-1)[:3],
    align_corners=ac)``. Asking that inverse to be T = [theta; 0 0 0 1] gives ``M = N_out^-1 T^-1
    N_in``, kornia's own ``denormalize_homography3d(T^-1, in, out)``: the frames cancel, so the
    sampling grid is affine_grid's of theta for either ``align_corners``. ``in_size``, ``out_size``:
    (D, H, W) and (Do, Ho, Wo).
    """
    from kornia.geometry.conversions import denormalize_homography3d

    flat = theta.detach().reshape(-1, 3, 4).double()
    T = torch.cat([flat, flat.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(flat.shape[0], 1, 4)], dim=1)  # (B, 4, 4)
    M = denormalize_homography3d(torch.linalg.inv(T), tuple(in_size), tuple(out_size))
    return M[:, :3, :].to(theta.dtype).reshape(theta.shape)


def _kornia_prepare(params, x, case):
    # kornia wants M in the input's dtype (else grid_sample sees mixed dtypes)
    if case.is_3d:
        return [theta_to_kornia3d(params[0], case.in_size, case.out_size).to(x.dtype)]
    return [theta_to_kornia(params[0], (case.H, case.W), (case.Ho, case.Wo)).to(x.dtype)]


def _kornia_apply(case, dtype, device):
    if case.is_3d:
        return _kornia_apply3d(case)
    from kornia.geometry.transform import warp_affine

    def apply(x, leaves):
        (M,) = leaves
        out = warp_affine(repeat_k(x, case.K), M.reshape(case.N * case.K, 2, 3), (case.Ho, case.Wo),
                          mode=case.sampling, align_corners=False)
        return _unflatten_k(out, case)

    return apply


def _kornia_apply3d(case):
    from kornia.geometry.transform import warp_affine3d

    def apply(x, leaves):
        (M,) = leaves
        out = warp_affine3d(repeat_k(x, case.K), M.reshape(case.N * case.K, 3, 4), case.out_size,
                            flags=case.sampling, align_corners=False)
        return _unflatten_k(out, case)

    return apply


def _compile_apply(case, dtype, device):
    # A fresh compilation per case and dtype: dynamo keys its cache on the code object shared by
    # every case's closure, and would fall back to eager after a few recompilations.
    torch._dynamo.reset()
    return torch.compile(_eager_apply(case, align_corners=False), dynamic=False)


def _basis_apply(case, dtype, device):
    basis = tps_basis(case, device)

    def apply(x, leaves):
        return st.basis_sample(x, leaves[0], basis, (case.Ho, case.Wo), mode=case.sampling)

    return apply


def _grid_apply(case, dtype, device):
    def apply(x, leaves):
        (theta,) = leaves
        grid = F.affine_grid(_theta_flat(theta, case), _grid_size(case), align_corners=False)
        grid = grid if case.K == 1 else grid.unflatten(0, (case.N, case.K))  # (N, K, [Do,] Ho, Wo, 2|3): one launch
        return st.grid_sample(x, grid, mode=case.sampling, align_corners=False)  # float32 grid, any input dtype

    return apply


def _identity_grid(case, device):
    """affine_grid's identity grid for the case's output, (*out_size, nd) float32 (align_corners=False)."""
    nd = len(case.out_size)
    eye = torch.eye(nd, nd + 1, device=device)[None]
    return F.affine_grid(eye, (1, 1, *case.out_size), align_corners=False)[0]


def _eager_flow_apply(case, dtype, device):
    base = _identity_grid(case, device).to(getattr(torch, dtype))  # made once, as a registration model's buffer

    def apply(x, leaves):
        (u,) = leaves  # in x's dtype (F.grid_sample wants one dtype)
        grid = (base + u).reshape(case.N * case.K, *case.out_size, len(case.out_size))
        return _unflatten_k(F.grid_sample(repeat_k(x, case.K), grid, mode=case.sampling, align_corners=False), case)

    return apply


def _compile_flow_apply(case, dtype, device):
    torch._dynamo.reset()
    return torch.compile(_eager_flow_apply(case, dtype, device), dynamic=False)


def _flow_apply(case, dtype, device):
    def apply(x, leaves):
        return st.flow_sample(x, leaves[0], mode=case.sampling, layout="grid", units="normalized")

    return apply


def _pixels_prepare(params, x, case, dtype=torch.float32):
    """The drawn field (normalised, (x, y[, z]), grid layout) as a registration network gives it:
    displacements in input pixels, index order, channels first (N[, K], nd, *size) (VoxelMorph's and
    MONAI's convention, their align_corners=True scale)."""
    u = params[0]
    nd = u.shape[-1]
    scale = torch.tensor([(s - 1) / 2.0 for s in case.in_size[::-1]], device=u.device)
    return [(u * scale).flip(-1).movedim(-1, -nd - 1).contiguous().to(dtype)]


def _flow_pixels_apply(case, dtype, device):
    def apply(x, leaves):
        return st.flow_sample(x, leaves[0], mode=case.sampling, align_corners=True)  # pixels, channels first

    return apply


def _monai_apply(case, dtype, device):
    import warnings

    from monai.networks.blocks import Warp

    with warnings.catch_warnings():  # "Using PyTorch native grid_sample": what is timed, said in the description
        warnings.simplefilter("ignore", UserWarning)
        warp = Warp(mode=case.sampling, padding_mode="zeros")
    nd = len(case.out_size)

    def apply(x, leaves):
        (u,) = leaves  # in x's dtype (F.grid_sample inside wants one dtype)
        out = warp(repeat_k(x, case.K), u.reshape(case.N * case.K, nd, *case.out_size))
        return _unflatten_k(out, case)

    return apply


def _voxelmorph_apply(case, dtype, device):
    from voxelmorph.nn.modules import SpatialTransformer

    warp = SpatialTransformer("nearest" if case.sampling == "nearest" else "linear")  # align_corners=True
    nd = len(case.out_size)

    def apply(x, leaves):
        (u,) = leaves  # in x's dtype
        out = warp(repeat_k(x, case.K), u.reshape(case.N * case.K, nd, *case.out_size))
        return _unflatten_k(out, case)

    return apply


def _plugin_family(name, module, cls):
    """The plugin family ``name``: as its installed distribution registers it, or, in a source tree
    where it is only importable (a bare GPU machine with plugins/ on PYTHONPATH), from its module."""
    try:
        return get_transform(name)
    except KeyError:
        return getattr(importlib.import_module(module), cls)()


def _plugin_apply(name, module, cls):
    def make(case, dtype, device):
        family = _plugin_family(name, module, cls)

        def apply(x, leaves):
            return st.spatial_transform(x, leaves[0], family, case.out_size, mode=case.sampling)

        return apply

    return make


def _eager_plugin_apply(name, module, cls):
    def make(case, dtype, device):
        family = _plugin_family(name, module, cls)

        def apply(x, leaves):
            (theta,) = leaves  # in x's dtype: the grid is made in it
            grid = family.grid(theta.reshape(case.N * case.K, theta.shape[-1]), case.out_size)
            out = F.grid_sample(repeat_k(x, case.K), grid, mode=case.sampling, align_corners=False)
            return _unflatten_k(out, case)

        return apply

    return make


def _plugin_providers(name, module, cls, what):
    """Ours (the family's own Triton map, fused) and eager (its grid, then F.grid_sample) for a plugin family."""
    return (Provider(f"ours-{name}", f"st.spatial_transform with the {name} plugin family ({what}): its own Triton "
                     "map, fused", name, True, _plugin_apply(name, module, cls), requires=module,
                     no_3d=f"{name} is a 2-D family"),
            Provider(f"eager-{name}", f"PyTorch eager: the {name} family's grid, then F.grid_sample (the case's "
                     "baseline)", name, False, _eager_plugin_apply(name, module, cls), prepare=_params_in_input_dtype,
                     requires=module, no_3d=f"{name} is a 2-D family"))


PROVIDERS = {p.name: p for p in (
    Provider("ours-affine", "st.affine_sample: affine grid made inside the fused kernel", "affine", True,
             lambda case, dtype, device: lambda x, leaves: st.affine_sample(x, leaves[0], case.out_size,
                                                                            mode=case.sampling)),
    Provider("ours-projective", "st.projective_sample: homography, fused", "projective", True,
             lambda case, dtype, device: lambda x, leaves: st.projective_sample(x, leaves[0], (case.Ho, case.Wo),
                                                                                mode=case.sampling),
             no_3d="st.projective_sample has no 3-D form"),
    Provider("ours-basis", "st.basis_sample: 4x4 thin plate spline M @ B, B read by the kernel", "basis", True,
             _basis_apply, no_3d="the benchmark's basis is the 2-D thin plate spline (no 3-D basis drawn)"),
    Provider("ours-grid", "st.grid_sample on F.affine_grid's grid (grid made by PyTorch, sampled by us)",
             "affine", True, _grid_apply),
    Provider("eager", "PyTorch eager F.affine_grid + F.grid_sample, align_corners=False (the baseline)",
             "affine", False, lambda case, dtype, device: _eager_apply(case, False), prepare=_params_in_input_dtype),
    Provider("eager-ac", "PyTorch eager F.affine_grid + F.grid_sample, align_corners=True (cuDNN for fp32/fp16)",
             "affine", False, lambda case, dtype, device: _eager_apply(case, True), prepare=_params_in_input_dtype),
    Provider("compile", "torch.compile of the eager pair (align_corners=False)", "affine", False, _compile_apply,
             prepare=_params_in_input_dtype, cpu_default=False),
    Provider("ours-flow", "st.flow_sample: a displacement field read in place, base grid made in the kernel",
             "flow", True, _flow_apply),
    Provider("ours-flow-px", "st.flow_sample on the field in pixels, channels first (VoxelMorph's and MONAI's "
             "convention), read and scaled in the kernel", "flow", True, _flow_pixels_apply, prepare=_pixels_prepare),
    Provider("monai-warp", "MONAI's Warp layer (reference grid + field in pixels, rescaled, then PyTorch's "
             "F.grid_sample)", "flow", False, _monai_apply, prepare=lambda params, x, case: _pixels_prepare(params, x, case, x.dtype),
             requires="monai", samplings=("bilinear", "nearest")),
    Provider("voxelmorph", "VoxelMorph's SpatialTransformer layer (voxel grid + field in pixels, rescaled, "
             "F.grid_sample)", "flow", False, _voxelmorph_apply,
             prepare=lambda params, x, case: _pixels_prepare(params, x, case, x.dtype), requires="voxelmorph",
             samplings=("bilinear", "nearest")),
    Provider("eager-flow", "PyTorch eager: identity grid (made once) + field, then F.grid_sample (the field cases' "
             "baseline)", "flow", False, _eager_flow_apply, prepare=_params_in_input_dtype),
    Provider("compile-flow", "torch.compile of eager-flow", "flow", False, _compile_flow_apply,
             prepare=_params_in_input_dtype, cpu_default=False),
    *_plugin_providers("logpolar", "stn_logpolar", "LogPolar", "log-polar sampling about a learnt origin"),
    *_plugin_providers("lens", "stn_lens", "RadialDistortion", "radial lens distortion"),
    Provider("kornia", "kornia.geometry.transform.warp_affine (volumes: warp_affine3d), theta converted to pixel "
             "matrices", "affine", False, _kornia_apply, prepare=_kornia_prepare, requires="kornia",
             samplings=("bilinear", "nearest")),
)}
