"""What a user writing a family of their own is told when it is wrong, before any kernel runs.

- A family that defines neither ``grid`` nor ``kernel_form`` (TransformFamily's defaults call each
  other) is refused when registered, and when used unregistered, instead of a RecursionError.
- A ``grid`` (or ``kernel_form``) whose result does not fit the size asked for is refused, naming
  the family, the method and both shapes, instead of being sampled.
- A misspelt family name is an ``ArgumentError`` naming ``transform`` (and still a ``KeyError``).
"""

import pytest
import torch

import stn_triton as st
import transforms_registry as tr
from stn_triton import modules
from transforms_registry import KernelForm, TransformFamily, get_transform, register_transform

NEITHER = (r"defines neither grid\(theta, size, align_corners\) nor kernel_form\(theta, size, align_corners\); "
           r"a TransformFamily must define one: grid\(theta, size, align_corners\) returning the sampling grid "
           r"\(N, Ho, Wo, 2\)")


class NoGrid(TransformFamily):
    name = "no_grid"
    num_params = 2

    def identity(self):
        return torch.zeros(2)


class Shift(TransformFamily):
    """Translation by theta (2 parameters), through grid() only; ``out`` bends its result."""

    name = "shift"
    num_params = 2

    def __init__(self, out=None):
        super().__init__()
        self.out = out

    def identity(self):
        return torch.zeros(2)

    def grid(self, theta, size, align_corners=False):
        base = tr.base_grid(size, align_corners, theta.dtype, theta.device)[:2].T  # (P, 2)
        g = (base[None] + theta[:, None]).reshape(theta.shape[0], *size, 2)
        return self.out(g) if self.out is not None else g


@pytest.fixture
def no_sampling(monkeypatch):
    """Every sampler fails the test if reached: the errors come before any sampling."""
    def reached(*args, **kwargs):
        raise AssertionError("a sampler ran")

    for name in ("grid_sample", "affine_sample", "projective_sample", "basis_sample"):
        monkeypatch.setattr(modules.Fn, name, reached)


@pytest.fixture
def scratch_registry(monkeypatch):
    # (whether plugins were loaded is restored too: loaded into the scratch copy, they would be lost)
    monkeypatch.setattr(tr.registry, "_plugins_loaded", tr.registry._plugins_loaded)
    monkeypatch.setattr(tr.registry, "_REGISTRY", dict(tr.registry._REGISTRY))
    monkeypatch.setattr(tr.registry, "_SOURCES", dict(tr.registry._SOURCES))


# 1. neither grid nor kernel_form

def test_family_without_grid_or_kernel_form_is_refused_at_registration(scratch_registry):
    with pytest.raises(TypeError, match=r"register_transform: NoGrid " + NEITHER):
        register_transform(NoGrid)
    with pytest.raises(TypeError, match=r"register_transform: .*Inline " + NEITHER):
        @register_transform(name="inline")
        class Inline(NoGrid):
            pass
    assert "no_grid" not in tr.list_transforms() and "inline" not in tr.list_transforms()
    register_transform(Shift)  # a grid() of its own is enough; so is an inherited one
    register_transform(type("ShiftChild", (Shift,), {}), name="shift_child")


def test_family_without_grid_or_kernel_form_used_unregistered(no_sampling):
    x, theta = torch.randn(1, 1, 4, 4), torch.zeros(1, 2)
    with pytest.raises(st.ArgumentTypeError, match=r"^transform: NoGrid " + NEITHER):
        st.spatial_transform(x, theta, NoGrid())
    with pytest.raises(st.ArgumentTypeError, match=r"^transform: NoGrid " + NEITHER):
        st.SpatialTransformer(transform=NoGrid())
    # called directly: an error, not a RecursionError (which is a RuntimeError too)
    for method in (NoGrid().grid, NoGrid().kernel_form):
        with pytest.raises(NotImplementedError, match=r"^NoGrid " + NEITHER):
            method(theta, (4, 4))


def test_grid_or_kernel_form_calling_its_default_does_not_recurse():
    class SuperGrid(NoGrid):
        def grid(self, theta, size, align_corners=False):
            return super().grid(theta, size, align_corners) * 2

    class SuperForm(NoGrid):
        def kernel_form(self, theta, size, align_corners=False):
            return super().kernel_form(theta, size, align_corners)

    theta = torch.zeros(1, 2)
    with pytest.raises(NotImplementedError, match=r"SuperGrid.grid calls TransformFamily.grid, which derives the grid "
                                                  r"from kernel_form\(theta, size, align_corners\); .*SuperGrid does "
                                                  r"not define kernel_form\(theta, size, align_corners\), so its "
                                                  r"grid\(theta, size, align_corners\) must compute the grid itself"):
        SuperGrid().grid(theta, (3, 3))
    with pytest.raises(NotImplementedError, match=r"SuperForm.kernel_form calls TransformFamily.kernel_form, which "
                                                  r"wraps the grid that grid\(theta, size, align_corners\) returns; "
                                                  r".*SuperForm does not define grid\(theta, size, align_corners\)"):
        SuperForm().kernel_form(theta, (3, 3))


# 2. a grid that does not fit

GRID_WHO = r"^transform: family 'shift' \(Shift\): grid\(theta, size, align_corners\) returned the sampling grid "


