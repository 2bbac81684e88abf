"""Benchmark cases: the named shapes of issue 6 and a parser for users' own.

A case is a problem size: input (N, C, H, W) in a memory layout, sampled to (Ho, Wo) by K transforms
per image with one of ``F.grid_sample``'s interpolations (``sampling``: bilinear unless said). Its
dtype is usually left open (``dtype=None``) and crossed with ``--dtypes``; a custom ``--case-spec``
may fix it.

A volumetric case has a depth too (``D``, ``Do``; None for 2-D): input (N, C, D, H, W) sampled to
(Do, Ho, Wo), trilinear for ``sampling="bilinear"`` (as in PyTorch), in the layout ``ncdhw``
(contiguous) or ``channels_last_3d``.

Bytes and the ">2^31 elements" check live here too, so the runner, the report and ``NOTES.md`` count
the same way.
"""

import math
from dataclasses import dataclass, replace

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
LAYOUTS = ("nchw", "channels_last", "ncdhw", "channels_last_3d")  # the last two: volumetric cases
LAYOUT_ALIASES = {"contiguous": "nchw", "nhwc": "channels_last", "cl": "channels_last", "ndhwc": "channels_last_3d",
                  "cl3d": "channels_last_3d"}
LAYOUTS_3D = {"nchw": "ncdhw", "channels_last": "channels_last_3d"}  # a 2-D layout's name given for a 3-D case
CHANNELS_LAST = ("channels_last", "channels_last_3d")
SAMPLINGS = ("bilinear", "nearest", "bicubic")  # the interpolation (F.grid_sample's mode) of a case
SAMPLING_ALIASES = {"linear": "bilinear", "cubic": "bicubic"}
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
    sampling: str = "bilinear"  # the interpolation: bilinear (trilinear for a volume), nearest or bicubic
    D: int = None  # input depth: a volumetric (5-D) case; None for 2-D
    Do: int = None  # output depth (volumetric cases)
    field: bool = False  # the transform is a dense displacement field (the flow providers); else a matrix
    family: str = ""  # a plugin family the case is for (its own providers: ours fused, eager on its grid)

    @property
    def kind(self):
        """Which providers run on the case: "flow" (displacement fields), "plugin:<family>", or "matrix"."""
        if self.field:
            return "flow"
        return f"plugin:{self.family}" if self.family else "matrix"

    @property
    def is_3d(self):
        return self.D is not None

    @property
    def in_size(self):
        """The input's spatial size: (H, W), or (D, H, W) for a volume."""
        return (self.D, self.H, self.W) if self.is_3d else (self.H, self.W)

    @property
    def out_size(self):
        """The output's spatial size: (Ho, Wo), or (Do, Ho, Wo) for a volume (``size=`` of our functions)."""
        return (self.Do, self.Ho, self.Wo) if self.is_3d else (self.Ho, self.Wo)

    @property
    def out_pixels(self):
        """Output pixels (voxels) per image and transform."""
        return math.prod(self.out_size)

    @property
    def input_numel(self):
        return self.N * self.C * math.prod(self.in_size)

    @property
    def output_numel(self):
        return self.N * self.K * self.C * self.out_pixels

    @property
    def channels_last(self):
        return self.layout in CHANNELS_LAST

    @property
    def shape(self):
        return shape_text(self)

    def scaled(self, factor):
        """The same case with the batch N multiplied by ``factor`` (at least 1)."""
        if factor == 1 or not self.scalable:
            return self
        return replace(self, N=max(1, int(round(self.N * factor))))

    def sampled(self, sampling):
        """The same problem with another interpolation, named after it (``cub-k4`` -> ``cub-k4-bicubic``;
        a name's ``-<sampling>`` suffix is replaced, bilinear has none)."""
        if sampling == self.sampling:
            return self
        base = self.name.removesuffix(f"-{self.sampling}") if self.sampling != "bilinear" else self.name
        return replace(self, sampling=sampling, name=base if sampling == "bilinear" else f"{base}-{sampling}")

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
    Case("cub-k2-bicubic", 64, 3, 448, 448, 224, 224, K=2, sampling="bicubic",
         note="CUB-like, 448 -> 224, 2 transformers, bicubic (16 taps per pixel)"),
    # 2 * 65 * 4096 * 4096 = 2,181,038,080 elements > 2^31: every index must be 64-bit
    Case("huge", 2, 65, 4096, 4096, 2048, 2048, note="input over 2^31 elements (never scaled)", scalable=False),
    # volumes (5-D input, trilinear): a registration-like pair of 3-channel scans, a feature volume
    Case("field-2d", 16, 3, 512, 512, 512, 512, field=True, note="2-D displacement field (registration)"),
    Case("field-oasis", 1, 1, 192, 224, 192, 224, D=160, Do=160, layout="ncdhw", field=True,
         note="OASIS-sized 3-D displacement field, one channel"),
    Case("field-oasis-c2", 1, 2, 192, 224, 192, 224, D=160, Do=160, layout="ncdhw", field=True,
         note="OASIS-sized 3-D displacement field, two channels"),
    Case("logpolar", 64, 3, 224, 224, 224, 224, family="logpolar",
         note="log-polar sampling about a learnt origin (a plugin family's own Triton map, fused)"),
    Case("lens", 64, 3, 224, 224, 224, 224, family="lens",
         note="radial lens distortion (a plugin family's own Triton map and gradient terms, fused)"),
    Case("vol-reg", 2, 3, 192, 224, 192, 224, D=160, Do=160, layout="ncdhw",
         note="registration-like volume 160x192x224, trilinear"),
    Case("vol-feat-cl", 2, 32, 96, 96, 96, 96, D=96, Do=96, layout="channels_last_3d",
         note="feature volume 96^3, channels-last-3d, trilinear"),
)}
CPU_DEFAULT_CASES = ("mnist", "svhn")
CPU_DEFAULT_BATCH_SCALE = 1 / 16

