"""Reading a compiled kernel without running it: SASS instruction mix, loops, resources, occupancy,
and a modelled issue time.

Everything here works on text (``nvdisasm -c -g`` output and ``cuobjdump -res-usage``) and plain
numbers, so it is testable anywhere. It is a *model*: a lower bound on the time the warp schedulers
need to issue a kernel's instructions, assuming every scheduler issues one warp-instruction per clock
and never stalls. It ignores memory latency, atomics' throughput at L2, bank conflicts and tail
effects; it says whether a kernel can possibly reach its DRAM floor, not that it will.

.. math::

    t_{issue} = \\frac{\\sum_{launches} \\text{programs} \\cdot \\text{warps per program} \\cdot
                       n_{dyn}}{\\text{SMs} \\cdot \\text{schedulers per SM} \\cdot f_{clock}}, \\qquad
    n_{dyn} = \\sum_{i} \\prod_{\\text{loops } L \\ni i} \\text{trips}(L)

where the sum runs over the kernel's SASS instructions ``i`` (NOPs and the closing self-branch
excluded) and a loop's trip count comes from the source loop it compiles (found through the line
table) evaluated with the launch's arguments.
"""

import ast
import functools
import math
import re
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------------
# Machine models (datasheet numbers; what the model assumes, never measured here)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    sms: int
    clock_hz: float  # the clock the model issues at (conservative: below the maximum boost)
    schedulers: int = 4  # warp schedulers per SM, one warp-instruction each per clock
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of this many
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_block: int = 1024
    dram_bytes_per_s: float = 3.0e12  # the floor the targets are stated against

    def describe(self):
        return (f"{self.name}: {self.sms} SMs x {self.schedulers} schedulers x 1 warp-instruction/clock at "
                f"{self.clock_hz / 1e9:.3f} GHz; DRAM floor at {self.dram_bytes_per_s / 1e12:.1f} TB/s")


ARCHS = {
    # H100 SXM5 / H200: 132 SMs; 1.755 GHz is below both cards' maximum boost (1.98 GHz)
    "sm_90": Arch("sm_90 (H100/H200 SXM)", 90, sms=132, clock_hz=1.755e9),
    # A100 SXM4: 108 SMs at 1.41 GHz boost, 164 KB shared memory per SM, ~2.0 TB/s HBM2e
    "sm_80": Arch("sm_80 (A100 SXM)", 80, sms=108, clock_hz=1.41e9, smem_per_sm=164 * 1024,
                  dram_bytes_per_s=2.0e12),
}


# ---------------------------------------------------------------------------------------------------
# Parsing nvdisasm output
# ---------------------------------------------------------------------------------------------------

_LINE_INFO = re.compile(r'//## File "(?P<file>[^"]+)", line (?P<line>\d+)')
_INSTR = re.compile(r"^\s*/\*(?P<addr>[0-9a-f]+)\*/\s+(?P<body>.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(?P<label>\.L_x_\d+):")
_TARGET = re.compile(r"`\((?P<label>\.L_x_\d+)\)")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")


@dataclass
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str
    predicated: bool
    file: str = None
    line: int = None
    target: str = None  # branch target label

    @property
    def base(self):
        return self.opcode.split(".")[0]


@dataclass
class Function:
    name: str
    instrs: list  # [Instr]
    labels: dict  # label -> addr


