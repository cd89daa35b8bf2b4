"""Tests of the Gaussian rasterizer (hravatar.render.rasterize / torch_raster / reference)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hravatar.render import rasterize as rz
from hravatar.render.camera import Camera
from hravatar.render.numba_raster import numba_available
from hravatar.render.rasterize import rasterize_gaussians, select_backend
from hravatar.render.reference import make_test_scene, rasterize_reference
from hravatar.render.torch_raster import project_gaussians, rasterize_torch

REPO = Path(__file__).resolve().parents[1]
PARAMS = ("means", "quats", "scales", "opacities", "features")


def _camera(width=64, height=48, f=60.0, dtype=torch.float32) -> Camera:
    K = torch.tensor([[f, 0.0, width / 2 + 0.3], [0.0, f * 1.05, height / 2 - 0.7], [0.0, 0.0, 1.0]], dtype=dtype)
    return Camera(torch.eye(4, dtype=dtype), K, width, height)


def _random_quats(n, g):
    return torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64) * 3


def _scene(seed: int, n: int, width=64, height=48, channels=3, dtype=torch.float32) -> dict:
    """Mixed random scene in front of an identity camera.

    About half generic overlapping Gaussians, plus: off-screen ones (some far outside the
    field of view, exercising the Jacobian clamp), ones behind or straddling the camera,
    very anisotropic needles, exact depth ties, and a near-opaque stack on one spot that
    drives pixels to the termination rule.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    m = n // 2
    z = 1.0 + 2.0 * torch.rand(m, **f64)
    xy = (torch.rand(m, 2, **f64) - 0.5) * torch.tensor([1.2, 0.9], dtype=torch.float64) * z[:, None]
    means = [torch.cat([xy, z[:, None]], 1)]
    scales = [0.01 + 0.08 * torch.rand(m, 3, **f64)]
    opac = [0.05 + 0.95 * torch.rand(m, **f64)]
    k = max(n // 10, 2)
    # off-screen: beside the frustum, some far beyond the 1.3x clamp limit
    zo = 1.0 + torch.rand(k, **f64)
    side = torch.where(torch.rand(k, **f64) < 0.5, -1.0, 1.0)
    xo = side * (0.55 + 2.0 * torch.rand(k, **f64)) * zo
    means.append(torch.stack([xo, (torch.rand(k, **f64) - 0.5) * zo, zo], 1))
    scales.append(0.02 + 0.3 * torch.rand(k, 3, **f64))
    opac.append(0.3 + 0.7 * torch.rand(k, **f64))
    # behind the camera, and straddling the near plane
    zb = torch.linspace(-1.0, 0.02, k, dtype=torch.float64)
    means.append(torch.stack([0.1 * torch.randn(k, **f64), 0.1 * torch.randn(k, **f64), zb], 1))
    scales.append(0.05 + 0.05 * torch.rand(k, 3, **f64))
    opac.append(torch.full((k,), 0.9, dtype=torch.float64))
    # needles, 100:1
    zn = 1.5 + torch.rand(k, **f64)
    means.append(torch.cat([(torch.rand(k, 2, **f64) - 0.5) * 0.8 * zn[:, None], zn[:, None]], 1))
    sn = torch.full((k, 3), 0.002, dtype=torch.float64)
    sn[:, 0] = 0.2
    scales.append(sn)
    opac.append(0.5 + 0.5 * torch.rand(k, **f64))
    # depth ties
    means.append(torch.tensor([[0.05, 0.02, 1.7], [0.06, 0.01, 1.7], [0.04, 0.03, 1.7]], dtype=torch.float64))
    scales.append(torch.full((3, 3), 0.05, dtype=torch.float64))
    opac.append(torch.tensor([0.6, 0.7, 0.8], dtype=torch.float64))
    # near-opaque stack on one spot: transmittance falls below 1e-4 after a few layers
    r = n - sum(t.shape[0] for t in means)
    r = max(r, 8)
    zs = torch.linspace(1.2, 2.5, r, dtype=torch.float64)
    means.append(torch.stack([-0.15 + 0.01 * torch.randn(r, **f64), 0.1 + 0.01 * torch.randn(r, **f64), zs], 1))
    scales.append(0.06 + 0.02 * torch.rand(r, 3, **f64))
    opac.append(0.9 + 0.099 * torch.rand(r, **f64))
    means = torch.cat(means)
    N = means.shape[0]
    return dict(
        means=means.to(dtype),
        quats=_random_quats(N, g).to(dtype),
        scales=torch.cat(scales).to(dtype),
        opacities=torch.cat(opac).to(dtype),
        features=torch.rand(N, channels, **f64).to(dtype),
        camera=_camera(width, height, dtype=dtype),
    )


def _with_grad(scene: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(True) if k in PARAMS else v) for k, v in scene.items()}


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "seed,n,width,height,tile",
    [(0, 30, 64, 48, 16), (1, 80, 64, 48, 16), (2, 200, 64, 48, 16), (3, 120, 61, 47, 16), (4, 150, 64, 48, 8)],
)
def test_torch_matches_bruteforce_reference(seed, n, width, height, tile):
    scene = _scene(seed, n, width, height)
    with torch.no_grad():
        out = rasterize_torch(**scene, tile_size=tile)
        ref, done = rasterize_reference(**scene, tile_size=tile, with_done=True)
    assert out.features.shape == (height, width, 3)
    for key in ("features", "depth", "alpha"):
        err = (getattr(out, key) - getattr(ref, key)).abs().max().item()
        assert err < 1e-4, f"{key}: max error {err}"
    assert torch.equal(out.radii, ref.radii)
    vis = ref.radii > 0
    assert (out.means2d[vis] - ref.means2d[vis]).abs().max() < 1e-3
    assert torch.all(out.means2d[~vis] == 0)
    # the scene exercises what it claims: culling both ways, and the termination rule
    assert 0 < int(vis.sum()) < scene["means"].shape[0]
    assert bool(done.any())


