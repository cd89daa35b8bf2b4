"""Rigged-to-mesh deformation against independent results: rigid motions agree with the
avatar's own LBS, Gaussians at triangle centroids land on the posed centroids, and a
Gaussian's offset from its triangle turns with the triangle."""
import torch
from helpers import tiny_head

from hravatar.avatar.config import AvatarConfig
from hravatar.avatar.gaussians import FrameParams, GaussianAvatar
from hravatar.avatar.mesh_rig import MeshRig, nearest_faces, triangle_frames
from hravatar.head.lbs import axis_angle_to_matrix


def _setup():
    head = tiny_head(1)
    beta = torch.randn(head.num_shape, generator=torch.Generator().manual_seed(3))
    av = GaussianAvatar.from_head(head, AvatarConfig(gaussians_per_face=2, init_mode="surface"), beta=beta)
    return head, av, MeshRig(head, av.beta)


def test_triangle_frames_are_orthonormal_and_right_handed():
    head, _, _ = _setup()
    R, T, k = triangle_frames(head.v_template[None], head.faces)
    eye = torch.eye(3).expand_as(R[0])
    assert torch.allclose(R[0].transpose(-1, -2) @ R[0], eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(R[0]), torch.ones(R.shape[1]), atol=1e-5)
    tri = head.v_template[head.faces]
    assert torch.allclose(T[0], tri.mean(1))
    assert (k > 0).all()


def test_nearest_faces_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    pts, cen = torch.randn(500, 3, generator=g), torch.randn(300, 3, generator=g)
    want = ((pts[:, None] - cen[None]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(nearest_faces(pts, cen, chunk=64), want)


def test_rigid_head_motion_matches_the_avatar_lbs():
    """Only the root joint turns: every triangle moves rigidly, so mesh rigging and LBS agree."""
    head, av, rig = _setup()
    # a purely rigid deformation: root rotation + translation, no expression/pose correctives
    with torch.no_grad():
        av.params["posedirs"].zero_()
        head.posedirs.zero_()
    pose = torch.zeros(1, 5, 3)
    pose[0, 0] = torch.tensor([0.3, -0.5, 0.2])
    f = FrameParams(torch.zeros(1, head.num_expr), pose, torch.zeros(1, 2), torch.tensor([[0.01, -0.02, 0.03]]))
    with torch.no_grad():
        av.log_global_scale.fill_(0.1)
        a, b = av.deform(f), rig.deform(av, f)
    assert torch.allclose(a.means, b.means, atol=1e-5)
    assert torch.allclose(a.rotmats, b.rotmats, atol=1e-4)
    assert torch.allclose(a.scales, b.scales, atol=1e-6)


def test_centroid_gaussians_follow_posed_centroids_and_offsets_turn_with_the_triangle():
    head, av, rig = _setup()
    x_c = av.canonical_means().detach()
    # put Gaussians at chosen triangles' centroids plus a normal offset of known length
    fidx = torch.arange(0, head.faces.shape[0], 7)
    R0, T0, _ = triangle_frames(head(beta=av.beta[None]).vertices, head.faces)
    offset = 0.002
    target = T0[0, fidx] + offset * R0[0, fidx, :, 1]
    with torch.no_grad():
        shape_off = x_c[: len(fidx)] - av.params["means"][: len(fidx)]
        av.params["means"][: len(fidx)] = target - shape_off
    rig.binding = torch.zeros(0, dtype=torch.long)
    g = torch.Generator().manual_seed(5)
    f = FrameParams(torch.randn(1, head.num_expr, generator=g), torch.randn(1, 5, 3, generator=g) * 0.2,
                    torch.rand(1, 2, generator=g), torch.zeros(1, 3))
    with torch.no_grad():
        out = rig.deform(av, f)
        verts = head(beta=av.beta[None], psi=f.expr, pose=f.pose, eyelids=f.eyelids, transl=f.transl).vertices
    R, T, k = triangle_frames(verts, head.faces)
    _, _, k0 = triangle_frames(head(beta=av.beta[None]).vertices, head.faces)
    bound = rig.bind(av.canonical_means())[: len(fidx)]
    assert torch.equal(bound, fidx)
    want = T[0, fidx] + offset * (k[0, fidx] / k0[0, fidx])[:, None] * R[0, fidx, :, 1]
    assert torch.allclose(out.means[0, : len(fidx)], want, atol=1e-6)


def test_bindings_follow_densification():
    _, av, rig = _setup()
    x = av.canonical_means()
    n0 = rig.bind(x).shape[0]
    with torch.no_grad():
        for k in list(av.params.keys()):
            av.params[k] = torch.nn.Parameter(torch.cat([av.params[k], av.params[k][:5]]))
    f = av.neutral_frame()
    assert rig.deform(av, f).means.shape[1] == n0 + 5


def test_binding_survives_a_state_dict_round_trip():
    head, av, rig = _setup()
    rig.bind(av.canonical_means())
    fresh = MeshRig(head, av.beta)
    fresh.load_state_dict(rig.state_dict())
    assert torch.equal(fresh.binding, rig.binding)
    assert list(rig.state_dict()) == ["binding"]  # the head model is not saved with every state
