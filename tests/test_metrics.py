"""Image metrics against analytic values and independent slow references."""
from __future__ import annotations

import math
import sys
import urllib.request

import numpy as np
import pytest
import torch

from hravatar.eval import (
    error_strip,
    gaussian_window,
    heatmap,
    lpips_or_none,
    lpips_weights_available,
    mae100,
    normal_cosine,
    psnr,
    scale_invariant_mse,
    ssim,
    ssim_map,
)


def _rand(h, w, c=3, seed=0, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(h, w, c, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- PSNR / MAE
def test_psnr_of_known_mse():
    gt = _rand(20, 30, hi=0.9)
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01
    assert psnr(gt + 0.01, gt) == pytest.approx(40.0, abs=1e-9)
    assert psnr(gt, gt) == math.inf
    # float32 inputs give the same figure (computed in float64 internally)
    assert psnr((gt + 0.1).float(), gt.float()) == pytest.approx(20.0, abs=1e-4)


def test_masked_psnr_averages_over_mask_pixels():
    gt = _rand(10, 10, hi=0.9)
    pred = gt.clone()
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:6, 3:8] = True  # 20 of 100 pixels
    pred[mask] += 0.1
    assert psnr(pred, gt, mask) == pytest.approx(20.0, abs=1e-9)
    assert psnr(pred, gt, mask[..., None].double()) == pytest.approx(20.0, abs=1e-9)
    # unmasked: MSE 0.01 * 20/100 -> 20 dB + 10 log10(5)
    assert psnr(pred, gt) == pytest.approx(20.0 + 10 * math.log10(5.0), abs=1e-9)
    assert psnr(pred, gt, ~mask) == math.inf
    with pytest.raises(ValueError, match="empty"):
        psnr(pred, gt, torch.zeros(10, 10))


def test_mae100_known_values():
    gt = _rand(8, 9, hi=0.9)
    assert mae100(gt + 0.03, gt) == pytest.approx(3.0, abs=1e-9)
    pred = gt.clone()
    pred[:4] += 0.05  # half the rows
    assert mae100(pred, gt) == pytest.approx(2.5, abs=1e-9)
    assert mae100(np.asarray(pred), np.asarray(gt)) == pytest.approx(2.5, abs=1e-9)  # numpy inputs too


# --------------------------------------------------------------------------- SSIM
def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM with explicit loops: 11x11 Gaussian (sigma 1.5), valid windows only."""
    r = 5
    w = np.zeros((11, 11))
    for i in range(11):
        for j in range(11):
            w[i, j] = math.exp(-((i - r) ** 2 + (j - r) ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    H, W, C = x.shape
    vals = []
    for c in range(C):
        for i in range(r, H - r):
            for j in range(r, W - r):
                px = x[i - r : i + r + 1, j - r : j + r + 1, c]
                py = y[i - r : i + r + 1, j - r : j + r + 1, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_identity_is_one():
    x = _rand(16, 16)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_slow_reference():
    x = _rand(16, 16, seed=1)
    y = (x + 0.15 * _rand(16, 16, seed=2) - 0.05).clamp(0, 1)
    # a low-contrast pair too: there local variances are comparable to C2, so the constants matter
    x2, y2 = 0.45 + 0.1 * x, 0.45 + 0.1 * _rand(16, 16, seed=20)
    for a, b in ((x, y), (x2, y2)):
        ref = _ssim_reference(a.numpy(), b.numpy())
        assert ref < 0.99  # the pair is not trivially similar
        assert ssim(a, b) == pytest.approx(ref, abs=1e-5)
        assert ssim(a.float(), b.float()) == pytest.approx(ref, abs=1e-5)


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    x = _rand(23, 19, seed=3)
    y = (0.7 * x + 0.3 * _rand(23, 19, seed=4)).clamp(0, 1)
    ref = skm.structural_similarity(
        x.numpy(), y.numpy(), channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(x, y) == pytest.approx(ref, abs=1e-6)


def test_ssim_decreases_with_noise():
    x = _rand(32, 32, seed=5)
    noise = torch.randn(32, 32, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    scores = [ssim((x + s * noise).clamp(0, 1), x) for s in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_ssim_same_padding_interior_equals_valid():
    x, y = _rand(20, 24, seed=7), _rand(20, 24, seed=8)
    valid, same = ssim_map(x, y, padding="valid"), ssim_map(x, y, padding="same")
    assert valid.shape == (10, 14, 3) and same.shape == (20, 24, 3)
    assert torch.allclose(same[5:-5, 5:-5], valid, atol=1e-12)
    g = gaussian_window(11, 1.5, dtype=torch.float64)
    assert float(g.sum()) == pytest.approx(1.0) and torch.equal(g, g.flip(0)) and int(g.argmax()) == 5


def test_ssim_same_padding_border_matches_a_zero_padded_loop():
    # the border pixels of "same", where the window hangs over zeros, against a direct double
    # loop over the 11x11 window (the implementation filters rows and columns separately)
    x, y = _rand(13, 15, seed=11).numpy(), _rand(13, 15, seed=12).numpy()
    g = gaussian_window(11, 1.5, dtype=torch.float64).numpy()
    w = np.outer(g, g)
    H, W, _ = x.shape
    px, py = np.pad(x, ((5, 5), (5, 5), (0, 0))), np.pad(y, ((5, 5), (5, 5), (0, 0)))
    ref = np.zeros_like(x)
    for i in range(H):
        for j in range(W):
            a, b = px[i : i + 11, j : j + 11], py[i : i + 11, j : j + 11]
            mx, my = (w[..., None] * a).sum((0, 1)), (w[..., None] * b).sum((0, 1))
            vx = (w[..., None] * a * a).sum((0, 1)) - mx * mx
            vy = (w[..., None] * b * b).sum((0, 1)) - my * my
            cxy = (w[..., None] * a * b).sum((0, 1)) - mx * my
            c1, c2 = 0.01**2, 0.03**2
            ref[i, j] = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    got = ssim_map(torch.from_numpy(x), torch.from_numpy(y), padding="same").numpy()
    assert np.allclose(got, ref, atol=1e-10)


def test_ssim_map_is_differentiable():
    x = _rand(16, 16, seed=9).requires_grad_(True)
    y = _rand(16, 16, seed=10)
    (1 - ssim_map(x, y).mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- albedo / normals
def test_scale_invariant_mse_ignores_scale():
    gt = _rand(12, 12, seed=11, lo=0.1, hi=0.9)
    pred = (gt + 0.05 * _rand(12, 12, seed=12)).clamp(0, 1)
    mask = torch.zeros(12, 12)
    mask[2:10, 1:11] = 1
    base = scale_invariant_mse(pred, gt, mask)
    assert base > 0
    for s in (0.37, 2.5):
        assert scale_invariant_mse(pred * s, gt, mask) == pytest.approx(base, rel=1e-9)
    per_channel = torch.tensor([0.5, 1.0, 1.7], dtype=torch.float64)
    assert scale_invariant_mse(pred * per_channel, gt, mask) == pytest.approx(base, rel=1e-9)
    assert scale_invariant_mse(gt * 0.6, gt) == pytest.approx(0.0, abs=1e-15)  # a pure rescale is perfect
    # the optimal scale can only lower the error below the plain MSE
    assert base <= float(((pred - gt) ** 2)[mask.bool()].mean()) + 1e-15


def test_normal_cosine_known_values():
    g = torch.Generator().manual_seed(13)
    n = torch.nn.functional.normalize(torch.randn(9, 7, 3, generator=g, dtype=torch.float64), dim=-1)
    assert normal_cosine(n, n) == pytest.approx(1.0, abs=1e-12)
    assert normal_cosine(n, -n) == pytest.approx(-1.0, abs=1e-12)
    assert normal_cosine(3.0 * n, n) == pytest.approx(1.0, abs=1e-12)  # lengths do not matter
    ex = torch.tensor([1.0, 0.0, 0.0]).expand(4, 4, 3)
    ey = torch.tensor([0.0, 1.0, 0.0]).expand(4, 4, 3)
    assert normal_cosine(ex, ey) == pytest.approx(0.0, abs=1e-12)
    mask = torch.zeros(4, 4)
    mask[:2] = 1
    half = torch.cat([ey[:2], ex[2:]], 0)  # perpendicular on the masked half only
    assert normal_cosine(half, ex, mask) == pytest.approx(0.0, abs=1e-12)
    assert normal_cosine(half, ex) == pytest.approx(0.5, abs=1e-12)


# --------------------------------------------------------------------------- LPIPS
def _no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("LPIPS must never download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_lpips_is_none_without_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    _no_network(monkeypatch)
    x = _rand(16, 16)
    assert not lpips_weights_available("alex")
    assert lpips_or_none(x, x * 0.5) is None


def _fake_lpips_package(tmp_path, monkeypatch):
    """An ``lpips`` stand-in on sys.path whose network is 'mean |a - b|' and counts its builds."""
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "BUILT = []\n"
        "class LPIPS(torch.nn.Module):\n"
        "    def __init__(self, net='alex', verbose=True):\n"
        "        super().__init__()\n"
        "        BUILT.append(net)\n"
        "        self.w = torch.nn.Parameter(torch.ones(1))\n"
        "    def forward(self, a, b):\n"
        "        return (a - b).abs().mean() * self.w\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)


def test_lpips_checks_backbone_cache_before_building(tmp_path, monkeypatch):
    _fake_lpips_package(tmp_path, monkeypatch)
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    _no_network(monkeypatch)
    x, y = _rand(16, 16, seed=1), _rand(16, 16, seed=2)
    try:
        # package present, backbone not in the hub cache: None, and the network is never built
        assert lpips_or_none(x, y) is None
        assert "lpips" not in sys.modules
        ckpt = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
        assert lpips_weights_available("alex") and not lpips_weights_available("vgg")
        # inputs are mapped from [0, 1] to [-1, 1] as LPIPS expects
        assert lpips_or_none(x, y) == pytest.approx(2 * float((x - y).abs().mean()), rel=1e-6)
        assert sys.modules["lpips"].BUILT == ["alex"]
    finally:
        sys.modules.pop("lpips", None)


# --------------------------------------------------------------------------- error strip
def test_error_strip_layout_and_heat(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    gt = _rand(12, 10, seed=14, hi=0.8)
    pred = gt.clone()
    pred[3, 4] += 0.2  # one wrong pixel
    out = tmp_path / "strip.png"
    strip = error_strip(gt, pred, out)
    disk = iio.imread(out)
    np.testing.assert_array_equal(disk, strip)
    assert strip.shape == (12, 30, 3) and strip.dtype == np.uint8
    np.testing.assert_array_equal(strip[:, :10], np.floor(gt.numpy() * 255 + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(strip[:, 10:20], np.floor(pred.numpy() * 255 + 0.5).astype(np.uint8))
    heat = strip[:, 20:].reshape(-1, 3)
    wrong = np.ravel_multi_index((3, 4), (12, 10))
    rest = np.delete(heat, wrong, 0)
    assert len(np.unique(rest, axis=0)) == 1  # zero error is one colour
    assert heat[wrong].astype(int).sum() > rest[0].astype(int).sum()  # the wrong pixel is brighter
    assert [p.name for p in tmp_path.iterdir()] == ["strip.png"]  # no temp file left behind


def test_heatmap_brightness_increases():
    v = np.linspace(0, 1, 50)[None]
    rgb = heatmap(v).astype(np.float64)
    lum = rgb[0] @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(lum) > 0)
    assert np.array_equal(heatmap(np.array([[-1.0, 2.0]])), heatmap(np.array([[0.0, 1.0]])))  # clipped
