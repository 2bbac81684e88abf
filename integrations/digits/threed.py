"""The paper's 3-D experiment in miniature (appendix A, "3-D transformation"): each digit extruded
into a slab, tilted in 3-D inside a volume, classified from the volume's projection.

The data (:func:`make_volumes`): each 28 x 28 digit is extruded into a slab ``thickness`` px thick
(the 5-D source (N, 1, thickness, 28, 28): the digit on every slice), scaled by ``scale`` (digit px
-> canvas voxels), tilted out of its plane by an angle drawn uniformly in [0, ``max_tilt``] about an
axis in its plane whose direction is drawn uniformly, optionally turned within its plane by up to
``max_spin``, moved within the room left, and sampled trilinearly into a ``canvas``-voxel cube with
this library's own 5-D sampling (``st.affine_sample``, theta (N, 3, 4)). Nothing is cropped: the
ball holding the slab stays inside the cube. Every drawn parameter is kept, so what was applied to
the test set is known exactly. The label is the digit. Each seed renders ``repeats`` volumes of
every training digit once, shared by the models (each epoch trains on one of each digit's); with
``repeats=0`` the training volumes are rendered afresh every epoch (on the model's device).

A tilt foreshortens the volume's depth sum across the tilt axis (by cos tilt: edge on, the digit is
a line) and smears it by the slab's thickness times sin tilt. The models see the volume (N, 1, D, H,
W); each classifies with the same 2-D CNN (:func:`.models.cnn`):

- CNN: the volume summed along depth (the projection a network sees without a transformer), a
  learnt residual image filter (the classify task's, zero at the start) sized so that the parameter
  counts match the ST-CNN-3d's within 1%, then the CNN.
- ST-CNN-3d: a 3-D spatial transformer (``affine3d``, starting at the identity) with a small 3-D
  localisation network (:func:`localization3d`); its output volume (``depth`` x ``st_size`` x
  ``st_size``) summed along depth, then the CNN. With ``depth`` half the canvas and ``st_size`` the
  canvas, the transformer at its start gives exactly the CNN's projection (each output voxel
  averages two canvas voxels in depth): both models start as the same function.
- ST-CNN-att3d (a control): the same with ``attention3d`` (scale and shift only, no rotation), to
  measure how much of what a transformer gains is zooming in rather than turning the slab.

What is measured beside percent test error (:func:`tilt_report`): with the transformer's theta =
[A | b] (output -> canvas, normalised) and the applied rotation R (digit -> canvas), the direction
the output is summed along (its depth axis), seen in the digit's own frame, is R^T A e_z. Its angle
to the slab's normal, folded to [0, 90] degrees (the slab has two faces), is the **residual tilt**:
0 when the output looks straight through the slab, the applied tilt for a transformer that does
nothing. Medians over the test set, beside that of doing nothing, and by band of applied tilt.

What the defaults rest on (scikit-learn's digits, seed 0, one CPU thread): with the 2-D
localisation network's design, a hidden 32-unit ReLU layer before the regression layer, the
ST-CNN-3d learnt no tilt (residual = applied, to a degree) in 20 epochs (largest tilt 60 or 90
degrees, with and without a tilt curriculum) or 60 (75 degrees, a curriculum over 30), nor with
its classifier trained first on the depth sums and frozen, though turning each test volume back
by its known rotation took that classifier from 15% to 3% error; it only zoomed in. Without the
hidden layer (:func:`localization3d`) it undoes about a third of each tilt within 15 epochs; a
tilt curriculum (over 8 of 20 epochs) did not help. With smaller digits (``scale`` 0.55 to 0.75)
zooming in alone (the control) took the CNN's 12.5% error to 4.5%, the ST-CNN-3d to 2.4%: the
defaults let the digits nearly fill the cube, so that turning, not zooming, is what pays.
"""

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

import stn_triton as st

