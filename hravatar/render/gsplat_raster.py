"""gsplat (CUDA) backend of :func:`hravatar.render.rasterize.rasterize_gaussians`.

gsplat is imported inside the function, never at module import, so hravatar imports without
it. Written against gsplat 1.4 / 1.5's public API. It runs the same pipeline as
``gsplat.rasterization(..., packed=False, rasterize_mode="classic", render_mode="RGB+ED")`` but
calls its documented building blocks (``fully_fused_projection``, ``isect_tiles``,
``isect_offset_encode``, ``rasterize_to_pixels``) itself, for one reason: the [N, 2] screen
means returned in :class:`RasterOutput` must be the tensor the images are computed from, so
that ``means2d.retain_grad()`` works on it. ``rasterization()`` only exposes its [C, N, 2]
tensor, and a slice of it taken afterwards would never receive a gradient.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .camera import Camera
from .rasterize import RasterOutput

#: Feature channels rasterized per call (gsplat.rasterization's default channel_chunk).
_CHANNEL_CHUNK = 32


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    features: Tensor,
    camera: Camera,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> RasterOutput:
    """Rasterize with gsplat's CUDA kernels ("classic" mode, expected depth).

    Args:
        means: [N, 3]; quats: [N, 4] (w, x, y, z); scales: [N, 3] linear; opacities: [N];
        features: [N, C]; camera: :class:`Camera`. CUDA tensors.
    Returns:
        :class:`RasterOutput`; radii normalised to [N] (gsplat >= 1.5 returns per-axis [N, 2]:
        the larger one is kept).
    Raises:
        RuntimeError: gsplat is not installed.
    """
    try:
        from gsplat import fully_fused_projection, isect_offset_encode, isect_tiles, rasterize_to_pixels
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(f"the gsplat backend needs gsplat (pip install gsplat): {e}") from None
    W, H = int(camera.width), int(camera.height)
    dev = means.device
    f32 = torch.float32
    cam = camera.to(dev)
    viewmats = cam.viewmat.to(f32)[None]
    Ks = cam.K.to(f32)[None]
    means = means.to(f32).contiguous()
    radii, means2d_c, depths_c, conics, _ = fully_fused_projection(
        means,
        None,
        quats.to(f32).contiguous(),
        scales.to(f32).contiguous(),
        viewmats,
        Ks,
        W,
        H,
        eps2d=eps2d,
        near_plane=near_plane,
        far_plane=far_plane,
        radius_clip=0.0,
        packed=False,
        calc_compensations=False,
    )
    # the [N, 2] view is what every later step consumes, so retain_grad() on it works
    means2d = means2d_c[0]
    means2d_in = means2d[None]
    tile_w = math.ceil(W / tile_size)
    tile_h = math.ceil(H / tile_size)
    _, isect_ids, flatten_ids = isect_tiles(means2d_in, radii, depths_c, tile_size, tile_w, tile_h)
    isect_offsets = isect_offset_encode(isect_ids, 1, tile_w, tile_h)
    colors = torch.cat([features.to(f32), depths_c[0][:, None]], -1)[None].contiguous()
    ops = opacities.to(f32)[None].contiguous()
    chunks, alphas = [], None
    for c0 in range(0, colors.shape[-1], _CHANNEL_CHUNK):
        img, alphas = rasterize_to_pixels(
            means2d_in, conics, colors[..., c0 : c0 + _CHANNEL_CHUNK].contiguous(), ops, W, H, tile_size, isect_offsets, flatten_ids
        )
        chunks.append(img)
    image = torch.cat(chunks, -1)[0]
    alpha = alphas[0]
    C = features.shape[1]
    depth = image[..., C:] / alpha.clamp(min=1e-10)
    radii = radii[0]
    if radii.dim() == 2:
        radii = radii.max(dim=-1).values
    return RasterOutput(
        features=image[..., :C],
        depth=depth,
        alpha=alpha,
        means2d=means2d,
        radii=radii.to(torch.int32),
        depths=depths_c[0],
        width=W,
        height=H,
    )
