"""What the main job measures and compares: the rotation a transformer undoes, matched parameter
counts, the validation split and curriculum, limits applied before conversion, saved models, logs."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import stn_triton as st

from stn_triton.integrations.digits import data as D
from stn_triton.integrations.digits import load_model, rotation_report
from stn_triton.integrations.digits.distortions import FULL_ANGLE, canvas_size, distort, object_scale_for
from stn_triton.integrations.digits.experiment import (Config, format_table, paired_difference, run,
                                                       t_quantile_975)
from stn_triton.integrations.digits.models import MODELS, _materialise, build, count_parameters


@pytest.fixture(scope="module")
def digits():
    return D.load_sklearn_digits()


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")


# --- the rotation measure, on transformers set by hand ------------------------------------------------

class AngleFeatures(nn.Module):
    """Reads the angle written in each image's first pixel (radians) and gives (cos k a, sin k a)."""

    def __init__(self, k=1.0):
        super().__init__()
        self.k = k

    def forward(self, x):
        a = x[:, 0, 0, 0] * self.k
        return torch.stack([torch.cos(a), torch.sin(a)], 1)


def hand_set(k=1.0, zoom=1.0, shift=(0.0, 0.0), side=28):
    """An ST-CNN-aff whose transformer rotates by k times the angle in the first pixel: theta's A is
    zoom * rot(k a) = zoom * [[c, -s], [s, c]], b = shift."""
    model = build("ST-CNN-aff", side, 28)
    tr = model.transformer
    tr.localization = AngleFeatures(k)
    tr.head(torch.zeros(1, 2))  # materialise the lazy layer with 2 inputs
    with torch.no_grad():
        w = torch.zeros(6, 2)
        w[0, 0], w[1, 1], w[3, 1], w[4, 0] = zoom, -zoom, zoom, zoom
        tr.head.weight.copy_(w)
        tr.head.bias.copy_(torch.tensor([0.0, 0, shift[0], 0, 0, shift[1]]))
    return model


def with_angles(angles):
    x = torch.zeros(len(angles), 1, 28, 28)
    x[:, 0, 0, 0] = torch.as_tensor(angles, dtype=torch.float32)
    return x


def test_rotation_report_on_a_transformer_that_undoes_the_rotation():
    angles = torch.linspace(-math.pi / 2, math.pi / 2, 41, dtype=torch.float64)
    placed = torch.tensor([[0.1, -0.2]]).expand(41, 2)
    r = rotation_report(hand_set(1.0, zoom=0.8, shift=(0.1, -0.2)), with_angles(angles), angles, per_sample=True,
                        applied_shift=placed)
    assert r["median_centre_offset"] < 1e-6 and r["median_centre_offset_nothing"] == pytest.approx(math.hypot(0.1, 0.2))
    assert r["median_residual_deg"] < 1e-3 and max(map(abs, r["residual_deg"])) < 1e-3
    assert r["slope"] == pytest.approx(1.0, abs=1e-5) and r["intercept_deg"] == pytest.approx(0.0, abs=1e-3)
    assert r["scale_mean"] == pytest.approx(0.8, abs=1e-5)
    assert r["translation_mean"] == pytest.approx([0.1, -0.2], abs=1e-6)
    assert r["median_residual_nothing_deg"] == pytest.approx(45.0)
    assert r["n"] == 41


@pytest.mark.parametrize("k", [0.0, 0.5, -1.0])
def test_rotation_report_partial_none_and_wrong_way(k):
    angles = torch.linspace(-math.pi / 3, math.pi / 3, 31, dtype=torch.float64)
    r = rotation_report(hand_set(k), with_angles(angles), angles, per_sample=True)
    assert r["slope"] == pytest.approx(k, abs=1e-5)
    expected = (k - 1) * torch.rad2deg(angles)  # what is left: rot(-a) rot(k a) = rot((k - 1) a)
    np.testing.assert_allclose(r["residual_deg"], expected.numpy(), atol=1e-3)
    assert r["median_residual_deg"] == pytest.approx(float(torch.quantile(expected.abs(), 0.5)), abs=1e-3)


