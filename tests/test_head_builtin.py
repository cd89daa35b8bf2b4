"""Tests of the built-in head model (loads the committed asset), mouth geometry and mesh helpers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hravatar.head.builtin import ASSET_PATH, EXPR_NAMES, load_builtin_head
from hravatar.head.mesh_utils import (
    boundary_loops,
    closest_point_on_mesh,
    connected_components,
    graph_distances,
    loop_subdivide,
    triangles_from_edges,
    unique_edges,
    vertex_normals,
)
from hravatar.head.model import REGION_NAMES, HeadModel
from hravatar.head.mouth import build_mouth_geometry, weld_rim

REQUIRED_EXPR = (
    "jawOpen", "eyeBlink_L", "eyeBlink_R", "mouthSmile_L", "mouthSmile_R", "browInnerUp",
    "browOuterUp_L", "browOuterUp_R", "browDown_L", "browDown_R", "mouthPucker", "mouthFunnel",
    "cheekPuff", "mouthLeft", "mouthRight", "mouthPress_L", "mouthPress_R", "mouthFrown_L", "mouthFrown_R",
)


@pytest.fixture(scope="module")
def head() -> HeadModel:
    if not ASSET_PATH.exists():
        pytest.skip("built-in head asset not generated")
    return load_builtin_head()


def _mirror(v: np.ndarray) -> np.ndarray:
    return v * np.array([-1.0, 1.0, 1.0])


def _psi(head: HeadModel, name: str, value: float = 1.0) -> torch.Tensor:
    psi = torch.zeros(1, head.num_expr)
    psi[0, head.expr_names.index(name)] = value
    return psi


# ----------------------------------------------------------------------------- model content
def test_counts_and_names(head):
    assert head.num_shape >= 10 and head.num_expr >= 20
    assert set(REQUIRED_EXPR) <= set(head.expr_names)
    assert len(set(head.expr_names)) == head.num_expr and len(set(head.shape_names)) == head.num_shape
    assert head.lmk_faces.shape == (478,) and head.lmk_bary.shape == (478, 3)
    assert 6000 <= head.num_vertices <= 15000
    head.validate()
    for name in REGION_NAMES:
        assert head.region(name).any(), name
    assert ASSET_PATH.stat().st_size <= 15_000_000


def test_proportions(head):
    v = head.v_template.numpy()
    skin = ~(head.region("eyes") | head.region("teeth") | head.region("mouth_interior")).numpy()
    ears = head.region("ears").numpy()
    cranium = v[skin & ~ears & (v[:, 1] > 0.0)]
    width = cranium[:, 0].max() - cranium[:, 0].min()
    length = v[skin & ~ears, 2].max() - v[skin & ~ears, 2].min()  # nose tip to back of head
    assert 0.14 <= width <= 0.17
    assert 0.19 <= length <= 0.24
    J = head.joints_rest()[0].numpy()
    assert abs(abs(J[3, 0] - J[4, 0]) - 0.063) < 0.002  # interocular distance
    # joints: order root < neck < eyes in height, jaw behind the mouth and in front of the neck
    assert J[0, 1] < J[1, 1] < J[2, 1] < J[3, 1]
    assert J[1, 2] < J[2, 2] < head.landmarks(head.v_template[None])[0, 13, 2].item()


def test_skinning_weights(head):
    W = head.lbs_weights.numpy()
    assert np.all(W >= -1e-6)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(head.J_regressor.sum(1).numpy(), 1.0, atol=1e-5)
    # smooth: neighbouring vertices differ by little (rigid parts are separate components)
    e, _ = unique_edges(head.faces.numpy())
    v = head.v_template.numpy()
    d = np.abs(W[e[:, 0]] - W[e[:, 1]]).max(1)
    grad_mm = d / (1000 * np.linalg.norm(v[e[:, 0]] - v[e[:, 1]], axis=1))
    # transitions spread over >~2 cm almost everywhere; the largest step is at the mouth
    # corners, where upper and lower lip meet (half way between skull and jaw)
    assert np.percentile(grad_mm, 99) < 0.06
    assert np.percentile(d, 99) < 0.3 and d.max() < 0.6
    # eyeballs rigid on their joint; teeth: upper on the neck, lower on the jaw
    eyes = head.region("eyes").numpy()
    assert np.all(W[eyes][:, 3:].max(1) > 0.999)
    teeth = head.region("teeth").numpy()
    assert np.all((W[teeth, 1] > 0.999) | (W[teeth, 2] > 0.999))
    assert (W[teeth, 2] > 0.999).sum() > 100 and (W[teeth, 1] > 0.999).sum() > 100
    # chin on the jaw, forehead and back of the head not at all, lower neck on the root
    v = head.v_template.numpy()
    lm = head.landmarks(head.v_template[None])[0].numpy()
    chin = np.argmin(np.linalg.norm(v - lm[152], axis=1))
    brow = np.argmin(np.linalg.norm(v - lm[9], axis=1))
    assert W[chin, 2] > 0.9 and W[brow, 2] < 1e-3
    low_neck = v[:, 1] < v[:, 1].min() + 0.01
    assert np.all(W[low_neck, 0] > 0.9)


def test_mesh_closed_except_eye_openings(head):
    f = head.faces.numpy()
    loops = boundary_loops(f)
    assert len(loops) == 2  # the lid skirts behind the two eye openings
    J = head.joints_rest()[0].numpy()
    v = head.v_template.numpy()
    for loop in loops:
        d = np.linalg.norm(v[loop][:, None] - J[None, 3:], axis=-1).min(1)
        assert d.max() < EYE_R_BOUND
    e, c = unique_edges(f)
    assert c.max() == 2  # manifold edges


EYE_R_BOUND = 0.022


def test_no_degenerate_faces(head):
    f = head.faces.numpy()
    v = head.v_template.numpy().astype(np.float64)
    assert np.all((f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2]))
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    assert area.min() > 1e-10
    assert len(np.unique(np.sort(f, 1), axis=0)) == len(f)


def test_symmetry(head):
    v = head.v_template
    m = torch.as_tensor(_mirror(v.numpy()), dtype=torch.float32)
    # candidate faces only: the distance can only be overestimated, so the check stays strict
    _, _, dist = closest_point_on_mesh(m, v, head.faces, candidates=24)
    assert dist.max().item() < 0.002 and torch.quantile(dist, 0.99).item() < 0.0008
    # mirror pairs of expressions mirror each other (checked on the face landmarks)
    for name in ("mouthSmile", "eyeBlink", "browOuterUp", "mouthFrown", "cheekSquint", "noseSneer"):
        pl = head(psi=_psi(head, name + "_L")).landmarks[0].numpy()
        pr = head(psi=_psi(head, name + "_R")).landmarks[0].numpy()
        base = head().landmarks[0].numpy()
        dl, dr = pl - base, pr - base
        # landmark 291 (left mouth corner) mirrors 61 etc.: compare displacement magnitudes sorted
        assert abs(np.abs(dl).sum() - np.abs(dr).sum()) < 0.02 * np.abs(dl).sum() + 1e-6
        # left modes move the +x side more
        assert np.abs(dl[base[:, 0] > 0.005]).sum() > 3 * np.abs(dl[base[:, 0] < -0.005]).sum(), name


def test_landmarks_on_surface_and_features(head):
    bary = head.lmk_bary
    assert torch.all(bary >= -1e-6) and torch.allclose(bary.sum(1), torch.ones(478), atol=1e-5)
    lm = head.landmarks(head.v_template[None])[0]
    _, _, dist = closest_point_on_mesh(lm, head.v_template, head.faces)
    assert dist.max().item() < 1e-6
    lm = lm.numpy()
    v = head.v_template.numpy()
    face = head.region("face").numpy()
    # nose tip is (next to) the most forward point of the face
    assert np.linalg.norm(v[face][np.argmax(v[face, 2])] - lm[1]) < 0.012
    assert lm[1, 2] > np.delete(lm[:468, 2], [1, 4, 5, 19, 44, 45, 274, 275, 195, 197, 6, 248, 218, 438]).max() - 0.002
    # subject's right eye is at -x: outer corner 33 < inner 133 < 0 < inner 362 < outer 263
    assert lm[33, 0] < lm[133, 0] < 0 < lm[362, 0] < lm[263, 0]
    assert lm[61, 0] < 0 < lm[291, 0]
    assert lm[152, 1] == pytest.approx(lm[:468, 1].min(), abs=0.003)  # chin lowest
    assert lm[10, 1] > lm[9, 1] > lm[1, 1] > lm[13, 1] > lm[152, 1]
    # irises on the eyeball (right iris 468 at the right eye joint)
    J = head.joints_rest()[0].numpy()
    eyes = head.region("eyes").numpy()
    iris_faces = head.faces[head.lmk_faces[468:]].numpy()
    assert np.all(eyes[iris_faces])
    np.testing.assert_allclose(np.linalg.norm(lm[468:473] - J[4], axis=1), 0.012, atol=0.001)
    np.testing.assert_allclose(np.linalg.norm(lm[473:478] - J[3], axis=1), 0.012, atol=0.001)
    assert lm[468, 2] > J[4, 2] + 0.011  # looking forward


def test_jaw_rotation_opens_mouth(head):
    pose = torch.zeros(1, 5, 3)
    pose[0, 2, 0] = 0.3
    out0, out1 = head(), head(pose=pose)
    gap0 = (out0.landmarks[0, 13, 1] - out0.landmarks[0, 14, 1]).item()
    gap1 = (out1.landmarks[0, 13, 1] - out1.landmarks[0, 14, 1]).item()
    assert gap1 - gap0 > 0.012
    teeth = head.region("teeth")
    W = head.lbs_weights
    lower = teeth & (W[:, 2] > 0.5)
    upper = teeth & (W[:, 1] > 0.5)
    move = (out1.vertices[0] - out0.vertices[0]).norm(dim=-1)
    assert move[lower].min().item() > 0.005
    assert move[upper].max().item() < 1e-5  # float32 round-off only
    # nothing moves above the eyes
    assert move[head.v_template[:, 1] > 0.02].max().item() < 1e-5
    # the mouth interior opens with the jaw and stays behind the lips
    cav = head.region("mouth_interior")
    assert move[cav].max().item() > 0.005
    assert out1.vertices[0, cav, 2].max().item() <= out1.landmarks[0, 0, 2].item() + 1e-3


def test_eyelids_close_only_their_eye(head):
    base = head().landmarks[0]
    for ctrl in ("eyelids", "psi"):
        if ctrl == "eyelids":
            out = head(eyelids=torch.tensor([[1.0, 0.0]]))
        else:
            out = head(psi=_psi(head, "eyeBlink_R"))
        lm = out.landmarks[0]
        gap_r0 = (base[159] - base[145]).norm().item()
        gap_r = (lm[159] - lm[145]).norm().item()
        assert gap_r < 0.3 * gap_r0
        assert torch.allclose(lm[386], base[386], atol=1e-7) and torch.allclose(lm[374], base[374], atol=1e-7)
        # the closed lid stays outside the eyeball
        J = head.joints_rest()[0]
        assert (lm[159] - J[4]).norm().item() > 0.0118
    # the eyeballs themselves never move with the lids
    out = head(eyelids=torch.tensor([[1.0, 1.0]]))
    eyes = head.region("eyes")
    assert torch.allclose(out.vertices[0, eyes], head.v_template[eyes], atol=1e-7)


def test_blendshapes(head):
    base = head().landmarks[0]
    lm = head(psi=_psi(head, "jawOpen")).landmarks[0]
    assert base[152, 1] - lm[152, 1] > 0.01  # chin down
    assert (lm[0] - base[0]).norm().item() < 0.001  # upper lip stays
    sm = head(psi=_psi(head, "mouthSmile_L")).landmarks[0]
    assert sm[291, 1] - base[291, 1] > 0.003 and abs(sm[61, 1] - base[61, 1]) < 0.001
    pk = head(psi=_psi(head, "mouthPucker")).landmarks[0]
    assert (pk[291, 0] - pk[61, 0]) < (base[291, 0] - base[61, 0]) - 0.01
    br = head(psi=_psi(head, "browInnerUp")).landmarks[0]
    assert br[107, 1] - base[107, 1] > 0.003
    # every mode moves something by a plausible amount (0.5 mm .. 4 cm) and is finite
    mag = head.exprdirs.norm(dim=1).amax(0)
    assert torch.all(mag > 5e-4) and torch.all(mag < 0.04)
    smag = head.shapedirs.norm(dim=1).amax(0)
    assert torch.all(smag > 5e-4) and torch.all(smag < 0.02)


def test_shape_modes_smooth_and_symmetric(head):
    v = head.v_template.numpy()
    e, _ = unique_edges(head.faces.numpy())
    L = np.linalg.norm(v[e[:, 0]] - v[e[:, 1]], axis=1)
    for s in range(head.num_shape):
        D = head.shapedirs[:, :, s].numpy()
        # displacement differences along an edge are small compared to the edge
        dd = np.linalg.norm(D[e[:, 0]] - D[e[:, 1]], axis=1)
        assert np.percentile(dd / L, 99) < 0.5, head.shape_names[s]
        beta = torch.zeros(1, head.num_shape)
        beta[0, s] = 3.0
        shaped = head.shaped_template(beta)[0]
        m = torch.as_tensor(_mirror(shaped.numpy()), dtype=torch.float32)
        _, _, dist = closest_point_on_mesh(m[::4], shaped, head.faces, candidates=24)
        assert dist.max().item() < 0.003, head.shape_names[s]


def test_vertex_colors(head):
    c = head.vertex_colors
    assert c.min() >= 0 and c.max() <= 1
    mean = lambda r: c[head.region(r)].mean(0)  # noqa: E731
    assert mean("teeth").mean() > 0.8  # off-white
    assert mean("scalp").mean() < mean("face").mean() - 0.2  # hair darker than skin
    assert mean("lips")[0] > mean("lips")[2] + 0.15  # reddish


def test_save_load_roundtrip(head, tmp_path):
    p = tmp_path / "h.safetensors"
    head.save(p)
    h2 = HeadModel.load(p)
    assert h2.identity() == head.identity()
    assert h2.expr_names == head.expr_names and h2.shape_names == head.shape_names
    for (k, a), (_, b) in zip(head.named_buffers(), h2.named_buffers()):
        assert torch.equal(a, b), k
    assert list(EXPR_NAMES) == head.expr_names


def test_load_rejects_bad_file(tmp_path):
    from hravatar.io.safe import CheckpointError

    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"not a model")
    with pytest.raises(CheckpointError) as e:
        load_builtin_head(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_generation_is_deterministic(head):
    pytest.importorskip("mediapipe")
    pytest.importorskip("skimage")
    from hravatar.head.builtin import build_builtin_head

    h2 = build_builtin_head()
    for (k, a), (_, b) in zip(head.named_buffers(), h2.named_buffers()):
        assert a.shape == b.shape, k
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k


# ----------------------------------------------------------------------------- mouth.py
def _lips(n=9, half=0.025, gap=0.0):
    x = np.linspace(-half, half, n)
    bow = 1 - (x / half) ** 2
    up = np.stack([x, 0.5 * gap * bow, 0.006 * bow], -1)
    lo = np.stack([x, -0.5 * gap * bow, 0.006 * bow], -1)
    return up, lo


def test_mouth_geometry_structure():
    up, lo = _lips()
    g = build_mouth_geometry(up, lo, np.array([0.0, 0.03, -0.08]))
    M = len(g.vertices)
    assert g.faces.min() >= 0 and g.faces.max() < M
    assert set(np.unique(g.labels)) == {"teeth", "mouth_interior"}
    # the rim reproduces the lip loop (corners shared once)
    assert len(g.rim) == len(up) + len(lo) - 2
    for r, (c, i) in zip(g.rim, g.rim_source):
        np.testing.assert_allclose(g.vertices[r], (up if c == 0 else lo)[i])
    # only the rim is open; the tooth rows are closed, outward, and upper/lower as expected
    loops = boundary_loops(g.faces)
    assert len(loops) == 1 and set(loops[0].tolist()) == set(g.rim.tolist())
    comp = connected_components(g.faces, M)
    teeth = g.labels == "teeth"
    assert len(np.unique(comp[teeth])) == 2
    for cid in np.unique(comp[teeth]):
        f = g.faces[np.isin(g.faces[:, 0], np.nonzero(comp == cid)[0])]
        v = g.vertices
        vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
        assert vol > 1e-7  # positive volume: normals outwards
        is_lower = g.lower[f[0, 0]]
        assert np.all(g.lower[np.unique(f)] == is_lower)
        ymean = v[np.unique(f), 1].mean()
        assert (ymean < 0) == bool(is_lower)
    # everything stays behind the lips and in front of the pivot region
    assert g.vertices[:, 2].max() <= up[:, 2].max() + 1e-9
    assert g.vertices[:, 2].min() > -0.08
    # cavity floor follows the jaw, roof does not, blended in between
    cav = g.labels == "mouth_interior"
    assert np.all((g.jaw_weight >= 0) & (g.jaw_weight <= 1))
    assert g.jaw_weight[cav & (g.vertices[:, 1] < -0.005)].min() > 0.5
    assert g.jaw_weight[cav & (g.vertices[:, 1] > 0.005)].max() < 0.5


def test_mouth_weld_rim():
    up, lo = _lips(gap=0.004)
    g = build_mouth_geometry(up, lo, np.array([0.0, 0.03, -0.08]))
    head_ids = 100 + np.arange(len(g.rim))
    keep, faces, new_index = weld_rim(g, head_ids, offset=1000)
    assert len(keep) == len(g.vertices) - len(g.rim)
    assert faces.max() < 1000 + len(keep)
    assert set(new_index[g.rim].tolist()) == set(head_ids.tolist())
    assert not np.isin(np.arange(1000 + len(keep), 1000 + len(g.vertices)), faces).any()


def test_mouth_geometry_rejects_bad_input():
    with pytest.raises(ValueError):
        build_mouth_geometry(np.zeros((2, 3)), np.zeros((5, 3)), np.zeros(3))


# ----------------------------------------------------------------------------- mesh_utils.py
def _octahedron():
    v = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    f = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    return v, f


def test_triangles_from_edges_and_loop_subdivision():
    v, f = _octahedron()
    e, c = unique_edges(f)
    assert len(e) == 12 and np.all(c == 2)
    tris = triangles_from_edges(e)
    assert {tuple(sorted(t)) for t in tris} == {tuple(sorted(t)) for t in f}
    v2, f2, parents = loop_subdivide(v, f)
    assert len(v2) == 6 + 12 and len(f2) == 32 and len(parents) == 12
    assert boundary_loops(f2) == []
    # Loop's vertex rule on a valence-4 vertex of the unit octahedron: (1 - 4b) + 0 with b = 3/32
    np.testing.assert_allclose(np.linalg.norm(v2[:6], axis=1), 1 - 4 * 3 / 32)
    # edge rule: 3/8 (a + b) + 1/8 (c + d) -> |.| = 3/8 * sqrt(2)
    np.testing.assert_allclose(np.linalg.norm(v2[6:], axis=1), 3 / 8 * math.sqrt(2))
    v3, _, _ = loop_subdivide(v, f, move_even=False)
    np.testing.assert_allclose(v3[:6], v)


def test_boundary_loops_grid():
    n = 4
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    f = []
    for i in range(n):
        for j in range(n):
            a, b, c, d = idx[i, j], idx[i, j + 1], idx[i + 1, j + 1], idx[i + 1, j]
            if (i, j) != (1, 1):  # a hole
                f += [(a, b, c), (a, c, d)]
    loops = boundary_loops(np.array(f))
    assert sorted(len(l) for l in loops) == [4, 16]


def test_closest_point_candidates_match_brute_force():
    v, f = _octahedron()
    for _ in range(2):
        v, f, _ = loop_subdivide(v, f)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(200, 3, generator=g, dtype=torch.float64)
    vt, ft = torch.tensor(v), torch.tensor(f)
    _, _, d_full = closest_point_on_mesh(p, vt, ft)
    _, _, d_fast = closest_point_on_mesh(p, vt, ft, candidates=16)
    assert torch.all(d_fast >= d_full - 1e-12)
    torch.testing.assert_close(d_fast, d_full, atol=1e-9, rtol=0)


def test_closest_point_against_dense_sampling():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(12, 3, generator=g)
    f = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    p = torch.rand(40, 3, generator=g) * 2 - 0.5
    fi, bary, dist = closest_point_on_mesh(p, v, f)
    # brute force: a dense barycentric grid on every triangle
    k = 60
    a, b = torch.meshgrid(torch.arange(k + 1), torch.arange(k + 1), indexing="ij")
    m = a + b <= k
    w = torch.stack([a[m], b[m], k - a[m] - b[m]], -1).float() / k
    samples = torch.einsum("sj,fjc->fsc", w, v[f]).reshape(-1, 3)
    brute = torch.cdist(p, samples).min(1).values
    assert torch.all(dist <= brute + 1e-6)
    assert torch.all(brute - dist < 0.02)
    rec = (bary[:, :, None] * v[f[fi]]).sum(1)
    np.testing.assert_allclose((rec - p).norm(dim=1).numpy(), dist.numpy(), atol=1e-6)


def test_vertex_normals_sphere_and_graph_distance():
    v, f = _octahedron()
    for _ in range(3):
        v, f, _ = loop_subdivide(v, f)
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
    vt = torch.tensor(v)
    n = vertex_normals(vt, torch.tensor(f))
    cos = (n * vt).sum(1)
    assert cos.min().item() > 0.99
    # geodesic from the +x pole to the -x pole ~ pi along mesh edges (a bit longer)
    d = graph_distances(v, f, np.array([int(np.argmax(v[:, 0]))]))
    far = d[int(np.argmin(v[:, 0]))]
    # edge chords are shorter than arcs, zig-zags longer
    assert 0.95 * math.pi <= far < math.pi * 1.15


def test_blend_offsets_matches_a_loop_over_points_and_its_gradient():
    from hravatar.head.lbs import blend_offsets

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(7, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)  # fewer than the basis holds
    out = blend_offsets(basis, coeffs)
    ref = torch.stack([torch.stack([sum(basis[n, :, m] * coeffs[b, m] for m in range(4)) for n in range(7)]) for b in range(2)])
    assert out.shape == (2, 7, 3)
    assert torch.allclose(out, ref)
    w = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    gb, gc = torch.autograd.grad((out * w).sum(), (basis, coeffs))
    # d/dbasis[n,i,m] = sum_b w[b,n,i] coeffs[b,m] (zero for the unused last column)
    assert torch.allclose(gb[..., :4], torch.einsum("bni,bm->nim", w, coeffs))
    assert torch.all(gb[..., 4] == 0)
    assert torch.allclose(gc, torch.einsum("bni,nim->bm", w, basis[..., :4]))