SPEC_FIELDS = ("N", "C", "D", "H", "W", "Do", "Ho", "Wo", "K", "dtype", "layout", "sampling", "field", "name")
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


def canonical_sampling(name):
    """'cubic' -> 'bicubic' etc.; raises ValueError naming the choices."""
    return _canonical(name, SAMPLING_ALIASES, SAMPLINGS)


def shape_text(c):
    """``"64x3x448x448->224x224"``; a volume ``"2x3x160x192x224->160x192x224"``. ``c``: a Case or a row."""
    get = c.get if isinstance(c, dict) else lambda k: getattr(c, k)
    dims = ("N", "C", "D", "H", "W") if get("D") is not None else ("N", "C", "H", "W")
    out = ("Do", "Ho", "Wo") if get("D") is not None else ("Ho", "Wo")
    return "x".join(str(get(k)) for k in dims) + "->" + "x".join(str(get(k)) for k in out)


def with_samplings(cases, samplings):
    """Each case once per interpolation of ``samplings`` (:meth:`Case.sampled`), in order, the first of
    each name kept (``cub-k2`` sampled bicubic is ``cub-k2-bicubic``, the named one)."""
    out = {}
    for case in cases:
        for sampling in samplings:
            c = case.sampled(sampling)
            out.setdefault(c.name, c)
    return list(out.values())


