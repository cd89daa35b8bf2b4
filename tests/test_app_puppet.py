"""Puppet parameter space, training-sequence player, Puppet-tab controller and (when dearpygui is
installed) the panel built without a viewport."""
import numpy as np
import pytest
import torch

from app.puppet import FrameFollower, ParameterSpace, PuppetController, SequencePlayer, arkit_stem
from hravatar.api import untrained_avatar
from hravatar.avatar.gaussians import FrameParams
from hravatar.head.builtin import EXPR_NAMES


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def make_sequence(T: int, E: int, seed: int = 0) -> FrameParams:
    g = torch.Generator().manual_seed(seed)
    return FrameParams(torch.rand(T, E, generator=g) * 0.8, torch.randn(T, 5, 3, generator=g) * 0.1,
                       torch.rand(T, 2, generator=g), torch.randn(T, 3, generator=g) * 0.01)


@pytest.fixture(scope="module")
def bundle():
    b = untrained_avatar(num_gaussians=2000)
    b.sequence = make_sequence(20, b.avatar.num_expr)
    return b


@pytest.fixture
def space(bundle):
    return ParameterSpace.for_avatar(bundle.avatar)


# ----------------------------------------------------------------------------- ParameterSpace
def test_layout_names_ranges(bundle, space):
    E = bundle.avatar.num_expr
    assert E == len(EXPR_NAMES) and space.dim == E + 13
    assert space.names[:E] == list(EXPR_NAMES)
    for s in space.specs[:E]:  # ARKit blendshape weights
        assert (s.lo, s.hi, s.default) == (0.0, 1.0, 0.0)
    jaw = space.specs[space.index("jaw open")]
    assert jaw.lo == 0.0 and 0.3 <= jaw.hi <= 0.6  # realistic opening, covers the jawOpen shape's 0.3 rad
    groups = dict(space.groups())
    assert [space.names[i] for i in groups["Eyes"]] == ["eyes pitch", "eyes yaw"]
    assert len(groups["Head"]) == len(groups["Neck"]) == len(groups["Jaw"]) == 3 and len(groups["Eyelids"]) == 2
    assert sorted(i for _, idx in space.groups() for i in idx) == list(range(space.dim))  # every slider once
    assert "mouthSmile_L" in [space.names[i] for i in groups["Mouth"]]
    assert [tuple(space.names[i] for i in g) for g in space.rotation_groups()] == [
        ("head pitch", "head yaw", "head roll"), ("neck pitch", "neck yaw", "neck roll"),
        ("jaw open", "jaw sideways", "jaw twist")]


def test_unnamed_expressions():
    sp = ParameterSpace(None, 20)
    assert sp.names[:3] == ["expr 0", "expr 1", "expr 2"] and sp.specs[0].lo < 0 < sp.specs[0].hi
    assert [g for g, _ in sp.groups()][-2:] == ["Expression 0-15", "Expression 16-19"]
    assert ParameterSpace(["a", "b"], 3).names[:3] == ["expr 0", "expr 1", "expr 2"]  # wrong-length names ignored
    assert arkit_stem("eyeBlinkLeft") == "eyeblink" and arkit_stem("jawOpen") == "jawopen" and arkit_stem("expr00") is None


def test_round_trip_values_frame_values(space):
    rng = np.random.default_rng(0)
    v = rng.uniform(space.lows(), space.highs())
    f = space.to_frame(v)
    assert f.expr.shape == (1, space.num_expr) and f.pose.shape == (1, 5, 3) and f.eyelids.shape == (1, 2)
    assert f.transl.abs().sum() == 0 and f.expr.dtype == torch.float32
    np.testing.assert_allclose(space.from_frame(f), v, atol=1e-6)  # float32 storage


def test_named_mapping(bundle, space):
    cases = {"mouthSmile_L": ("expr", (0, bundle.avatar.expr_names.index("mouthSmile_L"))),
             "jaw open": ("pose", (0, 2, 0)), "jaw sideways": ("pose", (0, 2, 1)), "neck roll": ("pose", (0, 1, 2)),
             "head yaw": ("pose", (0, 0, 1)), "head pitch": ("pose", (0, 0, 0)),
             "eyelid R": ("eyelids", (0, 0)), "eyelid L": ("eyelids", (0, 1))}
    for name, (field, idx) in cases.items():
        space.reset()
        space.set_value(name, 0.123)
        f = space.to_frame()
        t = getattr(f, field)
        assert t[idx].item() == pytest.approx(0.123)
        total = sum(x.abs().sum().item() for x in (f.expr, f.pose, f.eyelids, f.transl))
        assert total == pytest.approx(0.123)  # nothing else moved
    space.set_value("jaw open", 7.0)
    assert space.values[space.index("jaw open")] == space.specs[space.index("jaw open")].hi  # clamped


