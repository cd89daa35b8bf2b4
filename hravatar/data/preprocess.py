"""From a monocular video to a hravatar dataset (``hravatar preprocess``).

Steps (documented with measured speeds in ``docs/preprocess.md``):

1. **decode + detect**: the video is decoded by ffmpeg (imageio-ffmpeg) at a constant frame
   rate (the source's, at most ``max_fps``; ffmpeg's ``fps`` filter), downscaled by ffmpeg when
   its longer side exceeds ``detect_max_side``; MediaPipe finds the 478 landmarks of the largest
   face of every frame (the face mesh in the mediapipe wheel, or the Tasks face landmarker when a
   ``face_landmarker.task`` is given).
2. **plan**: gaps of at most ``max_gap`` frames without a face are interpolated, longer gaps and
   faceless frames at the ends are dropped (reported); one square crop box per frame from the
   landmarks (``crop_scale`` x the face size, moved up by ``crop_shift`` for the hair), smoothed
   over time (centre over ``smooth_seconds``, size over 3x that) and kept inside the frame.
3. **track**: the head model is fitted to the landmarks in crop pixels: the focal length (the
   candidate field of view with the lowest reprojection error over a subset of frames), one
   shared shape vector (:meth:`LandmarkFitter.fit_identity`), then per frame global rotation,
   translation, neck, jaw, eyes, eyelids and expression: warm-started frame to frame along
   parallel chains of frames (batched), then one batched pass pulled towards the temporally
   smoothed parameters.
4. **write**: the video is decoded again; each frame is cropped (bilinear with supersampling,
   so large videos are antialiased), matted (MediaPipe selfie segmentation refined with a guided
   filter, a feathered threshold, a morphological clean-up and the face hull), the background is
   set to black (with the background colour removed from soft edges), and :func:`write_dataset`
   writes the dataset atomically and resumably, with ``QC.mp4`` (detected and fitted landmarks,
   the fitted head's silhouette and face wireframe over each frame, next to the matted frame) and
   ``qc.json`` (errors per frame, dropped and interpolated frames, faces seen, speeds per step).

Steps 1-3 cache their results in ``DATASET.partial/.work/`` (atomic ``.npz`` files keyed by the
input file and the settings that affect them); an interrupted run resumes by running it again.
Expected failures raise :class:`PreprocessError`, one line naming the file and the problem; when
the input itself is bad (unreadable, no face, too few frames) nothing is left behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .format import DatasetError, DatasetMeta, partial_path, write_dataset

#: progress callback: (stage, done, total); total 0 when unknown
Progress = Callable[[str, int, int], None]
WORK_DIR = ".work"
QC_VIDEO = "QC.mp4"
QC_JSON = "qc.json"
_CACHE_VERSION = 1


class PreprocessError(ValueError):
    """Bad input or settings for preprocessing (the message is one line naming the file)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- settings
@dataclass
class PreprocessConfig:
    """Settings of :func:`preprocess_video`.

    res: side of the stored square frames (pixels).
    max_frames: use at most this many frames from the start of the video (after frame-rate
        conversion); None = all.
    head: head model spec for :func:`hravatar.head.load_head_model` ("builtin", "flame:PATH",
        "ict:DIR").
    test_frac: fraction of frames (the last ones) held out as the test set.
    landmarker: optional MediaPipe ``face_landmarker.task`` (Tasks API); None = the face mesh
        that ships inside the mediapipe wheel.
    fps: frame rate of the dataset; None = the source's, at most ``max_fps`` (a 60 fps phone
        clip keeps every other frame).
    detect_max_side: frames whose longer side exceeds this are downscaled (by ffmpeg, while
        decoding) before landmark detection.
    crop_scale: side of the square crop in face sizes (face size: mean of the width and height
        of the landmarks' box); the landmarks span forehead to chin, so ~1.9 includes the hair.
    crop_shift: the crop centre is moved up by this many face sizes (more hair, less neck).
    crop_inside: shrink / move the crop to stay inside the video frame where possible (no black
        padding when the video is already a tight head crop).
    smooth_seconds: moving-average window of the crop centre (the size uses 3x).
    max_gap: gaps (frames without a face) up to this long are interpolated; longer ones dropped.
    min_frames: fewest usable frames accepted.
    focal: how the focal length is chosen: "distance" (default: the focal length that puts the
        fitted head ``camera_distance`` metres from the camera; MediaPipe landmarks cannot tell the
        focal length: their reprojection error keeps falling towards an orthographic camera),
        "search" (the candidate in ``fovs`` with the lowest reprojection error over ``fit_frames``
        frames) or "fixed" (``fov``).
    camera_distance: head-to-camera distance of the "distance" rule (metres; 0.6 = the webcam
        distance the tracker uses elsewhere).
    fov: field of view (degrees across the video's shorter side) of the "fixed" rule.
    fovs: candidate fields of view of the "search" rule.
    fit_frames: frames (spread over the clip) used for the focal length and the identity.
    identity_rounds: identity updates of :meth:`LandmarkFitter.fit_identity`.
    chains: most chains of frames tracked in parallel (each warm-started frame to frame).
    temporal: weight pulling each frame towards the previous one while tracking.
    smooth_sigma: standard deviation (frames) of the temporal smoothing of the parameters that
        the final pass is pulled towards (``smooth_weight``).
    matte_low, matte_high: feathered threshold of the segmentation probability (0 below
        ``matte_low``, 1 above ``matte_high``); a low ``matte_low`` keeps wispy hair.
    qc: write ``QC.mp4``.
    device: torch device of the fitting ("cpu", "cuda", ...).
    threads: torch CPU threads while fitting (None: unchanged). The fit is many small tensor
        operations: 1 thread is fastest on a small or busy machine.
    """

    res: int = 512
    max_frames: int | None = None
    head: str = "builtin"
    test_frac: float = 0.2
    landmarker: str | None = None
    fps: float | None = None
    max_fps: float = 30.0
    detect_max_side: int = 1280
    crop_scale: float = 1.9
    crop_shift: float = 0.1
    crop_inside: bool = True
    smooth_seconds: float = 0.3
    max_gap: int = 5
    min_frames: int = 10
    focal: str = "distance"
    camera_distance: float = 0.6
    fov: float = 30.0
    fovs: tuple[float, ...] = (10.0, 14.0, 20.0, 28.0, 40.0, 55.0)
    fit_frames: int = 24
    identity_rounds: int = 6
    chains: int = 48
    temporal: float = 0.05
    smooth_sigma: float = 1.5
    smooth_weight: float = 1.0
    matte_low: float = 0.2
    matte_high: float = 0.6
    qc: bool = True
    device: str = "cpu"
    threads: int | None = 1

    def check(self) -> None:
        """Raise :class:`PreprocessError` for out-of-range settings."""
        if not 16 <= self.res <= 4096:
            raise PreprocessError(f"--res must be between 16 and 4096, got {self.res}")
        if self.max_frames is not None and self.max_frames < 1:
            raise PreprocessError(f"--max-frames must be at least 1, got {self.max_frames}")
        if not 0.0 <= self.test_frac < 1.0:
            raise PreprocessError(f"--test-frac must be in [0, 1), got {self.test_frac}")
        if self.fps is not None and not self.fps > 0:
            raise PreprocessError(f"--fps must be positive, got {self.fps}")
        if self.focal not in ("distance", "search", "fixed"):
            raise PreprocessError(f"focal must be 'distance', 'search' or 'fixed', got '{self.focal}'")
        if not self.fovs or any(not 1.0 < f < 170.0 for f in (*self.fovs, self.fov)):
            raise PreprocessError(f"fields of view must be in (1, 170) degrees, got {self.fov} / {self.fovs}")
        if not self.camera_distance > 0:
            raise PreprocessError(f"camera_distance must be positive, got {self.camera_distance}")
        if self.max_gap < 0 or self.min_frames < 2:
            raise PreprocessError("max_gap must be >= 0 and min_frames >= 2")
        if not 0.0 <= self.matte_low < self.matte_high <= 1.0:
            raise PreprocessError("matte thresholds need 0 <= matte_low < matte_high <= 1")


