"""Make ``import torchvision`` work on CPU-only torch with the CUDA build of torchvision.

torchvision 0.28.0 is the only release pinned to torch 2.13.0, and its PyPI wheel is a CUDA build:
its ``_C.so`` needs libtorch_cuda, so on CPU torch ``import torchvision`` dies registering fake
kernels for ``torchvision::nms`` (see shared notes, environment.md). timm, lightning and torchmetrics
all import torchvision. The fix: before torchvision's first import, try to load its ``_C.so``; only if
that fails, declare the operator schemas it registers meta kernels for, so the import succeeds.
nms / deform_conv2d / io.read_image stay unavailable on such machines (fsseg reads images with PIL).

The fix is installed as an import hook (``install()``), so it costs nothing until torchvision is
imported; the Makefile puts a ``.pth`` line in the virtual environment that calls ``install()`` in
every interpreter (DDP ranks, loader workers, joblib workers, pytest). ``import fsseg`` installs it too.
On a machine where ``_C.so`` loads (CUDA torch) it only loads the library, as torchvision would.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_applied = False
_library = None  # keeps the torch.library.Library alive


def apply() -> str:
    """Apply the fix now; returns 'native', 'schemas' or 'skipped'."""
    global _applied, _library
    if _applied:
        return "skipped"
    _applied = True
    spec = _find_without_hook("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "skipped"
    import torch

    so = os.path.join(next(iter(spec.submodule_search_locations)), "_C.so")
    try:
        torch.ops.load_library(so)
        return "native"
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        try:
            lib.define(schema)
        except RuntimeError:  # already defined by someone else
            pass
    _library = lib
    return "schemas"


def _find_without_hook(name: str):
    hooks = [f for f in sys.meta_path if isinstance(f, _Hook)]
    for h in hooks:
        sys.meta_path.remove(h)
    try:
        return importlib.util.find_spec(name)
    finally:
        for h in hooks:
            sys.meta_path.insert(0, h)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not _applied:
            apply()
        # let the regular finders import it


def install() -> None:
    """Register the import hook (idempotent); apply at once if torchvision is already imported."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