def parse_nvdisasm(text):
    """``nvdisasm -c -g`` text -> {function name: Function}."""
    functions = {}
    current = None
    file = line = None
    for raw in text.splitlines():
        s = raw.strip()
        m = re.match(r"^\.text\.(?P<name>[\w$.]+):$", s)
        if m:
            current = Function(m.group("name"), [], {})
            functions[current.name] = current
            file = line = None
            continue
        if current is None:
            continue
        m = _LINE_INFO.search(s)
        if m:
            file, line = m.group("file"), int(m.group("line"))
            continue
        m = _LABEL.match(s)
        if m:
            current.labels[m.group("label")] = None  # filled with the next instruction's address
            current._pending = getattr(current, "_pending", []) + [m.group("label")]
            continue
        m = _INSTR.match(raw)
        if not m:
            continue
        addr = int(m.group("addr"), 16)
        body = m.group("body").rstrip(";").strip()
        predicated = bool(_PRED.match(body))
        body = _PRED.sub("", body)
        opcode, _, operands = body.partition(" ")
        t = _TARGET.search(operands)
        current.instrs.append(Instr(addr, opcode, operands.strip(), predicated, file, line,
                                    t.group("label") if t else None))
        for lab in getattr(current, "_pending", []):
            current.labels[lab] = addr
        current._pending = []
    for f in functions.values():
        for lab in getattr(f, "_pending", []):  # a label after the last instruction
            f.labels[lab] = (f.instrs[-1].addr + 16) if f.instrs else 0
        f.__dict__.pop("_pending", None)
    return functions


def useful(func):
    """A function's instructions without padding: NOPs and the closing ``BRA`` to itself."""
    return [i for i in func.instrs
            if i.base != "NOP" and not (i.base == "BRA" and i.target is not None
                                        and func.labels.get(i.target) == i.addr)]


# ---------------------------------------------------------------------------------------------------
# Instruction mix
# ---------------------------------------------------------------------------------------------------

_INT_OPS = {"IMAD", "IADD3", "IADD", "IADD32I", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IMNMX",
            "IABS", "VIADD", "VIMNMX", "SEL", "IMUL", "ISCADD", "SGXT", "BMSK", "POPC", "FLO", "BREV", "PRMT",
            "UIMAD", "UIADD3", "ULEA", "USHF", "ULOP3", "UISETP", "USEL", "UPRMT", "USGXT", "UFLO", "UPOPC",
            "UBMSK", "UIABS", "UIMNMX", "UVIADD"}
_FLOAT_OPS = {"FFMA", "FADD", "FMUL", "FSETP", "FMNMX", "FRND", "FSEL", "MUFU", "FCHK", "FSET", "FSWZADD",
              "HADD2", "HFMA2", "HMUL2", "HSETP2", "HMNMX2", "DADD", "DFMA", "DMUL", "DSETP"}
_CONVERT_OPS = {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "I2I", "I2IP", "FRND"}
_FENCE_OPS = {"MEMBAR", "ERRBAR", "CGAERRBAR", "CCTL", "FENCE", "CCTLL"}
_ATOMIC_OPS = {"RED", "REDG", "ATOM", "ATOMG", "REDAS", "ATOMS"}
_CONTROL_OPS = {"BRA", "EXIT", "BSSY", "BSYNC", "WARPSYNC", "CALL", "RET", "BREAK", "BPT", "JMP", "YIELD"}


def _width(opcode):
    """Access width in bytes of a load/store/atomic opcode."""
    mods = opcode.split(".")[1:]
    for m, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return w
    return 4


def _atomic_kind(i):
    """e.g. 'RED.ADD.F32', 'RED.ADD.BF16x2', 'ATOMG.CAS' (a compare-and-swap retry loop)."""
    mods = i.opcode.split(".")[1:]
    op = next((m for m in mods if m in ("ADD", "MIN", "MAX", "CAS", "EXCH", "AND", "OR", "XOR", "INC", "DEC")), "?")
    ty = next((m for m in mods if re.match(r"^(F32|F64|F16x2|BF16x2|F16|BF16|S32|U32|64|U64|F32x\d|.*x\d)$", m)), "")
    kind = f"{i.base}.{op}" + (f".{ty}" if ty else "")
    vec = next((m for m in mods if re.match(r"^V\d$", m)), None)
    return kind + (f".{vec}" if vec else "")


def is_int_division_marker(i):
    """An integer division sequence starts with a reciprocal of the divisor as a float: ``I2F.RP``
    (32-bit, inlined, ~20-30 instructions) or ``I2F.U64.RP`` (64-bit, usually a called routine)."""
    return i.base == "I2F" and "RP" in i.opcode.split(".")