def test_termination_is_exclusive():
    """Opaque Gaussians stacked on a pixel centre: the one that would bring T to <= 1e-4 is not drawn."""
    n = 5
    cam = Camera(torch.eye(4), torch.tensor([[40.0, 0, 7.5], [0, 40.0, 7.5], [0, 0, 1]]), 16, 16)
    means = torch.tensor([[0.0, 0.0, 1.0 + 0.1 * i] for i in range(n)])
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1)
    scales = torch.full((n, 3), 1e-5)
    opac = torch.full((n,), 0.995)
    feats = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    out = rasterize_torch(means, quats, scales, opac, feats, cam)
    ref = rasterize_reference(means, quats, scales, opac, feats, cam)
    # pixel (7, 7) is centred on every mean: alpha = 0.995; after one layer T = 0.005 and the
    # second would give 2.5e-5 <= 1e-4, so only the first Gaussian contributes
    for alpha, feat in ((out.alpha, out.features), (ref.alpha, ref.features)):
        assert alpha[7, 7, 0].item() == pytest.approx(0.995, abs=1e-6)
        assert feat[7, 7, 0].item() == pytest.approx(0.995, abs=1e-6)
    assert out.depth[7, 7, 0].item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- projection


def test_projection_isotropic_on_axis_analytic():
    f, s, z = 100.0, 0.02, 1.0
    cam = Camera(torch.eye(4), torch.tensor([[f, 0, 50.0], [0, f, 40.0], [0, 0, 1]]), 100, 80)
    proj = project_gaussians(
        torch.tensor([[0.0, 0.0, z]]), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), s), cam.viewmat, cam.K, 100, 80
    )
    v = (f * s / z) ** 2 + 0.3
    assert proj.means2d[0].tolist() == pytest.approx([50.0, 40.0])
    assert proj.cov2d[0].tolist() == pytest.approx([v, 0.0, v], rel=1e-5)
    assert proj.conics[0].tolist() == pytest.approx([1 / v, 0.0, 1 / v], rel=1e-5)
    # gsplat: lambda = b + sqrt(max(0.01, b^2 - det)) = v + 0.1 for an isotropic Gaussian
    assert int(proj.radii[0]) == math.ceil(3 * math.sqrt(v + 0.1))