def test_an_undoing_transformer_really_makes_the_digits_upright(reference, digits):
    """The measure's sign convention checked on pixels: rotate real digits with the R distortion,
    undo them with the hand-set transformer fed the applied angles; its output is the upright digit
    (and the measure says residual 0), while the opposite rotation doubles the error."""
    x = digits.test_x[:16]
    rotated, params = distort("R", x, torch.Generator().manual_seed(3), return_params=True, max_angle=60.0)
    angles = params["angle"]
    feed = rotated.clone()
    feed[:, 0, 0, 0] = angles.float()  # the first pixel is background: carry the angle in it
    outs = {}
    for k in (1.0, 0.0, -1.0):
        model = hand_set(k).eval()
        with torch.no_grad():
            out = model.transformer(feed)
        outs[k] = (out - x).abs().mean().item()
        report = rotation_report(model, feed, angles)
        expected = abs(1 - k) * float(torch.quantile(torch.rad2deg(angles).abs(), 0.5))
        assert report["median_residual_deg"] == pytest.approx(expected, abs=1e-3)
    assert outs[1.0] < 0.25 * outs[0.0] and outs[-1.0] > outs[0.0]


@pytest.mark.parametrize("name", ["ST-CNN-proj", "ST-CNN-tps"])
def test_rotation_report_reads_another_family_through_its_nearest_affine_map(name):
    """A projective or TPS transformer set to an affine map (the spline's control points moved by it)
    is measured as that affine map; a bent one by the affine map nearest its grid."""
    a, zoom, shift = 0.5, 0.8, torch.tensor([0.1, -0.2])
    rot = zoom * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    model = build(name, 28)
    tr = model.transformer
    model(torch.zeros(1, 1, 28, 28))  # materialise the lazy layer
    if name == "ST-CNN-proj":
        theta = torch.cat([torch.cat([rot, shift[:, None]], 1).flatten(), torch.zeros(2)])
    else:
        theta = (tr.family.identity().view(-1, 2) @ rot.T + shift).flatten()
    with torch.no_grad():
        tr.head.weight.zero_()
        tr.head.bias.copy_(theta)
    angles = torch.full((3,), a, dtype=torch.float64)
    r = rotation_report(model, torch.rand(3, 1, 28, 28), angles)
    assert r["median_residual_deg"] == pytest.approx(0.0, abs=1e-3)
    assert r["scale_mean"] == pytest.approx(zoom, abs=1e-4)
    assert r["translation_mean"] == pytest.approx(shift.tolist(), abs=1e-4)
    if name == "ST-CNN-tps":  # bent: one control point moved; still near the rotation, no longer exactly it
        with torch.no_grad():
            tr.head.bias[0] += 0.3
        bent = rotation_report(model, torch.rand(3, 1, 28, 28), angles)["median_residual_deg"]
        assert 0.05 < bent < 10


def test_rotation_report_needs_matching_angles_and_one_2d_transformer():
    with pytest.raises(ValueError, match="3 images but 2 angles"):
        rotation_report(hand_set(), torch.zeros(3, 1, 28, 28), torch.zeros(2))
    model = torch.nn.Module()
    model.transformer = st.SpatialTransformer(nn.Flatten(), "tps", size=(8, 8), num_transforms=2)
    with pytest.raises(ValueError, match="needs an affine transformer or one other 2-D transformer"):
        rotation_report(model, torch.zeros(2, 1, 28, 28), torch.zeros(2))


# --- the paper's comparisons ----------------------------------------------------------------------------

@pytest.mark.parametrize("distortion", ["R", "RTS", "TC"])
@pytest.mark.parametrize("kind", ["FCN", "CNN"])
def test_parameter_counts_match_within_ten_percent_at_every_canvas(reference, distortion, kind):
    side = canvas_size(distortion)
    names = [m for m in MODELS if m == kind or m.startswith(f"ST-{kind}-")]
    models = {m: _materialise(build(m, side, 28), side) for m in names}
    counts = {m: count_parameters(model) for m, model in models.items()}
    assert max(counts.values()) <= 1.10 * min(counts.values()), counts
    # the classifier is the same module, with the same parameters, in the baseline and its STs
    shapes = {m: [tuple(p.shape) for p in model.classifier.parameters()] for m, model in models.items()}
    assert all(s == shapes[kind] for s in shapes.values())


