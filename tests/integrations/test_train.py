"""The CUB trainer on a tiny CUB-format folder. Under torchrun (2 processes, gloo, CPU): an
interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one. In
this process: an --out folder that already holds a run (refused, --overwrite, --resume extending the
run), options that differ from the checkpoint's, checkpoints that are not ours, and --help."""

import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from _cub import make_cub

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "stn_mobilenetv3_small_2x", "--img-size", "64", "--branch-size", "32", "--loc-size", "32",
        "--batch-size", "2", "--workers", "0", "--no-progress", "--figure-count", "6", "--clip-grad", "1.0"]


def torchrun(data, out, *extra, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", STN_TRITON_FORCE_REFERENCE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "stn_triton.integrations.timm.train", "--data", str(data), "--out", str(out), *TINY, *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub(tmp_path_factory.mktemp("cub") / "CUB_200_2011", per_class=4)


def test_one_epoch_then_resume_equals_uninterrupted(cub, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    torchrun(cub, straight, "--epochs", "2")
    # "interrupted" after one epoch; --resume on a folder without a run yet starts one (as a job script would)
    done = torchrun(cub, broken, "--epochs", "2", "--stop-after", "1", "--resume")
    assert f"--resume: no checkpoint {broken / 'last.pt'} yet: starting a new run" in done.stderr
    assert "stopped after epoch 1 of 2 (--stop-after 1): continue with --resume" in done.stderr
    first = _metrics(broken)
    assert len(first) == 1 and first[0]["epoch"] == 1 and first[0]["processes"] == 2
    done = torchrun(cub, broken, "--epochs", "2", "--resume")
    assert f"resumed from {broken / 'last.pt'} after epoch 1 of 2\n" in done.stderr  # counted from 1, as in metrics
    assert "extending" not in done.stderr and "process(es)" not in done.stderr

    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(broken / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    ma, mb = _metrics(straight), _metrics(broken)
    assert [m["epoch"] for m in mb] == [1, 2]
    for x, y in zip(ma, mb):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
    # the localisation network learnt at a tenth of the rate
    assert a["optimizer"]["param_groups"][1]["lr"] == pytest.approx(a["optimizer"]["param_groups"][0]["lr"] * 0.1)
    assert not list(straight.glob("*.tmp"))  # the atomic write left nothing behind
    sheet = Image.open(straight / "attention.png")
    assert sheet.size == (4 * 64, 2 * 64)  # six validation images, four per row
    # the clipped run stays sane: every box is drawn inside the sheet, so it has the boxes' colours
    colours = {c for _, c in sheet.getcolors(1 << 16)}
    assert (230, 25, 75) in colours and (60, 180, 75) in colours


def _main(cub, out, *extra):
    """The trainer in this process, on the tiny model (``extra`` comes after TINY, so it may override it),
    on the samplers' reference path as under torchrun above (the kernels are tested elsewhere)."""
    from stn_triton.integrations.timm.train import main

    with mock.patch.dict(os.environ, {"STN_TRITON_FORCE_REFERENCE": "1"}):
        return main(["--data", str(cub), "--out", str(out), *TINY, *extra])


def _error(cub, out, *extra):
    """The message of the SystemExit the trainer raises (what the console script prints on stderr)."""
    with pytest.raises(SystemExit) as e:
        _main(cub, out, *extra)
    assert isinstance(e.value.code, str), e.value.code  # a message, so the exit status is 1
    return e.value.code


@pytest.fixture(scope="module")
def finished(cub, tmp_path_factory):
    """A finished 1-epoch run in this process, for tests to copy. Its folder exists beforehand and holds
    a file of the user's: that is not a run, so neither --resume nor --overwrite is needed."""
    out = tmp_path_factory.mktemp("finished") / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _main(cub, out, "--epochs", "1") == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "last.pt", "metrics.jsonl", "notes.txt"]
    return out


def _strip(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def test_trainer_errors(cub, tmp_path, capsys):
    msg = _error(tmp_path / "nowhere", tmp_path / "o")
    assert re.fullmatch(r"stn-train-cub: CUB root .*nowhere: not a folder", msg), msg
    (tmp_path / "file").write_text("")
    assert _error(cub, tmp_path / "file") == f"stn-train-cub: --out {tmp_path / 'file'}: not a folder"
    assert _error(cub, tmp_path / "o", "--device", "gpu") == \
        "stn-train-cub: --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"
    for bad in (["--epochs", "0"], ["--stop-after", "0"], ["--resume", "--overwrite"]):
        with pytest.raises(SystemExit) as e:  # argparse's errors: usage, the message, status 2
            _main(cub, tmp_path / "o", *bad)
        assert e.value.code == 2, bad
    err = capsys.readouterr().err
    assert "--epochs: expected a positive number, got 0" in err and "--stop-after: expected a positive number" in err
    assert "argument --overwrite: not allowed with argument --resume" in err
    assert not (tmp_path / "o").exists()


def test_out_holding_a_run_needs_resume_or_overwrite(cub, finished, tmp_path):
    out = shutil.copytree(finished, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    msg = _error(cub, out, "--epochs", "1")
    assert msg == (f"stn-train-cub: {out} already holds a run (last.pt, metrics.jsonl, attention.png): pass --resume "
                   "to continue it, or --overwrite to delete it and start afresh")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing was touched
    for name in ("last.pt", "metrics.jsonl", "attention.png", "last.pt.tmp"):  # any one of them is a run
        alone = tmp_path / f"only-{name}"
        alone.mkdir()
        (alone / name).write_bytes(b"x")
        assert f"already holds a run ({name})" in _error(cub, alone, "--epochs", "1")


def test_overwrite_starts_afresh(cub, finished, tmp_path, capsys):
    out = shutil.copytree(finished, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 7}\n')
    (out / "last.pt.tmp").write_bytes(b"left by a crash")
    capsys.readouterr()
    assert _main(cub, out, "--epochs", "1", "--overwrite") == 0
    err = capsys.readouterr().err
    assert f"--overwrite: deleted the previous run's last.pt, metrics.jsonl, attention.png, last.pt.tmp in {out}" in err
    assert "resumed" not in err
    assert _strip(_metrics(out)) == _strip(_metrics(finished))  # one epoch from scratch: the same as the first run
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "last.pt", "metrics.jsonl", "notes.txt"]
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 0


def test_resume_extends_a_finished_run(cub, finished, tmp_path, capsys):
    out = shutil.copytree(finished, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:  # as after a crash between an epoch's metrics and its checkpoint
        f.write('{"epoch": 2, "lr": -1}\n')
    capsys.readouterr()
    assert _main(cub, out, "--epochs", "2", "--resume") == 0
    err = capsys.readouterr().err
    assert f"resumed from {out / 'last.pt'} after epoch 1 of 1\n" in err
    assert "extending the run from 1 to 2 epochs: the schedule is now the cosine over 2 epochs\n" in err
    assert (f"--resume: dropped 1 line(s) from {out / 'metrics.jsonl'}: epochs after 1, which no checkpoint holds "
            "(they run again)") in err
    m = _metrics(out)
    assert [x["epoch"] for x in m] == [1, 2] and _strip(m[:1]) == _strip(_metrics(finished))
    assert m[1]["lr"] == 0.01 * (0.5 * (1 + math.cos(math.pi * 1 / 2)))  # epoch 2 of the cosine over 2
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["epochs"] == 2 and ckpt["scheduler"]["last_epoch"] == 2
    weights = (out / "last.pt").read_bytes()

    assert _main(cub, out, "--epochs", "2", "--resume") == 0  # done already
    assert (f"--resume: {out / 'last.pt'} has finished all 2 epochs of the run: nothing to do (a larger --epochs "
            "extends it)") in capsys.readouterr().err
    assert _error(cub, out, "--epochs", "1", "--resume") == (
        f"stn-train-cub: --resume: {out / 'last.pt'} has already finished 2 epochs, more than --epochs 1: pass "
        "--epochs 2 or more to continue it, or --overwrite to start afresh")
    assert (out / "last.pt").read_bytes() == weights and len(_metrics(out)) == 2


def test_resume_refuses_options_that_change_the_run(cub, finished, tmp_path):
    out = shutil.copytree(finished, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    msg = _error(cub, out, "--epochs", "2", "--resume", "--lr", "0.02", "--batch-size", "3", "--seed", "1")
    assert msg == (f"stn-train-cub: --resume: {out / 'last.pt'} was written with --batch-size 2 (this run: "
                   "--batch-size 3); --lr 0.01 (this run: --lr 0.02); --seed 0 (this run: --seed 1). Resuming with "
                   "other values would not continue that run: pass the checkpoint's values, or --overwrite to start "
                   "afresh")
    msg = _error(cub, out, "--epochs", "2", "--resume", "--model", "stn_inception_v3_4x", "--no-amp")
    assert "--model stn_mobilenetv3_small_2x (this run: --model stn_inception_v3_4x)" in msg
    assert "no --no-amp (this run: --no-amp)" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_checkpoints_that_are_not_ours_name_the_file(cub, finished, tmp_path):
    good = (finished / "last.pt").read_bytes()
    ckpt = torch.load(finished / "last.pt", map_location="cpu", weights_only=True)
    cases = {
        "truncated": (good[: len(good) // 2], "truncated or corrupt: the start of a zip archive"),
        "empty": (b"", "truncated or corrupt: the file is empty"),
        "random bytes": (random.Random(0).randbytes(4096), "not a stn-train-cub checkpoint (not a zip archive"),
        "a plain pickle": (pickle.dumps({"model": {}}), "not a stn-train-cub checkpoint (not a zip archive"),
        "an unrelated dict": ({"weights": torch.zeros(2), "step": 3},
                              "not a stn-train-cub checkpoint (missing 'model', 'optimizer', 'scheduler', 'epoch', "
                              "'args')"),
        "another model's state_dict": (torch.nn.Linear(2, 2).state_dict(), "not a stn-train-cub checkpoint (missing"),
        "a module object": (torch.nn.Linear(2, 2), "not a stn-train-cub checkpoint (it holds objects other than "
                                                   "tensors and plain data: Unsupported global"),
        "a tensor": (torch.zeros(3), "not a stn-train-cub checkpoint (it holds a Tensor, not a dict)"),
        "no optimizer": ({k: v for k, v in ckpt.items() if k != "optimizer"},
                         "not a stn-train-cub checkpoint (missing 'optimizer')"),
        "a bad epoch": (dict(ckpt, epoch="1"), "not a stn-train-cub checkpoint ('epoch' is '1', not an epoch index)"),
        "another model's weights": (dict(ckpt, model=torch.nn.Linear(2, 2).state_dict()),
                                    "its weights are not stn_mobilenetv3_small_2x's: it lacks "),
    }
    for i, (what, (content, expected)) in enumerate(cases.items()):
        out = tmp_path / f"case{i}"
        out.mkdir()
        if isinstance(content, bytes):
            (out / "last.pt").write_bytes(content)
        else:
            torch.save(content, out / "last.pt")
        msg = _error(cub, out, "--epochs", "2", "--resume")
        assert msg.startswith(f"stn-train-cub: {out / 'last.pt'}: {expected}"), (what, msg)
        assert "\n" not in msg and "Weights only" not in msg, (what, msg)


def test_console_reports_a_bad_checkpoint_in_one_line(cub, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "stn_triton.integrations.timm.train", "--data", str(cub), "--out",
                           str(tmp_path), "--resume", *TINY], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"stn-train-cub: {tmp_path / 'last.pt'}: truncated or corrupt: the start of a zip archive (torch.save's "
        "format) without its end, as in a file cut short")
    assert "Traceback" not in done.stderr


def test_help_states_each_option_and_its_default_once(capsys):
    from stn_triton.integrations.timm.train import main, parser

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for markup in ("(default: None)", "``", ":mod:", ":func:", ":class:", "%(default)"):
        assert markup not in text
    assert text.count("(default") == len(
        [a for a in parser()._actions if a.nargs is None and a.option_strings and not a.required])
    p = parser()
    for action in p._actions:
        if action.dest == "help":
            continue
        shown = p._get_formatter()._get_help_string(action) % vars(action)  # as argparse shows it
        assert action.option_strings[0] in text
        assert shown and "\n" not in shown, action.dest  # one line (argparse wraps it)
        # options with a value say their default once; flags and required options have none
        expected = 0 if action.required or action.nargs == 0 else 1
        assert shown.count("(default") == shown.count("default") == expected, (action.dest, shown)


def test_unknown_model_is_an_argument_error(capsys):
    from stn_triton.integrations.timm.train import main

    with pytest.raises(SystemExit) as e:
        main(["--data", "nowhere", "--out", "nowhere", "--model", "stn_mobilenetv3_smal_2x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--model: timm has no model 'stn_mobilenetv3_smal_2x' (did you mean stn_mobilenetv3_small_2x" in err
