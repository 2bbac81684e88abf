"""Spatial transformers in timm backbones.

:class:`ParallelSTNet` is the paper's CUB-200-2011 part-attention model: one localisation network
(a timm backbone's pooled features, plus a small head) predicts K transforms of the input; each
branch samples the input at its own size (448 -> 224 by default: one fused launch for all K) and
feeds its own part backbone; the branches' feature maps are concatenated before one classifier.
Each branch's features are its backbone's pooled pre-logits
features. Following the paper, the default family is ``attention`` with the scale fixed at 0.5, so only the
translation is learnt, and the K transforms start on different regions of the image.

:class:`STMultiNet` is the paper's "ST-CNN Multi": a transformer inserted before chosen stages of
any timm backbone, each with a small localisation head on that stage's feature map.

Both honour timm's model API (``forward_features``, ``forward_head(x, pre_logits=False)``,
``get_classifier``, ``reset_classifier``, ``num_features``, ``pretrained_cfg``). Importing
:mod:`stn_triton.integrations.timm` registers the models with timm: ``timm.create_model("stn_inception_v3_4x",
num_classes=200)``.
"""

import math

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

import stn_triton as st
from transforms_registry import get_transform


def _backbone(name, pretrained, cache_dir=None, **kwargs):
    """A timm backbone without its classifier: ``model(x)`` gives its pooled pre-logits features
    (N, F), through every layer it has (MobileNetV3's ``conv_head`` included), so DDP sees no unused
    parameter."""
    model = timm.create_model(name, pretrained=pretrained, num_classes=0,
                              **({"cache_dir": cache_dir} if cache_dir else {}), **kwargs)
    model.feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    return model


def region_centres(k, scale):
    """Centres (k, 2) of k regions tiling the image (rows x cols as square as possible), kept inside
    [-(1 - scale), 1 - scale] so that a crop of half-width ``scale`` stays in the image."""
    rows = max(1, int(math.floor(math.sqrt(k))))
    cols = math.ceil(k / rows)
    out = []
    for i in range(k):
        r, c = divmod(i, cols)
        out.append([(2 * c + 1) / cols - 1, (2 * r + 1) / rows - 1])
    lim = max(0.0, 1 - scale)
    return torch.tensor(out).clamp(-lim, lim)


def initial_theta(family, k, scale):
    """Starting parameters (k, P): attention and affine families start as crops of half-width
    ``scale`` on k different regions; any other family starts at its identity."""
    if family.name == "attention":
        c = region_centres(k, scale)
        return torch.cat([torch.full((k, 1), float(scale)), c], 1)
    if family.name == "affine":
        c = region_centres(k, scale)
        z = torch.zeros(k)
        return torch.stack([torch.full((k,), float(scale)), z, c[:, 0], z, torch.full((k,), float(scale)), c[:, 1]], 1)
    return family.identity().float().repeat(k, 1)


