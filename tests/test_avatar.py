"""Gaussian avatar: initialisation and deformation against independent references."""
import math

import numpy as np
import pytest
import torch
from helpers import tiny_head

from hravatar.avatar.config import AvatarConfig
from hravatar.avatar.gaussians import FrameParams, GaussianAvatar, gaussian_normals, sample_on_mesh
from hravatar.head.lbs import normalize_skinning_weights
from hravatar.utils.rotation import quat_to_matrix


def _rodrigues_np(r):
    th = np.linalg.norm(r)
    if th < 1e-12:
        return np.eye(3)
    k = r / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K


def _lbs_numpy(head, beta, psi, pose, eyelids):
    """Textbook FLAME LBS in float64 numpy, written independently of hravatar.head.lbs."""
    v = head.v_template.double().numpy()
    v = v + head.shapedirs.double().numpy()[..., : len(beta)] @ beta
    J = head.J_regressor.double().numpy() @ v
    v = v + head.exprdirs.double().numpy()[..., : len(psi)] @ psi
    v = v + np.einsum("l,lvi->vi", eyelids, head.eyelid_dirs.double().numpy())
    Rs = [_rodrigues_np(p) for p in pose]
    feat = np.concatenate([(R - np.eye(3)).ravel() for R in Rs[1:]])
    v = v + head.posedirs.double().numpy() @ feat
    parents = head.parents.numpy()
    G = []
    for k in range(5):
        M = np.eye(4)
        M[:3, :3] = Rs[k]
        M[:3, 3] = J[k] - (J[parents[k]] if parents[k] >= 0 else 0)
        G.append(M if parents[k] < 0 else G[parents[k]] @ M)
    A = []
    for k in range(5):
        rest = np.eye(4)
        rest[:3, 3] = -J[k]
        A.append(G[k] @ rest)
    A = np.stack(A)
    W = head.lbs_weights.double().numpy()
    T = np.einsum("vk,kij->vij", W, A)
    vh = np.concatenate([v, np.ones((len(v), 1))], 1)
    return np.einsum("vij,vj->vi", T, vh)[:, :3], np.stack([g[:3, 3] for g in G])


def _random_frame(head, seed):
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(head.num_shape, generator=g)
    psi = torch.randn(head.num_expr, generator=g)
    pose = torch.randn(5, 3, generator=g) * 0.3
    eyelids = torch.rand(2, generator=g)
    return beta, psi, pose, eyelids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_forward_matches_numpy_lbs(seed):
    head = tiny_head(seed)
    beta, psi, pose, eyelids = _random_frame(head, seed + 10)
    out = head(beta[None], psi[None], pose[None], eyelids[None])
    ref_v, ref_j = _lbs_numpy(head, beta.double().numpy(), psi.double().numpy(), pose.double().numpy(), eyelids.double().numpy())
    assert np.abs(out.vertices[0].double().numpy() - ref_v).max() < 1e-5
    assert np.abs(out.joints[0].double().numpy() - ref_j).max() < 1e-5
    # landmarks are barycentric combinations of the posed vertices
    tri = head.faces[head.lmk_faces]
    lm_ref = (torch.from_numpy(ref_v).float()[tri] * head.lmk_bary[..., None]).sum(1)
    assert (out.landmarks[0] - lm_ref).abs().max() < 1e-5


def _avatar_on_vertices(head, beta):
    """Gaussians placed exactly on the head vertices, with the vertices' bases/weights."""
    V = head.num_vertices
    params = {
        "means": head.v_template.clone(),
        "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(V, 1),
        "scales": torch.full((V, 3), math.log(0.002)),
        "opacities": torch.zeros(V),
        "albedo": torch.zeros(V, 3),
        "roughness": torch.zeros(V, 1),
        "f0": torch.zeros(V, 1),
        "shapedirs": head.shapedirs.clone(),
        "exprdirs": head.exprdirs.clone(),
        "posedirs": head.posedirs.clone(),
        "lbs_weights": head.lbs_weights.clone(),
        "eyelid_dirs": head.eyelid_dirs.permute(1, 0, 2).clone(),
    }
    return GaussianAvatar(params, head.joints_rest(beta[None])[0], beta, AvatarConfig(), head.expr_names)


@pytest.mark.parametrize("seed", [0, 3])
def test_gaussians_on_vertices_follow_the_mesh(seed):
    head = tiny_head(seed)
    beta, psi, pose, eyelids = _random_frame(head, seed)
    av = _avatar_on_vertices(head, beta)
    transl = torch.tensor([[0.01, -0.02, 0.03]])
    frame = FrameParams(psi[None], pose[None], eyelids[None], transl)
    d = av.deform(frame)
    out = head(beta[None], psi[None], pose[None], eyelids[None], transl)
    # LBS weights are renormalised with eps=1e-5: positions agree to ~1e-5 relative
    assert (d.means[0] - out.vertices[0]).abs().max() < 5e-6
    # global scale multiplies positions and scales
    with torch.no_grad():
        av.log_global_scale.fill_(math.log(1.5))
    d2 = av.deform(frame)
    assert torch.allclose(d2.means, 1.5 * d.means, atol=1e-6)
    assert torch.allclose(d2.scales, 1.5 * d.scales, atol=1e-7)


