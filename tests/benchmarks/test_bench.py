"""The benchmark command (issue 6) on the CPU: argument parsing, what the providers compute, the
rows of a run (failures and skips included), the targets check, and the files of a tiny run.

Under the test suite ``TRITON_INTERPRET=1`` is set, so our providers run the Triton kernels in the
interpreter: every case here is tiny.
"""

import csv
import dataclasses
import json

import pytest
import torch
from PIL import Image

import stn_triton as st
from stn_triton.benchmarks import cli, report, runner
from stn_triton.benchmarks.cases import NAMED, Case, min_bytes, parse_case_spec
from stn_triton.benchmarks.providers import PROVIDERS, Provider, draw_params
from stn_triton.benchmarks.runner import RunConfig

TINY = "N=2,C=1,H=8,W=8,Ho=6,Wo=6"
CPU = torch.device("cpu")


def _config(*argv):
    p = cli.parser()
    return cli.config(p.parse_args(["--device", "cpu", *argv]), p)


# --- arguments -------------------------------------------------------------------------------------------

def test_cpu_defaults():
    cfg = _config()
    assert [c.name for c in cfg.cases] == ["mnist", "svhn"]
    assert [c.N for c in cfg.cases] == [16, 8]  # shrunk by the CPU's default --batch-scale 1/16
    # compile is slow on the CPU; the flow providers run on displacement-field cases only
    flow = ["ours-flow", "ours-flow-px", "monai-warp", "voxelmorph", "eager-flow"]
    plugins = ["ours-logpolar", "eager-logpolar", "ours-lens", "eager-lens"]
    assert cfg.providers == [n for n in PROVIDERS if n not in ["compile", "compile-flow"] + flow + plugins]
    assert _config("--cases", "field-2d").providers == flow
    assert cfg.modes == ["fwd", "bwd", "fwd+bwd", "bwd-det"]
    assert cfg.dtypes == ["float32", "bfloat16"]
    assert (cfg.warmup_ms, cfg.rep_ms, cfg.device) == (25.0, 100.0, CPU)


def test_explicit_choices():
    cfg = _config("--cases", "cub-k4", "huge", "--batch-scale", "0.5", "--providers", "compile", "eager",
                  "--modes", "bwd", "--dtypes", "bf16", "fp16", "--warmup", "3", "--rep", "7")
    assert [(c.name, c.N) for c in cfg.cases] == [("cub-k4", 32), ("huge", 2)]  # huge is never scaled
    assert cfg.providers == ["compile", "eager"] and cfg.modes == ["bwd"]
    assert cfg.dtypes == ["bfloat16", "float16"] and (cfg.warmup_ms, cfg.rep_ms) == (3.0, 7.0)


def test_case_spec_alone_replaces_the_default_cases():
    cfg = _config("--case-spec", TINY, "--case-spec", "N=1,C=2,H=5,W=7,name=mine")
    assert [c.name for c in cfg.cases] == ["2x1x8x8-6x6", "mine"]
    cfg = _config("--cases", "mnist", "--case-spec", TINY)
    assert [c.name for c in cfg.cases] == ["mnist", "2x1x8x8-6x6"]


def test_parse_case_spec():
    c = parse_case_spec("N=8,C=3,H=64,W=64,Ho=32,Wo=32,K=2,dtype=bfloat16,layout=channels_last")
    assert c == Case("8x3x64x64-32x32-K2-cl", 8, 3, 64, 64, 32, 32, 2, "bfloat16", "channels_last", note="custom")
    c = parse_case_spec(" n=1, c=2 ,h=5,w=7,DTYPE=bf16,layout=nhwc,name=x ")  # case-insensitive, aliases
    assert (c.N, c.C, c.H, c.W, c.Ho, c.Wo, c.K, c.dtype, c.layout, c.name) == (
        1, 2, 5, 7, 5, 7, 1, "bfloat16", "channels_last", "x")


