"""``stn-bench --static``: the compile-only report (no GPU). The SASS reading and the model on
hand-written disassembly, then a real run that compiles the launchers' kernels with Triton 3.6 for
sm_90 (installed once into the cache, as the command does)."""

import json
import textwrap

import pytest

from stn_triton.benchmarks import cli, sass, static

SASS = textwrap.dedent("""\
    //--------------------- .text.toy_kernel --------------------------
    \t.section\t.text.toy_kernel,"ax",@progbits
    toy_kernel:
    .text.toy_kernel:
    \t//## File "{src}", line 2
            /*0000*/                   S2R R0, SR_CTAID.X ;
            /*0010*/                   I2F.U32.RP R1, R0 ;
            /*0020*/              @P0 EXIT ;
    .L_x_0:
    \t//## File "{src}", line 3
            /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
            /*0040*/                   LDG.E.U16 R8, desc[UR4][R2.64+0x10] ;
            /*0050*/                   FFMA R4, R4, R5, R6 ;
            /*0060*/                   REDG.E.ADD.BF16x8.RN.STRONG.GPU desc[UR4][R2.64], R4 ;
            /*0070*/                   MEMBAR.ALL.GPU ;
    \t//## File "{src}", line 2
            /*0080*/                   IADD3 R9, R9, 0x1, RZ ;
            /*0090*/              @P1 BRA `(.L_x_0) ;
            /*00a0*/                   STG.E.64 desc[UR4][R2.64], R4 ;
            /*00b0*/                   EXIT ;
    .L_x_1:
            /*00c0*/                   BRA `(.L_x_1);
            /*00d0*/                   NOP;
    """)

SOURCE = "def toy(C, BLOCK_C):\n    for c0 in range(0, C, BLOCK_C):\n        pass\n"


@pytest.fixture
def toy(tmp_path):
    src = tmp_path / "toy.py"
    src.write_text(SOURCE)
    funcs = sass.parse_nvdisasm(SASS.format(src=src))
    return funcs["toy_kernel"]


def test_parse_and_mix(toy):
    instrs = sass.useful(toy)
    assert [i.opcode for i in instrs][-2:] == ["STG.E.64", "EXIT"]  # NOP and the closing self-branch dropped
    m = sass.mix(instrs)
    assert m["instructions"] == 12
    assert m["global_loads"] == {"16B": 1, "2B": 1} and m["global_stores"] == {"8B": 1}
    assert m["atomics"] == {"REDG.ADD.BF16x8": 1}
    assert m["fences"] == 1 and m["int_division_sequences"] == 1
    assert instrs[2].predicated and instrs[2].base == "EXIT"


def test_loops_named_by_their_source_and_counted(toy):
    instrs = sass.useful(toy)
    loops = sass.name_loops(sass.find_loops(toy, instrs), instrs)
    assert len(loops) == 1 and loops[0].size == 7
    assert loops[0].source.endswith("toy.py:2 range(0, C, BLOCK_C)")
    sass.eval_trips(loops[0], {"C": 256, "BLOCK_C": 8})
    assert loops[0].trips == 32
    assert sass.dynamic_count(instrs, loops) == 5 + 7 * 32  # straight-line code once, the body 32 times
    assert sass.prologue_to_exit(instrs) == 3
    sass.eval_trips(loops[0], {"__trips__": {}})  # a bound the arguments do not give: counted once, and said
    assert loops[0].trips == 1 and "counted once" in loops[0].trips_note


def test_occupancy_and_issue_time():
    h100 = sass.ARCHS["sm_90"]
    assert sass.occupancy(46, 4, 0, h100) == {"blocks_per_sm": 10, "warps_per_sm": 40, "occupancy": 0.625,
                                              "limited_by": "registers"}
    assert sass.occupancy(128, 4, 0, h100)["occupancy"] == 0.25
    assert sass.occupancy(32, 4, 0, h100)["occupancy"] == 1.0
    assert sass.occupancy(32, 4, 100_000, h100)["limited_by"] == "shared memory"
    # the first version's CUB forward: 200,704 programs x 4 warps x 384 instructions -> ~333 us
    assert sass.issue_time_s(200704 * 4 * 384, h100) * 1e6 == pytest.approx(332.6, abs=0.5)


def test_res_usage():
    text = " Function sample_fwd_kernel:\n  REG:46 STACK:8 SHARED:0 LOCAL:4 CONSTANT[0]:688 TEXTURE:0\n"
    assert sass.parse_res_usage(text) == {"sample_fwd_kernel": {"reg": 46, "stack": 8, "shared": 0, "local": 4}}


def test_model_pick_prefers_occupancy_among_near_equals():
    a = dict(issue_us=100.0, occupancy=0.31)
    b = dict(issue_us=98.0, occupancy=0.25)  # within 3%: a has more warps in flight
    c = dict(issue_us=80.0, occupancy=0.12)  # fastest to issue, too few warps to hide memory latency
    assert static.model_pick([a, b, c]) is a
    assert static.model_pick([dict(a, issue_us=110.0), b]) is b


