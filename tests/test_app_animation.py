"""Keyframe timeline: interpolation (scalar PCHIP, rotations on SO(3)), playback, JSON, MP4 export."""
import json
import math

import numpy as np
import pytest
from scipy.interpolate import PchipInterpolator
from scipy.spatial.transform import Rotation, Slerp

from app.animation import (Mp4Exporter, Timeline, export_mp4, quat_from_rotvec, rotvec_from_quat, slerp)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def scalar_timeline(times, values, clock=None) -> Timeline:
    vals = np.asarray(values, float).reshape(len(times), -1)
    tl = Timeline([f"p{i}" for i in range(vals.shape[1])], clock=clock or FakeClock())
    for t, v in zip(times, vals):
        tl.add_key(t, v)
    return tl


def rot_timeline(times, rotvecs) -> Timeline:
    tl = Timeline(["a", "rx", "ry", "rz"], rotation_groups=[(1, 2, 3)], clock=FakeClock())
    for t, r in zip(times, rotvecs):
        tl.add_key(t, [0.0, *r])
    return tl


# ----------------------------------------------------------------------------- scalar channels
def test_scalar_matches_scipy_pchip_and_hits_keys():
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.uniform(0.2, 1.5, 7))
    vals = rng.normal(size=(7, 3))
    tl = scalar_timeline(times, vals)
    ref = PchipInterpolator(times, vals, axis=0)  # independent implementation of the same scheme
    ts = np.linspace(times[0], times[-1], 301)
    np.testing.assert_allclose(tl.sample(ts), ref(ts), atol=1e-10)
    for t, v in zip(times, vals):
        np.testing.assert_array_equal(tl.evaluate(t), v)
        np.testing.assert_allclose(tl.evaluate(t + 1e-9), v, atol=1e-7)


def test_scalar_c1_across_keys():
    times = np.array([0.0, 0.7, 1.1, 2.5, 3.0])
    vals = np.array([0.0, 0.4, 0.9, 0.2, 0.5])  # includes an extremum and a monotone run
    tl = scalar_timeline(times, vals)
    f = lambda t: tl.evaluate(t)[0]  # noqa: E731
    e = 1e-6
    for t in times[1:-1]:
        left, right = (f(t) - f(t - e)) / e, (f(t + e) - f(t)) / e
        assert abs(left - right) < 1e-4, (t, left, right)
    # inside an interval the second difference is O(e^2): smooth
    t = 1.7
    assert abs(f(t + e) - 2 * f(t) + f(t - e)) < 1e-9


def test_linear_ramp_reproduced_with_uneven_keys():
    times = np.array([0.0, 0.3, 1.4, 1.5, 4.0])
    slope, icpt = np.array([0.7, -1.2]), np.array([0.1, 0.5])
    tl = scalar_timeline(times, times[:, None] * slope + icpt)
    ts = np.linspace(0, 4, 97)
    np.testing.assert_allclose(tl.sample(ts), ts[:, None] * slope + icpt, atol=1e-12)


def test_no_overshoot_and_clamped_ends():
    tl = scalar_timeline([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 1.0, 0.0])
    ts = np.linspace(-1, 4, 501)
    v = tl.sample(ts)[:, 0]
    assert v.min() >= 0.0 and v.max() <= 1.0  # blendshape weights stay in range
    np.testing.assert_allclose(v[ts <= 1e-12 + 0], 0.0)  # before the first key: first key
    np.testing.assert_allclose(v[ts >= 3.0], 0.0)
    np.testing.assert_allclose(v[(ts >= 1.0) & (ts <= 2.0)], 1.0)  # flat between equal keys


def test_zero_and_one_key():
    tl = Timeline(["a", "b"], defaults=np.array([0.2, 0.3]), clock=FakeClock())
    np.testing.assert_array_equal(tl.evaluate(1.0), [0.2, 0.3])
    tl.add_key(2.0, [1.0, 2.0])
    np.testing.assert_array_equal(tl.evaluate(0.0), [1.0, 2.0])
    np.testing.assert_array_equal(tl.evaluate(9.0), [1.0, 2.0])


