"""Captioned images in COCO caption format (real or generated) as torch datasets.

`build_datasets(cfg)` is the entry point; `load_image` is the one way images are decoded.
"""

from blipcore.data.coco import (
    AnnotationError,
    CaptionCollator,
    CaptionDataset,
    DatasetNotFoundError,
    ImageRecord,
    ImageSkippedWarning,
    build_datasets,
    load_coco_annotations,
)
from blipcore.data.images import MAX_PIXELS, ImageLoadError, load_image
from blipcore.data.shapes import generate_shapes, shapes_ready
from blipcore.data.transforms import MEAN, STD, build_transform, denormalize

__all__ = [
    "MAX_PIXELS",
    "MEAN",
    "STD",
    "AnnotationError",
    "CaptionCollator",
    "CaptionDataset",
    "DatasetNotFoundError",
    "ImageLoadError",
    "ImageRecord",
    "ImageSkippedWarning",
    "build_datasets",
    "build_transform",
    "denormalize",
    "generate_shapes",
    "load_coco_annotations",
    "load_image",
    "shapes_ready",
]
