"""Training losses against values worked out by hand or from closed-form geometry."""
import math

import pytest
import torch
import torch.nn.functional as F

from hravatar.render.camera import orbit_camera
from hravatar.train.losses import (
    SurfaceAnchors,
    edge_aware_smoothness,
    flatness_loss,
    eyelid_loss,
    jaw_loss,
    normal_consistency_loss,
    normals_from_depth,
    surface_distance_loss,
    surface_normal_loss,
    total_variation,
)


def test_flatness_loss_values_and_gradient_on_the_smallest_axis_only():
    s = torch.tensor([[0.01, 0.01, 0.001],  # flat: ratio 0.1, free
                      [0.01, 0.006, 0.008],  # thick: ratio 0.75
                      [0.005, 0.005, 0.005]])  # round: ratio 1
    log_s = s.log().requires_grad_(True)
    loss = flatness_loss(log_s, max_ratio=0.3)
    assert loss.item() == pytest.approx((0.0 + 0.45 + 0.7) / 3, rel=1e-5)
    loss.backward()
    g = log_s.grad
    assert torch.all(g[0] == 0)
    # d/dlog(s_min) of s_min / s_mid = the ratio; the middle axis is held fixed
    assert g[1, 1].item() == pytest.approx(0.75 / 3, rel=1e-5) and g[1, 0] == 0 and g[1, 2] == 0
    assert g[2].sum().item() == pytest.approx(1 / 3, rel=1e-5) and int((g[2] != 0).sum()) == 1


def test_normals_from_depth_of_a_tilted_plane():
    cam = orbit_camera(yaw_deg=30, pitch_deg=10, distance=1.0, width=24, height=20, fov_y_deg=40)
    n_c = F.normalize(torch.tensor([0.3, -0.2, -1.0]), dim=0)  # camera space, facing the camera
    p0 = torch.tensor([0.0, 0.0, 1.0])
    K = cam.K
    ys, xs = torch.meshgrid(torch.arange(20.0) + 0.5, torch.arange(24.0) + 0.5, indexing="ij")
    rays = torch.stack([(xs - K[0, 2]) / K[0, 0], (ys - K[1, 2]) / K[1, 1], torch.ones_like(xs)], -1)
    depth = (n_c @ p0) / (rays @ n_c)  # z of the ray's hit with the plane n.p = n.p0
    n = normals_from_depth(depth[..., None], cam)
    expect = cam.viewmat[:3, :3].T @ n_c  # camera -> world
    inner = n[1:-1, 1:-1].reshape(-1, 3)
    assert torch.allclose(inner, expect.expand_as(inner), atol=1e-4)
    assert torch.all(n[0] == 0) and torch.all(n[:, -1] == 0)


def test_total_variation_and_normal_consistency_by_hand():
    ramp = (0.1 * torch.arange(5.0))[None, :, None].expand(4, 5, 2)
    assert total_variation(ramp).item() == pytest.approx(0.1)
    mask = torch.zeros(4, 5, 1)
    mask[:, :2] = 1  # one horizontal pair per row inside
    assert total_variation(ramp, mask).item() == pytest.approx(0.1 * 4 / (4 + 3 * 2))
    nrm = F.normalize(torch.randn(3, 3, 3), dim=-1)
    alpha = torch.ones(3, 3, 1)
    assert normal_consistency_loss(nrm, nrm, alpha).item() == pytest.approx(0.0, abs=1e-6)
    assert normal_consistency_loss(nrm, -nrm, alpha).item() == pytest.approx(2.0, abs=1e-6)
    assert normal_consistency_loss(nrm, -nrm, alpha * 0.5).item() == 0.0  # no confident pixel