def test_eye_sliders_drive_both_eye_joints(space):
    space.reset()
    space.set_value("eyes yaw", 0.3)
    space.set_value("eyes pitch", -0.1)
    f = space.to_frame()
    expected = torch.tensor([-0.1, 0.3, 0.0])
    torch.testing.assert_close(f.pose[0, 3], expected)  # eye_l
    torch.testing.assert_close(f.pose[0, 4], expected)  # eye_r
    assert f.pose[0, :3].abs().sum() == 0
    f.pose[0, 3, 1], f.pose[0, 4, 1] = 0.2, 0.4  # tracked eyes may differ: the slider shows the mean
    assert space.from_frame(f)[space.index("eyes yaw")] == pytest.approx(0.3)


def test_frame_deforms_avatar(bundle, space):
    space.reset()
    neutral = bundle.avatar.deform(space.to_frame()).means
    space.set_value("jaw open", 0.4)
    opened = bundle.avatar.deform(space.to_frame()).means
    moved = (opened - neutral).norm(dim=-1)
    assert moved.max() > 0.005 and (moved < 1e-7).float().mean() > 0.3  # the jaw moves, the cranium stays


def test_reset_and_randomize(space):
    space.randomize(3, 1.0)
    np.testing.assert_array_equal(space.reset(), space.defaults())
    np.testing.assert_array_equal(space.randomize(0, 0.0), space.defaults())
    a, b = space.randomize(7, 0.6), space.randomize(7, 0.6)
    np.testing.assert_array_equal(a, b)  # seeded: reproducible
    expr = [i for i, s in enumerate(space.specs) if s.kind == "expr"]
    counts = []
    for seed in range(30):
        v = space.randomize(np.random.default_rng(seed), 1.0)
        assert np.all(v >= space.lows()) and np.all(v <= space.highs())
        counts.append(int((v[expr] != 0).sum()))
        assert abs(v[space.index("head yaw")]) <= 1.0
    assert 1 <= np.mean(counts) <= 6 and max(counts) <= 12  # sparse expressions
    assert np.std([space.randomize(s, 1.0)[space.index("head yaw")] for s in range(30)]) < 0.4  # small poses


def test_widen_to_sequence():
    sp = ParameterSpace(["jawOpen", "mouthSmile_L"], 2)
    seq = FrameParams.neutral(2, 3)
    seq.expr[1, 0] = 1.23
    seq.pose[2, 2, 0] = -0.07
    sp.widen_to(seq)
    assert sp.specs[0].hi == pytest.approx(1.25) and sp.specs[sp.index("jaw open")].lo == pytest.approx(-0.1)
    assert sp.specs[1].hi == 1.0


# ----------------------------------------------------------------------------- SequencePlayer
def test_sequence_player_timing(bundle):
    clock = FakeClock()
    seq = bundle.sequence
    p = SequencePlayer(seq, fps=10, loop=True, clock=clock)
    assert p.num_frames == 20 and p.duration == pytest.approx(2.0)
    assert p.frame_index() == 0 and not p.playing
    p.play()
    clock.t += 0.25
    assert p.frame_index() == 2
    f = p.frame()
    torch.testing.assert_close(f.expr, seq.expr[2:3])
    torch.testing.assert_close(f.transl, seq.transl[2:3])
    clock.t += 2.0  # 2.25 s: looped to 0.25
    assert p.frame_index() == 2
    clock.t += 0.099
    assert p.frame_index() == 3
    p.seek(1.0)
    assert p.frame_index() == 10
    p.pause()
    clock.t += 5
    assert p.frame_index() == 10
    p.loop = False
    p.play()
    clock.t += 3.0
    assert p.frame_index() == 19 and not p.playing  # holds the last frame
    p.seek_frame(7)
    assert p.frame_index() == 7 and p.frame_index(0.799) == 7 and p.frame_index(0.8) == 8
    with pytest.raises(ValueError):
        SequencePlayer(seq, fps=0)


