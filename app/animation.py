"""Keyframe animation of the puppet parameters: timeline, interpolation, playback, JSON, MP4 export.

A keyframe stores the whole parameter vector (one value per slider of a
:class:`app.puppet.ParameterSpace`) at a time in seconds. Between keys:

* scalar channels (expressions, eyelids, gaze angles) use a monotone piecewise-cubic Hermite
  spline (PCHIP, Fritsch-Carlson with the Moler end condition): it passes through every key,
  is C1, never overshoots the keys (a blendshape keyed between 0 and 1 stays in [0, 1]) and
  reproduces a linear ramp exactly when the keys are collinear;
* rotation groups (the axis-angle triples of the head/root, neck and jaw joints) are
  interpolated on the rotation group: quaternions joined by cubic spherical Bezier curves
  (De Casteljau with slerp), whose end tangents are angular velocities chosen per component
  with the same PCHIP rule in the key's body frame. The curve stays a unit rotation, hits the
  keys, is C1 across keys, and for rotations about one fixed axis it equals the scalar PCHIP of
  the angle (so a jaw opening keyed 0 -> 0.4 -> 0.4 never opens past 0.4).
  The eyes are driven by two gaze angles (pitch, yaw) shared by both eye joints; they are
  interpolated as scalars, since a slerp would add a roll the gaze parameters cannot hold.

Outside the keyed range the values are clamped to the first / last key.
"""
from __future__ import annotations

import json
import math
import os
import time
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FORMAT = "hravatar-animation"
VERSION = 1


# ----------------------------------------------------------------------------- playback clock
class Playhead:
    """A play position in seconds driven by a clock (``time.monotonic`` or a fake for tests).

    ``bounds()`` returns the current (start, end) of the playable range; it is asked each time,
    so the range may change while playing (keys added or moved).
    """

    def __init__(self, bounds: Callable[[], tuple[float, float]], clock: Callable[[], float] = time.monotonic,
                 loop: bool = True, speed: float = 1.0) -> None:
        self._bounds = bounds
        self.clock = clock
        self.loop = loop
        self.speed = speed
        self.playing = False
        self._pos = bounds()[0]
        self._t0 = clock()

    def _raw(self) -> float:
        return self._pos + ((self.clock() - self._t0) * self.speed if self.playing else 0.0)

    def now(self) -> float:
        """Current time in seconds: wrapped into [start, end) when looping, else clamped
        (reaching the end stops playback)."""
        start, end = self._bounds()
        t = self._raw()
        if end <= start:
            return start
        if self.playing and self.loop:
            return start + (t - start) % (end - start)
        if t >= end:
            if self.playing:
                self.playing = False
                self._pos = end
            return end
        return max(t, start)

    def play(self) -> None:
        """Start (from the beginning when stopped at the end of a non-looping range)."""
        if self.playing:
            return
        start, end = self._bounds()
        t = self.now()
        if t >= end:
            t = start
        self._pos, self._t0, self.playing = t, self.clock(), True

    def pause(self) -> None:
        if self.playing:
            t = self.now()
            self._pos, self.playing = t, False

    def seek(self, t: float) -> None:
        """Jump to ``t`` seconds (clamped to the range); keeps playing if it was."""
        start, end = self._bounds()
        self._pos = min(max(float(t), start), max(end, start))
        self._t0 = self.clock()


# ----------------------------------------------------------------------------- quaternions (w, x, y, z)
def quat_from_rotvec(r: np.ndarray) -> np.ndarray:
    """[3] axis-angle -> [4] unit quaternion (w, x, y, z)."""
    a = float(np.linalg.norm(r))
    if a < 1e-12:
        return np.array([1.0, *(0.5 * r)]) / math.sqrt(1.0 + 0.25 * a * a)
    return np.array([math.cos(a / 2), *(math.sin(a / 2) / a * r)])


def rotvec_from_quat(q: np.ndarray) -> np.ndarray:
    """[4] unit quaternion -> [3] axis-angle with angle in [0, pi]."""
    q = q if q[0] >= 0 else -q
    s = float(np.linalg.norm(q[1:]))
    if s < 1e-12:
        return 2.0 * q[1:] / max(q[0], 1e-12)
    return q[1:] / s * (2.0 * math.atan2(s, q[0]))


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of [4] quaternions (w, x, y, z)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw])


