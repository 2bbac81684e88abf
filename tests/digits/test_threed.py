"""The 3-D task of stn-digits: its volumes, models, measure of tilt, a smoke run writing table and
figure, and its CLI (its --help is checked with the other tasks' in test_tasks.py)."""

import json
import math
import re

import pytest
import torch
from PIL import Image

from stn_triton.integrations.digits import data as D
from stn_triton.integrations.digits import threed as T
from stn_triton.integrations.digits.cli import TASKS, main


@pytest.fixture(scope="module")
def digits():
    return D.load_sklearn_digits(train_limit=60, test_limit=24)


@pytest.fixture(autouse=True)
def reference(monkeypatch):
    """Everything here takes the pure-PyTorch path, fast under TRITON_INTERPRET=1 too (the 5-D kernels
    are tested in tests/core/test_volume.py)."""
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- the volumes ----------------------------------------------------------------------------------------

def test_face_on_slab_sums_to_the_digit_times_its_thickness(digits):
    """No tilt, scale 1, no shift: the 28 px frame sits in the middle of a 32-voxel canvas, voxel on
    pixel, and the depth sum is the digit times the slab's thickness (up to float rounding)."""
    x = digits.test_x[:6]
    for thickness in (3, 4):
        v, p = T.make_volumes(x, gen(), canvas=32, thickness=thickness, max_tilt=0, scale=(1, 1), translate=0)
        assert v.shape == (6, 1, 32, 32, 32) and (p["tilt"] == 0).all() and (p["shift"] == 0).all()
        torch.testing.assert_close(v.sum(2)[:, :, 2:30, 2:30], thickness * x, rtol=0, atol=1e-5)
        assert v.sum(2)[:, :, :2].abs().max() == 0 and v.sum(2)[:, :, 30:].abs().max() == 0
        depth = v.sum((1, 3, 4))[0]
        assert torch.count_nonzero(depth) <= thickness + 1  # the slab: `thickness` voxels deep (odd: half-voxel rims)
        # the projection the models see: the digit itself
        torch.testing.assert_close(T.projection(v, thickness)[:, :, 2:30, 2:30], x, rtol=0, atol=1e-5)


def test_tilted_volumes_shapes_params_and_determinism(digits):
    x = digits.test_x[:24]
    v, p = T.make_volumes(x, gen(1), max_tilt=75, scale=(0.7, 0.84))
    again, p2 = T.make_volumes(x, gen(1), max_tilt=75, scale=(0.7, 0.84))
    other, _ = T.make_volumes(x, gen(2), max_tilt=75, scale=(0.7, 0.84))
    assert v.shape == (24, 1, 24, 24, 24) and v.dtype == torch.float32 and 0 <= v.min() and v.max() <= 1
    assert torch.equal(v, again) and torch.equal(p["theta"], p2["theta"]) and not torch.equal(v, other)
    assert (p["tilt"] >= 0).all() and (p["tilt"] <= math.radians(75)).all() and p["tilt"].std() > 0.1
    assert (0.7 <= p["scale"]).all() and (p["scale"] <= 0.84).all() and p["theta"].shape == (24, 3, 4)
    # each rotation is one, and turns the slab's normal by the drawn tilt
    r = p["rotation"]
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3, dtype=r.dtype).expand(24, 3, 3))
    torch.testing.assert_close(torch.acos(r[:, 2, 2]), p["tilt"])
    # the slab's mass is kept (trilinear sampling of an uncropped slab): digit ink x thickness x scale^3
    torch.testing.assert_close(v.sum((1, 2, 3, 4)).double(), 4 * x.sum((1, 2, 3)).double() * p["scale"] ** 3,
                               rtol=0.03, atol=0)
    # a tilt foreshortens the projection: the ink's extent across the tilt axis shrinks by about cos(tilt)
    flat, _ = T.make_volumes(x, gen(1), max_tilt=0, scale=(0.7, 0.84))
    tilted = p["tilt"] > math.radians(60)
    assert tilted.any()
    assert T.projection(v, 4)[tilted].amax((1, 2, 3)).mean() > 1.5 * T.projection(flat, 4)[tilted].amax(
        (1, 2, 3)).mean()  # more ink along each column: the same mass on a smaller area


