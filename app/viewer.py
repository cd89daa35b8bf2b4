"""Viewer state, the cached frame renderer and the render worker thread.

* :class:`ViewerController` holds what the viewport shows (avatar, driving frame, camera, channel,
  lighting controls, material edits, background, compare split) and produces immutable
  :class:`ViewState` snapshots; every change bumps a version so the UI knows when to re-render.
* :class:`FrameRenderer` renders a snapshot. It caches the G-buffers (deform + rasterize, the
  expensive part) per (avatar, camera, frame) and the shading per (G-buffers, environment,
  rotation, material), so dragging a lighting, exposure or material slider only re-shades or
  re-tone-maps the covered pixels.
* :class:`RenderWorker` runs the renderer on its own thread and always renders the newest
  submitted snapshot (older pending requests are dropped), publishing :class:`Frame` results.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, TypeVar

import numpy as np
import torch

from hravatar.avatar.gaussians import FrameParams
from hravatar.render.camera import Camera
from hravatar.render.pipeline import (
    CHANNELS,
    AvatarRenderer,
    MaterialEdit,
    apply_material_edit,
    channel_image,
    render_gbuffers,
)

from .camera import OrbitController, ViewportNavigator, camera_key, home_state_for
from .lighting import EnvironmentLibrary, to_display

T = TypeVar("T")

#: Channels computed by shading (they need an environment and are tone-mapped).
SHADED_CHANNELS = ("shaded", "diffuse", "specular", "irradiance")
#: Background modes: a flat colour, the environment blurred, or transparency (checkerboard on screen).
BACKGROUNDS = ("colour", "environment", "transparent")
#: Roughness of the prefiltered level used for the blurred-environment background.
BACKGROUND_BLUR = 0.55
MATERIAL_LIMITS = {"rough_scale": (0.0, 3.0), "f0_edit": (0.0, 1.0), "saturation": (0.0, 2.0)}


def off_ui_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` on a short-lived thread and return its result (its exception is re-raised).

    Heavy tensor work (opening a checkpoint, framing the head) must not run on the UI thread:
    with GNU OpenMP (PyTorch's CPU build) every long-lived thread that runs a parallel op keeps
    its own worker pool, and once the pools hold more threads than there are cores OpenMP stops
    spinning between ops, so every small op of the render worker waits for a thread wake-up
    (measured: deformation 8 -> 16 ms, a whole 256 px frame 55 -> 75 ms on 2 cores). A thread
    that ends takes its pool with it, and the render worker keeps the only one.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001  - handed back to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="tensor-setup", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ViewState:
    """Everything one render needs (a snapshot; the UI keeps changing the controller meanwhile).

    camera: the view at the render size; frame: B=1 driving parameters; env: prefiltered
    environment (None when the channel does not need one and none is ready).
    """

    version: tuple
    renderer: AvatarRenderer
    camera: Camera
    camera_key: tuple
    frame: FrameParams
    frame_key: tuple
    env: object | None
    env_key: tuple
    tonemap: str
    channel: str = "shaded"
    rotation_deg: float = 0.0
    exposure: float = 0.0
    material: MaterialEdit = field(default_factory=MaterialEdit)
    background: str = "colour"
    background_colour: tuple[float, float, float] = (0.2, 0.2, 0.2)
    compare: bool = False
    compare_split: float = 0.5


@dataclass
class Frame:
    """A rendered viewport image.

    display: [H, W, 4] float32 RGBA in [0, 1] as shown (alpha 1; transparency drawn as a checkerboard).
    color: [H, W, 3] float32 display colour before compositing; alpha: [H, W] float32 coverage
    (together they give the transparent PNG). timings: ms per stage ("deform", "raster", "shade",
    "compose", "total"); version: the :class:`ViewState` version it shows; seq: publication counter;
    compare_split: where the original (left) and edited (right) halves meet, or None.
    """

    display: np.ndarray
    color: np.ndarray
    alpha: np.ndarray
    background: str
    timings: dict[str, float]
    version: tuple = ()
    seq: int = 0
    compare_split: float | None = None  # fraction of the width where original | edited meet (None: no compare)

    @property
    def width(self) -> int:
        return int(self.display.shape[1])

    @property
    def height(self) -> int:
        return int(self.display.shape[0])

    def rgb_uint8(self) -> np.ndarray:
        """[H, W, 3] uint8 of what is on screen."""
        return (self.display[..., :3] * 255.0 + 0.5).clip(0, 255).astype(np.uint8)

    def png_rgba(self) -> np.ndarray:
        """[H, W, 4] uint8 for saving: real transparency in transparent mode, opaque otherwise."""
        if self.background == "transparent":
            rgba = np.concatenate([self.color, self.alpha[..., None]], -1)
        else:
            rgba = self.display
        return (rgba * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def checkerboard(height: int, width: int, cell: int = 8, light: float = 0.42, dark: float = 0.30) -> torch.Tensor:
    """[H, W, 3] grey checkerboard (the usual picture of transparency)."""
    ys = torch.arange(height)[:, None] // cell
    xs = torch.arange(width)[None, :] // cell
    v = torch.where((ys + xs) % 2 == 0, light, dark).float()
    return v[..., None].expand(height, width, 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FrameRenderer:
    """Renders :class:`ViewState` snapshots with G-buffer and shading caches (one thread at a time).

    The image formation is that of :meth:`AvatarRenderer.render` (same G-buffers, shading, tone
    curve and compositing); material edits additionally show in the albedo / roughness / f0 channels.
    """

    def __init__(self) -> None:
        self._gkey: tuple | None = None
        self._gb = None
        self._cam: Camera | None = None
        self._shade: OrderedDict[tuple, dict] = OrderedDict()  # small LRU: edited + reference (compare)
        self._bg_key: tuple | None = None
        self._bg: torch.Tensor | None = None

    def clear(self) -> None:
        self.__init__()

    # ------------------------------------------------------------------ stages
    def _gbuffers(self, s: ViewState, t: dict) -> None:
        r = s.renderer
        key = (id(r), s.camera_key, s.frame_key)
        if key == self._gkey:
            return
        t0 = time.perf_counter()
        cam = s.camera.to(r.device)
        g = r.deform(s.frame)
        _sync(r.device)
        t1 = time.perf_counter()
        self._gb = render_gbuffers(g, cam, backend=r.backend)
        self._cam = cam
        _sync(r.device)
        t2 = time.perf_counter()
        self._gkey = key
        self._shade.clear()
        t["deform"], t["raster"] = (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def _shaded(self, s: ViewState, material: MaterialEdit) -> dict:
        mkey = (material.rough_scale, material.f0_edit, tuple(material.tint), material.saturation)
        key = (self._gkey, s.env_key, float(s.rotation_deg), mkey)
        out = self._shade.get(key)
        if out is None:
            out = s.renderer.shade(self._gb, self._cam, s.env, s.rotation_deg, material)
            self._shade[key] = out
            while len(self._shade) > 3:
                self._shade.popitem(last=False)
        else:
            self._shade.move_to_end(key)
        return out

    def _linear(self, s: ViewState, material: MaterialEdit) -> torch.Tensor:
        """[H, W, 3] linear channel image with ``material`` applied."""
        gb = self._gb
        if s.channel in SHADED_CHANNELS:
            return self._shaded(s, material)[s.channel]
        if s.channel in ("albedo", "roughness", "f0") and not material.is_identity():
            alb, rough, f0 = apply_material_edit(gb.albedo, gb.roughness, gb.f0, material)
            gb = replace(gb, albedo=alb, roughness=rough, f0=f0)
        return channel_image(s.channel, gb, None)

    def _display(self, s: ViewState, lin: torch.Tensor) -> torch.Tensor:
        if s.channel in SHADED_CHANNELS:
            return to_display(lin, s.tonemap, s.exposure)
        return lin.clamp(0, 1)

    def _background(self, s: ViewState, h: int, w: int) -> torch.Tensor:
        dev = s.renderer.device
        if s.background == "environment" and s.env is not None:
            key = (s.camera_key, s.env_key, float(s.rotation_deg), float(s.exposure), s.tonemap)
            if key != self._bg_key:
                from hravatar.shading import rotate_y

                d = -self._cam.view_dirs()  # pixel -> scene direction
                lin = s.env.lookup_specular(rotate_y(d, -s.rotation_deg), torch.full(d.shape[:-1], BACKGROUND_BLUR, device=dev))
                self._bg, self._bg_key = to_display(lin, s.tonemap, s.exposure), key
            return self._bg
        if s.background == "transparent":
            return checkerboard(h, w).to(dev)
        return torch.tensor(s.background_colour, dtype=torch.float32, device=dev).expand(h, w, 3)

    # ------------------------------------------------------------------ main entry
    @torch.no_grad()
    def render(self, s: ViewState) -> Frame:
        """Render one snapshot (blocking)."""
        if s.channel not in CHANNELS:
            raise ValueError(f"unknown channel '{s.channel}' (choose from {', '.join(CHANNELS)})")
        if s.env is None and s.channel in SHADED_CHANNELS:
            raise ValueError("no environment is ready for the shaded channels")
        t: dict[str, float] = {"deform": 0.0, "raster": 0.0}
        t_start = time.perf_counter()
        self._gbuffers(s, t)
        dev = s.renderer.device
        t1 = time.perf_counter()
        color = self._display(s, self._linear(s, s.material))
        if s.compare:
            ref = self._display(s, self._linear(s, MaterialEdit()))
            W = color.shape[1]
            cut = int(round(min(max(s.compare_split, 0.0), 1.0) * W))
            color = torch.cat([ref[:, :cut], color[:, cut:]], 1)  # original left, edited right
        _sync(dev)
        t2 = time.perf_counter()
        alpha = self._gb.alpha
        H, W = color.shape[:2]
        if s.channel == "alpha":
            shown = color  # the alpha channel is shown as is
        else:
            shown = color * alpha + self._background(s, H, W) * (1 - alpha)
        rgba = torch.cat([shown, torch.ones_like(shown[..., :1])], -1)
        out = Frame(
            display=np.ascontiguousarray(rgba.float().cpu().numpy()),
            color=color.float().cpu().numpy(),
            alpha=alpha[..., 0].float().cpu().numpy(),
            background=s.background,
            timings=t,
            version=s.version,
            compare_split=min(max(s.compare_split, 0.0), 1.0) if s.compare else None,
        )
        t3 = time.perf_counter()
        t["shade"] = (t2 - t1) * 1e3
        t["compose"] = (t3 - t2) * 1e3
        t["total"] = (t3 - t_start) * 1e3
        return out


def prepare_bundle(bundle, device, renderer: AvatarRenderer | None = None, home=None, compile: bool = False):
    """(renderer, home view) of an avatar: the tensor work of showing it (run off the UI thread).

    ``compile``: a renderer whose deformation and shading go through ``torch.compile``.
    """
    return renderer or AvatarRenderer(bundle.avatar, device, compile=compile), home or home_state_for(bundle)


class ViewerController:
    """The viewport's state; all setters are thread-safe and bump :attr:`version`.

    Args:
        bundle: the avatar bundle shown.
        library: environment library (owns the lighting choice).
        device: render device (CUDA when available if None).
        renderer: an existing :class:`AvatarRenderer` for ``bundle`` (made if None).
        render_size: (width, height) of the rendered image.
        compile_render: renderers made here compile deformation and shading (``--compile``).
    """

    def __init__(self, bundle, library: EnvironmentLibrary, device: str | torch.device | None = None,
                 renderer: AvatarRenderer | None = None, render_size: tuple[int, int] = (256, 256),
                 compile_render: bool = False) -> None:
        self._lock = threading.RLock()
        self.device = torch.device(device) if device is not None else default_device()
        self.compile_render = compile_render
        self.library = library
        self.orbit = OrbitController()
        self.navigator = ViewportNavigator(self.orbit)
        self.channel = "shaded"
        self.rotation_deg = 0.0
        self.auto_rotate = False
        self.auto_rotate_speed = 30.0  # degrees per second
        self.exposure = 0.0
        self.material = MaterialEdit()
        self.background = "colour"
        self.background_colour = (0.16, 0.17, 0.19)
        self.compare = False
        self.compare_split = 0.5
        self.render_size = (int(render_size[0]), int(render_size[1]))
        self._settings_version = 0
        self._frame_version = 0
        self._bundle_version = 0
        self.set_bundle(bundle, renderer)

    # ------------------------------------------------------------------ avatar and driving frame
    def set_bundle(self, bundle, renderer: AvatarRenderer | None = None, home=None) -> None:
        """Show another avatar: new renderer, home view, neutral frame, its learned light offered.

        ``home``: its :func:`home_state_for` when the caller computed it already (off the UI thread).
        """
        if renderer is None or home is None:
            renderer, home = off_ui_thread(prepare_bundle, bundle, self.device, renderer, home, self.compile_render)
        with self._lock:
            self.bundle = bundle
            self.renderer = renderer
            self._frame = bundle.avatar.neutral_frame()
            self._frame = FrameParams(*(x.detach().cpu().clone() for x in (self._frame.expr, self._frame.pose, self._frame.eyelids, self._frame.transl)))
            self._frame_version += 1
            self._bundle_version += 1
            self.orbit.home = home
            self.orbit.reset()
            self.orbit.saved.clear()
        self.library.set_bundle(bundle)
        if self.library.selected is None and self.library.pending is None:
            self.library.select(self.library.default_key())

    @property
    def num_gaussians(self) -> int:
        return int(self.bundle.avatar.num_gaussians)

    def current_frame(self) -> FrameParams:
        """A copy of the B=1 driving parameters shown (CPU tensors)."""
        with self._lock:
            f = self._frame
            return FrameParams(f.expr.clone(), f.pose.clone(), f.eyelids.clone(), f.transl.clone())

    def set_frame(self, frame: FrameParams) -> None:
        """Drive expression / pose (any thread). Shapes must match the avatar (B = 1)."""
        f = FrameParams(*(x.detach().float().cpu()[:1].clone() for x in (frame.expr, frame.pose, frame.eyelids, frame.transl)))
        with self._lock:
            if f.expr.shape[-1] != self._frame.expr.shape[-1]:
                raise ValueError(f"frame has {f.expr.shape[-1]} expression components, the avatar {self._frame.expr.shape[-1]}")
            self._frame = f
            self._frame_version += 1

    # ------------------------------------------------------------------ settings
    def _changed(self) -> None:
        self._settings_version += 1

    def set_channel(self, name: str) -> None:
        if name not in CHANNELS:
            raise ValueError(f"unknown channel '{name}' (choose from {', '.join(CHANNELS)})")
        with self._lock:
            if name != self.channel:
                self.channel = name
                self._changed()

    def set_background(self, mode: str, colour: tuple[float, float, float] | None = None) -> None:
        if mode not in BACKGROUNDS:
            raise ValueError(f"unknown background '{mode}' (choose from {', '.join(BACKGROUNDS)})")
        with self._lock:
            self.background = mode
            if colour is not None:
                self.background_colour = tuple(float(min(max(c, 0.0), 1.0)) for c in colour[:3])
            self._changed()

    def set_rotation(self, deg: float) -> None:
        with self._lock:
            d = math.fmod(float(deg) + 180.0, 360.0)
            d = (d + 360.0 if d < 0 else d) - 180.0
            if d != self.rotation_deg:
                self.rotation_deg = d
                self._changed()

    def set_auto_rotate(self, on: bool, speed_deg_s: float | None = None) -> None:
        with self._lock:
            self.auto_rotate = bool(on)
            if speed_deg_s is not None:
                self.auto_rotate_speed = float(speed_deg_s)

    def tick(self, dt: float) -> bool:
        """Advance time-driven state (auto-rotate); returns whether something animates."""
        if self.auto_rotate and dt > 0:
            self.set_rotation(self.rotation_deg + self.auto_rotate_speed * min(dt, 0.25))
        return self.auto_rotate

    def set_exposure(self, stops: float) -> None:
        with self._lock:
            if float(stops) != self.exposure:
                self.exposure = float(stops)
                self._changed()

    def set_material(self, **kw) -> None:
        """Change fields of the :class:`MaterialEdit` (rough_scale, f0_edit, tint, saturation)."""
        for k in kw:
            if k not in ("rough_scale", "f0_edit", "tint", "saturation"):
                raise ValueError(f"unknown material field '{k}'")
        clean = {}
        for k, v in kw.items():
            if k == "tint":
                clean[k] = tuple(float(min(max(c, 0.0), 1.0)) for c in v[:3])
            else:
                lo, hi = MATERIAL_LIMITS[k]
                clean[k] = float(min(max(float(v), lo), hi))
        with self._lock:
            new = replace(self.material, **clean)
            if new != self.material:
                self.material = new
                self._changed()

    def reset_material(self, name: str | None = None) -> None:
        """Reset one material field (or all when None)."""
        if name is None:
            with self._lock:
                self.material = MaterialEdit()
                self._changed()
        else:
            self.set_material(**{name: getattr(MaterialEdit(), name)})

    def set_compare(self, on: bool, split: float | None = None) -> None:
        with self._lock:
            self.compare = bool(on)
            if split is not None:
                self.compare_split = float(min(max(split, 0.0), 1.0))
            self._changed()

    def set_render_size(self, width: int, height: int) -> None:
        w, h = max(16, int(width)), max(16, int(height))
        with self._lock:
            if (w, h) != self.render_size:
                self.render_size = (w, h)
                self._changed()

    def frame_head(self) -> None:
        """Centre the orbit on the posed head and fit it in view (the F key)."""
        from hravatar.api import head_bounds

        with self._lock:
            c, r = head_bounds(self.renderer.avatar, self.current_frame().to(self.renderer.device))
        self.orbit.frame(c.detach().cpu().tolist(), r)

    # ------------------------------------------------------------------ snapshots
    @property
    def version(self) -> tuple:
        """Changes whenever the image would change (compare with the last rendered one)."""
        lib = self.library
        return (self._bundle_version, self._settings_version, self._frame_version, self.orbit.version, lib.version, lib.selected)

    def needs_environment(self) -> bool:
        return self.channel in SHADED_CHANNELS or self.background == "environment"

    def snapshot(self, size: tuple[int, int] | None = None) -> ViewState | None:
        """The current state for the renderer; None while a needed environment is still loading."""
        with self._lock:
            entry = self.library.current()
            if entry is None and self.channel in SHADED_CHANNELS:
                return None
            w, h = size or self.render_size
            cam = self.orbit.camera(w, h)
            env = entry.env if entry is not None else None
            env_key = (entry.key, entry.generation) if entry is not None else ()
            return ViewState(
                version=self.version, renderer=self.renderer, camera=cam, camera_key=(self._bundle_version,) + camera_key(self.orbit.state, w, h),
                frame=self._frame, frame_key=(self._bundle_version, self._frame_version), env=env, env_key=env_key,
                tonemap=entry.tonemap if entry is not None else "aces", channel=self.channel, rotation_deg=self.rotation_deg,
                exposure=self.exposure, material=self.material, background=self.background,
                background_colour=self.background_colour, compare=self.compare, compare_split=self.compare_split,
            )

    def render_image(self, frame: FrameParams, res: int, lock: threading.Lock | None = None, renderer: FrameRenderer | None = None) -> np.ndarray:
        """[res, res, 3] uint8 render of ``frame`` with the current view and settings (blocking).

        The compare split is left out (exports show the edited avatar).
        """
        s = self.snapshot((res, res))
        if s is None:
            raise RuntimeError("the lighting is still loading; try again in a moment")
        f = FrameParams(*(x.detach().float().cpu()[:1] for x in (frame.expr, frame.pose, frame.eyelids, frame.transl)))
        s = replace(s, frame=f, frame_key=("export", id(f), time.perf_counter()), compare=False)
        fr = renderer or FrameRenderer()
        if lock is None:
            return fr.render(s).rgb_uint8()
        with lock:
            return fr.render(s).rgb_uint8()


class RenderWorker:
    """Background render thread: renders the newest submitted :class:`ViewState`, drops stale ones.

    ``render_lock`` serialises use of the avatar with other renders (blocking exports).
    """

    def __init__(self, renderer: FrameRenderer | None = None, render_lock: threading.Lock | None = None) -> None:
        self.renderer = renderer or FrameRenderer()
        self.render_lock = render_lock or threading.Lock()
        self._cv = threading.Condition()
        self._pending: ViewState | None = None
        self._latest: Frame | None = None
        self._rendering = False
        self._seq = 0
        self._errors: list[str] = []
        self._stop = False
        self.dropped = 0  # requests replaced before they were rendered
        self._thread = threading.Thread(target=self._run, name="render-worker", daemon=True)
        self._thread.start()

    def submit(self, state: ViewState) -> None:
        with self._cv:
            if self._pending is not None:
                self.dropped += 1
            self._pending = state
            self._cv.notify_all()

    def latest(self) -> Frame | None:
        with self._cv:
            return self._latest

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._rendering or self._pending is not None

    def pop_errors(self) -> list[str]:
        with self._cv:
            e, self._errors = self._errors, []
            return e

    def wait_for(self, version: tuple, timeout: float = 30.0) -> bool:
        """Wait until a frame of ``version`` was published (or nothing is left to render)."""
        t_end = time.monotonic() + timeout
        with self._cv:
            while True:
                if self._latest is not None and self._latest.version == version:
                    return True
                if not self._rendering and self._pending is None and self._errors:
                    return False
                left = t_end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10.0)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                state, self._pending = self._pending, None
                self._rendering = True
            frame, err = None, None
            try:
                with self.render_lock:
                    frame = self.renderer.render(state)
            except Exception as e:  # noqa: BLE001  - reported as one line, the app keeps running
                err = f"render failed: {(str(e).splitlines() or [type(e).__name__])[0]}"
                self.renderer.clear()
            with self._cv:
                self._rendering = False
                if frame is not None:
                    self._seq += 1
                    frame.seq = self._seq
                    self._latest = frame
                if err:
                    self._errors.append(err)
                self._cv.notify_all()


__all__ = ["BACKGROUNDS", "Frame", "FrameRenderer", "RenderWorker", "SHADED_CHANNELS", "ViewState", "ViewerController",
           "checkerboard", "default_device"]
