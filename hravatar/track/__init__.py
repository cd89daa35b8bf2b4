"""Face tracking: MediaPipe landmarks, head-model fitting to them, temporal filters.

MediaPipe is imported lazily (``pip install hravatar[track]``); fitting and filters need torch only.
"""
from .filters import OneEuroFilter
from .fit import (
    FitResult,
    FitWeights,
    LandmarkFitter,
    LandmarkRig,
    estimate_camera,
    fit_expression_pose,
    project,
    webcam_intrinsics,
)
from .landmarks import Detection, FaceLandmarker, MediaPipeMissing, PersonSegmenter

__all__ = [
    "Detection",
    "FaceLandmarker",
    "FitResult",
    "FitWeights",
    "LandmarkFitter",
    "LandmarkRig",
    "MediaPipeMissing",
    "OneEuroFilter",
    "PersonSegmenter",
    "estimate_camera",
    "fit_expression_pose",
    "project",
    "webcam_intrinsics",
]