@pytest.mark.parametrize("spec, words", [
    ("N=2,C=1,H=8", ["missing", "W"]),
    ("N=0,C=1,H=8,W=8", ["'N'", "positive integer", "'0'"]),
    ("N=2,C=1,H=8,W=eight", ["'W'", "'eight'"]),
    ("N=2,C=1,H=8,W=8,dtype=int8", ["'dtype'", "float32", "bfloat16", "'int8'"]),
    ("N=2,C=1,H=8,W=8,layout=chw", ["'layout'", "channels_last", "'chw'"]),
    ("N=2,C=1,H=8,W=8,Q=3", ["unknown field 'Q'", "Ho"]),
    ("N=2,C=1,H=8,W=8,N=3", ["'N' given twice"]),
    ("N=2,C=1,H=8,W=8,K", ["'K' is not FIELD=VALUE"]),
], ids=["missing", "zero", "not-int", "dtype", "layout", "unknown", "twice", "no-equals"])
def test_bad_case_spec(spec, words, capsys):
    with pytest.raises(ValueError) as e:
        parse_case_spec(spec)
    for w in words:
        assert w in str(e.value)
    with pytest.raises(SystemExit) as e:  # the command says the same, as an argparse error
        cli.main(["--case-spec", spec])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --case-spec: bad case spec" in err and words[0] in err


@pytest.mark.parametrize("argv, words", [
    (["--providers", "ours-affine", "nope"], ["--providers", "invalid choice: 'nope'", "ours-affine", "kornia"]),
    (["--cases", "imagenet"], ["--cases", "invalid choice: 'imagenet'", "mnist", "huge"]),
    (["--modes", "backward"], ["--modes", "invalid choice: 'backward'", "fwd+bwd", "bwd-det"]),
    (["--dtypes", "float64"], ["--dtypes", "float32, bfloat16, float16", "'float64'"]),
    (["--rep", "0"], ["--rep", "positive"]),
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--case-spec", TINY, "--case-spec", TINY], ["used twice"]),
    (["--case-spec", TINY, "--providers", "eager", "kornia", "--modes", "bwd-det"],
     ["--modes bwd-det", "this library's providers only", "ours-affine", "--providers eager kornia", "nothing to run"]),
], ids=["provider", "case", "mode", "dtype", "rep", "device", "duplicate-case", "det-without-ours"])
def test_bad_arguments(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err


def test_deterministic_backward_rows_are_ours_and_the_run_says_so(capsys):
    p = cli.parser()
    cfg = cli.config(p.parse_args(["--case-spec", TINY, "--providers", "eager", "ours-affine", "--modes", "bwd",
                                   "bwd-det"]), p)
    assert {(name, mode) for _, _, name, mode in runner.plan(cfg)} == {
        ("eager", "bwd"), ("ours-affine", "bwd"), ("ours-affine", "bwd-det")}
    assert "no rows for eager" in capsys.readouterr().err


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in [*NAMED, *PROVIDERS, *runner.MODES, "float16"]:
        assert name in out
    assert "2x65x4096x4096" in out  # the case over 2^31 elements


# --- what is measured ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["N=2,C=3,H=9,W=11,Ho=7,Wo=5", "N=2,C=3,H=9,W=11,Ho=7,Wo=5,K=3,layout=cl"],
                         ids=["K1-nchw", "K3-channels-last"])
def test_affine_providers_compute_the_same_transform(spec):
    """The baselines sample where ours does: eager, explicit grid, kornia (theta converted to pixel
    matrices) and the projective kernel with a zero perspective row."""
    case = parse_case_spec(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.N, case.C, case.H, case.W, generator=g)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = draw_params("affine", case, CPU, g)
    names = ["ours-affine", "ours-grid", "eager"] + (["kornia"] if PROVIDERS["kornia"].available()[0] else [])
    outs = {n: PROVIDERS[n].build(case, "float32", CPU)(x, PROVIDERS[n].leaves(params, x, case)) for n in names}
    h = torch.cat([params[0], torch.tensor([0.0, 0.0, 1.0]).expand(*params[0].shape[:-2], 1, 3)], -2)
    outs["ours-projective"] = PROVIDERS["ours-projective"].build(case, "float32", CPU)(x, [h])
    shape = (case.N, case.C, case.Ho, case.Wo) if case.K == 1 else (case.N, case.K, case.C, case.Ho, case.Wo)
    for name, out in outs.items():
        assert out.shape == shape, name
        torch.testing.assert_close(out, outs["eager"], rtol=1e-4, atol=1e-4, msg=name)
    for p in PROVIDERS.values():
        p.reset()


