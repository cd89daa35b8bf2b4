"""Loader for the ICT-FaceKit morphable head (``FaceXModel`` folder, MIT licence).

ICT-FaceKit is a registration-free alternative to FLAME: users download it from
https://github.com/ICT-VGL/ICT-FaceKit. The folder holds OBJ files sharing one quad topology
(26,719 vertices, centimetres, +y up, +z forward): ``generic_neutral_mesh.obj``, identity
modes ``identityNNN.obj`` and 53 ARKit-named expression shapes, plus ``vertex_indices.json``.

ICT has no skeleton. The loader derives one:
- jaw: pivot and axis of the least-squares rigid rotation that best explains the jawOpen
  displacement of the lower teeth (the rotation centre is the point of the fitted screw axis
  in the mid-sagittal plane);
- eyes: centres of least-squares spheres fitted to the scleras;
- neck / root: centroids of horizontal slices of the outer surface (upper neck, lower neck);
and skinning weights: eyeballs rigid to their eye, lower teeth on the jaw, every other vertex
on the jaw by the fraction of its jawOpen motion the jaw rotation explains (smoothed), head on
the neck, lower neck blending to the root. The UE-style eye overlays (lacrimal fluid, eye
blend, eye occlusion) and eyelash strips are dropped: they are shading helpers, not surfaces.

Parsing ~75 OBJs takes a few seconds, so the parsed arrays are cached as safetensors in the
user cache folder (``$XDG_CACHE_HOME/hravatar`` or ``~/.cache/hravatar``), keyed by the folder
path and the files' sizes and modification times.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from hravatar.io.safe import CheckpointError, load_safetensors_checked, save_safetensors_atomic

from ._builtin_skull import _inside_polygon
from .builtin import load_builtin_head
from .landmark_transfer import similarity_transform, transfer_landmarks
from .mesh_utils import face_normals, smooth_vertex_values
from .model import NUM_JOINTS, HeadModel
from .mouth import _smoothstep

ICT_URL = "https://github.com/ICT-VGL/ICT-FaceKit"
ICT_NUM_VERTICES = 26719
#: Geometry ranges [start, end) of the ICT topology (README of ICT-FaceKit).
ICT_GEOMETRY = (
    ("face", 0, 9409),
    ("head_neck", 9409, 11248),
    ("mouth_socket", 11248, 13294),
    ("eye_socket_left", 13294, 13678),
    ("eye_socket_right", 13678, 14062),
    ("gums_tongue", 14062, 17039),
    ("teeth_upper", 17039, 19247),
    ("teeth_lower", 19247, 21451),
    ("eyeball_left", 21451, 23021),
    ("eyeball_right", 23021, 24591),
)
#: Vertices kept: everything before the eye overlays and eyelashes.
ICT_KEPT_VERTICES = 24591
#: Sclera vertex ranges [start, end) of the left and right eyeballs (the iris layer excluded).
ICT_SCLERA_LEFT = (21451, 22221)
ICT_SCLERA_RIGHT = (23021, 23791)
#: Multi-PIE 68 landmark -> MediaPipe landmark, for points that mean the same thing in both
#: schemes: eye corners and lids, brows, nose, lip corners / midpoints / cupid's bow, chin.
#: The face contour (0-16) is left out: its points slide with the view in both schemes.
IBUG68_TO_MEDIAPIPE = (
    (8, 152), (27, 168), (30, 1), (33, 2), (31, 98), (35, 327),
    (19, 105), (21, 107), (22, 336), (24, 334),
    (36, 33), (37, 160), (38, 158), (39, 133), (40, 153), (41, 144),
    (42, 362), (43, 385), (44, 387), (45, 263), (46, 373), (47, 380),
    (48, 61), (50, 37), (51, 0), (52, 267), (54, 291), (56, 314), (57, 17), (58, 84),
    (60, 78), (62, 13), (64, 308), (66, 14),
)
_CACHE_VERSION = "1"
_CM = 0.01  # ICT is in centimetres


# ============================================================================ OBJ parsing
def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: {what} not found; ICT-FaceKit is available freely from {ICT_URL} (FaceXModel folder)")


def read_obj_vertices(path: str | Path, num_vertices: int | None = None) -> np.ndarray:
    """Vertex positions of an OBJ file, parsed with numpy (no per-line Python work).

    Args:
        path: OBJ file.
        num_vertices: expected count (checked when given).
    Returns:
        [V, 3] float64 positions as stored (no unit change).
    Raises:
        FileNotFoundError, CheckpointError (one line naming the file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _missing(path, "ICT-FaceKit shape file") from None
    data = b"\n" + data  # so that a first line "v ..." is found like the others
    start = data.find(b"\nv ") + 1
    end = data.rfind(b"\nv ")
    end = data.find(b"\n", end + 1)
    block = data[start:end if end > 0 else len(data)]
    # fast path: the 'v' lines are contiguous (true of every ICT file); else filter lines
    if start == 0 or block.count(b"\nv ") + 1 != block.count(b"\n") + 1:
        block = b"\n".join(ln[2:] for ln in data.splitlines() if ln.startswith(b"v "))
    else:
        block = block.replace(b"v", b" ")
    try:
        arr = np.array(block.split(), dtype=np.float64)
    except ValueError:
        raise CheckpointError(f"{path}: corrupted OBJ vertex data") from None
    if arr.size % 3 or arr.size == 0:
        raise CheckpointError(f"{path}: corrupted OBJ vertex data (vertex lines must have 3 coordinates)")
    v = arr.reshape(-1, 3)
    if num_vertices is not None and len(v) != num_vertices:
        raise CheckpointError(f"{path}: has {len(v)} vertices, expected {num_vertices} (not the ICT-FaceKit topology)")
    return v


def read_obj_faces(path: str | Path) -> np.ndarray:
    """Faces of an OBJ file, triangulated (quads split along their 0-2 diagonal).

    Args:
        path: OBJ file with triangle and/or quad faces (``f a/t b/t c/t [d/t]``).
    Returns:
        [F, 3] int64 zero-based vertex indices, in file order (a quad gives two rows).
    """
    path = Path(path)
    tris = []
    for ln in path.read_bytes().splitlines():
        if not ln.startswith(b"f "):
            continue
        idx = [int(tok.split(b"/", 1)[0]) - 1 for tok in ln.split()[1:]]
        for k in range(1, len(idx) - 1):
            tris.append((idx[0], idx[k], idx[k + 1]))
    if not tris:
        raise CheckpointError(f"{path}: no faces in this OBJ file")
    return np.asarray(tris, np.int64)


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hravatar"


def read_ict_folder(folder: str | Path, cache_dir: str | Path | None = None, use_cache: bool = True) -> dict:
    """Parse an ICT-FaceKit FaceXModel folder (cached).

    Args:
        folder: the FaceXModel folder (or the ICT-FaceKit checkout holding it).
        cache_dir: where to cache the parsed arrays (default: user cache folder).
        use_cache: read / write the cache.
    Returns:
        dict: 'neutral' [V,3], 'faces' [F,3] int64, 'identity' [V,3,S], 'expression' [V,3,E]
        (deltas from the neutral, centimetres, float32), 'identity_names', 'expression_names',
        'landmarks68' [68] int64, all for the full 26,719-vertex topology.
    Raises:
        FileNotFoundError naming what is missing (and where ICT-FaceKit comes from).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise _missing(folder, "ICT-FaceKit FaceXModel folder")
    if not (folder / "generic_neutral_mesh.obj").is_file() and (folder / "FaceXModel").is_dir():
        folder = folder / "FaceXModel"  # the root of an ICT-FaceKit checkout
    for name in ("generic_neutral_mesh.obj", "vertex_indices.json"):
        if not (folder / name).is_file():
            raise _missing(folder / name, f"ICT-FaceKit file '{name}'")
    try:
        info = json.loads((folder / "vertex_indices.json").read_text())
        expr_names = [str(n) for n in info["expressions"]]
        lmk68 = np.asarray(info["idx_to_landmark_verts"], np.int64)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{folder / 'vertex_indices.json'}: not the ICT-FaceKit vertex_indices.json") from None
    for n in expr_names:
        if not (folder / f"{n}.obj").is_file():
            raise _missing(folder / f"{n}.obj", f"expression shape '{n}'")
    id_files = sorted(folder.glob("identity[0-9][0-9][0-9].obj"))
    files = [folder / "generic_neutral_mesh.obj", folder / "vertex_indices.json", *id_files, *(folder / f"{n}.obj" for n in expr_names)]

    h = hashlib.sha1(f"{_CACHE_VERSION}|{folder.resolve()}".encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    cache = _cache_dir(cache_dir) / f"ict-{h.hexdigest()[:16]}.safetensors"
    if use_cache and cache.is_file():
        try:
            t, meta = load_safetensors_checked(cache, required_meta=("hravatar_ict",))
            names = json.loads(meta["hravatar_ict"])
            return {
                **{k: t[k].numpy() for k in ("neutral", "faces", "identity", "expression", "landmarks68")},
                "identity_names": names["identity"],
                "expression_names": names["expression"],
            }
        except (CheckpointError, KeyError, ValueError):
            pass  # a stale or damaged cache is rebuilt below

    neutral = read_obj_vertices(files[0], ICT_NUM_VERTICES)
    faces = read_obj_faces(files[0])
    identity = np.stack([read_obj_vertices(p, ICT_NUM_VERTICES) - neutral for p in id_files], -1) if id_files else np.zeros((ICT_NUM_VERTICES, 3, 0))
    expression = np.stack([read_obj_vertices(folder / f"{n}.obj", ICT_NUM_VERTICES) - neutral for n in expr_names], -1)
    out = {
        "neutral": neutral.astype(np.float32),
        "faces": faces,
        "identity": identity.astype(np.float32),
        "expression": expression.astype(np.float32),
        "landmarks68": lmk68,
        "identity_names": [p.stem for p in id_files],
        "expression_names": expr_names,
    }
    if use_cache:
        try:
            tensors = {k: torch.from_numpy(np.ascontiguousarray(out[k])) for k in ("neutral", "faces", "identity", "expression", "landmarks68")}
            save_safetensors_atomic(tensors, cache, {"hravatar_ict": json.dumps({"identity": out["identity_names"], "expression": out["expression_names"]})})
        except OSError:
            pass  # read-only home: work without a cache
    return out


# ============================================================================ fitting helpers
def rotation_centre(R: np.ndarray, t: np.ndarray, plane_x: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre, axis and angle of a rigid motion seen as a rotation about an unknown centre.

    The centre ``c`` solves ``(I - R) c = t`` in the least-squares sense (exact for a pure
    rotation; a translation along the axis is ignored); it is a line along the axis, and the
    point of that line in the plane ``x = plane_x`` is returned.

    Args:
        R: [3, 3]; t: [3]; plane_x: x of the plane picking the point on the axis line.
    Returns:
        centre [3], unit axis [3], angle (radians, right-handed about the axis).
    """
    angle = float(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)))
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    axis = axis / max(np.linalg.norm(axis), 1e-12)
    c0 = np.linalg.lstsq(np.eye(3) - R, t, rcond=None)[0]
    c0 = c0 - axis * (c0 @ axis)  # min-norm point of the line
    s = (plane_x - c0[0]) / axis[0] if abs(axis[0]) > 1e-6 else 0.0
    return c0 + s * axis, axis, angle


