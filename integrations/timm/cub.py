"""CUB-200-2011, read from its official folder layout::

    root/images/<class folder>/<image>.jpg
    root/images.txt               <image id> <path under images/>
    root/image_class_labels.txt   <image id> <class id, 1..200>
    root/train_test_split.txt     <image id> <1 = train, 0 = test>
    root/classes.txt              <class id> <class name>
    root/bounding_boxes.txt       <image id> <x> <y> <width> <height>   (pixels)

Every metadata file is checked line by line: a missing file, a malformed line, an unknown id or an
image path leading outside ``root/images`` is an error naming the file and the line.
"""

import math
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt")


def _read(root, name, fields, parse):
    """({first field: parsed rest}, {first field: line number}) from a whitespace-separated metadata
    file."""
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"CUB metadata {path}: not found")
    out, lines = {}, {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1) if fields == 2 else line.split()
            if len(parts) != fields:
                raise ValueError(f"CUB metadata {path}, line {lineno}: expected {fields} fields, got {len(parts)}: "
                                 f"{line.rstrip()!r}")
            try:
                key = int(parts[0])
                value = parse(parts[1:])
            except ValueError as e:
                raise ValueError(f"CUB metadata {path}, line {lineno}: {e}: {line.rstrip()!r}") from None
            if key in out:
                raise ValueError(f"CUB metadata {path}, line {lineno}: id {key} appears twice")
            out[key], lines[key] = value, lineno
    if not out:
        raise ValueError(f"CUB metadata {path}: no entries")
    return out, lines


def _flag(v):
    if v[0] not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {v[0]!r}")
    return v[0] == "1"


def _box(v):
    box = tuple(float(t) for t in v)
    if not all(math.isfinite(t) for t in box) or box[2] <= 0 or box[3] <= 0:
        raise ValueError("expected a finite box with positive width and height")
    return box


class CUB200(Dataset):
    """CUB-200-2011 (``split`` "train" or "test"). Items are ``(image, label)`` with labels 0..199
    (the files count from 1); ``transform`` is applied to the PIL image (see :func:`cub_transforms`).
    ``boxes[i]`` is item i's bounding box (x, y, w, h) in pixels of the original image."""

    def __init__(self, root, split="train", transform=None):
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise NotADirectoryError(f"CUB root {root}: not a folder")
        images_dir = (root / "images").resolve()
        paths, path_line = _read(root, "images.txt", 2, lambda v: v[0].strip())
        labels, label_line = _read(root, "image_class_labels.txt", 2, lambda v: int(v[0]))
        is_train, _ = _read(root, "train_test_split.txt", 2, _flag)
        classes, _ = _read(root, "classes.txt", 2, lambda v: v[0].strip())
        boxes, _ = _read(root, "bounding_boxes.txt", 5, _box)
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train),
                            ("bounding_boxes.txt", boxes)):
            missing = sorted(set(paths) - set(table))
            if missing:
                raise ValueError(f"CUB metadata {root / name}: no entry for image id {missing[0]} (of images.txt)")
        # class ids must be 1..len(classes)
        if sorted(classes) != list(range(1, len(classes) + 1)):
            raise ValueError(f"CUB metadata {root / 'classes.txt'}: class ids must be 1..{len(classes)}")
        self.classes = [classes[i] for i in range(1, len(classes) + 1)]
        self.root, self.split, self.transform = root, split, transform
        self.samples, self.boxes = [], []
        for image_id in sorted(paths):
            rel = paths[image_id]
            full = (images_dir / rel).resolve()
            if Path(rel).is_absolute() or not full.is_relative_to(images_dir):
                raise ValueError(f"CUB metadata {root / 'images.txt'}, line {path_line[image_id]}: path {rel!r} leads "
                                 f"outside {images_dir}")
            label = labels[image_id]
            if not 1 <= label <= len(self.classes):
                raise ValueError(f"CUB metadata {root / 'image_class_labels.txt'}, line {label_line[image_id]}: "
                                 f"class {label} is not in classes.txt (1..{len(self.classes)})")
            if is_train[image_id] == (split == "train"):
                self.samples.append((full, label - 1))
                self.boxes.append(boxes[image_id])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"CUB image {path}: listed in images.txt but missing") from None
        except OSError as e:  # truncated or not an image
            raise OSError(f"CUB image {path}: cannot read it ({e})") from None
        return (self.transform(image) if self.transform else image), label


def cub_transforms(model, training, img_size=None):
    """timm's transforms from the model's data config (``pretrained_cfg``: its input size, mean,
    std, interpolation): random-resized-crop and flip for training, resize + centre crop for
    evaluation. ``img_size`` overrides the input side."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (3, img_size, img_size)} if img_size else {}, model=model)
    return create_transform(**cfg, is_training=training)