# ----------------------------------------------------------------------------- rotations
def test_quaternion_helpers_against_scipy():
    rng = np.random.default_rng(3)
    for r in list(rng.normal(size=(5, 3))) + [np.zeros(3), np.array([1e-14, 0, 0])]:
        q = quat_from_rotvec(r)
        xyzw = Rotation.from_rotvec(r).as_quat()
        assert abs(abs(np.dot(q, [xyzw[3], *xyzw[:3]])) - 1) < 1e-12
        np.testing.assert_allclose(Rotation.from_rotvec(rotvec_from_quat(q)).as_matrix(), Rotation.from_rotvec(r).as_matrix(), atol=1e-12)


def test_slerp_unit_constant_speed_shortest():
    a, b = quat_from_rotvec(np.array([0.3, -0.2, 0.1])), quat_from_rotvec(np.array([-0.5, 0.9, 0.4]))
    theta = math.acos(abs(np.dot(a, b)))
    for u in np.linspace(0, 1, 11):
        q = slerp(a, b, u)
        assert abs(np.linalg.norm(q) - 1) < 1e-12
        assert abs(math.acos(min(1.0, abs(np.dot(a, q)))) - u * theta) < 1e-9
    np.testing.assert_allclose(slerp(a, -b, 1.0), b, atol=1e-12)  # -b is the same rotation: short way, no detour
    np.testing.assert_allclose(slerp(a, -b, 0.5), slerp(a, b, 0.5), atol=1e-12)


def test_rotation_two_keys_is_slerp():
    r0, r1 = np.array([0.2, 0.5, -0.1]), np.array([-0.4, 0.1, 0.3])
    tl = rot_timeline([1.0, 3.0], [r0, r1])
    ref = Slerp([1.0, 3.0], Rotation.from_rotvec([r0, r1]))
    for t in np.linspace(1, 3, 9):
        got = Rotation.from_rotvec(tl.evaluate(t)[1:])
        assert (got.inv() * ref(t)).magnitude() < 1e-9


def test_rotation_about_one_axis_equals_scalar_pchip():
    axis = np.array([2.0, -1.0, 0.5]) / np.linalg.norm([2.0, -1.0, 0.5])
    times = np.array([0.0, 0.5, 1.7, 2.0, 3.5])
    ang = np.array([0.0, 0.4, 0.4, -0.3, 0.6])
    tl = rot_timeline(times, ang[:, None] * axis)
    ref = PchipInterpolator(times, ang)
    for t in np.linspace(0, 3.5, 71):
        np.testing.assert_allclose(tl.evaluate(t)[1:], ref(t) * axis, atol=1e-9)
    # constant angular velocity (collinear angles) at uneven times: reproduced exactly
    times = np.array([0.0, 0.2, 1.0, 1.1, 2.0])
    tl = rot_timeline(times, (0.5 * times - 0.3)[:, None] * axis)
    for t in np.linspace(0, 2, 41):
        np.testing.assert_allclose(tl.evaluate(t)[1:], (0.5 * t - 0.3) * axis, atol=1e-9)


def test_rotation_general_hits_keys_and_is_c1():
    times = np.array([0.0, 0.6, 1.5, 2.1, 3.0])
    # a head turning on while nodding and tilting (the body-frame velocity keeps its direction)
    rv = np.array([[0.0, 0.0, 0.0], [0.1, 0.25, 0.05], [0.2, 0.5, 0.12], [0.35, 0.6, 0.2], [0.4, 0.9, 0.3]])
    tl = rot_timeline(times, rv)
    for t, r in zip(times, rv):
        np.testing.assert_allclose(tl.evaluate(t)[1:], r, atol=1e-12)
        assert (Rotation.from_rotvec(tl.evaluate(t + 1e-9)[1:]).inv() * Rotation.from_rotvec(r)).magnitude() < 1e-6
    R = lambda t: Rotation.from_rotvec(tl.evaluate(t)[1:])  # noqa: E731
    e = 1e-5
    for t in times[1:-1]:
        w_left = (R(t - e).inv() * R(t)).as_rotvec() / e  # body-frame angular velocity
        w_right = (R(t).inv() * R(t + e)).as_rotvec() / e
        np.testing.assert_allclose(w_left, w_right, atol=2e-3)
        assert np.linalg.norm(w_left) > 1e-2  # a real check, not two zeros
    # the scalar channel in the same timeline is untouched by the rotation group
    np.testing.assert_allclose(tl.sample(np.linspace(0, 3, 7))[:, 0], 0.0)
    # random keys (the limiter may stop at keys) still give a C1 unit-rotation curve through them
    rv = np.random.default_rng(4).normal(scale=0.5, size=(5, 3))
    tl = rot_timeline(times, rv)
    for t, r in zip(times, rv):
        np.testing.assert_allclose(tl.evaluate(t)[1:], r, atol=1e-12)
    for t in times[1:-1]:
        w_left = (R(t - e).inv() * R(t)).as_rotvec() / e
        w_right = (R(t).inv() * R(t + e)).as_rotvec() / e
        np.testing.assert_allclose(w_left, w_right, atol=2e-3)