def mix(instrs):
    """Instruction mix of a list of (useful) instructions: counts by class and detail."""
    out = {
        "instructions": len(instrs),
        "integer": 0, "float": 0, "conversion": 0, "control": 0, "other": 0,
        "global_loads": {}, "global_stores": {}, "shared": 0, "local": 0, "constant_loads": 0,
        "atomics": {}, "fences": 0, "int_division_sequences": 0, "calls": 0,
    }
    for i in instrs:
        b = i.base
        if b == "LDG":
            key = f"{_width(i.opcode)}B"
            out["global_loads"][key] = out["global_loads"].get(key, 0) + 1
        elif b == "STG":
            key = f"{_width(i.opcode)}B"
            out["global_stores"][key] = out["global_stores"].get(key, 0) + 1
        elif b in ("LDS", "STS", "LDSM", "STSM"):
            out["shared"] += 1
        elif b in ("LDL", "STL"):
            out["local"] += 1
        elif b in ("LDC", "ULDC"):
            out["constant_loads"] += 1
        elif b in _ATOMIC_OPS:
            k = _atomic_kind(i)
            out["atomics"][k] = out["atomics"].get(k, 0) + 1
        elif b in _FENCE_OPS:
            out["fences"] += 1
        elif b in _CONVERT_OPS:
            out["conversion"] += 1
        elif b in _INT_OPS:
            out["integer"] += 1
        elif b in _FLOAT_OPS:
            out["float"] += 1
        elif b in _CONTROL_OPS:
            out["control"] += 1
            out["calls"] += b == "CALL"
        else:
            out["other"] += 1
        if is_int_division_marker(i):
            out["int_division_sequences"] += 1
    return out


# ---------------------------------------------------------------------------------------------------
# Loops: back-edges in the SASS, named by the source loop the line table points at
# ---------------------------------------------------------------------------------------------------

@dataclass
class Loop:
    start: int  # index of the first instruction of the body (the back-edge's target)
    end: int  # index of the back-edge branch (inclusive)
    source: str = None  # "file:line for ... in range(...)", when found
    range_args: list = None  # the range() argument expressions, as source text
    trips: float = None
    trips_note: str = ""
    children: list = field(default_factory=list)
    source_key: tuple = None

    @property
    def size(self):
        return self.end - self.start + 1


def find_loops(func, instrs):
    """Back-edges (a branch to an earlier address) -> loops, as index ranges into ``instrs``."""
    index = {i.addr: n for n, i in enumerate(instrs)}
    loops = []
    for n, i in enumerate(instrs):
        if i.base != "BRA" or i.target is None:
            continue
        addr = func.labels.get(i.target)
        if addr is None or addr > i.addr or addr not in index:
            continue
        loops.append(Loop(index[addr], n))
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    return loops


def _is_static_range(call):
    """``tl.static_range(...)`` (or ``static_range``): unrolled by Triton's front end, never a SASS loop."""
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "static_range") or (isinstance(f, ast.Name)
                                                                           and f.id == "static_range")


@functools.lru_cache(maxsize=64)
def _parsed(path):
    """(``for`` nodes, constexpr names) of a source file: {line of a ``for`` statement over a run-time
    range: (range argument texts, last line of its body)}, and the names annotated ``tl.constexpr``
    (parameters and locals): bounds made of them are compile-time constants."""
    try:
        with open(path) as f:
            src = f.read()
    except OSError:
        return {}, frozenset()
    out, consts = {}, set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and not _is_static_range(node.iter):
            args = [ast.get_source_segment(src, a) for a in node.iter.args]
            out[node.lineno] = (args, node.end_lineno)
        ann = getattr(node, "annotation", None)
        if ann is not None and ast.get_source_segment(src, ann) in ("tl.constexpr", "constexpr"):
            name = node.arg if isinstance(node, ast.arg) else getattr(getattr(node, "target", None), "id", None)
            if name:
                consts.add(name)
    return out, frozenset(consts)


def _for_nodes(path):
    """{line of a ``for`` statement: (range argument texts, last line of its body)} of a source file
    (``tl.static_range`` loops left out: Triton unrolls them before the compiler sees a loop)."""
    return _parsed(path)[0]