class ParallelSTNet(nn.Module):
    """K parallel spatial transformers in front of K part backbones.

    Args:
        backbone: timm name of each part network (one instance per branch).
        loc_backbone: timm name of the localisation network's feature extractor.
        num_transforms: K.
        transform: family name (default ``attention``); ``transform_options`` construct it.
        fixed_params: {index: value} of the family's parameters that are not learnt (default, for
            attention: ``{0: 0.5}``, the paper's fixed scale); the others are regressed.
        img_size: the input side (448); branch_size: each branch's sampled side (224);
        loc_size: the side the localisation network sees (the input resized, 224).
        init_scale: the half-width of the starting crops (defaults to the fixed scale, else 0.5).
    """

    def __init__(self, backbone="inception_v3", loc_backbone=None, num_transforms=4, num_classes=1000,
                 transform="attention", transform_options=None, fixed_params="default", img_size=448,
                 branch_size=224, loc_size=224, loc_hidden=128, init_scale=None, drop_rate=0.0, global_pool="avg",
                 in_chans=3, backbone_pretrained=False, cache_dir=None, mode="bilinear", padding_mode="zeros",
                 align_corners=False):
        super().__init__()
        if not isinstance(num_transforms, int) or num_transforms < 1:
            raise ValueError(f"num_transforms: expected a positive int, got {num_transforms!r}")
        for name, v in (("img_size", img_size), ("branch_size", branch_size), ("loc_size", loc_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.family = get_transform(transform, **(transform_options or {}))
        P = self.family.num_params
        if fixed_params == "default":
            fixed_params = {0: 0.5} if self.family.name == "attention" else {}
        fixed_params = dict(fixed_params or {})
        for i in fixed_params:
            if not isinstance(i, int) or not 0 <= i < P:
                raise ValueError(f"fixed_params: index {i!r} is not a parameter of {self.family.name!r} (0..{P - 1})")
        self.num_transforms, self.num_classes = num_transforms, num_classes
        self.img_size, self.branch_size, self.loc_size = img_size, branch_size, loc_size
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners
        self.drop_rate = drop_rate

        loc_backbone = loc_backbone or backbone
        self.localization = _backbone(loc_backbone, backbone_pretrained, cache_dir, in_chans=in_chans)
        self.loc_hidden = nn.Sequential(nn.Linear(self.localization.feature_dim, loc_hidden), nn.ReLU(inplace=True))
        free = [i for i in range(P) if i not in fixed_params]
        scale = init_scale if init_scale is not None else fixed_params.get(0, 0.5)
        start = initial_theta(self.family, num_transforms, scale)
        for i, v in fixed_params.items():
            start[:, i] = float(v)
        self.register_buffer("theta_start", start, persistent=False)
        self.register_buffer("free_index", torch.tensor(free, dtype=torch.long), persistent=False)
        # the regression layer: zero weights, bias = the free starting parameters (as in the paper)
        self.loc_head = nn.Linear(loc_hidden, num_transforms * len(free))
        nn.init.zeros_(self.loc_head.weight)
        with torch.no_grad():
            self.loc_head.bias.copy_(start[:, free].flatten())

        self.branches = nn.ModuleList(_backbone(backbone, backbone_pretrained, cache_dir, in_chans=in_chans,
                                                global_pool=global_pool) for _ in range(num_transforms))
        self.branch_features = self.branches[0].feature_dim
        self.num_features = self.head_hidden_size = num_transforms * self.branch_features
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        base_cfg = dict(self.branches[0].pretrained_cfg)
        self.pretrained_cfg = self.default_cfg = {
            **{k: base_cfg[k] for k in ("mean", "std", "interpolation") if k in base_cfg},
            "architecture": f"stn_{backbone}_{num_transforms}x", "input_size": (in_chans, img_size, img_size),
            "fixed_input_size": False, "crop_pct": 1.0, "crop_mode": "center", "num_classes": num_classes,
            "pool_size": None, "first_conv": "localization", "classifier": "fc",
        }

    # --- the transforms -------------------------------------------------------------------------
    def localize(self, x):
        """theta (N, K, P) for a batch of inputs."""
        small = x if x.shape[-1] == self.loc_size and x.shape[-2] == self.loc_size else F.interpolate(
            x, size=(self.loc_size, self.loc_size), mode="bilinear", align_corners=False, antialias=True)
        feats = self.loc_hidden(self.localization(small))
        with torch.autocast(x.device.type, enabled=False):  # theta in float32 even under bfloat16 autocast:
            free = self.loc_head(feats.float())            # bf16 would move a 224 px crop by ~1 px
        free = free.view(x.shape[0], self.num_transforms, -1)
        theta = self.theta_start.to(free.dtype).expand(x.shape[0], -1, -1).clone()
        return theta.index_copy(2, self.free_index, free)

    def crops(self, x, theta=None):
        """The K sampled branch inputs (N, K, C, branch_size, branch_size): one fused launch."""
        theta = self.localize(x) if theta is None else theta
        return st.spatial_transform(x, theta, self.family, (self.branch_size, self.branch_size), self.mode,
                                    self.padding_mode, self.align_corners)

    # --- timm's model API -----------------------------------------------------------------------
    def forward_features(self, x, return_theta=False):
        """The branches' pooled features, concatenated: (N, K * F) (and theta (N, K, P))."""
        theta = self.localize(x)
        parts = self.crops(x, theta)
        feats = torch.cat([b(parts[:, k]) for k, b in enumerate(self.branches)], dim=1)
        return (feats, theta) if return_theta else feats

    def forward_head(self, x, pre_logits=False):
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        if global_pool is not None:  # the branches pool their own features
            for b in self.branches:
                b.reset_classifier(0, global_pool)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg["num_classes"] = num_classes

    def localization_parameters(self):
        """The localisation network and its head (to train at a lower rate, as in the paper)."""
        return [*self.localization.parameters(), *self.loc_hidden.parameters(), *self.loc_head.parameters()]


class STMultiNet(nn.Module):
    """A timm backbone with spatial transformers inserted before chosen stages ("ST-CNN Multi").

    ``stages`` lists where: ``0`` is the input image; ``i >= 1`` is the output of the backbone's
    feature stage i (``feature_info[i - 1]``, the stages ``features_only`` exposes), so the
    transformer acts before stage i + 1. Each transformer has a small localisation head on the
    feature map it transforms and keeps the map's size. The backbone stays a whole timm model: its
    own ``forward_features``/``forward_head``/classifier are used, the transformers being applied by
    forward hooks on the stage modules.
    """

    def __init__(self, backbone="resnet18", stages=(0,), transform="affine", num_classes=1000, pretrained=False,
                 loc_channels=32, in_chans=3, **transform_options):
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans) \
            if isinstance(backbone, str) else backbone
        info = self.backbone.feature_info
        stages = tuple(stages)
        if not stages or len(set(stages)) != len(stages) or any(
                not isinstance(s, int) or not 0 <= s <= len(info) for s in stages):
            raise ValueError(f"stages: expected distinct ints in 0..{len(info)} (0 = the input, i = after feature "
                             f"stage i), got {stages!r}")
        self.stages = stages
        self.transformers = nn.ModuleDict()
        self._hooks = []
        for s in stages:
            chs = in_chans if s == 0 else info[s - 1]["num_chs"]
            loc = nn.Sequential(nn.Conv2d(chs, loc_channels, 3, padding=1), nn.ReLU(inplace=True),
                                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * loc_channels, 32),
                                nn.ReLU(inplace=True))
            self.transformers[str(s)] = st.SpatialTransformer(loc, transform=transform, **transform_options)
            if s > 0:
                module = self.backbone.get_submodule(info[s - 1]["module"])
                self._hooks.append(module.register_forward_hook(self._hook(str(s))))
        self.num_features = self.backbone.num_features
        self.head_hidden_size = getattr(self.backbone, "head_hidden_size", self.num_features)
        self.pretrained_cfg = self.default_cfg = dict(self.backbone.pretrained_cfg)

    def _hook(self, key):
        def apply(module, args, output):
            return self.transformers[key](output)
        return apply

    def forward_features(self, x):
        if 0 in self.stages:
            x = self.transformers["0"](x)
        return self.backbone.forward_features(x)

    def forward_head(self, x, pre_logits=False):
        return self.backbone.forward_head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes, *args, **kwargs):
        self.backbone.reset_classifier(num_classes, *args, **kwargs)

    def localization_parameters(self):
        return [p for t in self.transformers.values() for p in [*t.localization.parameters(), *t.head.parameters()]]


