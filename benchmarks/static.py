"""``stn-bench --static``: what the kernels cost on an H100/H200, read from their compiled code alone.

No GPU is needed. A worker process whose ``triton`` is the GPU machines' version (3.6.0 by default;
installed once into ``~/.cache/stn-triton/`` when the current environment has another) compiles every
kernel the launchers would launch for each case, through a fake driver that reports an sm_90 GPU
(:mod:`stn_triton.benchmarks._static_worker`). This module turns what it found into a report, per kernel:
registers, spills, shared memory, occupancy and what limits it, the SASS instruction mix, each loop's
body x trips; per case: the launches, a modelled issue time and the DRAM floor beside it
(:mod:`stn_triton.benchmarks.sass` says what the model assumes). JSON and markdown land in
``<out>/static/``. **A model, not a measurement.**
"""

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from . import sass
from .cases import DTYPES, NAMED, min_bytes
from .report import MIN_BYTES_RULE, _git

TRITON_VERSION = "3.6.0"  # what the GPU machines run: kernels must compile with it
TRITON_DIR_ENV = "STN_TRITON_STATIC_TRITON"  # a folder holding that triton package, to skip the install
FORMS = {"ours-affine": "affine", "ours-projective": "projective", "ours-basis": "basis", "ours-grid": "grid",
         "ours-flow": "flow", "ours-logpolar": "plugin:logpolar", "ours-lens": "plugin:lens"}
FAMILY = {"affine": "affine", "projective": "projective", "basis": "basis", "grid": "affine",
          "affine3d": "affine", "basis3d": "basis", "grid3d": "affine", "flow": "flow", "flow3d": "flow",
          "plugin:logpolar": "logpolar", "plugin:lens": "lens"}
# A volumetric case (5-D input) runs the 3-D op of each form: affine3d, basis3d (the same 19-row basis,
# now over Do*Ho*Wo voxels: a synthetic one, for the kernel's cost), grid3d; projective has none.
FORMS_3D = {"affine": "affine3d", "basis": "basis3d", "grid": "grid3d", "flow": "flow3d"}
NO_3D = {"projective": "st.projective_sample has no 3-D form"}
BASIS_DIM = 19  # the 4 x 4 thin plate spline of the benchmarks: 1, x, y and 16 radial terms
STEP_MODES = ("fwd", "bwd", "fwd+bwd", "bwd-det")
DISCLAIMER = ("A model, not a measurement: compiled for the target without a GPU; the issue time assumes "
              "every warp scheduler issues one instruction per clock and never stalls, so it is a lower "
              "bound that ignores memory latency, atomic throughput and tail effects.")


class StaticError(RuntimeError):
    """The compile-only run could not be made (no Triton of the wanted version, a worker failure)."""


# ---------------------------------------------------------------------------------------------------
# The Triton to compile with
# ---------------------------------------------------------------------------------------------------

def _cache_root():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stn-triton"


def _current_triton_version():
    try:
        import importlib.metadata as md

        return md.version("triton")
    except Exception:
        return None


