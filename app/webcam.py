"""Webcam / video reenactment: frame sources, the face driver, and the background session.

Plain classes, no GUI (the Webcam tab in ``app/ui/webcam_panel.py`` is a thin layer over them):

- :class:`VideoSource`: a camera (index, OpenCV) or a video file (OpenCV or imageio), read on a
  background thread with latest-frame semantics; clear one-line errors (no camera, busy camera,
  missing or unreadable file, end of file unless looping).
- :class:`FaceDriver`: image -> avatar :class:`FrameParams`, in two modes: "encoder" (the avatar's
  own expression encoder on the face crop, the method's way; head pose and gaze from the
  landmark fit) and "landmarks" (MediaPipe landmarks fitted to the head model's expression and
  pose space; works for anyone). One-Euro smoothing with a single strength, relative mode.
- :class:`ReenactmentSession`: source + driver on a worker thread; the UI polls the newest result
  (driving parameters, preview thumbnail with the face box, message).
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hravatar.avatar.gaussians import FrameParams

MODES = ("landmarks", "encoder")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _cv2():
    """OpenCV, or None when it is not installed (files then go through imageio)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


# ================================================================================= video sources
class VideoSourceError(RuntimeError):
    """A source cannot be opened or read (one-line message for the user)."""


@dataclass
class VideoFrame:
    """One frame: image [H, W, 3] uint8 RGB, running index, time in seconds (monotonic per source)."""

    image: np.ndarray
    index: int
    time: float


def describe_source(source: int | str | Path) -> str:
    return f"camera {source}" if isinstance(source, int) else Path(source).name


def camera_device_path(index: int) -> Path | None:
    """The V4L2 device node of a camera index on Linux (None elsewhere: no cheap existence check)."""
    return Path(f"/dev/video{index}") if sys.platform.startswith("linux") else None


def probe_cameras(max_index: int = 4) -> list[int]:
    """Camera indices that open (Linux: those with a /dev/videoN node; elsewhere tried with OpenCV).

    Slow on some systems (each failed open can take a moment), so call it on request only.
    """
    found = []
    cv2 = _cv2()
    for i in range(max_index):
        node = camera_device_path(i)
        if node is not None:
            if node.exists():
                found.append(i)
            continue
        if cv2 is None:
            break
        cap = cv2.VideoCapture(i)
        try:
            if cap.isOpened():
                found.append(i)
        finally:
            cap.release()
    return found


def _fit_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(2, int(round(w * s))), max(2, int(round(h * s)))


