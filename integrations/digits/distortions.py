"""The paper's distortions of MNIST-like digits (Jaderberg et al. 2015, appendix A.1), made with this
library's own transforms.

Each distortion takes digits (N, 1, 28, 28) in [0, 1] and a ``torch.Generator`` and returns the
distorted images (N, 1, S, S) in [0, 1] on a canvas of side S:

======  ======  ==============================================================================
name    canvas  what
======  ======  ==============================================================================
R       28      rotation, uniform within +-``max_angle`` (90 degrees)
RTS     42      rotation +-45 degrees, scale 0.7 to 1.2, random placement in a canvas 1.5x the
                digit's frame (so the scaled digit stays inside)
P       28      projective: scale 0.75 to 1.0, then each of the frame's four corners moved by
                Gaussian noise (``corner_std`` pixels)
E       28      elastic: a thin plate spline whose 4 x 4 control points are moved by Gaussian
                noise (``point_std`` pixels)
TC      60      translated and cluttered: the digit placed anywhere in a 60 x 60 canvas, plus
                ``clutter`` random 6 x 6 patches cut from other digits (of the batch, or of
                ``clutter_from``)
======  ======  ==============================================================================

The magnitudes are keyword options. With identity settings (angle 0, scale 1, no noise,
``translate=False``, no clutter) each gives the undistorted digit, centred in its canvas.

The distortions are designed for MNIST's geometry: the object within the frame's inscribed circle
(radius 14 px; MNIST's digits fill a central 20 x 20 box), so that rotating it by any angle, or
scaling it by up to 1.2 and moving it within the RTS canvas, crops nothing. Objects that fill the
frame (Fashion-MNIST) are shrunk first: every distortion takes ``object_scale`` (default 1), which
shrinks the object about the frame's centre in the same sampling step (it is the same as resizing
the data before distorting it, without a second interpolation); :func:`object_scale_for` measures
it from the data (``data.object_radius``).

``distort(..., return_params=True)`` also returns the parameters it drew (e.g. R's and RTS's
``angle`` in radians, drawn first from the generator), so that what was applied to the test set is
known exactly rather than re-derived.
"""

import math

import torch

import stn_triton as st
from transforms_registry import get_transform

from .data import FRAME

DISTORTIONS = ("R", "RTS", "P", "E", "TC")
FULL_ANGLE = {"R": 90.0, "RTS": 45.0}  # the paper's largest rotation (degrees) of R and RTS
RTS_SCALE = (0.7, 1.2)  # the range of RTS's scale factors
RTS_CANVAS = 1.5  # RTS's canvas side over the digit's frame (42 px for 28)


def _uniform(gen, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _place(digits, gen, canvas, angle, scale, shift):
    """Affine placement: canvas coordinates -> the digit's frame. angle (radians), scale, shift (in
    canvas-normalised units) are (N,) / (N, 2) tensors. Returns the images and theta (N, 2, 3)."""
    ratio = canvas / FRAME  # one normalised canvas unit is `ratio` normalised frame units
    c, s = torch.cos(angle), torch.sin(angle)
    rot_inv = torch.stack([c, s, -s, c], 1).view(-1, 2, 2)  # rotation by -angle
    a = rot_inv * (ratio / scale)[:, None, None]
    b = -(a @ shift[:, :, None])
    theta = torch.cat([a, b], 2).float()
    return st.affine_sample(digits, theta, (canvas, canvas)), theta


def rotate(digits, gen, max_angle=FULL_ANGLE["R"], object_scale=1.0):
    n = digits.shape[0]
    angle = _uniform(gen, n, -max_angle, max_angle) * math.pi / 180
    one = torch.full((n,), float(object_scale), dtype=torch.float64)
    out, theta = _place(digits, gen, FRAME, angle, one, torch.zeros(n, 2, dtype=torch.float64))
    return out, {"angle": angle, "theta": theta}


def rotate_translate_scale(digits, gen, max_angle=FULL_ANGLE["RTS"], scale=RTS_SCALE, canvas_factor=RTS_CANVAS,
                           translate=True, object_scale=1.0, place=None, place_weight=1.0):
    """RTS: ``digits`` rotated by up to ``max_angle`` degrees, scaled by a factor drawn from ``scale``
    and placed on a canvas ``canvas_factor`` times the frame's side, its centre anywhere the scaled
    frame stays inside the canvas (``translate``: the share of that room used). ``place`` (x, y), each
    in [-1, 1], pulls the placement towards that point of the room (-1, -1: the top left), by
    ``place_weight`` (1: there; 0: uniform, as without it; the same draws either way)."""
    n = digits.shape[0]
    canvas = int(round(FRAME * canvas_factor))
    angle = _uniform(gen, n, -max_angle, max_angle) * math.pi / 180
    s = _uniform(gen, n, *scale)
    room = (1 - s * FRAME / canvas).clamp_min(0) * float(translate)  # keep the scaled frame inside the canvas
    where = 2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1
    if place is not None:
        target = torch.tensor(place, dtype=torch.float64)
        if target.shape != (2,) or not bool(target.abs().le(1).all()) or not 0 <= place_weight <= 1:
            raise ValueError(f"place: expected (x, y) in [-1, 1] and place_weight in [0, 1], got {place!r} and "
                             f"{place_weight!r}")
        where = where + place_weight * (target - where)
    shift = where * room[:, None]
    out, theta = _place(digits, gen, canvas, angle, s * object_scale, shift)
    return out, {"angle": angle, "scale": s, "shift": shift, "theta": theta}


def homography(src, dst):
    """The (N, 3, 3) homographies (last entry 1) mapping the four points ``src`` (N, 4, 2) onto
    ``dst`` (N, 4, 2): the 8 x 8 direct linear transform, solved in float64."""
    src, dst = src.double(), dst.double()
    x, y = src.unbind(-1)
    u, v = dst.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)  # (N, 8, 8)
    h = torch.linalg.solve(a, torch.cat([u, v], 1))
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


