"""``stn-bench`` / ``python -m stn_triton.benchmarks``: time spatial-transformer sampling, ours against PyTorch.

Cases x dtypes x providers x modes, one row each, timed by device events on a CUDA GPU. Writes
``<UTC stamp>-<device>.json``, ``.csv``, ``.md`` and ``-speedup.png``, ``-bandwidth.png`` under
``./stn-bench-results/`` (or ``--out``) and prints the markdown table. Without a GPU it runs small
cases on the CPU paths and says loudly that those timings do not measure the kernels.
"""

import argparse
import importlib.util
import os
import sys

import torch

from stn_triton._cli import HelpFormatter, description
from . import report, sass, static
from .cases import (CPU_DEFAULT_BATCH_SCALE, CPU_DEFAULT_CASES, DTYPES, NAMED, SAMPLINGS, canonical_dtype,
                    parse_case_spec, with_samplings)
from .providers import PROVIDERS
from .runner import MODE_HELP, MODES, RunConfig, plan, run

RESULTS = "stn-bench-results"  # under the current directory (the repository commits its runs to benchmarks/results)
PLOT_EXTRA = "pip install 'stn-triton[benchmarks]'"
DEFAULT_DTYPES = ("float32", "bfloat16")


def _case_spec(text):
    try:
        return parse_case_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad case spec {text!r}: {e}") from None


def _dtype(text):
    try:
        return canonical_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid dtype: {e}") from None