@pytest.mark.parametrize("out,theta_shape,match", [
    (lambda g: g[:, :3, :3], (2, 2), r"of shape \(2, 3, 3, 2\); expected \(N, Ho, Wo, 2\) = \(2, 4, 5, 2\) for "
                                      r"N = 2 \(theta's rows\) and size \(4, 5\)$"),
    (lambda g: g.transpose(1, 2), (2, 2), r"of shape \(2, 5, 4, 2\); expected \(N, Ho, Wo, 2\) = \(2, 4, 5, 2\)"),
    (lambda g: torch.cat([g, g[..., :1]], -1), (2, 2), r"of shape \(2, 4, 5, 3\); expected \(N, Ho, Wo, 2\)"),
    (lambda g: g.flatten(1, 2), (2, 2), r"of shape \(2, 20, 2\); expected \(N, Ho, Wo, 2\) = \(2, 4, 5, 2\)"),
    (lambda g: g[:1], (2, 3, 2), r"of shape \(1, 4, 5, 2\); expected \(N, Ho, Wo, 2\) = \(6, 4, 5, 2\) for N = 6"),
], ids=["size", "transposed", "last-dim", "ndim", "batch-of-K"])
def test_grid_of_another_shape_is_refused(no_sampling, out, theta_shape, match):
    with pytest.raises(st.ArgumentError, match=GRID_WHO + match):
        st.spatial_transform(torch.randn(2, 1, 6, 6), torch.zeros(theta_shape), Shift(out), size=(4, 5))


def test_grid_of_another_type_is_refused(no_sampling):
    x, theta = torch.randn(1, 1, 4, 4), torch.zeros(1, 2)
    with pytest.raises(st.ArgumentTypeError, match=GRID_WHO + r"of dtype torch.int64; expected a floating-point"):
        st.spatial_transform(x, theta, Shift(lambda g: g.long()))
    with pytest.raises(st.ArgumentTypeError, match=GRID_WHO + r"as list; expected a torch.Tensor"):
        st.spatial_transform(x, theta, Shift(lambda g: g.tolist()))


def test_module_refuses_a_bad_grid_too(no_sampling):
    stn = st.SpatialTransformer(transform=Shift(lambda g: g[:, 1:]), size=(5, 5))
    with pytest.raises(st.ArgumentError, match=GRID_WHO + r"of shape \(3, 4, 5, 2\); expected \(N, Ho, Wo, 2\) = "
                                                          r"\(3, 5, 5, 2\)"):
        stn(torch.randn(3, 1, 8, 8))


def test_3d_grid_of_another_shape_is_refused(no_sampling):
    class Shift3d(TransformFamily):
        name, ndim, num_params = "shift3d", 3, 3

        def identity(self):
            return torch.zeros(3)

        def grid(self, theta, size, align_corners=False):
            return torch.zeros(theta.shape[0], *size, 2)  # 2 coordinates, not 3

    with pytest.raises(st.ArgumentError, match=r"transform: family 'shift3d' \(.*Shift3d\): grid\(theta, size, "
                                               r"align_corners\) returned the sampling grid of shape "
                                               r"\(1, 2, 3, 4, 2\); expected \(N, Do, Ho, Wo, 3\) = \(1, 2, 3, 4, 3\)"):
        st.spatial_transform(torch.randn(1, 1, 3, 3, 3), torch.zeros(1, 3), Shift3d(), size=(2, 3, 4))


def test_kernel_form_of_another_shape_is_refused(no_sampling):
    class BadAffine(TransformFamily):
        name, num_params = "bad_affine", 6

        def identity(self):
            return torch.tensor([1.0, 0, 0, 0, 1, 0])

        def kernel_form(self, theta, size, align_corners=False):
            return KernelForm("affine", theta.reshape(-1, 3, 2))

    with pytest.raises(st.ArgumentError, match=r"transform: family 'bad_affine' \(.*BadAffine\): kernel_form\(theta, "
                                               r"size, align_corners\) returned KernelForm m \(kind 'affine'\) of "
                                               r"shape \(2, 3, 2\); expected \(N, 2, 3\) = \(2, 2, 3\)"):
        st.spatial_transform(torch.randn(2, 1, 4, 4), torch.zeros(2, 6), BadAffine())


# 3. a misspelt family name

REGISTERED = r"registered: affine, affine3d, attention, .*tps"


@pytest.mark.parametrize("call", [
    lambda t: st.spatial_transform(torch.randn(1, 1, 4, 4), torch.zeros(1, 6), t),
    lambda t: st.spatial_transform(torch.randn(1, 1, 4, 4), torch.zeros(1, 6), transform=t),
    lambda t: st.SpatialTransformer(transform=t),
], ids=["spatial_transform", "spatial_transform-keyword", "SpatialTransformer"])
def test_misspelt_family_name_names_transform(no_sampling, call):
    with pytest.raises(st.ArgumentError, match=r"^transform: expected the name of a registered family or a "
                                               r"TransformFamily instance, got 'afine' \(did you mean 'affine'\?\); "
                                               + REGISTERED) as err:
        call("afine")
    assert isinstance(err.value, (KeyError, ValueError))  # callers written for the registry's KeyError still catch it
    with pytest.raises(st.ArgumentError, match=r"^transform: .*got 'nope'; " + REGISTERED):  # nothing close
        call("nope")


def test_family_name_of_another_type(no_sampling):
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(st.ArgumentTypeError, match=r"^transform: expected the name of a registered family \(a str\) "
                                                   r"or a TransformFamily instance, got int"):
        st.spatial_transform(x, torch.zeros(1, 6), 6)
    with pytest.raises(st.ArgumentTypeError, match=r"^transform: .*got the class Shift; pass an instance, "
                                                   r"Shift\(\.\.\.\)"):
        st.spatial_transform(x, torch.zeros(1, 2), Shift)


def test_registry_lookup_suggests_too():
    with pytest.raises(KeyError, match=r"unknown transform 'afine' \(did you mean 'affine'\?\); known: affine, "):
        get_transform("afine")