def test_projection_anisotropic_and_offaxis_clamp():
    f = 100.0
    cam = Camera(torch.eye(4, dtype=torch.float64), torch.tensor([[f, 0, 50.0], [0, f, 40.0], [0, 0, 1]], dtype=torch.float64), 100, 80)
    sx, sy, sz = 0.03, 0.01, 0.02
    q = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
    sc = torch.tensor([[sx, sy, sz]], dtype=torch.float64)
    # on axis: the z scale does not enter, x / y map through f / z
    proj = project_gaussians(torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64), q, sc, cam.viewmat, cam.K, 100, 80)
    assert proj.cov2d[0].tolist() == pytest.approx([(f * sx / 2) ** 2 + 0.3, 0.0, (f * sy / 2) ** 2 + 0.3])
    # far off axis: the Jacobian uses x/z clamped to (W - cx)/fx + 0.3 * W/(2 fx) = 0.65
    x, z = 3.0, 1.0
    proj = project_gaussians(torch.tensor([[x, 0.0, z]], dtype=torch.float64), q, sc, cam.viewmat, cam.K, 100, 80)
    u = 0.65
    j00, j02 = f / z, -f * u / z
    expect_xx = j00**2 * sx**2 + j02**2 * sz**2 + 0.3
    assert proj.cov2d[0, 0].item() == pytest.approx(expect_xx)
    assert proj.means2d[0, 0].item() == 0.0 and int(proj.radii[0]) == 0  # culled: centre at x = 350


def test_single_gaussian_image_matches_closed_form():
    f, s, z, o = 50.0, 0.03, 1.0, 0.8
    cam = Camera(torch.eye(4), torch.tensor([[f, 0, 16.0], [0, f, 16.0], [0, 0, 1]]), 32, 32)
    out = rasterize_gaussians(
        torch.tensor([[0.0, 0.0, z]]), torch.tensor([[0.3, 0, 0, 0]]), torch.full((1, 3), s), torch.tensor([o]),
        torch.tensor([[2.0]]), cam, backend="torch",
    )
    v = (f * s / z) ** 2 + 0.3
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    a = o * torch.exp(-0.5 * ((xs - 16) ** 2 + (ys - 16) ** 2) / v)
    a = torch.where(a >= 1 / 255, a, torch.zeros_like(a))
    # radius ceil(3 sqrt(v + 0.1)) = 5 covers tiles 0..1 in each axis, i.e. the whole image
    assert torch.allclose(out.alpha[..., 0], a, atol=1e-6)
    assert torch.allclose(out.features[..., 0], 2 * a, atol=1e-6)
    assert torch.allclose(out.depth[..., 0], torch.where(a > 0, torch.ones_like(a), torch.zeros_like(a)), atol=1e-5)


def test_tile_coverage_rule():
    """Pixels outside the tiles of the 3-sigma square get nothing, even where alpha >= 1/255."""
    cam = Camera(torch.eye(4), torch.tensor([[10.0, 0, 16.0], [0, 10.0, 8.5], [0, 0, 1]]), 64, 16)
    # sigma_x = 10 * 0.5 = 5 px (+0.3 blur): radius ceil(3 sqrt(25.3)) = 16, mean at x = 16,
    # so the tile range is [0, 2): pixels x < 32
    args = (
        torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0.5, 0.001, 0.001]]),
        torch.tensor([1.0]), torch.ones(1, 1), cam,
    )
    out = rasterize_torch(*args, tile_size=16)
    ref = rasterize_reference(*args, tile_size=16)
    assert int(out.radii[0]) == 16
    row = out.alpha[8, :, 0]
    unclipped = math.exp(-0.5 * 16.5**2 / 25.3)  # pixel 32's alpha without the tile rule
    assert unclipped > 1 / 255
    assert row[31] > 1 / 255 and torch.all(row[32:] == 0)
    assert torch.allclose(out.alpha, ref.alpha, atol=1e-6)


# ----------------------------------------------------------------------------- gradients


def _loss_weights(scene, seed=7):
    g = torch.Generator().manual_seed(seed)
    cam = scene["camera"]
    H, W, C = cam.height, cam.width, scene["features"].shape[1]
    dt = scene["means"].dtype
    return (torch.randn(H, W, C, generator=g, dtype=dt), torch.randn(H, W, 1, generator=g, dtype=dt), torch.randn(H, W, 1, generator=g, dtype=dt))


def _loss(out, wts):
    return (out.features * wts[0]).sum() + (out.alpha * wts[1]).sum() + 0.1 * (out.depth * wts[2]).sum()