def test_edge_aware_smoothness_weights_and_jaw_loss():
    img = torch.zeros(3, 4, 3)
    img[:, 2:] = 1.0  # a vertical step: 3 differing horizontal pairs of 17 pairs in all
    flat_guide = torch.full((3, 4, 3), 0.5)
    mask = torch.ones(3, 4, 1)
    assert edge_aware_smoothness(img, flat_guide, mask).item() == pytest.approx(3 / 17, rel=1e-5)
    # the same step in the photograph's colour switches the pairs across it off
    guide = flat_guide.clone()
    guide[:, 2:] = torch.tensor([0.9, 0.1, 0.1])
    assert edge_aware_smoothness(img, guide, mask).item() < 1e-6
    jp = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.2, 0.0]])
    assert jaw_loss(jp, torch.zeros(2, 3)).item() == pytest.approx((0.01 + 0.04) / 2)
    assert math.isclose(jaw_loss(jp, jp).item(), 0.0)
    # through the clamps: a closed (negative) opening unit still feels an open-mouth frame, a
    # side angle past its limit costs nothing when the tracked one sits on that limit
    raw = torch.tensor([[-0.3, 0.5, 0.0]], requires_grad=True)
    loss = jaw_loss(raw, torch.tensor([[0.2, 0.2, 0.0]]), side_limit=0.2)
    assert loss.item() == pytest.approx(0.5 ** 2)
    loss.backward()
    assert raw.grad[0, 0] < 0 and raw.grad[0, 1] == 0
    assert jaw_loss(torch.tensor([[-0.3, 0.0, 0.0]]), torch.zeros(1, 3)).item() == 0


def test_eyelid_loss_keeps_a_gradient_below_the_clamp():
    # raw eyelids (before the [0, 1] clamp) against tracked values
    raw = torch.tensor([[-0.5, 0.3], [1.4, -2.0]], requires_grad=True)
    tracked = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    loss = eyelid_loss(raw, tracked)
    # a blink seen with the unit below the clamp costs (1.5)^2 and pulls the raw value up;
    # inside the range it is the plain error; past the bound the target sits on it costs nothing
    assert loss.item() == pytest.approx((1.5 ** 2 + 0.2 ** 2 + 0.0 + 0.0) / 2)
    loss.backward()
    assert raw.grad[0, 0] < 0 and raw.grad[0, 1] < 0
    assert raw.grad[1, 0] == 0 and raw.grad[1, 1] == 0
    # the clamped output would have given no gradient on the first unit
    assert torch.autograd.grad(((raw.clamp(0, 1) - tracked) ** 2).sum(), raw)[0][0, 0] == 0


def test_normal_consistency_moves_the_depth_only_when_asked():
    # a bumpy depth under flat rendered normals: with depth_grad the loss gradient reaches the
    # depth and a small step along it flattens the surface (the loss falls); without, it does not
    cam = orbit_camera(yaw_deg=0, pitch_deg=0, distance=1.0, width=12, height=10, fov_y_deg=40)
    g = torch.Generator().manual_seed(0)
    depth0 = (1.0 + 0.01 * torch.rand(10, 12, 1, generator=g))
    nrm = torch.zeros(10, 12, 3)
    nrm[..., :] = cam.viewmat[:3, :3].T @ torch.tensor([0.0, 0.0, -1.0])  # facing the camera, world space
    alpha = torch.ones(10, 12, 1)
    for depth_grad in (False, True):
        depth = depth0.clone().requires_grad_(True)
        loss = normal_consistency_loss(nrm, normals_from_depth(depth, cam), alpha, depth_grad=depth_grad)
        if not depth_grad:
            assert not loss.requires_grad  # the depth normals were detached inside
            continue
        loss.backward()
        assert depth.grad.abs().sum() > 0
        with torch.no_grad():
            after = normal_consistency_loss(nrm, normals_from_depth(depth - 1e-4 * depth.grad / depth.grad.abs().max(), cam), alpha)
        assert after < loss


