"""Image-quality metrics for avatar evaluation (PSNR, SSIM, MAE*100, LPIPS, albedo and normal errors).

Every metric takes images as [H, W, C] arrays (torch tensors on any device, or numpy) with
values in [0, 1], and returns a Python float. Metrics are computed in float64 (float32 on
devices without float64) so that the reported figures do not depend on the input dtype.
Masks are [H, W] or [H, W, 1], bool or float weights in [0, 1].
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: torch-hub checkpoint file of the backbone each LPIPS variant loads through torchvision.
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def _wide_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _image(x, name: str = "image") -> Tensor:
    """[H, W, C] float64 tensor from a tensor/array ([H, W] gets C = 1)."""
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() == 2:
        t = t[..., None]
    if t.dim() != 3:
        raise ValueError(f"{name}: expected [H, W, C] or [H, W], found shape {list(t.shape)}")
    return t.to(_wide_dtype(t.device))


def _pair(pred, gt) -> tuple[Tensor, Tensor]:
    p, g = _image(pred, "pred"), _image(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {list(p.shape)} vs {list(g.shape)}")
    return p, g.to(p.device)


def _weights(mask, like: Tensor) -> Tensor:
    """[H, W, 1] non-negative weights (all ones when ``mask`` is None)."""
    if mask is None:
        return torch.ones(*like.shape[:2], 1, dtype=like.dtype, device=like.device)
    m = _image(mask, "mask").to(like.device, like.dtype)
    if m.shape[:2] != like.shape[:2] or m.shape[2] != 1:
        raise ValueError(f"mask: expected [H, W] or [H, W, 1] with H, W = {list(like.shape[:2])}, found {list(m.shape)}")
    if float(m.sum()) <= 0:
        raise ValueError("mask is empty (no foreground pixel)")
    return m.clamp(min=0)


def _masked_mean(values: Tensor, w: Tensor) -> Tensor:
    """Weighted mean of [H, W, C] ``values`` over pixels (weights [H, W, 1]) and channels."""
    return (values * w).sum() / (w.sum() * values.shape[-1])


def mse(pred, gt, mask=None) -> float:
    """Mean squared error over (masked) pixels and channels.

    Args:
        pred, gt: [H, W, C]. mask: optional [H, W] / [H, W, 1] weights.
    """
    p, g = _pair(pred, gt)
    return float(_masked_mean((p - g) ** 2, _weights(mask, p)))


def psnr(pred, gt, mask=None) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]: -10 log10(MSE).

    With a mask, the MSE is averaged over the mask's pixels only (weighted by soft masks),
    so the score does not improve with the amount of easy black background.

    Args:
        pred, gt: [H, W, 3] in [0, 1]. mask: optional [H, W] / [H, W, 1].
    Returns:
        PSNR in dB (inf for identical images).
    """
    e = mse(pred, gt, mask)
    return math.inf if e == 0 else -10.0 * math.log10(e)


def mae100(pred, gt, mask=None) -> float:
    """Mean absolute error times 100 (the method's "MAE*"), over (masked) pixels and channels.

    Args:
        pred, gt: [H, W, C] in [0, 1]. mask: optional [H, W] / [H, W, 1].
    """
    p, g = _pair(pred, gt)
    return 100.0 * float(_masked_mean((p - g).abs(), _weights(mask, p)))


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> Tensor:
    """[size] normalised 1D Gaussian (taps at integer offsets from the centre)."""
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim_map(pred: Tensor, gt: Tensor, size: int = 11, sigma: float = 1.5, padding: str = "valid") -> Tensor:
    """Per-pixel SSIM (Wang et al. 2004) of each channel; differentiable, in the inputs' dtype.

    Local statistics use a ``size`` x ``size`` Gaussian window (sigma ``sigma``), population
    (not sample) variances, C1 = 0.01^2 and C2 = 0.03^2 for data range 1.

    Args:
        pred, gt: [H, W, C] tensors in [0, 1].
        padding: "valid" evaluates only where the window lies inside the image (the standard
            evaluation choice, equal to scikit-image's cropped ``structural_similarity`` with
            ``gaussian_weights=True, use_sample_covariance=False``); "same" zero-pads by
            size // 2 (what 3DGS-style training losses do; it lowers SSIM near the border).
    Returns:
        [H', W', C] with H' = H - size + 1, W' = W - size + 1 for "valid"; [H, W, C] for "same".
    """
    C = pred.shape[-1]
    g = gaussian_window(size, sigma, device=pred.device, dtype=pred.dtype)
    pad = size // 2 if padding == "same" else 0
    if padding not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got '{padding}'")
    x, y = pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]
    if padding == "valid" and min(x.shape[-2:]) < size:
        raise ValueError(f"image {list(x.shape[-2:])} is smaller than the {size}x{size} SSIM window")
    # the five local moments in one pass: the 2D Gaussian is separable, so a column pass then a
    # row pass (2 x size taps instead of size^2; zero padding commutes with the split)
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)  # [1, 5C, H, W]
    K = maps.shape[1]
    maps = F.conv2d(maps, g.view(1, 1, size, 1).expand(K, 1, size, 1), padding=(pad, 0), groups=K)
    maps = F.conv2d(maps, g.view(1, 1, 1, size).expand(K, 1, 1, size), padding=(0, pad), groups=K)
    mx, my, exx, eyy, exy = maps.split(C, 1)
    vx = exx - mx * mx
    vy = eyy - my * my
    cxy = exy - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s[0].permute(1, 2, 0)