def quat_conj(q: np.ndarray) -> np.ndarray:
    return np.array([q[0], -q[1], -q[2], -q[3]])


def slerp(a: np.ndarray, b: np.ndarray, u: float) -> np.ndarray:
    """Shortest-path spherical interpolation of unit quaternions [4] at ``u`` in [0, 1]."""
    d = float(np.dot(a, b))
    if d < 0:
        b, d = -b, -d
    # angle between a and b on the 4-sphere, accurate also when they are nearly equal (unlike acos)
    th = 2.0 * math.atan2(float(np.linalg.norm(a - b)), float(np.linalg.norm(a + b)))
    if th < 1e-7:  # (nearly) the same rotation: lerp is exact to rounding and avoids 0/0
        q = a + u * (b - a)
        return q / np.linalg.norm(q)
    return (math.sin((1 - u) * th) * a + math.sin(u * th) * b) / math.sin(th)


# ----------------------------------------------------------------------------- PCHIP slopes
def _pchip_end(h0: float, h1: float, d0: np.ndarray, d1: np.ndarray) -> np.ndarray:
    """Three-point end slope, limited so the end interval stays monotone (Moler)."""
    m = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
    m = np.where(np.sign(m) != np.sign(d0), 0.0, m)
    big = (np.sign(d0) != np.sign(d1)) & (np.abs(m) > 3 * np.abs(d0))
    return np.where(big, 3 * d0, m)


def _pchip_interior(h0: float, h1: float, d0: np.ndarray, d1: np.ndarray) -> np.ndarray:
    """Slope at a key between secants d0 (before, width h0) and d1 (after, width h1): zero at
    extrema, else the weighted harmonic mean (Fritsch-Butland weights)."""
    w1, w2 = 2 * h1 + h0, h1 + 2 * h0
    same = d0 * d1 > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        m = (w1 + w2) / (w1 / d0 + w2 / d1)
    return np.where(same, m, 0.0)


def pchip_slopes(times: np.ndarray, secants: np.ndarray) -> np.ndarray:
    """Key slopes [K, D] from key times [K] and interval secants/velocities [K-1, D]."""
    K = times.shape[0]
    h = np.diff(times)
    m = np.zeros((K,) + secants.shape[1:])
    if K == 2:
        m[0] = m[1] = secants[0]
        return m
    for k in range(1, K - 1):
        m[k] = _pchip_interior(h[k - 1], h[k], secants[k - 1], secants[k])
    m[0] = _pchip_end(h[0], h[1], secants[0], secants[1])
    m[-1] = _pchip_end(h[-1], h[-2], secants[-1], secants[-2])
    return m


# ----------------------------------------------------------------------------- timeline
@dataclass
class Keyframe:
    """time: seconds; values: [D] parameter vector (the ParameterSpace's layout)."""

    time: float
    values: np.ndarray


class PlayheadControls:
    """Play / pause / stop / seek / loop of an object's ``playhead`` (:class:`Playhead`), shared
    by the keyframe :class:`Timeline` and the sequence player; ``stop`` rewinds to
    ``_start_time()``."""

    playhead: Playhead

    @property
    def playing(self) -> bool:
        return self.playhead.playing

    @property
    def loop(self) -> bool:
        return self.playhead.loop

    @loop.setter
    def loop(self, on: bool) -> None:
        self.playhead.loop = bool(on)

    def play(self) -> None:
        self.playhead.play()

    def pause(self) -> None:
        self.playhead.pause()

    def _start_time(self) -> float:
        return 0.0

    def stop(self) -> None:
        """Pause and rewind to the start."""
        self.playhead.pause()
        self.playhead.seek(self._start_time())

    def seek(self, t: float) -> None:
        """Jump to ``t`` seconds."""
        self.playhead.seek(t)

    def now(self) -> float:
        """Current playback time in seconds."""
        return self.playhead.now()