@pytest.mark.parametrize("spec", ["N=2,C=3,H=9,W=11,K=2,field=1", "N=1,C=2,D=4,H=5,W=6,field=1"], ids=["2d-K2", "3d"])
def test_flow_providers_compute_the_same_warp(spec):
    """On a displacement-field case: ours (the field read in place) samples where eager's identity grid
    plus the field does, and ours on the field in pixels, channels first, where MONAI's Warp and
    VoxelMorph's SpatialTransformer do; the
    field cases get the flow providers' rows only, the others none of them."""
    case = parse_case_spec(spec)
    assert case.field and case.name.endswith("-field")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.N, case.C, *case.in_size, generator=g)
    params = draw_params("flow", case, CPU, g)
    assert params[0].shape == (*((case.N,) if case.K == 1 else (case.N, case.K)), *case.out_size, len(case.out_size))
    outs = {n: PROVIDERS[n].build(case, "float32", CPU)(x, PROVIDERS[n].leaves(params, x, case))
            for n in ("ours-flow", "eager-flow", "ours-flow-px", "monai-warp", "voxelmorph")}
    torch.testing.assert_close(outs["ours-flow"], outs["eager-flow"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["ours-flow-px"], outs["monai-warp"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["ours-flow-px"], outs["voxelmorph"], rtol=1e-4, atol=1e-4)
    assert (outs["ours-flow-px"] - outs["ours-flow"]).abs().max() > 1e-3  # another convention: not the same warp
    for p in PROVIDERS.values():
        p.reset()
    cfg = runner.RunConfig(cases=[case, parse_case_spec(TINY)], providers=list(PROVIDERS), modes=["fwd"],
                           dtypes=["float32"], device=CPU)
    by_case = {}
    for c, _, name, _ in runner.plan(cfg):
        by_case.setdefault(c.name, set()).add(name)
    flow = {"ours-flow", "ours-flow-px", "monai-warp", "voxelmorph", "eager-flow", "compile-flow"}
    assert by_case[case.name] == flow
    assert not by_case[parse_case_spec(TINY).name] & flow
    assert min_bytes(case, "float32", "fwd", "flow") == (x.numel() + case.output_numel + params[0].numel()) * 4


@pytest.mark.parametrize("name,params", [("logpolar", 2), ("lens", 4)])
def test_plugin_family_providers_compute_the_same_warp(name, params):
    """A plugin family's case (its own Triton map): ours and eager's grid + grid_sample agree, and only
    they run on it."""
    case = dataclasses.replace(NAMED[name], N=2, H=16, W=18, Ho=12, Wo=10)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(case.N, case.C, case.H, case.W, generator=g)
    drawn = draw_params(name, case, CPU, g)
    assert drawn[0].shape == (2, params)
    outs = {n: PROVIDERS[n].build(case, "float32", CPU)(x, PROVIDERS[n].leaves(drawn, x, case))
            for n in (f"ours-{name}", f"eager-{name}")}
    torch.testing.assert_close(outs[f"ours-{name}"], outs[f"eager-{name}"], rtol=1e-4, atol=1e-4)
    for p in PROVIDERS.values():
        p.reset()
    cfg = runner.RunConfig(cases=[case, parse_case_spec(TINY)], providers=list(PROVIDERS), modes=["fwd"],
                           dtypes=["float32"], device=CPU)
    on = {n for c, _, n, _ in runner.plan(cfg) if c.name == case.name}
    assert on == {f"ours-{name}", f"eager-{name}"}


def test_min_bytes_by_hand():
    c = parse_case_spec("N=2,C=3,H=8,W=8,Ho=4,Wo=4,K=2")
    x, out, theta = 2 * 3 * 64 * 4, 2 * 2 * 3 * 16 * 4, 2 * 2 * 6 * 4  # float32 bytes
    assert min_bytes(c, "float32", "fwd", "affine") == x + out + theta
    assert min_bytes(c, "float32", "bwd", "affine") == out + 2 * x + 2 * theta  # grad_out, x, grad_x
    assert min_bytes(c, "float32", "bwd-det", "affine") == out + 2 * x + 2 * theta
    assert min_bytes(c, "float32", "fwd+bwd", "affine") == 2 * out + 3 * x + 3 * theta
    assert min_bytes(c, "bfloat16", "fwd", "affine") == (x + out) // 2 + theta
    m, basis = 2 * 2 * 2 * 19 * 4, 19 * 16 * 4
    assert min_bytes(c, "float32", "fwd", "basis", 19) == x + out + m + basis


def test_deterministic_context_restores():
    before = torch.are_deterministic_algorithms_enabled()
    with runner.deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        with runner.deterministic(False):
            assert not torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


def test_failures_and_skips_become_rows(monkeypatch, tmp_path):
    def broken(case, dtype, device):
        def apply(x, leaves):
            raise RuntimeError("boom\nsecond line")
        return apply

    monkeypatch.setitem(PROVIDERS, "broken", Provider("broken", "always fails", "affine", False, broken))
    monkeypatch.setitem(PROVIDERS, "absent", Provider("absent", "needs a missing module", "affine", False, broken,
                                                      requires="no_such_module_here"))
    cfg = RunConfig(cases=[parse_case_spec(TINY), NAMED["huge"]], providers=["broken", "absent", "eager"],
                    modes=["fwd", "bwd-det"], dtypes=["float32"], device=CPU, warmup_ms=1, rep_ms=2, progress=False)
    assert [(c.name, p, m) for c, _, p, m in runner.plan(cfg)] == [
        (c, p, "fwd") for c in ("2x1x8x8-6x6", "huge") for p in ("broken", "absent", "eager")]  # bwd-det: ours only
    rows, copy = runner.run(cfg)
    status = {(r["case"], r["provider"]): r["status"] for r in rows}
    assert status[("2x1x8x8-6x6", "broken")] == "failed: RuntimeError: boom"
    assert status[("2x1x8x8-6x6", "absent")] == "skipped: no_such_module_here not installed"
    assert status[("2x1x8x8-6x6", "eager")] == "ok"
    assert status[("huge", "eager")] == "skipped: over 2^31 elements; run it on a GPU"
    for r in rows:
        assert (r["median_ms"] is None) == (r["status"] != "ok")
        assert (r["speedup_vs_eager"] is None) == (r["status"] != "ok")
    meta = report.metadata(cfg, ["--test"], copy)
    text = report.write(tmp_path, meta, rows, report.check_targets(rows, on_gpu=False), plots=False)["md"].read_text()
    assert "| 2x1x8x8-6x6 | float32 | broken | fwd | - | - | - | - | - | - | failed: RuntimeError: boom |" in text


def _fake_row(case, dtype, provider, mode, ms, kernels=None):
    row = runner._blank_row(NAMED[case], dtype, provider, mode, "ok")
    row.update(median_ms=ms, p20_ms=ms, p80_ms=ms, kernels=kernels)
    return row


def test_targets_check():
    rows = [
        _fake_row("cub-k4", "bfloat16", "eager", "fwd+bwd", 10.0),
        _fake_row("cub-k4", "bfloat16", "ours-affine", "fwd+bwd", 4.0),  # 2.5x: met
        _fake_row("feat-cl", "bfloat16", "eager", "fwd", 1.0),
        _fake_row("feat-cl", "bfloat16", "ours-affine", "fwd", 0.5),
        _fake_row("svhn", "float32", "eager", "bwd", 1.0),
        _fake_row("svhn", "float32", "ours-affine", "bwd", 0.4),
        _fake_row("svhn", "bfloat16", "eager", "bwd", 1.0),
        _fake_row("svhn", "bfloat16", "ours-affine", "bwd", 0.6),  # 1.67x: missed; slower than fp32: missed
        _fake_row("svhn", "float32", "ours-affine", "bwd-det", 0.5),  # 1.25x the default: met
        _fake_row("mnist", "float32", "ours-affine", "fwd+bwd", 0.1, kernels=3),
    ]
    copy_gbps = rows[3]["min_bytes"] / 0.5e-3 / 1e9 / 0.8  # feat-cl forward at 80% of the copy
    got = {t["target"].split(" ")[0]: t["verdict"] for t in report.check_targets(runner.derive(rows, copy_gbps))}
    assert got == {"CUB-like": "met", "64x256x56x56": "met", "backward": "missed", "bf16": "missed",
                   "deterministic": "met", "MNIST-like": "met"}
    scaled = [dict(r, N=r["N"] // 2) for r in rows]  # a --batch-scale'd run is not the named case
    got = {t["target"].split(" ")[0]: t["verdict"] for t in report.check_targets(runner.derive(scaled, copy_gbps))}
    assert got["CUB-like"] == got["64x256x56x56"] == got["MNIST-like"] == "not measured"
    assert all(t["verdict"] == "not measured" for t in report.check_targets([]))


# --- a tiny run, end to end --------------------------------------------------------------------------------

def test_tiny_cpu_run_writes_every_file(tmp_path, capsys):
    argv = ["--device", "cpu", "--case-spec", TINY, "--providers", "ours-affine", "eager", "--modes", "fwd", "bwd",
            "--dtypes", "float32", "--warmup", "1", "--rep", "5", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "do NOT measure the kernels" in captured.err
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = files[0].split(".")[0].removesuffix("-bandwidth")
    assert stem.endswith("-cpu-" + st.backend(torch.empty(1)))  # "interpreter" under the test suite
    assert files == sorted(stem + s for s in (".json", ".csv", ".md", "-speedup.png", "-bandwidth.png"))

    data = json.loads((tmp_path / f"{stem}.json").read_text())
    meta = data["metadata"]
    for key in ("timestamp_utc", "device", "device_name", "driver", "torch", "triton", "git_commit", "hostname",
                "triton_interpret", "command", "copy_bandwidth", "warning", "stn_backend"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["warning"] == report.CPU_WARNING and not meta["timings_measure_kernels"]
    assert meta["torch"] == torch.__version__ and meta["copy_bandwidth"]["gbps"] > 0
    assert meta["command"] == "stn-bench " + " ".join(argv)
    rows = data["rows"]
    assert [(r["provider"], r["mode"]) for r in rows] == [
        ("ours-affine", "fwd"), ("ours-affine", "bwd"), ("eager", "fwd"), ("eager", "bwd")]
    for r in rows:
        assert r["status"] == "ok" and r["kernels"] is None and r["peak_mem_mb"] is None
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["min_bytes"] / r["median_ms"] / 1e6)
        assert r["frac_of_copy"] == pytest.approx(r["gbps"] / meta["copy_bandwidth"]["gbps"])
        eager = next(e for e in rows if e["provider"] == "eager" and e["mode"] == r["mode"])
        assert r["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / r["median_ms"])
    assert len(data["targets"]) == 6 and all(t["verdict"] == "not evaluated (CPU run)" for t in data["targets"])

    with open(tmp_path / f"{stem}.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0]) == list(runner.ROW_FIELDS)
    assert float(table[0]["median_ms"]) == pytest.approx(rows[0]["median_ms"])

    md = (tmp_path / f"{stem}.md").read_text()
    assert report.CPU_WARNING in md and "| 2x1x8x8-6x6 | float32 | ours-affine | fwd |" in md
    assert md in captured.out  # the table is printed too

    for kind in ("speedup", "bandwidth"):
        with Image.open(tmp_path / f"{stem}-{kind}.png") as im:
            im.verify()
        with Image.open(tmp_path / f"{stem}-{kind}.png") as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300
            assert sum(n > 0 for n in im.convert("L").histogram()) > 10  # something was drawn


def test_results_go_under_the_current_directory_without_matplotlib(tmp_path, monkeypatch, capsys):
    """An installed user's run writes ./stn-bench-results, never next to the package; without matplotlib
    it says so before timing anything and writes the tables alone."""
    monkeypatch.chdir(tmp_path)
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    argv = ["--device", "cpu", "--case-spec", TINY, "--providers", "eager", "--modes", "fwd", "--dtypes", "float32",
            "--warmup", "1", "--rep", "5", "--no-progress"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "stn-triton[benchmarks]" in err
    files = sorted(p.suffix for p in (tmp_path / "stn-bench-results").iterdir())
    assert files == [".csv", ".json", ".md"]
    md = next((tmp_path / "stn-bench-results").glob("*.md")).read_text()
    assert "NOTES.md" not in md and "issue" not in md.lower()
