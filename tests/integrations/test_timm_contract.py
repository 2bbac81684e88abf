"""timm's model contract, checked on every model we register, at sizes the CPU runs in seconds.

Libraries that take timm models (optimizer factories, fine-tuning scripts, feature extractors,
export) assume what timm's own ``tests/test_models.py`` checks of each of its models:
``scripts/timm-model-tests.sh`` runs that file on ours (slow). These tests check the same things, in
our words: registered default configs that describe the model, forward and backward, the
``forward_features``/``forward_head`` split, the feature API (``features_only``,
``forward_intermediates``), gradient checkpointing, FX tracing and TorchScript. The Inception
models are checked on the meta device (shapes, configs, tracing and compiling, no arithmetic)
where real weights would cost seconds, and at tiny sizes otherwise.
"""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import create_feature_extractor
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import stn_triton as st
import stn_triton.integrations.timm  # noqa: F401  (registers the models)
from stn_triton.integrations.timm import ParallelSTNet

# the registered models, their backbone, and tiny sizes for the CPU (Inception-v3 needs >= 75 px)
BACKBONE = {
    "stn_inception_v3_2x": "inception_v3",
    "stn_inception_v3_4x": "inception_v3",
    "stn_mobilenetv3_small_2x": "mobilenetv3_small_100",
}
TINY = {
    # the smallest Inception-v3 accepts; img_size above both so that the localisation input is resized
    "stn_inception_v3_2x": dict(img_size=96, branch_size=75, loc_size=75),
    "stn_inception_v3_4x": dict(img_size=96, branch_size=75, loc_size=75),
    "stn_mobilenetv3_small_2x": dict(img_size=64, branch_size=32, loc_size=32),
}
MODELS = sorted(timm.list_models("stn_*"))
LIGHT = "stn_mobilenetv3_small_2x"  # the one checked with real arithmetic everywhere

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture
def reference(monkeypatch):
    """The pure-PyTorch sampler (the kernels are tested in tests/core; see the kernel-path test)."""
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")


def _model(name, scriptable=False, **kwargs):
    """A tiny model with a localisation head that moves the crops with the input (so that a wrong
    transform shows), seeded."""
    torch.manual_seed(0)
    with timm.set_scriptable(scriptable):
        model = timm.create_model(name, **{**TINY[name], **kwargs})
    net = model.model if kwargs.get("features_only") else model
    with torch.no_grad():
        net.loc_head.weight.normal_(std=0.05)
    return model


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, device="meta", **kwargs)


def _input(model, side=None, n=2):
    side = side or model.img_size
    torch.manual_seed(1)
    return torch.randn(n, model.in_chans, side, side)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"no gradient for {missing[:5]}"
    return {n: p.grad.clone() for n, p in model.named_parameters()}


