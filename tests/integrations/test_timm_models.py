"""The timm integration: registered models, timm's API contract, ST-CNN Multi, the CUB dataset."""

import copy
import math
import re
import types

import pytest
import timm
import timm.optim
import torch
from timm.models import group_parameters

import stn_triton as st
import stn_triton.integrations.timm  # noqa: F401  (registers the models)
from stn_triton.integrations.timm import CUB200, ParallelSTNet, STMultiNet, cub_transforms, region_centres

from _cub import CLASSES, make_cub

# small sizes for the CPU: Inception-v3 needs at least 75 px
SMALL = {
    "stn_inception_v3_2x": dict(img_size=96, branch_size=75, loc_size=75),
    "stn_inception_v3_4x": dict(img_size=96, branch_size=75, loc_size=75),
    "stn_mobilenetv3_small_2x": dict(img_size=64, branch_size=32, loc_size=32),
}


@pytest.fixture
def reference(monkeypatch):
    """Big timm models take the pure-PyTorch sampler (the kernels are tested in tests/core)."""
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")


def test_registered():
    assert set(SMALL) <= set(timm.list_models("stn_*"))


def _check_param_groups(model, first, last):
    """timm's layer-wise grouping: every parameter matched by one of group_matcher's regexes (fine
    and coarse), every parameter in exactly one of timm's layer-decay optimizer groups, the
    parameters ``first`` in the lowest group, ``last`` in the top one."""
    names = [n for n, _ in model.named_parameters()]
    for coarse in (False, True):
        matcher = model.group_matcher(coarse=coarse)
        regexes = [re.compile(r) for r in matcher.values()]
        assert [n for n in names if not any(r.match(n) for r in regexes)] == []
        layers = group_parameters(model, matcher, reverse=True)
        assert set(layers) == set(names) and len(set(layers.values())) > 2
        assert {layers[n] for n in first} == {0} and {layers[n] for n in last} == {max(layers.values())}
    opt = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.7)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(scale) == len(names)
    params = dict(model.named_parameters())
    assert all(scale[id(params[n])] == 1.0 for n in last)
    assert len({scale[id(params[n])] for n in first}) == 1 and scale[id(params[first[0]])] < 0.7 ** 3


@pytest.mark.parametrize("name", sorted(SMALL))
def test_registration_widths_and_timm_api(name):
    """The registered name and config, the widths the head is built from, timm's parameter groups and
    layer-wise decay. (Forward, backward, forward_features and forward_head of every model, as timm's
    own tests run them: test_timm_contract.py.)"""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **SMALL[name])
    assert model.pretrained_cfg["architecture"] == name  # the registered name, not one made from the backbone's
    assert timm.models.get_pretrained_cfg(name).architecture == name  # a registered default config
    K = model.num_transforms
    # first_conv names the stems (layer-wise decay's lowest group), the classifier is the top one
    _check_param_groups(model, [f"{c}.weight" for c in model.pretrained_cfg["first_conv"]],
                        ["fc.weight", "loc_head.weight", "loc_hidden.0.weight"])
    assert len(model.pretrained_cfg["first_conv"]) == K + 1
    # the maps are the branches' side by side, the pre-logits features each branch's pooled ones
    b = model.branches[0]
    assert model.num_features == K * b.num_features
    assert model.head_hidden_size == K * model.branch_features
    assert model.branch_features == getattr(b, "head_hidden_size", b.num_features)
    assert model.fc.in_features == model.head_hidden_size and model.fc.out_features == 7


