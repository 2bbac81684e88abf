"""Spatial transformers in timm backbones.

:class:`ParallelSTNet` is the paper's CUB-200-2011 part-attention model: one localisation network
(a timm backbone's pooled features, plus a small head) predicts K transforms of the input; each
branch samples the input at its own size (448 -> 224 by default: one fused launch for all K) and
feeds its own part backbone. Following the paper, the default family is ``attention`` with the scale
fixed at 0.5, so only the translation is learnt, and the K transforms start on different regions of
the image. ``img_size``, ``branch_size`` and ``loc_size`` are the sides at the model's own input size;
an input of another size is processed in proportion, as any timm CNN (a 224 px input to the 448/224
model: 112 px parts, the localisation network sees 112 px), so the feature maps scale with the input.

It follows timm's model contract (the one timm's own ``tests/test_models.py`` checks):

* ``forward_features(x)`` is the K branches' feature maps (each branch backbone's own
  ``forward_features``) concatenated on channels: (N, K * C, h, w), ``num_features = K * C``;
  ``forward_features_and_theta(x)`` gives the transforms (N, K, P) with them.
* ``forward_head(x, pre_logits=False)`` splits the channels back into the K branches, runs each
  through its branch's own head up to the pre-logits (the global pooling and, for MobileNetV3, its
  ``conv_head``), concatenates them ((N, head_hidden_size), ``head_hidden_size = K * F``), then
  dropout and the classifier ``fc``. ``forward(x) == forward_head(forward_features(x))``.
* ``get_classifier``, ``reset_classifier``, ``pretrained_cfg`` (``architecture`` is the registered
  name; ``input_size``, ``pool_size``, ``first_conv``, ``classifier``, ``mean``/``std`` are the
  model's own), ``set_grad_checkpointing`` (delegated to the backbones that support it; the others,
  e.g. Inception-v3, are checkpointed whole), ``group_matcher`` (timm's layer-wise grouping: layer i
  of the localisation network and of every branch form one group, so their stems decay together;
  the freshly initialised layers, localisation head and classifier, form the last group),
  ``device=``/``dtype=`` at creation.
* The feature API: ``feature_info``, ``forward_intermediates`` and ``prune_intermediate_layers``,
  so ``timm.create_model("stn_mobilenetv3_small_2x", features_only=True)`` works (timm's
  ``FeatureGetterNet``, the only feature extractor that applies: the maps are not outputs of single
  modules). Each map is the K branches' maps of one stage (the branch backbone's ``feature_info``)
  concatenated on channels: ``num_chs`` is K times the branch's. Each branch's map is in its own
  crop's frame, not the input's; ``reduction`` is input side / map side (the branch's stride times
  img_size / branch_size; the branch's own stride is ``branch_reduction``).
* ``torch.fx`` (timm's FX feature extraction, ``torchvision``'s ``create_feature_extractor``) and
  TorchScript (``torch.jit.script``, also of the FX graph). The steps FX cannot trace are leaves
  registered with timm's ``register_notrace_module``/``register_notrace_function``: the
  localisation input's resize (:func:`localization_input`), the regression layer ``loc_head`` (float32
  with autocast off) and the sampler ``sampler`` (:class:`_Sampler`). Scripted, the sampler calls
  the fused op ``torch.ops.stn_triton.{affine,projective}_sample`` directly, for the families with
  a fixed matrix form (attention, affine, projective); the others (basis and grid families: their
  form is built in Python, per output size) raise when the scripted model runs. Eager (and in the
  FX graph) it is ``stn_triton.spatial_transform`` as before, for any family.

:class:`STMultiNet` is the paper's "ST-CNN Multi": a transformer inserted before chosen stages of
any timm backbone, each with a small localisation head on that stage's feature map. It keeps the
backbone's own timm API (``forward_features``/``forward_head``, ``num_features``,
``head_hidden_size``, ``feature_info``, ``forward_intermediates``, ``set_grad_checkpointing`` where
the backbone supports it, ``group_matcher`` with the transformers in the last group). It is not
registered with timm, and its forward hooks make it neither FX-traceable nor scriptable.

Importing :mod:`stn_triton.integrations.timm` registers the models with timm, each with a default
config (``timm.models.get_pretrained_cfg("stn_inception_v3_4x")``): ``timm.create_model(
"stn_inception_v3_4x", num_classes=200)``. ``pretrained=True`` means the backbones' ImageNet weights
(there are no published weights for the models themselves).
"""

import functools
import math
import re
from collections import defaultdict
from typing import List, Optional, Tuple, Union

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models import (build_model_with_cfg, generate_default_cfgs, group_parameters, register_model,
                         register_notrace_function, register_notrace_module)
from torch import nn

