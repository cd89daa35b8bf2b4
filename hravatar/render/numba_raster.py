"""Compiled CPU kernel for the front-to-back pass of the torch rasterizer (numba, optional).

:func:`composite_tiles` does what :func:`hravatar.render.torch_raster.trace_pairs` +
:func:`~hravatar.render.torch_raster.composite_pairs` do, with the same image formation (alpha
test, 0.999 clamp, termination before transmittance <= 1e-4, float64 transmittance) and the
same analytic backward, but as one loop per 16x16 tile compiled by numba and spread over the
cores: no (pixel, Gaussian) pair lists are materialised, and a tile stops as soon as all of its
pixels are finished. The torch functions stay the reference; tests compare the two.

numba is installed with hravatar, but nothing depends on it: :func:`numba_available` says
whether it imports, and without it the torch pass is used. The kernel is compiled on first
use (a few seconds, cached on disk next to this file).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .torch_raster import ALPHA_MAX, ALPHA_MIN, T_MIN

LOG_255 = math.log(255.0)


@lru_cache(maxsize=1)
def numba_available() -> bool:
    """True when numba imports (it is never imported at hravatar import time)."""
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


@lru_cache(maxsize=1)
def _kernel():
    import numba

    # numba's OpenMP layer spins its threads after each parallel loop, starving torch's own
    # OpenMP threads (shading took 30x longer); the work-queue layer sleeps instead
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"

    # contract/reassoc let LLVM fuse and reorder the per-pixel sums (the backward's float64
    # dot products are long dependency chains otherwise): ~25% off the backward, results
    # unchanged to float rounding. No nnan/ninf: the alpha and transmittance tests stay exact.
    @numba.njit(parallel=True, cache=True, fastmath={"contract", "reassoc", "nsz", "arcp"})
    def walk(mx, my, ca, cb, cc, log_op, feat, gids, rects, tile_ptr, tiles_x, tile_size, width, height,
             out, grad_out, grad_geo, grad_feat, backward, n_chunks):
        """Front-to-back over each tile's depth-ordered intersections.

        Forward: out[p] = sum_i alpha_i T_i feat[g_i]. Backward (same walk, same pairs): with
        c_i = <feat[g_i], grad_out[p]>, dL/dalpha_k = T_k c_k - (sum_{i>k} w_i c_i) / (1 - alpha_k),
        where the suffix sum is <out[p], grad_out[p]> minus the running prefix, so no reverse
        walk is needed. Tiles are dealt round-robin to ``n_chunks`` parallel chunks; each chunk
        sums its gradients in its own slice of grad_geo / grad_feat [n_chunks, N, *].
        grad_geo's columns: d/d(mean_x, mean_y, a, b, c, opacity), then sum over pixels of
        |d/dmean_x| and |d/dmean_y| (AbsGS's densification statistic, gsplat's ``absgrad``).
        """
        n_tiles = tile_ptr.shape[0] - 1
        D = feat.shape[1]
        for chunk in numba.prange(n_chunks):
            fg = np.empty(D, dtype=np.float32)  # the current Gaussian's features
            acc_feat = np.zeros(D, dtype=np.float64)  # its feature gradient over the current tile
            for t in range(chunk, n_tiles, n_chunks):
                s = tile_ptr[t]
                e = tile_ptr[t + 1]
                if s == e:
                    continue
                tx0 = (t % tiles_x) * tile_size
                ty0 = (t // tiles_x) * tile_size
                tw = min(tile_size, width - tx0)
                th = min(tile_size, height - ty0)
                trans = np.ones(tw * th, dtype=np.float64)  # transmittance in front of the next Gaussian
                total = np.zeros(tw * th, dtype=np.float64)  # backward: <out, grad_out> minus the prefix so far
                if backward:
                    for q in range(tw * th):
                        p = (ty0 + q // tw) * width + tx0 + q % tw
                        acc = 0.0
                        for d in range(D):
                            acc += np.float64(out[p, d]) * grad_out[p, d]
                        total[q] = acc
                n_done = 0
                for k in range(s, e):
                    g = gids[k]
                    a = ca[g]
                    b = cb[g]
                    c = cc[g]
                    lo = log_op[g]
                    level = lo + LOG_255  # alpha >= 1/255  <=>  sigma <= ln(255 o)
                    if level <= 0.0:
                        continue
                    a_s = max(a, 1e-12)
                    for d in range(D):
                        fg[d] = feat[g, d]
                    # gradients of this intersection, summed locally and added to the chunk's
                    # buffer once (not once per pixel)
                    touched = False
                    g0 = 0.0
                    g1 = 0.0
                    g2 = 0.0
                    g3 = 0.0
                    g4 = 0.0
                    g5 = 0.0
                    ab0 = 0.0
                    ab1 = 0.0
                    for y in range(rects[k, 2], rects[k, 3]):
                        dy = my[g] - (np.float32(y) + np.float32(0.5))
                        # the row's span of the ellipse sigma <= level (plus a margin for rounding)
                        disc = b * b * dy * dy - a_s * (c * dy * dy - 2.0 * level * (1 + 1e-5) - 2e-4)
                        if disc < 0.0:
                            continue
                        half = math.sqrt(disc) / a_s + 0.02
                        xc = mx[g] - 0.5 + b * dy / a_s
                        xs = max(rects[k, 0], int(math.ceil(xc - half)))
                        xe = min(rects[k, 1], int(math.floor(xc + half)) + 1)
                        for x in range(xs, xe):
                            q = (y - ty0) * tw + (x - tx0)
                            tq = trans[q]
                            if tq <= T_MIN:
                                continue
                            dx = mx[g] - (np.float32(x) + np.float32(0.5))
                            sigma_o = np.float32(0.5) * (a * dx * dx + c * dy * dy) + b * dx * dy - lo
                            raw = np.float32(math.exp(-sigma_o))
                            alpha = min(raw, np.float32(ALPHA_MAX))
                            if alpha < ALPHA_MIN:
                                continue
                            nt = tq * (1.0 - np.float64(alpha))
                            trans[q] = nt
                            if nt <= T_MIN:
                                n_done += 1
                                continue
                            w = alpha * np.float32(tq)
                            p = y * width + x
                            if not backward:
                                for d in range(D):
                                    out[p, d] += w * fg[d]
                                continue
                            if not touched:
                                touched = True
                                acc_feat[:] = 0.0
                            cg = 0.0
                            for d in range(D):
                                go_d = grad_out[p, d]
                                cg += np.float64(fg[d]) * go_d
                                acc_feat[d] += w * go_d
                            total[q] -= w * cg
                            d_alpha = tq * cg - total[q] / (1.0 - alpha) if raw <= ALPHA_MAX else 0.0
                            d_sigma = -d_alpha * alpha
                            gx = d_sigma * (a * dx + b * dy)
                            gy = d_sigma * (c * dy + b * dx)
                            g0 += gx
                            g1 += gy
                            ab0 += abs(gx)
                            ab1 += abs(gy)
                            g2 += d_sigma * 0.5 * dx * dx
                            g3 += d_sigma * dx * dy
                            g4 += d_sigma * 0.5 * dy * dy
                            g5 += d_alpha * math.exp(-(sigma_o + lo))
                    if touched:
                        grad_geo[chunk, g, 0] += g0
                        grad_geo[chunk, g, 1] += g1
                        grad_geo[chunk, g, 2] += g2
                        grad_geo[chunk, g, 3] += g3
                        grad_geo[chunk, g, 4] += g4
                        grad_geo[chunk, g, 5] += g5
                        grad_geo[chunk, g, 6] += ab0
                        grad_geo[chunk, g, 7] += ab1
                        for d in range(D):
                            grad_feat[chunk, g, d] += acc_feat[d]
                    if n_done == tw * th:
                        break  # every pixel of the tile is finished

    return walk


@dataclass
class _Tiles:
    """Intersections regrouped by tile (numpy, for the kernel): gids [I], rects [I, 4], ptr [T+1]."""

    gids: np.ndarray
    rects: np.ndarray
    ptr: np.ndarray
    tiles_x: int
    tile_size: int
    width: int
    height: int


def tiles_from_intersections(gids: Tensor, sub_rects: Tensor, width: int, height: int, tile_size: int) -> _Tiles:
    """Regroup depth-ordered intersections by tile (stable: each tile keeps depth order).

    The torch reference of :func:`bin_tiles` (from :func:`~hravatar.render.torch_raster.tile_intersections`).
    """
    gids, sub_rects = gids.cpu(), sub_rects.cpu()
    tiles_x = (width + tile_size - 1) // tile_size
    tiles_y = (height + tile_size - 1) // tile_size
    tile = torch.div(sub_rects[:, 2], tile_size, rounding_mode="floor") * tiles_x + torch.div(
        sub_rects[:, 0], tile_size, rounding_mode="floor")
    order = torch.sort(tile.to(torch.int32), stable=True).indices
    counts = torch.bincount(tile, minlength=tiles_x * tiles_y)
    ptr = torch.zeros(tiles_x * tiles_y + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    return _Tiles(gids.index_select(0, order).numpy(), sub_rects.index_select(0, order).contiguous().numpy(),
                  ptr.numpy(), tiles_x, tile_size, width, height)


@lru_cache(maxsize=1)
def _binner():
    import numba

    @numba.njit(cache=True)
    def bin_rects(order, rects, tile_size, tiles_x, tiles_y):
        """Counting sort of every (Gaussian, tile) overlap by tile, visiting Gaussians in
        ``order`` (front to back), so each tile's list stays in depth order."""
        # tile ranges by float division: exact for these non-negative integers (a quotient
        # that is not an integer cannot round onto one), and much faster than integer division
        ts = np.float64(tile_size)
        n = order.shape[0]
        span = np.empty((n, 4), dtype=np.int64)  # tx0, tx1, ty0, ty1 (inclusive)
        counts = np.zeros(tiles_x * tiles_y + 1, dtype=np.int64)
        for i in range(n):
            g = order[i]
            span[i, 0] = int(math.floor(rects[g, 0] / ts))
            span[i, 1] = int(math.floor((rects[g, 1] - 1) / ts))
            span[i, 2] = int(math.floor(rects[g, 2] / ts))
            span[i, 3] = int(math.floor((rects[g, 3] - 1) / ts))
            for ty in range(span[i, 2], span[i, 3] + 1):
                for tx in range(span[i, 0], span[i, 1] + 1):
                    counts[ty * tiles_x + tx + 1] += 1
        ptr = np.cumsum(counts)
        fill = ptr[:-1].copy()
        gids = np.empty(ptr[-1], dtype=np.int64)
        sub = np.empty((ptr[-1], 4), dtype=np.int64)
        for i in range(n):
            g = order[i]
            for ty in range(span[i, 2], span[i, 3] + 1):
                for tx in range(span[i, 0], span[i, 1] + 1):
                    t = ty * tiles_x + tx
                    j = fill[t]
                    fill[t] = j + 1
                    gids[j] = g
                    sub[j, 0] = max(rects[g, 0], tx * tile_size)
                    sub[j, 1] = min(rects[g, 1], tx * tile_size + tile_size)
                    sub[j, 2] = max(rects[g, 2], ty * tile_size)
                    sub[j, 3] = min(rects[g, 3], ty * tile_size + tile_size)
        return gids, sub, ptr

    return bin_rects


