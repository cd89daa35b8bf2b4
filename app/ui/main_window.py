"""The main window: viewport (dynamic texture + mouse/keys), toolbar, side-bar tabs, status line, UI loop.

The loop (UI thread) polls input and workers, submits the newest view state to the render worker
when something changed, uploads finished frames, and sleeps according to :class:`FramePacer`
(idle when nothing changes). Headless scripts (smoke test, benchmark) run inside the same loop as
generators that yield wait conditions.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import dearpygui.dearpygui as dpg
import numpy as np
import torch

from app.closing import CHOICES, QUESTION, ExitFlow
from app.context import AppContext, MessageLog, one_line_error, resolve_checkpoint_path
from app.drop import DropHandler, GlfwEvents
from app.lighting import EnvironmentLibrary
from app.pacing import FpsCounter, FramePacer, MsAverage, ProgressiveResolution, default_render_threads
from app.recorder import VideoRecorder, save_png
from app.viewer import BACKGROUNDS, RenderWorker, ViewerController, default_device, off_ui_thread
from hravatar.render.pipeline import CHANNELS

from . import LEVEL_COLOURS, MUTED, setup_fonts, setup_theme

#: Side-bar tabs: (key, label, module). Panels are imported lazily; a missing module shows a note.
TABS = (
    ("view", "View", "app.ui.view_panel"),
    ("puppet", "Puppet", "app.ui.puppet_panel"),
    ("lighting", "Lighting", "app.ui.light_panel"),
    ("material", "Material", "app.ui.material_panel"),
    ("webcam", "Webcam", "app.ui.webcam_panel"),
    ("train", "Train", "app.ui.train_panel"),
)
SIDE_WIDTH = 460
STATUS_HEIGHT = 30
RESOLUTIONS = (128, 192, 256, 384, 512, 768, 1024)
BACKGROUND_LABELS = {"colour": "Colour", "environment": "Blurred environment", "transparent": "Transparent"}
KEYS = {"mvKey_Left": "left", "mvKey_Right": "right", "mvKey_Up": "up", "mvKey_Down": "down", "mvKey_R": "r", "mvKey_F": "f"}


class StartupError(RuntimeError):
    """The app cannot start (bad checkpoint, ...); the message is one line."""


@dataclass
class AppOptions:
    checkpoint: str | None = None
    envmap: str | None = None
    res: int | None = None  # render height (default 256 on CPU, 512 on CUDA)
    width: int = 1440
    height: int = 900
    device: str | None = None
    max_fps: float = 60.0
    # UI frames per second while a CPU render is in flight and UI frames are expensive (software
    # OpenGL); None: no cap (see FramePacer)
    busy_ui_fps: float | None = 20.0
    # CPU threads for rendering (torch and the numba pass); None: all cores but one, which the
    # interface needs (software OpenGL draws it on the CPU)
    render_threads: int | None = None
    tab: str = "view"
    title: str = "hravatar"
    progressive: bool = True  # reduced-size renders while a slider moves (see ProgressiveResolution)
    compile: bool = False  # torch.compile deformation and shading (the first frame waits for it)


class App:
    """The desktop app: owns the context, the workers and the dearpygui widgets."""

    def __init__(self, opts: AppOptions) -> None:
        from hravatar.api import open_avatar

        self.opts = opts
        self.messages = MessageLog()
        self.device = torch.device(opts.device) if opts.device else default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise StartupError("--device cuda was asked for but CUDA is not available")
        if self.device.type == "cpu" or opts.render_threads:
            torch.set_num_threads(opts.render_threads or default_render_threads())
        try:
            # off the UI thread, which must not own an OpenMP pool (see app.viewer.off_ui_thread)
            bundle = off_ui_thread(open_avatar, resolve_checkpoint_path(opts.checkpoint) if opts.checkpoint else None, "cpu")
        except Exception as e:  # noqa: BLE001  - one line, exit code 1
            raise StartupError(f"cannot open {opts.checkpoint or 'the demo avatar'}: {one_line_error(e, opts.checkpoint)}") from None
        self.res = int(opts.res or (512 if self.device.type == "cuda" else 256))
        self.library = EnvironmentLibrary(bundle, self.device)
        self.viewer = ViewerController(bundle, self.library, self.device, render_size=(self.res, self.res),
                                       compile_render=opts.compile)
        self.worker = RenderWorker()
        self.ctx = AppContext(self.viewer, self.worker, self.messages)
        self.ctx.shell = self  # the built-in panels reach the shell (file dialogs, output) through this
        self.recorder = VideoRecorder()
        self.record_fps = 30.0
        self.record_max_seconds = 60.0
        self.drop = DropHandler(self.load_environment_file, self.ctx.open_checkpoint, self.ctx.notify)
        self.pacer = FramePacer(max_fps=opts.max_fps, busy_max_fps=opts.busy_ui_fps)
        # interactive renders at a reduced size (about 100 ms each), then one at full size when it stops
        self.progressive = ProgressiveResolution(enabled=opts.progressive)
        self.progressive_allowed = opts.progressive
        self._submitted_geometry: tuple | None = None
        self.events = GlfwEvents()
        self.idle_wait_s = 0.25  # idle: wake on input, else 4 frames/s for panels that poll
        self.idle_wait_in_scripts = False  # headless scripts poll every frame: no idle waits unless asked
        self.fps = FpsCounter(1.0)
        self.render_ms, self.display_ms, self.ui_ms = MsAverage(), MsAverage(), MsAverage(60)
        self.panels: dict[str, object] = {}
        self.panel_notes: dict[str, str] = {}
        self.ui_frames = 0
        self.shown_seq = 0
        self.shown_frame = None
        self._submitted: tuple | None = None
        self._tex: int | str | None = None
        self._tex_size: tuple[int, int] = (0, 0)
        self._old_textures: list = []
        self._draw_size: tuple[int, int] = (0, 0)
        self._image_rect = (0.0, 0.0, 1.0, 1.0)
        self._mouse_down = {0: False, 1: False, 2: False}
        self._last_mouse = (0.0, 0.0)
        self._status_t = 0.0
        self._text_inputs: list = []
        self.exit_flow = ExitFlow(self._training_active)
        self._shutting_down = False
        if opts.envmap:
            self._apply_envmap_option(opts.envmap)

    # ------------------------------------------------------------------ actions (also used by scripts)
    def _apply_envmap_option(self, spec: str) -> None:
        if spec == "learned" or spec.startswith("builtin:"):
            try:
                self.library.select(spec)
            except KeyError:
                self.ctx.notify(f"no environment '{spec}'; using {self.library.label(self.library.default_key())}", "warning")
        else:
            self.load_environment_file(spec)

    def load_environment_file(self, path) -> str | None:
        """Load an .hdr/.exr in the background and select it when ready (errors -> one line)."""
        try:
            key = self.library.load_file(path, select=True)
        except ValueError as e:
            self.ctx.notify(str(e), "error")
            return None
        self.ctx.notify(f"Loading {Path(path).name} ...")
        return key

    def save_png(self, path) -> Path | None:
        f = self.worker.latest()
        if f is None:
            self.ctx.notify("nothing rendered yet", "warning")
            return None
        try:
            p = save_png(path, f.png_rgba())
        except (OSError, ValueError) as e:
            self.ctx.notify(f"cannot save PNG: {e}", "error")
            return None
        self.ctx.notify(f"Saved {p}")
        return p

    def start_recording(self, path) -> Path | None:
        try:
            p = self.recorder.start(path, self.record_fps, self.record_max_seconds or None)
        except (OSError, ValueError, RuntimeError) as e:
            self.ctx.notify(f"cannot record: {e}", "error")
            return None
        self.ctx.notify(f"Recording to {p}")
        return p

    def stop_recording(self) -> None:
        self.recorder.stop()

    def select_tab(self, key: str) -> None:
        if dpg.does_item_exist(f"tab_{key}"):
            dpg.set_value("tabs", f"tab_{key}")

    # ------------------------------------------------------------------ quitting
    def _training_active(self) -> bool:
        return bool(getattr(self.panels.get("train"), "training_active", False))

    def request_exit(self) -> None:
        """Window close button / File > Quit: close now, or ask first while a training run is active."""
        if self.exit_flow.request() == "close":
            dpg.stop_dearpygui()
            return
        if dpg.does_item_exist("dlg_exit"):
            w, h = dpg.get_viewport_client_width(), dpg.get_viewport_client_height()
            dpg.configure_item("dlg_exit", show=True, pos=(max(0, (w - 460) // 2), max(0, (h - 190) // 2)))

    def answer_exit(self, choice: str) -> None:
        """The answer to the exit question; the Train panel's ``close(keep_running=...)`` runs as the app stops."""
        if dpg.does_item_exist("dlg_exit"):
            dpg.configure_item("dlg_exit", show=False)
        if self.exit_flow.answer(choice):
            if self.exit_flow.keep_training:
                run = getattr(self.panels.get("train"), "run_dir", "")
                self.ctx.notify(f"Closing; training continues in the background in {run} "
                                f"(follow it later: python launch.py --train-run {run})" if run
                                else "Closing; training continues in the background")
            else:
                self.ctx.notify("Stopping the training run (it saves a checkpoint) ...")
            dpg.stop_dearpygui()

    # ------------------------------------------------------------------ building the UI
    def build(self) -> None:
        dpg.create_context()
        self.fonts = setup_fonts()
        setup_theme()
        dpg.create_viewport(title=self.opts.title, width=self.opts.width, height=self.opts.height, vsync=False,
                            clear_color=(24, 25, 28, 255), min_width=900, min_height=600,
                            disable_close=True)  # the close button calls request_exit (it may ask first)
        # dearpygui also calls it once more while the context is destroyed: ignore that one
        dpg.set_exit_callback(lambda: None if self._shutting_down else self.request_exit())
        self.tex_registry = dpg.add_texture_registry()
        self._ensure_texture(*self.viewer.render_size)
        with dpg.window(tag="root", no_scrollbar=True, menubar=True):
            self._build_menu()
            with dpg.group(horizontal=True):
                with dpg.child_window(tag="view_area", width=-(SIDE_WIDTH + 4), height=-(STATUS_HEIGHT + 4), border=False,
                                      no_scrollbar=True):
                    self._build_toolbar()
                    with dpg.drawlist(tag="viewport_draw", width=400, height=300):
                        dpg.draw_rectangle((0, 0), (400, 300), fill=(18, 19, 22), color=(18, 19, 22), tag="vp_bg")
                        dpg.draw_image(self._tex, (0, 0), (1, 1), tag="vp_image")
                        dpg.draw_line((0, 0), (0, 0), color=(242, 190, 50, 255), thickness=2, tag="vp_split", show=False)
                        dpg.draw_text((10, 10), "", size=15, color=(230, 230, 230), tag="vp_label_l")
                        dpg.draw_text((10, 10), "", size=15, color=(230, 230, 230), tag="vp_label_r")
                        dpg.draw_text((10, 10), "Preparing the avatar ...", size=18, color=MUTED, tag="vp_overlay")
                with dpg.child_window(tag="side", width=SIDE_WIDTH, height=-(STATUS_HEIGHT + 4), border=False):
                    # dearpygui leaks the child window's width to its first item: without this spacer
                    # the first tab stretches over the whole tab bar
                    dpg.add_spacer(height=1)
                    with dpg.tab_bar(tag="tabs"):
                        for key, label, module in TABS:
                            with dpg.tab(label=label, tag=f"tab_{key}") as tab:
                                dpg.add_spacer(height=4)
                                self._build_panel(key, label, module, tab)
            with dpg.child_window(tag="statusbar", height=STATUS_HEIGHT, border=False, no_scrollbar=True):
                with dpg.group(horizontal=True):
                    dpg.add_text("", tag="status_perf", color=(190, 196, 206))
                    dpg.add_text("", tag="status_msg")
        with dpg.handler_registry():
            dpg.add_mouse_wheel_handler(callback=lambda s, a: self._on_wheel(a))
            for const, name in KEYS.items():
                if hasattr(dpg, const):
                    dpg.add_key_press_handler(getattr(dpg, const), callback=lambda s, a, u: self._on_key(u), user_data=name)
        self._build_dialogs()
        dpg.set_primary_window("root", True)
        dpg.setup_dearpygui()
        dpg.show_viewport()
        self.drop.install()
        if self.events.available:
            self.ctx.wake = self.events.wake
        self.select_tab(self.opts.tab)

    def _build_menu(self) -> None:
        with dpg.menu_bar():
            with dpg.menu(label="File"):
                dpg.add_menu_item(label="Open avatar ...", callback=lambda: dpg.show_item("dlg_open_avatar"))
                dpg.add_menu_item(label="Open demo avatar", callback=lambda: self.ctx.open_checkpoint(None))
                dpg.add_menu_item(label="Load environment map ...", callback=lambda: dpg.show_item("dlg_load_env"))
                dpg.add_separator()
                dpg.add_menu_item(label="Save PNG ...", callback=lambda: dpg.show_item("dlg_save_png"))
                dpg.add_menu_item(label="Record MP4 ...", callback=self._toggle_record)
                dpg.add_separator()
                dpg.add_menu_item(label="Quit", callback=lambda: self.request_exit())
            with dpg.menu(label="View"):
                dpg.add_menu_item(label="Reset view        R", callback=lambda: self.viewer.orbit.reset())
                dpg.add_menu_item(label="Frame head        F", callback=lambda: self.viewer.frame_head())
                for key, label, _ in TABS:
                    dpg.add_menu_item(label=f"{label} panel", callback=lambda s, a, u: self.select_tab(u), user_data=key)
            with dpg.menu(label="Help"):
                dpg.add_text("Left drag: orbit    Right / middle drag: pan    Wheel: zoom", color=MUTED)
                dpg.add_text("Arrow keys: orbit    R: reset view    F: frame head  (pointer over the viewport)", color=MUTED)
                dpg.add_text("Drop .hdr / .exr files to relight, .safetensors to open an avatar", color=MUTED)

    def _build_toolbar(self) -> None:
        with dpg.group(horizontal=True, tag="toolbar"):
            dpg.add_text("Channel")
            dpg.add_combo(list(CHANNELS), default_value=self.viewer.channel, width=130, tag="tb_channel",
                          callback=lambda s, a: self.viewer.set_channel(a))
            dpg.add_spacer(width=6)
            dpg.add_text("Background")
            dpg.add_combo([BACKGROUND_LABELS[b] for b in BACKGROUNDS], default_value=BACKGROUND_LABELS[self.viewer.background],
                          width=170, tag="tb_background", callback=lambda s, a: self._set_background_label(a))
            dpg.add_spacer(width=6)
            dpg.add_checkbox(label="Compare", tag="tb_compare", callback=lambda s, a: self.viewer.set_compare(a))
            dpg.add_spacer(width=10)
            dpg.add_button(label="Save PNG", callback=lambda: dpg.show_item("dlg_save_png"))
            dpg.add_button(label="Record", tag="tb_record", callback=self._toggle_record)
            dpg.add_progress_bar(tag="tb_record_progress", width=150, show=False, overlay="")

    def _set_background_label(self, label: str) -> None:
        mode = next(k for k, v in BACKGROUND_LABELS.items() if v == label)
        self.viewer.set_background(mode)

    def _toggle_record(self) -> None:
        if self.recorder.state == "recording":
            self.stop_recording()
        elif self.recorder.state != "finishing":
            dpg.show_item("dlg_record")

    def _build_dialogs(self) -> None:
        home = str(Path.home())

        def dialog(tag, label, exts, cb, default_name=".", save=False):
            with dpg.file_dialog(tag=tag, label=label, show=False, modal=True, width=760, height=480, default_path=home,
                                 default_filename=default_name, callback=lambda s, a: self._dialog_done(a, cb)):
                for e in exts:
                    dpg.add_file_extension(e, color=(120, 175, 245, 255))
                dpg.add_file_extension(".*")

        dialog("dlg_open_avatar", "Open avatar checkpoint", [".safetensors"], self.ctx.open_checkpoint)
        dialog("dlg_load_env", "Load environment map", [".hdr", ".exr"], self.load_environment_file)
        dialog("dlg_save_png", "Save PNG", [".png"], self.save_png, "hravatar.png")
        dialog("dlg_record", "Record MP4", [".mp4"], self.start_recording, "hravatar.mp4")
        # the exit question (shown by request_exit while a training run is active)
        with dpg.window(tag="dlg_exit", label="Quit hravatar", modal=True, show=False, no_resize=True, no_collapse=True,
                        no_close=True, width=460, autosize=True):
            dpg.add_text(QUESTION, wrap=430)
            dpg.add_spacer(height=4)
            for key, label in CHOICES:
                dpg.add_button(label=label, width=-1, tag=f"dlg_exit_{key}", user_data=key,
                               callback=lambda s, a, u: self.answer_exit(u))

    def _dialog_done(self, app_data: dict, fn: Callable) -> None:
        path = (app_data or {}).get("file_path_name")
        if path:
            fn(path)

    def _build_panel(self, key: str, label: str, module: str, tab) -> None:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            msg = f"The {label} panel is not available in this build ({module.replace('.', '/')}.py is missing)."
            dpg.add_text(msg, color=MUTED, wrap=SIDE_WIDTH - 30)
            self.panel_notes[key] = msg
            return
        except Exception as e:  # noqa: BLE001  - a broken panel must not take the app down
            self._panel_failed(key, label, e)
            return
        try:
            self.panels[key] = mod.build(tab, self.ctx)
        except Exception as e:  # noqa: BLE001
            self._panel_failed(key, label, e)

    def _panel_failed(self, key: str, label: str, e: BaseException) -> None:
        msg = f"The {label} panel failed to load: {(str(e).splitlines() or [type(e).__name__])[0]}"
        dpg.add_text(msg, color=LEVEL_COLOURS["error"], wrap=SIDE_WIDTH - 30)
        self.panel_notes[key] = msg
        self.ctx.notify(msg, "error")

    def register_text_input(self, item) -> None:
        """Text inputs that take the keyboard: viewport keys are ignored while one is active."""
        self._text_inputs.append(item)

    # ------------------------------------------------------------------ viewport texture and layout
    def _ensure_texture(self, w: int, h: int) -> None:
        if (w, h) == self._tex_size:
            return
        tex = dpg.add_dynamic_texture(w, h, np.zeros(w * h * 4, np.float32), parent=self.tex_registry)
        if self._tex is not None:
            dpg.configure_item("vp_image", texture_tag=tex)
            self._old_textures.append((self.ui_frames + 2, self._tex))  # delete once no frame uses it
        self._tex, self._tex_size = tex, (w, h)

    def _layout(self) -> None:
        """Fit the drawlist to the viewport area and keep the render aspect equal to it."""
        if not dpg.does_item_exist("view_area"):
            return
        aw, ah = dpg.get_item_rect_size("view_area")
        th = dpg.get_item_rect_size("toolbar")[1] if dpg.does_item_exist("toolbar") else 30
        dw, dh = max(64, int(aw)), max(64, int(ah - th - 8))
        if (dw, dh) != self._draw_size:
            self._draw_size = (dw, dh)
            dpg.configure_item("viewport_draw", width=dw, height=dh)
            dpg.configure_item("vp_bg", pmax=(dw, dh))
            self.apply_resolution(self.res)

    def apply_resolution(self, res: int) -> None:
        """Render height ``res``; the width follows the viewport's aspect (even, for video)."""
        self.res = int(res)
        dw, dh = self._draw_size if self._draw_size[0] else (4, 3)
        h = self.res
        w = max(16, int(round(h * dw / max(1, dh) / 2)) * 2)
        self.viewer.set_render_size(w, h)

    def _place_image(self) -> None:
        dw, dh = self._draw_size
        tw, th = self._tex_size
        if not dw or not tw:
            return
        s = min(dw / tw, dh / th)
        w, h = tw * s, th * s
        x0, y0 = (dw - w) / 2, (dh - h) / 2
        self._image_rect = (x0, y0, w, h)
        # half-texel inset: the GL sampler repeats, and bilinear filtering at the border would
        # otherwise blend in the opposite edge (a coloured line along the top of the image)
        du, dv = 0.5 / tw, 0.5 / th
        dpg.configure_item("vp_image", pmin=(x0, y0), pmax=(x0 + w, y0 + h), uv_min=(du, dv), uv_max=(1 - du, 1 - dv))
        f = self.shown_frame
        compare = f is not None and f.compare_split is not None
        dpg.configure_item("vp_split", show=compare)
        if compare:
            xs = x0 + round(f.compare_split * tw) * s  # the column where the render switches
            dpg.configure_item("vp_split", p1=(xs, y0), p2=(xs, y0 + h))
            dpg.configure_item("vp_label_l", text="Original", pos=(x0 + 12, y0 + 10))
            dpg.configure_item("vp_label_r", text="Edited", pos=(x0 + w - 64, y0 + 10))
        else:
            dpg.configure_item("vp_label_l", text="")
            dpg.configure_item("vp_label_r", text="")

    # ------------------------------------------------------------------ input
    def _viewport_hovered(self) -> bool:
        return bool(dpg.is_item_hovered("viewport_draw"))

    def _poll_mouse(self) -> None:
        pos = tuple(dpg.get_mouse_pos(local=False))
        if pos != self._last_mouse:
            self.pacer.touch()
            self._last_mouse = pos
        nav = self.viewer.navigator
        over = self._viewport_hovered()
        for b in (0, 1, 2):
            down = bool(dpg.is_mouse_button_down(b))
            if down and not self._mouse_down[b]:
                nav.press(b, pos, over)
            elif not down and self._mouse_down[b]:
                nav.release(b)
            self._mouse_down[b] = down
        nav.move(pos, int(self._image_rect[3]) or 1)

    def _on_wheel(self, delta) -> None:
        self.viewer.navigator.wheel(float(delta), self._viewport_hovered())

    def _on_key(self, name: str) -> None:
        # keys act on the viewport under the pointer, so typing "r" or "f" in a panel's text field
        # (or moving a focused slider with the arrows) never moves the camera
        if not self._viewport_hovered():
            return
        if any(dpg.does_item_exist(t) and dpg.is_item_active(t) for t in self._text_inputs):
            return
        self.viewer.navigator.key(name, self.viewer.frame_head)

    # ------------------------------------------------------------------ one UI frame
    def _frame(self, dt: float) -> None:
        self._layout()
        self._poll_mouse()
        self.ctx.poll(dt)
        for ev in self.library.poll():
            self.ctx.notify(ev.message, ev.level)
        self.drop.poll()
        for err in self.worker.pop_errors():
            self.ctx.notify(err, "error")
        for level, msg in self.recorder.poll():
            self.ctx.notify(msg, level)
        self.pacer.set_active("auto-rotate", self.viewer.tick(dt))
        changed = self.viewer.version != self._submitted
        if changed:
            self.pacer.invalidate()
        if self.pacer.begin_frame() and changed:
            self._submit_render(refine=False)
        elif not changed and self.progressive.refine_due():
            self._submit_render(refine=True)  # the interaction stopped: the same state at full size
        self._show_latest()
        if self.recorder.state == "recording" and self.shown_frame is not None:
            self.recorder.offer(self.shown_frame.rgb_uint8())
        for panel in self.panels.values():
            sync = getattr(panel, "sync", None)
            if sync is not None:
                sync()
        self._sync_toolbar()
        self._update_status()
        while self._old_textures and self._old_textures[0][0] <= self.ui_frames:
            dpg.delete_item(self._old_textures.pop(0)[1])

    def _geometry_key(self) -> tuple:
        """What the G-buffers depend on (avatar, driving frame, camera, render size): when it changes,
        a render re-rasterizes instead of only re-shading."""
        ver = self.viewer.version
        return (ver[0], ver[2], ver[3], self.viewer.render_size)

    def _submit_render(self, refine: bool) -> None:
        """Submit the current state: reduced while interacting (see :class:`ProgressiveResolution`), else full size."""
        v, prog = self.viewer, self.progressive
        # a video gets full-size frames only
        prog.enabled = self.progressive_allowed and self.recorder.state != "recording"
        full = v.render_size
        geom = self._geometry_key()
        if refine:
            size = full
        else:
            scale = prog.request(geom != self._submitted_geometry, dragging=v.navigator.dragging)
            size = prog.size(full, scale)
        s = v.snapshot(size)
        if s is None:
            return
        self.worker.submit(s)
        self._submitted, self._submitted_geometry = s.version, geom
        if size == full:
            prog.refined()

    def _show_latest(self) -> None:
        f = self.worker.latest()
        if f is None or f.seq == self.shown_seq:
            return
        t0 = time.perf_counter()
        self._ensure_texture(f.width, f.height)
        dpg.set_value(self._tex, f.display.reshape(-1))
        self.shown_seq, self.shown_frame = f.seq, f
        self._place_image()
        dpg.configure_item("vp_overlay", text="")
        self.display_ms.add((time.perf_counter() - t0) * 1e3)
        self.render_ms.add(f.timings.get("total", 0.0))
        full_h = self.viewer.render_size[1]
        if full_h > 0:
            self.progressive.report(f.timings.get("total", 0.0), f.height / full_h, f.timings.get("raster", 0.0) > 0)
        self.fps.tick(time.perf_counter())

    def _sync_toolbar(self) -> None:
        v = self.viewer
        if dpg.get_value("tb_channel") != v.channel:
            dpg.set_value("tb_channel", v.channel)
        if dpg.get_value("tb_background") != BACKGROUND_LABELS[v.background]:
            dpg.set_value("tb_background", BACKGROUND_LABELS[v.background])
        if dpg.get_value("tb_compare") != v.compare:
            dpg.set_value("tb_compare", v.compare)
        rec = self.recorder
        recording = rec.state in ("recording", "finishing")
        dpg.configure_item("tb_record", label="Stop" if rec.state == "recording" else ("Saving ..." if recording else "Record"))
        dpg.configure_item("tb_record_progress", show=recording)
        if recording:
            p = rec.progress
            dpg.set_value("tb_record_progress", p if p is not None else (rec.seconds % 1.0))
            dpg.configure_item("tb_record_progress", overlay=f"{rec.frames} frames  {rec.seconds:.1f} s")
        if self.shown_frame is None:
            pending = self.library.pending
            e = self.library.entry(pending) if pending else None
            text = f"Preparing lighting: {e.label} ({e.stage}) ..." if e is not None else "Rendering the first frame ..."
            dpg.configure_item("vp_overlay", text=text, pos=(20, 20))

    def _update_status(self) -> None:
        now = time.perf_counter()
        if now - self._status_t < 0.25:
            return
        self._status_t = now
        v = self.viewer
        w, h = v.render_size
        f = self.shown_frame
        size_text = f"{w}x{h}"
        if f is not None and (f.width, f.height) != (w, h) and f.height < h:
            size_text = f"{f.width}x{f.height} (interactive)"
        dev = self.device.type.upper()
        backend = self.backend_label()
        if self.viewer.renderer.compiled:
            backend += ", compiled"
        if self.device.type == "cpu":
            n = torch.get_num_threads()
            backend += f", {n} thread" + ("s" if n > 1 else "")
        fps = self.fps.fps(now)
        fps_text = f"{fps:5.1f} fps" if fps > 0 or not self.fps.total else "idle"
        perf = (f"{fps_text}   render {self.render_ms.value:6.1f} ms   display {self.display_ms.value:4.1f} ms   "
                f"{v.num_gaussians:,} Gaussians   {dev} ({backend})   {size_text}")
        dpg.set_value("status_perf", perf)
        m = self.messages.latest()
        if m is not None:
            dpg.set_value("status_msg", ("    " + m.text)[:160])
            dpg.configure_item("status_msg", color=LEVEL_COLOURS.get(m.level, MUTED))

    def backend_label(self) -> str:
        """The rasterizer actually used ("auto": gsplat on CUDA, numba on the CPU when installed)."""
        from hravatar.render.rasterize import select_backend

        try:
            return select_backend(self.device, self.viewer.renderer.backend)
        except (RuntimeError, ValueError):
            return self.viewer.renderer.backend

    # ------------------------------------------------------------------ the loop
    def run(self, script: Iterator | None = None, timeout_s: float = 900.0) -> int:
        """Run until the window closes or ``script`` (a generator of wait predicates) finishes.

        Returns the exit code (0, or 1 when the script failed or timed out).
        """
        code = 0
        wait: Callable[[], bool] | None = None
        t_wait = time.perf_counter()
        last = time.perf_counter()
        try:
            while dpg.is_dearpygui_running():
                now = time.perf_counter()
                dt, last = now - last, now
                self._frame(dt)
                if script is not None:
                    try:
                        if wait is None or wait():
                            wait = next(script)
                            t_wait = time.perf_counter()
                        elif time.perf_counter() - t_wait > timeout_s:
                            raise TimeoutError(f"timed out waiting for: {getattr(wait, '__doc__', None) or wait}")
                    except StopIteration as stop:
                        code = int(stop.value or 0)
                        break
                    except Exception as e:  # noqa: BLE001
                        print(f"[error] script failed: {type(e).__name__}: {e}", flush=True)
                        code = 1
                        break
                dpg.render_dearpygui_frame()
                self.ui_frames += 1
                t_end = time.perf_counter()
                self.ui_ms.add((t_end - now) * 1e3)
                if (self.worker.busy or self.library.busy or self.viewer.navigator.dragging or self.ctx.loading_checkpoint
                        or self.progressive.refine_pending):
                    self.pacer.touch()
                if self.pacer.idle and self.events.available and (script is None or self.idle_wait_in_scripts):
                    self.events.wait(self.idle_wait_s)  # returns at once on input (or a wake())
                else:
                    s = self.pacer.sleep_time(render_contended=self._render_contended())
                    if s > 0:
                        time.sleep(s)
        finally:
            self.close()
        return code

    def _render_contended(self) -> bool:
        """A CPU render is in flight and UI frames cost enough CPU to slow it (mean > 8 ms: software
        OpenGL; a GPU-driven display draws this interface in a millisecond or two)."""
        return self.device.type == "cpu" and self.worker.busy and self.ui_ms.value > 8.0

    def close(self) -> None:
        self._shutting_down = True
        for key, panel in list(self.panels.items()):
            close = getattr(panel, "close", None)
            if close is not None:
                try:
                    if key == "train":  # the exit question's answer: stop the run or leave it going
                        close(keep_running=self.exit_flow.keep_training)
                    else:
                        close()
                except Exception as e:  # noqa: BLE001
                    print(f"[warning] closing the {key} panel: {e}", flush=True)
        if self.recorder.state == "recording":
            self.recorder.stop()
            self.recorder.wait(30)
        self.worker.close()
        self.library.close()
        try:
            dpg.destroy_context()
        except Exception:  # noqa: BLE001
            pass
