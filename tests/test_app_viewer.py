"""App viewer core without a display: environment library, cached frame renderer, render worker, context."""
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import tiny_head

from app.context import AppContext, MessageLog
from app.lighting import EnvironmentLibrary, PrefilterOptions, marker_column, to_display
from app.viewer import FrameRenderer, RenderWorker, ViewerController, checkerboard
from hravatar.avatar.config import AvatarConfig
from hravatar.avatar.gaussians import GaussianAvatar
from hravatar.io.checkpoint import AvatarBundle, save_checkpoint
from hravatar.render.pipeline import MaterialEdit, RenderSettings
from hravatar.shading import LearnedLighting, constant_environment, write_hdr

SMALL = PrefilterOptions(spec_res=8, num_levels=3, irr_res=4, samples=4, builtin_width=32, thumb_height=8)


def tiny_bundle(with_light: bool = False) -> AvatarBundle:
    head = tiny_head(0)
    av = GaussianAvatar.from_head(head, AvatarConfig(gaussians_per_face=1, init_mode="surface", albedo_init="vertex"))
    b = AvatarBundle(av)
    if with_light:
        cfg = dict(irr_res=4, spec_res=8, num_levels=2, init_value=0.3)
        b.light_state, b.light_config = LearnedLighting(**cfg).state_dict(), cfg
    return b


@pytest.fixture
def library():
    lib = EnvironmentLibrary(None, "cpu", SMALL, builtin_names=["studio"])
    yield lib
    lib.close()


def ready(lib: EnvironmentLibrary, key: str | None = None):
    assert lib.wait_idle(30)
    events = lib.poll()
    if key is not None:
        assert lib.selected == key, events
    return events


