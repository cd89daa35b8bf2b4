"""View tab: camera (field of view, orbit angles, distance, reset / frame), saved views, display and output options."""
from __future__ import annotations

import dearpygui.dearpygui as dpg

from app.viewer import BACKGROUNDS

from . import heading, note, row
from . import form as make_form

RESOLUTIONS = (128, 192, 256, 384, 512, 768, 1024)
BACKGROUND_LABELS = {"colour": "Colour", "environment": "Blurred environment", "transparent": "Transparent"}
FRAME_RATES = ("24", "25", "30", "60")


class ViewPanel:
    def __init__(self, parent, ctx) -> None:
        self.ctx = ctx
        self.shell = ctx.shell
        self.viewer = ctx.viewer
        self._views: list[str] = []
        self._state = None
        fonts = getattr(self.shell, "fonts", None)
        o = self.viewer.orbit.state
        with dpg.group(parent=parent):
            heading("Camera", fonts=fonts)
            t = make_form()
            self.fov = dpg.add_slider_float(parent=row(t, "Field of view"), min_value=5, max_value=90, default_value=o.fov_y_deg,
                                            format="%.0f deg", width=-1, callback=lambda s, a: self.set_fov(a))
            self.yaw = dpg.add_slider_float(parent=row(t, "Orbit yaw"), min_value=-180, max_value=180, default_value=o.yaw_deg,
                                            format="%.0f deg", width=-1, callback=lambda s, a: self.set_yaw(a))
            self.pitch = dpg.add_slider_float(parent=row(t, "Orbit pitch"), min_value=-89, max_value=89, default_value=o.pitch_deg,
                                              format="%.0f deg", width=-1, callback=lambda s, a: self.set_pitch(a))
            self.dist = dpg.add_drag_float(parent=row(t, "Distance"), min_value=0.05, max_value=20.0, default_value=o.distance,
                                           speed=0.005, format="%.2f m", width=-1, callback=lambda s, a: self.set_distance(a))
            with dpg.group(horizontal=True):
                dpg.add_button(label="Reset view  (R)", width=150, callback=lambda: self.reset_view())
                dpg.add_button(label="Frame head  (F)", width=150, callback=lambda: self.frame_head())
            dpg.add_spacer(height=6)
            heading("Saved views", fonts=fonts)
            with dpg.group(horizontal=True):
                self.view_name = dpg.add_input_text(hint="name of this view", width=-88, on_enter=True,
                                                    callback=lambda s, a: self.save_view(a))
                dpg.add_button(label="Save", width=80, callback=lambda: self.save_view(dpg.get_value(self.view_name)))
            self.shell.register_text_input(self.view_name)
            self.view_list = dpg.add_listbox([], num_items=3, width=-1)
            with dpg.group(horizontal=True):
                dpg.add_button(label="Restore", width=100, callback=lambda: self.restore_view(dpg.get_value(self.view_list)))
                dpg.add_button(label="Delete", width=100, callback=lambda: self.delete_view(dpg.get_value(self.view_list)))
            dpg.add_spacer(height=6)
            heading("Display", fonts=fonts)
            t = make_form()
            self.res = dpg.add_combo([f"{r} px" for r in RESOLUTIONS], parent=row(t, "Render height", "Rendered image height; "
                                     "the width follows the window. The image is scaled to fill the viewport."),
                                     default_value=f"{self.shell.res} px", width=-1, callback=lambda s, a: self.set_resolution(int(a.split()[0])))
            self.bg = dpg.add_combo([BACKGROUND_LABELS[b] for b in BACKGROUNDS], parent=row(t, "Background"),
                                    default_value=BACKGROUND_LABELS[self.viewer.background], width=-1,
                                    callback=lambda s, a: self.set_background(next(k for k, v in BACKGROUND_LABELS.items() if v == a)))
            c = self.viewer.background_colour
            self.bg_colour = dpg.add_color_edit([int(x * 255) for x in c] + [255], parent=row(t, "Colour"), no_alpha=True, width=-1,
                                                callback=lambda s, a: self.set_background_colour(a[:3]))
            dpg.add_spacer(height=6)
            heading("Recording", fonts=fonts)
            t = make_form()
            self.rec_fps = dpg.add_combo(FRAME_RATES, parent=row(t, "Frame rate"), default_value=str(int(self.shell.record_fps)),
                                         width=-1, callback=lambda s, a: self.set_record_fps(float(a)))
            self.rec_max = dpg.add_slider_int(parent=row(t, "Max length", "The recording stops by itself after this many "
                                              "seconds (0: no limit)."), min_value=0, max_value=300,
                                              default_value=int(self.shell.record_max_seconds), format="%d s", width=-1,
                                              callback=lambda s, a: self.set_record_max(a))
            note("Record / Stop and Save PNG are in the toolbar above the viewport. Transparent backgrounds are saved "
                 "with an alpha channel.")
            dpg.add_spacer(height=6)
            heading("Performance", fonts=fonts)
            self.perf = dpg.add_text("", color=(190, 196, 206))
            dpg.add_spacer(height=6)
            heading("Mouse and keys", fonts=fonts)
            note("Left drag: orbit.  Right or middle drag: pan.  Wheel: zoom.\nWith the pointer over the viewport: arrow keys orbit, "
                 "R resets the view, F frames the head.")

    # ------------------------------------------------------------------ actions (the callbacks)
    def set_fov(self, deg: float) -> None:
        self.viewer.orbit.set_fov(float(deg))

    def _set(self, **kw) -> None:
        from dataclasses import replace

        self.viewer.orbit.set_state(replace(self.viewer.orbit.state, **kw))

    def set_yaw(self, deg: float) -> None:
        self._set(yaw_deg=float(deg))

    def set_pitch(self, deg: float) -> None:
        self._set(pitch_deg=float(deg))

    def set_distance(self, d: float) -> None:
        self._set(distance=float(d))

    def reset_view(self) -> None:
        self.viewer.orbit.reset()

    def frame_head(self) -> None:
        self.viewer.frame_head()

    def save_view(self, name: str) -> None:
        try:
            self.viewer.orbit.save_view(name or "")
        except ValueError as e:
            self.ctx.notify(str(e), "warning")
            return
        dpg.set_value(self.view_name, "")
        self.ctx.notify(f"Saved view '{name.strip()}'")

    def restore_view(self, name: str) -> None:
        if not name:
            return
        try:
            self.viewer.orbit.restore_view(name)
        except KeyError as e:
            self.ctx.notify(str(e.args[0]), "warning")

    def delete_view(self, name: str) -> None:
        if name:
            self.viewer.orbit.delete_view(name)

    def set_resolution(self, res: int) -> None:
        self.shell.apply_resolution(int(res))

    def set_background(self, mode: str) -> None:
        self.viewer.set_background(mode)

    def set_background_colour(self, rgb) -> None:
        vals = [float(x) for x in rgb[:3]]
        if max(vals) > 1.0:  # dearpygui reports 0..255 in some versions
            vals = [x / 255.0 for x in vals]
        self.viewer.set_background("colour", tuple(vals))

    def set_record_fps(self, fps: float) -> None:
        self.shell.record_fps = float(fps)

    def set_record_max(self, seconds: int) -> None:
        self.shell.record_max_seconds = float(seconds)

    # ------------------------------------------------------------------ per frame
    def sync(self) -> None:
        o = self.viewer.orbit
        if o.state is not self._state:
            self._state = o.state
            for item, val in ((self.fov, o.state.fov_y_deg), (self.yaw, o.state.yaw_deg), (self.pitch, o.state.pitch_deg),
                              (self.dist, o.state.distance)):
                if not dpg.is_item_active(item):
                    dpg.set_value(item, float(val) + 0.0)  # + 0.0: no "-0 deg"
        names = o.view_names()
        if names != self._views:
            self._views = names
            dpg.configure_item(self.view_list, items=names)
            if names:
                dpg.set_value(self.view_list, names[-1])
        bg = BACKGROUND_LABELS[self.viewer.background]
        if dpg.get_value(self.bg) != bg:
            dpg.set_value(self.bg, bg)
        res = f"{self.shell.res} px"
        if dpg.get_value(self.res) != res:
            dpg.set_value(self.res, res)
        f = self.shell.shown_frame
        if f is not None and self.shell.ui_frames % 10 == 0:
            t = f.timings
            dpg.set_value(self.perf, f"deform {t.get('deform', 0):.1f} ms   raster {t.get('raster', 0):.1f} ms\n"
                                     f"shade {t.get('shade', 0):.1f} ms   compose {t.get('compose', 0):.1f} ms\n"
                                     f"UI frame {self.shell.ui_ms.value:.1f} ms   frames shown {self.shell.fps.total}\n"
                                     f"{'G-buffers cached (only shading re-ran)' if t.get('raster', 0) == 0 else 'full render'}")

    def selftest(self) -> None:
        o = self.viewer.orbit
        start = o.state
        self.set_fov(30)
        self.set_yaw(25)
        self.set_pitch(10)
        assert abs(o.state.fov_y_deg - 30) < 1e-6 and abs(o.state.yaw_deg - 25) < 1e-6
        self.save_view("three-quarter")
        self.set_yaw(-40)
        self.restore_view("three-quarter")
        assert abs(o.state.yaw_deg - 25) < 1e-6
        self.delete_view("three-quarter")
        assert "three-quarter" not in o.view_names()
        self.set_distance(start.distance * 1.2)
        self.frame_head()
        bg, colour = self.viewer.background, self.viewer.background_colour
        for mode in BACKGROUNDS:
            self.set_background(mode)
        self.set_background_colour((40, 44, 52))
        assert abs(self.viewer.background_colour[0] - 40 / 255) < 1e-6
        self.viewer.set_background(bg, colour)
        self.set_resolution(self.shell.res)
        o.set_state(start)
        self.sync()


def build(parent, ctx) -> ViewPanel:
    return ViewPanel(parent, ctx)
