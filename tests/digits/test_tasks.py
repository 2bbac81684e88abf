"""The addition and co-localisation tasks of stn-digits: their data, models, loss and score, a smoke
run of each, and the CLI's --task."""

import argparse
import json
import re

import pytest
import torch
from PIL import Image

from stn_triton.integrations.digits import addition as A
from stn_triton.integrations.digits import colocalisation as C
from stn_triton.integrations.digits import data as D
from stn_triton.integrations.digits.cli import TASKS, main, parser
from stn_triton.integrations.digits.experiment import _tile
import stn_triton as st


@pytest.fixture(scope="module")
def digits():
    return D.load_sklearn_digits(train_limit=200, test_limit=60)


def built(name):
    """An addition model with its lazy layers made."""
    model = A.build(name, 42, 28)
    model(torch.zeros(1, 2, 42, 42))
    return model


@pytest.fixture(autouse=True)
def reference(monkeypatch):
    """Everything here takes the pure-PyTorch path, fast under TRITON_INTERPRET=1 too (the kernels are
    tested in tests/core)."""
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")


# --- addition: the data -----------------------------------------------------------------------------------

def test_addition_pairs_shapes_sums_and_determinism(digits):
    x, y = digits.test_x[:20], digits.test_y[:20]
    images, sums, params = A.make_pairs(x, y, torch.Generator().manual_seed(1), canvas_factor=1.5)
    again = A.make_pairs(x, y, torch.Generator().manual_seed(1), canvas_factor=1.5)
    other = A.make_pairs(x, y, torch.Generator().manual_seed(2), canvas_factor=1.5)
    assert images.shape == (20, 2, 42, 42) and sums.shape == (20,) and sums.dtype == torch.int64
    assert torch.equal(images, again[0]) and torch.equal(sums, again[1]) and not torch.equal(images, other[0])
    first, second = params["index"].unbind(1)
    assert torch.equal(first, torch.arange(20)) and (first != second).all()  # two different digits
    assert torch.equal(sums, y[first] + y[second]) and torch.equal(params["digits"], torch.stack([y[first],
                                                                                                 y[second]], 1))
    assert 0 <= sums.min() and sums.max() <= 18
    # each channel is its own digit, RTS-distorted as distortions.py does it with the drawn parameters
    for c, key, idx in ((0, "first", first), (1, "second", second)):
        p = params[key]
        assert p["angle"].abs().max() <= torch.pi / 4 and (0.7 <= p["scale"]).all() and (p["scale"] <= 1.2).all()
        again_c = st.affine_sample(x[idx], p["theta"], (42, 42)).clamp(0, 1)
        torch.testing.assert_close(images[:, c:c + 1], again_c, rtol=0, atol=1e-5)


def test_addition_splits_are_fixed_by_seed_and_the_curriculum(digits):
    cfg = A.AdditionConfig(seeds=(0,), curriculum=4, warmup=2, separate=())
    d = digits.hold_out(0.1)
    t0 = A.pairs_for("test", d, 0, cfg)
    assert torch.equal(t0[0], A.pairs_for("test", d, 0, cfg)[0])
    assert not torch.equal(t0[0], A.pairs_for("test", d, 1, cfg)[0])
    assert cfg.rts_options(None) == {"canvas_factor": 1.5}  # validation and test: the full distortion
    first = cfg.rts_options(0)
    assert first["max_angle"] == 0 and first["translate"] == 0 and first["scale"] == (1.0, 1.0)  # warm-up
    assert cfg.rts_options(2)["max_angle"] == pytest.approx(45 / 4) and cfg.rts_options(9)["max_angle"] == 45
    assert cfg.rts_options(9)["scale"] == pytest.approx((0.7, 1.2))


