"""Face crops for the expression encoder, identical at training and test time.

Coordinates are continuous pixel coordinates in the image, x right and y down, with pixel
(row i, column j) covering [j, j+1) x [i, i+1) and its centre at (j + 0.5, i + 0.5) (the
convention of :class:`hravatar.render.camera.Camera`; MediaPipe's normalised landmarks times
the image size are in it). A box is (cx, cy, size): a square of side ``size`` centred at
(cx, cy). Cropping maps the box's edges onto the crop's edges, so output pixel (i, j) of an
``out`` x ``out`` crop samples the image at

    x = cx + ((j + 0.5) / out - 0.5) * size,   y = cy + ((i + 0.5) / out - 0.5) * size.

(SMIRK maps the box edges onto the centres of the first and last crop pixels instead: a
relative scale difference of 1/out, 0.45% at 224, and it truncates the box size to an integer.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def crop_box_from_landmarks(lmk2d: Tensor, scale: float = 1.4) -> Tensor:
    """Square crop boxes around 2D landmarks, as SMIRK.

    The box is centred on the landmarks' bounding box; its side is the mean of that bounding
    box's width and height times ``scale``.

    Args:
        lmk2d: [B, L, 2] landmark pixel coordinates (x, y).
        scale: enlargement of the landmark box (SMIRK: 1.4).
    Returns:
        [B, 4] boxes (cx, cy, size) in pixels.
    """
    lo = lmk2d.amin(dim=1)
    hi = lmk2d.amax(dim=1)
    centre = 0.5 * (lo + hi)
    size = 0.5 * ((hi - lo).sum(dim=-1)) * scale
    return torch.cat([centre, size[:, None]], dim=-1)


def box_from_mask(mask: Tensor, scale: float = 1.0, threshold: float = 0.5) -> Tensor:
    """Square crop boxes around the foreground of masks (fallback when no landmarks exist).

    The bounding box covers the whole foreground pixels (edges, not centres); the side is the
    mean of its width and height times ``scale``, as for landmarks. An empty mask gives the
    box of the whole image (centre of the image, side max(H, W)).

    Args:
        mask: [B, 1, H, W] foreground in [0, 1].
        scale: enlargement factor (a head mask is larger than the landmark box, hence 1.0).
        threshold: foreground level.
    Returns:
        [B, 4] boxes (cx, cy, size) in pixels.
    """
    B, _, H, W = mask.shape
    fg = mask[:, 0] > threshold  # [B,H,W]
    dev = mask.device
    cols, rows = fg.any(dim=1), fg.any(dim=2)  # [B,W], [B,H]
    xs = torch.arange(W, device=dev)
    ys = torch.arange(H, device=dev)
    left = torch.where(cols, xs, W).amin(dim=1)
    right = torch.where(cols, xs, -1).amax(dim=1) + 1
    top = torch.where(rows, ys, H).amin(dim=1)
    bottom = torch.where(rows, ys, -1).amax(dim=1) + 1
    dt = mask.dtype if mask.dtype.is_floating_point else torch.float32
    left, right, top, bottom = (t.to(dt) for t in (left, right, top, bottom))
    boxes = torch.stack([0.5 * (left + right), 0.5 * (top + bottom), 0.5 * ((right - left) + (bottom - top)) * scale], dim=-1)
    empty = ~cols.any(dim=1)
    full = torch.tensor([W / 2, H / 2, float(max(H, W))], device=dev, dtype=dt)
    return torch.where(empty[:, None], full.expand(B, 3), boxes)


def smooth_boxes(boxes: Tensor, window: int) -> Tensor:
    """Temporal moving average of per-frame boxes (stable crops through a video).

    A centred window of ``window`` frames; at the ends of the sequence the window is clipped
    and the mean taken over the frames it still covers. Frames whose box has a non-finite
    value (no detection) are ignored; a frame with no valid frame in its window takes the
    smoothed box of the nearest frame that has one.

    Args:
        boxes: [T, 4] (cx, cy, size) per frame.
        window: odd number of frames (1 returns the valid input unchanged).
    Returns:
        [T, 4] smoothed boxes.
    Raises:
        ValueError: even or non-positive window, or no valid box at all.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smooth_boxes: window must be a positive odd number of frames, got {window}")
    T = boxes.shape[0]
    valid = torch.isfinite(boxes).all(dim=-1)
    if not bool(valid.any()):
        raise ValueError("smooth_boxes: no frame has a valid box")
    vals = torch.where(valid[:, None], boxes, torch.zeros_like(boxes))
    w = valid.to(boxes.dtype)
    kernel = torch.ones(1, 1, window, dtype=boxes.dtype, device=boxes.device)
    # sum of valid boxes and count of valid frames in each window (zero padding = clipped window)
    sums = F.conv1d(vals.T[:, None], kernel, padding=window // 2)[:, 0].T  # [T,4]
    counts = F.conv1d(w[None, None], kernel, padding=window // 2)[0, 0]  # [T]
    has = counts > 0
    out = sums / counts.clamp(min=1)[:, None]
    if not bool(has.all()):
        t = torch.arange(T, device=boxes.device)
        src = t[has]
        nearest = src[(t[:, None] - src[None, :]).abs().argmin(dim=1)]
        out = out[nearest]
    return out


def crop_and_resize(images: Tensor, boxes: Tensor, out: int = 224) -> Tensor:
    """Resample square boxes of images to ``out`` x ``out`` crops (bilinear, differentiable).

    Uses ``F.grid_sample`` (bilinear, zero padding outside the image, align_corners=False);
    gradients flow to the images and to the boxes. Box edges map to crop edges (see the
    module docstring). No anti-aliasing: boxes much larger than ``2 * out`` pixels alias.

    Args:
        images: [B, C, H, W] images.
        boxes: [B, 4] (cx, cy, size) in pixels of ``images``.
        out: crop side in pixels.
    Returns:
        [B, C, out, out] crops.
    """
    B, _, H, W = images.shape
    dt = images.dtype
    t = (torch.arange(out, device=images.device, dtype=dt) + 0.5) / out - 0.5  # [out], box units
    boxes = boxes.to(dt)
    cx, cy, size = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3]
    x = cx + t[None] * size  # [B,out] image pixels
    y = cy + t[None] * size
    # align_corners=False: normalised -1/+1 are the outer edges of the image
    gx = 2.0 * x / W - 1.0
    gy = 2.0 * y / H - 1.0
    grid = torch.stack([gx[:, None, :].expand(B, out, out), gy[:, :, None].expand(B, out, out)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def points_to_crop(points: Tensor, boxes: Tensor, out: int = 224) -> Tensor:
    """Map image pixel coordinates into crop pixel coordinates (same convention).

    Args:
        points: [B, L, 2] (x, y) in image pixels.
        boxes: [B, 4] (cx, cy, size) used for the crop.
        out: crop side in pixels.
    Returns:
        [B, L, 2] (x, y) in crop pixels.
    """
    corner = boxes[:, None, :2] - 0.5 * boxes[:, None, 2:3]
    return (points - corner) * (out / boxes[:, None, 2:3])