def bin_tiles(rects: Tensor, depths: Tensor, width: int, height: int, tile_size: int) -> _Tiles:
    """3DGS tile binning for the kernel: each tile's (Gaussian, sub-rectangle) list, front to back.

    Same lists as :func:`~hravatar.render.torch_raster.tile_intersections` regrouped by
    :func:`tiles_from_intersections` (the reference), in one compiled counting sort.

    Args:
        rects: [N, 4] int64 (x0, x1, y0, y1) from :func:`~hravatar.render.torch_raster.gaussian_pixel_rects`.
        depths: [N] camera z (front-to-back order, ties by index).
    """
    from .torch_raster import front_to_back

    rects = rects.detach().cpu()
    order = front_to_back(rects, depths.detach().cpu())
    tiles_x = (width + tile_size - 1) // tile_size
    tiles_y = (height + tile_size - 1) // tile_size
    gids, sub, ptr = _binner()(order.numpy(), rects.contiguous().numpy(), tile_size, tiles_x, tiles_y)
    return _Tiles(gids, sub, ptr, tiles_x, tile_size, width, height)


#: numba's work-queue threading layer aborts the process when two Python threads launch
#: parallel kernels at once (e.g. the app's render worker and a thumbnail); take turns.
_LAUNCH = threading.Lock()