from .data import FRAME
from .experiment import (Session, TaskConfig, _data_key, _gen, _mean_sd, _median, _print, _seed, check_choices,
                         draw_figure, error_cell, evaluate, fit, paired_cell, task_data)
from .models import Baseline, STClassifier, _count, cnn, count_parameters, matched_width, residual_stage

MODELS = ("CNN", "ST-CNN-att3d", "ST-CNN-3d")
FAMILIES = {"ST-CNN-3d": "affine3d", "ST-CNN-att3d": "attention3d"}
BASELINE = "CNN"
CONTROL = "ST-CNN-att3d"  # the 3-D transformer is also compared with it: what turning adds to zooming
RENDER_CHUNK = 256  # volumes sampled at a time (the CPU path's grid is 12 bytes per output voxel)


@dataclass
class ThreeDConfig(TaskConfig):
    """The 3-D task: each model for each seed on volumes of tilted digit slabs."""

    models: tuple = MODELS
    epochs: int = 15
    canvas: int = 24  # the volume's side, voxels
    st_size: int = 24  # the classifier's input side (the transformers' output's height and width)
    # the transformers' output's depth, voxels (summed): half the canvas, so that the identity averages
    # pairs of canvas voxels (exactly the CNN's projection); a face-on slab 3 voxels thick is then
    # sampled 2 voxels apart (its sum off by up to a fifth), but the learnt transformers zoom in to
    # a box about 0.57 of the canvas, sampling it about 1.1 voxels apart
    depth: int = 12
    thickness: int = 4  # the slab's thickness, digit px
    max_tilt: float = 75.0  # degrees out of the digit's plane
    max_spin: float = 0.0  # degrees within the digit's plane
    # digit px -> canvas voxels: the digits nearly fill the cube (the largest that fits is 0.8485 with a
    # 24-voxel canvas and 4 px slabs), which leaves little to gain by zooming in alone (see the module
    # docstring)
    scale: tuple = (0.7, 0.84)
    translate: float = 1.0  # share of the room left in the canvas that the digit moves in
    # renderings of each training digit per seed, drawn once and shared by the models (each epoch trains
    # on one of each digit's); 0: rendered afresh every epoch
    repeats: int = 3
    out: str = "runs/digits-3d"
    figure_count: int = 10

    def __post_init__(self):
        self.models = check_choices("models", self.models, MODELS)
        self.scale = tuple(float(s) for s in self.scale)
        super().__post_init__()
        for name in ("canvas", "depth", "thickness"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.repeats, int) or self.repeats < 0:
            raise ValueError(f"repeats: expected an int >= 0 (0: rendered every epoch), got {self.repeats!r}")
        if not 0 <= self.max_tilt <= 90:
            raise ValueError(f"max_tilt: expected degrees in [0, 90], got {self.max_tilt!r}")
        if not 0 <= self.max_spin <= 180:
            raise ValueError(f"max_spin: expected degrees in [0, 180], got {self.max_spin!r}")
        largest = self.canvas / 2 / object_radius(self.thickness)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale: expected (low, high) with 0 < low <= high, got {self.scale!r}")
        if self.scale[1] > largest:
            raise ValueError(f"scale: expected at most {math.floor(largest * 1e4) / 1e4:g} (a slab {self.thickness} px "
                             f"thick, {object_radius(self.thickness):.2f} px from its centre to its rim, within "
                             f"{self.canvas / 2:g} voxels of the canvas's centre), got {self.scale[1]:g}")
        if not 0 <= self.translate <= 1:
            raise ValueError(f"translate: expected a share in [0, 1], got {self.translate!r}")

    def volume_options(self):
        return dict(canvas=self.canvas, thickness=self.thickness, max_tilt=self.max_tilt, max_spin=self.max_spin,
                    scale=self.scale, translate=self.translate)


# --- data ---------------------------------------------------------------------------------------------

def object_radius(thickness):
    """The radius (digit px) of the ball that holds the slab: the frame's inscribed circle (where the
    distortions keep their objects) widened by half the thickness."""
    return math.hypot(FRAME / 2, thickness / 2)