class _Ops(TorchDispatchMode):
    """The names of the ops a piece of code dispatches."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# --- registration and default configs ---------------------------------------------------------------

def test_every_registered_model_is_covered():
    assert MODELS == sorted(TINY)
    # timm's own tests select their models by the name in the default config
    assert timm.list_models("stn_*", name_matches_cfg=True) == MODELS
    assert timm.list_pretrained("stn_*") == []  # no weights of their own (pretrained=True: the backbones')


@pytest.mark.parametrize("name", MODELS)
def test_registered_default_cfg(name):
    """Registered as timm registers its own models, with a config that says what the model takes."""
    cfg = timm.models.get_pretrained_cfg(name)
    backbone = timm.models.get_pretrained_cfg(BACKBONE[name])
    k = int(name[-2])
    side = 448 if "inception" in name else 224
    assert cfg.architecture == name and cfg.input_size == (3, side, side) and not cfg.fixed_input_size
    assert (cfg.mean, cfg.std, cfg.interpolation) == (backbone.mean, backbone.std, backbone.interpolation)
    assert cfg.crop_pct == 1.0 and cfg.classifier == "fc" and cfg.num_classes == 1000
    stem = backbone.first_conv
    assert cfg.first_conv == (f"localization.{stem}", *(f"branches.{i}.{stem}" for i in range(k)))
    # the parts are 112 px at the smallest input: Inception-v3's last maps are 1 px below that
    assert cfg.min_input_size == ((3, 224, 224) if "inception" in name else None)
    assert cfg.pool_size is not None  # its truth: test_default_cfg_is_the_models_own


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_is_the_models_own(name):
    """As timm's test_model_default_cfgs, on the meta device at the config's input size: the feature
    maps are pool_size, first_conv names the stems, classifier the classifier; reset_classifier,
    num_classes=0 and global_pool='' give the pooled features or the maps; device=, dtype=."""
    model = _meta(name).eval()
    cfg = model.pretrained_cfg
    assert cfg == timm.models.get_pretrained_cfg(name).to_dict()
    assert model.in_chans == cfg["input_size"][0] and model.num_classes == cfg["num_classes"]
    x = torch.empty(1, *cfg["input_size"], device="meta")
    maps = model.forward_features(x)
    assert maps.shape == (1, model.num_features, *cfg["pool_size"])
    assert model.forward_head(maps, pre_logits=True).shape == (1, model.head_hidden_size)
    assert model(x).shape == (1, cfg["num_classes"])
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    for stem in cfg["first_conv"]:
        assert isinstance(modules[stem], nn.Conv2d) and f"{stem}.weight" in params
        assert modules[stem].in_channels == model.in_chans
    assert modules[cfg["classifier"]] is model.get_classifier() and f"{cfg['classifier']}.weight" in params
    assert model.get_classifier().in_features == model.head_hidden_size
    # another dtype after a forward
    model.to(torch.bfloat16)
    assert model(x.bfloat16()).dtype == torch.bfloat16
    model.to(torch.float32)
    # no classifier: the pooled features; no pooling either: the branches' head maps at pool_size
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (1, model.head_hidden_size)
    model.reset_classifier(0, "")
    assert model(x).shape == (1, model.head_hidden_size, *cfg["pool_size"])
    if name != "stn_inception_v3_4x":  # the same constructor code as the 2x model's (K aside): built once less
        assert _meta(name, num_classes=0).eval()(x).shape == (1, model.head_hidden_size)
        assert _meta(name, num_classes=0, global_pool="").eval()(x).shape == (1, model.head_hidden_size,
                                                                              *cfg["pool_size"])
    # the contract timm's factories rely on
    with pytest.raises(TypeError):
        _meta(name, not_a_model_arg=1)
    groups = timm.models.group_parameters(model, model.group_matcher(), reverse=True)
    assert len(set(groups.values())) > 1


@pytest.mark.parametrize("name", MODELS)
def test_factory_device_dtype_and_reset_classifier(name):
    """create_model(device=, dtype=) places everything; a new classifier is on the model's device and
    dtype and in its mode; frozen weights stay frozen through reset_classifier."""
    model = timm.create_model(name, device="meta", dtype=torch.float64)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert [n for n, t in tensors if t.device.type != "meta"] == []
    assert {t.dtype for _, t in tensors if t.is_floating_point()} == {torch.float64}
    model.eval().requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, "")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    model.reset_classifier(2)
    fc = model.get_classifier()
    assert fc.weight.device.type == "meta" and fc.weight.dtype == torch.float64 and not fc.training
    assert model.num_classes == fc.out_features == 2 and fc.in_features == model.head_hidden_size
    assert all(not m.training for m in model.modules())


# --- forward, backward, the head, checkpointing ---------------------------------------------------------

# stn_inception_v3_4x is stn_inception_v3_2x with two more branches (the same class and code, K is a
# number): its arithmetic adds nothing here and costs the most; its configs, shapes, feature API and
# compilation are checked on the meta device above and below.
@pytest.mark.parametrize("name", [m for m in MODELS if m != "stn_inception_v3_4x"])
def test_forward_backward_head_and_checkpointing(reference, name):
    """As timm's forward and backward tests: the output has the classes, every parameter gets a
    gradient; forward is forward_head(forward_features) and pre_logits the classifier's input;
    gradient checkpointing changes neither the output nor the gradients."""
    model = _model(name, num_classes=42)
    x = _input(model)
    want = _grads(model.train(), x)
    assert want["loc_head.weight"].abs().sum() > 0  # the gradient reaches the localisation network
    model.eval()
    with torch.no_grad():
        logits, maps = model(x), model.forward_features(x)
        assert logits.shape == (2, 42) and torch.isfinite(logits).all()
        assert maps.ndim == 4 and maps.shape[:2] == (2, model.num_features)  # timm's convention: unpooled maps
        assert torch.equal(model.forward_head(maps), logits)
        pre = model.forward_head(maps, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.get_classifier()(pre), logits, rtol=0, atol=0)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, rtol=1e-5, atol=1e-6)
    got = _grads(model.train(), x)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert torch.equal(model(x), pre)


def _todays_forward(model, x):
    """The eager computation as written before FX and TorchScript support, op by op: the
    localisation input resized unless it is loc_size already, the regression in float32, the crops
    by ``stn_triton.spatial_transform`` at branch_size, each branch's features and head."""
    n, k = x.shape[0], model.num_transforms
    small = x if x.shape[-1] == x.shape[-2] == model.loc_size else F.interpolate(
        x, size=(model.loc_size, model.loc_size), mode="bilinear", align_corners=False, antialias=True)
    feats = model.loc_hidden(model.localization(small))
    with torch.autocast("cpu", enabled=False):
        free = F.linear(feats.float(), model.loc_head.weight, model.loc_head.bias).view(n, k, -1)
    theta = model.theta_start.to(free.dtype).expand(n, -1, -1).clone().index_copy(2, model.free_index, free)
    parts = st.spatial_transform(x, theta, model.family, (model.branch_size, model.branch_size), model.mode,
                                 model.padding_mode, model.align_corners)
    maps = torch.cat([b.forward_features(parts[:, i]) for i, b in enumerate(model.branches)], 1)
    chunks = maps.split([b.num_features for b in model.branches], 1)
    pooled = torch.cat([b.forward_head(c, pre_logits=True) for b, c in zip(model.branches, chunks)], 1)
    return model.fc(model.head_drop(pooled)), theta, parts


