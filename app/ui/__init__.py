"""dearpygui front end (thin: widgets call controller methods). Shared look and small layout helpers.

Panels of the side bar live in ``<name>_panel.py`` modules with ``build(parent, ctx) -> Panel``.
"""
from __future__ import annotations

from pathlib import Path

import dearpygui.dearpygui as dpg

ACCENT = (86, 148, 230)
MUTED = (140, 146, 156)
TEXT = (222, 225, 230)
LEVEL_COLOURS = {"info": (170, 200, 240), "warning": (240, 196, 90), "error": (240, 110, 100)}

#: Fonts tried in order (system DejaVu, the copy matplotlib ships); dearpygui's built-in font otherwise.
_FONT_CANDIDATES = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/TTF/DejaVuSans.ttf"),
    Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"),
    Path("/Library/Fonts/Arial.ttf"),
    Path("C:/Windows/Fonts/segoeui.ttf"),
)


def _find_font() -> Path | None:
    for p in _FONT_CANDIDATES:
        if p.is_file():
            return p
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        p = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if p.is_file():
            return p
    return None


def setup_fonts(size: int = 15) -> dict[str, int | None]:
    """Register the UI fonts (regular and a larger heading size); returns their ids (None = built-in)."""
    path = _find_font()
    fonts: dict[str, int | None] = {"regular": None, "heading": None, "small": None}
    if path is None:
        return fonts
    with dpg.font_registry():
        fonts["regular"] = dpg.add_font(str(path), size)
        fonts["small"] = dpg.add_font(str(path), size - 2)
        bold = path.with_name(path.stem + "-Bold" + path.suffix)
        fonts["heading"] = dpg.add_font(str(bold if bold.is_file() else path), size + 1)
    dpg.bind_font(fonts["regular"])
    return fonts


def setup_theme() -> int:
    """A calm dark theme with one accent colour; returns the theme id (bound globally)."""
    with dpg.theme() as theme:
        with dpg.theme_component(dpg.mvAll):
            cols = {
                "WindowBg": (24, 25, 28), "ChildBg": (29, 31, 35), "PopupBg": (32, 34, 39), "MenuBarBg": (32, 34, 39),
                "Border": (48, 51, 58), "FrameBg": (42, 45, 51), "FrameBgHovered": (52, 56, 64), "FrameBgActive": (60, 65, 75),
                "TitleBg": (29, 31, 35), "TitleBgActive": (36, 39, 45), "Button": (48, 52, 60), "ButtonHovered": (62, 94, 140),
                "ButtonActive": ACCENT, "Header": (46, 50, 58), "HeaderHovered": (58, 64, 76), "HeaderActive": (66, 100, 150),
                "Tab": (36, 38, 44), "TabHovered": (70, 108, 160), "TabActive": (58, 92, 140), "SliderGrab": ACCENT,
                "SliderGrabActive": (120, 175, 245), "CheckMark": (120, 175, 245), "Text": TEXT, "TextDisabled": MUTED,
                "Separator": (48, 51, 58), "PlotHistogram": ACCENT, "ScrollbarBg": (29, 31, 35), "ScrollbarGrab": (58, 62, 70),
                "TableHeaderBg": (36, 38, 44), "TableBorderLight": (40, 42, 48), "TableBorderStrong": (48, 51, 58),
            }
            for name, rgb in cols.items():
                if hasattr(dpg, f"mvThemeCol_{name}"):
                    dpg.add_theme_color(getattr(dpg, f"mvThemeCol_{name}"), rgb)
            for name, val in (("FrameRounding", 4), ("ChildRounding", 5), ("GrabRounding", 3), ("TabRounding", 4),
                              ("PopupRounding", 4), ("ScrollbarRounding", 6), ("WindowRounding", 0), ("ScrollbarSize", 12),
                              ("GrabMinSize", 10), ("WindowBorderSize", 0), ("ChildBorderSize", 1)):
                if hasattr(dpg, f"mvStyleVar_{name}"):
                    dpg.add_theme_style(getattr(dpg, f"mvStyleVar_{name}"), val, category=dpg.mvThemeCat_Core)
            for name, x, y in (("FramePadding", 8, 5), ("ItemSpacing", 8, 7), ("WindowPadding", 12, 10),
                               ("ItemInnerSpacing", 6, 4), ("CellPadding", 4, 4)):
                if hasattr(dpg, f"mvStyleVar_{name}"):
                    dpg.add_theme_style(getattr(dpg, f"mvStyleVar_{name}"), x, y, category=dpg.mvThemeCat_Core)
    dpg.bind_theme(theme)
    return theme


def heading(text: str, parent=0, fonts: dict | None = None) -> int:
    """A section heading: muted caps text over a separator."""
    kw = {"parent": parent} if parent else {}
    t = dpg.add_text(text.upper(), color=MUTED, **kw)
    if fonts and fonts.get("small"):
        dpg.bind_item_font(t, fonts["small"])
    dpg.add_separator(**kw)
    return t


def form(parent=0, label_width: int = 118, action_width: int = 0) -> int:
    """A borderless 2- or 3-column table (label | control | optional action) for aligned rows."""
    kw = {"parent": parent} if parent else {}
    t = dpg.add_table(header_row=False, borders_innerH=False, borders_outerH=False, borders_innerV=False,
                      borders_outerV=False, policy=dpg.mvTable_SizingFixedFit, **kw)
    dpg.add_table_column(width_fixed=True, init_width_or_weight=label_width, parent=t)
    dpg.add_table_column(width_stretch=True, init_width_or_weight=1.0, parent=t)
    if action_width:
        dpg.add_table_column(width_fixed=True, init_width_or_weight=action_width, parent=t)
    return t


def row(table: int, label: str, tooltip: str | None = None) -> int:
    """Add a table row with a label cell; returns the row id (add the control(s) with parent=row)."""
    r = dpg.add_table_row(parent=table)
    lab = dpg.add_text(label, parent=r)
    if tooltip:
        with dpg.tooltip(lab):
            dpg.add_text(tooltip, wrap=320)
    return r


def note(text: str, parent=0, wrap: int = 380) -> int:
    kw = {"parent": parent} if parent else {}
    return dpg.add_text(text, color=MUTED, wrap=wrap, **kw)