def rotation(axis, tilt, spin):
    """(N, 3, 3) rotations digit frame -> canvas, in (x, y, z) = (column, row, depth): a turn by
    ``spin`` about the depth axis (within the digit's plane), then a tilt by ``tilt`` about the
    in-plane axis (cos ``axis``, sin ``axis``, 0) (Rodrigues' formula); radians, (N,) each."""
    c, s = torch.cos(spin), torch.sin(spin)
    zero, one = torch.zeros_like(spin), torch.ones_like(spin)
    turn = torch.stack([c, -s, zero, s, c, zero, zero, zero, one], 1).view(-1, 3, 3)
    kx, ky = torch.cos(axis), torch.sin(axis)
    cross = torch.stack([zero, zero, ky, zero, zero, -kx, -ky, kx, zero], 1).view(-1, 3, 3)  # [k]_x, k_z = 0
    sin_t, cos_t = torch.sin(tilt)[:, None, None], torch.cos(tilt)[:, None, None]
    tilt_m = torch.eye(3, dtype=tilt.dtype, device=tilt.device) + sin_t * cross + (1 - cos_t) * (cross @ cross)
    return tilt_m @ turn


def _uniform(gen, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)


def make_volumes(digits, gen, canvas=24, thickness=4, max_tilt=75.0, max_spin=0.0, scale=(0.7, 0.84),
                 translate=1.0, object_scale=1.0):
    """The digits (N, 1, 28, 28) extruded into slabs ``thickness`` px thick, turned in 3-D, scaled and
    placed in a ``canvas``-voxel cube (see the module docstring), on the digits' device.

    Returns the volumes (N, 1, canvas, canvas, canvas) in [0, 1] (depth, rows, columns) and the
    parameters drawn from ``gen`` (CPU, float64): ``tilt`` (radians, uniform in [0, max_tilt]),
    ``axis`` (the tilt axis's direction in the digit's plane, radians), ``spin`` (radians, uniform
    within +-max_spin), ``scale`` (digit px -> canvas voxels, times ``object_scale``), ``shift`` (N, 3)
    where the digit's centre went (normalised canvas coordinates x, y, z), ``rotation`` (N, 3, 3)
    digit frame -> canvas, and ``theta`` (N, 3, 4) float32, the canvas -> slab map sampled with.
    With no tilt, no spin and scale 1 the depth sum is the digit times ``thickness``."""
    if digits.dim() != 4 or digits.shape[1:] != (1, FRAME, FRAME):
        raise ValueError(f"digits: expected (N, 1, {FRAME}, {FRAME}), got {tuple(digits.shape)}")
    n = digits.shape[0]
    tilt = _uniform(gen, n, 0.0, math.radians(max_tilt))
    axis = _uniform(gen, n, 0.0, 2 * math.pi)
    spin = _uniform(gen, n, -math.radians(max_spin), math.radians(max_spin))
    k = _uniform(gen, n, *scale) * object_scale
    room = (canvas / 2 - k * object_radius(thickness)).clamp_min(0) * translate  # voxels
    # the centre within the ball of radius `room` around the canvas's: each axis within room / sqrt(3)
    centre = (2 * torch.rand(n, 3, generator=gen, dtype=torch.float64) - 1) * (room / math.sqrt(3))[:, None]
    rot = rotation(axis, tilt, spin)
    # canvas normalised p -> canvas voxels (canvas / 2) p -> digit px R^T (. - centre) / k -> the slab's
    # normalised coordinates: x and y over the frame's 28 px, z over the thickness
    to_slab = torch.tensor([2 / FRAME, 2 / FRAME, 2 / thickness], dtype=torch.float64)[:, None]
    a = to_slab * rot.transpose(1, 2) / k[:, None, None]
    theta = torch.cat([a * (canvas / 2), -(a @ centre[:, :, None])], 2).float()
    slabs = digits[:, :, None].expand(n, 1, thickness, FRAME, FRAME)
    on = theta.to(digits.device)
    with torch.no_grad():
        chunks = [st.affine_sample(slabs[i:i + RENDER_CHUNK].contiguous(), on[i:i + RENDER_CHUNK],
                                   (canvas, canvas, canvas)) for i in range(0, n, RENDER_CHUNK)]
    volumes = torch.cat(chunks) if chunks else digits.new_zeros(0, 1, canvas, canvas, canvas)
    params = {"tilt": tilt, "axis": axis, "spin": spin, "scale": k, "shift": centre / (canvas / 2),
              "rotation": rot, "theta": theta}
    return volumes.clamp_(0, 1), params


