"""The command lines' mistakes a user makes, each a one-line error naming the option (or the folder, or what
to install) before anything trains: ``stn-digits`` on an --out that holds a run (and --overwrite), on a
missing or wrong --data folder, without scikit-learn, with values that make no sense; ``stn-train-cub``
without timm. Each calls ``main(argv)`` with the tasks' training replaced by a tripwire."""

import importlib
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from stn_triton.integrations.digits import cli, colocalisation, experiment
from stn_triton.integrations.digits.cli import TASKS, main

# a file of each task's own in OUT (any one of them is a run)
TASK_FILES = {"classify": "figures/RTS.png", "addition": "figures/addition.png",
              "colocalisation": "figures/colocalisation.png", "3d": "figures/3d.png"}


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Every task's run (and the training loops under them) fails the test if it is reached."""
    def tripwire(*args, **kwargs):
        raise AssertionError("it went on to train")

    for name, task in TASKS.items():
        monkeypatch.setitem(TASKS, name, task._replace(run=tripwire))
    monkeypatch.setattr(experiment, "train_one", tripwire)
    monkeypatch.setattr(colocalisation, "fit", tripwire)


@pytest.fixture
def ran(monkeypatch):
    """Each task's run replaced by one that records the configuration it was given (and trains nothing);
    the CPU threads main sets are put back afterwards."""
    configs = []
    for name, task in TASKS.items():
        monkeypatch.setitem(TASKS, name, task._replace(run=configs.append))
    threads = torch.get_num_threads()
    yield configs
    torch.set_num_threads(threads)


def _usage_error(capsys, argv):
    """The last line argparse printed for ``argv`` (an option's value: usage, then the message, status 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: stn-digits"), err
    return err.strip().splitlines()[-1]


def _message(argv):
    """The message of the SystemExit ``main`` raised (status 1: what the console script prints)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str), e.value.code
    assert "\n" not in e.value.code
    return e.value.code


def _write_idx(folder, n_train=20, n_test=8, names=None, labels=(0, 0)):
    """A folder of blank MNIST-format images, every training image labelled labels[0], every test image
    labels[1] (``names``: only these files)."""
    folder.mkdir(parents=True, exist_ok=True)
    for (prefix, n), label in zip((("train", n_train), ("t10k", n_test)), labels):
        files = {f"{prefix}-images-idx3-ubyte": struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + bytes(n * 28 * 28),
                 f"{prefix}-labels-idx1-ubyte": struct.pack(">HBBI", 0, 8, 1, n) + bytes([label] * n)}
        for name, raw in files.items():
            if names is None or name in names:
                (folder / name).write_bytes(raw)
    return folder


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- an --out that holds a run ------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(TASKS))
def test_out_holding_a_run_is_refused(task, tmp_path):
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / TASK_FILES[task]).write_bytes(b"png")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert _message(["--task", task, "--out", str(out)]) == (
        f"stn-digits: {out} already holds a run (results.json, {TASK_FILES[task]}): pass --overwrite to delete it "
        "and start afresh, or another --out")
    assert _tree(out) == before  # nothing touched
    for name in ("results.json", "table.md", TASK_FILES[task], "models/R-ST-CNN-aff-seed0.pt"):  # any one is a run
        alone = tmp_path / f"only-{task}-{name.replace('/', '-')}"
        (alone / name).parent.mkdir(parents=True)
        (alone / name).write_bytes(b"x")
        assert f"already holds a run ({name})" in _message(["--task", task, "--out", str(alone)])


def test_a_run_of_another_task_is_a_run_too(tmp_path):
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "3d.png").write_bytes(b"png")
    assert "already holds a run (figures/3d.png)" in _message(["--out", str(out)])


def test_a_folder_of_the_users_files_is_not_a_run(tmp_path, ran):
    out = tmp_path / "mine"
    for name in ("notes.txt", "figures/mine.png", "models/mine.pt", "models/R-CNN-seed0.pt.bak", "results.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    before = _tree(out)
    assert main(["--data", str(_write_idx(tmp_path / "idx")), "--out", str(out), "--epochs", "1"]) == 0
    assert len(ran) == 1 and ran[0].out == str(out) and _tree(out) == before


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path, ran, capsys):
    out = tmp_path / "run"
    ours = ["results.json", "table.md", "figures/R.png", "figures/addition.png", "figures/3d.png",
            "models/R-CNN-seed0.pt", "models/RTS-ST-CNN-aff-seed-1.pt"]
    mine = ["notes.txt", "figures/mine.png", "models/mine.pt"]
    for name in ours + mine:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    data = ["--data", str(_write_idx(tmp_path / "idx"))]
    assert main(["--task", "addition", "--out", str(out), "--overwrite", *data]) == 0
    assert len(ran) == 1
    assert sorted(_tree(out)) == sorted(mine)
    err = capsys.readouterr().err
    assert (f"--overwrite: deleted the previous run's results.json, table.md, figures/R.png, figures/addition.png, "
            f"figures/3d.png, models/R-CNN-seed0.pt and 1 more in {out}") in err
    # figures/ and models/ go too once nothing is left in them
    (out / "figures" / "mine.png").unlink()
    (out / "models" / "mine.pt").unlink()
    (out / "figures" / "R.png").write_text("again")
    assert main(["--out", str(out), "--overwrite", *data]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # --overwrite on a folder without a run (or none at all) deletes and says nothing
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "new"), "--overwrite", *data]) == 0
    assert "--overwrite" not in capsys.readouterr().err