def _run(cols: tuple[Tensor, ...], feat: np.ndarray, tiles: _Tiles, out: np.ndarray, grad_out=None):
    with _LAUNCH:
        return _run_locked(cols, feat, tiles, out, grad_out)


def _run_locked(cols, feat, tiles, out, grad_out):
    import numba

    walk = _kernel()
    # one thread budget for both pools: torch.set_num_threads limits this pass too
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    mx, my, ca, cb, cc, op = (c.detach().cpu().to(torch.float32).contiguous().numpy() for c in cols)
    log_op = np.log(np.maximum(op, np.float32(1e-30))).astype(np.float32)
    N, D = feat.shape
    backward = grad_out is not None
    n_chunks = numba.get_num_threads()
    n_buf = n_chunks if backward else 1
    grad_geo = np.zeros((n_buf, N if backward else 0, 8), dtype=np.float64)
    grad_feat = np.zeros((n_buf, N if backward else 0, D), dtype=np.float64)
    if grad_out is None:
        grad_out = np.zeros((1, 1), dtype=np.float32)
    walk(mx, my, ca, cb, cc, log_op, feat, tiles.gids, tiles.rects, tiles.ptr, tiles.tiles_x, tiles.tile_size,
         tiles.width, tiles.height, out, grad_out, grad_geo, grad_feat, backward, n_chunks)
    return grad_geo.sum(0), grad_feat.sum(0)


