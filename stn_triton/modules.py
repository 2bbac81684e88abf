"""``spatial_transform`` (any registered family) and the ``SpatialTransformer`` module."""

import contextlib

import torch
from torch import nn

from transforms_registry import KernelForm, TransformFamily, get_transform, list_transforms
from transforms_registry.base import FORM_METHOD, GRID_METHOD, incomplete_family
from transforms_registry.registry import did_you_mean

from . import functional as Fn
from .kernels import forms


class UnknownTransformError(Fn.ArgumentError, KeyError):
    """``transform`` names no registered family: an ArgumentError, and a KeyError as the registry's
    ``get_transform`` raises (so ``except KeyError`` written for it still catches this)."""

    __str__ = BaseException.__str__  # the message as written, not KeyError's repr of it


def _family(transform, options):
    if isinstance(transform, TransformFamily):
        if options:
            raise ValueError(f"options {sorted(options)} are for a family name; got a family instance")
        family = transform
    elif isinstance(transform, str):
        known = list_transforms()
        if transform not in known:
            raise UnknownTransformError(f"transform: expected the name of a registered family or a "
                                        f"TransformFamily instance, got {transform!r}{did_you_mean(transform)}; "
                                        f"registered: {', '.join(known)}")
        family = get_transform(transform, **options)
    elif isinstance(transform, type) and issubclass(transform, TransformFamily):
        raise Fn.ArgumentTypeError(f"transform: expected the name of a registered family or a TransformFamily "
                                   f"instance, got the class {transform.__qualname__}; pass an instance, "
                                   f"{transform.__qualname__}(...)")
    else:
        raise Fn.ArgumentTypeError(f"transform: expected the name of a registered family (a str) or a "
                                   f"TransformFamily instance, got {type(transform).__name__}")
    incomplete = incomplete_family(type(family))
    if incomplete:
        raise Fn.ArgumentTypeError(f"transform: {incomplete}")
    return family


def _family_label(family):
    cls = type(family).__qualname__
    return f"family {family.name!r} ({cls})" if family.name else f"family {cls}"


def _check_form(family, form, n, size, x):
    """What ``family.kernel_form`` (or the ``grid`` it defaults to) gave for n sets of theta must
    fit ``size`` and ``x``, before any sampling."""
    nd = x.dim() - 2
    method = FORM_METHOD if type(family).kernel_form is not TransformFamily.kernel_form else GRID_METHOD
    who = f"transform: {_family_label(family)}: {method}"
    if not isinstance(form, KernelForm):
        raise Fn.ArgumentTypeError(f"{who} returned {type(form).__name__}; expected a KernelForm")
    dims = ("Ho, Wo" if nd == 2 else "Do, Ho, Wo")
    if form.kind == "grid":
        what = "the sampling grid" if method == GRID_METHOD else "the sampling grid (KernelForm m, kind 'grid')"
        want = (n, *size, nd)
        tensors = [(what, form.m, want, f"(N, {dims}, {nd})")]
    elif form.kind == "basis":
        P = 1
        for s in size:
            P *= s
        D = form.basis.shape[0] if isinstance(form.basis, torch.Tensor) and form.basis.dim() == 2 else "D"
        tensors = [("KernelForm basis", form.basis, (D, P), "(D, " + dims.replace(", ", "*") + ")"),
                   ("KernelForm m (kind 'basis')", form.m, (n, nd, D), f"(N, {nd}, D)")]
    else:  # affine, projective (a projective form on 5-D input is refused by the caller)
        want = (n, nd, nd + 1) if form.kind == "affine" else (n, 3, 3)
        tensors = [(f"KernelForm m (kind {form.kind!r})", form.m, want, f"(N, {want[1]}, {want[2]})")]
    for what, t, want, pattern in tensors:
        if not isinstance(t, torch.Tensor):
            raise Fn.ArgumentTypeError(f"{who} returned {what} as {type(t).__name__}; expected a torch.Tensor")
        if not t.is_floating_point():
            raise Fn.ArgumentTypeError(f"{who} returned {what} of dtype {t.dtype}; expected a floating-point tensor")
        if tuple(t.shape) != want:
            raise Fn.ArgumentError(f"{who} returned {what} of shape {tuple(t.shape)}; expected {pattern} = "
                                   f"({', '.join(map(str, want))}) for N = {n} (theta's rows) and size {tuple(size)}")
        if t.device != x.device:
            raise Fn.ArgumentError(f"{who} returned {what} on {t.device}; expected it on {x.device} (the device of x)")


