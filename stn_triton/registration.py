"""Displacement fields as registration models use them: a warp layer, the composition of two fields and
the integration of a stationary velocity field (scaling and squaring), all through
:func:`stn_triton.flow_sample` (one fused kernel per warp).

A field ``u`` maps output pixel p to the input point p + u(p) (a pull-back, as ``grid_sample``'s grid):
warping by ``first`` and then by ``second`` is warping once by ``compose_flows(first, second)``.
"""

from torch import nn

from .functional import ArgumentError, _check_tensor, flow_sample


def _field_image(u, layout):
    """The field as an image of its components, (N, nd, *size) (a view)."""
    if layout == "channels_first":
        return u
    return u.movedim(-1, 1)


def _as_layout(img, layout):
    return img if layout == "channels_first" else img.movedim(1, -1)


def _check_field(name, u):
    _check_tensor(name, u)
    if u.dim() not in (4, 5):
        raise ArgumentError(f"{name}: expected one field per image, (N, 2, Ho, Wo) or (N, 3, Do, Ho, Wo) "
                            f"(layout='grid': (N, Ho, Wo, 2) or (N, Do, Ho, Wo, 3)), got shape {tuple(u.shape)}")


def compose_flows(first, second, mode="bilinear", padding_mode="zeros", align_corners=True,
                  layout="channels_first", units="pixels"):
    """The field of warping by ``first`` and then by ``second``: ``second + first`` sampled at
    p + second(p) (``first`` warped by ``second``, as an image of its components). Both fields have
    one shape, and the layout and units of :func:`~stn_triton.flow_sample` (defaults: VoxelMorph's)."""
    _check_field("first", first)
    _check_field("second", second)
    if first.shape != second.shape:
        raise ArgumentError(f"second: expected the shape of first, {tuple(first.shape)}, got {tuple(second.shape)}")
    if first.device != second.device:
        raise ArgumentError(f"second: expected a tensor on {first.device} (the device of first), got {second.device}")
    img = _field_image(first, layout)
    warped = flow_sample(img, second, mode=mode, padding_mode=padding_mode, align_corners=align_corners, layout=layout,
                         units=units)
    return second + _as_layout(warped, layout)


def integrate_velocity(velocity, steps=7, mode="bilinear", padding_mode="zeros", align_corners=True,
                       layout="channels_first", units="pixels"):
    """Scaling and squaring: the displacement of the time-1 flow of the stationary velocity field
    ``velocity``, ``u = velocity / 2**steps`` composed with itself ``steps`` times (``u + u(p + u(p))``
    each time), as diffeomorphic registration methods do (VoxelMorph's ``VecInt``, with its 7 steps by
    default). ``steps = 0`` returns the velocity itself."""
    _check_field("velocity", velocity)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ArgumentError(f"steps: expected an int >= 0, got {steps!r}")
    u = velocity / (2 ** steps) if steps else velocity
    for _ in range(steps):
        u = compose_flows(u, u, mode, padding_mode, align_corners, layout, units)
    return u


class FlowWarp(nn.Module):
    """A warp layer: ``layer(source, flow)`` is :func:`~stn_triton.flow_sample` with the layer's options.

    With its defaults (fields channels first, in pixels, index order; ``align_corners=True``) it is a
    drop-in for VoxelMorph's ``SpatialTransformer(size, mode)`` (its older form) and
    ``SpatialTransformer()`` (today's): ``FlowWarp(size, mode)(src, flow)`` gives their result;
    ``FlowWarp(mode=m, padding_mode="border")`` is MONAI's ``Warp(m)``. ``size`` (optional) is the fields'
    spatial size, checked at each call; no grid buffer is kept (the kernel makes each pixel's base
    point). ``layer(source, flow, theta)`` warps by the affine maps ``theta`` and the field together
    (``A x + u(x)``, :func:`~stn_triton.flow_sample`)."""

    def __init__(self, size=None, mode="bilinear", padding_mode="zeros", align_corners=True,
                 layout="channels_first", units="pixels"):
        super().__init__()
        if size is not None:
            if isinstance(size, int) or not all(isinstance(s, int) and s > 0 for s in size) or len(size) not in (2, 3):
                raise ArgumentError(f"size: expected the fields' spatial size, 2 or 3 positive ints, got {size!r}")
            size = tuple(size)
        self.size, self.mode, self.padding_mode, self.align_corners = size, mode, padding_mode, align_corners
        self.layout, self.units = layout, units

    def forward(self, source, flow, theta=None):
        if self.size is not None:
            nd = len(self.size)
            got = tuple(flow.shape[-nd:] if self.layout == "channels_first" else flow.shape[-nd - 1:-1])
            if got != self.size:
                raise ArgumentError(f"flow: expected the spatial size {self.size} this layer was made for, got "
                                    f"{got} (shape {tuple(flow.shape)})")
        return flow_sample(source, flow, theta, mode=self.mode, padding_mode=self.padding_mode,
                           align_corners=self.align_corners, layout=self.layout, units=self.units)

    def extra_repr(self):
        return (f"size={self.size}, mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
                f"align_corners={self.align_corners}, layout={self.layout!r}, units={self.units!r}")
