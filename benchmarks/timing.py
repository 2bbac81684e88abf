"""Timing, peak memory, kernel counts and the copy-bandwidth reference.

On CUDA, times come from device events through Triton's own benchmark helpers (APIs of Triton 3.6,
nothing newer): ``do_bench(fn, warmup, rep, quantiles=...)`` (flushes L2 before every call, one
event pair per call) or, for launch-bound cases, ``do_bench_cudagraph(fn, rep, quantiles=...)``
(about ``min(rep, 25)`` ms of calls captured back to back in one CUDA graph, replayed 10 times;
its quantiles are over those 10 averages). On the CPU, ``time.perf_counter`` around each call: those numbers describe PyTorch's
reference path or Triton's interpreter, never the kernels.

Every timing is (median, 20th percentile, 80th percentile) in milliseconds.
"""

import contextlib
import math
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)
CPU_MIN_REPS, CPU_MAX_REPS, CPU_MAX_WARMUP = 3, 1000, 100
GRAPH_REP_MS = 25.0


def quantiles(values, qs=QUANTILES):
    """Linear-interpolation quantiles (``torch.quantile``'s and Triton's definition)."""
    v = sorted(values)
    out = []
    for q in qs:
        pos = q * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


def _cpu_bench(fn, warmup_ms, rep_ms):
    """Like ``do_bench`` with a wall clock: one call (which may compile), one to estimate, warm-up
    for about ``warmup_ms``, then timed calls for about ``rep_ms`` (at least 3)."""
    fn()
    t0 = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - t0, 1e-7) * 1e3
    for _ in range(min(CPU_MAX_WARMUP, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(CPU_MIN_REPS, min(CPU_MAX_REPS, int(rep_ms / estimate)))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def describe_error(e, limit=300):
    """``"TypeName: first line of the message"``, at most ``limit`` characters."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


def bench(fn, device, warmup_ms, rep_ms, cuda_graph=False):
    """Time ``fn``: returns ((median, p20, p80) in ms, how it was timed)."""
    if device.type != "cuda":
        return _cpu_bench(fn, warmup_ms, rep_ms), "perf_counter (CPU)"
    from triton.testing import do_bench, do_bench_cudagraph

    how = "cuda events"
    if cuda_graph:
        try:
            # at most ~25 ms of calls in one graph: a launch-bound call is microseconds, and a graph
            # of rep / estimate calls must still be captured and instantiated
            times = do_bench_cudagraph(fn, rep=min(rep_ms, GRAPH_REP_MS), quantiles=list(QUANTILES))
            return list(times), "cuda graph"
        except Exception as e:  # capture refused (e.g. a host sync inside fn): fall back to events
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
            how = f"cuda events (CUDA graph failed: {describe_error(e, 200)})"
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))), how


def capture_stream(device):
    """The stream ``torch.cuda.graph`` captures on by default (``do_bench_cudagraph`` uses it).

    Autograd runs each backward op on the stream of its forward op; outputs whose backward is to be
    captured must therefore be computed on this stream. None when not on CUDA or when this PyTorch
    does not expose it (then backward rows are timed with events).
    """
    if device.type != "cuda" or not hasattr(torch.cuda.graph, "default_capture_stream"):
        return None
    if torch.cuda.graph.default_capture_stream is None:
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream(device=device)
    return torch.cuda.graph.default_capture_stream


def peak_memory_mb(fn, device):
    """Memory allocated at the peak of one call, above what was allocated before it (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def count_kernels(fn, device):
    """GPU activities (kernels, memsets, copies) of one call, from torch.profiler; None on CPU or
    when the profiler cannot say."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:
        return None


def l2_bytes(device):
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)


def copy_bandwidth(device, warmup_ms, rep_ms):
    """Device-to-device copy bandwidth, ``2 * bytes / time`` (read once, written once), of a 1 GiB
    buffer on CUDA (less if memory is short) and a 64 MiB buffer on the CPU (labelled as such)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(2**30, free // 4) // 2**20 * 2**20
    else:
        nbytes = 64 * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    (med, p20, p80), how = bench(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    del src, dst
    return {
        "bytes_copied": nbytes,
        "median_ms": med, "p20_ms": p20, "p80_ms": p80,
        "gbps": 2 * nbytes / (med * 1e-3) / 1e9,
        "method": ("dst.copy_(src), device to device, " if device.type == "cuda"
                   else "dst.copy_(src) in host memory (CPU memcpy, not a GPU number), ") + how,
    }
