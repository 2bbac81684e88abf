"""``stn-digits`` / ``python -m stn_triton.integrations.digits``: the paper's digit experiments.

Four of the paper's appendix A experiments, one task at a time. --task classify (the default) is
the README's first command: R and RTS, CNN vs ST-CNN (affine), three seeds, 40 epochs with a
rotation curriculum over the first 15, on scikit-learn's bundled digits, on the CPU, in about two
minutes on two cores. --task addition: two RTS-distorted digits, one per channel, labelled with
their sum; FCN and CNN against an ST-CNN with two parallel transformers. --task colocalisation:
find the digit of one class in cluttered images with a triplet loss, no boxes and no labels. --task
3d: each digit extruded into a slab, tilted in 3-D and placed in a volume; a CNN on the volume's
depth sum against a 3-D spatial transformer (affine3d) whose output is summed before the same CNN.
``--paper`` selects the paper's sizes for a GPU run (give it MNIST with ``--data``); ``--task T
--help`` lists the options of task T.

An --out folder that already holds a run (results.json, table.md, figures/*.png or models/*.pt as
this command writes them, of any task) is refused unless --overwrite says to delete those files (and
no others) and start afresh. An option's value that makes no sense, a --data folder that is missing,
lacks the IDX files or cannot be read, and a missing scikit-learn are one-line errors, all raised
before anything trains (all but unreadable files before any data is read, or any file deleted).

On a terminal it shows progress bars; otherwise (a log file, CI) it prints one line per finished
run and no bars. Every task trains its runs several at once (``--workers``, by default one process
per CPU thread, each with one thread: small networks use one thread far better than two).
"""

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from stn_triton._cli import HelpFormatter, description
from . import addition, colocalisation, threed
from .data import missing_idx_files
from .distortions import DISTORTIONS
from .experiment import (DEFAULT_LR, OPTIMIZERS, POSE_LR_SCALE, PRECISIONS, Config, DataError, add_hold_end_option,
                         run)
from .models import MODELS

PAPER = dict(distortions=DISTORTIONS, models=MODELS, seeds=(0, 1, 2), epochs=60, batch_size=256, lr=1e-3)


def _classify_arguments(p, d):
    p.add_argument("--distortions", nargs="+", choices=DISTORTIONS, default=list(d.distortions), metavar="D",
                   help=f"distortions, of {', '.join(DISTORTIONS)}")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(d.models), metavar="M",
                   help=f"models, of {', '.join(MODELS)}")
    p.add_argument("--curriculum", type=int, default=d.curriculum, metavar="EPOCHS",
                   help="R and RTS: the training rotation grows linearly to its full angle over the first EPOCHS "
                        "epochs (the same images for every model, but RTS's transformer models under "
                        "--pose-curriculum; validation and test use the full angle); 0: none")
    add_hold_end_option(p, "pose-curriculum", d.pose_curriculum,
                        "RTS, the transformer models: centred training digits filling the canvas, rotated by up to 6 "
                        "growing to 90 degrees until epoch HOLD, then RTS's translation, scale and rotation by epoch "
                        f"END, with the localisation networks at {POSE_LR_SCALE:g}x the rate; the baselines train on "
                        "RTS's images under --curriculum",
                        "RTS: no pose curriculum (the transformer models' angle follows --curriculum, as the "
                        "baselines' does)")
    p.add_argument("--save-models", action="store_true",
                   help="write every trained model to OUT/models/DISTORTION-MODEL-seedS.pt "
                        "(stn_triton.integrations.digits.load_model reads them)")


class Task(NamedTuple):
    """One task of ``stn-digits``: its configuration (a dataclass extending ``TrainConfig``), what runs
    it (``run(cfg)``), what adds its own options to the parser (``arguments(parser, defaults)``; the
    options every task shares are added for each field its configuration has), what ``--paper``
    sets, and a line of help."""

    config: type
    run: Callable
    arguments: Callable
    paper: dict
    help: str


# A new task slots in here: a module with its configuration, run and arguments, and one entry.
TASKS = {
    "classify": Task(Config, run, _classify_arguments, PAPER,
                     "each digit distorted, classified (the paper's Table 1)"),
    "addition": Task(addition.AdditionConfig, addition.run, addition.arguments, addition.PAPER,
                     "two distorted digits, one per channel, labelled with their sum"),
    "colocalisation": Task(colocalisation.ColocalisationConfig, colocalisation.run, colocalisation.arguments,
                           colocalisation.PAPER, "the digit of one class found in cluttered images, unsupervised"),
    "3d": Task(threed.ThreeDConfig, threed.run, threed.arguments, threed.PAPER,
               "each digit a slab tilted in 3-D in a volume; a 3-D transformer before the projection"),
}