def _smooth_scene(seed: int, n: int, width=32, height=24) -> dict:
    """float64 scene away from the rasterizer's discontinuities (no depth ties, no Gaussian at
    the near plane): overlapping, anisotropic, plus an opaque stack that terminates pixels."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    z = 1.0 + 2.0 * torch.rand(n, **f64)
    xy = (torch.rand(n, 2, **f64) - 0.5) * torch.tensor([0.9, 0.7], dtype=torch.float64) * z[:, None]
    means = torch.cat([xy, z[:, None]], 1)
    scales = 0.02 + 0.1 * torch.rand(n, 3, **f64)
    scales[: n // 4, 0] *= 6.0  # elongated ones
    opac = 0.1 + 0.85 * torch.rand(n, **f64)
    k = 8
    means[-k:, :2] = torch.tensor([0.1, -0.05], dtype=torch.float64) + 0.01 * torch.randn(k, 2, **f64)
    scales[-k:] = 0.1 + 0.02 * torch.rand(k, 3, **f64)
    opac[-k:] = 0.985 + 0.01 * torch.rand(k, **f64)
    return dict(
        means=means, quats=_random_quats(n, g), scales=scales, opacities=opac,
        features=torch.rand(n, 2, **f64), camera=_camera(width, height, f=30.0, dtype=torch.float64),
    )


def test_gradients_match_finite_differences():
    scene = _smooth_scene(3, 16)
    with torch.no_grad():
        _, done = rasterize_reference(**scene, with_done=True)
    assert bool(done.any())  # termination is exercised
    wts = _loss_weights(scene)
    p = _with_grad(scene)
    _loss(rasterize_torch(**p), wts).backward()
    eps = 1e-6
    for name in PARAMS:
        base = scene[name]
        flat = base.reshape(-1)
        fd = torch.zeros_like(flat)
        for i in range(flat.numel()):
            vals = []
            for sgn in (1, -1):
                x = flat.clone()
                x[i] += sgn * eps
                s2 = dict(scene)
                s2[name] = x.view_as(base)
                with torch.no_grad():
                    vals.append(_loss(rasterize_torch(**s2), wts).item())
            fd[i] = (vals[0] - vals[1]) / (2 * eps)
        got = p[name].grad.reshape(-1)
        scale = fd.abs().max().item() + 1e-8
        assert fd.abs().max() > 1e-3, f"{name}: degenerate test (no gradient)"
        assert (got - fd).abs().max().item() < 1e-5 * scale + 1e-7, f"{name}: analytic {got} vs fd {fd}"


def test_gradients_match_reference_autograd():
    scene = _scene(5, 60, 48, 40, dtype=torch.float64)
    wts = _loss_weights(scene)
    p = _with_grad(scene)
    out = rasterize_torch(**p)
    out.means2d.retain_grad()
    _loss(out, wts).backward()
    q = _with_grad(scene)
    ref = rasterize_reference(**q)
    ref.means2d.retain_grad()
    _loss(ref, wts).backward()
    for name in PARAMS:
        assert torch.allclose(p[name].grad, q[name].grad, rtol=1e-6, atol=1e-8), name
    vis = out.radii > 0
    # screen-space gradient for densification, as gsplat's info["means2d"]
    assert out.means2d.grad.shape == (scene["means"].shape[0], 2)
    assert torch.allclose(out.means2d.grad[vis], ref.means2d.grad[vis], rtol=1e-6, atol=1e-8)
    assert torch.all(out.means2d.grad[~vis] == 0)


def test_grad_mode_forward_equals_no_grad_forward():
    scene = _scene(6, 150)
    with torch.no_grad():
        a = rasterize_torch(**scene)
    b = rasterize_torch(**_with_grad(scene))
    for key in ("features", "depth", "alpha"):
        assert (getattr(a, key) - getattr(b, key)).abs().max() < 1e-5


# ----------------------------------------------------------------------------- chunking


def test_chunked_equals_unchunked():
    scene = _scene(8, 200)
    with torch.no_grad():
        whole = rasterize_torch(**scene, max_pairs=1 << 24)
        tiny = rasterize_torch(**scene, max_pairs=64)  # dozens of depth batches, culling active
    for key in ("features", "depth", "alpha"):
        assert (getattr(whole, key) - getattr(tiny, key)).abs().max() < 1e-6, key
    wts = _loss_weights(scene)
    grads = []
    for mp in (1 << 24, 64):
        p = _with_grad(scene)
        _loss(rasterize_torch(**p, max_pairs=mp), wts).backward()
        grads.append([p[k].grad for k in PARAMS])
    for k, g1, g2 in zip(PARAMS, *grads):
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-5), k


def test_occlusion_culling_skips_hidden_work_without_changing_the_image(monkeypatch):
    from hravatar.render import torch_raster

    g = torch.Generator().manual_seed(12)
    # an opaque wall (6 layers of one big Gaussian) over the left part of the image, in front
    # of many small ones: rectangles on the wall's edge hold only a few unfinished pixels
    nw, nb = 8, 1200
    wall = torch.tensor([[-0.3, 0.0, 1.0 + 0.01 * i] for i in range(nw)])
    zb = 2 + torch.rand(nb, 1, generator=g)
    xb = (torch.rand(nb, 1, generator=g) * 1.0 - 0.8) * zb  # mostly behind the wall
    yb = (torch.rand(nb, 1, generator=g) - 0.5) * 0.8 * zb
    behind = torch.cat([xb, yb, zb], 1)
    scene = dict(
        means=torch.cat([wall, behind]),
        quats=_random_quats(nw + nb, g).float(),
        scales=torch.cat([torch.full((nw, 3), 0.5), 0.02 + 0.03 * torch.rand(nb, 3, generator=g)]),
        opacities=torch.cat([torch.full((nw,), 0.999), torch.rand(nb, generator=g)]),
        features=torch.rand(nw + nb, 3, generator=g),
        camera=_camera(),
    )
    counted = []
    orig = torch_raster.candidate_pairs

    def counting(*args, **kwargs):
        out = orig(*args, **kwargs)
        counted[-1] += out[0].numel()
        return out

    monkeypatch.setattr(torch_raster, "candidate_pairs", counting)
    outs = []
    for mp in (1 << 24, 256):
        counted.append(0)
        with torch.no_grad():
            outs.append(rasterize_torch(**scene, max_pairs=mp))
    assert counted[1] < 0.7 * counted[0]  # hidden Gaussians were skipped in small batches
    ref, done = rasterize_reference(**scene, with_done=True)
    for out in outs:
        for key in ("features", "depth", "alpha"):
            assert (getattr(out, key) - getattr(ref, key)).abs().max() < 1e-4, key
    assert 0.3 < done.float().mean().item() < 0.8  # the wall finishes part of the image


# ----------------------------------------------------------------------------- edge cases


def test_nothing_visible_gives_empty_images_and_zero_grads():
    scene = _scene(9, 40)
    scene["means"] = scene["means"].clone()
    scene["means"][:, 2] = -scene["means"][:, 2].abs() - 0.5  # all behind the camera
    p = _with_grad(scene)
    out = rasterize_gaussians(**p, backend="torch")
    assert torch.all(out.alpha == 0) and torch.all(out.features == 0) and torch.all(out.depth == 0)
    assert torch.all(out.radii == 0)
    _loss(out, _loss_weights(scene)).backward()
    assert all(p[k].grad is None or torch.all(p[k].grad == 0) for k in PARAMS)


def test_zero_gaussians():
    cam = _camera()
    args = (torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 2), cam)
    out = rasterize_gaussians(*args, backend="torch")
    assert out.features.shape == (48, 64, 2) and torch.all(out.alpha == 0)
    assert out.means2d.shape == (0, 2) and out.radii.shape == (0,)
    feats = torch.zeros(0, 2, requires_grad=True)
    out = rasterize_gaussians(*args[:4], feats, cam, backend="torch")
    out.features.sum().backward()
    assert feats.grad.shape == (0, 2)


def test_input_validation_messages():
    scene = _scene(0, 30)
    bad = dict(scene, quats=scene["quats"][:, :3])
    with pytest.raises(ValueError, match="quats"):
        rasterize_gaussians(**bad)
    with pytest.raises(ValueError, match="features"):
        rasterize_gaussians(**dict(scene, features=scene["features"][:5]))


def test_make_test_scene_is_head_like():
    scene = make_test_scene(4000, 96, 96, seed=1)
    with torch.no_grad():
        out = rasterize_gaussians(**scene, backend="torch")
    cover = (out.alpha > 0.5).float().mean().item()
    assert 0.4 < cover < 0.8
    r = out.radii[out.radii > 0].float()
    assert 1 <= r.median().item() <= 8
    d = out.depth[out.alpha > 0.5]
    assert 0.35 < d.min().item() and d.max().item() < 0.65


# ----------------------------------------------------------------------------- numba kernel

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed")


@needs_numba
@pytest.mark.parametrize(
    "seed,n,width,height,tile",
    [(0, 30, 64, 48, 16), (2, 200, 64, 48, 16), (3, 120, 61, 47, 16), (4, 150, 64, 48, 8), (8, 400, 40, 72, 16)],
)
def test_numba_pass_matches_bruteforce_reference_and_torch_pass(seed, n, width, height, tile):
    scene = _scene(seed, n, width, height)
    with torch.no_grad():
        fast = rasterize_torch(**scene, tile_size=tile, trace="numba")
        slow = rasterize_torch(**scene, tile_size=tile)
        ref = rasterize_reference(**scene, tile_size=tile)
    for key in ("features", "depth", "alpha"):
        assert (getattr(fast, key) - getattr(ref, key)).abs().max().item() < 1e-4, key
        assert (getattr(fast, key) - getattr(slow, key)).abs().max().item() < 1e-5, key


@needs_numba
@pytest.mark.parametrize("seed,n,width,height,tile", [(1, 300, 64, 48, 16), (6, 250, 61, 47, 8), (9, 40, 16, 16, 16)])
def test_numba_binning_matches_the_torch_binning(seed, n, width, height, tile):
    """bin_tiles (one compiled counting sort) gives exactly the per-tile, depth-ordered lists of
    tile_intersections regrouped by tile (the torch reference), ties in depth included."""
    from hravatar.render.numba_raster import bin_tiles, tiles_from_intersections
    from hravatar.render.torch_raster import gaussian_pixel_rects, tile_intersections

    scene = _scene(seed, n, width, height)
    cam = scene["camera"]
    proj = project_gaussians(scene["means"], scene["quats"], scene["scales"], cam.viewmat, cam.K, width, height)
    rects = gaussian_pixel_rects(proj, scene["opacities"], width, height, tile)
    want = tiles_from_intersections(*tile_intersections(rects, proj.depths, tile), width, height, tile)
    got = bin_tiles(rects, proj.depths, width, height, tile)
    assert got.gids.size > 0
    if width > tile:
        assert got.gids.size > len(set(got.gids.tolist()))  # some Gaussians span several tiles
    assert (got.ptr == want.ptr).all() and (got.gids == want.gids).all() and (got.rects == want.rects).all()
    # an empty scene bins to empty tiles
    none = bin_tiles(rects[:0], proj.depths[:0], width, height, tile)
    assert none.gids.size == 0 and (none.ptr == 0).all()


@needs_numba
def test_numba_pass_with_wide_tiles():
    """Tiles wider than 62 px (the compiled pass has no per-tile width limit)."""
    scene = _scene(3, 60, 70, 40)
    with torch.no_grad():
        a = rasterize_torch(**scene, tile_size=64, trace="numba")
        b = rasterize_torch(**scene, tile_size=64, trace="torch")
    assert (a.features - b.features).abs().max().item() < 1e-5 and a.alpha.max() > 0


@needs_numba
def test_numba_termination_and_empty_inputs():
    n = 5
    cam = Camera(torch.eye(4), torch.tensor([[40.0, 0, 7.5], [0, 40.0, 7.5], [0, 0, 1]]), 16, 16)
    means = torch.tensor([[0.0, 0.0, 1.0 + 0.1 * i] for i in range(n)])
    feats = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    args = (means, torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), torch.full((n, 3), 1e-5), torch.full((n,), 0.995), feats, cam)
    out = rasterize_torch(*args, trace="numba")
    # only the first layer: the second would bring T to 2.5e-5 <= 1e-4
    assert out.alpha[7, 7, 0].item() == pytest.approx(0.995, abs=1e-6)
    assert out.features[7, 7, 0].item() == pytest.approx(0.995, abs=1e-6)
    empty = (torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 2), _camera())
    assert torch.all(rasterize_torch(*empty, trace="numba").alpha == 0)
    feats0 = torch.zeros(0, 2, requires_grad=True)
    rasterize_torch(*empty[:4], feats0, _camera(), trace="numba").features.sum().backward()
    assert feats0.grad.shape == (0, 2)


@needs_numba
def test_numba_pass_gives_the_same_gradients():
    """The compiled backward (a forward-order walk using <out, grad_out> for the suffix sums)
    against the torch pass's analytic backward, itself checked against autograd of the reference."""
    scene = _scene(5, 200)
    wts = _loss_weights(scene)
    grads = []
    for trace in ("torch", "numba"):
        p = _with_grad(scene)
        out = rasterize_torch(**p, trace=trace)
        out.means2d.retain_grad()
        _loss(out, wts).backward()
        grads.append([p[k].grad for k in PARAMS] + [out.means2d.grad])
    for k, g1, g2 in zip((*PARAMS, "means2d"), *grads):
        # float32 sums in another order: compare against the gradient's scale
        assert (g1 - g2).abs().max() <= 2e-5 * g1.abs().max(), k
        assert g1.abs().max() > 0, k