# ----------------------------------------------------------------------------- editing, playback
def test_add_replace_remove_move():
    tl = scalar_timeline([0.0, 2.0], [[0.0], [1.0]])
    assert tl.add_key(1.0, [5.0]) == 1 and tl.times == [0.0, 1.0, 2.0]
    assert tl.add_key(1.00001, [6.0]) == 1 and len(tl) == 3  # replaces the key at the same time
    np.testing.assert_array_equal(tl.evaluate(1.0), [6.0])
    assert tl.move_key(1, 3.0) == 2 and tl.times == [0.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="already exists"):
        tl.move_key(0, 2.0)
    tl.remove_key(0)
    assert tl.times == [2.0, 3.0] and tl.bounds() == (2.0, 3.0)
    with pytest.raises(ValueError):
        tl.add_key(0.5, [1.0, 2.0])
    with pytest.raises(ValueError):
        tl.add_key(float("nan"), [1.0])


def test_playback_with_fake_clock():
    clock = FakeClock()
    tl = scalar_timeline([1.0, 3.0], [[0.0], [2.0]], clock)  # linear: value = t - 1
    tl.seek(0.0)
    assert tl.now() == 1.0  # clamped to the first key
    tl.play()
    clock.t += 0.5
    assert tl.now() == pytest.approx(1.5) and tl.current_values()[0] == pytest.approx(0.5)
    clock.t += 2.0  # 1 + 2.5 -> wraps into [1, 3) when looping
    assert tl.now() == pytest.approx(1.5)
    tl.pause()
    clock.t += 10
    assert tl.now() == pytest.approx(1.5) and not tl.playing
    tl.loop = False
    tl.play()
    clock.t += 5
    assert tl.now() == 3.0 and not tl.playing  # stops at the end
    tl.play()  # from the end: restarts at the beginning
    assert tl.now() == 1.0 and tl.playing
    tl.stop()
    assert tl.now() == 1.0 and not tl.playing


# ----------------------------------------------------------------------------- JSON
def test_json_round_trip(tmp_path):
    tl = rot_timeline([0.0, 0.8, 2.0], np.random.default_rng(5).normal(scale=0.3, size=(3, 3)))
    path = tl.save_json(tmp_path / "anim.json")
    back = Timeline(tl.names, rotation_groups=tl.rotation_groups)
    assert back.load_json(path) == []
    assert back.times == tl.times
    for a, b in zip(back.keys, tl.keys):
        np.testing.assert_array_equal(a.values, b.values)  # JSON floats round-trip exactly
    np.testing.assert_array_equal(back.sample([0.3, 1.5]), tl.sample([0.3, 1.5]))


