"""The distorted-digits experiment (the paper's Table 1, in miniature): train each model on each
distortion for each seed, report percent test error, and draw what the transformers do.

Training distortions are drawn afresh every epoch; test distortions are fixed by the seed. Every
model of one (distortion, seed) sees exactly the same images in the same order.
"""

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import stn_triton as st

from . import data as D
from .distortions import DISTORTIONS, distort
from .models import MODELS, build, count_parameters


@dataclass
class Config:
    distortions: tuple = ("RTS",)
    models: tuple = ("CNN", "ST-CNN-aff")
    seeds: tuple = (0, 1, 2)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    localization_lr_scale: float = 0.1
    st_size: int = 28  # what the transformers sample to (the classifiers' input size)
    data: str = "digits"  # "digits" (scikit-learn's) or a folder of MNIST-format IDX files
    train_limit: int = None
    test_limit: int = None
    device: str = "cpu"
    out: str = "runs/digits"
    figure_count: int = 12
    progress: bool = True
    distortion_options: dict = field(default_factory=dict)  # {"RTS": {"max_angle": 30}, ...}

    def __post_init__(self):
        self.distortions, self.models, self.seeds = tuple(self.distortions), tuple(self.models), tuple(self.seeds)
        for d in self.distortions:
            if d not in DISTORTIONS:
                raise ValueError(f"distortions: expected some of {', '.join(DISTORTIONS)}, got {d!r}")
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"models: expected some of {', '.join(MODELS)}, got {m!r}")
        if not self.distortions or not self.models or not self.seeds:
            raise ValueError("distortions, models and seeds: each needs at least one entry")
        for name in ("epochs", "batch_size", "st_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not (self.lr > 0 and self.localization_lr_scale > 0):
            raise ValueError(f"lr and localization_lr_scale: expected positive numbers, got {self.lr}, "
                             f"{self.localization_lr_scale}")


def load_data(cfg):
    digits = D.load_sklearn_digits() if cfg.data == "digits" else D.load_idx_dir(cfg.data)
    return digits.limit(cfg.train_limit, cfg.test_limit)


def _seed(*parts):
    """A 63-bit seed from a tuple (stable across runs and platforms)."""
    h = 1469598103934665603
    for b in repr(parts).encode():
        h = ((h ^ b) * 1099511628211) % 2**63
    return h


def _gen(*parts):
    return torch.Generator().manual_seed(_seed(*parts))


def _optimizer(model, cfg):
    groups = model.parameter_groups(cfg.lr, cfg.localization_lr_scale) if hasattr(model, "parameter_groups") \
        else [{"params": list(model.parameters()), "lr": cfg.lr}]
    return torch.optim.Adam(groups, lr=cfg.lr)


@torch.no_grad()
def evaluate(model, x, y, batch_size=512):
    model.eval()
    wrong = 0
    for i in range(0, len(y), batch_size):
        wrong += (model(x[i:i + batch_size]).argmax(1) != y[i:i + batch_size]).sum().item()
    return 100.0 * wrong / max(len(y), 1)


def train_one(model_name, distortion, seed, digits, cfg, bar=None):
    """Train one model; returns (model, test error %, seconds)."""
    dev = torch.device(cfg.device)
    opts = cfg.distortion_options.get(distortion, {})
    test_x = distort(distortion, digits.test_x, _gen("test", distortion, seed), **opts).to(dev)
    test_y = digits.test_y.to(dev)
    torch.manual_seed(_seed("init", model_name, seed))
    model = build(model_name, test_x.shape[-1], cfg.st_size, classes=digits.num_classes).to(dev)
    with torch.no_grad():
        model(test_x[:2])  # materialise lazy layers before the optimizer sees them
    opt = _optimizer(model, cfg)
    steps = cfg.epochs * math.ceil(len(digits.train_y) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps,
                                                pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        x = distort(distortion, digits.train_x, _gen("train", distortion, seed, epoch), **opts).to(dev)
        y = digits.train_y.to(dev)
        order = torch.randperm(len(y), generator=_gen("order", seed, epoch)).to(dev)
        total = 0.0
        for i in range(0, len(y), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total / len(y):.3f}")
    seconds = time.perf_counter() - start
    return model, evaluate(model, test_x, test_y), seconds, test_x


def _tile(images, side):
    """(n, 1, h, w) in [0, 1] -> one row image, each cell resized to side x side (nearest)."""
    cells = F.interpolate(images.float().cpu(), size=(side, side), mode="nearest")
    row = torch.cat(list(F.pad(cells, (2, 2, 2, 2), value=0.35)[:, 0]), dim=1)
    return Image.fromarray((row.clamp(0, 1) * 255).byte().numpy(), mode="L")


def draw_figure(path, distortion, inputs, outputs, side=84):
    """Inputs on the first row, then each transformer's output on its own row, labelled."""
    rows = [("input", inputs)] + list(outputs.items())
    label_w = 110
    tiles = [(name, _tile(imgs, side)) for name, imgs in rows]
    width = label_w + max(t.width for _, t in tiles)
    fig = Image.new("L", (width, 24 + sum(t.height for _, t in tiles)), 255)
    draw = ImageDraw.Draw(fig)
    draw.text((4, 6), f"distortion {distortion}: inputs (top) and what each transformer made of them", fill=0)
    y = 24
    for name, tile in tiles:
        draw.text((4, y + tile.height // 2 - 6), name, fill=0)
        fig.paste(tile, (label_w, y))
        y += tile.height
    fig.save(path)


def format_table(results, cfg):
    """The paper's layout: one row per model, one column per distortion, percent error (mean and
    spread over seeds). Parameter counts depend on the canvas size, so the column gives their range."""
    head = "| model | params | " + " | ".join(cfg.distortions) + " |"
    lines = [head, "|" + "---|" * (2 + len(cfg.distortions))]
    for m in cfg.models:
        cells = []
        for d in cfg.distortions:
            errs = [r["error"] for r in results if r["model"] == m and r["distortion"] == d]
            spread = f" ± {statistics.stdev(errs):.1f}" if len(errs) > 1 else ""
            cells.append(f"{statistics.mean(errs):.1f}{spread}" if errs else "")
        counts = sorted({r["params"] for r in results if r["model"] == m})
        params = "-".join(f"{c / 1000:.0f}k" for c in (counts[0], counts[-1]) if counts)
        params = params.split("-")[0] if len(set(params.split("-"))) == 1 else params
        lines.append(f"| {m} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg, log=print):
    """Run the experiment described by ``cfg``; write results.json, table.md and figures/*.png
    under ``cfg.out``; return the results dict."""
    out = Path(cfg.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    digits = load_data(cfg)
    log(f"data: {digits.name}, {len(digits.train_y)} train / {len(digits.test_y)} test images; "
        f"device {cfg.device}, {torch.get_num_threads()} threads, backend {st.backend(torch.empty(0, device=cfg.device))}")
    runs = [(d, m, s) for d in cfg.distortions for s in cfg.seeds for m in cfg.models]
    results = []
    bar = tqdm(total=len(runs) * cfg.epochs, unit="epoch", disable=not cfg.progress, dynamic_ncols=True)
    for d in cfg.distortions:
        fig_outputs, fig_inputs = {}, None
        for s in cfg.seeds:
            for m in cfg.models:
                bar.set_description(f"{d} {m} seed {s}")
                model, err, secs, test_x = train_one(m, d, s, digits, cfg, bar)
                results.append({"distortion": d, "model": m, "seed": s, "error": err,
                                "params": count_parameters(model), "train_seconds": round(secs, 2)})
                bar.write(f"{d:>4} {m:<12} seed {s}: {err:5.1f}% error ({secs:.0f} s)")
                if s == cfg.seeds[0] and hasattr(model, "transformer"):
                    fig_inputs = test_x[:cfg.figure_count].cpu()
                    with torch.no_grad():
                        model.eval()
                        fig_outputs[m] = model.transformer(test_x[:cfg.figure_count]).cpu()
        if fig_inputs is None:  # no transformer among the models: still show the inputs
            fig_inputs = distort(d, digits.test_x[:cfg.figure_count], _gen("test", d, cfg.seeds[0]),
                                 **cfg.distortion_options.get(d, {}))
        draw_figure(out / "figures" / f"{d}.png", d, fig_inputs, fig_outputs)
    bar.close()
    table = format_table(results, cfg)
    total = time.perf_counter() - started
    summary = {
        "config": asdict(cfg),
        "data": {"name": digits.name, "train": len(digits.train_y), "test": len(digits.test_y)},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "device": cfg.device,
                    "gpu": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None,
                    "torch": torch.__version__},
        "seconds": round(total, 1),
        "results": results,
        "table": table,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(
        f"Percent test error, mean ± standard deviation over seeds {list(cfg.seeds)}; {digits.name}, "
        f"{cfg.epochs} epochs, {total:.0f} s on {cfg.device}.\n\n{table}\n")
    log("\n" + table)
    log(f"\nwrote {out / 'table.md'}, {out / 'results.json'} and {out / 'figures'}/ in {total:.0f} s")
    return summary