# --------------------------------------------------------------------------- video
@dataclass
class VideoInfo:
    """What ffmpeg says about a video, and the frame rate frames are decoded at."""

    path: str
    width: int
    height: int
    fps_source: float
    fps: float
    duration: float
    codec: str

    @property
    def expected_frames(self) -> int:
        """Frames the header's duration announces at ``fps`` (0 when the duration is unknown)."""
        return int(self.duration * self.fps) if self.duration > 0 else 0


def _ffmpeg_reason(text: str) -> str:
    """The most telling line of an ffmpeg error log (not the banner)."""
    if "moov atom not found" in str(text):
        return "moov atom not found: a truncated or unfinished MP4, or not an MP4"
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    skip = ("ffmpeg version", "built with", "configuration:", "lib", "copyright", "=== stderr", "could not load meta")
    useful = [ln for ln in lines if not ln.lower().startswith(skip)]
    for ln in reversed(useful):
        if any(w in ln.lower() for w in ("invalid", "error", "not found", "moov", "no such", "unknown", "corrupt")):
            return _one_line(ln)[:160]
    return _one_line(useful[-1])[:160] if useful else "ffmpeg could not read it"


def probe_video(path: str | Path, cfg: PreprocessConfig) -> VideoInfo:
    """Open ``path`` with ffmpeg and read its header.

    Raises:
        PreprocessError: missing file, not a video, no video stream.
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.exists():
        raise PreprocessError(f"{path}: file not found")
    if not path.is_file():
        raise PreprocessError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise PreprocessError(f"{path}: empty file (not a video)")
    gen = imageio_ffmpeg.read_frames(str(path), output_params=["-an"])
    try:
        meta = next(gen)
    except (IndexError, KeyError, AttributeError):  # the header parser found no video stream
        raise PreprocessError(f"{path}: not a readable video (no video stream)") from None
    except (OSError, RuntimeError, StopIteration) as e:
        raise PreprocessError(f"{path}: not a readable video ({_ffmpeg_reason(str(e))})") from None
    finally:
        gen.close()
    w, h = (int(v) for v in meta.get("size", (0, 0)))
    if w < 1 or h < 1:
        raise PreprocessError(f"{path}: not a readable video (no frame size in its header)")
    src = float(meta.get("fps") or 0.0)
    fps = float(cfg.fps) if cfg.fps else (min(src, cfg.max_fps) if src > 0 else 30.0)
    return VideoInfo(str(path), w, h, src, fps, float(meta.get("duration") or 0.0), str(meta.get("codec", "?")))


def _scaled_size(info: VideoInfo, scale: float) -> tuple[int, int]:
    return max(2, int(round(info.width * scale / 2)) * 2), max(2, int(round(info.height * scale / 2)) * 2)


def read_video(info: VideoInfo, scale: float = 1.0, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Frames of the video as read-only uint8 RGB arrays at ``info.fps`` (constant rate).

    Args:
        scale: < 1 decodes downscaled by ffmpeg (area filter; size rounded to even numbers,
            see :func:`_scaled_size` for the exact factors).
        max_frames: stop after this many frames.
    Raises:
        PreprocessError: the stream breaks off in the middle of a frame or ffmpeg fails.
    """
    import imageio_ffmpeg

    vf = f"fps={info.fps:.6g}"
    w, h = info.width, info.height
    if scale < 1.0:
        w, h = _scaled_size(info, scale)
        vf += f",scale={w}:{h}:flags=area"
    gen = imageio_ffmpeg.read_frames(info.path, output_params=["-an", "-vf", vf])
    try:
        log = logging.getLogger("imageio_ffmpeg")
        level = log.level
        log.setLevel(logging.ERROR)  # it warns that the scaled size differs from the source's: intended
        try:
            meta = next(gen)
        finally:
            log.setLevel(level)
        w, h = (int(v) for v in meta["size"])
        n = 0
        while max_frames is None or n < max_frames:
            try:
                buf = next(gen)
            except StopIteration:
                return
            except RuntimeError as e:
                raise PreprocessError(f"{info.path}: damaged video, decoding stopped at frame {n} "
                                      f"({_ffmpeg_reason(str(e))})") from None
            yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
            n += 1
    finally:
        gen.close()


# --------------------------------------------------------------------------- cache (DATASET.partial/.work)
def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _cache_load(path: Path, key: str) -> dict | None:
    """Arrays of a cache file written with the same key, else None (also when unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["__key__"]) != key:
                return None
            return {k: z[k] for k in z.files if k != "__key__"}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _cache_save(path: Path, key: str, **arrays) -> None:
    """Write a cache file atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, __key__=np.array(key), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Timer:
    """Seconds and frame counts per step (for the speeds in qc.json)."""

    def __init__(self, saved: dict | None = None):
        self.steps: dict[str, dict] = dict(saved or {})

    def add(self, step: str, seconds: float, frames: int = 0) -> None:
        s = self.steps.setdefault(step, {"seconds": 0.0, "frames": 0, "cached": False})
        s["seconds"] += seconds
        s["frames"] += frames

    def mark_cached(self, names) -> None:
        for n in names:
            if n in self.steps:
                self.steps[n]["cached"] = True

    def report(self) -> dict:
        out = {}
        for k, v in self.steps.items():
            fps = v["frames"] / v["seconds"] if v["seconds"] > 0 and v["frames"] else None
            out[k] = {"seconds": round(v["seconds"], 3), "frames": v["frames"],
                      "fps": round(fps, 2) if fps else None, "cached": v["cached"]}
        return out