def test_paired_difference_and_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.7062) and t_quantile_975(2) == pytest.approx(4.3027)
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=2e-4) and t_quantile_975(1000) == pytest.approx(1.9623,
                                                                                                           abs=2e-4)
    mean, lo, hi = paired_difference([3.0, 2.0, 4.0], [2.0, 2.0, 2.0])  # differences 1, 0, 2: sd 1
    assert mean == pytest.approx(1.0)
    assert (lo, hi) == pytest.approx((1 - 4.3027 / math.sqrt(3), 1 + 4.3027 / math.sqrt(3)), abs=1e-4)
    assert paired_difference([1.0], [0.5]) == (0.5, None, None)


def test_table_has_counts_in_every_cell_paired_intervals_and_rotation():
    cfg = Config(distortions=("R",), models=("CNN", "ST-CNN-aff"), seeds=(0, 1, 2))
    res = []
    for s, (e_cnn, e_st, resid) in enumerate([(3.0, 2.0, 10.0), (2.0, 2.0, 12.0), (4.0, 2.0, 14.0)]):
        res.append({"distortion": "R", "model": "CNN", "seed": s, "error": e_cnn, "params": 37048,
                    "rotation": {"median_residual_nothing_deg": 46.0}})
        res.append({"distortion": "R", "model": "ST-CNN-aff", "seed": s, "error": e_st, "params": 37200,
                    "rotation": {"median_residual_deg": resid, "slope": 0.5, "median_residual_nothing_deg": 46.0}})
    lines = format_table(res, cfg).splitlines()
    assert lines[0] == ("| model | R % error (params) | R vs baseline, paired diff [95% CI] | "
                        "R residual rotation (deg) |")
    assert lines[2] == "| CNN | 3.0 ± 1.0 (37.0k) | (baseline) | 46.0 (none) |"
    half = 4.3027 * 1.0 / math.sqrt(3)
    assert lines[3] == (f"| ST-CNN-aff | 2.0 ± 0.0 (37.2k) | -1.0 [{-1 - half:+.1f}, {-1 + half:+.1f}] vs CNN | "
                        "12.0 ± 2.0, slope 0.50 |")


def test_curriculum_schedule():
    cfg = Config(curriculum=4, pose_curriculum=())
    assert [cfg.train_options("R", e)["max_angle"] for e in range(6)] == [22.5, 45.0, 67.5, 90.0, 90.0, 90.0]
    assert cfg.train_options("RTS", 1)["max_angle"] == FULL_ANGLE["RTS"] / 2
    assert "max_angle" not in cfg.options("R") and cfg.train_options("P", 0) == {}
    assert "max_angle" not in Config(curriculum=0).train_options("R", 0)
    given = Config(curriculum=2, distortion_options={"R": {"max_angle": 40.0}})
    assert given.train_options("R", 0)["max_angle"] == 20.0 and given.options("R")["max_angle"] == 40.0
    with pytest.raises(ValueError, match="curriculum: expected a number of epochs >= 0, got -1"):
        Config(curriculum=-1)


def test_distortion_schedule_interpolates_numbers_and_ranges():
    """Knots schedule any option: a number (translate: the fraction of the room used) or a range (scale),
    element by element; the curriculum still sets the angle when the schedule does not."""
    cfg = Config(curriculum=4, pose_curriculum=(), distortion_schedule={"RTS": {
        "translate": [[0, 0], [2, 0], [6, 1]], "scale": [[0, [1.0, 1.0]], [4, [0.7, 1.2]]]}})
    opts = [cfg.train_options("RTS", e) for e in range(8)]
    assert [o["translate"] for o in opts] == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1]
    assert [o["scale"] for o in opts][::2] == [(1.0, 1.0), (0.85, 1.1), (0.7, 1.2), (0.7, 1.2)]
    assert opts[0]["max_angle"] == FULL_ANGLE["RTS"] / 4 and "scale" not in cfg.options("RTS")
    for bad in ([[0, 1], [0, 2]], [[0, [1.0, 1.0]], [4, 0.7]], [[0, [1.0, 1.0]], [4, [0.7]]], []):
        with pytest.raises(ValueError, match=r"distortion_schedule\['RTS'\]\['scale'\]: expected"):
            Config(distortion_schedule={"RTS": {"scale": bad}})