def _positive(text):
    try:
        v = float(text)
    except ValueError:
        v = -1
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def parser():
    p = argparse.ArgumentParser(prog="stn-bench", description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(NAMED), metavar="CASE", default=None,
                   help=f"named cases, of {', '.join(NAMED)} (default: all on a GPU; "
                        f"{' and '.join(CPU_DEFAULT_CASES)} on the CPU; none when --case-spec is given)")
    p.add_argument("--case-spec", action="append", type=_case_spec, default=[], metavar="SPEC",
                   help="a case of your own, repeatable: N=8,C=3,H=64,W=64[,Ho=32,Wo=32,K=2,dtype=bfloat16,"
                        "layout=channels_last,sampling=bicubic,name=mine] (Ho, Wo default to H, W; dtype to each of "
                        "--dtypes); D=16[,Do=8] makes a volume (N, C, D, H, W), trilinear, layout ncdhw or "
                        "channels_last_3d (Do defaults to D)")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="PROVIDER", default=None,
                   help=f"of {', '.join(PROVIDERS)} (default: all; on the CPU all but compile)")
    p.add_argument("--modes", nargs="+", choices=MODES + SAMPLINGS, metavar="MODE", default=list(MODES),
                   help=f"of {', '.join(MODES)} (default: all); and/or an interpolation, of {', '.join(SAMPLINGS)}, "
                        "to sample every case that way instead of each case's own (--modes bicubic: the cases in "
                        "bicubic, every mode)")
    p.add_argument("--dtypes", nargs="+", type=_dtype, metavar="DTYPE", default=list(DEFAULT_DTYPES),
                   help=f"for cases without their own, of {', '.join(DTYPES)} (default: {' '.join(DEFAULT_DTYPES)})")
    p.add_argument("--batch-scale", type=_positive, default=None,
                   help=f"multiply the named cases' batch N by this (default 1 on a GPU, {CPU_DEFAULT_BATCH_SCALE:g} "
                        "on the CPU)")
    p.add_argument("--warmup", type=_positive, default=25.0, help="warm-up per row, ms (do_bench's warmup; default 25)")
    p.add_argument("--rep", type=_positive, default=100.0, help="timed repetitions per row, ms (do_bench's rep; default 100)")
    p.add_argument("--device", default="auto", help="auto (default: cuda when there is a GPU), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for a CPU run (default 1: steadier numbers on a shared machine; they do not "
                        "measure the kernels anyway)")
    p.add_argument("--out", default=RESULTS,
                   help=f"folder for the results files (default: ./{RESULTS}; --static writes under OUT/static)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="time launch-bound cases with plain events, not inside a CUDA graph")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="print the cases, providers and modes, then exit")
    g = p.add_argument_group("compile-only report (no GPU needed)")
    g.add_argument("--static", action="store_true",
                   help="compile every kernel the launchers would launch for the cases (ours-* providers) for an "
                        "H100/H200 without running anything, and report registers, spills, occupancy, SASS mix, "
                        "loops and a modelled issue time beside the DRAM floor, under OUT/static/ (a model, not a "
                        "measurement)")
    g.add_argument("--arch", choices=list(sass.ARCHS), default="sm_90", help="--static: the GPU to compile for")
    g.add_argument("--triton", default=static.TRITON_VERSION, metavar="VERSION",
                   help=f"--static: the Triton to compile with (installed once into ~/.cache/stn-triton when the "
                        f"environment has another; default {static.TRITON_VERSION}, the GPU machines')")
    return p


def _device(text, p):
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        p.error(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {text}: no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def list_text():
    lines = ["cases (named; dtype comes from --dtypes):"]
    for c in NAMED.values():
        shape = c.shape.replace("->", " -> ")
        lines.append(f"  {c.name:<15} {shape:<32} K={c.K}  {c.layout:<16} {c.note}")
    lines += ["", "providers:"]
    for p in PROVIDERS.values():
        ok, why = p.available()
        lines.append(f"  {p.name:<16} {p.description}" + ("" if ok else f"  [unavailable: {why}]"))
    lines += ["", "modes:"] + [f"  {m:<8} {MODE_HELP[m]}" for m in MODES]
    lines += [f"  {s:<8} interpolation: every case sampled {s} (default: each case's own)" for s in SAMPLINGS]
    lines += ["", f"dtypes: {', '.join(DTYPES)} (default {', '.join(DEFAULT_DTYPES)})"]
    return "\n".join(lines)


def split_modes(modes):
    """``--modes`` -> (the modes to time, default all; the interpolations to sample every case with, or
    None for each case's own)."""
    steps = [m for m in dict.fromkeys(modes) if m in MODES] or list(MODES)
    samplings = [m for m in dict.fromkeys(modes) if m in SAMPLINGS] or None
    return steps, samplings


def config(args, p):
    """RunConfig from parsed arguments (device defaults resolved)."""
    device = _device(args.device, p)
    cpu = device.type != "cuda"
    scale = args.batch_scale if args.batch_scale is not None else (CPU_DEFAULT_BATCH_SCALE if cpu else 1.0)
    if args.cases is not None:
        names = args.cases
    elif args.case_spec:
        names = []
    else:
        names = list(CPU_DEFAULT_CASES) if cpu else list(NAMED)
    cases = [NAMED[n].scaled(scale) for n in dict.fromkeys(names)] + list(args.case_spec)
    steps, samplings = split_modes(args.modes)
    if samplings:
        cases = with_samplings(cases, samplings)
    seen = set()
    for c in cases:
        if c.name in seen:
            p.error(f"--case-spec: case name {c.name!r} used twice; give one a name=...")
        seen.add(c.name)
    # by default every provider with rows in this run (the flow providers run on displacement-field cases only)
    providers = args.providers or [n for n, pr in PROVIDERS.items()
                                   if (pr.cpu_default or not cpu) and any(pr.runs_on(c) for c in cases)]
    cfg = RunConfig(cases=cases, providers=list(dict.fromkeys(providers)), modes=steps,
                    dtypes=list(dict.fromkeys(args.dtypes)), device=device, warmup_ms=args.warmup, rep_ms=args.rep,
                    cuda_graphs=not args.no_cuda_graphs, progress=not args.no_progress)
    others = [n for n in cfg.providers if not PROVIDERS[n].ours and any(PROVIDERS[n].runs_on(c) for c in cfg.cases)]
    if "bwd-det" in cfg.modes and others:  # the deterministic backward is this library's alone
        ours = ", ".join(n for n in PROVIDERS if PROVIDERS[n].ours)
        if not plan(cfg):
            p.error(f"--modes bwd-det times this library's providers only ({ours}); with --providers "
                    f"{' '.join(cfg.providers)} there is nothing to run (add one of them, or another mode)")
        print(f"note: --modes bwd-det: no rows for {', '.join(others)} (the deterministic backward is timed for "
              f"this library's providers only; their bwd rows are the baseline)", file=sys.stderr)
    return cfg


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        print(list_text())
        return 0
    if args.static:
        return main_static(args, p, argv)
    cfg = config(args, p)
    plots = not args.no_plots
    if plots and importlib.util.find_spec("matplotlib") is None:  # say so now, not after every timing
        print(f"note: matplotlib is not installed: writing the tables without the plots ({PLOT_EXTRA} "
              "for them, or --no-plots to silence this)", file=sys.stderr)
        plots = False
    if cfg.device.type == "cuda":
        torch.cuda.set_device(cfg.device)  # Triton launches on the current device
    if cfg.device.type == "cuda" and "bwd-det" in cfg.modes:
        # under use_deterministic_algorithms(True) PyTorch refuses cuBLAS (affine_grid's backward in
        # ours-grid) unless cuBLAS is told to use fixed workspaces; set before the first cuBLAS call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    threads = torch.get_num_threads()
    if cfg.device.type != "cuda":
        if args.threads < 1:
            p.error(f"--threads: expected a positive number, got {args.threads}")
        torch.set_num_threads(args.threads)
        print(f"WARNING: {report.CPU_WARNING}", file=sys.stderr)
        if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
            print("note: TRITON_INTERPRET is set: each interpreted kernel call takes seconds; keep cases tiny "
                  "(e.g. --case-spec N=2,C=1,H=8,W=8)", file=sys.stderr)
    try:
        rows, copy = run(cfg)
        meta = report.metadata(cfg, argv if argv is not None else sys.argv[1:], copy)
    finally:
        torch.set_num_threads(threads)
    targets = report.check_targets(rows, on_gpu=cfg.device.type == "cuda")
    paths = report.write(args.out, meta, rows, targets, plots=plots)
    print(report.markdown(meta, rows, targets))
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    if cfg.device.type != "cuda":
        print(f"WARNING: {report.CPU_WARNING}", file=sys.stderr)
    return 0


def main_static(args, p, argv):
    """``--static``: compile-only report for the cases (every named case by default)."""
    if args.cases is not None:
        names = args.cases
    else:
        names = [] if args.case_spec else list(NAMED)
    scale = args.batch_scale or 1.0
    cases = [NAMED[n].scaled(scale) for n in dict.fromkeys(names)] + list(args.case_spec)
    steps, samplings = split_modes(args.modes)
    if samplings:
        cases = with_samplings(cases, samplings)
    if args.providers:
        wrong = [n for n in args.providers if n not in static.FORMS]
        if wrong:
            p.error(f"--providers: --static compiles this library's kernels only ({', '.join(static.FORMS)}), "
                    f"not {', '.join(wrong)}")
        forms = [static.FORMS[n] for n in dict.fromkeys(args.providers)]
    else:
        forms = list(static.FORMS.values())
    try:
        meta, rows, targets = static.run(cases, list(dict.fromkeys(args.dtypes)), forms,
                                         steps, arch=args.arch, version=args.triton,
                                         argv=argv if argv is not None else sys.argv[1:])
    except static.StaticError as e:
        print(f"stn-bench --static: {e}", file=sys.stderr)
        return 2
    paths = static.write(args.out, meta, rows, targets)
    text = static.markdown(meta, rows, targets)
    print(text.split("\n## Per launch")[0].rstrip())
    print(f"\nper-launch details in {paths['md']}")
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0
