"""Procedural cranium, neck, ears and eyeballs of the built-in head.

The back of the head and the neck are an implicit surface (smooth union of ellipsoids)
sampled on a lathe grid (rings around a vertical axis, a pole at the crown); the grid is cut
where the measured face sits and zipped to the face's outer boundary, then relaxed so the
seam is smooth. Ears and eyeballs are separate closed meshes. Only used at generation time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .mesh_utils import boundary_loops, vertex_adjacency


@dataclass(frozen=True)
class HeadShape:
    """Proportions of the procedural head (metres, origin between the pupils)."""

    centre: tuple = (0.0, -0.01, -0.078)  # lathe/ray origin inside the cranium
    cranium_c: tuple = (0.0, 0.022, -0.080)
    cranium_r: tuple = (0.079, 0.099, 0.099)
    occiput_c: tuple = (0.0, -0.015, -0.115)
    occiput_r: tuple = (0.062, 0.070, 0.068)
    jaw_c: tuple = (0.0, -0.062, -0.040)
    jaw_r: tuple = (0.060, 0.050, 0.060)
    chin_c: tuple = (0.0, -0.090, -0.020)
    chin_r: tuple = (0.045, 0.026, 0.045)
    neck_c: tuple = (0.0, -0.205, -0.078)
    neck_r: tuple = (0.060, 0.160, 0.063)
    blend: float = 0.018
    bottom_y: float = -0.195


def _ellipsoid_sdf(p: np.ndarray, c, r) -> np.ndarray:
    """Approximate signed distance of points [N, 3] to an axis-aligned ellipsoid (Quilez)."""
    q = (p - np.asarray(c)) / np.asarray(r)
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / np.asarray(r), axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (union with a fillet of size k)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def head_sdf(p: np.ndarray, s: HeadShape) -> np.ndarray:
    """[N] approximate signed distance (negative inside) of the cranium + jaw + neck volume."""
    d = _ellipsoid_sdf(p, s.cranium_c, s.cranium_r)
    for c, r in ((s.occiput_c, s.occiput_r), (s.jaw_c, s.jaw_r), (s.chin_c, s.chin_r), (s.neck_c, s.neck_r)):
        d = _smin(d, _ellipsoid_sdf(p, c, r), s.blend)
    return d


def project_to_sdf(p: np.ndarray, s: HeadShape, steps: int = 4) -> np.ndarray:
    """Newton steps x <- x - f grad f / |grad f|^2 onto the zero level set, [N, 3]."""
    h = 1e-4
    for _ in range(steps):
        f = head_sdf(p, s)
        g = np.stack([(head_sdf(p + h * e, s) - head_sdf(p - h * e, s)) / (2 * h) for e in np.eye(3)], -1)
        p = p - (f / np.maximum((g * g).sum(-1), 1e-12))[:, None] * g
    return p


def _raycast(origin: np.ndarray, dirs: np.ndarray, s: HeadShape, rmax: float = 0.35) -> np.ndarray:
    """Distance along each ray from inside to the surface (bisection on the sdf).

    Args:
        origin: [3] or [N, 3] ray origins (inside the volume); dirs: [N, 3] unit directions.
    Returns:
        [N] distances.
    """
    lo = np.zeros(len(dirs))
    hi = np.full(len(dirs), rmax)
    o = np.broadcast_to(origin, dirs.shape)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        inside = head_sdf(o + mid[:, None] * dirs, s) < 0
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    return 0.5 * (lo + hi)


def head_half_width(y: np.ndarray, z: np.ndarray, s: HeadShape) -> np.ndarray:
    """[N] |x| of the implicit head surface at heights y [N] and depths z [N]."""
    o = np.stack([np.zeros_like(y), y, z], -1)
    d = np.tile(np.array([[1.0, 0.0, 0.0]]), (len(y), 1))
    return _raycast(o, d, s)


def lathe_grid(s: HeadShape, n_theta: int = 144, n_cap: int = 22, n_neck: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Sample the implicit head on rings around a vertical axis.

    Rings 0..n_cap-1 are latitudes of rays from ``s.centre`` (crown to the equator), the
    next n_neck rings are horizontal rays from the axis going down to ``s.bottom_y``.
    Returns:
        points: [R, n_theta, 3], param: [R, n_theta, 2] (theta, ring coordinate) used to cut
        the face hole.
    """
    C = np.asarray(s.centre, float)
    theta = np.linspace(0, 2 * np.pi, n_theta, endpoint=False) + np.pi / n_theta
    rings, params = [], []
    phis = np.linspace(math.radians(5.0), math.radians(90.0), n_cap)
    for i, ph in enumerate(phis):
        d = np.stack([np.sin(ph) * np.cos(theta), np.full_like(theta, np.cos(ph)), np.sin(ph) * np.sin(theta)], -1)
        r = _raycast(C, d, s)
        rings.append(C + r[:, None] * d)
        params.append(np.stack([theta, np.full_like(theta, ph * 0.1)], -1))
    ys = C[1] - (C[1] - s.bottom_y) * (np.linspace(0, 1, n_neck + 1)[1:] ** 1.0)
    for y in ys:
        o = np.array([0.0, y, C[2]])
        d = np.stack([np.cos(theta), np.zeros_like(theta), np.sin(theta)], -1)
        r = _raycast(o, d, s)
        rings.append(o + r[:, None] * d)
        params.append(np.stack([theta, np.full_like(theta, math.pi / 2 * 0.1 + (C[1] - y))], -1))
    return np.stack(rings), np.stack(params)