def test_forward_features_maps_and_head_give_the_same_logits(reference):
    """forward_features is the branches' maps, forward_head pools each through its branch's head:
    the logits are those of the pooled-features model (each branch's pooled pre-logits features,
    concatenated, then fc)."""
    torch.manual_seed(0)
    model = timm.create_model("stn_mobilenetv3_small_2x", num_classes=5, **SMALL["stn_mobilenetv3_small_2x"])
    with torch.no_grad():
        model.loc_head.weight.normal_(std=0.1)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        feats, theta = model.forward_features_and_theta(x)
        torch.testing.assert_close(theta, model.localize(x))
        parts = model.crops(x, theta)
        torch.testing.assert_close(feats, torch.cat([b.forward_features(parts[:, k])
                                                     for k, b in enumerate(model.branches)], 1))
        torch.testing.assert_close(model.forward_head(feats), logits)
        pooled = torch.cat([b(parts[:, k]) for k, b in enumerate(model.branches)], 1)  # the earlier computation
        assert pooled.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled)
        torch.testing.assert_close(logits, model.fc(pooled))


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).logsumexp(1).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _refuses(enable=True):  # as timm's Inception-v3 does
    assert not enable, "gradient checkpointing not supported"


@pytest.mark.parametrize("backbones_can", [True, False], ids=["delegated", "whole-backbone"])
def test_grad_checkpointing(reference, backbones_can):
    """With checkpointing the checkpointed layers run again in the backward pass, and the gradients
    are the same. Backbones that refuse it (Inception-v3) are checkpointed whole."""
    torch.manual_seed(0)
    model = timm.create_model("stn_mobilenetv3_small_2x", num_classes=4, **SMALL["stn_mobilenetv3_small_2x"])
    with torch.no_grad():
        model.loc_head.weight.normal_(std=0.1)
    x = torch.randn(2, 3, 64, 64)
    want = _grads(model, x)
    ckpt = copy.deepcopy(model)
    if not backbones_can:
        for net in (ckpt.localization, *ckpt.branches):
            net.set_grad_checkpointing = _refuses
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and all(getattr(n, "grad_checkpointing", False) == backbones_can
                                           for n in (ckpt.localization, *ckpt.branches))
    calls = []
    for net in (ckpt.localization, *ckpt.branches):  # a layer inside each backbone (a pre-hook: the
        net.blocks[1][0].register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation stops early)
    got = _grads(ckpt, x)
    assert len(calls) == 2 * 3  # the forward, and again in the backward
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    ckpt.set_grad_checkpointing(False)
    calls.clear()
    _grads(ckpt, x)
    assert len(calls) == 3


def test_features_only(reference):
    """timm's feature API: features_only gives, at each stage, the branches' maps concatenated on
    channels, with a true feature_info."""
    size = SMALL["stn_mobilenetv3_small_2x"]
    torch.manual_seed(0)
    net = timm.create_model("stn_mobilenetv3_small_2x", features_only=True, **size)
    torch.manual_seed(0)
    full = timm.create_model("stn_mobilenetv3_small_2x", **size)
    assert full.load_state_dict(net.model.state_dict(), strict=False).unexpected_keys == []
    net.eval(), full.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = net(x)
        parts = full.crops(x)
        per_branch = [b.forward_intermediates(parts[:, k], intermediates_only=True)
                      for k, b in enumerate(full.branches)]
        final, intermediates = full.forward_intermediates(x)
        torch.testing.assert_close(final, full.forward_features(x))
    info = net.feature_info
    assert len(maps) == len(info) == len(intermediates) == 5
    branch_info = full.branches[0].feature_info
    for i, (m, ch, red) in enumerate(zip(maps, info.channels(), info.reduction())):
        assert m.shape[:2] == (2, ch) and ch == 2 * branch_info[i]["num_chs"]
        assert m.shape[-1] == m.shape[-2] == math.ceil(size["img_size"] / red)
        torch.testing.assert_close(m, torch.cat([b[i] for b in per_branch], 1))
        torch.testing.assert_close(m, intermediates[i])
    assert net.pretrained_cfg["architecture"] == "stn_mobilenetv3_small_2x"
    # a selection: the branches are cut after the last selected stage, head and classifier go
    two = timm.create_model("stn_mobilenetv3_small_2x", features_only=True, out_indices=(1, 3), **size)
    assert two.feature_info.channels() == [2 * branch_info[1]["num_chs"], 2 * branch_info[3]["num_chs"]]
    out = two(x)
    assert [o.shape[1] for o in out] == two.feature_info.channels()
    assert not [n for n, _ in two.named_parameters() if n.startswith("model.fc.")
                or n.startswith("model.branches.") and (".conv_head." in n or ".blocks.4." in n)]
    assert [n for n, _ in two.named_parameters() if n.startswith("model.localization.conv_head.")]  # stays whole
    sum(o.sum() for o in out).backward()  # every parameter left is used (DDP)
    assert [n for n, p in two.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match=r"features_only supports feature_cls='getter' only"):
        timm.create_model("stn_mobilenetv3_small_2x", features_only=True, feature_cls="hook", **size)