class Timeline(PlayheadControls):
    """Keyframes over a parameter vector with smooth interpolation and clock-driven playback.

    Args:
        names: [D] parameter names (matching by name makes JSON files portable across avatars).
        defaults: [D] values used with no keys and for parameters a loaded file lacks.
        rotation_groups: index triples (x, y, z) of axis-angle rotations in the vector,
            interpolated on the rotation group (see the module docstring).
        to_frame: optional ``values [D] -> FrameParams`` (for :meth:`frame_at` and MP4 export).
        clock: time source for playback.
    """

    def __init__(self, names: Sequence[str], defaults: np.ndarray | None = None,
                 rotation_groups: Sequence[tuple[int, int, int]] = (), to_frame: Callable | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError("parameter names must be unique")
        D = len(self.names)
        self.defaults = np.zeros(D) if defaults is None else np.asarray(defaults, np.float64).reshape(D).copy()
        self.rotation_groups = [tuple(int(i) for i in g) for g in rotation_groups]
        for g in self.rotation_groups:
            if len(g) != 3 or not all(0 <= i < D for i in g):
                raise ValueError(f"rotation group {g} must be 3 indices into {D} parameters")
        rot = {i for g in self.rotation_groups for i in g}
        self._scalar = np.array([i not in rot for i in range(D)], bool)
        self.to_frame = to_frame
        self._keys: list[Keyframe] = []
        self._cache: dict | None = None
        self.playhead = Playhead(self.bounds, clock)

    @classmethod
    def for_space(cls, space, clock: Callable[[], float] = time.monotonic) -> "Timeline":
        """A timeline over a :class:`app.puppet.ParameterSpace` (names, defaults, joint rotations)."""
        return cls(space.names, space.defaults(), space.rotation_groups(), space.to_frame, clock)

    # ---------------------------------------------------------------- keys
    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def keys(self) -> list[Keyframe]:
        """Copies of the keys, sorted by time."""
        return [Keyframe(k.time, k.values.copy()) for k in self._keys]

    @property
    def times(self) -> list[float]:
        return [k.time for k in self._keys]

    def __len__(self) -> int:
        return len(self._keys)

    def _check(self, t: float, values) -> tuple[float, np.ndarray]:
        t = float(t)
        v = np.asarray(values, np.float64).reshape(-1)
        if not math.isfinite(t):
            raise ValueError(f"key time must be a finite number, got {t}")
        if v.shape[0] != self.dim:
            raise ValueError(f"key has {v.shape[0]} values for {self.dim} parameters")
        if not np.isfinite(v).all():
            raise ValueError("key values must be finite numbers")
        return t, v.copy()

    def find(self, t: float, tol: float = 1e-4) -> int | None:
        """Index of the key within ``tol`` seconds of ``t``, or None."""
        for i, k in enumerate(self._keys):
            if abs(k.time - t) <= tol:
                return i
        return None

    def add_key(self, t: float, values, tol: float = 1e-4) -> int:
        """Insert a key (replacing one within ``tol`` seconds); returns its index."""
        t, v = self._check(t, values)
        i = self.find(t, tol)
        if i is not None:
            self._keys[i] = Keyframe(self._keys[i].time, v)
        else:
            i = bisect_right(self.times, t)
            self._keys.insert(i, Keyframe(t, v))
        self._cache = None
        return i

    def set_key(self, index: int, values) -> None:
        """Replace the values of key ``index``."""
        _, v = self._check(self._keys[index].time, values)
        self._keys[index] = Keyframe(self._keys[index].time, v)
        self._cache = None

    def remove_key(self, index: int) -> None:
        del self._keys[index]
        self._cache = None

    def move_key(self, index: int, t: float, tol: float = 1e-4) -> int:
        """Move key ``index`` to time ``t``; returns its new index. Refuses to land on another key."""
        t, _ = self._check(t, self._keys[index].values)
        j = self.find(t, tol)
        if j is not None and j != index:
            raise ValueError(f"a key already exists at {self._keys[j].time:.3f} s")
        k = self._keys.pop(index)
        i = bisect_right(self.times, t)
        self._keys.insert(i, Keyframe(t, k.values))
        self._cache = None
        return i

    def clear(self) -> None:
        self._keys.clear()
        self._cache = None

    def bounds(self) -> tuple[float, float]:
        """(first key time, last key time); (0, 0) with no keys."""
        if not self._keys:
            return 0.0, 0.0
        return self._keys[0].time, self._keys[-1].time

    @property
    def duration(self) -> float:
        a, b = self.bounds()
        return b - a

    # ---------------------------------------------------------------- interpolation
    def _prepare(self) -> dict:
        if self._cache is not None:
            return self._cache
        t = np.array(self.times)
        V = np.stack([k.values for k in self._keys]) if self._keys else np.zeros((0, self.dim))
        c: dict = {"t": t, "V": V}
        if len(t) >= 2:
            h = np.diff(t)
            c["m"] = pchip_slopes(t, np.diff(V, axis=0) / h[:, None])  # [K, D] (rotation columns unused)
            c["rot"] = [self._prepare_rotation(t, V[:, list(g)]) for g in self.rotation_groups]
        self._cache = c
        return c

    @staticmethod
    def _prepare_rotation(t: np.ndarray, rv: np.ndarray) -> tuple[list, list]:
        """Quaternion keys and the inner Bezier control points of each interval.

        rv: [K, 3] axis-angle keys. Returns (quats [K][4], controls [K-1] of (b1, b2)).
        """
        K = len(t)
        h = np.diff(t)
        q = [quat_from_rotvec(r) for r in rv]
        for k in range(1, K):  # same hemisphere as the previous key: shortest arcs
            if np.dot(q[k - 1], q[k]) < 0:
                q[k] = -q[k]
        # body-frame angular velocity over each interval (also the body frame of either end)
        vel = np.stack([rotvec_from_quat(quat_mul(quat_conj(q[k]), q[k + 1])) / h[k] for k in range(K - 1)])
        w = pchip_slopes(t, vel)  # [K, 3] angular velocity at each key
        ctrl = [(quat_mul(q[k], quat_from_rotvec(w[k] * h[k] / 3)), quat_mul(q[k + 1], quat_from_rotvec(-w[k + 1] * h[k] / 3)))
                for k in range(K - 1)]
        return q, ctrl

    def evaluate(self, t: float) -> np.ndarray:
        """[D] parameter values at time ``t`` (seconds), clamped to the first / last key."""
        K = len(self._keys)
        if K == 0:
            return self.defaults.copy()
        c = self._prepare()
        times = c["t"]
        if K == 1 or t <= times[0]:
            return c["V"][0].copy()
        if t >= times[-1]:
            return c["V"][-1].copy()
        k = int(np.searchsorted(times, t, side="right")) - 1
        if t == times[k]:
            return c["V"][k].copy()
        h = times[k + 1] - times[k]
        s = (t - times[k]) / h
        s2, s3 = s * s, s * s * s
        y0, y1, m0, m1 = c["V"][k], c["V"][k + 1], c["m"][k], c["m"][k + 1]
        out = (2 * s3 - 3 * s2 + 1) * y0 + (s3 - 2 * s2 + s) * h * m0 + (-2 * s3 + 3 * s2) * y1 + (s3 - s2) * h * m1
        for g, (q, ctrl) in zip(self.rotation_groups, c["rot"]):
            b0, (b1, b2), b3 = q[k], ctrl[k], q[k + 1]
            # De Casteljau on the sphere: a cubic Bezier whose end tangents are 3*(b1-b0), 3*(b3-b2)
            p01, p12, p23 = slerp(b0, b1, s), slerp(b1, b2, s), slerp(b2, b3, s)
            qt = slerp(slerp(p01, p12, s), slerp(p12, p23, s), s)
            out[list(g)] = rotvec_from_quat(qt)
        return out

    def sample(self, times: Sequence[float]) -> np.ndarray:
        """[T, D] values at each of ``times``."""
        return np.stack([self.evaluate(float(t)) for t in times]) if len(times) else np.zeros((0, self.dim))

    def frame_at(self, t: float):
        """FrameParams (B=1) at time ``t``; needs ``to_frame``."""
        if self.to_frame is None:
            raise ValueError("this timeline has no parameter space to build frames")
        return self.to_frame(self.evaluate(t))

    # ---------------------------------------------------------------- playback
    def _start_time(self) -> float:
        return self.bounds()[0]

    def current_values(self) -> np.ndarray:
        """[D] values at the current playback time."""
        return self.evaluate(self.now())

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "names": list(self.names),
                "keys": [{"time": k.time, "values": [float(x) for x in k.values]} for k in self._keys]}

    def save_json(self, path: str | Path) -> Path:
        """Write the keys as JSON (atomically: temporary file + rename)."""
        path = Path(path).expanduser()
        if not path.parent.is_dir():
            raise ValueError(f"{path}: folder {path.parent} does not exist")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    def load_json(self, path: str | Path) -> list[str]:
        """Replace the keys with those of a JSON file; returns warnings (one line each).

        Parameters are matched by name; ones this timeline lacks are ignored (warned), ones the
        file lacks take the defaults. Raises ValueError (one line naming the file) on a malformed
        file and leaves the timeline unchanged.
        """
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return self.import_dict(data, str(path))

    def import_dict(self, data, where: str = "animation") -> list[str]:
        """Like :meth:`load_json` from an already parsed JSON object."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"{where}: {msg}")

        if not isinstance(data, dict):
            raise bad("expected a JSON object with 'names' and 'keys'")
        if data.get("format") != FORMAT:
            raise bad(f"not a hravatar animation (format {data.get('format')!r}, expected {FORMAT!r})")
        ver = data.get("version")
        if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1:
            raise bad(f"'version' must be a positive integer, found {ver!r}")
        if ver > VERSION:
            raise bad(f"animation version {ver} is newer than supported ({VERSION})")
        names = data.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad("'names' must be a list of strings")
        if len(set(names)) != len(names):
            raise bad("'names' has duplicates")
        keys = data.get("keys")
        if not isinstance(keys, list):
            raise bad("'keys' must be a list")
        src = [i for i, n in enumerate(names) if n in self.names]
        dst = [self.names.index(names[i]) for i in src]
        new: list[Keyframe] = []
        for j, k in enumerate(keys):
            if not isinstance(k, dict) or "time" not in k or "values" not in k:
                raise bad(f"key {j} must be an object with 'time' and 'values'")
            t, vals = k["time"], k["values"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise bad(f"key {j}: 'time' must be a finite number, found {t!r}")
            if (not isinstance(vals, list) or len(vals) != len(names)
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals)):
                raise bad(f"key {j}: 'values' must be a list of {len(names)} numbers (one per name)")
            arr = np.asarray(vals, np.float64)
            if not np.isfinite(arr).all():
                raise bad(f"key {j}: values must be finite")
            v = self.defaults.copy()
            v[dst] = arr[src]
            new.append(Keyframe(float(t), v))
        new.sort(key=lambda k: k.time)
        for a, b in zip(new, new[1:]):
            if b.time - a.time <= 1e-6:
                raise bad(f"two keys at time {a.time:g} s")
        warnings = []
        unknown = [n for n in names if n not in self.names]
        if unknown:
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            warnings.append(f"{where}: {len(unknown)} parameter(s) unknown to this avatar ignored: {', '.join(unknown[:5])}{more}")
        missing = [n for n in self.names if n not in names]
        if missing and new:
            warnings.append(f"{where}: {len(missing)} parameter(s) of this avatar not in the file keep their defaults")
        self._keys = new
        self._cache = None
        self.playhead.seek(self.bounds()[0])
        return warnings

    def remapped(self, space) -> "Timeline":
        """This animation carried over (by parameter name) to another parameter space."""
        out = Timeline.for_space(space, self.playhead.clock)
        out.import_dict(self.to_dict())
        out.loop = self.loop
        return out


# ----------------------------------------------------------------------------- MP4 export
class Mp4Exporter:
    """Renders a timeline frame by frame into an MP4, one :meth:`step` at a time (so a UI can
    interleave it with its own frames and show progress).

    Args:
        timeline: the animation (frames at ``start + i / fps`` for i = 0 .. total-1, ends included).
        render_image: ``(FrameParams, res) -> [res, res, 3] uint8``.
        path: the ``.mp4`` to write (written to a temporary name, renamed when complete).
        to_frame: ``values [D] -> FrameParams`` (default: ``timeline.to_frame``).
    """

    def __init__(self, timeline: Timeline, render_image: Callable, path: str | Path, fps: float = 25.0, res: int = 256,
                 to_frame: Callable | None = None) -> None:
        import importlib.util

        if importlib.util.find_spec("imageio_ffmpeg") is None:  # fail before rendering anything
            raise ValueError("MP4 export needs imageio-ffmpeg (pip install imageio-ffmpeg)")
        self.path = Path(path).expanduser()
        if self.path.suffix.lower() != ".mp4":
            self.path = self.path.with_name(self.path.name + ".mp4")
        if not self.path.parent.is_dir():
            raise ValueError(f"{self.path}: folder {self.path.parent} does not exist")
        if not (fps > 0 and res >= 8):
            raise ValueError(f"export needs fps > 0 and res >= 8 (got fps={fps}, res={res})")
        if len(timeline) == 0:
            raise ValueError("the timeline has no keyframes to export")
        self.to_frame = to_frame or timeline.to_frame
        if self.to_frame is None:
            raise ValueError("this timeline has no parameter space to build frames")
        self.timeline, self.render_image, self.fps, self.res = timeline, render_image, float(fps), int(res)
        self.start = timeline.bounds()[0]
        self.total = int(math.floor(timeline.duration * self.fps + 1e-6)) + 1
        self.done = 0
        self._tmp = self.path.with_name(f".{self.path.stem}.tmp.mp4")
        self._writer = None
        self._size: tuple[int, int] | None = None

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def progress(self) -> float:
        return self.done / self.total

    def _write(self, img: np.ndarray) -> None:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] < 3:
            raise ValueError(f"renderer returned an image of shape {img.shape}, expected [H, W, 3]")
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
        # yuv420p needs even sizes: repeat the last row / column when odd
        h, w = img.shape[:2]
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._writer is None:
            import imageio_ffmpeg

            self._size = (img.shape[1], img.shape[0])
            self._writer = imageio_ffmpeg.write_frames(str(self._tmp), self._size, fps=self.fps, codec="libx264",
                                                       quality=8, macro_block_size=1, ffmpeg_log_level="error")
            self._writer.send(None)  # start the encoder
        elif (img.shape[1], img.shape[0]) != self._size:
            raise ValueError(f"renderer changed the image size to {img.shape[1]}x{img.shape[0]} during export")
        self._writer.send(np.ascontiguousarray(img))

    def step(self, max_frames: int = 1) -> bool:
        """Render and encode up to ``max_frames`` frames; returns True while frames remain.
        On the last frame the file is finalised and renamed into place."""
        try:
            for _ in range(max_frames):
                if self.finished:
                    break
                t = min(self.start + self.done / self.fps, self.timeline.bounds()[1])
                self._write(self.render_image(self.to_frame(self.timeline.evaluate(t)), self.res))
                self.done += 1
            if self.finished and self._writer is not None:
                self._writer.close()
                self._writer = None
                os.replace(self._tmp, self.path)
        except BaseException:
            self.cancel()
            raise
        return not self.finished

    def cancel(self) -> None:
        """Stop and delete the partial file."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001  (the encoder may already be gone; the file is discarded anyway)
                pass
            self._writer = None
        self._tmp.unlink(missing_ok=True)


def export_mp4(timeline: Timeline, render_image: Callable, path: str | Path, fps: float = 25.0, res: int = 256,
               progress_cb: Callable[[int, int], None] | None = None, to_frame: Callable | None = None) -> Path:
    """Render the whole timeline to ``path`` (MP4, H.264) via ``render_image(frame, res)``.

    ``progress_cb(done, total)`` is called after each frame. Returns the written path.
    """
    ex = Mp4Exporter(timeline, render_image, path, fps, res, to_frame)
    while not ex.finished:
        ex.step()
        if progress_cb is not None:
            progress_cb(ex.done, ex.total)
    return ex.path