def volumes_for(split, digits, seed, cfg, epoch=None, device="cpu"):
    """The volumes of ``split`` ("train", "val" or "test") for ``seed``, on ``device``: the same for every
    model, fixed by the seed. Training: ``cfg.repeats`` renderings of each digit (digit i's r-th at
    i + r * n), or with ``epoch`` one rendering each, that epoch's. Returns (volumes, labels, params)."""
    x, y = {"train": (digits.train_x, digits.train_y), "val": (digits.val_x, digits.val_y),
            "test": (digits.test_x, digits.test_y)}[split]
    if split == "train" and epoch is None:
        x, y = x.repeat(cfg.repeats, 1, 1, 1), y.repeat(cfg.repeats)
    parts = ("3d", split, seed) if epoch is None else ("3d", split, seed, epoch)
    v, p = make_volumes(x.to(device), _gen(*parts), object_scale=digits.object_scale, **cfg.volume_options())
    return v, y.to(device), p


def epoch_pick(n, repeats, epoch, seed):
    """The pool indices epoch ``epoch`` trains on: one of the ``repeats`` renderings of each of the
    ``n`` digits, drawn by the seed."""
    return torch.arange(n) + n * torch.randint(0, repeats, (n,), generator=_gen("3d-pick", seed, epoch))


# --- models -------------------------------------------------------------------------------------------

def projection(volumes, thickness, spacing=1.0):
    """The volumes (N, C, D, H, W) summed along depth, each voxel standing for ``spacing`` canvas
    voxels, over the slab's thickness: an upright slab gives the digit times its scale."""
    return volumes.sum(2) * (spacing / thickness)


LOCALIZATION_FEATURES = 16 * 27


def localization3d(channels=1):
    """A small 3-D localisation network: 2 x 2 x 2 average pooling first (the cost), two 3 x 3 x 3
    convolutions with average pooling, the 16-channel map averaged down to 3 x 3 x 3 cells, all 432
    values straight to the regression layer. No hidden layer: which cells hold the slab's parts says
    how it is tilted, a linear read; with a 32-unit ReLU layer in between (the 2-D localisation
    network's design) the transformer learnt no tilt at all in 60 epochs, with or without a tilt
    curriculum, nor with the classifier trained first and frozen."""
    return nn.Sequential(
        nn.AvgPool3d(2), nn.Conv3d(channels, 8, 3, padding=1), nn.ReLU(True), nn.AvgPool3d(2),
        nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(True), nn.AdaptiveAvgPool3d(3), nn.Flatten(),
    )


class ProjectedCNN(Baseline):
    """CNN: the volume's depth sum, resampled to the classifier's size (nothing when it has it), a learnt
    residual filter, the classifier."""

    def __init__(self, size, stage, classifier, thickness):
        super().__init__(size, stage, classifier)
        self.thickness = thickness

    def front(self, x):
        return super().front(projection(x, self.thickness))


class STProjected(STClassifier):
    """ST-CNN-3d and ST-CNN-att3d: the 3-D transformer's output summed along depth, then the classifier."""

    def __init__(self, transformer, classifier, thickness, canvas):
        super().__init__(transformer, classifier)
        self.thickness, self.spacing = thickness, canvas / transformer.size[0]

    def front(self, x):
        return projection(self.transformer(x), self.thickness, self.spacing)


