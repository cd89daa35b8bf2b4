"""Densification strategy (hravatar.train.strategy) against hand-derived rule outcomes,
manual statistics, analytic split distributions and optimizer bookkeeping."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from scipy.stats import chi2
from torch import nn

from hravatar.avatar.gaussians import PARAM_KEYS
from hravatar.train.strategy import (
    SPLIT_SCALE_DIVISOR,
    DensifyConfig,
    DensifyStrategy,
    screen_space_stats,
    duplicate_gaussians,
    remove_gaussians,
    split_gaussians,
)

W, H = 64, 48
S, E = 3, 4
TRAILING = {
    "means": (3,), "quats": (4,), "scales": (3,), "opacities": (), "albedo": (3,), "roughness": (1,),
    "f0": (1,), "shapedirs": (3, S), "exprdirs": (3, E), "posedirs": (3, 36), "lbs_weights": (5,),
    "eyelid_dirs": (2, 3),
}
HIGH = 1e-4  # pixel gradient: normalised |g| = 1e-4 * 32 = 3.2e-3  > 3e-4
LOW = 1e-6  # 3.2e-5 < 3e-4


def _logit(p):
    return math.log(p / (1 - p))


def make_params(n: int, seed: int = 0, device="cpu") -> nn.ParameterDict:
    """Every avatar key with random values; roughness[:, 0] = row index tags each Gaussian."""
    assert set(TRAILING) == set(PARAM_KEYS)
    g = torch.Generator().manual_seed(seed)
    p = {k: torch.randn(n, *s, generator=g) for k, s in TRAILING.items()}
    p["scales"] = torch.full((n, 3), math.log(0.005))
    p["opacities"] = torch.full((n,), _logit(0.5))
    p["roughness"][:, 0] = torch.arange(n, dtype=torch.float32)
    return nn.ParameterDict({k: nn.Parameter(v.to(device)) for k, v in p.items()})


def make_adams(params) -> dict:
    return {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}


def tags(params) -> list[int]:
    return params["roughness"][:, 0].round().long().tolist()


def fake_info(grad: torch.Tensor, radii: torch.Tensor, n_cameras: int = 1) -> dict:
    """gsplat-style info with a means2d leaf whose .grad is set by hand."""
    m2d = torch.zeros_like(grad, requires_grad=True)
    m2d.grad = grad.clone()
    return {"means2d": m2d, "radii": radii, "width": W, "height": H, "n_cameras": n_cameras}


def grad_rows(levels, device="cpu") -> torch.Tensor:
    """[N, 2] pixel gradients, x component = the given level."""
    g = torch.zeros(len(levels), 2, device=device)
    g[:, 0] = torch.tensor(levels, device=device)
    return g


def one_refine(strategy, params, opts, step, levels, radii=None, scene_scale=1.0):
    state = strategy.initialize_state(scene_scale)
    n = params["means"].shape[0]
    dev = params["means"].device
    r = torch.full((n,), 3, dtype=torch.int32, device=dev) if radii is None else radii
    info = fake_info(grad_rows(levels, dev), r)
    out = strategy.step_post_backward(params, opts, state, step, info)
    return out, state


# ------------------------------------------------------------------------------ statistics
def _manual_norm(g, c=1):
    return np.hypot(g[..., 0] * W / 2 * c, g[..., 1] * H / 2 * c)


def test_accumulation_matches_manual_computation():
    n = 7
    params = make_params(n)
    strat = DensifyStrategy(DensifyConfig(), total_iters=10_000)
    state = strat.initialize_state(2.0)
    rng = np.random.default_rng(0)
    exp_grad, exp_count, exp_radii = np.zeros(n), np.zeros(n), np.zeros(n)
    for step in (10, 11, 12):  # not refine steps
        g = rng.normal(size=(n, 2)).astype(np.float32) * 1e-3
        r = rng.integers(0, 20, size=n).astype(np.int32)
        r[step % n] = 0
        strat.step_post_backward(params, make_adams(params), state, step, fake_info(torch.from_numpy(g), torch.from_numpy(r)))
        vis = r > 0
        exp_grad += np.where(vis, _manual_norm(g), 0.0)
        exp_count += vis
        exp_radii = np.maximum(exp_radii, np.where(vis, r / max(W, H), 0.0))
    np.testing.assert_allclose(state["grad2d"].numpy(), exp_grad, rtol=1e-5)
    np.testing.assert_array_equal(state["count"].numpy(), exp_count)
    np.testing.assert_allclose(state["radii"].numpy(), exp_radii, rtol=1e-6)
    assert state["scene_scale"] == 2.0


def test_accumulation_multi_camera_packed_and_per_axis_radii():
    rng = np.random.default_rng(1)
    n, c = 5, 3
    g = rng.normal(size=(c, n, 2)).astype(np.float32)
    r = rng.integers(0, 4, size=(c, n)).astype(np.int32)
    ids, norms, radii = screen_space_stats(fake_info(torch.from_numpy(g), torch.from_numpy(r), n_cameras=c))
    acc = np.zeros(n)
    np.add.at(acc, ids.numpy(), norms.numpy())
    np.testing.assert_allclose(acc, (_manual_norm(g, c) * (r > 0)).sum(0), rtol=1e-5)
    # packed: entries listed with their Gaussian ids (repeats allowed)
    gid = torch.tensor([4, 0, 4, 2])
    gp = rng.normal(size=(4, 2)).astype(np.float32)
    info = fake_info(torch.from_numpy(gp), torch.tensor([5, 6, 7, 8]))
    info["gaussian_ids"] = gid
    ids, norms, radii = screen_space_stats(info, packed=True)
    assert ids.tolist() == gid.tolist()
    np.testing.assert_allclose(norms.numpy(), _manual_norm(gp), rtol=1e-5)
    np.testing.assert_allclose(radii.numpy(), np.array([5, 6, 7, 8]) / max(W, H))
    # gsplat >= 1.5 per-axis radii [N, 2]: visible when both > 0, size = larger axis
    ra = torch.tensor([[3, 5], [0, 4], [2, 2]])
    ids, norms, radii = screen_space_stats(fake_info(torch.ones(3, 2), ra))
    assert ids.tolist() == [0, 2]
    np.testing.assert_allclose(radii.numpy(), np.array([5, 2]) / max(W, H))


def test_missing_gradient_is_a_clear_error():
    params = make_params(3)
    strat = DensifyStrategy(total_iters=10_000)
    info = {"means2d": torch.zeros(3, 2, requires_grad=True), "radii": torch.ones(3), "width": W, "height": H, "n_cameras": 1}
    with pytest.raises(RuntimeError, match="step_pre_backward"):
        strat.step_post_backward(params, make_adams(params), strat.initialize_state(), 5, info)


def test_step_pre_backward_retains_means2d_grad():
    x = torch.randn(4, 3, requires_grad=True)
    means2d = x[:, :2] * 2.0  # non-leaf, like a rasterizer's projection
    info = {"means2d": means2d}
    DensifyStrategy(total_iters=10_000).step_pre_backward({}, {}, {}, 0, info)
    means2d.pow(2).sum().backward()
    torch.testing.assert_close(means2d.grad, 2 * means2d.detach())


def test_mean_gradient_is_over_visible_views():
    # A: visible 4 times at 0.6 * threshold each (sum above, mean below): not grown.
    # B: visible once at 1.5 * threshold, invisible 3 times: grown (mean over count = 1).
    params = make_params(2)
    strat = DensifyStrategy(DensifyConfig(refine_start_iter=0, refine_every=4), total_iters=10_000)
    state = strat.initialize_state()
    opts = make_adams(params)
    thr = 3e-4 / (W / 2)
    for step in (1, 2, 3, 4):
        radii = torch.tensor([3, 3 if step == 4 else 0], dtype=torch.int32)
        out = strat.step_post_backward(params, opts, state, step, fake_info(grad_rows([0.6 * thr, 1.5 * thr]), radii))
    assert out["duplicated"] == 1 and tags(params) == [0, 1, 1]
    assert state["grad2d"].abs().sum() == 0 and state["count"].sum() == 0  # reset after refine


# ------------------------------------------------------------------------------ grow / prune
def _mixed_scene():
    """0 small+high: dup; 1 large+high: split; 2 small+low; 3 large+low; 4 transparent;
    5 small+high but transparent (its copy too); 6 huge (over prune_scale3d) and low."""
    params = make_params(7)
    s = torch.tensor([0.005, 0.05, 0.005, 0.05, 0.005, 0.005, 0.5])
    params["scales"].data[:] = s.log()[:, None]
    params["scales"].data[1, 1] = math.log(0.02)  # anisotropic parent
    params["opacities"].data[[4, 5]] = _logit(0.001)
    params["quats"].data[1] = torch.tensor([0.9, 0.3, -0.2, 0.25])
    levels = [HIGH, HIGH, LOW, LOW, LOW, HIGH, LOW]
    return params, levels


def test_grow_and_prune_follow_the_rules():
    params, levels = _mixed_scene()
    before = {k: v.detach().clone() for k, v in params.items()}
    strat = DensifyStrategy(DensifyConfig(), total_iters=10_000)
    out, _ = one_refine(strat, params, make_adams(params), 1500, levels)
    # kept originals in order, then the copy of 0, then the two children of 1
    assert tags(params) == [0, 2, 3, 6, 0, 1, 1]
    assert (out["duplicated"], out["split"], out["pruned"], out["n"]) == (2, 1, 3, 7)
    for k in PARAM_KEYS:  # the copy equals its original in every attribute, bases included
        torch.testing.assert_close(params[k][4], before[k][0], rtol=0, atol=0)
        for i, j in zip((0, 1, 2, 3), (0, 2, 3, 6)):
            torch.testing.assert_close(params[k][i], before[k][j], rtol=0, atol=0)
    for child in (5, 6):
        for k in PARAM_KEYS:
            if k == "means":
                continue
            ref = before[k][1] - math.log(SPLIT_SCALE_DIVISOR) if k == "scales" else before[k][1]
            torch.testing.assert_close(params[k][child], ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(params["scales"][child].exp(), before["scales"][1].exp() / 1.6)
    assert not torch.equal(params["means"][5], params["means"][6])


def test_world_size_pruning_only_after_first_reset():
    params, levels = _mixed_scene()
    strat = DensifyStrategy(DensifyConfig(), total_iters=10_000)
    one_refine(strat, params, make_adams(params), 3500, levels)
    assert 6 not in tags(params)  # too large in world units, step > reset_every
    params, _ = _mixed_scene()
    one_refine(strat, params, make_adams(params), 3500, levels, scene_scale=10.0)
    assert 6 in tags(params)  # relative to scene_scale: 0.5 < 0.1 * 10


def test_screen_size_rules_only_after_refine_scale2d_stop_iter():
    # 0: low grad, radius 0.2 of the image (> prune_scale2d); 1: high grad, small in 3D,
    # radius 0.1 (> grow_scale2d, < prune_scale2d); 2: ordinary.
    radii = torch.tensor([0.2 * W, 0.1 * W, 3]).int()
    levels = [LOW, HIGH, LOW]
    strat = DensifyStrategy(DensifyConfig(), total_iters=10_000)
    p = make_params(3)
    one_refine(strat, p, make_adams(p), 2000, levels, radii)
    assert tags(p) == [0, 1, 2, 1]  # before 3000: kept, and 1 duplicated
    torch.testing.assert_close(p["scales"][3], p["scales"][1])
    p = make_params(3)
    one_refine(strat, p, make_adams(p), 3500, levels, radii)
    assert tags(p) == [2, 1, 1]  # after 3000: 0 pruned, 1 split (screen-large)
    torch.testing.assert_close(p["scales"][1], make_params(3)["scales"][1] - math.log(1.6))
    off = DensifyStrategy(DensifyConfig(refine_scale2d_stop_iter=None), total_iters=10_000)
    assert off.initialize_state()["radii"] is None
    p = make_params(3)
    _, st = one_refine(off, p, make_adams(p), 3500, levels, radii)
    assert tags(p) == [0, 1, 2, 1] and st["radii"] is None


def test_split_children_are_drawn_from_the_parent_gaussian():
    torch.manual_seed(0)
    m = 1500
    q = np.array([0.8, -0.3, 0.4, 0.33])  # w, x, y, z
    s = np.array([0.1, 0.03, 0.05])
    mu = np.array([0.2, -0.1, 0.4])
    params = make_params(m)
    params["means"].data[:] = torch.tensor(mu, dtype=torch.float32)
    params["quats"].data[:] = torch.tensor(q, dtype=torch.float32)
    params["scales"].data[:] = torch.tensor(np.log(s), dtype=torch.float32)
    split_gaussians(params, make_adams(params), {}, torch.ones(m, dtype=torch.bool))
    assert params["means"].shape[0] == 2 * m
    R = Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()  # scipy: scalar last
    z = (params["means"].detach().double().numpy() - mu) @ R / s  # parent-local, whitened
    assert np.abs(z.mean(0)).max() < 0.1
    np.testing.assert_allclose(np.cov(z.T), np.eye(3), atol=0.1)
    d2 = (z**2).sum(1)
    for k in (1.0, 2.0):  # fraction inside the k-sigma ellipsoid ~ chi2(3)
        assert abs((d2 < k * k).mean() - chi2.cdf(k * k, 3)) < 0.03


def test_revised_opacity_children_composite_to_parent():
    params = make_params(4)
    a = torch.tensor([0.1, 0.5, 0.9, 0.99])
    params["opacities"].data[:] = torch.logit(a)
    split_gaussians(params, make_adams(params), {}, torch.ones(4, dtype=torch.bool), revised_opacity=True)
    child = torch.sigmoid(params["opacities"].detach())
    torch.testing.assert_close(1 - (1 - child[:4]) ** 2, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(child[:4], child[4:])


def test_row_ops_remap_strategy_state_like_parameters():
    params = make_params(5)
    opts = make_adams(params)
    state = {"grad2d": torch.arange(5.0), "count": torch.arange(5.0) * 2, "radii": None, "scene_scale": 1.0}
    duplicate_gaussians(params, opts, state, torch.tensor([False, True, False, True, False]))
    assert tags(params) == [0, 1, 2, 3, 4, 1, 3]
    assert state["grad2d"].tolist() == [0, 1, 2, 3, 4, 1, 3] and state["count"].tolist() == [0, 2, 4, 6, 8, 2, 6]
    split_gaussians(params, opts, state, torch.tensor([True, False, False, False, False, False, True]))
    assert tags(params) == [1, 2, 3, 4, 1, 0, 3, 0, 3]
    assert state["grad2d"].tolist() == [1, 2, 3, 4, 1, 0, 3, 0, 3]
    remove_gaussians(params, opts, state, torch.tensor([i in (0, 5) for i in range(9)]))
    assert tags(params) == [2, 3, 4, 1, 3, 0, 3] and state["grad2d"].tolist() == [2, 3, 4, 1, 3, 0, 3]
    assert state["radii"] is None and state["scene_scale"] == 1.0


# ------------------------------------------------------------------------------ opacity reset
def test_opacity_reset_clamps_and_zeroes_its_moments():
    params = make_params(4)
    a = torch.tensor([0.5, 0.009, 0.9, 0.011])
    params["opacities"].data[:] = torch.logit(a)
    opts = make_adams(params)
    sum(p.sum() for p in params.values()).backward()
    for o in opts.values():
        o.step()
    a = torch.sigmoid(params["opacities"].detach().clone())
    cfg = DensifyConfig(refine_start_iter=10**6)  # isolate the reset
    strat = DensifyStrategy(cfg, total_iters=7000)
    state = strat.initialize_state()
    info = lambda: fake_info(grad_rows([LOW] * 4), torch.ones(4))  # noqa: E731
    for step in (0, 1500):
        assert not strat.step_post_backward(params, opts, state, step, info())["reset"]
    torch.testing.assert_close(torch.sigmoid(params["opacities"].detach()), a)
    assert strat.step_post_backward(params, opts, state, 3000, info())["reset"]
    expect = torch.minimum(a, torch.tensor(2 * cfg.prune_opa))
    torch.testing.assert_close(torch.sigmoid(params["opacities"].detach()), expect, atol=1e-6, rtol=1e-5)
    st = opts["opacities"].state[params["opacities"]]
    assert st["exp_avg"].abs().sum() == 0 and st["exp_avg_sq"].abs().sum() == 0
    assert opts["means"].state[params["means"]]["exp_avg"].abs().sum() > 0
    params["opacities"].data.fill_(3.0)
    assert not strat.step_post_backward(params, opts, state, 9000, info())["reset"]  # past stop (6500)
    assert (params["opacities"].detach() == 3.0).all()


def test_schedule():
    strat = DensifyStrategy(DensifyConfig(), total_iters=10_000)
    assert strat.refine_stop_iter == 9500
    refine = [s for s in range(0, 11_000, 250) if strat.is_refine_step(s)]
    assert refine == list(range(1500, 9500, 500))
    reset = [s for s in range(0, 11_000, 250) if strat.is_reset_step(s)]
    assert reset == [3000, 6000, 9000]
    assert DensifyStrategy(DensifyConfig(refine_stop_iter=4000), total_iters=10_000).refine_stop_iter == 4000
    with pytest.raises(ValueError, match="total_iters"):
        DensifyStrategy(DensifyConfig())
    # no statistics nor changes from the stop step on
    params = make_params(3)
    state = strat.initialize_state()
    out = strat.step_post_backward(params, make_adams(params), state, 9500, fake_info(grad_rows([HIGH] * 3), torch.ones(3)))
    assert state["grad2d"] is None and out["n"] == 3


# ------------------------------------------------------------------------------ optimizer state
def _adam_with_state(params):
    opts = make_adams(params)
    (sum((p**2).sum() for p in params.values())).backward()
    for o in opts.values():
        o.step()
        o.zero_grad()
    return opts


def test_adam_rows_follow_their_gaussians_and_training_continues():
    params, levels = _mixed_scene()
    opts = _adam_with_state(params)
    for k, p in params.items():  # tag moments with the row index
        st = opts[k].state[p]
        shape = (-1,) + (1,) * (p.dim() - 1)
        st["exp_avg"].copy_(torch.arange(7.0).reshape(shape).expand_as(p))
        st["exp_avg_sq"].copy_(torch.arange(7.0).reshape(shape).expand_as(p) + 100)
    strat = DensifyStrategy(DensifyConfig(), total_iters=10_000)
    one_refine(strat, params, opts, 1500, levels)
    survivors = [0, 2, 3, 6]  # then 3 new rows (expected layout: see the grow/prune test)
    for k, p in params.items():
        o = opts[k]
        assert o.param_groups[0]["params"][0] is p and len(o.state) == 1
        st = o.state[p]
        assert float(st["step"]) == 1.0
        shape = (-1,) + (1,) * (p.dim() - 1)
        torch.testing.assert_close(st["exp_avg"][:4], torch.tensor(survivors, dtype=torch.float32).reshape(shape).expand(4, *p.shape[1:]))
        torch.testing.assert_close(st["exp_avg_sq"][:4], torch.tensor(survivors, dtype=torch.float32).reshape(shape).expand(4, *p.shape[1:]) + 100)
        assert st["exp_avg"][4:].abs().sum() == 0 and st["exp_avg_sq"][4:].abs().sum() == 0
        assert p.requires_grad and p.shape[0] == 7
    before = {k: p.detach().clone() for k, p in params.items()}
    (sum((p**2).sum() for p in params.values())).backward()
    for o in opts.values():
        o.step()
    for k, p in params.items():
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), before[k]), k


def test_shared_optimizer_with_several_groups():
    params, levels = _mixed_scene()
    shared = torch.optim.Adam([{"params": [params[k]], "lr": 1e-3} for k in PARAM_KEYS])
    opts = {k: shared for k in PARAM_KEYS}
    (sum((p**2).sum() for p in params.values())).backward()
    shared.step()
    strat = DensifyStrategy(DensifyConfig(), total_iters=10_000)
    strat.check(params, opts)
    one_refine(strat, params, opts, 1500, levels)
    assert len(shared.state) == len(PARAM_KEYS)
    for i, k in enumerate(PARAM_KEYS):
        assert shared.param_groups[i]["params"][0] is params[k]
        assert shared.state[params[k]]["exp_avg"].shape == params[k].shape
    (sum((p**2).sum() for p in params.values())).backward()
    shared.step()
    strat.check(params, opts)


def test_max_gaussians_cap_keeps_the_highest_gradients():
    n = 10
    params = make_params(n)
    params["scales"].data[5:] = math.log(0.05)  # 5 small (duplicate) + 5 large (split)
    levels = [HIGH * (1 + i) for i in (3, 8, 1, 6, 0, 9, 2, 7, 4, 5)]
    strat = DensifyStrategy(DensifyConfig(max_gaussians=13), total_iters=10_000)
    out, _ = one_refine(strat, params, make_adams(params), 1500, levels)
    top3 = sorted(range(n), key=lambda i: -levels[i])[:3]  # 5 (split), 1 (dup), 7 (split)
    assert params["means"].shape[0] == 13 and out["n"] == 13
    t = tags(params)
    grown = sorted({i for i in range(n) if t.count(i) == 2})
    assert grown == sorted(top3)
    assert (out["duplicated"], out["split"]) == (1, 2)
    full = make_params(n)
    strat = DensifyStrategy(DensifyConfig(max_gaussians=8), total_iters=10_000)  # already over
    out, _ = one_refine(strat, full, make_adams(full), 1500, levels)
    assert out["n"] == n and out["duplicated"] + out["split"] == 0


def test_check_reports_layout_errors():
    strat = DensifyStrategy(total_iters=10_000)
    params = make_params(4)
    opts = make_adams(params)
    strat.check(params, opts)
    with pytest.raises(ValueError, match="no optimizer"):
        strat.check(params, {k: v for k, v in opts.items() if k != "albedo"})
    with pytest.raises(ValueError, match="does not hold"):
        strat.check(params, {**opts, "albedo": opts["f0"]})
    bad = make_params(4)
    bad["f0"] = nn.Parameter(torch.zeros(5, 1))
    with pytest.raises(ValueError, match="'f0'"):
        strat.check(bad, make_adams(bad))
    del bad["means"]
    with pytest.raises(ValueError, match="means"):
        strat.check(bad, {})
    frozen = make_params(4)
    frozen["posedirs"].requires_grad_(False)
    opts = {k: v for k, v in make_adams(frozen).items() if k != "posedirs"}
    strat.check(frozen, opts)  # a frozen tensor needs no optimizer, and is still remapped
    one_refine(DensifyStrategy(DensifyConfig(), total_iters=10_000), frozen, opts, 1500, [HIGH, LOW, LOW, LOW])
    assert frozen["posedirs"].shape[0] == 5 and not frozen["posedirs"].requires_grad


# ------------------------------------------------------------------------------ end to end
def _avatar_round(device):
    from helpers import tiny_head

    from hravatar.avatar.config import AvatarConfig
    from hravatar.avatar.gaussians import GaussianAvatar
    from hravatar.render.camera import Camera, intrinsics_from_fov
    from hravatar.render.rasterize import rasterize_gaussians

    torch.manual_seed(0)
    av = GaussianAvatar.from_head(tiny_head(), AvatarConfig(num_gaussians=48, n_shape=4, n_expr=6)).to(device)
    viewmat = torch.eye(4)
    viewmat[2, 3] = 0.5
    cam = Camera(viewmat.to(device), intrinsics_from_fov(30.0, 24, 24, device=device), 24, 24)
    opts = make_adams(av.params)
    strat = DensifyStrategy(DensifyConfig(grow_grad2d=1e-9, refine_start_iter=0, refine_every=1), total_iters=1000)
    strat.check(av.params, opts)
    state = strat.initialize_state(0.1)
    g = av.deform(av.neutral_frame())
    out = rasterize_gaussians(g.means[0], g.quats[0], g.scales[0], g.opacities, g.albedo, cam, backend="torch")
    info = out.info()
    strat.step_pre_backward(av.params, opts, state, 1, info)
    (out.features - 0.3).square().mean().backward()
    for o in opts.values():
        o.step()
    n0 = av.num_gaussians
    visible = int((info["radii"] > 0).sum())
    res = strat.step_post_backward(av.params, opts, state, 1, info)
    assert visible > 0 and res["duplicated"] + res["split"] == visible
    assert av.num_gaussians == n0 + visible - res["pruned"]
    assert all(p.device.type == torch.device(device).type for p in av.params.values())
    assert all(state[k].shape[0] == av.num_gaussians for k in ("grad2d", "count", "radii"))
    g2 = av.deform(av.neutral_frame())  # the avatar still deforms with the new rows
    assert g2.means.shape == (1, av.num_gaussians, 3)
    g2.means.sum().backward()
    for o in opts.values():
        o.step()


def test_end_to_end_with_avatar_and_torch_rasterizer():
    _avatar_round("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_end_to_end_on_cuda():
    _avatar_round("cuda")
