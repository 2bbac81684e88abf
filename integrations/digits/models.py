"""The paper's distorted-digits models, at a size a laptop CPU trains in seconds.

Every model is a first stage that brings the canvas (28, 42 or 60 px, by distortion) to the
classifier's input size (``st_size``, 28 px), then a classifier, FCN or CNN, which is the same
module, with the same parameters, in the baseline and in the ST models of its kind:

- ST-FCN-* and ST-CNN-*: the first stage is a spatial transformer (affine, projective or tps) whose
  localisation network is of the classifier's kind (as in the paper) and sees the whole canvas; it
  samples its output at the classifier's size, so it can zoom.
- FCN and CNN (the baselines): the first stage resamples the canvas to the classifier's size with
  the same sampler and grid as an ST at its identity start, then adds a learnt residual stage of
  the classifier's kind (FCN: fully connected 784 -> k -> 784; CNN: three 5 x 5 convolutions,
  1 -> c -> c -> 1 channels, at half resolution and upsampled back) whose last layer starts at
  zero. The stage's width (k, c) is chosen per canvas so that its parameters match the affine ST's
  localisation network and regression layer.

So parameter counts match within a few percent across the models of each distortion at every canvas
size (the count of each model is in every cell of the table); every model of a kind starts as the
same function (the classifier on the canvas resampled to 28 px); and what differs is only what the
first stage learns: an input-dependent geometric transformation (the STs) or an image filter of the
same size (the baselines). The baselines therefore see the canvas at the classifier's resolution,
as the STs' classifiers do, and not at full resolution as the paper's baselines did.
"""

from pathlib import Path

import torch
from torch import nn

import stn_triton as st

MODELS = ("FCN", "CNN", "ST-FCN-aff", "ST-FCN-proj", "ST-FCN-tps", "ST-CNN-aff", "ST-CNN-proj", "ST-CNN-tps")
FAMILY = {"aff": "affine", "proj": "projective", "tps": "tps"}
BASE = {"ST-FCN": "FCN", "ST-CNN": "CNN"}  # the baseline each ST model is compared with
CHECKPOINT_FORMAT = "stn-digits-model/1"


def base_model(name):
    """The baseline of model ``name`` (FCN for the ST-FCNs, CNN for the ST-CNNs; itself for a baseline)."""
    return BASE.get(name.rsplit("-", 1)[0], name)


def fcn(side, hidden=128, classes=10, channels=1):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, hidden), nn.ReLU(True),
                         nn.Linear(hidden, hidden), nn.ReLU(True), nn.Linear(hidden, classes))


def cnn(side, width=(16, 32), classes=10, channels=1, norm=False, hidden=None):
    """Two 5 x 5 convolutions (each with ReLU and 2 x 2 max pooling; ``norm``: batch normalisation
    after each), then a linear layer (``hidden``: two, with that many hidden units and a ReLU)."""
    a, b = width
    after = (side // 2) // 2

    def bn(c):
        return [nn.BatchNorm2d(c)] if norm else []
    convs = [nn.Conv2d(channels, a, 5, padding=2), *bn(a), nn.ReLU(True), nn.MaxPool2d(2),
             nn.Conv2d(a, b, 5, padding=2), *bn(b), nn.ReLU(True), nn.MaxPool2d(2), nn.Flatten()]
    head = [nn.Linear(b * after * after, classes)] if not hidden else [  # made after the convolutions (the
        nn.Linear(b * after * after, hidden), nn.ReLU(True), nn.Linear(hidden, classes)]  # seeded init's order)
    return nn.Sequential(*convs, *head)


def classifier(kind, side, classes=10, channels=1):
    """The classifier of ``kind`` (FCN or CNN) on ``side`` px: the same in the baseline and the STs."""
    return fcn(side, classes=classes, channels=channels) if kind == "FCN" else cnn(side, classes=classes,
                                                                                    channels=channels)


def localization(kind, side, channels=1):
    """A small localisation network ending in 32 features."""
    if kind == "FCN":
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, 32), nn.ReLU(True), nn.Linear(32, 32),
                             nn.ReLU(True))
    return nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(channels, 8, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(True), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        nn.Linear(16 * 9, 32), nn.ReLU(True),
    )


def residual_stage(kind, size, width, channels=1):
    """The baselines' learnt stage on the resampled (size x size) image of ``channels`` channels: its
    last layer is zero, so it starts as nothing."""
    if kind == "FCN":
        last = nn.Linear(width, channels * size * size)
        layers = [nn.Flatten(), nn.Linear(channels * size * size, width), nn.ReLU(True), last,
                  nn.Unflatten(1, (channels, size, size))]
    else:  # at half resolution, then back up (the cost of a full-resolution stage is three classifiers')
        last = nn.Conv2d(width, channels, 5, padding=2)
        layers = [nn.AvgPool2d(2), nn.Conv2d(channels, width, 5, padding=2), nn.ReLU(True),
                  nn.Conv2d(width, width, 5, padding=2), nn.ReLU(True), last,
                  nn.Upsample(size=(size, size), mode="bilinear", align_corners=False)]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def localization_parameters(kind, side, transform="affine", grid_size=(4, 4)):
    """Parameters of an ST's localisation network and regression layer (32 features -> the
    family's parameters) on a ``side`` px canvas."""
    options = {"grid_size": grid_size} if transform == "tps" else {}
    p = st.SpatialTransformer(nn.Identity(), transform=transform, **options).family.num_params
    return _count(localization(kind, side)) + 32 * p + p


