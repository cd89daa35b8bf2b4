"""Deferred physically-based shading with split-sum image-based lighting (HRAvatar's model).

    NoV = clamp(n.v, 1e-6, 1),  r = 2 NoV n - v
    F   = F0 + (max(1 - rough, F0) - F0) * 2^((-5.55473 NoV - 6.98316) NoV)
    diffuse  = albedo * irradiance(n)
    specular = prefiltered(r, level = rough * (L - 1)) * (F * A + B),  (A, B) = LUT(NoV, rough)
    rgb = diffuse + specular
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .brdf import sample_brdf_lut
from .cubemap import rotate_y
from .prefilter import Environment

#: Rec. 709 luminance weights of linear RGB
LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)


def fresnel_schlick_roughness(nov: Tensor, f0: Tensor, rough: Tensor) -> Tensor:
    """Schlick's Fresnel with the roughness-limited grazing value and the spherical-Gaussian
    exponent: F0 + (max(1 - rough, F0) - F0) * 2^((-5.55473 NoV - 6.98316) NoV).

    Args:
        nov, f0, rough: broadcastable tensors (e.g. [..., 1]).
    Returns:
        broadcast shape.
    """
    w = torch.exp2((-5.55473 * nov - 6.98316) * nov)
    return f0 + (torch.maximum(1.0 - rough, f0) - f0) * w


def reflect_view(normal: Tensor, viewdir: Tensor) -> tuple[Tensor, Tensor]:
    """Clamped n.v and the mirror direction of the view vector.

    Args:
        normal: [..., 3] unit normals.
        viewdir: [..., 3] unit vectors pointing towards the camera.
    Returns:
        nov: [..., 1] in [1e-6, 1]; r: [..., 3] = 2 NoV n - v.
    """
    nov = (normal * viewdir).sum(-1, keepdim=True).clamp(1e-6, 1.0)
    return nov, 2.0 * nov * normal - viewdir


def shade(
    albedo: Tensor,
    roughness: Tensor,
    f0: Tensor,
    normal: Tensor,
    viewdir: Tensor,
    env: Environment,
    brdf_lut: Tensor,
    rotation_deg: float | Tensor = 0.0,
) -> dict[str, Tensor]:
    """Split-sum PBR shading of G-buffer samples.

    Rotating the environment by ``rotation_deg`` about +y is done by rotating n and r by the
    inverse rotation before the lookups (no re-filtering).

    Args:
        albedo: [..., 3] linear albedo.
        roughness: [..., 1] in [0, 1].
        f0: [..., 1] specular reflectance at normal incidence.
        normal: [..., 3] normals (normalised here).
        viewdir: [..., 3] unit directions towards the camera.
        env: prefiltered :class:`Environment` (on the same device).
        brdf_lut: [S, S, 2] split-sum table (:func:`load_brdf_lut`).
        rotation_deg: environment rotation about +y in degrees.
    Returns:
        dict with [..., 3] tensors ``rgb`` (= diffuse + specular), ``diffuse``, ``specular``,
        ``irradiance`` and ``prefiltered`` (the specular radiance before the BRDF factor).
    """
    n = F.normalize(normal, dim=-1)
    nov, r = reflect_view(n, viewdir)
    if not (isinstance(rotation_deg, (int, float)) and rotation_deg == 0.0):
        n_l, r_l = rotate_y(n, -rotation_deg), rotate_y(r, -rotation_deg)
    else:
        n_l, r_l = n, r
    irradiance = env.lookup_irradiance(n_l)
    prefiltered = env.lookup_specular(r_l, roughness[..., 0])
    A, B = sample_brdf_lut(brdf_lut, nov[..., 0], roughness[..., 0])
    fres = fresnel_schlick_roughness(nov, f0, roughness)
    diffuse = albedo * irradiance
    specular = prefiltered * (fres * A[..., None] + B[..., None])
    return {
        "rgb": diffuse + specular,
        "diffuse": diffuse,
        "specular": specular,
        "irradiance": irradiance,
        "prefiltered": prefiltered,
    }


def edit_material(
    roughness: Tensor,
    f0: Tensor,
    albedo: Tensor,
    rough_scale: float = 1.0,
    f0_edit: float = 0.0,
    tint=(1.0, 1.0, 1.0),
    saturation: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Material edits of the method plus albedo tint / saturation.

    rough' = clamp(rough * rough_scale, 0, 1); F0' = F0 + (1 - F0) * f0_edit (f0_edit in [0, 1]);
    albedo' = clamp(luma + saturation * (albedo - luma), 0, 1) * tint, clamped to [0, 1].

    Args:
        roughness: [..., 1]; f0: [..., 1]; albedo: [..., 3].
        tint: 3 floats (or a [3] tensor) multiplying the albedo.
    Returns:
        (roughness', f0', albedo') with the input shapes.
    """
    rough = (roughness * rough_scale).clamp(0.0, 1.0)
    s_f = float(min(max(f0_edit, 0.0), 1.0))
    f0_new = f0 + (1.0 - f0) * s_f
    w = torch.tensor(LUMA_WEIGHTS, dtype=albedo.dtype, device=albedo.device)
    luma = (albedo * w).sum(-1, keepdim=True)
    sat = (luma + saturation * (albedo - luma)).clamp(0.0, 1.0)
    t = torch.as_tensor(tint, dtype=albedo.dtype, device=albedo.device)
    return rough, f0_new, (sat * t).clamp(0.0, 1.0)