def test_addition_separation_curriculum(digits):
    """Until `hold` the first channel's digit at the top left of its room and the second's at the bottom
    right, whatever the distortion curriculum's share of the room; then linearly to uniform by `end`."""
    assert A.AdditionConfig().separate == A.SEPARATE == (10, 30)
    cfg = A.AdditionConfig(curriculum=4, warmup=2, separate=(3, 7))
    opts = {e: cfg.rts_options(e) for e in (0, 3, 5, 7)}
    assert [opts[e].get("place_weight") for e in (0, 3, 5, 7)] == [1.0, 1.0, 0.5, None]
    assert opts[0]["translate"] == 1.0 and opts[0]["place"] == (-1.0, -1.0) and opts[0]["max_angle"] == 0
    assert "place" not in cfg.rts_options(None) and "place" not in A.AdditionConfig(separate=()).rts_options(0)
    x, y = digits.test_x[:30], digits.test_y[:30]

    def shifts(**options):
        _, _, params = A.make_pairs(x, y, torch.Generator().manual_seed(4), **options)
        return params["first"], params["second"]

    for p, sign in zip(shifts(**opts[0]), (-1, 1)):
        room = 1 - p["scale"] * 28 / 42
        torch.testing.assert_close(p["shift"], sign * room[:, None].expand(-1, 2), rtol=0, atol=1e-12)
    uniform = shifts(**{k: v for k, v in opts[5].items() if not k.startswith("place")})
    for half, anywhere, corner in zip(shifts(**opts[5]), uniform, shifts(**{**opts[5], "place_weight": 1.0})):
        assert not torch.equal(anywhere["shift"], corner["shift"])  # the same draws: halfway between the two
        torch.testing.assert_close(half["shift"], (anywhere["shift"] + corner["shift"]) / 2, rtol=0, atol=1e-12)
    for bad in ({"place": (2.0, 0.0)}, {"place": (0.0,)}, {"place": (0.0, 0.0), "place_weight": 1.5}):
        with pytest.raises(ValueError, match="place: expected"):
            A.make_pairs(x, y, torch.Generator().manual_seed(0), **bad)
    for bad in ((7, 3), (3,), (-1, 2)):
        with pytest.raises(ValueError, match="separate: expected two epochs, hold and end, 0 <= hold < end"):
            A.AdditionConfig(separate=bad)
    p = parser("addition")
    assert p.parse_args(["--no-separate"]).separate == [] and p.parse_args([]).separate == [10, 30]
    classify = parser()
    assert classify.parse_args(["--no-pose-curriculum"]).pose_curriculum == []
    assert classify.parse_args([]).pose_curriculum == [8, 16]
    assert "(default: 8 16)" in " ".join(classify.format_help().split())


@pytest.mark.parametrize("name", A.MODELS)
def test_addition_models(reference, name):
    model = A.build(name, 42, 28)
    x = torch.rand(3, 2, 42, 42)
    out = model(x)
    assert out.shape == (3, 19)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    if name == "ST-CNN-multi":
        assert model.transformer.num_transforms == 2 and model.front(x).shape == (3, 4, 28, 28)
    if name == "ST-CNN-split":  # each transformer's output alone gives its digit's logits
        clf = model.classifier
        front = model.front(x).detach()
        moved = front.clone()
        moved[:, 2:] = torch.rand_like(moved[:, 2:])  # the second transformer's output changed
        clf.sum = torch.nn.Identity()  # the two digits' raw logits (N, 20)
        before, after = clf(front), clf(moved)
        torch.testing.assert_close(after[:, :10], before[:, :10])
        assert (after[:, 10:] - before[:, 10:]).abs().min() > 0
    counts = {m: A.count_parameters(built(m)) for m in ("FCN", "CNN", "ST-CNN-multi", "ST-CNN-split")}
    assert max(counts.values()) < 1.1 * min(counts.values())  # comparable counts


