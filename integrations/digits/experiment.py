"""The distorted-digits experiment (the paper's Table 1, in miniature): train each model on each
distortion for each seed, report percent test error, measure what the transformers learnt, and
draw it.

Training distortions are drawn afresh every epoch (their options may follow a per-epoch schedule,
:meth:`Config.train_options`); validation and test distortions are fixed by the seed. Every model
of one (distortion, seed) sees exactly the same images in the same order, except under RTS's pose
curriculum (``Config.pose_curriculum``), which only the transformer models follow. A validation split
(``val_fraction`` of the training set, the same for every seed) is held out for whatever is chosen
during training (``keep="best"``: the epoch whose weights are tested); the test set gives only the
final numbers.

What the transformers learnt is measured, not only drawn: on R and RTS, :func:`rotation_report`
compares the rotation each affine transformer undoes with the rotation the distortion applied.
"""

import contextlib
import copy
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import stn_triton as st
from transforms_registry.base import base_grid

from . import data as D
from .distortions import DISTORTIONS, FULL_ANGLE, RTS_CANVAS, RTS_SCALE, distort, object_scale_for
from .models import MODELS, base_model, build, count_parameters, save_model

OPTIMIZERS = ("adam", "sgd")
DEFAULT_LR = {"adam": 2e-3, "sgd": 1e-2}
SGD_MOMENTUM = 0.9
SGD_STEPS = (1 / 3, 2 / 3)  # SGD's rate is divided by 10 after these fractions of the epochs
ROTATING = ("R", "RTS")  # the distortions whose rotation is measured
PRECISIONS = ("float32", "bfloat16", "auto")
OBJECT_PERCENTILE = 99.0


