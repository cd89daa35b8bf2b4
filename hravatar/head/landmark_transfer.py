"""Transfer the 478 MediaPipe landmarks of one head model onto another head mesh.

Used by the FLAME loader (for the points its ``mediapipe_landmark_embedding.npz`` lacks) and by
the ICT-FaceKit loader (which has no MediaPipe embedding at all). The source is a head model
whose landmarks are known (the built-in head); the destination is any mesh in the same
orientation convention (metres or not, +y up, +z out of the face).

Pipeline: similarity from anchor correspondences (or from the face bounding boxes) -> trimmed
ICP on the face region -> a few iterations of smooth non-rigid refinement -> projection of each
landmark onto the closest point of the destination surface (face index + barycentrics).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from .mesh_utils import closest_points_on_triangles
from .model import NUM_MEDIAPIPE_LANDMARKS, HeadModel


def project_to_mesh(
    points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, candidates: int = 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest surface point of a triangle mesh for each query point.

    Candidate triangles are the ``candidates`` whose centroids are nearest (exact for meshes
    whose triangles are small compared with the query distance, which holds for head meshes).

    Args:
        points: [N, 3] query points.
        vertices: [V, 3] mesh vertices.
        faces: [F, 3] triangle indices.
        candidates: triangles examined per point.
    Returns:
        face_idx: [N] int64 index of the closest triangle.
        bary: [N, 3] barycentric coordinates in that triangle.
        closest: [N, 3] closest surface points.
    """
    points = np.asarray(points, dtype=np.float64)
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    tri = vertices[faces]  # [F,3,3]
    k = int(min(candidates, len(faces)))
    _, cand = cKDTree(tri.mean(1)).query(points, k=k)
    cand = cand.reshape(len(points), k)
    q = torch.from_numpy(points)[:, None].expand(-1, k, -1)
    cl, bc = closest_points_on_triangles(q, torch.from_numpy(tri[cand]))
    best = ((cl - q) ** 2).sum(-1).argmin(1)
    rows = torch.arange(len(points))
    return cand[rows.numpy(), best.numpy()].astype(np.int64), bc[rows, best].numpy(), cl[rows, best].numpy()


def similarity_transform(
    src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, with_scale: bool = True
) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted least-squares similarity (Umeyama): ``dst ~ s * R @ src + t``.

    Args:
        src, dst: [N, 3] corresponding points (N >= 3, not collinear).
        weights: [N] non-negative weights, or None for uniform.
        with_scale: fit the scale; False gives the rigid (Kabsch) fit with s = 1.
    Returns:
        s: scale, R: [3, 3] rotation (det +1), t: [3] translation.
    """
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    R = U @ D @ Vt
    var_s = (w * (xs**2).sum(1)).sum()
    s = float((S * np.diag(D)).sum() / max(var_s, 1e-300)) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def _smooth_field(at: np.ndarray, sites: np.ndarray, values: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-kernel regression of ``values`` [M,3] at ``sites`` [M,3], evaluated at ``at`` [N,3]."""
    tree = cKDTree(sites)
    k = int(min(64, len(sites)))
    d, idx = tree.query(at, k=k)
    d, idx = d.reshape(len(at), k), idx.reshape(len(at), k)
    w = np.exp(-0.5 * (d / sigma) ** 2) * weights[idx]
    wsum = w.sum(1, keepdims=True)
    out = (w[..., None] * values[idx]).sum(1) / np.maximum(wsum, 1e-12)
    # far from every site: no evidence, no displacement
    return np.where(wsum > 1e-6, out, 0.0)


def _face_points(src: HeadModel) -> np.ndarray:
    """[N,3] neutral source vertices of the face and lips regions (all vertices when unlabelled)."""
    v = src.v_template.detach().cpu().double().numpy()
    m = (src.region("face") | src.region("lips")).cpu().numpy()
    return v[m] if m.sum() >= 10 else v


