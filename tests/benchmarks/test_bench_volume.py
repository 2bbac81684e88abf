"""Volumetric (5-D) benchmark cases: the named volumes' shapes and bytes, ``D=``/``Do=`` in a case spec,
what the providers compute on a volume (kornia's ``warp_affine3d`` with converted theta included),
the rows of a CPU run (skipped rows for the providers without a 3-D form, and for PyTorch's where it
has no tricubic), and the compile-only report of the 3-D kernels (Triton 3.6, sm_90).

Under the test suite ``TRITON_INTERPRET=1`` is set: our providers run the Triton kernels in the
interpreter, so every volume here is tiny.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from stn_triton import reference
from stn_triton.benchmarks import cli, report, runner, static
from stn_triton.benchmarks.cases import (NAMED, grid_bytes, io_bytes, memory_estimate, min_bytes, over_int32,
                                         param_bytes, parse_case_spec)
from stn_triton.benchmarks.providers import PROVIDERS, draw_params, repeat_k, theta_to_kornia3d
from stn_triton.benchmarks.runner import RunConfig
from stn_triton.kernels import launch

CPU = torch.device("cpu")
HAS_KORNIA = PROVIDERS["kornia"].available()[0]


# --- cases ---------------------------------------------------------------------------------------------------

def test_named_volumes():
    reg, feat = NAMED["vol-reg"], NAMED["vol-feat-cl"]
    assert reg.is_3d and feat.is_3d and not NAMED["cub-k4"].is_3d
    assert (reg.N, reg.C, reg.D, reg.H, reg.W, reg.Do, reg.Ho, reg.Wo, reg.K) == (2, 3, 160, 192, 224, 160, 192, 224, 1)
    assert reg.layout == "ncdhw" and feat.layout == "channels_last_3d" and feat.channels_last
    assert (feat.N, feat.C, feat.in_size, feat.out_size) == (2, 32, (96, 96, 96), (96, 96, 96))
    assert reg.shape == "2x3x160x192x224->160x192x224" and feat.shape == "2x32x96x96x96->96x96x96"
    voxels = 160 * 192 * 224
    assert reg.input_numel == reg.output_numel == 2 * 3 * voxels == 41_287_680
    assert feat.input_numel == 2 * 32 * 96**3 == 56_623_104
    assert not over_int32(reg) and not over_int32(feat)
    assert io_bytes(reg, "bfloat16") == 2 * 2 * 3 * voxels * 2
    assert not reg.launch_bound("float32") and reg.scaled(1 / 16).N == 1


def test_volume_bytes_by_hand():
    c = parse_case_spec("N=2,C=3,D=4,H=5,W=6,Do=2,Ho=3,Wo=4,K=2")
    x, out = 2 * 3 * 120 * 4, 2 * 2 * 3 * 24 * 4  # float32 bytes: input 4x5x6, output 2x3x4 voxels, K = 2
    theta = 2 * 2 * 12 * 4  # 3x4 float32 per transform
    assert param_bytes(c, "affine") == theta
    assert min_bytes(c, "float32", "fwd", "affine") == x + out + theta
    assert min_bytes(c, "float32", "bwd", "affine") == out + 2 * x + 2 * theta
    assert min_bytes(c, "float32", "fwd+bwd", "affine") == 2 * out + 3 * x + 3 * theta
    assert min_bytes(c, "bfloat16", "fwd", "affine") == (x + out) // 2 + theta
    assert grid_bytes(c) == 2 * 2 * 24 * 3 * 4  # (N*K, Do, Ho, Wo, 3) float32
    assert param_bytes(c, "basis", 19) == 2 * 2 * 3 * 19 * 4 + 19 * 24 * 4  # m (3 x D) and the basis (D x voxels)
    assert memory_estimate(c, "float32") > 2 * x + out


def test_case_spec_volume():
    c = parse_case_spec("N=1,C=2,D=4,H=5,W=6,Do=3,layout=cl,K=2")
    assert (c.D, c.Do, c.H, c.Ho, c.W, c.Wo, c.layout) == (4, 3, 5, 5, 6, 6, "channels_last_3d")
    assert c.name == "1x2x4x5x6-3x5x6-K2-cl"
    c = parse_case_spec("n=1,c=2,d=4,h=5,w=6")  # case-insensitive; Do defaults to D, the layout to ncdhw
    assert (c.D, c.Do, c.layout, c.name) == (4, 4, "ncdhw", "1x2x4x5x6-4x5x6")
    assert parse_case_spec("N=1,C=2,H=5,W=6").D is None
    assert parse_case_spec("N=1,C=2,D=3,H=5,W=6,sampling=cubic").sampling == "bicubic"  # tricubic
    for spec, words in [("N=1,C=2,H=5,W=6,Do=3", "'Do'"), ("N=1,C=2,H=5,W=6,layout=cl3d", "'layout'"),
                        ("N=1,C=2,D=0,H=5,W=6", "'D'")]:
        with pytest.raises(ValueError, match=words):
            parse_case_spec(spec)


# --- providers ------------------------------------------------------------------------------------------------

def test_repeat_k_keeps_channels_last_3d():
    x = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    r = repeat_k(x, 3)
    assert r.shape == (6, 3, 4, 5, 6) and r.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(r[4], x[1], rtol=0, atol=0)


@pytest.mark.skipif(not HAS_KORNIA, reason="kornia not installed")
@pytest.mark.parametrize("in_size, out_size", [((5, 6, 7), (5, 6, 7)), ((5, 6, 7), (4, 3, 9))])
def test_theta_to_kornia3d_in_float64(in_size, out_size):
    """kornia's warp_affine3d with the converted matrix samples where F.affine_grid + F.grid_sample do."""
    from kornia.geometry.transform import warp_affine3d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, *in_size, generator=g, dtype=torch.float64)
    theta = torch.eye(3, 4, dtype=torch.float64) + 0.1 * torch.randn(3, 3, 4, generator=g, dtype=torch.float64)
    M = theta_to_kornia3d(theta, in_size, out_size)
    for mode in ("bilinear", "nearest"):
        ref = F.grid_sample(x, F.affine_grid(theta, (3, 2, *out_size), align_corners=False), mode=mode,
                            align_corners=False)
        out = warp_affine3d(x, M, out_size, flags=mode, align_corners=False)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", ["N=2,C=2,D=4,H=5,W=6,Do=3,Ho=4,Wo=5,K=2,layout=cl", "N=1,C=3,D=3,H=4,W=5"],
                         ids=["K2-channels-last-3d", "K1-ncdhw"])
