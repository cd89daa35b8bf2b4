"""Webcam / video reenactment: video sources, the face driver (landmarks and encoder modes),
relative mode and smoothing, the Webcam-tab controller and panel against a fake AppContext.

MediaPipe-dependent checks skip cleanly without it; the rest uses a scripted landmarker that
returns the built-in head's landmarks projected with known parameters (an independent reference).
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from app.webcam import (
    DriveResult,
    FaceDriver,
    ReenactmentSession,
    VideoSource,
    VideoSourceError,
    WebcamController,
    draw_preview,
    has_encoder,
    relative_frame,
    smoothing_to_cutoff,
    write_video,
)
from hravatar.avatar.gaussians import FrameParams
from hravatar.head.lbs import axis_angle_to_matrix
from hravatar.track.fit import estimate_camera, project
from hravatar.track.landmarks import Detection

# small per-frame tensors: one thread is fastest, and avoids OpenMP stalls on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


SPECS = (((), 0.0), (("mouthSmile_L=0.8", "mouthSmile_R=0.8"), 0.0), ((), 0.25), ((), 0.0))


class FakeContext:
    """The AppContext contract, rendering with the real renderer (memoised per frame)."""

    def __init__(self, bundle):
        from hravatar.api import AvatarRenderer, default_camera, resolve_environment

        self.bundle = bundle
        self.device = torch.device("cpu")
        self.frames: list[tuple[FrameParams, str]] = []
        self.messages: list[tuple[str, str]] = []
        self.callbacks = []
        self._renderer = AvatarRenderer(bundle.avatar)
        self._env = resolve_environment(None, bundle)[0]
        self._cam = default_camera(bundle, 256)
        self._cache: dict[bytes, np.ndarray] = {}

    def current_frame(self):
        return self.frames[-1][0] if self.frames else self.bundle.avatar.neutral_frame()

    def set_frame(self, frame, source="ui"):
        assert frame.expr.shape == (1, self.bundle.avatar.num_expr) and frame.pose.shape == (1, 5, 3)
        self.frames.append((frame, source))

    def notify(self, message, level="info"):
        self.messages.append((level, message))

    def add_frame_callback(self, fn):
        self.callbacks.append(fn)

    def render_image(self, frame, res):
        key = b"".join(t.detach().numpy().tobytes() for t in (frame.expr, frame.pose)) + bytes([res % 256])
        if key not in self._cache:
            img = self._renderer.render(self._cam.resized(res, res), frame, self._env).image
            self._cache[key] = (img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        return self._cache[key]


@pytest.fixture(scope="module")
def ctx():
    from hravatar.api import open_avatar

    return FakeContext(open_avatar(None))


@pytest.fixture(scope="module")
def video(ctx, tmp_path_factory):
    """A 4-frame MP4 of the demo avatar (neutral, smile, open jaw, neutral) and its frames."""
    from hravatar.api import parse_expression_args

    av = ctx.bundle.avatar
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test thread setting
    frames = [ctx.render_image(parse_expression_args(av, list(e), jaw=j), 256) for e, j in SPECS]
    torch.set_num_threads(n)
    return write_video(tmp_path_factory.mktemp("webcam") / "avatar.mp4", frames, fps=10.0), frames


@pytest.fixture(scope="module")
def head():
    from hravatar.head.builtin import load_builtin_head

    return load_builtin_head()


class ScriptedLandmarker:
    """Returns the built-in head's landmarks for scripted parameters, one per call (cyclic), as a
    256x256 webcam with the driver's default camera would see them; None entries = no face."""

    def __init__(self, head, params: list[FrameParams | None], size=(256, 256), faces=1):
        cam = estimate_camera(*size)
        self.dets = []
        for p in params:
            if p is None:
                self.dets.append(None)
                continue
            lmk = head(psi=p.expr, pose=p.pose, eyelids=p.eyelids, transl=p.transl).landmarks
            uv = project(lmk, cam.K, cam.viewmat[:3, :3], cam.viewmat[:3, 3])[0].numpy()
            pts = np.concatenate([uv, np.zeros((478, 1))], 1).astype(np.float32)
            self.dets.append(Detection(pts, np.concatenate([uv.min(0), uv.max(0)]).astype(np.float32), faces))
        self.calls = 0

    def detect(self, image, timestamp_ms=None):
        d = self.dets[self.calls % len(self.dets)]
        self.calls += 1
        return d


