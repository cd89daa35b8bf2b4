"""Puppeteering logic: the slider parameter space of an avatar, training-sequence playback, and
the controller behind the Puppet tab (no GUI code here).

The slider vector (``ParameterSpace.values``, [D] float64) is laid out as:
    expressions (E, in the avatar's order) | jaw (3) | neck (3) | eyes (2) | eyelids (2) | head (3)
and maps to :class:`FrameParams` (B=1) as:
    expr[0, i]           <- expression i
    pose[0, 2]           <- jaw (x: open, y: sideways, z: twist), axis-angle radians
    pose[0, 1]           <- neck (x: pitch, y: yaw, z: roll)
    pose[0, 3] = pose[0, 4] <- (eyes pitch, eyes yaw, 0): one gaze drives both eye joints
    eyelids[0]           <- (eyelid R, eyelid L)
    pose[0, 0]           <- head = root joint (pitch, yaw, roll)
    transl               <- 0
Frame: +y up, +z out of the face, so positive pitch tilts down and positive yaw turns towards
the subject's left (+x).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from hravatar.avatar.gaussians import FrameParams

from .animation import Playhead, PlayheadControls, Timeline

#: ARKit blendshape stems (lower case, side suffix removed): their weights live in [0, 1].
ARKIT_STEMS = frozenset({
    "browdown", "browinnerup", "browouterup", "cheekpuff", "cheeksquint", "eyeblink", "eyelookdown",
    "eyelookin", "eyelookout", "eyelookup", "eyesquint", "eyewide", "jawforward", "jawleft", "jawopen",
    "jawright", "mouthclose", "mouthdimple", "mouthfrown", "mouthfunnel", "mouthleft", "mouthlowerdown",
    "mouthpress", "mouthpucker", "mouthright", "mouthrolllower", "mouthrollupper", "mouthshruglower",
    "mouthshrugupper", "mouthsmile", "mouthstretch", "mouthupperup", "nosesneer", "tongueout",
})
#: Sub-groups of ARKit expressions in the UI, by name prefix.
_EXPR_GROUPS = (("brow", "Brows"), ("eye", "Eyes (shapes)"), ("cheek", "Cheeks & nose"), ("nose", "Cheeks & nose"),
                ("jaw", "Jaw (shapes)"), ("mouth", "Mouth"), ("tongue", "Mouth"))
#: Expressions without ARKit names (e.g. FLAME's PCA modes) get a signed range, split in chunks.
PCA_RANGE = 2.0
PCA_CHUNK = 16

# (slider name, group, pose joint, axis, lo, hi): realistic joint limits in radians
_POSE_SLIDERS = (
    ("jaw open", "Jaw", 2, 0, 0.0, 0.5),
    ("jaw sideways", "Jaw", 2, 1, -0.15, 0.15),
    ("jaw twist", "Jaw", 2, 2, -0.1, 0.1),
    ("neck pitch", "Neck", 1, 0, -0.5, 0.5),
    ("neck yaw", "Neck", 1, 1, -0.6, 0.6),
    ("neck roll", "Neck", 1, 2, -0.4, 0.4),
)
_EYE_SLIDERS = (("eyes pitch", 0, -0.4, 0.4), ("eyes yaw", 1, -0.6, 0.6))  # ~ +-23 deg / +-34 deg
_EYELID_SLIDERS = (("eyelid R", 0), ("eyelid L", 1))
_HEAD_SLIDERS = (("head pitch", 0, -0.6, 0.6), ("head yaw", 1, -1.0, 1.0), ("head roll", 2, -0.5, 0.5))
#: Group display order: the few pose groups first, expressions after.
POSE_GROUP_ORDER = ("Head", "Jaw", "Eyes", "Eyelids", "Neck")


@dataclass(frozen=True)
class SliderSpec:
    """One slider: ``name`` (unique, used in JSON files), ``group`` (UI section), range and default.

    kind / index / axis say where the value goes: ("expr", i, -1), ("pose", joint, axis),
    ("eyes", -1, axis), ("eyelids", i, -1).
    """

    name: str
    group: str
    lo: float
    hi: float
    default: float
    kind: str
    index: int
    axis: int = -1


def arkit_stem(name: str) -> str | None:
    """The ARKit stem of an expression name ('mouthSmile_L' -> 'mouthsmile'), or None."""
    n = name.lower().replace("_", "")
    for suffix in ("left", "right", "l", "r"):
        if n.endswith(suffix) and n[: -len(suffix)] in ARKIT_STEMS:
            return n[: -len(suffix)]
    return n if n in ARKIT_STEMS else None


def _mirror_name(name: str) -> str | None:
    """The other side of a paired expression name ('browDown_L' <-> 'browDown_R')."""
    for a, b in (("_L", "_R"), ("_R", "_L"), ("Left", "Right"), ("Right", "Left"), ("_l", "_r"), ("_r", "_l")):
        if name.endswith(a):
            return name[: -len(a)] + b
    return None


class ParameterSpace:
    """The sliders of an avatar and the mapping between slider values and :class:`FrameParams`.

    Args:
        expr_names: the avatar's expression names (``avatar.expr_names``); unnamed / missing
            components are called "expr 12".
        num_expr: E, the number of expression components.
        device: device of the frames built by :meth:`to_frame`.
    Attributes:
        specs: [D] :class:`SliderSpec`; values: [D] current slider values (float64).
    """

    def __init__(self, expr_names: Sequence[str] | None, num_expr: int, device: torch.device | str | None = None) -> None:
        names = list(expr_names or [])
        if len(names) != num_expr:
            names = [f"expr {i}" for i in range(num_expr)]
        self.num_expr = num_expr
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        specs: list[SliderSpec] = []
        taken: set[str] = set()

        def unique(n: str) -> str:
            out, k = n, 2
            while out in taken:
                out, k = f"{n} ({k})", k + 1
            taken.add(out)
            return out

        pose_names = {s[0] for s in _POSE_SLIDERS + _EYE_SLIDERS + _EYELID_SLIDERS + _HEAD_SLIDERS}
        taken |= pose_names  # expression names never shadow the fixed pose names
        for i, n in enumerate(names):
            if arkit_stem(n):
                group = next((g for p, g in _EXPR_GROUPS if n.lower().startswith(p)), "Other shapes")
                specs.append(SliderSpec(unique(n), group, 0.0, 1.0, 0.0, "expr", i))
            else:
                lo = (i // PCA_CHUNK) * PCA_CHUNK
                group = f"Expression {lo}-{min(lo + PCA_CHUNK, num_expr) - 1}"
                specs.append(SliderSpec(unique(n), group, -PCA_RANGE, PCA_RANGE, 0.0, "expr", i))
        for n, g, j, a, lo, hi in _POSE_SLIDERS:
            specs.append(SliderSpec(n, g, lo, hi, 0.0, "pose", j, a))
        for n, a, lo, hi in _EYE_SLIDERS:
            specs.append(SliderSpec(n, "Eyes", lo, hi, 0.0, "eyes", -1, a))
        for n, i in _EYELID_SLIDERS:
            specs.append(SliderSpec(n, "Eyelids", 0.0, 1.0, 0.0, "eyelids", i))
        for n, a, lo, hi in _HEAD_SLIDERS:
            specs.append(SliderSpec(n, "Head", lo, hi, 0.0, "pose", 0, a))
        self.specs = specs
        self.names = [s.name for s in specs]
        self._index = {n: i for i, n in enumerate(self.names)}
        self.values = self.defaults()

    @classmethod
    def for_avatar(cls, avatar, device=None) -> "ParameterSpace":
        """Sliders for a :class:`GaussianAvatar` (frames on its device unless ``device`` is given)."""
        return cls(avatar.expr_names, avatar.num_expr, device if device is not None else avatar.device)

    @classmethod
    def for_bundle(cls, bundle, device=None) -> "ParameterSpace":
        """Sliders for an AvatarBundle; ranges widened to cover its tracked training sequence."""
        space = cls.for_avatar(bundle.avatar, device)
        if bundle.sequence is not None and bundle.sequence.expr.shape[0] > 0:
            space.widen_to(bundle.sequence)
        return space

    # ---------------------------------------------------------------- layout
    @property
    def dim(self) -> int:
        return len(self.specs)

    def index(self, name: str) -> int:
        """Position of the slider called ``name`` (KeyError if none)."""
        return self._index[name]

    def defaults(self) -> np.ndarray:
        return np.array([s.default for s in self.specs], np.float64)

    def lows(self) -> np.ndarray:
        return np.array([s.lo for s in self.specs], np.float64)

    def highs(self) -> np.ndarray:
        return np.array([s.hi for s in self.specs], np.float64)

    def clamp(self, values: np.ndarray) -> np.ndarray:
        return np.clip(values, self.lows(), self.highs())

    def groups(self) -> list[tuple[str, list[int]]]:
        """[(group name, slider indices)] in display order: pose groups, then expression groups."""
        order = list(POSE_GROUP_ORDER) + list(dict.fromkeys(g for _, g in _EXPR_GROUPS))
        out: dict[str, list[int]] = {g: [] for g in order}
        for i, s in enumerate(self.specs):
            out.setdefault(s.group, []).append(i)
        return [(g, idx) for g, idx in out.items() if idx]

    def rotation_groups(self) -> list[tuple[int, int, int]]:
        """Index triples (x, y, z) of the full axis-angle joints (head/root, neck, jaw) in the vector."""
        out = []
        for joint in (0, 1, 2):
            idx = [i for i, s in enumerate(self.specs) if s.kind == "pose" and s.index == joint]
            out.append(tuple(sorted(idx, key=lambda i: self.specs[i].axis)))
        return out

    def widen_to(self, frames: FrameParams) -> None:
        """Extend the slider ranges to cover the values of ``frames`` (any B), rounded out to 0.05."""
        vals = np.stack([self.from_frame(frames, b) for b in range(frames.expr.shape[0])])
        lo = np.floor(vals.min(0) / 0.05) * 0.05
        hi = np.ceil(vals.max(0) / 0.05) * 0.05
        self.specs = [replace(s, lo=min(s.lo, float(lo[i])), hi=max(s.hi, float(hi[i]))) for i, s in enumerate(self.specs)]

    # ---------------------------------------------------------------- mapping
    def to_frame(self, values: np.ndarray | None = None) -> FrameParams:
        """FrameParams (B=1, float32, on ``self.device``) from [D] values (default: current)."""
        v = self.values if values is None else np.asarray(values, np.float64).reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"{v.shape[0]} values for {self.dim} parameters")
        expr = np.zeros(self.num_expr)
        pose = np.zeros((5, 3))
        eyelids = np.zeros(2)
        for x, s in zip(v, self.specs):
            if s.kind == "expr":
                expr[s.index] = x
            elif s.kind == "pose":
                pose[s.index, s.axis] = x
            elif s.kind == "eyes":
                pose[3, s.axis] = pose[4, s.axis] = x
            else:
                eyelids[s.index] = x
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)[None]  # noqa: E731
        return FrameParams(t(expr), t(pose), t(eyelids), torch.zeros(1, 3, device=self.device))

    def from_frame(self, frame: FrameParams, b: int = 0) -> np.ndarray:
        """[D] values of batch entry ``b`` of ``frame`` (not clamped). The eye sliders take the mean
        of both eye joints; eye roll and translation have no slider and are dropped."""
        expr = frame.expr[b].detach().double().cpu().numpy()
        pose = frame.pose[b].detach().double().cpu().numpy()
        eyelids = frame.eyelids[b].detach().double().cpu().numpy()
        out = np.zeros(self.dim)
        for i, s in enumerate(self.specs):
            if s.kind == "expr":
                out[i] = expr[s.index] if s.index < expr.shape[0] else 0.0
            elif s.kind == "pose":
                out[i] = pose[s.index, s.axis]
            elif s.kind == "eyes":
                out[i] = 0.5 * (pose[3, s.axis] + pose[4, s.axis])
            else:
                out[i] = eyelids[s.index]
        return out

    # ---------------------------------------------------------------- editing
    def set_value(self, key: int | str, value: float) -> None:
        """Set one slider (by index or name), clamped to its range."""
        i = self.index(key) if isinstance(key, str) else int(key)
        s = self.specs[i]
        self.values[i] = min(max(float(value), s.lo), s.hi)

    def set_values(self, values: np.ndarray) -> None:
        v = np.asarray(values, np.float64).reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"{v.shape[0]} values for {self.dim} parameters")
        self.values = v.copy()

    def reset(self) -> np.ndarray:
        """All sliders to their defaults (neutral face, rest pose); returns the values."""
        self.values = self.defaults()
        return self.values.copy()

    def randomize(self, generator: np.random.Generator | int | None = None, amount: float = 0.5) -> np.ndarray:
        """A plausible random face: a few expressions (paired sides mostly together), small head,
        neck and gaze rotations, sometimes an open jaw or half-closed lids. ``amount`` in [0, 1]
        scales everything (0 = neutral). Sets and returns the values."""
        rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
        amount = float(np.clip(amount, 0.0, 1.0))
        v = self.defaults()
        expr_idx = [i for i, s in enumerate(self.specs) if s.kind == "expr"]
        if expr_idx:
            k = min(len(expr_idx), 1 + int(rng.poisson(1.5)))
            for i in rng.choice(expr_idx, size=k, replace=False):
                s = self.specs[i]
                if s.lo >= 0:  # blendshape weight
                    v[i] = rng.uniform(0.3, 1.0) * s.hi * amount
                    other = _mirror_name(s.name)
                    if other in self._index and rng.random() < 0.7:
                        v[self._index[other]] = v[i] * rng.uniform(0.8, 1.0)
                else:  # signed PCA coefficient
                    v[i] = rng.normal(0.0, 0.5) * s.hi * amount
        for i, s in enumerate(self.specs):
            if s.kind == "pose" and s.name == "jaw open":
                v[i] = rng.uniform(0.0, s.hi) * amount if rng.random() < 0.5 else 0.0
            elif s.kind in ("pose", "eyes"):
                v[i] = rng.normal(0.0, 0.25) * max(abs(s.lo), abs(s.hi)) * amount
        lids = [i for i, s in enumerate(self.specs) if s.kind == "eyelids"]
        if lids and rng.random() < 0.25:
            v[lids] = rng.uniform(0.0, 0.6) * amount
        self.values = self.clamp(v)
        return self.values.copy()


class SequencePlayer(PlayheadControls):
    """Plays a tracked sequence (``bundle.sequence``, B = T frames) at ``fps``, loop or once.

    Frame ``i`` is shown for times [i / fps, (i + 1) / fps); ``clock`` is the time source.
    """

    def __init__(self, sequence: FrameParams, fps: float = 25.0, loop: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if sequence.expr.shape[0] == 0:
            raise ValueError("the sequence has no frames")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.sequence = sequence
        self.fps = float(fps)
        self.playhead = Playhead(lambda: (0.0, self.duration), clock, loop)

    @property
    def num_frames(self) -> int:
        return self.sequence.expr.shape[0]

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def seek_frame(self, i: int) -> None:
        self.playhead.seek((int(i) % self.num_frames) / self.fps)

    def frame_index(self, t: float | None = None) -> int:
        """Index of the frame shown at ``t`` (default: now)."""
        t = self.now() if t is None else t
        return int(min(max(np.floor(t * self.fps + 1e-9), 0), self.num_frames - 1))

    def frame(self, t: float | None = None, device=None) -> FrameParams:
        """The sequence frame at ``t`` (default: now) as FrameParams (B=1)."""
        i = self.frame_index(t)
        s = self.sequence
        f = FrameParams(s.expr[i:i + 1].clone(), s.pose[i:i + 1].clone(), s.eyelids[i:i + 1].clone(), s.transl[i:i + 1].clone())
        return f.to(device) if device is not None else f


def sequence_fps(bundle, default: float = 25.0) -> float:
    """The frame rate of the bundle's training video when its metadata records one."""
    fps = (bundle.meta.get("data") or {}).get("fps") if isinstance(bundle.meta, dict) else None
    return float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0 else default