def matched_width(kind, side, size, target=None, make=None):
    """The baseline's residual-stage width whose parameter count is nearest ``target`` (default: the
    affine ST's localisation network on a ``side`` px canvas); ``make(width)`` builds what is counted
    (default: the residual stage of ``kind`` on ``size`` px)."""
    target = localization_parameters(kind, side) if target is None else target
    make = make or (lambda w: residual_stage(kind, size, w))
    widths = range(1, 512) if kind == "FCN" else range(1, 128)
    return min(widths, key=lambda w: abs(_count(make(w)) - target))


def resample(x, size):
    """The canvas sampled at ``size`` x ``size`` on the identity grid: what a spatial transformer
    at its identity start produces (the same sampler); the input itself when it has that size."""
    if x.shape[-2:] == (size, size):
        return x
    theta = torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    return st.affine_sample(x, theta, (size, size))


class Baseline(nn.Module):
    """FCN or CNN: the canvas resampled to the classifier's size, a learnt residual stage (or none:
    ``stage=None``), the classifier."""

    def __init__(self, size, stage, classifier):
        super().__init__()
        self.size, self.stage, self.classifier = size, stage, classifier

    def front(self, x):
        """What the classifier sees."""
        r = resample(x, self.size)
        return r if self.stage is None else r + self.stage(r)

    def forward(self, x):
        return self.classifier(self.front(x))


class STClassifier(nn.Module):
    """A spatial transformer, then a classifier on what it produced."""

    def __init__(self, transformer, classifier):
        super().__init__()
        self.transformer, self.classifier = transformer, classifier

    def front(self, x):
        """What the classifier sees: the transformer's output; with K > 1 transformers their K outputs
        (N, K, C, H, W) side by side on the channels (N, K * C, H, W)."""
        out = self.transformer(x)
        return out.flatten(1, 2) if out.dim() == 5 else out

    def forward(self, x):
        return self.classifier(self.front(x))

    def parameter_groups(self, lr, localization_lr_scale=0.1):
        groups = self.transformer.parameter_groups(lr, localization_lr_scale)
        return groups + [{"params": list(self.classifier.parameters()), "lr": lr}]


def build(name, side, st_size=None, classes=10, grid_size=(4, 4)):
    """Model ``name`` (see ``MODELS``) for square inputs of ``side`` pixels. Every model brings its
    input to ``st_size`` (default: ``side``) before classifying (see the module docstring)."""
    size = st_size or side
    if name in ("FCN", "CNN"):
        stage = residual_stage(name, size, matched_width(name, side, size))
        return Baseline(size, stage, classifier(name, size, classes))
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "ST" or parts[1] not in ("FCN", "CNN") or parts[2] not in FAMILY:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")
    kind, family = parts[1], FAMILY[parts[2]]
    options = {"grid_size": grid_size} if family == "tps" else {}
    transformer = st.SpatialTransformer(localization(kind, side), transform=family, size=(size, size), **options)
    return STClassifier(transformer, classifier(kind, size, classes))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def _materialise(model, side, device="cpu"):
    """Run one blank image through ``model`` so that its lazy layers (the ST's regression layer) exist."""
    with torch.no_grad():
        model(torch.zeros(1, 1, side, side, device=device))
    return model


def save_model(path, model, name, side, st_size=None, classes=10, grid_size=(4, 4), **info):
    """Write ``model`` (built by ``build(name, side, st_size, classes, grid_size)``) to ``path``: its
    state dict (on the CPU) and what :func:`load_model` needs to rebuild it; ``info`` (numbers and
    strings, e.g. the distortion, seed and test error) is stored alongside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "name": name, "side": int(side), "st_size": int(st_size or side),
                "classes": int(classes), "grid_size": list(grid_size), "info": dict(info),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    return path


def load_model(path, map_location="cpu"):
    """The model saved at ``path`` (by ``stn-digits --save-models`` or :func:`save_model`), rebuilt, in
    eval mode. ST models have ``.transformer`` (images (N, 1, side, side) in, the transformed
    (N, 1, st_size, st_size) out); the checkpoint's details are in ``.checkpoint_info``."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a stn-digits model (expected format {CHECKPOINT_FORMAT!r})")
    model = build(ckpt["name"], ckpt["side"], ckpt["st_size"], ckpt["classes"], tuple(ckpt["grid_size"]))
    _materialise(model, ckpt["side"])
    model.load_state_dict(ckpt["state_dict"])
    model.checkpoint_info = {k: ckpt[k] for k in ("name", "side", "st_size", "classes")} | ckpt["info"]
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