def transfer_landmarks(
    src: HeadModel,
    dst_vertices: Tensor,
    dst_faces: Tensor,
    dst_face_mask: Tensor | None = None,
    anchors: dict[int, int] | None = None,
    *,
    anchor_points: dict[int, np.ndarray] | None = None,
    icp_iters: int = 30,
    nonrigid_iters: int = 4,
    trim: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """Transfer the source head's 478 MediaPipe landmarks onto a destination mesh.

    The destination must use the same axes as the source (+y up, +z out of the face); its
    units may differ (the similarity absorbs the scale).

    Args:
        src: head model with known landmarks (``lmk_faces``/``lmk_bary``) and a 'face' region.
        dst_vertices: [V, 3] destination neutral vertices.
        dst_faces: [F, 3] destination triangles.
        dst_face_mask: [V] bool, destination vertices of the face (ICP targets and landmark
            projection surface: keep the eyeballs in it so iris points land on them);
            None = every vertex. Without anchors the initial alignment matches the centre and
            size of this region with the source's face region, so both should cover about
            the same part of the head.
        anchors: known correspondences {MediaPipe landmark index: destination vertex index};
            with 3 or more of them the initial alignment is their similarity transform (with 2,
            scale and translation only) and the final landmarks of those indices sit exactly
            on the anchor vertices.
        anchor_points: like ``anchors`` but with exact destination positions {landmark: [3]}
            (e.g. from a barycentric embedding); they take precedence over ``anchors``.
        icp_iters: rigid (similarity) ICP iterations.
        nonrigid_iters: smooth non-rigid refinement iterations after ICP (0 disables).
        trim: fraction of the closest ICP pairs kept each iteration (robust to the parts of the
            source face the destination lacks).
    Returns:
        lmk_faces: [478] int64 destination face index per landmark.
        lmk_bary: [478, 3] float32 barycentric coordinates (rows sum to 1).
    """
    device = dst_vertices.device if isinstance(dst_vertices, Tensor) else torch.device("cpu")
    Vd = torch.as_tensor(dst_vertices).detach().cpu().double().numpy()
    Fd = torch.as_tensor(dst_faces).detach().cpu().long().numpy()
    mask = np.ones(len(Vd), dtype=bool) if dst_face_mask is None else torch.as_tensor(dst_face_mask).cpu().numpy().astype(bool)
    face_ok = mask[Fd].all(1)
    F_surf = Fd[face_ok] if face_ok.any() else Fd
    surf_idx = np.nonzero(face_ok)[0] if face_ok.any() else np.arange(len(Fd))
    target = Vd[np.unique(F_surf)]
    tree = cKDTree(target)

    with torch.no_grad():
        L = src.landmarks(src.v_template[None])[0].detach().cpu().double().numpy()  # [478,3]
    P = _face_points(src)

    targets = {int(k): Vd[int(v)] for k, v in (anchors or {}).items() if 0 <= int(k) < NUM_MEDIAPIPE_LANDMARKS and 0 <= int(v) < len(Vd)}
    targets.update({int(k): np.asarray(p, np.float64).reshape(3) for k, p in (anchor_points or {}).items() if 0 <= int(k) < NUM_MEDIAPIPE_LANDMARKS})
    a_src = np.array(sorted(targets), dtype=np.int64)
    a_dst = np.stack([targets[int(k)] for k in a_src]) if len(a_src) else np.zeros((0, 3))

    # ---- initial similarity
    if len(a_src) >= 3:
        s, R, t = similarity_transform(L[a_src], a_dst)
    elif len(a_src) == 2:
        # e.g. the two pupils: scale and place, axes shared by convention
        s = float(np.linalg.norm(a_dst[1] - a_dst[0]) / max(np.linalg.norm(L[a_src[1]] - L[a_src[0]]), 1e-12))
        R = np.eye(3)
        t = a_dst.mean(0) - s * L[a_src].mean(0)
    else:
        # same axes by convention: match centre and RMS size of the two face regions
        s = float(np.sqrt(((target - target.mean(0)) ** 2).sum(1).mean() / ((P - P.mean(0)) ** 2).sum(1).mean()))
        R = np.eye(3)
        t = target.mean(0) - s * P.mean(0)

    # ---- trimmed similarity ICP (anchors weigh as much as a tenth of the face points)
    a_weight = 0.1 * len(P) / max(len(a_src), 1)
    for _ in range(icp_iters):
        X = s * P @ R.T + t
        d, j = tree.query(X)
        keep = d <= np.quantile(d, trim)
        src_pts = np.concatenate([P[keep], L[a_src]])
        dst_pts = np.concatenate([target[j[keep]], a_dst])
        w = np.concatenate([np.ones(int(keep.sum())), np.full(len(a_src), a_weight)])
        s_new, R_new, t_new = similarity_transform(src_pts, dst_pts, w)
        delta = abs(s_new - s) + np.abs(R_new - R).max() + np.abs(t_new - t).max() / max(s_new, 1e-12)
        s, R, t = s_new, R_new, t_new
        if delta < 1e-7:
            break

    X = s * P @ R.T + t
    Lx = s * L @ R.T + t
    # ---- smooth non-rigid refinement: pull the face surface onto the destination, carry the
    # landmarks along with a Gaussian-weighted displacement field
    size = float(np.sqrt(((X - X.mean(0)) ** 2).sum(1).mean()))
    sigma = 0.15 * size
    for it in range(nonrigid_iters):
        _, _, cl = project_to_mesh(X, Vd, F_surf)
        r = cl - X
        d = np.linalg.norm(r, axis=1)
        keep = d <= np.quantile(d, trim)
        sites = np.concatenate([X[keep], Lx[a_src]])
        vals = np.concatenate([r[keep], a_dst - Lx[a_src]])
        wts = np.concatenate([np.ones(int(keep.sum())), np.full(len(a_src), 20.0)])
        # narrow the kernel over the iterations: global fit first, local detail later
        sg = sigma * (0.5 ** (it / max(nonrigid_iters - 1, 1)))
        X = X + _smooth_field(X, sites, vals, wts, sg)
        Lx = Lx + _smooth_field(Lx, sites, vals, wts, sg)
    if len(a_src):
        Lx[a_src] = a_dst

    fidx, bary, _ = project_to_mesh(Lx, Vd, F_surf)
    lmk_faces = torch.as_tensor(surf_idx[fidx], dtype=torch.int64, device=device)
    lmk_bary = torch.as_tensor(bary, dtype=torch.float32, device=device)
    return lmk_faces, lmk_bary
