"""The run: cases x dtypes x providers x modes, one row each.

Each case says its interpolation (``sampling``: bilinear, nearest or bicubic), which every provider
uses (a provider without it gets a skipped row). A volumetric case (5-D input, ``D``/``Do`` set) runs
the providers with a 3-D form; the others get skipped rows saying why. A bicubic volume (tricubic)
runs this library's providers; the others sample with ``F.grid_sample``, and get a skipped row
where the installed PyTorch has no bicubic for 5-D input (then no row has a speedup against eager).

Modes
-----
``fwd``      forward only, under ``torch.no_grad()`` (the sampling kernel alone).
``bwd``      backward only: the forward is computed once outside the timing and each timed call is
             ``torch.autograd.grad(out, [x, params], grad_out, retain_graph=True)``.
``fwd+bwd``  forward with autograd, then that backward.
``bwd-det``  ``bwd`` under ``torch.use_deterministic_algorithms(True)`` (the previous setting is
             restored after), for this library's providers only (PyTorch's CUDA ``grid_sample``
             backward has no deterministic implementation).

Gradients are always taken with respect to the input and the transform's parameters.

Inputs rotate: each row prepares several independent input sets (input, parameters, grad_output,
and the forward output for ``bwd``) whose total size is at least twice the GPU's L2 cache and at
least 100 MiB, and every call takes the next set, so a small case cannot sit in L2 between calls.
"""

import contextlib
import itertools
import math
import os
import zlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from stn_triton import reference

from . import timing
from .cases import DTYPES, element_size, memory_estimate, min_bytes, over_int32
from .providers import PROVIDERS, basis_dim, draw_params

NO_TRICUBIC = f"this PyTorch ({torch.__version__}) has no bicubic for 5-D input"

MODES = ("fwd", "bwd", "fwd+bwd", "bwd-det")
MODE_HELP = {
    "fwd": "forward only, under torch.no_grad()",
    "bwd": "backward only (grad wrt input and parameters; the forward is done once outside the timing)",
    "fwd+bwd": "forward with autograd, then its backward",
    "bwd-det": "bwd under torch.use_deterministic_algorithms(True); this library's providers only",
}
BASELINE = "eager"
BASELINES = (BASELINE, "eager-flow", "eager-logpolar", "eager-lens")  # a case has rows of one of them: the
# displacement-field cases eager-flow, a plugin family's case eager-<family>
ROTATE_MIN_BYTES = 100 * 2**20
MAX_SETS = {"cuda": 256, "cpu": 4}  # input sets per row (the CPU has no L2 worth defeating)

ROW_FIELDS = ("case", "provider", "mode", "dtype", "layout", "sampling", "K", "N", "C", "D", "H", "W", "Do", "Ho",
              "Wo", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "min_bytes", "gbps", "frac_of_copy",
              "speedup_vs_eager", "kernels", "timer", "input_sets", "status")  # D, Do: None for 2-D cases


@dataclass
class RunConfig:
    cases: list  # [Case]
    providers: list  # provider names
    modes: list
    dtypes: list  # used for cases whose dtype is open
    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cuda_graphs: bool = True
    progress: bool = True


