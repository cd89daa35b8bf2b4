"""Loader for user-supplied FLAME models (FLAME 2020 ``generic_model.pkl``, FLAME 2023).

FLAME cannot be redistributed: users register at https://flame.is.tue.mpg.de and point
hravatar at their copy. The files are Python-2 pickles containing numpy arrays, a scipy
sparse joint regressor and ``chumpy`` objects. They are read here WITHOUT chumpy and without
ever executing code from the file: a restricted unpickler only reconstructs numpy arrays,
sparse matrices and inert stand-ins for chumpy objects (whose wrapped array is kept).

On top of FLAME itself the loader adds what the HRAvatar method needs:
- eyelid bases (the SMIRK/HRAvatar ``l_eyelid.npy``/``r_eyelid.npy`` files when given or found
  beside the model, else a procedural approximation: see :func:`procedural_eyelids`);
- per-vertex regions (``FLAME_masks.pkl`` beside the model when present, else heuristics);
- the 478 MediaPipe landmarks (``mediapipe_landmark_embedding.npz`` beside the model for the
  105 points it has, landmark transfer from the built-in head for the rest);
- teeth and a mouth interior behind the inner-lip contour (upper teeth follow the neck, lower
  teeth and the cavity floor follow the jaw), as HRAvatar does.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from hravatar.io.safe import CheckpointError

from .builtin import load_builtin_head
from .landmark_transfer import transfer_landmarks
from .mesh_utils import boundary_loops, connected_components
from .model import JOINT_PARENTS, NUM_JOINTS, NUM_MEDIAPIPE_LANDMARKS, HeadModel
from .mouth import _smoothstep, build_mouth_geometry, weld_rim

FLAME_URL = "https://flame.is.tue.mpg.de"
#: File names tried, in order, when ``load_flame`` is given a folder.
FLAME_FILE_NAMES = ("flame2023.pkl", "generic_model.pkl", "flame2023_Open.pkl")
_REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
_N_IDENTITY = 300  # FLAME's shapedirs: 300 identity modes, then the expression modes


# ============================================================================ safe unpickling
class _Inert:
    """Stand-in for a pickled object of an allowed foreign class: keeps its state, runs nothing."""

    _pickled_name = "?"

    def __setstate__(self, state) -> None:
        # protocol-2 objects with __slots__ pickle (dict, slots); chumpy never does, keep the dict
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        self.state = state


class _ChumpyStub(_Inert):
    """A chumpy object (``chumpy.ch.Ch`` and friends); its numpy data is ``state['x']``."""


class _SparseStub(_Inert):
    """A scipy.sparse matrix; rebuilt explicitly from its arrays, never by calling scipy code
    chosen by the file."""

    fmt = "csc"


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3 writes bytes into protocol-2 pickles (latin1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError("refused _codecs.encode call with a non-latin1 encoding")
    return codecs.encode(text, "latin1")


def _reconstructor(cls, base, state):
    """Protocol-0/1 ``copy_reg._reconstructor``, restricted to the inert stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, _Inert)) or base is not object:
        raise pickle.UnpicklingError("refused copy_reg._reconstructor of a non-allowed class")
    return cls.__new__(cls)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for FLAME's Python-2 pickles that can only build inert data.

    Allowed globals: numpy array / dtype / scalar reconstruction, ``set``/``frozenset``,
    ``_codecs.encode`` with latin1 (Python 3 protocol-2 bytes), scipy.sparse matrices (as
    :class:`_SparseStub`) and any ``chumpy.*`` class (as :class:`_ChumpyStub`). Everything
    else (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``.
    """

    def __init__(self, file) -> None:
        super().__init__(file, encoding="latin1")
        self._stubs: dict[tuple[str, str], type] = {}

    def _stub(self, base: type, module: str, name: str, **attrs) -> type:
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (base,), {"_pickled_name": f"{module}.{name}", **attrs})
        return self._stubs[key]

    def find_class(self, module: str, name: str):
        """The object a pickle's GLOBAL refers to, if allowed; raises UnpicklingError otherwise."""
        numpy_mods = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")
        if module in numpy_mods and name == "_reconstruct":
            return np.empty(0).__reduce__()[0]
        if module in numpy_mods and name == "scalar":
            return np.float64(0).__reduce__()[0]
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "object"):
            return {"set": set, "frozenset": frozenset, "object": object}[name]
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        if module in ("copyreg", "copy_reg") and name == "_reconstructor":
            return _reconstructor
        if module == "chumpy" or module.startswith("chumpy."):
            return self._stub(_ChumpyStub, module, name)
        if module.startswith("scipy.sparse") and name in ("csc_matrix", "csr_matrix", "coo_matrix"):
            return self._stub(_SparseStub, module, name, fmt=name[:3])
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}' (only numpy, scipy.sparse and chumpy data are allowed)")


