"""The paper's co-localisation task (appendix A, "co-localisation"): given only a set of images that
each hold a digit of one class somewhere in clutter, find the digit in each, with no boxes and no
labels.

The data: for each digit class, the training digits of that class, each placed anywhere on a
cluttered canvas (60 x 60, TC's: :func:`.distortions.translate_clutter`, the clutter cut from
training digits of every class). The digit's box is known from the generator (:func:`digit_boxes`)
and is used only to score the result.

The model, one per class: a spatial transformer of the attention family that crops a square window
(side ``window`` px of the canvas, fixed; or a learnt scale starting there) at a position its
localisation network predicts from the canvas, sampled at ``st_size`` px. It is trained with the
paper's triplet hinge loss on the embeddings e of a fixed encoder: for images n and m of the batch
(m the next image in the shuffled batch, or with ``positives="all"`` every other image of the batch, the
paper's sum over m != n) and a random window of image n of the same size,

    max(0, ||e(crop_n) - e(crop_m)||^2 + margin - ||e(crop_n) - e(random window of n)||^2)

(with ``negative_reach`` > 0, 0.5 by default, that random window lies near the crop; with 0 anywhere on
the canvas, the paper's random crop).

The encoder (:class:`Encoder`) is a small CNN trained first as a digit classifier on the undistorted
training digits (every class, seen through a window of the same size around the frame's centre,
jittered by a few pixels; with ``encoder_clutter`` cut from cluttered canvases instead, the digit at
their centre): its training uses the digits' labels, the co-localisation training none.
Its embedding is its hidden layer, normalised to unit length.

Scored on the test images of each class: the share whose crop overlaps the digit's box with IoU >
0.5, against random windows of the same size (the mean share over ``random_draws`` draws per image).
"""

import argparse
import math
import statistics
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import stn_triton as st
from transforms_registry import KernelForm, TransformFamily

from .data import FRAME
from .distortions import distort
from .experiment import (DataError, Session, TaskConfig, _gen, _mean_sd, _print, _seed, check_distinct,
                         curriculum_angle, draw_figure, evaluate, fit, run_jobs, task_data)
from .models import cnn, count_parameters, localization

CLASSES = tuple(range(10))
POSITIVES = ("next", "all")
INK = 0.2  # a pixel of a digit with more than this is ink (the box holds every such pixel)


@dataclass
class ColocalisationConfig(TaskConfig):
    """The co-localisation task: for each seed an encoder, then one transformer per digit class."""

    classes: tuple = CLASSES
    epochs: int = 30
    canvas: int = 60
    clutter: int = 6  # 6 x 6 pieces of other digits on each canvas
    window: int = 24  # the window's side on the canvas, px (times the object scale)
    st_size: int = 24  # the side the window is sampled at: the encoder's input
    learn_scale: bool = False  # the window's scale learnt too (starting at `window`)
    margin: float = 1.0  # of the triplet hinge, for unit-length embeddings (squared distances 0 to 4)
    # where the hinge's negative window of an image lies: within `negative_reach` half-widths of the crop's own
    # window each way (clamped to the canvas), or (0) anywhere on the canvas, the paper's "random crop"
    negative_reach: float = 0.5
    # whose crop each image's crop should be near: "next" (the next image in the shuffled batch) or "all"
    # (every other image in the batch, the paper's sum over m != n)
    positives: str = "next"
    repeats: int = 8  # canvases per training digit per epoch (fresh placements and clutter)
    # the training digits' room to move grows linearly to the whole canvas over the first `curriculum`
    # epochs (from 1/curriculum of it); validation and test always use the whole canvas; 0: none
    curriculum: int = 20
    encoder_epochs: int = 10
    encoder_jitter: float = 4.0  # px: the encoder's training windows move by up to this
    # the encoder's training windows cut from cluttered canvases (the digit at the centre, clutter as the
    # transformers' canvases have it) instead of from the bare digits
    encoder_clutter: bool = True
    random_draws: int = 100  # random windows per test image for the baseline
    out: str = "runs/digits-colocalisation"
    figure_count: int = 8

    def __post_init__(self):
        self.classes = check_distinct("classes", (int(c) for c in self.classes))
        if min(self.classes) < 0:
            raise ValueError(f"classes: expected digit classes (0 and up), got {min(self.classes)}")
        super().__post_init__()
        for name in ("canvas", "window", "repeats", "encoder_epochs", "random_draws"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.clutter, int) or self.clutter < 0:
            raise ValueError(f"clutter: expected a number of pieces >= 0, got {self.clutter!r}")
        if self.canvas < FRAME or not 0 < self.window < self.canvas:
            raise ValueError(f"canvas and window: expected a canvas of at least {FRAME} px and a window smaller than "
                             f"it, got {self.canvas} and {self.window}")
        if not isinstance(self.curriculum, int) or self.curriculum < 0:
            raise ValueError(f"curriculum: expected a number of epochs >= 0, got {self.curriculum!r}")
        if not (self.margin > 0 and math.isfinite(self.margin)):
            raise ValueError(f"margin: expected a positive number, got {self.margin!r}")
        if not 0 <= self.negative_reach < math.inf:
            raise ValueError(f"negative_reach: expected half-widths >= 0 (0: anywhere), got {self.negative_reach!r}")
        if self.positives not in POSITIVES:
            raise ValueError(f"positives: expected one of {', '.join(POSITIVES)}, got {self.positives!r}")
        if not 0 <= self.encoder_jitter < math.inf:
            raise ValueError(f"encoder_jitter: expected px >= 0, got {self.encoder_jitter!r}")


