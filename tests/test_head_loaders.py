"""FLAME / ICT-FaceKit loaders and MediaPipe landmark transfer.

FLAME cannot be shipped, so its tests write a SYNTHETIC file with FLAME's real keys and shapes
(5023 vertices, 9976 faces, 400 shape modes, chumpy-wrapped arrays, Python-2 string opcodes,
protocol 2) and check the loaded model against an independent numpy FLAME implementation.
ICT-FaceKit tests use ../shared/data/ict-facekit and skip when it is absent.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import uv_sphere
from scipy.spatial.transform import Rotation

from hravatar.head import HeadModel, load_head_model
from hravatar.head.flame import load_flame, read_flame_file
from hravatar.head.landmark_transfer import project_to_mesh, similarity_transform, transfer_landmarks
from hravatar.head.mesh_utils import closest_point_on_mesh
from hravatar.head.model import NUM_MEDIAPIPE_LANDMARKS
from hravatar.io.safe import CheckpointError

SHARED = Path(__file__).resolve().parents[2] / "shared"
ICT_DIR = SHARED / "data" / "ict-facekit" / "FaceXModel"
needs_ict = pytest.mark.skipif(not ICT_DIR.is_dir(), reason="../shared/data/ict-facekit is absent")


@pytest.fixture(autouse=True)
def _one_thread():
    # these tests run many small torch ops; on a shared 2-core machine two intra-op threads
    # spin against each other and make them ~30x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ============================================================================ synthetic heads
ON_VERTEX = (0, 50, 100, 200, 300, 400)  # source landmarks placed exactly on a vertex


def ellipsoid_source(seed: int = 0, nose: float = 0.0) -> HeadModel:
    """A landmark source head: an ellipsoid (optionally with a nose bump), landmarks at
    random points of its front, face region = front half."""
    g = np.random.default_rng(seed)
    v, f = uv_sphere(24, 32, 1.0)
    v = v.double() * torch.tensor([0.075, 0.09, 0.09], dtype=torch.float64)
    if nose:
        bump = torch.exp(-((v - torch.tensor([0.0, 0.0, 0.09], dtype=torch.float64)) ** 2).sum(1) / 0.03**2)
        v = v + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) * nose * bump[:, None]
    V = len(v)
    cen = v[f].mean(1)
    cand = torch.nonzero((cen[:, 2] > 0.05) & (cen[:, 1].abs() < 0.05))[:, 0].numpy()
    reg = torch.zeros(5, V)
    reg[:, 0] = 1.0
    bary = g.dirichlet(np.ones(3), NUM_MEDIAPIPE_LANDMARKS)
    bary[list(ON_VERTEX)] = [1.0, 0.0, 0.0]  # usable as exact vertex anchors
    return HeadModel(
        name="src",
        v_template=v,
        faces=f,
        shapedirs=torch.zeros(V, 3, 1),
        exprdirs=torch.zeros(V, 3, 1),
        posedirs=torch.zeros(V, 3, 36),
        J_regressor=reg,
        lbs_weights=torch.nn.functional.one_hot(torch.zeros(V, dtype=torch.long), 5).float(),
        eyelid_dirs=torch.zeros(2, V, 3),
        regions={"face": v[:, 2] > 0.03},
        lmk_faces=torch.from_numpy(g.choice(cand, NUM_MEDIAPIPE_LANDMARKS)),
        lmk_bary=torch.from_numpy(bary),
    )


def synthetic_flame_mesh():
    """FLAME-sized head: 5023 vertices, 9976 faces.

    An ellipsoid (0.15 m wide, face towards +z) of 118 rings x 40 longitudes (denser in front)
    with a top pole and an open neck, slit open (vertices duplicated along a ring) at the
    mouth and at both eyes, plus two closed eyeballs of 146 vertices behind the eye slits.
    Returns vertices, faces, eye centres (left +x first, as FLAME's joints 3/4), number of
    head vertices and the (upper, lower) vertex pairs of each slit.
    """
    L, R, m, M = 40, 118, 12, 12
    rx, ry, rz = 0.075, 0.09, 0.09
    theta = np.deg2rad(np.concatenate([np.linspace(-45, 45, 16), np.linspace(45, 315, 26)[1:-1]]))
    phi = np.deg2rad(np.linspace(6, 150, R))
    P, T = np.meshgrid(phi, theta, indexing="ij")
    head = np.concatenate([[[0, ry, 0]], np.stack([rx * np.sin(P) * np.sin(T), ry * np.cos(P), rz * np.sin(P) * np.cos(T)], -1).reshape(-1, 3)])

    def idx(r, c):
        return 1 + r * L + (c % L)

    faces = [[0, idx(0, c), idx(0, c + 1)] for c in range(L)]
    for r in range(R - 1):
        for c in range(L):
            a, b, cc, d = idx(r, c), idx(r, c + 1), idx(r + 1, c), idx(r + 1, c + 1)
            faces += [[a, cc, b], [b, cc, d]]
    faces = np.array(faces)
    deg = np.rad2deg(theta)
    r_mouth = int(np.argmin(np.abs(ry * np.cos(phi) + 0.045)))
    r_eye = int(np.argmin(np.abs(ry * np.cos(phi) - 0.02)))
    slits = {"mouth": (r_mouth, np.nonzero(np.abs(deg) < 10)[0], 0.0015),
             "eye_l": (r_eye, np.nonzero(np.abs(deg - 27) < 7)[0], 0.002),
             "eye_r": (r_eye, np.nonzero(np.abs(deg + 27) < 7)[0], 0.002)}
    new, pairs = [], {}
    for name, (r, cols, gap) in slits.items():
        pairs[name] = []
        for c in cols:
            o = idx(r, c)
            dup = len(head) + len(new)
            new.append(head[o] - [0, gap, 0])
            head[o] = head[o] + [0, gap * 0.5, 0]
            below = np.nonzero((faces == o).any(1) & (faces >= idx(r + 1, 0)).any(1))[0]
            for fi in below:
                faces[fi][faces[fi] == o] = dup
            pairs[name].append((o, dup))
    head = np.concatenate([head, np.array(new)])
    n_head = len(head)
    er = 0.012
    parts_v, parts_f, centres = [head], [faces], []
    for name in ("eye_l", "eye_r"):
        r, cols, _ = slits[name]
        c = head[[idx(r, cc) for cc in cols]].mean(0) - np.array([0, 0, er + 0.001])
        c[1] = ry * np.cos(phi[r])
        centres.append(c)
        th = np.linspace(0, np.pi, m + 2)[1:-1]
        ph = np.linspace(0, 2 * np.pi, M, endpoint=False)
        A, B = np.meshgrid(th, ph, indexing="ij")
        sv = np.concatenate([[[0, er, 0]], np.stack([er * np.sin(A) * np.sin(B), er * np.cos(A), er * np.sin(A) * np.cos(B)], -1).reshape(-1, 3), [[0, -er, 0]]]) + c
        base = sum(len(p) for p in parts_v)

        def jj(r_, l_):
            return base + 1 + r_ * M + (l_ % M)

        fs = [[base, jj(0, l_), jj(0, l_ + 1)] for l_ in range(M)]
        for r_ in range(m - 1):
            for l_ in range(M):
                a, b, cc, d = jj(r_, l_), jj(r_, l_ + 1), jj(r_ + 1, l_), jj(r_ + 1, l_ + 1)
                fs += [[a, cc, b], [b, cc, d]]
        last = base + 1 + m * M
        fs += [[last, jj(m - 1, l_ + 1), jj(m - 1, l_)] for l_ in range(M)]
        parts_v.append(sv)
        parts_f.append(np.array(fs))
    return np.concatenate(parts_v), np.concatenate(parts_f), np.array(centres), n_head, pairs


def synthetic_flame_dict(seed: int = 0) -> tuple[dict, dict]:
    """FLAME pickle content (real keys, shapes, dtypes) + extra info for the tests."""
    v, f, centres, nh, pairs = synthetic_flame_mesh()
    rng = np.random.default_rng(seed)
    V = len(v)
    J = np.array([[0, -0.075, -0.01], [0, -0.05, -0.015], [0, -0.025, 0.0], centres[0], centres[1]])
    Jr = np.zeros((5, V))
    for k in range(3):
        near = np.argsort(np.linalg.norm(v[:nh] - J[k], axis=1))[:12]
        w = rng.uniform(0.5, 1.5, 12)
        Jr[k, near] = w / w.sum()
    Jr[3, nh:nh + 146] = 1.0 / 146
    Jr[4, nh + 146:] = 1.0 / 146
    W = np.exp(-np.linalg.norm(v[:, None] - J[None], axis=-1) / 0.02)
    W[:, 3:] = 0
    W[nh:nh + 146] = [0, 0, 0, 1, 0]
    W[nh + 146:] = [0, 0, 0, 0, 1]
    W /= W.sum(1, keepdims=True)
    A = rng.normal(size=(400, 3, 3))
    b = rng.normal(size=(400, 3))
    shapedirs = 2e-3 * (np.einsum("vi,nci->vcn", v / 0.1, A) + np.sin(np.einsum("vi,ni->vn", v / 0.05, b))[:, None, :])
    d = {
        "v_template": v, "f": f.astype(np.uint32), "shapedirs": shapedirs,
        "posedirs": rng.normal(size=(V, 3, 36)) * 1e-3, "J_regressor": sp.csc_matrix(Jr), "weights": W,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "J": J, "bs_style": "lbs", "bs_type": "lrotmin",
    }
    return d, {"n_head": nh, "pairs": pairs}


class _Py2Pickler(pickle._Pickler):
    """Writes bytes / str with Python 2's ``str`` opcodes, as in the original FLAME files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def write_py2_pickle(path: Path, obj, chumpy_keys=(), protocol: int = 2) -> None:
    """Pickle ``obj`` (protocol 2, Python-2 strings); dict values under ``chumpy_keys`` are
    wrapped in a fake ``chumpy.ch.Ch`` that exists only while writing."""
    chumpy, ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x
            self._dirty_vars = set()
            self._itr = None

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch.Ch, chumpy.ch = Ch, ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, ch
    try:
        if isinstance(obj, dict):
            obj = {k: (Ch(v) if k in chumpy_keys else v) for k, v in obj.items()}
        with open(path, "wb") as fh:
            _Py2Pickler(fh, protocol=protocol).dump(obj)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


@pytest.fixture(scope="module")
def flame_dir(tmp_path_factory):
    """Folder with a synthetic generic_model.pkl (+ its arrays for the references)."""
    d, info = synthetic_flame_dict()
    folder = tmp_path_factory.mktemp("flame")
    write_py2_pickle(folder / "generic_model.pkl", d, chumpy_keys=("shapedirs", "v_template"))
    return folder, d, info


@pytest.fixture(scope="module")
def flame_model(flame_dir):
    folder, _, _ = flame_dir
    return load_flame(folder / "generic_model.pkl", landmark_source=ellipsoid_source())


# ============================================================================ FLAME
def numpy_flame(d: dict, beta: np.ndarray, psi: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Reference FLAME LBS (float64, scipy rotations). Joints are regressed from the
    identity-shaped template, as the method does (HRAvatar / HeadModel)."""
    sd = d["shapedirs"]
    Jr = d["J_regressor"].toarray()
    v_shaped = d["v_template"] + sd[:, :, : len(beta)] @ beta
    J = Jr @ v_shaped
    v = v_shaped + sd[:, :, 300:300 + len(psi)] @ psi
    Rs = Rotation.from_rotvec(pose).as_matrix()  # [5,3,3]
    v = v + d["posedirs"] @ np.concatenate([(Rs[k] - np.eye(3)).reshape(-1) for k in range(1, 5)])
    parents = [-1, 0, 1, 1, 1]
    G = []
    for k in range(5):
        local = np.eye(4)
        local[:3, :3] = Rs[k]
        local[:3, 3] = J[k] - (J[parents[k]] if k else 0)
        G.append(local if k == 0 else G[parents[k]] @ local)
    A = np.stack(G)
    A[:, :3, 3] -= np.einsum("kij,kj->ki", A[:, :3, :3], J)
    T = np.einsum("vk,kij->vij", d["weights"], A)
    return np.einsum("vij,vj->vi", T[:, :3, :3], v) + T[:, :3, 3]


def test_flame_file_is_a_real_py2_chumpy_pickle_and_loads_without_chumpy(flame_dir, flame_model):
    folder, d, _ = flame_dir
    raw = (folder / "generic_model.pkl").read_bytes()
    # the emulation is faithful: chumpy class referenced, Python-2 string opcodes, protocol 2
    assert b"chumpy.ch\nCh\n" in raw and pickle.BINSTRING in raw and raw[:2] == b"\x80\x02"
    with pytest.raises(ModuleNotFoundError):
        __import__("chumpy")  # the loader cannot have used it
    assert "chumpy" not in sys.modules
    m = flame_model
    assert (m.num_shape, m.num_expr) == (100, 50)
    assert m.num_vertices > 5023 and m.faces.shape[0] > 9976  # FLAME + teeth + mouth interior
    assert torch.equal(m.faces[:9976], torch.from_numpy(d["f"].astype(np.int64)))
    assert torch.allclose(m.v_template[:5023].double(), torch.from_numpy(d["v_template"]), atol=1e-7)
    assert torch.equal(m.parents, torch.tensor([-1, 0, 1, 1, 1]))
    assert torch.allclose(m.lbs_weights.sum(1), torch.ones(m.num_vertices), atol=1e-5)
    assert m.meta["eyelids"] == "procedural" and m.meta["regions"] == "heuristic" and m.meta["landmarks"] == "transfer"
    # transferred landmarks lie on the face / lips / eyes surface with valid barycentrics
    surf = m.region("face") | m.region("lips") | m.region("eyes")
    assert surf[m.faces[m.lmk_faces]].all() and (m.lmk_bary >= -1e-6).all()
    assert torch.allclose(m.lmk_bary.sum(1), torch.ones(NUM_MEDIAPIPE_LANDMARKS), atol=1e-5)
    # HeadModel round trip keeps everything (meta must be JSON-serialisable)
    m.save(flame_dir[0] / "flame.safetensors")
    m2 = HeadModel.load(flame_dir[0] / "flame.safetensors")
    assert m2.identity() == m.identity() and torch.equal(m2.lbs_weights, m.lbs_weights) and m2.meta == m.meta


def test_flame_n_shape_n_expr_and_bounds(flame_dir):
    folder, d, _ = flame_dir
    m = load_flame(folder, n_shape=7, n_expr=3, add_mouth=False, landmark_source=ellipsoid_source())
    assert (m.num_shape, m.num_expr, m.num_vertices) == (7, 3, 5023)
    assert torch.allclose(m.exprdirs.double(), torch.from_numpy(d["shapedirs"][:, :, 300:303]), atol=1e-7)
    with pytest.raises(ValueError, match="expression"):
        load_flame(folder, n_expr=101, landmark_source=ellipsoid_source())


def test_flame_forward_matches_numpy_reference(flame_dir, flame_model):
    _, d, _ = flame_dir
    g = np.random.default_rng(3)
    for _ in range(3):
        beta, psi = g.normal(size=100), g.normal(size=50)
        pose = g.normal(size=(5, 3)) * 0.3
        ref = numpy_flame(d, beta, psi, pose)
        out = flame_model(beta=torch.tensor(beta[None], dtype=torch.float32), psi=torch.tensor(psi[None], dtype=torch.float32),
                          pose=torch.tensor(pose[None], dtype=torch.float32))
        err = np.abs(out.vertices[0, :5023].double().numpy() - ref).max()
        assert err < 2e-5, err  # float32 vs float64 on ~0.1 m coordinates


def test_flame_teeth_follow_jaw_and_neck(flame_model):
    m = flame_model
    teeth = m.region("teeth")
    jaw_w, neck_w = m.lbs_weights[:, 2], m.lbs_weights[:, 1]
    lower = teeth & (jaw_w > 0.5)
    upper = teeth & (neck_w > 0.5)
    assert lower.sum() > 100 and upper.sum() > 100 and (lower | upper).sum() == teeth.sum()
    assert m.region("mouth_interior").sum() > 20
    # teeth are rigid: no expression, no pose correctives; a jaw rotation moves the lower
    # teeth rigidly about the jaw joint and leaves the upper teeth in place
    assert m.exprdirs[teeth].abs().max() == 0 and m.posedirs[teeth].abs().max() == 0
    pose = torch.zeros(1, 5, 3)
    pose[0, 2, 0] = 0.3
    out = m(pose=pose)
    J = m.joints_rest()[0]
    Rm = torch.from_numpy(Rotation.from_rotvec([0.3, 0, 0]).as_matrix()).float()
    expect = (m.v_template[lower] - J[2]) @ Rm.T + J[2]
    assert torch.allclose(out.vertices[0, lower], expect, atol=1e-6)
    assert torch.allclose(out.vertices[0, upper], m.v_template[upper], atol=1e-7)
    # the cavity is welded to the lips: some mouth faces use head (lip) vertices
    mouth_faces = m.faces[9976:]
    assert (mouth_faces < 5023).any()


def test_flame_procedural_eyelids_close_the_eye_slits(flame_dir, flame_model):
    _, _, info = flame_dir
    m = flame_model
    closed = m(eyelids=torch.tensor([[1.0, 1.0]])).vertices[0]
    for name, side in (("eye_r", 0), ("eye_l", 1)):
        for up, lo in info["pairs"][name]:
            opening = (m.v_template[up] - m.v_template[lo]).norm()
            assert opening > 2.5e-3
            assert (closed[up] - closed[lo]).norm() < 1e-4  # upper margin lands on the lower one
    # right lid basis (index 0) moves only the subject's right side (-x), left only +x
    moved = m.eyelid_dirs.norm(dim=-1) > 0
    assert moved[0].any() and moved[1].any()
    assert (m.v_template[moved[0], 0] < 0).all() and (m.v_template[moved[1], 0] > 0).all()
    assert not (moved.any(0) & (m.v_template[:, 1] < -0.02)).any()  # nothing near the mouth


def test_flame_eyelid_files_masks_and_embedding(flame_dir, tmp_path):
    folder, d, info = flame_dir
    for n in ("generic_model.pkl",):
        shutil.copy(folder / n, tmp_path / n)
    V = 5023
    g = np.random.default_rng(5)
    r_lid, l_lid = g.normal(size=(V, 3)) * 1e-3, g.normal(size=(V, 3)) * 1e-3
    np.save(tmp_path / "r_eyelid.npy", r_lid)
    np.save(tmp_path / "l_eyelid.npy", l_lid[None])  # SMIRK stores [1, V, 3]
    v, nh = d["v_template"], info["n_head"]
    head = np.arange(V) < nh
    lips = np.nonzero(head & (np.linalg.norm(v - [0, -0.045, 0.078], axis=1) < 0.015))[0]
    masks = {"face": np.nonzero(head & (v[:, 2] > 0.02))[0], "scalp": np.nonzero(head & (v[:, 2] <= 0.02) & (v[:, 1] > 0))[0],
             "neck": np.nonzero(head & (v[:, 2] <= 0.02) & (v[:, 1] <= 0))[0], "lips": lips,
             "left_eyeball": np.arange(nh, nh + 146), "right_eyeball": np.arange(nh + 146, V)}
    write_py2_pickle(tmp_path / "FLAME_masks.pkl", masks)
    src = ellipsoid_source()
    L_src = src.landmarks(src.v_template[None].float())[0].double().numpy()
    mp_idx = np.sort(g.choice(NUM_MEDIAPIPE_LANDMARKS, 105, replace=False))
    fi, bc, _ = project_to_mesh(L_src[mp_idx], d["v_template"], d["f"].astype(np.int64))
    np.savez(tmp_path / "mediapipe_landmark_embedding.npz", lmk_face_idx=fi, lmk_b_coords=bc, landmark_indices=mp_idx)

    m = load_flame(tmp_path / "generic_model.pkl", landmark_source=src)
    assert m.meta["eyelids"] == "files" and m.meta["regions"] == "FLAME_masks" and m.meta["landmarks"].startswith("embedding")
    assert np.allclose(m.eyelid_dirs[0, :V].double().numpy(), r_lid, atol=1e-9)
    assert np.allclose(m.eyelid_dirs[1, :V].double().numpy(), l_lid, atol=1e-9)
    assert len(lips) > 20 and m.region("lips")[lips].all() and not m.region("face")[lips].any()  # disjoint, lips win
    assert m.region("eyes")[nh:V].all() and m.region("scalp")[masks["scalp"]].all() and m.region("neck")[masks["neck"]].all()
    # embedded landmarks are used verbatim
    assert torch.equal(m.lmk_faces[mp_idx], torch.from_numpy(fi))
    assert torch.allclose(m.lmk_bary[mp_idx].double(), torch.from_numpy(bc), atol=1e-6)
    # the other 373 come from the transfer: close to where the source has them (same shape)
    L = m.landmarks(m.v_template[None])[0].double().numpy()
    err = np.linalg.norm(L - L_src, axis=1)
    others = np.setdiff1d(np.arange(NUM_MEDIAPIPE_LANDMARKS), mp_idx)
    assert np.median(err[others]) < 3e-3 and np.percentile(err[others], 95) < 8e-3, (np.median(err[others]), err[others].max())


def test_restricted_pickle_legacy_names_and_protocols(tmp_path):
    from hravatar.head.flame import read_restricted_pickle

    Jr = sp.csc_matrix(np.array([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]))
    data = {"a": np.arange(6.0).reshape(2, 3), "f": np.array([[0, 1, 2]], np.uint32), "J": Jr, "s": "lbs"}
    p = tmp_path / "legacy.pkl"
    write_py2_pickle(p, data, chumpy_keys=("a",))
    raw = p.read_bytes()
    assert b"scipy.sparse._csc\ncsc_matrix" in raw
    # Python-2 era scipy module name, as in the 2017-2020 FLAME files
    p.write_bytes(raw.replace(b"scipy.sparse._csc\ncsc_matrix", b"scipy.sparse.csc\ncsc_matrix"))
    for proto in (None, 1):
        if proto is not None:  # protocol 1 pickles objects through copy_reg._reconstructor
            write_py2_pickle(p, data, chumpy_keys=("a",), protocol=proto)
            assert b"_reconstructor" in p.read_bytes()
        got = read_restricted_pickle(p)
        assert np.array_equal(got["a"], data["a"]) and got["f"].dtype == np.uint32 and got["s"] == "lbs"
        assert sp.issparse(got["J"]) and np.array_equal(got["J"].toarray(), Jr.toarray())


def test_flame_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        load_flame(bad)
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg and "system" in msg
    assert not marker.exists()
    # nor through builtins, nor hidden in a chumpy object's state
    bad.write_bytes(pickle.dumps({"x": eval}, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        load_flame(bad)
    write_py2_pickle(bad, {"v_template": os.system}, chumpy_keys=("v_template",))
    assert b"chumpy.ch" in bad.read_bytes()
    with pytest.raises(CheckpointError, match="refused"):
        load_flame(bad)


def test_flame_missing_and_corrupted_files(tmp_path, flame_dir):
    with pytest.raises(FileNotFoundError) as e:
        load_flame(tmp_path / "generic_model.pkl")
    msg = str(e.value)
    assert "flame.is.tue.mpg.de" in msg and "generic_model.pkl" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="flame.is.tue.mpg.de"):
        load_flame(tmp_path)  # a folder without any FLAME file
    folder, _, _ = flame_dir
    cut = tmp_path / "flame2023.pkl"
    cut.write_bytes((folder / "generic_model.pkl").read_bytes()[:100_000])
    with pytest.raises(CheckpointError) as e:
        read_flame_file(cut)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)
    notflame = tmp_path / "other.pkl"
    write_py2_pickle(notflame, {"weights": np.zeros(3)})
    with pytest.raises(CheckpointError, match="not a FLAME model"):
        read_flame_file(notflame)


def test_load_head_model_dispatch(tmp_path):
    with pytest.raises(ValueError, match="builtin"):
        load_head_model("smpl:/x")
    with pytest.raises(FileNotFoundError, match="flame.is.tue.mpg.de"):
        load_head_model(f"flame:{tmp_path / 'generic_model.pkl'}")
    with pytest.raises(FileNotFoundError, match="github.com/ICT-VGL/ICT-FaceKit"):
        load_head_model(f"ict:{tmp_path / 'nothing'}")


# ============================================================================ landmark transfer
def test_similarity_transform_round_trip():
    g = np.random.default_rng(0)
    P = g.normal(size=(30, 3))
    Rm = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    Q = 1.7 * P @ Rm.T + [0.1, -2.0, 0.3]
    s, R, t = similarity_transform(P, Q)
    assert s == pytest.approx(1.7) and np.allclose(R, Rm) and np.allclose(t, [0.1, -2.0, 0.3])


def test_project_to_mesh_matches_brute_force():
    v, f = uv_sphere(10, 14, 0.1)
    v = v.double() * torch.tensor([1.0, 1.3, 0.8], dtype=torch.float64)
    g = np.random.default_rng(1)
    pts = g.normal(size=(200, 3)) * 0.08
    fi, bc, cl = project_to_mesh(pts, v.numpy(), f.numpy())
    bf_f, bf_b, bf_d = closest_point_on_mesh(torch.from_numpy(pts), v, f)
    assert np.allclose(np.linalg.norm(cl - pts, axis=1), bf_d.numpy(), atol=1e-12)
    assert np.allclose(bc.sum(1), 1.0) and (bc > -1e-12).all()
    assert np.allclose((v.numpy()[f.numpy()[fi]] * bc[..., None]).sum(1), cl, atol=1e-12)


def test_transfer_recovers_similarity_with_anchors():
    src = ellipsoid_source(nose=0.02)
    v = src.v_template.double().numpy()
    Rm = Rotation.from_rotvec([0.1, 0.25, -0.05]).as_matrix()
    dst = 12.0 * v @ Rm.T + [1.0, 2.0, -3.0]  # other units, pose and place
    L = src.landmarks(src.v_template[None])[0].double().numpy()
    L_dst = 12.0 * L @ Rm.T + [1.0, 2.0, -3.0]
    # anchors: landmarks that sit on a vertex -> that vertex of the destination
    anchors = {k: int(src.faces[src.lmk_faces[k], 0]) for k in ON_VERTEX}
    lf, lb = transfer_landmarks(src, torch.from_numpy(dst), src.faces, None, anchors)
    got = (dst[src.faces[lf].numpy()] * lb.double().numpy()[..., None]).sum(1)
    free = np.setdiff1d(np.arange(NUM_MEDIAPIPE_LANDMARKS), list(anchors))
    assert np.abs(got[free] - L_dst[free]).max() < 1e-3 * 12.0 * 0.09  # 0.1% of the head size
    for k, vi in anchors.items():
        assert np.allclose(got[k], dst[vi], atol=1e-9)


def test_transfer_without_anchors_on_a_different_mesh():
    src = ellipsoid_source(nose=0.02)
    # destination: same shape, finer tessellation, larger and shifted, no anchors; its face
    # mask covers the same part of the head as the source's face region
    v, f = uv_sphere(40, 56, 1.0)
    v = v.double() * torch.tensor([0.075, 0.09, 0.09], dtype=torch.float64)
    bump = torch.exp(-((v - torch.tensor([0.0, 0.0, 0.09], dtype=torch.float64)) ** 2).sum(1) / 0.03**2)
    v = v + torch.tensor([0.0, 0.0, 0.02], dtype=torch.float64) * bump[:, None]
    dst = v * 1.1 + torch.tensor([0.0, 0.01, -0.02], dtype=torch.float64)
    lf, lb = transfer_landmarks(src, dst, f, v[:, 2] > 0.03)
    got = (dst[f[lf]] * lb.double()[..., None]).sum(1)
    L = src.landmarks(src.v_template[None])[0].double() * 1.1 + torch.tensor([0.0, 0.01, -0.02], dtype=torch.float64)
    err = (got - L).norm(dim=-1)
    assert err.median() < 3e-3 and err.max() < 1e-2, (err.median(), err.max())
    assert torch.allclose(lb.sum(1), torch.ones(NUM_MEDIAPIPE_LANDMARKS)) and (lb >= -1e-6).all()


# ============================================================================ ICT-FaceKit
def _ict_source() -> HeadModel:
    """The built-in head when its asset exists, else the synthetic ellipsoid source."""
    try:
        from hravatar.head.builtin import load_builtin_head

        return load_builtin_head()
    except Exception:  # builtin asset not generated in this checkout
        return ellipsoid_source(nose=0.02)


@pytest.fixture(scope="module")
def ict_model(tmp_path_factory):
    if not ICT_DIR.is_dir():
        pytest.skip("../shared/data/ict-facekit is absent")
    cache = tmp_path_factory.mktemp("ict_cache")
    return load_ict_cached(cache), cache


def load_ict_cached(cache: Path):
    from hravatar.head.ict import load_ict

    return load_ict(ICT_DIR, landmark_source=_ict_source(), cache_dir=cache)


def _obj_counts(path: Path) -> tuple[int, int]:
    """(vertices, triangles after splitting polygons) counted straight from the text."""
    nv = ntri = 0
    for ln in path.read_text().splitlines():
        if ln.startswith("v "):
            nv += 1
        elif ln.startswith("f "):
            ntri += len(ln.split()) - 3
    return nv, ntri


@needs_ict
def test_ict_counts_units_and_names(ict_model):
    m, cache = ict_model
    nv, ntri = _obj_counts(ICT_DIR / "generic_neutral_mesh.obj")
    assert nv == 26719
    assert m.num_vertices == 24591  # eye overlays and eyelashes dropped
    assert m.faces.shape[0] < ntri and int(m.faces.max()) < 24591
    n_id = len(list(ICT_DIR.glob("identity[0-9][0-9][0-9].obj")))
    expr = json.loads((ICT_DIR / "vertex_indices.json").read_text())["expressions"]
    assert m.num_shape == n_id and m.expr_names == expr and "jawOpen" in m.expr_names and m.num_expr == 53
    # metres: a head is ~0.2-0.4 m tall (with neck), and the first OBJ vertex is /100
    assert 0.2 < float(np.ptp(m.v_template[:, 1].numpy())) < 0.45
    first = [float(x) for x in next(ln for ln in (ICT_DIR / "generic_neutral_mesh.obj").read_text().splitlines() if ln.startswith("v ")).split()[1:]]
    assert np.allclose(m.v_template[0].double().numpy(), np.array(first) / 100, atol=1e-7)
    assert list(cache.glob("ict-*.safetensors"))  # parsed OBJs cached


@needs_ict
def test_ict_jaw_pivot_and_jaw_rotation(ict_model):
    m, _ = ict_model
    J = m.joints_rest()[0].double().numpy()
    v = m.v_template.double().numpy()
    ears, eyes = m.region("ears").numpy(), m.region("eyes").numpy()
    assert ears.sum() > 100
    jaw = J[2]
    assert abs(jaw[0]) < 1e-3  # mid-sagittal
    assert v[ears & (v[:, 0] < 0), 0].max() < jaw[0] < v[ears & (v[:, 0] > 0), 0].min()  # between the ears
    assert jaw[1] < v[eyes, 1].min()  # below the eyes
    assert v[ears, 1].min() - 0.01 < jaw[1] < v[ears, 1].max()  # at ear height
    assert v[ears, 2].min() < jaw[2] < v[eyes, 2].min()  # behind the eyes, not behind the ears
    # rotating the jaw joint reproduces the jawOpen shape on the lower teeth
    k = m.expr_names.index("jawOpen")
    target = m.v_template.double() + m.exprdirs[:, :, k].double()
    pose = torch.zeros(1, 5, 3)
    pose[0, 2] = torch.tensor(m.meta["jaw_open_pose"])
    got = m(pose=pose).vertices[0].double()
    lower_teeth = m.region("teeth") & (m.lbs_weights[:, 2] > 0.99)
    assert lower_teeth.sum() > 1000
    moved = m.exprdirs[lower_teeth, :, k].norm(dim=-1).mean()
    err = (got - target)[lower_teeth].norm(dim=-1)
    assert moved > 0.01 and err.max() < 1e-3 and err.mean() < 0.02 * moved, (err.max(), moved)
    assert 0.1 < pose[0, 2, 0] < 1.0  # opening = positive rotation about +x


@needs_ict
def test_ict_eyes_skinning_and_landmarks(ict_model):
    m, _ = ict_model
    J = m.joints_rest()[0]
    v = m.v_template
    for k, lo, hi in ((3, 21451, 23021), (4, 23021, 24591)):
        ball = v[lo:hi]
        d = (ball - J[k]).norm(dim=-1)
        assert (ball.min(0).values < J[k]).all() and (J[k] < ball.max(0).values).all()
        assert d.min() > 0.6 * d.max()  # the centre, not a point near the surface
        assert torch.equal(m.lbs_weights[lo:hi, k], torch.ones(hi - lo))  # rigid to the eye
    assert J[3, 0] > 0 > J[4, 0]  # eye_l is the subject's left (+x)
    W = m.lbs_weights
    assert (W >= 0).all() and torch.allclose(W.sum(1), torch.ones(len(W)), atol=1e-5)
    assert torch.allclose(m.J_regressor.sum(1), torch.ones(5), atol=1e-5)
    # eyelids are ICT's eyeBlink shapes (index 0 right eye, -x)
    blink_r = m.exprdirs[:, :, m.expr_names.index("eyeBlink_R")]
    assert torch.equal(m.eyelid_dirs[0], blink_r) and (v[blink_r.norm(dim=-1) > 1e-3, 0] < 0).all()
    # landmarks: on the surface, inside the face / lips / eyes, anchors on ICT's own landmarks
    assert ((m.lmk_bary >= -1e-6) & (m.lmk_bary <= 1 + 1e-6)).all()
    assert torch.allclose(m.lmk_bary.sum(1), torch.ones(NUM_MEDIAPIPE_LANDMARKS), atol=1e-5)
    surf = m.region("face") | m.region("lips") | m.region("eyes")
    assert surf[m.faces[m.lmk_faces]].all()
    L = m.landmarks(v[None])[0].double()
    lmk68 = json.loads((ICT_DIR / "vertex_indices.json").read_text())["idx_to_landmark_verts"]
    for i68, mp in ((30, 1), (8, 152), (36, 33), (45, 263), (48, 61), (54, 291)):
        assert (L[mp] - v[lmk68[i68]].double()).norm() < 1e-6


@needs_ict
def test_ict_cache_is_used_and_rebuilt_when_damaged(ict_model):
    from hravatar.head.ict import read_ict_folder

    _, cache = ict_model
    f = next(cache.glob("ict-*.safetensors"))
    cached = read_ict_folder(ICT_DIR, cache_dir=cache)
    fresh = read_ict_folder(ICT_DIR, use_cache=False)
    for k in ("neutral", "faces", "identity", "expression", "landmarks68"):
        assert np.array_equal(cached[k], fresh[k]), k
    assert cached["expression_names"] == fresh["expression_names"]
    # the root of an ICT-FaceKit checkout works too (its FaceXModel folder is used)
    via_root = read_ict_folder(ICT_DIR.parent, cache_dir=cache)
    assert np.array_equal(via_root["expression"], fresh["expression"])
    f.write_bytes(b"garbage")
    again = read_ict_folder(ICT_DIR, cache_dir=cache)
    assert np.array_equal(again["expression"], fresh["expression"])
    assert f.stat().st_size > 1_000_000  # rewritten


@needs_ict
def test_ict_missing_files(tmp_path):
    from hravatar.head.ict import load_ict

    with pytest.raises(FileNotFoundError) as e:
        load_ict(tmp_path / "FaceXModel")
    assert "github.com/ICT-VGL/ICT-FaceKit" in str(e.value) and "\n" not in str(e.value)
    part = tmp_path / "FaceXModel"
    part.mkdir()
    for n in ("generic_neutral_mesh.obj", "vertex_indices.json"):
        shutil.copy(ICT_DIR / n, part / n)
    with pytest.raises(FileNotFoundError) as e:
        load_ict(part, use_cache=False)
    assert "browDown_L.obj" in str(e.value) and "ICT-FaceKit" in str(e.value)


def test_obj_parsing_quads_comments_and_errors(tmp_path):
    from hravatar.head.ict import read_obj_faces, read_obj_vertices

    p = tmp_path / "a.obj"
    p.write_text("# c\nmtllib x.mtl\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 2 0.5 -1e-2\nvt 0 0\nvt 1 0\nusemtl M\n"
                 "f 1/1 2/2 3/1 4/2\nf 2 5 3\n")
    assert np.array_equal(read_obj_vertices(p), [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 0.5, -0.01]])
    assert np.array_equal(read_obj_faces(p), [[0, 1, 2], [0, 2, 3], [1, 4, 2]])
    # non-contiguous vertex lines take the slow path and give the same result
    q = tmp_path / "b.obj"
    q.write_text("v 0 0 0\nvt 0 0\nv 1 2 3\n")
    assert np.array_equal(read_obj_vertices(q), [[0, 0, 0], [1, 2, 3]])
    with pytest.raises(CheckpointError, match="expected 7"):
        read_obj_vertices(p, num_vertices=7)
    r = tmp_path / "c.obj"
    r.write_text("v 0 0 x\n")
    with pytest.raises(CheckpointError, match="c.obj"):
        read_obj_vertices(r)