def _to_plain(obj, where: str):
    """Replace the inert stand-ins in a loaded structure by numpy arrays / scipy matrices."""
    if isinstance(obj, _ChumpyStub):
        st = obj.state if isinstance(obj.state, dict) else {}
        if "x" not in st:
            raise ValueError(f"unsupported chumpy expression {obj._pickled_name} in '{where}' (no stored array)")
        return np.asarray(_to_plain(st["x"], where))
    if isinstance(obj, _SparseStub):
        st = obj.state if isinstance(obj.state, dict) else {}
        shape = st.get("_shape", st.get("shape"))  # the attribute's name changed across scipy versions
        shape = tuple(shape) if shape is not None else None
        if obj.fmt == "coo":
            return sp.coo_matrix((st["data"], (st["row"], st["col"])), shape=shape).tocsc()
        cls = sp.csc_matrix if obj.fmt == "csc" else sp.csr_matrix
        return cls((st["data"], st["indices"], st["indptr"]), shape=shape)
    if isinstance(obj, _Inert):
        raise ValueError(f"unexpected object {obj._pickled_name} in '{where}'")
    if isinstance(obj, dict):
        return {k: _to_plain(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v, where) for v in obj)
    return obj


def read_restricted_pickle(path: str | Path):
    """Read a (Python-2, latin1) pickle of numpy / scipy.sparse / chumpy data, safely.

    Args:
        path: the pickle file.
    Returns:
        the unpickled structure with chumpy objects replaced by their numpy arrays and sparse
        matrices rebuilt from their arrays.
    Raises:
        FileNotFoundError: missing file.
        CheckpointError: foreign, malicious or corrupted file (one-line message naming it).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = RestrictedUnpickler(f).load()
        return _to_plain(raw, "")
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a FLAME data file or unsafe pickle ({str(e).splitlines()[0]})") from None
    except (EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError, UnicodeDecodeError, MemoryError, RecursionError, OverflowError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupted or unsupported pickle ({msg})") from None


# ============================================================================ FLAME file
def resolve_flame_path(path: str | Path) -> Path:
    """The FLAME pickle to read: ``path`` itself, or the first known file name in a folder.

    Raises:
        FileNotFoundError: one-line message saying where FLAME comes from.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        for n in FLAME_FILE_NAMES:
            if (p / n).is_file():
                return p / n
        raise FileNotFoundError(
            f"{p}: no FLAME model in this folder (expected one of {', '.join(FLAME_FILE_NAMES)}); "
            f"FLAME must be obtained from {FLAME_URL} (free registration)"
        )
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: FLAME model file not found (expected a FLAME 2020 generic_model.pkl or flame2023.pkl); "
            f"FLAME must be obtained from {FLAME_URL} (free registration)"
        )
    return p


