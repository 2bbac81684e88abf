"""Device helpers shared by every kernel form: from a normalised coordinate to input pixels.

The coordinate of one output pixel goes through three steps, each exactly as PyTorch's
``grid_sample`` (aten/src/ATen/native/cuda/GridSampler.cuh) does it:

.. math::

    i_x = \\begin{cases} \\frac{g_x + 1}{2} (W - 1) & \\text{align\\_corners} \\\\
                          \\frac{(g_x + 1) W - 1}{2} & \\text{otherwise} \\end{cases}, \\qquad
    a_x = \\frac{\\partial i_x}{\\partial g_x} = \\begin{cases} (W-1)/2 \\\\ W/2 \\end{cases}

    i_x \\leftarrow \\mathrm{pad}(i_x), \\qquad
    \\frac{\\partial i_x}{\\partial g_x} = a_x \\, \\mathrm{pad}'(i_x)

``pad`` is the identity for ``zeros``, a clip to ``[0, W-1]`` for ``border``, and a reflection about
the borders (about pixel centres with align_corners, about the image edges without) followed by the
clip for ``reflection``. The derivative conventions at the clip edges are PyTorch's
(``clip_coordinates_set_grad``: 0 at and beyond the edge).

Non-finite coordinates: ``border`` and ``reflection`` send NaN to pixel 0 (CUDA's ``fmaxf`` semantics)
and +inf to the far border; a coordinate that is still non-finite, or beyond +-2^30, becomes -100
(PyTorch's ``safe_downgrade_to_int_range``), so it reads nothing and writes nothing. Its derivative
is 0.

Bicubic sampling (PyTorch's ``get_value_bounded``) unnormalises without padding and pads each of its
16 taps instead (:func:`cubic_source`, :func:`cubic_tap`):

.. math::

    i_x = \\lfloor i_x \\rfloor + t_x, \\qquad
    V = \\sum_{j=0}^{3} c_j(t_y) \\sum_{i=0}^{3} c_i(t_x)\\,
        U\\big[\\mathrm{pad}(\\lfloor i_y \\rfloor - 1 + j),\\; \\mathrm{pad}(\\lfloor i_x \\rfloor - 1 + i)\\big]

with the cubic convolution coefficients (A = -0.75) of :func:`cubic_coefficients` and 0 for a tap
outside the image (``zeros``). The coordinate's derivative is ``a_x`` times the coefficients'
(no padding derivative: the padding acts on integer taps). Non-finite coordinates, where PyTorch's
CUDA kernel reads the pixel below with NaN weights (NaN out): ``zeros``: as above, the coordinate
becomes -100 and reads nothing; ``border``: NaN and -inf become pixel 0, +inf the last pixel;
``reflection``: pixel 0, each with ``t = 0`` (weight 1 on that pixel: the pixel CUDA's taps read,
as bilinear reads it) and derivative 0.
"""

import triton
import triton.language as tl

from .codes import PAD_BORDER, PAD_REFLECTION, PAD_ZEROS


@triton.jit
def clip_with_grad(i, size):
    """Clip ``i`` to ``[0, size-1]``; derivative 1 strictly inside, 0 elsewhere (and for NaN)."""
    hi = size - 1.0
    d_clip = tl.where((i > 0.0) & (i < hi), 1.0, 0.0)
    i = tl.where(i != i, 0.0, i)
    i = tl.minimum(tl.maximum(i, 0.0), hi)
    return i, d_clip


@triton.jit
def reflect_with_grad(i, size, ALIGN: tl.constexpr):
    """Reflect ``i`` into the image (PyTorch's ``reflect_coordinates_set_grad``), then clip."""
    if ALIGN:
        lo = 0.0
        span = size - 1.0  # (twice_high - twice_low) / 2 with twice_low=0, twice_high=2(W-1)
    else:
        lo = -0.5
        span = size * 1.0  # twice_low=-1, twice_high=2W-1
    t = i - lo
    sign = tl.where(t < 0.0, -1.0, 1.0)
    t = tl.abs(t)
    safe_span = tl.maximum(span, 1.0)
    # one quotient for both: an approximate t / span beside an exact fmod can disagree on the parity
    # at multiples of the span and send the pixel to the opposite border (compiled, not interpreted)
    flips = tl.floor(tl.div_rn(t, safe_span))
    extra = t - flips * safe_span
    extra = tl.where(extra < 0.0, 0.0, extra)
    even = (flips - 2.0 * tl.floor(flips * 0.5)) == 0.0
    r = tl.where(even, extra + lo, safe_span - extra + lo)
    d_ref = tl.where(even, sign, -sign)
    # A one-pixel axis with align_corners has nowhere to reflect to: PyTorch returns 0, derivative 0;
    # NaN and +-inf reflect to pixel 0 (CUDA's fmod -> NaN -> clip), derivative 0.
    finite = t <= 3.4e38  # false for NaN and inf
    r = tl.where(finite, r, 0.0)
    d_ref = tl.where(finite, d_ref, 0.0)
    r = tl.where(span > 0.0, r, 0.0)
    d_ref = tl.where(span > 0.0, d_ref, 0.0)
    r, d_clip = clip_with_grad(r, size)
    return r, d_ref * d_clip


