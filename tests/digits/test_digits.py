"""The distorted-digits experiment: data readers, distortions, models, a smoke run and the CLI."""

import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import stn_triton as st
from stn_triton.integrations.digits import data as D
from stn_triton.integrations.digits.cli import main
from stn_triton.integrations.digits.distortions import DISTORTIONS, canvas_size, distort, homography
from stn_triton.integrations.digits import experiment as E
from stn_triton.integrations.digits.experiment import Config, TrainConfig, fit, format_table, run
from stn_triton.integrations.digits.models import MODELS, build, count_parameters

CANVAS = {"R": 28, "RTS": 42, "P": 28, "E": 28, "TC": 60}
IDENTITY = {"R": dict(max_angle=0.0), "RTS": dict(max_angle=0.0, scale=(1.0, 1.0), translate=False),
            "P": dict(scale=(1.0, 1.0), corner_std=0.0), "E": dict(point_std=0.0),
            "TC": dict(clutter=0, translate=False)}


@pytest.fixture(scope="module")
def digits():
    return D.load_sklearn_digits()


def test_sklearn_digits(digits):
    assert digits.train_x.shape == (1348, 1, 28, 28) and digits.test_x.shape == (449, 1, 28, 28)
    assert digits.train_x.dtype == torch.float32 and 0 <= digits.train_x.min() and digits.train_x.max() <= 1
    assert set(digits.train_y.tolist()) == set(range(10))
    assert digits.train_x[:, :, :4].abs().sum() == 0  # MNIST-like: a 20 x 20 digit in a 28 x 28 frame
    again = D.load_sklearn_digits()
    assert torch.equal(again.test_y, digits.test_y)  # the split is fixed


@pytest.mark.parametrize("name", DISTORTIONS)
def test_distortion_shape_range_determinism(digits, name):
    x = digits.test_x[:6]
    a = distort(name, x, torch.Generator().manual_seed(5))
    b = distort(name, x, torch.Generator().manual_seed(5))
    c = distort(name, x, torch.Generator().manual_seed(6))
    assert a.shape == (6, 1, CANVAS[name], CANVAS[name]) == (6, 1, canvas_size(name), canvas_size(name))
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.flatten(1).sum(1) > 0.3 * x.flatten(1).sum(1)).all()  # the digit is still in view


@pytest.mark.parametrize("name", DISTORTIONS)
def test_identity_settings_give_the_digit(digits, name):
    x = digits.test_x[:5]
    out = distort(name, x, torch.Generator().manual_seed(0), **IDENTITY[name])
    pad = (CANVAS[name] - 28) // 2
    centre = out[..., pad:pad + 28, pad:pad + 28]
    torch.testing.assert_close(centre, x, rtol=0, atol=1e-4)
    outside = out.clone()
    outside[..., pad:pad + 28, pad:pad + 28] = 0
    assert outside.abs().max() < 1e-6  # nothing outside the frame


def test_distortions_really_distort(digits):
    x = digits.test_x[:8]
    for name in ("R", "P", "E"):
        assert (distort(name, x, torch.Generator().manual_seed(1)) - x).abs().mean() > 0.03, name


def test_clutter_comes_from_other_digits(digits):
    x = digits.test_x[:4]
    plain = distort("TC", x, torch.Generator().manual_seed(3), clutter=0)
    cluttered = distort("TC", x, torch.Generator().manual_seed(3), clutter=6)
    assert (cluttered >= plain - 1e-6).all() and cluttered.sum() > plain.sum()


def test_homography_maps_the_points():
    gen = torch.Generator().manual_seed(0)
    src = torch.tensor([[-1.0, -1], [1, -1], [1, 1], [-1, 1]]).expand(3, 4, 2)
    dst = src + 0.2 * torch.randn(3, 4, 2, generator=gen)
    h = homography(src, dst)
    p = torch.cat([src.double(), torch.ones(3, 4, 1, dtype=torch.float64)], -1) @ h.transpose(1, 2)
    torch.testing.assert_close(p[..., :2] / p[..., 2:], dst.double())


