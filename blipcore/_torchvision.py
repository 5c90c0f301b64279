"""Import torchvision on a CPU-only torch.

torchvision 0.28.0 (the only release for torch 2.13.0) ships as a CUDA build on PyPI. Its Python
side registers fake kernels for `torchvision::nms` and `torchvision::qnms`, which fails with
"operator torchvision::nms does not exist" when its compiled ops did not load. Declaring the two
schemas first lets the import succeed; blipcore uses only transforms, never those ops.
"""

import torch

if torch.version.cuda is None:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when torchvision's own ops loaded
    except (AttributeError, RuntimeError):
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import torchvision  # noqa: E402
from torchvision.transforms import v2 as transforms  # noqa: E402

__all__ = ["torchvision", "transforms"]