def point_param(p: np.ndarray, s: HeadShape) -> np.ndarray:
    """[N, 2] lathe parameters (theta, ring coordinate) of arbitrary points [N, 3]."""
    C = np.asarray(s.centre, float)
    q = p - C
    theta = np.mod(np.arctan2(q[:, 2], q[:, 0]), 2 * np.pi)
    ph = np.arctan2(np.linalg.norm(q[:, [0, 2]], axis=1), q[:, 1])
    ring = np.where(q[:, 1] > 0, ph * 0.1, math.pi / 2 * 0.1 - q[:, 1])
    return np.stack([theta, ring], -1)


def _inside_polygon(pts: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """[N] even-odd test of 2D points [N, 2] against a closed polygon [M, 2]."""
    x, y = pts[:, 0:1], pts[:, 1:2]
    x0, y0 = poly[:, 0][None], poly[:, 1][None]
    x1, y1 = np.roll(poly[:, 0], -1)[None], np.roll(poly[:, 1], -1)[None]
    cond = (y0 > y) != (y1 > y)
    xi = x0 + (y - y0) * (x1 - x0) / np.where(y1 == y0, 1e-12, y1 - y0)
    return (cond & (x < xi)).sum(1) % 2 == 1


def _zipper(a: np.ndarray, b: np.ndarray, ang_a: np.ndarray, ang_b: np.ndarray) -> list[tuple[int, int, int]]:
    """Triangulate the band between two closed loops by their angles around a common centre.

    Each edge of loop a is joined to the vertex of b nearest in angle to its midpoint; the b
    edges in between fan to the shared a vertex. Unlike a greedy zipper, the result is
    mirror-symmetric whenever the two loops are.

    Args:
        a, b: vertex ids of the loops, both ordered by increasing angle.
        ang_a, ang_b: their angles (radians).
    Returns:
        triangles (unoriented).
    """
    na, nb = len(a), len(b)
    two_pi = 2.0 * np.pi
    mids = ang_a + 0.5 * np.mod(np.roll(ang_a, -1) - ang_a, two_pi)
    diff = np.abs(np.mod(mids[:, None] - ang_b[None, :] + np.pi, two_pi) - np.pi)
    k = diff.argmin(1)
    tris = []
    for i in range(na):
        i1 = (i + 1) % na
        tris.append((a[i], a[i1], b[k[i]]))
        j = k[i]
        while j != k[i1]:
            j1 = (j + 1) % nb
            tris.append((a[i1], b[j1], b[j]))
            j = j1
    return tris


def _loop_direction(p: np.ndarray) -> float:
    """Signed area of a loop [N, 3] projected on the x-y plane (positive: counter-clockwise)."""
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum())


@dataclass
class Skin:
    """Head surface = measured face + procedural rest.

    vertices: [V, 3], faces: [F, 3] (face vertices first, then the grid and caps),
    is_grid: [V] bool, grid_ring: [V] ring index of grid vertices (-1 on the face, -2 pole),
    grid_theta: [V] azimuth of grid vertices (0 elsewhere).
    """

    vertices: np.ndarray
    faces: np.ndarray
    is_grid: np.ndarray
    grid_ring: np.ndarray
    grid_theta: np.ndarray


