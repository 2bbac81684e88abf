"""Integrations with other libraries (timm models, the CUB experiment); see the timm issue."""
