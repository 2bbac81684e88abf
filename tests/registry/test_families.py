"""The registry and the built-in families (pure PyTorch grids vs the fused kernel forms)."""

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
import transforms_registry as tr
from transforms_registry import TransformFamily, get_transform, list_transforms, register_transform

FAMILIES = [("attention", {}), ("affine", {}), ("projective", {}), ("piecewise_affine", {"grid_size": (3, 4)}),
            ("tps", {}), ("tps", {"grid_size": (2, 3)})]
IDS = ["attention", "affine", "projective", "piecewise_affine-3x4", "tps-4x4", "tps-2x3"]


def _theta(family, N, gen, scale=0.05):
    ident = family.identity().double()
    return (ident + scale * torch.randn(N, ident.numel(), generator=gen, dtype=torch.float64)).float()


@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
@pytest.mark.parametrize("name,options", FAMILIES, ids=IDS)
def test_identity_reproduces_input(device, name, options, align_corners):
    family = get_transform(name, **options)
    x = torch.randn(2, 3, 7, 9, device=device)
    theta = family.identity()[None].repeat(2, 1).to(device)
    out = st.spatial_transform(x, theta, family, align_corners=align_corners)
    # float32: the grid is exact to ~1e-6, times the image's slope (randn: up to ~5 per pixel)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=5e-5)
    grid = family.grid(theta.cpu(), (7, 9), align_corners)
    eye = F.affine_grid(torch.eye(2, 3)[None].repeat(2, 1, 1), (2, 1, 7, 9), align_corners=align_corners)
    torch.testing.assert_close(grid, eye, rtol=0, atol=3e-6)


@pytest.mark.parametrize("name,options", FAMILIES, ids=IDS)
def test_fused_equals_grid_path(device, name, options):
    """The family's fused kernel form equals its grid() followed by the explicit-grid kernel. (Two
    images of two channels, two transforms each: enough to tell images and transforms apart; each
    transform costs kernel programs, which under TRITON_INTERPRET=1 are most of the time.)"""
    gen = torch.Generator().manual_seed(1)
    family = get_transform(name, **options)
    x = torch.randn(2, 2, 8, 9, generator=gen).to(device).requires_grad_()
    theta = _theta(family, 2 * 2, gen).view(2, 2, -1).to(device).requires_grad_()
    fused = st.spatial_transform(x, theta, family, (5, 6), padding_mode="border")
    grid = family.grid(theta.reshape(4, -1), (5, 6)).view(2, 2, 5, 6, 2)
    unfused = st.grid_sample(x, grid, padding_mode="border")
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    go = torch.randn(fused.shape, generator=gen).to(device)
    a = torch.autograd.grad(fused, (x, theta), go)
    b = torch.autograd.grad(unfused, (x, theta), go)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * max(1.0, v.abs().max().item()))


@pytest.mark.parametrize("name,options", FAMILIES, ids=IDS)
def test_gradcheck_theta(name, options):
    gen = torch.Generator().manual_seed(2)
    family = get_transform(name, **options).double()
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=gen)
    theta = _theta(family, 1, gen).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: st.spatial_transform(x, t, family, (4, 5)), (theta,), eps=1e-6, atol=1e-5)


def test_learnable_basis_gradient(device):
    gen = torch.Generator().manual_seed(3)
    family = get_transform("tps", grid_size=(3, 3), learnable_basis=True, size=(4, 5)).to(device)
    assert any(p is family.basis for p in family.parameters())
    x = torch.randn(2, 2, 6, 7, generator=gen).to(device)
    theta = _theta(family, 2, gen).to(device)
    out = st.spatial_transform(x, theta, family, (4, 5))
    go = torch.randn(out.shape, generator=gen).to(device)
    (gb,) = torch.autograd.grad(out, family.basis, go)
    basis64 = family.basis.detach().cpu().double().requires_grad_()
    form = family.kernel_form(theta.cpu(), (4, 5))
    ref = F.grid_sample(x.cpu().double(), torch.einsum("ncd,dp->npc", form.m.detach().double(), basis64).view(2, 4, 5, 2),
                        align_corners=False)
    (want,) = torch.autograd.grad(ref, basis64, go.cpu().double())
    torch.testing.assert_close(gb.cpu().double(), want, rtol=1e-4, atol=1e-4)
    # and gradcheck in float64 wrt B itself
    fam64 = get_transform("tps", grid_size=(3, 3), learnable_basis=True, size=(4, 5)).double()
    b = fam64.basis.detach().clone().requires_grad_()

    def f(b):
        form = fam64.kernel_form(theta.cpu().double(), (4, 5))
        return st.basis_sample(x.cpu().double(), form.m, b, (4, 5))

    assert torch.autograd.gradcheck(f, (b,), eps=1e-6, atol=1e-5)