def _params(head, jaw=0.0, smile=0.0, yaw=0.0):
    expr = torch.zeros(1, head.num_expr)
    expr[0, head.expr_names.index("mouthSmile_L")] = smile
    expr[0, head.expr_names.index("mouthSmile_R")] = smile
    pose = torch.zeros(1, 5, 3)
    pose[0, 2, 0] = jaw
    pose[0, 0, 1] = yaw
    return FrameParams(expr, pose, torch.zeros(1, 2), torch.zeros(1, 3))


# ------------------------------------------------------------------------------------ video sources
def test_video_source_reads_loops_and_ends(video):
    path, frames = video
    src = VideoSource(path, loop=False)
    got = []
    while (f := src.read()) is not None:
        got.append(f)
    assert len(got) == 4 and src.ended and src.error.startswith("end of video")
    assert [f.index for f in got] == [0, 1, 2, 3]
    assert np.allclose([f.time for f in got], [0.0, 0.1, 0.2, 0.3])
    for f, ref in zip(got, frames):  # H.264 round trip: small error
        assert f.image.shape == (256, 256, 3) and f.image.dtype == np.uint8
        assert np.abs(f.image.astype(float) - ref).mean() < 4.0
    src.stop()
    src = VideoSource(path, loop=True, max_side=128)
    got = [src.read() for _ in range(6)]
    assert got[0].image.shape == (128, 128, 3)
    assert [f.index for f in got] == list(range(6)) and np.allclose([f.time for f in got], np.arange(6) * 0.1)
    assert np.abs(got[4].image.astype(float) - got[0].image).mean() < 1.0  # frame 4 = the first frame again
    src.stop()


def test_video_source_thread_keeps_latest(video):
    path, _ = video
    src = VideoSource(path, loop=False, realtime=False)
    src.start()
    seen = []
    t_end = time.time() + 10
    while time.time() < t_end:
        f = src.latest(after=seen[-1] if seen else -1, timeout=0.5)
        if f is not None:
            seen.append(f.index)
        elif not src.running:
            break
    src.stop()
    assert seen and seen == sorted(seen) and seen[-1] == 3  # increasing, ends on the last frame
    assert src.error.startswith("end of video")


def test_video_source_messages(tmp_path, monkeypatch):
    with pytest.raises(VideoSourceError, match="video file not found"):
        VideoSource(tmp_path / "missing.mp4").open()
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoSourceError, match="cannot read video notes.mp4"):
        VideoSource(bad).open()
    with pytest.raises(VideoSourceError, match="camera 97"):
        VideoSource(97).open()
    # a camera whose device exists but cannot be opened (busy): one line saying so
    cv2 = pytest.importorskip("cv2")
    node = tmp_path / "video0"
    node.write_text("")
    monkeypatch.setattr("app.webcam.camera_device_path", lambda i: node)

    class BusyCapture:
        def __init__(self, *a):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoCapture", BusyCapture)
    with pytest.raises(VideoSourceError, match="in use by another application"):
        VideoSource(0).open()


