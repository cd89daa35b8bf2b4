"""The hravatar dataset format (frames, masks, tracked parameters) and its loader."""
from .dataset import FrameSample, HeadVideoDataset, resize_image
from .format import (
    DatasetError,
    DatasetMeta,
    check_params,
    frame_path,
    gt_path,
    open_validated,
    partial_path,
    png_info,
    read_gt_info,
    read_meta,
    read_params,
    read_png,
    to_uint8,
    validate_dataset,
    write_dataset,
    write_frame,
    write_meta,
    write_params,
    write_png,
)

__all__ = [
    "DatasetError", "DatasetMeta", "FrameSample", "HeadVideoDataset", "check_params", "frame_path", "gt_path",
    "open_validated", "partial_path", "png_info", "read_gt_info", "read_meta", "read_params", "read_png", "resize_image", "to_uint8",
    "validate_dataset", "write_dataset", "write_frame", "write_meta", "write_params", "write_png",
]