def _shared_arguments(p, d, fields):
    """The options every task has, each added when the task's configuration has its field."""

    def add(flag, **kw):
        if flag[2:].replace("-", "_") in fields:
            p.add_argument(flag, **kw)

    add("--seeds", nargs="+", type=int, default=list(d.seeds), help="one run per seed; the table averages")
    add("--epochs", type=int, default=d.epochs, help="passes over the training set")
    add("--batch-size", type=int, default=d.batch_size, help="images per step")
    add("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
        help="adam (one-cycle schedule) or sgd (the paper's: momentum 0.9, the rate divided by 10 after "
             "a third and two thirds of the epochs)")
    add("--lr", type=float, default=None,
        help=f"Adam's peak rate or SGD's initial rate (default {DEFAULT_LR['adam']:g} for adam, "
             f"{DEFAULT_LR['sgd']:g} for sgd)")
    add("--localization-lr-scale", type=float, default=d.localization_lr_scale,
        help="the localisation networks learn at lr times this")
    add("--st-size", type=int, default=d.st_size,
        help="side of what the first stages produce: the transformers' output, the classifiers' input")
    add("--data", default=d.data,
        help="'digits' (scikit-learn's bundled digits) or a folder of MNIST-format IDX files "
             "(train-images-idx3-ubyte[.gz] etc., e.g. /usr/share/datasets/fashion-mnist)")
    add("--train-limit", type=int, default=None,
        help="use only the first N training images (only these are read and converted)")
    add("--test-limit", type=int, default=None, help="use only the first N test images (likewise)")
    add("--val-fraction", type=float, default=d.val_fraction,
        help="fraction of the training images held out for validation (the same for every seed)")
    add("--keep", choices=("last", "best"), default=d.keep,
        help="which epoch's weights are tested: the last, or the best on the validation split")
    add("--object-scale", type=float, default=None,
        help="shrink the objects by this before distorting them (default: measured from the training "
             "images, 1 unless they reach beyond the frame's inscribed circle, as Fashion-MNIST's do)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add("--precision", choices=PRECISIONS, default=d.precision,
        help="what training computes in: float32, or bfloat16 autocast (convolutions, linear layers and the "
             "transformers' output in bfloat16; weights, optimiser, transform parameters and every evaluation "
             "in float32); auto: bfloat16 where the device has bfloat16 instructions (a CPU with AVX512-BF16 "
             "or AMX, a GPU of compute capability 8.0 or more), else float32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, 1 or more (default: all cores)")
    add("--workers", type=int, default=getattr(d, "workers", 0),
        help="runs trained at once, each in its own process with its share of the threads (small networks "
             "use one thread far better than two); 0: one per thread on the CPU, 1 on a GPU")
    add("--out", default=d.out, help="where results.json, table.md and figures/ go; a folder that already holds a "
        "run needs --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what an earlier run wrote in OUT (results.json, table.md, figures/*.png, "
                        "models/*.pt) and start afresh; other files there are kept")