@dataclass
class TrainConfig:
    """What every task of ``stn-digits`` shares: seeds, the optimiser and its schedule, the data and
    its split, where the results go. Each task's configuration extends it (:class:`Config` is the
    classification task's)."""

    seeds: tuple = (0, 1, 2)
    epochs: int = 40
    batch_size: int = 32
    optimizer: str = "adam"  # "adam" (one-cycle schedule) or "sgd" (momentum, step decay: the paper's)
    lr: float = None  # None: DEFAULT_LR[optimizer]
    localization_lr_scale: float = 1.0
    st_size: int = 28  # what the first stages produce (the classifiers' input size)
    data: str = "digits"  # "digits" (scikit-learn's) or a folder of MNIST-format IDX files
    train_limit: int = None
    test_limit: int = None
    val_fraction: float = 0.1  # held out of the training set
    keep: str = "last"  # which epoch's weights are tested: "last", or "best" on the validation split
    object_scale: float = None  # None: measured from the training images (see data.object_radius)
    device: str = "cpu"
    out: str = "runs/digits"
    figure_count: int = 12
    progress: bool = True  # progress bars, on a terminal only
    # what the training steps compute in: "float32", or "bfloat16" (autocast: convolutions and linear
    # layers in bfloat16, weights, optimiser and every transform parameter in float32; evaluation is
    # always float32), or "auto": bfloat16 where the device computes it natively (see compute_precision)
    precision: str = "float32"

    def __post_init__(self):
        self.seeds = check_distinct("seeds", self.seeds)
        for name in ("epochs", "batch_size", "st_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        for name in ("lr", "localization_lr_scale"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: expected a number in [0, 1), got {self.val_fraction!r}")
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None and (not isinstance(getattr(self, name), int)
                                                    or getattr(self, name) < 1):
                raise ValueError(f"{name}: expected a positive number of images, got {getattr(self, name)!r}")
        if self.train_limit is not None and self.val_fraction > 0 and not _splits(self.train_limit, self.val_fraction):
            f = self.val_fraction  # at least one image each side: n f > 1/2 and n (1 - f) > 1/2, about
            least = next(n for n in itertools.count(max(1, int(0.5 / f) - 2, int(0.5 / (1 - f)) - 2)) if _splits(n, f))
            raise ValueError(f"train_limit {self.train_limit}: too few images to hold out val_fraction "
                             f"{self.val_fraction:g} for validation and keep some for training; expected at least "
                             f"{least}, or val_fraction 0")
        if self.keep not in ("last", "best"):
            raise ValueError(f"keep: expected 'last' or 'best', got {self.keep!r}")
        if self.keep == "best" and self.val_fraction == 0:
            raise ValueError("keep: 'best' chooses on the validation split: give val_fraction > 0")
        if self.object_scale is not None and not 0 < self.object_scale <= 1:
            raise ValueError(f"object_scale: expected a number in (0, 1], got {self.object_scale!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        kind = str(self.device).split(":")[0]
        if self.precision == "bfloat16" and kind not in ("cpu", "cuda"):
            raise ValueError(f"precision: bfloat16 (autocast) needs a cpu or cuda device, got device "
                             f"{self.device!r}; expected float32 or auto there")

    def compute_precision(self):
        """``precision`` with "auto" decided for ``device``: "bfloat16" on a GPU that supports it, and
        on a CPU with bfloat16 instructions (AVX512-BF16 or AMX: on such a CPU a training step of the
        main job's models took 0.65 to 0.75 of its float32 time, the whole job 0.84), else "float32"."""
        if self.precision != "auto":
            return self.precision
        return "bfloat16" if _native_bfloat16(str(self.device)) else "float32"

    def took(self, seconds):
        """How long the task took, where, and in what precision, for its table's note."""
        how = ", trained in bfloat16 autocast" if self.compute_precision() == "bfloat16" else ""
        return f"{seconds:.0f} s on {self.device}{how}"

    def autocast(self):
        """The context a training step's forward runs in (autocast for "bfloat16", else nothing)."""
        if self.compute_precision() == "float32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _native_bfloat16(device):
    """Whether ``device`` computes bfloat16 in hardware: a CPU with AVX512-BF16 or AMX (torch's own
    probes; without them, another torch, no), a GPU of compute capability 8 or more (Ampere on; older
    ones only emulate it); any other device no."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8
    return False


def _splits(n, fraction):
    """Whether ``n`` training images hold out ``fraction`` for validation (as :meth:`data.Digits.hold_out`
    does) with at least one image on each side."""
    return 0 < int(round(n * fraction)) < n


@dataclass
class TaskConfig(TrainConfig):
    """A task whose runs are independent of each other (every task: classify, addition, colocalisation,
    3d): they may be trained several at once, each in its own process (:func:`run_jobs`)."""

    # runs trained at once, each in a process of its own with the CPU threads shared out among them:
    # small networks keep one thread far busier than two, so two runs of one thread each finish in
    # about the time of one run of two. 0: one per CPU thread on the CPU (at most one per run), 1 on
    # a GPU. A run's numbers can differ in the last digits with its number of threads.
    workers: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers: expected a number of processes >= 0 (0: one per CPU thread), "
                             f"got {self.workers!r}")


def check_distinct(name, given):
    """``given`` as a tuple of at least one entry, none of them twice (else ValueError)."""
    given = tuple(given)
    if not given:
        raise ValueError(f"{name}: needs at least one entry")
    for i, g in enumerate(given):
        if g in given[:i]:
            raise ValueError(f"{name}: {g} given twice")
    return given


def check_choices(name, given, allowed):
    """``given`` as a tuple, each of its entries one of ``allowed``, at least one and none twice (else
    ValueError)."""
    given = tuple(given)
    for g in given:
        if g not in allowed:
            raise ValueError(f"{name}: expected some of {', '.join(allowed)}, got {g!r}")
    return check_distinct(name, given)


def check_hold_end(name, given):
    """``given`` as a (hold, end) tuple of epochs, 0 <= hold < end, or () for none (else ValueError)."""
    given = tuple(given or ())
    if given and not (len(given) == 2 and all(isinstance(e, int) for e in given) and 0 <= given[0] < given[1]):
        raise ValueError(f"{name}: expected two epochs, hold and end, 0 <= hold < end (or none), got {given!r}")
    return given


def add_hold_end_option(p, flag, default, help, off_help):
    """``flag HOLD END`` (the default's epochs named in its help) and ``--no-<flag>`` to turn it off."""
    shown = " ".join(map(str, default)) or "none"
    p.add_argument(f"--{flag}", nargs=2, type=int, default=list(default) or None, metavar=("HOLD", "END"),
                   help=f"{help} (default: {shown})")
    p.add_argument(f"--no-{flag}", dest=flag.replace("-", "_"), action="store_const", const=[], help=off_help)


def curriculum_angle(full, epoch, curriculum):
    """The largest training rotation of epoch ``epoch`` (0-based) under a rotation curriculum of
    ``curriculum`` epochs: ``full / curriculum`` in the first, growing linearly to ``full`` in epoch
    ``curriculum`` (1-based), then ``full``; ``full`` throughout when ``curriculum`` is 0."""
    return full * min(1.0, (epoch + 1) / curriculum) if curriculum else full


@dataclass
class Config(TaskConfig):
    """The classification task (the main job): each model on each distortion for each seed."""

    distortions: tuple = ("R", "RTS")
    models: tuple = ("CNN", "ST-CNN-aff")
    precision: str = "auto"  # the main job's numbers and times are measured so (README)
    # R and RTS: the training images' largest rotation grows linearly from 1/curriculum of the full
    # angle in the first epoch to the full angle in epoch `curriculum` (1-based), then stays; 0: none.
    # The same images for every model; validation and test always use the full angle.
    curriculum: int = 15
    # RTS's pose curriculum, (hold, end) epochs, or () for none (RTS's angle then follows `curriculum`),
    # for the transformer models only: until epoch `hold` the training digits are centred and fill the
    # canvas as R's fill theirs (scale RTS_CANVAS) while their largest rotation grows from 6 to 90 degrees
    # (R's range); from `hold` to `end`, translation, scale and rotation move linearly to RTS's own
    # (validation and test always use them); and RTS's localisation networks learn at POSE_LR_SCALE times
    # the rate `localization_lr_scale` gives. The baselines train on RTS's images under `curriculum` (on
    # the pose curriculum's the CNN erred more: README). With it the affine transformer undoes RTS's
    # rotation on every seed tried, without it on few (README: the search).
    pose_curriculum: tuple = (8, 16)
    save_models: bool = False  # every trained model under <out>/models/
    distortion_options: dict = field(default_factory=dict)  # {"RTS": {"max_angle": 30}, ...}
    # per-epoch schedule of training-distortion options, e.g. {"R": {"max_angle": [[0, 20], [10, 90]]}}:
    # [epoch, value] knots, linear in between, the last value after the last knot (see train_options); a
    # value may be a list, e.g. {"RTS": {"scale": [[0, [0.9, 1.0]], [20, [0.7, 1.2]]]}}
    distortion_schedule: dict = field(default_factory=dict)

    def __post_init__(self):
        self.distortions = check_choices("distortions", self.distortions, DISTORTIONS)
        self.models = check_choices("models", self.models, MODELS)
        super().__post_init__()
        if not isinstance(self.curriculum, int) or self.curriculum < 0:
            raise ValueError(f"curriculum: expected a number of epochs >= 0, got {self.curriculum!r}")
        self.pose_curriculum = check_hold_end("pose_curriculum", self.pose_curriculum)
        for d, options in self.distortion_schedule.items():
            for name, knots in options.items():
                epochs = [k[0] for k in knots] if all(len(k) == 2 for k in knots) else None
                shapes = {len(k[1]) if isinstance(k[1], (list, tuple)) else None for k in knots} if epochs else None
                if not knots or epochs is None or epochs != sorted(set(epochs)) or len(shapes) != 1:
                    raise ValueError(f"distortion_schedule[{d!r}][{name!r}]: expected [[epoch, value], ...] with "
                                     f"increasing epochs and values all numbers or all lists of one length, "
                                     f"got {knots!r}")

    def options(self, distortion):
        """The options of ``distortion`` for validation and test (and training without a schedule)."""
        return dict(self.distortion_options.get(distortion, {}))

    def train_options(self, distortion, epoch):
        """The options of ``distortion`` for training epoch ``epoch`` (0-based): :meth:`options`, with
        every option in ``distortion_schedule[distortion]`` set to its value at that epoch (the hook for
        a curriculum; override it for schedules that knots cannot say). Without a schedule for them,
        RTS's ``translate``, ``scale`` and ``max_angle`` follow ``pose_curriculum`` (when given), and R's
        and RTS's ``max_angle`` follows ``curriculum``."""
        opts = self.options(distortion)
        schedule = dict(self.distortion_schedule.get(distortion, {}))
        if distortion == "RTS" and self.pose_curriculum:
            schedule = {**pose_schedule(*self.pose_curriculum, opts), **schedule}
        if self.curriculum and distortion in ROTATING and "max_angle" not in schedule:
            opts["max_angle"] = curriculum_angle(opts.get("max_angle", FULL_ANGLE[distortion]), epoch,
                                                 self.curriculum)
        for name, knots in schedule.items():
            opts[name] = _interpolate(knots, epoch)
        return opts

    def for_model(self, model_name):
        """This configuration as model ``model_name`` trains under it: a baseline (a model without a
        transformer) without the pose curriculum."""
        return replace(self, pose_curriculum=()) if base_model(model_name) == model_name else self

    def localization_lr_scale_for(self, distortion):
        """The localisation networks' rate factor on ``distortion`` (see ``pose_curriculum``)."""
        boost = POSE_LR_SCALE if distortion == "RTS" and self.pose_curriculum else 1.0
        return self.localization_lr_scale * boost


POSE_LR_SCALE = 3.0  # RTS's localisation rate under the pose curriculum, times --localization-lr-scale


def pose_schedule(hold, end, options):
    """RTS's pose curriculum as ``distortion_schedule`` knots: centred digits filling the canvas (scale
    ``canvas_factor``, as R's digits fill theirs), rotated by up to 6 growing to 90 degrees, until epoch
    ``hold``; then, by epoch ``end``, RTS's translation, scale range and largest rotation (``options``'
    or the defaults). The localisation network pools the canvas to 3 x 3 cells: a digit filling it
    spans them all, so its orientation reaches the network; one of RTS's size mostly fills one cell."""
    full_angle = options.get("max_angle", FULL_ANGLE["RTS"])
    scale = list(options.get("scale", RTS_SCALE))
    translate = float(options.get("translate", True))
    fill = float(options.get("canvas_factor", RTS_CANVAS))
    return {"translate": [[0, 0.0], [hold, 0.0], [end, translate]],
            "scale": [[0, [fill, fill]], [hold, [fill, fill]], [end, scale]],
            "max_angle": [[0, 6.0], [hold, FULL_ANGLE["R"]], [end, full_angle]]}


def _interpolate(knots, epoch):
    """The value of ``knots`` ([[epoch, value], ...]) at ``epoch``: linear between knots; a value may be
    a number or a list of numbers (e.g. RTS's ``scale`` range), interpolated element by element."""
    def between(a, b, f):
        if isinstance(a, (list, tuple)):
            return tuple(between(x, y, f) for x, y in zip(a, b, strict=True))
        return a + (b - a) * f

    (e0, v0) = knots[0]
    if epoch <= e0:
        return tuple(v0) if isinstance(v0, list) else v0
    for (e1, v1) in knots[1:]:
        if epoch <= e1:
            return between(v0, v1, (epoch - e0) / (e1 - e0))
        e0, v0 = e1, v1
    return tuple(v0) if isinstance(v0, list) else v0


class DataError(ValueError):
    """The data of a configuration cannot be read, or does not fit its options (a split left empty, a
    class it does not have); the message names the option (as its configuration field) or the file."""


def checked_data(cfg):
    """:func:`load_data`, with what goes wrong while reading and splitting the data, and a split left
    without images, raised as :class:`DataError`."""
    try:
        digits, objects = load_data(cfg)
    except (OSError, ValueError) as e:
        raise DataError(f"data {cfg.data}: {e}") from e
    for split, labels in (("training", digits.train_y), ("test", digits.test_y)):
        if not len(labels):
            raise DataError(f"data {cfg.data}: no {split} images")
    return digits, objects


def load_data(cfg):
    """The data of ``cfg`` (limits applied while reading), the validation split held out, and the
    object scale (measured unless ``cfg.object_scale`` is set); returns (digits, objects), objects
    saying what was measured and used."""
    if cfg.data == "digits":
        digits = D.load_sklearn_digits(train_limit=cfg.train_limit, test_limit=cfg.test_limit)
    else:
        digits = D.load_idx_dir(cfg.data, train_limit=cfg.train_limit, test_limit=cfg.test_limit)
    radius = D.object_radius(digits.train_x, percentile=OBJECT_PERCENTILE)
    scale = object_scale_for(radius) if cfg.object_scale is None else float(cfg.object_scale)
    objects = {"radius_px": round(radius, 2), "percentile": OBJECT_PERCENTILE, "keep_radius_px": D.FRAME / 2,
               "object_scale": round(scale, 4), "measured": cfg.object_scale is None}
    digits.object_scale = scale
    if cfg.val_fraction > 0:
        digits = digits.hold_out(cfg.val_fraction)
    return digits, objects


def _seed(*parts):
    """A 63-bit seed from a tuple (stable across runs and platforms)."""
    h = 1469598103934665603
    for b in repr(parts).encode():
        h = ((h ^ b) * 1099511628211) % 2**63
    return h


def _gen(*parts):
    return torch.Generator().manual_seed(_seed(*parts))


def distorted_test_set(distortion, digits, seed, cfg):
    """The test images of (``distortion``, ``seed``) and the parameters drawn for them (e.g.
    ``angle``, the rotation applied to each, in radians): the same for every model."""
    return distort(distortion, digits.test_x, _gen("test", distortion, seed), return_params=True,
                   object_scale=digits.object_scale, **cfg.options(distortion))


def _optimizer(model, cfg, steps_per_epoch):
    """(optimizer, scheduler, whether the scheduler steps every batch (else every epoch))."""
    groups = model.parameter_groups(cfg.lr, cfg.localization_lr_scale) if hasattr(model, "parameter_groups") \
        else [{"params": list(model.parameters()), "lr": cfg.lr}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=SGD_MOMENTUM, foreach=True)
        milestones = sorted({max(1, round(f * cfg.epochs)) for f in SGD_STEPS})
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1), False
    opt = torch.optim.Adam(groups, lr=cfg.lr, foreach=True)  # (the CPU's default is a loop over the tensors)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    return opt, sched, True


@torch.no_grad()
def evaluate(model, x, y, batch_size=512):
    model.eval()
    wrong = 0
    for i in range(0, len(y), batch_size):
        wrong += (model(x[i:i + batch_size]).argmax(1) != y[i:i + batch_size]).sum().item()
    return 100.0 * wrong / max(len(y), 1)


# --- what the transformers learnt -----------------------------------------------------------------

def rotation_angle(a):
    """The rotation (radians, (N,)) in 2 x 2 matrices ``a`` (N, 2, 2): the polar decomposition's
    rotation R = U Vh (from the SVD; with a reflection, the nearest proper rotation), then
    atan2(R[1, 0], R[0, 0])."""
    u, _, vh = torch.linalg.svd(a.double())
    d = torch.sign(torch.linalg.det(u @ vh))
    u = torch.cat([u[:, :, :1], u[:, :, 1:] * d[:, None, None]], 2)
    r = u @ vh
    return torch.atan2(r[:, 1, 0], r[:, 0, 0])


def affine_theta(model, x, batch_size=512):
    """The affine parameters (N, 2, 3) that ``model.transformer`` predicts for images ``x``:
    output -> input coordinates, normalised. For another 2-D family (projective, TPS) the affine map
    nearest its sampling grid (least squares over the output's pixel centres)."""
    tr = model.transformer
    if tr.family.name != "affine" and (tr.family.ndim != 2 or tr.num_transforms != 1):
        raise ValueError(f"rotation_report: needs an affine transformer or one other 2-D transformer, got "
                         f"family {tr.family.name!r} x {tr.num_transforms}")
    was = model.training
    model.eval()
    with torch.no_grad():
        theta = torch.cat([tr.head(tr.localization(x[i:i + batch_size]).flatten(1))
                           for i in range(0, x.shape[0], batch_size)])
        if tr.family.name != "affine":
            size = tuple(tr.size) if tr.size is not None else tuple(x.shape[-2:])
            grid = tr.family.grid(theta, size, tr.align_corners).double().flatten(1, 2).cpu()  # (N, P, 2)
            base = base_grid(size, tr.align_corners, torch.float64).T  # (P, 3): x, y, 1
            theta = torch.linalg.lstsq(base.expand(grid.shape[0], -1, -1), grid).solution.transpose(1, 2)
    model.train(was)
    return theta.double().view(-1, 2, 3).cpu()


def rotation_report(model, x, applied_angles_rad, per_sample=False, bin_deg=15.0, applied_shift=None):
    """How much of the rotation applied to images ``x`` the transformer of ``model`` undoes (affine; or
    another family's nearest affine map, see :func:`affine_theta`).

    ``applied_angles_rad`` (N,): the rotation each image's digit was given (as ``distort(...,
    return_params=True)`` reports it: the canvas -> digit map is ``rot_inv = [[c, s], [-s, c]]``).
    With the transformer's theta = [A | b] (output -> input coordinates), the map from its output to
    the digit's frame is ``rot_inv @ A`` (up to scale and shift), whose rotation is the residual left
    in the output: 0 when it undoes the rotation, the applied angle when it does nothing.

    Returns (degrees): ``slope`` and ``intercept_deg`` of the least-squares line of the rotation A
    undoes (its polar rotation) against the applied one (1 and 0: undone; 0: ignored; None when
    every applied angle is the same), ``median_residual_deg`` (median |residual|),
    ``median_residual_nothing_deg`` (median |applied|: the residual of doing nothing),
    ``scale_mean`` and ``singular_values_mean`` (A's singular values: below 1 zooms in),
    ``translation_mean`` (b) and ``translation_norm_mean`` (|b|), ``n``, ``by_angle`` (per
    ``bin_deg``-wide bin of |applied angle|: its range, count and median |residual|: where along the
    range the rotation is undone); with ``per_sample``, also the lists ``predicted_deg`` and
    ``residual_deg``.

    ``applied_shift`` (N, 2), optional: where each digit's centre was placed on the canvas
    (normalised canvas coordinates, as RTS's ``shift``). The transformer's output centre samples the
    canvas at b, so ``median_centre_offset`` = median |b - shift| is how far from the digit's centre
    its output is centred (normalised canvas units), beside ``median_centre_offset_nothing`` =
    median |shift| (an output centred on the canvas)."""
    applied = torch.as_tensor(applied_angles_rad, dtype=torch.float64).cpu().flatten()
    theta = affine_theta(model, x)
    if theta.shape[0] != applied.shape[0]:
        raise ValueError(f"rotation_report: {theta.shape[0]} images but {applied.shape[0]} angles")
    a, b = theta[:, :, :2], theta[:, :, 2]
    c, s = torch.cos(applied), torch.sin(applied)
    rot_inv = torch.stack([c, s, -s, c], 1).view(-1, 2, 2)
    predicted = torch.rad2deg(rotation_angle(a))
    residual = torch.rad2deg(rotation_angle(rot_inv @ a))
    applied_deg = torch.rad2deg(applied)
    dx = applied_deg - applied_deg.mean()
    var = float((dx * dx).sum())
    slope = float((dx * (predicted - predicted.mean())).sum()) / var if var > 1e-12 else None
    sv = torch.linalg.svdvals(a)
    report = {
        "slope": slope,
        "intercept_deg": float(predicted.mean() - slope * applied_deg.mean()) if slope is not None else None,
        "median_residual_deg": _median(residual.abs()),
        "median_residual_nothing_deg": _median(applied_deg.abs()),
        "scale_mean": float(sv.mean()),
        "singular_values_mean": [float(v) for v in sv.mean(0)],
        "translation_mean": [float(v) for v in b.mean(0)],
        "translation_norm_mean": float(b.norm(dim=1).mean()),
        "n": int(theta.shape[0]),
        "by_angle": _by_angle(applied_deg.abs(), residual.abs(), bin_deg),
    }
    if applied_shift is not None:
        shift = torch.as_tensor(applied_shift, dtype=torch.float64).cpu().reshape(-1, 2)
        if shift.shape[0] != theta.shape[0]:
            raise ValueError(f"rotation_report: {theta.shape[0]} images but {shift.shape[0]} shifts")
        report["median_centre_offset"] = _median((b - shift).norm(dim=1))
        report["median_centre_offset_nothing"] = _median(shift.norm(dim=1))
    if per_sample:
        report["predicted_deg"], report["residual_deg"] = predicted.tolist(), residual.tolist()
    return report


def _median(values):
    """The median (the mean of the two middle values for an even count, unlike ``torch.median``)."""
    return float(torch.quantile(values.double(), 0.5))


def _by_angle(applied, residual, width):
    bins = []
    top = float(applied.max()) if applied.numel() else 0.0
    for i in range(max(1, math.ceil(top / width))):
        lo, hi = i * width, (i + 1) * width
        pick = (applied >= lo) & ((applied < hi) if hi < top else (applied <= hi))
        if pick.any():
            bins.append({"from_deg": lo, "to_deg": hi, "n": int(pick.sum()),
                         "median_residual_deg": round(_median(residual[pick]), 2)})
    return bins


# --- training ---------------------------------------------------------------------------------------

@dataclass
class Trained:
    """One finished run: the model (the weights that were tested), its numbers and the test set."""

    model: torch.nn.Module
    error: float  # percent, on the test set
    val_error: float  # percent, on the validation split, of the weights kept (None without one)
    val_errors: list  # per epoch
    train_loss: list  # per epoch, mean over the epoch's batches
    kept_epoch: int  # 0-based
    seconds: float
    test_x: torch.Tensor
    test_params: dict


@dataclass
class Fit:
    """What :func:`fit` did: per-epoch training loss and validation numbers, the epoch kept (0-based)
    and the seconds it took."""

    train_loss: list
    val_errors: list
    kept_epoch: int
    seconds: float
    precision: str  # what the training steps computed in (TrainConfig.compute_precision)


def cross_entropy(model, x, y):
    return F.cross_entropy(model(x), y)


def fit(model, cfg, train_data, seed, val_error=None, bar=None, loss=cross_entropy):
    """Train ``model`` (its lazy layers materialised) for ``cfg.epochs`` epochs with ``cfg``'s
    optimiser and schedule (:func:`_optimizer`), the shared loop of every task.

    ``train_data(epoch)`` gives that epoch's training set ``(x, y)`` on the model's device (``y`` may be
    None: unlabelled data); it is shuffled by ``seed`` and cut into batches of ``cfg.batch_size``, each
    costing ``loss(model, x, y)`` (default: cross entropy of the model's logits). ``val_error(model)``
    (optional; lower is better) is measured after every epoch; with ``cfg.keep == "best"`` the model
    ends with the weights of the epoch where it was lowest, else with the last epoch's. ``bar``: a
    progress bar advanced once per epoch. The steps' forward runs under ``cfg.autocast()``; the loss
    is a float32 number either way, and ``val_error`` sees the float32 model."""
    losses, val_errors, best = [], [], None
    start = time.perf_counter()
    opt = sched = per_batch = None
    for epoch in range(cfg.epochs):
        model.train()
        x, y = train_data(epoch)
        n = len(x)
        if opt is None:  # the one-cycle schedule is sized on the first epoch's number of batches
            opt, sched, per_batch = _optimizer(model, cfg, math.ceil(n / cfg.batch_size))
        order = torch.randperm(n, generator=_gen("order", seed, epoch)).to(x.device)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            with cfg.autocast():
                batch_loss = loss(model, x[idx], None if y is None else y[idx]).float()
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            if per_batch:
                sched.step()
            total += batch_loss.item() * len(idx)
        if not per_batch:
            sched.step()
        losses.append(total / max(n, 1))
        if val_error is not None:
            val_errors.append(val_error(model))
            if cfg.keep == "best" and (best is None or val_errors[-1] < val_errors[best[0]]):
                best = (epoch, copy.deepcopy(model.state_dict()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", **({"val": f"{val_errors[-1]:.1f}"} if val_errors else {}))
    kept = cfg.epochs - 1
    if best is not None:
        kept = best[0]
        model.load_state_dict(best[1])
    return Fit(losses, val_errors, kept, time.perf_counter() - start, cfg.compute_precision())


def train_one(model_name, distortion, seed, digits, cfg, bar=None):
    """Train one model of ``cfg`` on (``distortion``, ``seed``); returns a :class:`Trained`."""
    dev = torch.device(cfg.device)
    test_x, test_params = distorted_test_set(distortion, digits, seed, cfg)
    test_x, test_y = test_x.to(dev), digits.test_y.to(dev)
    val_error = None
    if digits.val_x is not None and len(digits.val_y):
        val_x = distort(distortion, digits.val_x, _gen("val", distortion, seed), object_scale=digits.object_scale,
                        **cfg.options(distortion)).to(dev)
        val_y = digits.val_y.to(dev)
        val_error = lambda m: evaluate(m, val_x, val_y)  # noqa: E731
    cfg = cfg.for_model(model_name)
    cfg = replace(cfg, localization_lr_scale=cfg.localization_lr_scale_for(distortion))
    torch.manual_seed(_seed("init", model_name, seed))
    model = build(model_name, test_x.shape[-1], cfg.st_size, classes=digits.num_classes).to(dev)
    with torch.no_grad():
        model(test_x[:2])  # materialise lazy layers before the optimizer sees them
    # convolution weights channels-last, so their outputs are too: the CPU's convolutions (oneDNN) run
    # these narrow layers faster so, most of all the one-channel ones (a training step of the default
    # job's models on one thread in float32: 0.79 of the time, 2026-12-07); (N, 1, H, W) images are the same either way
    model.to(memory_format=torch.channels_last)

    def train_data(epoch):
        x = distort(distortion, digits.train_x, _gen("train", distortion, seed, epoch),
                    object_scale=digits.object_scale, **cfg.train_options(distortion, epoch))
        return x.to(dev), digits.train_y.to(dev)

    f = fit(model, cfg, train_data, seed, val_error, bar)
    return Trained(model, evaluate(model, test_x, test_y), f.val_errors[f.kept_epoch] if f.val_errors else None,
                   f.val_errors, f.train_loss, f.kept_epoch, f.seconds, test_x, test_params)


def code_version():
    """The code that ran: the package version and, in a git checkout, the commit (and whether the
    working tree differed from it)."""
    try:
        version = importlib.metadata.version("stn-triton")
    except importlib.metadata.PackageNotFoundError:
        version = None
    here = Path(__file__).resolve().parent
    git = {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            git["commit"] = head.stdout.strip()
            status = subprocess.run(["git", "--no-optional-locks", "-C", str(here), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True, timeout=10)
            git["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": version, **git}


# --- statistics and the table ----------------------------------------------------------------------

_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)  # Student's t, 97.5th percentile, 1 to 30 degrees of freedom


def t_quantile_975(df):
    """Student's t 97.5th percentile for ``df`` degrees of freedom (a table to 30, then the
    Cornish-Fisher expansion, good to 1e-4)."""
    if df < 1:
        raise ValueError(f"df: expected at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def paired_difference(a, b):
    """Mean of a - b over pairs, with its 95% interval (paired t): (mean, low, high); the interval is
    None with fewer than two pairs."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(d)
    if len(d) < 2:
        return mean, None, None
    half = t_quantile_975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def _mean_sd(values, digits=1):
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def error_cell(runs, seeds):
    """"mean ± sd (params)" of ``runs`` ({seed: result}) over ``seeds``: percent test error and the
    parameter count ("" with no run)."""
    errs = [runs[s]["error"] for s in seeds if s in runs]
    params = "/".join(f"{c / 1000:.1f}k" for c in sorted({r["params"] for r in runs.values()}))
    return f"{_mean_sd(errs)} ({params})" if errs else ""


def paired_cell(runs, base_runs, seeds, base, is_base=False):
    """The paired difference of ``runs`` to ``base_runs`` (both {seed: result}) over the seeds both
    have, with its 95% interval, when there are three or more ("—" with fewer)."""
    if is_base:
        return "(baseline)"
    seeds = [s for s in seeds if s in runs and s in base_runs]
    if len(seeds) < 3:
        return "—"
    mean, lo, hi = paired_difference([runs[s]["error"] for s in seeds], [base_runs[s]["error"] for s in seeds])
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}] vs {base}"


def format_table(results, cfg):
    """The paper's layout: one row per model; per distortion a column of percent test error (mean ±
    sd over seeds) with the model's parameter count; with three or more seeds, a column of the
    paired difference to the model's baseline (CNN for ST-CNNs, FCN for ST-FCNs) with its 95%
    interval; on R and RTS, a column of the median residual rotation (degrees, mean over seeds) and
    the slope of undone against applied rotation, for affine ST models ("none": the rotation left
    with no transformer, for the others)."""
    paired = len(cfg.seeds) >= 3
    head = ["model"]
    for d in cfg.distortions:
        head.append(f"{d} % error (params)")
        if paired:
            head.append(f"{d} vs baseline, paired diff [95% CI]")
        if d in ROTATING:
            head.append(f"{d} residual rotation (deg)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in cfg.models:
        cells = [m]
        for d in cfg.distortions:
            runs = {r["seed"]: r for r in results if r["model"] == m and r["distortion"] == d}
            cells.append(error_cell(runs, cfg.seeds))
            if paired:
                base = base_model(m)
                base_runs = {r["seed"]: r for r in results if r["model"] == base and r["distortion"] == d}
                cells.append(paired_cell(runs, base_runs, cfg.seeds, base, base == m))
            if d in ROTATING:
                rot = [runs[s].get("rotation") or {} for s in cfg.seeds if s in runs]
                if rot and all("median_residual_deg" in r for r in rot):
                    slopes = [r["slope"] for r in rot if r["slope"] is not None]
                    slope = f", slope {statistics.mean(slopes):.2f}" if slopes else ""
                    cells.append(f"{_mean_sd([r['median_residual_deg'] for r in rot])}{slope}")
                elif rot and all("median_residual_nothing_deg" in r for r in rot) and not m.startswith("ST-"):
                    cells.append(f"{statistics.mean(r['median_residual_nothing_deg'] for r in rot):.1f} (none)")
                else:
                    cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_note(cfg, digits, epochs, seconds):
    note = (f"Percent test error, mean ± standard deviation over seeds {list(cfg.seeds)}, with each model's "
            f"parameter count; {digits.name}, {epochs} epochs ({cfg.optimizer}), {cfg.took(seconds)}.")
    if len(cfg.seeds) >= 3:
        note += (" Paired diff: the model's error minus its baseline's (CNN for ST-CNN, FCN for ST-FCN), seed by "
                 "seed, mean and 95% interval (paired t).")
    if any(d in ROTATING for d in cfg.distortions):
        note += (" Residual rotation: the median over the test images of the rotation left in the affine "
                 "transformer's output (degrees, mean ± sd over seeds) and the slope of the rotation it undoes "
                 "against the one applied (1: all undone, 0: none); 'none': the rotation left with no transformer.")
        if any(not m.endswith("-aff") and m.startswith("ST-") for m in cfg.models):
            note += (" A projective or TPS transformer is measured by the affine map nearest its sampling grid "
                     "(least squares).")
    return note


# --- figures ------------------------------------------------------------------------------------------

def to_image(images):
    """(n, c, h, w) in [0, 1] -> uint8 (n, h, w) for one channel, else (n, h, w, 3) RGB: two channels
    as red and green, three as they are."""
    images = images.float().cpu().clamp(0, 1)
    if images.shape[1] == 2:
        images = torch.cat([images, torch.zeros_like(images[:, :1])], 1)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected 1, 2 or 3 channels, got {images.shape[1]}")
    return (images * 255).byte().permute(0, 2, 3, 1).squeeze(3)


def _tile(images, side, boxes=None):
    """(n, c, h, w) in [0, 1] -> one row image, each cell resized to side x side (nearest); grey
    for one channel, RGB for two (red, green) or three. ``boxes``: per cell, a list of (box, colour),
    box = (x0, y0, x1, y1) in the image's pixels, drawn as rectangles."""
    cells = F.interpolate(images.float().cpu(), size=(side, side), mode="nearest")
    row = torch.cat(list(F.pad(cells, (2, 2, 2, 2), value=0.35)), dim=2)[None]
    tile = Image.fromarray(to_image(row)[0].numpy(), mode="L" if images.shape[1] == 1 else "RGB")
    if boxes:
        tile = tile.convert("RGB")
        draw = ImageDraw.Draw(tile)
        zoom_y, zoom_x = side / images.shape[-2], side / images.shape[-1]
        for i, cell in enumerate(boxes):
            for (x0, y0, x1, y1), colour in cell:
                left = i * (side + 4) + 2
                xa, xb = left + x0 * zoom_x, left + x1 * zoom_x - 1
                ya, yb = 2 + y0 * zoom_y, 2 + y1 * zoom_y - 1
                # corners in order (PIL refuses others): a box under one pixel wide, or given right to left
                draw.rectangle([min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)], outline=colour)
    return tile


CAPTION_LINE = 14


def draw_figure(path, distortion, inputs, outputs, side=84, captions=(), title=None, boxes=None,
                input_label="input"):
    """Inputs on the first row, then each transformer's output on its own row, labelled; then the
    ``captions`` (lines of text: what was measured), one per line. Two-channel images are shown red
    and green (see :func:`to_image`); ``boxes``: {row label: boxes per cell} drawn on those rows (see
    :func:`_tile`)."""
    rows = [(input_label, inputs)] + list(outputs.items())
    label_w = 110
    tiles = [(name, _tile(imgs, side, (boxes or {}).get(name))) for name, imgs in rows]
    width = label_w + max(t.width for _, t in tiles)
    body = 24 + sum(t.height for _, t in tiles)
    mode = "L" if all(t.mode == "L" for _, t in tiles) else "RGB"
    fig = Image.new(mode, (width, body + (CAPTION_LINE * len(captions) + 8 if captions else 0)), "white")
    draw = ImageDraw.Draw(fig)
    title = title or f"distortion {distortion}: inputs (top) and what each transformer made of them"
    draw.text((4, 6), title, fill="black")
    y = 24
    for name, tile in tiles:
        draw.text((4, y + tile.height // 2 - 6), name, fill="black")
        fig.paste(tile, (label_w, y))
        y += tile.height
    for i, line in enumerate(captions):
        draw.text((4, body + 4 + i * CAPTION_LINE), line, fill="black")
    fig.save(path)


def _measures(r):
    """What the transformer was measured to do, as text ("" for none): for the log and the captions."""
    rot = r.get("rotation") or {}
    if "median_residual_deg" not in rot:
        return ""
    slope = "n/a" if rot["slope"] is None else f"{rot['slope']:.2f}"
    text = (f"; rotation left {rot['median_residual_deg']:.1f} deg median (none: "
            f"{rot['median_residual_nothing_deg']:.1f}), slope {slope}, scale {rot['scale_mean']:.2f}")
    if "median_centre_offset" in rot:
        text += (f", centre off by {rot['median_centre_offset']:.2f} (none: "
                 f"{rot['median_centre_offset_nothing']:.2f})")
    return text


def _caption(model_name, seed, r):
    return f"{model_name} (seed {seed}): {r['error']:.1f}% test error" + _measures(r)


# --- the experiment -------------------------------------------------------------------------------------

def _interactive():
    return sys.stdout.isatty() and sys.stderr.isatty()


def _run_line(r):
    line = (f"{r['distortion']:>4} {r['model']:<12} seed {r['seed']}: {r['error']:5.1f}% test error"
            + (f", {r['val_error']:.1f}% val" if r["val_error"] is not None else "")
            + f", {r['params']:,} params ({r['train_seconds']:.0f} s)")
    return line + _measures(r)


def _print(*args):
    print(*args, flush=True)  # a log file sees each line when it happens, not at exit


class Session:
    """What every task's run shares: the output folder, the data (loaded, split, objects measured) and
    the log lines saying so, the code version, the progress bar (on a terminal only) and, at the end,
    results.json and table.md."""

    def __init__(self, cfg, log, out, digits, objects, code, started):
        self.cfg, self.log, self.out, self.digits, self.objects, self.code = cfg, log, out, digits, objects, code
        self.started, self.bar, self.say = started, None, log

    @classmethod
    def start(cls, cfg, log=_print):
        started = time.perf_counter()
        digits, objects = checked_data(cfg)
        out = Path(cfg.out)
        (out / "figures").mkdir(parents=True, exist_ok=True)
        code = code_version()
        _DATA[_data_key(cfg)] = digits
        n_val = 0 if digits.val_y is None else len(digits.val_y)
        log(f"data: {digits.name}, {len(digits.train_y)} train / {n_val} validation / {len(digits.test_y)} test "
            f"images; device {cfg.device}, {torch.get_num_threads()} threads, training in {cfg.compute_precision()}"
            f"{' autocast' if cfg.compute_precision() != 'float32' else ''}, "
            f"backend {st.backend(torch.empty(0, device=cfg.device))}")
        how = (f"measured: {OBJECT_PERCENTILE:g}th percentile of the ink radius over the training images, "
               f"{objects['radius_px']:.1f} px from the frame's centre" if objects["measured"] else "given")
        kept = "within the circle of 14 px no distortion crops: used as they are" if objects["object_scale"] == 1 \
            else f"shrunk by {objects['object_scale']:.3f} before each distortion, into the circle of 14 px none crops"
        log(f"objects ({how}): {kept}")
        return cls(cfg, log, out, digits, objects, code, started)

    def open_bar(self, epochs):
        """A progress bar over ``epochs`` epochs in all, when ``cfg.progress`` and on a terminal; ``say``
        then writes above it."""
        if self.cfg.progress and _interactive():
            self.bar = tqdm(total=epochs, unit="epoch", dynamic_ncols=True)
            if self.log is _print:
                self.say = self.bar.write

    def train_models(self, fn, run_line, name):
        """Every (model, seed) run of the task (``cfg.models`` x ``cfg.seeds``): ``fn(cfg, (model, seed),
        bar)`` -> (result dict, ...) through :func:`run_jobs`, with the progress bar and one logged line
        per run (``run_line(result)``); returns their outputs in (seed, model) order."""
        cfg = self.cfg
        jobs = [(m, s) for s in cfg.seeds for m in cfg.models]
        self.open_bar(len(jobs) * cfg.epochs)
        self.describe(f"{name}: {len(jobs)} runs")

        def done(job, out):
            out[0]["code"] = self.code
            self.say(run_line(out[0]))
        return run_jobs(fn, jobs, cfg, self.bar, lambda job: cfg.epochs, done)

    def describe(self, text):
        if self.bar is not None:
            self.bar.set_description(text)

    def elapsed(self):
        return time.perf_counter() - self.started

    def finish(self, results, table, note, extra=None, extra_files=""):
        """Close the bar; write results.json (``extra``: more top-level entries) and table.md (``note``,
        then ``table``); log the table; return the summary."""
        if self.bar is not None:
            self.bar.close()
        cfg, digits = self.cfg, self.digits
        total = self.elapsed()
        n_val = 0 if digits.val_y is None else len(digits.val_y)
        summary = {
            "config": asdict(cfg),
            "data": {"name": digits.name, "train": len(digits.train_y), "validation": n_val,
                     "test": len(digits.test_y)},
            "objects": self.objects,
            "code": self.code,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "device": cfg.device,
                        "precision": cfg.compute_precision(),
                        "gpu": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None,
                        "torch": torch.__version__},
            "seconds": round(total, 1),
            **(extra or {}),
            "results": results,
            "table": table,
        }
        (self.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "table.md").write_text(f"{note}\n\n{table}\n")
        self.log("\n" + table)
        self.log(f"\nwrote {self.out / 'table.md'}, {self.out / 'results.json'}, {self.out / 'figures'}/"
                 + extra_files + f" in {total:.0f} s")
        return summary


_DATA = {}  # the data of each configuration, loaded once per process (see task_data)


def _data_key(cfg):
    return (cfg.data, cfg.train_limit, cfg.test_limit, cfg.val_fraction, cfg.object_scale)


def task_data(cfg):
    """The data of ``cfg`` (:func:`load_data`'s digits), loaded once per process."""
    key = _data_key(cfg)
    if key not in _DATA:
        _DATA[key] = load_data(cfg)[0]
    return _DATA[key]


def _worker_start(threads, parent):
    """A worker of :func:`run_jobs`: ``threads`` CPU threads, and gone as soon as its parent is (a
    killed or interrupted run leaves nothing training)."""
    torch.set_num_threads(threads)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _start_method(cfg, threads):
    """How :func:`run_jobs` starts its workers: ``"fork"`` where the OS has it, on the CPU, with one
    thread a worker, else ``"spawn"``. A forked worker has this process's imports and data at once
    (a spawned one spends about 3.5 s of a two-minute job importing torch and reading the digits
    again); one thread keeps it off the OpenMP pool it inherits, which is not safe to use after a
    fork, and CUDA cannot be forked at all."""
    import multiprocessing
    if cfg.device == "cpu" and threads == 1 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def run_jobs(fn, jobs, cfg, bar=None, epochs=None, done=None):
    """``fn(cfg, job, bar)`` for each of ``jobs`` (each a tuple of picklable arguments; ``fn`` a
    module-level function, whose own results are picklable too); returns the results in the order
    of ``jobs``. ``done(job, result)`` is called in this process as each finishes.

    With ``cfg.workers`` > 1 (0: one per CPU thread on the CPU, at most one per job; 1 on a GPU),
    the jobs run in that many worker processes, the CPU threads shared out among them, and ``bar``
    advances by ``epochs(job)`` as each finishes; in this process ``fn`` gets the bar and advances it
    itself. The workers are forked (:func:`_start_method`), so they start at once with this process's
    imports and data (:func:`task_data`), or spawned, and then import and read the data themselves."""
    jobs = list(jobs)
    workers = cfg.workers
    if workers == 0:
        workers = torch.get_num_threads() if cfg.device == "cpu" else 1
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        results = []
        for job in jobs:
            results.append(fn(cfg, job, bar))
            if done is not None:
                done(job, results[-1])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    threads = max(1, torch.get_num_threads() // workers)
    results = [None] * len(jobs)
    context = multiprocessing.get_context(_start_method(cfg, threads))
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start, initargs=(threads, os.getpid()))
    try:
        running = {pool.submit(fn, cfg, job, None): i for i, job in enumerate(jobs)}
        for future in as_completed(running):
            i = running[future]
            results[i] = future.result()
            if bar is not None and epochs is not None:
                bar.update(epochs(jobs[i]))
            if done is not None:
                done(jobs[i], results[i])
    except BaseException:  # a failed run or an interrupt: nothing more starts; the workers go with us
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def _classify_job(cfg, job, bar=None):
    """One run of :func:`run` (``job`` = (distortion, model name, seed)), in this process or a worker's:
    its result dict and, for the first seed's models with a transformer, the figure's inputs and the
    transformer's outputs."""
    d, m, s = job
    digits = task_data(cfg)
    t = train_one(m, d, s, digits, cfg, bar)
    own = cfg.for_model(m)  # the configuration this model trained under
    r = {"distortion": d, "model": m, "seed": s, "error": t.error, "val_error": t.val_error,
         "params": count_parameters(t.model), "train_seconds": round(t.seconds, 2),
         "kept_epoch": t.kept_epoch, "train_loss": [round(v, 5) for v in t.train_loss],
         "val_errors": [round(v, 3) for v in t.val_errors],
         "localization_lr_scale": own.localization_lr_scale_for(d),
         "pose_curriculum": list(own.pose_curriculum) if d == "RTS" else [],
         "threads": torch.get_num_threads(),  # (a run's last digits can depend on them)
         "precision": cfg.compute_precision()}
    if d in ROTATING:
        if hasattr(t.model, "transformer"):
            r["rotation"] = rotation_report(t.model, t.test_x, t.test_params["angle"],
                                            applied_shift=t.test_params.get("shift"))
        else:
            nothing = _median(torch.rad2deg(t.test_params["angle"]).abs())
            r["rotation"] = {"median_residual_nothing_deg": float(nothing)}
    if cfg.save_models:
        out = Path(cfg.out)
        path = save_model(out / "models" / f"{d}-{m}-seed{s}.pt", t.model, m, t.test_x.shape[-1],
                          cfg.st_size, digits.num_classes, distortion=d, seed=s, error=t.error)
        r["model_file"] = str(path.relative_to(out))
    fig = None
    if s == cfg.seeds[0] and hasattr(t.model, "transformer"):
        t.model.eval()
        with torch.no_grad():
            fig = (t.test_x[:cfg.figure_count].cpu(), t.model.transformer(t.test_x[:cfg.figure_count]).cpu())
    return r, fig


def run(cfg, log=_print):
    """Run the experiment described by ``cfg``; write results.json, table.md, figures/*.png (and with
    ``cfg.save_models`` models/*.pt) under ``cfg.out``; return the results dict. ``log`` gets one line
    per finished run; progress bars appear only when ``cfg.progress`` and stdout and stderr are a
    terminal.

    With ``cfg.workers`` other than 1 on the CPU (the default, 0: one process per CPU thread) the runs
    train in worker processes (:func:`run_jobs`), which may be spawned (always on macOS and Windows):
    call this under ``if __name__ == "__main__":`` in a script, and define a ``Config`` subclass (e.g.
    one overriding ``train_options``) in an importable module, not in ``__main__`` or a notebook;
    ``workers=1`` trains them here, one after another."""
    session = Session.start(cfg, log)
    session.open_bar(len(cfg.distortions) * len(cfg.seeds) * len(cfg.models) * cfg.epochs)
    digits, out = session.digits, session.out
    jobs = [(d, m, s) for d in cfg.distortions for s in cfg.seeds for m in cfg.models]
    session.describe(f"classify: {len(jobs)} runs")

    def done(job, got):
        got[0]["code"] = session.code
        session.say(_run_line(got[0]))

    outs = run_jobs(_classify_job, jobs, cfg, session.bar, lambda job: cfg.epochs, done)
    results = []
    for d in cfg.distortions:
        fig_outputs, fig_inputs, captions = {}, None, []
        for (jd, m, s), (r, fig) in zip(jobs, outs):
            if jd != d:
                continue
            results.append(r)
            if fig is not None:
                fig_inputs, fig_outputs[m] = fig
                captions.append(_caption(m, s, r))
        if fig_inputs is None:  # no transformer among the models: still show the inputs
            fig_inputs = distorted_test_set(d, digits.limit(test=cfg.figure_count), cfg.seeds[0], cfg)[0]
        draw_figure(out / "figures" / f"{d}.png", d, fig_inputs, fig_outputs, captions=captions)
    table = format_table(results, cfg)
    return session.finish(results, table, _table_note(cfg, digits, cfg.epochs, session.elapsed()),
                          extra_files=f" and {out / 'models'}/" if cfg.save_models else "")