def test_registry_listing_and_lookup():
    assert {"affine", "attention", "projective", "piecewise_affine", "tps"} <= set(list_transforms())
    assert list_transforms("p*") == ["piecewise_affine", "projective"]
    with pytest.raises(KeyError, match=r"unknown transform 'nope'; known: .*affine.*tps"):
        get_transform("nope")
    assert get_transform("tps", grid_size=(2, 2)).num_params == 8
    assert get_transform("tps") is not get_transform("tps")


def test_registration_conflict_and_override(monkeypatch):
    # registrations made here are undone afterwards
    monkeypatch.setattr(tr.registry, "_REGISTRY", dict(tr.registry._REGISTRY))
    monkeypatch.setattr(tr.registry, "_SOURCES", dict(tr.registry._SOURCES))

    @register_transform(name="test_shift")
    class Shift(TransformFamily):
        num_params = 2

        def identity(self):
            return torch.zeros(2)

        def grid(self, theta, size, align_corners=False):
            base = tr.base_grid(size, align_corners, theta.dtype, theta.device)[:2].T  # (P, 2)
            return (base[None] + theta[:, None]).reshape(theta.shape[0], *size, 2)

    with pytest.raises(ValueError, match=r"'test_shift' is already registered"):
        @register_transform(name="test_shift")
        class Other(Shift):
            pass

    @register_transform(name="test_shift", override=True)
    class Replacement(Shift):
        pass

    fam = get_transform("test_shift")
    assert isinstance(fam, Replacement)
    # a family that only implements grid() runs through the explicit-grid kernel
    x = torch.randn(1, 1, 4, 5)
    out = st.spatial_transform(x, torch.tensor([[0.0, 0.0]]), "test_shift")
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: get_transform("tps", grid_size=(1, 1)), r"grid_size: tps needs at least 2 x 2"),
    (lambda: get_transform("piecewise_affine", grid_size=(0, 3)), r"grid_size: piecewise_affine needs at least"),
    (lambda: get_transform("tps", grid_size="4x4"), r"grid_size: tps expects \(rows, cols\)"),
    (lambda: get_transform("tps", learnable_basis=True), r"size: tps with learnable_basis=True needs"),
    (lambda: st.spatial_transform(torch.randn(2, 1, 4, 4), torch.zeros(2, 5), "affine"),
     r"theta: family 'affine' takes 6 parameters"),
    (lambda: get_transform("affine").grid(torch.zeros(2, 7), (3, 3)), r"theta: family 'affine' takes 6"),
], ids=["tps-1x1", "mesh-zero", "tps-grid-type", "learnable-no-size", "wrong-count", "grid-wrong-count"])
def test_bad_options_and_theta(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_spatial_transformer_starts_at_identity_and_groups(device):
    torch.manual_seed(0)
    stn = st.SpatialTransformer(transform="attention", size=(6, 7), num_transforms=2, return_theta=True).to(device)
    x = torch.randn(3, 2, 12, 14, device=device)
    out, theta = stn(x)
    assert out.shape == (3, 2, 2, 6, 7) and theta.shape == (3, 2, 3)
    torch.testing.assert_close(theta, torch.tensor([1.0, 0, 0], device=device).expand(3, 2, 3))
    out.square().mean().backward()
    assert stn.head.weight.grad is not None and stn.head.weight.grad.abs().sum() > 0
    groups = stn.parameter_groups(0.1)
    assert groups[0]["lr"] == pytest.approx(0.01) and len(groups) == 1
    tps = st.SpatialTransformer(transform="tps", size=(6, 7), grid_size=(3, 3), learnable_basis=True,
                                align_corners=True)
    assert tps(torch.randn(2, 1, 9, 9)).shape == (2, 1, 6, 7)  # B built for the module's align_corners
    groups = tps.parameter_groups(0.1)
    assert len(groups) == 2 and groups[1]["params"][0] is tps.family.basis and groups[1]["lr"] == 0.1


def test_misspelt_option_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"transform 'tps' has no option 'grid_sise' \(did you mean 'grid_size'\?\); "
                                        r"its options: grid_size=\(4, 4\), learnable_basis=False, size=None, "
                                        r"align_corners=False"):
        get_transform("tps", grid_sise=(3, 3))
    with pytest.raises(TypeError, match=r"transform 'affine' has no option 'scale'; its options: none"):
        get_transform("affine", scale=2)
    assert get_transform("piecewise_affine", grid_size=(3, 3)).num_params == 18