def build_skin(face_v: np.ndarray, face_f: np.ndarray, oval: np.ndarray, s: HeadShape, relax_iters: int = 60) -> Skin:
    """Close the face patch into a full head + neck surface.

    Args:
        face_v: [Vf, 3] face patch vertices; face_f: [Ff, 3] its faces (normals +z).
        oval: ordered vertex ids of the patch's outer boundary.
    Returns:
        :class:`Skin` whose first Vf vertices are the face patch (only a band near its outer
        rim is smoothed; landmark vertices keep their index).
    """
    grid, param = lathe_grid(s)
    R, T = grid.shape[:2]
    # cut the hole: the face outline in lathe parameters, grown by a margin so the zipper band
    # is a real strip
    po = point_param(face_v[oval], s)
    cen = po.mean(0)
    grow = 1.0 + np.array([0.10, 0.10])
    poly = cen + (po - cen) * grow
    flat = param.reshape(-1, 2)
    inside = _inside_polygon(flat, poly).reshape(R, T)
    keep = ~inside
    Vf = len(face_v)
    idx = -np.ones((R, T), np.int64)
    idx[keep] = Vf + np.arange(int(keep.sum()))
    verts = [face_v, grid[keep]]
    faces = [face_f]
    # pole cap
    pole = Vf + int(keep.sum())
    C = np.asarray(s.centre, float)
    top = C + _raycast(C, np.array([[0.0, 1.0, 0.0]]), s)[0] * np.array([0.0, 1.0, 0.0])
    verts.append(top[None])
    for t in range(T):
        a, b = idx[0, t], idx[0, (t + 1) % T]
        if a >= 0 and b >= 0:
            faces.append(np.array([[pole, b, a]]))
    for r in range(R - 1):
        for t in range(T):
            t1 = (t + 1) % T
            q = (idx[r, t], idx[r, t1], idx[r + 1, t1], idx[r + 1, t])
            if min(q) >= 0:
                faces.append(np.array([[q[0], q[1], q[2]], [q[0], q[2], q[3]]]))
    # bottom cap: one inner ring + centre
    nv = pole + 1
    bottom = grid[R - 1]
    bc = bottom.mean(0)
    inner = bc + 0.55 * (bottom - bc)
    verts += [inner, bc[None]]
    inner_idx = nv + np.arange(T)
    centre_idx = nv + T
    for t in range(T):
        t1 = (t + 1) % T
        faces.append(np.array([[idx[R - 1, t], idx[R - 1, t1], inner_idx[t1]], [idx[R - 1, t], inner_idx[t1], inner_idx[t]], [inner_idx[t], inner_idx[t1], centre_idx]]))
    V = np.concatenate(verts, 0)
    Fcur = np.concatenate(faces, 0)
    # zipper between the oval and the hole boundary of the grid
    loops = boundary_loops(Fcur)
    oval_set = set(int(x) for x in oval)
    hole = [l for l in loops if not (set(l.tolist()) & oval_set) and l.min() >= Vf]
    hole = max(hole, key=len)
    a, b = np.asarray(oval), np.asarray(hole)
    pa, pb = point_param(V[a], s), point_param(V[b], s)
    pc = pa.mean(0)
    ang_a = np.arctan2(pa[:, 1] - pc[1], pa[:, 0] - pc[0])
    ang_b = np.arctan2(pb[:, 1] - pc[1], pb[:, 0] - pc[0])
    oa, ob = np.argsort(ang_a), np.argsort(ang_b)
    band = np.asarray(_zipper(a[oa], b[ob], ang_a[oa], ang_b[ob]), np.int64)
    Fall = np.concatenate([Fcur, band], 0)
    from .mesh_utils import orient_faces

    Fall = orient_faces(Fall, V)
    # relax: Laplacian smoothing of the procedural part + projection back to the implicit
    # surface, weakly near the seam so the grid bends smoothly into the measured face
    is_grid = np.zeros(len(V), bool)
    is_grid[Vf:] = True
    from .mesh_utils import graph_distances

    dseam = graph_distances(V, Fall, a)
    proj_w = np.clip((dseam - 0.004) / 0.035, 0.0, 1.0) ** 2
    A = vertex_adjacency(Fall, len(V))
    deg = np.asarray(A.sum(1)).reshape(-1)
    move = is_grid.copy()
    move[centre_idx] = True
    fixed_bottom = np.zeros(len(V), bool)
    fixed_bottom[idx[R - 1][idx[R - 1] >= 0]] = True
    fixed_bottom[inner_idx] = True
    fixed_bottom[centre_idx] = True
    move &= ~fixed_bottom
    for it in range(relax_iters):
        avg = (A @ V) / deg[:, None]
        V[move] += 0.5 * (avg[move] - V[move])
        pv = project_to_sdf(V[move], s, steps=2)
        V[move] += proj_w[move][:, None] * (pv - V[move])
    # the face's outer rim is noisy and meets the grid at a slight angle: a non-shrinking
    # smoothing of a band around the seam removes the shading streaks
    from .mesh_utils import taubin_smooth

    band_fixed = ~(dseam < 0.022)
    band_fixed |= fixed_bottom
    V = taubin_smooth(V, Fall, iterations=12, lam=0.5, mu=-0.53, fixed=band_fixed)
    ring = -np.ones(len(V), np.int64)
    theta = np.zeros(len(V))
    rr, tt = np.nonzero(keep)
    ring[idx[rr, tt]] = rr
    theta[idx[rr, tt]] = param[rr, tt, 0]
    ring[pole] = -2
    return Skin(vertices=V, faces=Fall, is_grid=is_grid, grid_ring=ring, grid_theta=theta)


