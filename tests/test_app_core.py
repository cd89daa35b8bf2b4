"""App core without a display: orbit camera maths, frame pacing, recording, file drop."""
import ctypes
import ctypes.util
import math
import threading
import time

import numpy as np
import pytest
import torch

from app.camera import OrbitController, OrbitState, ViewportNavigator, state_from_camera
from app.drop import DropHandler, DropQueue, GlfwDropHandler, GlfwEvents, classify_path
from app.pacing import FpsCounter, FramePacer, MsAverage, ProgressiveResolution
from app.recorder import VideoRecorder, fit_frame, save_png


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def project(cam, p):
    """Pixel coordinates of world point p with the camera's own matrices."""
    x = cam.viewmat[:3, :3] @ torch.tensor(p, dtype=torch.float32) + cam.viewmat[:3, 3]
    uvw = cam.K @ x
    return (uvw[:2] / uvw[2]).tolist(), float(x[2])


# ---------------------------------------------------------------------------------------- camera
def test_orbit_by_90_degrees_moves_the_eye_to_the_side():
    oc = OrbitController(OrbitState(target=(1.0, 2.0, 3.0), distance=2.0))
    assert oc.state.eye() == pytest.approx((1.0, 2.0, 5.0))  # yaw 0: in front (+z)
    oc.orbit(90.0, 0.0)
    assert oc.state.eye() == pytest.approx((3.0, 2.0, 3.0), abs=1e-9)  # +x side
    cam = oc.camera(64, 64)
    assert cam.position.tolist() == pytest.approx([3.0, 2.0, 3.0], abs=1e-5)
    oc.orbit(-90.0, 30.0)  # up by 30 degrees
    assert oc.state.eye() == pytest.approx((1.0, 2.0 + 2 * math.sin(math.radians(30)), 3.0 + 2 * math.cos(math.radians(30))))
    oc.orbit(0.0, 500.0)  # clamped short of the pole
    assert oc.state.pitch_deg == pytest.approx(89.0)
    oc.orbit(400.0, 0.0)
    assert -180.0 < oc.state.yaw_deg <= 180.0 and oc.state.yaw_deg == pytest.approx(40.0)


def test_target_projects_to_the_image_centre_and_zoom_keeps_it():
    oc = OrbitController(OrbitState(target=(0.1, -0.2, 0.3), yaw_deg=35.0, pitch_deg=-20.0, distance=0.8, fov_y_deg=25.0))
    for _ in range(2):
        cam = oc.camera(320, 200)
        (u, v), z = project(cam, oc.state.target)
        assert (u, v) == pytest.approx((160.0, 100.0), abs=1e-3)
        assert z == pytest.approx(oc.state.distance, rel=1e-5)
        oc.zoom_steps(3)  # closer by 0.9^3
    assert oc.state.target == (0.1, -0.2, 0.3)
    assert oc.state.distance == pytest.approx(0.8 * 0.9 ** 6)
    # vertical field of view -> focal length
    assert float(cam.K[1, 1]) == pytest.approx(0.5 * 200 / math.tan(math.radians(25.0) / 2), rel=1e-5)


def test_pan_moves_target_and_eye_along_camera_axes():
    oc = OrbitController(OrbitState(target=(0.0, 0.0, 0.0), yaw_deg=30.0, pitch_deg=15.0, distance=1.0))
    cam0 = oc.camera(64, 64)
    eye0 = np.array(oc.state.eye())
    oc.pan(0.1, 0.05)
    right = cam0.viewmat[0, :3].numpy()  # OpenCV x = right
    up = -cam0.viewmat[1, :3].numpy()  # OpenCV y = down
    expect = 0.1 * right + 0.05 * up
    assert np.allclose(oc.state.target, expect, atol=1e-6)
    assert np.allclose(np.array(oc.state.eye()) - eye0, expect, atol=1e-6)
    # the view direction does not change
    assert torch.allclose(oc.camera(64, 64).viewmat[:3, :3], cam0.viewmat[:3, :3], atol=1e-6)


def test_pan_pixels_makes_the_target_follow_the_mouse():
    oc = OrbitController(OrbitState(target=(0.0, 0.0, 0.0), yaw_deg=-40.0, distance=0.7, fov_y_deg=30.0))
    old_target = oc.state.target
    oc.pan_pixels(12.0, -7.0, 200)
    (u, v), _ = project(oc.camera(300, 200), old_target)
    assert (u, v) == pytest.approx((150.0 + 12.0, 100.0 - 7.0), abs=1e-3)