def parse_case_spec(spec):
    """``"N=8,C=3,H=64,W=64,Ho=32,Wo=32,K=2,dtype=bfloat16,layout=channels_last"`` -> Case.

    N, C, H, W are required; Ho, Wo default to H, W; K to 1; dtype to each of ``--dtypes``; layout to
    nchw; sampling to bilinear; name to one made from the shape. Field names are case-insensitive (H
    and Ho stay distinct).

    ``D=`` makes a volumetric case (input N, C, D, H, W): ``Do`` defaults to D, the layout to ncdhw
    (``channels_last``/``cl`` mean channels_last_3d there); ``Do`` without ``D`` and a 3-D layout
    without ``D`` are errors. ``sampling=bicubic`` on a volume is tricubic (64 taps per voxel).
    ``field=1``: the transform is a dense displacement field (the flow providers run on it).
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
        elif field == "sampling":
            try:
                value = canonical_sampling(value)
            except ValueError as e:
                raise ValueError(f"field 'sampling': {e}") from None
        elif field == "field":
            if value.lower() not in ("0", "1", "yes", "no", "true", "false"):
                raise ValueError(f"field 'field': expected 1 or 0 (a displacement field or not), got {value!r}")
            value = value.lower() in ("1", "yes", "true")
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
    volume = "D" in values
    if "Do" in values and not volume:
        raise ValueError("field 'Do': an output depth needs an input depth D= (a volumetric case)")
    values.setdefault("Ho", values["H"])
    values.setdefault("Wo", values["W"])
    values.setdefault("K", 1)
    values.setdefault("layout", "ncdhw" if volume else "nchw")
    values.setdefault("sampling", "bilinear")
    if volume:
        values.setdefault("Do", values["D"])
        values["layout"] = LAYOUTS_3D.get(values["layout"], values["layout"])
    elif values["layout"] in LAYOUTS_3D.values():
        raise ValueError(f"field 'layout': {values['layout']!r} is for a volumetric case (give D=)")
    if "name" not in values:
        v = values
        dims = [v["N"], v["C"]] + ([v["D"]] if volume else []) + [v["H"], v["W"]]
        out = ([v["Do"]] if volume else []) + [v["Ho"], v["Wo"]]
        values["name"] = ("x".join(map(str, dims)) + "-" + "x".join(map(str, out))
                          + (f"-K{v['K']}" if v["K"] > 1 else "") + ("-cl" if v["layout"] in CHANNELS_LAST else "")
                          + (f"-{v['sampling']}" if v["sampling"] != "bilinear" else "")
                          + ("-field" if v.get("field") else ""))
    return Case(note="custom", **values)


def element_size(dtype):
    return torch.empty(0, dtype=DTYPES[dtype]).element_size()


def io_bytes(case, dtype):
    """Input read once plus output written once, in ``dtype``."""
    return (case.input_numel + case.output_numel) * element_size(dtype)


PLUGIN_PARAMS = {"logpolar": 2, "lens": 4}  # the plugin families with cases: their parameters per transform


def param_bytes(case, family, basis_dim=0):
    """The transform's own tensors, float32: theta (2x3), h (3x3), or m (2xD) and the basis (D x Ho*Wo).

    A volume: theta (3x4), h (4x4: a 3-D homography, which no provider has), or m (3xD) and the basis
    (D x Do*Ho*Wo). A displacement field (family flow): the field, one float32 vector per output pixel."""
    NK = case.N * case.K
    nd = len(case.out_size)  # coordinates per sample: 2, or 3 for a volume
    if family == "affine":
        return NK * nd * (nd + 1) * 4
    if family == "projective":
        return NK * (nd + 1) ** 2 * 4
    if family == "flow":  # the displacement field itself, float32, one vector per output pixel
        return grid_bytes(case)
    if family in PLUGIN_PARAMS:  # a plugin family's theta
        return NK * PLUGIN_PARAMS[family] * 4
    return NK * nd * basis_dim * 4 + basis_dim * case.out_pixels * 4


def grid_bytes(case):
    """One explicit float32 sampling grid (N*K, Ho, Wo, 2), or (N*K, Do, Ho, Wo, 3) for a volume."""
    return case.N * case.K * case.out_pixels * len(case.out_size) * 4


def taps(case):
    """Input samples read per output pixel: 1 nearest, 4 bilinear, 16 bicubic; 8 trilinear (a volume)."""
    if case.sampling == "nearest":
        return 1
    if case.is_3d:
        return 8
    return 16 if case.sampling == "bicubic" else 4


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
    per_pixel = case.N * case.K * case.out_pixels
    need = (x * (2 + 2 * case.K) + 4 * case.input_numel + 2 * out
            + 2 * grid_bytes(case) + per_pixel * max(4, taps(case)) * (8 + 8 + 8 + 4))
    return int(math.ceil(need * 1.15))


def over_int32(case):
    return case.input_numel >= INT32_LIMIT or case.output_numel >= INT32_LIMIT