def test_attention_report_on_transformers_set_by_hand(digits):
    """Two transformers set by hand: the first zooms onto the first channel's digit, the second onto
    the second's; the report says so."""
    x, y = digits.test_x[:16], digits.test_y[:16]
    images, _, params = A.make_pairs(x, y, torch.Generator().manual_seed(3), canvas_factor=1.5)
    model = built("ST-CNN-multi")
    tr = model.transformer

    class Known(torch.nn.Module):  # the localisation "features": the two digits' centres
        def forward(self, inp):
            return torch.cat([params["first"]["shift"], params["second"]["shift"]], 1).float()[:inp.shape[0]]

    tr.localization = Known()
    tr.head = torch.nn.Linear(4, 12)
    with torch.no_grad():
        tr.head.weight.zero_()
        tr.head.bias.copy_(torch.tensor([0.7, 0, 0, 0, 0.7, 0] * 2))
        for k, (cx, cy) in enumerate(((0, 1), (2, 3))):
            tr.head.weight[6 * k + 2, cx] = 1
            tr.head.weight[6 * k + 5, cy] = 1
    rep = A.attention_report(model, images, params)
    t1, t2 = rep["transformers"]
    assert t1["attends"] == 0 and t2["attends"] == 1
    assert t1["nearer"][0] > 0.9 and t2["nearer"][1] > 0.9
    assert t1["centre_offset"][0] < 1e-6 and t2["centre_offset"][1] < 1e-6
    assert t1["ink_held"][0] > 0.9 and t2["ink_held"][1] > 0.9  # the whole digit in its window
    assert t1["scale"] == pytest.approx(0.7)
    identity = A.attention_report(built("ST-CNN-multi"), images, params)
    for t in identity["transformers"]:  # at the start each window is the canvas: all of both digits
        assert t["ink_held"] == pytest.approx([1, 1], abs=0.02)


# --- co-localisation: the data ----------------------------------------------------------------------------

def test_colocalisation_canvases_and_boxes(digits):
    x = digits.train_x[digits.train_y == 3][:10]
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    images, boxes, params = C.make_canvases(x, gen(), 60, clutter=6, clutter_from=digits.train_x)
    assert images.shape == (10, 1, 60, 60) and boxes.shape == (10, 4)
    assert torch.equal(images, C.make_canvases(x, gen(), 60, clutter=6, clutter_from=digits.train_x)[0])
    plain, same_boxes, _ = C.make_canvases(x, gen(), 60, clutter=0)  # the same placement, no clutter
    assert torch.equal(boxes, same_boxes) and (images >= plain - 1e-6).all() and images.sum() > plain.sum()
    side = boxes[:, 2] - boxes[:, 0]
    assert torch.allclose(side, boxes[:, 3] - boxes[:, 1]) and (side > 8).all() and (side <= 21).all()
    for i in range(10):  # every ink pixel of the digit lies inside its box (to the bilinear blur's pixel)
        ys, xs = torch.nonzero(plain[i, 0] > C.INK, as_tuple=True)
        assert len(ys) > 10
        x0, y0, x1, y1 = boxes[i].tolist()
        assert xs.min() >= x0 - 1 and xs.max() + 1 <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() + 1 <= y1 + 1
        # and the box is tight along its longer side
        assert min(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) <= side[i] + 2
        assert max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) >= side[i] - 2


def test_colocalisation_class_splits(digits):
    d = digits.hold_out(0.2)
    cfg = C.ColocalisationConfig(repeats=3, curriculum=5)
    train, train_boxes, _ = C.class_canvases("train", d, 7, 0, cfg, epoch=0)
    assert len(train) == 3 * int((d.train_y == 7).sum()) and len(train_boxes) == len(train)
    test = C.class_canvases("test", d, 7, 0, cfg)
    assert torch.equal(test[0], C.class_canvases("test", d, 7, 0, cfg)[0]) and len(test[0]) == (d.test_y == 7).sum()
    # the curriculum: in the first epoch the digits stay within a fifth of their room
    shift = C.class_canvases("train", d, 7, 0, cfg, epoch=0)[2]["shift"]
    assert shift.abs().max() <= (1 - 28 / 60) / 5 + 1e-9