import stn_triton as st
from stn_triton.modules import _family
from transforms_registry.families.affine import Affine, Attention
from transforms_registry.families.projective import Projective

# the paper the models come from (for pretrained_cfg)
_PAPER = dict(paper_name="Spatial Transformer Networks", paper_ids="arXiv:1506.02025")
# pretrained_cfg entries that describe a backbone's own weights, not those of a model wrapping it
_WEIGHT_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag",
                "custom_load", "license")


def _backbone(name, pretrained, cache_dir=None, **kwargs):
    """A timm backbone without its classifier (``num_classes=0``): ``forward_features`` gives its
    feature map, ``forward_head(x, pre_logits=True)`` its pooled pre-logits features through every
    head layer it has (MobileNetV3's ``conv_head`` included, so DDP sees no unused parameter), and
    ``model(x)`` does both."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in ("device", "dtype")}
    return timm.create_model(name, pretrained=pretrained, num_classes=0,
                             **({"cache_dir": cache_dir} if cache_dir else {}), **kwargs)


@functools.lru_cache(maxsize=None)
def _map_size(backbone, in_chans, side):
    """(h, w) of a timm backbone's ``forward_features`` map for a side x side input (None if it is not
    an NCHW map): a shape-only forward on the meta device (no weights are made). Raises ValueError if
    the backbone cannot take that size (Inception-v3 needs at least 75 px)."""
    with torch.device("meta"):
        net = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans).eval()
        try:
            with torch.no_grad():
                out = net.forward_features(torch.empty(1, in_chans, side, side))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{backbone} cannot take a {side} px input: {e}") from None
    return tuple(int(s) for s in out.shape[-2:]) if out.ndim == 4 else None


def _pre_logits_width(model):
    """The width of a timm model's pre-logits features (``head_hidden_size``, else ``num_features``)."""
    return getattr(model, "head_hidden_size", None) or model.num_features


def _prefixed(prefix, names):
    """Module names (one or a tuple, as in timm's ``first_conv``) under ``prefix``, as a tuple."""
    return tuple(prefix + n for n in ((names,) if isinstance(names, str) else names))


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


# --- the steps FX does not trace (timm's notrace registries) and TorchScript compiles ---------------
# (FX wraps only functions whose module-level names do not start with "_")

@register_notrace_function
def scaled_size(x: torch.Tensor, side: int, ref: int) -> List[int]:
    """[h, w]: ``side`` at the reference input side ``ref``, in proportion for x's (H, W) (rounded, at
    least 1): the sides are the model's at its own input size, the same at any other."""
    h = (2 * x.shape[-2] * side + ref) // (2 * ref)
    w = (2 * x.shape[-1] * side + ref) // (2 * ref)
    return [max(1, h), max(1, w)]


@register_notrace_function
def localization_input(x: torch.Tensor, side: int, ref: int) -> torch.Tensor:
    """The localisation network's input: x resized (antialiased bilinear) by side / ref, or x itself
    when side == ref. The choice depends on the model's sizes only, never on x's shape."""
    if side == ref:
        return x
    return F.interpolate(x, size=scaled_size(x, side, ref), mode="bilinear", align_corners=False, antialias=True)


def _checkpoint(fn, x):
    return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)


def _autocast_enabled(device_type):
    """Whether autocast is on for a device type (False for one without autocast, e.g. meta)."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))  # torch < 2.4
    return available(device_type) and torch.is_autocast_enabled(device_type)


@register_notrace_module
class _ThetaHead(nn.Linear):
    """The regression layer of the transform parameters: an ``nn.Linear`` computed in at least
    float32 with autocast off, so theta stays float32 under bfloat16 autocast and in a bfloat16
    model (bf16 would move a 224 px crop by ~1 px). An FX leaf (autocast depends on the device).

    Scripted, TorchScript's autocast context cannot switch off autocast for the ops it runs: under
    CUDA autocast it computes in float64 (which autocast leaves alone) and rounds to float32; CPU
    autocast cannot be detected from TorchScript, so there a scripted model's theta follows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        if torch.jit.is_scripting():
            if torch.is_autocast_enabled():  # (CUDA's)
                return self._linear(x, torch.float64).to(dtype)
            return self._linear(x, dtype)
        else:
            if _autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):
                    return self._linear(x, dtype)
            return self._linear(x, dtype)

    def _linear(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        bias = self.bias
        if bias is not None:
            bias = bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)


_SCRIPTED_FORMS = {Attention: 1, Affine: 2, Projective: 3}  # families with a fixed matrix form


