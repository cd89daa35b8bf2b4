"""Tiny z-buffer mesh renderer for preview images of head models (numpy, CPU only).

Not a project renderer: it exists so that head-model generation can write shaded previews
without any graphics dependency.
"""
from __future__ import annotations

import math

import numpy as np


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """[V, 3] area-weighted unit vertex normals."""
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray,
    yaw_deg: float = 0.0,
    pitch_deg: float = 0.0,
    size: int = 384,
    target: np.ndarray | None = None,
    distance: float = 0.9,
    fov_deg: float = 20.0,
    background: float = 1.0,
) -> np.ndarray:
    """Shaded perspective rendering of a coloured mesh (two-sided Lambert + rim light).

    Args:
        vertices: [V, 3] model coordinates (+y up, +z towards the default camera).
        faces: [F, 3]; colors: [V, 3] albedo in [0, 1].
        yaw_deg, pitch_deg: camera orbit angles around ``target`` (0, 0 looks at the face).
    Returns:
        [size, size, 3] uint8 image.
    """
    v = np.asarray(vertices, float)
    if target is None:
        target = 0.5 * (v.min(0) + v.max(0))
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    eye = target + distance * np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    fwd = target - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    rel = v - eye
    xc, yc, zc = rel @ right, rel @ up, rel @ fwd
    foc = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    px = size / 2 + foc * xc / zc
    py = size / 2 - foc * yc / zc
    nrm = _vertex_normals(v, faces)
    light1 = np.array([0.4, 0.5, 0.75])
    light1 /= np.linalg.norm(light1)
    to_cam = -(rel / np.linalg.norm(rel, axis=1, keepdims=True))
    ndl = np.abs(nrm @ light1) * 0.75 + 0.25 * np.clip((nrm * to_cam).sum(1), 0, 1)
    shade = np.clip(0.22 + 0.85 * ndl, 0, 1.2)
    col = np.clip(colors * shade[:, None], 0, 1)
    img = np.full((size, size, 3), background)
    zbuf = np.full((size, size), np.inf)
    tri_z = zc[faces]
    order = np.argsort(tri_z.mean(1))
    for t in order:
        i0, i1, i2 = faces[t]
        x0, y0, x1, y1, x2, y2 = px[i0], py[i0], px[i1], py[i1], px[i2], py[i2]
        xmin, xmax = int(max(math.floor(min(x0, x1, x2)), 0)), int(min(math.ceil(max(x0, x1, x2)), size - 1))
        ymin, ymax = int(max(math.floor(min(y0, y1, y2)), 0)), int(min(math.ceil(max(y0, y1, y2)), size - 1))
        if xmin > xmax or ymin > ymax:
            continue
        den = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
        if abs(den) < 1e-12:
            continue
        gx, gy = np.meshgrid(np.arange(xmin, xmax + 1) + 0.5, np.arange(ymin, ymax + 1) + 0.5)
        w0 = ((y1 - y2) * (gx - x2) + (x2 - x1) * (gy - y2)) / den
        w1 = ((y2 - y0) * (gx - x2) + (x0 - x2) * (gy - y2)) / den
        w2 = 1 - w0 - w1
        m = (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6)
        if not m.any():
            continue
        z = w0 * zc[i0] + w1 * zc[i1] + w2 * zc[i2]
        sub = zbuf[ymin:ymax + 1, xmin:xmax + 1]
        m &= z < sub
        if not m.any():
            continue
        sub[m] = z[m]
        c = w0[..., None] * col[i0] + w1[..., None] * col[i1] + w2[..., None] * col[i2]
        img[ymin:ymax + 1, xmin:xmax + 1][m] = c[m]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def image_grid(images: list[np.ndarray], labels: list[str] | None = None, cols: int = 4) -> np.ndarray:
    """Tile equally sized [H, W, 3] uint8 images into a grid (labels drawn if matplotlib exists)."""
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    out = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    if labels:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(out.shape[1] / 100, out.shape[0] / 100), dpi=100)
            ax = fig.add_axes([0, 0, 1, 1])
            ax.imshow(out)
            ax.axis("off")
            for k, lab in enumerate(labels):
                r, c = divmod(k, cols)
                ax.text(c * w + 6, r * h + 16, lab, fontsize=10, color="black")
            fig.canvas.draw()
            out = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
            plt.close(fig)
        except ImportError:
            pass
    return out