# --- data ---------------------------------------------------------------------------------------------

def ink_boxes(digits, threshold=INK):
    """The ink's bounding box of each digit (N, 1, 28, 28) in its frame: (N, 4) = (x0, y0, x1, y1) in
    pixels (edges: a box of the pixels 3 to 5 is 3 to 6); an empty frame gives its centre, empty."""
    ink = digits[:, 0] > threshold
    cols, rows = ink.any(1), ink.any(2)
    idx = torch.arange(digits.shape[-1])

    def span(mask):
        lo = torch.where(mask, idx, digits.shape[-1]).amin(1)
        hi = torch.where(mask, idx + 1, 0).amax(1)
        empty = ~mask.any(1)
        return torch.where(empty, digits.shape[-1] // 2, lo), torch.where(empty, digits.shape[-1] // 2, hi)
    (x0, x1), (y0, y1) = span(cols), span(rows)
    return torch.stack([x0, y0, x1, y1], 1).double()


def digit_boxes(digits, shift, canvas, object_scale=1.0, threshold=INK):
    """Each digit's box on the canvas where TC placed it (centre ``shift``, normalised canvas
    coordinates, as ``distort("TC", ..., return_params=True)`` reports it): the smallest square
    around the ink's bounding box, centred on it (the window is square), as (N, 4) = (x0, y0, x1, y1)
    canvas pixels. A frame pixel u lands at (shift + 1) / 2 * canvas + (u - 14) * object_scale."""
    box = ink_boxes(digits, threshold)
    centre = (shift.double() + 1) / 2 * canvas  # (N, 2): x, y of the frame's centre on the canvas
    lo = centre + (box[:, :2] - FRAME / 2) * object_scale
    hi = centre + (box[:, 2:] - FRAME / 2) * object_scale
    mid, half = (lo + hi) / 2, (hi - lo).amax(1, keepdim=True) / 2
    return torch.cat([mid - half, mid + half], 1)


def make_canvases(digits, gen, canvas=60, clutter=6, clutter_from=None, object_scale=1.0, translate=1.0):
    """Each digit placed anywhere on a cluttered canvas: the images (N, 1, canvas, canvas), the
    digits' boxes (:func:`digit_boxes`) and TC's parameters (``shift``)."""
    images, params = distort("TC", digits, gen, return_params=True, object_scale=object_scale, canvas=canvas,
                             clutter=clutter, clutter_from=clutter_from, translate=translate)
    return images, digit_boxes(digits, params["shift"], canvas, object_scale), params


def class_canvases(split, digits, c, seed, cfg, epoch=None):
    """The canvases of digit class ``c`` in ``split`` for ``seed`` (training: ``cfg.repeats`` per digit,
    drawn afresh in epoch ``epoch``, with the curriculum); clutter from the training digits."""
    x = {"train": digits.train_x[digits.train_y == c], "val": digits.val_x[digits.val_y == c],
         "test": digits.test_x[digits.test_y == c]}[split]
    translate = 1.0
    if epoch is not None:
        x = x.repeat(cfg.repeats, 1, 1, 1)
        translate = curriculum_angle(1.0, epoch, cfg.curriculum)
    parts = ("colocalisation", split, c, seed) if epoch is None else ("colocalisation", split, c, seed, epoch)
    return make_canvases(x, _gen(*parts), cfg.canvas, cfg.clutter, digits.train_x, digits.object_scale, translate)


# --- the window and the models ---------------------------------------------------------------------------

class Window(TransformFamily):
    """A square window of side ``scale`` (normalised: 1 is the whole canvas) that stays on the canvas:
    theta = (u, v) -> [[scale, 0, tx], [0, scale, ty]] with (tx, ty) = (1 - scale) tanh((u, v)); with
    ``learn_scale``, theta = (s, u, v) (the paper's attention, its position kept on the canvas),
    starting at ``scale``. The identity is the window in the canvas's centre. Not registered: an
    instance for one model."""

    name = "window"

    def __init__(self, scale, learn_scale=False):
        super().__init__()
        self.scale, self.learn_scale = float(scale), bool(learn_scale)

    @property
    def num_params(self):
        return 3 if self.learn_scale else 2

    def identity(self):
        return torch.tensor([self.scale, 0.0, 0.0] if self.learn_scale else [0.0, 0.0])

    def full(self, theta):
        """theta -> (s, tx, ty) (N, 3)."""
        s = theta[:, :1] if self.learn_scale else torch.full_like(theta[:, :1], self.scale)
        return torch.cat([s, (1 - s.abs()).clamp_min(0) * torch.tanh(theta[:, -2:])], 1)

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        s, tx, ty = self.full(theta).unbind(1)
        zero = torch.zeros_like(s)
        return KernelForm("affine", torch.stack([s, zero, tx, zero, s, ty], 1).reshape(-1, 2, 3))


def crop(x, window, size):
    """Windows (N, 3) = (s, tx, ty) of the images ``x``, sampled at ``size`` x ``size``."""
    zero = torch.zeros_like(window[:, 0])
    s, tx, ty = window.unbind(1)
    m = torch.stack([s, zero, tx, zero, s, ty], 1).reshape(-1, 2, 3)
    return st.affine_sample(x, m.to(x.dtype), (size, size))


class Colocaliser(nn.Module):
    """A localisation network (the main job's CNN one) predicting where the window goes."""

    def __init__(self, canvas, scale, size, learn_scale=False):
        super().__init__()
        self.transformer = st.SpatialTransformer(localization("CNN", canvas), transform=Window(scale, learn_scale),
                                                 size=(size, size))

    def windows(self, x):
        """(N, 3) = (s, tx, ty): each image's window, normalised canvas coordinates."""
        tr = self.transformer
        return tr.family.full(tr.head(tr.localization(x).flatten(1)))

    def forward(self, x):
        return self.transformer(x)

    def parameter_groups(self, lr, localization_lr_scale=1.0):
        return self.transformer.parameter_groups(lr, localization_lr_scale)


class Encoder(nn.Module):
    """A small CNN digit classifier whose hidden layer, normalised, is the embedding."""

    def __init__(self, size, classes=10, hidden=64):
        super().__init__()
        self.net = cnn(size, classes=classes, hidden=hidden)

    def embed(self, x):
        return F.normalize(self.net[:-1](x), dim=1)

    def forward(self, x):
        return self.net(x)


def encoder_views(digits, gen, cfg, jitter, clutter_from=None, object_scale=1.0):
    """The digits seen as the encoder sees a window on them: the frame's central ``cfg.window`` px
    (the window on the canvas covers that much of the frame at every object scale), sampled at
    ``cfg.st_size``, moved by up to ``jitter`` px each way. With ``clutter_from`` (digits), each digit
    is first put at the centre of a canvas with ``cfg.clutter`` pieces of those, and the window cut
    from there."""
    n = digits.shape[0]
    side = FRAME
    if clutter_from is not None:
        digits = make_canvases(digits, gen, cfg.canvas, cfg.clutter, clutter_from, object_scale, translate=0.0)[0]
        side = cfg.canvas / object_scale
    s = torch.full((n, 1), cfg.window / side)
    t = (2 * torch.rand(n, 2, generator=gen) - 1) * (2 * jitter / side)
    return crop(digits, torch.cat([s, t], 1), cfg.st_size)


def train_encoder(digits, seed, cfg):
    """The encoder of ``seed``: trained as a digit classifier on the training digits (the labels are
    used here, and only here); returns it (frozen, in eval mode) and its test error (percent, on the
    test digits' centred windows)."""
    torch.manual_seed(_seed("init", "encoder", seed))
    dev = torch.device(cfg.device)
    enc = Encoder(cfg.st_size, digits.num_classes).to(dev)

    def train_data(epoch):
        x = encoder_views(digits.train_x, _gen("encoder", seed, epoch), cfg, cfg.encoder_jitter,
                          digits.train_x if cfg.encoder_clutter else None, digits.object_scale)
        return x.to(dev), digits.train_y.to(dev)

    fit(enc, replace(cfg, epochs=cfg.encoder_epochs, keep="last"), train_data, ("encoder", seed))
    test = encoder_views(digits.test_x, _gen("encoder-test", seed), cfg, 0.0).to(dev)
    error = evaluate(enc, test, digits.test_y.to(dev))
    return _freeze(enc), error


# --- the loss and the score -----------------------------------------------------------------------------

def triplet_loss(model, encoder, x, rand_u, margin, size, reach=0.0, positives="next"):
    """The paper's hinge: crops of images n and m (the next in the batch) should be nearer each other
    than the crop of n is to a random window of n of the crop's size. ``rand_u`` (B, 2) in [-1, 1] places
    that window: with ``reach`` 0 anywhere on the canvas (``rand_u`` times the room the window has), else
    ``rand_u`` times ``reach`` half-widths from the crop's own window, kept on the canvas. ``positives``
    "all": a hinge for every pair n != m of the batch (the paper's double sum), averaged."""
    w = model.windows(x)
    crops = model.transformer(x)
    e = encoder.embed(crops)
    s = w[:, :1].detach()
    u = rand_u.to(x.dtype)
    if reach > 0:
        room = (1 - s.abs()).clamp_min(0)
        where = torch.maximum(torch.minimum(w[:, 1:].detach() + u * s.abs() * reach, room), -room)
    else:
        where = u * (1 - s)
    r = encoder.embed(crop(x, torch.cat([s, where], 1), size))
    d_neg = (e - r).square().sum(1)
    if positives == "next":
        d_pos = (e - e.roll(1, 0)).square().sum(1)
        return F.relu(d_pos + margin - d_neg).mean()
    d_pos = (e[:, None] - e[None]).square().sum(2)  # (B, B): row n, column m
    other = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return F.relu(d_pos + margin - d_neg[:, None])[other].mean()


def window_boxes(windows, canvas):
    """Windows (N, 3) = (s, tx, ty) -> boxes (N, 4) = (x0, y0, x1, y1) in canvas pixels. A learnt scale
    (``--learn-scale``) may turn negative: that window is the same square turned half a turn, so its box
    is that of ``|s|``."""
    s, tx, ty = windows.double().unbind(1)
    cx, cy, half = (tx + 1) / 2 * canvas, (ty + 1) / 2 * canvas, s.abs() * canvas / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], 1)