@register_notrace_module
class _Sampler(nn.Module):
    """The K crops (N, K, C, h, w) of x (N, C, H, W) by the transforms theta (N, K, P), in one fused
    launch; (h, w) is ``size`` at the reference input side ``ref``, in proportion for x's.

    Eager (and as a leaf of an FX graph) it is :func:`stn_triton.spatial_transform` for any family:
    the fused kernels on CUDA, the reference on the CPU. Scripted it builds the matrices of the
    attention, affine and projective families itself and calls the fused op
    ``torch.ops.stn_triton.{affine,projective}_sample`` (the same op the eager path runs on CUDA);
    other families build their kernel form in Python (a basis per output size) and raise there."""

    __jit_ignored_attributes__ = ["_family"]

    def __init__(self, family, size, ref, mode="bilinear", padding_mode="zeros", align_corners=False):
        super().__init__()
        st.functional._check_options(mode, padding_mode, align_corners)  # at construction: scripted runs skip it
        self.size, self.ref = int(size), int(ref)
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, bool(align_corners)  # None: False
        self.form = _SCRIPTED_FORMS.get(type(family), 0)
        self.family_name = family.name
        # the family is the model's submodule; kept here unregistered so that its state stays the model's
        object.__setattr__(self, "_family", family)

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        size = scaled_size(x, self.size, self.ref)
        if torch.jit.is_scripting():
            return self._fused(x, theta, size)
        else:
            return st.spatial_transform(x, theta, self._family, size, self.mode, self.padding_mode,
                                        self.align_corners)

    def _fused(self, x: torch.Tensor, theta: torch.Tensor, size: List[int]) -> torch.Tensor:
        N, K = theta.shape[0], theta.shape[1]
        if self.form == 1:  # attention (s, tx, ty) -> [[s, 0, tx], [0, s, ty]]
            s, tx, ty = theta[..., 0], theta[..., 1], theta[..., 2]
            zero = torch.zeros_like(s)
            m = torch.stack([s, zero, tx, zero, s, ty], dim=-1).reshape(N, K, 2, 3)
            return torch.ops.stn_triton.affine_sample(x, m, size, self.mode, self.padding_mode, self.align_corners)
        if self.form == 2:  # affine: the 2x3 matrix, row-major
            m = theta.reshape(N, K, 2, 3)
            return torch.ops.stn_triton.affine_sample(x, m, size, self.mode, self.padding_mode, self.align_corners)
        if self.form == 3:  # projective: the homography with its last entry 1
            h = torch.cat([theta, torch.ones_like(theta[..., :1])], dim=-1).reshape(N, K, 3, 3)
            return torch.ops.stn_triton.projective_sample(x, h, size, self.mode, self.padding_mode,
                                                           self.align_corners)
        raise RuntimeError("ParallelSTNet scripted: the family " + self.family_name + " builds its kernel form "
                           "in Python; TorchScript runs the attention, affine and projective families only")

    def extra_repr(self):
        return f"family={self.family_name!r}, size={self.size}, ref={self.ref}, mode={self.mode!r}"


# --- timm conventions shared by both models --------------------------------------------------------

def _set_checkpointing(model, enable):
    """Delegate to a timm model's own ``set_grad_checkpointing``; False when it has none or refuses
    (timm's Inception-v3 and a few others assert ``not enable``)."""
    fn = getattr(model, "set_grad_checkpointing", None)
    if fn is None:
        return False
    try:
        fn(enable)
    except (AssertionError, NotImplementedError):
        return False
    return True


def _layer_ids(model, coarse):
    """{parameter name: layer index} by the model's own ``group_matcher`` (timm's grouping: the stem
    first, what it leaves unmatched, the head, last), or one layer for a model without one."""
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return {n: 0 for n, _ in model.named_parameters()}
    return group_parameters(model, matcher(coarse=coarse), reverse=True)


def _layer_paths(ids):
    """{layer: [module path, ...]}: for each layer the shortest module paths (or parameter names)
    all of whose parameters lie in that layer, in order."""
    layers_under = defaultdict(set)
    for name, layer in ids.items():
        parts = name.split(".")
        for d in range(1, len(parts) + 1):
            layers_under[".".join(parts[:d])].add(layer)
    out = defaultdict(list)
    for name, layer in ids.items():
        parts = name.split(".")
        path = next(p for p in (".".join(parts[:d]) for d in range(1, len(parts) + 1)) if len(layers_under[p]) == 1)
        if path not in out[layer]:
            out[layer].append(path)
    return out


