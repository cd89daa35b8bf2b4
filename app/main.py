"""Entry point of the desktop app: ``python launch.py [CHECKPOINT]``.

Headless modes (run them under ``xvfb-run`` on a machine without a display):

    python launch.py --screenshot out.png --frames 30 [--tab lighting]   # smoke test + screenshot
    python launch.py --screenshot out.png --tab train --train-run RUN_DIR # ... with the Train tab on a run
    python launch.py --bench-frames 200 --bench-json bench.json         # displayed FPS while dragging a slider
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAB_KEYS = ("view", "puppet", "lighting", "material", "webcam", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.py", description="hravatar desktop viewer / editor")
    p.add_argument("checkpoint", nargs="?", default=None, help="avatar checkpoint or training run folder (default: the demo avatar)")
    p.add_argument("--envmap", default=None, help="initial lighting: learned, builtin:NAME, or an .hdr/.exr file")
    p.add_argument("--res", type=int, default=None, help="render height in pixels (default: 256 on CPU, 512 on CUDA)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="render device (default: CUDA when available)")
    p.add_argument("--size", default="1440x900", help="window size WxH")
    p.add_argument("--max-fps", type=float, default=60.0, help="cap of the UI loop while something changes")
    p.add_argument("--busy-ui-fps", type=float, default=20.0,
                   help="cap of the UI loop while a CPU render is in flight and UI frames are expensive "
                        "(software OpenGL); 0 = no cap")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for rendering (default: all cores but one, left to the interface)")
    p.add_argument("--no-progressive", action="store_true",
                   help="always render at full size (no reduced-size frames while a slider moves)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile deformation and shading (fused kernels; the first frame waits tens of seconds)")
    p.add_argument("--tab", choices=TAB_KEYS, default="view", help="side-bar tab shown at start (and in --screenshot)")
    p.add_argument("--train-run", default=None, metavar="DIR",
                   help="Train tab: follow this run folder (plots, previews; re-attaches to a run still training)")
    p.add_argument("--screenshot", default=None, metavar="PNG", help="smoke test: exercise the app, write a screenshot, exit")
    p.add_argument("--frames", type=int, default=30, help="viewport frames to render in --screenshot mode")
    p.add_argument("--bench-frames", type=int, default=0, metavar="N", help="measure displayed FPS over N frames while a slider moves")
    p.add_argument("--bench-slider", choices=("material", "rotation", "exposure", "expression"), default="material")
    p.add_argument("--bench-json", default=None, metavar="PATH", help="write the benchmark result as JSON")
    p.add_argument("--timeout", type=float, default=900.0, help="headless modes: give up after this many seconds per step")
    return p.parse_args(argv)


def _display_available() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import dearpygui.dearpygui  # noqa: F401
    except ImportError:
        print("hravatar: the desktop app needs dearpygui; install the app extra: pip install -e \".[app]\"", file=sys.stderr)
        return 1
    if not _display_available():
        print("hravatar: no display found (DISPLAY is not set); on a headless machine run: xvfb-run -a python launch.py ...",
              file=sys.stderr)
        return 1
    try:
        w, h = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        print(f"hravatar: --size must look like 1440x900, not '{args.size}'", file=sys.stderr)
        return 1
    from app.ui.main_window import App, AppOptions, StartupError

    max_fps = args.max_fps
    if args.bench_frames and args.device != "cpu" and args.max_fps == 60.0:
        import torch

        if torch.cuda.is_available():
            max_fps = 1000.0  # a GPU renders faster than a monitor refreshes: do not cap the measurement
    opts = AppOptions(args.checkpoint, args.envmap, args.res, w, h, args.device, max_fps,
                      busy_ui_fps=args.busy_ui_fps or None, render_threads=args.threads, tab=args.tab,
                      progressive=not args.no_progressive, compile=args.compile)
    try:
        app = App(opts)
    except StartupError as e:
        print(f"hravatar: {e}", file=sys.stderr)
        return 1
    app.build()
    if args.train_run:
        show_train_run(app, args.train_run)
    script = None
    if args.bench_frames:
        script = bench_script(app, args.bench_frames, args.bench_slider, args.bench_json)
    elif args.screenshot:
        script = smoke_script(app, Path(args.screenshot), args.frames, args.tab, args.train_run)
    return app.run(script, timeout_s=args.timeout)


def show_train_run(app, run_dir: str) -> None:
    """Point the Train tab at a run folder (one-line message when that is not possible)."""
    train = app.panels.get("train")
    if train is None:
        app.ctx.notify("--train-run: the Train tab is not available", "warning")
    else:
        train.show_run(run_dir)


# ---------------------------------------------------------------------------------------------- scripts
def _rendered(app):
    def cond() -> bool:
        """the viewport showing the current state (at full size, after any interactive reduced renders)"""
        f = app.shown_frame
        return (f is not None and f.version == app.viewer.version and app.library.pending is None and not app.worker.busy
                and app.shown_seq == app.worker.latest().seq and not app.progressive.refine_pending
                and (f.width, f.height) == tuple(app.viewer.render_size))
    return cond


def _env_ready(app):
    def cond() -> bool:
        """the environment loads to finish"""
        return not app.library.busy and app.library.pending is None
    return cond


def _new_frames(app, n: int):
    target = app.shown_seq + n

    def cond() -> bool:
        """new viewport frames to be shown"""
        return app.shown_seq >= target
    return cond


def _frames(app, n: int):
    target = app.ui_frames + n

    def cond() -> bool:
        """UI frames to pass"""
        return app.ui_frames >= target
    return cond


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def _sky(h: int = 32):
    """A small lat-long sky: blue gradient, warm sun at u = 0.7 (for the drop test)."""
    import numpy as np

    v = (np.arange(h) + 0.5) / h
    img = np.empty((h, 2 * h, 3), np.float32)
    img[:] = np.stack([0.25 + 0.3 * v, 0.35 + 0.25 * v, 0.6 + 0.1 * v], -1)[:, None, :]
    img[h // 2:] = (0.12, 0.1, 0.08)  # ground
    img[h // 3 - 2:h // 3 + 2, int(0.7 * 2 * h) - 2:int(0.7 * 2 * h) + 2] = (60.0, 45.0, 30.0)
    return img


def smoke_script(app, out: Path, frames: int, tab: str, train_run: str | None = None):
    """Exercise the app like a user (channels, lighting, materials, camera, drop, output, every panel) and screenshot it."""
    from hravatar.shading import write_hdr

    v, lib = app.viewer, app.library
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        print(f"[smoke {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    step("waiting for the first frame")
    yield _rendered(app)
    for ch in ("normal", "albedo", "depth", "shaded"):
        v.set_channel(ch)
        yield _rendered(app)
    step("channels switched")
    for key in ["builtin:studio"] + (["learned"] if "learned" in lib.keys() else []):
        lib.select(key)
        yield _env_ready(app)
        _check(lib.selected == key, f"environment {key} not selected (selected {lib.selected})")
        yield _rendered(app)
        step(f"lighting: {key}")
    v.set_material(rough_scale=0.6, saturation=1.2, tint=(1.0, 0.92, 0.85))
    yield _rendered(app)
    v.set_compare(True, 0.5)
    yield _rendered(app)
    v.set_compare(False)
    v.reset_material()
    step("material edits + compare")
    for bg in ("environment", "transparent", "colour"):
        v.set_background(bg)
        yield _rendered(app)
    step("backgrounds")
    nav = v.navigator
    nav.press(nav.LEFT, (100, 100), True)
    nav.move((160, 120), 300)
    nav.release(nav.LEFT)
    nav.wheel(2, True)
    nav.press(nav.RIGHT, (0, 0), True)
    nav.move((10, 5), 300)
    nav.release(nav.RIGHT)
    yield _rendered(app)
    nav.key("f", v.frame_head)
    nav.key("r")
    yield _rendered(app)
    step("camera orbit / pan / zoom / frame / reset")
    import dearpygui.dearpygui as dpg

    size = (dpg.get_viewport_width(), dpg.get_viewport_height())
    seen = []
    for w, h in ((1000, 680), size):  # the viewport follows the window: new render size and texture
        dpg.set_viewport_width(w)
        dpg.set_viewport_height(h)
        yield _frames(app, 3)
        yield _rendered(app)
        seen.append("x".join(map(str, app.viewer.render_size)))
    _check(seen[0] != seen[1], f"the render size did not follow the window ({seen})")
    step(f"window resized and back (render {' -> '.join(seen)})")
    # drop: a broken file (one-line error, lighting unchanged), a tiny generated .hdr, a real map when present
    tmp = Path(tempfile.mkdtemp(prefix="hravatar_smoke_"))
    broken = tmp / "broken.hdr"
    broken.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 64 +X 128\n\x02\x02\x00\x80garbage")
    sky = tmp / "smoke_sky.hdr"
    write_hdr(sky, _sky())
    drops = [str(broken), str(sky)]
    hdri = ROOT.parent / "shared" / "data" / "hdri"
    exrs = sorted(hdri.glob("*.exr"), key=lambda p: p.stat().st_size) if hdri.is_dir() else []
    if exrs:
        drops.append(str(exrs[0]))
    errors_before = sum(m.level == "error" for m in app.messages.all())
    app.drop.simulate_drop(drops)
    yield _frames(app, 2)
    yield _env_ready(app)
    last_key = f"file:{Path(drops[-1]).resolve()}"
    _check(lib.selected == last_key, f"dropped map not selected (selected {lib.selected})")
    errs = [m.text for m in app.messages.all() if m.level == "error"][errors_before:]
    _check(len(errs) == 1 and "broken.hdr" in errs[0], f"expected one error for broken.hdr, got {errs}")
    _check(f"file:{broken.resolve()}" not in lib.keys(), "broken file still listed")
    yield _rendered(app)
    step(f"dropped {', '.join(Path(d).name for d in drops)} (broken one rejected, lighting {lib.label(lib.selected)}); "
         f"OS drop hook {'installed' if app.drop.glfw.installed else 'unavailable'}")
    # output: PNG and a short MP4
    png = app.save_png(tmp / "viewport.png")
    _check(png is not None and png.is_file(), "Save PNG failed")
    app.record_fps = 10.0
    app.record_max_seconds = 0.0
    app.start_recording(tmp / "clip.mp4")
    v.set_auto_rotate(True, 90.0)
    yield _frames(app, 8)
    app.stop_recording()
    v.set_auto_rotate(False)

    def rec_done() -> bool:
        """the MP4 writer to finish"""
        return app.recorder.state in ("idle", "error")
    yield rec_done
    _check(app.recorder.state == "idle" and (tmp / "clip.mp4").stat().st_size > 0, f"recording failed: {app.recorder.error}")
    step(f"saved PNG and a {app.recorder.frames}-frame MP4")
    # every panel's own self-test
    original = v.bundle
    for key, panel in list(app.panels.items()):
        app.select_tab(key)
        yield _frames(app, 2)
        selftest = getattr(panel, "selftest", None)
        if selftest is not None:
            selftest()
            step(f"{key} panel selftest passed")
        yield _rendered(app)
    for key, msg in app.panel_notes.items():
        step(f"{key}: {msg}")
    # render until N viewport frames were shown
    if app.fps.total < frames:
        rot = v.rotation_deg
        v.set_auto_rotate(True, 45.0)

        def enough() -> bool:
            """N viewport frames"""
            return app.fps.total >= frames
        yield enough
        v.set_auto_rotate(False)
        v.set_rotation(rot)
    # closing while a training run is active asks first (the train self-test's run may still be stopping)
    train = app.panels.get("train")
    if train is not None and getattr(train, "training_active", False):
        app.request_exit()
        yield _frames(app, 2)
        _check(dpg.is_item_shown("dlg_exit") and app.exit_flow.asking, "no exit question while training runs")
        app.answer_exit("cancel")
        yield _frames(app, 2)
        _check(not dpg.is_item_shown("dlg_exit") and dpg.is_dearpygui_running(), "Cancel did not keep the app open")
        step("exit question shown while training runs; Cancel keeps the app open")

        def train_over() -> bool:
            """the train self-test's run to end"""
            return not train.training_active
        yield train_over
    # the self-tests must leave the avatar the app opened (the train tab does not open its tiny test result)
    yield _frames(app, 5)
    if app.ctx.loading_checkpoint or v.bundle is not original:
        step("warning: a panel self-test opened another avatar; reopening the original one for the screenshot")
        app.ctx.open_checkpoint(app.opts.checkpoint, wait=True)
        yield _frames(app, 2)
    stage_for_screenshot(app, tab, exrs, train_run)
    if tab == "webcam" and app.panels.get("webcam") is not None:
        ctl = app.panels["webcam"].ctl

        def driving() -> bool:
            """the webcam demo to drive the avatar"""
            return ctl.driven >= 6 or not ctl.running
        yield driving
        step(f"webcam demo: {ctl.driven} frames drove the avatar ({ctl.message})")
    yield _env_ready(app)
    if tab == "webcam":
        yield _new_frames(app, 2)  # the webcam keeps changing the frame: the viewport is never "up to date"
    else:
        yield _rendered(app)
    yield _frames(app, 10)  # let the tab bar and the layout settle
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    import dearpygui.dearpygui as dpg

    dpg.output_frame_buffer(file=str(out))

    def written() -> bool:
        """the screenshot file"""
        return out.is_file() and out.stat().st_size > 0
    yield _frames(app, 2)
    t_end = time.perf_counter() + 10
    while not written() and time.perf_counter() < t_end:
        yield _frames(app, 1)
    if not written():  # fall back to the viewport image alone
        app.save_png(out)
    _check(written(), "screenshot not written")
    shutil.rmtree(tmp, ignore_errors=True)  # the generated maps, PNG and MP4 were only for the test
    step(f"{app.fps.total} viewport frames shown; screenshot {out}")
    return 0