def test_encoder_views_bare_and_cluttered(digits):
    """The encoder's windows cut from a cluttered canvas hold the bare window's digit where the bare
    one has it (clutter only adds ink), and with no clutter are the bare window itself."""
    x = digits.train_x[:32]
    bare = C.encoder_views(x, torch.Generator().manual_seed(0), C.ColocalisationConfig(), 0.0)
    for clutter in (0, 6):
        cfg = C.ColocalisationConfig(clutter=clutter)
        views = C.encoder_views(x, torch.Generator().manual_seed(0), cfg, 0.0, digits.train_x)
        assert views.shape == bare.shape == (32, 1, 24, 24)
        assert (views - bare).min() > -1e-5
        changed = ((views - bare).abs() > 1e-3).flatten(1).any(1).float().mean()
        assert changed == 0 if clutter == 0 else changed > 0.5


def test_window_family_iou_and_the_loss(digits):
    fam = C.Window(0.4)
    theta = torch.tensor([[0.1, -0.2]])
    tx, ty = 0.6 * torch.tanh(torch.tensor([0.1, -0.2]))  # the window stays on the canvas
    torch.testing.assert_close(fam.kernel_form(theta, (8, 8)).m, torch.tensor([[[0.4, 0, tx], [0, 0.4, ty]]]))
    assert fam.full(torch.tensor([[50.0, -50.0]]))[0].tolist() == pytest.approx([0.4, 0.6, -0.6])
    assert fam.num_params == 2 and C.Window(0.4, learn_scale=True).identity().tolist() == pytest.approx([0.4, 0, 0])
    box = C.window_boxes(torch.tensor([[0.4, 0.0, 0.0]]), 60)
    torch.testing.assert_close(box, torch.tensor([[18.0, 18, 42, 42]], dtype=torch.float64))
    # a learnt scale gone negative is the same square turned half a turn: the same box, scored and drawn
    torch.testing.assert_close(C.window_boxes(torch.tensor([[-0.4, 0.0, 0.0]]), 60), box)
    cells = [[((30.0, 30.0, 30.2, 30.2), "red"), ((42.0, 42.0, 18.0, 18.0), "green")]]  # tiny; right to left
    assert _tile(torch.rand(1, 1, 60, 60), 84, cells).size == (88, 88)
    a = torch.tensor([0.0, 0, 2, 2])
    assert C.iou(a, a) == 1 and C.iou(a, torch.tensor([1.0, 0, 3, 2])) == pytest.approx(1 / 3)
    assert C.iou(a, torch.tensor([5.0, 5, 6, 6])) == 0
    # the hinge: zero when crops agree and random windows differ by more than the margin
    model = C.Colocaliser(60, 0.4, 24)
    enc = C.Encoder(24)
    x = torch.rand(1, 1, 60, 60).expand(4, 1, 60, 60)  # four copies of one image
    model(x)
    # at the start each crop is the centre window, here also the random window: d_pos = d_neg = 0
    loss = C.triplet_loss(model, enc, x, torch.zeros(4, 2), 1.0, 24)
    assert loss.item() == pytest.approx(1.0, abs=1e-5)
    far = C.triplet_loss(model, enc, x, torch.ones(4, 2), 1.0, 24)  # random windows in the corner
    assert far.item() < 1.0
    far.backward()
    assert model.transformer.head.weight.grad is not None and all(p.grad is None for p in enc.parameters()
                                                                  if not p.requires_grad)
    # negatives near the crop: rand_u 0 puts the negative on the crop itself; a reach past the canvas's edge
    # is clamped there (the centre window of scale 0.4 has 0.6 of room each way: the corner window above)
    assert C.triplet_loss(model, enc, x, torch.zeros(4, 2), 1.0, 24, reach=0.5).item() == pytest.approx(1.0, abs=1e-5)
    near = C.triplet_loss(model, enc, x, torch.ones(4, 2), 1.0, 24, reach=0.5)
    assert near.item() < 1.0 and near.item() != pytest.approx(far.item())
    assert C.triplet_loss(model, enc, x, torch.ones(4, 2), 1.0, 24, reach=10.0).item() == pytest.approx(far.item())
    # the paper's double sum: a hinge for every ordered pair n != m, against n's own negative
    y = torch.rand(5, 1, 60, 60)
    u = 2 * torch.rand(5, 2) - 1
    e = enc.embed(model(y))
    r = enc.embed(C.crop(y, torch.cat([torch.full((5, 1), 0.4), u * 0.6], 1), 24))
    d_neg = (e - r).square().sum(1)
    pairs = [max(0.0, (e[n] - e[m]).square().sum().item() + 1.0 - d_neg[n].item())
             for n in range(5) for m in range(5) if m != n]
    every = C.triplet_loss(model, enc, y, u, 1.0, 24, positives="all")
    assert every.item() == pytest.approx(sum(pairs) / 20, rel=1e-5)
    nxt = [max(0.0, (e[n] - e[n - 1]).square().sum().item() + 1.0 - d_neg[n].item()) for n in range(5)]
    assert C.triplet_loss(model, enc, y, u, 1.0, 24).item() == pytest.approx(sum(nxt) / 5, rel=1e-5)