def _stacked_matcher(parts, head=None):
    """timm's ``group_matcher`` dict (regexes, in order) for timm backbones used side by side.

    ``parts``: [(regex prefix of a backbone's parameters, its {name: layer})]. Layer i of every part
    is one group (the stems together, then the next layers, ...); ``head`` (a regex), if given, is
    the last group. The regexes name module paths, so they hold for any backbone, whatever form its
    own matcher takes (Inception-v3's is a function)."""
    paths = [(prefix, _layer_paths(ids)) for prefix, ids in parts]
    depth = max((max(p) + 1 for _, p in paths if p), default=0)
    groups = {}
    for i in range(depth):
        alternatives = [rf"^{prefix}(?:{'|'.join(map(re.escape, p[i]))})(?:\.|$)" for prefix, p in paths if p.get(i)]
        if alternatives:
            groups[f"layer{i}"] = "|".join(alternatives)
    if head is not None:
        groups["head"] = head
    return groups


def _parallel_cfg(branch_cfg, loc_cfg, k, input_size, num_classes=1000, pool_size=None, min_input_size=None):
    """The pretrained_cfg (data config) of a parallel model: the branches' normalisation and
    interpolation, the whole input at ``input_size`` (no centre crop: crop_pct 1), ``pool_size`` the
    side of ``forward_features``' maps at that size (the branches' at branch_size), ``first_conv``
    the stems of the localisation network and of every branch, ``classifier`` the ``fc``."""
    first = ()
    if loc_cfg.get("first_conv"):
        first += _prefixed("localization.", loc_cfg["first_conv"])
    if branch_cfg.get("first_conv"):
        first += tuple(n for i in range(k) for n in _prefixed(f"branches.{i}.", branch_cfg["first_conv"]))
    return {
        **{key: branch_cfg[key] for key in ("mean", "std", "interpolation") if key in branch_cfg},
        "input_size": tuple(input_size), "fixed_input_size": False, "crop_pct": 1.0, "crop_mode": "center",
        **({"pool_size": tuple(pool_size)} if pool_size else {}),
        **({"min_input_size": tuple(min_input_size)} if min_input_size else {}),
        "num_classes": num_classes, **({"first_conv": first} if first else {}), "classifier": "fc", **_PAPER,
    }