def test_volumes_for_splits_and_the_pool(digits):
    cfg = T.ThreeDConfig(repeats=2)
    d = digits.hold_out(0.2)
    pool, labels, params = T.volumes_for("train", d, 0, cfg)
    n = len(d.train_y)
    assert pool.shape == (2 * n, 1, 24, 24, 24) and torch.equal(labels, d.train_y.repeat(2))
    assert not torch.equal(pool[:n], pool[n:])  # two different renderings of each digit
    test = T.volumes_for("test", d, 0, cfg)
    assert torch.equal(test[0], T.volumes_for("test", d, 0, cfg)[0])
    assert not torch.equal(test[0], T.volumes_for("test", d, 1, cfg)[0])
    assert T.volumes_for("val", d, 0, cfg)[0].shape[0] == len(d.val_y)
    fresh = T.volumes_for("train", d, 0, cfg, epoch=3)
    assert fresh[0].shape[0] == n and not torch.equal(fresh[0], T.volumes_for("train", d, 0, cfg, epoch=4)[0])
    pick = T.epoch_pick(n, 2, 5, 0)
    assert torch.equal(pick % n, torch.arange(n)) and torch.equal(pick, T.epoch_pick(n, 2, 5, 0))


@pytest.mark.parametrize("bad, match", [
    (dict(scale=(0.7, 0.9)), "scale: expected at most 0.8485"),
    (dict(scale=(0.8, 0.7)), "scale: expected"),
    (dict(max_tilt=100), "max_tilt"),
    (dict(repeats=-1), "repeats"),
    (dict(depth=0), "depth"),
    (dict(models=("CNN", "ST-CNN-tps")), "models"),
    (dict(translate=2), "translate"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        T.ThreeDConfig(**bad)


# --- the models and the measure ---------------------------------------------------------------------------

def test_models_start_as_the_same_function_and_counts_match():
    cfg = T.ThreeDConfig()
    x = torch.rand(3, 1, 24, 24, 24)
    models = {m: T.build(m, cfg) for m in T.MODELS}
    fronts = {}
    for name, model in models.items():
        out = model(x)
        assert out.shape == (3, 10)
        out.logsumexp(1).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        with torch.no_grad():
            fronts[name] = model.front(x)
    # at the start (identity transformer, zero residual filter) every model's classifier sees the depth sum
    for name, front in fronts.items():
        torch.testing.assert_close(front, T.projection(x, cfg.thickness), rtol=1e-5, atol=1e-5, msg=name)
    counts = {m: T.count_parameters(models[m]) for m in ("CNN", "ST-CNN-3d")}
    assert abs(counts["CNN"] - counts["ST-CNN-3d"]) < 0.01 * counts["CNN"]


def test_residual_tilt_of_doing_nothing_and_of_undoing(digits):
    _, p = T.make_volumes(digits.test_x[:12], gen(3), max_tilt=80, max_spin=30)
    rot, applied = p["rotation"], torch.rad2deg(p["tilt"])
    torch.testing.assert_close(T.residual_tilt(torch.eye(3).expand(12, 3, 3), rot), applied)  # nothing
    assert T.residual_tilt(rot, rot).abs().max() < 1e-5  # turned back: face on
    assert T.residual_tilt(2.0 * rot, rot).abs().max() < 1e-5  # a zoom changes nothing
    zero = torch.zeros(12, dtype=torch.float64)
    spun = rot @ T.rotation(zero, zero, zero + 1.0)
    assert T.residual_tilt(spun, rot).abs().max() < 1e-5  # nor a turn within the output's plane
    # a shear that lines the output's planes up with the slab, summing along the canvas's depth still: as
    # tilted as doing nothing (the projection is the same)
    shear = torch.eye(3, dtype=torch.float64).repeat(12, 1, 1)
    shear[:, 2, :2] = -rot[:, :2, 2] / rot[:, 2:, 2]
    torch.testing.assert_close(T.residual_tilt(shear, rot), applied)


def test_tilt_report_on_a_transformer_set_by_hand(digits):
    """A transformer whose theta is the applied rotation (read off a lookup) undoes every tilt."""
    cfg = T.ThreeDConfig()
    x, _, p = T.volumes_for("test", digits, 0, cfg)
    model = T.build("ST-CNN-3d", cfg)
    model(x[:2])
    tr = model.transformer
    theta = torch.cat([p["rotation"].float(), p["shift"].float()[:, :, None]], 2).flatten(1)  # (N, 12)

    class Known(torch.nn.Module):  # "features": the sample's index, one-hot
        def forward(self, v):
            return torch.eye(len(theta))[:v.shape[0]]

    tr.localization, tr.head = Known(), torch.nn.Linear(len(theta), 12, bias=False)
    with torch.no_grad():
        tr.head.weight.copy_(theta.T)
    rep = T.tilt_report(model, x, p)
    assert rep["median_residual_tilt_deg"] < 1e-3 and rep["median_residual_tilt_nothing_deg"] > 20
    assert rep["window_scale"] == pytest.approx(1.0, abs=1e-5) and rep["n"] == len(theta)
    assert sum(b["n"] for b in rep["by_tilt"]) == len(theta)
    # and what the classifier then sees is the digit face on (the same projection as an untilted rendering)
    with torch.no_grad():
        seen = model.front(x)
    face_on, _ = T.make_volumes(digits.test_x, T._gen("3d", "test", 0), max_tilt=0, scale=cfg.scale, translate=0)
    face_on = T.projection(face_on, cfg.thickness)

    def similarity(a, b):  # per image, the cosine of the two images (intensities aside)
        return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    tilted = p["tilt"] > math.radians(45)
    assert similarity(seen, face_on).min() > 0.95
    assert similarity(T.projection(x, cfg.thickness), face_on)[tilted].max() < 0.88


# --- a smoke run, the table, the figure, the CLI ----------------------------------------------------------

def test_smoke_run_writes_table_and_figure(tmp_path):
    cfg = T.ThreeDConfig(seeds=(0, 1, 2), epochs=1, train_limit=24, test_limit=12, batch_size=32, repeats=1,
                         out=str(tmp_path / "v"), progress=False, figure_count=4, workers=1)
    lines = []
    summary = T.run(cfg, log=lines.append)
    res = summary["results"]
    assert len(res) == 3 * len(T.MODELS) and all(0 <= r["error"] <= 100 for r in res)
    assert sum("seed" in line and "test error" in line for line in lines) == len(res)  # one line per run
    for r in res:
        assert ("median_residual_tilt_deg" in r["tilt"]) == r["model"].startswith("ST")
        assert r["tilt"]["median_residual_tilt_nothing_deg"] > 0
    saved = json.loads((tmp_path / "v" / "results.json").read_text())
    assert saved["results"] == res and saved["config"]["models"] == list(T.MODELS)
    table = (tmp_path / "v" / "table.md").read_text()
    for m in T.MODELS:
        assert f"| {m} |" in table
    assert "vs CNN" in table and "(baseline)" in table and "(control)" in table and "(none)" in table
    assert re.search(r"\| ST-CNN-3d \| [\d.]+ ± [\d.]+ \([\d.]+k\) \| [+-][\d.]+ \[[^|]+\| [+-][\d.]+ \[", table)
    img = Image.open(tmp_path / "v" / "figures" / "3d.png")
    # the depth sums, one row per transformer, the digits: 4 rows of 4 images, 88 px each; 6 caption lines
    assert img.mode == "L" and img.width == 110 + 4 * 88 and img.height == 24 + 4 * 88 + 6 * 14 + 8


def test_cli_3d(tmp_path, capsys):
    """The task from the command line, its two runs in two worker processes (each rendering the
    volumes itself, afresh every epoch here)."""
    assert "3d" in TASKS
    assert main(["--task", "3d", "--models", "CNN", "ST-CNN-3d", "--seeds", "0", "--epochs", "1", "--train-limit",
                 "30", "--test-limit", "10", "--repeats", "0", "--workers", "2", "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3d CNN" in printed and "3d ST-CNN-3d" in printed and "| ST-CNN-3d |" in printed
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["config"]["repeats"] == 0 and saved["config"]["workers"] == 2
    assert [r["model"] for r in saved["results"]] == ["CNN", "ST-CNN-3d"]
    assert (tmp_path / "t" / "figures" / "3d.png").exists()
    with pytest.raises(SystemExit) as e:
        main(["--task", "3d", "--scale", "0.5", "0.95", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "stn-digits: error: --scale: expected at most" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an option of another task
        main(["--task", "3d", "--distortions", "R"])
    assert "unrecognized arguments: --distortions" in capsys.readouterr().err