def _innermost_for(path, line):
    """The line of the innermost ``for`` statement of ``path`` whose extent holds ``line``, or None."""
    best = None
    for start, (_, end) in _for_nodes(path).items():
        if start <= line <= end and (best is None or start > best):
            best = start
    return best


def _constant_trips(path, line):
    """Whether the ``for`` at ``path:line`` has compile-time bounds (``range(0, 4)``, or made of names
    annotated ``tl.constexpr``: ``range(0, NT ** (NDIM - 1))``): one the compiler may unroll."""
    args, _ = _for_nodes(path)[line]
    consts = _parsed(path)[1]

    def constant(text):
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError:
            return False
        return all(n.id in consts for n in ast.walk(tree) if isinstance(n, ast.Name))

    return all(constant(a) for a in args)


def _encloses(path, outer, inner):
    """Whether the ``for`` at line ``outer`` of ``path`` holds the one at line ``inner``."""
    _, end = _for_nodes(path)[outer]
    return outer < inner <= end


def name_loops(loops, instrs):
    """Attach each SASS loop to the ``for`` statement it compiles: the innermost ``for`` that holds the
    most of its instructions' source lines (through the line table), not counting the loops nested in
    it, which are named first.

    One exception: a ``for`` with literal bounds (``range(0, 4)``) inside another ``for`` that the loop's
    instructions also point at is not the name of a loop that no other loop encloses: the compiler
    unrolled it inside the enclosing one (whose own lines may be fewer), which is then the loop."""
    for lp in sorted(loops, key=lambda lp: lp.size):
        nested = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end]
        enclosed = any(o is not lp and o.start <= lp.start and lp.end <= o.end for o in loops)
        lp.children = nested
        inner = {n for o in nested for n in range(o.start, o.end + 1)}
        claimed = {o.source_key for o in nested if o.source_key}
        votes = {}
        for n in range(lp.start, lp.end + 1):
            i = instrs[n]
            if n in inner or i.file is None:
                continue
            start = _innermost_for(i.file, i.line)
            if start is not None and (i.file, start) not in claimed:
                votes[(i.file, start)] = votes.get((i.file, start), 0) + 1
        if not enclosed:
            unrolled = [(path, line) for path, line in votes if _constant_trips(path, line) and any(
                p == path and _encloses(path, other, line) for p, other in votes)]
            votes = {k: v for k, v in votes.items() if k not in unrolled} or votes
        if votes:
            (path, line), _ = max(votes.items(), key=lambda kv: kv[1])
            args, _ = _for_nodes(path)[line]
            lp.source_key = (path, line)
            lp.source = f"{path.rsplit('/', 1)[-1]}:{line} range({', '.join(args)})"
            lp.range_args = args
    return loops


def eval_trips(loop, names):
    """Trip count of ``range(*args)`` evaluated with the launch's argument values ``names``."""
    if loop.range_args is None:
        loop.trips, loop.trips_note = 1, "source loop not found: counted once"
        return
    try:
        vals = [int(eval(a, {"__builtins__": {}}, dict(names))) for a in loop.range_args]  # noqa: S307
        loop.trips = max(0, len(range(*vals)))
        loop.trips_note = "from the launch's arguments"
    except Exception:  # a data-dependent bound (e.g. the most contributions any pixel gets)
        hint = names.get("__trips__", {}).get(", ".join(loop.range_args))
        if hint is not None:
            loop.trips, loop.trips_note = hint, "estimated from the case's geometry"
        else:
            loop.trips, loop.trips_note = 1, "data-dependent bound: counted once"


_PER_TRIP = ("LDG", "FFMA", "FMUL", "FADD")  # the work one trip of a loop repeats: global loads, float arithmetic


def _trip_work(loop, loops, instrs):
    """Global loads and floating-point instructions of ``loop``'s own body (not of loops nested in it)."""
    inner = {n for o in loops if o is not loop and loop.start <= o.start and o.end <= loop.end
             for n in range(o.start, o.end + 1)}
    return sum(1 for n in range(loop.start, loop.end + 1) if n not in inner and instrs[n].base in _PER_TRIP)