def stage_for_screenshot(app, tab: str, exrs: list, train_run: str | None = None) -> None:
    """Put the app into a state that shows what the chosen tab does (for the docs screenshots)."""
    v, lib = app.viewer, app.library
    app.select_tab(tab)
    app.ctx.set_frame(v.bundle.avatar.neutral_frame(), "screenshot")  # panel self-tests may have left an expression
    v.set_channel("shaded")
    v.set_background("colour")
    v.set_compare(False)
    v.reset_material()
    v.set_rotation(0.0)
    v.set_exposure(0.0)
    v.orbit.reset()
    if tab == "lighting":
        sunset = [p for p in exrs if p.stem == "sunset"]
        if sunset:  # a real HDR map with a visible sun shows what relighting does
            app.load_environment_file(sunset[0])
        else:
            prefer = [k for k in lib.keys() if k.startswith("file:")]
            lib.select(prefer[-1] if prefer else "builtin:sunset" if "builtin:sunset" in lib.keys() else lib.default_key())
        v.set_rotation(60.0)
        v.set_background("environment")
        v.orbit.orbit(-20.0, 0.0)
    elif tab == "material":
        lib.select(lib.default_key())
        v.set_material(rough_scale=0.35, f0_edit=0.15, tint=(1.0, 0.86, 0.78), saturation=1.25)
        v.set_compare(True, 0.5)
    else:
        lib.select(lib.default_key())
        if tab == "puppet" and app.panels.get("puppet") is not None:
            puppet = app.panels["puppet"]  # a friendly expression, set through the sliders' own action
            puppet.reset()
            for name, value in (("mouthSmile_L", 0.45), ("mouthSmile_R", 0.45), ("browInnerUp", 0.25),
                                ("jaw open", 0.04), ("head yaw", 0.22), ("head pitch", -0.04), ("eyes yaw", -0.12)):
                puppet.set_slider(name, value)
        elif tab == "webcam" and app.panels.get("webcam") is not None:
            webcam = app.panels["webcam"]
            if not webcam.start_demo():
                app.ctx.notify(f"webcam demo: {webcam.ctl.message}", "warning")
        elif tab == "train" and train_run:
            show_train_run(app, train_run)  # the self-test replaced the run shown
        view = app.panels.get("view")
        save = view.save_view if view is not None else v.orbit.save_view
        v.orbit.orbit(-18.0, 4.0)
        save("three-quarter left")
        v.orbit.reset()
        save("front")