def test_overwrite_keeps_the_run_when_another_option_is_wrong(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    _usage_error(capsys, ["--out", str(out), "--overwrite", "--epochs", "0"])
    assert _message(["--out", str(out), "--overwrite", "--data", str(tmp_path / "nowhere")]).startswith(
        "stn-digits: --data")
    assert (out / "results.json").read_text() == "{}"


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    assert _message(["--out", str(tmp_path / "file")]) == f"stn-digits: --out {tmp_path / 'file'}: not a folder"


def test_a_device_that_is_none(tmp_path):
    assert _message(["--device", "gpu", "--out", str(tmp_path / "o")]) == \
        "stn-digits: --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"


# --- --data ------------------------------------------------------------------------------------------

EXPECTED = "expected 'digits', scikit-learn's bundled digits, or a folder of MNIST-format IDX files"


def test_data_folder_missing_or_without_idx_files(tmp_path):
    out = str(tmp_path / "o")
    assert _message(["--data", str(tmp_path / "nowhere"), "--out", out]) == \
        f"stn-digits: --data {tmp_path / 'nowhere'}: no such folder ({EXPECTED})"
    (tmp_path / "file").write_text("")
    assert _message(["--data", str(tmp_path / "file"), "--out", out]) == \
        f"stn-digits: --data {tmp_path / 'file'}: not a folder ({EXPECTED})"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _message(["--task", "3d", "--data", str(empty), "--out", out]) == (
        f"stn-digits: --data {empty}: no train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in it ({EXPECTED})")
    half = _write_idx(tmp_path / "half", names=("train-images-idx3-ubyte", "train-labels-idx1-ubyte"))
    assert _message(["--data", str(half), "--out", out]) == (
        f"stn-digits: --data {half}: no t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in it ({EXPECTED})")
    assert not (tmp_path / "o").exists()


def test_data_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """A damaged IDX file is found while reading, still before anything trains (the real run, up to
    its first training)."""
    monkeypatch.setitem(TASKS, "classify", TASKS["classify"]._replace(run=experiment.run))
    folder = _write_idx(tmp_path / "idx")
    (folder / "t10k-labels-idx1-ubyte").write_bytes((folder / "t10k-labels-idx1-ubyte").read_bytes()[:-3])
    assert _message(["--data", str(folder), "--out", str(tmp_path / "o")]) == (
        f"stn-digits: --data {folder}: IDX file {folder / 't10k-labels-idx1-ubyte'}: truncated: header says shape "
        "(8,) (16 bytes in all), file has 13 bytes")
    tiny = _write_idx(tmp_path / "tiny", n_train=3)  # too few for the validation split
    assert _message(["--data", str(tiny), "--out", str(tmp_path / "o")]) == (
        f"stn-digits: --data {tiny}: validation fraction 0.1: leaves no validation or no training images of 3")
    no_test = _write_idx(tmp_path / "no-test", n_test=0)
    assert _message(["--data", str(no_test), "--out", str(tmp_path / "o")]) == \
        f"stn-digits: --data {no_test}: no test images"
    assert not (tmp_path / "o").exists()  # nothing written either


def test_missing_scikit_learn_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    for task in TASKS:
        assert _message(["--task", task, "--out", str(tmp_path / "o")]) == (
            "stn-digits: --data digits (scikit-learn's bundled digits, the default) needs scikit-learn: pip install "
            "'stn-triton[digits]', or pass --data a folder of MNIST-format IDX files")


def test_without_scikit_learn_an_idx_folder_still_works(tmp_path, monkeypatch, ran):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert main(["--data", str(_write_idx(tmp_path / "idx")), "--out", str(tmp_path / "o")]) == 0
    assert len(ran) == 1


def test_colocalisation_classes_the_data_lacks(tmp_path, monkeypatch):
    """Found once the data is read, before the encoders train."""
    monkeypatch.setitem(TASKS, "colocalisation", TASKS["colocalisation"]._replace(run=colocalisation.run))
    folder = _write_idx(tmp_path / "idx", labels=(3, 4))
    base = ["--task", "colocalisation", "--data", str(folder), "--out", str(tmp_path / "o"), "--workers", "1"]
    assert _message(base + ["--classes", "3", "5", "12"]) == \
        "stn-digits: --classes: no training images of digits 5, 12 among the 18 training images of idx"
    assert _message(base + ["--classes", "3", "--train-limit", "10"]) == \
        "stn-digits: --classes: no test images of digit 3 among the 8 test images of idx"
    assert _message(base + ["--classes", "4", "--train-limit", "10", "--test-limit", "5"]) == (
        "stn-digits: --classes: no training images of digit 4 among the 9 training images of idx (the first 10, "
        "--train-limit)")


# --- values that make no sense ----------------------------------------------------------------------

def test_train_limit_too_small_for_the_validation_split(capsys, tmp_path, ran):
    out = ["--out", str(tmp_path / "o"), "--data", str(_write_idx(tmp_path / "idx"))]
    assert _usage_error(capsys, ["--train-limit", "5"] + out) == (
        "stn-digits: error: --train-limit 5: too few images to hold out --val-fraction 0.1 for validation and keep "
        "some for training; expected at least 6, or --val-fraction 0")
    assert "expected at least 2, or --val-fraction 0" in _usage_error(
        capsys, ["--task", "3d", "--train-limit", "1", "--val-fraction", "0.5"] + out)
    assert main(["--train-limit", "6"] + out) == 0  # the smallest that splits
    assert main(["--train-limit", "1", "--val-fraction", "0"] + out) == 0
    assert [c.train_limit for c in ran] == [6, 1]


NONSENSE = [
    (["--test-limit", "0"], "--test-limit: expected a positive number of images, got 0"),
    (["--train-limit", "-3"], "--train-limit: expected a positive number of images, got -3"),
    (["--threads", "0"], "--threads: expected a number of CPU threads, 1 or more (this machine has "),
    (["--threads", "-2"], "--threads: expected a number of CPU threads, 1 or more"),
    (["--epochs", "-1"], "--epochs: expected a positive int, got -1"),
    (["--batch-size", "0"], "--batch-size: expected a positive int, got 0"),
    (["--st-size", "0"], "--st-size: expected a positive int, got 0"),
    (["--lr", "0"], "--lr: expected a positive number, got 0.0"),
    (["--lr", "inf"], "--lr: expected a positive number, got inf"),
    (["--localization-lr-scale", "nan"], "--localization-lr-scale: expected a positive number, got nan"),
    (["--val-fraction", "1"], "--val-fraction: expected a number in [0, 1), got 1.0"),
    (["--object-scale", "0"], "--object-scale: expected a number in (0, 1], got 0.0"),
    (["--keep", "best", "--val-fraction", "0"],
     "--keep: 'best' chooses on the validation split: give --val-fraction > 0"),
    (["--curriculum", "-2"], "--curriculum: expected a number of epochs >= 0, got -2"),
    (["--pose-curriculum", "5", "3"],
     "--pose-curriculum: expected two epochs, hold and end, 0 <= hold < end (or none), got (5, 3)"),
    (["--seeds", "0", "1", "0"], "--seeds: 0 given twice"),
    (["--models", "CNN", "CNN"], "--models: CNN given twice"),
    (["--distortions", "R", "R"], "--distortions: R given twice"),
    (["--task", "addition", "--workers", "-1"], "--workers: expected a number of processes >= 0"),
    (["--task", "addition", "--canvas", "10"], "--canvas: expected a side of at least 28 px, got 10"),
    (["--task", "addition", "--warmup", "-1"], "--warmup: expected a number of epochs >= 0, got -1"),
    (["--task", "addition", "--separate", "5", "3"],
     "--separate: expected two epochs, hold and end, 0 <= hold < end (or none), got (5, 3)"),
    (["--task", "addition", "--epochs", "0"], "--epochs: expected a positive int, got 0"),
    (["--task", "colocalisation", "--classes", "-1"], "--classes: expected digit classes (0 and up), got -1"),
    (["--task", "colocalisation", "--classes", "3", "3"], "--classes: 3 given twice"),
    (["--task", "colocalisation", "--clutter", "-1"], "--clutter: expected a number of pieces >= 0, got -1"),
    (["--task", "colocalisation", "--window", "80"], "--canvas and --window: expected a canvas of at least 28 px"),
    (["--task", "colocalisation", "--margin", "inf"], "--margin: expected a positive number, got inf"),
    (["--task", "colocalisation", "--negative-reach", "-1"],
     "--negative-reach: expected half-widths >= 0 (0: anywhere), got -1.0"),
    (["--task", "colocalisation", "--repeats", "0"], "--repeats: expected a positive int, got 0"),
    (["--task", "colocalisation", "--encoder-epochs", "0"], "--encoder-epochs: expected a positive int, got 0"),
    (["--task", "colocalisation", "--encoder-jitter", "-1"], "--encoder-jitter: expected px >= 0, got -1.0"),
    (["--task", "colocalisation", "--positives", "some"], "argument --positives: invalid choice: 'some' (choose from 'next', 'all')"),
    (["--task", "3d", "--scale", "0.5", "0.95"], "--scale: expected at most 0.8485"),
    (["--task", "3d", "--max-tilt", "100"], "--max-tilt: expected degrees in [0, 90], got 100.0"),
    (["--task", "3d", "--translate", "nan"], "--translate: expected a share in [0, 1], got nan"),
    (["--task", "3d", "--repeats", "-1"], "--repeats: expected an int >= 0 (0: rendered every epoch), got -1"),
    (["--task", "3d", "--depth", "0"], "--depth: expected a positive int, got 0"),
]


@pytest.mark.parametrize("argv,message", NONSENSE, ids=[" ".join(argv) for argv, _ in NONSENSE])
def test_values_that_make_no_sense_are_argument_errors(argv, message, capsys, tmp_path):
    line = _usage_error(capsys, argv + ["--out", str(tmp_path / "o")])
    assert line.startswith("stn-digits: error: " + message), line
    assert not (tmp_path / "o").exists()


def test_as_options_leaves_paths_and_prose_alone():
    args = cli.parser().parse_args([])
    assert cli._as_options("data /x/models/seeds_1: val_fraction 0.1, the models", args) == \
        "--data /x/models/seeds_1: --val-fraction 0.1, the models"
    assert cli._as_options("no colon in val_fraction", args) == "no colon in --val-fraction"


# --- stn-train-cub without timm ---------------------------------------------------------------------

TIMM_MISSING = "stn-train-cub: needs timm, which is not installed: pip install 'stn-triton[timm]'"


@pytest.fixture
def fresh_train(monkeypatch):
    """``fresh_train(bare_package)``: stn_triton.integrations.timm.train imported afresh with timm not
    importable; the modules (and the package's attribute) are as they were after the test.
    ``bare_package``: its package stands in without running its __init__.py, to see what train.py itself
    needs."""
    import stn_triton.integrations as integrations

    prefix = "stn_triton.integrations.timm"
    saved = {n: m for n, m in sys.modules.items() if n == prefix or n.startswith(prefix + ".")}
    had = "timm" in vars(integrations)
    attribute = vars(integrations).get("timm")
    for name in saved:
        del sys.modules[name]
    monkeypatch.setitem(sys.modules, "timm", None)

    def fresh(bare_package):
        if bare_package:
            package = types.ModuleType(prefix)
            package.__path__ = [str(Path(integrations.__path__[0]) / "timm")]
            sys.modules[prefix] = package
        return importlib.import_module(prefix + ".train")

    yield fresh
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]
    sys.modules.update(saved)
    if had:
        integrations.timm = attribute
    elif "timm" in vars(integrations):
        del integrations.timm


