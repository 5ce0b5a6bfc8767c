"""bcseg-wsi: whole-slide segmentation of breast-cancer H&E slides into five tissue classes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bcseg-wsi")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
