"""Face surface of the built-in head: MediaPipe's face mesh measured on a public-domain photo.

Runs MediaPipe's legacy face mesh (refine_landmarks -> 478 points; the model ships in the
wheel) on scikit-image's ``astronaut`` photo (NASA, public domain), rebuilds the triangles
from the published tessellation edges, frontalises the points, makes them left/right
symmetric, scales them to metres and relaxes the photo's smile and parted lips.
Only used when (re)generating ``assets/head_builtin.safetensors``.
"""
from __future__ import annotations

import numpy as np

from .mesh_utils import orient_faces, triangles_from_edges, unique_edges

#: Interocular (pupil) distance of an average adult, metres.
PUPIL_DISTANCE = 0.063

# MediaPipe face-mesh indices (subject's right eye = image left = -x).
INNER_LIP_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
INNER_LIP_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
OUTER_LIP = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
EYE_R_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
EYE_R_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
EYE_L_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
EYE_L_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)
BROW_R = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55)
BROW_L = (300, 293, 334, 296, 336, 276, 283, 282, 295, 285)
IRIS_R = (468, 469, 470, 471, 472)
IRIS_L = (473, 474, 475, 476, 477)


def detect_landmarks() -> np.ndarray:
    """[478, 3] MediaPipe landmarks of ``skimage.data.astronaut()`` in pixels (x right, y down, z depth)."""
    import mediapipe as mp
    from skimage import data

    img = data.astronaut()
    h, w = img.shape[:2]
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=1) as fm:
        res = fm.process(img)
    if not res.multi_face_landmarks:
        raise RuntimeError("built-in head: MediaPipe found no face in skimage.data.astronaut()")
    lm = res.multi_face_landmarks[0].landmark
    # MediaPipe z uses the same scale as x (image width)
    return np.array([[p.x * w, p.y * h, p.z * w] for p in lm], dtype=np.float64)


def face_triangles(points: np.ndarray) -> np.ndarray:
    """[852, 3] face-mesh triangles, oriented with normals towards +z.

    Args:
        points: [468+, 3] landmark positions in model axes (+z out of the face).
    """
    import mediapipe as mp

    edges = np.unique(np.sort(np.array(sorted(mp.solutions.face_mesh.FACEMESH_TESSELATION)), 1), axis=0)
    tris = triangles_from_edges(edges)
    # a 3-cycle whose three edges all have three incident cycles is a separating triangle,
    # not a face of the (disc-with-holes) triangulation
    e, cnt = unique_edges(tris)
    bad = {tuple(x) for x in e[cnt > 2]}
    keep = [not all(tuple(sorted(p)) in bad for p in ((a, b), (b, c), (a, c))) for a, b, c in tris]
    tris = tris[np.asarray(keep)]
    return orient_faces(tris, points, outward=np.array([0.0, 0.0, 1.0]))


def _mirror_pairs(p: np.ndarray) -> np.ndarray:
    """[N] index of each point's mirror partner across the x = 0 plane (optimal assignment)."""
    from scipy.optimize import linear_sum_assignment

    m = p * np.array([-1.0, 1.0, 1.0])
    cost = np.linalg.norm(p[:, None, :] - m[None, :, :], axis=-1)
    r, c = linear_sum_assignment(cost)
    pair = np.empty(len(p), np.int64)
    pair[r] = c
    return pair