# both models with the localisation input resized; the light one also with it as the input itself (the
# same code path in either model)
EAGER = [("stn_inception_v3_2x", False), (LIGHT, False), (LIGHT, True)]


@pytest.mark.parametrize("name,loc_is_input", EAGER,
                         ids=[f"{'loc-as-input' if i else 'loc-resized'}-{n}" for n, i in EAGER])
def test_eager_forward_is_unchanged(reference, name, loc_is_input):
    """At the model's input size the eager forward and its gradients are exactly those of the
    computation before FX/TorchScript support."""
    extra = dict(loc_size=TINY[name]["img_size"]) if loc_is_input else {}
    model = _model(name, num_classes=5, **extra).eval()
    x = _input(model)
    logits = model(x)
    want, theta, parts = _todays_forward(model, x)
    assert torch.equal(logits, want)
    assert torch.equal(model.localize(x), theta) and torch.equal(model.crops(x, theta), parts)
    got = torch.autograd.grad(logits.sum(), list(model.parameters()))
    expected = torch.autograd.grad(want.sum(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_other_input_sizes_are_processed_in_proportion(reference):
    """img_size, branch_size and loc_size are the sides at the model's own input size: another input
    is processed as the same model built for it, so the feature maps scale with the input."""
    model = _model(LIGHT, num_classes=5).eval()
    x = _input(model, side=96)
    twin = timm.create_model(LIGHT, num_classes=5, img_size=96, branch_size=48, loc_size=48).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
        assert model.crops(x).shape == (2, 2, 3, 48, 48)
        assert model.crops(torch.randn(1, 3, 96, 80)).shape == (1, 2, 3, 48, 40)
        assert model.forward_features(x).shape[-1] == math.ceil(96 / model.feature_info[-1]["reduction"])


# --- the feature API --------------------------------------------------------------------------------

def _within_reduction(maps, reductions, side):
    """timm's check of feature_info: a map of input side S at reduction r is between S / 2r and
    ceil(S / r) + 1."""
    for m, r in zip(maps, reductions):
        assert side / (2 * r) < m.shape[-1] <= math.ceil(side / r) + 1 and m.shape[-2] == m.shape[-1], (r, m.shape)


# (stn_inception_v3_4x: the 2x model's class and feature code with K = 4; its feature_info's channels are
# K times its branch's like any K's, which the 2x case checks; its config is checked above)
@pytest.mark.parametrize("name", [m for m in MODELS if m != "stn_inception_v3_4x"])
def test_features_only_shapes(name):
    """features_only (timm's FeatureGetterNet over forward_intermediates): at least 3 maps whose
    channels and reductions are feature_info's, at the config's input size and at the size timm's
    tests feed (the smallest input, or 96 px)."""
    net = _meta(name, features_only=True).eval()
    cfg = net.pretrained_cfg
    info = net.feature_info
    assert len(info.channels()) >= 3 and net.model.num_features == net.model.num_transforms * (
        net.model.branches[0].num_features)
    for side in (cfg["input_size"][-1], (cfg.get("min_input_size") or (3, 96, 96))[-1]):
        maps = net(torch.empty(1, 3, side, side, device="meta"))
        assert [m.shape[1] for m in maps] == info.channels()
        _within_reduction(maps, info.reduction(), side)
    model = _meta(name).eval()
    x = torch.empty(1, 3, 224, 224, device="meta")
    final, inter = model.forward_intermediates(x)
    assert final.shape == model.forward_features(x).shape and len(inter) == len(model.feature_info)


def test_forward_intermediates_and_pruning(reference):
    """As timm's intermediates tests: the taps are the features_only maps, selected ones and
    stop_early ones are the same maps, the final map is forward_features'; pruning keeps the taps
    and leaves no unused parameter; checkpointing changes nothing."""
    model = _model(LIGHT).eval()
    x = _input(model, side=96)
    net = _model(LIGHT, features_only=True).eval()
    assert model.load_state_dict(net.model.state_dict(), strict=False).unexpected_keys == []
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        for a, b in zip(net(x), taps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        _within_reduction(taps, [d["reduction"] for d in model.feature_info], 96)
        last = len(model.feature_info) - 1
        for i in (0, 2, last):
            early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(early[0], taps[i], rtol=0, atol=0)
        assert [t.shape for t in model.forward_intermediates(x, indices=2, intermediates_only=True)] == \
            [t.shape for t in taps[-2:]]
    pruned = copy.deepcopy(model)
    kept = pruned.prune_intermediate_layers([2])
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=kept, intermediates_only=True)[0],
                                   taps[2], rtol=0, atol=0)
    pruned.train()
    sum(t.sum() for t in pruned.forward_intermediates(x, indices=kept, intermediates_only=True)).backward()
    assert [n for n, p in pruned.named_parameters() if p.grad is None] == []
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-5, atol=1e-6)