def test_surface_distance_loss_costs_only_the_normal_offset_beyond_the_tolerance():
    tol = 2e-3
    anchors = torch.zeros(4, 3)
    normals = torch.tensor([[0.0, 0.0, 1.0]]).repeat(4, 1)
    # along the normal: inside the band, 2.5 tol out, 3 tol in; the last slides 5 cm sideways
    pts = torch.tensor([[0.0, 0.0, 1e-3], [0.0, 0.0, 5e-3], [0.0, 0.0, -6e-3], [0.05, -0.02, 0.0]], requires_grad=True)
    w = torch.ones(4)
    loss = surface_distance_loss(pts, anchors, normals, w, tol)
    assert float(loss.detach()) == pytest.approx((0 + 1.5 + 2.0 + 0) / 4, rel=1e-5)
    loss.backward()
    assert torch.all(pts.grad[:, :2] == 0)  # no tangential pull
    assert pts.grad[0, 2] == 0 and pts.grad[3].abs().sum() == 0
    assert pts.grad[1, 2] > 0 and pts.grad[2, 2] < 0  # a step down the gradient moves both back toward the band
    # unconstrained points cost nothing and do not dilute the mean of the constrained ones
    w2 = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert float(surface_distance_loss(pts, anchors, normals, w2, tol).detach()) == pytest.approx(1.5 / 2, rel=1e-5)


def test_surface_anchors_are_the_closest_points_of_the_shaped_mesh_in_the_chosen_regions():
    from helpers import tiny_head

    from hravatar.head.mesh_utils import closest_point_on_mesh

    head = tiny_head(0)
    beta = torch.zeros(head.num_shape)
    beta[0] = 0.5
    v = head.shaped_template(beta[None])[0]
    anchors = SurfaceAnchors(head, beta, ("face", "no_such_region"))
    g = torch.Generator().manual_seed(0)
    q = v[head.faces[:, 0]] * 0.9 + torch.randn(head.faces.shape[0], 3, generator=g) * 0.005  # near the surface, some off it
    a, n, w = anchors.lookup(q)
    fi, bc, d = closest_point_on_mesh(q, v, head.faces)  # brute force over every triangle
    assert torch.allclose((a - q).norm(dim=-1), d, atol=1e-6)
    assert torch.allclose(n.norm(dim=-1), torch.ones(len(q)), atol=1e-5)
    interior = (bc > 1e-3).all(-1)  # off a triangle's interior, the offset lies along its normal
    off = a - q
    assert torch.allclose(torch.linalg.cross(off, n)[interior], torch.zeros(int(interior.sum()), 3), atol=1e-6)
    face_region = head.region("face").float()[head.faces[fi]].mean(-1) > 0.5
    assert torch.equal(w.bool()[interior], face_region[interior])  # on an edge, either triangle may be the one
    assert interior.sum() > len(q) // 4
    with pytest.raises(ValueError, match="none of the surface regions"):
        SurfaceAnchors(head, beta, ("hair",))


def test_surface_normal_loss_costs_only_tilt_beyond_the_tolerance_either_way_up():
    n = torch.tensor([[0.0, 0.0, 1.0]]).repeat(4, 1)
    deg = torch.tensor([5.0, 30.0, 180.0 - 30.0, 90.0])  # the third is the second flipped: same disc
    rad = torch.deg2rad(deg)
    axes = torch.stack([torch.sin(rad), torch.zeros(4), torch.cos(rad)], -1).requires_grad_(True)
    loss = surface_normal_loss(axes, n, torch.ones(4), max_angle_deg=15.0)
    free = 1 - math.cos(math.radians(15.0))
    want = [0.0, (1 - math.cos(math.radians(30.0))) - free, (1 - math.cos(math.radians(30.0))) - free, 1 - free]
    assert float(loss.detach()) == pytest.approx(sum(want) / 4, rel=1e-5)
    loss.backward()
    assert axes.grad[0].abs().sum() == 0  # within the tolerance: no pull
    # a small step down the gradient straightens the tilted ones
    with torch.no_grad():
        after = surface_normal_loss(F.normalize(axes - 1e-3 * axes.grad, dim=-1), n, torch.ones(4), 15.0)
    assert after < loss
    assert float(surface_normal_loss(axes, n, torch.tensor([1.0, 0.0, 0.0, 0.0]), 15.0).detach()) == 0.0
