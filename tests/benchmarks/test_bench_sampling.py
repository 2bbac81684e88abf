"""Benchmark cases with an interpolation of their own (``sampling``): the named bicubic case, the
case-spec field, ``--modes bicubic`` (every case sampled bicubic), providers that sample with it, and
the compile-only report of the bicubic kernels (Triton 3.6, sm_90)."""

import json

import pytest
import torch

from stn_triton.benchmarks import cli, runner, static
from stn_triton.benchmarks.cases import NAMED, parse_case_spec, with_samplings
from stn_triton.benchmarks.providers import PROVIDERS, Provider, draw_params
from stn_triton.benchmarks.runner import RunConfig

CPU = torch.device("cpu")


def _config(*argv):
    p = cli.parser()
    return cli.config(p.parse_args(["--device", "cpu", *argv]), p)


def test_named_bicubic_case():
    c = NAMED["cub-k2-bicubic"]
    assert c.sampling == "bicubic" and (c.N, c.C, c.H, c.W, c.Ho, c.Wo, c.K) == (64, 3, 448, 448, 224, 224, 2)
    assert all(n == "cub-k2-bicubic" or case.sampling == "bilinear" for n, case in NAMED.items())


def test_case_spec_sampling():
    c = parse_case_spec("N=2,C=3,H=9,W=11,sampling=cubic")
    assert c.sampling == "bicubic" and c.name == "2x3x9x11-9x11-bicubic"
    assert parse_case_spec("N=2,C=3,H=9,W=11").sampling == "bilinear"
    with pytest.raises(ValueError, match=r"field 'sampling'.*bilinear, nearest, bicubic.*'lanczos'"):
        parse_case_spec("N=2,C=3,H=9,W=11,sampling=lanczos")


def test_cases_resampled_by_name():
    cub = NAMED["cub-k2"]
    assert cub.sampled("bicubic").name == "cub-k2-bicubic" and cub.sampled("bilinear") is cub
    assert NAMED["cub-k2-bicubic"].sampled("bilinear").name == "cub-k2"
    assert NAMED["cub-k2-bicubic"].sampled("nearest").name == "cub-k2-nearest"
    got = with_samplings([cub, NAMED["cub-k2-bicubic"], NAMED["mnist"]], ["bicubic", "bilinear"])
    assert [(c.name, c.sampling) for c in got] == [("cub-k2-bicubic", "bicubic"), ("cub-k2", "bilinear"),
                                                    ("mnist-bicubic", "bicubic"), ("mnist", "bilinear")]


def test_modes_take_an_interpolation():
    cfg = _config("--modes", "bicubic")
    assert [(c.name, c.sampling) for c in cfg.cases] == [("mnist-bicubic", "bicubic"), ("svhn-bicubic", "bicubic")]
    assert cfg.modes == list(runner.MODES)
    cfg = _config("--modes", "fwd", "bicubic", "nearest", "--cases", "cub-k2-bicubic")
    assert [(c.name, c.sampling) for c in cfg.cases] == [("cub-k2-bicubic", "bicubic"), ("cub-k2-nearest", "nearest")]
    assert cfg.modes == ["fwd"]
    cfg = _config("--cases", "cub-k2-bicubic", "mnist")  # without one, each case's own
    assert [c.sampling for c in cfg.cases] == ["bicubic", "bilinear"]


@pytest.mark.parametrize("spec", ["N=2,C=3,H=9,W=11,Ho=7,Wo=5,sampling=bicubic",
                                  "N=2,C=3,H=9,W=11,Ho=7,Wo=5,K=3,layout=cl,sampling=nearest"],
                         ids=["bicubic-K1-nchw", "nearest-K3-channels-last"])
def test_providers_sample_with_the_case_interpolation(spec):
    case = parse_case_spec(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.N, case.C, case.H, case.W, generator=g)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = draw_params("affine", case, CPU, g)
    outs = {n: PROVIDERS[n].build(case, "float32", CPU)(x, PROVIDERS[n].leaves(params, x, case))
            for n in ("ours-affine", "ours-grid", "eager")}
    bilinear = PROVIDERS["eager"].build(case.sampled("bilinear"), "float32", CPU)(x, PROVIDERS["eager"].leaves(
        params, x, case))
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["eager"], rtol=1e-4, atol=1e-4, msg=name)
    assert not torch.allclose(outs["eager"], bilinear, atol=1e-3)  # the interpolation made a difference
    for p in PROVIDERS.values():
        p.reset()


