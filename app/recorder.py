"""Saving the viewport: PNG snapshots and real-time MP4 recording (imageio-ffmpeg, encoded off the UI thread)."""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an [H, W, 3|4] uint8 image as PNG (parent folders are created). Returns the path."""
    import imageio.v3 as iio

    p = Path(path).expanduser()
    if p.suffix.lower() != ".png":
        p = p.with_suffix(".png")
    p.parent.mkdir(parents=True, exist_ok=True)
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"save_png expects [H, W, 3|4] uint8, got {img.dtype} {img.shape}")
    iio.imwrite(p, img)
    return p


def fit_frame(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of [h, w, 3] uint8 to [height, width, 3] (a viewport resized mid-recording)."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    ys = (np.arange(height) * h // height).clip(0, h - 1)
    xs = (np.arange(width) * w // width).clip(0, w - 1)
    return img[ys[:, None], xs[None, :]]


class VideoRecorder:
    """Records the viewport to an MP4 at a fixed frame rate, in real time.

    Call :meth:`offer` every UI frame with the image on screen; it appends as many copies as the
    wall-clock time since :meth:`start` requires (a slow render is held, as on screen). Frames are
    cropped to even sizes (H.264 / yuv420p) and keep the first frame's size. Encoding happens on a
    writer thread; :meth:`stop` returns at once and the state is "finishing" until the file is closed.

    States: "idle" | "recording" | "finishing" | "error".
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.state = "idle"
        self.path: Path | None = None
        self.fps = 30.0
        self.max_frames: int | None = None
        self.frames = 0
        self.dropped = 0
        self.error = ""
        self._t0 = 0.0
        self._size: tuple[int, int] | None = None
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._messages: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ control
    def start(self, path: str | Path, fps: float = 30.0, max_seconds: float | None = None) -> Path:
        """Begin recording to ``path`` (``.mp4`` added when missing)."""
        if self.state in ("recording", "finishing"):
            raise RuntimeError("a recording is already running")
        p = Path(path).expanduser()
        if p.suffix.lower() != ".mp4":
            p = p.with_suffix(".mp4")
        if not p.parent.exists():
            raise ValueError(f"{p.parent}: folder does not exist")
        self.path, self.fps = p, float(fps)
        self.max_frames = int(round(max_seconds * fps)) if max_seconds else None
        self.frames, self.dropped, self.error, self._size = 0, 0, "", None
        self._t0 = self.clock()
        self._q = queue.Queue(maxsize=256)
        self._thread = threading.Thread(target=self._write, args=(p, self.fps, self._q), name="mp4-writer", daemon=True)
        self._thread.start()
        self.state = "recording"
        return p

    def stop(self) -> None:
        """Finish the recording (the file is complete once the state leaves "finishing")."""
        if self.state == "recording" and self._q is not None:
            self.state = "finishing"
            self._q.put(None)

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until the writer closed the file."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state in ("idle", "error")

    @property
    def progress(self) -> float | None:
        """Fraction of ``max_seconds`` recorded, or None without a limit."""
        if self.max_frames:
            return min(1.0, self.frames / self.max_frames)
        return None

    @property
    def seconds(self) -> float:
        return self.frames / self.fps if self.fps else 0.0

    def offer(self, image: np.ndarray | None) -> int:
        """Feed the image on screen ([H, W, 3] uint8); returns the frames appended now."""
        if self.state != "recording" or image is None:
            return 0
        due = int((self.clock() - self._t0) * self.fps) + 1
        if self.max_frames:
            due = min(due, self.max_frames)
        n = due - self.frames
        if n <= 0:
            return 0
        img = np.asarray(image)[..., :3]
        if self._size is None:
            h, w = img.shape[:2]
            self._size = (max(2, w - w % 2), max(2, h - h % 2))
        img = np.ascontiguousarray(fit_frame(img, self._size[0], self._size[1]))
        for _ in range(n):
            try:
                self._q.put_nowait(img)
            except queue.Full:  # the encoder fell behind: drop rather than stall the UI
                self.dropped += 1
        self.frames += n
        if self.max_frames and self.frames >= self.max_frames:
            self.stop()
        return n

    def poll(self) -> list[tuple[str, str]]:
        """(level, message) pairs produced since the last call (finished / failed)."""
        with self._lock:
            m, self._messages = self._messages, []
        return m

    # ------------------------------------------------------------------ writer thread
    def _write(self, path: Path, fps: float, q: queue.Queue) -> None:
        writer = None
        count = 0
        try:
            import imageio.v2 as imageio

            while True:
                img = q.get()
                if img is None:
                    break
                if writer is None:
                    writer = imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                                pixelformat="yuv420p", ffmpeg_log_level="error")
                writer.append_data(img)
                count += 1
            if writer is not None:
                writer.close()
                writer = None
            with self._lock:
                if count:
                    self._messages.append(("info", f"Saved {path} ({count} frames, {count / fps:.1f} s)"))
                else:
                    self._messages.append(("warning", "Recording stopped before any frame was captured"))
            self.state = "idle"
        except Exception as e:  # noqa: BLE001  - one line, the app keeps running
            self.error = (str(e).splitlines() or [type(e).__name__])[0]
            with self._lock:
                self._messages.append(("error", f"Recording failed: {self.error}"))
            self.state = "error"
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001
                    pass
            # drain so offer() never blocks on a full queue
            while not q.empty():
                q.get_nowait()