def test_pretrained_cfg_and_data_config():
    model = timm.create_model("stn_inception_v3_2x", pretrained=False, num_classes=200)
    assert model.pretrained_cfg["input_size"] == (3, 448, 448) and model.num_classes == 200
    assert model.fc.out_features == 200 and model.branch_size == 224 and model.loc_size == 224
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 448, 448) and cfg["mean"] == (0.5, 0.5, 0.5)  # Inception's normalisation
    t = cub_transforms(model, training=False)
    from PIL import Image
    assert t(Image.new("RGB", (500, 375))).shape == (3, 448, 448)


def test_checkpoint_path_route(reference, tmp_path):
    torch.manual_seed(1)
    a = timm.create_model("stn_mobilenetv3_small_2x", num_classes=5)
    torch.save(a.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(2)
    b = timm.create_model("stn_mobilenetv3_small_2x", num_classes=5, checkpoint_path=str(tmp_path / "w.pth"))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_transforms_start_on_different_regions(reference):
    model = timm.create_model("stn_mobilenetv3_small_2x", num_classes=5, img_size=64, branch_size=32, loc_size=32)
    theta = model.localize(torch.randn(3, 3, 64, 64))
    assert theta.shape == (3, 2, 3)
    torch.testing.assert_close(theta, torch.tensor([[0.5, -0.5, 0.0], [0.5, 0.5, 0.0]]).expand(3, 2, 3))
    four = region_centres(4, 0.5)
    torch.testing.assert_close(four, torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]))
    assert region_centres(3, 0.75).abs().max() <= 0.25  # crops stay inside the image


def test_fixed_scale_is_not_learnt(reference):
    torch.manual_seed(0)
    model = ParallelSTNet("mobilenetv3_small_100", num_transforms=2, num_classes=4, img_size=64, branch_size=32,
                          loc_size=32)
    assert model.loc_head.out_features == 2 * 2  # only (tx, ty) per transform are regressed
    with torch.no_grad():
        model.loc_head.weight.normal_()
    theta = model.localize(torch.randn(2, 3, 64, 64))
    assert (theta[..., 0] == 0.5).all() and theta[..., 1:].std() > 0
    free = ParallelSTNet("mobilenetv3_small_100", num_transforms=2, num_classes=4, img_size=64, branch_size=32,
                         loc_size=32, transform="affine", fixed_params=None)
    assert free.loc_head.out_features == 12
    free.eval()
    torch.testing.assert_close(free.localize(torch.randn(1, 3, 64, 64))[0, 0],
                               torch.tensor([0.5, 0, -0.5, 0, 0.5, 0.0]))
    with pytest.raises(ValueError, match=r"fixed_params: index 3 is not a parameter of 'attention' \(0..2\)"):
        ParallelSTNet("mobilenetv3_small_100", num_transforms=2, fixed_params={3: 1.0})
    with pytest.raises(ValueError, match=r"num_transforms: expected a positive int, got 0"):
        ParallelSTNet("mobilenetv3_small_100", num_transforms=0)


def test_kernel_path_inside_a_timm_model():
    """The same model with the Triton kernels (interpreter on the CPU) matches the reference."""
    torch.manual_seed(0)
    model = timm.create_model("stn_mobilenetv3_small_2x", num_classes=4, img_size=48, branch_size=24, loc_size=24)
    with torch.no_grad():
        model.loc_head.weight.normal_(std=0.1)
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    crops = model.crops(x)
    import os
    os.environ["STN_TRITON_FORCE_REFERENCE"] = "1"
    try:
        want = model.crops(x)
    finally:
        del os.environ["STN_TRITON_FORCE_REFERENCE"]
    assert crops.shape == (2, 2, 3, 24, 24)
    # float32 both ways; the kernels' source index rounds as PyTorch's CUDA kernel, the reference's as
    # its CPU kernel: a few 1e-6 apart where a sample falls between pixels
    torch.testing.assert_close(crops, want, rtol=2e-5, atol=2e-5)


