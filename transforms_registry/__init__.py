"""Transformation families as data the kernels understand (pure PyTorch; the plugin registry lands
with the registry issue)."""
