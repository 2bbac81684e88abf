"""The paper's addition task (appendix A, "MNIST addition"): two digits, one in each channel, each
independently distorted; the label is their sum.

Each input is a 2-channel canvas (42 x 42 by default): each channel holds one digit, RTS-distorted
on its own (rotated within +-45 degrees, scaled 0.7 to 1.2, placed anywhere; :mod:`.distortions`),
and the label is the sum of the two digits (19 classes, 0 to 18); nothing else is given. The models
(:func:`build`), whose parameter counts are matched to ST-CNN-multi's within a few percent:

- FCN and CNN: the main job's baselines on the 2-channel canvas, resampled to ``st_size`` (the CNN
  with its learnt residual filter sized for the count; the FCN's hidden width chosen for it).
- ST-CNN-multi: two affine transformers predicted by one localisation network
  (``SpatialTransformer(num_transforms=2)``, one fused launch for both); each warps the whole
  2-channel input, and their two 2-channel outputs, side by side on the channels (4), go to the CNN.
- ST-CNN-single: one affine transformer warping the 2-channel input, then the CNN.
- ST-CNN-split: ST-CNN-multi's two transformers, but the CNN's trunk reads each transformer's
  output on its own and each has a linear layer of its own (:class:`PerTransformer`): digit k's
  logits come from transformer k's output alone.

Every model ends in the same output layer, :class:`SumOfTwo`: 20 logits read as two digits'
distributions whose convolution is the sum's (the label is still only the sum). Training follows a
distortion curriculum (``warmup`` epochs of undistorted pairs, then RTS growing to its full range
over ``curriculum`` epochs; validation and test always fully distorted). Without the two, in 60 to
150 epochs on scikit-learn's 1,213 training digits, no model got below 75% error (chance: 90%). A
separation curriculum (``separate``) first places the two digits in opposite corners, then anywhere:
with it each of ST-CNN-multi's transformers sides with one digit, and every model errs less (README).

What each transformer attends to is measured (:func:`attention_report`): for each transformer, the
share of each channel's digit ink its window holds, and how far its window's centre lies from each
digit's centre (known from the distortion's parameters).
"""

import statistics
from dataclasses import dataclass

import torch
from torch import nn

import stn_triton as st

from .distortions import FULL_ANGLE, distort
from .experiment import (Session, TaskConfig, _gen, _interpolate, _mean_sd, _median, _print, _seed,
                         add_hold_end_option, affine_theta, check_choices, check_hold_end, curriculum_angle,
                         draw_figure, error_cell, evaluate, fit, paired_cell, task_data)
from .models import (Baseline, STClassifier, _count, cnn, count_parameters, fcn, localization, matched_width,
                     residual_stage)

MODELS = ("FCN", "CNN", "ST-CNN-single", "ST-CNN-multi", "ST-CNN-split")
BASELINE = "CNN"  # the model the others are compared with, seed by seed
SEPARATE = (10, 30)  # the separation curriculum's default (hold, end) epochs: see AdditionConfig.separate
DIGITS = 10
CLASSES = 2 * DIGITS - 1  # sums 0 to 18
CHANNELS = 2


