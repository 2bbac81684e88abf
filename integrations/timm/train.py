"""Train a timm model (by default the paper's CUB part-attention model) on CUB-200-2011 with
PyTorch's own distributed engine.

One process:        stn-train-cub --data /path/to/CUB_200_2011 --out runs/cub
Several (one node): torchrun --standalone --nproc_per_node 8 -m stn_triton.integrations.timm.train --data ... --out ...

DDP under ``torchrun`` (nccl on GPUs, gloo on the CPU), bfloat16 autocast on GPUs, SGD with the
localisation network at a lower rate, a cosine schedule by epoch, progress bars, per-epoch metrics
(``metrics.jsonl``, epochs counted from 1), a checkpoint every epoch written atomically (``last.pt``:
write, then rename; its ``epoch`` is the index, from 0, of the last finished epoch), exact resume
(``--resume``; loaded with ``weights_only=True``), and a PNG per epoch drawing the learnt attention
boxes on validation images (``attention.png``, the paper's Table 3 figure).

An ``--out`` folder that already holds a run is refused unless ``--resume`` (continue it) or
``--overwrite`` (delete its files and start afresh) says what to do with it. A checkpoint that cannot
be resumed from (cut short, not a ``torch.save`` file, another program's, another model's) raises
:class:`CheckpointError`, which :func:`main` reports as one line naming the file.

Resume is exact because nothing carries random state across epochs: every epoch reseeds the
generators from (seed, epoch, rank), and the data order comes from ``DistributedSampler`` with the
same seed and ``set_epoch``. A run stopped after any epoch and resumed ends with the same weights as
an uninterrupted one (``--stop-after N`` stops after N epochs, e.g. to fit a cluster's time limit).
Options that change the trajectory (model, sizes, batch size, rates, momentum, weight decay,
clipping, seed, autocast) must be the checkpoint's on resume; ``--epochs`` may differ: the run is
extended (or shortened) and the schedule becomes the cosine over the new number of epochs.
"""

import argparse
import difflib
import json
import math
import os
import pickle
import random
import re
import sys
import time
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from stn_triton._cli import HelpFormatter

from .cub import CUB200, cub_transforms

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]


DESCRIPTION = """\
Train a timm model (by default the paper's CUB part-attention model, stn_inception_v3_4x) on
CUB-200-2011, in one process or in several under torchrun (DDP)."""

EPILOG = """\
examples:
  stn-train-cub --data /data/CUB_200_2011 --out runs/cub --pretrained
  torchrun --standalone --nproc_per_node 8 -m stn_triton.integrations.timm.train --data ... --out runs/cub
  stn-train-cub --data ... --out runs/cub --resume               continue runs/cub from runs/cub/last.pt
  stn-train-cub --data ... --out runs/cub --resume --epochs 40   extend that run to 40 epochs

OUT receives last.pt (the checkpoint, rewritten after every epoch), metrics.jsonl (one line per
epoch, counted from 1) and attention.png (the learnt attention boxes on validation images).

It needs timm: pip install 'stn-triton[timm]'."""

# what a run writes into OUT (``last.pt.tmp`` only for an instant, or after a crash while saving)
RUN_FILES = ("last.pt", "metrics.jsonl", "attention.png", "last.pt.tmp")
# options that change what a run computes: resuming with other values would not continue that run
RESUME_MUST_MATCH = ("model", "img_size", "branch_size", "loc_size", "batch_size", "lr", "localization_lr_scale",
                     "momentum", "weight_decay", "clip_grad", "seed", "no_amp")