# ------------------------------------------------------------------------------------ driving maths
def test_relative_frame_math():
    g = torch.Generator().manual_seed(0)

    def frame(scale):
        return FrameParams(torch.rand(1, 6, generator=g) * scale, (torch.rand(1, 5, 3, generator=g) - 0.5) * scale,
                           torch.rand(1, 2, generator=g) * scale, (torch.rand(1, 3, generator=g) - 0.5) * 0.02)

    avatar_neutral, captured = frame(0.3), frame(0.5)
    delta = frame(0.4)
    R_delta = axis_angle_to_matrix(delta.pose[:, 0])
    from app.webcam import _matrix_to_axis_angle

    cur_root = _matrix_to_axis_angle(R_delta @ axis_angle_to_matrix(captured.pose[:, 0]))
    current = FrameParams(captured.expr + delta.expr, captured.pose + delta.pose, captured.eyelids + delta.eyelids,
                          captured.transl + torch.tensor([[0.2, 0.0, 0.001]]))
    current.pose[:, 0] = cur_root
    out = relative_frame(current, captured, avatar_neutral, max_transl=0.05)
    assert torch.allclose(out.expr, avatar_neutral.expr + delta.expr, atol=1e-6)
    assert torch.allclose(out.eyelids, avatar_neutral.eyelids + delta.eyelids, atol=1e-6)
    assert torch.allclose(out.pose[:, 2:], avatar_neutral.pose[:, 2:] + delta.pose[:, 2:], atol=1e-6)  # jaw, eyes add
    # the head turns by the driver's rotation since its neutral, on top of the avatar's neutral pose
    assert torch.allclose(axis_angle_to_matrix(out.pose[:, 0]), R_delta @ axis_angle_to_matrix(avatar_neutral.pose[:, 0]),
                          atol=1e-5)
    assert torch.allclose(out.transl - avatar_neutral.transl, torch.tensor([[0.05, 0.0, 0.001]]), atol=1e-6)  # clamped
    same = relative_frame(captured, captured, avatar_neutral)  # the captured face maps to the avatar's neutral
    for a, b in zip((same.expr, same.pose, same.eyelids, same.transl),
                    (avatar_neutral.expr, avatar_neutral.pose, avatar_neutral.eyelids, avatar_neutral.transl)):
        assert torch.allclose(a, b, atol=1e-5)


def test_smoothing_mapping():
    assert smoothing_to_cutoff(0.0) is None
    cut = [smoothing_to_cutoff(s) for s in (0.1, 0.5, 1.0)]
    assert cut[0] > cut[1] > cut[2] and math.isclose(cut[2], 0.1) and math.isclose(cut[1], 1.0)


# ------------------------------------------------------------------------------------ driver (scripted landmarks)
def test_driver_landmarks_mode_follows_and_smooths(ctx, head):
    seq = [_params(head, jaw=0.2 * (i % 2), yaw=0.2) for i in range(24)]
    raw_d = FaceDriver(ctx.bundle, landmarker=ScriptedLandmarker(head, seq), smoothing=0.0)
    smooth_d = FaceDriver(ctx.bundle, landmarker=ScriptedLandmarker(head, seq), smoothing=0.9)
    raw, smooth = [], []
    for i in range(len(seq)):
        t = i / 30
        r1, r2 = raw_d.process(np.zeros((256, 256, 3), np.uint8), t), smooth_d.process(np.zeros((256, 256, 3), np.uint8), t)
        assert r1.message == "" and r1.frame is not None and {"detect", "fit", "total"} <= set(r1.timings)
        raw.append(float(r1.frame.pose[0, 2, 0]))
        smooth.append(float(r2.frame.pose[0, 2, 0]))
    raw, smooth = np.array(raw[4:]), np.array(smooth[4:])
    # unsmoothed: the fit follows the jaw (prior shrinks it a little); smoothed: the flicker is damped
    assert np.abs(raw[1::2].mean() - 0.2) < 0.03 and np.abs(raw[0::2].mean()) < 0.02
    assert np.abs(np.diff(smooth)).mean() < 0.3 * np.abs(np.diff(raw)).mean()
    assert abs(float(r1.frame.pose[0, 0, 1]) - 0.2) < 0.02  # head yaw (root joint)
    assert torch.equal(r1.frame.transl, torch.zeros(1, 3))  # absolute mode: webcam translation not applied


