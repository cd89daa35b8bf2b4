"""The object every panel receives: the app's state and services behind a small, thread-safe API.

Panels (``app/ui/*_panel.py``) code against :class:`AppContext` only:

    ctx.bundle                      # the AvatarBundle shown
    ctx.current_frame() / ctx.set_frame(frame, source)
    ctx.open_checkpoint(path)       # None = demo avatar; loads in the background, errors -> notify
    ctx.notify(message, level)      # one line in the status bar
    ctx.add_frame_callback(fn)      # fn(dt) once per UI frame, on the UI thread
    ctx.render_image(frame, res)    # [res, res, 3] uint8, blocking
    ctx.device

Extras used by the shell: ``ctx.viewer`` (:class:`ViewerController`), ``ctx.library``
(:class:`EnvironmentLibrary`), ``ctx.worker`` (:class:`RenderWorker`), :meth:`add_bundle_callback`.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hravatar.avatar.gaussians import FrameParams

from .viewer import FrameRenderer, RenderWorker, ViewerController

LEVELS = ("info", "warning", "error")


@dataclass
class Message:
    level: str
    text: str
    time: float


class MessageLog:
    """Thread-safe log of one-line user messages (the status bar shows the newest)."""

    def __init__(self, maxlen: int = 200, echo: bool = True, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._items: deque[Message] = deque(maxlen=maxlen)
        self.echo = echo
        self.clock = clock
        self.count = 0

    def add(self, text: str, level: str = "info") -> None:
        if level not in LEVELS:
            level = "info"
        text = " ".join(str(text).split())  # one line, whatever the caller passed
        with self._lock:
            self._items.append(Message(level, text, self.clock()))
            self.count += 1
        if self.echo:
            print(f"[{level}] {text}", file=sys.stderr if level == "error" else sys.stdout, flush=True)

    def latest(self) -> Message | None:
        with self._lock:
            return self._items[-1] if self._items else None

    def all(self) -> list[Message]:
        with self._lock:
            return list(self._items)


def one_line_error(e: BaseException, path=None) -> str:
    """First line of an exception's message, without a leading "<path>: " (the caller names the file)."""
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if path is not None:
        for prefix in (str(path), str(Path(path).expanduser()), str(resolve_checkpoint_path(path))):
            if msg.startswith(prefix + ": "):
                return msg[len(prefix) + 2:]
    return msg


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a training run folder holding ``avatar.safetensors``."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "avatar.safetensors").is_file():
        return p / "avatar.safetensors"
    return p


