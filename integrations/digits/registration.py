"""Image registration in seconds on the CPU: a dense displacement field optimised so that the warped
moving image matches the fixed one (mean squared error plus a smoothness penalty), with
:func:`stn_triton.flow_sample` as the warp.

Two pairs: a digit (scikit-learn's bundled digits, 28 x 28) and an elastically deformed copy of it,
and a small volume (a 3-D blob pattern, 24^3) and a deformed copy. The deformations are smooth random
fields the optimiser never sees. Printed and written to ``OUT/results.json``: the mean squared error
before and after, and the share of pixels where the learnt map folds (its Jacobian determinant is not
positive); ``OUT/figures/registration.png`` shows the 2-D pair and the middle slice of the 3-D one.

``python -m stn_triton.integrations.digits.registration [--steps N] [--seed S] [--out DIR]``
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stn_triton as st
from stn_triton._cli import HelpFormatter, description

from .experiment import draw_figure


def smooth_field(shape, amplitude, gen, coarse=4):
    """A smooth random displacement (N, nd, *size) in pixels, index order: noise on a coarse grid,
    upsampled (bi/trilinear), scaled so that its largest component is ``amplitude`` pixels."""
    nd = len(shape) - 2
    small = torch.randn(shape[0], nd, *[coarse] * nd, generator=gen)
    up = F.interpolate(small, size=shape[2:], mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
    return up * (amplitude / up.abs().max())


def smoothness(u):
    """Mean squared finite difference of the field along every spatial axis (the diffusion regulariser)."""
    return sum((u.diff(dim=d) ** 2).mean() for d in range(2, u.dim()))


def jacobian_determinant(u):
    """det(I + grad u) at each interior pixel (central differences), for u (N, nd, *size) in pixels,
    index order."""
    nd = u.dim() - 2
    rows = []
    for i in range(nd):  # d(u_i)/d(axis j): row i of the Jacobian of the map p + u(p)
        row = []
        for j in range(nd):
            lo = [slice(None), i] + [slice(1, -1)] * nd
            hi = list(lo)
            lo[2 + j], hi[2 + j] = slice(0, -2), slice(2, None)
            row.append((u[tuple(hi)] - u[tuple(lo)]) / 2 + (1.0 if i == j else 0.0))
        rows.append(torch.stack(row, -1))
    return torch.linalg.det(torch.stack(rows, -2))


def folding(u):
    """The share of interior pixels where the map p + u(p) folds: Jacobian determinant <= 0."""
    return (jacobian_determinant(u) <= 0).double().mean().item()


def register(moving, fixed, steps=200, lr=0.2, weight=0.05):
    """The field u (channels first, pixels) minimising mse(warp(moving, u), fixed) + weight *
    smoothness(u), by Adam from zero."""
    u = torch.zeros(moving.shape[0], moving.dim() - 2, *moving.shape[2:], requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(st.flow_sample(moving, u, align_corners=True), fixed) + weight * smoothness(u)
        loss.backward()
        opt.step()
    return u.detach()


def blobs(side, gen, count=6):
    """A 3-D pattern (1, 1, side, side, side): a sum of Gaussian blobs at random places and widths."""
    axis = torch.arange(side, dtype=torch.float32)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    vol = torch.zeros(side, side, side)
    for _ in range(count):
        c = 0.2 * side + 0.6 * side * torch.rand(3, generator=gen)
        s = side * (0.06 + 0.08 * torch.rand(1, generator=gen))
        vol += torch.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * s ** 2))
    return (vol / vol.max())[None, None]


def pair(moving, amplitude, gen):
    """(moving, fixed, the true field): fixed is moving warped by a smooth random field."""
    true = smooth_field((1, moving.dim() - 2, *moving.shape[2:]), amplitude, gen)
    return moving, st.flow_sample(moving, true, align_corners=True), true


def _measure(moving, fixed, u, true):
    """What the learnt field ``u`` achieved: the error before and after, its folding, and its mean
    end-point error against the true field (before: the true field's mean length)."""
    moved = st.flow_sample(moving, u, align_corners=True)
    return {"mse_before": F.mse_loss(moving, fixed).item(), "mse_after": F.mse_loss(moved, fixed).item(),
            "folding": folding(u), "largest_displacement_px": u.abs().max().item(),
            "endpoint_error_before_px": true.norm(dim=1).mean().item(),
            "endpoint_error_after_px": (u - true).norm(dim=1).mean().item()}, moved


def run(steps=200, seed=0, out="runs/registration", log=print):
    """Register the 2-D and the 3-D pair; returns the results dict (also written under ``out``)."""
    from .data import load_sklearn_digits

    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    digits = load_sklearn_digits(train_limit=16, test_limit=1)
    digit = digits.train_x[seed % len(digits.train_x)][None].float()  # (1, 1, 28, 28)
    results, figure = {}, {}
    for name, moving, amplitude in (("2d", digit, 2.5), ("3d", blobs(24, gen), 2.0)):
        moving, fixed, true = pair(moving, amplitude, gen)
        t0 = time.perf_counter()
        u = register(moving, fixed, steps=steps)
        r, moved = _measure(moving, fixed, u, true)
        r.update(seconds=time.perf_counter() - t0, steps=steps, shape=list(moving.shape),
                 true_largest_displacement_px=true.abs().max().item())
        results[name] = r
        log(f"{name}: mean squared error {r['mse_before']:.5f} -> {r['mse_after']:.5f} "
            f"({r['mse_after'] / r['mse_before']:.1%} of before), folding {r['folding']:.2%} of pixels, "
            f"mean end-point error {r['endpoint_error_before_px']:.2f} -> {r['endpoint_error_after_px']:.2f} px, "
            f"{r['seconds']:.1f} s")
        if name == "3d":  # the middle slice along depth, padded to the digit's 28 x 28
            side = digit.shape[-1] - moving.shape[-1]
            pad = (side // 2, side - side // 2) * 2
            moving, fixed, moved = (F.pad(t[:, :, t.shape[2] // 2], pad) for t in (moving, fixed, moved))
        figure[name] = (moving, fixed, moved)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    results["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    inputs = torch.cat([figure["2d"][0], figure["3d"][0]])
    # the differences on one scale per pair (the difference before registration at full brightness)
    scale = {k: max((figure[k][1] - figure[k][0]).abs().max().item(), 1e-12) for k in ("2d", "3d")}
    rows = {"fixed": torch.cat([figure["2d"][1], figure["3d"][1]]),
            "moved": torch.cat([figure["2d"][2], figure["3d"][2]]),
            "|fixed - moving|": torch.cat([(figure[k][1] - figure[k][0]).abs() / scale[k] for k in ("2d", "3d")]),
            "|fixed - moved|": torch.cat([(figure[k][1] - figure[k][2]).abs() / scale[k] for k in ("2d", "3d")])}
    rows = {k: v if k.startswith("|") else v / max(v.max().item(), 1e-12) for k, v in rows.items()}
    captions = [f"{k}: mse {r['mse_before']:.5f} -> {r['mse_after']:.5f}, folding {r['folding']:.1%}"
                for k, r in ((k, results[k]) for k in ("2d", "3d"))]
    draw_figure(out / "figures" / "registration.png", "registration", inputs / inputs.max(), rows,
                captions=captions, input_label="moving",
                title="a digit | a volume's middle slice")
    log(f"wrote {out / 'results.json'}, {out / 'figures' / 'registration.png'}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stn_triton.integrations.digits.registration",
                                description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="Adam steps per pair (default 200)")
    p.add_argument("--seed", type=int, default=0, help="the deformations' and the digit's seed (default 0)")
    p.add_argument("--out", default="runs/registration", help="where results.json and figures/ go")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: expected a positive number of steps, got {args.steps}")
    try:
        import sklearn  # noqa: F401
    except ModuleNotFoundError:
        raise SystemExit("registration: the digit comes from scikit-learn's bundled digits: "
                         "pip install 'stn-triton[digits]'") from None
    run(args.steps, args.seed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