# --- FX and TorchScript -----------------------------------------------------------------------------

def test_fx_graph_equals_the_model(reference):
    """timm's FX feature extraction (its notrace registries: the localisation input, the theta
    regression and the sampler are leaves) gives the model's output and its crops; the training
    graph's backward reaches every parameter; the graph scripts, with the same output."""
    model = _model(LIGHT, scriptable=True, num_classes=7).eval()
    x = _input(model)
    fx = create_feature_extractor(model, {"sampler": "crops", "fc": "logits"})
    with torch.no_grad():
        out = fx(x)
        assert torch.equal(out["logits"], model(x)) and torch.equal(out["crops"], model.crops(x))
        scripted = torch.jit.script(create_feature_extractor(model, ["fc"]))
        torch.testing.assert_close(scripted(x)["fc"], out["logits"], rtol=1e-6, atol=1e-6)
    train = create_feature_extractor(model.train(), ["fc"])
    train(x)["fc"].mean().backward()
    assert [n for n, p in train.named_parameters() if p.grad is None] == []
    nodes = {n.target for n in train.graph.nodes if n.op == "call_module"}
    assert {"sampler", "loc_head"} <= nodes


# stn_inception_v3_4x is stn_inception_v3_2x with two more branches: the same class, the same
# forward (the branches' ModuleList is unrolled the same way for any length), so tracing and
# compiling it checks nothing the 2x case does not, and it is the slowest to compile.
@pytest.mark.parametrize("name", [m for m in MODELS if m != "stn_inception_v3_4x"])
def test_fx_and_torchscript_compile(name):
    """The registered models trace with timm's FX tools and compile with TorchScript (also their FX
    graph), as timm's tests make them (set_scriptable); run on the meta device: shapes, no
    arithmetic."""
    with timm.set_scriptable(True):
        model = _meta(name).eval()
    x = torch.empty(1, 3, 224, 224, device="meta")
    fx = create_feature_extractor(model, ["fc"])
    assert fx(x)["fc"].shape == (1, 1000)
    assert torch.jit.script(fx)(x)["fc"].shape == (1, 1000)
    scripted = torch.jit.script(model)
    assert scripted(x).shape == (1, 1000)
    assert scripted.forward_features(x).shape == model.forward_features(x).shape


