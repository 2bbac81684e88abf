"""Digit images for the distorted-digits experiment.

Every source gives "MNIST-like" digits: float32 (N, 1, 28, 28) in [0, 1], the digit filling about
the central 20 x 20 pixels, and int64 labels.

- :func:`load_sklearn_digits`: scikit-learn's bundled handwritten digits (1,797 real 8 x 8 scans from
  the UCI set, read from the installed package, no download), scaled up to 20 x 20 and centred in
  28 x 28.
- :func:`read_idx` / :func:`load_idx_dir`: MNIST-format IDX files (optionally gzipped), e.g.
  MNIST itself or Fashion-MNIST (Debian's ``dataset-fashion-mnist`` puts it in
  ``/usr/share/datasets/fashion-mnist/``). Limits (``train_limit``, ``test_limit``) are applied
  while reading: only the first N records are read and converted to float.

Not every source fills the frame as MNIST does: :func:`object_radius` measures how far from the
frame's centre the objects reach (Fashion-MNIST's fill the frame), for the distortions to shrink
them into the circle they keep in view.
"""

import gzip
import math
import struct
from dataclasses import dataclass, replace
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
    """A train/test split of digit images (N, 1, 28, 28) in [0, 1] and their labels, and optionally
    a validation split held out of the training set (``val_x``, ``val_y``)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    name: str
    num_classes: int = 10
    val_x: torch.Tensor = None
    val_y: torch.Tensor = None
    object_scale: float = 1.0  # the shrink the distortions apply to these objects (see distortions)

    def limit(self, train=None, test=None):
        """The first ``train`` / ``test`` examples (for quick runs and tests). The loaders take the
        limits themselves, so that the rest is never converted; this is for data already loaded."""
        return replace(self, train_x=self.train_x[:train], train_y=self.train_y[:train], test_x=self.test_x[:test],
                       test_y=self.test_y[:test])

    def hold_out(self, fraction, seed=0):
        """A validation split of ``round(fraction * train)`` images drawn out of the training set (by
        a fixed seeded shuffle: the same split for every experiment seed); the rest stay in order."""
        n = len(self.train_y)
        k = int(round(n * fraction))
        if not 0 <= fraction < 1 or (fraction > 0 and not 0 < k < n):
            raise ValueError(f"validation fraction {fraction}: leaves no validation or no training images of {n}")
        pick = torch.zeros(n, dtype=torch.bool)
        pick[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] = True
        return replace(self, train_x=self.train_x[~pick], train_y=self.train_y[~pick], val_x=self.train_x[pick],
                       val_y=self.train_y[pick])


def object_radius(images, threshold=0.2, percentile=99.0, batch=4096):
    """How far objects reach from the frame's centre: for each image (N, 1, H, W) in [0, 1] the
    largest distance from the centre to a pixel above ``threshold`` (to the pixel's centre, plus half
    a pixel), then the ``percentile`` over the images. MNIST-like digits (a central 20 x 20 box):
    under 14; Fashion-MNIST (filling the 28 x 28 frame): about 19 to 20."""
    if images.numel() == 0:
        return 0.0
    h, w = images.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32) + 0.5 - h / 2
    xs = torch.arange(w, dtype=torch.float32) + 0.5 - w / 2
    r = (ys[:, None].square() + xs[None, :].square()).sqrt() + 0.5
    radii = torch.cat([torch.where(images[i:i + batch, 0] > threshold, r, torch.zeros(())).flatten(1).amax(1)
                       for i in range(0, images.shape[0], batch)])
    return float(torch.quantile(radii.double(), percentile / 100))


def _remaining(f, path, pos):
    """Bytes left in the stream ``f`` after ``pos``, counted in chunks (nothing is kept)."""
    if path.suffix != ".gz":
        return path.stat().st_size - pos
    n = 0
    while chunk := f.read(1 << 20):
        n += len(chunk)
    return n


def read_idx(path, limit=None):
    """Read one IDX file (``.gz`` or not) into a numpy array, with clear errors for bad files.
    ``limit``: only the first ``limit`` records (along the first dimension) are read from the file
    and kept; the rest is only counted (to check the file's length)."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise ValueError(f"IDX file {path}: {len(magic)} bytes, too short for the 4-byte magic number")
            zero, code, ndim = struct.unpack(">HBB", magic)
            if zero != 0 or code not in _IDX_TYPES or ndim == 0:
                raise ValueError(f"IDX file {path}: bad magic number 0x{magic.hex()}; expected 0x0000TTDD with type "
                                 f"TT in {{{', '.join(f'{c:02x}' for c in _IDX_TYPES)}}} and DD >= 1 dimensions "
                                 f"(images are 0x00000803, labels 0x00000801)")
            header = 4 + 4 * ndim
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise ValueError(f"IDX file {path}: truncated header ({4 + len(dims)} of {header} bytes)")
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = np.dtype(_IDX_TYPES[code])
            record = math.prod(shape[1:]) * dtype.itemsize
            keep = shape[0] if limit is None else max(0, min(int(limit), shape[0]))
            body = f.read(keep * record)
            total = header + len(body) + _remaining(f, path, header + len(body))
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file {path}: not found") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"IDX file {path}: cannot decompress ({e})") from None
    want = header + shape[0] * record
    if total != want:
        raise ValueError(f"IDX file {path}: {'truncated' if total < want else 'trailing data'}: header says "
                         f"shape {shape} ({want} bytes in all), file has {total} bytes")
    return np.frombuffer(body, dtype=dtype).reshape((keep, *shape[1:])).astype(dtype.newbyteorder("="))


# the files of an MNIST-format folder (each may also be gzipped, and named with .idx for -idx)
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find(root, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"IDX folder {root}: no {stem}[.gz] in it")


def missing_idx_files(root):
    """Which of :data:`IDX_FILES` the folder ``root`` lacks (in any of their spellings), without reading
    any of them."""
    missing = []
    for stem in IDX_FILES:
        try:
            _find(Path(root), stem)
        except FileNotFoundError:
            missing.append(stem)
    return missing


def _to_frame(images, name):
    images = torch.from_numpy(np.ascontiguousarray(images)).float()
    if images.dim() != 3:
        raise ValueError(f"{name}: expected images of shape (N, H, W), got {tuple(images.shape)}")
    images = images / max(float(images.max()), 1.0) if images.numel() else images
    if images.shape[1:] != (FRAME, FRAME):  # any other size: fit it into MNIST's frame
        images = F.interpolate(images[:, None], size=(FRAME, FRAME), mode="bilinear", antialias=True,
                               align_corners=False)[:, 0]
    return images[:, None].clamp_(0, 1)


def load_idx_dir(root, train_limit=None, test_limit=None):
    """MNIST-format folder: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``. With
    ``train_limit`` / ``test_limit`` only the first N of each split are read and converted."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"data: {root} is not a folder of IDX files")
    parts = {}
    for split, prefix, limit in (("train", "train", train_limit), ("test", "t10k", test_limit)):
        ipath, lpath = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(ipath, limit), read_idx(lpath, limit)
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"IDX files {ipath} and {lpath}: {len(images)} images but labels of shape {labels.shape}")
        parts[split] = (_to_frame(images, str(ipath)), torch.from_numpy(labels.astype(np.int64)))
    num_classes = int(max((int(t.max()) for _, t in parts.values() if t.numel()), default=0)) + 1
    return Digits(*parts["train"], *parts["test"], name=root.name, num_classes=num_classes)


def load_sklearn_digits(test_fraction=0.25, split_seed=0, train_limit=None, test_limit=None):
    """scikit-learn's 1,797 bundled 8 x 8 digits, scaled to 20 x 20 in a 28 x 28 frame, split into
    train and test by a fixed seeded shuffle (the same split for every experiment seed); the limits
    keep the first N of each split (before conversion)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the default dataset is scikit-learn's digits: pip install 'stn-triton[digits]'") from e
    bunch = load_digits()
    y = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test][:test_limit], order[n_test:][:train_limit]

    def frame(idx):
        x = torch.from_numpy(bunch.images[idx.numpy()]).float()[:, None] / 16.0  # (n, 1, 8, 8), values 0..16
        x = F.interpolate(x, size=(DIGIT, DIGIT), mode="bicubic", align_corners=False).clamp_(0, 1)
        pad = (FRAME - DIGIT) // 2
        return F.pad(x, (pad, pad, pad, pad))

    return Digits(frame(train), y[train], frame(test), y[test], name="sklearn-digits")
