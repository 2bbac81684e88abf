"""The CUB trainer under torchrun (2 processes, gloo, CPU) on a tiny CUB-format folder: one epoch,
and an interrupted run resumed from its checkpoint ending with the same weights as an
uninterrupted one."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
    torchrun(cub, broken, "--epochs", "2", "--stop-after", "1")  # "interrupted" after one epoch
    first = _metrics(broken)
    assert len(first) == 1 and first[0]["epoch"] == 1 and first[0]["processes"] == 2
    done = torchrun(cub, broken, "--epochs", "2", "--resume")
    assert "resumed from" in done.stderr and "after epoch 0" in done.stderr

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


def test_trainer_errors(cub, tmp_path):
    from stn_triton.integrations.timm.train import main

    with pytest.raises(SystemExit, match=r"stn-train-cub: CUB root .*nowhere: not a folder"):
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *TINY])
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"args": {"model": "stn_inception_v3_4x", "epochs": 30}, "epoch": 3}, out / "last.pt")
    with pytest.raises(SystemExit, match=r"--resume: .*last.pt was written for model 'stn_inception_v3_4x' and 30"):
        main(["--data", str(cub), "--out", str(out), "--epochs", "2", "--resume", *TINY])