def fit_sphere(P: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through points [N, 3] (algebraic fit). Returns centre [3], radius."""
    A = np.concatenate([2 * P, np.ones((len(P), 1))], 1)
    b = (P**2).sum(1)
    sol = np.linalg.lstsq(A, b, rcond=None)[0]
    c = sol[:3]
    return c, float(np.sqrt(max(sol[3] + c @ c, 0.0)))


def affine_regressor_row(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Minimum-norm weights w (sum 1) with ``sum_i w_i points_i = target``.

    A joint regressor row that reproduces ``target`` exactly on the neutral mesh and moves it
    affinely with the chosen vertices under shape changes.

    Args:
        points: [N, 3] (N >= 4, not coplanar); target: [3].
    Returns:
        [N] weights.
    """
    A = np.concatenate([points.T, np.ones((1, len(points)))], 0)  # [4, N]
    b = np.concatenate([target, [1.0]])
    return A.T @ np.linalg.solve(A @ A.T, b)


def _slice_centroid_row(v: np.ndarray, area: np.ndarray, outer: np.ndarray, y: float, half: float) -> np.ndarray:
    """[V] regressor row: area-weighted mean of outer-surface vertices with |v_y - y| < half.

    Area weights keep the dense face mesh from pulling the centroid forwards.
    """
    sel = outer & (np.abs(v[:, 1] - y) < half)
    row = np.where(sel, area, 0.0)
    return row / max(row.sum(), 1e-30)


def _vertex_areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """[V] one third of the area of the faces around each vertex."""
    a = 0.5 * face_normals(torch.from_numpy(v), torch.from_numpy(f), normalize=False).norm(dim=-1).numpy()
    out = np.zeros(len(v))
    for k in range(3):
        np.add.at(out, f[:, k], a / 3.0)
    return out


def geometry_mask(num_vertices: int, *names: str) -> np.ndarray:
    """[num_vertices] bool mask of the named ICT geometries (names from ``ICT_GEOMETRY``)."""
    ranges = {name: (a, b) for name, a, b in ICT_GEOMETRY}
    m = np.zeros(num_vertices, bool)
    for n in names:
        a, b = ranges[n]
        m[a:b] = True
    return m


def derive_ict_rig(v: np.ndarray, f: np.ndarray, jaw_open: np.ndarray, lmk68: np.ndarray) -> dict:
    """Joints, regressor and skinning weights of the ICT head (centimetres in, centimetres out).

    Args:
        v: [V, 3] neutral (kept vertices only); f: [F, 3]; jaw_open: [V, 3] jawOpen delta;
        lmk68: [68] Multi-PIE landmark vertex indices.
    Returns:
        dict with 'J_regressor' [5, V], 'lbs_weights' [V, 5], 'joints' [5, 3],
        'jaw_axis' [3], 'jaw_angle', 'jaw_fit_rms', 'eye_radius' [2].
    """
    V = len(v)
    sl = {name: slice(a, b) for name, a, b in ICT_GEOMETRY}

    def mask(*names):
        return geometry_mask(V, *names)

    outer = mask("face", "head_neck")

    # ---- jaw: rotation explaining the lower teeth's jawOpen motion
    lt = v[sl["teeth_lower"]]
    _, R, t = similarity_transform(lt, lt + jaw_open[sl["teeth_lower"]], with_scale=False)
    pivot, axis, angle = rotation_centre(R, t, plane_x=float(lt[:, 0].mean()))
    if axis[0] < 0:  # opening the jaw = positive rotation about +x (chin down, like FLAME)
        axis, angle = -axis, -angle
    fit_rms = float(np.sqrt((((lt - pivot) @ R.T + pivot - (lt + jaw_open[sl["teeth_lower"]])) ** 2).sum(1).mean()))

    # ---- eyes: sphere centres of the scleras
    eye_l, r_l = fit_sphere(v[slice(*ICT_SCLERA_LEFT)])
    eye_r, r_r = fit_sphere(v[slice(*ICT_SCLERA_RIGHT)])

    # ---- neck / root: slices of the outer surface
    chin_y = v[lmk68[8], 1]
    bottom_y = v[outer, 1].min()
    neck_y = 0.5 * (pivot[1] + chin_y)
    root_y = bottom_y + 0.25 * (chin_y - bottom_y)
    half = 0.4  # cm: slice half-thickness

    Jr = np.zeros((NUM_JOINTS, V))
    area = _vertex_areas(v, f)
    Jr[0] = _slice_centroid_row(v, area, outer, root_y, half)
    Jr[1] = _slice_centroid_row(v, area, outer, neck_y, half)
    # jaw: affine combination of outer vertices near both ends of the jaw axis (the condyles)
    ends = []
    for sgn in (-1.0, 1.0):
        cand = np.nonzero(outer & (np.sign(v[:, 0] - pivot[0]) == sgn))[0]
        d = np.linalg.norm(np.cross(v[cand] - pivot, axis), axis=1)
        ends.append(cand[np.argsort(d)[:16]])
    jaw_idx = np.concatenate(ends)
    Jr[2, jaw_idx] = affine_regressor_row(v[jaw_idx], pivot)
    for k, (a, b), c in ((3, ICT_SCLERA_LEFT, eye_l), (4, ICT_SCLERA_RIGHT, eye_r)):
        Jr[k, a:b] = affine_regressor_row(v[a:b], c)
    joints = Jr @ v

    # ---- skinning
    d_rot = (v - pivot) @ R.T + pivot - v
    typical = float(np.linalg.norm(d_rot[sl["teeth_lower"]], axis=1).mean())
    w_jaw = (jaw_open * d_rot).sum(1) / ((d_rot**2).sum(1) + (0.1 * typical) ** 2)
    w_jaw = np.clip(w_jaw, 0.0, 1.0)
    fixed = mask("teeth_lower", "teeth_upper", "eyeball_left", "eyeball_right")
    w_jaw[mask("teeth_lower")] = 1.0
    w_jaw[mask("teeth_upper", "eyeball_left", "eyeball_right")] = 0.0
    w_jaw = np.clip(smooth_vertex_values(w_jaw, f, iterations=10, lam=0.5, fixed=fixed), 0.0, 1.0)
    # lower neck: blend from the neck joint (above) to the root (bottom)
    w_root = _smoothstep((neck_y - 0.35 * (neck_y - root_y) - v[:, 1]) / max(0.65 * (neck_y - root_y), 1e-9))
    w_root[~outer] = 0.0
    W = np.zeros((V, NUM_JOINTS))
    W[:, 0] = w_root
    W[:, 2] = w_jaw * (1.0 - w_root)
    W[:, 1] = 1.0 - W[:, 0] - W[:, 2]
    for k, name in ((3, "eyeball_left"), (4, "eyeball_right")):
        W[sl[name]] = 0.0
        W[sl[name], k] = 1.0
    return {
        "J_regressor": Jr,
        "lbs_weights": W,
        "joints": joints,
        "jaw_axis": axis,
        "jaw_angle": angle,
        "jaw_fit_rms": fit_rms,
        "eye_radius": np.array([r_l, r_r]),
    }


def ict_regions(v: np.ndarray, lmk68: np.ndarray, joints: np.ndarray) -> dict[str, np.ndarray]:
    """Region masks of the kept ICT vertices (disjoint).

    face / scalp / ears / neck are split heuristically from ICT's 'Face' and 'Head and Neck'
    geometries: lips = face vertices inside the outer-lip landmark polygon (front view);
    ears = face vertices beyond 1.0 eye distance from the midline, behind the eyes by more
    than an eye distance and behind the jaw joint, from just under the nose base to 0.3 eye
    distances over the eyes;
    neck = outer vertices under the jawline (landmarks 2..8 seen from the side) and
    head-and-neck vertices below landmark 2; scalp = the other head-and-neck vertices and
    face vertices more than 0.75 eye distances above the brows (ICT's face geometry covers
    much of the cranium).

    Args:
        v: [V, 3] neutral (cm); lmk68: [68] landmark vertices; joints: [5, 3].
    Returns:
        dict of [V] bool masks for face, scalp, ears, neck, eyes, lips, teeth, mouth_interior.
    """
    V = len(v)

    def mask(*names):
        return geometry_mask(V, *names)

    face_geo, head_geo = mask("face"), mask("head_neck")
    L = v[lmk68]
    e = float(np.linalg.norm(joints[3] - joints[4]))
    eye_mid = 0.5 * (joints[3] + joints[4])
    lips = face_geo & _inside_polygon(v[:, :2], L[48:60, :2]) & (v[:, 2] > L[48:60, 2].min() - 0.5)
    nose_base_y = L[33, 1]
    ears = (
        face_geo
        & (np.abs(v[:, 0] - eye_mid[0]) > 1.0 * e)
        & (v[:, 2] < min(eye_mid[2] - 1.0 * e, joints[2, 2] - 0.1 * e))
        & (v[:, 1] < eye_mid[1] + 0.3 * e)
        & (v[:, 1] > nose_base_y - 0.2 * e)
    )
    # jawline seen from the side: y limit as a function of z (behind the jaw angle: flat)
    jl = L[2:9]
    o = np.argsort(jl[:, 2])
    y_line = np.interp(v[:, 2], jl[o, 2], jl[o, 1])
    under_jaw = v[:, 1] < y_line - 0.3
    neck = ((face_geo & under_jaw) | (head_geo & (v[:, 1] < L[2, 1]))) & ~ears & ~lips
    # ICT's face geometry reaches far over the cranium: above the hairline it is scalp
    brow_y = L[17:27, 1].max()
    scalp = (head_geo | (face_geo & (v[:, 1] > brow_y + 0.75 * e))) & ~neck & ~ears
    face = (face_geo | mask("eye_socket_left", "eye_socket_right")) & ~lips & ~ears & ~neck & ~scalp
    return {
        "face": face,
        "scalp": scalp,
        "ears": ears,
        "neck": neck,
        "eyes": mask("eyeball_left", "eyeball_right"),
        "lips": lips,
        "teeth": mask("teeth_upper", "teeth_lower"),
        "mouth_interior": mask("mouth_socket", "gums_tongue"),
    }


# ============================================================================ loader
def load_ict(
    folder: str | Path,
    n_shape: int | None = None,
    expressions: list[str] | None = None,
    *,
    landmark_source: HeadModel | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> HeadModel:
    """Load an ICT-FaceKit FaceXModel folder as a :class:`HeadModel`.

    Args:
        folder: the FaceXModel folder (OBJs + vertex_indices.json).
        n_shape: identity modes kept (default: all ``identityNNN.obj`` present).
        expressions: expression names kept, in this order (default: the 53 listed in
            vertex_indices.json, jawOpen included).
        landmark_source: head whose MediaPipe landmarks are transferred (default: built-in).
        cache_dir: cache folder for the parsed OBJs (default: user cache folder).
        use_cache: read / write that cache.
    Returns:
        :class:`HeadModel` named 'ict' (metres, +y up, +z forward, 24,591 vertices). ``meta``
        holds 'jaw_open_pose' (the jaw axis-angle closest to the jawOpen shape) and fit errors.
    Raises:
        FileNotFoundError naming what is missing (and where ICT-FaceKit comes from);
        CheckpointError for corrupted files; ValueError for unknown expression names.
    """
    raw = read_ict_folder(folder, cache_dir=cache_dir, use_cache=use_cache)
    Vk = ICT_KEPT_VERTICES
    n_avail = raw["identity"].shape[-1]
    if n_shape is None:
        n_shape = n_avail
    if not 0 <= n_shape <= n_avail:
        raise ValueError(f"{folder}: asked for {n_shape} identity modes, the folder has {n_avail} (identityNNN.obj files)")
    names = list(raw["expression_names"])
    if expressions is None:
        expressions = names
    unknown = [n for n in expressions if n not in names]
    if unknown:
        raise ValueError(f"{folder}: unknown ICT expression(s) {', '.join(unknown)}")
    e_idx = [names.index(n) for n in expressions]
    lacking = [n for n in ("jawOpen", "eyeBlink_L", "eyeBlink_R") if n not in names]
    if lacking:
        raise CheckpointError(f"{folder}: vertex_indices.json lists no {', '.join(lacking)} shape (needed to rig the jaw and eyelids)")

    f_all = raw["faces"]
    f = f_all[(f_all < Vk).all(1)]
    v_cm = raw["neutral"][:Vk].astype(np.float64)
    expr_cm = raw["expression"][:Vk].astype(np.float64)
    jaw_open = expr_cm[:, :, names.index("jawOpen")]
    rig = derive_ict_rig(v_cm, f, jaw_open, raw["landmarks68"])
    regions = ict_regions(v_cm, raw["landmarks68"], rig["joints"])

    eyelids = np.zeros((2, Vk, 3))
    eyelids[0] = expr_cm[:, :, names.index("eyeBlink_R")]
    eyelids[1] = expr_cm[:, :, names.index("eyeBlink_L")]

    v = v_cm * _CM
    anchors = {mp: int(raw["landmarks68"][i]) for i, mp in IBUG68_TO_MEDIAPIPE}
    surf = regions["face"] | regions["lips"] | regions["eyes"]
    src = landmark_source if landmark_source is not None else load_builtin_head()
    lmk_faces, lmk_bary = transfer_landmarks(src, torch.from_numpy(v), torch.from_numpy(f), torch.from_numpy(surf), anchors)

    meta = {
        "source": str(Path(folder).expanduser().resolve()),
        "jaw_open_pose": (rig["jaw_axis"] * rig["jaw_angle"]).tolist(),
        "jaw_fit_rms_m": rig["jaw_fit_rms"] * _CM,
        "eye_radius_m": (rig["eye_radius"] * _CM).tolist(),
        "dropped": "eye overlays and eyelashes (vertices 24591..26718)",
    }
    return HeadModel(
        name="ict",
        v_template=torch.from_numpy(v),
        faces=torch.from_numpy(f),
        shapedirs=torch.from_numpy(raw["identity"][:Vk, :, :n_shape].astype(np.float64) * _CM),
        exprdirs=torch.from_numpy(expr_cm[:, :, e_idx] * _CM),
        posedirs=torch.zeros(Vk, 3, (NUM_JOINTS - 1) * 9),
        J_regressor=torch.from_numpy(rig["J_regressor"]),
        lbs_weights=torch.from_numpy(rig["lbs_weights"]),
        eyelid_dirs=torch.from_numpy(eyelids * _CM),
        regions={k: torch.from_numpy(m) for k, m in regions.items()},
        lmk_faces=lmk_faces,
        lmk_bary=lmk_bary,
        expr_names=list(expressions),
        shape_names=list(raw["identity_names"][:n_shape]),
        meta=meta,
    )
