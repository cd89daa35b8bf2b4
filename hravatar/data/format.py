"""The on-disk hravatar dataset: a folder of PNG frames + masks, tracked parameters, metadata.

Layout (documented in full in ``docs/dataset-format.md``)::

    ROOT/
      dataset.json            DatasetMeta as JSON (format "hravatar-dataset", version 1)
      params.safetensors      beta [S], K [3,3] or [T,3,3], viewmat [T,4,4], expr [T,E],
                              pose [T,5,3], eyelids [T,2], transl [T,3],
                              optional landmarks [T,478,2] + landmarks_valid [T] (bool)
      frames/000000.png       RGB, background black
      masks/000000.png        8-bit grey foreground mask
      albedo/000000.png       optional pseudo-albedo (when ``has_albedo``)
      gt/                     optional synthetic ground truth (see ``gt/gt.json``)

Writing is atomic at the dataset level: :func:`write_dataset` fills ``ROOT.partial`` and renames
it to ``ROOT`` only once everything is written and validates; an interrupted write is resumed
by calling it again (frames already written and verified are skipped). Expected user errors
raise :class:`DatasetError` with a one-line message naming the file and the problem.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from hravatar.head.model import NUM_JOINTS, NUM_MEDIAPIPE_LANDMARKS
from hravatar.io.safe import CheckpointError, atomic_write_bytes, load_safetensors_checked, save_safetensors_atomic

FORMAT = "hravatar-dataset"
VERSION = 1
META_FILE = "dataset.json"
PARAMS_FILE = "params.safetensors"
GT_DIR = "gt"
GT_FILE = "gt.json"
#: Image folders and the PNG colour types accepted in each (PNG IHDR codes: 0 grey, 2 RGB, 6 RGBA).
IMAGE_KINDS = {"frames": (2, 6), "masks": (0,), "albedo": (2, 6)}
#: Tensors every params.safetensors holds.
REQUIRED_PARAMS = ("beta", "K", "viewmat", "expr", "pose", "eyelids", "transl")
PARTIAL_SUFFIX = ".partial"
_FRAME_NAME = re.compile(r"^(\d{6})\.png$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PROGRESS_FILE = ".progress"
_LOCK_FILE = ".lock"


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or inconsistent (message is one line)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- metadata
@dataclass
class DatasetMeta:
    """Contents of ``dataset.json``.

    num_frames: T frames in total; the last ``test_frames`` of them form the test set.
    width, height: stored image size in pixels.
    fps: frame rate of the source video.
    test_frames: K, number of trailing frames held out for testing (0 <= K < T).
    head: identity string of the head model the parameters belong to (``HeadModel.identity()``).
    expr_dim, shape_dim: E and S, sizes of ``expr`` and ``beta``.
    has_albedo: whether ``albedo/`` holds a pseudo-albedo map for every frame.
    source: free-form provenance (video path, "synthetic", ...).
    synthetic: optional description of a synthetic dataset (generator settings; free-form).
    head_spec: optional ``load_head_model`` spec of the head model (``"builtin"``, ``"flame:PATH"``,
        ``"ict:DIR"``), written by ``hravatar preprocess``; the trainer prefers it to guessing the
        model from ``head`` (older datasets lack it).
    """

    num_frames: int
    width: int
    height: int
    fps: float
    test_frames: int
    head: str
    expr_dim: int
    shape_dim: int
    has_albedo: bool = False
    source: str = ""
    synthetic: dict | None = None
    head_spec: str | None = None

    @property
    def num_train(self) -> int:
        """Number of training frames (T - K)."""
        return self.num_frames - self.test_frames

    def split_indices(self, split: str) -> list[int]:
        """Global frame indices of ``split`` ("train": first T-K, "test": last K, "all")."""
        if split == "train":
            return list(range(self.num_train))
        if split == "test":
            return list(range(self.num_train, self.num_frames))
        if split == "all":
            return list(range(self.num_frames))
        raise ValueError(f"unknown split '{split}' (expected train, test or all)")

    def to_json(self) -> dict:
        """JSON-ready dict, with ``format`` and ``version`` first."""
        d = {"format": FORMAT, "version": VERSION, **asdict(self)}
        for k in ("synthetic", "head_spec"):
            if d[k] is None:
                del d[k]
        return d

    def check(self, where: str | Path = META_FILE) -> None:
        """Raise :class:`DatasetError` (naming ``where``) if a field is out of range."""
        ints = {"num_frames": 1, "width": 1, "height": 1, "test_frames": 0, "expr_dim": 0, "shape_dim": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise DatasetError(f"{where}: '{name}' must be an integer >= {lo}, found {v!r}")
        if self.test_frames >= self.num_frames:
            raise DatasetError(
                f"{where}: test_frames ({self.test_frames}) must be smaller than num_frames ({self.num_frames})"
            )
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise DatasetError(f"{where}: 'fps' must be a positive number, found {self.fps!r}")
        if not isinstance(self.head, str) or not isinstance(self.source, str):
            raise DatasetError(f"{where}: 'head' and 'source' must be strings")
        if not isinstance(self.has_albedo, bool):
            raise DatasetError(f"{where}: 'has_albedo' must be true or false, found {self.has_albedo!r}")
        if self.synthetic is not None and not isinstance(self.synthetic, dict):
            raise DatasetError(f"{where}: 'synthetic' must be an object when present")
        if self.head_spec is not None and (not isinstance(self.head_spec, str) or not self.head_spec):
            raise DatasetError(f"{where}: 'head_spec' must be a non-empty string when present")

    @classmethod
    def from_json(cls, d: Any, where: str | Path = META_FILE) -> "DatasetMeta":
        """Parse a ``dataset.json`` dict; checks format, version, required fields and ranges."""
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise DatasetError(f"{where}: not a hravatar dataset (format is {d.get('format')!r}, expected '{FORMAT}')")
        if d.get("version") != VERSION:
            raise DatasetError(
                f"{where}: unsupported dataset version {d.get('version')!r} (this hravatar reads version {VERSION})"
            )
        names = [f.name for f in fields(cls)]
        optional = {"has_albedo", "source", "synthetic", "head_spec"}
        missing = [n for n in names if n not in d and n not in optional]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
        meta = cls(**{n: d[n] for n in names if n in d})  # unknown keys are ignored (forward compatible)
        meta.check(where)
        return meta


def write_meta(root: str | Path, meta: DatasetMeta) -> None:
    """Write ``root/dataset.json`` atomically."""
    meta.check()
    atomic_write_bytes(Path(root) / META_FILE, (json.dumps(meta.to_json(), indent=2) + "\n").encode())


def read_meta(root: str | Path) -> DatasetMeta:
    """Read and check ``root/dataset.json``.

    Raises:
        DatasetError: folder or file missing, unreadable JSON, wrong format/version, bad field.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    path = root / META_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing (not a hravatar dataset folder)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable JSON ({_one_line(e)})") from None
    return DatasetMeta.from_json(d, path)