@needs_numba
def test_numba_absgrad_is_the_sum_of_per_pixel_absolute_gradients():
    """AbsGS's statistic (gsplat's ``means2d.absgrad``) from the compiled backward, against a
    brute force: one backward of the torch pass per pixel, |d loss_p / d means2d| summed."""
    scene = _scene(5, 60, width=16, height=12)
    wts = _loss_weights(scene)
    p = _with_grad(scene)
    out = rasterize_torch(**p, trace="numba")
    out.means2d.retain_grad()
    _loss(out, wts).backward()
    absgrad, grad = out.means2d.absgrad, out.means2d.grad
    H, W = out.alpha.shape[:2]
    ref = torch.zeros_like(absgrad)
    for y in range(H):
        for x in range(W):
            one = torch.zeros(H, W, 1)
            one[y, x] = 1.0
            q = _with_grad(scene)
            o = rasterize_torch(**q, trace="torch")
            o.means2d.retain_grad()
            _loss(o, tuple(w * one for w in wts)).backward()
            ref += o.means2d.grad.abs()
    assert (absgrad - ref).abs().max() <= 2e-5 * ref.abs().max()
    assert (absgrad >= grad.abs() - 1e-6 * ref.abs().max()).all()  # |sum| <= sum |.|
    assert (absgrad > grad.abs() * 1.5).any()  # and the cancellation AbsGS is about happens here