def test_reset_frame_and_saved_views():
    home = OrbitState(target=(0.0, 0.1, 0.0), distance=1.5, fov_y_deg=20.0)
    oc = OrbitController(home)
    oc.orbit(20, 10)
    oc.save_view("three-quarter")
    saved = oc.state
    oc.dolly(0.5)
    oc.set_fov(40)
    oc.restore_view("three-quarter")
    assert oc.state == saved
    assert oc.view_names() == ["three-quarter"]
    with pytest.raises(KeyError):
        oc.restore_view("nope")
    with pytest.raises(ValueError):
        oc.save_view("  ")
    oc.reset()
    assert oc.state == home
    # framing fits a sphere exactly at the margin: its silhouette touches the frustum's half angle
    oc.frame((0.2, 0.3, 0.4), 0.1, margin=1.0)
    assert oc.state.target == (0.2, 0.3, 0.4)
    assert 0.1 / oc.state.distance == pytest.approx(math.sin(math.radians(10.0)))
    assert OrbitState.from_dict(oc.state.to_dict()) == oc.state


def test_state_from_camera_round_trips_an_orbit_view():
    s = OrbitState(target=(0.05, 0.02, -0.1), yaw_deg=-25.0, pitch_deg=12.0, distance=0.9, fov_y_deg=18.0)
    cam = OrbitController(s).camera(128, 96)
    r = state_from_camera(cam, 0.9)
    assert r.yaw_deg == pytest.approx(s.yaw_deg, abs=1e-4) and r.pitch_deg == pytest.approx(s.pitch_deg, abs=1e-4)
    assert r.target == pytest.approx(s.target, abs=1e-5) and r.fov_y_deg == pytest.approx(18.0, abs=1e-4)


def test_navigator_maps_mouse_and_keys():
    oc = OrbitController(OrbitState(distance=1.0))
    nav = ViewportNavigator(oc, degrees_per_pixel=0.5)
    nav.press(nav.LEFT, (10, 10), over_viewport=False)  # presses outside the viewport do nothing
    nav.move((30, 10), 100)
    assert oc.state.yaw_deg == 0.0 and not nav.dragging
    nav.press(nav.LEFT, (10, 10), over_viewport=True)
    nav.move((30, 16), 100)  # 20 px right, 6 px down
    assert oc.state.yaw_deg == pytest.approx(-10.0) and oc.state.pitch_deg == pytest.approx(3.0)
    nav.release(nav.LEFT)
    nav.press(nav.RIGHT, (0, 0), True)
    nav.move((0, 50), 100)  # pan
    assert oc.state.target[1] > 0 and oc.state.yaw_deg == pytest.approx(-10.0)
    nav.release(nav.RIGHT)
    d = oc.state.distance
    nav.wheel(1, over_viewport=True)
    assert oc.state.distance == pytest.approx(0.9 * d)
    assert nav.key("left") and oc.state.yaw_deg == pytest.approx(-15.0)
    called = []
    assert nav.key("f", lambda: called.append(1)) and called == [1]
    assert nav.key("r") and oc.state == oc.home
    assert not nav.key("q")


# ---------------------------------------------------------------------------------------- pacing
def test_fps_counter_over_a_window():
    c = FpsCounter(window_s=1.0)
    clock = FakeClock(0.0)
    for _ in range(21):  # 20 intervals of 50 ms
        c.tick(clock())
        clock.advance(0.05)
    assert c.fps(clock.t - 0.05) == pytest.approx(20.0)
    assert c.total == 21
    assert c.fps(clock.t + 5.0) == 0.0  # no frames for a while: falls to zero
    m = MsAverage(n=3)
    for v in (10, 20, 30, 40):
        m.add(v)
    assert m.value == pytest.approx(30.0)


def test_pacer_renders_only_when_dirty_or_active_and_idles_otherwise():
    clock = FakeClock()
    p = FramePacer(clock, max_fps=50, idle_sleep_s=0.05, linger_s=0.3)
    assert p.begin_frame()  # the first frame renders
    clock.advance(0.005)
    assert p.sleep_time() == pytest.approx(0.015)  # rest of a 20 ms frame
    clock.advance(0.5)
    assert not p.begin_frame() and p.idle and p.sleep_time() == pytest.approx(0.05)
    p.invalidate()
    assert p.begin_frame() and not p.idle  # one render after a change ...
    assert not p.begin_frame()  # ... and only one
    p.set_active("auto-rotate", True)
    clock.advance(1.0)
    assert p.begin_frame() and p.begin_frame() and not p.idle  # every frame while animating
    p.set_active("auto-rotate", False)
    clock.advance(1.0)
    assert not p.begin_frame() and p.idle
    p.touch()  # input keeps the loop responsive without rendering
    assert not p.idle and not p.begin_frame()