# --------------------------------------------------------------------------- images
def frame_path(root: str | Path, kind: str, index: int) -> Path:
    """Path of frame ``index`` in image folder ``kind`` ("frames", "masks" or "albedo")."""
    return Path(root) / kind / f"{index:06d}.png"


def to_uint8(image: np.ndarray | Tensor) -> np.ndarray:
    """uint8 pixels from a uint8 / bool array or a float array in [0, 1] (rounded, clipped).

    Args:
        image: [H, W] or [H, W, C], numpy or torch (any device).
    Returns:
        numpy uint8 array of the same shape.
    """
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "f":
        return (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"expected uint8, bool or float pixels, found {a.dtype}")


def write_png(path: str | Path, image: np.ndarray | Tensor) -> None:
    """Encode ``image`` (see :func:`to_uint8`; [H, W] grey or [H, W, 3|4]) as PNG, atomically."""
    import imageio.v3 as iio

    atomic_write_bytes(path, iio.imwrite("<bytes>", to_uint8(image), extension=".png"))


def read_png(path: str | Path) -> np.ndarray:
    """Decode a PNG file to uint8 [H, W] or [H, W, C]; raises DatasetError naming the file."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        a = np.asarray(iio.imread(path, extension=".png"))
    except Exception as e:  # the plugins raise assorted error types
        raise DatasetError(f"{path}: unreadable PNG ({_one_line(str(e))[:120]})") from None
    if a.dtype != np.uint8:
        raise DatasetError(f"{path}: expected 8-bit pixels, found {a.dtype}")
    return a


def png_info(path: str | Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, without decoding it.

    Raises:
        DatasetError: the file is missing or does not start like a PNG.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DatasetError(f"{path}: not a PNG file")
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return w, h, head[24], head[25]


def write_frame(
    root: str | Path,
    index: int,
    image: np.ndarray | Tensor,
    mask: np.ndarray | Tensor,
    albedo: np.ndarray | Tensor | None = None,
) -> list[Path]:
    """Write one frame's PNGs (each atomically).

    Args:
        image: [H, W, 3] uint8 (or float in [0, 1]) RGB, background already black.
        mask: [H, W] or [H, W, 1] uint8 (or float / bool) foreground mask.
        albedo: optional [H, W, 3] pseudo-albedo.
    Returns:
        The paths written (frame, mask, albedo).
    """
    img, m = to_uint8(image), to_uint8(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"frame {index}: image must be [H, W, 3], found {list(img.shape)}")
    if m.shape != img.shape[:2]:
        raise ValueError(f"frame {index}: mask must be [H, W] = {list(img.shape[:2])}, found {list(m.shape)}")
    items = [("frames", img), ("masks", m)]
    if albedo is not None:
        a = to_uint8(albedo)
        if a.shape != img.shape:
            raise ValueError(f"frame {index}: albedo must be {list(img.shape)}, found {list(a.shape)}")
        items.append(("albedo", a))
    paths = []
    for kind, arr in items:
        p = frame_path(root, kind, index)
        write_png(p, arr)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- parameters
def _expected_param_shapes(meta: DatasetMeta, params: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    T, L = meta.num_frames, NUM_MEDIAPIPE_LANDMARKS
    shapes = {
        "beta": (meta.shape_dim,),
        "K": (T, 3, 3) if params["K"].dim() == 3 else (3, 3),
        "viewmat": (T, 4, 4),
        "expr": (T, meta.expr_dim),
        "pose": (T, NUM_JOINTS, 3),
        "eyelids": (T, 2),
        "transl": (T, 3),
    }
    if "landmarks" in params or "landmarks_valid" in params:
        shapes["landmarks"] = (T, L, 2)
        shapes["landmarks_valid"] = (T,)
    return shapes


def check_params(params: dict[str, Tensor], meta: DatasetMeta, where: str | Path = PARAMS_FILE) -> None:
    """Check the tracked parameters against ``meta``.

    Checks presence, per-frame counts (first dim = T), shapes, dtypes and finiteness
    (landmarks may be non-finite only on frames whose ``landmarks_valid`` is false).
    Extra tensors are allowed and ignored by the loader.

    Raises:
        DatasetError: one line naming ``where``, the tensor and the problem (first bad frame).
    """
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise DatasetError(f"{where}: missing tensor(s) {', '.join(missing)}")
    if ("landmarks" in params) != ("landmarks_valid" in params):
        raise DatasetError(f"{where}: 'landmarks' and 'landmarks_valid' must be stored together")
    T = meta.num_frames
    for name, shape in _expected_param_shapes(meta, params).items():
        t = params[name]
        got = tuple(t.shape)
        per_frame = len(shape) == len(got) and shape[0] == T and name != "beta" and not (name == "K" and len(shape) == 2)
        if per_frame and got[0] != T and got[1:] == shape[1:]:
            raise DatasetError(
                f"{where}: '{name}' holds {got[0]} frames but dataset.json has num_frames {T} (params/frames count mismatch)"
            )
        if got != shape:
            raise DatasetError(f"{where}: '{name}' has shape {list(got)}, expected {list(shape)}")
        if name == "landmarks_valid":
            if t.dtype != torch.bool:
                raise DatasetError(f"{where}: 'landmarks_valid' must be bool, found {t.dtype}")
            continue
        if not t.is_floating_point():
            raise DatasetError(f"{where}: '{name}' must be a float tensor, found {t.dtype}")
        bad = ~torch.isfinite(t)
        if name == "landmarks":
            bad = bad & params["landmarks_valid"][:, None, None]  # untracked frames may hold NaN
        if bool(bad.any()):
            if per_frame:
                first = int(bad.reshape(T, -1).any(-1).nonzero()[0, 0])
                raise DatasetError(f"{where}: '{name}' has NaN/inf values (first bad frame {first})")
            raise DatasetError(f"{where}: '{name}' has NaN/inf values")
    K = params["K"]
    if bool((K[..., 0, 0] <= 0).any() or (K[..., 1, 1] <= 0).any()):
        raise DatasetError(f"{where}: 'K' has a non-positive focal length")


def write_params(root: str | Path, params: dict[str, Tensor]) -> None:
    """Write ``root/params.safetensors`` atomically (float tensors stored as float32)."""
    clean = {k: (v.float() if v.is_floating_point() else v) for k, v in params.items()}
    save_safetensors_atomic(clean, Path(root) / PARAMS_FILE, {"format": FORMAT})


def read_params(root: str | Path, meta: DatasetMeta | None = None) -> dict[str, Tensor]:
    """Load ``root/params.safetensors`` (CPU) and check it against ``meta`` (read if None)."""
    root = Path(root)
    meta = meta if meta is not None else read_meta(root)
    path = root / PARAMS_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        params, _ = load_safetensors_checked(path)
    except CheckpointError as e:
        raise DatasetError(str(e)) from None
    check_params(params, meta, path)
    return params


# --------------------------------------------------------------------------- validation
def _check_image_folder(root: Path, kind: str, meta: DatasetMeta) -> None:
    folder = root / kind
    T = meta.num_frames
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder missing (expected {T} PNG files)")
    # hidden names are temp files of interrupted atomic writes, not frames
    names = [n for n in os.listdir(folder) if not n.startswith(".")]
    present = {int(m.group(1)) for n in names if (m := _FRAME_NAME.match(n))}
    missing = [i for i in range(T) if i not in present]
    if missing:
        raise DatasetError(
            f"{frame_path(root, kind, missing[0])}: missing ({len(missing)} of {T} files missing in {kind}/)"
        )
    extra = sorted(set(names) - {f"{i:06d}.png" for i in range(T)})
    if extra:
        raise DatasetError(
            f"{folder}: holds {len(names)} files but dataset.json has num_frames {T} "
            f"(count mismatch between {kind}/ and num_frames; first extra: {extra[0]})"
        )
    ok_types = IMAGE_KINDS[kind]
    for i in range(T):
        p = frame_path(root, kind, i)
        w, h, depth, ctype = png_info(p)
        if (w, h) != (meta.width, meta.height):
            raise DatasetError(f"{p}: image is {w}x{h} but dataset.json says {meta.width}x{meta.height}")
        if depth != 8 or ctype not in ok_types:
            want = "8-bit grey" if kind == "masks" else "8-bit RGB"
            raise DatasetError(f"{p}: expected an {want} PNG (bit depth {depth}, colour type {ctype})")


def read_gt_info(root: str | Path) -> dict | None:
    """Parse ``root/gt/gt.json`` (None when the dataset has no ground truth).

    Layout: ``{"envs": [{"name", "envmap", "rotation_deg"}], "relit_frames": [...],
    "albedo_frames": [...], "normal_frames": [...], "normal_space": "world"}``
    (frame lists hold global frame indices; ``envmap`` is relative to ``gt/``).
    """
    path = Path(root) / GT_DIR / GT_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable JSON ({_one_line(e)})") from None
    if not isinstance(d, dict) or not isinstance(d.get("envs", []), list):
        raise DatasetError(f"{path}: expected an object with an 'envs' list")
    for k in ("relit_frames", "albedo_frames", "normal_frames"):
        v = d.setdefault(k, [])
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise DatasetError(f"{path}: '{k}' must be a list of frame indices")
    for e in d["envs"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise DatasetError(f"{path}: every entry of 'envs' needs a 'name'")
        e.setdefault("envmap", f"envmaps/{e['name']}.exr")
        e.setdefault("rotation_deg", 0.0)
    return d


def gt_path(root: str | Path, kind: str, index: int, env: str | None = None) -> Path:
    """Path of a ground-truth image: kind "relit" (needs ``env``), "albedo" or "normal"."""
    base = Path(root) / GT_DIR
    if kind == "relit":
        if not env:
            raise ValueError("gt kind 'relit' needs an environment name")
        return base / "relit" / env / f"{index:06d}.png"
    if kind in ("albedo", "normal"):
        return base / kind / f"{index:06d}.png"
    raise ValueError(f"unknown ground-truth kind '{kind}' (expected relit, albedo or normal)")


def _check_gt(root: Path, meta: DatasetMeta) -> None:
    info = read_gt_info(root)
    if info is None:
        return
    where = root / GT_DIR / GT_FILE
    wanted: list[Path] = []
    for e in info["envs"]:
        wanted.append(root / GT_DIR / e["envmap"])
        wanted += [gt_path(root, "relit", i, e["name"]) for i in info["relit_frames"]]
    wanted += [gt_path(root, "albedo", i) for i in info["albedo_frames"]]
    wanted += [gt_path(root, "normal", i) for i in info["normal_frames"]]
    for k in ("relit_frames", "albedo_frames", "normal_frames"):
        bad = [i for i in info[k] if not 0 <= i < meta.num_frames]
        if bad:
            raise DatasetError(f"{where}: '{k}' lists frame {bad[0]} outside 0..{meta.num_frames - 1}")
    missing = [p for p in wanted if not p.is_file()]
    if missing:
        raise DatasetError(f"{missing[0]}: missing ({len(missing)} ground-truth files listed in gt/gt.json are missing)")
    for p in wanted:
        if p.suffix == ".png":
            w, h, _, _ = png_info(p)
            if (w, h) != (meta.width, meta.height):
                raise DatasetError(f"{p}: image is {w}x{h} but dataset.json says {meta.width}x{meta.height}")


def validate_dataset(root: str | Path, check_images: bool = True) -> DatasetMeta:
    """Check a dataset folder completely (images are checked by their PNG headers only).

    Checks: dataset.json (format, version, fields, test_frames < num_frames); params (presence,
    counts, shapes, NaN/inf); every frame/mask(/albedo) PNG present, no extra files, size and
    pixel format; ground-truth files listed in gt/gt.json.

    Returns:
        The dataset's :class:`DatasetMeta`.
    Raises:
        DatasetError: one line naming the folder/file (or tensor) and the first problem found.
    """
    return open_validated(root, check_images)[0]


def open_validated(root: str | Path, check_images: bool = True) -> tuple[DatasetMeta, dict[str, Tensor]]:
    """:func:`validate_dataset` that also returns the checked parameters (read once)."""
    root = Path(root)
    meta = read_meta(root)
    params = read_params(root, meta)
    if check_images:
        for kind in ("frames", "masks") + (("albedo",) if meta.has_albedo else ()):
            _check_image_folder(root, kind, meta)
        _check_gt(root, meta)
    return meta, params


# --------------------------------------------------------------------------- atomic, resumable writing
def partial_path(root: str | Path) -> Path:
    """Staging folder used while ``root`` is written (``ROOT.partial`` beside it)."""
    root = Path(root)
    return root.with_name(root.name + PARTIAL_SUFFIX)


def _pixel_digest(arrays: Iterable[np.ndarray]) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _read_progress(staging: Path, meta_digest: str) -> dict[int, dict]:
    """Frames recorded as complete by an earlier, interrupted write with the same metadata."""
    path = staging / _PROGRESS_FILE
    records: dict[int, dict] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    if not lines or lines[0] != f"meta {meta_digest}":
        return records
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            records[int(rec["index"])] = rec
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
    return records


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _frame_verified(staging: Path, rec: dict | None, digest: str) -> bool:
    """True when an earlier write stored exactly this frame and its files are intact."""
    if rec is None or rec.get("pixels") != digest or not rec.get("files"):
        return False
    return all(_file_digest(staging / p) == h for p, h in rec["files"].items())


def _acquire_lock(staging: Path) -> Path:
    lock = staging / _LOCK_FILE
    try:
        other = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        other = 0
    if other and other != os.getpid():
        try:
            os.kill(other, 0)
            raise DatasetError(f"{staging}: being written by another process (pid {other})")
        except ProcessLookupError:
            pass  # stale lock of a process that died: take over
        except PermissionError:
            raise DatasetError(f"{staging}: being written by another process (pid {other})") from None
    lock.write_text(str(os.getpid()))
    return lock


def _remove_temp_files(staging: Path) -> None:
    for kind in IMAGE_KINDS:
        folder = staging / kind
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def write_dataset(
    root: str | Path,
    meta: DatasetMeta,
    frames: Iterable[tuple],
    params: dict[str, Tensor],
    *,
    extras: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    on_frame: Callable[[int, bool], None] | None = None,
) -> Path:
    """Write a complete dataset atomically, resuming an interrupted earlier call.

    Everything goes into ``ROOT.partial``; ``ROOT`` appears (by one rename) only once all
    frames, the parameters, the metadata and ``extras`` are written and the folder validates.
    If the process dies or ``frames`` raises, ``ROOT.partial`` stays; calling again with the same
    ``meta`` skips every frame whose files are intact and whose pixels equal the new frame's
    (checked by SHA-1), so only missing or changed frames are encoded again.

    Args:
        root: final dataset folder.
        meta: dataset metadata (T = ``meta.num_frames`` frames are expected).
        frames: iterable of ``(image, mask)`` or ``(image, mask, albedo)`` per frame, in order;
            image [H, W, 3], mask [H, W] (uint8, or float in [0, 1]); albedo [H, W, 3], required
            when ``meta.has_albedo``.
        params: tensors of ``params.safetensors`` (see :func:`check_params`), checked first.
        extras: called with the staging folder before it is finalised, to add e.g. ``gt/``.
        overwrite: replace an existing ``root`` (otherwise an existing root is an error).
        on_frame: progress callback ``(index, skipped)``.
    Returns:
        ``root`` as a Path.
    Raises:
        DatasetError: ``root`` exists, bad meta/params, wrong frame count or size.
    """
    root = Path(root)
    if root.exists() and not overwrite:
        raise DatasetError(f"{root}: already exists (pass overwrite=True to replace it)")
    meta.check()
    check_params(params, meta, "params")  # fail before any frame is encoded
    staging = partial_path(root)
    meta_digest = hashlib.sha1(json.dumps(meta.to_json(), sort_keys=True).encode()).hexdigest()
    staging.mkdir(parents=True, exist_ok=True)
    lock = _acquire_lock(staging)
    try:
        done = _read_progress(staging, meta_digest)
        if not done:
            # a fresh start or different metadata: nothing in the staging folder can be trusted
            for kind in (*IMAGE_KINDS, GT_DIR):
                shutil.rmtree(staging / kind, ignore_errors=True)
            (staging / _PROGRESS_FILE).write_text(f"meta {meta_digest}\n", encoding="utf-8")
        count = 0
        for index, item in enumerate(frames):
            if index >= meta.num_frames:
                raise DatasetError(f"{root}: the frames iterable yields more than num_frames={meta.num_frames} frames")
            arrays = [to_uint8(a) for a in item]
            if len(arrays) not in (2, 3) or (meta.has_albedo and len(arrays) != 3):
                raise DatasetError(f"{root}: frame {index} must be (image, mask{', albedo' if meta.has_albedo else ''})")
            if not meta.has_albedo:
                arrays = arrays[:2]
            h, w = arrays[0].shape[:2]
            if (w, h) != (meta.width, meta.height):
                raise DatasetError(f"{root}: frame {index} is {w}x{h} but meta says {meta.width}x{meta.height}")
            digest = _pixel_digest(arrays)
            skipped = _frame_verified(staging, done.get(index), digest)
            if not skipped:
                paths = write_frame(staging, index, *arrays)
                files = {str(p.relative_to(staging)): _file_digest(p) for p in paths}
                _append_line(staging / _PROGRESS_FILE, json.dumps({"index": index, "pixels": digest, "files": files}))
            if on_frame is not None:
                on_frame(index, skipped)
            count = index + 1
        if count != meta.num_frames:
            raise DatasetError(f"{root}: the frames iterable ended after {count} frames but num_frames is {meta.num_frames}")
        write_params(staging, params)
        if extras is not None:
            extras(staging)
        write_meta(staging, meta)
        _remove_temp_files(staging)
        validate_dataset(staging)
        (staging / _PROGRESS_FILE).unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)
    _swap_into_place(staging, root)
    return root


def _swap_into_place(staging: Path, root: Path) -> None:
    """Rename the finished staging folder to ``root`` (moving an old ``root`` aside first)."""
    old = None
    if root.exists():
        old = root.with_name(f"{root.name}.old-{os.getpid()}")
        os.replace(root, old)
    os.replace(staging, root)
    try:  # make the rename durable
        fd = os.open(root.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