def ssim(pred, gt) -> float:
    """Mean SSIM over channels and the valid (unpadded) region; see :func:`ssim_map`.

    Args:
        pred, gt: [H, W, C] in [0, 1], H and W >= 11.
    """
    p, g = _pair(pred, gt)
    return float(ssim_map(p, g, padding="valid").mean())


# --------------------------------------------------------------------------- LPIPS
def lpips_weights_available(net: str = "alex") -> bool:
    """Whether the ``lpips`` package and both of its weight files are present locally.

    LPIPS needs the package's own linear-layer weights (``lpips/weights/v0.1/<net>.pth``, shipped
    in its wheel) and an ImageNet backbone that torchvision downloads on first use into the torch
    hub cache (``$TORCH_HOME/hub/checkpoints``, see ``torch.hub.get_dir``). Nothing is imported or
    downloaded here.
    """
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS network '{net}' (expected {', '.join(LPIPS_BACKBONE_FILES)})")
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    linear = Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth"
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    return linear.is_file() and backbone.is_file()


def load_lpips(net: str = "alex", device=None) -> torch.nn.Module | None:
    """The LPIPS network (eval mode, frozen) or None when it cannot be built offline.

    Load it once and pass it to :func:`lpips_or_none` when scoring many frames.
    """
    if not lpips_weights_available(net):
        return None
    try:
        import lpips  # noqa: PLC0415 - optional dependency (pulls torchvision)
    except ImportError:
        return None
    model = lpips.LPIPS(net=net, verbose=False).eval().to(device)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def lpips_or_none(pred, gt, net: str = "alex", model: torch.nn.Module | None = None) -> float | None:
    """LPIPS distance, or None when the metric is unavailable offline.

    LPIPS is a learned metric: its weights are not part of hravatar and are never downloaded
    at run time, so on a machine without the ``lpips`` package and its cached backbone (as in
    the project's CI) this returns None and reports leave the column empty.

    Args:
        pred, gt: [H, W, 3] in [0, 1].
        model: a network from :func:`load_lpips` (built here when None).
    """
    p, g = _pair(pred, gt)
    if model is None:
        model = load_lpips(net, device=p.device)
        if model is None:
            return None
    dev = next(iter(model.parameters()), p).device
    x = p.permute(2, 0, 1)[None].to(dev, torch.float32) * 2 - 1  # LPIPS expects [-1, 1]
    y = g.permute(2, 0, 1)[None].to(dev, torch.float32) * 2 - 1
    with torch.no_grad():
        return float(model(x, y).mean())


# --------------------------------------------------------------------------- albedo / normals
def scale_invariant_mse(pred, gt, mask=None) -> float:
    """Scale-invariant MSE of an albedo map (the global "si-MSE" of intrinsic-image papers).

    Albedo is only recoverable up to a scale (light intensity and albedo trade off), so each
    channel c of ``pred`` is first scaled by the least-squares factor
    alpha_c = <p_c, g_c> / <p_c, p_c> (sums over mask pixels), then the MSE is taken over
    mask pixels and channels. This is the whole-image variant, as in Grosse et al. 2009; it is
    not the windowed LMSE (local si-MSE over 20x20 patches) of the same paper.

    Args:
        pred, gt: [H, W, 3] albedo in [0, 1]. mask: optional [H, W] / [H, W, 1].
    """
    p, g = _pair(pred, gt)
    w = _weights(mask, p)
    num = (w * p * g).sum((0, 1))
    den = (w * p * p).sum((0, 1))
    alpha = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return float(_masked_mean((alpha * p - g) ** 2, w))


def normal_cosine(pred_n, gt_n, mask=None) -> float:
    """Mean cosine similarity between two normal maps (1 = identical directions, -1 = opposite).

    Args:
        pred_n, gt_n: [H, W, 3] normal vectors (any length; normalised here; decode PNG-stored
            normals with n = 2 c - 1 first). Zero vectors count as cosine 0, so pass a mask.
        mask: optional [H, W] / [H, W, 1] weights.
    """
    p, g = _pair(pred_n, gt_n)
    cos = (F.normalize(p, dim=-1) * F.normalize(g, dim=-1)).sum(-1, keepdim=True)
    return float(_masked_mean(cos, _weights(mask, p)))


# --------------------------------------------------------------------------- visual error report
#: Control points of the error colormap (black -> purple -> red -> orange -> pale yellow).
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_RGB = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def heatmap(values: np.ndarray) -> np.ndarray:
    """Colour-map values in [0, 1] (clipped) with a perceptually ordered dark-to-bright ramp.

    Args:
        values: [H, W].
    Returns:
        [H, W, 3] uint8.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)], -1)
    return (rgb + 0.5).astype(np.uint8)


def error_strip(gt, pred, out_path: str | Path | None = None, gain: float = 4.0) -> np.ndarray:
    """Side-by-side GT | render | error heat map (mean absolute error over channels x ``gain``).

    Args:
        gt, pred: [H, W, 3] in [0, 1].
        out_path: PNG written atomically when given.
    Returns:
        [H, 3 W, 3] uint8 strip.
    """
    from hravatar.data.format import to_uint8, write_png

    p, g = _pair(pred, gt)
    if p.shape[-1] == 1:  # grey maps (e.g. roughness) are shown as grey RGB
        p, g = p.expand(-1, -1, 3), g.expand(-1, -1, 3)
    err = ((p - g).abs().mean(-1) * gain).cpu().numpy()
    strip = np.concatenate([to_uint8(g.clamp(0, 1).cpu().numpy()), to_uint8(p.clamp(0, 1).cpu().numpy()), heatmap(err)], 1)
    if out_path is not None:
        write_png(out_path, strip)
    return strip