def test_bad_distortion_input(digits):
    with pytest.raises(ValueError, match=r"distortion: expected one of R, RTS, P, E, TC, got 'X'"):
        distort("X", digits.test_x[:2], torch.Generator())
    with pytest.raises(ValueError, match=r"digits: expected \(N, 1, 28, 28\), got \(2, 1, 8, 8\)"):
        distort("R", torch.zeros(2, 1, 8, 8), torch.Generator())


# --- IDX files ------------------------------------------------------------------------------------

def _idx(array, code=0x08):
    return struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(folder, n_train=12, n_test=5, side=28, gz=False):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {f"{prefix}-images-idx3-ubyte": _idx(rng.integers(0, 256, (n, side, side), dtype=np.uint8)),
                 f"{prefix}-labels-idx1-ubyte": _idx(rng.integers(0, 10, n, dtype=np.uint8))}
        for name, raw in files.items():
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx(a))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(a)))
    f = np.linspace(-1, 1, 6).astype(">f4")
    (tmp_path / "f").write_bytes(_idx(f, 0x0D))
    assert np.array_equal(D.read_idx(tmp_path / "a"), a) and np.array_equal(D.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "f"), f.astype(np.float32))


@pytest.mark.parametrize("mutate,match", [
    (lambda raw: raw[:-5], r"truncated: header says shape \(2, 3, 4\) \(40 bytes in all\), file has 35 bytes"),
    (lambda raw: raw[:9], r"truncated header \(9 of 16 bytes\)"),
    (lambda raw: raw[:2], r"2 bytes, too short"),
    (lambda raw: b"\x08\x03\x00\x00" + raw[4:], r"bad magic number 0x08030000"),
    (lambda raw: b"\x00\x00\x07\x03" + raw[4:], r"bad magic number 0x00000703"),
    (lambda raw: raw + b"\x00", r"trailing data"),
], ids=["truncated-data", "truncated-header", "tiny", "magic-order", "magic-type", "trailing"])
def test_read_idx_errors(tmp_path, mutate, match):
    raw = _idx(np.zeros((2, 3, 4), dtype=np.uint8))
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mutate(raw))
    with pytest.raises(ValueError, match=match) as err:
        D.read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_missing_and_bad_gzip(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.read_idx(tmp_path / "nope")
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"x.gz: cannot decompress"):
        D.read_idx(tmp_path / "x.gz")


@pytest.mark.parametrize("gz,side", [(False, 28), (True, 20)])
def test_load_idx_dir(tmp_path, gz, side):
    d = D.load_idx_dir(_write_mnist(tmp_path / "mnist", side=side, gz=gz))
    assert d.train_x.shape == (12, 1, 28, 28) and d.test_x.shape == (5, 1, 28, 28)
    assert d.train_x.min() >= 0 and d.train_x.max() <= 1 and d.train_y.dtype == torch.int64
    if side == 28:
        raw = D.read_idx(tmp_path / "mnist" / "train-images-idx3-ubyte")
        torch.testing.assert_close(d.train_x[:, 0] * 255, torch.from_numpy(raw).float() * 255 / raw.max())


def test_load_idx_dir_errors(tmp_path):
    folder = _write_mnist(tmp_path / "m")
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"5 images but labels of shape \(4,\)"):
        D.load_idx_dir(folder)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"no t10k-labels-idx1-ubyte\[.gz\]"):
        D.load_idx_dir(folder)
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        D.load_idx_dir(tmp_path / "absent")


# --- models and runs -------------------------------------------------------------------------------

@pytest.fixture
def reference(monkeypatch):
    """Training smoke runs take the pure-PyTorch path (the kernels are tested in tests/core)."""
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")


