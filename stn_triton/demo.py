"""A short, real demonstration of the fused sampler (the README's first command, until the
distorted-digits experiment lands).

Warps a synthetic test card with each kernel form (affine, projective, thin-plate-like basis,
explicit grid) and K=3 parallel transforms, checks forward and gradients against the float64
PyTorch reference, prints the table and writes ``demo_out/warps.png``.

    python -m stn_triton.demo [--out DIR] [--size H W]
"""

import argparse
import math
import os
import time
from pathlib import Path

import torch

import stn_triton as st
from stn_triton import reference


def test_card(H, W):
    """An RGB test card: checkerboard, colour ramps and a ring, values in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    checker = ((torch.floor((x + 1) * 4) + torch.floor((y + 1) * 4)) % 2) * 0.6 + 0.2
    ring = ((x.square() + y.square()).sqrt() - 0.6).abs() < 0.08
    img = torch.stack([checker * (x + 1) / 2, checker * (y + 1) / 2, checker * 0.8], 0)
    img[:, ring] = torch.tensor([1.0, 0.9, 0.1])[:, None]
    return img[None]


def transforms(size, align_corners):
    """K=3 parameters of each form for one image."""
    Ho, Wo = size
    rot = lambda a, s, tx, ty: [[s * math.cos(a), -s * math.sin(a), tx], [s * math.sin(a), s * math.cos(a), ty]]  # noqa: E731
    theta = torch.tensor([[rot(0.3, 0.8, 0.1, 0.0), rot(-0.6, 1.2, 0.0, 0.2), rot(0.0, 0.5, -0.4, -0.4)]])
    h = torch.tensor([[[[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.4, 1.0]],
                       [[0.9, -0.2, 0.1], [0.1, 0.9, 0.0], [0.3, 0.0, 1.0]],
                       [[1.1, 0.0, 0.0], [0.0, 1.1, 0.0], [-0.3, -0.3, 1.0]]]])
    base = reference.base_grid(size, align_corners, torch.float32, "cpu").T  # (3, P)
    bumps = torch.stack([torch.sin(3 * base[1]) * 0.15, torch.cos(4 * base[0]) * 0.15])  # (2, P)
    basis = torch.cat([base, bumps], 0)  # (5, P): [x, y, 1, sin 3y, cos 4x]
    m = torch.cat([theta, torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]] * 3])], dim=3)  # (1, 3, 2, 5)
    grid = torch.einsum("nkcd,dp->nkpc", m.flip(1), basis).reshape(1, 3, Ho, Wo, 2)
    return {"affine": (theta,), "projective": (h,), "basis": (m, basis), "grid": (grid,)}


def call(form, x, params, size, **opts):
    if form == "affine":
        return st.affine_sample(x, params[0], size, **opts)
    if form == "projective":
        return st.projective_sample(x, params[0], size, **opts)
    if form == "basis":
        return st.basis_sample(x, params[0], params[1], size, **opts)
    return st.grid_sample(x, params[0], **opts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="folder for warps.png (default: demo_out)")
    parser.add_argument("--size", type=int, nargs=2, default=(48, 64), metavar=("H", "W"),
                        help="input size; the output is half of it (default: 48 64)")
    args = parser.parse_args(argv)
    H, W = args.size
    size = (H // 2, W // 2)
    x = test_card(H, W)
    print(f"stn-triton demo: input 1x3x{H}x{W} -> K=3 outputs of {size[0]}x{size[1]}, backend: {st.backend(x)}")
    if st.backend(x) == "reference":
        print("  (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU; this run checks the reference only)")
    print(f"{'form':<11} {'padding':<11} {'max |out - ref|':>16} {'max |dx - ref|':>15} {'rel |dθ - ref|':>15} {'time':>7}")
    panels = []
    for form, params in transforms(size, False).items():
        for padding_mode in ("zeros", "border", "reflection"):
            xg = x.clone().requires_grad_()
            pg = [p.clone().requires_grad_() for p in params]
            t0 = time.perf_counter()
            out = call(form, xg, pg, size, padding_mode=padding_mode)
            grad_out = torch.randn_like(out)
            grads = torch.autograd.grad(out, [xg, *pg], grad_out)
            dt = time.perf_counter() - t0
            x64 = x.double().requires_grad_()
            p64 = [p.double().requires_grad_() for p in params]
            ref = reference.form_sample(form, x64, p64, size, "bilinear", padding_mode, False)
            want = torch.autograd.grad(ref, [x64, *p64], grad_out.double())
            err = [(a.double() - b).abs().max().item() for a, b in zip((out, *grads[:2]), (ref, *want[:2]))]
            err[2] /= max(want[1].abs().max().item(), 1e-12)  # relative: a sum over every pixel
            print(f"{form:<11} {padding_mode:<11} {err[0]:>16.2e} {err[1]:>15.2e} {err[2]:>15.2e} {dt:>6.2f}s")
            if max(err[:2]) > 1e-4:
                raise SystemExit(f"{form}/{padding_mode}: kernels disagree with the reference")
            if padding_mode == "zeros":
                panels += [x[0]] + [o for o in out.detach()[0]]
    _save(panels, size, Path(args.out) / "warps.png")
    return 0


def _save(panels, size, path):
    import torch.nn.functional as F
    from torchvision.utils import save_image

    os.makedirs(path.parent, exist_ok=True)
    tiles = [F.interpolate(p[None], size=(size[0] * 3, size[1] * 3), mode="bilinear")[0] for p in panels]
    save_image(torch.stack(tiles).clamp(0, 1), path, nrow=4, padding=4, pad_value=1.0, scale_each=False)
    print(f"wrote {path}: one row per form (affine, projective, basis, grid): the input, then its K=3 outputs")


if __name__ == "__main__":
    raise SystemExit(main())