def test_unknown_trace_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown trace kernel"):
        rasterize_torch(**_scene(0, 30), trace="simd")


# ----------------------------------------------------------------------------- backends


def test_select_backend(monkeypatch):
    from hravatar.render import numba_raster

    monkeypatch.setattr(numba_raster, "numba_available", lambda: False)
    assert select_backend("cpu") == "torch"
    with pytest.raises(RuntimeError, match="numba is not installed"):
        select_backend("cpu", "numba")
    monkeypatch.setattr(numba_raster, "numba_available", lambda: True)
    assert select_backend("cpu") == "numba" and select_backend("cpu", "numba") == "numba"
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        select_backend("cuda", "numba")
    monkeypatch.setattr(numba_raster, "numba_available", lambda: False)
    assert select_backend(torch.device("cpu"), "torch") == "torch"
    assert select_backend("cuda", "torch") == "torch"
    with pytest.raises(ValueError, match="unknown rasterizer backend"):
        select_backend("cpu", "vulkan")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        select_backend("cpu", "gsplat")
    monkeypatch.setattr(rz, "gsplat_available", lambda: False)
    assert select_backend("cuda") == "torch"
    with pytest.raises(RuntimeError, match="not installed"):
        select_backend("cuda", "gsplat")
    monkeypatch.setattr(rz, "gsplat_available", lambda: True)
    assert select_backend("cuda") == "gsplat"
    assert select_backend("cpu") == "torch"