CORNERS = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)


def projective(digits, gen, scale=(0.75, 1.0), corner_std=3.0, object_scale=1.0):
    n = digits.shape[0]
    s = _uniform(gen, n, *scale)
    noise = torch.randn(n, 4, 2, generator=gen, dtype=torch.float64) * (corner_std * 2 / FRAME)
    where = CORNERS * s[:, None, None] + noise  # where the frame's corners land on the canvas
    h = homography(where, CORNERS.expand(n, 4, 2) / object_scale)  # canvas -> frame
    return st.projective_sample(digits, h.float(), (FRAME, FRAME)), {"scale": s, "corners": where, "h": h.float()}


def elastic(digits, gen, point_std=2.0, grid_size=(4, 4), object_scale=1.0):
    family = get_transform("tps", grid_size=grid_size)
    n = digits.shape[0]
    ident = family.identity().double()
    theta = ident + torch.randn(n, ident.numel(), generator=gen, dtype=torch.float64) * (point_std * 2 / FRAME)
    theta = (theta / object_scale).float()  # the spline is linear in its control points: T / object_scale
    return st.spatial_transform(digits, theta, family, (FRAME, FRAME)), {"theta": theta}


def translate_clutter(digits, gen, canvas=60, clutter=6, patch=6, translate=True, object_scale=1.0,
                      clutter_from=None):
    n = digits.shape[0]
    room = (1 - FRAME / canvas) * float(translate)
    shift = (2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1) * room
    scale = torch.full((n,), float(object_scale), dtype=torch.float64)
    out, theta = _place(digits, gen, canvas, torch.zeros(n, dtype=torch.float64), scale, shift)
    source = digits if clutter_from is None else clutter_from
    if clutter and (n > 1 if clutter_from is None else len(clutter_from) > 0):
        for _ in range(clutter):
            # a patch from another digit (never the image's own; or any of `clutter_from`), cut where
            # digits have ink
            if clutter_from is None:
                other = (torch.arange(n) + torch.randint(1, n, (n,), generator=gen)) % n
            else:
                other = torch.randint(0, len(clutter_from), (n,), generator=gen)
            lo, hi = (FRAME - 20) // 2, (FRAME + 20) // 2 - patch
            cy, cx = (torch.randint(lo, hi + 1, (2, n), generator=gen))
            py, px = torch.randint(0, canvas - patch + 1, (2, n), generator=gen)
            r = torch.arange(patch)
            src = source[other[:, None, None], 0, (cy[:, None] + r)[:, :, None], (cx[:, None] + r)[:, None, :]]
            rows, cols = (py[:, None] + r)[:, :, None], (px[:, None] + r)[:, None, :]
            idx = torch.arange(n)[:, None, None]
            out[idx, 0, rows, cols] = torch.maximum(out[idx, 0, rows, cols], src)
    return out, {"shift": shift, "theta": theta}


GENERATORS = {"R": rotate, "RTS": rotate_translate_scale, "P": projective, "E": elastic, "TC": translate_clutter}


def distort(name, digits, gen, return_params=False, object_scale=1.0, **options):
    """Apply distortion ``name`` (one of R, RTS, P, E, TC) to ``digits`` (N, 1, 28, 28).

    ``object_scale`` (0 < s <= 1) shrinks the object about the frame's centre first (see the module
    docstring). With ``return_params=True`` returns ``(images, params)``: the parameters drawn, float64
    (N, ...) tensors keyed by name (R: ``angle``; RTS: ``angle``, ``scale``, ``shift``; P: ``scale``,
    ``corners``; TC: ``shift``; every one also the sampling transform it used, ``theta`` or ``h``),
    angles in radians: the digit appears rotated by ``angle``, its canvas -> frame map being the
    rotation ``[[cos, sin], [-sin, cos]]``."""
    if name not in GENERATORS:
        raise ValueError(f"distortion: expected one of {', '.join(DISTORTIONS)}, got {name!r}")
    if digits.dim() != 4 or digits.shape[1:] != (1, FRAME, FRAME):
        raise ValueError(f"digits: expected (N, 1, {FRAME}, {FRAME}), got {tuple(digits.shape)}")
    if not 0 < object_scale <= 1:
        raise ValueError(f"object_scale: expected a number in (0, 1], got {object_scale!r}")
    with torch.no_grad():
        out, params = GENERATORS[name](digits, gen, object_scale=object_scale, **options)
        out = out.clamp_(0, 1)
    return (out, params) if return_params else out


def applied_angles(name, digits, gen, **options):
    """The rotation (radians, (N,)) that distortion ``name`` applies to each of ``digits`` when drawn
    from ``gen`` (R and RTS; the angles are what ``distort(..., return_params=True)`` reports)."""
    if name not in ("R", "RTS"):
        raise ValueError(f"applied_angles: only R and RTS rotate, got {name!r}")
    return distort(name, digits, gen, return_params=True, **options)[1]["angle"]


def object_scale_for(radius, keep=FRAME / 2):
    """The shrink that brings objects of ``radius`` pixels (from the frame's centre) within
    ``keep`` pixels (the frame's inscribed circle, which no rotation or RTS placement crops): 1 for
    MNIST-like digits (within a central 20 x 20 box), about 0.7 for objects filling the frame."""
    return 1.0 if radius <= keep else keep / radius


def canvas_size(name, **options):
    """The side of the canvas distortion ``name`` produces."""
    return distort(name, torch.zeros(1, 1, FRAME, FRAME), torch.Generator().manual_seed(0), **options).shape[-1]