def test_driver_relative_mode_and_messages(ctx, head):
    seq = [_params(head, smile=0.3, yaw=0.3), _params(head, smile=0.3, yaw=0.3), _params(head, smile=0.8, jaw=0.15, yaw=0.3), None]
    d = FaceDriver(ctx.bundle, landmarker=ScriptedLandmarker(head, seq), smoothing=0.0)
    img = np.zeros((256, 256, 3), np.uint8)
    assert d.capture_neutral() == "no face to capture yet"
    d.process(img, 0.0)
    assert d.capture_neutral() == "neutral face captured"
    d.set_relative(True)
    same = d.process(img, 0.04).frame  # the captured face -> the avatar's neutral
    assert float(same.expr.abs().max()) < 0.02 and float(same.pose[0, 0].norm()) < 0.01
    moved = d.process(img, 0.08).frame  # smile +0.5, jaw +0.15 relative to the captured face
    i = ctx.bundle.avatar.expr_names.index("mouthSmile_L")
    assert 0.3 < float(moved.expr[0, i]) < 0.6 and abs(float(moved.pose[0, 2, 0]) - 0.15) < 0.03
    assert float(moved.pose[0, 0].norm()) < 0.02  # the constant yaw is removed
    r = d.process(img, 0.12)
    assert r.frame is None and r.message == "no face in view"
    many = FaceDriver(ctx.bundle, landmarker=ScriptedLandmarker(head, [seq[0]], faces=3), smoothing=0.0)
    assert "3 faces" in many.process(img, 0.0).message


def test_driver_encoder_mode_matches_direct_encoder(ctx, head, video):
    from hravatar.encoder.crop import crop_and_resize, crop_box_from_landmarks

    from app.webcam import load_avatar_encoder

    assert has_encoder(ctx.bundle)
    _, frames = video
    lm = ScriptedLandmarker(head, [_params(head)])

    class NoMatte:
        def matte(self, image):
            return image

    d = FaceDriver(ctx.bundle, mode="encoder", landmarker=lm, segmenter=NoMatte(), smoothing=0.0)
    r = d.process(frames[1], 0.0)
    assert "encoder" in r.timings and r.frame.expr.shape == (1, ctx.bundle.avatar.num_expr)
    enc, res = load_avatar_encoder(ctx.bundle)
    box = crop_box_from_landmarks(torch.from_numpy(lm.dets[0].landmarks[None, :, :2]), 1.4)
    with torch.no_grad():
        ref = enc(crop_and_resize(torch.from_numpy(frames[1]).permute(2, 0, 1)[None].float() / 255, box, res))
    assert torch.allclose(r.frame.expr, ref["expr"], atol=1e-5)
    assert torch.allclose(r.frame.pose[:, 2], ref["jaw"], atol=1e-5) and torch.allclose(r.frame.eyelids, ref["eyelids"], atol=1e-5)
    # an avatar without an encoder keeps landmarks mode with a message
    from hravatar.api import untrained_avatar

    plain = untrained_avatar(num_gaussians=200)
    d2 = FaceDriver(plain, landmarker=lm)
    assert "no expression encoder" in d2.set_mode("encoder") and d2.mode == "landmarks"


def test_preview_draws_box(video):
    _, frames = video
    r = DriveResult(None, landmarks=np.full((478, 3), 128, np.float32), box=np.array([128, 128, 100], np.float32))
    p = draw_preview(frames[0], r, 200, 120)
    assert p.shape == (120, 200, 3) and p.dtype == np.uint8
    assert (p == np.array([255, 210, 60], np.uint8)).all(-1).sum() > 100  # the box outline
    assert (p[:, :20] == 0).all()  # letterbox bars (square image in a wide thumbnail)