def test_volume_providers_compute_the_same_transform(spec):
    case = parse_case_spec(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.N, case.C, *case.in_size, generator=g)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    (theta,) = draw_params("affine", case, CPU, g)
    assert theta.shape == ((case.N, 3, 4) if case.K == 1 else (case.N, case.K, 3, 4))
    names = ["ours-affine", "ours-grid", "eager", "eager-ac"] + (["kornia"] if HAS_KORNIA else [])
    outs = {n: PROVIDERS[n].build(case, "float32", CPU)(x, PROVIDERS[n].leaves([theta], x, case)) for n in names}
    lead = (case.N,) if case.K == 1 else (case.N, case.K)
    for name, out in outs.items():
        assert out.shape == (*lead, case.C, *case.out_size), name
        if name != "eager-ac":  # align_corners=True samples elsewhere
            torch.testing.assert_close(out, outs["eager"], rtol=1e-4, atol=1e-4, msg=name)
    for p in PROVIDERS.values():
        p.reset()


def test_tricubic_providers_compute_the_same_transform():
    """Our fused and explicit-grid providers on a tricubic volume: the float64 reference's transform."""
    case = parse_case_spec("N=1,C=2,D=3,H=4,W=5,Do=2,Ho=3,Wo=4,K=2,sampling=bicubic")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.N, case.C, *case.in_size, generator=g)
    (theta,) = draw_params("affine", case, CPU, g)
    want = reference.form_sample("affine3d", x.double(), [theta.double()], case.out_size, "bicubic", "zeros", False)
    for name in ("ours-affine", "ours-grid"):
        out = PROVIDERS[name].build(case, "float32", CPU)(x, PROVIDERS[name].leaves([theta], x, case))
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4, msg=name)
        PROVIDERS[name].reset()