def test_pacer_yields_the_cpu_to_a_contended_render():
    clock = FakeClock()
    p = FramePacer(clock, max_fps=50, busy_max_fps=20)
    assert p.begin_frame()
    clock.advance(0.005)
    assert p.sleep_time() == pytest.approx(0.015)  # 50 fps as usual
    assert p.sleep_time(render_contended=True) == pytest.approx(0.045)  # 20 fps while a CPU render runs
    assert FramePacer(clock, max_fps=10, busy_max_fps=20).sleep_time(render_contended=True) == pytest.approx(0.1)
    assert FramePacer(clock, max_fps=50).sleep_time(render_contended=True) == pytest.approx(0.02)  # no cap set


def test_default_render_threads_leave_a_core_to_the_interface(monkeypatch):
    import os

    from app.pacing import default_render_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_render_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_render_threads() == 1


def test_progressive_resolution_reduces_while_interacting_then_refines():
    clock = FakeClock()
    p = ProgressiveResolution(clock, target_ms=100.0, min_scale=0.45, interactive_gap_s=0.25, settle_s=0.25)
    assert p.request(geometry=True) == 1.0 and not p.refine_pending  # nothing measured yet: full size
    p.report(300.0, 1.0, geometry=True)  # a full-size re-raster takes 300 ms
    p.report(40.0, 1.0, geometry=False)  # a re-shade 40 ms
    clock.advance(1.0)
    assert p.request(geometry=True) == 1.0  # the first change after a pause: not (yet) an interaction
    clock.advance(0.05)
    s = p.request(geometry=True)  # the next one 50 ms later: interactive, ~100 ms per frame
    assert s == pytest.approx(math.sqrt(100.0 / 300.0)) and p.refine_pending
    assert p.size((256, 256), s) == (144, 144)  # height rounded to 8 px, aspect kept
    assert p.size((342, 256), s) == (192, 144) and p.size((256, 256), 1.0) == (256, 256)
    clock.advance(0.05)
    assert p.request(geometry=False) == s and p.refine_pending  # re-shading keeps the cached G-buffers' size
    clock.advance(0.05)
    assert p.request(geometry=True) < 1.0
    clock.advance(0.2)
    assert not p.refine_due()  # still within the settle time
    clock.advance(0.06)
    assert p.refine_due()  # no request for 260 ms: render once more at full size
    p.refined()
    assert not p.refine_pending and not p.refine_due()
    clock.advance(0.05)
    p.report(900.0, 1.0, geometry=False)  # even a slow re-shade of full-size G-buffers stays at full size
    assert p.request(geometry=False) == 1.0 and not p.refine_pending
    clock.advance(5.0)
    assert p.request(geometry=True, dragging=True) < 1.0  # an active drag counts as interacting at once


def test_progressive_resolution_adapts_to_measured_cost_and_clamps():
    clock = FakeClock()
    p = ProgressiveResolution(clock, target_ms=100.0, min_scale=0.45, smoothing=0.0)
    p.report(2000.0, 1.0, geometry=True)  # very slow: clamped to the minimum scale
    assert p.scale_for(True) == pytest.approx(0.45)
    assert p.size((256, 256), 0.45) == (112, 112)
    p.report(50.0, 0.5, geometry=True)  # 50 ms at half size ~ 200 ms at full size
    assert p.estimated_ms(True) == pytest.approx(200.0)
    assert p.scale_for(True) == pytest.approx(math.sqrt(0.5))
    p.report(80.0, 1.0, geometry=True)  # fast enough at full size
    assert p.scale_for(True) == 1.0
    p.report(400.0, 1.0, geometry=True)
    p.enabled = False  # recording: always full size
    clock.advance(0.1)
    p.request(True)
    clock.advance(0.1)
    assert p.request(True) == 1.0 and not p.refine_pending


# ---------------------------------------------------------------------------------------- recorder
def test_png_round_trip(tmp_path):
    import imageio.v3 as iio

    img = (np.arange(5 * 7 * 4).reshape(5, 7, 4) % 256).astype(np.uint8)
    p = save_png(tmp_path / "sub" / "shot", img)
    assert p.suffix == ".png" and np.array_equal(iio.imread(p), img)
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", img.astype(np.float32))