def split_unrolled(loops, instrs):
    """Trips of a loop the compiler unrolled (after :func:`eval_trips`).

    A ``for`` with a run-time bound unrolled u times compiles to two sibling SASS loops named by the same
    ``for``: the unrolled body and a remainder loop of one trip's body. Both were given the source loop's
    trips; they run ``trips // u`` and ``trips % u`` times. u is the ratio of their per-trip work (global
    loads and float arithmetic), taken only when it is a whole number >= 2 within 10%: two copies of one
    loop (an inlined function called twice) have a ratio near 1 and keep their trips."""
    by_source = {}
    for lp in loops:
        if lp.source and lp.trips_note == "from the launch's arguments":
            by_source.setdefault(lp.source, []).append(lp)
    for group in by_source.values():
        if len(group) != 2:
            continue
        main, rest = sorted(group, key=lambda lp: -lp.size)
        if main.start <= rest.start <= main.end or rest.start <= main.start <= rest.end:  # nested, not siblings
            continue
        wm, wr = _trip_work(main, loops, instrs), _trip_work(rest, loops, instrs)
        u = round(wm / wr) if wr else 0
        if u < 2 or abs(wm - u * wr) > 0.1 * wm:
            continue
        t = int(main.trips)
        main.trips, rest.trips = t // u, t % u
        main.trips_note = rest.trips_note = f"unrolled x{u}: {t} trips = {u} x {t // u} + {t % u} (remainder loop)"


def dynamic_count(instrs, loops):
    """Instructions one warp issues: each instruction times the trips of every loop around it.

    A loop whose compiler-rotated body runs ``trips`` times is charged ``trips`` times its body (the
    peeled first trip, if any, is already counted in the straight-line code, so this slightly
    overcounts)."""
    mult = [1.0] * len(instrs)
    for lp in loops:
        t = lp.trips if lp.trips is not None else 1
        for n in range(lp.start, lp.end + 1):
            mult[n] *= max(t, 0)
    return sum(mult)


def prologue_to_exit(instrs):
    """Instructions up to the first EXIT: what a program that returns early issues."""
    for n, i in enumerate(instrs):
        if i.base == "EXIT":
            return n + 1
    return len(instrs)


# ---------------------------------------------------------------------------------------------------
# Resources and occupancy
# ---------------------------------------------------------------------------------------------------

_RES = re.compile(r"Function (?P<name>[\w$.]+):\s*REG:(?P<reg>\d+)\s+STACK:(?P<stack>\d+)\s+SHARED:(?P<shared>\d+)"
                  r"\s+LOCAL:(?P<local>\d+)")


def parse_res_usage(text):
    """``cuobjdump -res-usage`` -> {function: {regs, stack, shared, local}}."""
    out = {}
    for m in _RES.finditer(text):
        out[m.group("name")] = {k: int(m.group(k)) for k in ("reg", "stack", "shared", "local")}
    return out


def occupancy(regs, num_warps, shared_bytes, arch):
    """Resident warps per SM over the maximum, and what limits it (the CUDA occupancy calculator's rules)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / arch.reg_alloc_unit) * arch.reg_alloc_unit
    warps_by_regs = arch.regs_per_sm // regs_per_warp
    limits = {
        "registers": warps_by_regs // num_warps,
        "warps": arch.max_warps_per_sm // num_warps,
        "blocks": arch.max_blocks_per_sm,
        "shared memory": (arch.smem_per_sm // (shared_bytes + arch.smem_reserved_per_block)),
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    warps = blocks * num_warps
    return {"blocks_per_sm": blocks, "warps_per_sm": warps, "occupancy": warps / arch.max_warps_per_sm,
            "limited_by": limiter}


def issue_time_s(warp_instructions, arch):
    """Seconds for every scheduler of every SM to issue ``warp_instructions`` (no stalls)."""
    return warp_instructions / (arch.sms * arch.schedulers * arch.clock_hz)