def _min_input_size(in_chans, img_size, branch_size, min_branch_size):
    """The input side at which the parts are ``min_branch_size`` (at most img_size), as timm's
    ``min_input_size``."""
    if not min_branch_size:
        return None
    side = min(img_size, math.ceil(min_branch_size * img_size / branch_size))
    return (in_chans, side, side)


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
        loc_size: the side the localisation network sees (the input resized, 224). The sides are
            those at an img_size input; another input size scales them in proportion (rounded).
        init_scale: the half-width of the starting crops (defaults to the fixed scale, else 0.5).
        device, dtype: where and in which dtype the parameters are made (timm's factory arguments).

    Attributes (timm's): ``num_features`` (channels of ``forward_features``: K times the branch
    backbone's), ``head_hidden_size`` (width of the pre-logits: K times ``branch_features``, the
    branch's pooled width), ``num_classes``, ``feature_info``, ``pretrained_cfg``.
    """

    # not needed by the compiled forward (the sampler holds what it needs); a family need not script
    __jit_ignored_attributes__ = ["family"]

    def __init__(self, backbone="inception_v3", loc_backbone=None, num_transforms=4, num_classes=1000,
                 transform="attention", transform_options=None, fixed_params="default", img_size=448,
                 branch_size=224, loc_size=224, loc_hidden=128, init_scale=None, drop_rate=0.0, global_pool="avg",
                 in_chans=3, backbone_pretrained=False, cache_dir=None, mode="bilinear", padding_mode="zeros",
                 align_corners=False, device=None, dtype=None):
        super().__init__()
        if not isinstance(num_transforms, int) or num_transforms < 1:
            raise ValueError(f"num_transforms: expected a positive int, got {num_transforms!r}")
        for name, v in (("img_size", img_size), ("branch_size", branch_size), ("loc_size", loc_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        dd = dict(device=device, dtype=dtype)
        self.family = _family(transform, dict(transform_options or {}))  # names `transform` when unknown
        P = self.family.num_params
        if fixed_params == "default":
            fixed_params = {0: 0.5} if self.family.name == "attention" else {}
        fixed_params = dict(fixed_params or {})
        for i in fixed_params:
            if not isinstance(i, int) or not 0 <= i < P:
                raise ValueError(f"fixed_params: index {i!r} is not a parameter of {self.family.name!r} (0..{P - 1})")
        self.num_transforms, self.num_classes, self.in_chans = num_transforms, num_classes, in_chans
        self.img_size, self.branch_size, self.loc_size = img_size, branch_size, loc_size
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self._checkpoint_loc = self._checkpoint_branches = False  # checkpoint whole (the backbone can't)

        loc_backbone = loc_backbone or backbone
        self.localization = _backbone(loc_backbone, backbone_pretrained, cache_dir, in_chans=in_chans, **dd)
        self.loc_hidden = nn.Sequential(nn.Linear(_pre_logits_width(self.localization), loc_hidden, **dd),
                                        nn.ReLU(inplace=True))
        free = [i for i in range(P) if i not in fixed_params]
        scale = init_scale if init_scale is not None else fixed_params.get(0, 0.5)
        with torch.device("cpu"):  # the starting values, whatever device context the model is made in
            start = initial_theta(self.family, num_transforms, scale)
            for i, v in fixed_params.items():
                start[:, i] = float(v)
        where = device if device is not None else torch.empty(0).device  # (a device context's, else cpu)
        self.register_buffer("theta_start", start.to(device=where, dtype=dtype), persistent=False)
        self.register_buffer("free_index", torch.tensor(free, dtype=torch.long, device=where), persistent=False)
        # the regression layer: zero weights, bias = the free starting parameters (as in the paper)
        self.loc_head = _ThetaHead(loc_hidden, num_transforms * len(free), **dd)
        nn.init.zeros_(self.loc_head.weight)
        with torch.no_grad():
            self.loc_head.bias.copy_(start[:, free].flatten())
        self.sampler = _Sampler(self.family, branch_size, img_size, mode, padding_mode, align_corners)

        self.branches = nn.ModuleList(_backbone(backbone, backbone_pretrained, cache_dir, in_chans=in_chans,
                                                global_pool=global_pool, **dd) for _ in range(num_transforms))
        self._sync_widths()
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

        ratio = img_size / branch_size
        self.feature_info = [
            dict(d, num_chs=num_transforms * d["num_chs"], reduction=_reduction(d["reduction"] * ratio),
                 branch_reduction=d["reduction"], module=f"branches.*.{d['module']}")
            for d in getattr(self.branches[0], "feature_info", [])]
        # built from the backbones' configs; timm.create_model replaces it with the registered one
        # (the same for these sizes, plus architecture: the registered name)
        self.pretrained_cfg = self.default_cfg = _parallel_cfg(
            self.branches[0].pretrained_cfg, self.localization.pretrained_cfg, num_transforms,
            (in_chans, img_size, img_size), num_classes, _map_size(backbone, in_chans, branch_size))

    def _sync_widths(self):
        b = self.branches[0]
        self.branch_features = _pre_logits_width(b)  # one branch's pooled pre-logits width
        self.num_features = self.num_transforms * b.num_features
        self.head_hidden_size = self.num_transforms * self.branch_features

    # --- the transforms -------------------------------------------------------------------------
    def localize(self, x: torch.Tensor) -> torch.Tensor:
        """theta (N, K, P) for a batch of inputs (float32 at least, also under autocast)."""
        small = localization_input(x, self.loc_size, self.img_size)
        # checkpointed whole when on and the backbone can't do it itself (the test written out in each
        # forward: TorchScript takes no functions as values, and skips the branch when scripting)
        if self._checkpoint_loc and self.grad_checkpointing and torch.is_grad_enabled() \
                and not torch.jit.is_scripting():
            feats = _checkpoint(self.localization, small)
        else:
            feats = self.localization(small)
        free = self.loc_head(self.loc_hidden(feats))
        free = free.view(x.shape[0], self.num_transforms, -1)
        theta = self.theta_start.to(free.dtype).expand(x.shape[0], -1, -1).clone()
        return theta.index_copy(2, self.free_index, free)

    def crops(self, x: torch.Tensor, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The K sampled branch inputs (N, K, C, h, w), (h, w) = (branch_size, branch_size) for an
        img_size input: one fused launch."""
        if theta is None:
            theta = self.localize(x)
        return self.sampler(x, theta)

    # --- timm's model API -----------------------------------------------------------------------
    def forward_features_and_theta(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``forward_features(x)`` and the transforms theta (N, K, P) that sampled the branches."""
        theta = self.localize(x)
        parts = self.sampler(x, theta)
        feats: List[torch.Tensor] = []
        for k, b in enumerate(self.branches):
            if self._checkpoint_branches and self.grad_checkpointing and torch.is_grad_enabled() \
                    and not torch.jit.is_scripting():
                feats.append(_checkpoint(b.forward_features, parts[:, k]))
            else:
                feats.append(b.forward_features(parts[:, k]))
        return torch.cat(feats, dim=1), theta

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The branches' feature maps concatenated on channels: (N, num_features = K * C, h, w), branch
        k's in channels [k * C, (k + 1) * C)."""
        return self.forward_features_and_theta(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Each branch's own head up to its pre-logits (pooling, MobileNetV3's conv_head) on its
        channels of ``x``, concatenated (N, head_hidden_size), then dropout and the classifier."""
        pooled: List[torch.Tensor] = []
        start = 0
        for b in self.branches:
            width: int = b.num_features
            pooled.append(b.forward_head(x.narrow(1, start, width), pre_logits=True))
            start += width
        x = self.head_drop(torch.cat(pooled, dim=1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        """A new classifier for ``num_classes`` (none: 0); ``global_pool`` (None: keep) is every branch's
        pooling (``''``: none, the output is then the branches' head maps). The new layers are on the
        model's device and dtype, in its training mode."""
        self.num_classes = num_classes
        if global_pool is not None:  # the branches pool their own features
            for b in self.branches:
                b.reset_classifier(0, global_pool)
        self._sync_widths()
        w = self.loc_head.weight
        self.fc = nn.Linear(self.head_hidden_size, num_classes, device=w.device, dtype=w.dtype) \
            if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)
        self.pretrained_cfg["num_classes"] = num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        """Gradient checkpointing: delegated to each backbone that supports it (per block); a backbone
        that does not (timm's Inception-v3) is checkpointed whole, one segment per branch and one
        for the localisation network."""
        self.grad_checkpointing = enable
        self._checkpoint_loc = not _set_checkpointing(self.localization, enable)
        self._checkpoint_branches = not all([_set_checkpointing(b, enable) for b in self.branches])

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        """timm's parameter grouping (layer-wise decay): layer i of the localisation backbone and of
        every branch (by the backbone's own group_matcher) form group i; the layers that start fresh
        (localisation head, classifier) are the last group."""
        return _stacked_matcher([(r"localization\.", _layer_ids(self.localization, coarse)),
                                 (r"branches\.\d+\.", _layer_ids(self.branches[0], coarse))],
                                head=r"^(?:loc_hidden|loc_head|fc)\.")

    def localization_parameters(self):
        """The localisation network and its head (to train at a lower rate, as in the paper)."""
        return [*self.localization.parameters(), *self.loc_hidden.parameters(), *self.loc_head.parameters()]

    # --- timm's feature API ---------------------------------------------------------------------
    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates``: the maps of the stages ``indices`` selects (of
        ``feature_info``: None all, n the last n, or a list), each the K branches' maps concatenated
        on channels; with the final map (``forward_features``'s) first unless ``intermediates_only``.
        Scriptable when the branch backbone's is (MobileNetV3's is, timm's Inception-v3's is not)."""
        if output_fmt != "NCHW":
            raise ValueError("output_fmt: only 'NCHW' is supported, got '" + output_fmt + "'")
        if not hasattr(self.branches[0], "forward_intermediates"):
            raise NotImplementedError(f"forward_intermediates: the branch backbone "
                                      f"{type(self.branches[0]).__name__} has no forward_intermediates")
        parts = self.crops(x)
        finals: List[torch.Tensor] = []
        taps: List[List[torch.Tensor]] = []
        for k, b in enumerate(self.branches):
            if self._checkpoint_branches and self.grad_checkpointing and torch.is_grad_enabled() \
                    and not torch.jit.is_scripting():
                out = _checkpoint(functools.partial(b.forward_intermediates, indices=indices, norm=norm,
                                                    stop_early=stop_early, output_fmt=output_fmt,
                                                    intermediates_only=intermediates_only), parts[:, k])
            else:
                out = b.forward_intermediates(parts[:, k], indices=indices, norm=norm, stop_early=stop_early,
                                              output_fmt=output_fmt, intermediates_only=intermediates_only)
            if torch.jit.isinstance(out, List[torch.Tensor]):
                taps.append(out)
            elif torch.jit.isinstance(out, Tuple[torch.Tensor, List[torch.Tensor]]):
                finals.append(out[0])
                taps.append(out[1])
        maps = [torch.cat([t[i] for t in taps], 1) for i in range(len(taps[0]))]
        if intermediates_only:
            return maps
        return torch.cat(finals, 1), maps

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the branches' layers after the last stage ``indices`` selects (and the head, with
        ``prune_head``); the localisation network stays whole. Returns the kept indices."""
        kept = [b.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
                for b in self.branches][0]
        width = self.head_hidden_size
        self._sync_widths()
        if prune_head or self.head_hidden_size != width:
            self.reset_classifier(0)
        return kept


def _reduction(r):
    return int(r) if float(r).is_integer() else r


class _StageHook:
    """The forward hook applying a transformer to a stage's output. An object, not a closure, so that
    ``copy.deepcopy`` of the model (timm's ModelEma) binds the copy's hook to the copy's transformer,
    and the model pickles."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.calls = 0

    def __call__(self, module, args, output):
        self.calls += 1
        return self.transformer(output)


def _output_module(module):
    """The module whose output is ``module``'s: down the last children of plain ``nn.Sequential``s
    (MobileNetV3's stages, ResNet's layers), so that a hook on it also runs when the backbone
    calls the stage's blocks one by one (timm's gradient checkpointing, ``checkpoint_seq``)."""
    while type(module) is nn.Sequential and len(module):
        module = module[-1]
    return module


class STMultiNet(nn.Module):
    """A timm backbone with spatial transformers inserted before chosen stages ("ST-CNN Multi").

    ``stages`` lists where: ``0`` is the input image; ``i >= 1`` is the output of the backbone's
    feature stage i (``feature_info[i - 1]``, the stages ``features_only`` exposes), so the
    transformer acts before stage i + 1. Each transformer has a small localisation head on the
    feature map it transforms and keeps the map's size. The backbone stays a whole timm model: its
    own ``forward_features``/``forward_head``/classifier are used, the transformers being applied by
    forward hooks on the stage modules (a forward whose backbone skipped one raises).
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
        self._stage_hooks = {}
        for s in stages:
            chs = in_chans if s == 0 else info[s - 1]["num_chs"]
            loc = nn.Sequential(nn.Conv2d(chs, loc_channels, 3, padding=1), nn.ReLU(inplace=True),
                                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * loc_channels, 32),
                                nn.ReLU(inplace=True))
            self.transformers[str(s)] = st.SpatialTransformer(loc, transform=transform, **transform_options)
            if s > 0:
                hook = self._stage_hooks[str(s)] = _StageHook(self.transformers[str(s)])
                module = _output_module(self.backbone.get_submodule(info[s - 1]["module"]))
                self._hooks.append(module.register_forward_hook(hook))
        self.feature_info = info
        self.grad_checkpointing = False
        self._sync()
        cfg = {k: v for k, v in getattr(self.backbone, "pretrained_cfg", {}).items() if k not in _WEIGHT_KEYS}
        for key in ("first_conv", "classifier"):  # module names: now under backbone.
            if isinstance(cfg.get(key), str):
                cfg[key] = "backbone." + cfg[key]
            elif cfg.get(key):
                cfg[key] = _prefixed("backbone.", cfg[key])
        self.pretrained_cfg = self.default_cfg = cfg

    def _sync(self):
        self.num_classes = self.backbone.num_classes
        self.num_features = self.backbone.num_features
        self.head_hidden_size = _pre_logits_width(self.backbone)

    def forward_features(self, x):
        for hook in self._stage_hooks.values():
            hook.calls = 0
        if 0 in self.stages:
            x = self.transformers["0"](x)
        x = self.backbone.forward_features(x)
        missed = [k for k, hook in self._stage_hooks.items() if not hook.calls]
        if missed:
            raise RuntimeError(
                f"STMultiNet: the transformers after feature stages {', '.join(missed)} did not run: the backbone "
                f"({type(self.backbone).__name__}) bypassed the modules they hook "
                f"({', '.join(self.feature_info[int(k) - 1]['module'] for k in missed)})")
        return x

    def forward_head(self, x, pre_logits: bool = False):
        return self.backbone.forward_head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self):
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes, *args, **kwargs):
        self.backbone.reset_classifier(num_classes, *args, **kwargs)
        self._sync()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        """Delegated to the backbone (the transformers run inside its checkpointed segments). A
        backbone without it (timm's Inception-v3) raises: checkpointing the whole network as one
        segment would save no memory."""
        if not _set_checkpointing(self.backbone, enable) and enable:
            raise NotImplementedError(f"set_grad_checkpointing: the backbone ({type(self.backbone).__name__}) "
                                      f"does not support gradient checkpointing")
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        """The backbone's own grouping (under ``backbone.``), the transformers (which start fresh) in
        its last group, with its classifier."""
        groups = _stacked_matcher([(r"backbone\.", _layer_ids(self.backbone, coarse))])
        last = next(reversed(groups))
        groups[last] += r"|^transformers\."
        return groups

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """The backbone's ``forward_intermediates`` with the transformers applied (at its
        ``feature_info`` stages)."""
        if 0 in self.stages:
            x = self.transformers["0"](x)
        return self.backbone.forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early,
                                                   output_fmt=output_fmt, intermediates_only=intermediates_only)

    def localization_parameters(self):
        return [p for t in self.transformers.values() for p in [*t.localization.parameters(), *t.head.parameters()]]


