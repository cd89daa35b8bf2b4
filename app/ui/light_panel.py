"""Lighting tab: environment list (built-in, learned, loaded files), loading with progress, lat-long
thumbnail with the rotation marked, rotation / auto-rotate / exposure."""
from __future__ import annotations

import dearpygui.dearpygui as dpg
import numpy as np

from . import MUTED, heading, note, row
from . import form as make_form

KIND_TAGS = {"learned": "captured", "builtin": "built-in", "file": "file"}


class LightPanel:
    def __init__(self, parent, ctx) -> None:
        self.ctx = ctx
        self.shell = ctx.shell
        self.viewer = ctx.viewer
        self.library = ctx.library
        self._labels: dict[str, str] = {}  # display label -> key
        self._items: list[str] = []
        self._thumb_key = None
        h = self.library.options.thumb_height
        self._thumb_size = (2 * h, h)
        self.thumb_tex = dpg.add_dynamic_texture(2 * h, h, np.zeros(2 * h * h * 4, np.float32), parent=self.shell.tex_registry)
        fonts = getattr(self.shell, "fonts", None)
        width = 400
        with dpg.group(parent=parent):
            heading("Environment", fonts=fonts)
            self.listbox = dpg.add_listbox([], num_items=8, width=-1, callback=lambda s, a: self.select_label(a))
            with dpg.group(horizontal=True):
                dpg.add_button(label="Load HDR / EXR ...", callback=lambda: dpg.show_item("dlg_load_env"))
                dpg.add_text("or drop files onto the window", color=MUTED)
            self.progress = dpg.add_progress_bar(width=-1, show=False, overlay="")
            dpg.add_spacer(height=4)
            self.thumb = dpg.add_image(self.thumb_tex, width=width, height=width // 2, border_color=(60, 64, 72, 255))
            self.thumb_caption = note("The amber line marks the part of the map seen behind the head from the front view.")
            dpg.add_spacer(height=6)
            heading("Controls", fonts=fonts)
            t = make_form(action_width=56)
            r = row(t, "Rotation")
            self.rotation = dpg.add_slider_float(parent=r, min_value=-180, max_value=180, default_value=self.viewer.rotation_deg,
                                                 format="%.0f deg", width=-1, callback=lambda s, a: self.set_rotation(a))
            dpg.add_button(label="Reset", parent=r, width=-1, callback=lambda: self.set_rotation(0.0))
            r = row(t, "Auto-rotate")
            with dpg.group(horizontal=True, parent=r):
                self.auto = dpg.add_checkbox(default_value=self.viewer.auto_rotate, callback=lambda s, a: self.set_auto_rotate(a))
                self.speed = dpg.add_slider_float(min_value=-120, max_value=120, default_value=self.viewer.auto_rotate_speed,
                                                  format="%.0f deg/s", width=-1, callback=lambda s, a: self.set_speed(a))
            dpg.add_spacer(parent=r)
            r = row(t, "Exposure")
            self.exposure = dpg.add_slider_float(parent=r, min_value=-6, max_value=6, default_value=self.viewer.exposure,
                                                 format="%+.1f stops", width=-1, callback=lambda s, a: self.set_exposure(a))
            dpg.add_button(label="Reset", parent=r, width=-1, callback=lambda: self.set_exposure(0.0))
            self.tone = note("")

    # ------------------------------------------------------------------ actions
    def select_label(self, label: str) -> None:
        key = self._labels.get(label)
        if key is not None:
            self.select(key)

    def select(self, key: str) -> None:
        try:
            self.library.select(key)
        except KeyError as e:
            self.ctx.notify(str(e.args[0]), "warning")

    def load_file(self, path) -> None:
        self.shell.load_environment_file(path)

    def set_rotation(self, deg: float) -> None:
        self.viewer.set_rotation(float(deg))

    def set_auto_rotate(self, on: bool) -> None:
        self.viewer.set_auto_rotate(bool(on))

    def set_speed(self, deg_s: float) -> None:
        self.viewer.set_auto_rotate(self.viewer.auto_rotate, float(deg_s))

    def set_exposure(self, stops: float) -> None:
        self.viewer.set_exposure(float(stops))

    # ------------------------------------------------------------------ per frame
    def _display_label(self, e) -> str:
        if e.state == "loading":
            return f"{e.label}   (loading {int(e.progress * 100)}%)"
        return f"{e.label}   [{KIND_TAGS.get(e.kind, e.kind)}]"

    def sync(self) -> None:
        lib = self.library
        entries = lib.entries()
        labels = [self._display_label(e) for e in entries]
        if labels != self._items:
            self._items = labels
            self._labels = {lab: e.key for lab, e in zip(labels, entries)}
            dpg.configure_item(self.listbox, items=labels)
        shown = lib.pending or lib.selected
        for lab, key in self._labels.items():
            if key == shown and dpg.get_value(self.listbox) != lab:
                dpg.set_value(self.listbox, lab)
        loading = lib.loading()
        dpg.configure_item(self.progress, show=bool(loading))
        if loading:
            e = loading[0]
            dpg.set_value(self.progress, max(0.02, e.progress))
            dpg.configure_item(self.progress, overlay=f"{e.label}: {e.stage}" + (f"  (+{len(loading) - 1} queued)" if len(loading) > 1 else ""))
        v = self.viewer
        for item, val in ((self.rotation, v.rotation_deg), (self.exposure, v.exposure), (self.auto, v.auto_rotate)):
            if not dpg.is_item_active(item) and dpg.get_value(item) != val:
                dpg.set_value(item, val)
        cur = lib.current()
        key = (cur.key, cur.generation, round(v.rotation_deg, 1), v.exposure) if cur is not None else None
        if key != self._thumb_key and cur is not None:
            img = lib.thumbnail(cur.key, v.rotation_deg, v.exposure)
            if img is not None:
                self._thumb_key = key
                rgba = np.concatenate([img.astype(np.float32) / 255.0, np.ones(img.shape[:2] + (1,), np.float32)], -1)
                dpg.set_value(self.thumb_tex, rgba.reshape(-1))
                if cur.kind == "learned":
                    text = ("Learned light: the preview shows its irradiance; only the directions the capture saw are "
                            "meaningful, so rotating it far gives odd shading. Shown through the capture's camera response.")
                else:
                    text = f"{cur.label}: {cur.tonemap.upper()} filmic tone curve."
                dpg.set_value(self.tone, text)

    def selftest(self) -> None:
        lib, v = self.library, self.viewer
        start_key, start_rot, start_exp = lib.selected, v.rotation_deg, v.exposure
        self.select(lib.default_key())
        self.set_rotation(45.0)
        assert abs(v.rotation_deg - 45.0) < 1e-6
        self.set_exposure(0.5)
        self.set_auto_rotate(True)
        self.set_speed(40.0)
        assert v.auto_rotate and v.auto_rotate_speed == 40.0
        v.tick(0.1)
        assert abs(v.rotation_deg - 49.0) < 1e-4
        self.set_auto_rotate(False)
        self.sync()
        if lib.current() is not None:
            th = lib.thumbnail(lib.selected, v.rotation_deg, v.exposure)
            assert th is not None and th.dtype == np.uint8
        self.set_rotation(start_rot)
        self.set_exposure(start_exp)
        if start_key:
            self.select(start_key)
        self.sync()


def build(parent, ctx) -> LightPanel:
    return LightPanel(parent, ctx)
