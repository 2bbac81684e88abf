"""Benchmark cases: the named shapes of issue 6 and a parser for users' own.

A case is a problem size: input (N, C, H, W) in a memory layout, sampled to (Ho, Wo) by K transforms
per image. Its dtype is usually left open (``dtype=None``) and crossed with ``--dtypes``; a custom
``--case-spec`` may fix it.

Bytes and the ">2^31 elements" check live here too, so the runner, the report and ``NOTES.md`` count
the same way.
"""

import math
from dataclasses import dataclass, replace

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
LAYOUTS = ("nchw", "channels_last")
LAYOUT_ALIASES = {"contiguous": "nchw", "nhwc": "channels_last", "cl": "channels_last"}
INT32_LIMIT = 2**31


@dataclass(frozen=True)
class Case:
    """One problem size. ``dtype=None``: run once per ``--dtypes`` entry."""

    name: str
    N: int
    C: int
    H: int
    W: int
    Ho: int
    Wo: int
    K: int = 1
    dtype: str = None
    layout: str = "nchw"
    note: str = ""
    scalable: bool = True  # --batch-scale may change N (not for the >2^31 case: it would stop being one)

    @property
    def input_numel(self):
        return self.N * self.C * self.H * self.W

    @property
    def output_numel(self):
        return self.N * self.K * self.C * self.Ho * self.Wo

    @property
    def shape(self):
        return f"{self.N}x{self.C}x{self.H}x{self.W}->{self.Ho}x{self.Wo}"

    def scaled(self, factor):
        """The same case with the batch N multiplied by ``factor`` (at least 1)."""
        if factor == 1 or not self.scalable:
            return self
        return replace(self, N=max(1, int(round(self.N * factor))))

    def launch_bound(self, dtype):
        """Small enough that one call is a few microseconds of memory traffic, so launch overhead
        would dominate event timing: these are timed inside a CUDA graph."""
        return io_bytes(self, dtype) < 32 * 2**20


NAMED = {c.name: c for c in (
    Case("mnist", 256, 1, 28, 28, 28, 28, note="MNIST-like, launch-bound"),
    Case("svhn", 128, 3, 64, 64, 64, 64, note="SVHN-like"),
    Case("cub-k1", 64, 3, 448, 448, 224, 224, K=1, note="CUB-like, 448 -> 224"),
    Case("cub-k2", 64, 3, 448, 448, 224, 224, K=2, note="CUB-like, 448 -> 224, 2 transformers"),
    Case("cub-k4", 64, 3, 448, 448, 224, 224, K=4, note="CUB-like, 448 -> 224, 4 transformers"),
    Case("feat-nchw", 64, 256, 56, 56, 56, 56, note="feature map, NCHW"),
    Case("feat-cl", 64, 256, 56, 56, 56, 56, layout="channels_last", note="feature map, channels-last"),
    # 2 * 65 * 4096 * 4096 = 2,181,038,080 elements > 2^31: every index must be 64-bit
    Case("huge", 2, 65, 4096, 4096, 2048, 2048, note="input over 2^31 elements (never scaled)", scalable=False),
)}
CPU_DEFAULT_CASES = ("mnist", "svhn")
CPU_DEFAULT_BATCH_SCALE = 1 / 16

SPEC_FIELDS = ("N", "C", "H", "W", "Ho", "Wo", "K", "dtype", "layout", "name")
_REQUIRED = ("N", "C", "H", "W")


def _canonical(name, aliases, choices):
    key = str(name).strip().lower()
    key = aliases.get(key, key)
    if key not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}, got {name!r}")
    return key


def canonical_dtype(name):
    """'bf16' -> 'bfloat16' etc.; raises ValueError naming the choices."""
    return _canonical(name, DTYPE_ALIASES, DTYPES)


def canonical_layout(name):
    """'cl' -> 'channels_last' etc.; raises ValueError naming the choices."""
    return _canonical(name, LAYOUT_ALIASES, LAYOUTS)


