"""Training losses of the method (differentiable, batched over one image)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hravatar.encoder.expression import bounded_regression_error, output_bounds
from hravatar.eval.metrics import ssim_map
from hravatar.render.camera import Camera


def surface_distance_loss(points: Tensor, anchors: Tensor, normals: Tensor, weights: Tensor, tol: float) -> Tensor:
    """Mean distance, beyond a tolerance, of points from the tangent planes of their anchors.

        L = sum_i w_i relu(|<x_i - a_i, n_i>| - tol) / tol  /  sum_i w_i

    Only the offset along the normal costs: points slide freely along the surface, and the first
    ``tol`` of offset is free (tracking error, skin thickness).

    Args:
        points: [N, 3] canonical Gaussian centres; anchors: [N, 3] their surface points;
        normals: [N, 3] unit surface normals there; weights: [N] (0 = not constrained).
        tol: free band half-width (same unit as ``points``).
    Returns:
        scalar, in units of ``tol``.
    """
    sd = ((points - anchors) * normals).sum(-1)
    excess = F.relu(sd.abs() - tol) / tol
    return (excess * weights).sum() / weights.sum().clamp(min=1.0)


def surface_normal_loss(axes: Tensor, normals: Tensor, weights: Tensor, max_angle_deg: float) -> Tensor:
    """Mean tilt, beyond a tolerance, of Gaussians' thin axes from their surface normals.

        L = sum_i w_i relu((1 - |<a_i, n_i>|) - (1 - cos(max_angle))) / sum_i w_i

    A flat Gaussian tilted against the surface sticks out of it by its radius times the sine of
    the tilt, which shows at silhouettes seen from new directions; either sign of the axis is a
    valid disc orientation, hence |<a, n>|.

    Args:
        axes: [N, 3] unit thin (shortest) axes; normals: [N, 3] unit surface normals;
        weights: [N] (0 = not constrained); max_angle_deg: free tilt.
    Returns:
        scalar (0 when every constrained axis is within the tolerance).
    """
    excess = F.relu((1 - (axes * normals).sum(-1).abs()) - (1 - math.cos(math.radians(max_angle_deg))))
    return (excess * weights).sum() / weights.sum().clamp(min=1.0)


class SurfaceAnchors:
    """Closest point of the subject's canonical head mesh, and its face normal, for Gaussian centres.

    The anchors of :func:`surface_distance_loss` and :func:`surface_normal_loss`, on the shaped
    template (the mesh the avatar was initialised on), found by
    :func:`hravatar.head.mesh_utils.closest_point_on_mesh` among the ``candidates`` triangles with
    the nearest centroids: a lookup of 40K points takes ~0.3 s on 2 CPU cores, so it can follow
    Gaussians as they move and multiply. Only triangles of ``regions`` (head-model region names,
    e.g. skin: "face", "ears", "neck"; a triangle belongs to a region when most of its vertices
    do) constrain: hair and the mouth interior may leave the mesh.
    """

    def __init__(self, head, beta: Tensor, regions: tuple[str, ...], candidates: int = 8) -> None:
        known = [r for r in regions if r in head.region_names]
        if not known:
            raise ValueError(f"none of the surface regions {', '.join(regions)} exists in this head model "
                             f"(it has {', '.join(head.region_names)})")
        self.vertices = head.shaped_template(beta.reshape(1, -1).float().cpu())[0].detach()
        self.faces = head.faces.cpu()
        tri = self.vertices[self.faces]
        self.face_normals = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
        inside = torch.zeros(self.vertices.shape[0])
        for r in known:
            inside = torch.maximum(inside, head.region(r).cpu().float())
        self.constrained = (inside[self.faces].mean(-1) > 0.5).float()
        self.candidates = candidates

    def lookup(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """anchors [N, 3] (closest mesh points), normals [N, 3] (their triangles' unit normals) and
        weights [N] (1 where that triangle is constrained) for ``points`` [N, 3], on their device."""
        from hravatar.head.mesh_utils import closest_point_on_mesh

        face, bary, _ = closest_point_on_mesh(points.detach().cpu().float(), self.vertices, self.faces, candidates=self.candidates)
        closest = (self.vertices[self.faces[face]] * bary[..., None]).sum(1)
        dev = points.device
        return closest.to(dev), self.face_normals[face].to(dev), self.constrained[face].to(dev)


def photometric_loss(pred: Tensor, gt: Tensor, w_l1: float = 0.8, w_dssim: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """L_rgb = w_l1 * L1 + w_dssim * (1 - SSIM) for [H, W, 3] images."""
    l1 = (pred - gt).abs().mean()
    dssim = 1.0 - ssim_map(pred, gt, padding="same").mean()
    return w_l1 * l1 + w_dssim * dssim, {"l1": l1.detach(), "dssim": dssim.detach()}


def normals_from_depth(depth: Tensor, camera: Camera) -> Tensor:
    """World-space normals from finite differences of the back-projected depth map.

    Args:
        depth: [H, W, 1] camera-space z.
        camera: the camera the depth was rendered with.
    Returns:
        [H, W, 3] unit normals facing the camera (zeros on the 1-pixel border).
    """
    H, W = depth.shape[:2]
    dev, dt = depth.device, depth.dtype
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=dt) + 0.5, torch.arange(W, device=dev, dtype=dt) + 0.5, indexing="ij")
    K = camera.K.to(depth)
    z = depth[..., 0]
    p = torch.stack([(xs - K[0, 2]) / K[0, 0] * z, (ys - K[1, 2]) / K[1, 1] * z, z], -1)  # camera space
    dx = p[1:-1, 2:] - p[1:-1, :-2]
    dy = p[2:, 1:-1] - p[:-2, 1:-1]
    n_cam = F.normalize(torch.linalg.cross(dx, dy, dim=-1), dim=-1)
    # OpenCV camera: facing the camera means negative z in camera space
    n_cam = torch.where(n_cam[..., 2:3] > 0, -n_cam, n_cam)
    R = camera.viewmat[:3, :3].to(depth)
    n_world = n_cam @ R  # R^T n
    out = torch.zeros(H, W, 3, device=dev, dtype=dt)
    out[1:-1, 1:-1] = n_world
    return out


def normal_consistency_loss(normal: Tensor, depth_normal: Tensor, alpha: Tensor, alpha_min: float = 0.9, depth_grad: bool = False) -> Tensor:
    """Mean over confident-alpha pixels of (1 - <N_rendered, N_from_depth>).

    Args:
        normal, depth_normal: [H, W, 3] unit normals; alpha: [H, W, 1].
        depth_grad: also differentiate ``depth_normal`` (else only the rendered normals move).
    """
    m = (alpha[..., 0] > alpha_min) & (depth_normal.abs().sum(-1) > 0)
    if not m.any():
        return normal.sum() * 0
    dn = depth_normal[m] if depth_grad else depth_normal[m].detach()
    return (1 - (normal[m] * dn).sum(-1)).mean()


def total_variation(img: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute TV of an [H, W, C] map (optionally restricted to mask [H, W, 1] > 0.5)."""
    dx = (img[:, 1:] - img[:, :-1]).abs()
    dy = (img[1:] - img[:-1]).abs()
    if mask is not None:
        m = mask[..., 0] > 0.5
        dx = dx[m[:, 1:] & m[:, :-1]]
        dy = dy[m[1:] & m[:-1]]
        if dx.numel() + dy.numel() == 0:
            return img.sum() * 0
        return (dx.sum() + dy.sum()) / (dx.numel() + dy.numel())
    return dx.mean() + dy.mean()


def edge_aware_smoothness(img: Tensor, guide: Tensor, mask: Tensor, chroma_k: float = 50.0, lum_k: float = 5.0) -> Tensor:
    """Retinex-style prior: L1 differences of neighbouring pixels of ``img`` [H, W, C], weighted
    by exp(-chroma_k |d chromaticity| - lum_k |d log luminance|) of ``guide`` [H, W, 3] (the
    photograph), over pixel pairs inside ``mask`` [H, W, 1].

    Shading changes smoothly across a surface while reflectance changes at edges of the image's
    colour, so where the photograph is smooth the albedo should be too. This ties albedo seen
    under little light (e.g. the crown under a setting sun) to the same material seen better lit,
    which a single capture environment cannot otherwise separate from dim light.
    """
    g = guide.detach().clamp(min=1e-4)
    lum = g.sum(-1, keepdim=True)
    chroma = g / lum
    loglum = lum.log()
    m = mask[..., 0] > 0.5
    num = img.new_zeros(())
    den = 0
    for sl_a, sl_b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                       ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
        w = torch.exp(-chroma_k * (chroma[sl_a] - chroma[sl_b]).abs().sum(-1) - lum_k * (loglum[sl_a] - loglum[sl_b]).abs()[..., 0])
        pair = m[sl_a] & m[sl_b]
        d = (img[sl_a] - img[sl_b]).abs().mean(-1)
        num = num + (w * d)[pair].sum()
        den += int(pair.sum())
    return num / max(den, 1)


def flatness_loss(log_scales: Tensor, max_ratio: float = 0.3) -> Tensor:
    """Penalty on Gaussians that are not flat: mean over Gaussians of relu(s_min / s_mid - max_ratio).

    A Gaussian's normal is its shortest axis; when its two smallest scales are close that axis is
    ill-defined and its shading turns arbitrary (a dark spot under a light from above, seen on a
    real clip). Only the smallest scale gets the gradient (the middle one is detached), and
    Gaussians already flatter than ``max_ratio`` cost nothing.

    Args:
        log_scales: [N, 3] log scales.
    Returns:
        scalar loss.
    """
    s = log_scales.sort(dim=-1).values
    ratio = torch.exp(s[:, 0] - s[:, 1].detach())
    return torch.relu(ratio - max_ratio).mean()


def eyelid_loss(eyelids_raw: Tensor, eyelids_tracked: Tensor) -> Tensor:
    """Squared distance between the encoder's eyelid outputs before their [0, 1] clamp [B,2]
    and the pre-tracked eyelids [B,2] (open-eye targets only penalise raw values above 0, so
    the unit can rest below the clamp, but it is never cut off from the blinks)."""
    lo, hi = output_bounds(0, like=eyelids_raw)
    return (bounded_regression_error(eyelids_raw, eyelids_tracked, lo[:2], hi[:2]) ** 2).sum(-1).mean()


def jaw_loss(jaw_raw: Tensor, jaw_tracked: Tensor, side_limit: float = 0.2) -> Tensor:
    """Squared distance between the encoder's jaw outputs [B,3] and the pre-tracked jaw pose [B,3].

    Compared before the encoder's clamps (opening >= 0, sides within +-``side_limit``), as in
    :func:`eyelid_loss`: the same as on the clamped pose while the opening unit is positive, but
    a unit pushed below zero still feels the open-mouth frames (on the clamped output it
    received no gradient and stayed closed for good; seen in one synthetic run).
    """
    lo, hi = output_bounds(0, side_limit, like=jaw_raw)
    return (bounded_regression_error(jaw_raw, jaw_tracked, lo[2:], hi[2:]) ** 2).sum(-1).mean()