def test_json_matches_by_name(tmp_path):
    src = Timeline(["jaw open", "smile", "old_shape"], clock=FakeClock())
    src.add_key(0.0, [0.1, 0.2, 0.3])
    src.add_key(1.0, [0.4, 0.5, 0.6])
    p = src.save_json(tmp_path / "a.json")
    dst = Timeline(["smile", "blink", "jaw open"], defaults=np.array([0.0, 0.05, 0.0]))
    warnings = dst.load_json(p)
    assert len(warnings) == 2 and "old_shape" in warnings[0] and "a.json" in warnings[0]
    assert "1 parameter" in warnings[1]
    np.testing.assert_array_equal(dst.keys[1].values, [0.5, 0.05, 0.4])


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"format": "other", "version": 1, "names": [], "keys": []}', "not a hravatar animation"),
    ('{"format": "hravatar-animation", "version": 99, "names": [], "keys": []}', "newer"),
    ('{"format": "hravatar-animation", "version": 1, "names": ["a"], "keys": {}}', "'keys' must be a list"),
    ('{"format": "hravatar-animation", "version": 1, "names": ["a", "b"], "keys": [{"time": 0, "values": [1]}]}', "key 0"),
    ('{"format": "hravatar-animation", "version": 1, "names": ["a"], "keys": [{"time": "x", "values": [1]}]}', "'time'"),
    ('{"format": "hravatar-animation", "version": 1, "names": ["a"], "keys": [{"time": 0, "values": [1]}, {"time": 0, "values": [2]}]}',
     "two keys"),
])
def test_malformed_json_one_line_error(tmp_path, text, problem):
    p = tmp_path / "bad.json"
    p.write_text(text)
    tl = Timeline(["a"])
    tl.add_key(0.0, [0.0])
    tl.add_key(1.0, [1.0])
    with pytest.raises(ValueError) as e:
        tl.load_json(p)
    msg = str(e.value)
    assert str(p) in msg and problem in msg and "\n" not in msg
    assert tl.times == [0.0, 1.0]  # unchanged


def test_missing_file_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        Timeline(["a"]).load_json(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- MP4
def gradient_renderer(calls):
    def render(frame, res):
        calls.append(float(frame))
        x = np.linspace(0, 255, res)
        img = np.zeros((res, res, 3), np.uint8)
        img[..., 0] = x[None, :]
        img[..., 1] = x[:, None]
        img[..., 2] = int(np.clip(frame * 255, 0, 255))
        return img
    return render


def test_export_mp4_frame_count(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    tl = Timeline(["v"], to_frame=lambda v: float(v[0]))
    tl.add_key(0.5, [0.0])
    tl.add_key(1.5, [1.0])
    calls, progress = [], []
    out = export_mp4(tl, gradient_renderer(calls), tmp_path / "anim.mp4", fps=10, res=32,
                     progress_cb=lambda d, n: progress.append((d, n)))
    assert out == tmp_path / "anim.mp4" and out.exists()
    assert len(calls) == 11 and calls[0] == 0.0 and calls[-1] == 1.0  # both ends rendered
    assert progress[-1] == (11, 11) and len(progress) == 11
    frames = np.stack(list(iio.imiter(out)))
    assert frames.shape[0] == 11 and frames.shape[1:3] == (32, 32)
    # content survives encoding: red ramps left to right, blue follows the animation
    assert frames[0, :, -4:, 0].mean() > frames[0, :, :4, 0].mean() + 150
    assert frames[-1, ..., 2].mean() > frames[0, ..., 2].mean() + 150
    assert not list(tmp_path.glob(".*tmp*"))  # temporary file renamed away


def test_export_odd_size_cancel_and_errors(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    tl = Timeline(["v"], to_frame=lambda v: float(v[0]))
    tl.add_key(0.0, [0.0])
    tl.add_key(0.2, [1.0])
    out = export_mp4(tl, gradient_renderer([]), tmp_path / "odd.mp4", fps=10, res=15)
    assert len(list(iio.imiter(out))) == 3
    ex = Mp4Exporter(tl, gradient_renderer([]), tmp_path / "c.mp4", fps=10, res=16)
    assert ex.step() and ex.done == 1
    ex.cancel()
    assert not (tmp_path / "c.mp4").exists() and not list(tmp_path.glob(".c*"))
    with pytest.raises(ValueError, match="does not exist"):
        Mp4Exporter(tl, gradient_renderer([]), tmp_path / "missing" / "x.mp4")
    with pytest.raises(ValueError, match="no keyframes"):
        Mp4Exporter(Timeline(["v"], to_frame=float), gradient_renderer([]), tmp_path / "x.mp4")

    def broken(frame, res):
        raise RuntimeError("render failed")
    with pytest.raises(RuntimeError):
        export_mp4(tl, broken, tmp_path / "b.mp4", fps=10, res=16)
    assert not list(tmp_path.glob("*b.*"))


def test_json_file_is_plain(tmp_path):
    tl = scalar_timeline([0.0], [[0.25]])
    d = json.loads(tl.save_json(tmp_path / "x.json").read_text())
    assert d == {"format": "hravatar-animation", "version": 1, "names": ["p0"], "keys": [{"time": 0.0, "values": [0.25]}]}
