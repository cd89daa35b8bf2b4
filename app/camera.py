"""Orbit camera for the viewport: orbit / pan / dolly / field of view, reset, framing, saved views.

Conventions follow :mod:`hravatar.render.camera`: +y up, the face looks along +z, cameras are
OpenCV world->camera matrices (x right, y down, z forward). Yaw 0 / pitch 0 puts the eye on the
+z side of the target (in front of the face); positive yaw moves the eye towards +x, positive
pitch moves it up.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from hravatar.render.camera import Camera, intrinsics_from_fov, look_at

#: Pitch is kept away from the poles, where the look-at basis (up = +y) degenerates.
MAX_PITCH_DEG = 89.0
MIN_FOV_DEG, MAX_FOV_DEG = 5.0, 90.0


@dataclass(frozen=True)
class OrbitState:
    """Everything that defines the view (immutable, so saved views cannot be mutated by accident).

    target: (x, y, z) orbit centre in world metres; yaw/pitch in degrees; distance in metres
    from the target to the eye; fov_y_deg the vertical field of view.
    """

    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    distance: float = 1.0
    fov_y_deg: float = 20.0

    def eye(self) -> tuple[float, float, float]:
        """Eye position (world) on the sphere of radius ``distance`` around ``target``."""
        y, p = math.radians(self.yaw_deg), math.radians(self.pitch_deg)
        d = (math.sin(y) * math.cos(p), math.sin(p), math.cos(y) * math.cos(p))
        return tuple(t + self.distance * c for t, c in zip(self.target, d))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict) -> "OrbitState":
        return OrbitState(tuple(float(x) for x in d["target"]), float(d["yaw_deg"]), float(d["pitch_deg"]),
                          float(d["distance"]), float(d["fov_y_deg"]))


def _wrap_deg(a: float) -> float:
    """Angle in (-180, 180]."""
    a = math.fmod(a + 180.0, 360.0)
    if a <= 0.0:
        a += 360.0
    return a - 180.0


def state_from_camera(camera: Camera, target_distance: float) -> OrbitState:
    """Orbit state reproducing a camera's eye and viewing direction.

    The target is placed ``target_distance`` in front of the eye along the optical axis; the
    field of view comes from the vertical focal length. (Roll is not representable and is dropped.)
    """
    vm = camera.viewmat.detach().double().cpu()
    R = vm[:3, :3]
    eye = -R.T @ vm[:3, 3]
    fwd = R[2]  # camera z axis in world coordinates
    target = eye + fwd * target_distance
    back = -fwd  # from target towards the eye
    pitch = math.degrees(math.asin(max(-1.0, min(1.0, float(back[1])))))
    yaw = math.degrees(math.atan2(float(back[0]), float(back[2])))
    fy = float(camera.K[1, 1])
    fov = math.degrees(2.0 * math.atan(0.5 * camera.height / fy))
    return OrbitState(tuple(float(x) for x in target), yaw, max(-MAX_PITCH_DEG, min(MAX_PITCH_DEG, pitch)),
                      float(target_distance), fov)


class OrbitController:
    """Mutable orbit camera with a home view and named saved views.

    Args:
        home: the view that :meth:`reset` returns to.
        min_distance, max_distance: dolly limits (metres).
    """

    def __init__(self, home: OrbitState | None = None, min_distance: float = 0.05, max_distance: float = 50.0) -> None:
        self.home = home or OrbitState()
        self.state = self.home
        self.min_distance = min_distance
        self.max_distance = max_distance
        self.saved: dict[str, OrbitState] = {}
        self.version = 0  # bumped on every change: the viewer uses it as a cache key

    # ------------------------------------------------------------------ state changes
    def set_state(self, state: OrbitState) -> None:
        pitch = max(-MAX_PITCH_DEG, min(MAX_PITCH_DEG, state.pitch_deg))
        dist = max(self.min_distance, min(self.max_distance, state.distance))
        fov = max(MIN_FOV_DEG, min(MAX_FOV_DEG, state.fov_y_deg))
        new = replace(state, yaw_deg=_wrap_deg(state.yaw_deg), pitch_deg=pitch, distance=dist, fov_y_deg=fov)
        if new != self.state:
            self.state = new
            self.version += 1

    def orbit(self, d_yaw_deg: float, d_pitch_deg: float) -> None:
        """Turn the eye around the target (degrees)."""
        s = self.state
        self.set_state(replace(s, yaw_deg=s.yaw_deg + d_yaw_deg, pitch_deg=s.pitch_deg + d_pitch_deg))

    def pan(self, dx: float, dy: float) -> None:
        """Move target and eye together along the camera's right (+dx) and up (+dy) axes (metres)."""
        right, up, _ = self.axes()
        t = tuple(c + dx * r + dy * u for c, r, u in zip(self.state.target, right, up))
        self.set_state(replace(self.state, target=t))

    def pan_pixels(self, dx_px: float, dy_px: float, viewport_height_px: int) -> None:
        """Pan so that the point at the target follows the mouse (drag right/down by pixels)."""
        m_per_px = 2.0 * self.state.distance * math.tan(math.radians(self.state.fov_y_deg) / 2) / max(1, viewport_height_px)
        # dragging right moves the scene right, i.e. the camera left
        self.pan(-dx_px * m_per_px, dy_px * m_per_px)

    def dolly(self, factor: float) -> None:
        """Multiply the eye distance by ``factor`` (< 1 moves closer); the target stays."""
        self.set_state(replace(self.state, distance=self.state.distance * factor))

    def zoom_steps(self, steps: float, per_step: float = 0.9) -> None:
        """Mouse-wheel zoom: each step towards the target scales the distance by ``per_step``."""
        self.dolly(per_step ** steps)

    def set_fov(self, fov_y_deg: float) -> None:
        self.set_state(replace(self.state, fov_y_deg=fov_y_deg))

    def reset(self) -> None:
        self.set_state(self.home)

    def frame(self, centre, radius: float, margin: float = 1.05) -> None:
        """Keep the direction and field of view, centre ``centre`` and fit a sphere of ``radius``."""
        s = self.state
        half = math.radians(s.fov_y_deg) / 2
        dist = margin * radius / math.sin(half)
        self.set_state(replace(s, target=tuple(float(c) for c in centre), distance=dist))

    # ------------------------------------------------------------------ saved views
    def save_view(self, name: str) -> None:
        name = name.strip()
        if not name:
            raise ValueError("a saved view needs a name")
        self.saved[name] = self.state

    def restore_view(self, name: str) -> None:
        if name not in self.saved:
            raise KeyError(f"no saved view named '{name}'")
        self.set_state(self.saved[name])

    def delete_view(self, name: str) -> None:
        self.saved.pop(name, None)

    def view_names(self) -> list[str]:
        return list(self.saved)

    # ------------------------------------------------------------------ geometry
    def axes(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """World-space (right, up, forward) unit vectors of the current view."""
        y, p = math.radians(self.state.yaw_deg), math.radians(self.state.pitch_deg)
        back = (math.sin(y) * math.cos(p), math.sin(p), math.cos(y) * math.cos(p))
        fwd = tuple(-c for c in back)
        # right = fwd x (0, 1, 0), normalised (as look_at); up = right x fwd
        n = math.hypot(fwd[0], fwd[2]) or 1.0
        r = (-fwd[2] / n, 0.0, fwd[0] / n)
        u = (r[1] * fwd[2] - r[2] * fwd[1], r[2] * fwd[0] - r[0] * fwd[2], r[0] * fwd[1] - r[1] * fwd[0])
        return r, u, fwd

    def camera(self, width: int, height: int, device=None) -> Camera:
        """The :class:`Camera` of the current view for a ``width`` x ``height`` image."""
        s = self.state
        return Camera(look_at(s.eye(), s.target, device=device), intrinsics_from_fov(s.fov_y_deg, width, height, device=device),
                      int(width), int(height))


def home_state_for(bundle, fov_y_deg: float = 20.0, fit_factor: float = 0.85) -> OrbitState:
    """Home view of an avatar: the training camera's view when the checkpoint has one, else a
    front view framing the head (as :func:`hravatar.api.default_camera`).

    The orbit target is the head centre (projected on the training camera's axis), so orbiting
    turns around the head; the distance is at least ``fit_factor`` x the one that fits the
    head's bounding sphere.
    """
    from hravatar.api import head_bounds

    centre, radius = head_bounds(bundle.avatar)
    centre = centre.detach().double().cpu()
    if bundle.camera is not None:
        cam = bundle.camera
        eye = cam.position.detach().double().cpu()
        fwd = cam.viewmat[2, :3].detach().double().cpu()
        depth = float((centre - eye) @ fwd)
        if depth > 1e-3:
            s = state_from_camera(cam, depth)
            # training crops are tight (often cutting the top of the head): back off until the head fits
            fit = fit_factor * radius / math.sin(math.radians(s.fov_y_deg) / 2)
            return replace(s, distance=max(s.distance, fit))
    dist = radius / math.sin(math.radians(fov_y_deg) / 2) * 0.95
    return OrbitState(tuple(float(c) for c in centre), 0.0, 0.0, float(dist), fov_y_deg)


class ViewportNavigator:
    """Turns mouse / key input on the viewport into orbit-controller calls (no GUI code).

    Left drag orbits, right or middle drag pans, the wheel zooms; a drag only starts when the
    press happens over the viewport. ``degrees_per_pixel`` sets the orbit speed.
    """

    LEFT, RIGHT, MIDDLE = 0, 1, 2

    def __init__(self, orbit: OrbitController, degrees_per_pixel: float = 0.4, key_step_deg: float = 5.0) -> None:
        self.orbit = orbit
        self.degrees_per_pixel = degrees_per_pixel
        self.key_step_deg = key_step_deg
        self._drag: int | None = None
        self._last: tuple[float, float] | None = None

    @property
    def dragging(self) -> bool:
        return self._drag is not None

    def press(self, button: int, pos: tuple[float, float], over_viewport: bool) -> None:
        if over_viewport and self._drag is None:
            self._drag, self._last = button, (float(pos[0]), float(pos[1]))

    def release(self, button: int) -> None:
        if self._drag == button:
            self._drag, self._last = None, None

    def move(self, pos: tuple[float, float], viewport_height_px: int) -> None:
        if self._drag is None or self._last is None:
            return
        dx, dy = pos[0] - self._last[0], pos[1] - self._last[1]
        self._last = (float(pos[0]), float(pos[1]))
        if dx == 0 and dy == 0:
            return
        if self._drag == self.LEFT:
            # drag right -> the head turns right (eye moves left); drag down -> look from above
            self.orbit.orbit(-dx * self.degrees_per_pixel, dy * self.degrees_per_pixel)
        else:
            self.orbit.pan_pixels(dx, dy, viewport_height_px)

    def wheel(self, steps: float, over_viewport: bool) -> None:
        if over_viewport and steps:
            self.orbit.zoom_steps(steps)

    def key(self, name: str, frame_fn=None) -> bool:
        """Apply a key ("left", "right", "up", "down", "r", "f"); returns whether it was used.

        ``frame_fn`` is called for "f" (framing needs the avatar's bounds, which the viewer has).
        """
        k = self.key_step_deg
        if name == "left":
            self.orbit.orbit(-k, 0.0)
        elif name == "right":
            self.orbit.orbit(k, 0.0)
        elif name == "up":
            self.orbit.orbit(0.0, k)
        elif name == "down":
            self.orbit.orbit(0.0, -k)
        elif name == "r":
            self.orbit.reset()
        elif name == "f" and frame_fn is not None:
            frame_fn()
        else:
            return False
        return True


def camera_key(state: OrbitState, width: int, height: int) -> tuple:
    """Hashable identity of a view (for render caches)."""
    return (state, int(width), int(height))


__all__ = ["OrbitController", "OrbitState", "ViewportNavigator", "camera_key", "home_state_for", "state_from_camera"]