# ----------------------------------------------------------------------------- eyes
def eyeball_mesh(centre: np.ndarray, radius: float, n_lon: int = 28, iris_deg: float = 29.0, cornea_mm: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UV sphere with its pole on +z (the gaze direction) and a corneal bulge over the iris.

    Returns:
        vertices [N, 3], faces [T, 3] (outward), polar angle from +z of each vertex [N] (degrees).
    """
    # latitude rings denser near the front so iris/pupil edges are crisp; one on the
    # equator (its mean is exactly the centre, used by the joint regressor)
    pol = np.concatenate([[0.0], np.array([5, 10, 16, 23, 29, 35]), np.arange(45.0, 170.0, 15.0)])
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    verts = [np.array([[0.0, 0.0, 1.0]])]
    ang = [np.array([0.0])]
    for p in pol[1:]:
        pr = math.radians(p)
        verts.append(np.stack([np.sin(pr) * np.cos(lon), np.sin(pr) * np.sin(lon), np.full_like(lon, np.cos(pr))], -1))
        ang.append(np.full(n_lon, p))
    verts.append(np.array([[0.0, 0.0, -1.0]]))
    ang.append(np.array([180.0]))
    d = np.concatenate(verts)
    a = np.concatenate(ang)
    bulge = cornea_mm * 1e-3 * np.clip(np.cos(np.radians(a) * 90.0 / iris_deg), 0, 1) ** 1.5 * (a < iris_deg)
    v = centre + d * (radius + bulge)[:, None]
    faces = []
    nr = len(pol) - 1
    for k in range(n_lon):
        k1 = (k + 1) % n_lon
        faces.append((0, 1 + k, 1 + k1))
    for r in range(nr - 1):
        b0, b1 = 1 + r * n_lon, 1 + (r + 1) * n_lon
        for k in range(n_lon):
            k1 = (k + 1) % n_lon
            faces += [(b0 + k, b1 + k, b1 + k1), (b0 + k, b1 + k1, b0 + k1)]
    last = len(d) - 1
    b0 = 1 + (nr - 1) * n_lon
    for k in range(n_lon):
        faces.append((b0 + k, last, b0 + (k + 1) % n_lon))
    f = np.asarray(faces, np.int64)
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    if (n * (v[f].mean(1) - centre)).sum() < 0:
        f = f[:, ::-1].copy()
    return v, f, a


# ----------------------------------------------------------------------------- ears
def ear_mesh(side: float, anchor: np.ndarray, head_x, height: float = 0.062, n_ang: int = 40, n_rad: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A closed auricle: lateral relief (helix rim, antihelix, concha), medial back, lobe.

    Args:
        side: +1 for the left ear (+x), -1 for the right.
        anchor: [3] centre of the ear's attachment on the head side (x ignored).
        head_x: callable (y [N], z [N]) -> |x| of the head surface there.
        height: ear length (metres).
    Returns:
        vertices [N, 3], faces [T, 3] (outward), local radius [N] (0 centre .. 1 rim).
    """
    mm = 1e-3
    ang = np.linspace(0, 2 * np.pi, n_ang, endpoint=False)
    # outline in (u = backwards, v = up) relative to the anchor, rounded top, narrow lobe
    half_h = 0.5 * height
    w_top, w_bot = 0.0185, 0.0115
    v_o = half_h * np.sin(ang)
    w = np.where(v_o > 0, w_top, w_bot + (w_top - w_bot) * (1 + np.sin(ang)) ** 1.5 / 1.0)
    u_o = w * np.cos(ang)
    # tilt the long axis back by ~15 degrees
    tilt = math.radians(15.0)
    rad = np.linspace(0.0, 1.0, n_rad + 1)[1:]
    verts, rloc = [], []

    def place(u, v, height_mm):
        uu = u * math.cos(tilt) + v * math.sin(tilt)
        vv = -u * math.sin(tilt) + v * math.cos(tilt)
        y = anchor[1] + vv
        z = anchor[2] - uu
        x = side * (head_x(np.atleast_1d(y), np.atleast_1d(z)) + height_mm * mm)
        return np.stack([x, np.broadcast_to(y, x.shape), np.broadcast_to(z, x.shape)], -1)

    def lateral_height(r, a, u):
        # stands off the head more towards the back rim (cranio-auricular angle)
        back = np.clip((u / 0.018 + 1.0) * 0.5, 0.0, 1.0)
        stand = 2.0 + 14.0 * back**1.3 * (r**1.2)
        helix = 2.2 * np.exp(-((r - 0.9) / 0.07) ** 2) * (np.sin(a) > -0.6)
        antihelix = 1.3 * np.exp(-((r - 0.62) / 0.1) ** 2) * (np.cos(a) > -0.3)
        concha = -4.5 * np.exp(-((r) / 0.42) ** 2) * (1.0 - 0.6 * (np.sin(a) > 0.3))
        lobe = 1.5 * (np.sin(a) < -0.5) * r
        return stand + helix + antihelix + concha + lobe

    # lateral side: centre vertex + rings; medial side mirrored towards the head
    centre_u, centre_v = 0.002, -0.004
    L0 = place(np.array([centre_u]), np.array([centre_v]), lateral_height(np.array([0.0]), np.array([0.0]), np.array([centre_u])))
    verts.append(L0)
    rloc.append(np.array([0.0]))
    for r in rad:
        u = centre_u + (u_o - centre_u) * r
        v = centre_v + (v_o - centre_v) * r
        verts.append(place(u, v, lateral_height(r, ang, u)))
        rloc.append(np.full(n_ang, r))
    # medial side: from the rim back into the head
    for r in rad[::-1][1:]:
        u = centre_u + (u_o - centre_u) * r
        v = centre_v + (v_o - centre_v) * r
        back = np.clip((u / 0.018 + 1.0) * 0.5, 0.0, 1.0)
        hm = (lateral_height(r, ang, u) - 2.5) * np.clip((r - 0.55) / 0.45, 0, 1) ** 0.7 * back - 4.0 * (1 - back * np.clip((r - 0.55) / 0.45, 0, 1))
        verts.append(place(u, v, hm))
        rloc.append(np.full(n_ang, r))
    verts.append(place(np.array([centre_u]), np.array([centre_v]), np.array([-5.0])))
    rloc.append(np.array([0.0]))
    V = np.concatenate(verts, 0)
    n_rings = (len(V) - 2) // n_ang
    faces = []
    for k in range(n_ang):
        faces.append((0, 1 + k, 1 + (k + 1) % n_ang))
    for r in range(n_rings - 1):
        b0, b1 = 1 + r * n_ang, 1 + (r + 1) * n_ang
        for k in range(n_ang):
            k1 = (k + 1) % n_ang
            faces += [(b0 + k, b1 + k, b1 + k1), (b0 + k, b1 + k1, b0 + k1)]
    last = len(V) - 1
    b0 = 1 + (n_rings - 1) * n_ang
    for k in range(n_ang):
        faces.append((b0 + k, last, b0 + (k + 1) % n_ang))
    F = np.asarray(faces, np.int64)
    c = V.mean(0)
    vol = np.einsum("ij,ij->i", V[F[:, 0]] - c, np.cross(V[F[:, 1]] - c, V[F[:, 2]] - c)).sum()
    if vol < 0:
        F = F[:, ::-1].copy()
    return V, F, np.concatenate(rloc)