class PuppetController:
    """State behind the Puppet tab: manual sliders, training-sequence playback, and the keyframe
    timeline. The UI calls these methods from its callbacks and :meth:`tick` once per frame;
    every method that changes what is shown returns the FrameParams to display (or None).

    Modes: "manual" (sliders), "sequence" (training sequence playing), "timeline" (animation
    playing). Touching a slider stops playback.
    """

    def __init__(self, bundle, device=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.bundle = bundle
        self.space = ParameterSpace.for_bundle(bundle, device)
        self.timeline = Timeline.for_space(self.space, clock)
        self.player = (SequencePlayer(bundle.sequence, sequence_fps(bundle), True, clock)
                       if bundle.sequence is not None and bundle.sequence.expr.shape[0] > 0 else None)
        self.mode = "manual"
        self.scrub_time = 0.0
        self.version = 0  # bumped whenever the slider values change (the UI re-syncs its widgets)
        self._last_index = -1

    def rebind(self, bundle, device=None) -> None:
        """Switch to another avatar, carrying the animation over by parameter name."""
        timeline = self.timeline
        self.__init__(bundle, device, self.clock)
        self.timeline = timeline.remapped(self.space)

    def _changed(self) -> FrameParams:
        self.version += 1
        return self.space.to_frame()

    def _stop_playback(self) -> None:
        if self.player is not None:
            self.player.pause()
        self.timeline.pause()
        self.mode = "manual"

    # ---------------------------------------------------------------- sliders
    def set_value(self, key: int | str, value: float) -> FrameParams:
        self._stop_playback()
        self.space.set_value(key, value)  # no version bump: the widget already shows it, others are unchanged
        return self.space.to_frame()

    def reset(self) -> FrameParams:
        self._stop_playback()
        self.space.reset()
        return self._changed()

    def randomize(self, generator: np.random.Generator | int | None = None, amount: float = 0.5) -> FrameParams:
        self._stop_playback()
        self.space.randomize(generator, amount)
        return self._changed()

    def follow(self, frame: FrameParams) -> None:
        """Show ``frame`` (set by another source) on the sliders without taking over the driving:
        playback is left alone and nothing is returned to show."""
        self.space.set_values(self.space.from_frame(frame))
        self.version += 1

    def capture(self, frame: FrameParams) -> FrameParams:
        """Take the sliders from a frame (e.g. the one the webcam is showing)."""
        self._stop_playback()
        self.space.set_values(self.space.from_frame(frame))
        return self._changed()

    # ---------------------------------------------------------------- training sequence
    def play_sequence(self, on: bool) -> FrameParams | None:
        if self.player is None:
            return None
        if not on:
            self._stop_playback()
            return None
        self.timeline.pause()
        self.mode = "sequence"
        self._last_index = -1
        self.player.play()
        return self.tick()

    # ---------------------------------------------------------------- timeline
    def add_key(self, t: float | None = None) -> int:
        """Key the current slider values at ``t`` (default: the scrubber time)."""
        return self.timeline.add_key(self.scrub_time if t is None else t, self.space.values)

    def remove_key(self, index: int) -> None:
        self.timeline.remove_key(index)

    def scrub(self, t: float) -> FrameParams | None:
        """Move the scrubber; with keys, the sliders follow the animation there."""
        self.scrub_time = max(0.0, float(t))
        if self.mode == "sequence":
            self._stop_playback()
        self.timeline.seek(self.scrub_time)
        if len(self.timeline) == 0:
            return None
        self.space.set_values(self.timeline.evaluate(self.scrub_time))
        return self._changed()

    def goto_key(self, index: int) -> FrameParams | None:
        return self.scrub(self.timeline.times[index])

    def play_timeline(self, on: bool) -> FrameParams | None:
        if not on:
            self._stop_playback()
            return None
        if len(self.timeline) < 2:
            return None
        if self.player is not None:
            self.player.pause()
        self.mode = "timeline"
        self.timeline.play()
        return self.tick()

    # ---------------------------------------------------------------- per UI frame
    def tick(self) -> FrameParams | None:
        """Advance playback; the frame to show when it changed, else None."""
        if self.mode == "sequence" and self.player is not None:
            i = self.player.frame_index()
            if not self.player.playing:
                self.mode = "manual"
            if i == self._last_index:
                return None
            self._last_index = i
            frame = self.player.frame(device=self.space.device)
            self.space.set_values(self.space.from_frame(frame))
            self.version += 1
            return frame
        if self.mode == "timeline":
            t = self.timeline.now()
            if not self.timeline.playing:
                self.mode = "manual"
            self.scrub_time = t
            self.space.set_values(self.timeline.evaluate(t))
            return self._changed()
        return None


class FrameFollower:
    """When the Puppet sliders should take over a frame that something else showed (webcam
    driving, another panel, a script): throttled, and never while the user works a slider.

    Args:
        own_source: the ``source`` name the Puppet tab passes to ``ctx.set_frame`` (its own frames are skipped).
        interval_s: at most one update per interval (the sliders need not follow at render rate).
        hold_s: after the user's last slider change, wait this long before following again.
        clock: monotonic seconds (tests inject a fake).
    """

    def __init__(self, own_source: str = "puppet", interval_s: float = 0.25, hold_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.own_source = own_source
        self.interval_s = float(interval_s)
        self.hold_s = float(hold_s)
        self.clock = clock
        self._seen = None  # the frame counter last dealt with
        self._last_sync = -float("inf")
        self._last_user = -float("inf")

    def user_changed(self) -> None:
        """The user just moved a slider (the frame shown is the panel's own)."""
        self._last_user = self.clock()

    def should_follow(self, frame_seq: int, source: str, user_active: bool | Callable[[], bool] = False) -> bool:
        """True when the sliders should now be updated to the frame shown.

        ``frame_seq`` counts the frames set so far (any source), ``source`` is the newest one's
        source, ``user_active`` says a slider is being worked right now (a callable is only
        called when everything else says yes).
        """
        if frame_seq == self._seen:
            return False
        if source == self.own_source:
            self._seen = frame_seq  # the sliders already show it
            return False
        now = self.clock()
        if now - self._last_user < self.hold_s or now - self._last_sync < self.interval_s:
            return False  # later: the newest frame is picked up then
        if user_active() if callable(user_active) else user_active:
            return False
        self._seen = frame_seq
        self._last_sync = now
        return True
