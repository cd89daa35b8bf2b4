"""Brute-force reference rasterizer and a synthetic head-like test scene.

:func:`rasterize_reference` is written for obviousness, not speed, and shares no code with
:mod:`hravatar.render.torch_raster`: it builds the 3D covariance and the EWA Jacobian as
explicit matrices, inverts the 2D covariance with ``torch.linalg.inv``, takes eigenvalues with
``torch.linalg.eigvalsh``, evaluates every Gaussian at every pixel and composites with a plain
front-to-back loop that mirrors gsplat's per-pixel kernel. The one place tiles appear is the
3DGS coverage rule itself: a Gaussian is only evaluated at pixels whose tile lies in the tile
range of its radius square. That is part of the image formation, stated per (pixel, Gaussian)
pair, no binning.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .camera import Camera, orbit_camera
from .rasterize import RasterOutput

_ALPHA_MIN = 1.0 / 255.0
_ALPHA_MAX = 0.999
_T_MIN = 1e-4


def _rotate_by_quat(q: Tensor, v: Tensor) -> Tensor:
    """Rotate vectors v [N, 3] by unit quaternions q [N, 4] (w, x, y, z) as q v q*."""
    w, u = q[:, :1], q[:, 1:]
    uv = torch.linalg.cross(u, v, dim=-1)
    return v + 2.0 * w * uv + 2.0 * torch.linalg.cross(u, uv, dim=-1)


def reference_projection(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    camera: Camera,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> dict:
    """Per-Gaussian EWA projection with explicit matrices.

    Args:
        means: [N, 3]; quats: [N, 4] (w, x, y, z); scales: [N, 3]; camera: :class:`Camera`.
    Returns:
        dict with means2d [N, 2], cov2d [N, 2, 2] (blurred), conic [N, 2, 2], depths [N],
        radii [N] int32 (0 = culled), visible [N] bool.
    """
    dt, dev = means.dtype, means.device
    W, H = camera.width, camera.height
    view = camera.viewmat.to(device=dev, dtype=dt)
    K = camera.K.to(device=dev, dtype=dt)
    Rw, tw = view[:3, :3], view[:3, 3]
    pc = (Rw @ means.T).T + tw
    z = pc[:, 2]
    q = quats / quats.norm(dim=-1, keepdim=True)
    eye = torch.eye(3, dtype=dt, device=dev)
    # columns of the rotation = rotated basis vectors
    Rq = torch.stack([_rotate_by_quat(q, eye[i].expand_as(means)) for i in range(3)], -1)
    cov3 = Rq @ torch.diag_embed(scales**2) @ Rq.transpose(-1, -2)
    covc = Rw @ cov3 @ Rw.T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    in_range = (z >= near_plane) & (z <= far_plane)
    zs = torch.where(in_range, z, torch.ones_like(z))
    half_x, half_y = 0.5 * W / fx, 0.5 * H / fy
    u = torch.clamp(pc[:, 0] / zs, -(cx / fx + 0.3 * half_x), (W - cx) / fx + 0.3 * half_x)
    v = torch.clamp(pc[:, 1] / zs, -(cy / fy + 0.3 * half_y), (H - cy) / fy + 0.3 * half_y)
    J = torch.zeros(means.shape[0], 2, 3, dtype=dt, device=dev)
    J[:, 0, 0] = fx / zs
    J[:, 0, 2] = -fx * u / zs
    J[:, 1, 1] = fy / zs
    J[:, 1, 2] = -fy * v / zs
    cov2 = J @ covc @ J.transpose(-1, -2) + eps2d * torch.eye(2, dtype=dt, device=dev)
    det = torch.linalg.det(cov2)
    ok = in_range & (det > 0)
    conic = torch.linalg.inv(torch.where(ok[:, None, None], cov2, torch.eye(2, dtype=dt, device=dev)))
    means2d = torch.stack([fx * pc[:, 0] / zs + cx, fy * pc[:, 1] / zs + cy], -1)
    ev = torch.linalg.eigvalsh(cov2.detach())
    # gsplat: b + sqrt(max(0.01, b^2 - det)) == mean eigenvalue + max(0.1, half their gap)
    lam = 0.5 * (ev[:, 0] + ev[:, 1]) + torch.clamp(0.5 * (ev[:, 1] - ev[:, 0]), min=0.1)
    radius = torch.ceil(3.0 * torch.sqrt(lam))
    m = means2d.detach()
    on_screen = (m[:, 0] + radius > 0) & (m[:, 0] - radius < W) & (m[:, 1] + radius > 0) & (m[:, 1] - radius < H)
    visible = ok & on_screen
    radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
    return dict(means2d=means2d, cov2d=cov2, conic=conic, depths=z, radii=radii, visible=visible)


def rasterize_reference(
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
    with_done: bool = False,
) -> RasterOutput | tuple[RasterOutput, Tensor]:
    """Brute-force 3DGS rasterization: every pixel x every Gaussian, front-to-back loop.

    Args: as :func:`hravatar.render.rasterize.rasterize_gaussians` (means [N, 3], quats [N, 4],
        scales [N, 3], opacities [N], features [N, C]). Use tiny images: memory is H*W*N.
        with_done: also return which pixels hit the termination rule.
    Returns:
        :class:`RasterOutput` (features [H, W, C], depth [H, W, 1], alpha [H, W, 1], means2d,
        radii, depths); with ``with_done``, also a [H, W] bool mask of terminated pixels.
    """
    dt, dev = means.dtype, means.device
    W, H, ts = camera.width, camera.height, tile_size
    pr = reference_projection(means, quats, scales, camera, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d)
    ys, xs = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)  # [P, 2] integer pixel coords
    centres = pix.to(dt) + 0.5
    d = pr["means2d"][None, :, :] - centres[:, None, :]  # [P, N, 2]
    sigma = 0.5 * torch.einsum("pni,nij,pnj->pn", d, pr["conic"], d)
    alpha = torch.clamp(opacities[None, :] * torch.exp(-sigma), max=_ALPHA_MAX)
    # 3DGS coverage: tile of the pixel inside the tile range of the Gaussian's radius square
    m = pr["means2d"].detach()
    r = pr["radii"].to(dt)
    tw, th = math.ceil(W / ts), math.ceil(H / ts)
    lo_x = torch.clamp(torch.floor(m[:, 0] / ts - r / ts), 0, tw)
    hi_x = torch.clamp(torch.ceil(m[:, 0] / ts + r / ts), 0, tw)
    lo_y = torch.clamp(torch.floor(m[:, 1] / ts - r / ts), 0, th)
    hi_y = torch.clamp(torch.ceil(m[:, 1] / ts + r / ts), 0, th)
    tpx = (pix[:, 0] // ts).to(dt)[:, None]
    tpy = (pix[:, 1] // ts).to(dt)[:, None]
    covered = (tpx >= lo_x) & (tpx < hi_x) & (tpy >= lo_y) & (tpy < hi_y) & pr["visible"][None, :]
    feats = torch.cat([features, pr["depths"][:, None]], 1)
    out = torch.zeros(H * W, feats.shape[1], dtype=dt, device=dev)
    T = torch.ones(H * W, dtype=dt, device=dev)
    done = torch.zeros(H * W, dtype=torch.bool, device=dev)
    order = torch.sort(pr["depths"].detach(), stable=True).indices
    for g in order.tolist():
        a = alpha[:, g]
        use = covered[:, g] & ~done & (a >= _ALPHA_MIN) & (sigma[:, g] >= 0)
        next_T = T * (1 - a)
        stop = use & (next_T <= _T_MIN)
        done = done | stop
        use = use & ~stop
        out = out + torch.where(use, a * T, torch.zeros_like(a))[:, None] * feats[g]
        T = torch.where(use, next_T, T)
    alpha_img = (1 - T).view(H, W, 1)
    C = features.shape[1]
    img = out.view(H, W, C + 1)
    out = RasterOutput(
        features=img[..., :C],
        depth=img[..., C:] / alpha_img.clamp(min=1e-10),
        alpha=alpha_img,
        means2d=pr["means2d"],
        radii=pr["radii"],
        depths=pr["depths"],
        width=W,
        height=H,
    )
    return (out, done.view(H, W)) if with_done else out


def make_test_scene(
    n: int = 20000,
    width: int = 256,
    height: int = 256,
    seed: int = 0,
    *,
    channels: int = 3,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """A plausible head-sized scene for tests and benchmarks.

    Gaussians lie on an ellipsoid of semi-axes (8.5, 11, 9.5) cm, flattened along the surface
    normal, tangent scales log-normal around sqrt(area / n) / 2 (about 1.2 mm for n = 20K),
    opacities mostly high; the camera looks at it from 0.5 m with a 25 degree vertical field
    of view, so the head covers about 60% of a square frame and a Gaussian's radius is a few
    pixels at 256x256.

    Args:
        n: number of Gaussians; width, height: image size; seed: RNG seed.
        channels: feature channels C; device, dtype: of the returned tensors.
    Returns:
        dict with means [n, 3], quats [n, 4], scales [n, 3], opacities [n], features [n, C]
        and camera, ready for ``rasterize_gaussians(**scene)``.
    """
    g = torch.Generator().manual_seed(seed)
    axes = torch.tensor([0.085, 0.11, 0.095], dtype=torch.float64)
    d = torch.randn(n, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    means = d * axes
    normal = means / axes**2
    normal = normal / normal.norm(dim=-1, keepdim=True)
    # tangent frame: random tangent t1, t2 = n x t1; rotation columns (t1, t2, n)
    r = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t1 = r - (r * normal).sum(-1, keepdim=True) * normal
    t1 = t1 / t1.norm(dim=-1, keepdim=True)
    t2 = torch.linalg.cross(normal, t1, dim=-1)
    Rm = torch.stack([t1, t2, normal], -1)
    # rotation matrix -> quaternion (w, x, y, z); trace is > -1 except on a null set
    w = 0.5 * torch.sqrt(torch.clamp(1 + Rm[:, 0, 0] + Rm[:, 1, 1] + Rm[:, 2, 2], min=1e-12))
    quats = torch.stack(
        [w, (Rm[:, 2, 1] - Rm[:, 1, 2]) / (4 * w), (Rm[:, 0, 2] - Rm[:, 2, 0]) / (4 * w), (Rm[:, 1, 0] - Rm[:, 0, 1]) / (4 * w)],
        -1,
    )
    area = 4 * math.pi * ((0.085 * 0.11) ** 1.6 + (0.085 * 0.095) ** 1.6 + (0.11 * 0.095) ** 1.6) ** (1 / 1.6) / 3 ** (1 / 1.6)
    s0 = 0.5 * math.sqrt(area / n)
    tang = s0 * torch.exp(0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64))
    scales = torch.cat([tang, 0.15 * tang.min(-1, keepdim=True).values], -1)
    opacities = torch.sigmoid(2.0 + 2.0 * torch.randn(n, generator=g, dtype=torch.float64))
    features = torch.rand(n, channels, generator=g, dtype=torch.float64)
    camera = orbit_camera(yaw_deg=0.0, pitch_deg=0.0, distance=0.5, fov_y_deg=25.0, width=width, height=height, device=device)
    conv = dict(device=device, dtype=dtype)
    return dict(
        means=means.to(**conv),
        quats=quats.to(**conv),
        scales=scales.to(**conv),
        opacities=opacities.to(**conv),
        features=features.to(**conv),
        camera=camera,
    )