# --- timm registrations ---------------------------------------------------------------------------

_VARIANTS = {
    # the paper's CUB models: Inception-v3 localisation and parts, 448 px input, 224 px parts
    "stn_inception_v3_2x": dict(backbone="inception_v3", num_transforms=2, img_size=448, branch_size=224,
                                loc_size=224),
    "stn_inception_v3_4x": dict(backbone="inception_v3", num_transforms=4, img_size=448, branch_size=224,
                                loc_size=224),
    # a light variant for the CPU
    "stn_mobilenetv3_small_2x": dict(backbone="mobilenetv3_small_100", num_transforms=2, img_size=224,
                                     branch_size=112, loc_size=112),
}
_FIXED = ("backbone", "num_transforms")
# The registered configs' pool_size: the side of forward_features' maps at the registered sizes (a test
# measures it). Inception-v3's unpadded convolutions need parts of at least 75 px, and below 112 px its
# last maps shrink to 1 px, off feature_info's reductions: min_input_size keeps the parts at 112 px.
_POOL_SIZE = {"inception_v3": (5, 5), "mobilenetv3_small_100": (4, 4)}
_MIN_BRANCH = {"inception_v3": 112}


def _registered_cfg(backbone, num_transforms, img_size, branch_size, **_):
    cfg = timm.models.get_pretrained_cfg(backbone).to_dict()
    return _parallel_cfg(cfg, cfg, num_transforms, (3, img_size, img_size), pool_size=_POOL_SIZE[backbone],
                         min_input_size=_min_input_size(3, img_size, branch_size, _MIN_BRANCH.get(backbone)))