def test_st_multi(reference):
    torch.manual_seed(0)
    plain = timm.create_model("mobilenetv3_small_100", num_classes=6)
    torch.manual_seed(0)
    multi = STMultiNet("mobilenetv3_small_100", stages=(0, 2, 4), num_classes=6)
    multi.backbone.load_state_dict(plain.state_dict())
    plain.eval(), multi.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(multi(x), plain(x), rtol=1e-4, atol=1e-5)  # every transformer starts at identity
        calls = []
        hook = multi.transformers["2"].register_forward_hook(lambda m, a, o: calls.append(o.shape))
        multi(x)
        hook.remove()
    assert calls and calls[0][1] == multi.backbone.feature_info[1]["num_chs"]  # ran on stage 2's map
    multi.train()
    multi(x).sum().backward()
    assert all(t.head.weight.grad.abs().sum() > 0 for t in multi.transformers.values())
    assert multi.forward_head(multi.forward_features(x), pre_logits=True).shape == (2, multi.head_hidden_size)
    assert multi.forward_features(x).shape[1] == multi.num_features == multi.backbone.num_features
    multi.reset_classifier(3)
    assert multi(x).shape == (2, 3) and multi.num_classes == 3
    with pytest.raises(ValueError, match=r"stages: expected distinct ints in 0..5"):
        STMultiNet("mobilenetv3_small_100", stages=(9,))
    # timm's API, as the backbone's: feature API, pretrained_cfg naming this model's modules, layer decay
    assert multi.feature_info == multi.backbone.feature_info
    maps = multi.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [m.shape[1] for m in maps] == [multi.feature_info[i]["num_chs"] for i in (1, 3)]
    assert multi.pretrained_cfg["first_conv"] == "backbone.conv_stem" and "architecture" not in multi.pretrained_cfg
    _check_param_groups(multi, ["backbone.conv_stem.weight"],
                        ["backbone.classifier.weight", *(f"transformers.{s}.head.weight" for s in ("0", "2", "4"))])


def test_st_multi_grad_checkpointing_and_copies(reference):
    """The transformers inside a backbone still run with its gradient checkpointing (timm's
    MobileNetV3 then calls the blocks of a stage one by one), with the same gradients; a copy
    (timm's ModelEma) runs its own transformers; a backbone that bypasses a hooked stage raises."""
    torch.manual_seed(0)
    multi = STMultiNet("mobilenetv3_small_100", stages=(0, 2, 4), num_classes=6)
    x = torch.randn(2, 3, 64, 64)
    multi(x)  # the transformers' heads are lazy
    with torch.no_grad():
        for t in multi.transformers.values():
            t.head.weight.normal_(std=0.05)
    want = _grads(multi, x)
    ckpt = copy.deepcopy(multi)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.backbone.grad_checkpointing and not multi.backbone.grad_checkpointing
    got = _grads(ckpt, x)  # the copy's transformers have gradients: its hooks are its own
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    multi.zero_grad(set_to_none=True)
    ckpt(x).sum().backward()
    assert all(p.grad is None for p in multi.parameters())
    stem_only = types.MethodType(lambda self, x: self.bn1(self.conv_stem(x)), ckpt.backbone)
    ckpt.backbone.forward_features = stem_only
    with pytest.raises(RuntimeError, match=r"transformers after feature stages 2, 4 did not run"):
        ckpt.forward_features(x)
    refusing = STMultiNet("mobilenetv3_small_100", stages=(1,))
    refusing.backbone.set_grad_checkpointing = _refuses
    with pytest.raises(NotImplementedError, match=r"backbone \(MobileNetV3\) does not support gradient checkpointing"):
        refusing.set_grad_checkpointing(True)


# --- the CUB dataset -------------------------------------------------------------------------------