def test_pose_curriculum(reference, tmp_path):
    """RTS, the transformer models (by default, 8 16): centred digits filling the canvas (scale 1.5),
    rotated by up to 6 -> 90 degrees until epoch `hold`, then RTS's own ranges by epoch `end`, the
    localisation rate x3 (RTS only); the baselines train under the rotation curriculum alone; a
    schedule the user gives wins."""
    cfg = Config(pose_curriculum=[4, 8], localization_lr_scale=0.5)
    assert cfg.pose_curriculum == (4, 8) and Config().pose_curriculum == (8, 16)
    opts = [cfg.train_options("RTS", e) for e in (0, 2, 4, 6, 8, 30)]
    assert [o["translate"] for o in opts] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert [o["scale"] for o in opts] == [(1.5, 1.5)] * 3 + [(1.1, 1.35), (0.7, 1.2), (0.7, 1.2)]
    assert [o["max_angle"] for o in opts] == [6.0, 48.0, 90.0, 67.5, 45.0, 45.0]
    assert cfg.options("RTS") == {} and cfg.train_options("R", 0)["max_angle"] == 90.0 / 15
    assert (cfg.localization_lr_scale_for("RTS"), cfg.localization_lr_scale_for("R")) == (1.5, 0.5)
    assert Config(pose_curriculum=()).localization_lr_scale_for("RTS") == 1.0
    assert cfg.for_model("ST-CNN-tps") is cfg and cfg.for_model("ST-FCN-aff") is cfg
    for baseline in ("CNN", "FCN"):
        assert cfg.for_model(baseline).train_options("RTS", 0) == {"max_angle": 45.0 / 15}
    # a digit at scale 1.5 spans RTS's 42 px canvas as R's digits span their 28 px
    images, params = distort("RTS", torch.ones(2, 1, 28, 28), torch.Generator().manual_seed(0), return_params=True,
                             **cfg.train_options("RTS", 0))
    assert images.shape[-1] == 42 and torch.equal(params["shift"], torch.zeros(2, 2))
    assert images[:, 0, 21, 2:-2].min() > 0.5 and images[:, 0, 2:-2, 21].min() > 0.5
    ran = run(Config(distortions=("R", "RTS"), models=("CNN", "ST-CNN-aff"), seeds=(0,), epochs=2, train_limit=24,
                     test_limit=8, batch_size=12, progress=False, workers=1, pose_curriculum=(1, 2),
                     out=str(tmp_path / "run")), log=lambda *a: None)
    assert [(r["distortion"], r["model"], r["localization_lr_scale"], r["pose_curriculum"]) for r in ran["results"]] \
        == [("R", "CNN", 1.0, []), ("R", "ST-CNN-aff", 1.0, []), ("RTS", "CNN", 1.0, []),
            ("RTS", "ST-CNN-aff", 3.0, [1, 2])]
    assert list(ran["config"]["pose_curriculum"]) == [1, 2]
    own = Config(pose_curriculum=(4, 8), distortion_options={"RTS": {"scale": (0.8, 1.0), "translate": False}},
                 distortion_schedule={"RTS": {"max_angle": [[0, 45]]}})
    assert [own.train_options("RTS", 8)[k] for k in ("scale", "translate", "max_angle")] == [(0.8, 1.0), 0.0, 45]
    for bad in ((8, 4), (4,), (-1, 3), (1.5, 3)):
        with pytest.raises(ValueError, match=r"pose_curriculum: expected two epochs, hold and end, 0 <= hold < end"):
            Config(pose_curriculum=bad)


def test_validation_split_is_fixed_and_disjoint(digits):
    a, b = digits.hold_out(0.1), digits.hold_out(0.1)
    assert len(a.val_y) == round(0.1 * len(digits.train_y)) and len(a.train_y) + len(a.val_y) == len(digits.train_y)
    assert torch.equal(a.val_x, b.val_x)
    seen = {x.numpy().tobytes() for x in a.train_x}
    assert not any(x.numpy().tobytes() in seen for x in a.val_x if x.sum() > 0)
    with pytest.raises(ValueError, match="leaves no validation or no training images"):
        digits.limit(train=3).hold_out(0.1)


# --- any MNIST-format data --------------------------------------------------------------------------------