default_cfgs = generate_default_cfgs({name: _registered_cfg(**args) for name, args in _VARIANTS.items()})


def _create(variant, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
    """timm's ``build_model_with_cfg``: the registered config (``architecture`` = the variant), with
    what depends on the model's arguments (input size, pool size, smallest input, class count) set to
    this model's, and ``features_only`` (timm's FeatureGetterNet). ``pretrained=True`` loads every
    backbone's ImageNet weights through timm's own loading; the transformer heads and the classifier
    start fresh (localisation head at the starting regions)."""
    args = _VARIANTS[variant]
    clash = [k for k in _FIXED if k in kwargs]
    if clash:
        raise TypeError(f"{variant}: {' and '.join(clash)}: set by the model's name; build ParallelSTNet(...) "
                        f"for another combination")
    if kwargs.get("features_only"):
        cls = kwargs.get("feature_cls", "getter")
        if not (isinstance(cls, str) and cls.lower() == "getter"
                or any(c.__name__ == "FeatureGetterNet" for c in getattr(cls, "__mro__", ()))):
            raise ValueError(f"{variant}: features_only supports feature_cls='getter' only (got {cls!r}): its maps "
                             f"(the branches' maps concatenated) come from forward_intermediates, they are not the "
                             f"output of single modules as the hook, dict and fx extractors need")
    kwargs = {**{k: v for k, v in args.items() if k not in _FIXED}, **kwargs}
    in_chans, img, branch = kwargs.get("in_chans", 3), kwargs["img_size"], kwargs["branch_size"]
    overlay = {}
    if all(isinstance(v, int) and v >= 1 for v in (in_chans, img, branch)):  # else ParallelSTNet says what is wrong
        overlay = {"input_size": (in_chans, img, img), "pool_size": _map_size(args["backbone"], in_chans, branch),
                   "min_input_size": _min_input_size(in_chans, img, branch, _MIN_BRANCH.get(args["backbone"]))}
    if "num_classes" in kwargs:
        overlay["num_classes"] = kwargs["num_classes"]
    overlay.update(pretrained_cfg_overlay or {})
    model_cls = functools.partial(ParallelSTNet, backbone_pretrained=pretrained, cache_dir=cache_dir,
                                  **{k: args[k] for k in _FIXED})
    # pretrained=False to timm: there are no weights of the whole model, the backbones load their own
    return build_model_with_cfg(model_cls, variant, pretrained=False, pretrained_cfg=pretrained_cfg,
                                pretrained_cfg_overlay=overlay, feature_cfg=dict(feature_cls="getter"), **kwargs)


@register_model
def stn_inception_v3_2x(pretrained=False, **kwargs):
    """The paper's CUB model with 2 attention transformers: Inception-v3 localisation and parts,
    448 px input, each part sampled at 224 px."""
    return _create("stn_inception_v3_2x", pretrained, **kwargs)


@register_model
def stn_inception_v3_4x(pretrained=False, **kwargs):
    """The paper's CUB model with 4 attention transformers (84.1% on CUB-200-2011 in the paper)."""
    return _create("stn_inception_v3_4x", pretrained, **kwargs)


@register_model
def stn_mobilenetv3_small_2x(pretrained=False, **kwargs):
    """A light variant for the CPU: MobileNetV3-Small localisation and parts, 2 transformers,
    224 px input, each part sampled at 112 px."""
    return _create("stn_mobilenetv3_small_2x", pretrained, **kwargs)
