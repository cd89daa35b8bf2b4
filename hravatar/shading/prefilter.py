"""Prefiltering lat-long HDR environments for split-sum image-based lighting.

An :class:`Environment` holds
  * ``irradiance``: a cube map of the cosine-weighted mean radiance E(n) / pi, so that a
    Lambertian surface of albedo a shades to ``a * irradiance(n)`` (white furnace: a constant
    environment L gives L), computed by direct (exact, positive) convolution of a
    downsampled lat-long map rather than order-2 spherical harmonics, which ring (and go
    negative) around a bright sun;
  * ``specular``: a list of cube maps, level ``l`` prefiltered with the GGX lobe of roughness
    ``l / (L - 1)`` under the split-sum assumption n = v = r (level 0 is the mirror image),
    computed by "filtered importance sampling" (Krivanek & Colbert 2008): each GGX sample
    reads a box-filtered mip of the source whose texels cover the sample's share of solid
    angle, so a few dozen samples give a smooth result. HDR values are kept.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .brdf import ggx_ndf, ggx_sample_half_vectors, hammersley
from .cubemap import (
    cube_dirs,
    cube_mip_chain,
    cube_texel_solid_angle,
    latlong_dirs,
    latlong_solid_angle,
    latlong_to_cube,
    pad_cube,
    sample_cube,
    sample_cube_mips,
)


@dataclass
class Environment:
    """Prefiltered lighting.

    irradiance: [6, Ri, Ri, 3] cosine-convolved radiance E(n) / pi.
    specular: list of L >= 1 tensors [6, R_l, R_l, 3]; level l is GGX-prefiltered with
        roughness l / (L - 1) (level 0 = mirror).
    name: display name.
    """

    irradiance: Tensor
    specular: list[Tensor]
    name: str = "environment"

    def __post_init__(self) -> None:
        # seam-padded copies for the lookups, made once per environment rather than at every
        # lookup; this also keeps the padding's index tables out of compiled shading graphs.
        # The maps are treated as immutable: make a new Environment to change them.
        self._irradiance_padded = pad_cube(self.irradiance)
        self._specular_padded = [pad_cube(m) for m in self.specular]

    @property
    def num_levels(self) -> int:
        """Number of specular levels L."""
        return len(self.specular)

    @property
    def device(self) -> torch.device:
        return self.irradiance.device

    def to(self, device) -> "Environment":
        """Copy to ``device``."""
        return Environment(self.irradiance.to(device), [m.to(device) for m in self.specular], self.name)

    def detach(self) -> "Environment":
        """Same maps cut from the autograd graph."""
        return Environment(self.irradiance.detach(), [m.detach() for m in self.specular], self.name)

    def lookup_irradiance(self, normals: Tensor) -> Tensor:
        """Irradiance (E / pi) along unit normals [..., 3] -> [..., 3]."""
        return sample_cube(self.irradiance, normals, padded=self._irradiance_padded)

    def lookup_specular(self, dirs: Tensor, roughness: Tensor) -> Tensor:
        """Prefiltered radiance along reflection dirs [..., 3] at roughness [...] -> [..., 3] (trilinear)."""
        return sample_cube_mips(self.specular, dirs, roughness * (self.num_levels - 1), padded=self._specular_padded)


def constant_environment(
    value=1.0, irr_res: int = 8, spec_res: int = 16, num_levels: int = 5, device=None, name: str = "constant"
) -> Environment:
    """An environment of constant radiance (for tests and as a neutral default).

    Args:
        value: float or 3 floats (linear RGB radiance).
    """
    v = torch.as_tensor(value, dtype=torch.float32, device=device).expand(3)
    irr = v.expand(6, irr_res, irr_res, 3).clone()
    spec = [v.expand(6, r, r, 3).clone() for r in specular_resolutions(spec_res, num_levels, 1)]
    return Environment(irr, spec, name)


def specular_resolutions(spec_res: int, num_levels: int, min_res: int = 8) -> list[int]:
    """Face size of every specular level: halving from ``spec_res``, never below ``min_res``."""
    return [max(spec_res >> l, min(min_res, spec_res)) for l in range(num_levels)]


def downsample_latlong(latlong: Tensor, height: int) -> Tensor:
    """Solid-angle-weighted box downsampling of a lat-long map (energy preserving).

    Args:
        latlong: [H, W, C] with H divisible by ``height``.
        height: output height h (output is [h, 2h, C]).
    Returns:
        [h, 2h, C].
    """
    H, W, C = latlong.shape
    if H % height or W % (2 * height):
        raise ValueError(f"downsample_latlong: {W}x{H} is not a multiple of {2 * height}x{height}")
    fy, fx = H // height, W // (2 * height)
    w = latlong_solid_angle(H, W, device=latlong.device, dtype=latlong.dtype)[..., None]
    num = (latlong * w).reshape(height, fy, 2 * height, fx, C).sum(dim=(1, 3))
    den = w.reshape(height, fy, 2 * height, fx, 1).sum(dim=(1, 3))
    return num / den


def _reduce_latlong(latlong: Tensor, height: int) -> Tensor:
    """Downsample to the largest height <= ``height`` that divides the input (or keep it)."""
    H = latlong.shape[0]
    if H <= height:
        return latlong
    h = height
    while H % h or latlong.shape[1] % (2 * h):
        h -= 1
    return downsample_latlong(latlong, h)


def irradiance_from_latlong(latlong: Tensor, res: int = 32, src_height: int = 32, chunk: int = 2048) -> Tensor:
    """Cosine convolution E(n) / pi of a lat-long map, evaluated at the texel centres of a cube.

    The quadrature weights are normalised by their own sum (which equals pi analytically),
    so a constant environment is reproduced exactly.

    Args:
        latlong: [H, W, 3] radiance.
        res: output face resolution.
        src_height: the source is area-downsampled to about [src_height, 2 src_height] first.
        chunk: output texels per matrix product (memory bound).
    Returns:
        [6, res, res, 3].
    """
    src = _reduce_latlong(latlong, src_height)
    h, w = src.shape[:2]
    d_src = latlong_dirs(h, w, device=src.device, dtype=src.dtype).reshape(-1, 3)
    sa = latlong_solid_angle(h, w, device=src.device, dtype=src.dtype).reshape(-1)
    rad = src.reshape(-1, src.shape[-1])
    n = cube_dirs(res, device=src.device, dtype=src.dtype).reshape(-1, 3)
    out = []
    for i in range(0, n.shape[0], chunk):
        wgt = (n[i:i + chunk] @ d_src.T).clamp_min(0.0) * sa  # [T, S]
        out.append((wgt @ rad) / wgt.sum(-1, keepdim=True))
    return torch.cat(out, 0).reshape(6, res, res, -1)


def _tangent_frames(n: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal tangents (t, b) for unit normals [T, 3].

    The reference axis is +y (so a rotation about +y rotates the frames with the normals,
    keeping the prefilter equivariant), except close to the poles where it is +x.
    """
    up = torch.zeros_like(n)
    near_pole = n[:, 1].abs() > 0.999
    up[:, 1] = torch.where(near_pole, 0.0, 1.0)
    up[:, 0] = torch.where(near_pole, 1.0, 0.0)
    t = F.normalize(torch.linalg.cross(up, n), dim=-1)
    b = torch.linalg.cross(n, t)
    return t, b