def test_provider_without_the_interpolation_is_skipped(monkeypatch):
    monkeypatch.setitem(PROVIDERS, "linear-only", Provider("linear-only", "bilinear only", "affine", False,
                                                           PROVIDERS["eager"].make_apply, samplings=("bilinear",)))
    cfg = RunConfig(cases=[parse_case_spec("N=1,C=1,H=6,W=6,sampling=bicubic")], providers=["linear-only", "eager"],
                    modes=["fwd"], dtypes=["float32"], device=CPU, warmup_ms=1, rep_ms=2, progress=False)
    rows, _ = runner.run(cfg)
    assert [(r["provider"], r["sampling"], r["status"]) for r in rows] == [
        ("linear-only", "bicubic", "skipped: linear-only has no bicubic sampling"), ("eager", "bicubic", "ok")]
    assert PROVIDERS["kornia"].samplings == ("bilinear", "nearest")


def test_static_jobs_carry_the_interpolation():
    jobs = static.make_jobs([NAMED["cub-k2-bicubic"], NAMED["mnist"]], ["float32"], ["affine"], ["fwd"])
    assert [(j["case"], j["sampling"]) for j in jobs] == [("cub-k2-bicubic", "bicubic"), ("mnist", "bilinear")]


def test_compile_only_run_of_the_bicubic_kernels(tmp_path, capsys):
    """``--static --modes bicubic`` compiles the bicubic kernels with Triton 3.6 for sm_90: every
    kernel of every step, planar and channels-last (the bf16 vector atomics), no spills, no fences."""
    argv = ["--static", "--modes", "bicubic", "fwd", "bwd", "bwd-det",
            "--case-spec", "N=2,C=16,H=20,W=24,Ho=9,Wo=11,K=2,layout=channels_last,name=tiny-cl",
            "--case-spec", "N=2,C=3,H=20,W=24,Ho=9,Wo=11,name=tiny", "--providers", "ours-affine",
            "--dtypes", "bfloat16", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    (js,) = (tmp_path / "static").glob("*-triton3.6.0-sm90.json")
    rows = json.loads(js.read_text())["rows"]
    assert {(r["case"], r["sampling"], r["mode"]) for r in rows} == {
        (c, "bicubic", m) for c in ("tiny-cl-bicubic", "tiny-bicubic") for m in ("fwd", "bwd", "bwd-det")}
    assert not [r for r in rows if "error" in r]
    launches = [x for r in rows for x in r["launches"] if x["kind"] == "triton"]
    assert {x["kernel"] for x in launches} == {"sample_fwd_kernel", "sample_bwd_kernel", "tap_index_kernel",
                                               "gather_grad_input_kernel"}
    for x in launches:
        assert x["variant"].get("MODE", 2) == 2 and x["variant"].get("LOG2_NC", 4) == 4
        assert x["stack_bytes"] == 0 and x["local_instructions"] == 0, x["kernel"]  # no spills
        assert x["registers"] <= 160, (x["kernel"], x["registers"])
        if x["step"] != "fwd":
            assert x["mix"]["fences"] == 0 and not [k for k in x["mix"]["atomics"] if "CAS" in k]
    cl_bwd = next(r for r in rows if (r["case"], r["mode"]) == ("tiny-cl-bicubic", "bwd"))
    (bwd,) = [x for x in cl_bwd["launches"] if x.get("kernel") == "sample_bwd_kernel"]
    assert set(bwd["mix"]["atomics"]) == {"REDG.ADD.BF16x8"}  # 16 taps, straight into the bf16 gradient
    planar_fwd = next(r for r in rows if (r["case"], r["mode"]) == ("tiny-bicubic", "fwd"))
    (fwd,) = [x for x in planar_fwd["launches"] if x["kind"] == "triton"]
    assert [lp["source"].split(" ", 1)[1] for lp in fwd["loops"]] == ["range(0, C, BLOCK_C)"]  # the channel loop
