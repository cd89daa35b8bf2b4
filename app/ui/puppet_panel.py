"""Puppet tab: expression / pose sliders, training-sequence replay, keyframe timeline, JSON and MP4
export. Thin dearpygui layer over :class:`app.puppet.PuppetController`."""
from __future__ import annotations

import time
from pathlib import Path

import dearpygui.dearpygui as dpg
import numpy as np

from app.animation import Mp4Exporter
from app.puppet import FrameFollower, PuppetController

from . import MUTED

_EXPORT_BUDGET_S = 0.05  # render time per UI frame while exporting, so the interface stays live


class PuppetPanel:
    """The widgets of the Puppet tab and their callbacks (see :func:`build`)."""

    def __init__(self, parent, ctx) -> None:
        self.ctx = ctx
        self.ctl = PuppetController(ctx.bundle, ctx.device)
        self._bundle = ctx.bundle
        self._rng = np.random.default_rng()
        self._exporter: Mp4Exporter | None = None
        self._sliders: dict[int, int | str] = {}
        self._synced = -1
        self._keys_shown: tuple | None = None
        # the sliders mirror frames shown by others (webcam, scripts) a few times a second
        self._follower = FrameFollower(own_source="puppet", interval_s=0.25)
        self._build(parent)
        ctx.add_frame_callback(self._on_frame)

    # ---------------------------------------------------------------- layout
    def _build(self, parent) -> None:
        with dpg.group(parent=parent) as self.root:
            with dpg.group(horizontal=True):
                dpg.add_button(label="Reset", callback=lambda: self.reset())
                dpg.add_button(label="Randomize", callback=lambda: self.randomize())
                self._amount = dpg.add_slider_float(label="amount", default_value=0.5, min_value=0.0, max_value=1.0, width=90)
                dpg.add_button(label="From current", callback=lambda: self._show(self.ctl.capture(self.ctx.current_frame())))
            self._seq_box = dpg.add_checkbox(label="play training sequence", callback=lambda s, a: self._show(self.ctl.play_sequence(a)))
            self._no_seq = dpg.add_text("(no training sequence stored with this avatar)", show=False)
            with dpg.collapsing_header(label="Timeline", default_open=True):
                with dpg.group(horizontal=True):
                    dpg.add_button(label="Add keyframe", callback=lambda: self.add_key())
                    self._play_box = dpg.add_checkbox(label="play", callback=lambda s, a: self.play_timeline(a))
                    self._loop_box = dpg.add_checkbox(label="loop", default_value=True, callback=lambda s, a: self._set_loop(a))
                    dpg.add_button(label="Clear", callback=lambda: self.ctl.timeline.clear())
                self._scrub = dpg.add_slider_float(label="time (s)", min_value=0.0, max_value=5.0, width=-80,
                                                   callback=lambda s, a: self._show(self.ctl.scrub(a)))
                self._key_list = dpg.add_child_window(height=110)
                with dpg.group(horizontal=True):
                    dpg.add_button(label="Save JSON...", callback=lambda: dpg.show_item(self._save_dialog))
                    dpg.add_button(label="Load JSON...", callback=lambda: dpg.show_item(self._load_dialog))
                # MP4 export: the number inputs get their own row so their +/- buttons fit the side bar
                with dpg.group(horizontal=True):
                    dpg.add_text("MP4", color=MUTED)
                    self._fps = dpg.add_input_int(label="fps", default_value=25, min_value=1, max_value=120, min_clamped=True,
                                                  max_clamped=True, width=110)
                    self._res = dpg.add_input_int(label="px", default_value=256, min_value=16, max_value=2048, step=64,
                                                  min_clamped=True, max_clamped=True, width=120)
                with dpg.group(horizontal=True):
                    dpg.add_button(label="Export MP4...", callback=lambda: dpg.show_item(self._mp4_dialog))
                    dpg.add_button(label="Cancel export", callback=lambda: self.cancel_export())
                    # shown from the first export on (an empty bar says nothing)
                    self._progress = dpg.add_progress_bar(default_value=0.0, overlay="", width=-1, show=False)
            self._slider_root = dpg.add_group()
        self._save_dialog = self._file_dialog(".json", lambda p: self.save_json(p), "animation.json")
        self._load_dialog = self._file_dialog(".json", lambda p: self.load_json(p))
        self._mp4_dialog = self._file_dialog(".mp4", lambda p: self.start_export(p), "animation.mp4")
        self._build_sliders()

    @staticmethod
    def _file_dialog(ext: str, on_pick, default_name: str = ""):
        def cb(sender, app_data):
            path = (app_data or {}).get("file_path_name")
            if path:
                on_pick(path)
        with dpg.file_dialog(show=False, callback=cb, width=600, height=400, default_filename=default_name,
                             default_path=str(Path.home()), directory_selector=False) as d:
            dpg.add_file_extension(ext)
            dpg.add_file_extension(".*")
        return d

    def _build_sliders(self) -> None:
        dpg.delete_item(self._slider_root, children_only=True)
        self._sliders.clear()
        sp = self.ctl.space
        for group, idx in sp.groups():
            with dpg.collapsing_header(label=group, parent=self._slider_root, default_open=len(idx) <= 3):
                for i in idx:
                    s = sp.specs[i]
                    self._sliders[i] = dpg.add_slider_float(label=s.name, default_value=float(sp.values[i]), min_value=s.lo,
                                                            max_value=s.hi, width=-140, format="%.3f", user_data=i,
                                                            callback=self._on_slider)
        has_seq = self.ctl.player is not None
        dpg.configure_item(self._seq_box, enabled=has_seq, show=has_seq,
                           label=f"play training sequence ({self.ctl.player.num_frames} frames)" if has_seq else "")
        dpg.configure_item(self._no_seq, show=not has_seq)
        self._synced = -1

    # ---------------------------------------------------------------- actions (callbacks and selftest)
    def _show(self, frame) -> None:
        if frame is not None:
            self.ctx.set_frame(frame, source="puppet")

    def reset(self) -> None:
        """Neutral face, rest pose (the Reset button)."""
        self._show(self.ctl.reset())

    def set_slider(self, name: str, value: float) -> bool:
        """Move the slider called ``name`` as the user would; False when this avatar has none."""
        if name not in {s.name for s in self.ctl.space.specs}:
            return False
        i = self.ctl.space.index(name)
        self._on_slider(None, value, i)
        dpg.set_value(self._sliders[i], float(self.ctl.space.values[i]))
        return True

    def _on_slider(self, sender, value, index) -> None:
        self._follower.user_changed()
        self._show(self.ctl.set_value(index, value))

    def _set_loop(self, on: bool) -> None:
        self.ctl.timeline.loop = on
        if self.ctl.player is not None:
            self.ctl.player.loop = on

    def play_timeline(self, on: bool) -> None:
        if on and len(self.ctl.timeline) < 2:
            self.ctx.notify("add at least two keyframes to play the animation", "warning")
        self._show(self.ctl.play_timeline(on))

    def randomize(self) -> None:
        self._show(self.ctl.randomize(self._rng, dpg.get_value(self._amount)))

    def add_key(self) -> None:
        self.ctl.add_key()

    def _goto_key(self, sender, app_data, index) -> None:
        self._show(self.ctl.goto_key(index))

    def _update_key(self, sender, app_data, index) -> None:
        self.ctl.timeline.set_key(index, self.ctl.space.values)

    def _delete_key(self, sender, app_data, index) -> None:
        self.ctl.remove_key(index)

    def save_json(self, path) -> None:
        try:
            p = self.ctl.timeline.save_json(path)
            self.ctx.notify(f"animation saved to {p}")
        except (OSError, ValueError) as e:
            self.ctx.notify(f"cannot save animation: {e}", "error")

    def load_json(self, path) -> None:
        try:
            warnings = self.ctl.timeline.load_json(path)
        except ValueError as e:
            self.ctx.notify(str(e), "error")
            return
        for w in warnings:
            self.ctx.notify(w, "warning")
        self.ctx.notify(f"loaded {len(self.ctl.timeline)} keyframes from {Path(path).name}")
        self._show(self.ctl.scrub(self.ctl.timeline.bounds()[0]))

    def start_export(self, path) -> None:
        if self._exporter is not None:
            self.ctx.notify("an export is already running", "warning")
            return
        try:
            self._exporter = Mp4Exporter(self.ctl.timeline, self.ctx.render_image, path,
                                         fps=dpg.get_value(self._fps), res=dpg.get_value(self._res))
        except (ValueError, ImportError) as e:
            self.ctx.notify(f"cannot export: {e}", "error")
            return
        self.ctl.timeline.pause()
        dpg.configure_item(self._progress, overlay=f"0 / {self._exporter.total}", show=True)

    def cancel_export(self) -> None:
        if self._exporter is not None:
            self._exporter.cancel()
            self._exporter = None
            dpg.configure_item(self._progress, overlay="cancelled")
            dpg.set_value(self._progress, 0.0)

    def _step_export(self) -> None:
        ex = self._exporter
        t0 = time.perf_counter()
        try:
            while not ex.finished and time.perf_counter() - t0 < _EXPORT_BUDGET_S:
                ex.step()
        except Exception as e:  # noqa: BLE001  (any render/encode failure ends the export with a message)
            self._exporter = None
            dpg.configure_item(self._progress, overlay="failed")
            self.ctx.notify(f"MP4 export failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", "error")
            return
        dpg.set_value(self._progress, ex.progress)
        dpg.configure_item(self._progress, overlay=f"{ex.done} / {ex.total}")
        if ex.finished:
            self._exporter = None
            self.ctx.notify(f"animation written to {ex.path}")

    # ---------------------------------------------------------------- per frame
    def _on_frame(self, dt: float) -> None:
        if self.ctx.bundle is not self._bundle:  # another avatar was opened: new sliders, same animation
            self._bundle = self.ctx.bundle
            self.ctl.rebind(self._bundle, self.ctx.device)
            self._build_sliders()
        self._show(self.ctl.tick())
        self._follow_others()
        if self._exporter is not None:
            self._step_export()
        self._sync()

    def _follow_others(self) -> None:
        """Frames set by others (webcam, other panels, scripts) move the sliders, a few times a second."""
        frame_state = getattr(self.ctx, "frame_state", None)
        if frame_state is None:
            return
        seq, source = frame_state()
        if self._follower.should_follow(seq, source, self._user_editing):
            self.ctl.follow(self.ctx.current_frame())

    def _user_editing(self) -> bool:
        """A slider of this tab is held or typed into (a follow now would fight the user's hand)."""
        return any(dpg.is_item_active(tag) for tag in self._sliders.values())

    def _sync(self) -> None:
        """Bring widgets in line with the controller (after playback, reset, load...)."""
        ctl = self.ctl
        if ctl.version != self._synced:
            for i, tag in self._sliders.items():
                dpg.set_value(tag, float(ctl.space.values[i]))
            self._synced = ctl.version
        dpg.set_value(self._seq_box, ctl.mode == "sequence")
        dpg.set_value(self._play_box, ctl.mode == "timeline")
        end = ctl.timeline.bounds()[1]
        dpg.configure_item(self._scrub, max_value=max(5.0, end + 2.0))
        dpg.set_value(self._scrub, ctl.scrub_time)
        shown = tuple(ctl.timeline.times)
        if shown != self._keys_shown:
            self._keys_shown = shown
            dpg.delete_item(self._key_list, children_only=True)
            if not shown:
                dpg.add_text("no keyframes: set sliders, pick a time, Add keyframe", parent=self._key_list)
            for i, t in enumerate(shown):
                with dpg.group(horizontal=True, parent=self._key_list):
                    dpg.add_text(f"{i + 1:2d}. {t:6.2f} s")
                    dpg.add_button(label="go", user_data=i, callback=self._goto_key)
                    dpg.add_button(label="update", user_data=i, callback=self._update_key)
                    dpg.add_button(label="delete", user_data=i, callback=self._delete_key)

    # ---------------------------------------------------------------- smoke test / cleanup
    def selftest(self) -> None:
        """Exercise the panel through the callbacks' own methods (headless smoke test)."""
        sp = self.ctl.space
        for name, value in (("jaw open", 0.3), ("head yaw", 0.4), ("eyes yaw", -0.2)):
            self._on_slider(None, value, sp.index(name))
        expr = [i for i, s in enumerate(sp.specs) if s.kind == "expr"]
        if expr:
            self._on_slider(None, sp.specs[expr[0]].hi * 0.8, expr[0])
        self._rng = np.random.default_rng(0)
        self._show(self.ctl.scrub(0.0))  # pick a time, pose, key it
        self.randomize()
        self.add_key()
        self._show(self.ctl.scrub(1.0))
        self.randomize()
        self.add_key()
        self.play_timeline(True)
        for t in (0.25, 0.5, 0.75):  # deterministic frames, then the clock-driven path
            self._show(self.ctl.scrub(t))
            self._on_frame(1 / 30)
        self.play_timeline(True)
        self._on_frame(1 / 30)
        self.play_timeline(False)
        if self.ctl.player is not None:
            self._show(self.ctl.play_sequence(True))
            for i in (0, 5, 10):
                self.ctl.player.seek_frame(i)
                self._on_frame(1 / 30)
            self._show(self.ctl.play_sequence(False))
        self._show(self.ctl.scrub(0.5))
        self._on_frame(1 / 30)

    def close(self) -> None:
        self.cancel_export()


def build(parent, ctx) -> PuppetPanel:
    """Build the Puppet tab inside ``parent`` (a dearpygui container) for ``ctx`` (AppContext)."""
    return PuppetPanel(parent, ctx)
