"""OS file drop for dearpygui windows, and waiting for input events while idle.

dearpygui has no drop event, but its extension module links GLFW statically and exports the GLFW
API. :class:`GlfwDropHandler` installs a GLFW drop callback through ctypes on the viewport's
window; GLFW calls it on the UI thread inside ``render_dearpygui_frame``, and it only queues the
paths. The UI loop calls :meth:`DropHandler.poll`, which hands them on (``.hdr`` / ``.exr`` to the
environment library, ``.safetensors`` or a run folder to ``open_checkpoint``).
Everything fails soft: without the symbols the app runs and says that drop is unavailable.

:class:`GlfwEvents` uses the same exported API to sleep until the next input event (or a timeout)
when the app is idle, so an idle window costs almost nothing yet reacts at once.
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from .lighting import ENV_SUFFIXES

#: void (*GLFWdropfun)(GLFWwindow* window, int path_count, const char* paths[])
DROP_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p))


class DropQueue:
    """Thread-safe FIFO of dropped paths."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: deque[str] = deque()

    def push(self, paths) -> None:
        with self._lock:
            self._paths.extend(str(p) for p in paths)

    def pop_all(self) -> list[str]:
        with self._lock:
            out = list(self._paths)
            self._paths.clear()
            return out


def _dearpygui_library_path() -> str | None:
    try:
        import dearpygui._dearpygui as native
    except ImportError:
        return None
    return getattr(native, "__file__", None)


class GlfwDropHandler:
    """Installs the GLFW drop callback on the current GLFW window (call on the UI thread after ``show_viewport``).

    Args:
        queue: where dropped paths go.
        library_path: the shared object exporting GLFW (default: dearpygui's extension module).
    """

    def __init__(self, queue: DropQueue, library_path: str | None = None) -> None:
        self.queue = queue
        self.library_path = library_path
        self.installed = False
        # the ctypes callback must outlive the window: GLFW keeps only the raw pointer
        self._callback = DROP_CALLBACK_TYPE(self._on_drop)
        self._lib = None

    def _on_drop(self, window, count, paths) -> None:
        try:
            self.queue.push(os.fsdecode(paths[i]) for i in range(int(count)) if paths[i])
        except Exception:  # noqa: BLE001  - never raise into C
            pass

    def install(self) -> tuple[bool, str]:
        """Returns (ok, one-line message)."""
        path = self.library_path or _dearpygui_library_path()
        if not path:
            return False, "file drop unavailable (dearpygui's native module was not found); use the file dialogs"
        try:
            lib = ctypes.CDLL(path)
            get_ctx = lib.glfwGetCurrentContext
            set_drop = lib.glfwSetDropCallback
        except (OSError, AttributeError):
            return False, "file drop unavailable (this dearpygui build does not export GLFW); use the file dialogs"
        get_ctx.restype = ctypes.c_void_p
        get_ctx.argtypes = []
        set_drop.restype = ctypes.c_void_p
        set_drop.argtypes = [ctypes.c_void_p, DROP_CALLBACK_TYPE]
        window = get_ctx()
        if not window:
            return False, "file drop unavailable (no GLFW window is current on this thread); use the file dialogs"
        set_drop(window, self._callback)
        self._lib = lib
        self.installed = True
        return True, "file drop enabled"


class GlfwEvents:
    """``wait(timeout)`` blocks until an input event arrives (``glfwWaitEventsTimeout``, UI thread only);
    ``wake()`` ends such a wait from any thread (``glfwPostEmptyEvent``). Falls back to ``time.sleep``."""

    def __init__(self, library_path: str | None = None) -> None:
        self._wait = None
        self._post = None
        path = library_path or _dearpygui_library_path()
        if not path:
            return
        try:
            lib = ctypes.CDLL(path)
            wait, post = lib.glfwWaitEventsTimeout, lib.glfwPostEmptyEvent
        except (OSError, AttributeError):
            return
        wait.argtypes, wait.restype = [ctypes.c_double], None
        post.argtypes, post.restype = [], None
        self._lib, self._wait, self._post = lib, wait, post

    @property
    def available(self) -> bool:
        return self._wait is not None

    def wait(self, timeout: float) -> None:
        if self._wait is not None:
            self._wait(float(timeout))
        else:
            import time

            time.sleep(timeout)

    def wake(self) -> None:
        if self._post is not None:
            self._post()


def classify_path(path: str | Path) -> str:
    """"environment" | "checkpoint" | "unsupported" for a dropped path."""
    p = Path(path)
    if p.suffix.lower() in ENV_SUFFIXES:
        return "environment"
    if p.suffix.lower() == ".safetensors" or (p.is_dir() and (p / "avatar.safetensors").is_file()):
        return "checkpoint"
    return "unsupported"


class DropHandler:
    """Queue + optional GLFW hook + dispatch of dropped paths (dispatch runs on the UI thread).

    Args:
        load_environment: ``fn(path)`` for environment maps (may raise ValueError with a one-line message).
        open_checkpoint: ``fn(path)`` for avatar checkpoints.
        notify: ``fn(message, level)``.
    """

    def __init__(self, load_environment: Callable, open_checkpoint: Callable, notify: Callable) -> None:
        self.queue = DropQueue()
        self.glfw = GlfwDropHandler(self.queue)
        self.load_environment = load_environment
        self.open_checkpoint = open_checkpoint
        self.notify = notify
        self.received = 0

    def install(self) -> bool:
        ok, msg = self.glfw.install()
        if not ok:
            self.notify(msg, "warning")
        return ok

    def simulate_drop(self, paths) -> None:
        """Queue paths exactly as an OS drop would (headless tests)."""
        self.queue.push(paths)

    def poll(self) -> list[str]:
        """Dispatch queued paths; returns them."""
        paths = self.queue.pop_all()
        for p in paths:
            self.received += 1
            kind = classify_path(p)
            try:
                if kind == "environment":
                    self.load_environment(p)
                elif kind == "checkpoint":
                    self.open_checkpoint(p)
                else:
                    self.notify(f"{Path(p).name}: drop an .hdr/.exr environment map or a .safetensors avatar", "warning")
            except Exception as e:  # noqa: BLE001  - one line, the app keeps running
                self.notify((str(e).splitlines() or [type(e).__name__])[0], "error")
        return paths