def parse_case_spec(spec):
    """``"N=8,C=3,H=64,W=64,Ho=32,Wo=32,K=2,dtype=bfloat16,layout=channels_last"`` -> Case.

    N, C, H, W are required; Ho, Wo default to H, W; K to 1; dtype to each of ``--dtypes``; layout to
    nchw; name to one made from the shape. Field names are case-insensitive (H and Ho stay distinct).
    Raises ValueError naming the bad field.
    """
    by_lower = {f.lower(): f for f in SPEC_FIELDS}
    values = {}
    for item in str(spec).split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"item {item!r} is not FIELD=VALUE (fields: {', '.join(SPEC_FIELDS)})")
        key, value = (s.strip() for s in item.split("=", 1))
        field = by_lower.get(key.lower())
        if field is None:
            raise ValueError(f"unknown field {key!r} (fields: {', '.join(SPEC_FIELDS)})")
        if field in values:
            raise ValueError(f"field {field!r} given twice")
        if field == "dtype":
            try:
                value = canonical_dtype(value)
            except ValueError as e:
                raise ValueError(f"field 'dtype': {e}") from None
        elif field == "layout":
            try:
                value = canonical_layout(value)
            except ValueError as e:
                raise ValueError(f"field 'layout': {e}") from None
        elif field != "name":
            try:
                value = int(value)
            except ValueError:
                value = None
            if value is None or value < 1:
                raise ValueError(f"field {field!r}: expected a positive integer, got {item.split('=', 1)[1]!r}")
        elif not value:
            raise ValueError("field 'name': expected a non-empty name")
        values[field] = value
    missing = [f for f in _REQUIRED if f not in values]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} (required: {', '.join(_REQUIRED)})")
    values.setdefault("Ho", values["H"])
    values.setdefault("Wo", values["W"])
    values.setdefault("K", 1)
    values.setdefault("layout", "nchw")
    if "name" not in values:
        v = values
        values["name"] = (f"{v['N']}x{v['C']}x{v['H']}x{v['W']}-{v['Ho']}x{v['Wo']}"
                          + (f"-K{v['K']}" if v["K"] > 1 else "") + ("-cl" if v["layout"] == "channels_last" else ""))
    return Case(note="custom", **values)


def element_size(dtype):
    return torch.empty(0, dtype=DTYPES[dtype]).element_size()


def io_bytes(case, dtype):
    """Input read once plus output written once, in ``dtype``."""
    return (case.input_numel + case.output_numel) * element_size(dtype)


def param_bytes(case, family, basis_dim=0):
    """The transform's own tensors, float32: theta (2x3), h (3x3), or m (2xD) and the basis (D x Ho*Wo)."""
    NK = case.N * case.K
    if family == "affine":
        return NK * 6 * 4
    if family == "projective":
        return NK * 9 * 4
    return NK * 2 * basis_dim * 4 + basis_dim * case.Ho * case.Wo * 4


def grid_bytes(case):
    """One explicit float32 sampling grid (N*K, Ho, Wo, 2)."""
    return case.N * case.K * case.Ho * case.Wo * 2 * 4


def min_bytes(case, dtype, mode, family, basis_dim=0):
    """The least traffic a mode must move for this case (what GB/s is computed from).

    forward: input read once, output written once, the transform's parameters read once.
    backward: grad_output read, input read, grad_input written (parameters read, their gradient
    written). forward+backward: both. An explicit grid is not counted: it is an artefact of the
    unfused providers, not of the problem (``NOTES.md`` counts it separately).
    """
    es = element_size(dtype)
    x, out = case.input_numel * es, case.output_numel * es
    p = param_bytes(case, family, basis_dim)
    fwd = x + out + p
    bwd = out + x + x + 2 * p
    if mode == "fwd":
        return fwd
    if mode in ("bwd", "bwd-det"):
        return bwd
    return fwd + bwd


def memory_estimate(case, dtype):
    """A generous bound on the device memory the hungriest provider needs for one row (bytes):
    input, output and grad_output, a float32 input-gradient accumulator and the gradient itself,
    eager's K-fold copy of the input and its gradient, explicit grids and the deterministic
    backward's scratch (int64 keys, their sorted copy and permutation, float32 weights per corner).
    """
    es = element_size(dtype)
    x, out = case.input_numel * es, case.output_numel * es
    per_pixel = case.N * case.K * case.Ho * case.Wo
    need = (x * (2 + 2 * case.K) + 4 * case.input_numel + 2 * out
            + 2 * grid_bytes(case) + per_pixel * 4 * (8 + 8 + 8 + 4))
    return int(math.ceil(need * 1.15))


def over_int32(case):
    return case.input_numel >= INT32_LIMIT or case.output_numel >= INT32_LIMIT