def resize_rgb(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize an [H, W, C] uint8 image (OpenCV area / bilinear; nearest-neighbour without OpenCV)."""
    H, W = img.shape[:2]
    if (W, H) == (w, h):
        return img
    cv2 = _cv2()
    if cv2 is not None:
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if w < W else cv2.INTER_LINEAR)
    ys = ((np.arange(h) + 0.5) * H / h).astype(np.int64).clip(0, H - 1)
    xs = ((np.arange(w) + 0.5) * W / w).astype(np.int64).clip(0, W - 1)
    return img[ys][:, xs]


class VideoSource:
    """Frames from a camera index or a video file, the same way.

    ``read()`` returns the next frame synchronously (used by the background thread, tests and
    self-tests); ``start()`` runs a reader thread that keeps only the newest frame (``latest()``),
    pacing files at their frame rate when ``realtime``. Frames larger than ``max_side`` are
    downscaled (tracking needs no more, and it keeps every later step cheap).

    Args:
        source: camera index (int) or video file path.
        loop: restart a file at its end (time keeps increasing); else the source ends.
        realtime: pace file frames at the file's frame rate in the reader thread.
        max_side: longest image side after downscaling (None: keep).
    """

    def __init__(self, source: int | str | Path, loop: bool = True, realtime: bool = True, max_side: int | None = 640):
        self.source = source if isinstance(source, int) else Path(source)
        self.loop = loop
        self.realtime = realtime
        self.max_side = max_side
        self.fps = 30.0
        self.size: tuple[int, int] | None = None  # (width, height) after downscaling
        self.frame_count: int | None = None
        self.error: str | None = None
        self.ended = False
        self._cap = None  # cv2.VideoCapture
        self._iter = None  # imageio frame iterator
        self._pending = None  # first frame read while opening (BGR from OpenCV)
        self._pending_rgb = None  # ... or RGB from imageio
        self._index = 0
        self._t0 = 0.0  # time offset of the current pass through a file (loops)
        self._pass_frames = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._latest: VideoFrame | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._clock0 = 0.0

    @property
    def is_camera(self) -> bool:
        return isinstance(self.source, int)

    @property
    def name(self) -> str:
        return describe_source(self.source)

    # ---------------------------------------------------------------- opening
    def open(self) -> None:
        """Open the camera or file (idempotent). Raises :class:`VideoSourceError` (one line)."""
        if self._cap is not None or self._iter is not None:
            return
        if self.is_camera:
            self._open_camera(self.source)
        else:
            self._open_file(self.source)
        self._clock0 = time.perf_counter()

    def _open_camera(self, index: int) -> None:
        if index < 0:
            raise VideoSourceError(f"camera index must be 0 or more, got {index}")
        node = camera_device_path(index)
        if node is not None and not node.exists():
            raise VideoSourceError(f"camera {index}: no such camera ({node} does not exist); choose a video file instead")
        cv2 = _cv2()
        if cv2 is None:
            raise VideoSourceError("camera capture needs OpenCV: pip install 'hravatar[track]'")
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            cap.release()
            raise VideoSourceError(f"camera {index} cannot be opened: it may be in use by another application, or access is denied")
        ok, frame = cap.read()
        if not ok or frame is None:
            cap.release()
            raise VideoSourceError(f"camera {index} gives no frames: it may be busy in another application")
        self._cap = cap
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 1 <= fps <= 240 else 30.0
        self._pending = frame  # the probe frame is the first one delivered
        self.size = _fit_size(frame.shape[1], frame.shape[0], self.max_side)

    def _open_file(self, path: Path) -> None:
        if not path.exists():
            raise VideoSourceError(f"video file not found: {path}")
        if path.is_dir():
            raise VideoSourceError(f"{path} is a folder, not a video file")
        cv2 = _cv2()
        errors = []
        if cv2 is not None:
            cap = cv2.VideoCapture(str(path))
            ok, frame = (cap.read() if cap.isOpened() else (False, None))
            if ok and frame is not None:
                self._cap = cap
                fps = cap.get(cv2.CAP_PROP_FPS)
                n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
                self.fps = float(fps) if fps and 1 <= fps <= 240 else 30.0
                self.frame_count = n if n > 0 else None
                self._pending = frame
                self.size = _fit_size(frame.shape[1], frame.shape[0], self.max_side)
                return
            cap.release()
            errors.append("OpenCV could not decode it")
        try:  # imageio-ffmpeg: always installed with hravatar
            import imageio.v3 as iio

            meta = iio.immeta(path)
            self.fps = float(meta.get("fps") or 30.0)
            it = iio.imiter(path)
            first = next(it)
        except StopIteration:
            raise VideoSourceError(f"cannot read video {path.name}: it has no frames") from None
        except Exception as e:  # noqa: BLE001  - any decoder failure is one line
            errors.append(_one_line(e))
            raise VideoSourceError(f"cannot read video {path.name}: not a video or an unsupported format ({errors[-1]})") from None
        self._iter = it
        self._pending_rgb = np.ascontiguousarray(first[..., :3])
        self.size = _fit_size(first.shape[1], first.shape[0], self.max_side)

    def _rewind(self) -> bool:
        """Back to the first frame of a file; False when that fails."""
        if self._cap is not None:
            cv2 = _cv2()
            if self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
                return True
            self._cap.release()
            self._cap = None
            try:
                self._open_file(self.source)
            except VideoSourceError:
                return False
            return True
        if self._iter is not None:
            import imageio.v3 as iio

            try:
                self._iter = iio.imiter(self.source)
            except Exception:  # noqa: BLE001
                return False
            return True
        return False

    # ---------------------------------------------------------------- reading
    def _raw_next(self) -> np.ndarray | None:
        """Next RGB frame at full size, or None at the end / on failure."""
        pend = self._pending
        if pend is not None:
            self._pending = None
            return pend[..., ::-1]  # BGR -> RGB
        pend = self._pending_rgb
        if pend is not None:
            self._pending_rgb = None
            return pend
        if self._cap is not None:
            ok, frame = self._cap.read()
            return frame[..., ::-1] if ok and frame is not None else None
        if self._iter is not None:
            try:
                return np.asarray(next(self._iter))[..., :3]
            except StopIteration:
                return None
            except Exception:  # noqa: BLE001  - a truncated file ends where it breaks
                return None
        return None

    def read(self) -> VideoFrame | None:
        """The next frame (opens the source if needed), or None when the source has ended.

        Raises:
            VideoSourceError: the source cannot be opened, or a camera stopped delivering.
        """
        self.open()
        if self.ended:
            return None
        img = self._raw_next()
        if img is None and not self.is_camera and self.loop and self._pass_frames > 0:
            if self._rewind():
                self._t0 += self._pass_frames / self.fps
                self._pass_frames = 0
                img = self._raw_next()
        if img is None:
            if self.is_camera:
                self.error = f"camera {self.source} stopped delivering frames (unplugged or taken by another application)"
                raise VideoSourceError(self.error)
            self.ended = True
            self.error = f"end of video {self.name}" + ("" if self._pass_frames else " (no frames could be decoded)")
            return None
        w, h = self.size or (img.shape[1], img.shape[0])
        img = np.ascontiguousarray(resize_rgb(np.ascontiguousarray(img), w, h))
        if self.is_camera:
            t = time.perf_counter() - self._clock0
        else:
            t = self._t0 + self._pass_frames / self.fps
        frame = VideoFrame(img, self._index, t)
        self._index += 1
        self._pass_frames += 1
        return frame

    # ---------------------------------------------------------------- background reader
    def start(self) -> None:
        """Open and start the reader thread (raises :class:`VideoSourceError` when opening fails)."""
        self.open()
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"video-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        t_first = None
        while not self._stop.is_set():
            try:
                f = self.read()
            except VideoSourceError as e:
                self.error = str(e)
                f = None
            if f is None:
                with self._cond:
                    self._cond.notify_all()
                return
            if self.realtime and not self.is_camera:
                t_first = f.time if t_first is None else t_first
                due = start + (f.time - t_first)
                wait = due - time.perf_counter()
                if wait > 0 and self._stop.wait(wait):
                    return
            with self._cond:
                self._latest = f
                self._cond.notify_all()

    def latest(self, after: int = -1, timeout: float = 0.0) -> VideoFrame | None:
        """The newest frame with ``index > after`` (waiting up to ``timeout`` s), else None."""
        with self._cond:
            if timeout > 0 and (self._latest is None or self._latest.index <= after) and self.running:
                self._cond.wait(timeout)
            f = self._latest
        return f if f is not None and f.index > after else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the reader and release the device / file (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._thread = None
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._iter = None

    close = stop


# ================================================================================= driving
def _matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] rotations -> [..., 3] axis-angle (via unit quaternions)."""
    from hravatar.utils.rotation import matrix_to_quat

    q = matrix_to_quat(R)
    w, v = q[..., :1], q[..., 1:]
    n = v.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(n, w)
    return torch.where(n > 1e-8, v / n.clamp(min=1e-12) * angle, 2 * v)


def relative_frame(current: FrameParams, captured: FrameParams, neutral: FrameParams, max_transl: float = 0.05) -> FrameParams:
    """Relative driving: the avatar's neutral plus the driver's change since its captured neutral.

    Expressions, eyelids and the jaw/eye joints add their differences; the head (root and neck)
    rotation composes ``R_current @ R_captured^T @ R_avatar_neutral``: the avatar turns by the
    driver's rotation since its captured pose, about the same (camera-aligned) axes; translation adds the difference clamped
    to +-``max_transl`` metres (keeps the head in view).

    Args:
        current, captured, neutral: FrameParams with B = 1 in the avatar's expression space.
    """
    from hravatar.head.lbs import axis_angle_to_matrix

    expr = neutral.expr + (current.expr - captured.expr)
    eyelids = neutral.eyelids + (current.eyelids - captured.eyelids)
    pose = neutral.pose + (current.pose - captured.pose)
    for k in (0, 1):  # root, neck: compose rotations
        Rc, Rn, Ra = (axis_angle_to_matrix(p.pose[:, k]) for p in (current, captured, neutral))
        pose[:, k] = _matrix_to_axis_angle(Rc @ Rn.transpose(-1, -2) @ Ra)
    transl = neutral.transl + (current.transl - captured.transl).clamp(-max_transl, max_transl)
    return FrameParams(expr, pose, eyelids, transl)


def smoothing_to_cutoff(strength: float) -> float | None:
    """One-Euro ``min_cutoff`` (Hz) for a smoothing strength in [0, 1]; None = no smoothing.

    Log-spaced: 0.1 -> ~6 Hz (light), 0.5 -> 1 Hz, 1 -> 0.1 Hz (very smooth, slow).
    """
    s = float(min(max(strength, 0.0), 1.0))
    if s <= 1e-3:
        return None
    return 10.0 ** (1.0 - 2.0 * s)


def _flatten(f: FrameParams) -> torch.Tensor:
    return torch.cat([f.expr.reshape(-1), f.pose.reshape(-1), f.eyelids.reshape(-1), f.transl.reshape(-1)])


def _unflatten(v: torch.Tensor, n_expr: int) -> FrameParams:
    e, p = n_expr, n_expr + 15
    return FrameParams(v[:e][None].clone(), v[e:p].reshape(1, 5, 3).clone(), v[p:p + 2][None].clone(), v[p + 2:p + 5][None].clone())


@dataclass
class DriveResult:
    """Output of :meth:`FaceDriver.process` for one image.

    frame: avatar driving parameters (B = 1) or None (no face / not ready).
    raw: the driver's smoothed parameters before relative mapping (None without a face).
    landmarks: [478, 3] detected landmarks (pixels) or None; box: smoothed crop box (cx, cy, size).
    num_faces: faces in view; message: "" or a one-line note ("no face in view", ...).
    timings: milliseconds per step ("detect", "fit", "encoder", "total").
    """

    frame: FrameParams | None
    raw: FrameParams | None = None
    landmarks: np.ndarray | None = None
    box: np.ndarray | None = None
    num_faces: int = 0
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def has_encoder(bundle) -> bool:
    """Whether the checkpoint stores the avatar's expression encoder (``encoder.*`` tensors)."""
    return any(k.startswith("encoder.") for k in (bundle.extra or {}))


def load_avatar_encoder(bundle, device="cpu"):
    """The avatar's expression encoder restored from ``bundle.extra`` (eval mode), and its crop size.

    Raises:
        ValueError: the checkpoint has no encoder.
        hravatar.io.safe.CheckpointError: the stored weights do not match (one line).
    """
    if not has_encoder(bundle):
        raise ValueError("this avatar has no expression encoder (trained without one): use landmarks mode")
    from hravatar.encoder import EncoderConfig, ExpressionEncoder, load_encoder_state

    res = int((bundle.meta.get("train_config") or {}).get("encoder_res", 224))
    enc = ExpressionEncoder(EncoderConfig(n_expr=bundle.avatar.num_expr, input_size=res))
    load_encoder_state(enc, bundle.extra, prefix="encoder.", source="checkpoint")
    return enc.to(device).eval(), res


def head_for_avatar(bundle):
    """(head model, expression index map) for landmark driving of this avatar.

    The built-in head when the avatar was made on it (index map None: same expression space);
    otherwise the built-in head with its expressions mapped to the avatar's by name (ARKit names
    shared, e.g. ICT-FaceKit avatars). Raises ValueError (one line) when nothing maps.
    """
    from hravatar.head import load_head_model

    head = load_head_model("builtin")
    ident = bundle.avatar.head_identity or ""
    names = list(bundle.avatar.expr_names)
    if ident == head.identity() or (ident.split(":")[0] == head.identity().split(":")[0] and names == head.expr_names[: len(names)]):
        return head, None
    pairs = [(head.expr_names.index(n), i) for i, n in enumerate(names) if n in head.expr_names]
    if len(pairs) < 10:
        raise ValueError(f"landmark driving needs the avatar's head model ('{ident.split(':')[0] or 'unknown'}') or "
                         f"ARKit expression names; use encoder mode")
    return head, pairs


class FaceDriver:
    """Images -> the avatar's driving parameters.

    Not thread-safe by itself: :class:`ReenactmentSession` calls it from one worker thread and
    forwards settings through its lock.

    Args:
        bundle: the avatar (``hravatar.io.checkpoint.AvatarBundle``).
        mode: "landmarks" or "encoder".
        device: torch device for the encoder and the fit.
        landmarker: a ``FaceLandmarker``-like object (``detect(image, timestamp_ms)``), or None to
            create MediaPipe's on first use (``model_path`` = optional face_landmarker.task).
        smoothing: One-Euro strength in [0, 1] (see :func:`smoothing_to_cutoff`).
        relative: start in relative mode (needs :meth:`capture_neutral`).
        fov_deg: assumed camera field of view across the shorter image side.
        fit_iters: Levenberg-Marquardt iterations per frame after the first (warm start).
        segmenter: a ``PersonSegmenter``-like object (``matte(image)``) for encoder mode, or None to
            create MediaPipe's on first use; ``matte=False`` feeds the raw frame to the encoder.
    """

    def __init__(self, bundle, mode: str = "landmarks", device="cpu", landmarker=None, model_path: str | Path | None = None,
                 smoothing: float = 0.4, relative: bool = False, fov_deg: float = 40.0, fit_iters: int = 2,
                 segmenter=None, matte: bool = True):
        self.bundle = bundle
        self.device = torch.device(device)
        self.n_expr = bundle.avatar.num_expr
        self._landmarker = landmarker
        self._model_path = model_path
        self.fov_deg = fov_deg
        self.fit_iters = fit_iters
        self._fitter = None
        self._expr_map = None
        self._encoder = None
        self._enc_res = 224
        self._segmenter = segmenter
        self.matte = matte
        self._cameras: dict[tuple[int, int], object] = {}
        self.neutral = bundle.avatar.neutral_frame().to("cpu")
        self.captured: FrameParams | None = None
        self.relative = relative
        self._smoothing = 0.0
        self._filter = None
        self._box_filter = None
        self._warm = None  # previous fit (head space) for the warm start
        self._last_t: float | None = None
        self._last_raw: FrameParams | None = None
        self.mode = "landmarks"
        self.set_smoothing(smoothing)
        self.set_mode(mode)

    # ---------------------------------------------------------------- settings
    def available_modes(self) -> list[str]:
        return ["landmarks", "encoder"] if has_encoder(self.bundle) else ["landmarks"]

    def set_mode(self, mode: str) -> str:
        """Switch mode; returns a one-line note ("" when fine). Unavailable modes keep the current one."""
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (choose {' or '.join(MODES)})")
        if mode == "encoder" and not has_encoder(self.bundle):
            return "this avatar has no expression encoder (trained without one): using landmarks mode"
        if mode != self.mode:
            self.mode = mode
            self._reset_tracking()
            self.captured = None  # the two modes' raw parameters differ
        return ""

    def set_smoothing(self, strength: float) -> None:
        from hravatar.track.filters import OneEuroFilter

        self._smoothing = float(strength)
        cutoff = smoothing_to_cutoff(strength)
        if cutoff is None:
            self._filter = None
        elif self._filter is None:
            self._filter = OneEuroFilter(min_cutoff=cutoff, beta=0.5, d_cutoff=1.0)
        else:  # keep the state: changing the slider must not jump
            self._filter.min_cutoff = cutoff

    @property
    def smoothing(self) -> float:
        return self._smoothing

    def set_relative(self, on: bool) -> str:
        self.relative = bool(on)
        return ""

    def capture_neutral(self) -> str:
        """Take the driver's current (smoothed) parameters as its neutral face; returns a note."""
        if self._last_raw is None:
            return "no face to capture yet"
        self.captured = FrameParams(*(x.clone() for x in (self._last_raw.expr, self._last_raw.pose, self._last_raw.eyelids,
                                                          self._last_raw.transl)))
        return "neutral face captured"

    def _reset_tracking(self) -> None:
        self._warm = None
        if self._filter is not None:
            self._filter.reset()
        if self._box_filter is not None:
            self._box_filter.reset()

    # ---------------------------------------------------------------- lazy components
    def _get_landmarker(self):
        if self._landmarker is None:
            from hravatar.track.landmarks import FaceLandmarker

            self._landmarker = FaceLandmarker(self._model_path, video=True)
        return self._landmarker

    def _get_segmenter(self):
        if self._segmenter is None:
            from hravatar.track.landmarks import PersonSegmenter

            self._segmenter = PersonSegmenter()
        return self._segmenter

    def _get_fitter(self):
        if self._fitter is None:
            from hravatar.track.fit import LandmarkFitter

            head, self._expr_map = head_for_avatar(self.bundle)
            # same expression space: fit only the modes the avatar has
            self._fitter = LandmarkFitter(head.to(self.device), num_expr=self.n_expr if self._expr_map is None else None)
        return self._fitter

    def prepare(self) -> None:
        """Create the landmarker and the fitter now (slow: MediaPipe graph, head model), so that a
        missing dependency is reported before the first frame. Raises with a one-line message."""
        self._get_landmarker()
        self._get_fitter()

    def _camera(self, w: int, h: int):
        from hravatar.track.fit import estimate_camera

        if (w, h) not in self._cameras:
            self._cameras[(w, h)] = estimate_camera(w, h, self.fov_deg, device=self.device)
        return self._cameras[(w, h)]

    def _to_avatar(self, f: FrameParams) -> FrameParams:
        """Head-model parameters (fit) -> the avatar's expression space (B = 1, CPU)."""
        f = f.to("cpu")
        expr = torch.zeros(1, self.n_expr)
        if self._expr_map is None:
            n = min(self.n_expr, f.expr.shape[1])
            expr[:, :n] = f.expr[:, :n]
        else:
            for src, dst in self._expr_map:
                if src < f.expr.shape[1]:
                    expr[:, dst] = f.expr[:, src]
        return FrameParams(expr, f.pose.clone(), f.eyelids.clone(), f.transl.clone())

    # ---------------------------------------------------------------- per frame
    @torch.no_grad()
    def process(self, image: np.ndarray, t: float) -> DriveResult:
        """Drive from one RGB uint8 image taken at time ``t`` (seconds, increasing)."""
        from hravatar.encoder.crop import crop_box_from_landmarks
        from hravatar.track.filters import OneEuroFilter

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        H, W = image.shape[:2]
        det = self._get_landmarker().detect(image, int(round(t * 1000)))
        timings["detect"] = (time.perf_counter() - t0) * 1e3
        if self._last_t is not None and t - self._last_t > 0.5:
            self._reset_tracking()  # face lost for a while: do not smooth across the gap
        if det is None:
            self._warm = None
            timings["total"] = timings["detect"]
            return DriveResult(None, message="no face in view", timings=timings)
        self._last_t = t
        lmk2d = torch.from_numpy(det.landmarks[:, :2].copy())
        box = crop_box_from_landmarks(lmk2d[None], scale=1.4)[0]
        if self._box_filter is None:
            self._box_filter = OneEuroFilter(min_cutoff=1.0, beta=0.02, d_cutoff=1.0)
        box = self._box_filter(box, t)
        t1 = time.perf_counter()
        fitter = self._get_fitter()
        res = fitter.fit(lmk2d[None].to(self.device), self._camera(W, H), init=self._warm,
                         iters=None if self._warm is None else self.fit_iters)
        self._warm = res.frame
        raw = self._to_avatar(res.frame)  # its translation is in webcam space: only differences are used
        timings["fit"] = (time.perf_counter() - t1) * 1e3
        if self.mode == "encoder":
            t2 = time.perf_counter()
            if self._encoder is None:
                self._encoder, self._enc_res = load_avatar_encoder(self.bundle, self.device)
            from hravatar.encoder.crop import crop_and_resize

            # the encoder was trained on matted frames (black background, as the method): matte likewise
            matted = self._get_segmenter().matte(image) if self.matte else image
            img = torch.from_numpy(matted).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            crop = crop_and_resize(img, box[None].to(self.device), out=self._enc_res)
            enc = self._encoder(crop)
            raw = raw.with_expression(enc["expr"].cpu().reshape(1, -1)[:, : self.n_expr], enc["eyelids"].cpu().reshape(1, 2),
                                      enc["jaw"].cpu().reshape(1, 3))
            timings["encoder"] = (time.perf_counter() - t2) * 1e3
        if self._filter is not None:
            raw = _unflatten(self._filter(_flatten(raw), t), self.n_expr)
        self._last_raw = raw
        auto = self.relative and self.captured is None
        if auto:  # relative mode switched on before a neutral was captured: take this frame
            self.capture_neutral()
        if self.relative and self.captured is not None:
            out = relative_frame(raw, self.captured, self.neutral)
        else:
            # absolute: the webcam-space translation means nothing for the avatar's camera
            out = FrameParams(raw.expr.clone(), raw.pose.clone(), raw.eyelids.clone(), self.neutral.transl.clone())
        msg = f"{det.num_faces} faces in view: following the largest" if det.num_faces > 1 else ""
        if auto:
            msg = msg or "relative mode: neutral taken from this frame (look neutral and press 'capture neutral' to redo)"
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return DriveResult(out, raw, det.landmarks, box.numpy().astype(np.float32), det.num_faces, msg, timings)

    def close(self) -> None:
        for name in ("_landmarker", "_segmenter"):
            obj = getattr(self, name)
            setattr(self, name, None)
            if obj is not None and hasattr(obj, "close"):
                obj.close()


# ================================================================================= preview
def draw_preview(image: np.ndarray, result: DriveResult | None, width: int, height: int) -> np.ndarray:
    """[height, width, 3] uint8 thumbnail: the image letterboxed, the face box and sparse landmarks drawn."""
    H, W = image.shape[:2]
    s = min(width / W, height / H)
    w, h = max(1, int(W * s)), max(1, int(H * s))
    thumb = resize_rgb(image, w, h).copy()
    canvas = np.zeros((height, width, 3), np.uint8)
    ox, oy = (width - w) // 2, (height - h) // 2
    canvas[oy:oy + h, ox:ox + w] = thumb
    if result is not None and result.landmarks is not None:
        pts = result.landmarks[::3, :2] * s + (ox, oy)
        dot = 2 if min(width, height) >= 240 else 1  # 2x2 dots stay visible in a large thumbnail
        for dx in range(dot):
            for dy in range(dot):
                xs, ys = pts[:, 0].astype(int) + dx, pts[:, 1].astype(int) + dy
                ok = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
                canvas[ys[ok], xs[ok]] = (90, 200, 255)
    if result is not None and result.box is not None:
        cx, cy, size = (float(v) for v in result.box)
        x0, x1 = int((cx - size / 2) * s + ox), int((cx + size / 2) * s + ox)
        y0, y1 = int((cy - size / 2) * s + oy), int((cy + size / 2) * s + oy)
        colour = (255, 210, 60) if not result.message else (255, 140, 60)
        _rect(canvas, x0, y0, x1, y1, colour, 2)
    return canvas


def _rect(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, colour, t: int) -> None:
    H, W = img.shape[:2]
    cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, W), max(y0, 0), min(y1, H)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    for y in (y0, y1 - t):
        if 0 <= y < H or 0 <= y + t <= H:
            img[max(y, 0):min(y + t, H), cx0:cx1] = colour
    for x in (x0, x1 - t):
        if 0 <= x < W or 0 <= x + t <= W:
            img[cy0:cy1, max(x, 0):min(x + t, W)] = colour