@contextlib.contextmanager
def deterministic(flag):
    """``torch.use_deterministic_algorithms(flag)`` inside, the previous setting restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def plan(cfg):
    """Every (case, dtype, provider, mode) the run will report, in execution order."""
    rows = []
    for case in cfg.cases:
        for dtype in ([case.dtype] if case.dtype else cfg.dtypes):
            for name in cfg.providers:
                if not PROVIDERS[name].runs_on(case):  # field cases: the flow providers; others: the rest
                    continue
                for mode in cfg.modes:
                    if mode == "bwd-det" and not PROVIDERS[name].ours:
                        continue
                    rows.append((case, dtype, name, mode))
    return rows


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def _free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: available physical memory
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _skip_reason(case, dtype, device):
    """Why a case cannot run on this device, or None."""
    if device.type != "cuda" and over_int32(case):
        return "skipped: over 2^31 elements; run it on a GPU"
    need, free = memory_estimate(case, dtype), _free_bytes(device)
    if free is not None and need > free:
        return f"skipped: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def _n_sets(case, dtype, mode, device):
    """How many input sets a row rotates through (see the module's docstring)."""
    es = element_size(dtype)
    # a set holds the input, grad_output (modes with a backward) and the output (bwd, bwd-det)
    n_out = {"fwd": 0, "fwd+bwd": 1}.get(mode, 2)
    per_set = (case.input_numel + n_out * case.output_numel) * es
    if device.type != "cuda":
        return max(1, min(MAX_SETS["cpu"], math.ceil(ROTATE_MIN_BYTES / per_set)))
    target = max(ROTATE_MIN_BYTES, 2 * (timing.l2_bytes(device) or 0))
    n = max(1, min(MAX_SETS["cuda"], math.ceil(target / per_set)))
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n, int(free // 4 // per_set)))  # rotation never takes more than a quarter of memory


@dataclass
class _Set:
    x: torch.Tensor
    leaves: list
    grad_out: torch.Tensor = None
    out: torch.Tensor = None


def _random_input(case, dtype, device, generator, requires_grad):
    N, C, S = case.N, case.C, case.in_size  # S: (H, W), or (D, H, W) for a volume
    if case.channels_last:  # drawn as N[D]HWC, viewed as NC[D]HW: channels-last(-3d) strides
        x = torch.randn(N, *S, C, dtype=DTYPES[dtype], device=device, generator=generator).movedim(-1, 1)
    else:
        x = torch.randn(N, C, *S, dtype=DTYPES[dtype], device=device, generator=generator)
    return x.requires_grad_(requires_grad)


def _make_sets(provider, apply, case, dtype, mode, device, n_sets, graph):
    """Independent inputs for ``n_sets`` calls; the same data for every provider of a case."""
    sets, probe = [], None
    stream = timing.capture_stream(device) if (graph and mode in ("bwd", "bwd-det")) else None
    for i in range(n_sets):
        g = torch.Generator(device=device).manual_seed(_seed(case.name, dtype, i))
        x = _random_input(case, dtype, device, g, requires_grad=mode != "fwd")
        params = draw_params(provider.family, case, device, g)
        s = _Set(x, provider.leaves(params, x, case))
        if mode != "fwd":
            if probe is None:  # learn the output's shape and strides (and compile, for torch.compile)
                with torch.no_grad():
                    probe = apply(x, s.leaves)
            s.grad_out = torch.empty_like(probe).normal_(generator=g)
        if mode in ("bwd", "bwd-det"):
            if stream is None:
                s.out = apply(s.x, s.leaves)
            else:  # backward ops run on their forward's stream: make that the capture stream
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    s.out = apply(s.x, s.leaves)
                torch.cuda.current_stream(device).wait_stream(stream)
        sets.append(s)
    return sets


def _closure(apply, sets, mode):
    nxt = itertools.cycle(sets).__next__

    if mode == "fwd":
        def fn():
            s = nxt()
            with torch.no_grad():
                apply(s.x, s.leaves)
    elif mode == "fwd+bwd":
        def fn():
            s = nxt()
            torch.autograd.grad(apply(s.x, s.leaves), [s.x, *s.leaves], s.grad_out)
    else:
        def fn():
            s = nxt()
            torch.autograd.grad(s.out, [s.x, *s.leaves], s.grad_out, retain_graph=True)
    return fn


def _blank_row(case, dtype, provider, mode, status):
    row = dict.fromkeys(ROW_FIELDS)
    row.update(case=case.name, provider=provider, mode=mode, dtype=dtype, layout=case.layout, sampling=case.sampling,
               K=case.K, N=case.N, C=case.C, D=case.D, H=case.H, W=case.W, Do=case.Do, Ho=case.Ho, Wo=case.Wo,
               status=status)
    family = PROVIDERS[provider].family
    row["min_bytes"] = min_bytes(case, dtype, mode, family, basis_dim() if family == "basis" else 0)
    return row


def run_row(cfg, case, dtype, name, mode):
    """Time one row; failures are recorded in the row's status, never raised."""
    provider = PROVIDERS[name]
    ok, why = provider.available()
    if not ok:
        return _blank_row(case, dtype, name, mode, f"skipped: {why}")
    if case.is_3d and case.sampling == "bicubic" and not provider.ours and not reference._torch_has_tricubic():
        return _blank_row(case, dtype, name, mode, f"skipped: {NO_TRICUBIC}")
    ok, why = provider.applies(case)
    if not ok:
        return _blank_row(case, dtype, name, mode, f"skipped: {why}")
    reason = _skip_reason(case, dtype, cfg.device)
    if reason:
        return _blank_row(case, dtype, name, mode, reason)
    row = _blank_row(case, dtype, name, mode, "ok")
    graph = cfg.device.type == "cuda" and cfg.cuda_graphs and case.launch_bound(dtype)
    sets = fn = None
    try:
        with deterministic(False):  # inputs and the forward for bwd rows: the same for bwd and bwd-det
            apply = provider.build(case, dtype, cfg.device)
            n_sets = _n_sets(case, dtype, mode, cfg.device)
            sets = _make_sets(provider, apply, case, dtype, mode, cfg.device, n_sets, graph)
            fn = _closure(apply, sets, mode)
        with deterministic(mode == "bwd-det"):
            (row["median_ms"], row["p20_ms"], row["p80_ms"]), row["timer"] = timing.bench(
                fn, cfg.device, cfg.warmup_ms, cfg.rep_ms, cuda_graph=graph)
            row["peak_mem_mb"] = timing.peak_memory_mb(fn, cfg.device)
            row["kernels"] = timing.count_kernels(fn, cfg.device)
        row["input_sets"] = n_sets
    except Exception as e:  # noqa: BLE001: one provider's failure must not end the run
        _fail(row, e)
    finally:
        del sets, fn
        if cfg.device.type == "cuda":
            try:  # an asynchronous kernel fault surfaces here at the latest
                torch.cuda.synchronize(cfg.device)
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                if row["status"] == "ok":
                    _fail(row, e)
    return row


def _fail(row, e):
    row.update(median_ms=None, p20_ms=None, p80_ms=None, peak_mem_mb=None, kernels=None, timer=None,
               input_sets=None, status=f"failed: {timing.describe_error(e)}")


def derive(rows, copy_gbps):
    """Fill gbps, frac_of_copy and speedup_vs_eager from the medians.

    The speed-up of a row is the median of the ``eager`` row (align_corners=False; on displacement-field
    cases ``eager-flow``) of the same case, dtype and mode, over the row's median; ``bwd-det`` rows
    compare with eager's ``bwd``.
    """
    base = {(r["case"], r["dtype"], r["mode"]): r["median_ms"] for r in rows
            if r["provider"] in BASELINES and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["gbps"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
        r["frac_of_copy"] = r["gbps"] / copy_gbps if copy_gbps else None
        b = base.get((r["case"], r["dtype"], "bwd" if r["mode"] == "bwd-det" else r["mode"]))
        r["speedup_vs_eager"] = b / r["median_ms"] if b else None
    return rows


def run(cfg):
    """Measure the copy bandwidth, then every planned row. Returns (rows, copy)."""
    copy = timing.copy_bandwidth(cfg.device, cfg.warmup_ms, cfg.rep_ms)
    todo = plan(cfg)
    rows = []
    bar = tqdm(todo, unit="row", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for case, dtype, name, mode in bar:
            bar.set_description(f"{case.name} {dtype} {name} {mode}")
            rows.append(run_row(cfg, case, dtype, name, mode))
    finally:
        bar.close()
        for p in PROVIDERS.values():
            p.reset()
    return derive(rows, copy["gbps"]), copy