def build(name, cfg):
    """Model ``name`` (see ``MODELS``) for ``cfg``'s volumes. The CNN's residual filter is sized so that
    its parameters match the ST-CNN-3d's localisation network and regression layer."""
    if name == "CNN":
        target = _count(localization3d()) + (LOCALIZATION_FEATURES + 1) * 12
        width = matched_width("CNN", cfg.canvas, cfg.st_size, target, lambda w: residual_stage("CNN", cfg.st_size, w))
        return ProjectedCNN(cfg.st_size, residual_stage("CNN", cfg.st_size, width), cnn(cfg.st_size), cfg.thickness)
    if name in FAMILIES:
        transformer = st.SpatialTransformer(localization3d(), transform=FAMILIES[name],
                                            size=(cfg.depth, cfg.st_size, cfg.st_size))
        return STProjected(transformer, cnn(cfg.st_size), cfg.thickness, cfg.canvas)
    raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")


# --- what the transformers do ------------------------------------------------------------------------

def affine3d_theta(model, x, batch_size=256):
    """The (N, 3, 4) float64 matrices [A | b] (output -> canvas, normalised) that ``model.transformer``
    (any 3-D family of the affine kernel form) predicts for volumes ``x``."""
    tr = model.transformer
    was = model.training
    model.eval()
    with torch.no_grad():
        theta = torch.cat([tr.head(tr.localization(x[i:i + batch_size]).flatten(1))
                           for i in range(0, x.shape[0], batch_size)])
        m = tr.family.kernel_form(theta, tr.size).m
    model.train(was)
    return m.double().reshape(-1, 3, 4).cpu()


def residual_tilt(a, rot):
    """The residual tilt (degrees, (N,)) of outputs sampled with ``a`` (N, 3, 3, output -> canvas) from
    slabs placed by ``rot`` (N, 3, 3, digit -> canvas): the angle between the output's depth axis seen
    in the digit's frame, R^T a e_z, and the slab's normal e_z, folded to [0, 90]."""
    d = (rot.transpose(1, 2).double() @ a.double())[:, :, 2]
    cos = d[:, 2].abs() / d.norm(dim=1).clamp_min(1e-300)
    return torch.rad2deg(torch.acos(cos.clamp(max=1.0)))


def tilt_report(model, x, params, bin_deg=15.0):
    """How much of the applied tilt the 3-D transformer of ``model`` undoes on volumes ``x`` drawn with
    ``params`` (:func:`make_volumes`): ``median_residual_tilt_deg`` (:func:`residual_tilt`) beside
    ``median_residual_tilt_nothing_deg`` (the applied tilt: what doing nothing leaves); ``window_scale``
    (mean |det A|^(1/3): the side of the box it samples, as a share of the canvas's; below 1 it zooms
    in); ``by_tilt``: per ``bin_deg``-wide band of applied tilt, its count and the medians of the
    applied and residual tilt; ``n``."""
    theta = affine3d_theta(model, x)
    left = residual_tilt(theta[:, :, :3], params["rotation"])
    applied = torch.rad2deg(params["tilt"]).cpu()
    bins = []
    for i in range(max(1, math.ceil(float(applied.max()) / bin_deg))):
        lo, hi = i * bin_deg, (i + 1) * bin_deg
        pick = (applied >= lo) & (applied < hi)
        if pick.any():
            bins.append({"from_deg": lo, "to_deg": hi, "n": int(pick.sum()),
                         "median_applied_deg": round(_median(applied[pick]), 2),
                         "median_residual_tilt_deg": round(_median(left[pick]), 2)})
    return {"median_residual_tilt_deg": _median(left), "median_residual_tilt_nothing_deg": _median(applied),
            "window_scale": float(torch.linalg.det(theta[:, :, :3]).abs().pow(1 / 3).mean()), "n": int(x.shape[0]),
            "by_tilt": bins}


