"""Training augmentation of a whole batch on the device: the per-image transform of `build_transform` (random
resized crop or square resize, colour jitter, normalisation) applied to images read from the image cache, with
the very draws the per-image transform makes.

`BatchAugment` is made from the transform itself (the `Compose` a folder dataset holds), so the two cannot drift
apart: its crop's scale and ratio, its jitter's ranges, its interpolation and its normalisation are the
transform's, and its random draws are the transform's own `make_params`, called on the host under the item's
seed exactly as `CaptionDataset` seeds the item's transform. An item therefore gets the same crop box on the
original picture, the same jitter factors in the same order and the same flip as from the folder loader; what
differs is only the pixels the crop is resampled from (the cached copy at about 1.5x the model's size, the box
rounded to its pixels) and float rounding. tests/test_image_cache.py compares the two, item by item and as
distributions.

Resampling is antialiased as PIL resizes (what the per-image transform calls): the filter widened by the
downscaling factor, its taps clipped to the crop and renormalised, the result rounded to 8 bits. On a CPU it runs
per image through torch's uint8 kernel, which mirrors PIL's and reads only the crop's pixels and the filter's
taps; elsewhere the whole batch is two batched matrix products with those weights (`_weights`), a handful of
kernels whatever the batch size. Flip, jitter and normalisation run on the whole batch on either device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .._torchvision import transforms

# ColorJitter's operations by its fn_idx numbers; hue (3) is never part of a set (blipcore.data.transforms.JITTER)
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
_GREY = (0.2989, 0.587, 0.114)  # torchvision's luma weights (rgb_to_grayscale)
_MODES = {transforms.InterpolationMode.BICUBIC: "bicubic", transforms.InterpolationMode.BILINEAR: "bilinear"}
_CUBIC = -0.5  # the bicubic kernel's a, as PIL (and torch's antialiased kernels) use it


@dataclass(frozen=True)
class Draws:
    """One item's random draws. `box`: (top, left, height, width) of its crop on the original picture (the whole
    picture when the transform does not crop); `order`: the jitter operations in the order they run (empty
    without jitter); `factors`: the brightness, contrast and saturation factors (1.0 where not drawn)."""

    box: tuple[int, int, int, int]
    order: tuple[int, ...] = ()
    factors: tuple[float, float, float] = (1.0, 1.0, 1.0)


class BatchAugment:
    """A folder dataset's training transform, for batches of uint8 images on any device.

    `per_image`: resample each window on its own (None, the default: on a CPU only). Raises ValueError for a
    transform with a step it cannot batch (anything but RandomResizedCrop or Resize to a square, ToImage, ToDtype,
    ColorJitter without hue, Normalize: what build_transform makes)."""

    def __init__(self, transform: transforms.Compose, per_image: bool | None = None) -> None:
        self.per_image = per_image
        self.crop: transforms.RandomResizedCrop | None = None
        self.jitter: transforms.ColorJitter | None = None
        resize = mean = std = None
        for step in transform.transforms:
            if isinstance(step, transforms.RandomResizedCrop):
                self.crop = resize = step
            elif isinstance(step, transforms.Resize):
                resize = step
            elif isinstance(step, transforms.ColorJitter) and step.hue is None:
                self.jitter = step
            elif isinstance(step, transforms.Normalize):
                mean, std = step.mean, step.std
            elif not isinstance(step, (transforms.ToImage, transforms.ToDtype)):
                raise ValueError(f"the image cache cannot batch the transform step {type(step).__name__}")
        size = [] if resize is None else list(resize.size) * (2 if len(resize.size) == 1 else 1)
        if mean is None or size[:1] != size[1:] or resize.interpolation not in _MODES or not resize.antialias:
            raise ValueError("the image cache batches a square resize or random resized crop (bicubic or bilinear, "
                             "antialiased) followed by normalisation; this transform is not one")
        self.size, self.mode = size[0], _MODES[resize.interpolation]
        self.mean, self.std = mean, std
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def draws(self, height: int, width: int) -> Draws:
        """The draws of one item whose original picture is height x width, from torch's default CPU generator,
        in the order the transform makes them (crop, then jitter): seed it with the item's seed first, under
        torch.random.fork_rng, as CaptionDataset does before calling the transform."""
        probe = torch.empty(()).expand(3, height, width)  # what make_params reads: the size only
        box = (0, 0, height, width)
        if self.crop is not None:
            params = self.crop.make_params([probe])
            box = (params["top"], params["left"], params["height"], params["width"])
        if self.jitter is None:
            return Draws(box)
        params = self.jitter.make_params([probe])
        drawn = {BRIGHTNESS: params["brightness_factor"], CONTRAST: params["contrast_factor"],
                 SATURATION: params["saturation_factor"]}
        order = tuple(op for op in params["fn_idx"].tolist() if drawn.get(op) is not None)
        factors = tuple(1.0 if drawn[op] is None else float(drawn[op]) for op in (BRIGHTNESS, CONTRAST, SATURATION))
        return Draws(box, order, factors)

    def __call__(self, images: torch.Tensor, slots: Sequence[int], windows: np.ndarray, transposed: Sequence[bool],
                 draws: Sequence[Draws], flips: Sequence[bool]) -> torch.Tensor:
        """The normalised float batch [B, 3, size, size] on images' device. `images`: [N, H, W, 3] uint8 slots;
        item b is the window rows windows[b, 0]:windows[b, 1], columns windows[b, 2]:windows[b, 3] of slot
        slots[b], stored transposed (rows along the picture's width) where transposed[b]; then mirrored where
        flips[b] and jittered by draws[b]."""
        device = images.device
        # every number of the batch in one host-to-device copy, from pinned memory where the device is a GPU
        order = np.zeros((len(draws), 3), dtype=np.float32)  # per position: the operation (brightness: a no-op
        strength = np.ones((len(draws), 3), dtype=np.float32)  # at factor 1) and its factor
        for b, draw in enumerate(draws):
            order[b, :len(draw.order)] = draw.order
            strength[b, :len(draw.order)] = [draw.factors[op] for op in draw.order]
        params = torch.from_numpy(np.concatenate([np.asarray(slots, np.float32)[:, None], windows.astype(np.float32),
                                                  np.asarray([transposed, flips], np.float32).T, order, strength], 1))
        if device.type != "cpu":
            params = params.pin_memory().to(device, non_blocking=True)
        if self.per_image or (self.per_image is None and device.type == "cpu"):
            pixels = self._resample_each(images, slots, windows, transposed, flips)
        else:
            pixels = self._resample_batch(images, params[:, 0].long(), params[:, 1:5], params[:, 5] > 0,
                                          params[:, 6] > 0)
        if device not in self._constants:  # copied once: a copy to a GPU waits for the work queued on it
            mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (self.mean, self.std))
            luma = torch.tensor(_GREY, device=device).view(1, 3, 1, 1)
            self._constants[device] = (-mean / std, 1 / std, 1 / (255 * std), luma)
        shift, scale, scale_255, luma = self._constants[device]
        if self.jitter is None:  # (x / 255 - mean) / std, in one pass
            return torch.addcmul(shift, pixels, scale_255)
        pixels = _jitter(pixels.mul(1.0 / 255), params[:, 7:10].long(), params[:, 10:13], luma)
        return torch.addcmul(shift, pixels, scale)

    def _resample_each(self, images: torch.Tensor, slots: Sequence[int], windows: np.ndarray,
                       transposed: Sequence[bool], flips: Sequence[bool]) -> torch.Tensor:
        """Each window resampled on its own by torch's uint8 antialiased kernel (PIL's arithmetic) and mirrored
        where flips says: float 0-255."""
        out = []
        for slot, (r0, r1, c0, c1), turned, flip in zip(slots, windows.tolist(), transposed, flips, strict=True):
            window = images[slot, r0:r1, c0:c1].permute((2, 1, 0) if turned else (2, 0, 1))[None]
            window = window.contiguous(memory_format=torch.channels_last)  # the kernel's fast layout
            pixels = F.interpolate(window, size=(self.size, self.size), mode=self.mode, antialias=True)[0]
            out.append(pixels.flip(-1) if flip else pixels)
        return torch.stack(out).float()

    def _resample_batch(self, images: torch.Tensor, slots: torch.Tensor, windows: torch.Tensor,
                        transposed: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Every window resampled at once: rows_weights @ slot @ columns_weights^T per channel, transposed back
        where the slot holds the picture transposed, mirrored where flips; rounded and clamped to 8 bits as PIL's
        output is."""
        batch = images[slots].permute(0, 3, 1, 2).float()  # [B, 3, H, W]
        rows = _weights(windows[:, 0], windows[:, 1], batch.shape[2], self.size, self.mode)
        columns = _weights(windows[:, 2], windows[:, 3], batch.shape[3], self.size, self.mode)
        out = rows[:, None] @ batch @ columns.transpose(1, 2)[:, None]
        out = torch.where(transposed.view(-1, 1, 1, 1), out.transpose(-1, -2), out)
        out = torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
        return out.round_().clamp_(0, 255)


