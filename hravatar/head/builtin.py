"""The built-in parametric head: procedurally generated, no downloaded data.

The face surface is MediaPipe's face mesh measured on scikit-image's public-domain
``astronaut`` photo (symmetrised, metric, smile relaxed); cranium, neck, ears, eyeballs,
teeth and mouth interior are procedural. Identity and ARKit-style expression bases are
smooth analytic displacement fields around landmark anchors; skinning follows FLAME's five
joints. ``load_builtin_head()`` reads the committed asset; ``build_builtin_head()`` (needs
mediapipe + scikit-image) regenerates it deterministically:

    python -m hravatar.head.builtin [--out PATH] [--preview DIR]

Frame: metres, +y up, +z out of the face, origin midway between the pupils.
Jaw pose: a positive rotation about +x opens the mouth. ``posedirs`` are zeros.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .model import JOINT_NAMES, NUM_MEDIAPIPE_LANDMARKS, REGION_NAMES, HeadModel

#: Committed asset, resolved relative to the repository (never the working directory).
ASSET_PATH = Path(__file__).resolve().parents[2] / "assets" / "head_builtin.safetensors"
MODEL_NAME = "builtin-v1"

EYE_RADIUS = 0.012
JAW_OPEN_RAD = 0.30  # jaw rotation that the jawOpen blendshape reproduces at 1.0

SHAPE_NAMES = (
    "head_width", "head_length", "head_height", "face_width", "face_length", "jaw_width",
    "chin_length", "chin_protrusion", "nose_length", "nose_width", "nose_bridge", "eye_spacing",
    "lip_thickness", "mouth_width", "cheek_fullness", "cheekbones", "brow_ridge", "ear_size",
    "ear_protrusion", "neck_width",
)
EXPR_NAMES = (
    "jawOpen", "eyeBlink_L", "eyeBlink_R", "mouthSmile_L", "mouthSmile_R", "browInnerUp",
    "browOuterUp_L", "browOuterUp_R", "browDown_L", "browDown_R", "mouthPucker", "mouthFunnel",
    "cheekPuff", "mouthLeft", "mouthRight", "mouthPress_L", "mouthPress_R", "mouthFrown_L",
    "mouthFrown_R", "mouthStretch_L", "mouthStretch_R", "mouthRollUpper", "mouthRollLower",
    "noseSneer_L", "noseSneer_R", "eyeSquint_L", "eyeSquint_R", "eyeWide_L", "eyeWide_R",
    "jawForward", "jawLeft", "jawRight", "mouthClose", "mouthShrugUpper", "mouthShrugLower",
    "mouthDimple_L", "mouthDimple_R", "mouthUpperUp_L", "mouthUpperUp_R", "mouthLowerDown_L",
    "mouthLowerDown_R", "cheekSquint_L", "cheekSquint_R",
)


def _smoothstep(x):
    """Cubic smoothstep of x clipped to [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _gauss(X: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    """[N] isotropic Gaussian falloff exp(-|X - c|^2 / (2 r^2)) of points [N, 3]."""
    return np.exp(-0.5 * ((X - c) ** 2).sum(-1) / (r * r))


@dataclass
class _Head:
    """Everything the bases are built from (numpy, float64)."""

    V: np.ndarray
    F: np.ndarray
    lmk: np.ndarray  # [478, 3] landmark positions
    part: np.ndarray  # [V] part id: 0 skin, 1 eye skirt, 2 mouth interior, 3 teeth, 4 eyeball, 5 ear
    n_skin: int
    skin_faces: np.ndarray
    anchor: np.ndarray  # [V] skin vertex each vertex borrows its gates from
    lower_lip: np.ndarray  # [V] 0 upper side .. 1 lower side of the mouth
    d_mouth: np.ndarray  # [V] geodesic distance to the mouth opening
    eye_centres: np.ndarray  # [2, 3] (right, left)
    eye_idx: list  # eyeball vertex ids per eye (right, left)
    eye_lower: np.ndarray  # [2, V] 0 upper lid side .. 1 lower lid side
    d_eye: np.ndarray  # [2, V] geodesic distance to each eye opening
    upper_teeth: np.ndarray
    lower_teeth: np.ndarray
    cavity: np.ndarray  # mouth interior vertex ids (rim excluded: rim = lip vertices)
    cavity_rim: np.ndarray  # [len(cavity)] rim (lip) vertex each cavity vertex follows
    cavity_depth: np.ndarray  # [len(cavity)] ring index (1 = first ring behind the lips)
    cavity_jaw: np.ndarray
    ear_idx: list
    ear_r: list
    pivot: np.ndarray
    mouth_loop: np.ndarray
    eye_loops: list
    eye_upper_chain: list
    eye_lower_chain: list
    skirt_of: dict = field(default_factory=dict)  # skirt vertex -> lid vertex
    regions: dict = field(default_factory=dict)
    face_mask: np.ndarray | None = None


def _mirror_index(v: np.ndarray) -> np.ndarray:
    """[N] index of the vertex nearest to each vertex's mirror image (x -> -x)."""
    from scipy.spatial import cKDTree

    return cKDTree(v).query(v * np.array([-1.0, 1.0, 1.0]))[1]


def _split_loop(loop: np.ndarray, c0: int, c1: int, via: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a closed loop at corner vertices c0, c1 into the chain containing ``via`` and the other.

    Both chains run from the corner with smaller x to the other and include both corners.
    """
    lst = loop.tolist()
    i0, i1 = lst.index(c0), lst.index(c1)
    n = len(lst)
    a = [lst[(i0 + k) % n] for k in range((i1 - i0) % n + 1)]
    b = [lst[(i1 + k) % n] for k in range((i0 - i1) % n + 1)][::-1]
    chain_via, other = (a, b) if via in a else (b, a)
    return np.asarray(chain_via), np.asarray(other)


def _assemble() -> tuple[_Head, tuple]:
    """Measure the face, build all geometry, return it with the gates used by the bases."""
    from ._builtin_face import detect_landmarks, face_triangles, frontalize_symmetric, neutralize_mouth
    from ._builtin_skull import HeadShape, build_skin, ear_mesh, eyeball_mesh, head_half_width
    from .mesh_utils import boundary_loops, graph_distances, loop_subdivide, orient_faces, taubin_smooth
    from .mouth import build_mouth_geometry

    lmk, _ = frontalize_symmetric(detect_landmarks())
    F0 = face_triangles(lmk)
    lmk = neutralize_mouth(lmk, F0)
    fv, ff, _ = loop_subdivide(lmk[:468], F0, move_even=False)  # keeps landmark vertices exact
    loops = boundary_loops(ff)
    # MediaPipe's per-point noise shows as bumps once shaded: a light non-shrinking smoothing
    # (openings fixed so the seams and lid/lip contours keep their shape)
    rim = np.zeros(len(fv), bool)
    rim[np.concatenate(loops)] = True
    fv = taubin_smooth(fv, ff, iterations=6, lam=0.5, mu=-0.53, fixed=rim)
    fv = 0.5 * (fv + fv[_mirror_index(fv)] * np.array([-1.0, 1.0, 1.0]))
    find = lambda v: next(l for l in loops if v in set(l.tolist()))  # noqa: E731
    oval, mouth_loop, eye_r, eye_l = find(10), find(13), find(159), find(386)
    shape = HeadShape()
    skin = build_skin(fv, ff, oval, shape)
    V, F = skin.vertices, skin.faces
    n_skin = len(V)
    parts = [np.zeros(n_skin, np.int64)]
    verts = [V]
    faces = [F]
    # --- eyes: centre so that the lid margin rests on the eyeball
    eye_loops = [eye_r, eye_l]
    eye_centres = []
    for loop in eye_loops:
        m = V[loop]
        cx, cy = m[:, 0].mean(), m[:, 1].mean()
        rr = EYE_RADIUS + 0.0004
        cz = np.mean(m[:, 2] - np.sqrt(np.clip(rr**2 - (m[:, 0] - cx) ** 2 - (m[:, 1] - cy) ** 2, 0, None)))
        eye_centres.append(np.array([cx, cy, cz]))
    eye_centres = np.asarray(eye_centres)
    eye_centres[:, 0] = np.array([-1.0, 1.0]) * 0.5 * (eye_centres[1, 0] - eye_centres[0, 0])
    eye_centres[:, 1:] = eye_centres[:, 1:].mean(0)
    # eye skirts: a short lid thickness from the margin towards the eyeball (hidden edge)
    skirt_of = {}
    nv = n_skin
    for k, loop in enumerate(eye_loops):
        m = V[loop]
        d = eye_centres[k] - m
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        sk = m + 0.0025 * d
        ids = nv + np.arange(len(loop))
        for a, b in zip(ids, loop):
            skirt_of[int(a)] = int(b)
        n = len(loop)
        f = [(loop[i], loop[(i + 1) % n], ids[(i + 1) % n]) for i in range(n)] + [(loop[i], ids[(i + 1) % n], ids[i]) for i in range(n)]
        verts.append(sk)
        faces.append(np.asarray(f, np.int64))
        parts.append(np.ones(n, np.int64))
        nv += n
    # --- mouth: teeth + cavity welded to the inner lips
    upper_chain, lower_chain = _split_loop(mouth_loop, 78, 308, 13)
    pivot_target = np.array([0.0, -0.030, -0.058])
    geom = build_mouth_geometry(V[upper_chain], V[lower_chain], pivot_target, scale=1.0)
    rim_targets = np.array([upper_chain[i] if c == 0 else lower_chain[i] for c, i in geom.rim_source])
    from .mouth import weld_rim

    keep, mf, new_index = weld_rim(geom, rim_targets, nv)
    verts.append(geom.vertices[keep])
    faces.append(mf)
    lab = geom.labels[keep]
    parts.append(np.where(lab == "teeth", 3, 2))
    mouth_ids = nv + np.arange(len(keep))
    nv += len(keep)
    P = len(geom.rim)
    is_cav = (lab == "mouth_interior")
    cavity = mouth_ids[is_cav]
    cav_local = keep[is_cav]
    cavity_depth = cav_local // P
    cavity_rim = rim_targets[np.minimum(cav_local % P, P - 1)]
    cavity_jaw = geom.jaw_weight[cav_local]
    teeth_local = keep[~is_cav]
    upper_teeth = mouth_ids[~is_cav][~geom.lower[teeth_local]]
    lower_teeth = mouth_ids[~is_cav][geom.lower[teeth_local]]
    # orient the connected head surface (skin + skirts + cavity) consistently, outward
    head_faces = orient_faces(np.concatenate(faces, 0), np.concatenate(verts, 0))
    faces = [head_faces]
    # --- eyeballs
    eye_idx = []
    iris_angle = []
    for k in range(2):
        ev, ef, ea = eyeball_mesh(eye_centres[k], EYE_RADIUS)
        verts.append(ev)
        faces.append(ef + nv)
        parts.append(np.full(len(ev), 4))
        eye_idx.append(nv + np.arange(len(ev)))
        iris_angle.append(ea)
        nv += len(ev)
    # --- ears
    ear_idx, ear_r = [], []
    head_x = lambda y, z: head_half_width(y, z, shape)  # noqa: E731
    for side in (-1.0, 1.0):
        av, af, ar = ear_mesh(side, np.array([0.0, -0.010, -0.0835]), head_x)
        verts.append(av)
        faces.append(af + nv)
        parts.append(np.full(len(av), 5))
        ear_idx.append(nv + np.arange(len(av)))
        ear_r.append(ar)
        nv += len(av)
    V = np.concatenate(verts, 0)
    F = np.concatenate(faces, 0)
    part = np.concatenate(parts)
    skin_faces = skin.faces
    # --- gates (geodesic on the skin only, so upper and lower lips are far apart)
    sv = V[:n_skin]
    d_up = graph_distances(sv, skin_faces, upper_chain[1:-1])
    d_lo = graph_distances(sv, skin_faces, lower_chain[1:-1])
    # the split widens towards the mouth corners (angular blend around each corner), so the
    # upper/lower lip weights meet smoothly there
    d_corner = graph_distances(sv, skin_faces, np.array([upper_chain[0], upper_chain[-1]]))
    lower_lip = np.clip(0.5 + 0.5 * (d_up - d_lo) / (0.002 + 0.8 * d_corner), 0.0, 1.0)
    d_mouth = graph_distances(sv, skin_faces, mouth_loop)
    eye_upper_chain, eye_lower_chain, eye_lower, d_eye = [], [], [], []
    for loop, (c0, c1, via) in zip(eye_loops, ((33, 133, 159), (362, 263, 386))):
        uc, lc = _split_loop(loop, c0, c1, via)
        if V[uc[0], 0] > V[uc[-1], 0]:
            uc, lc = uc[::-1], lc[::-1]
        eye_upper_chain.append(uc)
        eye_lower_chain.append(lc)
        du = graph_distances(sv, skin_faces, uc[1:-1])
        dl = graph_distances(sv, skin_faces, lc[1:-1])
        eye_lower.append(np.clip(0.5 + (du - dl) / 0.004, 0.0, 1.0))
        d_eye.append(graph_distances(sv, skin_faces, loop))
    # non-skin vertices borrow gates from their nearest skin vertex (skirts: their lid vertex)
    from scipy.spatial import cKDTree

    anchor = np.arange(len(V))
    tree = cKDTree(sv)
    anchor[n_skin:] = tree.query(V[n_skin:])[1]
    for a, b in skirt_of.items():
        anchor[a] = b
    anchor[cavity] = cavity_rim

    def spread(x):
        return x[anchor]

    # --- iris landmarks on the eyeballs
    lmk_full = lmk.copy()
    for k, ids in enumerate(((468, 469, 470, 471, 472), (473, 474, 475, 476, 477))):
        c = eye_centres[k]
        centre2d = lmk[ids[0], :2]
        for j, li in enumerate(ids):
            off = lmk[li, :2] - centre2d
            nrm = np.linalg.norm(off)
            ang = 0.0 if j == 0 else np.radians(27.0)
            dxy = off / nrm if nrm > 0 else np.zeros(2)
            d = np.array([np.sin(ang) * dxy[0], np.sin(ang) * dxy[1], np.cos(ang)])
            lmk_full[li] = c + d * EYE_RADIUS
    return _Head(
        V=V, F=F, lmk=lmk_full, part=part, n_skin=n_skin, skin_faces=skin_faces, anchor=anchor,
        lower_lip=spread(lower_lip), d_mouth=spread(d_mouth), eye_centres=eye_centres, eye_idx=eye_idx,
        eye_lower=np.stack([spread(x) for x in eye_lower]), d_eye=np.stack([spread(x) for x in d_eye]),
        upper_teeth=upper_teeth, lower_teeth=lower_teeth, cavity=cavity, cavity_rim=cavity_rim,
        cavity_depth=cavity_depth, cavity_jaw=cavity_jaw, ear_idx=ear_idx, ear_r=ear_r, pivot=pivot_target,
        mouth_loop=mouth_loop, eye_loops=eye_loops, eye_upper_chain=eye_upper_chain,
        eye_lower_chain=eye_lower_chain, skirt_of=skirt_of,
    ), (iris_angle, skin, oval)


# ----------------------------------------------------------------------------- joints / skinning
def _ring_near(h: _Head, y: float, tol: float = 0.004) -> np.ndarray:
    """Skin vertices of the procedural neck/scalp within ``tol`` of height y (sorted ids)."""
    skin = np.arange(h.n_skin)
    return skin[np.abs(h.V[:h.n_skin, 1] - y) < tol]


def _joint_regressor(h: _Head) -> np.ndarray:
    """[5, V] joint regressor with a few symmetric vertex sets per joint (rows sum to 1)."""
    V = h.V
    Vn = len(V)
    J = np.zeros((5, Vn))
    # root: a full ring of neck vertices at the base of the neck
    ring_root = _ring_near(h, -0.150)
    J[0, ring_root] = 1.0 / len(ring_root)
    # neck (skull base): blend of a neck ring and a scalp ring to land at the target height
    ring_a = _ring_near(h, -0.120)
    ring_b = _ring_near(h, 0.075)
    ya, yb, target = V[ring_a, 1].mean(), V[ring_b, 1].mean(), -0.055
    alpha = (target - yb) / (ya - yb)
    J[1, ring_a] = alpha / len(ring_a)
    J[1, ring_b] = (1.0 - alpha) / len(ring_b)
    # jaw: skin points just in front of the ears, left/right pairs
    skin = V[:h.n_skin]
    ids = []
    for side in (-1.0, 1.0):
        tgt = np.array([side * 0.07, h.pivot[1], h.pivot[2]])
        d = np.linalg.norm(skin - tgt, axis=1)
        d[np.sign(skin[:, 0]) != side] = np.inf
        ids.append(np.argsort(d)[:4])
    # enforce exact left/right symmetry by pairing mirror vertices
    right = ids[0]
    mir = skin[right] * np.array([-1.0, 1.0, 1.0])
    left = np.array([int(np.argmin(np.linalg.norm(skin - m, axis=1))) for m in mir])
    jaw_ids = np.concatenate([right, left])
    J[2, jaw_ids] = 1.0 / len(jaw_ids)
    # eyes: the equator ring of each eyeball (centre exactly)
    for row, k in ((3, 1), (4, 0)):
        ev = h.eye_idx[k]
        eq = ev[np.abs(V[ev, 2] - h.eye_centres[k, 2]) < 1e-3 * EYE_RADIUS + 1e-9]
        if len(eq) == 0:
            eq = ev
        J[row, eq] = 1.0 / len(eq)
    return J


def _skinning(h: _Head, joints: np.ndarray) -> np.ndarray:
    """[V, 5] smooth LBS weights (root, neck, jaw, eye_l, eye_r)."""
    from .mesh_utils import smooth_vertex_values

    V = h.V
    Vn = len(V)
    X = V
    pivot = joints[2]
    # jaw: below the plane through the mouth corners and the pivot, lips by side, faded on the neck
    cl, cr = h.lmk[291], h.lmk[61]
    mid = 0.5 * (cl + cr)
    axis = (cl - cr) / np.linalg.norm(cl - cr)
    n = np.cross(axis, pivot - mid)
    n /= np.linalg.norm(n)
    if n[1] < 0:
        n = -n
    sd = (X - mid) @ n
    w_plane = 1.0 - _smoothstep((sd + 0.010) / 0.024)
    w_lip = _smoothstep((h.lower_lip - 0.15) / 0.7)
    near = np.exp(-((h.d_mouth / 0.014) ** 2))
    w = (1 - near) * w_plane + near * w_lip
    ws = w.copy()
    ws[: h.n_skin] = smooth_vertex_values(w[: h.n_skin], h.skin_faces, iterations=8, lam=0.5)
    # keep the lip seam sharp: lips take the unsmoothed side split
    lips_close = h.d_mouth < 0.004
    ws[lips_close] = w[lips_close]
    w = ws
    # smooth spatial fades after the smoothing so the whole chin stays on the jaw
    chin_y = h.lmk[152, 1]
    w *= _smoothstep((X[:, 1] - (chin_y - 0.050)) / 0.035)  # fade down the throat
    w *= _smoothstep((X[:, 2] - (pivot[2] - 0.022)) / 0.022)  # nothing behind the jaw joint
    w[h.part == 5] = 0.0
    w[h.part == 1] = w[h.anchor[h.part == 1]]
    w[h.upper_teeth] = 0.0
    w[h.lower_teeth] = 1.0
    w[h.cavity] = h.cavity_jaw
    # root on the lower neck, neck joint for the head
    root_hi, root_lo = joints[0, 1] + 0.03, joints[0, 1] - 0.04
    w_root = 1.0 - _smoothstep((X[:, 1] - root_lo) / (root_hi - root_lo))
    w_root[h.part == 5] = 0.0
    W = np.zeros((Vn, 5))
    W[:, 2] = w * (1 - w_root)
    W[:, 0] = w_root
    W[:, 1] = 1.0 - W[:, 0] - W[:, 2]
    for k, col in ((0, 4), (1, 3)):  # right eye -> eye_r column 4, left -> eye_l column 3
        W[h.eye_idx[k]] = 0.0
        W[h.eye_idx[k], col] = 1.0
    return W / W.sum(1, keepdims=True)


def _lbs_numpy(V: np.ndarray, W: np.ndarray, joints: np.ndarray, k: int, R: np.ndarray, t: np.ndarray | None = None) -> np.ndarray:
    """[V, 3] vertices after rotating joint k by R (and translating by t) with weights W."""
    p = joints[k]
    moved = (V - p) @ R.T + p + (0 if t is None else t)
    return V + W[:, k:k + 1] * (moved - V)


def _rot(axis: np.ndarray, ang: float) -> np.ndarray:
    """[3, 3] rotation about a unit axis by ang radians."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K


# ----------------------------------------------------------------------------- eyelids
def _eyelid_dirs(h: _Head) -> np.ndarray:
    """[2, V, 3] upper lid closes onto the lower lid (index 0 right eye, 1 left eye)."""
    V = h.V
    out = np.zeros((2, len(V), 3))
    for k in range(2):
        c = h.eye_centres[k]
        uc, lc = h.eye_upper_chain[k], h.eye_lower_chain[k]
        up, lo = V[uc], V[lc]
        # meeting line: 20 % of the way from the lower to the upper lid, at the same x
        lo_y = np.interp(up[:, 0], lo[:, 0], lo[:, 1])
        lo_z = np.interp(up[:, 0], lo[:, 0], lo[:, 2])
        meet = np.stack([up[:, 0], lo_y + 0.2 * (up[:, 1] - lo_y), lo_z + 0.2 * (up[:, 2] - lo_z)], -1)
        rr = EYE_RADIUS + 0.0008
        dm = meet - c
        meet = c + dm * np.maximum(1.0, rr / np.linalg.norm(dm, axis=1))[:, None]
        D_up = meet - up
        up_x = V[uc, 0]
        lo_meet = np.stack([lo[:, 0], np.interp(lo[:, 0], meet[:, 0], meet[:, 1]), np.interp(lo[:, 0], meet[:, 0], meet[:, 2])], -1)
        D_lo = lo_meet - lo
        lo_x = V[lc, 0]
        skin_like = np.isin(h.part, (0, 1))
        idx = np.nonzero(skin_like & (h.d_eye[k] < 0.03))[0]
        for vi in idx:
            side_low = h.eye_lower[k, vi]
            x = V[vi, 0]
            du = np.array([np.interp(x, up_x, D_up[:, j]) for j in range(3)])
            dl = np.array([np.interp(x, lo_x, D_lo[:, j]) for j in range(3)])
            d = h.d_eye[k, vi]
            w_up = (1.0 - _smoothstep(d / 0.013)) * (1.0 - side_low)
            w_lo = (1.0 - _smoothstep(d / 0.007)) * side_low
            disp = w_up * du + w_lo * dl
            p = V[vi] + disp
            r = np.linalg.norm(p - c)
            # the lid slides over the eyeball; the skirt stays just under the lid
            floor = rr if h.part[vi] == 0 else EYE_RADIUS - 0.0015
            if r < floor and d < 0.012:
                p = c + (p - c) * floor / max(r, 1e-9)
            out[k, vi] = p - V[vi]
        # skirt vertices copy their lid vertex so the lid edge keeps its thickness
        for a, b in h.skirt_of.items():
            if h.d_eye[k, a] < 1e-9:
                out[k, a] = out[k, b]
    return out


# ----------------------------------------------------------------------------- bases
class _Fields:
    """Helpers to write displacement fields over all vertices."""

    def __init__(self, h: _Head):
        self.h = h
        self.X = h.V
        self.skin_like = np.isin(h.part, (0, 1, 5))

    def lm(self, i: int) -> np.ndarray:
        return self.h.lmk[i]

    def bump(self, c, r: float, vec, gate=None) -> np.ndarray:
        """[V, 3] displacement vec * gauss(|x - c|, r) * gate on skin-like vertices."""
        w = _gauss(self.X, np.asarray(c, float), r)
        if gate is not None:
            w = w * gate
        w = w * self.skin_like
        return w[:, None] * np.asarray(vec, float)[None]

    @property
    def upper(self) -> np.ndarray:
        return 1.0 - self.h.lower_lip

    @property
    def lower(self) -> np.ndarray:
        return self.h.lower_lip


def _finish(h: _Head, D: np.ndarray, rigid_eyes: bool = True) -> np.ndarray:
    """Attach the inner parts to a skin displacement field D [V, 3] (returns a new [V, 3]).

    Eyeballs move rigidly with their lid opening (or stay), the cavity follows its lip rim
    and fades with depth, teeth stay (only the jaw moves them).
    """
    D = D.copy()
    for k in range(2):
        ids = h.eye_idx[k]
        if rigid_eyes:
            loop = h.eye_loops[k]
            D[ids] = D[loop].mean(0)
        else:
            D[ids] = 0.0
    fade = np.clip(1.0 - (h.cavity_depth - 1) / 3.0, 0.0, 1.0)
    D[h.cavity] = D[h.cavity_rim] * fade[:, None]
    D[h.upper_teeth] = 0.0
    D[h.lower_teeth] = 0.0
    return D


def _shape_bases(h: _Head, fld: _Fields) -> np.ndarray:
    """[V, 3, S] identity modes (about one standard deviation each at 1.0)."""
    X = h.V
    L = fld.lm
    from .mesh_utils import smooth_vertex_values

    # a soft face weight: a hard face/scalp split would crease the surface at the seam
    face_soft = h.face_mask.astype(float)
    face_soft[: h.n_skin] = smooth_vertex_values(face_soft[: h.n_skin], h.skin_faces, iterations=40, lam=0.5)
    face_soft[h.n_skin:] = face_soft[h.anchor[h.n_skin:]]
    not_neck = _smoothstep((X[:, 1] + 0.12) / 0.04)
    out = []
    x, y, z = X[:, 0], X[:, 1], X[:, 2]
    head_c_z = -0.080
    # head width / length / height: scale the cranium, less on the face
    out.append(np.stack([0.035 * x * (1 - 0.7 * face_soft) * not_neck, 0 * x, 0 * x], -1))
    out.append(np.stack([0 * x, 0 * x, 0.06 * np.minimum(z - head_c_z, 0) * not_neck], -1))
    out.append(np.stack([0 * x, 0.05 * np.maximum(y - 0.0, 0) * (1 - 0.5 * face_soft), 0 * x], -1))
    # face width / length
    g_face = _smoothstep((0.02 - y) / 0.05) * not_neck
    out.append(np.stack([0.05 * x * g_face, 0 * x, 0 * x], -1))
    out.append(np.stack([0 * x, 0.06 * np.minimum(y - L(2)[1], 0) * _smoothstep((X[:, 2] + 0.09) / 0.03), 0 * x], -1))
    # jaw width: gonial region
    jaw = np.zeros_like(X)
    for i in (172, 397):
        jaw += fld.bump(L(i), 0.022, [np.sign(L(i)[0]) * 0.004, 0, 0])
    out.append(jaw)
    out.append(fld.bump(L(152), 0.018, [0, -0.004, 0.0]) + fld.bump(L(199), 0.014, [0, -0.0015, 0]))
    out.append(fld.bump(L(152) + np.array([0, 0.008, 0.004]), 0.016, [0, 0, 0.0045]))
    out.append(fld.bump(L(1), 0.011, [0, -0.002, 0.003]) + fld.bump(L(2), 0.008, [0, -0.0015, 0.001]))
    nw = np.zeros_like(X)
    for i in (129, 358, 98, 327):
        nw += fld.bump(L(i), 0.006, [np.sign(L(i)[0]) * 0.0018, 0, 0])
    out.append(nw)
    out.append(fld.bump(L(6), 0.009, [0, 0, 0.0025]) + fld.bump(L(197), 0.009, [0, 0, 0.002]))
    es = np.zeros_like(X)
    for k in range(2):
        c = h.eye_centres[k]
        es += fld.bump(c, 0.016, [np.sign(c[0]) * 0.0025, 0, 0])
    out.append(es)
    out.append(
        fld.bump(L(0), 0.011, [0, 0.0016, 0.0012], fld.upper * (h.d_mouth < 0.02)) + fld.bump(L(17), 0.011, [0, -0.0018, 0.0012], fld.lower * (h.d_mouth < 0.02))
    )
    mw = np.zeros_like(X)
    for i in (61, 291):
        mw += fld.bump(L(i), 0.012, [np.sign(L(i)[0]) * 0.003, 0, -0.001])
    out.append(mw)
    cf = np.zeros_like(X)
    for i in (205, 425):
        cf += fld.bump(L(i) + np.array([np.sign(L(i)[0]) * 0.005, 0, -0.01]), 0.02, [np.sign(L(i)[0]) * 0.004, 0, 0.002])
    out.append(cf)
    cb = np.zeros_like(X)
    for i in (116, 345):
        cb += fld.bump(L(i), 0.015, [np.sign(L(i)[0]) * 0.003, 0.0005, 0.002])
    out.append(cb)
    br = np.zeros_like(X)
    for i in (9, 105, 334, 70, 300):
        br += fld.bump(L(i) + np.array([0, 0.004, 0]), 0.012, [0, 0, 0.0022])
    out.append(br)
    # ears: scale about their attachment / rotate outwards
    es2, ep = np.zeros_like(X), np.zeros_like(X)
    for k, ids in enumerate(h.ear_idx):
        cen = X[ids].mean(0)
        es2[ids] = 0.08 * (X[ids] - cen) * np.array([0.5, 1, 1])
        side = np.sign(cen[0])
        back = np.clip((cen[2] - X[ids, 2]) / 0.02, 0, 1.5)
        ep[ids, 0] = side * 0.005 * back
    out.append(es2)
    out.append(ep)
    neck = (1 - _smoothstep((X[:, 1] + 0.10) / 0.03)) * fld.skin_like
    out.append(np.stack([0.08 * x * neck, 0 * x, 0.06 * (z + 0.078) * neck], -1))
    bases = []
    for D in out:
        D = D * np.isin(h.part, (0, 1, 2, 3, 4, 5))[:, None]
        B = D.copy()
        # inner parts: eyes rigid with their socket, teeth/cavity follow the field itself
        for k in range(2):
            B[h.eye_idx[k]] = D[h.eye_loops[k]].mean(0)
        bases.append(B)
    return np.stack(bases, -1)


def _expr_bases(h: _Head, fld: _Fields, W: np.ndarray, joints: np.ndarray, eyelids: np.ndarray) -> np.ndarray:
    """[V, 3, E] ARKit-style expression modes, in the order of ``EXPR_NAMES``."""
    X = h.V
    L = fld.lm
    up, lo = fld.upper, fld.lower
    mouth = h.d_mouth
    B = {}
    # jaw-driven modes: the displacement the jaw joint itself would produce
    jaw_open = _lbs_numpy(X, W, joints, 2, _rot([1, 0, 0], JAW_OPEN_RAD)) - X
    B["jawOpen"] = jaw_open
    B["jawLeft"] = _lbs_numpy(X, W, joints, 2, _rot([0, 1, 0], 0.07)) - X
    B["jawRight"] = _lbs_numpy(X, W, joints, 2, _rot([0, 1, 0], -0.07)) - X
    B["jawForward"] = W[:, 2:3] * np.array([0.0, 0.0, 0.005])
    lip_zone = (mouth < 0.03) * np.isin(h.part, (0, 2))
    B["mouthClose"] = _finish(h, -jaw_open * (lo * _smoothstep(1 - mouth / 0.02) * lip_zone)[:, None] * 0.9
                              + fld.bump(L(13), 0.012, [0, -0.002, 0], up * (mouth < 0.015)))
    for name, side in (("_L", 1.0), ("_R", -1.0)):
        corner = L(291 if side > 0 else 61)
        cheek = L(425 if side > 0 else 205)
        eye = 1 if side > 0 else 0
        s = side
        B["mouthSmile" + name] = _finish(h, fld.bump(corner, 0.014, [0.004 * s, 0.006, -0.003]) + fld.bump(cheek, 0.02, [0.0015 * s, 0.003, 0.001])
                                         + fld.bump(L(347 if s > 0 else 118), 0.012, [0, 0.0012, 0]))
        B["mouthFrown" + name] = _finish(h, fld.bump(corner, 0.013, [0.001 * s, -0.005, 0.0]) + fld.bump(L(406 if s > 0 else 182), 0.012, [0, -0.002, 0.0005]))
        B["mouthDimple" + name] = _finish(h, fld.bump(corner, 0.011, [0.003 * s, 0.0, -0.004]))
        B["mouthStretch" + name] = _finish(h, fld.bump(corner, 0.015, [0.005 * s, -0.002, -0.002]) + fld.bump(L(321 if s > 0 else 91), 0.012, [0.002 * s, -0.003, 0], lo))
        B["mouthPress" + name] = _finish(h, fld.bump(L(311 if s > 0 else 81), 0.010, [0, -0.0015, -0.001], up * (mouth < 0.02))
                                         + fld.bump(L(402 if s > 0 else 178), 0.010, [0, 0.0015, -0.001], lo * (mouth < 0.02)))
        B["mouthUpperUp" + name] = _finish(h, fld.bump(L(267 if s > 0 else 37), 0.010, [0, 0.005, 0.001], up))
        B["mouthLowerDown" + name] = _finish(h, fld.bump(L(314 if s > 0 else 84), 0.011, [0, -0.005, 0.001], lo))
        B["noseSneer" + name] = _finish(h, fld.bump(L(358 if s > 0 else 129), 0.008, [0, 0.003, 0.0005]) + fld.bump(L(351 if s > 0 else 122), 0.009, [0, 0.002, 0])
                                        + fld.bump(L(285 if s > 0 else 55), 0.01, [-0.001 * s, -0.0015, 0]))
        B["cheekSquint" + name] = _finish(h, fld.bump(L(330 if s > 0 else 101), 0.013, [0, 0.0035, 0.001]) + fld.bump(L(374 if s > 0 else 145), 0.006, [0, 0.001, 0], h.eye_lower[eye]))
        B["browOuterUp" + name] = _finish(h, fld.bump(L(300 if s > 0 else 70), 0.014, [0, 0.007, 0.0]) + fld.bump(L(293 if s > 0 else 63), 0.013, [0, 0.004, 0]))
        B["browDown" + name] = _finish(h, fld.bump(L(296 if s > 0 else 66), 0.014, [-0.002 * s, -0.005, 0.001]) + fld.bump(L(336 if s > 0 else 107), 0.01, [-0.0015 * s, -0.002, 0.001]))
        B["eyeBlink" + name] = _finish(h, eyelids[eye], rigid_eyes=False)
        lidgate_lo = h.eye_lower[eye] * (h.d_eye[eye] < 0.02)
        B["eyeSquint" + name] = _finish(h, 0.25 * eyelids[eye] * (1 - h.eye_lower[eye])[:, None] + fld.bump(L(374 if s > 0 else 145), 0.008, [0, 0.002, 0.0005], lidgate_lo), rigid_eyes=False)
        # widen: the upper lid retracts up over the eyeball (reverse of a partial blink)
        B["eyeWide" + name] = _finish(h, -0.22 * eyelids[eye] * (1 - h.eye_lower[eye])[:, None] + fld.bump(L(334 if s > 0 else 105), 0.015, [0, 0.0015, 0]), rigid_eyes=False)
    mc = 0.5 * (L(13) + L(14))
    B["browInnerUp"] = _finish(h, fld.bump(L(336), 0.013, [0, 0.006, 0]) + fld.bump(L(107), 0.013, [0, 0.006, 0]) + fld.bump(L(9), 0.015, [0, 0.003, 0]))
    pk = np.zeros_like(X)
    for i in (61, 291):
        pk += fld.bump(L(i), 0.012, [-np.sign(L(i)[0]) * 0.008, 0, 0.004])
    pk += fld.bump(mc, 0.016, [0, 0, 0.007])
    B["mouthPucker"] = _finish(h, pk)
    fn = np.zeros_like(X)
    for i in (61, 291):
        fn += fld.bump(L(i), 0.012, [-np.sign(L(i)[0]) * 0.005, 0, 0.003])
    fn += fld.bump(L(0), 0.012, [0, 0.003, 0.005], up) + fld.bump(L(17), 0.012, [0, -0.004, 0.005], lo)
    B["mouthFunnel"] = _finish(h, fn)
    cp = np.zeros_like(X)
    for i in (205, 425):
        c = L(i) + np.array([np.sign(L(i)[0]) * 0.004, -0.004, -0.012])
        cp += fld.bump(c, 0.02, [np.sign(L(i)[0]) * 0.008, 0, 0.003])
    B["cheekPuff"] = _finish(h, cp)
    B["mouthLeft"] = _finish(h, fld.bump(mc, 0.018, [0.007, 0, 0]))
    B["mouthRight"] = _finish(h, fld.bump(mc, 0.018, [-0.007, 0, 0]))
    B["mouthRollUpper"] = _finish(h, fld.bump(L(0), 0.011, [0, -0.002, -0.0045], up * (mouth < 0.02)))
    B["mouthRollLower"] = _finish(h, fld.bump(L(17), 0.011, [0, 0.002, -0.0045], lo * (mouth < 0.025)))
    B["mouthShrugUpper"] = _finish(h, fld.bump(L(0), 0.013, [0, 0.003, 0.0015], up))
    B["mouthShrugLower"] = _finish(h, fld.bump(L(17), 0.014, [0, 0.004, 0.002], lo) + fld.bump(L(152), 0.02, [0, 0.002, 0.001]))
    return np.stack([B[n] for n in EXPR_NAMES], -1)


# ----------------------------------------------------------------------------- regions / colours
def _regions(h: _Head, lips: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean region masks [V] per REGION_NAMES."""
    X = h.V
    skin = h.part == 0
    hair = _hair_mask(h) > 0.5
    neck = skin & (X[:, 1] < h.lmk[152, 1] - 0.012) & ~h.face_mask
    face = (h.face_mask | (h.part == 1)) & ~lips
    return {
        "face": face | lips,
        "scalp": hair & skin & ~h.face_mask,
        "ears": h.part == 5,
        "neck": neck,
        "eyes": h.part == 4,
        "lips": lips,
        "teeth": h.part == 3,
        "mouth_interior": h.part == 2,
    }


def _hair_mask(h: _Head) -> np.ndarray:
    """[V] soft hair coverage on the cranium (1 = hair)."""
    X = h.V
    y, z = X[:, 1], X[:, 2]
    # hairline height: high over the forehead and temples, low at the nape
    line = np.interp(z, [-0.20, -0.13, -0.095, -0.070, -0.05, 0.1], [-0.075, -0.060, 0.012, 0.032, 0.047, 0.052])
    m = _smoothstep((y - line) / 0.012) * (h.part == 0) * ~h.face_mask
    from .mesh_utils import smooth_vertex_values

    m[: h.n_skin] = smooth_vertex_values(m[: h.n_skin], h.skin_faces, iterations=6, lam=0.5)
    return m


def _colors(h: _Head, regions: dict[str, np.ndarray], iris_angle) -> np.ndarray:
    """[V, 3] procedural albedo."""
    X = h.V
    skin = np.array([0.80, 0.60, 0.50])
    C = np.tile(skin, (len(X), 1))
    # a little redness on cheeks, nose tip and ears
    red = np.array([0.82, 0.52, 0.46])
    for i in (205, 425, 1):
        w = _gauss(X, h.lmk[i], 0.015)[:, None] * 0.6
        C = C * (1 - w) + red * w
    lips = regions["lips"].astype(float)
    from .mesh_utils import smooth_vertex_values

    lw = lips.copy()
    lw[: h.n_skin] = smooth_vertex_values(lips[: h.n_skin], h.skin_faces, iterations=2, lam=0.5)
    lw = np.clip(lw, 0, 1)[:, None]
    C = C * (1 - lw) + np.array([0.66, 0.36, 0.36]) * lw
    # eyebrows: darken along the brow curves
    brow = np.zeros(len(X))
    from ._builtin_face import BROW_L, BROW_R

    for ids in (BROW_R, BROW_L):
        # dense samples along the brow's mid curve, thicker towards the inner end
        mid = 0.5 * (h.lmk[list(ids[:5])] + h.lmk[list(ids[5:])])
        for t in np.linspace(0.0, 4.0, 25):
            i = min(int(t), 3)
            c = mid[i] + (t - i) * (mid[i + 1] - mid[i])
            brow = np.maximum(brow, _gauss(X, c, 0.0022 + 0.0009 * t / 4.0))
    brow *= np.isin(h.part, (0,))
    hair_c = np.array([0.16, 0.11, 0.08])
    bw = (np.clip(brow * 1.3, 0, 1) * 0.7)[:, None]
    C = C * (1 - bw) + hair_c * bw
    hm = _hair_mask(h)[:, None]
    C = C * (1 - hm) + hair_c * hm
    C[h.part == 1] = np.array([0.55, 0.30, 0.28])  # inner lid edge, moist
    C[h.part == 3] = np.array([0.93, 0.90, 0.82])
    # gums: the part of the teeth next to the gum line is pink
    C[h.part == 2] = np.array([0.45, 0.12, 0.12])
    for k in range(2):
        ids = h.eye_idx[k]
        a = iris_angle[k]
        col = np.tile(np.array([0.95, 0.94, 0.92]), (len(ids), 1))
        col[a < 29.5] = np.array([0.32, 0.22, 0.14])
        col[a < 24] = np.array([0.40, 0.28, 0.17])
        col[a < 11] = np.array([0.03, 0.03, 0.03])
        C[ids] = col
    return np.clip(C, 0, 1)


def _lips_mask(h: _Head) -> np.ndarray:
    """[V] bool skin vertices between the inner and the outer lip contour.

    A vertex belongs to the lips when it is geodesically closer to the mouth opening than
    to the outer lip contour (MediaPipe's lip outline), and within 2 cm of the opening.
    """
    from ._builtin_face import OUTER_LIP
    from .mesh_utils import graph_distances

    inside = np.zeros(len(h.V), bool)
    d_o = graph_distances(h.V[: h.n_skin], h.skin_faces, np.array(sorted(OUTER_LIP)))
    d_i = h.d_mouth[: h.n_skin]
    inside[: h.n_skin] = (d_i <= d_o + 1e-9) & (d_i < 0.02)
    return inside


# ----------------------------------------------------------------------------- public API
def build_builtin_head() -> HeadModel:
    """Generate the built-in head from scratch (deterministic; needs mediapipe + scikit-image).

    Returns:
        :class:`HeadModel` named ``builtin-v1`` with V ~ 11k vertices, 20 shape modes,
        43 ARKit-named expression modes, zero posedirs.
    """
    h, (iris_angle, skin, oval) = _assemble()
    Vn = len(h.V)
    face_mask = np.zeros(Vn, bool)
    face_mask[: h.n_skin] = ~skin.is_grid
    h.face_mask = face_mask
    lips = _lips_mask(h)
    regions = _regions(h, lips)
    J = _joint_regressor(h)
    joints = J @ h.V
    W = _skinning(h, joints)
    # the photo's eyes are wide open; rest the upper lids a little lower (then recompute)
    lids = _eyelid_dirs(h)
    h.V = h.V + 0.12 * (lids[0] + lids[1])
    eyelids = _eyelid_dirs(h)
    fld = _Fields(h)
    shapedirs = _shape_bases(h, fld)
    exprdirs = _expr_bases(h, fld, W, joints, eyelids)
    colors = _colors(h, regions, iris_angle)
    # landmarks: face points are vertices; irises are projected on their eyeball
    from .mesh_utils import closest_point_on_mesh

    F = h.F
    lmk_faces = np.zeros(NUM_MEDIAPIPE_LANDMARKS, np.int64)
    lmk_bary = np.zeros((NUM_MEDIAPIPE_LANDMARKS, 3))
    first_face = {}
    for fi, f in enumerate(F):
        for c, v in enumerate(f):
            if v < 468 and int(v) not in first_face:
                first_face[int(v)] = (fi, c)
    for i in range(468):
        fi, c = first_face[i]
        lmk_faces[i] = fi
        lmk_bary[i, c] = 1.0
    for k, ids in enumerate(((468, 469, 470, 471, 472), (473, 474, 475, 476, 477))):
        ev = set(h.eye_idx[k].tolist())
        fmask = np.array([f[0] in ev for f in F])
        fids = np.nonzero(fmask)[0]
        fi, bc, _ = closest_point_on_mesh(torch.tensor(h.lmk[list(ids)]), torch.tensor(h.V), torch.tensor(F[fids]))
        lmk_faces[list(ids)] = fids[fi.numpy()]
        lmk_bary[list(ids)] = bc.numpy()
    meta = {
        "source": "MediaPipe face mesh on skimage.data.astronaut (public domain) + procedural parts",
        "units": "metres, +y up, +z forward, origin between the pupils",
        "jaw_open_axis": "+x (positive angle opens)",
        "posedirs": "zeros",
        "jaw_open_blendshape_rad": JAW_OPEN_RAD,
    }
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    return HeadModel(
        name=MODEL_NAME,
        v_template=t(h.V),
        faces=torch.as_tensor(F, dtype=torch.int64),
        shapedirs=t(shapedirs),
        exprdirs=t(exprdirs),
        posedirs=torch.zeros(Vn, 3, (len(JOINT_NAMES) - 1) * 9),
        J_regressor=t(J),
        lbs_weights=t(W),
        eyelid_dirs=t(eyelids),
        regions={k: torch.as_tensor(v) for k, v in regions.items() if k in REGION_NAMES},
        lmk_faces=torch.as_tensor(lmk_faces),
        lmk_bary=t(lmk_bary),
        expr_names=list(EXPR_NAMES),
        shape_names=list(SHAPE_NAMES),
        vertex_colors=t(colors),
        meta=meta,
    )


def load_builtin_head(path: str | Path | None = None) -> HeadModel:
    """Load the committed built-in head asset (regenerating it only if it is missing).

    Args:
        path: asset file; default ``assets/head_builtin.safetensors`` of the repository.
    Returns:
        :class:`HeadModel`.
    Raises:
        hravatar.io.safe.CheckpointError: the file exists but is not a valid head model.
    """
    p = Path(path) if path is not None else ASSET_PATH
    if not p.exists():
        print(f"{p}: built-in head asset missing, regenerating it (needs mediapipe and scikit-image)", file=sys.stderr)
        model = build_builtin_head()
        model.save(p)
        return model
    return HeadModel.load(p)


def write_previews(model: HeadModel, out_dir: str | Path, size: int = 320) -> list[Path]:
    """Render shaded preview PNGs of a head model (needs matplotlib for the labels).

    Writes ``head_builtin_views.png`` (front, 3/4, profile, back), ``head_builtin_expressions.png``
    and ``head_builtin_shapes.png`` into ``out_dir``; returns their paths.
    """
    import imageio.v3 as iio

    from ._builtin_preview import image_grid, render_mesh

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    faces = model.faces.numpy()
    col = model.vertex_colors.numpy()
    target = np.array([0.0, -0.04, -0.05])
    E = model.num_expr

    def pose_render(psi=None, jaw=0.0, eyelids=None, beta=None, yaw=25.0, dist=0.75):
        pose = torch.zeros(1, 5, 3)
        pose[0, 2, 0] = jaw
        out = model(beta=beta, psi=psi, pose=pose, eyelids=eyelids)
        return render_mesh(out.vertices[0].numpy(), faces, col, yaw, 0.0, size, target=target, distance=dist)

    paths = []
    with torch.no_grad():
        views = [pose_render(yaw=y, dist=0.9) for y in (0.0, 35.0, 90.0, 180.0)]
        p = out_dir / "head_builtin_views.png"
        iio.imwrite(p, image_grid(views, ["front", "3/4", "profile", "back"], cols=4))
        paths.append(p)
        tgt = np.array([0.0, -0.02, 0.0])

        def face_render(psi=None, jaw=0.0, eyelids=None, yaw=20.0):
            pose = torch.zeros(1, 5, 3)
            pose[0, 2, 0] = jaw
            out = model(psi=psi, pose=pose, eyelids=eyelids)
            return render_mesh(out.vertices[0].numpy(), faces, col, yaw, 0.0, size, target=tgt, distance=0.55)

        items = [("neutral", None, 0.0, None), ("jaw open (joint 0.35)", None, 0.35, None)]
        for name in ("jawOpen", "eyeBlink_R", "mouthSmile_L", "mouthSmile_R", "mouthPucker", "browInnerUp", "browDown_L", "mouthFunnel", "cheekPuff", "eyeWide_L", "mouthFrown_R", "noseSneer_L"):
            psi = torch.zeros(1, E)
            psi[0, model.expr_names.index(name)] = 1.0
            items.append((name, psi, 0.0, None))
        smile = torch.zeros(1, E)
        smile[0, model.expr_names.index("mouthSmile_L")] = 1.0
        smile[0, model.expr_names.index("mouthSmile_R")] = 1.0
        items.append(("smile both + jaw 0.15", smile, 0.15, None))
        items.append(("eyelids 1,1", None, 0.0, torch.tensor([[1.0, 1.0]])))
        ims = [face_render(psi, jaw, el) for _, psi, jaw, el in items]
        p = out_dir / "head_builtin_expressions.png"
        iio.imwrite(p, image_grid(ims, [n for n, *_ in items], cols=4))
        paths.append(p)
        ims, labs = [], []
        for name in ("head_width", "jaw_width", "nose_length", "chin_protrusion"):
            for v in (-3.0, 3.0):
                beta = torch.zeros(1, model.num_shape)
                beta[0, model.shape_names.index(name)] = v
                ims.append(pose_render(beta=beta, yaw=30.0, dist=0.9))
                labs.append(f"{name} {v:+.0f}")
        p = out_dir / "head_builtin_shapes.png"
        iio.imwrite(p, image_grid(ims, labs, cols=4))
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate the asset and optionally write previews."""
    ap = argparse.ArgumentParser(prog="python -m hravatar.head.builtin", description="Regenerate the built-in head model asset.")
    ap.add_argument("--out", type=Path, default=ASSET_PATH, help="output .safetensors (default: the repository asset)")
    ap.add_argument("--preview", type=Path, default=None, help="folder for preview PNGs")
    args = ap.parse_args(argv)
    model = build_builtin_head()
    model.save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {model.num_vertices} vertices, {model.faces.shape[0]} faces)")
    if args.preview is not None:
        for p in write_previews(model, args.preview):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
