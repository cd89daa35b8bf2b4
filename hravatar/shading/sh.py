"""Real spherical harmonics, used for band-limited irradiance.

Irradiance is the radiance convolved with a clamped cosine, which removes nearly everything
above order 2 (Ramamoorthi & Hanrahan 2001: 9 coefficients keep ~99% of the energy for
natural lighting). A learned irradiance restricted to these 9 functions therefore cannot
take a value in one direction that is unrelated to its neighbours, which a free texel map can.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .cubemap import cube_dirs, cube_texel_solid_angle

#: Clamped-cosine convolution factors per band (A_0, A_1, A_2) = (pi, 2 pi / 3, pi / 4).
COSINE_LOBE = (torch.pi, 2.0 * torch.pi / 3.0, torch.pi / 4.0)


def sh_basis(dirs: Tensor, order: int) -> Tensor:
    """Real spherical-harmonic basis up to band ``order``.

    Associated Legendre recurrences in z without the sin^m factor, which is folded into
    Re/Im (x + i y)^m instead, so no angles are formed. No Condon-Shortley phase.

    Args:
        dirs: [..., 3] unit directions.
        order: highest band l.
    Returns:
        [..., (order + 1)^2], index l (l + 1) + m for m in [-l, l]; for order 2 that is
        (0,0), (1,-1) ~ y, (1,0) ~ z, (1,1) ~ x, (2,-2) ~ xy, (2,-1) ~ yz, (2,0) ~ 3z^2 - 1,
        (2,1) ~ xz, (2,2) ~ x^2 - y^2.
    """
    x, y, z = dirs.unbind(-1)
    out: list[Tensor | None] = [None] * (order + 1) ** 2
    cm, sm = torch.ones_like(x), torch.zeros_like(x)  # Re, Im of (x + i y)^m
    pmm = torch.ones_like(x)  # P~_m^m = (2m - 1)!!
    for m in range(order + 1):
        if m > 0:
            cm, sm = cm * x - sm * y, cm * y + sm * x
            pmm = pmm * (2 * m - 1)
        p_prev, p = None, pmm
        for l in range(m, order + 1):
            if l == m + 1:
                p_prev, p = p, z * (2 * m + 1) * pmm
            elif l > m + 1:
                p_prev, p = p, ((2 * l - 1) * z * p - (l + m - 1) * p_prev) / (l - m)
            k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
            if m == 0:
                out[l * (l + 1)] = k * p
            else:
                out[l * (l + 1) + m] = math.sqrt(2.0) * k * p * cm
                out[l * (l + 1) - m] = math.sqrt(2.0) * k * p * sm
    return torch.stack(out, -1)  # type: ignore[arg-type]


def project_cube_sh(cube: Tensor, order: int) -> Tensor:
    """Project a cube map [6, R, R, C] onto the SH basis up to ``order``; [(order + 1)^2, C]."""
    res = cube.shape[1]
    d = cube_dirs(res, device=cube.device, dtype=cube.dtype)
    w = cube_texel_solid_angle(res, device=cube.device, dtype=cube.dtype)
    y = sh_basis(d, order) * w[..., None]
    return torch.einsum("fijk,fijc->kc", y, cube)


def irradiance_sh9(radiance_coeffs: Tensor) -> Tensor:
    """Irradiance coefficients from order-2 radiance coefficients (cosine-lobe convolution).

    Args:
        radiance_coeffs: [9, C].
    Returns:
        [9, C]: E(n) = sh_basis(n, 2) @ result.
    """
    a = torch.tensor([COSINE_LOBE[b] for b in (0, 1, 1, 1, 2, 2, 2, 2, 2)], dtype=radiance_coeffs.dtype,
                     device=radiance_coeffs.device)
    return radiance_coeffs * a[:, None]