# ----------------------------------------------------------------------------- controller
def test_controller_sequence_and_timeline(bundle):
    clock = FakeClock()
    c = PuppetController(bundle, clock=clock)
    c.player.fps = 10
    f = c.play_sequence(True)
    assert c.mode == "sequence"
    torch.testing.assert_close(f.pose, bundle.sequence.pose[0:1])
    assert c.tick() is None  # same frame: nothing to redraw
    clock.t += 0.35
    f = c.tick()
    torch.testing.assert_close(f.expr, bundle.sequence.expr[3:4])
    np.testing.assert_allclose(c.space.values, c.space.from_frame(bundle.sequence, 3))  # sliders follow
    c.set_value("jaw open", 0.2)  # touching a slider takes over
    assert c.mode == "manual" and not c.player.playing

    c.reset()
    c.scrub(0.0)
    c.set_value("head yaw", -0.5)
    c.add_key()
    c.scrub(2.0)  # sliders show the (clamped) animation there
    assert c.space.values[c.space.index("head yaw")] == pytest.approx(-0.5)
    c.set_value("head yaw", 0.5)
    c.set_value("mouthSmile_L", 1.0)
    c.add_key()
    assert c.timeline.times == [0.0, 2.0]
    f = c.play_timeline(True)
    assert c.mode == "timeline" and f.pose[0, 0, 1].item() == pytest.approx(-0.5)
    clock.t += 1.0
    f = c.tick()
    expected = c.timeline.evaluate(1.0)
    torch.testing.assert_close(f.expr[0].double(), torch.from_numpy(expected[:c.space.num_expr]), atol=1e-6, rtol=0)
    assert abs(f.pose[0, 0, 1].item()) < 1e-6 and c.scrub_time == pytest.approx(1.0)  # halfway between -0.5 and 0.5
    c.play_timeline(False)
    assert c.mode == "manual" and c.tick() is None

    other = untrained_avatar(num_gaussians=500)  # another avatar: animation kept by name
    c.rebind(other)
    assert c.timeline.times == [0.0, 2.0] and c.player is None
    assert c.timeline.evaluate(2.0)[c.space.index("mouthSmile_L")] == 1.0


# ----------------------------------------------------------------------------- following other sources
def test_follower_throttles_skips_own_frames_and_never_fights_the_user():
    clock = FakeClock()
    f = FrameFollower("puppet", interval_s=0.25, hold_s=0.5, clock=clock)
    assert f.should_follow(1, "webcam")  # a frame set by someone else: follow
    assert not f.should_follow(1, "webcam")  # nothing new
    assert not f.should_follow(2, "webcam")  # new, but within 0.25 s of the last update
    clock.t += 0.3
    assert f.should_follow(5, "webcam")  # the newest frame is picked up later
    clock.t += 1.0
    assert not f.should_follow(6, "puppet")  # the panel's own frame: the sliders show it already
    assert not f.should_follow(6, "webcam")  # ... and it counts as seen
    f.user_changed()  # the user moves a slider while the webcam drives
    clock.t += 0.3
    assert not f.should_follow(7, "webcam")  # hold after the user's last change
    asked = []
    clock.t += 0.3
    assert not f.should_follow(8, "webcam", lambda: asked.append(1) or True)  # a slider is held right now
    assert asked == [1]
    assert not f.should_follow(8, "webcam", lambda: asked.append(2) or True)  # asked only when all else says yes
    assert asked == [1, 2]
    assert f.should_follow(8, "webcam", lambda: False)  # released: follow
    assert not f.should_follow(8, "webcam", lambda: asked.append(3) or False) and asked == [1, 2]


def test_controller_follow_keeps_playback_and_round_trips(bundle):
    clock = FakeClock()
    c = PuppetController(bundle, clock=clock)
    c.play_sequence(True)
    v0 = c.version
    seq = bundle.sequence
    frame = FrameParams(seq.expr[3:4], seq.pose[3:4], seq.eyelids[3:4], seq.transl[3:4])
    assert c.follow(frame) is None
    assert c.version == v0 + 1 and c.mode == "sequence"  # widgets re-sync; the playback is left alone
    back = c.space.to_frame()
    assert torch.allclose(back.expr, frame.expr) and torch.allclose(back.pose[:, :3], frame.pose[:, :3])
    assert torch.allclose(back.eyelids, frame.eyelids)
    eyes = 0.5 * (frame.pose[:, 3] + frame.pose[:, 4])  # one gaze slider for both eyes
    assert torch.allclose(back.pose[:, 3, :2], eyes[:, :2]) and torch.allclose(back.pose[:, 4, :2], eyes[:, :2])


# ----------------------------------------------------------------------------- panel (no viewport)
class FakeContext:
    def __init__(self, bundle) -> None:
        self.bundle = bundle
        self.device = torch.device("cpu")
        self.frames, self.messages, self.callbacks = [], [], []
        self._frame = bundle.avatar.neutral_frame()

    def current_frame(self):
        return self._frame

    def set_frame(self, frame, source="ui"):
        self._frame = frame
        self.frames.append((frame, source))

    def notify(self, message, level="info"):
        self.messages.append((level, message))

    def add_frame_callback(self, fn):
        self.callbacks.append(fn)

    def render_image(self, frame, res):
        img = np.zeros((res, res, 3), np.uint8)
        img[..., 0] = np.linspace(0, 255, res)[None, :]
        return img


