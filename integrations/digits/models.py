"""The paper's distorted-digits models, at a size a laptop CPU trains in seconds.

FCN and CNN are the baselines; ST-FCN and ST-CNN put one spatial transformer (affine, projective
or tps) in front of a slightly smaller classifier of the same kind, with a localisation network of
the same kind (as in the paper), so that parameter counts stay comparable. The transformer samples
its input down to the classifier's input size (``st_size``), so it can also zoom.
"""

from torch import nn

import stn_triton as st

MODELS = ("FCN", "CNN", "ST-FCN-aff", "ST-FCN-proj", "ST-FCN-tps", "ST-CNN-aff", "ST-CNN-proj", "ST-CNN-tps")
FAMILY = {"aff": "affine", "proj": "projective", "tps": "tps"}


def fcn(side, hidden=128, classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, hidden), nn.ReLU(True), nn.Linear(hidden, hidden),
                         nn.ReLU(True), nn.Linear(hidden, classes))


def cnn(side, width=(16, 32), classes=10):
    a, b = width
    after = (side // 2) // 2
    return nn.Sequential(
        nn.Conv2d(1, a, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(2),
        nn.Conv2d(a, b, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(b * after * after, classes),
    )


def localization(kind, side):
    """A small localisation network ending in 32 features."""
    if kind == "FCN":
        return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 32), nn.ReLU(True), nn.Linear(32, 32),
                             nn.ReLU(True))
    return nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(True), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        nn.Linear(16 * 9, 32), nn.ReLU(True),
    )


class STClassifier(nn.Module):
    """A spatial transformer, then a classifier on what it produced."""

    def __init__(self, transformer, classifier):
        super().__init__()
        self.transformer, self.classifier = transformer, classifier

    def forward(self, x):
        return self.classifier(self.transformer(x))

    def parameter_groups(self, lr, localization_lr_scale=0.1):
        groups = self.transformer.parameter_groups(lr, localization_lr_scale)
        return groups + [{"params": list(self.classifier.parameters()), "lr": lr}]


def build(name, side, st_size=None, classes=10, grid_size=(4, 4)):
    """Model ``name`` (see ``MODELS``) for square inputs of ``side`` pixels. ST models sample to
    ``st_size`` (default: ``side``) before classifying."""
    if name == "FCN":
        return fcn(side, classes=classes)
    if name == "CNN":
        return cnn(side, classes=classes)
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "ST" or parts[1] not in ("FCN", "CNN") or parts[2] not in FAMILY:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")
    kind, family = parts[1], FAMILY[parts[2]]
    out = st_size or side
    options = {"grid_size": grid_size} if family == "tps" else {}
    transformer = st.SpatialTransformer(localization(kind, side), transform=family, size=(out, out), **options)
    classifier = fcn(out, hidden=112, classes=classes) if kind == "FCN" else cnn(out, width=(16, 28),
                                                                                  classes=classes)
    return STClassifier(transformer, classifier)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