# ================================================================================= session
@dataclass
class SessionUpdate:
    """What the UI shows after a poll: newest driving frame (or None), preview, message, timings."""

    frame: FrameParams | None
    preview: np.ndarray | None
    message: str
    timings: dict[str, float]
    index: int


class ReenactmentSession:
    """A source and a :class:`FaceDriver` on a worker thread; the UI polls :meth:`poll`.

    Settings (mode, smoothing, relative, capture) may be changed from any thread; they are
    applied by the worker between frames.

    Args:
        bundle: the avatar.
        source: camera index or video file path.
        driver_factory: ``bundle -> FaceDriver`` (tests pass a driver with a fake landmarker).
        preview_size: (width, height) of the thumbnail.
    """

    def __init__(self, bundle, source: int | str | Path, mode: str = "landmarks", smoothing: float = 0.4, relative: bool = False,
                 loop: bool = True, device="cpu", preview_size: tuple[int, int] = (256, 192),
                 driver_factory: Callable | None = None, realtime: bool = True):
        self.bundle = bundle
        self.source = VideoSource(source, loop=loop, realtime=realtime)
        self.preview_size = preview_size
        self._factory = driver_factory or (lambda b: FaceDriver(b, device=device))
        self._settings = {"mode": mode, "smoothing": smoothing, "relative": relative}
        self._capture = False
        self._lock = threading.Lock()
        self._latest: SessionUpdate | None = None
        self._consumed = -1
        self._message = f"starting {self.source.name} ..."
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.driver: FaceDriver | None = None
        self.frames_processed = 0
        self.ms: dict[str, float] = {}

    # ---------------------------------------------------------------- control (any thread)
    def start(self) -> None:
        """Open the source now (errors raise :class:`VideoSourceError`) and start the worker."""
        self.source.open()
        self._thread = threading.Thread(target=self._run, name="reenactment", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None
        self.source.stop()
        if self.driver is not None:
            self.driver.close()
            self.driver = None

    close = stop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def configure(self, **settings) -> None:
        """mode=..., smoothing=..., relative=... (applied before the next frame)."""
        with self._lock:
            self._settings.update(settings)

    def capture_neutral(self) -> None:
        with self._lock:
            self._capture = True

    def poll(self) -> SessionUpdate | None:
        """The newest result not yet returned (None when nothing new)."""
        with self._lock:
            u = self._latest
            if u is None or u.index <= self._consumed:
                return None
            self._consumed = u.index
            return u

    @property
    def message(self) -> str:
        with self._lock:
            return self._message

    # ---------------------------------------------------------------- worker
    def _apply_settings(self, driver: FaceDriver) -> list[str]:
        with self._lock:
            s, cap = dict(self._settings), self._capture
            self._capture = False
        notes = []
        if s["mode"] != driver.mode:
            notes.append(driver.set_mode(s["mode"]))
        if abs(s["smoothing"] - driver.smoothing) > 1e-6:
            driver.set_smoothing(s["smoothing"])
        if bool(s["relative"]) != driver.relative:
            notes.append(driver.set_relative(s["relative"]))
        if cap:
            notes.append(driver.capture_neutral())
        return [n for n in notes if n]

    def _publish(self, update: SessionUpdate) -> None:
        with self._lock:
            self._latest = update
            self._message = update.message

    def _run(self) -> None:
        try:
            self.driver = self._factory(self.bundle)
            self.driver.prepare()
            self.source.start()
        except Exception as e:  # noqa: BLE001  - MediaPipe missing, source error: one line, the app goes on
            self._publish(SessionUpdate(None, None, _one_line(e), {}, 0))
            return
        last = -1
        note, note_until = "", 0.0
        while not self._stop.is_set():
            f = self.source.latest(after=last, timeout=0.2)
            if f is None:
                if not self.source.running:
                    self._publish(SessionUpdate(None, None, self.source.error or "video source stopped", {}, last + 1))
                    return
                continue
            last = f.index
            notes = self._apply_settings(self.driver)
            if notes:
                note, note_until = notes[-1], time.perf_counter() + 3.0
            try:
                r = self.driver.process(f.image, f.time)
            except Exception as e:  # noqa: BLE001  - a failing frame is reported, the loop goes on
                r = DriveResult(None, message=f"tracking failed: {_one_line(e)}")
            self.frames_processed += 1
            for k, v in r.timings.items():  # running averages for the status text
                self.ms[k] = v if k not in self.ms else 0.9 * self.ms[k] + 0.1 * v
            msg = r.message or (note if time.perf_counter() < note_until else "")
            preview = draw_preview(f.image, r, *self.preview_size)
            self._publish(SessionUpdate(r.frame, preview, msg, r.timings, f.index))


# ================================================================================= controller
@dataclass
class PanelState:
    """What the Webcam tab shows after a UI frame (see :meth:`WebcamController.poll`)."""

    preview: np.ndarray | None
    message: str
    level: str
    stats: str
    running: bool


class WebcamController:
    """State and actions of the Webcam tab, GUI-free (the panel's callbacks call these methods).

    Args:
        ctx: the app context (``bundle``, ``set_frame``, ``notify``, ``device``).
        session_factory: ``(bundle, source, **settings) -> ReenactmentSession`` (tests inject fakes).
        preview_size: (width, height) of the preview thumbnail.
    """

    def __init__(self, ctx, session_factory: Callable | None = None, preview_size: tuple[int, int] = (256, 192)):
        self.ctx = ctx
        self.preview_size = preview_size
        self.source: int | str = 0
        self.cameras: list[int] | None = None  # probed indices (None: not probed yet)
        self.mode = "landmarks"
        self.smoothing = 0.4
        self.relative = False
        self.loop = True
        self.session: ReenactmentSession | None = None
        self._factory = session_factory or self._default_session
        self._bundle = None
        self.message, self.level = "Choose a camera or a video file, then Start.", "info"
        self.driven = 0  # frames sent to the avatar by this controller
        self._fps_t: list[float] = []

    def _default_session(self, bundle, source, **kw) -> ReenactmentSession:
        return ReenactmentSession(bundle, source, device=str(self.ctx.device), preview_size=self.preview_size, **kw)

    # ---------------------------------------------------------------- source choice
    def probe(self, max_index: int = 4) -> list[int]:
        self.cameras = probe_cameras(max_index)
        self._say(f"cameras found: {', '.join(map(str, self.cameras))}" if self.cameras else "no camera found; choose a video file",
                  "info" if self.cameras else "warning")
        return self.cameras

    def select_camera(self, index: int) -> None:
        self.source = int(index)

    def select_file(self, path: str | Path) -> None:
        self.source = str(path)
        self._say(f"video file: {Path(path).name}")

    @property
    def source_label(self) -> str:
        return describe_source(self.source)

    # ---------------------------------------------------------------- start / stop
    @property
    def running(self) -> bool:
        """A session is on (until :meth:`poll` has reported its end)."""
        return self.session is not None

    def start(self) -> bool:
        """Start driving from the selected source; False (with a message) when it cannot open."""
        self.stop(quiet=True)
        bundle = self.ctx.bundle
        if self.mode == "encoder" and not has_encoder(bundle):
            self.mode = "landmarks"
            self._say("this avatar has no expression encoder: using landmarks mode", "warning")
        sess = self._factory(bundle, self.source, mode=self.mode, smoothing=self.smoothing, relative=self.relative, loop=self.loop)
        try:
            sess.start()
        except VideoSourceError as e:
            sess.stop()
            self._say(str(e), "error")
            return False
        self.session, self._bundle = sess, bundle
        self.driven = 0
        self._say(f"driving from {self.source_label} ({self.mode} mode) ...")
        return True

    def stop(self, quiet: bool = False) -> None:
        if self.session is not None:
            self.session.stop()
            self.session = None
            if not quiet:
                self._say("stopped")

    close = stop

    # ---------------------------------------------------------------- settings (live)
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}'")
        if mode == "encoder" and not has_encoder(self.ctx.bundle):
            self._say("this avatar has no expression encoder (trained without one): landmarks mode stays", "warning")
            return
        self.mode = mode
        if self.session is not None:
            self.session.configure(mode=mode)

    def set_smoothing(self, strength: float) -> None:
        self.smoothing = float(min(max(strength, 0.0), 1.0))
        if self.session is not None:
            self.session.configure(smoothing=self.smoothing)

    def set_relative(self, on: bool) -> None:
        self.relative = bool(on)
        if self.session is not None:
            self.session.configure(relative=self.relative)

    def capture_neutral(self) -> None:
        if self.session is None:
            self._say("start the webcam first, then capture your neutral face", "warning")
            return
        self.session.capture_neutral()
        if not self.relative:
            self.set_relative(True)

    def set_loop(self, on: bool) -> None:
        self.loop = bool(on)
        if self.session is not None:
            self.session.source.loop = self.loop

    # ---------------------------------------------------------------- per UI frame
    def _say(self, text: str, level: str = "info") -> None:
        self.message, self.level = text, level

    def poll(self) -> PanelState:
        """UI thread, once per frame: apply the newest driving frame to the avatar; what to show."""
        preview = None
        if self.session is not None and self.ctx.bundle is not self._bundle:
            # another avatar was opened: its expression space may differ, restart on it
            self.start()
        if self.session is not None:
            u = self.session.poll()
            if u is not None:
                preview = u.preview
                if u.frame is not None:
                    self.ctx.set_frame(u.frame, source="webcam")
                    self.driven += 1
                    now = time.perf_counter()
                    self._fps_t = [t for t in self._fps_t if now - t < 2.0] + [now]
                self._say(u.message or f"driving from {self.source_label} ({self.mode} mode)",
                          "warning" if u.message and u.frame is None else "info")
            if not self.session.running and self.session.poll() is None:
                msg = self.session.message or "stopped"
                ended = msg.startswith("end of video")
                self._say(msg, "info" if ended else "error")
                if not ended:
                    self.ctx.notify(f"webcam: {msg}", "error")
                self.session.stop()
                self.session = None
        return PanelState(preview, self.message, self.level, self.stats(), self.running)

    def stats(self) -> str:
        if self.session is None or not self.session.ms:
            return ""
        ms = self.session.ms
        parts = [f"{k} {ms[k]:.0f} ms" for k in ("detect", "fit", "encoder") if k in ms]
        fps = (len(self._fps_t) - 1) / max(self._fps_t[-1] - self._fps_t[0], 1e-6) if len(self._fps_t) > 1 else 0.0
        return " | ".join(parts + [f"{fps:.1f} fps"])

    def run_blocking(self, min_frames: int = 3, timeout_s: float = 30.0, sleep_s: float = 0.02) -> int:
        """Poll until ``min_frames`` frames drove the avatar, the session ended, or the timeout (self-tests)."""
        t_end = time.perf_counter() + timeout_s
        while self.session is not None and self.driven < min_frames and time.perf_counter() < t_end:
            self.poll()
            time.sleep(sleep_s)
        return self.driven


# ================================================================================= test videos
def write_video(path: str | Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """Write RGB uint8 frames as an H.264 MP4 (imageio-ffmpeg); sizes are padded to even numbers."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=2,
                            ffmpeg_log_level="error", output_params=["-pix_fmt", "yuv420p"]) as w:
        for f in frames:
            h, wd = f.shape[:2]
            if h % 2 or wd % 2:
                f = np.pad(f, ((0, h % 2), (0, wd % 2), (0, 0)), mode="edge")
            w.append_data(np.ascontiguousarray(f))
    return path


__all__ = [
    "MODES", "VIDEO_EXTENSIONS", "DriveResult", "FaceDriver", "PanelState", "ReenactmentSession", "SessionUpdate", "VideoFrame",
    "VideoSource", "VideoSourceError", "camera_device_path", "describe_source", "draw_preview", "has_encoder",
    "WebcamController", "head_for_avatar", "load_avatar_encoder", "probe_cameras", "relative_frame", "resize_rgb",
    "smoothing_to_cutoff", "write_video",
]