# --- the experiment -------------------------------------------------------------------------------------

def train_one(model_name, seed, digits, sets, cfg, bar=None):
    """Train one model on the volumes of ``seed`` (``sets``: {split: (volumes, labels, params)} from
    :func:`volumes_for`, on the model's device; "train" is the pool, absent with ``cfg.repeats`` 0);
    returns (model, result dict)."""
    dev = torch.device(cfg.device)
    test_x, test_y, test_p = sets["test"]
    val_error = None
    if "val" in sets:
        val_x, val_y, _ = sets["val"]
        val_error = lambda m: evaluate(m, val_x, val_y)  # noqa: E731
    torch.manual_seed(_seed("init", "3d", model_name, seed))
    model = build(model_name, cfg).to(dev)
    with torch.no_grad():
        model(test_x[:2])  # materialise lazy layers before the optimizer sees them
    n = len(digits.train_y)

    def train_data(epoch):
        if not cfg.repeats:
            return volumes_for("train", digits, seed, cfg, epoch, dev)[:2]
        idx = epoch_pick(n, cfg.repeats, epoch, seed).to(dev)
        return sets["train"][0][idx], sets["train"][1][idx]

    f = fit(model, cfg, train_data, ("3d", seed), val_error, bar)
    r = {"model": model_name, "seed": seed, "error": evaluate(model, test_x, test_y),
         "val_error": f.val_errors[f.kept_epoch] if f.val_errors else None, "params": count_parameters(model),
         "train_seconds": round(f.seconds, 2), "threads": torch.get_num_threads(), "kept_epoch": f.kept_epoch,
         "train_loss": [round(v, 5) for v in f.train_loss], "val_errors": [round(v, 3) for v in f.val_errors]}
    if hasattr(model, "transformer"):
        r["tilt"] = tilt_report(model, test_x, test_p)
    else:
        r["tilt"] = {"median_residual_tilt_nothing_deg": _median(torch.rad2deg(test_p["tilt"]))}
    return model, r


def _measures(t):
    if "median_residual_tilt_deg" not in t:
        return ""
    return (f"; tilt left {t['median_residual_tilt_deg']:.1f} deg median (none: "
            f"{t['median_residual_tilt_nothing_deg']:.1f}), window scale {t['window_scale']:.2f}")


def _run_line(r):
    line = (f"3d {r['model']:<12} seed {r['seed']}: {r['error']:5.1f}% test error"
            + (f", {r['val_error']:.1f}% val" if r["val_error"] is not None else "")
            + f", {r['params']:,} params ({r['train_seconds']:.0f} s)")
    return line + _measures(r["tilt"])