def test_object_radius_measures_how_far_the_objects_reach(reference, digits):
    mnist_like = D.object_radius(digits.train_x)
    assert 9 < mnist_like <= 14 and object_scale_for(mnist_like) == 1.0
    full = torch.zeros(4, 1, 28, 28)
    full[:, :, 1:27, 1:27] = 1.0  # a 26 x 26 object: corners at sqrt(2) * 13 px from the centre
    radius = D.object_radius(full)
    assert radius == pytest.approx(math.hypot(12.5, 12.5) + 0.5, abs=1e-4)
    scale = object_scale_for(radius)
    assert scale == pytest.approx(14 / radius)
    # shrunk by it, the object survives any rotation uncropped: its ink is kept
    shrunk = distort("R", full, torch.Generator().manual_seed(0), object_scale=scale, max_angle=0.0)
    for angle in (30.0, 45.0, 90.0):
        out = distort("R", full, torch.Generator().manual_seed(0), object_scale=scale, max_angle=angle)
        torch.testing.assert_close(out.sum((1, 2, 3)), shrunk.sum((1, 2, 3)), rtol=0.03, atol=0)


def _write_idx(folder, n_train, n_test):
    import struct
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + img.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 8, 1, n) + lab.tobytes())
    return folder


def test_limits_are_applied_before_conversion(tmp_path, monkeypatch):
    folder = _write_idx(tmp_path / "idx", 300, 100)
    converted = []
    to_frame = D._to_frame
    monkeypatch.setattr(D, "_to_frame", lambda images, name: converted.append(images.shape) or to_frame(images, name))
    d = D.load_idx_dir(folder, train_limit=7, test_limit=5)
    assert converted == [(7, 28, 28), (5, 28, 28)]  # only the kept images reach float
    assert d.train_x.shape == (7, 1, 28, 28) and d.test_y.shape == (5,)
    full = D.read_idx(folder / "train-images-idx3-ubyte")
    np.testing.assert_array_equal(D.read_idx(folder / "train-images-idx3-ubyte", limit=7), full[:7])
    cut = tmp_path / "cut-idx3-ubyte"
    cut.write_bytes((folder / "train-images-idx3-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        D.read_idx(cut, limit=2)  # the file's length is still checked
    skl = D.load_sklearn_digits(train_limit=9, test_limit=4)
    assert skl.train_x.shape[0] == 9 and skl.test_x.shape[0] == 4


# --- saved models and logs ------------------------------------------------------------------------------

def test_save_models_and_load_model(reference, tmp_path, capsys):
    cfg = Config(distortions=("R",), models=("CNN", "ST-CNN-aff"), seeds=(0,), epochs=1, train_limit=40,
                 test_limit=10, val_fraction=0.25, batch_size=16, out=str(tmp_path / "run"), save_models=True,
                 progress=True, figure_count=3, workers=1)
    summary = run(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if " seed 0: " in line]
    assert len(lines) == 2 and all("% test error" in line and "params" in line for line in lines)  # one per run
    saved = {r["model"]: r for r in summary["results"]}
    x = distort("R", D.load_sklearn_digits(test_limit=10).test_x, torch.Generator().manual_seed(1))
    for name, r in saved.items():
        path = tmp_path / "run" / r["model_file"]
        assert path.name == f"R-{name}-seed0.pt"
        model = load_model(path)
        assert not model.training and model.checkpoint_info["name"] == name
        assert model.checkpoint_info["error"] == r["error"] and model.checkpoint_info["distortion"] == "R"
        again = build(name, 28, 28)
        again(x[:1])
        again.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        with torch.no_grad():
            torch.testing.assert_close(model(x), again.eval()(x), rtol=0, atol=0)
    st_model = load_model(tmp_path / "run" / saved["ST-CNN-aff"]["model_file"])
    with torch.no_grad():
        assert st_model.transformer(x).shape == (10, 1, 28, 28)
    assert rotation_report(st_model, x, torch.zeros(10))["n"] == 10
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["code"]["package"] is not None or results["code"]["commit"] is not None
    r = results["results"][1]
    assert len(r["train_loss"]) == 1 and r["rotation"]["n"] == 10 and "scale_mean" in r["rotation"]
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"format": "something else"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a stn-digits model"):
        load_model(tmp_path / "junk.pt")


def test_rotation_report_by_angle_bins():
    angles = torch.deg2rad(torch.tensor([-80.0, -50.0, -10.0, 5.0, 20.0, 44.0, 89.0], dtype=torch.float64))
    r = rotation_report(hand_set(0.5), with_angles(angles), angles, bin_deg=30.0)
    assert [(b["from_deg"], b["to_deg"], b["n"]) for b in r["by_angle"]] == [(0, 30, 3), (30, 60, 2), (60, 90, 2)]
    assert [b["median_residual_deg"] for b in r["by_angle"]] == pytest.approx([5.0, 23.5, 42.25], abs=0.01)