def test_video_recorder_keeps_real_time_and_even_size(tmp_path):
    import imageio.v2 as imageio

    clock = FakeClock(0.0)
    rec = VideoRecorder(clock)
    p = rec.start(tmp_path / "clip", fps=10, max_seconds=1.0)
    assert p.suffix == ".mp4" and rec.state == "recording"
    red = np.zeros((21, 33, 3), np.uint8)
    red[..., 0] = 200
    assert rec.offer(red) == 1
    clock.advance(0.35)  # 3.5 frame intervals later: frames 1..3 are due
    assert rec.offer(red) == 3
    assert rec.progress == pytest.approx(0.4)
    clock.advance(0.03)
    assert rec.offer(np.zeros((40, 60, 3), np.uint8)) == 0  # nothing due yet
    clock.advance(0.07)
    assert rec.offer(np.full((40, 60, 3), 255, np.uint8)) == 1  # other size: fitted to the first
    rec.stop()
    assert rec.wait(30) and rec.state == "idle"
    assert any("5 frames" in m for _, m in rec.poll())
    r = imageio.get_reader(str(p))
    frames = [f for f in r]
    r.close()
    assert len(frames) == 5 and frames[0].shape == (20, 32, 3)
    assert abs(float(frames[0][..., 0].mean()) - 200) < 12 and float(frames[4].mean()) > 240


def test_video_recorder_stops_at_its_limit_and_reports_bad_folders(tmp_path):
    clock = FakeClock(0.0)
    rec = VideoRecorder(clock)
    rec.start(tmp_path / "a.mp4", fps=10, max_seconds=0.2)
    clock.advance(5.0)
    assert rec.offer(np.zeros((8, 8, 3), np.uint8)) == 2 and rec.state == "finishing"
    rec.wait(30)
    with pytest.raises(ValueError):
        rec.start(tmp_path / "missing" / "b.mp4")
    assert fit_frame(np.arange(12).reshape(2, 2, 3).astype(np.uint8), 4, 4)[3, 3].tolist() == [9, 10, 11]


# ---------------------------------------------------------------------------------------- drop
def test_drop_callback_queues_paths_thread_safely():
    q = DropQueue()
    h = GlfwDropHandler(q)
    arr = (ctypes.c_char_p * 2)(b"/tmp/a.hdr", "/tmp/ü.exr".encode())
    h._callback(None, 2, arr)  # called through ctypes exactly as GLFW would
    threads = [threading.Thread(target=q.push, args=([f"/x/{i}.exr"],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = q.pop_all()
    assert got[:2] == ["/tmp/a.hdr", "/tmp/ü.exr"] and len(got) == 10 and q.pop_all() == []


def test_drop_install_fails_soft_without_glfw_symbols():
    libc = ctypes.util.find_library("c") or "libc.so.6"
    ok, msg = GlfwDropHandler(DropQueue(), library_path=libc).install()
    assert not ok and "file drop unavailable" in msg and "\n" not in msg
    ok, msg = GlfwDropHandler(DropQueue(), library_path="/nonexistent/lib.so").install()
    assert not ok
    ev = GlfwEvents(library_path=libc)  # no GLFW: waiting falls back to a sleep, wake does nothing
    assert not ev.available
    t0 = time.perf_counter()
    ev.wait(0.02)
    ev.wake()
    assert time.perf_counter() - t0 >= 0.015


def test_drop_install_without_a_window_fails_soft():
    pytest.importorskip("dearpygui")
    ok, msg = GlfwDropHandler(DropQueue()).install()  # normally no GLFW window is current in the test process
    assert isinstance(ok, bool) and "\n" not in msg
    if not ok:
        assert "file drop unavailable" in msg


def test_drop_dispatch_routes_by_kind(tmp_path):
    envs, ckpts, notes = [], [], []

    def load_env(p):
        if "broken" in p:
            raise ValueError("broken.hdr: not a Radiance HDR file")
        envs.append(p)

    run = tmp_path / "run"
    run.mkdir()
    (run / "avatar.safetensors").write_bytes(b"")
    h = DropHandler(load_env, ckpts.append, lambda m, level="info": notes.append((level, m)))
    h.simulate_drop([str(tmp_path / "sky.HDR"), str(tmp_path / "a.safetensors"), str(run), str(tmp_path / "notes.txt"),
                     str(tmp_path / "broken.hdr")])
    assert len(h.poll()) == 5
    assert envs == [str(tmp_path / "sky.HDR")] and ckpts == [str(tmp_path / "a.safetensors"), str(run)]
    assert [lvl for lvl, _ in notes] == ["warning", "error"] and "notes.txt" in notes[0][1]
    assert classify_path("x.exr") == "environment" and classify_path("x.png") == "unsupported"