def test_score_against_known_windows(digits):
    x = digits.test_x[:6]
    images, boxes, params = C.make_canvases(x, torch.Generator().manual_seed(0), 60, clutter=0)
    cfg = C.ColocalisationConfig(random_draws=50)

    class Oracle(torch.nn.Module):  # windows on the true boxes
        def windows(self, inp):
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / 60 * 2 - 1
            return torch.cat([(boxes[:, 2:3] - boxes[:, :1]) / 60, centre], 1).float()

    sc = C.score(Oracle(), images, boxes, cfg, torch.Generator().manual_seed(0))
    assert sc["hit"].all() and (sc["iou"] > 0.99).all() and (sc["offset_px"] < 1e-4).all()
    assert (sc["random_hit"] < 0.3).all()  # a random window rarely finds a digit on a 60 px canvas


# --- smoke runs, tables, figures, the CLI ------------------------------------------------------------------

def test_addition_smoke_run(reference, tmp_path):
    cfg = A.AdditionConfig(models=A.MODELS, seeds=(0, 1, 2), epochs=1, train_limit=40, test_limit=12,
                           batch_size=16, out=str(tmp_path / "add"), progress=False, figure_count=4, workers=1)
    lines = []
    summary = A.run(cfg, log=lines.append)
    res = summary["results"]
    assert len(res) == 3 * len(A.MODELS) and all(0 <= r["error"] <= 100 for r in res)
    assert sum("seed" in line and "test error" in line for line in lines) == len(res)  # one line per run
    for r in res:
        assert ("attention" in r) == r["model"].startswith("ST")
    saved = json.loads((tmp_path / "add" / "results.json").read_text())
    assert saved["results"] == res and saved["config"]["models"] == list(A.MODELS)
    table = (tmp_path / "add" / "table.md").read_text()
    for m in A.MODELS:
        assert f"| {m} |" in table
    assert "vs CNN" in table and "(baseline)" in table  # paired differences with three seeds
    assert re.search(r"\| ST-CNN-multi \| [\d.]+ ± [\d.]+ \([\d.]+k\) \| [+-][\d.]+ \[", table)
    img = Image.open(tmp_path / "add" / "figures" / "addition.png")
    assert img.mode == "RGB"
    # inputs + one row per transformer (single: 1, multi: 2), 4 images each
    assert img.height >= 24 + 4 * 88 and img.width == 110 + 4 * 88


def test_colocalisation_smoke_run(reference, tmp_path):
    cfg = C.ColocalisationConfig(classes=(0, 1), seeds=(0,), epochs=1, encoder_epochs=1, repeats=1, train_limit=60,
                                 test_limit=30, batch_size=16, random_draws=5, out=str(tmp_path / "col"),
                                 progress=False, figure_count=3, workers=1)
    summary = C.run(cfg, log=lambda *a: None)
    res = summary["results"]
    assert [r["class"] for r in res] == [0, 1, "all"]
    assert all(0 <= r["hit_pct"] <= 100 and 0 <= r["random_pct"] <= 100 for r in res)
    assert res[2]["n"] == res[0]["n"] + res[1]["n"] and summary["encoders"][0]["seed"] == 0
    table = (tmp_path / "col" / "table.md").read_text()
    assert "| all |" in table and "random window IoU > 0.5 (%)" in table and "labels used for it only" in table
    img = Image.open(tmp_path / "col" / "figures" / "colocalisation.png")
    shown = max(min(3, res[0]["n"]), min(3, res[1]["n"]))  # a row per class, up to 3 canvases each
    assert img.mode == "RGB" and img.width == 110 + shown * 100 and img.height >= 24 + 2 * 100 + 2 * 14


