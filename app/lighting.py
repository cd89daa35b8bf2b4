"""The environment library of the viewer: built-in procedural maps, the avatar's learned light and
loaded ``.hdr`` / ``.exr`` files, loaded and prefiltered off the UI thread.

The UI thread calls :meth:`EnvironmentLibrary.select` / :meth:`EnvironmentLibrary.load_file` and,
once per frame, :meth:`EnvironmentLibrary.poll`, which applies finished loads (a selection only
switches once its environment is ready; a failed load leaves the previous selection in place) and
returns the one-line messages to show.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Suffixes accepted as environment maps by drop and file dialog.
ENV_SUFFIXES = (".hdr", ".exr")

LEARNED = "learned"


def to_display(linear: torch.Tensor, tonemap_op: str, exposure: float = 0.0) -> torch.Tensor:
    """Linear radiance [..., 3] -> display values in [0, 1], as :class:`AvatarRenderer` does.

    "clamp" is the learned (LDR) light's response: exposure and clamp only; any other name is a
    :func:`hravatar.shading.tonemap` operator (with the sRGB curve).
    """
    from hravatar.shading import tonemap

    if tonemap_op == "clamp":
        return (linear * 2.0 ** exposure).clamp(0, 1)
    return tonemap(linear, exposure_stops=exposure, operator=tonemap_op)


def marker_column(rotation_deg: float, width: int) -> int:
    """Thumbnail column of the map direction seen straight behind the head from the front camera.

    The shader looks the world direction ``d`` up at ``rotate_y(d, -rotation)``; the front camera
    looks along world -z, whose map direction has u = 0.5 + rotation / 360 (mod 1) in the
    lat-long convention of :mod:`hravatar.shading.cubemap`.
    """
    u = (0.5 + rotation_deg / 360.0) % 1.0
    return min(width - 1, int(math.floor(u * width)))


@dataclass
class EnvEntry:
    """One environment in the list.

    key: "builtin:NAME", "learned" or "file:/abs/path"; kind: "builtin" | "learned" | "file".
    state: "idle" (not loaded yet) | "loading" | "ready" | "error"; progress in [0, 1] with a stage text.
    env: the prefiltered :class:`hravatar.shading.Environment` (on the library's device) once ready;
    tonemap: the operator its radiance needs ("aces" for HDR maps, the camera response for the learned light).
    thumb: [h, 2h, 3] float32 linear lat-long preview once ready (the irradiance for the learned light).
    """

    key: str
    label: str
    kind: str
    path: Path | None = None
    state: str = "idle"
    progress: float = 0.0
    stage: str = ""
    env: object | None = None
    tonemap: str = "aces"
    thumb: np.ndarray | None = None
    error: str = ""
    generation: int = 0  # bumps on each (re)load, so stale results of an older load are ignored


@dataclass
class _Done:
    key: str
    generation: int
    ok: bool
    message: str = ""


@dataclass
class LibraryEvent:
    """What :meth:`EnvironmentLibrary.poll` reports: a message and whether the selection changed."""

    level: str
    message: str
    selection_changed: bool = False
    key: str = ""


@dataclass
class PrefilterOptions:
    """Prefiltering resolution (the defaults are those of :func:`hravatar.shading.prefilter_latlong`)."""

    spec_res: int = 128
    num_levels: int = 7
    irr_res: int = 32
    samples: int = 32
    builtin_width: int = 512
    thumb_height: int = 64


class EnvironmentLibrary:
    """Ordered list of environments with background loading and a current selection.

    Args:
        bundle: the avatar bundle (for its learned light), or None.
        device: where prefiltered environments live (the renderer's device).
        options: prefilter resolutions (tests use small ones).
        builtin_names: procedural environments to list (default: all of :mod:`hravatar.shading`).
    """

    def __init__(self, bundle=None, device: str | torch.device = "cpu", options: PrefilterOptions | None = None,
                 builtin_names: list[str] | None = None) -> None:
        from hravatar.shading import builtin_environment_names

        self.device = torch.device(device)
        self.options = options or PrefilterOptions()
        self._lock = threading.RLock()
        self._entries: dict[str, EnvEntry] = {}
        self._bundle = None
        for name in builtin_names if builtin_names is not None else builtin_environment_names():
            self._entries[f"builtin:{name}"] = EnvEntry(f"builtin:{name}", name.capitalize(), "builtin")
        self.selected: str | None = None
        self.pending: str | None = None
        self.version = 0  # bumps when the selected environment changes (render cache key)
        self._jobs: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        # the loader thread runs only while there are jobs: a live thread that has used torch keeps
        # its own OpenMP pool, and two pools on a small CPU slow every torch op of the render
        # worker about 2x (the pools stop spinning and sleep between ops)
        self._thread: threading.Thread | None = None
        self.set_bundle(bundle)

    # ------------------------------------------------------------------ listing
    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def entries(self) -> list[EnvEntry]:
        with self._lock:
            return list(self._entries.values())

    def entry(self, key: str) -> EnvEntry | None:
        with self._lock:
            return self._entries.get(key)

    def label(self, key: str) -> str:
        e = self.entry(key)
        return e.label if e else key

    def current(self) -> EnvEntry | None:
        """The selected entry (always a ready one) or None."""
        with self._lock:
            return self._entries.get(self.selected) if self.selected else None

    def loading(self) -> list[EnvEntry]:
        """Entries being loaded (for progress display)."""
        with self._lock:
            return [e for e in self._entries.values() if e.state == "loading"]

    @property
    def busy(self) -> bool:
        with self._lock:
            return any(e.state == "loading" for e in self._entries.values()) or not self._jobs.empty()

    # ------------------------------------------------------------------ changes (UI thread)
    def set_bundle(self, bundle) -> None:
        """Use another avatar's learned light (listed first; dropped if the avatar has none)."""
        with self._lock:
            self._bundle = bundle
            old = self._entries.pop(LEARNED, None)
            has = bundle is not None and bool(getattr(bundle, "light_state", None))
            if has:
                e = EnvEntry(LEARNED, "Learned light (avatar)", "learned", generation=(old.generation + 1) if old else 0)
                self._entries = {LEARNED: e, **self._entries}
                if self.selected == LEARNED or self.pending == LEARNED:
                    self.selected = None
                    self.pending = None
                    self.select(LEARNED)
            elif self.selected == LEARNED or self.pending == LEARNED:
                self.selected = None
                self.pending = None
                self.select(self.default_key())

    def default_key(self) -> str:
        """The learned light when the avatar has one, else the first built-in (studio)."""
        keys = self.keys()
        if LEARNED in keys:
            return LEARNED
        return "builtin:studio" if "builtin:studio" in keys else keys[0]

    def select(self, key: str) -> None:
        """Select an environment; if it is not ready yet it is loaded first (selection switches then)."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                raise KeyError(f"no environment '{key}'")
            if e.state == "ready":
                self.pending = None
                if self.selected != key:
                    self.selected = key
                    self.version += 1
                return
            self.pending = key
            if e.state in ("idle", "error"):
                self._queue(e)

    def preload(self, key: str) -> None:
        """Start loading an entry without selecting it."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.state in ("idle", "error"):
                self._queue(e)

    def load_file(self, path: str | Path, select: bool = True) -> str:
        """Add an ``.hdr`` / ``.exr`` file and load it in the background; returns its key.

        Raises:
            ValueError: unsupported suffix (one-line message); read errors arrive later via :meth:`poll`.
        """
        p = Path(path).expanduser()
        if p.suffix.lower() not in ENV_SUFFIXES:
            raise ValueError(f"{p.name}: not an environment map (expected {' or '.join(ENV_SUFFIXES)})")
        p = p.resolve()
        key = f"file:{p}"
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                e = EnvEntry(key, p.name, "file", path=p)
                self._entries[key] = e
            if e.state != "loading":
                e.state = "idle"
                e.generation += 1
                self._queue(e)
            if select:
                self.pending = key
        return key

    def _queue(self, e: EnvEntry) -> None:
        e.state, e.progress, e.stage, e.error = "loading", 0.0, "queued", ""
        self._jobs.put((e.key, e.generation))
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="env-loader", daemon=True)
                self._thread.start()

    def poll(self) -> list[LibraryEvent]:
        """Apply finished loads (call from the UI thread); returns the messages to show."""
        events: list[LibraryEvent] = []
        while True:
            try:
                d: _Done = self._done.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                e = self._entries.get(d.key)
                if e is None or e.generation != d.generation:
                    continue
                if d.ok:
                    if self.pending == d.key:
                        self.pending = None
                        self.selected = d.key
                        self.version += 1  # also when a selected file was reloaded
                        events.append(LibraryEvent("info", f"Lighting: {e.label}", True, d.key))
                else:
                    was_pending = self.pending == d.key
                    if was_pending:
                        self.pending = None
                    if e.kind == "file":
                        del self._entries[d.key]  # a broken file is not offered again
                    events.append(LibraryEvent("error", d.message, False, d.key))
                    if was_pending and self.selected is None:
                        # nothing to show yet (e.g. the learned light failed at start): fall back to a built-in
                        fallback = next((k for k, x in self._entries.items() if x.kind == "builtin" and x.state != "error"), None)
                        if fallback is not None:
                            self.select(fallback)
        return events

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no load is queued or running (tests, headless runs)."""
        import time

        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if not self.busy:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        with self._lock:
            t = self._thread
        if t is not None:
            t.join(timeout=5.0)

    # ------------------------------------------------------------------ thumbnails
    def thumbnail(self, key: str | None = None, rotation_deg: float = 0.0, exposure: float = 0.0) -> np.ndarray | None:
        """[h, 2h, 3] uint8 tone-mapped lat-long preview with a vertical marker line (see :func:`marker_column`).

        Returns None while the entry is not ready.
        """
        e = self.entry(key) if key else self.current()
        if e is None or e.thumb is None:
            return None
        disp = to_display(torch.from_numpy(e.thumb), e.tonemap, exposure).numpy()
        img = (disp * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        col = marker_column(rotation_deg, img.shape[1])
        img[:, col] = (255, 196, 0)  # amber: visible on dark and bright maps alike
        return img

    # ------------------------------------------------------------------ background work
    def _set(self, key: str, generation: int, **kw) -> bool:
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.generation != generation:
                return False
            for k, v in kw.items():
                setattr(e, k, v)
            return True

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                # exit when idle; _queue starts a new thread for the next job (both under the lock)
                if self._jobs.empty():
                    self._thread = None
                    return
            job = self._jobs.get()
            if job is None:
                break
            key, gen = job
            with self._lock:
                e = self._entries.get(key)
                if e is None or e.generation != gen:
                    continue
                kind, path, bundle, label = e.kind, e.path, self._bundle, e.label
            try:
                env, op = self._load(key, gen, kind, path, bundle)
                thumb = self._make_thumb(env, kind)
                ok = self._set(key, gen, env=env, tonemap=op, thumb=thumb, state="ready", progress=1.0, stage="ready")
                if ok:
                    self._done.put(_Done(key, gen, True))
            except Exception as ex:  # noqa: BLE001  - any failure becomes a one-line message
                msg = _one_line(ex, label)
                self._set(key, gen, state="error", error=msg, progress=0.0, stage="failed")
                self._done.put(_Done(key, gen, False, msg))

    def _load(self, key: str, gen: int, kind: str, path: Path | None, bundle):
        """-> (Environment on self.device, tonemap operator); runs on the loader thread."""
        from hravatar.shading import load_envmap, make_builtin_environment

        if kind == "learned":
            from hravatar.api import resolve_environment

            self._set(key, gen, stage="evaluating learned light", progress=0.3)
            env, op = resolve_environment(LEARNED, bundle)
            return env.to(self.device), op
        if kind == "builtin":
            self._set(key, gen, stage="generating", progress=0.05)
            name = key.split(":", 1)[1]
            latlong = make_builtin_environment(name, width=self.options.builtin_width)
        else:
            self._set(key, gen, stage="reading file", progress=0.05)
            latlong = load_envmap(path)
            name = Path(path).stem
        env = self._prefilter(key, gen, latlong)
        env.name = name
        return env.to(self.device), "aces"

    def _prefilter(self, key: str, gen: int, latlong: torch.Tensor):
        """Staged :func:`hravatar.shading.prefilter_latlong` (same steps), reporting progress."""
        from hravatar.shading import irradiance_from_latlong, latlong_to_cube, prefilter_cube

        o = self.options
        latlong = latlong.to(self.device, torch.float32)
        self._set(key, gen, stage="resampling to cube map", progress=0.25)
        base = latlong_to_cube(latlong, o.spec_res)
        self._set(key, gen, stage="irradiance", progress=0.4)
        irr = irradiance_from_latlong(latlong, o.irr_res)
        self._set(key, gen, stage="GGX prefiltering", progress=0.55)
        return prefilter_cube(base, o.num_levels, o.irr_res, o.samples, irradiance=irr)

    def _make_thumb(self, env, kind: str) -> np.ndarray:
        """Lat-long preview: the mirror level of an HDR map; the irradiance of a learned light (its
        mirror level is never trained when the skin is rough, the irradiance shows where light came from)."""
        from hravatar.shading import cube_to_latlong

        h = self.options.thumb_height
        cube = env.irradiance if kind == "learned" else env.specular[0]
        with torch.no_grad():
            ll = cube_to_latlong(cube.detach().float(), h, 2 * h)
        return ll.cpu().numpy().astype(np.float32)


def _one_line(ex: BaseException, label: str) -> str:
    """A short, single-line description of a load failure."""
    text = (str(ex).strip().splitlines() or [type(ex).__name__])[0]
    # the library's messages start with the full path; the label already names the file
    head, sep, rest = text.partition(": ")
    if sep and (head.endswith(label) or "/" in head):
        text = rest
    if len(text) > 160:
        text = text[:157] + "..."
    from hravatar.shading import EnvmapError

    if isinstance(ex, (EnvmapError, ValueError, OSError)):
        return f"Cannot load {label}: {text}"
    return f"Cannot load {label}: {type(ex).__name__}: {text}"


__all__ = ["ENV_SUFFIXES", "EnvEntry", "EnvironmentLibrary", "LibraryEvent", "PrefilterOptions", "marker_column", "to_display"]