@contextlib.contextmanager
def _native_stderr_silenced():
    """Hide what native code writes to file descriptor 2 (MediaPipe's TFLite / absl start-up lines,
    which would bury the one-line messages of the command line) while MediaPipe graphs start."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _start_landmarker(model: str | None):
    """A video-mode :class:`FaceLandmarker`, started quietly (its graph runs once on a blank image)."""
    from hravatar.track.landmarks import FaceLandmarker

    try:
        with _native_stderr_silenced():
            lm = FaceLandmarker(model, video=True, max_faces=4)
            lm.detect(np.zeros((64, 64, 3), np.uint8), 0)
    except FileNotFoundError:
        raise PreprocessError(f"{model}: file not found (--landmarker)") from None
    except ValueError as e:
        raise PreprocessError(f"{model}: {_one_line(e)}") from None
    return lm


def _start_segmenter():
    from hravatar.track.landmarks import PersonSegmenter

    with _native_stderr_silenced():
        seg = PersonSegmenter()
        seg.mask(np.zeros((64, 64, 3), np.uint8))
    return seg


# --------------------------------------------------------------------------- step 1: decode + detect
def detect_landmarks(info: VideoInfo, cfg: PreprocessConfig, timer: _Timer, progress: Progress | None = None) -> dict:
    """Landmarks of the largest face in every frame.

    Returns:
        dict with ``landmarks`` [N, 478, 3] float32 in full-resolution pixels (NaN where no
        face), ``num_faces`` [N] int, ``scale`` (detection downscale factor).
    Raises:
        PreprocessError: truncated or damaged video, unreadable landmarker model.
    """
    longer = max(info.width, info.height)
    scale = min(1.0, cfg.detect_max_side / longer)
    lm = _start_landmarker(cfg.landmarker)
    lmks: list[np.ndarray] = []
    faces: list[int] = []
    nan = np.full((478, 3), np.nan, np.float32)
    total = info.expected_frames or 0  # for the progress display (0: unknown)
    if cfg.max_frames is not None:
        total = min(total, cfg.max_frames) if total else cfg.max_frames
    quiet = contextlib.ExitStack()
    quiet.enter_context(_native_stderr_silenced())  # MediaPipe logs a native warning on the first face it finds
    try:
        frames = read_video(info, scale, cfg.max_frames)
        sx = sy = 1.0
        if scale < 1.0:
            w, h = _scaled_size(info, scale)
            sx, sy = w / info.width, h / info.height
        while True:
            t0 = time.perf_counter()
            frame = next(frames, None)
            t1 = time.perf_counter()
            timer.add("decode", t1 - t0, 0 if frame is None else 1)
            if frame is None:
                break
            i = len(lmks)
            det = lm.detect(frame, 1 + int(round(i * 1000.0 / info.fps)))
            timer.add("detect", time.perf_counter() - t1, 1)
            if det is None:
                lmks.append(nan)
                faces.append(0)
            else:
                lmks.append(det.landmarks / np.array([sx, sy, sx], np.float32))
                faces.append(det.num_faces)
            if progress is not None:
                progress("detect", i + 1, total)
    finally:
        lm.close()
        quiet.close()
    n = len(lmks)
    if n == 0:
        raise PreprocessError(f"{info.path}: no frames could be decoded (not a video, or damaged)")
    limited = cfg.max_frames is not None and n >= cfg.max_frames
    exp = info.expected_frames
    if not limited and exp > 10 and n < 0.9 * exp - 2:
        raise PreprocessError(f"{info.path}: truncated or damaged video (decoded {n} frames, the header announces ~{exp})")
    return {"landmarks": np.stack(lmks).astype(np.float32), "num_faces": np.asarray(faces, np.int64),
            "scale": np.float64(scale)}


# --------------------------------------------------------------------------- step 2: gaps + crop boxes
def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True in a 1-D bool array."""
    out, start = [], None
    for i, v in enumerate(mask):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


def plan_frames(landmarks: np.ndarray, cfg: PreprocessConfig, path: str = "video") -> dict:
    """Interpolate short gaps, drop long ones.

    Args:
        landmarks: [N, 478, 3] per decoded frame (NaN where no face).
    Returns:
        dict: ``kept`` [T] source frame indices, ``interpolated`` [T] bool, ``landmarks`` [T, 478, 3]
        (gaps filled), ``dropped`` list of {"reason", "first", "last", "count"} (source frames).
    Raises:
        PreprocessError: no face at all, or fewer than ``min_frames`` usable frames.
    """
    N = landmarks.shape[0]
    valid = np.isfinite(landmarks).all(axis=(1, 2))
    if not valid.any():
        raise PreprocessError(f"{path}: no face found in any of the {N} frames")
    lmk = landmarks.copy()
    keep = valid.copy()
    interp = np.zeros(N, bool)
    dropped = []
    for a, b in _runs(~valid):
        n = b - a
        if a == 0 or b == N:
            where = "start" if a == 0 else "end"
            dropped.append({"reason": f"no face at the {where} of the clip", "first": a, "last": b - 1, "count": n})
        elif n > cfg.max_gap:
            dropped.append({"reason": f"face lost for {n} frames (more than {cfg.max_gap})", "first": a, "last": b - 1,
                            "count": n})
        else:
            w = (np.arange(a, b) - (a - 1)) / (b - (a - 1))
            lmk[a:b] = (1 - w)[:, None, None] * lmk[a - 1] + w[:, None, None] * lmk[b]
            keep[a:b] = True
            interp[a:b] = True
    kept = np.nonzero(keep)[0]
    if len(kept) < cfg.min_frames:
        raise PreprocessError(f"{path}: only {len(kept)} usable frames with a face (of {N} decoded); "
                              f"at least {cfg.min_frames} needed")
    return {"kept": kept.astype(np.int64), "interpolated": interp[kept], "landmarks": lmk[kept].astype(np.float32),
            "dropped": dropped}