def _family_ndim(family):
    return getattr(family, "ndim", 2)


def _check_family_fits(family, x, name="x"):
    """A 2-D family takes a 4-D input, a 3-D family a 5-D one."""
    nd = _family_ndim(family)
    if nd == x.dim() - 2:
        return
    if nd == 2:
        raise Fn.ArgumentError(f"transform: family {family.name!r} is 2-D; a 5-D {name} (N, C, D, H, W) needs a 3-D "
                               f"family (ndim = 3, such as 'affine3d' or 'attention3d'), got {name} of shape "
                               f"{tuple(x.shape)}")
    raise Fn.ArgumentError(f"transform: family {family.name!r} is {nd}-D and takes a {nd + 2}-D {name}; a 4-D {name} "
                           f"(N, C, H, W) needs a 2-D family (such as 'affine' or 'attention'), got {name} of shape "
                           f"{tuple(x.shape)}")


def spatial_transform(x, theta, transform="affine", size=None, mode="bilinear", padding_mode="zeros",
                      align_corners=False, **options):
    """Warp ``x`` (N, C, H, W) by the family ``transform`` (a registered name or an instance) with
    parameters ``theta`` (N, P) -> (N, C, Ho, Wo), or (N, K, P) -> (N, K, C, Ho, Wo), through the
    fused kernel form the family maps to. ``options`` construct the family (e.g. ``grid_size``).

    A 3-D family (``affine3d``, ``attention3d``) warps a 5-D ``x`` (N, C, D, H, W) to
    (N, [K,] C, Do, Ho, Wo), ``size`` = (Do, Ho, Wo)."""
    family = _family(transform, options)
    nd = Fn._check_input_nd(x)
    _check_family_fits(family, x)
    align_corners = Fn._check_options_nd(nd, mode, padding_mode, align_corners)
    size = Fn._check_size(size, x)
    Fn._check_tensor("theta", theta)
    if theta.dim() not in (2, 3) or theta.shape[-1] != family.num_params:
        raise Fn.ArgumentError(f"theta: family {family.name!r} takes {family.num_params} parameters, expected shape "
                         f"(N, {family.num_params}) or (N, K, {family.num_params}), got {tuple(theta.shape)}")
    if theta.shape[0] != x.shape[0]:
        raise Fn.ArgumentError(f"theta: batch size {theta.shape[0]} does not match the batch size of x, {x.shape[0]}")
    had_k = theta.dim() == 3
    opts = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    if getattr(type(family), "triton_coords", None) is not None:  # the family's own map, fused
        return Fn.family_sample(x, theta, family, size, **opts)
    N, K = theta.shape[0], theta.shape[1] if had_k else 1
    form = family.kernel_form(theta.reshape(N * K, family.num_params), size, align_corners)
    if isinstance(form, KernelForm) and forms.find(form.kind, nd) is None:
        have = ", ".join(f.kind for f in forms.FORMS.values() if f.ndim == nd)
        raise Fn.ArgumentError(f"transform: family {family.name!r} gave a {form.kind} kernel form, which has no "
                               f"{nd}-D version; a {nd}-D family must use one of the forms {have}")
    _check_form(family, form, N * K, size, x)
    m = form.m.reshape(N, K, *form.m.shape[1:])
    if not had_k:
        m = m[:, 0]
    if form.kind == "affine":
        return Fn.affine_sample(x, m, size, **opts)
    if form.kind == "projective":
        return Fn.projective_sample(x, m, size, **opts)
    if form.kind == "basis":
        return Fn.basis_sample(x, m, form.basis, size, **opts)
    return Fn.grid_sample(x, m, **opts)


