"""Procedural mouth geometry (teeth rows + oral cavity) attached to an inner-lip contour.

Shared by the built-in head and the FLAME / ICT loaders: any head mesh whose mouth is an
opening bounded by an inner-lip contour gets upper and lower teeth and a closed cavity
("mouth bag") whose rim coincides with that contour, so the caller can weld it to the lips.

Conventions: metres, +y up, +z out of the face, subject's left = +x (as :class:`HeadModel`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Mesio-distal crown widths (mm) from the midline backwards: incisors, canine, premolars, molars.
_UPPER_TOOTH_MM = (8.5, 6.5, 7.5, 7.0, 6.5, 10.0, 9.0)
_LOWER_TOOTH_MM = (5.0, 5.5, 6.5, 7.0, 7.0, 11.0, 10.5)


@dataclass
class MouthGeometry:
    """Teeth and mouth interior, ready to be appended to a head mesh.

    vertices: [M, 3] float64 positions (metres).
    faces: [G, 3] int64 triangles (indices into ``vertices``), outward normals (cavity
        normals point into the air of the mouth, tooth normals out of the tooth).
    lower: [M] bool, True for vertices that follow the jaw (lower teeth, cavity floor).
    labels: [M] object array of 'teeth' or 'mouth_interior'.
    jaw_weight: [M] float in [0, 1], smooth jaw influence (1 = fully on the jaw); ``lower``
        is ``jaw_weight > 0.5``. Use it for skinning so the cavity stretches smoothly.
    rim: [P] int64 indices of the cavity's first ring, one per point of the inner-lip
        loop (upper contour from its first to its last point, then the lower contour
        back, shared corner points once). Their positions equal the input points, so a
        caller can weld them to its lip vertices (see :func:`weld_rim`).
    rim_source: [P, 2] int64 (which contour: 0 upper / 1 lower, index in that contour).
    """

    vertices: np.ndarray
    faces: np.ndarray
    lower: np.ndarray
    labels: np.ndarray
    jaw_weight: np.ndarray
    rim: np.ndarray
    rim_source: np.ndarray


def _smoothstep(x: np.ndarray | float) -> np.ndarray:
    """Cubic smoothstep of x clipped to [0, 1] (same shape as x)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _lip_loop(upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed inner-lip loop from two corner-to-corner contours.

    Args:
        upper: [n, 3], lower: [m, 3], both running between the same two mouth corners
            in the same direction.
    Returns:
        loop: [P, 3] points (upper forwards, then lower backwards, corners once),
        side: [P] float, +1 upper / -1 lower / 0 corner,
        source: [P, 2] (contour id, index).
    """
    tol = 1e-6 + 1e-3 * np.linalg.norm(upper[-1] - upper[0])
    first_shared = np.linalg.norm(upper[0] - lower[0]) < tol
    last_shared = np.linalg.norm(upper[-1] - lower[-1]) < tol
    pts, side, src = [], [], []
    n, m = len(upper), len(lower)
    for i in range(n):
        pts.append(upper[i])
        corner = (i == 0 and first_shared) or (i == n - 1 and last_shared)
        side.append(0.0 if corner else 1.0)
        src.append((0, i))
    for j in range(m - 1, -1, -1):
        if (j == m - 1 and last_shared) or (j == 0 and first_shared):
            continue
        pts.append(lower[j])
        side.append(-1.0)
        src.append((1, j))
    return np.asarray(pts, float), np.asarray(side), np.asarray(src, np.int64)


def _ring_faces(a0: int, b0: int, n: int) -> list[tuple[int, int, int]]:
    """Quads (as two triangles) between two closed rings of n vertices starting at a0 and b0."""
    out = []
    for i in range(n):
        j = (i + 1) % n
        out.append((a0 + i, a0 + j, b0 + j))
        out.append((a0 + i, b0 + j, b0 + i))
    return out


def _tooth_edges(widths: tuple[float, ...]) -> np.ndarray:
    """Tooth boundary positions along half an arch as fractions of its length, [len(widths)+1]."""
    c = np.concatenate([[0.0], np.cumsum(widths)])
    return c / c[-1]


def _tooth_row(
    front: np.ndarray,
    half_width: float,
    depth: float,
    crown_top: float,
    crown_bottom: float,
    widths_mm: tuple[float, ...],
    upper: bool,
    scale: float,
    n_arch: int = 71,
) -> tuple[np.ndarray, np.ndarray]:
    """One closed row of teeth swept along a dental arch.

    Args:
        front: [3] midpoint of the labial surface at the incisors.
        half_width, depth: arch half-width (x) and depth (-z) at the last molar (metres).
        crown_top, crown_bottom: y of the gum line and of the biting edge (upper row) or
            of the biting edge and the gum line (lower row), at the incisors.
        widths_mm: crown widths from the midline backwards (one side).
        upper: orientation of the crowns (biting edge at the bottom for the upper row).
    Returns:
        vertices [N, 3], faces [T, 3] (closed surface, outward normals).
    """
    # arch: quarter ellipse per side, s in [-1, 1] (-1 = subject's right last molar)
    s = np.linspace(-1.0, 1.0, n_arch)
    theta = s * math.radians(95.0)
    ax = half_width / math.sin(math.radians(95.0))
    bz = depth / (1.0 - math.cos(math.radians(95.0)))
    cx, cz = front[0] + ax * np.sin(theta), front[2] - bz * (1.0 - np.cos(theta))
    tang = np.stack([ax * np.cos(theta), np.zeros_like(theta), bz * np.sin(theta)], -1)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    outward = np.stack([tang[:, 2], np.zeros_like(theta), -tang[:, 0]], -1)  # labial/buccal side
    outward *= np.sign((outward[:, 2] * np.cos(theta) + outward[:, 0] * np.sin(theta)))[:, None]
    # tooth boundaries -> a notch profile (0 at boundaries, 1 mid-crown)
    edges = _tooth_edges(widths_mm)
    a = np.abs(s)
    k = np.clip(np.searchsorted(edges, a, side="right") - 1, 0, len(widths_mm) - 1)
    local = (a - edges[k]) / (edges[k + 1] - edges[k])
    bump = np.sin(np.pi * np.clip(local, 0, 1)) ** 0.35
    molar = _smoothstep((a - 0.45) / 0.35)  # 0 at incisors, 1 at molars
    mm = 1e-3 * scale
    thick_edge = (1.2 + 6.0 * molar) * mm
    thick_gum = (5.5 + 3.5 * molar) * mm
    height = abs(crown_top - crown_bottom) * (1.0 - 0.35 * molar)
    notch = (1.0 - bump) * 0.9 * mm  # biting edge recedes between crowns
    indent = (1.0 - bump) * 0.5 * mm  # labial surface dips between crowns
    # molars sit slightly towards the other row so the occlusal plane curves (curve of Spee)
    spee = 1.5 * mm * molar
    if upper:
        gum_y = np.full_like(s, crown_top)
        edge_y = gum_y - height + notch + spee
    else:
        gum_y = np.full_like(s, crown_bottom)
        edge_y = gum_y + height - notch + spee
    # closed cross-section (gum-outer, mid-outer, edge-outer, edge-inner, mid-inner, gum-inner)
    prof_t = np.array([0.0, 0.55, 1.0, 1.0, 0.55, 0.0])  # 0 gum .. 1 edge
    prof_side = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    verts = []
    for i in range(n_arch):
        base = np.array([cx[i], 0.0, cz[i]])
        for t, sd in zip(prof_t, prof_side):
            th = thick_gum[i] + (thick_edge[i] - thick_gum[i]) * t
            y = gum_y[i] + (edge_y[i] - gum_y[i]) * t
            # labial face bulges a little mid-crown, edges rounded
            bulge = 0.6 * mm * math.sin(math.pi * t) if sd > 0 else 0.0
            off = (0.5 * th * sd + (bulge - indent[i] if sd > 0 else 0.0)) - 0.5 * thick_gum[i]
            p = base + outward[i] * off
            p[1] = y
            verts.append(p)
    verts = np.asarray(verts)
    P = len(prof_t)
    faces = []
    for i in range(n_arch - 1):
        faces += _ring_faces(i * P, (i + 1) * P, P)
    # end caps (fans around an extra centre vertex)
    for end, flip in ((0, True), (n_arch - 1, False)):
        c = len(verts)
        verts = np.vstack([verts, verts[end * P:(end + 1) * P].mean(0)])
        for j in range(P):
            tri = (c, end * P + j, end * P + (j + 1) % P)
            faces.append(tri if flip else (tri[0], tri[2], tri[1]))
    faces = np.asarray(faces, np.int64)
    return verts, _orient_outward(verts, faces)


def _orient_outward(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces [T, 3] of a closed mesh, flipped as a whole if its signed volume is negative."""
    c = verts.mean(0)
    v0, v1, v2 = verts[faces[:, 0]] - c, verts[faces[:, 1]] - c, verts[faces[:, 2]] - c
    vol = np.einsum("ij,ij->i", v0, np.cross(v1, v2)).sum()
    return faces if vol > 0 else faces[:, ::-1].copy()


def build_mouth_geometry(
    upper_inner_lip: np.ndarray,
    lower_inner_lip: np.ndarray,
    jaw_pivot: np.ndarray,
    scale: float = 1.0,
    n_rings: int = 10,
) -> MouthGeometry:
    """Teeth rows and a closed oral cavity behind an inner-lip contour.

    The cavity is a tube whose first ring is the inner-lip loop itself; it widens behind the
    lips to enclose both tooth rows, runs back towards the jaw pivot and is closed by a back
    wall (pharynx) in front of the jaw pivot. The floor carries a tongue bulge. The cavity
    half that continues the lower lip (its floor) follows the jaw, the roof stays, with a
    smooth blend around the mouth corners; the lower tooth row follows the jaw.

    Args:
        upper_inner_lip: [n, 3] inner contour of the upper lip, corner to corner.
        lower_inner_lip: [m, 3] inner contour of the lower lip, same corners and direction
            (the corners may be shared with the upper contour or not).
        jaw_pivot: [3] jaw joint (temporomandibular joint midpoint), behind the mouth.
        scale: size factor of the subject relative to an average adult (1.0: metres as
            measured on an average adult; 0.1 if the head is in decimetres, etc.).
        n_rings: number of cavity rings between the lips and the back wall.
    Returns:
        :class:`MouthGeometry`.
    """
    up = np.asarray(upper_inner_lip, float)
    lo = np.asarray(lower_inner_lip, float)
    pivot = np.asarray(jaw_pivot, float)
    if up.ndim != 2 or lo.ndim != 2 or up.shape[1] != 3 or lo.shape[1] != 3 or len(up) < 3 or len(lo) < 3:
        raise ValueError("build_mouth_geometry: lip contours must be [n>=3, 3] arrays")
    mm = 1e-3 * scale
    loop, side, src = _lip_loop(up, lo)
    corner_r, corner_l = up[0], up[-1]
    if corner_r[0] > corner_l[0]:
        corner_r, corner_l = corner_l, corner_r
    centre = 0.5 * (up.mean(0) + lo.mean(0))
    mouth_half = 0.5 * np.linalg.norm(corner_l - corner_r)

    # --- teeth: incisors sit ~4 mm behind the inner lip surface (closed lips cover them)
    front_z = centre[2] - 4.0 * mm
    upper_front = np.array([centre[0], centre[1], front_z])
    lower_front = np.array([centre[0], centre[1], front_z - 1.8 * mm])  # overjet
    half_w = max(24.0 * mm, 0.75 * mouth_half + 8.0 * mm)
    depth = 40.0 * mm
    ut_v, ut_f = _tooth_row(upper_front, half_w, depth, centre[1] + 7.5 * mm, centre[1] - 1.5 * mm, _UPPER_TOOTH_MM, True, scale)
    lt_v, lt_f = _tooth_row(lower_front, half_w - 2.0 * mm, depth - 2.5 * mm, centre[1] + 0.5 * mm, centre[1] - 8.0 * mm, _LOWER_TOOTH_MM, False, scale)

    # --- cavity rings: blend from the lip loop to an ellipse that encloses the teeth
    P = len(loop)
    u = np.clip((loop[:, 0] - centre[0]) / max(mouth_half, 1e-9), -1.0, 1.0)
    ang_h = np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))
    back_z = min(pivot[2] + 12.0 * mm, front_z - depth - 12.0 * mm)
    back_z = max(back_z, front_z - depth - 25.0 * mm)
    rings = [loop.copy()]
    H_up, H_lo = 13.0 * mm, 14.0 * mm
    # rounded-rectangle cross-section: full height out to the molars at the sides
    box_h = (1.0 - np.abs(u) ** 4) ** 0.25
    # the vestibule hugs the dental arch ~3 mm outside the teeth (lips and cheeks lie on
    # them), so the bag encloses the teeth without poking through the cheeks
    th = u * math.radians(95.0)
    ax = (half_w + 5.0 * mm) / math.sin(math.radians(95.0))
    bz = depth / (1.0 - math.cos(math.radians(95.0)))
    vest_x = centre[0] + ax * np.sin(th)
    vest_z = np.minimum(front_z + 2.5 * mm - bz * (1.0 - np.cos(th)), loop[:, 2])
    t_vest = 0.25
    for r in range(1, n_rings + 1):
        t = r / n_rings
        grow = _smoothstep(t / t_vest)
        shrink = 1.0 - 0.3 * _smoothstep((t - 0.85) / 0.15)  # narrow to the pharynx, behind the molars
        ey = centre[1] + np.where(side >= 0, H_up * box_h, -H_lo * box_h) * shrink
        # tongue: raise the middle of the floor in the middle of the cavity
        tongue = np.where(side < 0, 8.0 * mm * (1.0 - u * u) ** 2 * np.sin(np.pi * np.clip((t - 0.2) / 0.8, 0, 1)), 0.0)
        ey = ey + tongue
        ring = loop.copy()
        ring[:, 0] += (centre[0] + (vest_x - centre[0]) * shrink - loop[:, 0]) * grow
        ring[:, 1] += (ey - loop[:, 1]) * grow
        back = np.clip((t - t_vest) / (1.0 - t_vest), 0.0, 1.0) ** 0.8
        z_front = loop[:, 2] + (vest_z - loop[:, 2]) * grow
        ring[:, 2] = z_front + (np.minimum(back_z, vest_z - 6.0 * mm) - z_front) * back
        rings.append(ring)
    cav_v = np.concatenate(rings, 0)
    cav_f = []
    for r in range(n_rings):
        cav_f += _ring_faces(r * P, (r + 1) * P, P)
    c = len(cav_v)
    cav_v = np.vstack([cav_v, rings[-1].mean(0)])
    last = n_rings * P
    for j in range(P):
        cav_f.append((last + j, last + (j + 1) % P, c))
    cav_f = np.asarray(cav_f, np.int64)
    # normals must point into the cavity air: a closed bag (lips closed) has negative volume
    v0, v1, v2 = cav_v[cav_f[:, 0]], cav_v[cav_f[:, 1]], cav_v[cav_f[:, 2]]
    if np.einsum("ij,ij->i", v0 - centre, np.cross(v1 - centre, v2 - centre)).sum() > 0:
        cav_f = cav_f[:, ::-1].copy()

    # --- jaw weights: the roof stays with the skull, the floor follows the jaw, blended
    # around the corners (where the two lips meet) so the bag stretches smoothly
    side_w = np.where(side > 0, 0.0, np.where(side < 0, 1.0, 0.5))
    blend = np.clip(ang_h / 0.8, 0.0, 1.0)
    ring_w = 0.5 + (side_w - 0.5) * _smoothstep(blend)
    jw_cav = np.concatenate([np.tile(ring_w, n_rings + 1), [0.5]])
    jw_cav[:P] = side_w  # the rim is the lips themselves
    verts = np.concatenate([cav_v, ut_v, lt_v], 0)
    n_c, n_u = len(cav_v), len(ut_v)
    faces = np.concatenate([cav_f, ut_f + n_c, lt_f + n_c + n_u], 0)
    jaw_weight = np.concatenate([jw_cav, np.zeros(n_u), np.ones(len(lt_v))])
    labels = np.array(["mouth_interior"] * n_c + ["teeth"] * (n_u + len(lt_v)), dtype=object)
    return MouthGeometry(
        vertices=verts,
        faces=faces.astype(np.int64),
        lower=jaw_weight > 0.5,
        labels=labels,
        jaw_weight=jaw_weight,
        rim=np.arange(P, dtype=np.int64),
        rim_source=src,
    )


def weld_rim(geom: MouthGeometry, rim_targets: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop the cavity's rim vertices and point its faces at the caller's lip vertices.

    Args:
        geom: output of :func:`build_mouth_geometry`.
        rim_targets: [P] int64 head-mesh vertex index for each rim vertex (same order).
        offset: number of head-mesh vertices the mouth vertices are appended after.
    Returns:
        keep: [M'] int64 indices of the mouth vertices that are kept (appended in order),
        faces: [G, 3] int64 faces indexing the combined (head + kept mouth) vertex array,
        new_index: [M] int64 combined index of every mouth vertex.
    """
    M = len(geom.vertices)
    is_rim = np.zeros(M, bool)
    is_rim[geom.rim] = True
    keep = np.nonzero(~is_rim)[0]
    new_index = np.empty(M, np.int64)
    new_index[keep] = offset + np.arange(len(keep))
    new_index[geom.rim] = np.asarray(rim_targets, np.int64)
    return keep, new_index[geom.faces], new_index