def sky_map(h: int = 16) -> np.ndarray:
    """Lat-long map: dim blue everywhere, a bright patch around u = 0.75 (+x) on the horizon."""
    img = np.full((h, 2 * h, 3), (0.05, 0.08, 0.2), np.float32)
    img[h // 2 - 2:h // 2 + 2, int(0.75 * 2 * h) - 2:int(0.75 * 2 * h) + 2] = 20.0
    return img


# ---------------------------------------------------------------------------------------- library
def test_library_loads_hdr_selects_it_and_marks_rotation(tmp_path, library):
    library.select("builtin:studio")
    ready(library, "builtin:studio")
    p = tmp_path / "sky.hdr"
    write_hdr(p, sky_map())
    key = library.load_file(p)
    assert library.selected == "builtin:studio"  # switches only once ready
    ev = ready(library, key)
    assert [e.selection_changed for e in ev] == [True] and library.current().env is not None
    th = library.thumbnail(rotation_deg=0.0)
    assert th.dtype == np.uint8 and th.shape == (8, 16, 3)
    # the marker: straight behind the head at rotation 0 = map centre, +90 degrees -> u = 0.75
    assert marker_column(0.0, 16) == 8 and marker_column(90.0, 16) == 12 and marker_column(-90.0, 16) == 4
    assert (th[:, 8] == (255, 196, 0)).all()
    th90 = library.thumbnail(rotation_deg=90.0)
    assert (th90[:, 12] == (255, 196, 0)).all() and not (th90[:, 8] == (255, 196, 0)).all()
    # orientation: the bright patch at u = 0.75 of the file is at u = 0.75 of the thumbnail (not mirrored)
    lum = th.astype(float).sum(-1)
    lum[:, 8] = 0
    r, c = np.unravel_index(lum.argmax(), lum.shape)
    assert abs((c + 0.5) / 16 - 0.75) <= 0.1 and abs((r + 0.5) / 8 - 0.5) <= 0.2


def test_library_loader_thread_runs_only_while_there_is_work(tmp_path, library):
    """The loader thread ends when its queue is empty (a live thread that ran torch ops keeps an
    OpenMP pool, which slows the render worker) and a new load starts a new one."""
    library.select("builtin:studio")
    ready(library, "builtin:studio")
    def loader_alive() -> bool:
        return any(t.name == "env-loader" and t.is_alive() for t in threading.enumerate())

    t_end = time.monotonic() + 10
    while (library._thread is not None or loader_alive()) and time.monotonic() < t_end:
        time.sleep(0.01)  # the thread clears _thread, then returns: wait for both
    assert library._thread is None and not loader_alive()
    p = tmp_path / "sky.hdr"
    write_hdr(p, sky_map())
    key = library.load_file(p)
    ready(library, key)  # loaded by a fresh thread


def test_off_ui_thread_returns_results_and_raises_errors():
    from app.viewer import off_ui_thread

    me = threading.get_ident()
    assert off_ui_thread(lambda a, b=0: (a + b, threading.get_ident()), 2, b=3)[0] == 5
    assert off_ui_thread(threading.get_ident) != me
    with pytest.raises(ValueError, match="boom"):
        off_ui_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_library_reports_broken_files_and_keeps_the_selection(tmp_path, library):
    library.select("builtin:studio")
    ready(library, "builtin:studio")
    bad = tmp_path / "broken.hdr"
    bad.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 8 +X 16\n\x02\x02\x00")
    key = library.load_file(bad)
    ev = ready(library, "builtin:studio")
    assert len(ev) == 1 and ev[0].level == "error" and "\n" not in ev[0].message and "broken.hdr" in ev[0].message
    assert key not in library.keys()  # not offered again
    missing = library.load_file(tmp_path / "nope.exr")
    ev = ready(library, "builtin:studio")
    assert ev[0].level == "error" and "not found" in ev[0].message and missing not in library.keys()
    with pytest.raises(ValueError, match="not an environment map"):
        library.load_file(tmp_path / "photo.png")


def test_library_falls_back_to_a_builtin_when_the_first_choice_fails(tmp_path, library):
    bad = tmp_path / "bad.exr"
    bad.write_bytes(b"not an exr")
    library.load_file(bad)  # nothing selected yet and the only choice fails
    assert library.wait_idle(30)
    ev = library.poll()
    assert ev[0].level == "error" and library.pending == "builtin:studio"
    ready(library, "builtin:studio")


def test_library_offers_the_learned_light_and_falls_back_without_it():
    lib = EnvironmentLibrary(tiny_bundle(with_light=True), "cpu", SMALL, builtin_names=["studio"])
    try:
        assert lib.keys()[0] == "learned" and lib.default_key() == "learned"
        lib.select("learned")
        ready(lib, "learned")
        e = lib.current()
        assert e.tonemap == "clamp"
        assert torch.allclose(e.env.irradiance, torch.full_like(e.env.irradiance, 0.3), atol=1e-5)
        th = lib.thumbnail(rotation_deg=45.0)
        assert abs(int(th[0, 0, 0]) - round(0.3 * 255)) <= 1  # constant light, "clamp" response: no tone curve
        lib.set_bundle(tiny_bundle(with_light=False))  # another avatar without a learned light
        assert "learned" not in lib.keys()
        ready(lib, "builtin:studio")
    finally:
        lib.close()


# ---------------------------------------------------------------------------------------- renderer
@pytest.fixture
def viewer(library):
    v = ViewerController(tiny_bundle(), library, device="cpu", render_size=(40, 32))
    ready(library, "builtin:studio")
    return v


def test_frame_renderer_matches_avatar_renderer(viewer):
    s = viewer.snapshot()
    ref_settings = RenderSettings(channel="shaded", tonemap=s.tonemap, background=viewer.background_colour)
    ref = viewer.renderer.render(s.camera, s.frame, s.env, ref_settings).image.numpy()
    fr = FrameRenderer()
    out = fr.render(s)
    assert out.display.shape == (32, 40, 4) and out.display.dtype == np.float32
    assert np.allclose(out.display[..., :3], ref, atol=1e-5) and (out.display[..., 3] == 1).all()
    assert out.alpha.max() > 0.5 and out.alpha.min() < 0.01  # the head covers part of the frame
    for ch in ("normal", "depth", "alpha"):
        viewer.set_channel(ch)
        o = fr.render(viewer.snapshot())
        r = viewer.renderer.render(s.camera, s.frame, s.env, replace(ref_settings, channel=ch)).image.numpy()
        assert np.allclose(o.display[..., :3], r, atol=1e-5), ch
        assert o.timings["raster"] == 0.0  # same view and frame: G-buffers from the cache


def test_material_edits_reuse_gbuffers_and_compare_splits_the_image(viewer):
    fr = FrameRenderer()
    base = fr.render(viewer.snapshot())
    viewer.set_material(rough_scale=0.3, tint=(1.0, 0.5, 0.5), f0_edit=0.5)
    s = viewer.snapshot()
    edited = fr.render(s)
    assert edited.timings["raster"] == 0.0 and edited.timings["shade"] > 0
    fresh = FrameRenderer().render(s)  # the cache gives what an uncached render gives
    assert np.array_equal(edited.display, fresh.display)
    m = edited.alpha > 0.9
    assert np.abs(edited.display[m] - base.display[m]).max() > 0.05
    viewer.set_compare(True, split=0.5)
    cmp = fr.render(viewer.snapshot())
    assert np.allclose(cmp.display[:, :20], base.display[:, :20], atol=1e-6)  # original left
    assert np.allclose(cmp.display[:, 20:], edited.display[:, 20:], atol=1e-6)  # edited right
    viewer.reset_material()
    assert viewer.material == MaterialEdit()
    viewer.set_material(saturation=9.0)
    assert viewer.material.saturation == 2.0  # clamped to the slider's range
    with pytest.raises(ValueError):
        viewer.set_material(gloss=1.0)


def test_backgrounds(viewer):
    fr = FrameRenderer()
    viewer.set_background("transparent")
    t = fr.render(viewer.snapshot())
    empty = t.alpha < 1e-4
    assert np.allclose(t.display[..., :3][empty], checkerboard(32, 40).numpy()[empty], atol=1e-6)
    png = t.png_rgba()
    assert png.shape == (32, 40, 4) and np.array_equal(png[..., 3], (t.alpha * 255 + 0.5).clip(0, 255).astype(np.uint8))
    # blurred environment: a constant environment L shows as to_display(L) behind the head
    viewer.set_background("environment")
    s = replace(viewer.snapshot(), env=constant_environment(0.5), env_key=("const",))
    e = fr.render(s)
    expect = to_display(torch.tensor([0.5, 0.5, 0.5]), s.tonemap).numpy()
    assert np.allclose(e.display[..., :3][empty], expect, atol=1e-4)
    viewer.set_background("colour", (1.0, 0.0, 0.0))
    c = fr.render(viewer.snapshot())
    assert np.allclose(c.display[..., :3][empty], [1.0, 0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError):
        viewer.set_background("marble")


def test_controller_versions_and_state(viewer):
    v0 = viewer.version
    viewer.set_channel("albedo")
    v1 = viewer.version
    viewer.set_channel("albedo")  # no change, no new version
    assert v0 != v1 == viewer.version
    viewer.set_rotation(190.0)
    assert viewer.rotation_deg == pytest.approx(-170.0)
    viewer.set_auto_rotate(True, 20.0)
    assert viewer.tick(0.2) and viewer.rotation_deg == pytest.approx(-166.0)
    viewer.tick(3.0)  # a stalled frame does not jump: at most 0.25 s of rotation
    assert viewer.rotation_deg == pytest.approx(-161.0)
    viewer.orbit.orbit(10, 0)
    assert viewer.version != v1
    f = viewer.current_frame()
    f.expr[0, 0] = 0.7
    v2 = viewer.version
    viewer.set_frame(f)
    assert viewer.version != v2 and viewer.current_frame().expr[0, 0] == pytest.approx(0.7)
    f.expr = torch.zeros(1, 3)
    with pytest.raises(ValueError):
        viewer.set_frame(f)
    with pytest.raises(ValueError):
        viewer.set_channel("glow")
    viewer.frame_head()  # fits the head: target moves to the head centre
    assert viewer.orbit.state.distance > 0


# ---------------------------------------------------------------------------------------- worker + context
def test_worker_renders_the_newest_state_and_survives_errors(viewer):
    w = RenderWorker()
    try:
        for r in range(6):  # a burst of changes: stale requests are dropped, the last one is shown
            viewer.set_rotation(r * 10.0)
            w.submit(viewer.snapshot())
        assert w.wait_for(viewer.version, 30)
        assert w.latest().version == viewer.version and w.latest().seq >= 1
        assert w.latest().seq + w.dropped == 6
        bad = replace(viewer.snapshot(), channel="glow", version=("bad",))
        w.submit(bad)
        assert not w.wait_for(("bad",), 30)
        errs = w.pop_errors()
        assert len(errs) == 1 and "unknown channel" in errs[0]
        viewer.set_channel("depth")
        w.submit(viewer.snapshot())
        assert w.wait_for(viewer.version, 30)  # still alive
    finally:
        w.close()


def test_context_contract(tmp_path, viewer):
    worker = RenderWorker()
    ctx = AppContext(viewer, worker, MessageLog(echo=False))
    try:
        assert ctx.bundle is viewer.bundle and ctx.device == torch.device("cpu")
        # set_frame from another thread drives the viewer
        f = ctx.current_frame()
        f.pose[0, 2, 0] = 0.3
        t = threading.Thread(target=ctx.set_frame, args=(f, "webcam"))
        t.start()
        t.join()
        assert ctx.current_frame().pose[0, 2, 0] == pytest.approx(0.3)
        assert ctx.frame_state() == (1, "webcam")  # panels that mirror the frame see who set it
        # render_image = the viewport's image formation at res x res
        img = ctx.render_image(f, 24)
        s = viewer.snapshot((24, 24))
        ref = viewer.renderer.render(s.camera, f, s.env, RenderSettings(tonemap=s.tonemap, background=viewer.background_colour)).image
        assert img.shape == (24, 24, 3) and img.dtype == np.uint8
        assert np.abs(img.astype(int) - (ref.numpy() * 255 + 0.5).astype(int)).max() <= 1
        # frame callbacks run once per poll; a failing one is reported once and the app goes on
        seen = []
        ctx.add_frame_callback(seen.append)
        ctx.add_frame_callback(lambda dt: 1 / 0)
        ctx.poll(0.02)
        ctx.poll(0.03)
        assert seen == [0.02, 0.03]
        assert sum("failed" in m.text for m in ctx.messages.all()) == 1
        # a broken checkpoint: one-line error, the avatar stays
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a checkpoint")
        old = ctx.bundle
        ctx.open_checkpoint(bad, wait=True)
        ctx.poll(0.0)
        last = ctx.messages.latest()
        assert last.level == "error" and "bad.safetensors" in last.text and ctx.bundle is old
        # a real one (a run folder holding avatar.safetensors) is swapped in and announced
        run = tmp_path / "run"
        run.mkdir()
        save_checkpoint(run / "avatar.safetensors", tiny_bundle())
        got = []
        ctx.add_bundle_callback(got.append)
        ctx.open_checkpoint(run, wait=True)
        ctx.poll(0.0)
        assert ctx.bundle is not old and got == [ctx.bundle] and ctx.messages.latest().level == "info"
        assert not ctx.loading_checkpoint
    finally:
        worker.close()


def test_message_log_is_one_line():
    log = MessageLog(echo=False, clock=lambda: 5.0)
    log.add("two\nlines", "bogus")
    m = log.latest()
    assert m.text == "two lines" and m.level == "info" and m.time == 5.0