class AppContext:
    """See the module docstring. Built by the main window; plain Python (no GUI calls), so tests use it directly.

    Args:
        viewer: the viewport state; worker: its render thread; messages: the message log.
    """

    def __init__(self, viewer: ViewerController, worker: RenderWorker, messages: MessageLog | None = None) -> None:
        self.viewer = viewer
        self.worker = worker
        self.library = viewer.library
        self.messages = messages or MessageLog()
        self.device: torch.device = viewer.device
        self._frame_callbacks: list[Callable[[float], None]] = []
        self._bundle_callbacks: list[Callable[[object], None]] = []
        self._loaded: queue.Queue = queue.Queue()
        self._loading = 0
        self._lock = threading.Lock()
        self._export_renderer = FrameRenderer()
        self._broken_callbacks: set[int] = set()
        self.last_frame_source = ""
        self._frame_seq = 0  # frames set so far (any source): panels that mirror the frame poll frame_state()
        self.wake: Callable[[], None] = lambda: None  # set by the shell: ends an idle wait of the UI loop

    # ------------------------------------------------------------------ the contract
    @property
    def bundle(self):
        """The :class:`hravatar.io.checkpoint.AvatarBundle` shown."""
        return self.viewer.bundle

    def current_frame(self) -> FrameParams:
        """B=1 driving parameters currently shown (a copy, CPU)."""
        return self.viewer.current_frame()

    def set_frame(self, frame: FrameParams, source: str = "ui") -> None:
        """Drive expression / pose (thread-safe); the viewport re-renders."""
        try:
            self.viewer.set_frame(frame)
        except ValueError as e:
            self.notify(f"{source}: {e}", "error")
            return
        with self._lock:
            self._frame_seq += 1
            self.last_frame_source = source
        self.wake()

    def frame_state(self) -> tuple[int, str]:
        """(frames set so far, the newest one's ``source``): lets a panel notice frames set by others."""
        with self._lock:
            return self._frame_seq, self.last_frame_source

    def open_checkpoint(self, path: str | Path | None, wait: bool = False) -> None:
        """Load another avatar in the background (None = the demo avatar); applied on the UI thread.

        Errors are reported with :meth:`notify`. ``wait`` blocks until loaded (headless scripts).
        """
        with self._lock:
            self._loading += 1
        label = "demo avatar" if path is None else Path(path).name
        self.notify(f"Opening {label} ...")
        t = threading.Thread(target=self._load, args=(path, label), name="checkpoint-loader", daemon=True)
        t.start()
        if wait:
            t.join()

    def notify(self, message: str, level: str = "info") -> None:
        """One line in the status / message bar ("info" | "warning" | "error"); any thread."""
        self.messages.add(message, level)
        self.wake()

    def add_frame_callback(self, fn: Callable[[float], None]) -> None:
        """``fn(dt_seconds)`` is called once per UI frame on the UI thread (poll workers there)."""
        self._frame_callbacks.append(fn)

    def render_image(self, frame: FrameParams, res: int) -> np.ndarray:
        """[res, res, 3] uint8 render of ``frame`` with the current view, lighting and materials (blocking)."""
        return self.viewer.render_image(frame, int(res), lock=self.worker.render_lock, renderer=self._export_renderer)

    # ------------------------------------------------------------------ extras for the shell
    def add_bundle_callback(self, fn: Callable[[object], None]) -> None:
        """``fn(bundle)`` after another avatar was opened (UI thread): rebuild avatar-specific widgets."""
        self._bundle_callbacks.append(fn)

    @property
    def loading_checkpoint(self) -> bool:
        with self._lock:
            return self._loading > 0

    def _load(self, path, label: str) -> None:
        from hravatar.api import open_avatar

        from .viewer import prepare_bundle

        try:
            p = None if path is None else resolve_checkpoint_path(path)
            if p is not None and not p.exists():
                raise FileNotFoundError(f"{p}: file not found")
            bundle = open_avatar(p, "cpu")
            renderer, home = prepare_bundle(bundle, self.device, compile=self.viewer.compile_render)  # here, not on the UI thread
            self._loaded.put((bundle, (renderer, home), label, None))
        except Exception as e:  # noqa: BLE001  - any failure is one line, the current avatar stays
            self._loaded.put((None, None, label, one_line_error(e, path)))

    def poll(self, dt: float) -> None:
        """Once per UI frame (UI thread): apply a loaded avatar, run the frame callbacks."""
        while True:
            try:
                bundle, prepared, label, err = self._loaded.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                self._loading -= 1
            if err:
                self.notify(f"Cannot open {label}: {err}", "error")
                continue
            self.viewer.set_bundle(bundle, *prepared)
            with self._lock:  # the new avatar starts from its neutral frame
                self._frame_seq += 1
                self.last_frame_source = "open"
            self.notify(f"Opened {label} ({bundle.avatar.num_gaussians:,} Gaussians)")
            for fn in list(self._bundle_callbacks):
                self._call(fn, bundle)
        for fn in list(self._frame_callbacks):
            self._call(fn, dt)

    def _call(self, fn, arg) -> None:
        """Run a panel callback; a failing one is reported once and the app keeps running."""
        try:
            fn(arg)
        except Exception as e:  # noqa: BLE001
            if id(fn) not in self._broken_callbacks:
                self._broken_callbacks.add(id(fn))
                name = getattr(fn, "__qualname__", repr(fn))
                self.notify(f"{name} failed: {(str(e).splitlines() or [type(e).__name__])[0]}", "error")