# --- timm registrations ---------------------------------------------------------------------------

def _create(backbone, k, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
            **kwargs):
    """``pretrained=True`` loads every backbone's ImageNet weights through timm's own loading; the
    transformer heads and the classifier start fresh (localisation head at the starting regions)."""
    if kwargs.pop("features_only", False):
        raise ValueError("features_only: not supported by the parallel spatial transformer models")
    return ParallelSTNet(backbone=backbone, num_transforms=k, backbone_pretrained=pretrained, cache_dir=cache_dir,
                         **kwargs)


@register_model
def stn_inception_v3_2x(pretrained=False, **kwargs):
    """The paper's CUB model with 2 attention transformers: Inception-v3 localisation and parts,
    448 px input, each part sampled at 224 px."""
    return _create("inception_v3", 2, pretrained, **kwargs)


@register_model
def stn_inception_v3_4x(pretrained=False, **kwargs):
    """The paper's CUB model with 4 attention transformers (84.1% on CUB-200-2011 in the paper)."""
    return _create("inception_v3", 4, pretrained, **kwargs)


@register_model
def stn_mobilenetv3_small_2x(pretrained=False, **kwargs):
    """A light variant for the CPU: MobileNetV3-Small localisation and parts, 2 transformers,
    224 px input, each part sampled at 112 px."""
    kwargs.setdefault("img_size", 224)
    kwargs.setdefault("branch_size", 112)
    kwargs.setdefault("loc_size", 112)
    return _create("mobilenetv3_small_100", 2, pretrained, **kwargs)