def read_flame_file(path: str | Path) -> dict:
    """Read and check the arrays of a FLAME pickle.

    Args:
        path: FLAME ``.pkl`` file.
    Returns:
        dict with float64 'v_template' [V,3], int64 'f' [F,3], 'shapedirs' [V,3,M],
        'posedirs' [V,3,36], 'J_regressor' [5,V] (dense), 'weights' [V,5], int64 'parents' [5].
    Raises:
        FileNotFoundError / CheckpointError with a one-line message naming the file.
    """
    path = resolve_flame_path(path)
    data = read_restricted_pickle(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a FLAME model (the pickle holds a {type(data).__name__}, not a dict)")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path}: not a FLAME model (missing {', '.join(missing)})")
    try:
        v = np.asarray(data["v_template"], np.float64)
        V = v.shape[0]
        f = np.asarray(data["f"]).astype(np.int64)
        sd = np.asarray(data["shapedirs"], np.float64)
        pd = np.asarray(data["posedirs"], np.float64)
        Jr = data["J_regressor"]
        Jr = np.asarray(Jr.toarray() if sp.issparse(Jr) else Jr, np.float64)
        w = np.asarray(data["weights"], np.float64)
        kt = np.asarray(data["kintree_table"]).astype(np.int64)
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: corrupted FLAME arrays ({str(e).splitlines()[0]})") from None
    parents = kt[0].copy()
    parents[(parents < 0) | (parents >= NUM_JOINTS)] = -1  # FLAME stores the root as uint32 max
    checks = [
        ("v_template", v.ndim == 2 and v.shape[1] == 3),
        ("f", f.ndim == 2 and f.shape[1] == 3 and f.min() >= 0 and f.max() < V),
        ("shapedirs", sd.ndim == 3 and sd.shape[:2] == (V, 3)),
        ("posedirs", pd.shape == (V, 3, (NUM_JOINTS - 1) * 9)),
        ("J_regressor", Jr.shape == (NUM_JOINTS, V)),
        ("weights", w.shape == (V, NUM_JOINTS)),
        ("kintree_table", kt.shape == (2, NUM_JOINTS) and tuple(parents) == JOINT_PARENTS),
    ]
    for key, ok in checks:
        if not ok:
            raise CheckpointError(f"{path}: not a FLAME model (unexpected '{key}' layout)")
    return {"v_template": v, "f": f, "shapedirs": sd, "posedirs": pd, "J_regressor": Jr, "weights": w, "parents": parents}


# ============================================================================ geometry helpers
def find_mouth_loop(v: np.ndarray, f: np.ndarray, jaw: np.ndarray, eyes: np.ndarray) -> np.ndarray | None:
    """The inner-lip boundary loop of a head mesh with an open mouth hole.

    Among the mesh's boundary loops, the mouth is the one whose centre lies below the eyes,
    above the jaw joint's level minus an eye distance, near the mid-sagittal plane and in
    front (the neck opening is lower and further back; eye openings are higher).

    Args:
        v: [V, 3] vertices; f: [F, 3] faces; jaw: [3] jaw joint; eyes: [2, 3] eye centres.
    Returns:
        [P] ordered vertex indices of the loop, or None if the mesh has no such opening.
    """
    e = float(np.linalg.norm(eyes[0] - eyes[1]))
    mid = eyes.mean(0)
    best, best_z = None, -np.inf
    for loop in boundary_loops(f):
        c = v[loop].mean(0)
        width = np.ptp(v[loop][:, 0])
        ok = (
            len(loop) >= 6
            and abs(c[0] - mid[0]) < 0.25 * e
            and mid[1] - 2.5 * e < c[1] < mid[1] - 0.5 * e
            and c[2] > jaw[2]
            and 0.3 * e < width < 2.0 * e
        )
        if ok and c[2] > best_z:
            best, best_z = loop, c[2]
    return best


