"""A tiny CUB-200-2011-format folder, written by the tests: a few images in three classes."""

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["001.Red_Bird", "002.Green_Bird", "003.Blue_Bird"]


def make_cub(root, per_class=4, side=48, seed=0):
    """per_class images per class, alternately train and test; each class a colour, plus noise."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "classes.txt": [],
             "bounding_boxes.txt": []}
    image_id = 0
    for c, name in enumerate(CLASSES):
        lines["classes.txt"].append(f"{c + 1} {name}")
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            image_id += 1
            pixels = rng.integers(0, 60, (side, side + 8, 3), dtype=np.uint8)
            pixels[side // 4:3 * side // 4, side // 4:3 * side // 4, c] = 230  # the "bird"
            rel = f"{name}/{name.split('.')[1]}_{j:04d}.jpg"
            Image.fromarray(pixels).save(root / "images" / rel, quality=95)
            lines["images.txt"].append(f"{image_id} {rel}")
            lines["image_class_labels.txt"].append(f"{image_id} {c + 1}")
            lines["train_test_split.txt"].append(f"{image_id} {int(j % 2 == 0)}")
            lines["bounding_boxes.txt"].append(f"{image_id} {side / 4:.1f} {side / 4:.1f} {side / 2:.1f} {side / 2:.1f}")
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")
    return root