def _rotation_to(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[3, 3] rotation taking unit vector a to unit vector b (minimal angle)."""
    v = np.cross(a, b)
    c = float(a @ b)
    K = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + K + K @ K / (1.0 + c)


def frontalize_symmetric(pix: np.ndarray, pitch_deg: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Metric, frontal, exactly mirror-symmetric landmarks.

    Args:
        pix: [478, 3] detections in pixels (x right, y down, z away from the camera).
        pitch_deg: head tilt (chin down is positive) applied after aligning the
            glabella-chin line with +y, so that the Frankfurt plane is about horizontal.
    Returns:
        points: [478, 3] metres, +y up, +z out of the face, origin between the pupils,
        pair: [478] mirror partner of each point (itself on the midline).
    """
    p = pix * np.array([1.0, -1.0, -1.0])
    p = p - p[:468].mean(0)
    R = np.eye(3)
    for _ in range(4):
        q = p @ R.T
        pair = _mirror_pairs(q[:468])
        d = q[:468] - q[pair]
        d = d[np.linalg.norm(d, axis=1) > 1e-6 * np.abs(q).max()]
        d = d * np.sign(d[:, :1] + 1e-12)
        n = np.linalg.svd(d, full_matrices=False)[2][0]
        n = n * np.sign(n[0])
        R = _rotation_to(n, np.array([1.0, 0.0, 0.0])) @ R
        q = p @ R.T
        # vertical: glabella (9) above chin (152) within the symmetry plane
        up = q[9] - q[152]
        up[0] = 0.0
        up /= np.linalg.norm(up)
        R = _rotation_to(up, np.array([0.0, 1.0, 0.0])) @ R
    t = np.radians(pitch_deg)
    Rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    q = p @ (Rx @ R).T
    pair = np.empty(478, np.int64)
    pair[:468] = _mirror_pairs(q[:468])
    # irises: centre <-> centre, ring point <-> mirrored nearest ring point
    pair[468], pair[473] = 473, 468
    for a_ids, b_ids in ((IRIS_R[1:], IRIS_L[1:]), (IRIS_L[1:], IRIS_R[1:])):
        for i in a_ids:
            m = q[i] * np.array([-1.0, 1.0, 1.0])
            pair[i] = b_ids[int(np.argmin([np.linalg.norm(q[j] - m) for j in b_ids]))]
    sym = 0.5 * (q + q[pair] * np.array([-1.0, 1.0, 1.0]))
    sym[pair == np.arange(478), 0] = 0.0
    scale = PUPIL_DISTANCE / np.linalg.norm(sym[468] - sym[473])
    sym = sym * scale
    sym = sym - 0.5 * (sym[468] + sym[473])
    return sym, pair


def _smooth_weights(points: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """[N] Gaussian weights exp(-|p - c|^2 / (2 r^2)) of points [N, 3]."""
    d2 = ((points - centre) ** 2).sum(-1)
    return np.exp(-0.5 * d2 / radius**2)


def neutralize_mouth(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Close the parted lips and relax the smile of the photo (smooth, symmetric edits).

    Args:
        points: [478, 3] symmetric landmarks (metres).
        faces: [F, 3] face-mesh triangles (to tell the upper from the lower lip).
    Returns:
        [478, 3] edited points (still symmetric).
    """
    from .mesh_utils import graph_distances

    p = points.copy()
    face_pts = p[:468]
    d_up = graph_distances(face_pts, faces, np.array(INNER_LIP_UPPER[1:-1]))
    d_lo = graph_distances(face_pts, faces, np.array(INNER_LIP_LOWER[1:-1]))
    lower_side = np.clip(0.5 + (d_up - d_lo) / 0.008, 0.0, 1.0)
    # 1) lip gap: meet in the middle, upper lip down / lower lip up, fading over ~1.5 cm
    reach = np.exp(-np.minimum(d_up, d_lo) ** 2 / (2 * 0.009**2))
    # per-column gap so the whole inner contour closes, not only the midline
    col_gap = np.interp(face_pts[:, 0], p[list(INNER_LIP_UPPER), 0], p[list(INNER_LIP_UPPER), 1] - p[list(INNER_LIP_LOWER), 1])
    dy = (lower_side - 0.5) * col_gap * reach
    face_pts = face_pts + np.stack([np.zeros_like(dy), dy, np.zeros_like(dy)], -1)
    # 2) smile: mouth corners down, forward and slightly inwards, cheeks relaxed
    for corner in (61, 291):
        c = points[corner]
        w = _smooth_weights(points[:468], c, 0.012)
        side = np.sign(c[0])
        face_pts += w[:, None] * np.array([-0.003 * side, -0.0035, 0.002])
    p[:468] = face_pts
    return p
