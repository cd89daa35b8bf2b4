"""Compiled CPU kernel for the front-to-back pass of the torch rasterizer (numba, optional).

:func:`trace_tiles` does what :func:`hravatar.render.torch_raster.trace_pairs` does, with the
same image formation (alpha test, 0.999 clamp, termination before transmittance <= 1e-4,
float64 log transmittance), but as one loop per 16x16 tile compiled by numba and spread over
the cores: no (pixel, Gaussian) pair lists are materialised, and a tile stops as soon as all
of its pixels are finished. ``trace_pairs`` stays the reference; tests compare the two.

numba is an optional dependency: :func:`numba_available` says whether it imports. The
kernels are compiled on first use (a few seconds, cached on disk next to this file).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
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
def _kernels():
    import numba

    # numba's OpenMP layer spins its threads after each parallel loop, starving torch's own
    # OpenMP threads (shading took 30x longer); the work-queue layer sleeps instead
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"

    @numba.njit(parallel=True, cache=True)
    def composite(mx, my, ca, cb, cc, log_op, feat, gids, rects, tile_ptr, tiles_x, tile_size, width, height, out,
                  kept_g, kept_p, kept_ptr, collect):
        n_tiles = tile_ptr.shape[0] - 1
        D = feat.shape[1]
        for t in numba.prange(n_tiles):
            s = tile_ptr[t]
            e = tile_ptr[t + 1]
            if s == e:
                continue
            tx0 = (t % tiles_x) * tile_size
            ty0 = (t // tiles_x) * tile_size
            tw = min(tile_size, width - tx0)
            th = min(tile_size, height - ty0)
            trans = np.ones(tw * th, dtype=np.float64)  # transmittance in front of the next Gaussian
            n_done = 0
            n_kept = kept_ptr[t]
            for k in range(s, e):
                g = gids[k]
                x0 = rects[k, 0]
                x1 = rects[k, 1]
                y0 = rects[k, 2]
                y1 = rects[k, 3]
                a = ca[g]
                b = cb[g]
                c = cc[g]
                lo = log_op[g]
                level = lo + LOG_255  # alpha >= 1/255  <=>  sigma <= ln(255 o)
                if level <= 0.0:
                    continue
                a_s = max(a, 1e-12)
                for y in range(y0, y1):
                    dy = my[g] - (np.float32(y) + np.float32(0.5))
                    # the row's span of the ellipse sigma <= level (plus a margin for rounding)
                    disc = b * b * dy * dy - a_s * (c * dy * dy - 2.0 * level * (1 + 1e-5) - 2e-4)
                    if disc < 0.0:
                        continue
                    half = math.sqrt(disc) / a_s + 0.02
                    xc = mx[g] - 0.5 + b * dy / a_s
                    xs = max(x0, int(math.ceil(xc - half)))
                    xe = min(x1, int(math.floor(xc + half)) + 1)
                    for x in range(xs, xe):
                        q = (y - ty0) * tw + (x - tx0)
                        tq = trans[q]
                        if tq <= T_MIN:
                            continue
                        dx = mx[g] - (np.float32(x) + np.float32(0.5))
                        sigma_o = np.float32(0.5) * (a * dx * dx + c * dy * dy) + b * dx * dy - lo
                        alpha = min(np.float32(math.exp(-sigma_o)), np.float32(ALPHA_MAX))
                        if alpha < ALPHA_MIN:
                            continue
                        nt = tq * (1.0 - np.float64(alpha))
                        trans[q] = nt
                        if nt <= T_MIN:
                            n_done += 1
                            continue
                        if collect:
                            kept_g[n_kept] = g
                            kept_p[n_kept] = y * width + x
                            n_kept += 1
                        else:
                            w = alpha * np.float32(tq)
                            p = y * width + x
                            for d in range(D):
                                out[p, d] += w * feat[g, d]
                if n_done == tw * th:
                    break  # every pixel of the tile is finished
            if collect:
                kept_ptr[t] = n_kept

    @numba.njit(parallel=True, cache=True)
    def count_candidates(rects, tile_ptr):
        n_tiles = tile_ptr.shape[0] - 1
        cnt = np.zeros(n_tiles + 1, dtype=np.int64)
        for t in numba.prange(n_tiles):
            c = 0
            for k in range(tile_ptr[t], tile_ptr[t + 1]):
                c += (rects[k, 1] - rects[k, 0]) * (rects[k, 3] - rects[k, 2])
            cnt[t + 1] = c
        return cnt

    return composite, count_candidates


def _by_tile(gids: Tensor, sub_rects: Tensor, width: int, height: int, tile_size: int):
    """Regroup depth-ordered intersections by tile (stable: each tile keeps depth order)."""
    tiles_x = (width + tile_size - 1) // tile_size
    tiles_y = (height + tile_size - 1) // tile_size
    tile = torch.div(sub_rects[:, 2], tile_size, rounding_mode="floor") * tiles_x + torch.div(
        sub_rects[:, 0], tile_size, rounding_mode="floor")
    order = torch.sort(tile.to(torch.int32), stable=True).indices
    counts = torch.bincount(tile, minlength=tiles_x * tiles_y)
    ptr = torch.zeros(tiles_x * tiles_y + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    return gids.index_select(0, order), sub_rects.index_select(0, order), ptr, tiles_x


def trace_tiles(
    cols: tuple[Tensor, ...],
    featext: Tensor | None,
    gids: Tensor,
    sub_rects: Tensor,
    width: int,
    height: int,
    tile_size: int,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Compiled equivalent of :func:`~hravatar.render.torch_raster.trace_pairs` (CPU tensors).

    Args:
        cols: six [N] float32 tensors (mean_x, mean_y, conic a, b, c, opacity), detached.
        featext: [N, D] float32 features to composite, or None to collect the contributing pairs.
        gids: [I] int64 Gaussian of each (Gaussian, tile) intersection, in depth order.
        sub_rects: [I, 4] int64 (x0, x1, y0, y1) pixel rectangle of each, inside one tile.
        tile_size: the tile size the intersections were binned with.
    Returns:
        image: [H*W, D] composited features (None when featext is None);
        kept_gids, kept_pix: [K] int64 contributing pairs, each pixel's in depth order
        (grouped by tile, not by Gaussian; empty when featext is given).
    """
    import numba

    composite, count_candidates = _kernels()
    # one thread budget for both pools: torch.set_num_threads limits this pass too
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    g_t, r_t, ptr, tiles_x = _by_tile(gids.cpu(), sub_rects.cpu(), width, height, tile_size)
    mx, my, ca, cb, cc, op = (c.detach().cpu().to(torch.float32).contiguous().numpy() for c in cols)
    log_op = np.log(np.maximum(op, np.float32(1e-30))).astype(np.float32)
    g_np, r_np, ptr_np = g_t.numpy(), r_t.contiguous().numpy(), ptr.numpy()
    collect = featext is None
    if collect:
        # each tile writes its pairs into its own slice, sized by its candidate count
        kept_ptr = np.cumsum(count_candidates(r_np, ptr_np))
        cap = int(kept_ptr[-1])
        kept_g = np.empty(cap, dtype=np.int64)
        kept_p = np.empty(cap, dtype=np.int64)
        feat = np.zeros((1, 1), dtype=np.float32)
        out = np.zeros((1, 1), dtype=np.float32)
        starts = kept_ptr[:-1].copy()
        composite(mx, my, ca, cb, cc, log_op, feat, g_np, r_np, ptr_np, tiles_x, tile_size, width, height, out,
                  kept_g, kept_p, starts, True)
        take = np.concatenate([np.arange(a, b) for a, b in zip(kept_ptr[:-1], starts)]) if cap else np.zeros(0, np.int64)
        return None, torch.from_numpy(kept_g[take]), torch.from_numpy(kept_p[take])
    feat = featext.detach().cpu().to(torch.float32).contiguous().numpy()
    out = np.zeros((width * height, feat.shape[1]), dtype=np.float32)
    dummy = np.zeros(1, dtype=np.int64)
    composite(mx, my, ca, cb, cc, log_op, feat, g_np, r_np, ptr_np, tiles_x, tile_size, width, height, out,
              dummy, dummy, np.zeros(ptr_np.shape[0], dtype=np.int64), False)
    empty = torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(out).to(featext.device, featext.dtype), empty, empty
