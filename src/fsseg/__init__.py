"""fsseg: a few-shot semantic segmentation experiment suite."""

from fsseg._torchvision_fix import install as _install_torchvision_fix

_install_torchvision_fix()

__version__ = "0.1.0"