def test_rigidly_attached_gaussian_rotates_with_its_joint():
    head = tiny_head(0)
    beta = torch.zeros(head.num_shape)
    av = _avatar_on_vertices(head, beta)
    with torch.no_grad():
        av.params["lbs_weights"].zero_()
        av.params["lbs_weights"][:, 2] = 1.0  # everything on the jaw
        q0 = torch.nn.functional.normalize(torch.randn(head.num_vertices, 4), dim=-1)
        av.params["quats"].copy_(q0)
    pose = torch.zeros(1, 5, 3)
    pose[0, 1] = torch.tensor([0.0, 0.4, 0.0])  # neck
    pose[0, 2] = torch.tensor([0.3, 0.0, 0.0])  # jaw
    d = av.deform(FrameParams(torch.zeros(1, head.num_expr), pose, torch.zeros(1, 2), torch.zeros(1, 3)))
    R_world = torch.from_numpy(_rodrigues_np(np.array([0, 0.4, 0])) @ _rodrigues_np(np.array([0.3, 0, 0]))).float()
    expect = R_world @ quat_to_matrix(q0)
    assert (d.rotmats[0] - expect).abs().max() < 1e-5


def test_skinning_weight_normalisation():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    n = normalize_skinning_weights(w)
    assert torch.allclose(n[0], torch.tensor([0.25, 0, 0.75, 0, 0]), atol=1e-5)
    assert n[1].abs().sum() == 0  # all-negative weights give no transform contribution, not NaN


def test_normals_are_shortest_axis_facing_camera():
    R = quat_to_matrix(torch.nn.functional.normalize(torch.randn(50, 4), dim=-1))
    scales = torch.rand(50, 3) + 0.1
    k = torch.randint(0, 3, (50,))
    scales[torch.arange(50), k] = 0.01
    means = torch.randn(50, 3) * 0.1
    cam = torch.tensor([0.0, 0.0, 2.0])
    n = gaussian_normals(R, scales, means, cam)
    axis = R[torch.arange(50), :, k]
    assert torch.allclose(n.abs(), axis.abs(), atol=1e-6)
    assert ((n * (cam - means)).sum(-1) >= 0).all()


def test_mesh_sampling_is_uniform_on_triangles():
    v = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0.0, 1.0, 0]])
    f = torch.tensor([[0, 1, 2]])
    _, bary = sample_on_mesh(v, f, 20000, None, torch.Generator().manual_seed(0))
    assert (bary >= 0).all() and torch.allclose(bary.sum(-1), torch.ones(20000))
    # uniform density on a triangle: E[b_i] = 1/3, E[b_i^2] = 1/6
    assert torch.allclose(bary.mean(0), torch.full((3,), 1 / 3), atol=0.01)
    assert torch.allclose((bary**2).mean(0), torch.full((3,), 1 / 6), atol=0.01)


@pytest.mark.parametrize("mode", ["method", "surface"])
def test_init_from_head_interpolates_vertex_attributes(mode):
    head = tiny_head(1)
    cfg = AvatarConfig(gaussians_per_face=2, init_mode=mode, albedo_init="vertex")
    av = GaussianAvatar.from_head(head, cfg)
    assert av.num_gaussians == 2 * head.faces.shape[0]
    # every Gaussian lies on the sphere surface (inside the chord tolerance)
    r = av.params["means"].norm(dim=-1)
    assert (r <= 0.1 + 1e-6).all() and (r > 0.09).all()
    # bases and LBS weights are convex combinations of the vertices' values
    assert torch.allclose(av.params["lbs_weights"].sum(-1), torch.ones(av.num_gaussians), atol=1e-5)
    assert av.params["shapedirs"].abs().max() <= head.shapedirs.abs().max() + 1e-7
    o = av.opacity()
    assert torch.allclose(o, torch.full_like(o, 0.1 if mode == "method" else 0.95), atol=1e-4)
    assert torch.allclose(av.roughness(), torch.full((av.num_gaussians, 1), 0.9), atol=1e-4)
    assert torch.allclose(av.f0(), torch.full((av.num_gaussians, 1), 0.04), atol=1e-4)
    # deterministic
    av2 = GaussianAvatar.from_head(head, cfg)
    assert torch.equal(av.params["means"], av2.params["means"])


def test_frame_with_expression_keeps_head_pose_and_replaces_jaw():
    from hravatar.avatar.gaussians import FrameParams

    g = torch.Generator().manual_seed(0)
    f = FrameParams(torch.randn(1, 4, generator=g), torch.randn(1, 5, 3, generator=g), torch.rand(1, 2, generator=g), torch.randn(1, 3, generator=g))
    before = f.pose.clone()
    e, lids, jaw = torch.randn(1, 4, generator=g), torch.rand(1, 2, generator=g), torch.randn(1, 3, generator=g)
    h = f.with_expression(e, lids, jaw)
    assert torch.equal(h.expr, e) and torch.equal(h.eyelids, lids) and torch.equal(h.transl, f.transl)
    assert torch.equal(h.pose[:, 2], jaw) and torch.equal(h.pose[:, [0, 1, 3, 4]], before[:, [0, 1, 3, 4]])
    assert torch.equal(f.pose, before)  # the original frame is untouched