def iou(a, b):
    """Intersection over union of boxes (..., 4) and (..., 4) (x0, y0, x1, y1)."""
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = w * h
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-12)


@torch.no_grad()
def score(model, x, boxes, cfg, gen):
    """The crops of ``model`` on ``x`` against the digits' ``boxes``: per image its window, IoU,
    whether IoU > 0.5, and for random windows of the same size the share over ``cfg.random_draws``."""
    model.eval()
    windows = model.windows(x).double().cpu()
    found = iou(window_boxes(windows, cfg.canvas), boxes)
    n, k = len(boxes), cfg.random_draws
    u = 2 * torch.rand(n, k, 2, generator=gen, dtype=torch.float64) - 1
    rand = torch.cat([windows[:, None, :1].expand(n, k, 1), u * (1 - windows[:, None, :1])], 2)
    chance = (iou(window_boxes(rand.reshape(-1, 3), cfg.canvas).view(n, k, 4), boxes[:, None]) > 0.5).double()
    offset = (((windows[:, 1:] + 1) / 2 * cfg.canvas) - (boxes[:, :2] + boxes[:, 2:]) / 2).norm(dim=1)
    return {"windows": windows, "iou": found, "hit": found > 0.5, "random_hit": chance.mean(1), "offset_px": offset}