def segments_of(kept: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) ranges of the dataset frames whose source frames are consecutive."""
    cuts = np.nonzero(np.diff(kept) != 1)[0] + 1
    bounds = [0, *cuts.tolist(), len(kept)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def crop_boxes(landmarks: np.ndarray, segments: list[tuple[int, int]], width: int, height: int, fps: float,
               cfg: PreprocessConfig) -> np.ndarray:
    """Temporally smoothed square crop boxes (cx, cy, size) in video pixels, one per frame.

    Per frame: the landmarks' box, side ``crop_scale`` x face size, centre moved up by
    ``crop_shift`` face sizes; then a centred moving average within each segment
    (:func:`hravatar.encoder.crop.smooth_boxes`), and with ``crop_inside`` the box is shrunk to
    the frame's shorter side and moved inside the frame.
    """
    from hravatar.encoder.crop import smooth_boxes

    xy = torch.from_numpy(landmarks[..., :2]).double()
    lo, hi = xy.amin(1), xy.amax(1)
    face = 0.5 * (hi - lo).sum(-1)
    centre = 0.5 * (lo + hi)
    centre[:, 1] -= cfg.crop_shift * face
    raw = torch.cat([centre, (cfg.crop_scale * face)[:, None]], -1)
    out = torch.empty_like(raw)
    wc, ws = _odd(cfg.smooth_seconds * fps), _odd(3 * cfg.smooth_seconds * fps)
    for a, b in segments:
        n = b - a
        seg = raw[a:b]
        out[a:b, :2] = smooth_boxes(seg[:, :2], min(wc, _odd(2 * n - 1)))
        out[a:b, 2] = smooth_boxes(seg[:, 2:], min(ws, _odd(2 * n - 1)))[:, 0]
    if cfg.crop_inside:
        out[:, 2] = out[:, 2].clamp(max=float(min(width, height)))
        half = out[:, 2] / 2
        out[:, 0] = torch.minimum(torch.maximum(out[:, 0], half), width - half)
        out[:, 1] = torch.minimum(torch.maximum(out[:, 1], half), height - half)
    return out.float().numpy()


def crop_intrinsics(K: Tensor, boxes: Tensor, res: int) -> Tensor:
    """[T, 3, 3] intrinsics of the ``res`` x ``res`` crops of a camera with intrinsics ``K`` [3, 3].

    A crop of the box (cx, cy, s) is the same pinhole camera with the principal point moved by the
    box corner and everything scaled by res / s (continuous pixel convention of
    :mod:`hravatar.encoder.crop`).
    """
    a = res / boxes[:, 2]
    x0 = boxes[:, 0] - boxes[:, 2] / 2
    y0 = boxes[:, 1] - boxes[:, 2] / 2
    out = torch.zeros(boxes.shape[0], 3, 3, dtype=torch.float32)
    out[:, 0, 0] = K[0, 0] * a
    out[:, 1, 1] = K[1, 1] * a
    out[:, 0, 2] = (K[0, 2] - x0) * a
    out[:, 1, 2] = (K[1, 2] - y0) * a
    out[:, 2, 2] = 1.0
    return out


# --------------------------------------------------------------------------- step 3: tracking
def _pick_fit_frames(lmk: np.ndarray, usable: np.ndarray, n: int) -> np.ndarray:
    """Up to n frame indices for the camera / identity fit: half spread over time, half the most
    turned (left, right, up, down) faces (varied poses make depth observable)."""
    idx = np.nonzero(usable)[0]
    if len(idx) <= n:
        return idx
    spread = idx[np.linspace(0, len(idx) - 1, n - n // 2).round().astype(int)]
    xy = lmk[idx, :, :2]
    size = np.sqrt(np.prod(xy.max(1) - xy.min(1), -1)).clip(min=1.0)
    # yaw / pitch proxies: the nose tip (1) relative to the midpoint of the cheeks (234, 454)
    mid = 0.5 * (xy[:, 234] + xy[:, 454])
    off = (xy[:, 1] - mid) / size[:, None]
    extremes = []
    for v in (off[:, 0], -off[:, 0], off[:, 1], -off[:, 1]):
        extremes += idx[np.argsort(-v)[: max(1, (n // 2 + 3) // 4)]].tolist()
    return np.asarray(sorted(set(spread.tolist()) | set(extremes)), np.int64)


def _slice(frame, idx):
    from hravatar.avatar.gaussians import FrameParams

    return FrameParams(frame.expr[idx], frame.pose[idx], frame.eyelids[idx], frame.transl[idx])


def _smooth_time(x: Tensor, segments: list[tuple[int, int]], sigma: float) -> Tensor:
    """Gaussian smoothing along dim 0 within each segment (normalised at the segment ends)."""
    if sigma <= 0:
        return x.clone()
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma * sigma))[None, None]
    flat = x.reshape(x.shape[0], -1)
    out = torch.empty_like(flat)
    for a, b in segments:
        seg = flat[a:b].T[:, None]  # [D,1,n]
        num = torch.nn.functional.conv1d(seg, k, padding=r)[:, 0]
        den = torch.nn.functional.conv1d(torch.ones_like(seg[:1]), k, padding=r)[0]
        out[a:b] = (num / den).T
    return out.reshape(x.shape)


def track_frames(head, lmk2d: Tensor, boxes: Tensor, width: int, height: int, segments: list[tuple[int, int]],
                 usable: np.ndarray, cfg: PreprocessConfig, timer: _Timer, progress: Progress | None = None) -> dict:
    """Fit camera, identity and per-frame parameters of ``head`` to landmarks in crop pixels.

    Args:
        head: the head model (on ``cfg.device``).
        lmk2d: [T, 478, 2] landmarks in pixels of the res x res crops.
        boxes: [T, 3] crop boxes in video pixels (for the per-frame intrinsics).
        segments: ranges of temporally continuous frames (no warm start / smoothing across).
        usable: [T] bool, frames with detected (not interpolated) landmarks.
    Returns:
        dict of numpy arrays: beta [S], K [T,3,3], expr, pose, eyelids, transl, projected
        [T,478,2], error_px [T], error_rel [T], fov (degrees across the video's shorter side),
        fov_tried [n, 2] (fov, mean error).
    """
    from hravatar.track.fit import WEBCAM_DISTANCE, LandmarkFitter, webcam_intrinsics

    dev = torch.device(cfg.device)
    T = lmk2d.shape[0]
    target = lmk2d.to(dev, torch.float32)
    pick = _pick_fit_frames(lmk2d.numpy(), usable, cfg.fit_frames)

    def Ks(fov):
        return crop_intrinsics(webcam_intrinsics(width, height, fov), boxes, cfg.res).to(dev)

    # camera (see PreprocessConfig.focal)
    t0 = time.perf_counter()
    short = min(width, height)
    fitter = LandmarkFitter(head, fit_neck=True)
    tried: list[tuple[float, float]] = []  # (fov, mean relative error over the subset)
    if cfg.focal == "search":
        for i, fov in enumerate(cfg.fovs):
            f = LandmarkFitter(head, fit_neck=True)
            r = f.fit_identity(target[pick], Ks(fov)[pick], rounds=2, iters=3)
            tried.append((float(fov), float(r.error_rel.mean())))
            if progress is not None:
                progress("camera", i + 1, len(cfg.fovs))
        fov = min(tried, key=lambda x: x[1])[0]
    elif cfg.focal == "distance":
        # for a given image size the fitted depth scales with the focal length: fixed-point steps
        fov = 30.0
        for i in range(3):
            r = fitter.fit(target[pick], Ks(fov)[pick], iters=10)
            tried.append((fov, float(r.error_rel.mean())))
            depth = float((WEBCAM_DISTANCE - r.frame.transl[:, 2]).median())
            f_px = 0.5 * short / math.tan(math.radians(fov) / 2) * cfg.camera_distance / max(depth, 1e-3)
            fov = float(np.clip(math.degrees(2 * math.atan(0.5 * short / f_px)), 2.0, 120.0))
            if progress is not None:
                progress("camera", i + 1, 3)
    else:
        fov = float(cfg.fov)
    K = Ks(fov)
    timer.add("camera", time.perf_counter() - t0, len(pick) * max(1, len(tried)))
    t0 = time.perf_counter()
    fitter.fit_identity(target[pick], K[pick], rounds=cfg.identity_rounds, iters=4)
    timer.add("identity", time.perf_counter() - t0, len(pick))

    # per frame: parallel chains, each warm-started frame to frame with a pull towards the previous frame
    t0 = time.perf_counter()
    fitter.weights = replace(fitter.weights, temporal=cfg.temporal)
    chain_len = max(8, math.ceil(T / max(1, cfg.chains)))
    chains = [list(range(s, min(s + chain_len, b))) for a, b in segments for s in range(a, b, chain_len)]
    E = fitter.num_expr
    expr = torch.zeros(T, E, device=dev)
    pose = torch.zeros(T, 5, 3, device=dev)
    lids = torch.zeros(T, 2, device=dev)
    transl = torch.zeros(T, 3, device=dev)
    from hravatar.avatar.gaussians import FrameParams

    def store(idx, fr):
        expr[idx], pose[idx], lids[idx], transl[idx] = fr.expr, fr.pose, fr.eyelids, fr.transl

    starts = [c[0] for c in chains]
    store(starts, fitter.fit(target[starts], K[starts], iters=12).frame)
    done = len(starts)
    for k in range(1, max(len(c) for c in chains)):
        active = [c for c in chains if len(c) > k]
        idx = [c[k] for c in active]
        prev = [c[k - 1] for c in active]
        init = FrameParams(expr[prev], pose[prev], lids[prev], transl[prev])
        store(idx, fitter.fit(target[idx], K[idx], init=init, iters=3).frame)
        done += len(idx)
        if progress is not None:
            progress("track", done, 2 * T)
    timer.add("track_chains", time.perf_counter() - t0, T)

    # final batched pass: pulled towards the temporally smoothed parameters (no lag, no chain seams)
    t0 = time.perf_counter()
    fitter.weights = replace(fitter.weights, temporal=cfg.smooth_weight)
    cur = FrameParams(expr, pose, lids, transl)
    smooth = FrameParams(*(_smooth_time(t, segments, cfg.smooth_sigma) for t in (expr, pose, lids, transl)))
    proj = torch.zeros(T, 478, 2)
    err_px = torch.zeros(T)
    err_rel = torch.zeros(T)
    out = FrameParams(expr.clone(), pose.clone(), lids.clone(), transl.clone())
    step = 128
    for a in range(0, T, step):
        idx = list(range(a, min(a + step, T)))
        r = fitter.fit(target[idx], K[idx], init=_slice(cur, idx), prev=_slice(smooth, idx), iters=3)
        out.expr[idx], out.pose[idx] = r.frame.expr, r.frame.pose
        out.eyelids[idx], out.transl[idx] = r.frame.eyelids, r.frame.transl
        proj[idx] = r.projected.cpu()
        err_px[idx] = r.error_px.cpu()
        err_rel[idx] = r.error_rel.cpu()
        if progress is not None:
            progress("track", T + idx[-1] + 1, 2 * T)
    timer.add("track_smooth", time.perf_counter() - t0, T)
    c = lambda t: t.detach().cpu().float().numpy()  # noqa: E731
    return {"beta": c(fitter.beta), "K": c(K), "expr": c(out.expr), "pose": c(out.pose), "eyelids": c(out.eyelids),
            "transl": c(out.transl), "projected": c(proj), "error_px": c(err_px), "error_rel": c(err_rel),
            "fov": np.float64(fov), "fov_tried": np.asarray(tried, np.float64).reshape(-1, 2)}


# --------------------------------------------------------------------------- step 4: crop, matte, QC
def crop_frame(frame: np.ndarray, box: np.ndarray, res: int, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    """The square ``box`` (cx, cy, size in video pixels) of ``frame`` resampled to res x res.

    ``frame`` may be a downscaled decode (video pixel x maps to frame pixel x * sx). Bilinear
    sampling at k x k points per output pixel averaged (k = ceil(box side in frame pixels / res)),
    so shrinking is antialiased; outside the frame is black. Pixel convention: box edges map to
    crop edges, as :func:`hravatar.encoder.crop.crop_and_resize`.
    """
    import cv2

    cx, cy, s = (float(v) for v in box)
    k = max(1, min(8, math.ceil(s * max(sx, sy) / res - 1e-6)))
    out = res * k
    ax, ay = out / (s * sx), out / (s * sy)
    x0, y0 = (cx - s / 2) * sx, (cy - s / 2) * sy
    # continuous coords (centres at +0.5) -> OpenCV's integer-centre convention
    M = np.array([[ax, 0.0, ax * (0.5 - x0) - 0.5], [0.0, ay, ay * (0.5 - y0) - 0.5]])
    img = cv2.warpAffine(np.ascontiguousarray(frame), M, (out, out), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    if k > 1:
        img = cv2.resize(img, (res, res), interpolation=cv2.INTER_AREA)
    return img


def face_hull(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[H, W] uint8 mask (0/1) of the convex hull of 2D landmarks (the face surely foreground)."""
    import cv2

    m = np.zeros(shape, np.uint8)
    pts = np.round(landmarks[:, :2] * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillConvexPoly(m, cv2.convexHull(pts), 1, lineType=cv2.LINE_8, shift=4)
    return m


def refine_mask(prob: np.ndarray, image: np.ndarray, landmarks: np.ndarray | None, low: float = 0.2,
                high: float = 0.6) -> np.ndarray:
    """Refine a soft person segmentation into the stored foreground mask.

    1. guided filter with the image as guide (boundary snaps to image edges: hair strands, ears),
       when opencv-contrib's ``ximgproc`` is available (it comes with mediapipe);
    2. feathered threshold: 0 below ``low``, 1 above ``high``, smooth in between (a low ``low``
       keeps wispy hair);
    3. clean-up: small specks removed (opening), only the connected parts that touch the face (or
       the largest part) kept, small holes filled;
    4. the convex hull of the face landmarks is always foreground.

    Args:
        prob: [H, W] float foreground probability; image: [H, W, 3] uint8 RGB;
        landmarks: [478, 2+] pixel landmarks of the face, or None.
    Returns:
        [H, W] float32 mask in [0, 1].
    """
    import cv2

    H, W = prob.shape
    p = np.clip(prob.astype(np.float32), 0.0, 1.0)
    r = max(2, round(min(H, W) / 64))
    if hasattr(cv2, "ximgproc"):
        p = cv2.ximgproc.guidedFilter(image.astype(np.float32) / 255.0, p, r, 1e-4)
    else:
        p = cv2.GaussianBlur(p, (0, 0), r / 2)
    t = np.clip((p - low) / max(high - low, 1e-6), 0.0, 1.0)
    alpha = t * t * (3.0 - 2.0 * t)
    core = (alpha > 0.5).astype(np.uint8)
    kr = max(1, round(min(H, W) / 200))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * kr + 1, 2 * kr + 1))
    core = cv2.morphologyEx(core, cv2.MORPH_OPEN, kernel)
    hull = face_hull(landmarks, (H, W)) if landmarks is not None else None
    if hull is not None:
        core = np.maximum(core, hull)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(core, connectivity=8)
    if n > 1:
        if hull is not None:
            ids = np.unique(lab[(hull > 0) & (lab > 0)])
        else:
            ids = np.array([1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))])
        keep = np.isin(lab, ids).astype(np.uint8)
        # holes: background not connected to the border, smaller than 1% of the image
        inv = (1 - keep).astype(np.uint8)
        m, hl, hs, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
        border = set(np.unique(np.concatenate([hl[0], hl[-1], hl[:, 0], hl[:, -1]])).tolist())
        small = [j for j in range(1, m) if j not in border and hs[j, cv2.CC_STAT_AREA] < 0.01 * H * W]
        if small:
            keep = np.maximum(keep, np.isin(hl, small).astype(np.uint8))
            alpha = np.where(np.isin(hl, small), 1.0, alpha)
        # soft edges stay only next to the kept parts
        near = cv2.dilate(keep, kernel, iterations=2)
        alpha = alpha * near
    if hull is not None:
        alpha = np.maximum(alpha, hull.astype(np.float32))
    return alpha.astype(np.float32)