def split_loop_at_corners(v: np.ndarray, loop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a closed mouth or eye opening at its corners (extreme x) into two contours.

    Args:
        v: [V, 3] vertices; loop: [P] ordered loop vertex indices.
    Returns:
        upper, lower: vertex index arrays, both running from the right corner (-x) to the
        left corner (+x) and sharing the two corner vertices.
    """
    xs = v[loop, 0]
    i0, i1 = int(xs.argmin()), int(xs.argmax())
    P = len(loop)
    a = [loop[(i0 + k) % P] for k in range((i1 - i0) % P + 1)]  # right -> left one way
    b = [loop[(i0 - k) % P] for k in range((i0 - i1) % P + 1)]  # right -> left the other way
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    return (a, b) if v[a, 1].mean() > v[b, 1].mean() else (b, a)


def _interp_curve(xq: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points of a polyline [n,3] (monotone in x after sorting) at abscissae ``xq`` [m] -> [m,3]."""
    o = np.argsort(pts[:, 0])
    p = pts[o]
    return np.stack([np.interp(xq, p[:, 0], p[:, k]) for k in range(3)], -1)


def procedural_eyelids(
    v: np.ndarray, f: np.ndarray, eye_centres: np.ndarray, eye_radius: float, candidates: np.ndarray
) -> np.ndarray:
    """Eyelid-closing displacements derived from the eye openings of a head mesh.

    Approximation (FLAME has no eyelid basis of its own): each eye opening is the boundary
    loop nearest the eye centre; it is split at its corners into an upper and a lower margin.
    Upper-lid vertices (above the upper margin, within 0.45 eye-widths, in front of the eye
    centre) move by the margin-to-margin vector at their x, fading out smoothly with their
    height above the margin; closed-lid points nearer the eye centre than the lower margin
    are pushed radially back out to that distance, so the lid wraps the cornea instead of
    cutting through it while the margins still meet exactly. Meshes without eye openings get
    a cruder version: upper-lid vertices are lowered towards the eye centre's height.

    Args:
        v: [V, 3] neutral vertices (metres); f: [F, 3] faces.
        eye_centres: [2, 3] (right eye, left eye) centres.
        eye_radius: eyeball radius.
        candidates: [V] bool, vertices allowed to move (the head surface, not the eyeballs).
    Returns:
        [2, V, 3] displacements at full closure (index 0 right, 1 left).
    """
    out = np.zeros((2, len(v), 3))
    loops = boundary_loops(f)
    for side in range(2):
        c = eye_centres[side]
        near = [lp for lp in loops if np.linalg.norm(v[lp].mean(0) - c) < 2.0 * eye_radius and len(lp) >= 6]
        if near:
            loop = min(near, key=lambda lp: np.linalg.norm(v[lp].mean(0) - c))
            up, lo = split_loop_at_corners(v, loop)
            up_p, lo_p = v[up], v[lo]
            x0, x1 = up_p[:, 0].min(), up_p[:, 0].max()
            width = x1 - x0
            rel = v - c
            inside = candidates & (v[:, 0] > x0) & (v[:, 0] < x1) & (rel[:, 2] > -0.2 * eye_radius)
            up_at = _interp_curve(v[:, 0], up_p)
            height = v[:, 1] - up_at[:, 1]
            lid = inside & (height >= -1e-9) & (height < 0.45 * width)
            lid[up] = True
            lid[lo] = False
            lo_at = _interp_curve(v[:, 0], lo_p)
            fall = 1.0 - _smoothstep(height / (0.45 * width))
            # the margins meet at the corners, so the displacement vanishes there by itself
            d = np.where(lid[:, None], (lo_at - up_at) * fall[:, None], 0.0)
            # closed lid at least as far from the eye centre as the lower margin it meets
            min_r = np.linalg.norm(lo_at - c, axis=1)
        else:
            e_w = 2.2 * eye_radius
            rel = v - c
            lid = candidates & (np.abs(rel[:, 0]) < e_w) & (rel[:, 1] > 0) & (rel[:, 1] < e_w) & (rel[:, 2] > 0)
            fall = 1.0 - _smoothstep(rel[:, 1] / e_w)
            d = np.where(lid[:, None], np.stack([np.zeros(len(v)), -rel[:, 1] * fall, np.zeros(len(v))], -1), 0.0)
            min_r = np.full(len(v), eye_radius + 1e-3)
        # wrap the eyeball: push closed-lid points that would cut into it back out radially
        r = v + d - c
        dist = np.linalg.norm(r, axis=1)
        push = lid & (dist < min_r) & (r[:, 2] > 0)
        d[push] += r[push] / np.maximum(dist[push, None], 1e-12) * (min_r[push, None] - dist[push, None])
        out[side] = d
    return out


def heuristic_regions(v: np.ndarray, joints: np.ndarray, mouth_loop: np.ndarray | None, eyeball: np.ndarray) -> dict[str, np.ndarray]:
    """Approximate region masks of a FLAME-like head from its geometry.

    Lengths are in units of the eye distance e (|eye_l - eye_r|, ~6 cm on adults); the head
    looks along +z. eyes: the eyeball components; lips: within 0.3 mouth-widths of the
    inner-lip loop; ears: |x| beyond 1.15 e and behind the eyes; neck: below the chin and
    below the jaw joint behind the face; scalp: above 1.1 e over the eyes or behind the ears
    above the jaw; face: the rest in front of the ears.

    Args:
        v: [V, 3]; joints: [5, 3] rest joints; mouth_loop: [P] or None;
        eyeball: [V] bool eyeball vertices.
    Returns:
        dict of [V] bool masks (disjoint) for face, scalp, ears, neck, eyes, lips.
    """
    eyes_c = joints[3:5]
    e = float(np.linalg.norm(eyes_c[0] - eyes_c[1]))
    mid = eyes_c.mean(0)
    rel = v - mid
    head = ~eyeball
    lips = np.zeros(len(v), bool)
    if mouth_loop is not None:
        lp = v[mouth_loop]
        mw = np.ptp(lp[:, 0])
        d = np.min(np.linalg.norm(v[:, None] - lp[None], axis=-1), axis=1)
        lips = head & (d < 0.3 * mw) & (v[:, 2] > lp[:, 2].min() - 0.1 * mw)
        mouth_y = lp[:, 1].mean()
    else:
        mouth_y = mid[1] - 1.1 * e
    jaw = joints[2]
    front = v[:, 2] > jaw[2] + 0.25 * e
    ears = head & (np.abs(rel[:, 0]) > 1.15 * e) & (rel[:, 2] < -0.9 * e) & (v[:, 1] > mouth_y) & (rel[:, 1] < 0.6 * e)
    chin_y = v[head & front & (np.abs(rel[:, 0]) < 0.2 * e), 1].min() if (head & front).any() else mouth_y - 0.6 * e
    neck = head & ~lips & ((v[:, 1] < chin_y + 0.05 * e) | (~front & (v[:, 1] < jaw[1] - 0.2 * e)))
    scalp = head & ~ears & ~neck & ((rel[:, 1] > 1.1 * e) | ((rel[:, 2] < -1.2 * e) & (v[:, 1] > jaw[1])))
    face = head & ~lips & ~ears & ~neck & ~scalp
    return {"face": face, "scalp": scalp, "ears": ears, "neck": neck, "eyes": eyeball.copy(), "lips": lips}


def regions_from_masks(masks: dict, V: int) -> dict[str, np.ndarray]:
    """Map FLAME_masks.pkl index lists onto hravatar's region names (disjoint masks).

    Args:
        masks: {FLAME mask name: vertex index array}.
        V: number of FLAME vertices.
    Returns:
        dict of [V] bool masks; priority eyes > lips > ears > neck > scalp > face.
    """

    def m(*names):
        out = np.zeros(V, bool)
        for n in names:
            if n in masks:
                out[np.asarray(masks[n], np.int64).reshape(-1)] = True
        return out

    eyes = m("left_eyeball", "right_eyeball")
    lips = m("lips") & ~eyes
    ears = m("left_ear", "right_ear") & ~eyes & ~lips
    neck = m("neck") & ~eyes & ~lips & ~ears
    scalp = m("scalp") & ~eyes & ~lips & ~ears & ~neck
    face = m("face", "forehead", "nose", "eye_region", "left_eye_region", "right_eye_region") & ~(eyes | lips | ears | neck | scalp)
    return {"face": face, "scalp": scalp, "ears": ears, "neck": neck, "eyes": eyes, "lips": lips}


# ============================================================================ mouth
def _add_mouth(
    v: np.ndarray,
    f: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    jaw: np.ndarray,
    blend: dict[str, np.ndarray],
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Append teeth + mouth interior (welded to the inner-lip loop) to a head mesh.

    The new vertices' bases follow the lips: teeth translate with the mean identity offset
    of their lip (upper / lower contour) and get no expression or pose-corrective motion
    (they are rigid; the jaw joint moves the lower row); cavity vertices take the bases of
    their nearest lip vertices, faded out with depth behind the lips.

    Args:
        v: [V, 3]; f: [F, 3]; upper, lower: inner-lip contour vertex indices (corner to corner);
        jaw: [3] jaw joint; blend: {'shapedirs','exprdirs','posedirs': [V,3,M]} ;
        weights: [V, 5] skinning weights.
    Returns:
        vertices [V', 3], faces [F', 3], blend bases extended to V', weights [V', 5],
        labels {'teeth','mouth_interior': [V'] bool}.
    """
    geom = build_mouth_geometry(v[upper], v[lower], jaw, scale=1.0)
    contours = (upper, lower)
    rim_targets = np.array([contours[c][i] for c, i in geom.rim_source], np.int64)
    keep, new_faces, _ = weld_rim(geom, rim_targets, len(v))
    mv = geom.vertices[keep]
    jw = geom.jaw_weight[keep]
    teeth = geom.labels[keep] == "teeth"
    n_new = len(keep)

    lip_idx = np.unique(rim_targets)
    d = np.linalg.norm(mv[:, None] - v[lip_idx][None], axis=-1)  # [n_new, P]
    k = min(4, len(lip_idx))
    nn = np.argsort(d, axis=1)[:, :k]
    dn = np.take_along_axis(d, nn, 1)
    wn = 1.0 / np.maximum(dn, 1e-6)
    wn /= wn.sum(1, keepdims=True)
    mouth_w = np.ptp(v[lip_idx][:, 0])
    fade = 1.0 - _smoothstep(dn[:, 0] / (0.6 * mouth_w))  # 1 at the lips, 0 deep inside

    out = {}
    fade3, teeth3 = fade[:, None, None], teeth[:, None, None]
    for key, B in blend.items():
        near = np.einsum("nk,nkcm->ncm", wn, B[lip_idx][nn])
        if key == "shapedirs":
            # identity: teeth translate with their lip, the cavity blends from its lip to that
            rigid = np.where(jw[:, None, None] > 0.5, B[lower].mean(0)[None], B[upper].mean(0)[None])
            new = np.where(teeth3, rigid, near * fade3 + rigid * (1 - fade3))
        else:
            new = np.where(teeth3, 0.0, near * fade3)
        out[key] = np.concatenate([B, new], 0)

    w_new = np.zeros((n_new, NUM_JOINTS))
    w_new[:, 1] = 1.0 - jw
    w_new[:, 2] = jw
    labels = {
        "teeth": np.concatenate([np.zeros(len(v), bool), teeth]),
        "mouth_interior": np.concatenate([np.zeros(len(v), bool), ~teeth]),
    }
    return np.concatenate([v, mv], 0), np.concatenate([f, new_faces], 0), out, np.concatenate([weights, w_new], 0), labels


# ============================================================================ loader
def _load_eyelid_file(path: Path, V: int) -> np.ndarray:
    """[V, 3] eyelid displacement from a SMIRK/HRAvatar ``*_eyelid.npy`` file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: eyelid basis file not found")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a numpy eyelid basis ({str(e).splitlines()[0]})") from None
    if a.size != V * 3:
        raise CheckpointError(f"{path}: eyelid basis has {a.size} values, expected {V}x3")
    return np.asarray(a, np.float64).reshape(V, 3)


def _embedding(path: Path, F: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mediapipe indices [L], face indices [L], barycentrics [L,3]) from the FLAME embedding file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            fi = np.asarray(z["lmk_face_idx"]).astype(np.int64).reshape(-1)
            bc = np.asarray(z["lmk_b_coords"], np.float64).reshape(-1, 3)
            mp = np.asarray(z["landmark_indices"]).astype(np.int64).reshape(-1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: MediaPipe landmark embedding not found") from None
    except (KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a FLAME MediaPipe landmark embedding ({str(e).splitlines()[0]})") from None
    ok = len(fi) == len(bc) == len(mp) and (fi >= 0).all() and (fi < F).all() and (mp >= 0).all() and (mp < NUM_MEDIAPIPE_LANDMARKS).all()
    if not ok:
        raise CheckpointError(f"{path}: inconsistent MediaPipe landmark embedding (index out of range or length mismatch)")
    return mp, fi, bc


def load_flame(
    path: str | Path,
    n_shape: int = 100,
    n_expr: int = 50,
    landmark_embedding: str | Path | None = None,
    add_mouth: bool = True,
    *,
    eyelid_paths: tuple[str | Path, str | Path] | None = None,
    masks_path: str | Path | None = None,
    landmark_source: HeadModel | None = None,
) -> HeadModel:
    """Load a user-supplied FLAME model as a :class:`HeadModel`.

    Args:
        path: FLAME pickle (``generic_model.pkl``, ``flame2023.pkl``, ``flame2023_Open.pkl``)
            or a folder holding one.
        n_shape: identity modes kept (<= 300).
        n_expr: expression modes kept (<= number in the file, 100 for FLAME 2020/2023).
        landmark_embedding: ``mediapipe_landmark_embedding.npz``; None = use the one beside the
            model file if present. Landmarks it lacks come from landmark transfer.
        add_mouth: append teeth and a mouth interior behind the inner lips.
        eyelid_paths: (right, left) SMIRK/HRAvatar eyelid bases ``r_eyelid.npy``,
            ``l_eyelid.npy`` ([5023, 3] each); None = use them if beside the model, else
            :func:`procedural_eyelids`.
        masks_path: ``FLAME_masks.pkl``; None = beside the model if present, else heuristics.
        landmark_source: head whose MediaPipe landmarks are transferred (default: built-in).
    Returns:
        :class:`HeadModel` named 'flame' (metres, +y up, +z forward); ``meta`` records the
        file and which optional inputs were used.
    Raises:
        FileNotFoundError: missing model (message points to the FLAME website).
        CheckpointError: foreign / corrupted / unsafe pickle (message names the file).
    """
    src_path = resolve_flame_path(path)
    d = read_flame_file(src_path)
    folder = src_path.parent
    v, f = d["v_template"], d["f"]
    V = len(v)
    n_total = d["shapedirs"].shape[2]
    n_id = min(_N_IDENTITY, n_total)
    if not (0 <= n_shape <= n_id) or not (0 <= n_expr <= n_total - n_id):
        raise ValueError(f"{src_path}: asked for {n_shape} shape / {n_expr} expression modes, file has {n_id} / {n_total - n_id}")
    blend = {
        "shapedirs": d["shapedirs"][:, :, :n_shape],
        "exprdirs": d["shapedirs"][:, :, n_id:n_id + n_expr],
        "posedirs": d["posedirs"],
    }
    Jreg, weights = d["J_regressor"], d["weights"]
    joints = Jreg @ v  # [5,3]
    eye_c = joints[3:5]
    meta: dict = {"source": str(src_path), "n_shape": n_shape, "n_expr": n_expr}

    # eyeballs: the mesh components (other than the head) whose centre is near an eye joint
    comp = connected_components(f, V)
    eyeball = np.zeros(V, bool)
    for lab in np.unique(comp):
        m = comp == lab
        if m.sum() < 0.5 * V and np.linalg.norm(v[m].mean(0)[None] - eye_c, axis=1).min() < 0.02:
            eyeball |= m
    eye_radius = 0.012  # average adult eyeball, for meshes without separate eyeballs
    if eyeball.any():
        eye_radius = float(np.linalg.norm(v[eyeball, None] - eye_c[None], axis=-1).min(1).mean())

    # ---- eyelids (index 0 right, 1 left); the subject's right eye is the one at lower x
    if eyelid_paths is None and (folder / "r_eyelid.npy").is_file() and (folder / "l_eyelid.npy").is_file():
        eyelid_paths = (folder / "r_eyelid.npy", folder / "l_eyelid.npy")
    if eyelid_paths is not None:
        eyelids = np.stack([_load_eyelid_file(Path(p), V) for p in eyelid_paths])
        meta["eyelids"] = "files"
    else:
        eyelids = procedural_eyelids(v, f, eye_c[np.argsort(eye_c[:, 0])], eye_radius, ~eyeball)
        meta["eyelids"] = "procedural"

    # ---- regions
    mouth_loop = find_mouth_loop(v, f, joints[2], eye_c)
    if masks_path is None and (folder / "FLAME_masks.pkl").is_file():
        masks_path = folder / "FLAME_masks.pkl"
    heur = heuristic_regions(v, joints, mouth_loop, eyeball)
    if masks_path is not None:
        masks = read_restricted_pickle(masks_path)
        if not isinstance(masks, dict):
            raise CheckpointError(f"{masks_path}: not a FLAME_masks file (no dict of vertex lists)")
        regions = regions_from_masks(masks, V)
        # vertices the masks leave out get their heuristic label
        unl = ~np.any(np.stack(list(regions.values())), 0)
        for k in regions:
            regions[k] |= heur[k] & unl
        meta["regions"] = "FLAME_masks"
    else:
        regions = heur
        meta["regions"] = "heuristic"

    # ---- mouth
    labels = {}
    if add_mouth:
        if mouth_loop is None:
            raise CheckpointError(f"{src_path}: cannot add the mouth: no inner-lip opening found in the FLAME mesh")
        up, lo = split_loop_at_corners(v, mouth_loop)
        v, f, blend, weights, labels = _add_mouth(v, f, up, lo, joints[2], blend, weights)
        regions = {k: np.concatenate([m, np.zeros(len(v) - V, bool)]) for k, m in regions.items()}
        eyelids = np.concatenate([eyelids, np.zeros((2, len(v) - V, 3))], 1)
        Jreg = np.concatenate([Jreg, np.zeros((NUM_JOINTS, len(v) - V))], 1)
    regions.update(labels)

    # ---- landmarks
    if landmark_embedding is None and (folder / "mediapipe_landmark_embedding.npz").is_file():
        landmark_embedding = folder / "mediapipe_landmark_embedding.npz"
    if landmark_embedding is not None:
        embedding = _embedding(Path(landmark_embedding), len(f))
        meta["landmarks"] = f"embedding ({len(embedding[0])}) + transfer"
    else:
        embedding = None
        meta["landmarks"] = "transfer"
    surface = regions["face"] | regions["lips"] | regions["eyes"]
    source = landmark_source if landmark_source is not None else load_builtin_head()
    lmk_faces, lmk_bary = flame_landmarks(v, f, surface, eye_c, eye_radius, embedding, source)

    return HeadModel(
        name="flame",
        v_template=torch.from_numpy(v),
        faces=torch.from_numpy(f),
        shapedirs=torch.from_numpy(blend["shapedirs"]),
        exprdirs=torch.from_numpy(blend["exprdirs"]),
        posedirs=torch.from_numpy(blend["posedirs"]),
        J_regressor=torch.from_numpy(Jreg),
        lbs_weights=torch.from_numpy(weights),
        eyelid_dirs=torch.from_numpy(eyelids),
        regions={k: torch.from_numpy(m) for k, m in regions.items()},
        lmk_faces=lmk_faces,
        lmk_bary=lmk_bary,
        parents=torch.from_numpy(d["parents"]),
        meta=meta,
    )


def flame_landmarks(
    v: np.ndarray,
    f: np.ndarray,
    surface: np.ndarray,
    eye_centres: np.ndarray,
    eye_radius: float,
    embedding: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    source: HeadModel,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 478 MediaPipe landmarks of a FLAME mesh: embedded points verbatim, the rest transferred.

    Args:
        v: [V, 3] vertices; f: [F, 3] faces; surface: [V] bool, landmark surface (face, lips,
        eyes); eye_centres: [2, 3]; eye_radius: eyeball radius;
        embedding: (MediaPipe indices [L], face indices [L], barycentrics [L, 3]) or None;
        source: head model whose landmarks are transferred.
    Returns:
        lmk_faces [478] int64, lmk_bary [478, 3].
    """
    if embedding is not None:
        mp, fi, bc = embedding
        # the embedded points pin the transfer's alignment exactly
        anchor_points = {int(m): (v[f[i]] * b[:, None]).sum(0) for m, i, b in zip(mp, fi, bc)}
    else:
        # no embedding: pin the iris centres (MediaPipe 468 right, 473 left) in front of the
        # eyeball centres, which fixes scale and position of the alignment
        eyes = eye_centres[np.argsort(eye_centres[:, 0])]
        anchor_points = {468: eyes[0] + [0.0, 0.0, eye_radius], 473: eyes[1] + [0.0, 0.0, eye_radius]}
    lf, lb = transfer_landmarks(source, torch.from_numpy(v), torch.from_numpy(f), torch.from_numpy(surface), anchor_points=anchor_points)
    if embedding is not None:
        lf[torch.from_numpy(mp)] = torch.from_numpy(fi)
        lb[torch.from_numpy(mp)] = torch.from_numpy(bc).float()
    return lf, lb
