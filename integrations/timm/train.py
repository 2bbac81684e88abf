"""Train a timm model (by default the paper's CUB part-attention model) on CUB-200-2011 with
PyTorch's own distributed engine.

One process:        stn-train-cub --data /path/to/CUB_200_2011 --out runs/cub
Several (one node): torchrun --standalone --nproc_per_node 8 -m stn_triton.integrations.timm.train --data ... --out ...

DDP under ``torchrun`` (nccl on GPUs, gloo on the CPU), bfloat16 autocast on GPUs, SGD with the
localisation network at a lower rate, a cosine schedule by epoch, progress bars, per-epoch metrics
(``metrics.jsonl``), a checkpoint every epoch written atomically (``last.pt``: write, then rename),
exact resume (``--resume``; loaded with ``weights_only=True``), and a PNG per epoch drawing the
learnt attention boxes on validation images (``attention.png``, the paper's Table 3 figure).

Resume is exact because nothing carries random state across epochs: every epoch reseeds the
generators from (seed, epoch, rank), and the data order comes from ``DistributedSampler`` with the
same seed and ``set_epoch``. A run stopped after any epoch and resumed ends with the same weights as
an uninterrupted one (``--stop-after N`` stops after N epochs, e.g. to fit a cluster's time limit).
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import models as _models  # noqa: F401  (registers the models with timm)
from .cub import CUB200, cub_transforms

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]


def parser():
    p = argparse.ArgumentParser(prog="stn-train-cub", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="CUB_200_2011 folder (images/, images.txt, ...)")
    p.add_argument("--out", required=True, help="checkpoints, metrics.jsonl and attention PNGs go here")
    p.add_argument("--model", default="stn_inception_v3_4x", help="any timm model name")
    p.add_argument("--pretrained", action="store_true", help="start the backbones from timm's ImageNet weights")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's, 448)")
    p.add_argument("--branch-size", type=int, default=None, help="side each transformer samples (default 224)")
    p.add_argument("--loc-size", type=int, default=None, help="side the localisation network sees (default 224)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=0.01, help="SGD rate of the part networks and classifier")
    p.add_argument("--localization-lr-scale", type=float, default=0.1,
                   help="the localisation network learns at lr times this")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the global gradient norm to this (transformers can diverge early on noisy input)")
    p.add_argument("--workers", type=int, default=4, help="data loading processes per training process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if there is a GPU), cpu, cuda")
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on GPUs")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs in this session")
    p.add_argument("--figure-count", type=int, default=8, help="validation images in attention.png")
    p.add_argument("--no-progress", action="store_true")
    return p


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


def main(argv=None):
    args = parser().parse_args(argv)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA GPU is available")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    amp = device.type == "cuda" and not args.no_amp
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    try:
        train_set = CUB200(args.data, "train")
        val_set = CUB200(args.data, "test")
    except (OSError, ValueError) as e:
        raise SystemExit(f"stn-train-cub: {e}") from None
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = timm.create_model(args.model, pretrained=args.pretrained,
                              **_model_kwargs(args, len(train_set.classes))).to(device)
    data_cfg = timm.data.resolve_data_config({"input_size": (3, args.img_size, args.img_size)} if args.img_size
                                             else {}, model=model)
    train_set.transform = cub_transforms(model, True, args.img_size)
    val_set.transform = cub_transforms(model, False, args.img_size)
    opt = _optimizer(model, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / args.epochs)))
    start = 0
    ckpt_path = out / "last.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["args"]["model"] != args.model or ckpt["args"]["epochs"] != args.epochs:
            raise SystemExit(f"--resume: {ckpt_path} was written for model {ckpt['args']['model']!r} and "
                             f"{ckpt['args']['epochs']} epochs, not {args.model!r} and {args.epochs}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = ckpt["epoch"] + 1
        if rank == 0:
            print(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}", file=sys.stderr)
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
                          "epoch": epoch, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
                         ckpt_path)
            if figure_images is not None:
                draw_attention(model, figure_images.to(device), out / "attention.png", data_cfg)
        if distributed:
            dist.barrier()  # the checkpoint is complete before anyone goes on
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