def matte_frame(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The foreground over black: ``alpha * F`` with the background's colour removed at soft edges.

    A pixel of partial ``alpha`` mixes foreground F and background B: I = alpha F + (1 - alpha) B.
    B is estimated locally as the mean colour of the nearby background (alpha ~ 0; a normalised
    box filter over ~1/16 of the image, computed at ~128 px since it is smooth, and widened where
    there is no background near), so the stored pixel I - (1 - alpha) B keeps dark hair dark
    instead of blending in a bright wall (no halo).

    Args:
        image: [H, W, 3] uint8; alpha: [H, W] float in [0, 1].
    Returns:
        [H, W, 3] uint8.
    """
    import cv2

    a = alpha.astype(np.float32)
    out = image.astype(np.float32) * a[..., None]
    soft = (a > 0.0) & (a < 0.999)
    bg = (a < 0.02).astype(np.float32)
    if soft.any() and bg.any():
        H, W = a.shape
        f = max(1, min(H, W) // 128)
        sw, sh = max(1, W // f), max(1, H // f)
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA).astype(np.float32)
        bgs = cv2.resize(bg, (sw, sh), interpolation=cv2.INTER_AREA)
        bgs = (bgs > 0.99).astype(np.float32)  # only pixels entirely background
        k = max(3, (min(sw, sh) // 16) | 1)
        num = cv2.blur(small * bgs[..., None], (k, k))
        den = cv2.blur(bgs, (k, k))
        for _ in range(6):  # no background near: look further
            miss = den < 1e-3
            if not miss.any():
                break
            num = np.where(miss[..., None], cv2.blur(num, (3 * k, 3 * k)), num)
            den = np.where(miss, cv2.blur(den, (3 * k, 3 * k)), den)
        B = cv2.resize(num / np.maximum(den, 1e-6)[..., None], (W, H), interpolation=cv2.INTER_LINEAR)
        a_s = a[soft][:, None]
        F = np.clip((image[soft].astype(np.float32) - (1.0 - a_s) * B[soft]) / np.maximum(a_s, 0.05), 0.0, 255.0)
        out[soft] = F * a_s
    return (out + 0.5).astype(np.uint8)


class _QcDrawer:
    """QC frames, three panels: the crop with the detected landmarks (green) and the fitted head
    model's landmarks (red); the crop with the fitted head model drawn over it (its silhouette,
    tinted and outlined, and a wireframe of the face: MediaPipe's face-mesh tessellation on the
    model's projected landmarks); the matted frame that goes into the dataset."""

    def __init__(self, head, beta: Tensor, res: int, device):
        self.head = head
        self.beta = beta.to(device)[None]
        self.res = res
        self.size = min(max(res, 256), 512)
        self.sc = self.size / res
        self.faces = head.faces
        self.faces_np = self.faces.cpu().numpy()
        self.device = device
        from hravatar.track.landmarks import import_mediapipe

        edges = import_mediapipe().solutions.face_mesh.FACEMESH_TESSELATION
        self.edges = np.array(sorted(tuple(sorted(e)) for e in edges), np.int64)

    def mesh(self, params: dict, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Projected vertices [B, V, 2] (display pixels) and a facing value [B, F] per triangle of frames idx."""
        dev = self.device
        g = lambda k: torch.as_tensor(params[k][idx], device=dev)  # noqa: E731
        with torch.no_grad():
            v = self.head(beta=self.beta.expand(len(idx), -1), psi=g("expr"), pose=g("pose"), eyelids=g("eyelids"),
                          transl=g("transl")).vertices
            vm = g("viewmat")
            pc = v @ vm[:, :3, :3].transpose(1, 2) + vm[:, None, :3, 3]
            K = g("K")
            z = pc[..., 2:3].clamp(min=1e-4)
            f = torch.stack([K[:, 0, 0], K[:, 1, 1]], -1)[:, None]
            c = torch.stack([K[:, 0, 2], K[:, 1, 2]], -1)[:, None]
            uv = pc[..., :2] / z * f + c
            tri = pc[:, self.faces]  # [B,F,3,3]
            n = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
            facing = (n * tri[:, :, 0]).sum(-1)
        return (uv * self.sc).cpu().numpy(), facing.cpu().numpy()

    def _fit(self, img: np.ndarray) -> np.ndarray:
        import cv2

        if self.size == self.res:
            return img.copy()
        interp = cv2.INTER_AREA if self.size < self.res else cv2.INTER_LINEAR
        return cv2.resize(img, (self.size, self.size), interpolation=interp)

    def draw(self, crop: np.ndarray, matted: np.ndarray, det: np.ndarray, fit: np.ndarray, uv: np.ndarray,
             facing: np.ndarray, text: str, warn: bool) -> np.ndarray:
        import cv2

        S = self.size
        base = self._fit(crop)
        pts = base.copy()
        r = max(1, S // 300)
        for p, col in ((det, (0, 255, 0)), (fit, (255, 50, 50))):
            for q in np.round(p[:, :2] * self.sc * 4).astype(np.int32):
                cv2.circle(pts, (int(q[0]), int(q[1])), 4 * r, col, -1, cv2.LINE_AA, shift=2)
        # silhouette of the front-facing triangles (the winding is taken from the majority: the head faces the camera)
        front = facing < 0 if (facing < 0).sum() >= (facing > 0).sum() else facing > 0
        tris = np.round(uv[self.faces_np[front]] * 4).astype(np.int32)  # 2 fractional bits
        sil = np.zeros((S, S), np.uint8)
        cv2.fillPoly(sil, list(tris), 1, cv2.LINE_8, shift=2)
        tint = base.copy()
        tint[sil > 0] = (0.5 * tint[sil > 0] + np.array([40, 90, 160])).clip(0, 255).astype(np.uint8)
        contours, _ = cv2.findContours(sil, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tint, contours, -1, (90, 170, 255), max(1, S // 256), cv2.LINE_AA)
        seg = np.round(fit[self.edges, :2] * self.sc * 4).astype(np.int32)  # [E,2,2]
        wire = tint.copy()
        cv2.polylines(wire, list(seg), False, (225, 240, 255), 1, cv2.LINE_AA, shift=2)
        wire = cv2.addWeighted(wire, 0.7, tint, 0.3, 0)
        panel = np.concatenate([pts, wire, self._fit(matted)], 1)
        fs = 0.4 * S / 256
        cv2.putText(panel, text, (6, int(16 * S / 256)), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 80, 80) if warn else (255, 255, 255),
                    1, cv2.LINE_AA)
        return panel


class _QcVideo:
    """H.264 QC video written frame by frame (imageio-ffmpeg)."""

    def __init__(self, path: Path, width: int, height: int, fps: float):
        import imageio_ffmpeg

        self.path = path
        self._gen = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264", quality=6,
                                                macro_block_size=2, ffmpeg_log_level="error")
        self._gen.send(None)

    def add(self, frame: np.ndarray) -> None:
        self._gen.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        self._gen.close()


# --------------------------------------------------------------------------- the pipeline
def _load_head(spec: str, device):
    from hravatar.head import load_head_model
    from hravatar.io.safe import CheckpointError

    try:
        return load_head_model(spec).to(device)
    except FileNotFoundError as e:
        msg = f"{e.filename}: file not found" if e.filename else _one_line(e)
        raise PreprocessError(f"{msg} (--head {spec})") from None
    except (ValueError, CheckpointError, OSError) as e:
        raise PreprocessError(f"--head {spec}: {_one_line(e)}") from None


def _absolute_head_spec(spec: str) -> str:
    kind, sep, arg = spec.partition(":")
    if sep and arg and kind.strip().lower() in ("flame", "ict"):
        return f"{kind.strip().lower()}:{Path(arg).expanduser().resolve()}"
    return spec


def preprocess_video(video: str | Path, out: str | Path, cfg: PreprocessConfig | None = None,
                     progress: Progress | None = None, overwrite: bool = False) -> dict:
    """Turn a monocular head video into a hravatar dataset folder (see the module docstring).

    Args:
        video: input video (any format ffmpeg reads).
        out: dataset folder to create (written atomically; ``out.partial`` while in progress).
        cfg: :class:`PreprocessConfig`.
        progress: optional callback ``(stage, done, total)``.
        overwrite: replace an existing ``out``.
    Returns:
        The QC report (also written to ``out/qc.json``).
    Raises:
        PreprocessError: one line naming the file and the problem (bad video, no face, ...).
        hravatar.track.MediaPipeMissing: mediapipe is not installed.
    """
    cfg = cfg or PreprocessConfig()
    cfg.check()
    video, out = Path(video), Path(out)
    if out.exists() and not overwrite:
        raise PreprocessError(f"{out}: already exists (pass --overwrite to replace it)")
    info = probe_video(video, cfg)
    from hravatar.track.landmarks import import_mediapipe

    import_mediapipe()  # fail early with the install hint
    try:
        import cv2  # noqa: F401  (comes with mediapipe)
    except ImportError as e:
        raise PreprocessError(f"preprocessing needs OpenCV (installed with mediapipe): {_one_line(e)}") from None
    dev = torch.device(cfg.device)
    head_spec = _absolute_head_spec(cfg.head)
    head = _load_head(head_spec, dev)
    staging = partial_path(out)
    work = staging / WORK_DIR
    fresh = not staging.exists()
    try:
        report = _run(video, out, cfg, info, head, head_spec, work, progress, overwrite)
    except PreprocessError:
        # the input itself is unusable: leave nothing behind (interruptions keep the cache instead)
        if fresh or not (staging / ".progress").exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return report


def _run(video: Path, out: Path, cfg: PreprocessConfig, info: VideoInfo, head, head_spec: str, work: Path,
         progress: Progress | None, overwrite: bool) -> dict:
    st = video.stat()
    src_key = {"v": _CACHE_VERSION, "video": str(video.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
               "fps": info.fps, "max_frames": cfg.max_frames, "landmarker": cfg.landmarker, "detect_max_side": cfg.detect_max_side}
    timer = _Timer()
    cached = []

    # ---- 1. decode + detect
    key1 = _digest(src_key)
    det = _cache_load(work / "detect.npz", key1)
    if det is None:
        t1 = _Timer()
        det = detect_landmarks(info, cfg, t1, progress)
        det["timings"] = np.array(json.dumps(t1.steps))
        _cache_save(work / "detect.npz", key1, **det)
    else:
        cached += ["decode", "detect"]
    timer.steps.update(json.loads(str(det["timings"])))
    N = det["landmarks"].shape[0]

    # ---- 2. gaps + crop boxes
    t0 = time.perf_counter()
    plan = plan_frames(det["landmarks"], cfg, str(video))
    kept, T = plan["kept"], len(plan["kept"])
    segs = segments_of(kept)
    boxes = crop_boxes(plan["landmarks"], segs, info.width, info.height, info.fps, cfg)
    from hravatar.encoder.crop import points_to_crop

    lmk_crop = points_to_crop(torch.from_numpy(plan["landmarks"][..., :2]), torch.from_numpy(boxes), cfg.res).float()
    timer.add("plan", time.perf_counter() - t0, T)

    # ---- 3. tracking
    fit_keys = ("focal", "camera_distance", "fov", "fovs", "fit_frames", "identity_rounds", "chains", "temporal",
                "smooth_sigma", "smooth_weight",
                "crop_scale", "crop_shift", "crop_inside", "smooth_seconds", "max_gap", "res")
    key3 = _digest([key1, head_spec, head.identity(), {k: getattr(cfg, k) for k in fit_keys}])
    trk = _cache_load(work / "track.npz", key3)
    if trk is None:
        t3 = _Timer()
        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            trk = track_frames(head, lmk_crop, torch.from_numpy(boxes), info.width, info.height, segs, ~plan["interpolated"],
                               cfg, t3, progress)
        finally:
            torch.set_num_threads(threads)
        trk["timings"] = np.array(json.dumps(t3.steps))
        _cache_save(work / "track.npz", key3, **trk)
    else:
        cached += ["camera", "identity", "track_chains", "track_smooth"]
    timer.steps.update(json.loads(str(trk["timings"])))
    timer.mark_cached(cached)

    # ---- 4. dataset
    from hravatar.render.camera import look_at
    from hravatar.track.fit import WEBCAM_DISTANCE

    viewmat = look_at(torch.tensor([0.0, 0.0, WEBCAM_DISTANCE]), torch.zeros(3))
    params = {k: torch.from_numpy(np.asarray(trk[k])) for k in ("beta", "K", "expr", "pose", "eyelids", "transl")}
    params["viewmat"] = viewmat[None].repeat(T, 1, 1).float()
    params["landmarks"] = lmk_crop
    params["landmarks_valid"] = torch.from_numpy(~plan["interpolated"])
    params["source_frame"] = torch.from_numpy(kept)
    params["crop_box"] = torch.from_numpy(boxes)
    n_test = min(int(round(cfg.test_frac * T)), T - 1)
    meta = DatasetMeta(num_frames=T, width=cfg.res, height=cfg.res, fps=float(info.fps), test_frames=n_test,
                       head=head.identity(), expr_dim=int(params["expr"].shape[1]), shape_dim=int(params["beta"].shape[0]),
                       source=str(video), head_spec=head_spec)
    qc_tmp = work / f".{QC_VIDEO}.tmp.mp4"
    coverage = np.zeros(T)
    np_params = {k: v.numpy() for k, v in params.items()}

    def frames() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        min_side = float(boxes[:, 2].min())
        s2 = min(1.0, 1.5 * cfg.res / min_side)
        s2 = s2 if s2 < 0.75 else 1.0
        sx = sy = 1.0
        if s2 < 1.0:
            w, h = _scaled_size(info, s2)
            sx, sy = w / info.width, h / info.height
        seg = _start_segmenter()
        drawer = qc = None
        if cfg.qc:
            drawer = _QcDrawer(head, torch.from_numpy(np.asarray(trk["beta"])), cfg.res, head.v_template.device)
            qc = _QcVideo(qc_tmp, 3 * drawer.size, drawer.size, info.fps)
        mesh_cache: dict = {}
        try:
            src = read_video(info, s2, int(kept[-1]) + 1)
            j = 0
            for i in range(int(kept[-1]) + 1):
                t0 = time.perf_counter()
                frame = next(src, None)
                t1 = time.perf_counter()
                timer.add("decode_2", t1 - t0, 1)
                if frame is None:
                    raise PreprocessError(f"{info.path}: the video changed or got shorter since it was read (frame {i} missing)")
                if i != kept[j]:
                    continue
                crop = crop_frame(frame, boxes[j], cfg.res, sx, sy)
                t2 = time.perf_counter()
                timer.add("crop", t2 - t1, 1)
                alpha = refine_mask(seg.mask(crop), crop, lmk_crop[j].numpy(), cfg.matte_low, cfg.matte_high)
                matted = matte_frame(crop, alpha)
                mask = (alpha * 255.0 + 0.5).astype(np.uint8)
                coverage[j] = float(alpha.mean())
                t3 = time.perf_counter()
                timer.add("matte", t3 - t2, 1)
                if drawer is not None:
                    if j not in mesh_cache:
                        idx = list(range(j, min(j + 32, T)))
                        uv, facing = drawer.mesh(np_params, idx)
                        mesh_cache = {q: (uv[n], facing[n]) for n, q in enumerate(idx)}
                    uv, facing = mesh_cache[j]
                    e = float(trk["error_rel"][j])
                    note = " interpolated" if plan["interpolated"][j] else ""
                    text = f"{j} (src {i}) err {100 * e:.2f}% {float(trk['error_px'][j]):.1f}px{note}"
                    qc.add(drawer.draw(crop, matted, lmk_crop[j].numpy(), np.asarray(trk["projected"][j]), uv, facing, text,
                                       e > 0.02 or bool(plan["interpolated"][j])))
                    timer.add("qc", time.perf_counter() - t3, 1)
                yield matted, mask
                j += 1
                if j >= T:
                    break
        finally:
            seg.close()
            if qc is not None:
                qc.close()

    def on_frame(index: int, skipped: bool) -> None:
        if progress is not None:
            progress("write", index + 1, T)

    report: dict = {}

    def extras(staging: Path) -> None:
        if cfg.qc and qc_tmp.exists():
            os.replace(qc_tmp, staging / QC_VIDEO)
        report.update(_report(video, info, cfg, N, det, plan, trk, T, n_test, coverage, timer, head_spec, head))
        from hravatar.io.safe import atomic_write_bytes

        atomic_write_bytes(staging / QC_JSON, (json.dumps(report, indent=1) + "\n").encode())

    t0 = time.perf_counter()
    try:
        write_dataset(out, meta, frames(), params, extras=extras, overwrite=overwrite, on_frame=on_frame)
    except DatasetError as e:
        raise PreprocessError(str(e)) from None
    total = time.perf_counter() - t0
    inner = sum(timer.steps.get(k, {}).get("seconds", 0.0) for k in ("decode_2", "crop", "matte", "qc"))
    w = timer.steps.setdefault("write", {"seconds": 0.0, "frames": 0, "cached": False})
    w["seconds"] = max(0.0, total - inner)
    w["frames"] = T
    report["timings"] = timer.report()
    from hravatar.io.safe import atomic_write_bytes

    atomic_write_bytes(out / QC_JSON, (json.dumps(report, indent=1) + "\n").encode())
    return report


def _report(video: Path, info: VideoInfo, cfg: PreprocessConfig, N: int, det: dict, plan: dict, trk: dict, T: int,
            n_test: int, coverage: np.ndarray, timer: _Timer, head_spec: str, head) -> dict:
    faces = det["num_faces"]
    several = int((faces > 1).sum())
    kept = plan["kept"]
    err_px, err_rel = np.asarray(trk["error_px"]), np.asarray(trk["error_rel"])
    interp = plan["interpolated"]
    gaps = [{"first": int(kept[a]), "last": int(kept[b - 1]), "count": b - a} for a, b in _runs(interp)]
    warnings = []
    if several:
        warnings.append(f"{several} frames show several faces (up to {int(faces.max())}); the largest face was used")
    if plan["dropped"]:
        warnings.append(f"{sum(d['count'] for d in plan['dropped'])} frames dropped (no usable face; see 'dropped')")
    if T < 100:
        warnings.append(f"short clip: {T} frames (an avatar needs a few hundred)")
    if float(err_rel.mean()) > 0.02:
        warnings.append(f"mean landmark error {100 * float(err_rel.mean()):.2f}% of the face size (> 2%): check QC.mp4")
    usable = ~interp
    return {
        "video": {"path": str(video), "width": info.width, "height": info.height, "codec": info.codec,
                  "fps_source": info.fps_source, "fps": info.fps, "duration_s": info.duration, "frames_decoded": N,
                  "detect_scale": float(det["scale"])},
        "dataset": {"frames": T, "train": T - n_test, "test": n_test, "res": cfg.res, "head": head.identity(), "head_spec": head_spec},
        "faces": {"max_seen": int(faces.max()), "frames_with_several": several, "frames_without": int((faces == 0).sum())},
        "dropped": plan["dropped"],
        "interpolated": gaps,
        "camera": {"fov_deg": float(trk["fov"]),
                   "fx_video_px": float(0.5 * min(info.width, info.height) / math.tan(math.radians(float(trk["fov"])) / 2)),
                   "rule": cfg.focal, "camera_distance_m": cfg.camera_distance if cfg.focal == "distance" else None,
                   "tried": [{"fov_deg": round(float(f), 3), "mean_error_rel": round(float(e), 6)} for f, e in trk["fov_tried"]]},
        "tracking": {
            "mean_error_px": float(err_px[usable].mean()), "max_error_px": float(err_px[usable].max()),
            "mean_error_rel": float(err_rel[usable].mean()), "max_error_rel": float(err_rel[usable].max()),
            "note": "errors over frames with detected landmarks; interpolated frames are listed per frame",
            "per_frame": [{"frame": j, "source_frame": int(kept[j]), "error_px": round(float(err_px[j]), 3),
                           "error_rel": round(float(err_rel[j]), 5), "interpolated": bool(interp[j]), "faces": int(faces[kept[j]])}
                          for j in range(T)],
        },
        "mask": {"mean_coverage": float(coverage.mean()), "min_coverage": float(coverage.min())},
        "warnings": warnings,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