def test_importing_hravatar_render_does_not_import_gsplat():
    code = (
        "import sys, hravatar.render.rasterize, hravatar.render.torch_raster, "
        "hravatar.render.reference, hravatar.render.gsplat_raster; "
        "print('gsplat' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def _fake_gsplat(per_axis_radii: bool):
    """A stand-in for the gsplat module with its 1.4 / 1.5 call signatures, in plain torch.

    Only for testing the wrapper's plumbing on CPU; the maths is brute force.
    """
    import types

    from hravatar.render.torch_raster import project_gaussians as proj_fn

    mod = types.ModuleType("gsplat")

    def fully_fused_projection(means, covars, quats, scales, viewmats, Ks, width, height, eps2d=0.3,
                               near_plane=0.01, far_plane=1e10, radius_clip=0.0, packed=False,
                               sparse_grad=False, calc_compensations=False, **kw):
        assert covars is None and not packed and viewmats.shape == (1, 4, 4) and Ks.shape == (1, 3, 3)
        pr = proj_fn(means, quats, scales, viewmats[0], Ks[0], width, height, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d)
        radii = pr.radii[None]
        if per_axis_radii:
            radii = torch.stack([radii, radii // 2], -1)
        return radii, pr.means2d[None], pr.depths[None], pr.conics[None], None

    def isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, **kw):
        order = torch.sort(depths[0], stable=True).indices
        return None, None, order

    def isect_offset_encode(isect_ids, n, tile_width, tile_height):
        assert n == 1
        return None

    def rasterize_to_pixels(means2d, conics, colors, opacities, W, H, tile_size, offsets, flatten_ids, **kw):
        assert means2d.shape[0] == 1 and colors.shape[:2] == means2d.shape[:2] and colors.shape[-1] <= 32
        ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        T = torch.ones(H, W)
        out = torch.zeros(H, W, colors.shape[-1])
        for g in flatten_ids.tolist():
            a, b, c = conics[0, g]
            dx, dy = means2d[0, g, 0] - xs, means2d[0, g, 1] - ys
            al = torch.clamp(opacities[0, g] * torch.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy)), max=0.999)
            al = torch.where(al >= 1 / 255, al, torch.zeros_like(al))
            out = out + (al * T)[..., None] * colors[0, g]
            T = T * (1 - al)
        return out[None], (1 - T)[None, ..., None]

    mod.fully_fused_projection = fully_fused_projection
    mod.isect_tiles = isect_tiles
    mod.isect_offset_encode = isect_offset_encode
    mod.rasterize_to_pixels = rasterize_to_pixels
    return mod


