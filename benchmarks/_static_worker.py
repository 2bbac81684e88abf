"""Compile-only run of the launchers, inside a process whose ``triton`` is the one to report on.

``python -m stn_triton.benchmarks._static_worker SPEC.json OUT.json`` (started by :mod:`stn_triton.benchmarks.static`):

1. installs a fake Triton driver that reports ``GPUTarget("cuda", <arch>, 32)`` and launches nothing,
2. calls this library's real launchers (``ops._kernel_forward`` / ``ops._kernel_backward``) on meta
   tensors of each case's shapes (5-D for a volumetric case: the 3-D forms ``affine3d``, ``basis3d``,
   ``grid3d``), recording every Triton launch (kernel,
   grid, arguments, compiled cubin) and every PyTorch operation that would launch a kernel (fills,
   casts, sums, sorts); a job marked ``skip`` (a form without a 3-D kernel) is echoed, not run,
3. disassembles each distinct cubin with the ``nvdisasm`` / ``cuobjdump`` that ship with that Triton
   and writes what it found as JSON.

Nothing here needs a GPU; everything here is a model of what one would run.
"""

import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

LOG = []  # what the current job launched, in order


class _Function:
    """What ``load_binary`` hands the launcher in place of a CUfunction: the kernel's name and cubin."""

    def __init__(self, name, cubin):
        self.name, self.cubin = name, cubin


class _Launcher:
    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
        names = list(self.src.fn.arg_names)
        values = {n: (v if isinstance(v, (int, float, bool)) else None) for n, v in zip(names, args)}
        args = {k: v for k, v in values.items() if v is not None}
        grid = [int(gx), int(gy), int(gz)]
        LOG.append({
            "kind": "triton", "name": function.name, "cubin": function.cubin, "grid": grid,
            "num_warps": int(self.metadata.num_warps), "shared": int(self.metadata.shared),
            "hash": self.metadata.hash, "args": args, "hints": _hints(function.name, args, grid),
        })


def _launchers():
    try:
        from stn_triton.kernels import launch
    except ImportError:  # revisions before the launchers had a module of their own (the first version)
        from stn_triton.kernels import sampler as launch
    return launch


def _hints(name, args, grid):
    """What only the launcher knows: programs that return at once, data-dependent loop trips."""
    hook = getattr(_launchers(), "static_hints", None)
    return hook(name, args, grid) if hook else {}


class _Utils:
    def __init__(self, arch):
        self.arch = arch

    def load_binary(self, name, kernel, shared, device):
        return None, _Function(name, kernel), 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448 if self.arch >= 90 else 166912, "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32}


class FakeDriver(DriverBase):
    """Reports a CUDA GPU of the given compute capability; launching records instead of running."""

    def __init__(self, arch):
        self.arch = arch
        self.utils = _Utils(arch)
        self.launcher_cls = _Launcher

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("a static (compile-only) run cannot time anything")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return divmod(self.arch, 10)


