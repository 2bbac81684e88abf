"""Digit images for the distorted-digits experiment.

Every source gives "MNIST-like" digits: float32 (N, 1, 28, 28) in [0, 1], the digit filling about
the central 20 x 20 pixels, and int64 labels.

- :func:`load_sklearn_digits`: scikit-learn's bundled handwritten digits (1,797 real 8 x 8 scans from
  the UCI set, read from the installed package, no download), scaled up to 20 x 20 and centred in
  28 x 28.
- :func:`read_idx` / :func:`load_idx_dir`: MNIST-format IDX files (optionally gzipped), e.g.
  MNIST itself or Fashion-MNIST (Debian's ``dataset-fashion-mnist`` puts it in
  ``/usr/share/datasets/fashion-mnist/``).
"""

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FRAME = 28  # MNIST's frame
DIGIT = 20  # MNIST's digits fit a 20 x 20 box

# IDX: magic = 0x00 0x00 <type code> <number of dimensions>, then one big-endian int32 per dimension
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}


@dataclass
class Digits:
    """A train/test split of digit images (N, 1, 28, 28) in [0, 1] and their labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    name: str
    num_classes: int = 10

    def limit(self, train=None, test=None):
        """The first ``train`` / ``test`` examples (for quick runs and tests)."""
        return Digits(self.train_x[:train], self.train_y[:train], self.test_x[:test], self.test_y[:test], self.name,
                      self.num_classes)


def read_idx(path):
    """Read one IDX file (``.gz`` or not) into a numpy array, with clear errors for bad files."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file {path}: not found") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"IDX file {path}: cannot decompress ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"IDX file {path}: {len(raw)} bytes, too short for the 4-byte magic number")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(f"IDX file {path}: bad magic number 0x{raw[:4].hex()}; expected 0x0000TTDD with type "
                         f"TT in {{{', '.join(f'{c:02x}' for c in _IDX_TYPES)}}} and DD >= 1 dimensions "
                         f"(images are 0x00000803, labels 0x00000801)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path}: truncated header ({len(raw)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    want = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != want:
        raise ValueError(f"IDX file {path}: {'truncated' if len(raw) < want else 'trailing data'}: header says "
                         f"shape {shape} ({want} bytes in all), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"IDX folder {root}: no {stem}[.gz] in it")


def _to_frame(images, name):
    images = torch.from_numpy(np.ascontiguousarray(images)).float()
    if images.dim() != 3:
        raise ValueError(f"{name}: expected images of shape (N, H, W), got {tuple(images.shape)}")
    images = images / max(float(images.max()), 1.0) if images.numel() else images
    if images.shape[1:] != (FRAME, FRAME):  # any other size: fit it into MNIST's frame
        images = F.interpolate(images[:, None], size=(FRAME, FRAME), mode="bilinear", antialias=True,
                               align_corners=False)[:, 0]
    return images[:, None].clamp_(0, 1)


def load_idx_dir(root):
    """MNIST-format folder: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"data: {root} is not a folder of IDX files")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ipath, lpath = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(ipath), read_idx(lpath)
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"IDX files {ipath} and {lpath}: {len(images)} images but labels of shape {labels.shape}")
        parts[split] = (_to_frame(images, str(ipath)), torch.from_numpy(labels.astype(np.int64)))
    num_classes = int(max(parts["train"][1].max(), parts["test"][1].max())) + 1
    return Digits(*parts["train"], *parts["test"], name=root.name, num_classes=num_classes)


def load_sklearn_digits(test_fraction=0.25, split_seed=0):
    """scikit-learn's 1,797 bundled 8 x 8 digits, scaled to 20 x 20 in a 28 x 28 frame, split into
    train and test by a fixed seeded shuffle (the same split for every experiment seed)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the default dataset is scikit-learn's digits: pip install 'stn-triton[digits]'") from e
    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float()[:, None] / 16.0  # (1797, 1, 8, 8), values 0..16
    x = F.interpolate(x, size=(DIGIT, DIGIT), mode="bicubic", align_corners=False).clamp_(0, 1)
    pad = (FRAME - DIGIT) // 2
    x = F.pad(x, (pad, pad, pad, pad))
    y = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test], name="sklearn-digits")