@pytest.mark.parametrize("name", MODELS)
def test_models_forward_backward(reference, name):
    model = build(name, 42, 28)
    x = torch.rand(3, 1, 42, 42)
    out = model(x)
    assert out.shape == (3, 10)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert 20_000 < count_parameters(model) < 600_000
    if name.startswith("ST"):
        torch.testing.assert_close(model.transformer.head.bias.detach(),
                                   model.transformer.family.identity())  # starts at the identity
        groups = model.parameter_groups(1.0, 0.5)
        assert groups[0]["lr"] == pytest.approx(0.5) and groups[-1]["lr"] == 1.0
    else:  # the baselines' learnt stage starts as nothing: the classifier sees the resampled canvas
        torch.testing.assert_close(model.front(x), st.affine_sample(x, torch.eye(2, 3).expand(3, 2, 3), (28, 28)))


def test_bad_model_and_config():
    with pytest.raises(ValueError, match=r"model: expected one of FCN, CNN, .*got 'ST-RNN-aff'"):
        build("ST-RNN-aff", 28)
    with pytest.raises(ValueError, match=r"distortions: expected some of R, RTS, P, E, TC, got 'Q'"):
        Config(distortions=("Q",))
    with pytest.raises(ValueError, match=r"epochs: expected a positive int, got 0"):
        Config(epochs=0)


