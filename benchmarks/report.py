"""What a run leaves behind: ``<stamp>-<device>.json``, ``.csv``, ``.md`` and two PNG plots.

The JSON holds the metadata (device, driver, versions, commit, time, host, command), the copy
bandwidth, every row and the check of issue 6's targets; the CSV holds the rows; the markdown is
the table the README shows; ``-speedup.png`` and ``-bandwidth.png`` plot speed-up over PyTorch
eager and the fraction of the copy bandwidth per case, dtype and mode.
"""

import csv
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

import stn_triton as st

from .cases import NAMED, shape_text
from .providers import PROVIDERS
from .runner import BASELINE, BASELINES, ROW_FIELDS

MIN_BYTES_RULE = ("the forward reads the input and the transform's parameters once and writes the output once; "
                  "the backward reads the output's gradient and the input once and writes the input's gradient "
                  "(and the parameters' gradients) once; an explicit sampling grid is not counted")
CPU_WARNING = ("CPU run: these timings do NOT measure the kernels. On the CPU our providers run "
               "PyTorch's reference path (or, with TRITON_INTERPRET=1, Triton's interpreter, far slower "
               "still); run on a CUDA GPU for kernel timings.")


# --- metadata ----------------------------------------------------------------------------------------

def _git(*args):
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version():
    """The NVIDIA driver (nvidia-smi), else the CUDA driver API version PyTorch sees, else None."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        v = torch._C._cuda_getDriverVersion()
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10}" if v else None
    except Exception:
        return None


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return None


def metadata(cfg, argv, copy):
    dev = cfg.device
    cuda = dev.type == "cuda"
    props = torch.cuda.get_device_properties(dev) if cuda else None
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    if commit is None and os.environ.get("STN_TRITON_COMMIT", "unknown") != "unknown":
        commit = os.environ["STN_TRITON_COMMIT"]  # a copy of the tree without .git (scripts/gpu-check.sh)
    meta = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else _cpu_model(),
        "driver": _driver_version() if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "device_memory_gib": props.total_memory / 2**30 if cuda else None,
        "l2_cache_mib": getattr(props, "L2_cache_size", 0) / 2**20 if cuda else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "kornia": _version("kornia"),
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "stn_backend": st.backend(torch.empty(1, device=dev)),
        "command": " ".join(["stn-bench", *argv]) if argv is not None else " ".join(sys.argv),
        "warmup_ms": cfg.warmup_ms,
        "rep_ms": cfg.rep_ms,
        "cuda_graphs": cfg.cuda_graphs,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "deterministic_fill_uninitialized_memory": getattr(
            getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory", None),
        "copy_bandwidth": copy,
        "timings_measure_kernels": cuda,
        "warning": None if cuda else CPU_WARNING,
    }
    return meta


def device_slug(meta):
    if meta["device"].startswith("cuda"):
        name = meta["device_name"]
    else:
        name = f"cpu-{meta['stn_backend']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- targets (issue 6, part 2) -----------------------------------------------------------------------

def _named(r, name):
    """The row is of the named case at its full size (not a --batch-scale'd copy)."""
    c = NAMED.get(name)
    return (c is not None and r["case"] == name and r["layout"] == c.layout
            and (r.get("sampling") or "bilinear") == c.sampling
            and (r["N"], r["C"], r["H"], r["W"], r["Ho"], r["Wo"], r["K"]) == (c.N, c.C, c.H, c.W, c.Ho, c.Wo, c.K)
            and (r.get("D"), r.get("Do")) == (c.D, c.Do))


def check_targets(rows, on_gpu=True):
    """Issue 6's targets, for ``ours-affine`` (the form eager computes). Each entry: target,
    measured (text), verdict ("met", "missed", "not measured", or "not evaluated (CPU run)" when
    ``on_gpu`` is false: CPU timings say nothing about the kernels)."""
    ours = [r for r in rows if r["provider"] == "ours-affine" and r["status"] == "ok"]
    out = []

    def add(target, measured, met):
        if not on_gpu:
            out.append({"target": target, "measured": "-", "verdict": "not evaluated (CPU run)"})
            return
        out.append({"target": target, "measured": measured if measured else "-",
                    "verdict": "not measured" if met is None else ("met" if met else "missed")})

    def one(case, dtype, mode):
        return next((r for r in ours if _named(r, case) and r["dtype"] == dtype and r["mode"] == mode), None)

    r = one("cub-k4", "bfloat16", "fwd+bwd")
    s = r and r["speedup_vs_eager"]
    add("CUB-like K=4 bf16 fwd+bwd >= 2x PyTorch eager", s and f"{s:.2f}x", s and s >= 2)

    r = one("feat-cl", "bfloat16", "fwd")
    f, s = (r["frac_of_copy"], r["speedup_vs_eager"]) if r else (None, None)
    add("64x256x56x56 bf16 channels-last forward >= 75% of copy bandwidth and >= 1.5x eager",
        f and s and f"{100 * f:.0f}% of copy, {s:.2f}x", (f >= 0.75 and s >= 1.5) if (f and s) else None)

    bwd = [r for r in ours if r["mode"] == "bwd" and r["speedup_vs_eager"]]
    w = min(bwd, key=lambda r: r["speedup_vs_eager"], default=None)
    add("backward >= 2x eager's backward on every case",
        w and f"worst {w['speedup_vs_eager']:.2f}x ({w['case']} {w['dtype']}), {len(bwd)} rows",
        w and w["speedup_vs_eager"] >= 2)

    pairs = []
    for r in bwd:
        if r["dtype"] == "bfloat16":
            f32 = next((q for q in bwd if q["dtype"] == "float32" and q["case"] == r["case"]), None)
            if f32:
                pairs.append((r["median_ms"] / f32["median_ms"], r["case"]))
    w = max(pairs, default=None)
    add("bf16 backward no slower than fp32", w and f"worst bf16/fp32 time {w[0]:.2f} ({w[1]})", w and w[0] <= 1.0)

    ratios = []
    for r in ours:
        if r["mode"] == "bwd-det":
            d = next((q for q in ours if q["mode"] == "bwd" and (q["case"], q["dtype"]) == (r["case"], r["dtype"])),
                     None)
            if d:
                ratios.append((r["median_ms"] / d["median_ms"], r["case"], r["dtype"]))
    w = max(ratios, default=None)
    add("deterministic backward <= 1.5x default backward",
        w and f"worst {w[0]:.2f}x ({w[1]} {w[2]})", w and w[0] <= 1.5)

    ks = [r for r in ours if _named(r, "mnist") and r["mode"] == "fwd+bwd" and r["kernels"] is not None]
    w = max(ks, key=lambda r: r["kernels"], default=None)
    add("MNIST-like fwd+bwd of the whole transform <= 3 kernel launches",
        w and f"{w['kernels']} GPU activities ({w['dtype']})", w and w["kernels"] <= 3)
    return out


# --- markdown ------------------------------------------------------------------------------------------

def _f(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(meta, rows, targets):
    copy = meta["copy_bandwidth"]
    cuda = meta["device"].startswith("cuda")
    lines = [f"# stn-triton benchmark: {meta['device_name']}, {meta['timestamp_utc']}", ""]
    if not cuda:
        lines += [f"> **{CPU_WARNING}**", ""]
    commit = (meta["git_commit"] or "unknown")[:12] + (" (dirty)" if meta["git_dirty"] else "")
    lines += [
        f"- device: {meta['device']} ({meta['device_name']}), driver {meta['driver'] or '-'}, "
        f"torch {meta['torch']}, triton {meta['triton']}, kornia {meta['kornia'] or '-'}, commit {commit}, "
        f"our path: {meta['stn_backend']}",
        f"- copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['bytes_copied'] / 2**20:.0f} MiB, {copy['method']})",
        f"- median ms (20th-80th percentile); GB/s from the minimum bytes: {MIN_BYTES_RULE}; x eager: PyTorch "
        "eager (align_corners=False) time for the same case, dtype and mode over this row's (bwd-det: over "
        "eager's bwd); kernels: GPU activities per call",
        f"- command: `{meta['command']}`",
        "",
    ]
    seen = {}
    for r in rows:
        seen.setdefault(r["case"], r)
    lines += ["| case | input -> output | K | layout | sampling |", "|---|---|---|---|---|"]
    for name, r in seen.items():
        shape = shape_text(r).replace("->", " -> ")
        lines.append(f"| {name} | {shape} | {r['K']} | {r['layout']} | {r.get('sampling') or 'bilinear'} |")
    lines += ["", "| case | dtype | provider | mode | median ms (p20-p80) | GB/s | % of copy | x eager | peak MiB "
              "| kernels | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "-" if r["median_ms"] is None else f"{r['median_ms']:.4g} ({r['p20_ms']:.4g}-{r['p80_ms']:.4g})"
        pct = None if r["frac_of_copy"] is None else 100 * r["frac_of_copy"]
        lines.append(f"| {r['case']} | {r['dtype']} | {r['provider']} | {r['mode']} | {t} | {_f(r['gbps'], '.3g')} "
                     f"| {_f(pct, '.3g')} | {_f(r['speedup_vs_eager'], '.3g')} | {_f(r['peak_mem_mb'], '.1f')} "
                     f"| {_f(r['kernels'], 'd')} | {r['status'].replace('|', '/')} |")
    lines += ["", "## Performance targets (ours-affine)", ""]
    if not cuda:
        lines.append("Not evaluated: CPU timings do not measure the kernels.")
    else:
        lines += ["| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['verdict']} |" for t in targets]
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------------------

def _plot(rows, meta, path, value, ylabel, title, providers, refs=(), log=False):
    """One panel per mode; within it, groups of bars per (case, dtype), one bar per provider."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    ok = [r for r in rows if r["status"] == "ok" and r[value] is not None and r["provider"] in providers]
    modes = list(dict.fromkeys(r["mode"] for r in rows)) or ["-"]
    groups = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    provs = [p for p in providers if any(r["provider"] == p for r in ok)]
    width = max(8.0, 1.2 + len(groups) * (0.25 * max(1, len(provs)) + 0.4))
    fig = Figure(figsize=(min(width, 60.0), 2.4 * len(modes) + 1.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    bar = 0.8 / max(1, len(provs))
    for ax, mode in zip(axes, modes):
        for j, p in enumerate(provs):
            xs, ys = [], []
            for i, g in enumerate(groups):
                r = next((r for r in ok if (r["case"], r["dtype"], r["mode"], r["provider"]) == (*g, mode, p)), None)
                if r is not None:
                    xs.append(i - 0.4 + bar * (j + 0.5))
                    ys.append(r[value])
            ax.bar(xs, ys, bar, label=p, color=_color(p),
                   edgecolor="black" if p.startswith("ours") else "none", linewidth=0.6)
        for y, label in refs:
            ax.axhline(y, color="gray", linestyle="--", linewidth=0.8)
            ax.annotate(label, (1.0, y), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                        ha="right", va="bottom")
        if log and any(r["mode"] == mode for r in ok):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))  # 0.5x, 1x, 2x rather than 2 x 10^0
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%gx"))
            ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{c}\n{d}" for c, d in groups], fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(mode, fontsize=9)
        if not any(r["mode"] == mode for r in ok):
            ax.text(0.5, 0.5, "no measurements", transform=ax.transAxes, ha="center", va="center", color="gray")
    if provs:
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:  # the first panel may have no bars: take them from any panel
            for ax in axes:
                handles, labels = ax.get_legend_handles_labels()
                if handles:
                    break
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(provs), 8), fontsize=7, frameon=False)
    cuda = meta["device"].startswith("cuda")
    head = f"{title}\n{meta['device_name']}, {meta['timestamp_utc']}"
    if not cuda:
        head += ": CPU RUN, these timings do not measure the kernels"
    fig.suptitle(head, fontsize=10, color="black" if cuda else "firebrick")
    fig.savefig(path, dpi=110)


def _color(provider):
    """One colour per provider, the same in every plot."""
    import matplotlib

    names = list(PROVIDERS)
    i = names.index(provider) if provider in names else len(names)
    return matplotlib.colormaps["tab10"](i % 10)


def write(out_dir, meta, rows, targets, plots=True):
    """Write the run's files; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{meta['timestamp_utc'].replace('-', '').replace(':', '')}-{device_slug(meta)}"
    paths = {"json": stem.with_name(stem.name + ".json"), "csv": stem.with_name(stem.name + ".csv"),
             "md": stem.with_name(stem.name + ".md")}
    paths["json"].write_text(json.dumps({"metadata": meta, "rows": rows, "targets": targets}, indent=1) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        w.writeheader()
        w.writerows({k: r.get(k) for k in ROW_FIELDS} for r in rows)
    paths["md"].write_text(markdown(meta, rows, targets))
    if plots:
        names = list(dict.fromkeys(r["provider"] for r in rows))
        paths["speedup"] = stem.with_name(stem.name + "-speedup.png")
        _plot(rows, meta, paths["speedup"], "speedup_vs_eager", f"x over {BASELINE} (log)",
              "Speed-up over PyTorch eager (align_corners=False)", [p for p in names if p not in BASELINES],
              refs=[(1.0, "eager")], log=True)
        paths["bandwidth"] = stem.with_name(stem.name + "-bandwidth.png")
        _plot(rows, meta, paths["bandwidth"], "frac_of_copy", "fraction of copy GB/s",
              "Achieved bandwidth (minimum bytes) / device copy bandwidth", names, refs=[(1.0, "copy"), (0.75, "75%")])
    return paths