@triton.jit
def unnormalize(g, size, ALIGN: tl.constexpr, FMA: tl.constexpr):
    """Normalised coordinate ``g`` -> unpadded pixel coordinate, and its scale ``a = d i / d g``.

    Operation for operation PyTorch's ``grid_sampler_unnormalize`` as its CUDA kernel computes it:
    ``((g + 1) / 2) * (size - 1)`` with align_corners, ``((g + 1) * size - 1) / 2`` without, where
    nvcc fuses ``(g + 1) * size - 1`` into one correctly rounded multiply-add. A rearranged
    ``a * g + b`` rounds differently, and at a pixel centre that picks the other pair of neighbours.
    ``FMA``: compiled, ``tl.fma``; Triton's interpreter rounds its fma twice, so there the
    multiply-add is done in float64 and rounded once."""
    if ALIGN:
        a = (size - 1) * 0.5
        i = ((g + 1.0) * 0.5) * (size - 1.0)
    else:
        a = size * 0.5
        if FMA:
            i = tl.fma(g + 1.0, size * 1.0, -1.0) * 0.5
        else:
            i = ((g + 1.0).to(tl.float64) * size - 1.0).to(tl.float32) * 0.5
    return i, a


@triton.jit
def source_index(g, size, PAD: tl.constexpr, ALIGN: tl.constexpr, FMA: tl.constexpr):
    """Normalised coordinate ``g`` -> input pixel coordinate and ``d index / d g`` (fp32).

    PyTorch's ``grid_sampler_compute_source_index``: :func:`unnormalize`, then the padding."""
    i, a = unnormalize(g, size, ALIGN, FMA)
    if PAD == PAD_BORDER:
        i, d = clip_with_grad(i, size)
    elif PAD == PAD_REFLECTION:
        i, d = reflect_with_grad(i, size, ALIGN)
    else:
        d = tl.full(i.shape, 1.0, tl.float32)
    valid = (i == i) & (tl.abs(i) < 1073741824.0)
    i = tl.where(valid, i, -100.0)
    d = tl.where(valid, d * a, 0.0)
    return i, d


@triton.jit
def cubic_source(g, size, PAD: tl.constexpr, ALIGN: tl.constexpr, FMA: tl.constexpr):
    """Bicubic: normalised coordinate ``g`` -> unpadded pixel coordinate and ``d i / d g`` (fp32).

    No padding here (each tap is padded, :func:`cubic_tap`). Non-finite coordinates (see the module
    doc): ``zeros`` sends them, and those beyond +-2^30, to -100, where every tap lies outside;
    ``border`` sends NaN and -inf to pixel 0 and +inf to the last pixel; ``reflection`` sends them
    to pixel 0. Either way their derivative is 0."""
    i, a = unnormalize(g, size, ALIGN, FMA)
    if PAD == PAD_ZEROS:
        valid = (i == i) & (tl.abs(i) < 1073741824.0)
        i = tl.where(valid, i, -100.0)
    else:
        valid = tl.abs(i) <= 3.4028234663852886e38  # finite (false for NaN and +-inf)
        if PAD == PAD_BORDER:
            i = tl.where(valid, i, tl.where(i > 0.0, size - 1.0, 0.0))
        else:
            i = tl.where(valid, i, 0.0)
    d = tl.where(valid, a * 1.0, 0.0)
    return i, d


