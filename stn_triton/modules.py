"""``spatial_transform`` (any registered family) and the ``SpatialTransformer`` module."""

import torch
from torch import nn

from transforms_registry import TransformFamily, get_transform

from . import functional as Fn


def _family(transform, options):
    if isinstance(transform, TransformFamily):
        if options:
            raise ValueError(f"options {sorted(options)} are for a family name; got a family instance")
        return transform
    return get_transform(transform, **options)


def spatial_transform(x, theta, transform="affine", size=None, mode="bilinear", padding_mode="zeros",
                      align_corners=False, **options):
    """Warp ``x`` (N, C, H, W) by the family ``transform`` (a registered name or an instance) with
    parameters ``theta`` (N, P) -> (N, C, Ho, Wo), or (N, K, P) -> (N, K, C, Ho, Wo), through the
    fused kernel form the family maps to. ``options`` construct the family (e.g. ``grid_size``)."""
    family = _family(transform, options)
    Fn._check_input(x)
    align_corners = Fn._check_options(mode, padding_mode, align_corners)
    size = Fn._check_size(size, x)
    Fn._check_tensor("theta", theta)
    if theta.dim() not in (2, 3) or theta.shape[-1] != family.num_params:
        raise Fn.ArgumentError(f"theta: family {family.name!r} takes {family.num_params} parameters, expected shape "
                         f"(N, {family.num_params}) or (N, K, {family.num_params}), got {tuple(theta.shape)}")
    if theta.shape[0] != x.shape[0]:
        raise Fn.ArgumentError(f"theta: batch size {theta.shape[0]} does not match the batch size of x, {x.shape[0]}")
    had_k = theta.dim() == 3
    N, K = theta.shape[0], theta.shape[1] if had_k else 1
    form = family.kernel_form(theta.reshape(N * K, family.num_params), size, align_corners)
    m = form.m.reshape(N, K, *form.m.shape[1:])
    if not had_k:
        m = m[:, 0]
    opts = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
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


def default_localization():
    """A small CNN (any number of input channels) ending in a 32-d feature vector."""
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
        self.localization = localization if localization is not None else default_localization()
        self.num_transforms = num_transforms
        self.head = _IdentityHead(self.family.identity().float().repeat(num_transforms))
        self.size, self.mode, self.padding_mode, self.align_corners = size, mode, padding_mode, align_corners
        self.return_theta = return_theta

    def forward(self, x):
        feats = self.localization(x).flatten(1)
        theta = self.head(feats)  # (N, K * P)
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
