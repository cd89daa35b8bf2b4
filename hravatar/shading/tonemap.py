"""Tone mapping of linear HDR radiance to display sRGB.

Operators:
    "aces":      Narkowicz's fit of the ACES filmic curve, per channel (monotonic).
    "aces_hill": Stephen Hill's RRT+ODT fit with the sRGB <-> ACES AP1 matrices (more
                 faithful hue handling; input scaled by 1/0.6, as three.js does, which brings its
                 exposure close to "aces": mid-grey 0.18 maps to 0.21 vs 0.27).
    "reinhard":  x / (1 + x).
    "linear":    clamp to [0, 1].
All are followed by the sRGB OETF.
"""
from __future__ import annotations

import torch
from torch import Tensor

TONEMAP_OPERATORS = ("aces", "aces_hill", "reinhard", "linear")


def srgb_oetf(x: Tensor) -> Tensor:
    """Linear [0, 1] -> sRGB-encoded [0, 1] (IEC 61966-2-1). Shape preserved."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055)


def srgb_eotf(x: Tensor) -> Tensor:
    """sRGB-encoded [0, 1] -> linear [0, 1] (inverse of :func:`srgb_oetf`). Shape preserved."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def aces_narkowicz(x: Tensor) -> Tensor:
    """Narkowicz 2015 ACES filmic fit x (2.51 x + 0.03) / (x (2.43 x + 0.59) + 0.14), clamped to [0, 1]."""
    x = x.clamp_min(0.0)
    return ((x * (2.51 * x + 0.03)) / (x * (2.43 * x + 0.59) + 0.14)).clamp(0.0, 1.0)


def aces_hill(x: Tensor) -> Tensor:
    """Hill's ACES fit (sRGB -> AP1, RRT+ODT rational fit, AP1 -> sRGB), clamped to [0, 1].

    Args:
        x: [..., 3] linear sRGB.
    Returns:
        [..., 3] display-linear values.
    """
    if not x.is_floating_point():
        x = x.float()
    m_in = torch.tensor(
        [[0.59719, 0.35458, 0.04823], [0.07600, 0.90834, 0.01566], [0.02840, 0.13383, 0.83777]],
        dtype=x.dtype, device=x.device,
    )
    m_out = torch.tensor(
        [[1.60475, -0.53108, -0.07367], [-0.10208, 1.10813, -0.00605], [-0.00327, -0.07276, 1.07602]],
        dtype=x.dtype, device=x.device,
    )
    v = x.clamp_min(0.0) @ m_in.T
    a = v * (v + 0.0245786) - 0.000090537
    b = v * (0.983729 * v + 0.4329510) + 0.238081
    return ((a / b) @ m_out.T).clamp(0.0, 1.0)


def tonemap(hdr: Tensor, exposure_stops: float = 0.0, operator: str = "aces") -> Tensor:
    """Linear HDR radiance -> display sRGB in [0, 1].

    Args:
        hdr: [..., 3] linear radiance (negative values are treated as 0).
        exposure_stops: exposure compensation; the radiance is multiplied by 2^stops.
        operator: one of :data:`TONEMAP_OPERATORS`.
    Returns:
        [..., 3] sRGB-encoded values in [0, 1].
    """
    if not hdr.is_floating_point():
        hdr = hdr.float()
    x = hdr.clamp_min(0.0) * (2.0 ** float(exposure_stops))
    if operator == "aces":
        y = aces_narkowicz(x)
    elif operator == "aces_hill":
        y = aces_hill(x / 0.6)
    elif operator == "reinhard":
        y = x / (1.0 + x)
    elif operator == "linear":
        y = x.clamp(0.0, 1.0)
    else:
        raise ValueError(f"unknown tone-mapping operator '{operator}' (expected one of {', '.join(TONEMAP_OPERATORS)})")
    return srgb_oetf(y)


def to_uint8(img: Tensor) -> Tensor:
    """[0, 1] image -> uint8 (rounded, clamped). Shape and device preserved."""
    return (img.clamp(0.0, 1.0) * 255.0 + 0.5).floor().to(torch.uint8)