def test_cpu_run_of_a_volume(tmp_path):
    """A scaled-down volume through the runner: rows for the providers with a 3-D form, skipped rows
    (with the reason) for the others; of the tricubic copy, rows for ours and skipped rows for
    PyTorch's where it has no tricubic."""
    case = parse_case_spec("N=1,C=2,D=3,H=4,W=5,Do=2,Ho=3,Wo=4,name=tiny-vol")
    names = ["ours-affine", "ours-projective", "ours-basis", "eager", "kornia"]
    cfg = RunConfig(cases=[case, case.sampled("bicubic")], providers=names, modes=["fwd"], dtypes=["float32"],
                    device=CPU, warmup_ms=1, rep_ms=2, progress=False)
    rows, copy = runner.run(cfg)
    status = {(r["case"], r["provider"]): r["status"] for r in rows}
    assert status[("tiny-vol", "ours-affine")] == status[("tiny-vol", "eager")] == "ok"
    assert status[("tiny-vol", "kornia")] == ("ok" if HAS_KORNIA else "skipped: kornia not installed")
    assert status[("tiny-vol", "ours-projective")] == "skipped: st.projective_sample has no 3-D form"
    assert status[("tiny-vol", "ours-basis")].startswith("skipped: the benchmark's basis is the 2-D")
    assert status[("tiny-vol-bicubic", "ours-affine")] == "ok"
    assert status[("tiny-vol-bicubic", "ours-projective")] == status[("tiny-vol", "ours-projective")]
    if not reference._torch_has_tricubic():
        assert status[("tiny-vol-bicubic", "eager")] == f"skipped: this PyTorch ({torch.__version__}) has no " \
                                                         "bicubic for 5-D input"
        tri = next(r for r in rows if (r["case"], r["provider"]) == ("tiny-vol-bicubic", "ours-affine"))
        assert tri["median_ms"] > 0 and tri["speedup_vs_eager"] is None
    r = next(r for r in rows if (r["case"], r["provider"]) == ("tiny-vol", "ours-affine"))
    assert (r["D"], r["Do"], r["layout"]) == (3, 2, "ncdhw") and r["min_bytes"] == min_bytes(case, "float32", "fwd",
                                                                                                 "affine")
    assert r["speedup_vs_eager"] > 0
    meta = report.metadata(cfg, ["--test"], copy)
    md = report.markdown(meta, rows, report.check_targets(rows, on_gpu=False))
    assert "| tiny-vol | 1x2x3x4x5 -> 2x3x4 | 1 | ncdhw | bilinear |" in md


# --- the compile-only report ----------------------------------------------------------------------------------

def test_static_jobs_of_a_volume():
    jobs = static.make_jobs([NAMED["vol-reg"], NAMED["vol-reg"].sampled("bicubic")],
                            ["float32"], ["affine", "projective", "grid"], ["fwd"])
    got = [(j["case"], j["form"], j.get("skip")) for j in jobs if "choice" not in j]
    assert got == [("vol-reg", "affine3d", None), ("vol-reg", "projective", "st.projective_sample has no 3-D form"),
                   ("vol-reg", "grid3d", None), ("vol-reg-bicubic", "affine3d", None),
                   ("vol-reg-bicubic", "projective", "st.projective_sample has no 3-D form"),
                   ("vol-reg-bicubic", "grid3d", None)]
    assert (jobs[0]["D"], jobs[0]["Do"]) == (160, 160)
    assert [j["choice"] for j in jobs if "choice" in j] == list(range(len(launch.TUNING)))  # vol-reg affine fwd


def test_static_hints_answer_for_the_volume_kernels():
    args = {"LOG2_TW": 3, "LOG2_CT": 1, "Wo": 12, "Do": 4, "Ho": 5, "BLOCK_P": 64}
    assert launch.static_hints("sample_fwd_kernel", args, [6, 2, 3]) == {"programs_with_work": 3 * 2 * 2 * 3}
    assert launch.static_hints("sample_bwd_kernel", args, [2, 1, 1])["trips"] == {"0, n_here": 3}  # 20 rows / 8
    assert launch.static_hints("gather_grad_input_kernel", {"E": 100, "D": 2, "H": 3, "W": 4}, [1, 1, 1]) == {
        "trips": {"0, n_max": 5}}
    assert launch.static_hints("no_such_kernel", {}, [1, 1, 1]) == {}


