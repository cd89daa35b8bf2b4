"""Frame pacing for the UI loop: displayed-FPS / millisecond counters and the render-or-idle policy.

Everything takes times from an injectable clock (seconds, monotonic), so it is tested with a fake one.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from typing import Callable


def default_render_threads() -> int:
    """CPU threads for rendering: every core this process may use but one, left to the interface.

    On 2 cores one rendering thread beats two, whose second shares a core with the interface's
    drawing: expression slider at 256 px, 2-core VM, software OpenGL, UI cap 20 fps while
    rendering, three runs each: 11.0-11.4 fps with 2 threads, 12.3-12.8 fps with 1
    (docs/benchmarks.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class FpsCounter:
    """Displayed frames per second over a sliding time window.

    ``tick(t)`` is called once per *displayed* frame (a new image reached the screen);
    ``fps(now)`` counts the frame intervals inside the last ``window_s`` seconds, so it falls to 0
    when frames stop arriving instead of freezing at the last value.
    """

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = float(window_s)
        self._t: deque[float] = deque()
        self.total = 0

    def tick(self, now: float) -> None:
        self._t.append(float(now))
        self.total += 1
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._t and self._t[0] < now - self.window_s:
            self._t.popleft()

    def fps(self, now: float) -> float:
        self._trim(now)
        if len(self._t) < 2:
            return 0.0
        span = self._t[-1] - self._t[0]
        return (len(self._t) - 1) / span if span > 0 else 0.0

    def reset(self) -> None:
        self._t.clear()
        self.total = 0


class MsAverage:
    """Mean of the last ``n`` samples (milliseconds), for steady numbers in the status line."""

    def __init__(self, n: int = 20) -> None:
        self._v: deque[float] = deque(maxlen=n)

    def add(self, ms: float) -> None:
        self._v.append(float(ms))

    @property
    def value(self) -> float:
        return sum(self._v) / len(self._v) if self._v else 0.0

    def __len__(self) -> int:
        return len(self._v)


class FramePacer:
    """Decides, once per UI frame, whether to request a render and how long to sleep afterwards.

    A render is requested when the state changed (:meth:`invalidate`) or while an *active source*
    (animation playback, webcam, auto-rotate, a drag) is on. While anything happened within the
    last ``linger_s`` seconds the loop runs at up to ``max_fps`` (sleeping the rest of each frame
    interval); otherwise it idles with ``idle_sleep_s`` sleeps, short enough (< 100 ms) that input
    still feels immediate, long enough that an idle app costs almost no CPU.

    While a render is in flight on the same CPU that draws the interface, a UI frame that is
    itself expensive (software OpenGL: ~30 ms of CPU per frame for a 1440x900 window) takes
    cores from the renderer; :meth:`sleep_time` then caps the loop at ``busy_max_fps``
    (input is still handled every 1 / busy_max_fps seconds, 50 ms at the default 20).

    Args:
        clock: monotonic seconds (``time.perf_counter`` by default).
        busy_max_fps: the cap while a CPU render is in flight and UI frames are expensive; None: no cap.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, max_fps: float = 60.0, idle_sleep_s: float = 0.05,
                 linger_s: float = 0.3, busy_max_fps: float | None = None) -> None:
        self.clock = clock
        self.max_fps = float(max_fps)
        self.busy_max_fps = None if busy_max_fps is None else float(busy_max_fps)
        self.idle_sleep_s = float(idle_sleep_s)
        self.linger_s = float(linger_s)
        self._dirty = True  # the first frame always renders
        self._active: set[str] = set()
        self._last_busy = -1e18
        self._frame_start = clock()

    # ------------------------------------------------------------------ inputs
    def invalidate(self) -> None:
        """Something visible changed: render once more."""
        self._dirty = True

    def set_active(self, source: str, on: bool) -> None:
        """Turn a continuously animating source on/off (renders every frame while on)."""
        if on:
            self._active.add(source)
        else:
            self._active.discard(source)

    @property
    def active_sources(self) -> set[str]:
        return set(self._active)

    def touch(self) -> None:
        """Input or background work happened (keeps the loop responsive without forcing a render)."""
        self._last_busy = self.clock()

    # ------------------------------------------------------------------ per frame
    def begin_frame(self) -> bool:
        """Start a UI frame; returns True when a render should be requested."""
        now = self.clock()
        self._frame_start = now
        render = self._dirty or bool(self._active)
        self._dirty = False
        if render:
            self._last_busy = now
        return render

    @property
    def idle(self) -> bool:
        return not self._active and not self._dirty and self.clock() - self._last_busy > self.linger_s

    def sleep_time(self, render_contended: bool = False) -> float:
        """Seconds to sleep at the end of the current frame.

        ``render_contended``: a render is in flight on the CPU and UI frames are expensive, so
        the loop yields the cores to it (at most ``busy_max_fps`` frames per second).
        """
        if self.idle:
            return self.idle_sleep_s
        fps = self.max_fps
        if render_contended and self.busy_max_fps:
            fps = min(fps, self.busy_max_fps)
        elapsed = self.clock() - self._frame_start
        return max(0.0, 1.0 / fps - elapsed)


class ProgressiveResolution:
    """Progressive refinement: render at a reduced size while the user interacts, then once at full size.

    The UI loop calls :meth:`request` for every new render request (the viewed state changed); a
    request counts as *interactive* while a drag is active or when the previous request came less
    than ``interactive_gap_s`` ago (a slider being dragged changes the state every UI frame). An
    interactive request is rendered at a scale chosen from the measured cost (:meth:`report`) so
    that one render takes about ``target_ms``, never below ``min_scale`` of the full size; the image
    is stretched to the same on-screen size. Once no request came for ``settle_s`` seconds,
    :meth:`refine_due` says that the last (reduced) image should be rendered again at full size.

    Only requests that re-rasterize the avatar (``geometry``: expression, pose, camera) choose a
    new scale; those that only re-shade cached G-buffers (material, lighting) keep the size of the
    previous request, so the cache stays valid (a different size would re-rasterize, the expensive part).

    Args:
        clock: monotonic seconds (``time.perf_counter`` by default).
        enabled: False renders everything at full size (recording, or a fast GPU).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, target_ms: float = 100.0, min_scale: float = 0.45,
                 interactive_gap_s: float = 0.25, settle_s: float = 0.25, step_px: int = 8, smoothing: float = 0.5,
                 enabled: bool = True) -> None:
        self.clock = clock
        self.target_ms = float(target_ms)
        self.min_scale = float(min_scale)
        self.interactive_gap_s = float(interactive_gap_s)
        self.settle_s = float(settle_s)
        self.step_px = max(1, int(step_px))
        self.smoothing = float(smoothing)
        self.enabled = bool(enabled)
        self._cost: dict[bool, float] = {}  # geometry? -> estimated full-size render ms
        self._last_request = -1e18
        self._reduced = False  # the newest request was rendered below full size (a refine is owed)
        self.last_scale = 1.0

    # ------------------------------------------------------------------ measurements
    def report(self, ms: float, scale: float, geometry: bool) -> None:
        """A render took ``ms`` at ``scale`` (fraction of the full height); updates the cost estimate.

        The cost is assumed to grow with the pixel count (``scale ** 2``), which over-estimates the
        full-size cost when part of it is fixed: the chosen scale errs on the fast side.
        """
        if ms <= 0 or scale <= 0:
            return
        full = float(ms) / (float(scale) ** 2)
        old = self._cost.get(bool(geometry))
        self._cost[bool(geometry)] = full if old is None else self.smoothing * old + (1.0 - self.smoothing) * full

    def estimated_ms(self, geometry: bool) -> float | None:
        return self._cost.get(bool(geometry))

    def scale_for(self, geometry: bool) -> float:
        """The scale an interactive request of this kind renders at (1.0: full size)."""
        est = self._cost.get(bool(geometry))
        if not self.enabled or est is None or est <= self.target_ms:
            return 1.0
        return max(self.min_scale, min(1.0, math.sqrt(self.target_ms / est)))

    # ------------------------------------------------------------------ requests
    def interactive(self, dragging: bool = False, now: float | None = None) -> bool:
        """Whether a request made now counts as part of an interaction."""
        now = self.clock() if now is None else now
        return bool(dragging) or now - self._last_request < self.interactive_gap_s

    def request(self, geometry: bool, dragging: bool = False) -> float:
        """A new render request (the state changed); returns the scale to render it at."""
        now = self.clock()
        if not self.interactive(dragging, now) or not self.enabled:
            scale = 1.0
        elif geometry:
            scale = self.scale_for(True)
        else:
            scale = self.last_scale  # re-shading: the cached G-buffers' size
        self._last_request = now
        self._reduced = scale < 1.0
        self.last_scale = scale
        return scale

    def size(self, full: tuple[int, int], scale: float) -> tuple[int, int]:
        """(width, height) to render at: the height rounded to ``step_px``, the width keeping the aspect (even)."""
        w, h = int(full[0]), int(full[1])
        if scale >= 1.0:
            return (w, h)
        hr = max(16, int(round(h * scale / self.step_px)) * self.step_px)
        if hr >= h:
            return (w, h)
        wr = max(16, int(round(w * hr / h / 2.0)) * 2)
        return (min(wr, w), hr)

    @property
    def refine_pending(self) -> bool:
        """The newest request was rendered at a reduced size and its full-size render is still owed."""
        return self._reduced

    def refine_due(self) -> bool:
        """True once the interaction stopped (no request for ``settle_s``) and a full-size render is owed."""
        return self._reduced and self.clock() - self._last_request >= self.settle_s

    def refined(self) -> None:
        """The full-size render was requested."""
        self._reduced = False
        self.last_scale = 1.0

    def cancel(self) -> None:
        """Forget an owed refine (the state is re-requested at full size anyway)."""
        self._reduced = False
