"""Frame pacing for the UI loop: displayed-FPS / millisecond counters and the render-or-idle policy.

Everything takes times from an injectable clock (seconds, monotonic), so it is tested with a fake one.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable


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

    Args:
        clock: monotonic seconds (``time.perf_counter`` by default).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, max_fps: float = 60.0, idle_sleep_s: float = 0.05,
                 linger_s: float = 0.3) -> None:
        self.clock = clock
        self.max_fps = float(max_fps)
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

    def sleep_time(self) -> float:
        """Seconds to sleep at the end of the current frame."""
        if self.idle:
            return self.idle_sleep_s
        elapsed = self.clock() - self._frame_start
        return max(0.0, 1.0 / self.max_fps - elapsed)