@triton.jit
def cubic_tap(f, size, PAD: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """One bicubic tap (PyTorch's ``get_value_bounded`` / ``add_value_bounded``): its float
    coordinate ``f`` (an integer: floor + offset) padded as the mode says, as an integer clamped
    into ``[0, size - 1]`` (a safe address), and whether the tap lies inside the image (only
    ``zeros`` padding has taps outside; they read 0 and receive nothing)."""
    if PAD == PAD_BORDER:
        f, _ = clip_with_grad(f, size)
    elif PAD == PAD_REFLECTION:
        f, _ = reflect_with_grad(f, size, ALIGN)
    q = f.to(tl.int64) if INT64 else f.to(tl.int32)  # |f| < 2^30 + 3 (zeros) or in [0, size-1]
    inside = (q >= 0) & (q < size)
    q = tl.minimum(tl.maximum(q, 0), size - 1)
    return q, inside


@triton.jit
def cubic_coefficients(t):
    """The four cubic convolution weights at fraction ``t`` (PyTorch's
    ``get_cubic_upsample_coefficients``, A = -0.75), for the taps at offsets -1, 0, 1, 2:

    .. math::

        c_0 = k_2(t + 1),\\; c_1 = k_1(t),\\; c_2 = k_1(1 - t),\\; c_3 = k_2(2 - t), \\qquad
        k_1(x) = ((A + 2) x - (A + 3)) x^2 + 1, \\; k_2(x) = ((A x - 5A) x + 8A) x - 4A
    """
    # A = -0.75: A + 2 = 1.25, A + 3 = 2.25, 5A = -3.75, 8A = -6, 4A = -3 (all exact)
    x0 = t + 1.0
    x2 = 1.0 - t
    x3 = x2 + 1.0
    c0 = ((-0.75 * x0 + 3.75) * x0 - 6.0) * x0 + 3.0
    c1 = (1.25 * t - 2.25) * t * t + 1.0
    c2 = (1.25 * x2 - 2.25) * x2 * x2 + 1.0
    c3 = ((-0.75 * x3 + 3.75) * x3 - 6.0) * x3 + 3.0
    return c0, c1, c2, c3


@triton.jit
def cubic_coefficients_grad(t):
    """``d c_i / d t`` of :func:`cubic_coefficients` (PyTorch's ``get_cubic_coefficients_grad``, whose
    sign is the opposite: it returns ``d c_i / d x`` of the taps' distance)."""
    # k_1'(x) = 3(A + 2) x^2 - 2(A + 3) x = (3.75 x - 4.5) x; k_2'(x) = (3A x - 10A) x + 8A = (-2.25 x + 7.5) x - 6
    x0 = t + 1.0
    x2 = 1.0 - t
    x3 = x2 + 1.0
    d0 = (-2.25 * x0 + 7.5) * x0 - 6.0
    d1 = (3.75 * t - 4.5) * t
    d2 = -((3.75 * x2 - 4.5) * x2)
    d3 = -((-2.25 * x3 + 7.5) * x3 - 6.0)
    return d0, d1, d2, d3


@triton.jit
def round_half_even(v):
    """``nearbyint`` under the default rounding mode: halves go to the even neighbour."""
    f = tl.floor(v)
    frac = v - f
    r = tl.where(frac > 0.5, f + 1.0, f)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((frac == 0.5) & odd, f + 1.0, r)


@triton.jit
def stack4(a, b, c, d):
    """[BP] x 4 -> [BP, 4] (columns a, b, c, d), each pixel's four values in its own thread."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [a.shape[0], 4])


@triton.jit
def stack8(a, b, c, d, e, f, g, h):
    """[BP] x 8 -> [BP, 8] in argument order (a parameter-gradient terms block)."""
    return tl.reshape(tl.join(stack4(a, c, e, g), stack4(b, d, f, h)), [a.shape[0], 8])


@triton.jit
def stack16(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p):
    """[BP] x 16 -> [BP, 16] in argument order."""
    return tl.reshape(tl.join(stack8(a, c, e, g, i, k, m, o), stack8(b, d, f, h, j, l, n, p)), [a.shape[0], 16])


@triton.jit
def field_frame(p_prm, FRAME: tl.constexpr, NDIM: tl.constexpr):
    """A displacement field's frame (:mod:`stn_triton.kernels.flow`), at ``FRAME`` in the parameter row
    ``p_prm``, as ``(sx, sy, sz, cx, cy, cz)``: per grid axis (x, y, z) the scale to normalised units and
    the field component holding that axis (stored as floats). Loaded once per program by the kernels
    and handed to the form's coordinate map. ``FRAME`` -1 (no frame): unit scales, components in order.
    2-D: the z entries are stand-ins."""
    if FRAME >= 0:
        p_f = p_prm + FRAME
        sx = tl.load(p_f + 0)
        sy = tl.load(p_f + 1)
        cx = tl.load(p_f + NDIM + 0).to(tl.int32)
        cy = tl.load(p_f + NDIM + 1).to(tl.int32)
        if NDIM == 3:
            sz = tl.load(p_f + 2)
            cz = tl.load(p_f + 5).to(tl.int32)
        else:
            sz = sx
            cz = cx
    else:
        sx = 1.0
        sy = 1.0
        sz = 1.0
        cx = 0
        cy = 1
        cz = 2
    return sx, sy, sz, cx, cy, cz
