"""Captioned images in COCO caption format (real or generated) as torch datasets.

`build_datasets(cfg)` is the entry point; `load_image` is the one way images are decoded. Public datasets
onto disk: `fetch_coco` (COCO 2017 by URL), `convert_flickr8k` (the Flickr8k zips); WebDataset shards
(`write_shards`, `ShardDataset`) live in `blipcore.data.shards`, imported on use.
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
from blipcore.data.coco2017 import fetch_coco
from blipcore.data.fetch import DataSourceError
from blipcore.data.flickr8k import convert_flickr8k
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
    "DataSourceError",
    "DatasetNotFoundError",
    "ImageLoadError",
    "ImageRecord",
    "ImageSkippedWarning",
    "build_datasets",
    "build_transform",
    "convert_flickr8k",
    "denormalize",
    "fetch_coco",
    "generate_shapes",
    "load_coco_annotations",
    "load_image",
    "shapes_ready",
]
