"""Evaluation: image-quality metrics and visual error reports."""
from .metrics import (
    error_strip,
    gaussian_window,
    heatmap,
    load_lpips,
    lpips_or_none,
    lpips_weights_available,
    mae100,
    mse,
    normal_cosine,
    psnr,
    scale_invariant_mse,
    ssim,
    ssim_map,
)

__all__ = [
    "error_strip", "gaussian_window", "heatmap", "load_lpips", "lpips_or_none", "lpips_weights_available", "mae100",
    "mse", "normal_cosine", "psnr", "scale_invariant_mse", "ssim", "ssim_map",
]