class _IdentityHead(nn.LazyLinear):
    """The regression layer: zero weights and the identity as bias, as in the paper."""

    def __init__(self, identity):
        super().__init__(identity.numel())
        self.register_buffer("identity", identity.clone(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        if not self.has_uninitialized_params() and self.in_features != 0 and hasattr(self, "identity"):
            nn.init.zeros_(self.weight)
            with torch.no_grad():
                self.bias.copy_(self.identity)


def _regress(head, feats):
    """``head(feats)`` in at least float32: the ops keep the transform parameters float32 (a bfloat16
    theta is a step of 2**-8 of the output's half-width, about a pixel at 448 px), so the layer that
    makes them computes in float32 too, whatever the features' dtype: with autocast off under
    autocast, and a half-precision layer's weights promoted with or without it (a float64 layer
    computes in float64). The timm integration's regression layer follows the same rule."""
    device_type = feats.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    if not autocast and feats.dtype not in (torch.float16, torch.bfloat16):
        return head(feats)  # (the weight is not read before the call: a lazy layer, traced, materialises there)
    dtype = torch.promote_types(head.weight.dtype, torch.float32)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if head.weight.dtype == dtype:  # the module itself (hooks run; a lazy layer materialises)
            return head(feats.to(dtype))
        bias = None if head.bias is None else head.bias.to(dtype)
        return torch.nn.functional.linear(feats.to(dtype), head.weight.to(dtype), bias)


def default_localization(ndim=2):
    """A small CNN (any number of input channels) ending in a 32-d feature vector; ``ndim=3``: its
    volumetric counterpart (3-D convolutions, for 5-D input)."""
    if ndim == 3:
        return nn.Sequential(
            nn.LazyConv3d(8, 5, padding=2), nn.MaxPool3d(2, ceil_mode=True), nn.ReLU(True),
            nn.Conv3d(8, 10, 3, padding=1), nn.MaxPool3d(2, ceil_mode=True), nn.ReLU(True),
            nn.AdaptiveAvgPool3d(2), nn.Flatten(), nn.Linear(80, 32), nn.ReLU(True),
        )
    return nn.Sequential(
        nn.LazyConv2d(8, 7, padding=3), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(True),
        nn.Conv2d(8, 10, 5, padding=2), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(True),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(160, 32), nn.ReLU(True),
    )


class SpatialTransformer(nn.Module):
    """A spatial transformer: localisation network -> theta -> fused grid generation + sampling.

    localization: any module mapping x to features (N, F) (or anything that flattens to that);
    ``None`` gives :func:`default_localization`. A regression layer (zero weights, identity bias)
    maps the features to ``num_transforms`` sets of the family's parameters. With
    ``num_transforms=K > 1`` the output is (N, K, C, Ho, Wo).

    A 3-D family (``transform="affine3d"`` or ``"attention3d"``) transforms 5-D input (N, C, D, H, W),
    ``size`` = (Do, Ho, Wo); the default localisation network is then the 3-D one.
    """

    def __init__(self, localization=None, transform="affine", size=None, num_transforms=1, mode="bilinear",
                 padding_mode="zeros", align_corners=False, return_theta=False, **options):
        super().__init__()
        if not isinstance(num_transforms, int) or num_transforms < 1:
            raise ValueError(f"num_transforms: expected a positive int, got {num_transforms!r}")
        Fn._check_options(mode, padding_mode, align_corners)
        if options.get("learnable_basis"):  # a learnable B is tied to the output grid
            options.setdefault("size", size)
            options.setdefault("align_corners", align_corners)
        self.family = _family(transform, options)
        Fn._check_options_nd(_family_ndim(self.family), mode, padding_mode, align_corners)
        if getattr(type(self.family), "triton_coords", None) is not None:
            Fn.prepare_family(self.family)  # its form and ops now, not while torch.compile traces forward
        self.localization = (localization if localization is not None
                             else default_localization(_family_ndim(self.family)))
        self.num_transforms = num_transforms
        self.head = _IdentityHead(self.family.identity().float().repeat(num_transforms))
        self.size, self.mode, self.padding_mode, self.align_corners = size, mode, padding_mode, align_corners
        self.return_theta = return_theta

    def forward(self, x):
        Fn._check_input_nd(x)
        _check_family_fits(self.family, x)  # before the localisation network sees a wrong input
        feats = self.localization(x).flatten(1)
        theta = _regress(self.head, feats)  # (N, K * P)
        if self.num_transforms > 1:
            theta = theta.view(x.shape[0], self.num_transforms, -1)
        out = spatial_transform(x, theta, self.family, self.size, self.mode, self.padding_mode, self.align_corners)
        return (out, theta) if self.return_theta else out

    def parameter_groups(self, lr, localization_lr_scale=0.1):
        """Optimizer groups: the localisation network and regression layer at ``lr *
        localization_lr_scale`` (the paper uses a tenth), anything else (a learnable B) at ``lr``."""
        loc = list(self.localization.parameters()) + list(self.head.parameters())
        loc_ids = {id(p) for p in loc}
        rest = [p for p in self.parameters() if id(p) not in loc_ids]
        groups = [{"params": loc, "lr": lr * localization_lr_scale}]
        if rest:
            groups.append({"params": rest, "lr": lr})
        return groups