def triton_path(version=TRITON_VERSION, quiet=False):
    """A folder to put first on the worker's ``sys.path`` so that it imports Triton ``version``,
    or None when the current environment already has that version.

    Installs ``triton==version`` (no dependencies) into ``~/.cache/stn-triton/triton-<version>-<python>-<machine>``
    once; ``$STN_TRITON_STATIC_TRITON`` names an existing folder instead.
    """
    given = os.environ.get(TRITON_DIR_ENV)
    if given:
        if not (Path(given) / "triton" / "__init__.py").is_file():
            raise StaticError(f"${TRITON_DIR_ENV}={given!r} holds no 'triton' package")
        return given
    if _current_triton_version() == version:
        return None
    tag = f"triton-{version}-py{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"
    target = _cache_root() / tag
    if (target / ".complete").is_file():
        return str(target)
    if not quiet:
        print(f"[static] installing triton=={version} (the GPU machines' version) into {target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tag + ".", dir=target.parent))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(tmp), f"triton=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise StaticError(f"could not install triton=={version} for the compile-only report "
                          f"({' '.join(cmd)} failed):\n{done.stderr.strip()[-2000:]}\n"
                          f"Install it somewhere yourself and point ${TRITON_DIR_ENV} at that folder.")
    (tmp / ".complete").touch()
    if target.exists():  # another process got there first
        subprocess.run(["rm", "-rf", str(tmp)])
    else:
        tmp.rename(target)
    return str(target)


# ---------------------------------------------------------------------------------------------------
# Jobs and the worker
# ---------------------------------------------------------------------------------------------------

VOLUME_CASES = ("vol-reg", "vol-feat-cl")
ALTERNATIVE_CASES = ("cub-k4", "feat-nchw", "feat-cl") + VOLUME_CASES  # where the model compares autotune candidates


def make_jobs(cases, dtypes, forms, modes):
    """One job per (case, dtype, form, mode): what the worker runs the launchers on; then, for the
    headline cases (affine form, fwd and bwd), one per autotune candidate (``choice``).

    A volumetric case's job names the 3-D form (``affine3d``, ...) and carries ``D``/``Do``; one the
    kernels cannot run (projective) carries ``skip``, the reason, and is reported, not compiled; a
    bicubic volume is tricubic."""
    try:
        from stn_triton.kernels.launch import TUNING
    except ImportError:  # a revision without autotuning
        TUNING = ()

    jobs = []
    for case in cases:
        for dtype in ([case.dtype] if case.dtype else dtypes):
            for form in forms:
                kind = "flow" if form == "flow" else (form if form.startswith("plugin:") else "matrix")
                if kind != getattr(case, "kind", "flow" if getattr(case, "field", False) else "matrix"):
                    continue  # field cases: the flow form only; a plugin family's case: its form only
                for mode in modes:
                    volume = getattr(case, "D", None) is not None
                    sampling = getattr(case, "sampling", "bilinear")
                    job = {"case": case.name, "N": case.N, "C": case.C, "D": getattr(case, "D", None), "H": case.H,
                           "W": case.W, "Do": getattr(case, "Do", None), "Ho": case.Ho, "Wo": case.Wo, "K": case.K,
                           "layout": case.layout, "dtype": dtype, "form": FORMS_3D.get(form, form) if volume else form,
                           "mode": mode, "basis_dim": BASIS_DIM, "sampling": sampling}
                    if volume and form in NO_3D:
                        job["skip"] = NO_3D[form]
                    jobs.append(job)
    for job in list(jobs):
        if (job["case"] in ALTERNATIVE_CASES and _is_named(job, job["case"]) and job["form"] in ("affine", "affine3d")
                and job["mode"] in ("fwd", "bwd") and "skip" not in job):
            jobs += [dict(job, choice=i) for i in range(len(TUNING))]
    return jobs


def _package_roots():
    """The folders the worker must import ``stn_triton`` (and with it ``stn_triton.benchmarks``) and
    ``transforms_registry`` from: this very code."""
    import stn_triton
    import transforms_registry

    roots = [str(Path(m.__file__).resolve().parent.parent) for m in (stn_triton, transforms_registry)]
    return list(dict.fromkeys(roots))


def compile_jobs(jobs, arch="sm_90", version=TRITON_VERSION, quiet=False):
    """Run the worker; returns its raw findings (launches per job, disassembly per kernel)."""
    extra = triton_path(version, quiet=quiet)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    roots = _package_roots()
    env["PYTHONPATH"] = os.pathsep.join(([extra] if extra else []) + roots
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # A compile cache of this checkout's own: Triton keys its cache on the source, not on its path, and
    # the loops are read through the line table's file names, which must be this checkout's files.
    tag = hashlib.sha1(os.pathsep.join(roots).encode()).hexdigest()[:12]
    env.setdefault("TRITON_CACHE_DIR", str(_cache_root() / "static-compile-cache" / f"{version}-{tag}"))
    with tempfile.TemporaryDirectory(prefix="stn-static-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"arch": sass.ARCHS[arch].capability, "jobs": jobs}))
        done = subprocess.run([sys.executable, "-m", "stn_triton.benchmarks._static_worker", str(spec), str(out)],
                              env=env, capture_output=True, text=True, cwd=tmp)
        if done.returncode != 0 or not out.is_file():
            raise StaticError(f"the compile-only worker failed (exit {done.returncode}):\n"
                              f"{(done.stdout + done.stderr).strip()[-4000:]}")
        raw = json.loads(out.read_text())
    if raw["triton"] != version:
        raise StaticError(f"the worker imported triton {raw['triton']}, not {version}")
    return raw


# ---------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------

def _variant(args):
    """The compile-time choices of a launch: its UPPER_CASE arguments (constexprs by convention)."""
    return {k: v for k, v in args.items() if k.isupper() and len(k) > 2}


def analyse_kernel(name, disasm, arch):
    funcs = sass.parse_nvdisasm(disasm["sass"])
    func = funcs.get(name) or next(iter(funcs.values()))
    instrs = sass.useful(func)
    loops = sass.name_loops(sass.find_loops(func, instrs), instrs)
    res = sass.parse_res_usage(disasm["res_usage"]).get(func.name, {"reg": 0, "stack": 0, "shared": 0, "local": 0})
    return {"name": func.name, "func": func, "instrs": instrs, "loops": loops, "res": res, "mix": sass.mix(instrs)}


def _launch_model(launch, kernel, arch):
    """Dynamic instructions per warp, programs and the modelled issue time of one launch."""
    names = dict(launch["args"])
    hints = launch.get("hints") or {}
    names["__trips__"] = hints.get("trips", {})
    loops = []
    for lp in kernel["loops"]:
        copy = sass.Loop(lp.start, lp.end, lp.source, lp.range_args)
        sass.eval_trips(copy, names)
        loops.append(copy)
    sass.split_unrolled(loops, kernel["instrs"])
    dyn = sass.dynamic_count(kernel["instrs"], loops)
    programs = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
    working = int(hints.get("programs_with_work", programs))
    idle = programs - working
    warp_instr = launch["num_warps"] * (working * dyn + idle * sass.prologue_to_exit(kernel["instrs"]))
    occ = sass.occupancy(kernel["res"]["reg"], launch["num_warps"], launch["shared"], arch)
    return {
        "kind": "triton", "kernel": kernel["name"], "hash": launch["hash"], "step": launch["step"],
        "variant": _variant(launch["args"]), "num_warps": launch["num_warps"], "grid": launch["grid"],
        "programs": programs, "programs_with_work": working,
        "registers": kernel["res"]["reg"], "stack_bytes": kernel["res"]["stack"],
        "local_instructions": kernel["mix"]["local"], "shared_bytes": launch["shared"],
        "occupancy": occ["occupancy"], "occupancy_limited_by": occ["limited_by"],
        "sass_instructions": kernel["mix"]["instructions"], "mix": kernel["mix"],
        "loops": [{"source": lp.source, "body": lp.size, "trips": lp.trips, "trips_note": lp.trips_note}
                  for lp in loops],
        "dynamic_instructions_per_warp": dyn, "warp_instructions": warp_instr,
        "issue_us": sass.issue_time_s(warp_instr, arch) * 1e6,
    }


def analyse(raw, arch="sm_90", jobs_cases=None):
    """Raw worker findings -> the report's rows, kernels and targets."""
    a = sass.ARCHS[arch]
    kernels = {}
    rows = []
    for res in raw["results"]:
        job = res["job"]
        row = {k: job.get(k) for k in ("case", "N", "C", "D", "H", "W", "Do", "Ho", "Wo", "K", "layout", "dtype",
                                       "form", "mode")}
        row["sampling"] = job.get("sampling", "bilinear")
        if "choice" in job:
            row["choice"] = job["choice"]
        if "skipped" in res:
            row.update(skipped=res["skipped"], launches=[])
            rows.append(row)
            continue
        if "error" in res:
            row.update(error=res["error"], launches=[])
            rows.append(row)
            continue
        launches = []
        for launch in res["launches"]:
            if launch["kind"] == "torch":
                launches.append({"kind": "torch", "op": launch["name"], "step": launch["step"],
                                 "bytes": launch["bytes"], "floor_us": launch["bytes"] / a.dram_bytes_per_s * 1e6})
                continue
            h = launch["hash"]
            if h not in kernels:
                kernels[h] = analyse_kernel(launch["name"], raw["kernels"][h], a)
            launches.append(_launch_model(launch, kernels[h], a))
        case = _case_of(job)
        floor = min_bytes(case, job["dtype"], job["mode"], FAMILY[job["form"]], BASIS_DIM) / a.dram_bytes_per_s * 1e6
        issue = sum(x["issue_us"] for x in launches if x["kind"] == "triton")
        torch_bytes = sum(x["bytes"] for x in launches if x["kind"] == "torch")
        row.update(launches=launches, n_launches=len(launches), issue_us=issue, floor_us=floor,
                   issue_over_floor=issue / floor if floor else None, torch_op_bytes=torch_bytes,
                   torch_op_floor_us=torch_bytes / a.dram_bytes_per_s * 1e6)
        rows.append(row)
    return rows, kernels


def _case_of(job):
    from .cases import Case

    return Case(job["case"], job["N"], job["C"], job["H"], job["W"], job["Ho"], job["Wo"], job["K"],
                dtype=job["dtype"], layout=job["layout"], sampling=job.get("sampling", "bilinear"),
                D=job.get("D"), Do=job.get("Do"))


def _is_named(row, name):  # a row or a job
    c = NAMED.get(name)
    return (c is not None and row["case"] == name and row["layout"] == c.layout
            and row.get("sampling", "bilinear") == c.sampling
            and (row["N"], row["C"], row["H"], row["W"], row["Ho"], row["Wo"], row["K"]) ==
            (c.N, c.C, c.H, c.W, c.Ho, c.Wo, c.K)
            and (row.get("D"), row.get("Do")) == (getattr(c, "D", None), getattr(c, "Do", None)))


def _done(r):
    """A row with launches to read: neither a compile error nor a skipped job."""
    return "error" not in r and "skipped" not in r


def default_rows(rows):
    """The rows of the launchers' own (default) launch shapes."""
    return [r for r in rows if "choice" not in r]


def alternatives(rows):
    """Each autotune candidate beside the default shape, for the headline cases: the model's case
    for the default (the first candidate). Candidates that collapse into another are dropped."""
    out = []
    for r in rows:
        if "choice" not in r or not _done(r):
            continue
        base = next((d for d in default_rows(rows) if _done(d) and all(
            d.get(k) == r.get(k) for k in ("case", "dtype", "form", "mode", "layout", "N", "C", "D", "H", "W", "Do",
                                           "Ho", "Wo", "K"))),
            None)
        main = [x for x in r["launches"] if x["kind"] == "triton"]
        if not main or base is None:
            continue
        x = main[-1]
        shape = (x["variant"].get("BLOCK_P"), x["num_warps"])
        if any(o["shape"] == shape and o["case"] == r["case"] and o["dtype"] == r["dtype"] and o["mode"] == r["mode"]
               for o in out):
            continue
        out.append({"case": r["case"], "dtype": r["dtype"], "mode": r["mode"], "shape": shape,
                    "kernel": x["kernel"], "registers": x["registers"], "occupancy": x["occupancy"],
                    "issue_us": r["issue_us"], "default_issue_us": base["issue_us"],
                    "is_default": r["choice"] == 0})
    for group in {(a["case"], a["dtype"], a["mode"]) for a in out}:
        cands = [a for a in out if (a["case"], a["dtype"], a["mode"]) == group]
        pick = model_pick(cands)
        for a in cands:
            a["model_pick"] = a is pick
    return out


MIN_OCCUPANCY = 0.25  # 16 warps per SM: about the loads in flight HBM3's latency needs
TIE = 0.03  # issue times within 3% are the model's noise: the higher occupancy wins


def model_pick(cands):
    """The model's choice among launch shapes: the least issue time among those keeping at least
    MIN_OCCUPANCY, where shapes within TIE of it count as equal and the highest occupancy among them wins."""
    live = [a for a in cands if a["occupancy"] >= MIN_OCCUPANCY] or cands
    best = min(a["issue_us"] for a in live)
    near = [a for a in live if a["issue_us"] <= best * (1 + TIE)]
    return max(near, key=lambda a: (a["occupancy"], -a["issue_us"]))


def check_targets(rows):
    """Issue 11's static targets. verdict: met, missed, or not in this run."""
    out = []
    ok = [r for r in default_rows(rows) if _done(r)]

    def add(target, found, met):
        verdict = "not in this run" if met is None else met if isinstance(met, str) else ("met" if met else "missed")
        out.append({"target": target, "found": found or "-", "verdict": verdict})

    def bwd_kernels(rs):
        return [x for r in rs for x in r["launches"] if x["kind"] == "triton" and x["step"] in ("bwd", "bwd-det")]

    ks = bwd_kernels(ok)
    fenced = sorted({x["kernel"] for x in ks if x["mix"]["fences"]})
    add("no fence in any backward kernel", f"{len(ks)} backward launches; with fences: {', '.join(fenced) or 'none'}",
        (not fenced) if ks else None)

    allk = [x for r in ok for x in r["launches"] if x["kind"] == "triton"]
    spill = sorted({x["kernel"] for x in allk if x["stack_bytes"] or x["local_instructions"]})
    add("no spills (no stack frame, no local-memory instructions)",
        f"{len({x['hash'] for x in allk})} kernels; spilling: {', '.join(spill) or 'none'}", (not spill) if allk else None)

    for dtype, strict in (("float32", True), ("bfloat16", False)):
        r = next((r for r in ok if _is_named(r, "cub-k4") and r["form"] == "affine" and r["mode"] == "fwd"
                  and r["dtype"] == dtype), None)
        text = r and f"{r['issue_us']:.0f} us issue vs {r['floor_us']:.0f} us floor ({r['issue_over_floor']:.2f}x)"
        if strict:
            add("CUB K=4 fp32 forward: modelled issue time <= DRAM floor", text,
                r and r["issue_over_floor"] <= 1.0)
        else:
            add("CUB K=4 bf16 forward: as close to its DRAM floor as the model allows", text,
                None if r is None else "reported")

    for dtype in ("float32", "bfloat16"):
        r = next((r for r in ok if _is_named(r, "cub-k4") and r["form"] == "affine" and r["mode"] == "bwd"
                  and r["dtype"] == dtype), None)
        add(f"CUB K=4 {dtype} backward: modelled issue time <= 2x DRAM floor",
            r and f"{r['issue_us']:.0f} us issue vs {r['floor_us']:.0f} us floor ({r['issue_over_floor']:.2f}x)",
            r and r["issue_over_floor"] <= 2.0)

    alts = alternatives(rows)
    for volumes in (False, True):
        groups = {(a["case"], a["dtype"], a["mode"]) for a in alts if (a["case"] in VOLUME_CASES) == volumes}
        off = sorted(f"{c} {d} {m}" for c, d, m in groups
                     if not any(a["model_pick"] and a["is_default"] for a in alts
                                if (a["case"], a["dtype"], a["mode"]) == (c, d, m)))
        found = f"{len(groups) - len(off)} of {len(groups)}" + (f"; not: {', '.join(off)}" if off else "")
        if not volumes:
            add("each autotune default is the model's pick (headline cases)", found, (not off) if groups else None)
        else:  # not a target the kernels were tuned for: what the 2-D launch rules give the volumes
            add("volumes: each autotune default is the model's pick", found, "reported" if groups else None)

    cl = [x for r in ok if _is_named(r, "feat-cl") for x in bwd_kernels([r])]
    worst = max(cl, key=lambda x: x["registers"], default=None)
    add("channels-last backward kernels: at most 96 registers",
        worst and f"most: {worst['registers']} ({worst['kernel']}, {worst['variant'].get('FORM', '')})",
        worst and worst["registers"] <= 96)
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def metadata(raw, arch, argv):
    commit = _git("rev-parse", "HEAD")
    return {
        "kind": "static (compile-only) report",
        "disclaimer": DISCLAIMER,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton": raw["triton"], "torch": raw["torch"], "arch": arch, "model": sass.ARCHS[arch].describe(),
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "command": " ".join(["stn-bench", *argv]),
    }


def _mix_text(m):
    def widths(d):
        return "+".join(f"{v}x{k}" for k, v in sorted(d.items())) or "0"

    atoms = ", ".join(f"{v} {k}" for k, v in sorted(m["atomics"].items())) or "0"
    return widths(m["global_loads"]), widths(m["global_stores"]), atoms


def _us(v):
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _loops_text(x):
    return "; ".join(f"{lp['body']} x {lp['trips']:g}" + ("?" if "counted once" in lp["trips_note"] else "")
                     for lp in x["loops"]) or "-"


def markdown(meta, rows, targets):
    lines = [f"# Compile-only kernel report: Triton {meta['triton']}, {meta['arch']}", "",
             f"**{meta['disclaimer']}**", "",
             f"- model: {meta['model']}",
             f"- commit `{meta['git_commit']}`" + (" (with uncommitted changes)" if meta["git_dirty"] else "")
             + f", {meta['timestamp_utc']}, torch {meta['torch']}",
             f"- command: `{meta['command']}`", "",
             "## Targets", "", "| target | found | verdict |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['found']} | {t['verdict']} |" for t in targets]
    lines += ["", "## Per case", "",
              "Modelled issue time of the Triton launches beside the DRAM floor of the mode's minimum bytes "
              f"({MIN_BYTES_RULE}); launches count the Triton kernels and the PyTorch operations "
              "that launch a kernel (fills, casts, sums, sorts), whose bytes are listed apart.", "",
              "| case | dtype | form | mode | launches | issue us | floor us | issue / floor | torch-op MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in default_rows(rows):
        if "error" in r:
            lines.append(f"| {r['case']} | {r['dtype']} | {r['form']} | {r['mode']} | compile error: "
                         f"{r['error'][:120]} | | | | |")
            continue
        if "skipped" in r:
            lines.append(f"| {r['case']} | {r['dtype']} | {r['form']} | {r['mode']} | skipped: {r['skipped']} "
                         "| | | | |")
            continue
        lines.append(f"| {r['case']} | {r['dtype']} | {r['form']} | {r['mode']} | {r['n_launches']} | "
                     f"{_us(r['issue_us'])} | {_us(r['floor_us'])} | {r['issue_over_floor']:.2f} | "
                     f"{r['torch_op_bytes'] / 1e6:.3g} |")
    alts = alternatives(rows)
    if alts:
        lines += ["", "## Autotune candidates (pixels per program, warps)", "",
                  "On CUDA the launchers time these once per problem class and keep the fastest; the default "
                  "(first) is what runs untuned, chosen by this model.", "",
                  f"The model's pick: the least issue time among shapes keeping at least {MIN_OCCUPANCY:.0%} "
                  f"occupancy, shapes within {TIE:.0%} of it counting as equal (the highest occupancy wins).", "",
                  "| case | dtype | mode | kernel | BLOCK_P, warps | regs | occ | issue us | vs default | model's pick |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for a in alts:
            lines.append(f"| {a['case']} | {a['dtype']} | {a['mode']} | {a['kernel']} | {a['shape'][0]}, {a['shape'][1]}"
                         f"{' (default)' if a['is_default'] else ''} | {a['registers']} | "
                         f"{100 * a['occupancy']:.0f}% | {_us(a['issue_us'])} | "
                         f"{a['issue_us'] / a['default_issue_us']:.2f}x | {'yes' if a['model_pick'] else ''} |")
    lines += ["", "## Per launch", "",
              "regs: registers per thread; occ: resident warps / 64 (limiter); SASS: static instructions; "
              "int %: integer ALU share; div: integer division sequences; loops: body instructions x trips "
              "(`?`: a data-dependent bound counted once); issue: modelled us for the launch.", "",
              "| case | dtype | form | step | kernel | variant | warps | regs | stack/local | occ | SASS | LDG | STG | "
              "atomics | fences | div | cvt | int % | loops | programs | issue us |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in default_rows(rows):
        if r["mode"] == "fwd+bwd":  # its launches are the fwd and bwd rows'
            continue
        for x in r.get("launches", []):
            if x["kind"] != "triton":
                continue
            m = x["mix"]
            ldg, stg, atoms = _mix_text(m)
            variant = " ".join(f"{k}={v}" for k, v in x["variant"].items())
            lines.append(
                f"| {r['case']} | {r['dtype']} | {r['form']} | {x['step']} | {x['kernel']} | {variant} | "
                f"{x['num_warps']} | {x['registers']} | {x['stack_bytes']}/{x['local_instructions']} | "
                f"{100 * x['occupancy']:.0f}% ({x['occupancy_limited_by']}) | {x['sass_instructions']} | {ldg} | {stg} | "
                f"{atoms} | {m['fences']} | {m['int_division_sequences']} | {m['conversion']} | "
                f"{100 * m['integer'] / max(m['instructions'], 1):.0f} | {_loops_text(x)} | "
                f"{x['programs_with_work']}/{x['programs']} | {_us(x['issue_us'])} |")
    return "\n".join(lines) + "\n"


def _json_rows(rows):
    return [{k: v for k, v in r.items()} for r in rows]


def write(out_dir, meta, rows, targets):
    out = Path(out_dir) / "static"
    out.mkdir(parents=True, exist_ok=True)
    stamp = meta["timestamp_utc"].replace("-", "").replace(":", "")
    stem = out / f"{stamp}-triton{meta['triton']}-{meta['arch'].replace('_', '')}"
    paths = {"json": stem.with_name(stem.name + ".json"), "md": stem.with_name(stem.name + ".md")}
    paths["json"].write_text(json.dumps({"metadata": meta, "targets": targets, "rows": _json_rows(default_rows(rows)),
                                         "autotune_candidates": alternatives(rows)}, indent=1) + "\n")
    paths["md"].write_text(markdown(meta, rows, targets))
    return paths


def run(cases, dtypes, forms, modes, arch="sm_90", version=TRITON_VERSION, argv=(), quiet=False):
    """Compile, analyse; returns (meta, rows, targets)."""
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {d!r}")
    jobs = make_jobs(cases, dtypes, forms, modes)
    raw = compile_jobs(jobs, arch, version, quiet=quiet)
    rows, _ = analyse(raw, arch)
    return metadata(raw, arch, list(argv)), rows, check_targets(rows)