def test_static_rejects_other_providers(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--static", "--providers", "eager"])
    assert "compiles this library's kernels only" in capsys.readouterr().err


def test_missing_triton_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(static.TRITON_DIR_ENV, str(tmp_path / "nowhere"))
    assert cli.main(["--static", "--case-spec", "N=1,C=1,H=4,W=4", "--out", str(tmp_path)]) == 2
    assert "holds no 'triton' package" in capsys.readouterr().err


def test_compile_only_run(tmp_path, capsys):
    """Compiles our kernels with Triton 3.6 for sm_90 and reports them: every mode, two forms, bf16
    channels-last (the half-precision vector atomics) and a planar case."""
    argv = ["--static", "--case-spec", "N=2,C=16,H=20,W=24,Ho=9,Wo=11,K=2,layout=channels_last,name=tiny-cl",
            "--case-spec", "N=2,C=3,H=256,W=256,Ho=128,Wo=128,name=tiny", "--providers", "ours-affine", "ours-grid",
            "--dtypes", "bfloat16", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "A model, not a measurement" in out
    (js,) = (tmp_path / "static").glob("*-triton3.6.0-sm90.json")
    (md,) = (tmp_path / "static").glob("*-triton3.6.0-sm90.md")
    report = json.loads(js.read_text())
    assert report["metadata"]["triton"] == "3.6.0" and report["metadata"]["arch"] == "sm_90"
    rows = report["rows"]
    assert {(r["case"], r["form"], r["mode"]) for r in rows} == {
        (c, f, m) for c in ("tiny-cl", "tiny") for f in ("affine", "grid") for m in ("fwd", "bwd", "fwd+bwd", "bwd-det")}
    assert not [r for r in rows if "error" in r]
    kernels = {x["kernel"] for r in rows for x in r["launches"] if x["kind"] == "triton"}
    assert kernels == {"sample_fwd_kernel", "sample_bwd_kernel", "tap_index_kernel", "gather_grad_input_kernel",
                       "inverse_table_kernel", "inverse_grad_input_kernel"}
    # the affine form's deterministic backward, no sort, no atomics: 128 x 128 pixels by the class launches
    # (2 x 2 classes of every other pixel for this 2x down-sampling), 9 x 11 by the inverse-map gather
    det = next(r for r in rows if (r["case"], r["form"], r["mode"]) == ("tiny", "affine", "bwd-det"))
    assert [x["kernel"] for x in det["launches"] if x["kind"] == "triton"] == (
        ["inverse_table_kernel"] + ["sample_bwd_kernel"] * 4)
    assert all(x["mix"]["atomics"] == {} and x["variant"]["CLS"] == 2 for x in det["launches"][1:]
               if x.get("kernel") == "sample_bwd_kernel")
    det = next(r for r in rows if (r["case"], r["form"], r["mode"]) == ("tiny-cl", "affine", "bwd-det"))
    assert [x["kernel"] for x in det["launches"] if x["kind"] == "triton"] == [
        "inverse_table_kernel", "inverse_grad_input_kernel", "sample_bwd_kernel"]
    inv = next(x for x in det["launches"] if x.get("kernel") == "inverse_grad_input_kernel")
    assert inv["mix"]["atomics"] == {}
    for case in ("tiny", "tiny-cl"):
        det = next(r for r in rows if (r["case"], r["form"], r["mode"]) == (case, "affine", "bwd-det"))
        assert not [x for x in det["launches"] if x["kind"] == "torch" and "sort" in x["op"]]
    grid_det = next(r for r in rows if (r["case"], r["form"], r["mode"]) == ("tiny", "grid", "bwd-det"))
    assert [x for x in grid_det["launches"] if x["kind"] == "torch" and "sort" in x["op"]]  # the sorted gather
    for r in rows:
        for x in r["launches"]:
            if x["kind"] != "triton":
                continue
            assert x["registers"] > 0 and x["sass_instructions"] > 0 and 0 < x["occupancy"] <= 1
            assert x["issue_us"] > 0 and x["programs_with_work"] <= x["programs"]
            if x["step"] != "fwd":
                assert x["mix"]["fences"] == 0  # relaxed atomics
                assert not [k for k in x["mix"]["atomics"] if "CAS" in k]  # no compare-and-swap loops
            if x["kernel"] == "sample_fwd_kernel":
                assert x["mix"]["int_division_sequences"] == 0  # tiles, not divisions
    cl_bwd = next(r for r in rows if (r["case"], r["form"], r["mode"]) == ("tiny-cl", "affine", "bwd"))
    atomics = next(x for x in cl_bwd["launches"] if x.get("kernel") == "sample_bwd_kernel")["mix"]["atomics"]
    assert atomics == {"REDG.ADD.BF16x8": 4}  # straight into the bf16 gradient, 16 bytes at a time
    planar_fwd = next(r for r in rows if (r["case"], r["form"], r["mode"]) == ("tiny", "affine", "fwd"))
    (fwd,) = [x for x in planar_fwd["launches"] if x["kind"] == "triton"]
    assert [lp["source"].split(":")[0] for lp in fwd["loops"]] == ["sampler.py"]  # the channel loop, found
    assert fwd["loops"][0]["trips"] == 3
    assert planar_fwd["n_launches"] == 1
    grid_fwd = next(r for r in rows if (r["case"], r["form"], r["mode"]) == ("tiny", "grid", "fwd"))
    assert grid_fwd["n_launches"] == 1  # the grid read in place, no stand-in parameter row made per call
    text = md.read_text()
    assert "## Targets" in text and "## Per launch" in text
    assert {t["verdict"] for t in report["targets"]} <= {"met", "not in this run", "reported"}