_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "is_same_size", "_has_compatible_shallow_copy_type"}


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class RecordTorchOps(TorchDispatchMode):
    """Every ATen operation that would launch a CUDA kernel (not views, not allocations)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_LAUNCH:
            flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            flat_out = [a for a in torch.utils._pytree.tree_leaves(out) if isinstance(a, torch.Tensor)]
            reads = sum(_nbytes(t) for t in flat_in if not (name.endswith("_") and t is flat_in[0]))
            writes = sum(_nbytes(t) for t in flat_out)
            if name in ("fill_", "zero_", "zeros", "zeros_like", "full", "full_like", "ones", "ones_like",
                        "new_zeros", "new_ones", "new_full"):  # (new_*: their tensor argument gives dtype and device)
                reads = 0
            LOG.append({"kind": "torch", "name": str(func), "bytes": int(reads + writes)})
        return out


def _meta_case(job):
    """x, the form's parameter tensors and the output size, on the meta device. A volumetric job
    (``D`` set; forms affine3d, basis3d, grid3d): x (N, C, D, H, W), size [Do, Ho, Wo]."""
    N, C, H, W, Ho, Wo, K = (job[k] for k in ("N", "C", "H", "W", "Ho", "Wo", "K"))
    dtype = getattr(torch, job["dtype"])
    meta = torch.device("meta")
    volume = job.get("D") is not None
    S = (job["D"], H, W) if volume else (H, W)
    size = [job["Do"], Ho, Wo] if volume else [Ho, Wo]
    nd = len(size)
    if job["layout"] in ("channels_last", "channels_last_3d"):  # N[D]HWC memory, viewed as NC[D]HW
        x = torch.empty(N, *S, C, dtype=dtype, device=meta).movedim(-1, 1)
    else:
        x = torch.empty(N, C, *S, dtype=dtype, device=meta)
    f32 = dict(dtype=torch.float32, device=meta)
    form = job["form"]
    if form.startswith("plugin:"):  # a plugin family's own Triton map: theta (N, K, num_params)
        from transforms_registry import get_transform

        family = get_transform(form.split(":", 1)[1])
        return x, [torch.empty(N, K, family.num_params, **f32)], size
    P = 1
    for s in size:
        P *= s
    if form in ("affine", "affine3d"):
        params = [torch.empty(N, K, nd, nd + 1, **f32)]
    elif form == "projective":
        params = [torch.empty(N, K, 3, 3, **f32)]
    elif form in ("basis", "basis3d"):
        D = job.get("basis_dim", 19)
        params = [torch.empty(N, K, nd, D, **f32), torch.empty(D, P, **f32)]
    else:
        params = [torch.empty(N, K, *size, nd, **f32)]
    try:  # revisions whose flow forms take a frame (the field's units and component order) last
        from stn_triton.kernels.forms import FORMS

        if getattr(FORMS[form], "frame", False):
            params.append(torch.empty(2 * nd, **f32))
    except (ImportError, KeyError):
        pass
    return x, params, size


def run_job(job):
    """The launches of one (case, dtype, form, mode), as the library's own launchers make them."""
    from stn_triton import ops

    launch = _launchers()
    x, params, size = _meta_case(job)
    new_output = launch.new_output  # (x, K, *size): 2-D and 3-D since the launchers were unified
    if len(size) == 3:
        try:  # revisions with a separate volume launcher
            from stn_triton.kernels.launch_volume import new_output3d as new_output
        except ImportError:
            pass
    launch.STATIC_CHOICE = job.get("choice")  # None: the launchers' default shape
    form = job["form"]
    if form.startswith("plugin:"):
        from stn_triton.kernels.forms import plugin_form
        from transforms_registry import get_transform

        form = plugin_form(get_transform(form.split(":", 1)[1])).name
    if hasattr(ops, "_stand_in"):  # made once per device, before any call: not one of a call's launches
        ops._stand_in(x.device)
    opts = (job.get("sampling", "bilinear"), job.get("padding_mode", "zeros"), bool(job.get("align_corners", False)))
    steps = {"fwd": ["fwd"], "bwd": ["bwd"], "fwd+bwd": ["fwd", "bwd"], "bwd-det": ["bwd-det"]}[job["mode"]]
    out = []
    for step in steps:
        LOG.clear()
        det = step == "bwd-det"
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(det)
        try:
            if step == "fwd":
                with RecordTorchOps():
                    ops._kernel_forward(form, x, params, size, *opts)
            else:
                grad_out = new_output(x, params[0].shape[1], *size)
                needs = [True, True] + [False] * (len(params) - 1)  # input and theta/h/m/grid/field (not the basis
                # or the frame)
                with RecordTorchOps():
                    ops._kernel_backward(form, grad_out, x, params, size, *opts, needs)
        finally:
            torch.use_deterministic_algorithms(before)
        out.extend(dict(entry, step=step) for entry in LOG)
    return out


def _tool(name):
    return triton.knobs.nvidia.__getattribute__(name).path


def analyse(cubin):
    """nvdisasm (with the line table) and cuobjdump's resource usage of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_tool("nvdisasm"), "-c", "-g", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    return {"sass": sass, "res_usage": res}


def main(argv):
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    driver.set_active(FakeDriver(int(spec["arch"])))
    torch.set_default_device(None)
    results, kernels = [], {}
    for job in spec["jobs"]:
        if job.get("skip"):
            results.append({"job": job, "skipped": job["skip"]})
            continue
        try:
            launches = run_job(job)
        except Exception as e:  # a kernel that does not compile is a finding, not a crash
            results.append({"job": job, "error": f"{type(e).__name__}: {e}"})
            continue
        for entry in launches:
            if entry["kind"] == "triton":
                cubin = entry.pop("cubin")
                if entry["hash"] not in kernels:
                    kernels[entry["hash"]] = analyse(cubin)
        results.append({"job": job, "launches": launches})
    with open(out_path, "w") as f:
        json.dump({"triton": triton.__version__, "torch": torch.__version__, "arch": spec["arch"],
                   "results": results, "kernels": kernels}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