def test_compile_only_run_of_a_volume(tmp_path, capsys):
    """Compiles the 3-D kernels with Triton 3.6 for sm_90 through the real launchers on 5-D meta tensors:
    forward and backward of a tiny planar volume, projective reported as skipped."""
    argv = ["--static", "--case-spec", "N=2,C=3,D=5,H=6,W=7,Do=4,Ho=5,Wo=6,name=tiny-vol", "--providers",
            "ours-affine", "ours-projective", "--modes", "fwd", "bwd", "--dtypes", "float32", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert "skipped: st.projective_sample has no 3-D form" in capsys.readouterr().out
    (js,) = (tmp_path / "static").glob("*-triton3.6.0-sm90.json")
    rows = json.loads(js.read_text())["rows"]
    assert {(r["form"], r["mode"], r.get("skipped")) for r in rows} == {
        ("affine3d", "fwd", None), ("affine3d", "bwd", None),
        ("projective", "fwd", "st.projective_sample has no 3-D form"),
        ("projective", "bwd", "st.projective_sample has no 3-D form")}
    assert not [r for r in rows if "error" in r]
    fwd = next(r for r in rows if (r["form"], r["mode"]) == ("affine3d", "fwd"))
    assert (fwd["D"], fwd["Do"]) == (5, 4) and fwd["n_launches"] == 1
    (k,) = fwd["launches"]
    assert k["kernel"] == "sample_fwd_kernel" and k["registers"] > 0 and 0 < k["occupancy"] <= 1
    assert k["stack_bytes"] == 0 and k["local_instructions"] == 0  # no spills
    assert [(lp["source"].split(":")[0], lp["source"].split(" ", 1)[1], lp["trips"]) for lp in k["loops"]] == [
        ("sampler.py", "range(0, C, BLOCK_C)", 3)]  # the channel loop, found and counted
    assert 0 < k["programs_with_work"] <= k["programs"]  # the hints of launch.static_hints
    bwd = next(r for r in rows if (r["form"], r["mode"]) == ("affine3d", "bwd"))
    (b,) = [x for x in bwd["launches"] if x["kind"] == "triton"]
    assert b["kernel"] == "sample_bwd_kernel" and b["mix"]["fences"] == 0
    assert set(b["mix"]["atomics"]) == {"REDG.ADD.F32"}  # relaxed, float32 buffer
    assert all(lp["source"].startswith("sampler.py:") for lp in b["loops"])
    assert fwd["issue_us"] > 0 and fwd["floor_us"] > 0


def test_unrolled_loop_and_its_remainder_share_the_trips():
    """A run-time-bounded ``for`` unrolled x4 compiles to two sibling loops named by it (the basis
    forms' ``range(0, DM)``): they run trips // 4 and trips % 4 times, not trips each."""
    from stn_triton.benchmarks import sass

    def body(n_ldg, n_ffma):
        return ([sass.Instr(0, "LDG.E", "", False)] * n_ldg + [sass.Instr(0, "FFMA", "", False)] * n_ffma
                + [sass.Instr(0, "IADD3", "", False), sass.Instr(0, "BRA", "", False)])

    instrs = [sass.Instr(0, "S2R", "", False), *body(16, 12), *body(4, 3), *body(4, 3),
              sass.Instr(0, "EXIT", "", False)]
    src = "volume.py:99 range(0, DM)"
    main, rest = sass.Loop(1, 30, src, ["0", "DM"]), sass.Loop(31, 39, src, ["0", "DM"])
    other = sass.Loop(40, 48, "volume.py:230 range(0, C, BLOCK_C)", ["0", "C", "BLOCK_C"])
    loops = [main, rest, other]
    for lp in loops:
        sass.eval_trips(lp, {"DM": 19, "C": 3, "BLOCK_C": 1})
    sass.split_unrolled(loops, instrs)
    assert (main.trips, rest.trips, other.trips) == (4, 3, 3)
    assert main.trips_note == "unrolled x4: 19 trips = 4 x 4 + 3 (remainder loop)"
    twins = [sass.Loop(1, 30, src, ["0", "DM"]), sass.Loop(31, 60, src, ["0", "DM"])]  # same work: not unrolled
    for lp in twins:
        sass.eval_trips(lp, {"DM": 19})
    sass.split_unrolled(twins, instrs[:1] + body(16, 12) + body(16, 12))
    assert [lp.trips for lp in twins] == [19, 19]
