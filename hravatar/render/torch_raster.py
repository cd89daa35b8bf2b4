"""Pure-PyTorch Gaussian rasterizer (any device; the CPU path).

Image formation is gsplat 1.4's "classic" 3DGS rasterizer:

* EWA projection with the perspective Jacobian, x/z and y/z clamped to 1.3x the half field
  of view (plus the principal point offset) inside the Jacobian only;
* 2D covariance + ``eps2d * I``; radius ``ceil(3 sqrt(lambda))`` with
  ``lambda = b + sqrt(max(0.01, b^2 - det))``; culling outside [near, far], det <= 0, or when
  the radius square misses the image;
* a Gaussian reaches the pixels of every ``tile_size`` tile its radius square overlaps
  (tile range computed as gsplat's ``isect_tiles``), pixel centres at (x + 0.5, y + 0.5);
* ``alpha = min(0.999, o exp(-sigma))``, skipped when ``alpha < 1/255``; front-to-back in
  depth order (ties by index); a pixel stops *before* the first Gaussian that would bring its
  transmittance to <= 1e-4.

How it is computed (fast in plain PyTorch, no custom kernels):

1. Project; build each Gaussian's pixel rectangle = its tile range intersected with the
   bounding box of the ellipse where ``alpha >= 1/255`` (half extents ``sqrt(2 ln(255 o) S_xx)``).
   Pixels outside that box cannot pass the alpha test, so skipping them changes nothing.
2. Split rectangles per tile (3DGS tile binning) into (Gaussian, tile) intersections listed in
   depth order, and cut that list into depth batches of bounded pair count (memory bound).
3. Per batch, without autograd: expand intersections into rows and each row into the pixels
   of its exact ellipse span (sparse (pixel, Gaussian) pairs), compute alpha, drop pairs that
   fail the test, stable-sort by pixel (so the depth order survives), and get each pair's
   transmittance from a segmented cumulative sum of log(1 - alpha) in float64 plus the
   per-pixel log transmittance carried from earlier batches. Transmittance only decreases,
   so the termination rule keeps a prefix of each pixel's list. Once a good share of the
   image is finished, later batches skip intersections whose rectangle only holds finished
   pixels (summed-area table): occluded Gaussians cost little.
4. Without grad, the weighted features of each batch are summed per pixel with
   ``embedding_bag`` (far faster than ``index_add_`` on CPU). With grad, the contributing
   pairs are sorted by pixel once and composited by :class:`_Composite`, whose backward is
   the analytic 3DGS one (suffix sums per pixel), not autograd through the scan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from hravatar.utils.rotation import quat_to_matrix

from .camera import Camera
from .rasterize import RasterOutput

#: Contributions with alpha below this are skipped (3DGS / gsplat).
ALPHA_MIN = 1.0 / 255.0
#: Alpha is clamped to this (gsplat; the original 3DGS code uses 0.99).
ALPHA_MAX = 0.999
#: A pixel stops before a Gaussian that would bring its transmittance to <= T_MIN.
T_MIN = 1e-4
LOG_T_MIN = math.log(T_MIN)
#: Default bound on candidate (pixel, Gaussian) pairs expanded at once (~100 bytes each).
DEFAULT_MAX_PAIRS = 1 << 18


@dataclass
class Projection:
    """Screen-space Gaussians from :func:`project_gaussians` (N Gaussians).

    means2d: [N, 2] pixel centres (0 for culled Gaussians); differentiable.
    conics: [N, 3] (a, b, c) of the inverse blurred 2D covariance [[a, b], [b, c]]; differentiable.
    cov2d: [N, 3] blurred 2D covariance (xx, xy, yy), detached.
    depths: [N] camera-space z; differentiable.
    radii: [N] int32 pixel radius, 0 when culled.
    """

    means2d: Tensor
    conics: Tensor
    cov2d: Tensor
    depths: Tensor
    radii: Tensor


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> Projection:
    """EWA-project 3D Gaussians into a pinhole camera (gsplat's ``fully_fused_projection``).

    Args:
        means: [N, 3] world centres.
        quats: [N, 4] (w, x, y, z) rotations, normalised here.
        scales: [N, 3] linear scales.
        viewmat: [4, 4] world -> camera (OpenCV).
        K: [3, 3] intrinsics.
        width, height: image size in pixels.
    Returns:
        :class:`Projection`; culled Gaussians have radius 0 and zero means2d / conics.
    """
    dt = means.dtype
    R = viewmat[:3, :3].to(dt)
    t = viewmat[:3, 3].to(dt)
    K = K.to(dt)
    p = means @ R.T + t
    x, y, z = p.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    in_range = (z >= near_plane) & (z <= far_plane)
    # culled Gaussians get a harmless z so that no inf/nan enters the graph (their grads are 0)
    zs = torch.where(in_range, z, torch.ones_like(z))
    rz = 1.0 / zs
    # camera-space covariance is M M^T with M = R_cam R_q diag(s)
    M = torch.matmul(R, quat_to_matrix(quats)) * scales[:, None, :]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    # the clamp only enters the Jacobian (keeps far off-axis Gaussians from exploding)
    tx = zs * torch.clamp(x * rz, -lim_x_neg, lim_x_pos)
    ty = zs * torch.clamp(y * rz, -lim_y_neg, lim_y_pos)
    # rows of J M with J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]
    row0 = (fx * rz)[:, None] * M[:, 0] - (fx * tx * rz * rz)[:, None] * M[:, 2]
    row1 = (fy * rz)[:, None] * M[:, 1] - (fy * ty * rz * rz)[:, None] * M[:, 2]
    cxx = (row0 * row0).sum(-1) + eps2d
    cxy = (row0 * row1).sum(-1)
    cyy = (row1 * row1).sum(-1) + eps2d
    det = cxx * cyy - cxy * cxy
    ok = in_range & (det > 0)
    det_s = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([cyy / det_s, -cxy / det_s, cxx / det_s], -1)
    mx = fx * x * rz + cx
    my = fy * y * rz + cy
    with torch.no_grad():
        b = 0.5 * (cxx + cyy)
        lam = b + torch.sqrt(torch.clamp(b * b - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(lam))
        visible = ok & (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
    vis = visible[:, None]
    means2d = torch.where(vis, torch.stack([mx, my], -1), torch.zeros((), dtype=dt, device=means.device))
    conics = torch.where(vis, conics, torch.zeros((), dtype=dt, device=means.device))
    cov2d = torch.stack([cxx, cxy, cyy], -1).detach()
    return Projection(means2d=means2d, conics=conics, cov2d=cov2d, depths=z, radii=radii)


def tile_ranges(means2d: Tensor, radii: Tensor, width: int, height: int, tile_size: int) -> tuple[Tensor, Tensor]:
    """Tiles overlapped by each Gaussian's radius square, as gsplat's ``isect_tiles``.

    Args:
        means2d: [N, 2] pixel centres.
        radii: [N] pixel radii (0 = culled).
    Returns:
        tile_min: [N, 2] int64 (tx, ty) inclusive; tile_max: [N, 2] int64 exclusive. Culled
        Gaussians get an empty range.
    """
    tw = (width + tile_size - 1) // tile_size
    th = (height + tile_size - 1) // tile_size
    m = means2d.detach() / tile_size
    r = (radii.to(m.dtype) / tile_size)[:, None]
    hi = torch.tensor([tw, th], device=m.device, dtype=m.dtype)
    tmin = torch.minimum(torch.clamp(torch.floor(m - r), min=0), hi).long()
    tmax = torch.minimum(torch.clamp(torch.ceil(m + r), min=0), hi).long()
    tmax = torch.where((radii > 0)[:, None], tmax, tmin)
    return tmin, tmax


def gaussian_pixel_rects(
    proj: Projection, opacities: Tensor, width: int, height: int, tile_size: int
) -> Tensor:
    """Pixel rectangle each Gaussian can reach: its tiles intersected with its alpha >= 1/255 box.

    Args:
        proj: :class:`Projection` of N Gaussians.
        opacities: [N].
    Returns:
        [N, 4] int64 (x0, x1, y0, y1), half-open; empty (x0 >= x1 or y0 >= y1) when the
        Gaussian reaches no pixel.
    """
    with torch.no_grad():
        tmin, tmax = tile_ranges(proj.means2d, proj.radii, width, height, tile_size)
        m = proj.means2d.detach()
        dt = m.dtype
        op = opacities.detach().to(dt)
        # alpha >= 1/255  <=>  0.5 d^T S^-1 d <= ln(255 o); that ellipse's bbox half extents
        # are sqrt(2 ln(255 o) S_xx), sqrt(2 ln(255 o) S_yy). Small margins keep it a superset.
        level = alpha_levels(op)
        ex = torch.sqrt(2.0 * level * proj.cov2d[:, 0]) * (1 + 1e-4) + 1e-3
        ey = torch.sqrt(2.0 * level * proj.cov2d[:, 2]) * (1 + 1e-4) + 1e-3
        big = float(max(width, height) + 2)
        x0 = torch.ceil((m[:, 0] - ex - 0.5).clamp(-big, big)).long()
        x1 = torch.floor((m[:, 0] + ex - 0.5).clamp(-big, big)).long() + 1
        y0 = torch.ceil((m[:, 1] - ey - 0.5).clamp(-big, big)).long()
        y1 = torch.floor((m[:, 1] + ey - 0.5).clamp(-big, big)).long() + 1
        x0 = torch.maximum(torch.clamp(x0, min=0), tmin[:, 0] * tile_size)
        y0 = torch.maximum(torch.clamp(y0, min=0), tmin[:, 1] * tile_size)
        x1 = torch.minimum(torch.clamp(x1, max=width), tmax[:, 0] * tile_size)
        y1 = torch.minimum(torch.clamp(y1, max=height), tmax[:, 1] * tile_size)
        empty = (proj.radii <= 0) | (op < ALPHA_MIN * (1 - 1e-5))
        x1 = torch.where(empty, x0, x1)
        return torch.stack([x0, x1, y0, y1], -1)


def tile_intersections(rects: Tensor, depths: Tensor, tile_size: int) -> tuple[Tensor, Tensor]:
    """Bin Gaussian rectangles into tiles: one entry per (Gaussian, tile), in depth order.

    Args:
        rects: [N, 4] int64 (x0, x1, y0, y1) from :func:`gaussian_pixel_rects`.
        depths: [N] camera z used for the front-to-back order (ties keep index order).
    Returns:
        gids: [I] int64 Gaussian of each intersection, depth-sorted (a Gaussian's tiles are
        consecutive); sub_rects: [I, 4] int64 the part of its rectangle inside that tile.
    """
    with torch.no_grad():
        order = front_to_back(rects, depths)
        x0, x1, y0, y1 = rects.index_select(0, order).unbind(-1)
        tx0 = torch.div(x0, tile_size, rounding_mode="floor")
        ty0 = torch.div(y0, tile_size, rounding_mode="floor")
        ntx = torch.div(x1 - 1, tile_size, rounding_mode="floor") - tx0 + 1
        nty = torch.div(y1 - 1, tile_size, rounding_mode="floor") - ty0 + 1
        counts = ntx * nty
        rep = torch.repeat_interleave(counts)

        def per_isect(t: Tensor) -> Tensor:
            return t.index_select(0, rep)

        j = torch.arange(rep.numel(), device=rects.device) - per_isect(torch.cumsum(counts, 0) - counts)
        ntx_r = per_isect(ntx)
        jy = torch.div(j, ntx_r, rounding_mode="floor")
        tx = per_isect(tx0) + (j - jy * ntx_r)
        ty = per_isect(ty0) + jy
        sub = torch.stack(
            [
                torch.maximum(per_isect(x0), tx * tile_size),
                torch.minimum(per_isect(x1), tx * tile_size + tile_size),
                torch.maximum(per_isect(y0), ty * tile_size),
                torch.minimum(per_isect(y1), ty * tile_size + tile_size),
            ],
            -1,
        )
        return per_isect(order), sub


def front_to_back(rects: Tensor, depths: Tensor) -> Tensor:
    """[K] int64 indices of the Gaussians with a non-empty pixel rectangle, front to back.

    Args:
        rects: [N, 4] (x0, x1, y0, y1) from :func:`gaussian_pixel_rects`.
        depths: [N] camera z (ties keep index order, see :func:`depth_order`).
    """
    nonempty = ((rects[:, 1] > rects[:, 0]) & (rects[:, 3] > rects[:, 2])).nonzero().squeeze(1)
    return nonempty.index_select(0, depth_order(depths.detach().index_select(0, nonempty)))


def depth_order(depths: Tensor) -> Tensor:
    """Stable front-to-back order of [K] camera depths (ties keep index order); [K] int64.

    Positive IEEE floats sort like their bit patterns, and integer keys take the fast radix
    sort (the float sort is ~10x slower); non-positive depths (a near plane <= 0) fall back.
    """
    if depths.numel() == 0 or not bool(depths.min() > 0):
        return torch.sort(depths, stable=True).indices
    if depths.dtype == torch.float32:
        return torch.sort(depths.view(torch.int32), stable=True).indices
    if depths.dtype == torch.float64:
        return torch.sort(depths.view(torch.int64), stable=True).indices
    return torch.sort(depths, stable=True).indices


def alpha_levels(opacities: Tensor) -> Tensor:
    """[N] ``ln(255 o)`` clamped at 0: alpha >= 1/255 needs ``sigma <= level`` (detached)."""
    op = opacities.detach()
    return torch.log(torch.clamp(op * 255.0, min=1e-30)).clamp(min=0.0)


def candidate_pairs(
    cols: tuple[Tensor, ...], levels: Tensor, gids: Tensor, rects: Tensor, width: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Expand intersections into (pixel, Gaussian) candidate pairs and evaluate their alpha.

    Each row of an intersection's rectangle is cut to the span where the Gaussian's ellipse
    ``sigma <= level`` crosses it (plus a small margin), so nearly every candidate passes the
    alpha test. Pairs come out intersection-major, then row-major, i.e. still grouped by
    Gaussian in the order of ``gids``.

    Args:
        cols: six [N] tensors (mean_x, mean_y, conic a, b, c, opacity).
        levels: [N] from :func:`alpha_levels`.
        gids: [I] int64 Gaussian of each intersection.
        rects: [I, 4] int64 (x0, x1, y0, y1) pixel rectangles.
        width: image width (flat pixel index = y * width + x).
    Returns:
        rid: [M] int64 row of each pair; pix: [M] int32 flat pixel;
        alpha: [M] ``min(0.999, o exp(-sigma))``; valid: [M] bool, ``alpha >= 1/255``;
        row_gids: [R] int64 Gaussian of each row (``row_gids[rid]`` is each pair's Gaussian).
    """
    dev = rects.device
    dt = cols[0].dtype
    x0, x1, y0, y1 = rects.unbind(-1)
    h = (y1 - y0).clamp(min=0)
    rrow = torch.repeat_interleave(h)  # intersection of each row
    ry = y0.index_select(0, rrow) + (torch.arange(rrow.numel(), device=dev) - (torch.cumsum(h, 0) - h).index_select(0, rrow))
    g_r = gids.index_select(0, rrow)
    mx, my, ca, cb, cc, op = (c.index_select(0, g_r) for c in cols)
    lev = levels.index_select(0, g_r) * (1 + 1e-5) + 1e-4
    dy = my - (ry.to(dt) + 0.5)
    # row span of 0.5 (a dx^2 + 2 b dx dy + c dy^2) <= lev, dx = mean_x - (x + 0.5)
    ca_s = ca.clamp(min=1e-12)
    disc = cb * cb * dy * dy - ca_s * (cc * dy * dy - 2.0 * lev)
    sq = torch.sqrt(disc.clamp(min=0.0))
    xc = mx - 0.5 + cb * dy / ca_s  # vertex of the parabola in pixel x
    half = sq / ca_s + 0.02  # margin covers rounding of the exact alpha test
    big = float(width + 2)
    xs = torch.maximum(torch.ceil((xc - half).clamp(-big, big)).long(), x0.index_select(0, rrow))
    xe = torch.minimum(torch.floor((xc + half).clamp(-big, big)).long() + 1, x1.index_select(0, rrow))
    cnt = (xe - xs).clamp(min=0)
    rid = torch.repeat_interleave(cnt)
    ux_i = torch.arange(rid.numel(), device=dev) - (torch.cumsum(cnt, 0) - cnt).index_select(0, rid)
    ux = ux_i.to(dt)

    def per_pair(t: Tensor) -> Tensor:
        return t.index_select(0, rid)

    # sigma as a polynomial in dx with per-row coefficients (dy is constant on a row), and
    # the opacity folded into the exponent: alpha = exp(ln o - sigma)
    dx = per_pair(mx - 0.5 - xs.to(dt)) - ux
    sigma_o = (per_pair(0.5 * ca) * dx + per_pair(cb * dy)) * dx + per_pair(0.5 * cc * dy * dy - torch.log(op))
    alpha = torch.clamp(torch.exp(-sigma_o), max=ALPHA_MAX)
    # the conic is positive definite, so gsplat's "sigma < 0" skip only ever catches rounding;
    # it is not applied here (a centre pixel must not be lost to a -1e-9)
    valid = alpha >= ALPHA_MIN
    pix = (per_pair(ry * width + xs) + ux_i).to(torch.int32)
    return rid, pix, alpha, valid, g_r


@dataclass
class PixelSegments:
    """Layout of a pixel-sorted pair list over an image of P pixels (S pixels present).

    crow: [P + 1] int64 offset of each pixel's first pair (CSR row pointer).
    pixels: [S] int64 pixels that have pairs; starts, ends: [S] first / last pair index.
    """

    crow: Tensor
    pixels: Tensor
    starts: Tensor
    ends: Tensor


def sort_pixels(pix: Tensor, n_pix: int) -> tuple[Tensor, Tensor]:
    """Stable sort of [K] integer pixel indices in [0, n_pix).

    Returns: sorted [K] int64 pixels and the [K] int64 permutation. Uses 16-bit keys when
    they fit (the radix sort then makes half the passes).
    """
    if n_pix <= 1 << 16:
        keys, perm = torch.sort((pix.to(torch.int32) - (1 << 15)).to(torch.int16), stable=True)
        return keys.to(torch.int64) + (1 << 15), perm
    keys, perm = torch.sort(pix.to(torch.int32), stable=True)
    return keys.to(torch.int64), perm


def pixel_segments(pix_sorted: Tensor, n_pix: int) -> PixelSegments:
    """Segment a pixel-sorted pair list ([K] integer pixels) into per-pixel runs."""
    counts = torch.bincount(pix_sorted, minlength=n_pix)
    crow = torch.zeros(n_pix + 1, dtype=torch.int64, device=pix_sorted.device)
    torch.cumsum(counts, 0, out=crow[1:])
    pixels = counts.nonzero().squeeze(1)
    starts = crow.index_select(0, pixels)
    ends = crow.index_select(0, pixels + 1) - 1
    return PixelSegments(crow=crow, pixels=pixels, starts=starts, ends=ends)


def segmented_log_transmittance(
    alpha: Tensor, seg: PixelSegments, pix_sorted: Tensor, carried: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-pair log transmittance in front of and behind each pair of a pixel-sorted list.

    ``log T_excl[i] = carried[pix] + sum_{j < i, same pixel} log(1 - alpha_j)``, summed in
    float64: one running sum serves all pixels, and subtracting its value at a pixel's first
    pair must not lose the pixel's own (small) sum.

    Args:
        alpha: [K] alphas in pixel-then-depth order.
        seg: :class:`PixelSegments` of the list; pix_sorted: [K] integer pixels.
        carried: [P] float64 log transmittance already accumulated per pixel, or None (0).
    Returns:
        log_t_excl, log_t_incl: [K] float64.
    """
    la = torch.log1p(-alpha).to(torch.float64)  # log1p in the input dtype: float64 log1p is slow
    cs = torch.cumsum(la, 0)
    head = cs.index_select(0, seg.starts) - la.index_select(0, seg.starts)
    base = -head if carried is None else carried.index_select(0, seg.pixels) - head
    per_pix = torch.zeros(seg.crow.numel() - 1, dtype=torch.float64, device=alpha.device)
    per_pix = per_pix.index_copy(0, seg.pixels, base)
    incl = cs + per_pix.index_select(0, pix_sorted)
    return incl - la, incl


@dataclass
class _BagBackward:
    """Index data for the feature gradient of :class:`_Composite` (pairs grouped by Gaussian).

    order: [K] pixel-sorted position of each pair in Gaussian-grouped order;
    pix_grouped: [K] its pixel; run_starts: [R] first pair of each run of equal Gaussian;
    run_gids: [R] that Gaussian.
    """

    order: Tensor
    pix_grouped: Tensor
    run_starts: Tensor
    run_gids: Tensor


@dataclass
class PairList:
    """Contributing (pixel, Gaussian) pairs of a frame, in pixel then depth order.

    gids, pix: [K] int64; seg: :class:`PixelSegments`; bag_bwd: index data for the backward.
    """

    gids: Tensor
    pix: Tensor
    seg: PixelSegments
    bag_bwd: _BagBackward


def _summed_area(mask: Tensor) -> Tensor:
    """[H+1, W+1] int32 summed-area table of a [H, W] bool mask (zero first row/col)."""
    H, W = mask.shape
    sat = torch.zeros(H + 1, W + 1, dtype=torch.int32, device=mask.device)
    sat[1:, 1:] = mask.to(torch.int32).cumsum(0).cumsum(1)
    return sat


def trace_pairs(
    cols: tuple[Tensor, ...],
    levels: Tensor,
    featext: Tensor | None,
    gids: Tensor,
    sub_rects: Tensor,
    width: int,
    height: int,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Non-differentiable front-to-back pass over depth-ordered tile intersections.

    Args:
        cols: six [N] detached tensors (mean_x, mean_y, conic a, b, c, opacity).
        levels: [N] from :func:`alpha_levels`.
        featext: [N, D] features to composite, or None to only collect the contributing pairs.
        gids: [I] Gaussian of each intersection, in depth order.
        sub_rects: [I, 4] (x0, x1, y0, y1) pixel rectangle of each intersection.
        max_pairs: bound on the candidate pairs expanded at once.
    Returns:
        image: [H*W, D] composited features (None when featext is None);
        kept_gids, kept_pix: [K] int64 contributing pairs grouped by Gaussian in depth order
        (empty when featext is given).
    """
    dev = gids.device
    n_pix = width * height
    log_t = torch.zeros(n_pix, dtype=torch.float64, device=dev)
    image = None if featext is None else torch.zeros(n_pix, featext.shape[1], dtype=featext.dtype, device=dev)
    kept_g: list[Tensor] = []
    kept_p: list[Tensor] = []
    areas = (sub_rects[:, 1] - sub_rects[:, 0]) * (sub_rects[:, 3] - sub_rects[:, 2])
    cum = torch.cumsum(areas, 0)
    total = int(cum[-1]) if cum.numel() else 0
    # depth batches of about max_pairs candidates (one huge rectangle may exceed it)
    marks = torch.arange(max_pairs, max(total, max_pairs), max_pairs, device=dev, dtype=cum.dtype)
    bounds = [0] + torch.searchsorted(cum, marks, right=True).tolist() + [gids.numel()]
    cull = False
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        if b1 <= b0:
            continue
        g_b, r_b = gids[b0:b1], sub_rects[b0:b1]
        live = None
        if cull:
            # skip intersections whose rectangle only holds finished pixels
            live = log_t > LOG_T_MIN
            sat = _summed_area(live.view(height, width)).view(-1)
            x0, x1, y0, y1 = (t * (width + 1) if i >= 2 else t for i, t in enumerate(r_b.unbind(-1)))
            n_live = sat.index_select(0, y1 + x1) - sat.index_select(0, y0 + x1) - sat.index_select(0, y1 + x0) + sat.index_select(0, y0 + x0)
            keep_i = (n_live > 0).nonzero().squeeze(1)
            if keep_i.numel() == 0:
                continue
            g_b, r_b = g_b.index_select(0, keep_i), r_b.index_select(0, keep_i)
        rid, pix, alpha, valid, g_r = candidate_pairs(cols, levels, g_b, r_b, width)
        if live is not None:
            valid &= live.index_select(0, pix)
        # compact (order-preserving, so still grouped by Gaussian in depth order)
        pix_v = pix.masked_select(valid)
        if pix_v.numel() == 0:
            continue
        alpha_v = alpha.masked_select(valid)
        g_v = g_r.index_select(0, rid.masked_select(valid))
        # stable sort by pixel keeps the depth order inside each pixel
        pix_s, perm = sort_pixels(pix_v, n_pix)
        alpha_s = alpha_v.index_select(0, perm)
        seg = pixel_segments(pix_s, n_pix)
        excl, incl = segmented_log_transmittance(alpha_s, seg, pix_s, log_t)
        log_t.index_copy_(0, seg.pixels, incl.index_select(0, seg.ends))
        keep = incl > LOG_T_MIN  # a prefix of every pixel's list (transmittance decreases)
        # culling only pays once a good share of the image is finished; without it, pairs of
        # finished pixels are simply not kept (their carried transmittance is below T_MIN)
        cull = cull or int((log_t <= LOG_T_MIN).sum()) > n_pix // 16
        if featext is not None:
            w = alpha_s * torch.exp(excl.to(alpha_s.dtype)) * keep
            g_s = g_v.index_select(0, perm)
            image += F.embedding_bag(g_s, featext, seg.crow[:-1], mode="sum", per_sample_weights=w)
        else:
            # back to the Gaussian-grouped order
            keep_v = torch.zeros_like(keep).index_fill_(0, perm.masked_select(keep), True)
            kept_g.append(g_v.masked_select(keep_v))
            kept_p.append(pix_v.masked_select(keep_v).long())
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    kg = torch.cat(kept_g) if kept_g else empty
    kp = torch.cat(kept_p) if kept_p else empty
    return image, kg, kp


def build_pair_list(kept_gids: Tensor, kept_pix: Tensor, n_pix: int) -> PairList:
    """Index bookkeeping for compositing a Gaussian-grouped list of contributing pairs.

    Args:
        kept_gids, kept_pix: [K] int64 from :func:`trace_pairs` (grouped by Gaussian, depth order).
        n_pix: number of image pixels.
    Returns:
        :class:`PairList` sorted by pixel then depth.
    """
    pix_s, perm = sort_pixels(kept_pix, n_pix)
    g_s = kept_gids.index_select(0, perm)
    K = kept_gids.numel()
    # where each Gaussian-grouped pair landed in pixel order
    order = torch.empty_like(perm).index_copy_(0, perm, torch.arange(K, device=perm.device))
    new = torch.ones(K, dtype=torch.bool, device=kept_gids.device)
    if K > 1:
        new[1:] = kept_gids[1:] != kept_gids[:-1]
    run_starts = new.nonzero().squeeze(1)
    bwd = _BagBackward(order=order, pix_grouped=kept_pix, run_starts=run_starts, run_gids=kept_gids.index_select(0, run_starts))
    return PairList(gids=g_s, pix=pix_s, seg=pixel_segments(pix_s, n_pix), bag_bwd=bwd)


def _pair_dots(grad_out: Tensor, featext: Tensor, gids: Tensor, pix: Tensor) -> Tensor:
    """[K] ``dot(grad_out[pix_k], featext[g_k])``, channel by channel (1D gathers are fast)."""
    acc = torch.zeros(gids.numel(), dtype=grad_out.dtype, device=grad_out.device)
    for d in range(featext.shape[1]):
        acc += grad_out[:, d].contiguous().index_select(0, pix) * featext[:, d].contiguous().index_select(0, gids)
    return acc


def _pair_offsets_and_gauss(
    mx: Tensor, my: Tensor, ca: Tensor, cb: Tensor, cc: Tensor, gids: Tensor, pix: Tensor, width: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair: dx = mean_x - (x + 0.5), dy = mean_y - (y + 0.5) and exp(-sigma); [K] each."""
    dt = mx.dtype
    py = torch.div(pix, width, rounding_mode="floor")
    dx = mx.index_select(0, gids) - ((pix - py * width).to(dt) + 0.5)
    dy = my.index_select(0, gids) - (py.to(dt) + 0.5)
    sigma = 0.5 * (ca.index_select(0, gids) * dx * dx + cc.index_select(0, gids) * dy * dy) + cb.index_select(0, gids) * dx * dy
    return dx, dy, torch.exp(-sigma)


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of a :class:`PairList` with the 3DGS analytic backward.

    forward(mean_x, mean_y, a, b, c, opacity [N] each, featext [N, D], pairs, width) -> [P, D]
    """

    @staticmethod
    def forward(ctx, mx, my, ca, cb, cc, op, featext, pairs, width):
        dx, dy, gauss = _pair_offsets_and_gauss(mx, my, ca, cb, cc, pairs.gids, pairs.pix, width)
        alpha = torch.clamp(op.index_select(0, pairs.gids) * gauss, max=ALPHA_MAX)
        excl, _ = segmented_log_transmittance(alpha, pairs.seg, pairs.pix)
        T = torch.exp(excl.to(alpha.dtype))
        out = F.embedding_bag(pairs.gids, featext, pairs.seg.crow[:-1], mode="sum", per_sample_weights=alpha * T)
        # per-pair geometry is recomputed in backward: only alpha and T are kept (memory)
        ctx.save_for_backward(mx, my, ca, cb, cc, op, featext, alpha, T)
        ctx.pairs = pairs
        ctx.width = width
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        mx, my, ca, cb, cc, op, featext, alpha, T = ctx.saved_tensors
        pairs = ctx.pairs
        g, pix, seg = pairs.gids, pairs.pix, pairs.seg
        dx, dy, gauss = _pair_offsets_and_gauss(mx, my, ca, cb, cc, g, pix, ctx.width)
        raw = op.index_select(0, g) * gauss
        grad_out = grad_out.contiguous()
        w = alpha * T
        c = _pair_dots(grad_out, featext, g, pix)  # dL/dw per pair
        # dL/dalpha_k = T_k c_k - (sum_{i > k in the pixel} w_i c_i) / (1 - alpha_k)
        wc = torch.cumsum((w * c).to(torch.float64), 0)
        last = torch.zeros(seg.crow.numel() - 1, dtype=torch.float64, device=wc.device)
        last = last.index_copy(0, seg.pixels, wc.index_select(0, seg.ends))
        behind = (last.index_select(0, pix) - wc).to(alpha.dtype)
        d_alpha = T * c - behind / (1.0 - alpha)
        d_alpha = torch.where(raw <= ALPHA_MAX, d_alpha, torch.zeros_like(d_alpha))  # clamped: no grad
        d_sigma = -d_alpha * alpha
        N = mx.shape[0]

        def to_gauss(v: Tensor) -> Tensor:
            return torch.zeros(N, dtype=v.dtype, device=v.device).index_add_(0, g, v)

        cav, cbv, ccv = ca.index_select(0, g), cb.index_select(0, g), cc.index_select(0, g)
        grads = [
            to_gauss(d_sigma * (cav * dx + cbv * dy)),
            to_gauss(d_sigma * (ccv * dy + cbv * dx)),
            to_gauss(d_sigma * (0.5 * dx * dx)),
            to_gauss(d_sigma * (dx * dy)),
            to_gauss(d_sigma * (0.5 * dy * dy)),
            to_gauss(d_alpha * gauss),
        ]
        grad_feat = None
        if ctx.needs_input_grad[6]:
            # transposed bag: pairs grouped by Gaussian, summing weighted pixel gradients
            bwd = pairs.bag_bwd
            runs = F.embedding_bag(
                bwd.pix_grouped, grad_out, bwd.run_starts, mode="sum", per_sample_weights=w.index_select(0, bwd.order)
            )
            grad_feat = torch.zeros_like(featext).index_add_(0, bwd.run_gids, runs)
        return (*[gr if ctx.needs_input_grad[i] else None for i, gr in enumerate(grads)], grad_feat, None, None)


def composite_pairs(cols: tuple[Tensor, ...], featext: Tensor, pairs: PairList, width: int) -> Tensor:
    """Differentiable front-to-back compositing of contributing pairs.

    Args:
        cols: six [N] tensors (mean_x, mean_y, conic a, b, c, opacity), differentiable.
        featext: [N, D] features, differentiable.
        pairs: :class:`PairList` from :func:`build_pair_list`.
        width: image width.
    Returns:
        [P, D] ``sum_i alpha_i T_i featext[g_i]`` per pixel, with the analytic 3DGS backward.
    """
    return _Composite.apply(*(c.contiguous() for c in cols), featext.contiguous(), pairs, width)


def rasterize_torch(
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
    max_pairs: int = DEFAULT_MAX_PAIRS,
    trace: str = "torch",
) -> RasterOutput:
    """Rasterize with the pure-PyTorch backend; same contract as ``rasterize_gaussians``.

    Args:
        means: [N, 3]; quats: [N, 4] (w, x, y, z); scales: [N, 3] linear; opacities: [N];
        features: [N, C]; camera: :class:`Camera`.
        max_pairs: memory bound, the number of candidate (pixel, Gaussian) pairs expanded at once.
        trace: front-to-back pass: "torch" (:func:`trace_pairs` + :func:`composite_pairs`) or
            "numba" (the compiled :func:`hravatar.render.numba_raster.composite_tiles`, CPU
            tensors; same images and gradients).
    Returns:
        :class:`RasterOutput` (features [H, W, C], depth [H, W, 1], alpha [H, W, 1], ...).
    """
    if trace not in ("torch", "numba"):
        raise ValueError(f"unknown trace kernel '{trace}' (torch or numba)")
    W, H = int(camera.width), int(camera.height)
    dev, dt = means.device, means.dtype
    cam = camera.to(dev)
    proj = project_gaussians(
        means, quats, scales, cam.viewmat, cam.K, W, H, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d
    )
    op = opacities.to(dt)
    cols = (proj.means2d[:, 0], proj.means2d[:, 1], proj.conics[:, 0], proj.conics[:, 1], proj.conics[:, 2], op)
    # features + depth + 1: one bag sum gives colour, depth numerator and alpha together
    featext = torch.cat([features.to(dt), proj.depths[:, None], torch.ones_like(op)[:, None]], 1)
    rects = gaussian_pixel_rects(proj, op, W, H, tile_size)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*cols, featext))
    if trace == "numba":
        from .numba_raster import bin_tiles, composite_tiles

        # the backward also leaves AbsGS's statistic on proj.means2d.absgrad (as gsplat's absgrad=True)
        image = composite_tiles(cols, featext, bin_tiles(rects, proj.depths, W, H, tile_size), absgrad_to=proj.means2d)
    else:
        gids, sub = tile_intersections(rects, proj.depths, tile_size)
        with torch.no_grad():
            dcols = tuple(c.detach().contiguous() for c in cols)
            levels = alpha_levels(op)
            if not needs_grad:
                image, _, _ = trace_pairs(dcols, levels, featext.detach(), gids, sub, W, H, max_pairs)
            else:
                _, kg, kp = trace_pairs(dcols, levels, None, gids, sub, W, H, max_pairs)
                pairs = build_pair_list(kg, kp, W * H)
        if needs_grad:
            image = composite_pairs(cols, featext, pairs, W)
    image = image.view(H, W, -1)
    C = features.shape[1]
    alpha = image[..., C + 1 :]
    depth = image[..., C : C + 1] / alpha.clamp(min=1e-10)
    return RasterOutput(
        features=image[..., :C],
        depth=depth,
        alpha=alpha,
        means2d=proj.means2d,
        radii=proj.radii,
        depths=proj.depths,
        width=W,
        height=H,
    )
