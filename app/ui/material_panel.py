"""Material tab: live roughness / F0 / albedo tint / saturation edits with resets, and the compare split."""
from __future__ import annotations

import dearpygui.dearpygui as dpg

from hravatar.render.pipeline import MaterialEdit

from . import heading, note, row
from . import form as make_form

SLIDERS = (
    # field, label, min, max, format, tooltip
    ("rough_scale", "Roughness", 0.0, 3.0, "x %.2f", "Multiplies every Gaussian's roughness (clamped to 1): lower is glossier."),
    ("f0_edit", "Reflectance", 0.0, 1.0, "%.2f", "F0' = F0 + (1 - F0) x value: raises the specular reflectance towards a mirror."),
    ("saturation", "Saturation", 0.0, 2.0, "%.2f", "Albedo saturation around its luma (0: grey, 1: unchanged)."),
)


class MaterialPanel:
    def __init__(self, parent, ctx) -> None:
        self.ctx = ctx
        self.viewer = ctx.viewer
        self._shown: MaterialEdit | None = None
        self.widgets: dict[str, int] = {}
        fonts = getattr(ctx.shell, "fonts", None)
        m = self.viewer.material
        with dpg.group(parent=parent):
            heading("Material edits", fonts=fonts)
            t = make_form(action_width=56)
            for name, label, lo, hi, fmt, tip in SLIDERS:
                r = row(t, label, tip)
                self.widgets[name] = dpg.add_slider_float(parent=r, min_value=lo, max_value=hi, default_value=getattr(m, name),
                                                          format=fmt, width=-1, user_data=name,
                                                          callback=lambda s, a, u: self.set_value(u, a))
                dpg.add_button(label="Reset", parent=r, width=-1, user_data=name, callback=lambda s, a, u: self.reset(u))
            r = row(t, "Albedo tint", "Multiplies the albedo (white: unchanged).")
            self.widgets["tint"] = dpg.add_color_edit([int(c * 255) for c in m.tint] + [255], parent=r, no_alpha=True, width=-1,
                                                      callback=lambda s, a: self.set_tint(a))
            dpg.add_button(label="Reset", parent=r, width=-1, callback=lambda: self.reset("tint"))
            dpg.add_spacer(height=2)
            dpg.add_button(label="Reset all material edits", width=-1, callback=lambda: self.reset(None))
            dpg.add_spacer(height=8)
            heading("Compare", fonts=fonts)
            self.compare = dpg.add_checkbox(label="Split screen: original (left) | edited (right)", default_value=self.viewer.compare,
                                            callback=lambda s, a: self.set_compare(a))
            t = make_form()
            self.split = dpg.add_slider_float(parent=row(t, "Split position"), min_value=0.05, max_value=0.95,
                                              default_value=self.viewer.compare_split, format="%.2f", width=-1,
                                              callback=lambda s, a: self.set_split(a))
            dpg.add_spacer(height=8)
            note("Edits change the shaded, diffuse and specular channels and show directly in the albedo, roughness "
                 "and f0 channels. They are display edits: the avatar file is not modified.")

    # ------------------------------------------------------------------ actions
    def set_value(self, name: str, value: float) -> None:
        self.viewer.set_material(**{name: float(value)})

    def set_tint(self, rgb) -> None:
        vals = [float(x) for x in rgb[:3]]
        if max(vals) > 1.0:  # dearpygui reports 0..255 in some versions
            vals = [x / 255.0 for x in vals]
        self.viewer.set_material(tint=tuple(vals))

    def reset(self, name: str | None) -> None:
        self.viewer.reset_material(name)

    def set_compare(self, on: bool) -> None:
        self.viewer.set_compare(bool(on))

    def set_split(self, x: float) -> None:
        self.viewer.set_compare(self.viewer.compare, float(x))

    # ------------------------------------------------------------------ per frame
    def sync(self) -> None:
        m = self.viewer.material
        if m != self._shown:
            self._shown = m
            for name, *_ in SLIDERS:
                w = self.widgets[name]
                if not dpg.is_item_active(w):
                    dpg.set_value(w, getattr(m, name))
            if not dpg.is_item_active(self.widgets["tint"]):
                dpg.set_value(self.widgets["tint"], [c * 255 for c in m.tint] + [255])
        if dpg.get_value(self.compare) != self.viewer.compare:
            dpg.set_value(self.compare, self.viewer.compare)
        if not dpg.is_item_active(self.split) and abs(dpg.get_value(self.split) - self.viewer.compare_split) > 1e-6:
            dpg.set_value(self.split, self.viewer.compare_split)

    def selftest(self) -> None:
        v = self.viewer
        start, compare, split = v.material, v.compare, v.compare_split
        self.set_value("rough_scale", 0.5)
        self.set_value("f0_edit", 0.3)
        self.set_value("saturation", 1.4)
        self.set_tint((255, 200, 180))
        m = v.material
        assert m.rough_scale == 0.5 and m.f0_edit == 0.3 and m.saturation == 1.4 and abs(m.tint[1] - 200 / 255) < 1e-6
        self.reset("rough_scale")
        assert v.material.rough_scale == 1.0 and v.material.f0_edit == 0.3
        self.set_compare(True)
        self.set_split(0.3)
        assert v.compare and abs(v.compare_split - 0.3) < 1e-6
        self.sync()
        self.reset(None)
        assert v.material == MaterialEdit()
        v.set_material(rough_scale=start.rough_scale, f0_edit=start.f0_edit, tint=start.tint, saturation=start.saturation)
        v.set_compare(compare, split)
        self.sync()


def build(parent, ctx) -> MaterialPanel:
    return MaterialPanel(parent, ctx)