@pytest.mark.parametrize("per_axis_radii", [False, True])
def test_gsplat_wrapper_plumbing_with_fake_module(monkeypatch, per_axis_radii):
    from hravatar.render.gsplat_raster import rasterize_gsplat

    monkeypatch.setitem(sys.modules, "gsplat", _fake_gsplat(per_axis_radii))
    g = torch.Generator().manual_seed(4)
    n = 12
    scene = dict(
        means=torch.cat([(torch.rand(n, 2, generator=g) - 0.5) * 0.6, 1 + torch.rand(n, 1, generator=g)], 1),
        quats=_random_quats(n, g).float(),
        scales=0.03 + 0.05 * torch.rand(n, 3, generator=g),
        opacities=0.2 + 0.7 * torch.rand(n, generator=g),
        features=torch.rand(n, 40, generator=g),  # > 32 channels: chunked like gsplat.rasterization
        camera=_camera(32, 24, f=30.0),
    )
    p = _with_grad(scene)
    out = rasterize_gsplat(**p)
    with torch.no_grad():
        ref = rasterize_torch(**scene, tile_size=64)  # one tile: no tile clipping, like the fake
    assert out.features.shape == (24, 32, 40) and out.radii.shape == (n,) and out.radii.dtype == torch.int32
    for key in ("features", "depth", "alpha"):
        assert (getattr(out, key).detach() - getattr(ref, key)).abs().max() < 1e-4, key
    out.means2d.retain_grad()
    (out.features.sum() + out.alpha.sum()).backward()
    assert out.means2d.shape == (n, 2) and out.means2d.grad is not None and out.means2d.grad.abs().sum() > 0
    assert p["means"].grad is not None and p["features"].grad is not None


def _psnr(a, b):
    mse = torch.mean((a - b) ** 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-20))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_matches_torch_backend():
    if not rz.gsplat_available():
        pytest.skip("gsplat not installed")
    scene = make_test_scene(20000, 256, 256, seed=3, device="cuda")
    p = _with_grad(scene)
    g = rasterize_gaussians(**p, backend="gsplat")
    t = rasterize_gaussians(**scene, backend="torch")
    assert _psnr(g.features.detach().clamp(0, 1), t.features.clamp(0, 1)) > 40
    assert _psnr(g.alpha.detach(), t.alpha) > 40
    assert g.radii.shape == (20000,) and g.means2d.shape == (20000, 2)
    g.means2d.retain_grad()
    (g.features.sum() + g.alpha.sum()).backward()
    assert g.means2d.grad is not None and g.means2d.grad.abs().sum() > 0


@needs_numba
def test_numba_pass_from_several_threads_at_once():
    """The app renders on a worker thread while other threads may render too: launches take turns
    (numba's work-queue layer would abort the process on concurrent parallel launches)."""
    import threading

    scene = _scene(2, 200)
    with torch.no_grad():
        want = rasterize_torch(**scene, trace="numba").features
    got, errors = [], []

    def work():
        try:
            for _ in range(5):
                with torch.no_grad():
                    got.append(rasterize_torch(**scene, trace="numba").features)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 15
    assert all(torch.equal(g, want) for g in got)