def parser():
    p = argparse.ArgumentParser(prog="stn-train-cub", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--data", metavar="DIR", required=True, help="the CUB_200_2011 folder (images/, images.txt, ...)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="folder for last.pt, metrics.jsonl and attention.png; one that already holds a run needs "
                        "--resume or --overwrite")
    p.add_argument("--model", metavar="NAME", default="stn_inception_v3_4x",
                   help="any timm model name")
    p.add_argument("--pretrained", action="store_true", help="start the backbones from timm's ImageNet weights")
    p.add_argument("--img-size", metavar="PX", type=int, default=None,
                   help="input side in pixels (default: the model's, 448 for stn_inception_v3_*)")
    p.add_argument("--branch-size", metavar="PX", type=int, default=None,
                   help="side each transformer samples its part at (default: the model's, 224 for stn_inception_v3_*)")
    p.add_argument("--loc-size", metavar="PX", type=int, default=None,
                   help="side of the input the localisation network sees (default: the model's, 224 for "
                        "stn_inception_v3_*)")
    p.add_argument("--epochs", metavar="N", type=int, default=30,
                   help="epochs of the whole run, the cosine schedule's length; with --resume a new number extends "
                        "the run")
    p.add_argument("--batch-size", metavar="N", type=int, default=16,
                   help="images per step in each process")
    p.add_argument("--lr", type=float, default=0.01,
                   help="SGD learning rate of the part networks and the classifier at epoch 1")
    p.add_argument("--localization-lr-scale", metavar="SCALE", type=float, default=0.1,
                   help="the localisation network learns at --lr times this")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--clip-grad", metavar="NORM", type=float, default=None,
                   help="clip the global gradient norm to this, as transformers can diverge early on noisy input "
                        "(default: no clipping)")
    p.add_argument("--workers", metavar="N", type=int, default=4,
                   help="data loading processes per training process")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the data order and the augmentation")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: auto, cuda:LOCAL_RANK if there is a GPU, else cpu)")
    p.add_argument("--no-amp", action="store_true", help="turn off the bfloat16 autocast on GPUs")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from OUT/last.pt (a new run if there is no last.pt yet)")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run in OUT (last.pt, metrics.jsonl, attention.png) and start afresh")
    p.add_argument("--stop-after", metavar="N", type=int, default=None,
                   help="stop after this many epochs in this session, then continue with --resume "
                        "(default: train to --epochs)")
    p.add_argument("--figure-count", metavar="N", type=int, default=8,
                   help="validation images drawn in attention.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong with it."""


def _first_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def load_checkpoint(path):
    """The checkpoint at ``path`` (a dict with model, optimizer, scheduler, epoch and args), loaded with
    ``weights_only=True``; a file that is not one (cut short, not a torch.save zip, another program's)
    raises :class:`CheckpointError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from None
    if not head:
        raise CheckpointError(f"{path}: truncated or corrupt: the file is empty")
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":
            raise CheckpointError(f"{path}: truncated or corrupt: the start of a zip archive (torch.save's format) "
                                  "without its end, as in a file cut short")
        raise CheckpointError(f"{path}: not a stn-train-cub checkpoint (not a zip archive as torch.save writes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something: another program's objects
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(e))
        why = found.group(1).strip() if found else _first_line(e)
        raise CheckpointError(f"{path}: not a stn-train-cub checkpoint (it holds objects other than tensors and "
                              f"plain data: {why})") from None
    except Exception as e:  # noqa: BLE001  (a damaged archive fails in many ways; each is reported the same way)
        raise CheckpointError(f"{path}: truncated or corrupt: {_first_line(e)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a stn-train-cub checkpoint (it holds a {type(ckpt).__name__}, "
                              "not a dict)")
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "args") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a stn-train-cub checkpoint (missing {', '.join(map(repr, missing))})")
    bad = []
    for key in ("model", "optimizer", "scheduler", "args"):
        if not isinstance(ckpt[key], dict):
            bad.append(f"{key!r} is a {type(ckpt[key]).__name__}, not a dict")
    if isinstance(ckpt["optimizer"], dict) and not {"state", "param_groups"} <= ckpt["optimizer"].keys():
        bad.append("'optimizer' is not an optimizer's state_dict")
    if type(ckpt["epoch"]) is not int or ckpt["epoch"] < 0:
        bad.append(f"'epoch' is {ckpt['epoch']!r}, not an epoch index")
    if isinstance(ckpt["args"], dict):
        if not isinstance(ckpt["args"].get("model"), str):
            bad.append("'args' names no model")
        if type(ckpt["args"].get("epochs")) is not int or ckpt["args"]["epochs"] < 1:
            bad.append("'args' has no number of epochs")
    if bad:
        raise CheckpointError(f"{path}: not a stn-train-cub checkpoint ({'; '.join(bad)})")
    return ckpt


def _load_weights(model, state, path, name):
    """``model.load_state_dict(state)``, with a CheckpointError saying which weights do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own
              if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"it lacks {len(missing)} of the model's (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"has {len(unexpected)} the model does not (e.g. {unexpected[0]!r})")
        if shapes:
            k = shapes[0]
            got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            parts.append(f"has {len(shapes)} of another shape (e.g. {k!r}: {got}, not {tuple(own[k].shape)})")
        raise CheckpointError(f"{path}: its weights are not {name}'s: {', '.join(parts)}")
    try:
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: its weights do not load into {name}: {_first_line(e)}") from None


def _flag(name, value):
    """How an option's value reads on the command line: --lr 0.01, --no-amp, no --clip-grad."""
    opt = "--" + name.replace("_", "-")
    if value is None or value is False:
        return f"no {opt}"
    return opt if value is True else f"{opt} {value}"


def _check_resume(ckpt, args, path, defaults):
    """Refuse a resume whose options would not continue the checkpoint's run; (epochs done, epochs the
    checkpoint's run was for)."""
    saved = ckpt["args"]
    changed = [f"{_flag(k, saved.get(k, defaults[k]))} (this run: {_flag(k, getattr(args, k))})"
               for k in RESUME_MUST_MATCH if saved.get(k, defaults[k]) != getattr(args, k)]
    if changed:
        raise SystemExit(f"stn-train-cub: --resume: {path} was written with {'; '.join(changed)}. Resuming with "
                         "other values would not continue that run: pass the checkpoint's values, or --overwrite "
                         "to start afresh")
    done = ckpt["epoch"] + 1
    if args.epochs < done:
        raise SystemExit(f"stn-train-cub: --resume: {path} has already finished {done} epochs, more than --epochs "
                         f"{args.epochs}: pass --epochs {done} or more to continue it, or --overwrite to start afresh")
    return done, saved["epochs"]


def _trim_metrics(path, done):
    """Keep the lines of metrics.jsonl up to epoch ``done`` (those after it come from an epoch whose
    checkpoint was never written, e.g. a crash while saving; that epoch runs again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(epoch, int) and epoch <= done:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
        print(f"--resume: dropped {len(lines) - len(keep)} line(s) from {path}: epochs after {done}, which no "
              "checkpoint holds (they run again)", file=sys.stderr)


def _seed_everything(*parts):
    s = hash(parts) % (2**31)  # tuples of ints hash the same in every process (no string hashing)
    random.seed(s)
    torch.manual_seed(s)
    return s


def _is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def _atomic_save(obj, path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash leaves either the old checkpoint or the new one, never half of one


def _unwrap(model):
    return model.module if isinstance(model, DDP) else model


def _model_kwargs(args, num_classes):
    kw = {"num_classes": num_classes}
    for name in ("img_size", "branch_size", "loc_size"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def _optimizer(model, args):
    loc = model.localization_parameters() if hasattr(model, "localization_parameters") else []
    loc_ids = {id(p) for p in loc}
    rest = [p for p in model.parameters() if id(p) not in loc_ids]
    groups = [{"params": rest, "lr": args.lr}]
    if loc:
        groups.append({"params": loc, "lr": args.lr * args.localization_lr_scale})
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def _denormalise(x, cfg):
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1)


@torch.no_grad()
def draw_attention(model, images, path, cfg):
    """Each validation image with the outline of every transformer's sampling region."""
    model.eval()
    theta = model.localize(images)  # (N, K, P)
    N, K = theta.shape[:2]
    side = images.shape[-1]
    grid = model.family.grid(theta.reshape(N * K, -1).float().cpu(), (16, 16), model.align_corners)
    grid = grid.view(N, K, 16, 16, 2)
    border = torch.cat([grid[:, :, 0, :], grid[:, :, :, -1], grid[:, :, -1, :].flip(2), grid[:, :, :, 0].flip(2)], 2)
    pixels = (border + 1) / 2 * side  # align_corners=False: -1 and 1 are the image's outer edges
    tiles = []
    for n in range(N):
        im = Image.fromarray((_denormalise(images[n], cfg).permute(1, 2, 0).numpy() * 255).astype("uint8"))
        draw = ImageDraw.Draw(im)
        for k in range(K):
            pts = [tuple(p) for p in pixels[n, k].tolist()]
            draw.line(pts + [pts[0]], fill=COLOURS[k % len(COLOURS)], width=max(2, side // 112))
        tiles.append(im)
    cols = min(4, N)
    rows = math.ceil(N / cols)
    sheet = Image.new("RGB", (cols * side, rows * side), (255, 255, 255))
    for i, im in enumerate(tiles):
        sheet.paste(im, ((i % cols) * side, (i // cols) * side))
    sheet.save(path)


def evaluate(model, loader, device, amp):
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)  # correct, seen
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct[0] += (model(x).argmax(1) == y).sum()
            correct[1] += len(y)
    if dist.is_initialized():
        dist.all_reduce(correct)
    return 100.0 * correct[0].item() / max(correct[1].item(), 1)


def _import_timm():
    """timm, with this library's models registered with it; imported only once the arguments are parsed,
    so that --help works without it. Without timm (or with one that does not import), SystemExit saying
    what to install."""
    try:
        import timm
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "timm").split(".")[0] == "timm":
            raise SystemExit("stn-train-cub: needs timm, which is not installed: pip install 'stn-triton[timm]'") \
                from None
        raise SystemExit(f"stn-train-cub: timm does not import ({type(e).__name__}: {e}): reinstall it: "
                         "pip install 'stn-triton[timm]'") from None
    from . import models  # noqa: F401  (registers the models with timm)
    return timm


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs: expected a positive number, got {args.epochs}")
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after: expected a positive number, got {args.stop_after}")
    timm = _import_timm()
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        p.error(f"--model: timm has no model {args.model!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; this library's: {', '.join(timm.list_models('stn_*'))}")
    try:
        return _train(args, {name: p.get_default(name) for name in RESUME_MUST_MATCH})
    except CheckpointError as e:
        raise SystemExit(f"stn-train-cub: {e}") from None


def _train(args, defaults):
    timm = _import_timm()
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise SystemExit(f"stn-train-cub: --device: expected auto, cpu, cuda or cuda:N, got {args.device!r}") \
                from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"stn-train-cub: --device {args.device}: no CUDA GPU is available")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)

    try:
        train_set = CUB200(args.data, "train")
        val_set = CUB200(args.data, "test")
    except (OSError, ValueError) as e:
        raise SystemExit(f"stn-train-cub: {e}") from None

    # What to do with OUT, decided by every process alike before any of them writes there.
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"stn-train-cub: --out {out}: not a folder")
    ckpt_path = out / "last.pt"
    previous = [name for name in RUN_FILES if (out / name).exists()]
    ckpt, done = None, 0
    # (under --overwrite the previous run's files are deleted once the model is built: a mistyped --model must
    # not cost them)
    if args.resume:
        if ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path)
            done, ckpt_epochs = _check_resume(ckpt, args, ckpt_path, defaults)
            if done == args.epochs:
                if rank == 0 and done == ckpt_epochs:
                    print(f"--resume: {ckpt_path} has finished all {done} epochs of the run: nothing to do (a "
                          "larger --epochs extends it)", file=sys.stderr)
                elif rank == 0:
                    print(f"--resume: {ckpt_path} has finished {done} of the run's {ckpt_epochs} epochs and --epochs "
                          f"{args.epochs} asks for no more: nothing to do (--epochs {ckpt_epochs} finishes the run)",
                          file=sys.stderr)
                return 0
        elif rank == 0:
            print(f"--resume: no checkpoint {ckpt_path} yet: starting a new run", file=sys.stderr)
    elif previous and not args.overwrite:
        raise SystemExit(f"stn-train-cub: {out} already holds a run ({', '.join(previous)}): pass --resume to "
                         "continue it, or --overwrite to delete it and start afresh")

    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    amp = device.type == "cuda" and not args.no_amp

    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = timm.create_model(args.model, pretrained=args.pretrained,
                              **_model_kwargs(args, len(train_set.classes))).to(device)
    data_cfg = timm.data.resolve_data_config({"input_size": (3, args.img_size, args.img_size)} if args.img_size
                                             else {}, model=model)
    train_set.transform = cub_transforms(model, True, args.img_size)
    val_set.transform = cub_transforms(model, False, args.img_size)
    opt = _optimizer(model, args)

    def cosine(e):  # the learning rate's factor in epoch e (from 0) of args.epochs
        return 0.5 * (1 + math.cos(math.pi * e / args.epochs))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    start = 0
    if ckpt is not None:
        _load_weights(model, ckpt["model"], ckpt_path, args.model)
        try:
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{ckpt_path}: its optimizer or schedule does not fit {args.model}: "
                                  f"{_first_line(e)}") from None
        start = ckpt["epoch"] + 1
        if sched.last_epoch != start:
            raise CheckpointError(f"{ckpt_path}: not a consistent stn-train-cub checkpoint (its schedule has stepped "
                                  f"{sched.last_epoch!r} epochs, its 'epoch' says {start} are done)")
        if ckpt_epochs != args.epochs:
            # the rate of the next epoch on the new schedule, as LambdaLR.step computes it
            for group, base_lr in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base_lr * cosine(start)
        if rank == 0:
            print(f"resumed from {ckpt_path} after epoch {done} of {ckpt_epochs}", file=sys.stderr)
            if ckpt_epochs != args.epochs:
                print(f"{'extending' if args.epochs > ckpt_epochs else 'shortening'} the run from {ckpt_epochs} to "
                      f"{args.epochs} epochs: the schedule is now the cosine over {args.epochs} epochs",
                      file=sys.stderr)
            written_by = ckpt.get("processes", world)
            if written_by != world:
                print(f"--resume: {ckpt_path} was written by {written_by} process(es), this run has {world}: the "
                      "batches differ from the original run's, so it is not continued exactly", file=sys.stderr)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite and previous:
            for name in previous:
                (out / name).unlink()
            print(f"--overwrite: deleted the previous run's {', '.join(previous)} in {out}", file=sys.stderr)
        if args.resume:
            _trim_metrics(out / "metrics.jsonl", done)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=args.batch_size,
                            num_workers=args.workers, pin_memory=device.type == "cuda")
    figure_images = torch.stack([val_set[i][0] for i in range(min(args.figure_count, len(val_set)))]) \
        if rank == 0 and hasattr(model, "localize") else None

    stop = args.epochs if args.stop_after is None else min(args.epochs, start + args.stop_after)
    for epoch in range(start, stop):
        _seed_everything(args.seed, epoch, rank)
        sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            drop_last=True, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(hash((args.seed, epoch, rank)) % 2**31))
        net.train()
        t0 = time.perf_counter()
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress or rank != 0,
                   dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad)
            opt.step()
            stats += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                  torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        lr = opt.param_groups[0]["lr"]
        sched.step()
        if distributed:
            dist.all_reduce(stats)
        val_acc = evaluate(net, val_loader, device, amp)
        if rank == 0:
            seen = max(stats[2].item(), 1)
            metrics = {"epoch": epoch + 1, "train_loss": stats[0].item() / seen, "train_acc": 100 * stats[1].item() / seen,
                       "val_acc": val_acc, "lr": lr, "seconds": round(time.perf_counter() - t0, 2),
                       "processes": world}
            print(json.dumps(metrics), flush=True)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "epoch": epoch, "processes": world,
                          "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
                         ckpt_path)
            if figure_images is not None:
                draw_attention(model, figure_images.to(device), out / "attention.png", data_cfg)
        if distributed:
            dist.barrier()  # the checkpoint is complete before anyone goes on
    if rank == 0 and stop < args.epochs:
        print(f"stopped after epoch {stop} of {args.epochs} (--stop-after {args.stop_after}): continue with --resume",
              file=sys.stderr)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
