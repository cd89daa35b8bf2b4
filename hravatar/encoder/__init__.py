"""Expression encoder (SMIRK's architecture, plain torch) and consistent face crops."""
from .crop import box_from_mask, crop_and_resize, crop_box_from_landmarks, points_to_crop, smooth_boxes
from .expression import (
    SMIRK_PREFIX,
    EncoderConfig,
    ExpressionEncoder,
    SmirkLoadResult,
    encoder_state,
    load_encoder_state,
    load_smirk_weights,
    output_regression_loss,
    split_encoder_outputs,
)
from .mobilenetv3 import MobileNetV3LargeMinimal

__all__ = [
    "EncoderConfig",
    "ExpressionEncoder",
    "MobileNetV3LargeMinimal",
    "SMIRK_PREFIX",
    "SmirkLoadResult",
    "box_from_mask",
    "crop_and_resize",
    "crop_box_from_landmarks",
    "encoder_state",
    "load_encoder_state",
    "load_smirk_weights",
    "points_to_crop",
    "smooth_boxes",
    "output_regression_loss",
    "split_encoder_outputs",
]