def _one_then_two(run, make_config, tmp_path):
    """``run`` of ``make_config(out, workers)`` one run after another at one thread (workers=1), then in two
    worker processes (workers=2, two threads here, so forked on Linux): both results and the second's log lines."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(make_config(str(tmp_path / "one"), 1), log=lambda *a: None)
        torch.set_num_threads(2)
        lines = []
        two = run(make_config(str(tmp_path / "two"), 2), log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return one, two, lines


def test_runs_in_parallel_processes_equal_runs_in_this_one(reference, tmp_path):
    """--workers 2 trains the runs in two worker processes (one thread each here): the same results,
    in the same order, as one after the other in this process at one thread; each run says its threads."""
    common = dict(models=("CNN", "ST-CNN-multi"), seeds=(0,), epochs=1, train_limit=40, test_limit=12, batch_size=16,
                  progress=False, figure_count=2)
    one, two, lines = _one_then_two(A.run, lambda out, w: A.AdditionConfig(**common, out=out, workers=w), tmp_path)
    keys = ("model", "seed", "error", "train_loss", "params", "attention", "threads")
    assert [{k: r[k] for k in keys if k in r} for r in one["results"]] == \
        [{k: r[k] for k in keys if k in r} for r in two["results"]]
    assert [r["threads"] for r in two["results"]] == [1, 1]
    assert sum("test error" in line for line in lines) == 2
    assert (tmp_path / "two" / "figures" / "addition.png").exists()


def test_classify_runs_in_parallel_processes_equal_runs_in_this_one(reference, tmp_path):
    """The main job too: --workers 2 gives the results of one run after another at one thread, in the
    same (distortion, seed, model) order, the same figures (the first seed's transformers) and the
    same saved models, written by the workers."""
    from stn_triton.integrations.digits import experiment as E
    from stn_triton.integrations.digits.models import load_model

    common = dict(distortions=("RTS",), models=("CNN", "ST-CNN-aff"), seeds=(1, 0), epochs=1, train_limit=40,
                  test_limit=12, batch_size=16, progress=False, figure_count=2, save_models=True)
    one, two, lines = _one_then_two(E.run, lambda out, w: E.Config(**common, out=out, workers=w), tmp_path)
    keys = ("distortion", "model", "seed", "error", "val_error", "train_loss", "params", "rotation", "threads",
            "model_file", "code")
    assert [{k: r[k] for k in keys if k in r} for r in one["results"]] == \
        [{k: r[k] for k in keys if k in r} for r in two["results"]]
    assert [(r["distortion"], r["seed"], r["model"]) for r in two["results"]] == [
        ("RTS", s, m) for s in (1, 0) for m in ("CNN", "ST-CNN-aff")]
    assert [r["threads"] for r in two["results"]] == [1] * 4
    assert all(r["code"] == two["code"] for r in two["results"])
    assert sum("test error" in line for line in lines) == 4
    for r in two["results"]:
        a = load_model(tmp_path / "one" / r["model_file"]).state_dict()
        b = load_model(tmp_path / "two" / r["model_file"]).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = Image.open(tmp_path / "one" / "figures" / "RTS.png")
    b = Image.open(tmp_path / "two" / "figures" / "RTS.png")
    assert a.size == b.size and a.tobytes() == b.tobytes()


_SET_AT_RUN_TIME = {}


def _job_facts(cfg, job, bar):
    """A job for run_jobs: what it saw, as a worker (module-level, so a spawned worker can import it)."""
    import os
    return job, torch.get_num_threads(), os.getpid(), _SET_AT_RUN_TIME.get("by the parent", False)


@pytest.mark.parametrize("threads, method", [(2, "fork"), (4, "spawn")])
def test_workers_fork_with_one_thread_each_and_spawn_otherwise(threads, method):
    """run_jobs forks its CPU workers when each gets one thread (they start with this process's imports
    and data) and spawns them when each gets more (a forked process must not use the OpenMP pool it
    inherits) or on a GPU; either way the results come back in the jobs' order."""
    import multiprocessing
    import os

    from stn_triton.integrations.digits import experiment as E

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("this OS cannot fork")
    assert E._start_method(E.Config(device="cuda"), 1) == "spawn"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        cfg = E.Config(workers=2)
        assert E._start_method(cfg, threads // 2) == method
        _SET_AT_RUN_TIME["by the parent"] = True
        got = E.run_jobs(_job_facts, [3, 1, 2], cfg)
    finally:
        torch.set_num_threads(before)
        _SET_AT_RUN_TIME.clear()
    assert [g[0] for g in got] == [3, 1, 2]
    assert {g[1] for g in got} == {threads // 2}
    assert os.getpid() not in {g[2] for g in got} and len({g[2] for g in got}) <= 2
    # a forked worker has this process's state from the start; a spawned one imports its modules afresh
    assert [g[3] for g in got] == [method == "fork"] * 3


def test_task_configs_refuse_bad_values():
    with pytest.raises(ValueError, match="workers: expected a number of processes >= 0"):
        A.AdditionConfig(workers=-1)
    with pytest.raises(ValueError, match="models: expected some of"):
        A.AdditionConfig(models=("CNN", "ST-CNN-aff"))
    with pytest.raises(ValueError, match="warmup: expected a number of epochs >= 0, got -1"):
        A.AdditionConfig(warmup=-1)
    with pytest.raises(ValueError, match="canvas and window"):
        C.ColocalisationConfig(window=60)


def test_cli_tasks(reference, tmp_path, capsys):
    assert list(TASKS) == ["classify", "addition", "colocalisation", "3d"]
    assert main(["--task", "addition", "--models", "CNN", "--seeds", "0", "--epochs", "1", "--train-limit", "30",
                 "--test-limit", "10", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "addition CNN" in printed and "| CNN |" in printed
    assert json.loads((tmp_path / "a" / "results.json").read_text())["config"]["canvas"] == 42
    assert main(["--task", "colocalisation", "--classes", "5", "--seeds", "0", "--epochs", "1", "--encoder-epochs",
                 "1", "--train-limit", "40", "--test-limit", "20", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "colocalisation digit 5 seed 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--task", "segment"])
    err = capsys.readouterr().err
    assert "argument --task: invalid choice: 'segment'" in err and "classify" in err and "colocalisation" in err
    with pytest.raises(SystemExit):  # an option of another task
        main(["--task", "addition", "--distortions", "R"])
    assert "unrecognized arguments: --distortions" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--task", "colocalisation", "--window", "80", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "stn-digits: error: --canvas and --window: expected" in capsys.readouterr().err


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_help(task):
    """As tests/test_cli_help.py checks the default parser: every option explained, each default once."""
    p = parser(task)
    text = p.format_help()
    assert "``" not in text and "(default: None)" not in text and "(default: False)" not in text
    for action in p._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{task} {action.option_strings[0]} has no help"
        shown = p._get_formatter()._expand_help(action)
        assert len(re.findall(r"\bdefault\b", shown)) <= 1, f"{task} {action.option_strings[0]}: {shown!r}"


def test_the_main_jobs_classifier_is_built_as_before():
    """The generalised cnn() (channels, batch norm, a hidden layer) builds the main job's CNN with the
    same modules in the same order, so the same seed gives the same weights (and the README's numbers)."""
    from torch import nn

    from stn_triton.integrations.digits.models import cnn

    torch.manual_seed(0)
    new = cnn(28)
    torch.manual_seed(0)
    old = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    assert list(new.state_dict()) == list(old.state_dict())
    for a, b in zip(new.state_dict().values(), old.state_dict().values()):
        assert torch.equal(a, b)
