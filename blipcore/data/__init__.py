"""What training reads: captioned images in COCO caption format (real or generated) as torch datasets.

`build_datasets(cfg)` is the entry point; `load_image` is the one way images are decoded. WebDataset shards
(`ShardDataset`) live in `blipcore.data.shards`, imported on use; the decoded-image cache of data.loader = "cache"
(`CacheLoader`) in `blipcore.data.image_cache`, imported by the trainer. Getting public datasets onto disk, writing
shards, resizing and planting noise is offline preparation, in `blipcore.data.prep`: it imports this package,
never the reverse.
"""

from .coco import (
    AnnotationError,
    CaptionCollator,
    CaptionDataset,
    DatasetNotFoundError,
    ImageRecord,
    ImageSkippedWarning,
    load_coco_annotations,
)
from .datasets import build_datasets
from .folders import DataSourceError
from .images import MAX_PIXELS, ImageLoadError, load_image
from .shapes import generate_shapes, shapes_ready
from .transforms import MEAN, STD, build_transform, denormalize

__all__ = [
    "MAX_PIXELS",
    "MEAN",
    "STD",
    "AnnotationError",
    "CaptionCollator",
    "CaptionDataset",
    "DataSourceError",
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