def format_table(results, cfg):
    """One row per model: percent test error (mean ± sd over seeds) with the parameter count; with three
    or more seeds, the paired difference to the CNN with its 95% interval, and for the ST-CNN-3d also to
    the control (ST-CNN-att3d) when it ran; the median residual tilt (degrees, mean ± sd over seeds; for
    the CNN what doing nothing leaves, "none") and the transformer's window scale."""
    paired = len(cfg.seeds) >= 3
    control = paired and CONTROL in cfg.models and "ST-CNN-3d" in cfg.models
    head = (["model", "% error (params)"] + ([f"vs {BASELINE}, paired diff [95% CI]"] if paired else [])
            + ([f"vs {CONTROL}, paired diff [95% CI]"] if control else [])
            + ["residual tilt (deg)", "window scale"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_model = {m: {r["seed"]: r for r in results if r["model"] == m} for m in cfg.models}
    for m in cfg.models:
        runs = by_model[m]
        cells = [m, error_cell(runs, cfg.seeds)]
        if paired:
            cells.append(paired_cell(runs, by_model.get(BASELINE, {}), cfg.seeds, BASELINE, m == BASELINE))
        if control:
            cells.append("—" if m == BASELINE else "(control)" if m == CONTROL
                         else paired_cell(runs, by_model[CONTROL], cfg.seeds, CONTROL))
        tilts = [runs[s]["tilt"] for s in cfg.seeds if s in runs]
        if tilts and all("median_residual_tilt_deg" in t for t in tilts):
            cells.append(_mean_sd([t["median_residual_tilt_deg"] for t in tilts]))
            cells.append(_mean_sd([t["window_scale"] for t in tilts], 2))
        elif tilts:
            cells.append(f"{statistics.mean(t['median_residual_tilt_nothing_deg'] for t in tilts):.1f} (none)")
            cells.append("1 (none)")
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_note(cfg, digits, seconds):
    note = (f"3-D: each test digit extruded into a slab {cfg.thickness} px thick, tilted out of its plane by up to "
            f"{cfg.max_tilt:g} degrees about a random in-plane axis"
            + (f", turned within its plane by up to {cfg.max_spin:g}" if cfg.max_spin else "")
            + f", scaled by {cfg.scale[0]:g} to {cfg.scale[1]:g} and placed in a {cfg.canvas}^3 volume. The CNN "
            f"classifies the volume's depth sum; the ST-CNNs the depth sum of their 3-D transformer's "
            f"{cfg.depth} x {cfg.st_size} x {cfg.st_size} output (att3d: scale and shift only). Percent test error, "
            f"mean ± standard deviation over seeds {list(cfg.seeds)}, with each model's parameter count; "
            f"{digits.name}, {len(digits.test_y)} test volumes, {cfg.epochs} epochs ({cfg.optimizer}), "
            f"{cfg.took(seconds)}.")
    if len(cfg.seeds) >= 3:
        note += " Paired diff: the model's error minus the other's, seed by seed, mean and 95% interval (paired t)."
    note += (" Residual tilt: the angle between the direction the classifier's input is summed along, seen in the "
             "digit's frame, and the slab's normal (degrees; 0: looked at face on), median over the test volumes, "
             "mean ± sd over seeds; 'none': what is left with no transformer (the applied tilt). Window scale: "
             "|det A|^(1/3), the side of the box the transformer samples as a share of the canvas's.")
    return note


def _display(images):
    """Each image scaled to its own maximum, for the figure."""
    return images / images.amax((1, 2, 3), keepdim=True).clamp_min(1e-6)


_VOLUMES = {}  # the volumes of the last (configuration, seed) a process rendered (see seed_volumes)


def seed_volumes(cfg, digits, seed):
    """{split: (volumes, labels, params)} of ``seed`` on ``cfg.device`` (:func:`volumes_for`; "train", the
    pool, only with ``cfg.repeats``), rendered once per process for the runs of that seed."""
    key = (_data_key(cfg), tuple(sorted(cfg.volume_options().items())), cfg.repeats, cfg.device, seed)
    if key not in _VOLUMES:
        _VOLUMES.clear()  # one seed's at a time: a pool is repeats x train x canvas^3 x 4 bytes
        dev = torch.device(cfg.device)
        sets = {k: volumes_for(k, digits, seed, cfg, device=dev) for k in (("train", "test") if cfg.repeats
                                                                             else ("test",))}
        if digits.val_x is not None and len(digits.val_y):
            sets["val"] = volumes_for("val", digits, seed, cfg, device=dev)
        _VOLUMES[key] = sets
    return _VOLUMES[key]


def _job(cfg, job, bar=None):
    """One run of :func:`run` (``job`` = (model name, seed)), in this process or a worker's: its result
    dict and, for the first seed, the figure's rows (the test volumes' depth sums and, for a
    transformer, its output's)."""
    m, s = job
    digits = task_data(cfg)
    sets = seed_volumes(cfg, digits, s)
    model, r = train_one(m, s, digits, sets, cfg, bar)
    fig = None
    if s == cfg.seeds[0]:
        x = sets["test"][0][:cfg.figure_count]
        model.eval()
        with torch.no_grad():
            fig = {"depth sum": projection(x, cfg.thickness).cpu()}
            if hasattr(model, "transformer"):
                fig[m] = model.front(x).cpu()
    return r, fig


def _caption(r):
    lines = [f"{r['model']} (seed {r['seed']}): {r['error']:.1f}% test error" + _measures(r["tilt"])]
    if "by_tilt" in r["tilt"]:
        lines.append("    median tilt left by band of applied tilt: " + ", ".join(
            f"{b['from_deg']:g}-{b['to_deg']:g} deg: {b['median_residual_tilt_deg']:.1f}"
            for b in r["tilt"]["by_tilt"]))
    return lines


def run(cfg, log=_print):
    """Run the 3-D task of ``cfg``; write results.json, table.md and figures/3d.png under ``cfg.out``;
    return the results dict (``log`` and the progress bars as in the main job; the runs trained
    ``cfg.workers`` at once, each process rendering the volumes of the seeds it trains)."""
    session = Session.start(cfg, log)
    outs = session.train_models(_job, _run_line, "3d")
    results = [r for r, _ in outs]
    rows, captions = {}, []
    for r, fig in outs:
        if fig is not None:
            rows.update(fig)
            captions += _caption(r)
    inputs = rows.pop("depth sum")
    rows["digit"] = session.digits.test_x[:cfg.figure_count].cpu()
    captions.insert(0, "Top: the test volume summed along depth (what the CNN sees); then each transformer's output "
                       "summed along depth; bottom: the digit face on. Each image scaled to its own maximum.")
    draw_figure(session.out / "figures" / "3d.png", "3d", _display(inputs), {k: _display(v) for k, v in rows.items()},
                captions=captions, input_label="depth sum",
                title=f"3d (seed {cfg.seeds[0]}): digit slabs tilted by up to {cfg.max_tilt:g} degrees in a "
                      f"{cfg.canvas}^3 volume, seen along depth before and after each 3-D transformer")
    table = format_table(results, cfg)
    return session.finish(results, table, _table_note(cfg, session.digits, session.elapsed()))


# --- the command line ----------------------------------------------------------------------------------

# A GPU run on MNIST: a 32^3 canvas, training volumes rendered afresh every epoch on the GPU (60,000 of
# 32^3 floats are 7.9 GB a time; a pool of them would not fit a host's memory)
PAPER = dict(models=MODELS, seeds=(0, 1, 2), epochs=60, batch_size=256, lr=1e-3, canvas=32, st_size=32, depth=16,
             scale=(0.95, 1.13), repeats=0)


def arguments(p, d):
    """The 3-D task's own options (``stn-digits --task 3d``)."""
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(d.models), metavar="M",
                   help=f"models, of {', '.join(MODELS)}")
    p.add_argument("--canvas", type=int, default=d.canvas, help="side of the volume, voxels")
    p.add_argument("--depth", type=int, default=d.depth,
                   help="depth of the transformers' output, voxels (summed; half the canvas: at its start a "
                        "transformer gives exactly the CNN's projection)")
    p.add_argument("--thickness", type=int, default=d.thickness, help="the slab's thickness, digit px")
    p.add_argument("--max-tilt", type=float, default=d.max_tilt,
                   help="largest tilt out of the digit's plane, degrees (drawn uniformly from 0)")
    p.add_argument("--max-spin", type=float, default=d.max_spin,
                   help="largest turn within the digit's plane, degrees")
    p.add_argument("--scale", nargs=2, type=float, default=list(d.scale), metavar=("LOW", "HIGH"),
                   help="range of the digit's scale, digit px to canvas voxels")
    p.add_argument("--translate", type=float, default=d.translate,
                   help="share of the room left in the canvas that the digit moves in")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="renderings of each training digit per seed, drawn once and shared by the models (each "
                        "epoch trains on one of each digit's; they take repeats x training digits x canvas^3 x 4 "
                        "bytes); 0: rendered afresh every epoch")
