"""Webcam tab: drive the avatar from a camera or a video file. Thin dearpygui layer over
:class:`app.webcam.WebcamController` (source choice, start/stop, mode, smoothing, relative mode,
preview thumbnail, messages)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import dearpygui.dearpygui as dpg
import numpy as np

from app.webcam import MODES, VIDEO_EXTENSIONS, WebcamController, has_encoder, write_video

from . import LEVEL_COLOURS, MUTED, heading, note

_PREVIEW = (384, 288)  # 4:3 like most cameras; fits the ~440 px side bar
_CAMERA_CHOICES = 4  # indices offered before probing
_MODE_LABELS = {"landmarks": "landmarks (anyone)", "encoder": "avatar's encoder"}


class WebcamPanel:
    """The widgets of the Webcam tab and their callbacks (see :func:`build`)."""

    def __init__(self, parent, ctx) -> None:
        self.ctx = ctx
        self.ctl = WebcamController(ctx, preview_size=_PREVIEW)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._bundle = ctx.bundle
        self._build(parent)
        ctx.add_frame_callback(self._on_frame)

    # ---------------------------------------------------------------- layout
    def _build(self, parent) -> None:
        fonts = getattr(getattr(self.ctx, "shell", None), "fonts", None)
        w, h = _PREVIEW
        with dpg.texture_registry():
            self._tex = dpg.add_dynamic_texture(w, h, np.zeros(w * h * 4, np.float32))
        with dpg.group(parent=parent):
            heading("Source", fonts=fonts)
            with dpg.group(horizontal=True):
                self._camera_combo = dpg.add_combo([f"camera {i}" for i in range(_CAMERA_CHOICES)], default_value="camera 0",
                                                   width=110, callback=lambda s, a: self.select_camera(int(a.split()[-1])))
                dpg.add_button(label="Find cameras", callback=lambda: self.probe())
                dpg.add_button(label="Video file ...", callback=lambda: dpg.show_item(self._file_dialog))
            self._source_text = dpg.add_text("source: camera 0", color=MUTED)
            with dpg.group(horizontal=True):
                self._start_btn = dpg.add_button(label="Start", width=80, callback=lambda: self.start())
                self._stop_btn = dpg.add_button(label="Stop", width=80, callback=lambda: self.stop())
                dpg.add_checkbox(label="loop video", default_value=True, callback=lambda s, a: self.ctl.set_loop(a))
            dpg.add_spacer(height=4)
            heading("Driving", fonts=fonts)
            self._mode_radio = dpg.add_radio_button([_MODE_LABELS[m] for m in MODES], default_value=_MODE_LABELS["landmarks"],
                                                    horizontal=True, callback=lambda s, a: self.set_mode(a))
            self._smooth = dpg.add_slider_float(label="smoothing", default_value=self.ctl.smoothing, min_value=0.0, max_value=1.0,
                                                width=200, format="%.2f", callback=lambda s, a: self.ctl.set_smoothing(a))
            with dpg.group(horizontal=True):
                self._relative_box = dpg.add_checkbox(label="relative", default_value=False,
                                                      callback=lambda s, a: self.ctl.set_relative(a))
                dpg.add_button(label="Capture neutral", callback=lambda: self.capture_neutral())
            note("Relative: your neutral face maps to the avatar's neutral face. Landmarks mode works for anyone; "
                 "the avatar's encoder is the method's way and suits its own subject.")
            dpg.add_spacer(height=4)
            heading("Preview", fonts=fonts)
            dpg.add_image(self._tex, width=w, height=h, border_color=(60, 64, 72, 255))
            self._msg = dpg.add_text(self.ctl.message, wrap=380, color=LEVEL_COLOURS["info"])
            self._stats = dpg.add_text("", color=MUTED)
        with dpg.file_dialog(show=False, modal=True, width=700, height=420, default_path=str(Path.home()),
                             callback=lambda s, a: self._file_picked(a)) as self._file_dialog:
            for ext in VIDEO_EXTENSIONS:
                dpg.add_file_extension(ext, color=(120, 175, 245, 255))
            dpg.add_file_extension(".*")
        self._sync_mode_choices()

    def _sync_mode_choices(self) -> None:
        self._bundle = self.ctx.bundle
        if self.ctl.mode == "encoder" and not has_encoder(self._bundle):
            self.ctl.mode = "landmarks"
        if not has_encoder(self._bundle):
            dpg.configure_item(self._mode_radio, items=[_MODE_LABELS["landmarks"], _MODE_LABELS["encoder"] + " (none)"])
        else:
            dpg.configure_item(self._mode_radio, items=[_MODE_LABELS[m] for m in MODES])
        dpg.set_value(self._mode_radio, _MODE_LABELS[self.ctl.mode])

    # ---------------------------------------------------------------- actions (callbacks and selftest)
    def select_camera(self, index: int) -> None:
        self.ctl.select_camera(index)
        dpg.set_value(self._camera_combo, f"camera {index}")
        dpg.set_value(self._source_text, f"source: camera {index}")

    def select_file(self, path) -> None:
        self.ctl.select_file(path)
        dpg.set_value(self._source_text, f"source: {Path(path).name}")

    def _file_picked(self, app_data) -> None:
        path = (app_data or {}).get("file_path_name")
        if path:
            self.select_file(path)

    def probe(self) -> list[int]:
        found = self.ctl.probe()
        items = [f"camera {i}" for i in (found or range(_CAMERA_CHOICES))]
        dpg.configure_item(self._camera_combo, items=items)
        if found:
            self.select_camera(found[0])
        return found

    def start(self) -> bool:
        ok = self.ctl.start()
        self._show_state(self.ctl.poll() if ok else None)
        return ok

    def stop(self) -> None:
        self.ctl.stop()
        self._show_state(None)

    def set_mode(self, mode: str) -> None:
        """A mode name or its radio label."""
        if mode not in MODES:
            mode = "encoder" if mode.startswith(_MODE_LABELS["encoder"]) else "landmarks"
        self.ctl.set_mode(mode)
        self._sync_mode_choices()

    def capture_neutral(self) -> None:
        self.ctl.capture_neutral()
        dpg.set_value(self._relative_box, self.ctl.relative)

    # ---------------------------------------------------------------- per UI frame
    def _on_frame(self, dt: float) -> None:
        if self.ctx.bundle is not self._bundle:  # another avatar: it may or may not have an encoder
            self._sync_mode_choices()
        if self.ctl.session is not None:
            self._show_state(self.ctl.poll())

    def _show_state(self, st) -> None:
        if st is not None and st.preview is not None:
            rgba = np.concatenate([st.preview.astype(np.float32) / 255.0, np.ones((*st.preview.shape[:2], 1), np.float32)], -1)
            dpg.set_value(self._tex, rgba.reshape(-1))
        dpg.set_value(self._msg, self.ctl.message)
        dpg.configure_item(self._msg, color=LEVEL_COLOURS.get(self.ctl.level, LEVEL_COLOURS["info"]))
        dpg.set_value(self._stats, st.stats if st is not None else "")
        dpg.configure_item(self._start_btn, label="Restart" if self.ctl.running else "Start")

    # ---------------------------------------------------------------- self-test (headless smoke test)
    def selftest(self) -> None:
        """Missing camera -> one-line message; then drive the avatar from a short generated video.

        The video is rendered from the current avatar (neutral, smile, open jaw) with
        ``ctx.render_image``; the pipeline runs on its worker thread as in normal use, polled here.
        """
        bad = 97
        self.select_camera(bad)
        ok = self.start()
        if ok or f"camera {bad}" not in self.ctl.message:
            raise RuntimeError(f"webcam selftest: a missing camera should give a message, got '{self.ctl.message}'")
        path = self._test_video()
        self.select_file(path)
        self.ctl.set_smoothing(0.3)
        if not self.start():
            raise RuntimeError(f"webcam selftest: cannot open the generated video: {self.ctl.message}")
        n = self.ctl.run_blocking(min_frames=3, timeout_s=60.0)
        self._show_state(self.ctl.poll())
        if n == 0 and "MediaPipe" in self.ctl.message:
            # optional dependency missing: the panel shows the install hint and the app keeps running
            self.stop()
            self.ctx.notify(f"webcam selftest: {self.ctl.message}", "warning")
            return
        if n < 3:
            self.stop()
            raise RuntimeError(f"webcam selftest: only {n} frames drove the avatar ({self.ctl.message})")
        self.capture_neutral()  # relative mode on the running stream
        if has_encoder(self.ctx.bundle):
            self.set_mode("encoder")
        n2 = self.ctl.run_blocking(min_frames=n + 2, timeout_s=60.0)
        self.stop()
        if n2 < n + 2:
            raise RuntimeError(f"webcam selftest: relative/encoder driving stalled ({self.ctl.message})")
        self.set_mode("landmarks")
        dpg.set_value(self._relative_box, False)
        self.ctl.set_relative(False)
        self.select_camera(0)

    def start_demo(self) -> bool:
        """Drive the avatar from the generated test video (looping), e.g. for a screenshot of the tab."""
        self.select_file(self._test_video())
        return self.start()

    def _test_video(self) -> Path:
        from hravatar.api import parse_expression_args

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hravatar_webcam_")
        av = self.ctx.bundle.avatar
        frames = []
        for exprs, jaw in (([], 0.0), ([n + "=0.8" for n in ("mouthSmile_L", "mouthSmile_R") if n in av.expr_names], 0.0),
                           ([], 0.25), ([], 0.0)):
            frames.append(self.ctx.render_image(parse_expression_args(av, exprs, jaw=jaw), 256))
        return write_video(Path(self._tmp.name) / "webcam_selftest.mp4", frames, fps=10.0)

    def close(self) -> None:
        self.ctl.stop(quiet=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def build(parent, ctx) -> WebcamPanel:
    """The Webcam tab inside ``parent`` (a dearpygui container)."""
    return WebcamPanel(parent, ctx)