class _TileComposite(torch.autograd.Function):
    """forward(mean_x, mean_y, a, b, c, opacity [N] each, featext [N, D], tiles, absgrad_to) -> [P, D].

    ``absgrad_to``: a tensor (the [N, 2] screen means) whose ``.absgrad`` the backward sets, or None.
    """

    @staticmethod
    def forward(ctx, mx, my, ca, cb, cc, op, featext, tiles, absgrad_to):
        feat = featext.detach().cpu().to(torch.float32).contiguous().numpy()
        out = np.zeros((tiles.width * tiles.height, feat.shape[1]), dtype=np.float32)
        _run((mx, my, ca, cb, cc, op), feat, tiles, out)
        ctx.save_for_backward(mx, my, ca, cb, cc, op, featext)
        # the returned tensor shares ``out``: keep a private copy for the backward's <out, grad_out>
        grad = any(ctx.needs_input_grad)
        ctx.tiles, ctx.feat, ctx.out = tiles, (feat if grad else None), (out.copy() if grad else None)
        ctx.absgrad_to = absgrad_to
        return torch.from_numpy(out).to(featext.device, featext.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        mx, my, ca, cb, cc, op, featext = ctx.saved_tensors
        go = grad_out.detach().cpu().to(torch.float32).contiguous().numpy()
        geo, gfeat = _run((mx, my, ca, cb, cc, op), ctx.feat, ctx.tiles, ctx.out, go)
        geo = torch.from_numpy(geo).to(mx.device, mx.dtype)
        if ctx.absgrad_to is not None:
            ctx.absgrad_to.absgrad = geo[:, 6:8].contiguous()
        grads = [geo[:, i] if ctx.needs_input_grad[i] else None for i in range(6)]
        gf = torch.from_numpy(gfeat).to(featext.device, featext.dtype) if ctx.needs_input_grad[6] else None
        return (*grads, gf, None, None)


def composite_tiles(cols: tuple[Tensor, ...], featext: Tensor, tiles: _Tiles, absgrad_to: Tensor | None = None) -> Tensor:
    """Front-to-back compositing by the compiled tile kernel, with the analytic 3DGS backward.

    Same image formation and result as :func:`~hravatar.render.torch_raster.trace_pairs`
    followed by :func:`~hravatar.render.torch_raster.composite_pairs` (the reference).

    Args:
        cols: six [N] tensors (mean_x, mean_y, conic a, b, c, opacity), differentiable.
        featext: [N, D] features to composite, differentiable.
        tiles: per-tile depth-ordered intersections from :func:`bin_tiles`.
        absgrad_to: optional tensor (the [N, 2] screen means) that the backward gives an
            ``.absgrad`` [N, 2]: per Gaussian, the sum over pixels of |dL/dmean_x|, |dL/dmean_y|
            (AbsGS; what gsplat's ``absgrad=True`` adds to ``means2d``).
    Returns:
        [H*W, D] ``sum_i alpha_i T_i featext[g_i]`` per pixel (computed in float32).
    """
    return _TileComposite.apply(*cols, featext, tiles, absgrad_to)