def _weights(start: torch.Tensor, stop: torch.Tensor, size: int, out: int, mode: str) -> torch.Tensor:
    """[B, out, size]: the antialiased resampling weights of pixels start..stop-1 (of `size`) onto `out` pixels,
    as PIL and torch's antialiased interpolation compute them: output pixel o centred at start + (o + 0.5) *
    scale, the filter stretched by the scale when it shrinks, taps outside the window dropped, each row
    normalised to sum 1."""
    scale = (stop - start) / out
    stretch = scale.clamp(min=1.0)[:, None, None]
    centre = start[:, None] + (torch.arange(out, device=start.device) + 0.5) * scale[:, None]
    pixel = torch.arange(size, device=start.device, dtype=start.dtype)
    t = ((pixel + 0.5)[None, None] - centre[:, :, None]).abs() / stretch
    if mode == "bilinear":
        weights = (1 - t).clamp(min=0)
    else:
        weights = torch.where(t < 1, ((_CUBIC + 2) * t - (_CUBIC + 3)) * t * t + 1,
                              torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * _CUBIC, torch.zeros_like(t)))
    inside = (pixel[None, None] >= start[:, None, None]) & (pixel[None, None] < stop[:, None, None])
    weights = weights * inside
    return weights / weights.sum(-1, keepdim=True)


def _jitter(pixels: torch.Tensor, order: torch.Tensor, strength: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    """ColorJitter of a float batch in [0, 1], each image with its own operations in its own order: at position p,
    image b blends with a target by factor strength[b, p] and is clamped to [0, 1], the target being black for
    brightness, its grey mean for contrast and its grey image for saturation (torchvision's adjust_brightness,
    adjust_contrast, adjust_saturation; `luma` their grey weights). Brightness at factor 1 leaves an image as it
    is."""
    for p in range(order.shape[1]):
        op, factor = order[:, p].view(-1, 1, 1, 1), strength[:, p].view(-1, 1, 1, 1)
        grey = (pixels * luma).sum(1, keepdim=True)
        target = torch.where(op == SATURATION, grey, torch.where(op == CONTRAST, grey.mean((2, 3), keepdim=True), 0))
        pixels = pixels.mul(factor).add_(target * (1 - factor)).clamp_(0, 1)
    return pixels