def parser(task="classify"):
    """The parser of ``task``'s options (with --task, which chooses among :data:`TASKS`)."""
    t = TASKS[task]
    p = argparse.ArgumentParser(prog="stn-digits", description=description(__doc__, 0) + "\n\n"
                                + description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--task", choices=TASKS, default="classify",
                   help="; ".join(f"{name}: {x.help}" for name, x in TASKS.items()))
    d = t.config()
    t.arguments(p, d)
    _shared_arguments(p, d, {f.name for f in dataclasses.fields(t.config)})
    paper = ", ".join(f"{k.replace('_', ' ')} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                      for k, v in t.paper.items())
    p.add_argument("--paper", action="store_true",
                   help=f"the paper-sized run of this task ({paper}; device auto): for a GPU and MNIST")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on a terminal either (elsewhere there are none)")
    return p


def _as_options(message, args):
    """A configuration's error message in the command line's terms: the fields it names that are options
    of ``args`` become those options (``train_limit`` -> ``--train-limit``): every such name with an
    underscore, and the plain ones only in the message's head, before its first colon."""
    options = {name for name in vars(args) if name not in ("task", "paper", "no_progress", "overwrite")}

    def flag(m):
        return "--" + m.group(0).replace("_", "-") if m.group(0) in options else m.group(0)
    head, colon, rest = message.partition(": ")
    if not colon:
        head, rest = "", message
    word, underscored = r"(?<![\w/.-])[a-z_]+(?![\w/.-])", r"(?<![\w/.-])[a-z]+(?:_[a-z]+)+(?![\w/.-])"  # not in paths
    return re.sub(word, flag, head) + colon + re.sub(underscored, flag, rest)


def _listed(names, most=6):
    """``names`` joined with commas, the first ``most`` of them and how many more."""
    names = list(names)
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


_MODEL_FILE = re.compile(rf"(?:{'|'.join(map(re.escape, DISTORTIONS))})-(?:{'|'.join(map(re.escape, MODELS))})"
                         r"-seed-?\d+\.pt")


def run_files(out):
    """What a run of ``stn-digits`` (of any task) wrote in the folder ``out``, as paths relative to it:
    results.json, table.md, figures/<distortion or task>.png and models/<distortion>-<model>-seed<s>.pt
    (``--save-models``); nothing else in it, a user's own files, is counted."""
    out = Path(out)
    found = [name for name in ("results.json", "table.md") if (out / name).is_file()]
    figures = [f"{name}.png" for name in (*DISTORTIONS, *(t for t in TASKS if t != "classify"))]
    found += [f"figures/{name}" for name in figures if (out / "figures" / name).is_file()]
    if (out / "models").is_dir():
        found += sorted(f"models/{p.name}" for p in (out / "models").iterdir()
                        if p.is_file() and _MODEL_FILE.fullmatch(p.name))
    return found


def _check_out(out, overwrite):
    """The files of an earlier run in ``out`` (for --overwrite to delete); SystemExit when --out is not a
    folder, or holds a run and --overwrite was not given."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"stn-digits: --out {out}: not a folder")
    previous = run_files(out) if out.is_dir() else []
    if previous and not overwrite:
        raise SystemExit(f"stn-digits: {out} already holds a run ({_listed(previous)}): pass --overwrite to delete it "
                         "and start afresh, or another --out")
    return previous


def _delete(out, previous):
    """--overwrite: the earlier run's files deleted, and figures/ and models/ too if that leaves them empty."""
    out = Path(out)
    for name in previous:
        (out / name).unlink(missing_ok=True)
    for sub in ("figures", "models"):
        if (out / sub).is_dir() and not any((out / sub).iterdir()):
            (out / sub).rmdir()
    print(f"--overwrite: deleted the previous run's {_listed(previous)} in {out}", file=sys.stderr)


def _check_data(data):
    """SystemExit unless ``data`` can be read: scikit-learn installed for 'digits', else a folder with the
    four MNIST-format IDX files (their contents are checked as they are read)."""
    expected = "expected 'digits', scikit-learn's bundled digits, or a folder of MNIST-format IDX files"
    if data == "digits":
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError as e:
            missing = isinstance(e, ModuleNotFoundError) and (e.name or "sklearn").split(".")[0] == "sklearn"
            if missing:
                raise SystemExit("stn-digits: --data digits (scikit-learn's bundled digits, the default) needs "
                                 "scikit-learn: pip install 'stn-triton[digits]', or pass --data a folder of "
                                 "MNIST-format IDX files") from None
            raise SystemExit(f"stn-digits: --data digits: scikit-learn does not import ({e}): reinstall it: "
                             "pip install 'stn-triton[digits]'") from None
        return
    root = Path(data)
    if not root.exists():
        raise SystemExit(f"stn-digits: --data {data}: no such folder ({expected})")
    if not root.is_dir():
        raise SystemExit(f"stn-digits: --data {data}: not a folder ({expected})")
    missing = missing_idx_files(root)
    if missing:
        raise SystemExit(f"stn-digits: --data {data}: no {', '.join(m + '[.gz]' for m in missing)} in it ({expected})")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="classify")
    task = pre.parse_known_args(argv)[0].task
    p = parser(task if task in TASKS else "classify")
    args = p.parse_args(argv)  # a bad --task: argparse says so
    t = TASKS[args.task]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a number of CPU threads, 1 or more (this machine has {cpus}), got "
                f"{args.threads}")
    given = {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(t.config) if f.name in vars(args)}
    kw["progress"] = not args.no_progress
    device = args.device
    if args.paper:
        # explicit options win; PAPER's rate is Adam's
        kw.update({k: v for k, v in t.paper.items()
                   if k not in given and (k != "lr" or getattr(args, "optimizer", "adam") == "adam")})
        if "device" not in given:
            device = "auto"
        if getattr(args, "data", None) == "digits":
            print("note: --paper on scikit-learn's 1,797 digits; the paper used MNIST (pass --data DIR)",
                  file=sys.stderr)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kw["device"] = device
    try:
        cfg = t.config(**kw)
    except ValueError as e:
        p.error(_as_options(str(e), args))
    # Everything below is checked before any data is read or anything trains: a mistyped option or a
    # missing folder costs nothing, not even the previous run under --overwrite.
    try:
        torch.device(device)
    except RuntimeError:
        raise SystemExit(f"stn-digits: --device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"stn-digits: --device {device}: no CUDA GPU is available")
    previous = _check_out(cfg.out, args.overwrite)
    _check_data(cfg.data)
    if previous:
        _delete(cfg.out, previous)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device == "cpu":
        torch.set_num_threads(cpus)
    try:
        t.run(cfg)
    except DataError as e:
        raise SystemExit(f"stn-digits: {_as_options(str(e), args)}") from None
    return 0
