"""Public entry point of the Gaussian rasterizer and backend selection.

Two backends produce the same image formation as gsplat's "classic" 3DGS rasterizer
(gsplat 1.4 semantics, which are those of the original 3DGS CUDA code up to constants):

* ``"torch"`` (:mod:`hravatar.render.torch_raster`): pure PyTorch, any device, differentiable
  through autograd; the CPU path.
* ``"numba"``: the torch backend with its front-to-back pass compiled by numba
  (:mod:`hravatar.render.numba_raster`), CPU only; same images, several times faster.
* ``"gsplat"`` (:mod:`hravatar.render.gsplat_raster`): gsplat's CUDA kernels, imported lazily
  so that importing hravatar never needs gsplat.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .camera import Camera

#: Backends accepted by :func:`rasterize_gaussians` / :func:`select_backend`.
BACKENDS = ("auto", "torch", "numba", "gsplat")


@dataclass
class RasterOutput:
    """Result of :func:`rasterize_gaussians` for one camera.

    features: [H, W, C] alpha-composited features (no background added).
    depth: [H, W, 1] expected camera-space z, ``sum(w_i z_i) / alpha`` (0 where alpha is 0).
    alpha: [H, W, 1] accumulated opacity.
    means2d: [N, 2] projected centres in pixels. It is part of the autograd graph of the
        images, so ``means2d.retain_grad()`` before ``backward()`` gives the screen-space
        gradient used by 3DGS densification (as gsplat's ``info["means2d"]``). 0 for culled ones.
    radii: [N] int32 screen radius in pixels (0 = culled / not rendered).
    depths: [N] camera-space z of each Gaussian.
    """

    features: Tensor
    depth: Tensor
    alpha: Tensor
    means2d: Tensor
    radii: Tensor
    depths: Tensor
    width: int
    height: int
    n_cameras: int = 1

    def info(self) -> dict:
        """gsplat-style info dict: means2d [N, 2], radii [N], depths [N], width, height, n_cameras."""
        return {
            "means2d": self.means2d,
            "radii": self.radii,
            "depths": self.depths,
            "width": self.width,
            "height": self.height,
            "n_cameras": self.n_cameras,
        }


@lru_cache(maxsize=1)
def gsplat_available() -> bool:
    """True when ``import gsplat`` succeeds (it is never imported at hravatar import time).

    Cached: every render and the app's status line ask, and a failing import is slow to retry."""
    try:
        import gsplat  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return False
    return True


def select_backend(device, requested: str = "auto") -> str:
    """Choose the rasterizer backend for tensors on ``device``.

    Args:
        device: a ``torch.device`` or device string of the Gaussian tensors.
        requested: ``"auto"`` (gsplat on CUDA when it imports, numba on the CPU when it
            imports, else torch), ``"torch"``, ``"numba"`` or ``"gsplat"`` (forced).
    Returns:
        ``"torch"``, ``"numba"`` or ``"gsplat"``.
    Raises:
        ValueError: unknown backend name.
        RuntimeError: a forced backend that is not installed or does not run on ``device``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown rasterizer backend '{requested}' (expected one of {', '.join(BACKENDS)})")
    dev = torch.device(device)
    if requested == "torch":
        return "torch"
    if requested == "numba":
        from .numba_raster import numba_available

        if dev.type != "cpu":
            raise RuntimeError(f"rasterizer backend 'numba' runs on the CPU, got device '{dev}'")
        if not numba_available():
            raise RuntimeError("rasterizer backend 'numba' requested but numba is not installed (pip install numba)")
        return "numba"
    if requested == "gsplat":
        if dev.type != "cuda":
            raise RuntimeError(f"rasterizer backend 'gsplat' needs CUDA tensors, got device '{dev}'")
        if not gsplat_available():
            raise RuntimeError("rasterizer backend 'gsplat' requested but gsplat is not installed (pip install gsplat)")
        return "gsplat"
    if dev.type == "cuda":
        return "gsplat" if gsplat_available() else "torch"
    if dev.type == "cpu":
        from .numba_raster import numba_available

        return "numba" if numba_available() else "torch"
    return "torch"


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    features: Tensor,
    camera: Camera,
    *,
    backend: str = "auto",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> RasterOutput:
    """Render N 3D Gaussians into one camera (3DGS "classic" image formation).

    Args:
        means: [N, 3] world-space centres.
        quats: [N, 4] rotations (w, x, y, z), need not be normalised.
        scales: [N, 3] linear standard deviations (already exponentiated).
        opacities: [N] opacities in [0, 1].
        features: [N, C] per-Gaussian features to composite (any C >= 1).
        camera: the :class:`~hravatar.render.camera.Camera` (OpenCV convention).
        backend: ``"auto"``, ``"torch"``, ``"numba"`` or ``"gsplat"`` (see :func:`select_backend`).
        near_plane, far_plane: Gaussians with camera z outside [near, far] are culled.
        eps2d: low-pass filter added to the 2D covariance diagonal (pixels^2).
        tile_size: screen tile size in pixels; part of the image formation (a Gaussian only
            reaches pixels of the tiles its 3-sigma square overlaps, as in 3DGS).
    Returns:
        :class:`RasterOutput` with [H, W, *] images.
    """
    if means.dim() != 2 or means.shape[-1] != 3:
        raise ValueError(f"means must be [N, 3], got {tuple(means.shape)}")
    N = means.shape[0]
    for name, t, shape in (("quats", quats, (N, 4)), ("scales", scales, (N, 3)), ("opacities", opacities, (N,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    if features.dim() != 2 or features.shape[0] != N or features.shape[1] < 1:
        raise ValueError(f"features must be [N, C] with N={N}, got {tuple(features.shape)}")
    name = select_backend(means.device, backend)
    kwargs = dict(near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, tile_size=tile_size)
    if name == "gsplat":
        from .gsplat_raster import rasterize_gsplat

        return rasterize_gsplat(means, quats, scales, opacities, features, camera, **kwargs)
    from .torch_raster import rasterize_torch

    return rasterize_torch(means, quats, scales, opacities, features, camera, trace="numba" if name == "numba" else "torch", **kwargs)
