"""Image preprocessing: PIL RGB image -> normalised float tensor [3, S, S], as BLIP does it.

No horizontal flip in training: captions say "left" and "right", and a flip would make them lies.
"""

from __future__ import annotations

import torch

from blipcore._torchvision import transforms

# CLIP's statistics, which BLIP reuses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = transforms.InterpolationMode.BICUBIC


def build_transform(image_size: int, train: bool) -> transforms.Compose:
    """Train: random resized crop (50-100% of the area); eval: resize to a square. Both normalise."""
    if train:
        resize = transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=_BICUBIC, antialias=True)
    else:
        resize = transforms.Resize((image_size, image_size), interpolation=_BICUBIC, antialias=True)
    return transforms.Compose(
        [resize, transforms.ToImage(), transforms.ToDtype(torch.float32, scale=True), transforms.Normalize(MEAN, STD)]
    )


def denormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of a [3, H, W] or [B, 3, H, W] tensor, clamped to [0, 1] for display."""
    mean = torch.tensor(MEAN, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return (tensor * std + mean).clamp(0.0, 1.0)