# --- the experiment -------------------------------------------------------------------------------------

def train_class(c, seed, encoder, digits, cfg, bar=None):
    """Train the transformer of digit class ``c`` for ``seed`` with the triplet loss (no boxes, no
    labels); returns (model, its fit, the test canvases, their boxes)."""
    dev = torch.device(cfg.device)
    scale = cfg.window * digits.object_scale / cfg.canvas
    torch.manual_seed(_seed("init", "colocalisation", c, seed))
    model = Colocaliser(cfg.canvas, scale, cfg.st_size, cfg.learn_scale).to(dev)
    test_x, test_boxes, _ = class_canvases("test", digits, c, seed, cfg)
    with torch.no_grad():
        model(test_x[:2].to(dev))  # materialise the lazy regression layer

    def loss(m, x, u):
        return triplet_loss(m, encoder, x, u, cfg.margin, cfg.st_size, cfg.negative_reach, cfg.positives)

    def train_data(epoch):
        x, _, _ = class_canvases("train", digits, c, seed, cfg, epoch)
        return x.to(dev), 2 * torch.rand(len(x), 2, generator=_gen("random-window", c, seed, epoch)).to(dev) - 1

    val_error = None
    if digits.val_x is not None and bool((digits.val_y == c).any()):
        val_x = class_canvases("val", digits, c, seed, cfg)[0].to(dev)
        val_u = (2 * torch.rand(len(val_x), 2, generator=_gen("random-window-val", c, seed)) - 1).to(dev)

        @torch.no_grad()
        def val_error(m):  # the triplet loss on the validation canvases: unsupervised too
            m.eval()
            return float(loss(m, val_x, val_u)) if len(val_x) > 1 else 0.0

    f = fit(model, cfg, train_data, ("colocalisation", c, seed), val_error, bar, loss)
    return model, f, test_x.to(dev), test_boxes


