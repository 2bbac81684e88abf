"""``stn-digits`` / ``python -m stn_triton.integrations.digits``: the distorted-digits experiment.

The defaults are the README's first command: R and RTS, CNN vs ST-CNN (affine), three seeds, 40
epochs with a rotation curriculum over the first 15, on scikit-learn's bundled digits, on the CPU,
in about three minutes on two cores. ``--paper`` selects
every distortion and model for a GPU run (give it MNIST with ``--data``).

On a terminal it shows progress bars; otherwise (a log file, CI) it prints one line per finished
run and no bars.
"""

import argparse
import os
import sys

import torch

from stn_triton._cli import HelpFormatter, description
from .distortions import DISTORTIONS
from .experiment import DEFAULT_LR, OPTIMIZERS, Config, run
from .models import MODELS

PAPER = dict(distortions=DISTORTIONS, models=MODELS, seeds=(0, 1, 2), epochs=60, batch_size=256, lr=1e-3)


def parser():
    p = argparse.ArgumentParser(prog="stn-digits", description=description(__doc__), formatter_class=HelpFormatter)
    d = Config()
    p.add_argument("--distortions", nargs="+", choices=DISTORTIONS, default=list(d.distortions), metavar="D",
                   help=f"distortions, of {', '.join(DISTORTIONS)}")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(d.models), metavar="M",
                   help=f"models, of {', '.join(MODELS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="one run per seed; the table averages")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="adam (one-cycle schedule) or sgd (the paper's: momentum 0.9, the rate divided by 10 after "
                        "a third and two thirds of the epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam's peak rate or SGD's initial rate (default {DEFAULT_LR['adam']:g} for adam, "
                        f"{DEFAULT_LR['sgd']:g} for sgd)")
    p.add_argument("--localization-lr-scale", type=float, default=d.localization_lr_scale,
                   help="the localisation networks learn at lr times this")
    p.add_argument("--curriculum", type=int, default=d.curriculum, metavar="EPOCHS",
                   help="R and RTS: the training rotation grows linearly to its full angle over the first EPOCHS "
                        "epochs (the same images for every model; validation and test use the full angle); 0: none")
    p.add_argument("--st-size", type=int, default=d.st_size,
                   help="side of what the first stages produce: the transformers' output, the classifiers' input")
    p.add_argument("--data", default=d.data,
                   help="'digits' (scikit-learn's bundled digits) or a folder of MNIST-format IDX files "
                        "(train-images-idx3-ubyte[.gz] etc., e.g. /usr/share/datasets/fashion-mnist)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (only these are read and converted)")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (likewise)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of the training images held out for validation (the same for every seed)")
    p.add_argument("--keep", choices=("last", "best"), default=d.keep,
                   help="which epoch's weights are tested: the last, or the best on the validation split")
    p.add_argument("--object-scale", type=float, default=None,
                   help="shrink the objects by this before distorting them (default: measured from the training "
                        "images, 1 unless they reach beyond the frame's inscribed circle, as Fashion-MNIST's do)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out", default=d.out, help="where results.json, table.md and figures/ go")
    p.add_argument("--save-models", action="store_true",
                   help="write every trained model to OUT/models/DISTORTION-MODEL-seedS.pt "
                        "(stn_triton.integrations.digits.load_model reads them)")
    p.add_argument("--paper", action="store_true",
                   help="the full experiment: every distortion and model, 3 seeds, "
                        f"{PAPER['epochs']} epochs, batch {PAPER['batch_size']}, device auto; for a GPU and MNIST")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on a terminal either (elsewhere there are none)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    given = {a.split("=", 1)[0].lstrip("-").replace("-", "_")
             for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    kw = dict(distortions=args.distortions, models=args.models, seeds=args.seeds, epochs=args.epochs,
              batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
              localization_lr_scale=args.localization_lr_scale, curriculum=args.curriculum, st_size=args.st_size,
              data=args.data, train_limit=args.train_limit, test_limit=args.test_limit, val_fraction=args.val_fraction,
              keep=args.keep,
              object_scale=args.object_scale, out=args.out, save_models=args.save_models,
              progress=not args.no_progress)
    device = args.device
    if args.paper:
        # explicit options win; PAPER's rate is Adam's
        kw.update({k: v for k, v in PAPER.items() if k not in given and (k != "lr" or args.optimizer == "adam")})
        if "device" not in given:
            device = "auto"
        if args.data == "digits":
            print("note: --paper on scikit-learn's 1,797 digits; the paper used MNIST (pass --data DIR)",
                  file=sys.stderr)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA GPU is available")
    kw["device"] = device
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else os.cpu_count() or 1))
    try:
        cfg = Config(**kw)
    except ValueError as e:
        raise SystemExit(f"stn-digits: {e}") from None
    run(cfg)
    return 0