def test_torchscript_equals_the_model(reference):
    """The scripted model (the fused op called directly) gives the eager model's outputs, transforms
    and gradients, at the model's input size and at another."""
    model = _model(LIGHT, scriptable=True, num_classes=7)
    scripted = torch.jit.script(model)
    for side in (64, 80):
        x = _input(model, side=side)
        model.eval(), scripted.eval()
        with torch.no_grad():
            assert torch.equal(scripted(x), model(x))
            feats, theta = scripted.forward_features_and_theta(x)
            assert torch.equal(theta, model.localize(x)) and torch.equal(feats, model.forward_features(x))
            assert torch.equal(scripted.forward_head(feats, pre_logits=True), model.forward_head(feats, True))
        model.train(), scripted.train()
        want = _grads(model, x)
        scripted.zero_grad(set_to_none=True)
        scripted(x).mean().backward()
        for n, p in scripted.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_torchscript_features_only(reference):
    """features_only scripts where the branch backbone's forward_intermediates does (MobileNetV3's;
    timm's Inception-v3's does not script, its own features_only neither), with the same maps."""
    net = _model(LIGHT, scriptable=True, features_only=True, out_indices=(1, 3, 4)).eval()
    x = _input(net.model, side=80)
    with torch.no_grad():
        want = net(x)
        got = torch.jit.script(net)(x)
    assert len(got) == len(want) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("transform", ["affine", "projective"])
def test_torchscript_families_with_a_matrix_form(reference, transform):
    """Scripted, the affine and projective families build their matrices as the families do."""
    torch.manual_seed(0)
    with timm.set_scriptable(True):
        model = ParallelSTNet("mobilenetv3_small_100", num_transforms=2, num_classes=3, transform=transform,
                              fixed_params=None, **TINY[LIGHT]).eval()
    with torch.no_grad():
        model.loc_head.weight.normal_(std=0.02)
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(model)(x), model(x))


def test_torchscript_other_families_say_why(reference):
    """A family whose kernel form is built in Python (here a basis per output size) scripts, and the
    scripted model says what it cannot run; eager and FX run it."""
    torch.manual_seed(0)
    with timm.set_scriptable(True):
        model = ParallelSTNet("mobilenetv3_small_100", num_transforms=2, num_classes=3, transform="tps",
                              fixed_params=None, **TINY[LIGHT]).eval()
    x = _input(model)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(create_feature_extractor(model, ["fc"])(x)["fc"], want)
        scripted = torch.jit.script(model)
        with pytest.raises(Exception, match=r"family tps builds its kernel form in Python"):
            scripted(x)


def test_kernel_path_runs_the_fused_op(device):
    """On the kernels' path (CUDA, or Triton's interpreter on the CPU) the eager model and the
    scripted one each run the fused op once per forward, with the same result."""
    model = _model(LIGHT, scriptable=True, num_classes=3, img_size=48, branch_size=24, loc_size=24)
    model.to(device).eval()
    x = _input(model).to(device)
    assert st.backend(x) != "reference"
    scripted = torch.jit.script(model)
    outs = []
    for m in (model, scripted):
        with _Ops() as ops, torch.no_grad():
            outs.append(m(x))
        assert [n for n in ops.names if n.startswith("stn_triton.")] == ["stn_triton.affine_sample.default"]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.gpu
def test_theta_float32_under_autocast_scripted_and_fx(device):
    """Under CUDA autocast theta stays float32 in the eager model, its FX graph and the scripted model."""
    model = _model(LIGHT, scriptable=True, num_classes=3).to(device).eval()
    x = _input(model).to(device)
    fx = create_feature_extractor(model, ["loc_head"])
    scripted = torch.jit.script(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = model.localize(x)
        assert want.dtype == torch.float32 and fx(x)["loc_head"].dtype == torch.float32
        got = scripted.localize(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