def ggx_prefilter_cube(
    source_mips: list[Tensor],
    roughness: float,
    out_res: int,
    samples: int = 64,
    chunk: int = 1 << 18,
    lod_bias: float = 0.0,
) -> Tensor:
    """GGX-prefilter a cube map (split-sum, n = v = r) by filtered importance sampling.

    Each sample reads the box-filtered source level whose texel solid angle matches the
    sample's solid angle 1 / (N pdf) (GPU Gems 3, ch. 20); weights are n.l (Karis 2013)
    normalised by their sum, so a constant map stays exactly constant. The chapter's +1 level
    bias is left out (``lod_bias``): against brute-force quadrature it doubles to triples the
    error at equal sample counts.

    Args:
        source_mips: box pyramid of the source (:func:`cube_mip_chain`), list of [6, R_l, R_l, C].
        roughness: GGX roughness (alpha = roughness^2), > 0.
        out_res: output face resolution.
        samples: GGX samples per output texel (Hammersley set, the same for every texel).
        chunk: cube lookups (texels x samples) processed at once (memory bound).
        lod_bias: added to the source level of every sample.
    Returns:
        [6, out_res, out_res, C], differentiable w.r.t. ``source_mips``.
    """
    dev, dt = source_mips[0].device, source_mips[0].dtype
    alpha = torch.tensor(max(float(roughness), 1e-3) ** 2, dtype=torch.float64, device=dev)
    h = ggx_sample_half_vectors(hammersley(samples, device=dev, dtype=torch.float64), alpha)  # [N, 3]
    noh = h[:, 2]
    nol = 2.0 * noh * noh - 1.0  # v = n, so l = 2 (n.h) h - n
    keep = nol > 1e-4
    h, noh, nol = h[keep], noh[keep], nol[keep]
    pdf = ggx_ndf(noh, alpha) / 4.0  # D (n.h) / (4 v.h) with v.h = n.h
    r0 = source_mips[0].shape[1]
    omega_s = 1.0 / (h.shape[0] * pdf)
    omega_p = 4.0 * math.pi / (6.0 * r0 * r0)
    lod = (0.5 * torch.log2(omega_s / omega_p) + lod_bias).clamp(0.0, len(source_mips) - 1.0).to(dt)
    wgt = (nol / nol.sum()).to(dt)
    h = h.to(dt)
    n_all = cube_dirs(out_res, device=dev, dtype=dt).reshape(-1, 3)
    step = max(1, chunk // h.shape[0])
    out = []
    for i in range(0, n_all.shape[0], step):
        n = n_all[i:i + step]
        t, b = _tangent_frames(n)
        hw = h[None, :, 0:1] * t[:, None] + h[None, :, 1:2] * b[:, None] + h[None, :, 2:3] * n[:, None]  # [T, N, 3]
        l = 2.0 * (hw * n[:, None]).sum(-1, keepdim=True) * hw - n[:, None]
        val = sample_cube_mips(source_mips, l, lod.expand(l.shape[:2]))  # [T, N, C]
        out.append((val * wgt[None, :, None]).sum(1))
    return torch.cat(out, 0).reshape(6, out_res, out_res, -1)


def _operator_source_res(base_res: int, alpha: float) -> int:
    """Coarsest box mip of a ``base_res`` cube whose texels (about pi/2 / R radians wide) are no
    wider than ``alpha`` radians, about half the angular radius of the GGX lobe of reflected
    directions (at least 8, at most the base)."""
    res = base_res
    while res > 8 and res % 2 == 0 and (math.pi / 2) / (res // 2) <= alpha:
        res //= 2
    return res


def cube_filter_matrix(out_res: int, src_res: int, alpha: float | None, device=None, dtype=torch.float32) -> Tensor:
    """Dense quadrature matrix of one prefilter, from a cube map to another.

    Row t holds the weights of every source texel s for the output texel direction n_t:
    ``w = (n.l)+ * D(h) * omega_s`` with l the source texel direction, h = normalize(n + l)
    and D the GGX distribution of ``alpha`` (the split-sum lobe with n = v = r, as in
    :func:`ggx_prefilter_cube`), or ``w = (n.l)+ * omega_s`` for ``alpha`` None (the cosine
    convolution of the irradiance). Rows are normalised to sum to 1, so a constant map is kept
    exactly. Every source texel is summed (brute-force quadrature), so the result is smooth and
    exactly linear in the source.

    Args:
        out_res: output face size Ro.
        src_res: source face size Rs.
        alpha: GGX alpha (roughness^2), or None for the cosine lobe.
    Returns:
        [6 Ro^2, 6 Rs^2].
    """
    n = cube_dirs(out_res, device=device, dtype=torch.float64).reshape(-1, 3)
    d = cube_dirs(src_res, device=device, dtype=torch.float64).reshape(-1, 3)
    sa = cube_texel_solid_angle(src_res, device=device, dtype=torch.float64).reshape(-1)
    cos = n @ d.T
    w = cos.clamp_min(0.0) * sa
    if alpha is not None:
        noh = ((1.0 + cos) * 0.5).clamp_min(0.0).sqrt()  # n.h for h = normalize(n + l), unit n and l
        w = w * ggx_ndf(noh, torch.tensor(max(alpha, 1e-6), dtype=torch.float64, device=device))
    return (w / w.sum(-1, keepdim=True)).to(dtype)


@dataclass
class PrefilterOperators:
    """Precomputed linear prefiltering of a small cube map (see :func:`prefilter_operators`).

    irradiance: ([6 Ri^2, 6 Rs^2] matrix, Rs = the mip of the base it reads).
    specular: per level l >= 1, ([6 R_l^2, 6 Rs_l^2] matrix, Rs_l).
    """

    irradiance: tuple[Tensor, int]
    specular: list[tuple[Tensor, int]]

    def apply(self, base: Tensor, name: str = "environment") -> Environment:
        """Prefilter ``base`` [6, R, R, C] (differentiable, one matrix product per level)."""
        mips = {m.shape[1]: m for m in cube_mip_chain(base)}

        def run(op: tuple[Tensor, int]) -> Tensor:
            mat, src = op
            out = mat @ mips[src].reshape(-1, base.shape[-1])
            r = int(round(math.sqrt(mat.shape[0] / 6)))
            return out.reshape(6, r, r, -1)

        return Environment(run(self.irradiance), [base] + [run(op) for op in self.specular], name)


@functools.lru_cache(maxsize=8)
def prefilter_operators(base_res: int, num_levels: int, irr_res: int, min_res: int = 1, device=None,
                        dtype=torch.float32) -> PrefilterOperators:
    """Matrices that prefilter a ``base_res`` cube map into an :class:`Environment` laid out as
    :func:`prefilter_cube` lays it out (level 0 = the base, level l GGX roughness l / (L - 1),
    irradiance E / pi), each reading the coarsest box mip that still resolves its lobe.

    For small learned maps (32^2) this costs a few matrix products per call instead of
    thousands of filtered cube lookups, and is exactly linear and smooth in the texels, which
    is what training through it needs. Large HDR maps use :func:`prefilter_cube`. Cached per
    arguments (about 0.5 s to build on a CPU); the result must not be modified.
    """
    res = specular_resolutions(base_res, num_levels, min_res)
    spec = []
    for l in range(1, num_levels):
        alpha = (l / (num_levels - 1)) ** 2
        src = _operator_source_res(base_res, alpha)
        spec.append((cube_filter_matrix(res[l], src, alpha, device, dtype), src))
    src = _operator_source_res(base_res, 1.0)
    return PrefilterOperators((cube_filter_matrix(irr_res, src, None, device, dtype), src), spec)


def prefilter_cube(
    base: Tensor,
    num_levels: int = 7,
    irr_res: int = 32,
    samples: int = 32,
    min_res: int = 8,
    irradiance: Tensor | None = None,
    name: str = "environment",
    max_samples: int = 2048,
) -> Environment:
    """Prefilter a cube map (level 0 = ``base`` itself) into an :class:`Environment`.

    Args:
        base: [6, R, R, 3] radiance.
        num_levels: specular levels L (roughness l / (L - 1)).
        irr_res: irradiance face resolution (used when ``irradiance`` is None: the base is
            converted to a lat-long map and convolved).
        samples: GGX samples per texel of level 1; level l gets
            min(max_samples, samples * (R_1 / R_l)^2) so every level costs about the same.
        min_res: smallest specular face size.
        irradiance: precomputed [6, Ri, Ri, 3] irradiance, or None.
        max_samples: cap on the samples per texel.
    """
    res = specular_resolutions(base.shape[1], num_levels, min_res)
    src = cube_mip_chain(base)
    spec = [base]
    # the same number of lookups per level: small, rough levels get many more samples per
    # texel, which their wide lobes need (few samples of a wide lobe read very coarse mips)
    budget = samples * res[min(1, num_levels - 1)] ** 2
    for l in range(1, num_levels):
        n_l = int(min(max_samples, max(samples, budget // (res[l] * res[l]))))
        spec.append(ggx_prefilter_cube(src, l / (num_levels - 1), res[l], n_l))
    if irradiance is None:
        h = max(8, base.shape[1] // 2)
        ll = sample_cube(base, latlong_dirs(h, 2 * h, device=base.device, dtype=base.dtype))
        irradiance = irradiance_from_latlong(ll, irr_res)
    return Environment(irradiance, spec, name)


def prefilter_latlong(
    latlong: Tensor,
    spec_res: int = 128,
    num_levels: int = 7,
    irr_res: int = 32,
    samples: int = 32,
    min_res: int = 8,
    device=None,
    name: str = "environment",
) -> Environment:
    """Prefilter a lat-long HDR map into irradiance + GGX specular cube maps.

    Args:
        latlong: [H, W, 3] linear radiance (W = 2 H).
        spec_res: face size of specular level 0 (the mirror image).
        num_levels: specular levels L (>= 2); level l has roughness l / (L - 1).
        irr_res: irradiance face size.
        samples: GGX samples per texel of level 1 (filtered importance sampling); coarser
            levels get proportionally more (see :func:`prefilter_cube`).
        min_res: smallest specular face size (levels halve from spec_res down to this).
        device: where to compute (default: the input's device).
        name: display name.
    Returns:
        :class:`Environment` on ``device``.
    """
    if num_levels < 2:
        raise ValueError("prefilter_latlong: num_levels must be >= 2")
    latlong = latlong.to(device if device is not None else latlong.device, torch.float32)
    base = latlong_to_cube(latlong, spec_res)
    irr = irradiance_from_latlong(latlong, irr_res)
    return prefilter_cube(base, num_levels, irr_res, samples, min_res, irradiance=irr, name=name)


def save_environment(env: Environment, path: str | Path) -> None:
    """Write a prefiltered environment as safetensors (atomically)."""
    from hravatar.io.safe import save_safetensors_atomic

    tensors = {"irradiance": env.irradiance}
    tensors.update({f"specular_{i}": m for i, m in enumerate(env.specular)})
    meta = {"name": env.name, "num_levels": env.num_levels}
    save_safetensors_atomic(tensors, path, {"hravatar_environment": json.dumps(meta)})


def load_environment(path: str | Path, device=None) -> Environment:
    """Read an environment written by :func:`save_environment` (raises CheckpointError)."""
    from hravatar.io.safe import CheckpointError, load_safetensors_checked

    tensors, header = load_safetensors_checked(path, required_meta=("hravatar_environment",))
    meta = json.loads(header["hravatar_environment"])
    try:
        spec = [tensors[f"specular_{i}"].to(device) for i in range(int(meta["num_levels"]))]
        irr = tensors["irradiance"].to(device)
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete environment file (missing {e.args[0]})") from None
    return Environment(irr, spec, str(meta.get("name", "environment")))