# ------------------------------------------------------------------------------------ MediaPipe on avatar renders
def test_driver_with_mediapipe_on_avatar_video(ctx, video):
    pytest.importorskip("mediapipe")
    path, _ = video
    d = FaceDriver(ctx.bundle, smoothing=0.0)
    src = VideoSource(path, loop=False)
    out = []
    while (f := src.read()) is not None:
        r = d.process(f.image, f.time)
        assert r.frame is not None, f"MediaPipe found no face in frame {f.index}: {r.message}"
        out.append(r.frame)
    d.close()
    names = ctx.bundle.avatar.expr_names
    smile = [float(f.expr[0, names.index("mouthSmile_L")] + f.expr[0, names.index("mouthSmile_R")]) for f in out]
    jaw = [float(f.pose[0, 2, 0]) for f in out]
    assert smile[1] > smile[0] + 0.1 and jaw[2] > jaw[0] + 0.05 and jaw[2] > jaw[3] + 0.05


# ------------------------------------------------------------------------------------ controller + panel
def _session_factory(head):
    seq = [_params(head, jaw=0.1 * (i % 3)) for i in range(6)]

    def make(bundle, source, **kw):
        return ReenactmentSession(bundle, source, realtime=True, preview_size=(160, 120),
                                  driver_factory=lambda b: FaceDriver(b, landmarker=ScriptedLandmarker(head, seq)), **kw)
    return make


def test_controller_drives_the_avatar(ctx, head, video):
    path, _ = video
    ctx.frames.clear()
    ctl = WebcamController(ctx, session_factory=_session_factory(head), preview_size=(160, 120))
    ctl.select_camera(97)
    assert not ctl.start() and "camera 97" in ctl.message and ctl.level == "error"
    ctl.select_file(path)
    assert ctl.start()  # 10 fps file, looping
    ctl.set_smoothing(0.5)
    ctl.set_relative(True)
    n = ctl.run_blocking(min_frames=5, timeout_s=20)
    assert n >= 5 and len(ctx.frames) >= 5 and all(s == "webcam" for _, s in ctx.frames)
    st = ctl.poll()
    assert "fit" in ctl.stats() and st.running
    previews = []
    ctl.set_loop(False)
    t_end = time.time() + 20
    while ctl.running and time.time() < t_end:  # the file now ends
        st = ctl.poll()
        if st.preview is not None:
            previews.append(st.preview)
        time.sleep(0.02)
    assert not ctl.running and ctl.message.startswith("end of video") and ctl.level == "info"
    assert all(p.shape == (120, 160, 3) for p in previews)
    ctl.capture_neutral()
    assert "start the webcam first" in ctl.message
    ctl.stop()


def test_panel_builds_and_selftests(ctx):
    dpg = pytest.importorskip("dearpygui.dearpygui")
    pytest.importorskip("mediapipe")
    from app.ui.webcam_panel import build

    dpg.create_context()
    try:
        ctx.frames.clear()
        with dpg.window() as win:
            pass
        panel = build(win, ctx)
        assert len(ctx.callbacks) >= 1
        panel.selftest()
        assert len(ctx.frames) >= 5 and all(s == "webcam" for _, s in ctx.frames)
        assert not panel.ctl.running
        panel.probe()  # no cameras here: a message, no exception
        assert panel.ctl.message
        panel.close()
    finally:
        dpg.destroy_context()


def test_missing_mediapipe_is_one_clear_message(ctx, video, monkeypatch):
    import hravatar.track.landmarks as lmod

    def missing():
        raise lmod.MediaPipeMissing("face tracking needs MediaPipe: pip install 'hravatar[track]' (No module named 'mediapipe')")

    monkeypatch.setattr(lmod, "import_mediapipe", missing)
    ctl = WebcamController(ctx)
    ctl.select_file(video[0])
    assert ctl.start()  # the file opens; tracking fails on the worker, reported once
    t_end = time.time() + 10
    while ctl.running and time.time() < t_end:
        ctl.poll()
        time.sleep(0.02)
    assert not ctl.running and ctl.level == "error" and "hravatar[track]" in ctl.message
    assert ctx.messages and "hravatar[track]" in ctx.messages[-1][1]
