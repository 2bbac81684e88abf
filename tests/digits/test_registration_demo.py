"""The registration demo (stn_triton.integrations.digits.registration): a short run lowers the error of
both pairs without folding and writes its files; the folding measure on fields whose Jacobian is known."""

import json

import pytest
import torch

from stn_triton.integrations.digits import registration as reg


def test_short_run_registers_both_pairs(tmp_path, monkeypatch):
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")  # what a CPU user runs (the kernels: tests/core)
    results = reg.run(steps=40, out=tmp_path, log=lambda *_: None)
    for name in ("2d", "3d"):
        r = results[name]
        assert r["mse_after"] < 0.5 * r["mse_before"], (name, r)
        assert r["endpoint_error_after_px"] < r["endpoint_error_before_px"], (name, r)  # towards the true field
        assert r["folding"] == 0.0
    assert json.loads((tmp_path / "results.json").read_text())["2d"]["steps"] == 40
    assert (tmp_path / "figures" / "registration.png").stat().st_size > 0


@pytest.mark.parametrize("nd", [2, 3])
def test_jacobian_determinant_of_known_fields(nd):
    size = (7,) * nd
    grids = torch.meshgrid(*[torch.arange(7.0)] * nd, indexing="ij")
    stretch = torch.zeros(1, nd, *size)
    stretch[0, nd - 1] = 0.5 * grids[nd - 1]  # x -> 1.5 x: determinant 1.5
    assert torch.allclose(reg.jacobian_determinant(stretch), torch.tensor(1.5))
    flip = torch.zeros(1, nd, *size)
    flip[0, nd - 1] = -2.0 * grids[nd - 1]  # x -> -x: folded everywhere
    assert reg.folding(flip) == 1.0 and reg.folding(torch.zeros(1, nd, *size)) == 0.0


def test_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        reg.main(["--steps", "0"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
