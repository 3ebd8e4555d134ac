"""Datasets for ganbench: which images (`DataSpec`), loading them (`load_images`) and feeding them
to the training device (`DeviceBatcher`). Images are uint8 [N, C, H, W] at this boundary."""

from ganlib.data.batcher import DeviceBatcher
from ganlib.data.images import ImageSet, choose_subset, convert_images, load_images, to_float, to_uint8
from ganlib.data.sources import (
    DATA_ROOT_ENV,
    DATASETS,
    FOLDER,
    IMAGE_SUFFIXES,
    DatasetEntry,
    clear_memo,
    data_root,
    list_image_files,
    native_images,
    read_image,
)
from ganlib.data.spec import DataSpec

__all__ = [
    "DATASETS", "DATA_ROOT_ENV", "FOLDER", "IMAGE_SUFFIXES", "DataSpec", "DatasetEntry", "DeviceBatcher",
    "ImageSet", "choose_subset", "clear_memo", "convert_images", "data_root", "list_image_files",
    "load_images", "native_images", "read_image", "to_float", "to_uint8",
]