def _summary(rows):
    """{hit %, random %, median IoU, median offset px, n} of the per-image rows (dicts of lists)."""
    n = len(rows["hit"])
    return {"n": n, "hit_pct": 100 * sum(rows["hit"]) / max(n, 1),
            "random_pct": 100 * sum(rows["random_hit"]) / max(n, 1),
            "median_iou": statistics.median(rows["iou"]) if n else None,
            "median_offset_px": statistics.median(rows["offset_px"]) if n else None}


def format_table(results, cfg):
    """One row per digit class and one for all: the share of test images whose crop overlaps the
    digit's box with IoU > 0.5 (mean ± sd over seeds), that of random windows of the same size, the
    median IoU and the median distance of the window's centre from the box's (px)."""
    head = ["digit", "test images", "crop IoU > 0.5 (%)", "random window IoU > 0.5 (%)", "median IoU",
            "median centre offset (px)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in list(cfg.classes) + ["all"]:
        runs = [r for r in results if r["class"] == c]
        if not runs:
            continue
        cells = [str(c), str(runs[0]["n"]), _mean_sd([r["hit_pct"] for r in runs]),
                 _mean_sd([r["random_pct"] for r in runs]), _mean_sd([r["median_iou"] for r in runs], 2),
                 _mean_sd([r["median_offset_px"] for r in runs])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _negatives(cfg):
    pairs = ("each crop against every other crop of its batch" if cfg.positives == "all"
             else "each crop against the next in its batch")
    return pairs + "; " + (f"each negative a random window within {cfg.negative_reach:g} half-widths of the crop"
                           if cfg.negative_reach else "each negative a random window anywhere on the canvas")


def _table_note(cfg, digits, encoder_errors, seconds):
    how = "learnt, starting at" if cfg.learn_scale else "fixed at"
    return (f"Co-localisation: each test digit placed anywhere on a {cfg.canvas} x {cfg.canvas} canvas with "
            f"{cfg.clutter} pieces of clutter; one transformer per digit class, trained on that class's training "
            f"canvases with the triplet hinge loss (margin {cfg.margin:g}; {_negatives(cfg)}) and no boxes or "
            f"labels; window side "
            f"{how} {cfg.window * digits.object_scale:g} px. The encoder was trained first as a digit classifier on "
            f"the undistorted training digits{' among clutter' if cfg.encoder_clutter else ''} (labels used for it "
            f"only; test error "
            f"{_mean_sd(encoder_errors)}%). Share of test images whose crop overlaps the digit's box (the smallest "
            f"square around its ink, known from the generator) with IoU > 0.5, mean ± sd over seeds "
            f"{list(cfg.seeds)}; random: windows of the same size placed uniformly ({cfg.random_draws} per image); "
            f"{digits.name}, {cfg.epochs} epochs ({cfg.optimizer}), {cfg.took(seconds)}.")


def _run_line(r, encoder_error):
    return (f"colocalisation digit {r['class']} seed {r['seed']}: crop IoU > 0.5 on {r['hit_pct']:5.1f}% of "
            f"{r['n']} test images (random window: {r['random_pct']:.1f}%), median IoU {r['median_iou']:.2f}, "
            f"centre off by {r['median_offset_px']:.1f} px; encoder {encoder_error:.1f}% error "
            f"({r['train_seconds']:.0f} s)")


def _freeze(encoder):
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def _encoder_job(cfg, job, bar=None):
    """The encoder of seed ``job[0]`` (see :func:`train_encoder`): its weights (on the CPU), test error
    and parameter count."""
    encoder, error = train_encoder(task_data(cfg), job[0], cfg)
    if bar is not None:
        bar.update(cfg.encoder_epochs)
    return {k: v.cpu() for k, v in encoder.state_dict().items()}, error, count_parameters(encoder)


def _class_job(cfg, job, bar=None):
    """The transformer of digit class ``c`` for seed ``s`` (``job`` = (s, c, the encoder's weights)),
    trained and scored: (result dict, per-image rows, the figure's canvases and boxes for the first
    seed)."""
    s, c, weights = job
    digits = task_data(cfg)
    encoder = Encoder(cfg.st_size, digits.num_classes)
    encoder.load_state_dict(weights)
    encoder = _freeze(encoder.to(cfg.device))
    model, f, test_x, boxes = train_class(c, s, encoder, digits, cfg, bar)
    sc = score(model, test_x, boxes, cfg, _gen("random-baseline", c, s))
    rows = {"hit": sc["hit"].tolist(), "random_hit": sc["random_hit"].tolist(), "iou": sc["iou"].tolist(),
            "offset_px": sc["offset_px"].tolist()}
    r = {"class": c, "seed": s, **_summary(rows), "params": count_parameters(model),
         "scale_mean": float(sc["windows"][:, 0].mean()), "train_seconds": round(f.seconds, 2),
         "threads": torch.get_num_threads(),
         "kept_epoch": f.kept_epoch, "train_loss": [round(v, 5) for v in f.train_loss],
         "val_loss": [round(v, 5) for v in f.val_errors]}
    fig = None
    if s == cfg.seeds[0]:
        k = min(cfg.figure_count, len(test_x))
        truth, found = boxes[:k].tolist(), window_boxes(sc["windows"][:k], cfg.canvas).tolist()
        fig = (test_x[:k].cpu(), [[(t, (0, 200, 0)), (w, (255, 40, 40))] for t, w in zip(truth, found)])
    return r, rows, fig


def check_classes(cfg, digits):
    """Raise :class:`DataError` unless each of ``cfg.classes`` has training and test images in ``digits``
    (each transformer trains on its class's training images and is scored on its test images)."""
    for split, labels, limit in (("training", digits.train_y, "train_limit"), ("test", digits.test_y, "test_limit")):
        absent = [c for c in cfg.classes if not bool((labels == c).any())]
        if absent:
            held = f" (the first {getattr(cfg, limit)}, {limit})" if getattr(cfg, limit) is not None else ""
            raise DataError(f"classes: no {split} images of digit{'s' * (len(absent) > 1)} "
                            f"{', '.join(map(str, absent))} among the "
                            f"{len(labels)} {split} images of {digits.name}{held}")


def run(cfg, log=_print):
    """Run the co-localisation task of ``cfg``; write results.json, table.md and
    figures/colocalisation.png under ``cfg.out``; return the results dict. The encoders, then the
    transformers, are trained ``cfg.workers`` at once."""
    session = Session.start(cfg, log)
    check_classes(cfg, session.digits)
    session.open_bar(len(cfg.seeds) * (cfg.encoder_epochs + len(cfg.classes) * cfg.epochs))
    session.describe("colocalisation: encoders")
    enc = run_jobs(_encoder_job, [(s,) for s in cfg.seeds], cfg, session.bar, lambda job: cfg.encoder_epochs)
    encoders = [{"seed": s, "test_error": e[1], "params": e[2]} for s, e in zip(cfg.seeds, enc)]
    enc_error = {s: e[1] for s, e in zip(cfg.seeds, enc)}
    for e in encoders:
        session.say(f"colocalisation encoder seed {e['seed']}: {e['test_error']:.1f}% test error as a digit "
                    f"classifier, {e['params']:,} params")

    def done(job, out):
        out[0]["code"] = session.code
        session.say(_run_line(out[0], enc_error[job[0]]))

    session.describe(f"colocalisation: {len(cfg.seeds) * len(cfg.classes)} transformers")
    jobs = [(s, c, e[0]) for s, e in zip(cfg.seeds, enc) for c in cfg.classes]
    outs = run_jobs(_class_job, jobs, cfg, session.bar, lambda job: cfg.epochs, done)
    results, fig_rows, fig_boxes, captions = [], {}, {}, []
    for s in cfg.seeds:
        per_seed = {"hit": [], "random_hit": [], "iou": [], "offset_px": []}
        for (js, c, _), (r, rows, fig) in zip(jobs, outs):
            if js != s:
                continue
            results.append(r)
            for k in per_seed:
                per_seed[k] += rows[k]
            if fig is not None:
                label = f"digit {c}"
                fig_rows[label], fig_boxes[label] = fig
                captions.append(f"digit {c}: crop IoU > 0.5 on {r['hit_pct']:.0f}% of {r['n']} test images "
                                f"(random window {r['random_pct']:.0f}%), median IoU {r['median_iou']:.2f}")
        results.append({"class": "all", "seed": s, **_summary(per_seed)})
    first = next(iter(fig_rows))
    draw_figure(session.out / "figures" / "colocalisation.png", "colocalisation", fig_rows.pop(first), fig_rows,
                side=96, captions=captions, boxes=fig_boxes, input_label=first,
                title=f"co-localisation (seed {cfg.seeds[0]}): test canvases, the digit's box (green) and the "
                      f"transformer's crop (red)")
    table = format_table(results, cfg)
    note = _table_note(cfg, session.digits, [e["test_error"] for e in encoders], session.elapsed())
    return session.finish(results, table, note, extra={"encoders": encoders})


# --- the command line ----------------------------------------------------------------------------------

PAPER = dict(seeds=(0, 1, 2), epochs=50, repeats=1, canvas=84, clutter=16, batch_size=256, lr=1e-3,
             negative_reach=0.0)


def arguments(p, d):
    """The co-localisation task's own options (``stn-digits --task colocalisation``)."""
    p.add_argument("--classes", nargs="+", type=int, default=list(d.classes), metavar="C",
                   help="digit classes, one transformer each")
    p.add_argument("--canvas", type=int, default=d.canvas, help="side of the cluttered canvas, px")
    p.add_argument("--clutter", type=int, default=d.clutter, help="6 x 6 pieces of other digits on each canvas")
    p.add_argument("--window", type=int, default=d.window,
                   help="side of the window the transformer crops, px of the canvas (times the object scale)")
    p.add_argument("--learn-scale", action="store_true",
                   help="learn the window's scale too (the attention family), starting at --window")
    p.add_argument("--margin", type=float, default=d.margin, help="the triplet hinge's margin")
    p.add_argument("--negative-reach", type=float, default=d.negative_reach, metavar="HALF_WIDTHS",
                   help="the hinge's negative: a random window within this many half-widths of the crop's own "
                        "window each way; 0: anywhere on the canvas, the paper's random crop")
    p.add_argument("--positives", choices=POSITIVES, default=d.positives,
                   help="whose crop each image's crop is pulled towards: next (the next image in the shuffled "
                        "batch) or all (every other image in the batch, the paper's sum over m != n)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="canvases per training digit per epoch (fresh placements and clutter)")
    p.add_argument("--curriculum", type=int, default=d.curriculum, metavar="EPOCHS",
                   help="the training digits' room to move grows linearly to the whole canvas over EPOCHS "
                        "epochs; 0: none")
    p.add_argument("--encoder-epochs", type=int, default=d.encoder_epochs,
                   help="epochs of the encoder's training as a digit classifier")
    p.add_argument("--encoder-clutter", action=argparse.BooleanOptionalAction, default=d.encoder_clutter,
                   help="train the encoder on windows cut from cluttered canvases (the digit at the centre); "
                        "--no-encoder-clutter: from the bare digits")
    p.add_argument("--encoder-jitter", type=float, default=d.encoder_jitter, metavar="PX",
                   help="the encoder's training windows move by up to this many px each way")