def bench_script(app, n: int, slider: str, json_path: str | None):
    """Displayed FPS (the app's own counter) over ``n`` frames while a slider changes every UI frame."""
    v = app.viewer
    yield _env_ready(app)
    yield _rendered(app)
    v.set_render_size(app.res, app.res)  # measure at res x res (the viewport letterboxes it)
    yield _rendered(app)
    # warm-up: a few frames of the same kind of change
    for k in range(3):
        v.set_material(rough_scale=0.5 + 0.1 * k)
        yield _rendered(app)
    start_total = app.fps.total
    frame0 = app.ctx.current_frame()
    stamps: list[float] = []
    ui_times: list[float] = []
    last_seq = app.shown_seq
    sizes: dict[str, int] = {}  # internal render size of each displayed frame -> count
    k = 0
    t_prev = time.perf_counter()
    while app.fps.total - start_total < n:
        k += 1
        x = 0.5 + 0.5 * math.sin(0.21 * k)
        if slider == "material":
            v.set_material(rough_scale=0.2 + 1.6 * x)
        elif slider == "rotation":
            v.set_rotation(-180.0 + 360.0 * x)
        elif slider == "exposure":
            v.set_exposure(-2.0 + 4.0 * x)
        else:
            f = app.ctx.current_frame()
            f.expr[0, :] = 0.0
            f.expr[0, k % min(8, f.expr.shape[1])] = x
            f.pose[0, 2, 0] = 0.25 * x  # jaw
            app.ctx.set_frame(f, "bench")
        yield _frames(app, 1)
        now = time.perf_counter()
        ui_times.append(now - t_prev)
        t_prev = now
        if app.shown_seq != last_seq:
            last_seq = app.shown_seq
            stamps.append(now)
            sf = app.shown_frame
            key = f"{sf.width}x{sf.height}"
            sizes[key] = sizes.get(key, 0) + 1
    t_stop = time.perf_counter()
    interactive_render_ms = app.render_ms.value
    yield _rendered(app)  # the slider stopped: one more render at full size
    t_refined = time.perf_counter()
    refine = app.shown_frame
    if slider == "expression":
        app.ctx.set_frame(frame0, "bench")
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    ui_sorted = sorted(ui_times)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    w, h = v.render_size
    f = app.shown_frame
    result = {
        "displayed_fps": (len(stamps) - 1) / span if span and span > 0 else 0.0,
        "frames": len(stamps),
        "slider": slider,
        "render_size": [w, h],
        "device": str(app.device),
        "backend": app.backend_label(),
        "compiled": bool(v.renderer.compiled),  # False also where --compile fell back to eager
        "gaussians": v.num_gaussians,
        "render_ms_mean": interactive_render_ms,
        "internal_sizes": sizes,
        "final_refine": {"size": [refine.width, refine.height], "ms": round(refine.timings.get("total", 0.0), 2),
                         "shown_after_s": round(t_refined - t_stop, 3),
                         "full_size": [refine.width, refine.height] == [w, h]},
        "last_timings_ms": {k2: round(val, 2) for k2, val in (f.timings.items() if f else [])},
        "display_ms_mean": app.display_ms.value,
        "ui_frame_ms_mean": 1e3 * sum(ui_times) / max(1, len(ui_times)),
        "ui_frame_ms_p95": 1e3 * ui_sorted[int(0.95 * (len(ui_sorted) - 1))] if ui_sorted else 0.0,
        "ui_frame_ms_max": 1e3 * ui_sorted[-1] if ui_sorted else 0.0,
        "requests_dropped": app.worker.dropped,
        "busy_ui_fps": app.pacer.busy_max_fps,
        "loadavg_1min": load[0],
        "torch_threads": __import__("torch").get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