def test_precision_is_checked_and_auto_follows_the_cpu(monkeypatch):
    with pytest.raises(ValueError, match=r"precision: expected one of float32, bfloat16, auto, got 'fp16'"):
        Config(precision="fp16")
    with pytest.raises(ValueError, match=r"precision: bfloat16 \(autocast\) needs a cpu or cuda device, got "
                                         r"device 'mps'; expected float32 or auto there"):
        Config(precision="bfloat16", device="mps")
    assert TrainConfig().precision == "float32" and Config().precision == "auto"
    assert Config(precision="float32").compute_precision() == "float32"
    assert Config(precision="bfloat16").compute_precision() == "bfloat16"

    def auto(device="cpu"):
        E._native_bfloat16.cache_clear()  # (the answer is kept per device: the hardware does not change)
        return Config(device=device).compute_precision()
    for bf16, amx, want in [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert auto() == want
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: float32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert auto() == "float32"
    assert auto("mps") == "float32"  # no autocast made for it here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, want in [((7, 5), "float32"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")]:  # T4: emulated
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert auto("cuda:1") == want
    E._native_bfloat16.cache_clear()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_fit_trains_under_its_precision_and_validates_in_float32(reference, precision):
    """The steps' forward runs under bfloat16 autocast (the transformer's output and the classifier's
    logits bfloat16) or without; the loss is float32 either way, the weights stay float32 and learn,
    and validation sees the model without autocast."""
    torch.manual_seed(0)
    model = build("ST-CNN-aff", 28, 28)
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    model(x[:2])
    seen = {}

    def loss(m, xb, yb):
        logits = m(xb)
        seen.update(autocast=torch.is_autocast_enabled("cpu"), st=m.transformer(xb).dtype, logits=logits.dtype)
        return torch.nn.functional.cross_entropy(logits, yb)

    def val_error(m):
        seen["val_autocast"] = torch.is_autocast_enabled("cpu")
        return 0.0

    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=8, precision=precision)
    f = fit(model, cfg, lambda epoch: (x, y), 0, val_error, loss=loss)
    low = precision == "bfloat16"
    assert f.precision == precision and seen["autocast"] == low and not seen["val_autocast"]
    assert seen["st"] == seen["logits"] == (torch.bfloat16 if low else torch.float32)
    assert all(math.isfinite(v) for v in f.train_loss)
    assert all(v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert not torch.equal(model.state_dict()["transformer.head.weight"], before["transformer.head.weight"])


def test_smoke_run_every_model(reference, tmp_path):
    cfg = Config(distortions=("RTS", "E"), models=MODELS, seeds=(0, 1), epochs=1, train_limit=48, test_limit=20,
                 batch_size=16, out=str(tmp_path / "run"), progress=False, figure_count=5, workers=1)
    summary = run(cfg, log=lambda *a: None)
    res = summary["results"]
    assert len(res) == 2 * len(MODELS) * 2
    assert all(0 <= r["error"] <= 100 and r["params"] > 0 for r in res)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["results"] == res and saved["config"]["models"] == list(MODELS)
    table = (tmp_path / "run" / "table.md").read_text()
    for m in MODELS:
        assert f"| {m} |" in table
    assert table.splitlines()[2].startswith("| model | RTS % error (params) | RTS residual rotation (deg) | "
                                            "E % error (params) |")
    for d in ("RTS", "E"):
        img = Image.open(tmp_path / "run" / "figures" / f"{d}.png")
        # inputs + 6 transformers, 5 images each, and a caption line per transformer (what was measured)
        assert img.height == 24 + 7 * 88 + 6 * 14 + 8 and img.width == 110 + 5 * 88
    # the same seed gives the same result (distortions and initialisation are seeded)
    again = run(Config(**{**cfg.__dict__, "distortions": ("RTS",), "models": ("ST-CNN-aff",), "seeds": (1,),
                          "out": str(tmp_path / "again")}), log=lambda *a: None)
    first = next(r for r in res if r["distortion"] == "RTS" and r["model"] == "ST-CNN-aff" and r["seed"] == 1)
    assert again["results"][0]["error"] == first["error"]


def test_format_table_mean_and_spread():
    cfg = Config(distortions=("R", "P"), models=("CNN",), seeds=(0, 1))
    res = [{"distortion": d, "model": "CNN", "seed": s, "error": e, "params": p}
           for d, s, e, p in [("R", 0, 1.0, 1000), ("R", 1, 3.0, 1000), ("P", 0, 2.0, 3000), ("P", 1, 2.0, 3000)]]
    assert format_table(res, cfg).splitlines()[-1] == "| CNN | 2.0 ± 1.4 (1.0k) | — | 2.0 ± 0.0 (3.0k) |"


def test_cli(reference, tmp_path, capsys):
    folder = _write_mnist(tmp_path / "idx", n_train=20, n_test=8)
    assert main(["--data", str(folder), "--models", "CNN", "ST-FCN-tps", "--seeds", "3", "--epochs", "1",
                 "--batch-size", "8", "--distortions", "P", "--out", str(tmp_path / "o"), "--no-progress",
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "data: idx, 18 train / 2 validation / 8 test images" in printed and "| ST-FCN-tps |" in printed
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["config"]["seeds"] == [3] and saved["config"]["distortions"] == ["P"]
    want = "bfloat16" if E._native_bfloat16("cpu") else "float32"  # the default, auto, on this CPU
    assert saved["machine"]["precision"] == want and {r["precision"] for r in saved["results"]} == {want}
    assert f"training in {want}" in printed
    assert main(["--data", str(folder), "--models", "CNN", "--seeds", "3", "--epochs", "1", "--batch-size", "8",
                 "--distortions", "P", "--out", str(tmp_path / "f"), "--no-progress", "--workers", "1",
                 "--precision", "float32"]) == 0
    assert "training in float32, " in capsys.readouterr().out
    saved = json.loads((tmp_path / "f" / "results.json").read_text())
    assert saved["machine"]["precision"] == saved["results"][0]["precision"] == "float32"
    assert saved["config"]["precision"] == "float32"
    with pytest.raises(SystemExit):
        main(["--distortions", "Q"])
    assert "invalid choice: 'Q'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an option's value: argparse's error (usage, the message, status 2)
        main(["--epochs", "-1", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "stn-digits: error: --epochs: expected a positive int, got -1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA GPU is available"):
            main(["--device", "cuda"])