def test_cub_dataset(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    train, test = CUB200(root, "train"), CUB200(root, "test")
    assert len(train) == len(test) == 6 and train.classes == CLASSES
    image, label = train[0]
    assert image.size == (56, 48) and label == 0 and train.boxes[0] == (12.0, 12.0, 24.0, 24.0)
    assert sorted(lbl for _, lbl in train.samples) == [0, 0, 1, 1, 2, 2]
    model = timm.create_model("stn_mobilenetv3_small_2x", num_classes=3, img_size=64, branch_size=32, loc_size=32)
    train.transform = cub_transforms(model, training=True)
    assert train[1][0].shape == (3, 64, 64)


def _edit(path, fn):
    path.write_text(fn(path.read_text()))


@pytest.mark.parametrize("file,edit,error,match", [
    ("images.txt", lambda t: t.replace("1 001.Red_Bird/Red_Bird_0000.jpg", "1 ../../secret.jpg"), ValueError,
     r"images.txt, line 1: path '../../secret.jpg' leads outside"),
    ("images.txt", lambda t: t.replace("2 001.Red_Bird/Red_Bird_0001.jpg", "2 /etc/passwd"), ValueError,
     r"images.txt, line 2: path '/etc/passwd' leads outside"),
    ("bounding_boxes.txt", lambda t: t[:-9], ValueError, r"bounding_boxes.txt, line 12: expected 5 fields, got 4: '12 12.0 12.0 2'"),
    ("train_test_split.txt", lambda t: t.replace("3 1", "3 yes"), ValueError,
     r"train_test_split.txt, line 3: expected 0 or 1, got 'yes'"),
    ("image_class_labels.txt", lambda t: t.replace("4 1", "4 9"), ValueError,
     r"image_class_labels.txt, line 4: class 9 is not in classes.txt \(1..3\)"),
    ("image_class_labels.txt", lambda t: t.replace("5 2\n", "5 two\n").replace("5 1\n", "5 two\n"), ValueError,
     r"image_class_labels.txt, line 5: invalid literal"),
    ("image_class_labels.txt", lambda t: "\n".join(t.splitlines()[:-1]), ValueError,
     r"image_class_labels.txt: no entry for image id 12"),
    ("classes.txt", lambda t: "", ValueError, r"classes.txt: no entries"),
], ids=["dotdot", "absolute", "truncated", "bad-flag", "bad-class", "not-int", "missing-id", "empty"])
def test_cub_bad_metadata(tmp_path, file, edit, error, match):
    root = make_cub(tmp_path / "cub")
    _edit(root / file, edit)
    with pytest.raises(error, match=match):
        CUB200(root, "train")


def test_misspelt_family_names_the_transform_argument():
    with pytest.raises(st.ArgumentError, match=r"transform: .*'afine' \(did you mean 'affine'\?\)") as e:
        ParallelSTNet(backbone="mobilenetv3_small_100", transform="afine")
    assert isinstance(e.value, KeyError)  # what get_transform raised before, for code that catches that


def test_cub_missing_files(tmp_path):
    root = make_cub(tmp_path / "cub")
    (root / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"classes.txt: not found"):
        CUB200(root)
    with pytest.raises(NotADirectoryError):
        CUB200(tmp_path / "nowhere")
    root = make_cub(tmp_path / "cub2")
    ds = CUB200(root, "test")
    ds.samples[0][0].write_bytes(ds.samples[0][0].read_bytes()[:100])  # a truncated JPEG
    with pytest.raises(OSError, match=r"cannot read it"):
        ds[0]
    ds.samples[1][0].unlink()
    with pytest.raises(FileNotFoundError, match=r"listed in images.txt but missing"):
        ds[1]


def test_theta_stays_float32_under_autocast(reference):
    model = timm.create_model("stn_mobilenetv3_small_2x", num_classes=3, img_size=64, branch_size=32, loc_size=32)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theta = model.localize(torch.randn(2, 3, 64, 64))
        crops = model.crops(torch.randn(2, 3, 64, 64), theta)
    assert theta.dtype == torch.float32 and torch.isfinite(crops).all()