def test_panel_builds_and_selftests(bundle, tmp_path):
    dpg = pytest.importorskip("dearpygui.dearpygui")
    from app.ui.puppet_panel import build

    dpg.create_context()
    try:
        ctx = FakeContext(bundle)
        with dpg.window() as win:
            pass
        panel = build(win, ctx)
        assert len(ctx.callbacks) == 1 and len(panel._sliders) == panel.ctl.space.dim
        panel.selftest()
        assert len(ctx.frames) >= 10 and all(isinstance(f, FrameParams) for f, _ in ctx.frames)
        assert len(panel.ctl.timeline) == 2
        assert any(f.transl.abs().sum() > 0 for f, _ in ctx.frames)  # the training sequence was played
        i = panel.ctl.space.index("jaw open")
        assert dpg.get_value(panel._sliders[i]) == pytest.approx(panel.ctl.space.values[i])  # widgets synced
        # JSON and MP4 through the panel's own actions; errors become messages
        panel.save_json(tmp_path / "a.json")
        panel.load_json(tmp_path / "a.json")
        (tmp_path / "bad.json").write_text("{")
        panel.load_json(tmp_path / "bad.json")
        assert ctx.messages[-1][0] == "error" and "bad.json" in ctx.messages[-1][1]
        dpg.set_value(panel._res, 16)
        dpg.set_value(panel._fps, 4)
        panel.start_export(tmp_path / "a.mp4")
        for _ in range(50):
            ctx.callbacks[0](0.03)
            if panel._exporter is None:
                break
        assert (tmp_path / "a.mp4").exists() and "written" in ctx.messages[-1][1]
        n = len(ctx.messages)
        panel.start_export(tmp_path / "missing" / "a.mp4")
        assert ctx.messages[n][0] == "error"
        ctx.bundle = untrained_avatar(num_gaussians=300)  # the shell opened another avatar
        ctx.callbacks[0](0.03)
        assert panel.ctl.player is None and len(panel.ctl.timeline) == 2
        panel.close()
    finally:
        dpg.destroy_context()


class CountingContext(FakeContext):
    """FakeContext with AppContext.frame_state(): (frames set so far, newest source)."""

    def __init__(self, bundle) -> None:
        super().__init__(bundle)
        self.seq, self.source = 0, ""

    def set_frame(self, frame, source="ui"):
        super().set_frame(frame, source)
        self.seq, self.source = self.seq + 1, source

    def frame_state(self):
        return self.seq, self.source


def test_panel_sliders_follow_frames_set_elsewhere(bundle):
    dpg = pytest.importorskip("dearpygui.dearpygui")
    from app.ui.puppet_panel import build

    dpg.create_context()
    try:
        ctx = CountingContext(bundle)
        with dpg.window() as win:
            pass
        panel = build(win, ctx)
        clock = FakeClock()
        panel._follower.clock = clock
        sp = panel.ctl.space
        jaw, smile = sp.index("jaw open"), sp.index("mouthSmile_L")
        f = bundle.avatar.neutral_frame()
        f.pose[0, 2, 0] = 0.2
        f.expr[0, EXPR_NAMES.index("mouthSmile_L")] = 0.7
        ctx.set_frame(f, "webcam")
        n = len(ctx.frames)
        ctx.callbacks[0](0.03)
        assert dpg.get_value(panel._sliders[jaw]) == pytest.approx(0.2)
        assert dpg.get_value(panel._sliders[smile]) == pytest.approx(0.7)
        assert len(ctx.frames) == n  # following shows nothing itself
        g = bundle.avatar.neutral_frame()
        g.pose[0, 2, 0] = 0.4
        ctx.set_frame(g, "webcam")
        ctx.callbacks[0](0.03)
        assert dpg.get_value(panel._sliders[jaw]) == pytest.approx(0.2)  # throttled
        clock.t += 0.3
        ctx.callbacks[0](0.03)
        assert dpg.get_value(panel._sliders[jaw]) == pytest.approx(0.4)  # a few updates a second
        # the user moves a slider: the next webcam frame does not take it back at once
        assert panel.set_slider("jaw open", 0.1)
        ctx.set_frame(f, "webcam")
        clock.t += 0.3
        ctx.callbacks[0](0.03)
        assert dpg.get_value(panel._sliders[jaw]) == pytest.approx(0.1)
        clock.t += 1.0
        ctx.callbacks[0](0.03)
        assert dpg.get_value(panel._sliders[jaw]) == pytest.approx(0.2)  # after the hold it follows again
        assert not panel.set_slider("no such slider", 1.0)
        panel.reset()
        ctx.callbacks[0](0.03)  # widgets re-sync once per UI frame
        assert ctx.frames[-1][1] == "puppet" and dpg.get_value(panel._sliders[jaw]) == pytest.approx(0.0)
        panel.close()
    finally:
        dpg.destroy_context()