@dataclass
class AdditionConfig(TaskConfig):
    """The addition task: each model for each seed on pairs of RTS-distorted digits."""

    models: tuple = ("FCN", "CNN", "ST-CNN-multi")
    epochs: int = 90
    canvas: int = 42  # the side of each channel's canvas (RTS's is 42)
    # a distortion curriculum: `warmup` epochs of undistorted training pairs (each digit upright, at
    # scale 1, in the canvas's centre), then RTS's distortion grows linearly to the full one over
    # `curriculum` epochs (from 1/curriculum of it): the largest rotation to 45 degrees, the room to
    # move in to the whole canvas, the scale range to 0.7 to 1.2. Validation and test: the full one.
    # ST-CNN-multi, seeds 0-2, one thread: 42.8 +- 2.9% error with 5 then 20 (the defaults); 51.4 +-
    # 7.6 with 10 then 30; 58 and 60 (seeds 0, 1) with 10 then 45. The CNN: 66.8 (seed 0) and 68.6.
    curriculum: int = 20
    warmup: int = 5
    # a separation curriculum, (hold, end) epochs, or () for none: until epoch `hold` the first channel's
    # training digit sits at the top left of the room it may move in and the second's at the bottom
    # right (the room of the whole canvas, whatever the distortion curriculum's share), and from `hold`
    # to `end` their placement moves linearly to RTS's own (uniform over the room), which validation and
    # test always use. The same images for every model. With it each transformer sides with one digit (README).
    separate: tuple = SEPARATE
    # batch normalisation in the CNN classifier: learns faster (seed 0, 60 epochs: CNN 36 to 63%, the ST
    # 32 to 65% error, by seed), but its transformers then zoom out (scale 1.1 to 1.2) and the ST-CNN is no
    # better than the CNN; without it they zoom in (0.8) and the ST-CNN is better (see the docstring)
    batch_norm: bool = False
    out: str = "runs/digits-addition"
    figure_count: int = 10

    def __post_init__(self):
        self.models = check_choices("models", self.models, MODELS)
        super().__post_init__()
        if not isinstance(self.canvas, int) or self.canvas < 28:
            raise ValueError(f"canvas: expected a side of at least 28 px, got {self.canvas!r}")
        for name in ("curriculum", "warmup"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number of epochs >= 0, got {getattr(self, name)!r}")
        self.separate = check_hold_end("separate", self.separate)

    def rts_options(self, epoch=None):
        """RTS's options for each channel: the canvas, and in training epoch ``epoch`` (0-based) the
        curriculum's share of the distortion and the separation curriculum's placement (the first
        channel's; :func:`make_pairs` mirrors it for the second); None: validation and test, the full
        distortion."""
        opts = {"canvas_factor": self.canvas / 28}
        if epoch is not None and (self.curriculum or self.warmup):
            t = 0.0 if epoch < self.warmup else curriculum_angle(1.0, epoch - self.warmup, self.curriculum)
            opts["max_angle"] = FULL_ANGLE["RTS"] * t
            opts["translate"] = t
            opts["scale"] = (1 - 0.3 * t, 1 + 0.2 * t)
        if epoch is not None and self.separate:
            hold, end = self.separate
            weight = _interpolate([[hold, 1.0], [end, 0.0]], epoch)
            if weight > 0:
                opts.update(translate=1.0, place=(-1.0, -1.0), place_weight=weight)
        return opts


# --- data ---------------------------------------------------------------------------------------------

def make_pairs(x, y, gen, object_scale=1.0, **rts_options):
    """Pairs of the digits ``x`` (N, 1, 28, 28) with labels ``y`` (N,): every digit once as the first,
    with a different digit drawn from ``gen`` as the second, each RTS-distorted on its own (``rts_options``,
    e.g. ``canvas_factor``, ``max_angle``; with ``place``, the second digit is pulled towards the opposite
    point). Returns the 2-channel images (N, 2, S, S), the labels (the
    sums, (N,)) and the parameters: ``index`` (N, 2) of the two digits, ``digits`` (N, 2) their labels,
    ``first`` and ``second`` what RTS drew for each channel (``shift``: where the digit's centre was
    placed, normalised canvas coordinates; ``angle``, ``scale``, ``theta``)."""
    n = len(y)
    first = torch.arange(n)
    second = (first + torch.randint(1, max(n, 2), (n,), generator=gen)) % max(n, 1)
    second_options = dict(rts_options)
    if rts_options.get("place") is not None:  # the second channel's digit towards the opposite corner
        second_options["place"] = tuple(-v for v in rts_options["place"])
    a, pa = distort("RTS", x[first], gen, return_params=True, object_scale=object_scale, **rts_options)
    b, pb = distort("RTS", x[second], gen, return_params=True, object_scale=object_scale, **second_options)
    digits = torch.stack([y[first], y[second]], 1)
    return torch.cat([a, b], 1), digits.sum(1), {"index": torch.stack([first, second], 1), "digits": digits,
                                                 "first": pa, "second": pb}


def pairs_for(split, digits, seed, cfg, epoch=None):
    """The pairs of ``split`` ("train", "val" or "test") for ``seed`` (training: of epoch ``epoch``, with the
    curriculum): the same for every model; validation and test fixed by the seed."""
    x, y = {"train": (digits.train_x, digits.train_y), "val": (digits.val_x, digits.val_y),
            "test": (digits.test_x, digits.test_y)}[split]
    parts = ("addition", split, seed) if epoch is None else ("addition", split, seed, epoch)
    return make_pairs(x, y, _gen(*parts), digits.object_scale, **cfg.rts_options(epoch))


# --- models -------------------------------------------------------------------------------------------

class SumOfTwo(nn.Module):
    """The output layer of every addition model: the sum's 19 log-probabilities from two digits' 10
    logits each (N, 20): log p(s) = logsumexp over a + b = s of log p1(a) + log p2(b). The label is
    still only the sum; this says that it is a sum of two digits (and cross entropy on these
    log-probabilities is the sum's negative log-likelihood)."""

    def __init__(self):
        super().__init__()
        pairs = torch.arange(DIGITS)[:, None] + torch.arange(DIGITS)[None, :]
        self.register_buffer("mask", torch.stack([pairs == s for s in range(CLASSES)]).flatten(1), persistent=False)

    def forward(self, logits):
        a, b = logits.view(-1, 2, DIGITS).log_softmax(2).unbind(1)
        joint = (a[:, :, None] + b[:, None, :]).flatten(1)  # (N, 100)
        return joint[:, None, :].masked_fill(~self.mask, float("-inf")).logsumexp(2)  # (N, 19)


def _classifier(size, channels, norm=False):
    """The CNN (``norm``: batch-normalised) giving 20 logits, two digits' worth, into :class:`SumOfTwo`."""
    return nn.Sequential(cnn(size, classes=2 * DIGITS, channels=channels, norm=norm), SumOfTwo())


class PerTransformer(nn.Module):
    """The classifier of ST-CNN-split: one CNN trunk applied to each of the K transformers' outputs
    (the input's K groups of channels), and a linear layer of its own for each, so that transformer
    k's output alone gives digit k's 10 logits; then :class:`SumOfTwo`. Its parameters are those of
    ``_classifier(size, channels)`` (a trunk on ``channels``, 2 x 10 outputs)."""

    def __init__(self, size, channels, k=2, norm=False):
        super().__init__()
        net = cnn(size, classes=DIGITS * k, channels=channels, norm=norm)
        self.trunk, last = net[:-1], net[-1]
        self.k, self.channels = k, channels
        self.heads = nn.ModuleList(nn.Linear(last.in_features, DIGITS) for _ in range(k))
        with torch.no_grad():  # the joint layer's seeded init, split by rows
            for i, h in enumerate(self.heads):
                h.weight.copy_(last.weight[i * DIGITS:(i + 1) * DIGITS])
                h.bias.copy_(last.bias[i * DIGITS:(i + 1) * DIGITS])
        self.sum = SumOfTwo()

    def forward(self, x):
        n = x.shape[0]
        feats = self.trunk(x.reshape(n * self.k, self.channels, *x.shape[2:])).view(n, self.k, -1)
        return self.sum(torch.cat([h(feats[:, i]) for i, h in enumerate(self.heads)], 1))


def _st_count(side, size, num_transforms, norm=False):
    """Parameters of an ST-CNN with ``num_transforms`` affine transformers (lazy layers not yet made)."""
    return (_count(localization("CNN", side, CHANNELS)) + 33 * 6 * num_transforms
            + _count(_classifier(size, CHANNELS * num_transforms, norm)))


def build(name, side, st_size=28, norm=False):
    """Model ``name`` (see ``MODELS``) for 2-channel canvases of ``side`` px; every model brings the input
    to ``st_size`` px before classifying and ends in :class:`SumOfTwo`. The baselines' counts are
    matched to ST-CNN-multi's: the CNN's by its residual filter's width, the FCN's by its hidden width."""
    target = _st_count(side, st_size, 2, norm)
    if name == "FCN":  # inputs -> hidden -> hidden -> 20: the hidden width that gives the count
        inputs, out = CHANNELS * st_size * st_size, 2 * DIGITS
        hidden = min(range(1, 1024), key=lambda h: abs((inputs + 1) * h + (h + 1) * h + (h + 1) * out - target))
        return Baseline(st_size, None, nn.Sequential(fcn(st_size, hidden, out, CHANNELS), SumOfTwo()))
    if name == "CNN":
        width = matched_width("CNN", side, st_size, target - _count(_classifier(st_size, CHANNELS, norm)),
                              lambda w: residual_stage("CNN", st_size, w, CHANNELS))
        return Baseline(st_size, residual_stage("CNN", st_size, width, CHANNELS),
                        _classifier(st_size, CHANNELS, norm))
    k = {"ST-CNN-single": 1, "ST-CNN-multi": 2, "ST-CNN-split": 2}.get(name)
    if k is None:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")
    transformer = st.SpatialTransformer(localization("CNN", side, CHANNELS), transform="affine",
                                        size=(st_size, st_size), num_transforms=k)
    if name == "ST-CNN-split":
        return STClassifier(transformer, PerTransformer(st_size, CHANNELS, k, norm))
    return STClassifier(transformer, _classifier(st_size, CHANNELS * k, norm))


# --- what the transformers attend to ----------------------------------------------------------------

@torch.no_grad()
def attention_report(model, x, params):
    """Where each affine transformer of ``model`` (an ST-CNN on the 2-channel images ``x``, drawn with
    ``params`` by :func:`make_pairs`) looks, per transformer k (lists over the channels c = 0, 1):

    - ``ink_held``: the share of channel c's digit ink inside transformer k's window, mean over the
      images: the ink in its output times the area one output pixel stands for (|det A| times the
      canvas's pixels per output pixel), over the ink of the input channel (1: all of that digit is
      in view; bilinear sampling makes it approximate, to a few percent);
    - ``centre_offset``: the median distance from the window's centre (theta's translation b) to the
      centre of channel c's digit (RTS's ``shift``), in normalised canvas units (2 = the canvas side);
    - ``nearer``: the share of the images on which the window's centre is nearer channel c's digit
      than the other's;
    - ``attends``: the channel whose digit the window's centre is nearer on most images;
    - ``scale``: the mean of sqrt|det A| (below 1: the window is smaller than the canvas).

    Also ``centre_offset_nothing``: the median distance from the canvas's centre to each channel's
    digit (what a window that stays centred would have)."""
    was = model.training
    model.eval()
    n = x.shape[0]
    k = model.transformer.num_transforms
    theta = affine_theta(model, x).view(n, k, 2, 3)
    out = model.transformer(x).view(n, k, CHANNELS, *model.transformer.size).double().cpu()
    model.train(was)
    a, b = theta[..., :2], theta[..., 2]
    centres = torch.stack([params["first"]["shift"], params["second"]["shift"]], 1).cpu()  # (n, 2 channels, 2)
    offset = (b[:, :, None] - centres[:, None]).norm(dim=-1)  # (n, k, c)
    pixels = x.shape[-1] * x.shape[-2] / (out.shape[-1] * out.shape[-2])
    ink = x.double().cpu().sum((-2, -1))  # (n, c)
    held = out.sum((-2, -1)) * torch.linalg.det(a).abs()[..., None] * pixels / ink[:, None].clamp_min(1e-9)
    nearer0 = (offset[..., 0] < offset[..., 1]).double().mean(0)  # (k,)
    transformers = []
    for t in range(k):
        near = [float(nearer0[t]), 1 - float(nearer0[t])]
        transformers.append({"attends": int(near[1] > near[0]), "nearer": near,
                             "ink_held": [float(held[:, t, c].mean()) for c in range(CHANNELS)],
                             "centre_offset": [_median(offset[:, t, c]) for c in range(CHANNELS)],
                             "scale": float(torch.linalg.det(a[:, t]).abs().sqrt().mean())})
    return {"transformers": transformers, "n": n,
            "centre_offset_nothing": [_median(centres[:, c].norm(dim=-1)) for c in range(CHANNELS)]}


def _own_other(report):
    """Per transformer: (its channel, ink held of its channel's digit and of the other's, centre offset
    to its digit and to the other, share of images nearer its digit)."""
    rows = []
    for t in report["transformers"]:
        c = t["attends"]
        rows.append((c, t["ink_held"][c], t["ink_held"][1 - c], t["centre_offset"][c], t["centre_offset"][1 - c],
                     t["nearer"][c]))
    return rows


def describe_attention(report):
    """One line: what each transformer was measured to attend to."""
    parts = []
    for i, (c, own, other, off_own, off_other, near) in enumerate(_own_other(report), 1):
        parts.append(f"transformer {i}: scale {report['transformers'][i - 1]['scale']:.2f}, centre nearer ch{c + 1}'s "
                     f"digit on {100 * near:.0f}% of images (median offset {off_own:.2f} vs {off_other:.2f}), "
                     f"holds {own:.2f} of its ink, {other:.2f} of ch{2 - c}'s")
    return "; ".join(parts)


# --- the table -------------------------------------------------------------------------------------------

def format_table(results, cfg):
    """One row per model: percent test error (mean ± sd over seeds) with the parameter count; with
    three or more seeds, the paired difference to the CNN with its 95% interval; for the ST models, what
    their transformers attend to (means over seeds and transformers, each transformer taken with the
    channel it attends to, 'own'): the share of each digit's ink its window holds, own / other; the
    median offset of its centre from the own / other digit's centre; the share of images on which its
    centre is nearer the own digit; and in how many seeds the two transformers attend to different
    channels."""
    paired = len(cfg.seeds) >= 3
    head = ["model", "% error (params)"] + ([f"vs {BASELINE}, paired diff [95% CI]"] if paired else []) + [
        "window scale", "transformers on different channels", "ink held, own / other digit",
        "centre offset, own / other digit", "centre nearer own digit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_runs = {r["seed"]: r for r in results if r["model"] == BASELINE}
    for m in cfg.models:
        runs = {r["seed"]: r for r in results if r["model"] == m}
        cells = [m, error_cell(runs, cfg.seeds)]
        if paired:
            cells.append(paired_cell(runs, base_runs, cfg.seeds, BASELINE, m == BASELINE))
        reports = [runs[s]["attention"] for s in cfg.seeds if s in runs and "attention" in runs[s]]
        if reports:
            rows = [row for rep in reports for row in _own_other(rep)]
            k = len(reports[0]["transformers"])
            split = sum(len({t["attends"] for t in rep["transformers"]}) == k for rep in reports)
            cells.append(_mean_sd([t["scale"] for rep in reports for t in rep["transformers"]], 2))
            cells.append(f"{split}/{len(reports)} seeds" if k > 1 else "(one transformer)")
            cells.append(f"{_mean_sd([r[1] for r in rows], 2)} / {_mean_sd([r[2] for r in rows], 2)}")
            cells.append(f"{_mean_sd([r[3] for r in rows], 2)} / {_mean_sd([r[4] for r in rows], 2)}")
            cells.append(f"{_mean_sd([100 * r[5] for r in rows], 0)}%")
        else:
            nothing = [v for s in cfg.seeds if s in runs for v in runs[s].get("centre_offset_nothing", [])]
            centre = f"{statistics.mean(nothing):.2f} (canvas centre)" if nothing else "—"
            cells += ["—", "—", "—", centre, "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_note(cfg, digits, seconds):
    note = (f"Addition of two RTS-distorted digits, one per channel of a {cfg.canvas} x {cfg.canvas} canvas (19 "
            f"classes). Percent test error, mean ± standard deviation over seeds {list(cfg.seeds)}, with each model's "
            f"parameter count; {digits.name}, {len(digits.test_y)} test pairs, {cfg.epochs} epochs "
            f"({cfg.optimizer}; training pairs undistorted for {cfg.warmup} epochs, then distorted more and more "
            f"to RTS's full range over {cfg.curriculum}"
            + (f"; the two digits placed in opposite corners until epoch {cfg.separate[0]}, then more and more "
               f"anywhere until {cfg.separate[1]}" if cfg.separate else "") + f"), {cfg.took(seconds)}.")
    if len(cfg.seeds) >= 3:
        note += (f" Paired diff: the model's error minus the {BASELINE}'s, seed by seed, mean and 95% interval "
                 f"(paired t).")
    note += (" What the transformers attend to, on the test pairs (mean ± sd over seeds and transformers; 'own': "
             "the channel whose digit a transformer's window centre is nearer on most images): its window's scale "
             "(sqrt |det A|: below 1 it zooms in, above 1 out); in how many seeds the two transformers attend to "
             "different channels; the share of each "
             "digit's ink inside its window; the median distance of its window's centre from each digit's placed "
             "centre (normalised canvas units, 2 = the side; 'canvas centre': the same for a window that stays "
             "centred); the share of images on which its centre is nearer its own digit.")
    return note


# --- the experiment -------------------------------------------------------------------------------------

def train_one(model_name, seed, digits, cfg, bar=None):
    """Train one model on the pairs of ``seed``; returns (model, result dict, test images, test params)."""
    dev = torch.device(cfg.device)
    test_x, test_y, test_params = pairs_for("test", digits, seed, cfg)
    test_x, test_y = test_x.to(dev), test_y.to(dev)
    val_error = None
    if digits.val_x is not None and len(digits.val_y):
        val_x, val_y, _ = pairs_for("val", digits, seed, cfg)
        val_x, val_y = val_x.to(dev), val_y.to(dev)
        val_error = lambda m: evaluate(m, val_x, val_y)  # noqa: E731
    torch.manual_seed(_seed("init", "addition", model_name, seed))
    model = build(model_name, cfg.canvas, cfg.st_size, cfg.batch_norm).to(dev)
    with torch.no_grad():
        model(test_x[:2])  # materialise lazy layers before the optimizer sees them

    def train_data(epoch):
        x, y, _ = pairs_for("train", digits, seed, cfg, epoch)
        return x.to(dev), y.to(dev)

    f = fit(model, cfg, train_data, ("addition", seed), val_error, bar)
    r = {"model": model_name, "seed": seed, "error": evaluate(model, test_x, test_y),
         "val_error": f.val_errors[f.kept_epoch] if f.val_errors else None, "params": count_parameters(model),
         "train_seconds": round(f.seconds, 2), "threads": torch.get_num_threads(), "kept_epoch": f.kept_epoch,
         "train_loss": [round(v, 5) for v in f.train_loss], "val_errors": [round(v, 3) for v in f.val_errors]}
    if hasattr(model, "transformer"):
        r["attention"] = attention_report(model, test_x, test_params)
    else:
        centres = torch.stack([test_params["first"]["shift"], test_params["second"]["shift"]], 1)
        r["centre_offset_nothing"] = [_median(centres[:, c].norm(dim=-1)) for c in range(CHANNELS)]
    return model, r, test_x


def _run_line(r):
    line = (f"addition {r['model']:<13} seed {r['seed']}: {r['error']:5.1f}% test error"
            + (f", {r['val_error']:.1f}% val" if r["val_error"] is not None else "")
            + f", {r['params']:,} params ({r['train_seconds']:.0f} s)")
    return line + (f"; {describe_attention(r['attention'])}" if "attention" in r else "")


def _job(cfg, job, bar=None):
    """One run of :func:`run` (``job`` = (model name, seed)), in this process or a worker's: its result
    dict and, for the first seed, the figure's inputs and what each transformer made of them."""
    m, s = job
    model, r, test_x = train_one(m, s, task_data(cfg), cfg, bar)
    fig = None
    if s == cfg.seeds[0]:
        inputs, outputs = test_x[:cfg.figure_count], {}
        if hasattr(model, "transformer"):
            model.eval()
            with torch.no_grad():
                out = model.transformer(inputs).cpu()
            out = out.view(out.shape[0], -1, *out.shape[-3:])
            for t in range(out.shape[1]):
                outputs[m if out.shape[1] == 1 else f"{m} T{t + 1}"] = out[:, t]
        fig = (inputs.cpu(), outputs)
    return r, fig


def run(cfg, log=_print):
    """Run the addition task of ``cfg``; write results.json, table.md and figures/addition.png under
    ``cfg.out``; return the results dict (``log`` and the progress bars as in the main job; the runs
    trained ``cfg.workers`` at once)."""
    session = Session.start(cfg, log)
    outs = session.train_models(_job, _run_line, "addition")
    results = [r for r, _ in outs]
    fig_inputs, fig_outputs, captions = None, {}, []
    for r, fig in outs:
        if fig is None:
            continue
        fig_inputs = fig[0]
        fig_outputs.update(fig[1])
        if fig[1]:
            captions.append(f"{r['model']} (seed {r['seed']}): {r['error']:.1f}% test error")
            captions += [f"  {line}" for line in describe_attention(r["attention"]).split("; ")]
    draw_figure(session.out / "figures" / "addition.png", "addition", fig_inputs, fig_outputs, captions=captions,
                title="addition: inputs (channel 1 red, channel 2 green) and what each transformer made of them")
    table = format_table(results, cfg)
    return session.finish(results, table, _table_note(cfg, digits=session.digits, seconds=session.elapsed()))


# --- the command line ----------------------------------------------------------------------------------

PAPER = dict(models=MODELS, seeds=(0, 1, 2), epochs=150, batch_size=256, lr=1e-3)


def arguments(p, d):
    """The addition task's own options (``stn-digits --task addition``)."""
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(d.models), metavar="M",
                   help=f"models, of {', '.join(MODELS)}")
    p.add_argument("--canvas", type=int, default=d.canvas, help="side of each channel's canvas, px")
    p.add_argument("--curriculum", type=int, default=d.curriculum, metavar="EPOCHS",
                   help="the training pairs' distortion grows linearly to RTS's over EPOCHS epochs (after "
                        "--warmup); validation and test use the full distortion; 0: none")
    p.add_argument("--warmup", type=int, default=d.warmup, metavar="EPOCHS",
                   help="epochs of undistorted training pairs before the curriculum")
    add_hold_end_option(p, "separate", d.separate,
                        "training pairs: the first channel's digit at the top left, the second's at the bottom right "
                        "until epoch HOLD, then placed more and more anywhere until END; validation and test: "
                        "anywhere",
                        "no separation curriculum: the digits placed anywhere throughout")
    p.add_argument("--batch-norm", action="store_true",
                   help="batch normalisation in the CNN classifier (learns faster; its transformers zoom out)")