def test_train_cub_help_and_the_missing_timm_message(fresh_train, capsys):
    train = fresh_train(bare_package=True)
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stn-train-cub") and "It needs timm: pip install 'stn-triton[timm]'." in out
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "nowhere", "--out", "nowhere"])
    assert e.value.code == TIMM_MISSING
    with pytest.raises(SystemExit) as e:  # the arguments are still checked first
        train.main(["--data", "nowhere", "--out", "nowhere", "--epochs", "0"])
    assert e.value.code == 2


def test_train_cub_with_a_timm_that_does_not_import(fresh_train, monkeypatch):
    train = fresh_train(bare_package=True)

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "timm":
                raise ImportError("libsomething.so: cannot open shared object file")

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "nowhere", "--out", "nowhere"])
    assert e.value.code == ("stn-train-cub: timm does not import (ImportError: libsomething.so: cannot open shared "
                            "object file): reinstall it: pip install 'stn-triton[timm]'")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "nowhere", "--out", "nowhere"])
    assert e.value.code == TIMM_MISSING


def test_train_cub_help_without_timm_through_its_package(fresh_train, capsys):
    train = fresh_train(bare_package=False)
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: stn-train-cub")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "nowhere", "--out", "nowhere"])
    assert e.value.code == TIMM_MISSING
    package = sys.modules["stn_triton.integrations.timm"]
    with pytest.raises(ModuleNotFoundError, match=r"ParallelSTNet: .*needs timm: pip install 'stn-triton\[timm\]'"):
        package.ParallelSTNet
