"""Face tracking: landmark rig, Levenberg-Marquardt fitting, One-Euro filter, MediaPipe landmarks.

References are independent of the code under test: the full HeadModel forward (landmarks),
autograd Jacobians, synthetic landmarks projected through a known camera with known
parameters, analytic filter behaviour, and MediaPipe detections on renders of the demo avatar.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_head

from hravatar.avatar.gaussians import FrameParams
from hravatar.render.camera import Camera, look_at
from hravatar.track.filters import OneEuroFilter
from hravatar.track.fit import (
    FACE_OVAL,
    LIPS,
    FitWeights,
    LandmarkFitter,
    LandmarkRig,
    estimate_camera,
    fit_expression_pose,
    project,
    webcam_intrinsics,
)


# small per-frame tensors: one thread is fastest, and avoids OpenMP stalls on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def builtin():
    from hravatar.head.builtin import load_builtin_head

    return load_builtin_head()


def _truth(head, B=2):
    """Known parameters inside the fitter's bounds (blinks through the eyelids, as the avatar)."""
    g = torch.Generator().manual_seed(3)
    expr = torch.zeros(B, head.num_expr)
    for name, val in (("mouthSmile_L", 0.7), ("browInnerUp", 0.6), ("mouthPucker", 0.5), ("cheekPuff", 0.4)):
        expr[torch.randint(0, B, (1,), generator=g), head.expr_names.index(name)] = val
    pose = torch.zeros(B, 5, 3)
    pose[:, 0] = torch.tensor([0.12, 0.35, -0.05]) * torch.linspace(1, -0.6, B)[:, None]
    pose[:, 2, 0] = torch.linspace(0.2, 0.05, B)
    pose[:, 3, :2] = torch.tensor([0.1, -0.15])
    pose[:, 4, :2] = torch.tensor([0.1, -0.15])
    eyelids = torch.rand(B, 2, generator=g) * 0.6
    transl = torch.tensor([0.01, -0.02, 0.03]) * torch.linspace(1, -1, B)[:, None]
    return FrameParams(expr, pose, eyelids, transl)


def _project(head, frame, cam):
    lmk = head(psi=frame.expr, pose=frame.pose, eyelids=frame.eyelids, transl=frame.transl).landmarks
    return project(lmk, cam.K, cam.viewmat[:3, :3], cam.viewmat[:3, 3])


# ------------------------------------------------------------------------------------ rig + Jacobian
def test_rig_equals_head_landmarks(builtin):
    tiny = tiny_head()
    for head in (tiny, builtin):
        g = torch.Generator().manual_seed(1)
        B = 3
        expr = torch.rand(B, head.num_expr, generator=g)
        pose = (torch.rand(B, 5, 3, generator=g) - 0.5) * 0.6
        lids = torch.rand(B, 2, generator=g)
        transl = torch.randn(B, 3, generator=g) * 0.02
        ref = head(psi=expr, pose=pose, eyelids=lids, transl=transl).landmarks
        got = torch.func.vmap(LandmarkRig(head).landmarks)(expr, pose, lids, transl)
        assert torch.allclose(got, ref, atol=1e-6), (got - ref).abs().max()


def test_analytic_jacobian_matches_finite_differences():
    head = tiny_head()  # non-zero pose correctives exercise that path too
    fitter = LandmarkFitter(head, fit_neck=True, expr_bounds=(-3, 3))
    head64 = tiny_head().double()
    g = torch.Generator().manual_seed(2)
    theta = (torch.rand(2, fitter.layout.P, generator=g) - 0.5) * 0.4
    base = torch.zeros(2, 5, 3)
    lmk, J = fitter.landmarks(theta, base, jacobian=True)

    def f(th):  # independent path: unpack to FrameParams, evaluate the full head in float64
        fr = fitter.to_frame(th.float()[None], base[:1])
        d = lambda t: t.double()  # noqa: E731
        return head64(psi=d(fr.expr), pose=d(fr.pose), eyelids=d(fr.eyelids), transl=d(fr.transl)).landmarks[0]

    h = 1e-4
    for b in range(2):
        assert torch.allclose(lmk[b].double(), f(theta[b]), atol=1e-6)
        cols = []
        for p in range(fitter.layout.P):
            e = torch.zeros(fitter.layout.P)
            e[p] = h
            cols.append((f(theta[b] + e) - f(theta[b] - e)) / (2 * h))
        ref = torch.stack(cols, -1)  # [478,3,P]
        assert torch.allclose(J[b].double(), ref, atol=1e-4, rtol=1e-3), (J[b] - ref).abs().max()


# ------------------------------------------------------------------------------------ fitting
def test_fit_recovers_known_parameters(builtin):
    cam = estimate_camera(640, 480)
    truth = _truth(builtin)
    uv = _project(builtin, truth, cam)
    weak = FitWeights(expr=1e-3, jaw=1e-4, eyes=1e-4, eyelids=1e-4)
    res = LandmarkFitter(builtin, weights=weak).fit(uv, cam, iters=20)
    fr = res.frame
    assert float(res.error_px.max()) < 0.1  # pixels, face ~130 px wide
    assert float((fr.pose[:, 0] - truth.pose[:, 0]).norm(dim=-1).max()) < 5e-3
    assert float((fr.pose[:, 2, 0] - truth.pose[:, 2, 0]).abs().max()) < 5e-3
    assert float((fr.transl - truth.transl).norm(dim=-1).max()) < 1e-3  # metres
    assert float((fr.eyelids - truth.eyelids).abs().max()) < 0.05
    assert float((fr.pose[:, 3:, :2] - truth.pose[:, 3:, :2]).abs().max()) < 0.03
    assert float((fr.expr - truth.expr).abs().max()) < 0.1
    # the one-shot helper with bare intrinsics (default camera placement) gives the same fit quality
    fr2 = fit_expression_pose(builtin, uv, cam.K, weights=weak, iters=20)
    assert torch.allclose(fr2.pose[:, 2], truth.pose[:, 2], atol=5e-3)


def test_warm_start_tracks_a_sequence(builtin):
    cam = estimate_camera(480, 640)  # portrait
    fitter = LandmarkFitter(builtin)
    T = 5
    t = torch.linspace(0, 1, T)
    expr = torch.zeros(T, builtin.num_expr)
    expr[:, builtin.expr_names.index("mouthSmile_R")] = 0.5 * t
    pose = torch.zeros(T, 5, 3)
    pose[:, 0, 1] = 0.3 * torch.sin(3 * t)
    pose[:, 2, 0] = 0.15 * t
    seq = FrameParams(expr, pose, torch.zeros(T, 2), torch.zeros(T, 3))
    uv = _project(builtin, seq, cam)
    prev = fitter.fit(uv[:1], cam).frame
    errs = []
    for i in range(1, T):
        res = fitter.fit(uv[i : i + 1], cam, init=prev, iters=3)
        prev = res.frame
        errs.append(float(res.error_rel))
        assert abs(float(prev.pose[0, 0, 1] - pose[i, 0, 1])) < 0.02
    assert max(errs) < 0.005  # < 0.5% of the face size with 3 iterations per frame
    assert abs(float(prev.pose[0, 2, 0]) - 0.15) < 0.03


def test_noise_and_outliers_stay_finite_and_bounded(builtin):
    cam = estimate_camera(640, 480)
    truth = _truth(builtin, B=2)
    uv = _project(builtin, truth, cam)
    face = float((uv[0].amax(0) - uv[0].amin(0)).prod().sqrt())
    g = torch.Generator().manual_seed(0)
    fitter = LandmarkFitter(builtin)
    # 1% of the face size of detector jitter: pose still close
    noisy = uv + torch.randn(uv.shape, generator=g) * 0.01 * face
    fr = fitter.fit(noisy, cam).frame
    assert float((fr.pose[:, 0] - truth.pose[:, 0]).norm(dim=-1).max()) < 0.05
    # garbage: 30% noise plus 50 landmarks thrown across the image
    bad = uv + torch.randn(uv.shape, generator=g) * 0.3 * face
    bad[:, :50] = torch.rand(2, 50, 2, generator=g) * 640
    res = fitter.fit(bad, cam)
    fr = res.frame
    for t in (fr.expr, fr.pose, fr.eyelids, fr.transl, res.error_px):
        assert torch.isfinite(t).all()
    assert float(fr.expr.min()) >= 0.0 and float(fr.expr.max()) <= 1.0  # ARKit bounds
    assert float(fr.pose[:, 2, 0].max()) <= 0.6 + 1e-6
    assert float(fr.pose[:, 3:].abs().max()) <= 0.6 + 1e-6


def test_identity_fit_recovers_shape(builtin):
    cam = estimate_camera(640, 480)
    g = torch.Generator().manual_seed(0)
    beta = torch.randn(builtin.num_shape, generator=g) * 1.5
    T = 5
    expr = torch.zeros(T, builtin.num_expr)
    expr[torch.arange(T), torch.randint(0, builtin.num_expr, (T,), generator=g)] = 0.5
    pose = torch.zeros(T, 5, 3)
    pose[:, 0, 1] = torch.linspace(-0.5, 0.5, T)  # head turns make the face's depth observable
    pose[:, 0, 0] = torch.linspace(0.2, -0.2, T)
    lmk = builtin(beta=beta.expand(T, -1), psi=expr, pose=pose).landmarks
    uv = project(lmk, cam.K, cam.viewmat[:3, :3], cam.viewmat[:3, 3])
    fitter = LandmarkFitter(builtin)
    before = fitter.fit(uv, cam, iters=15).error_px.mean()
    after = fitter.fit_identity(uv, cam).error_px.mean()
    assert after < 0.3 * before
    rest = lambda b: builtin.landmarks(builtin.shaped_template(b[None]))[0]  # noqa: E731
    err_fit = (rest(fitter.beta) - rest(beta)).norm(dim=-1).mean()
    err_template = (builtin.landmarks(builtin.v_template[None])[0] - rest(beta)).norm(dim=-1).mean()
    assert err_fit < 0.5 * err_template  # the identity's landmark geometry moved most of the way


def test_temporal_term_pulls_towards_previous(builtin):
    cam = estimate_camera(640, 480)
    truth = _truth(builtin, B=1)
    uv = _project(builtin, truth, cam)
    neutral = FrameParams(torch.zeros(1, builtin.num_expr), torch.zeros(1, 5, 3), torch.zeros(1, 2), truth.transl.clone())
    free = LandmarkFitter(builtin).fit(uv, cam, init=neutral, iters=8).frame
    held = LandmarkFitter(builtin, weights=FitWeights(temporal=50.0)).fit(uv, cam, init=neutral, iters=8).frame
    d_free = float((free.pose[0, 0] - neutral.pose[0, 0]).norm())
    d_held = float((held.pose[0, 0] - neutral.pose[0, 0]).norm())
    assert d_held < 0.5 * d_free


def test_camera_helpers():
    K = webcam_intrinsics(640, 480, fov_deg=40.0)
    assert math.isclose(2 * math.degrees(math.atan(240 / float(K[1, 1]))), 40.0, rel_tol=1e-5)
    assert float(K[0, 2]) == 320 and float(K[1, 2]) == 240
    cam = estimate_camera(640, 480, distance=0.5)
    assert torch.allclose(cam.position, torch.tensor([0.0, 0.0, 0.5]), atol=1e-6)
    # a point at the origin lands on the principal point
    uv = project(torch.zeros(1, 3), cam.K, cam.viewmat[:3, :3], cam.viewmat[:3, 3])
    assert torch.allclose(uv, torch.tensor([[320.0, 240.0]]), atol=1e-4)
    assert isinstance(cam, Camera) and torch.allclose(cam.viewmat, look_at([0, 0, 0.5], [0, 0, 0]))


# ------------------------------------------------------------------------------------ One-Euro filter
def test_one_euro_constant_and_step():
    f = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    x = np.array([0.3, -2.0])
    for i in range(20):
        y = f(x, i / 30)
    assert np.allclose(y, x)  # a constant passes unchanged
    f = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    f(0.0, 0.0)
    dt = 1 / 30
    ys = [f(1.0, (i + 1) * dt) for i in range(150)]
    # beta = 0: a first-order low-pass; after one step, alpha = 1 / (1 + tau / dt)
    tau = 1 / (2 * math.pi)
    assert math.isclose(ys[0], 1 / (1 + tau / dt), rel_tol=1e-9)
    assert all(b >= a for a, b in zip(ys, ys[1:])) and abs(ys[-1] - 1.0) < 1e-6  # monotone convergence
    import torch as _t  # also works on tensors

    g = OneEuroFilter()
    g(_t.zeros(3), 0.0)
    assert isinstance(g(_t.ones(3), 0.1), _t.Tensor)


def test_one_euro_beta_reduces_lag_and_cutoff_reduces_jitter():
    dt = 1 / 60
    ts = np.arange(240) * dt

    def lag(beta):
        f = OneEuroFilter(min_cutoff=0.5, beta=beta)
        out = [f(2.0 * t, t) for t in ts]
        return 2.0 * ts[-1] - out[-1]  # steady-state lag on a ramp of 2 units/s

    assert lag(1.0) < 0.5 * lag(0.0)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (len(ts), 4))

    def jitter(min_cutoff):
        f = OneEuroFilter(min_cutoff=min_cutoff, beta=0.0)
        out = np.stack([f(n, t) for n, t in zip(noise, ts)])
        return out[60:].std()

    assert jitter(0.3) < 0.5 * jitter(3.0) < 0.5 * noise.std()


# ------------------------------------------------------------------------------------ MediaPipe
@pytest.fixture(scope="module")
def renders():
    """Renders (256 px) of the untrained built-in-head avatar with known expression/jaw, and the
    camera they were made with. Untrained, the avatar moves exactly as the head model does, so
    what the fitter recovers can be held to the values rendered (a trained avatar's expression
    space is only close to the head model's; tests/test_app_webcam.py drives the demo avatar)."""
    from hravatar.api import AvatarRenderer, default_camera, parse_expression_args, resolve_environment, untrained_avatar

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test thread setting
    b = untrained_avatar()
    cam = default_camera(b, 256)
    env, _ = resolve_environment(None, b)
    r = AvatarRenderer(b.avatar)
    out = {}
    for key, exprs, jaw in (("neutral", [], 0.0), ("open", [], 0.25), ("smile", ["mouthSmile_L=0.8", "mouthSmile_R=0.8"], 0.0)):
        img = r.render(cam, parse_expression_args(b.avatar, exprs, jaw=jaw), env).image
        out[key] = (img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    torch.set_num_threads(n)
    return out, cam


def test_landmark_indices_match_mediapipe():
    mp = pytest.importorskip("mediapipe")
    fm = mp.solutions.face_mesh
    assert set(FACE_OVAL) == {i for e in fm.FACEMESH_FACE_OVAL for i in e}
    assert set(LIPS) == {i for e in fm.FACEMESH_LIPS for i in e}


def test_face_mesh_on_avatar_renders_and_fit(renders, builtin):
    pytest.importorskip("mediapipe")
    from hravatar.track.landmarks import FaceLandmarker

    imgs, cam = renders
    with FaceLandmarker(video=False) as lm:
        assert lm.detect(np.full((128, 128, 3), 255, np.uint8)) is None  # no face
        dets = {k: lm.detect(v) for k, v in imgs.items()}
        # two faces side by side: the larger one is reported, and the count
        small = imgs["smile"][::2, ::2]
        pair = np.full((256, 384, 3), 255, np.uint8)
        pair[:, :256] = imgs["neutral"]
        pair[64:192, 256:384] = small
        two = lm.detect(pair)
    for k, d in dets.items():
        assert d is not None and d.landmarks.shape == (478, 3) and d.num_faces == 1, k
        assert 100 < d.size < 200  # the head fills ~60% of the 256 px render
    assert two is not None and two.num_faces == 2 and two.box[2] < 256
    # mouth opening seen by MediaPipe: lower lip (17) moves down by ~17 px at jaw 0.25 rad
    assert dets["open"].landmarks[17, 1] - dets["neutral"].landmarks[17, 1] > 10
    fitter = LandmarkFitter(builtin)
    tg = torch.from_numpy(np.stack([dets[k].landmarks[:, :2] for k in ("neutral", "open", "smile")]))
    res = fitter.fit(tg, cam)
    assert float(res.error_rel.max()) < 0.02  # < 2% of the face size
    jaw = res.frame.pose[:, 2, 0]
    assert float(jaw[1] - jaw[0]) > 0.03  # the open mouth is explained (partly) by the jaw
    smile = res.frame.expr[:, builtin.expr_names.index("mouthSmile_L")] + res.frame.expr[:, builtin.expr_names.index("mouthSmile_R")]
    assert float(smile[2] - smile[0]) > 0.2


def test_tasks_landmarker_blendshapes(renders):
    pytest.importorskip("mediapipe")
    from conftest import SHARED

    from hravatar.track.landmarks import FaceLandmarker

    path = SHARED / "data" / "models" / "face_landmarker.task"
    if not path.is_file():
        pytest.skip("no face_landmarker.task in ../shared/data/models")
    imgs, _ = renders
    with FaceLandmarker(path, video=True) as lm:
        d0 = lm.detect(imgs["neutral"], 0)
        d1 = lm.detect(imgs["open"], 0)  # repeated timestamp: made increasing internally
    assert d0 is not None and d1 is not None and d1.landmarks.shape == (478, 3)
    # the head model's jaw 0.25 rad reads as jawOpen ~0.14 (neutral ~0.01)
    assert d1.blendshapes["jawOpen"] > d0.blendshapes["jawOpen"] + 0.1
    with pytest.raises(FileNotFoundError):
        FaceLandmarker(path.with_name("missing.task"))


@pytest.mark.gpu
def test_fit_on_cuda_matches_cpu(builtin):
    cam = estimate_camera(640, 480)
    truth = _truth(builtin)
    uv = _project(builtin, truth, cam)
    cpu = LandmarkFitter(builtin).fit(uv, cam)
    import copy

    gpu = LandmarkFitter(copy.deepcopy(builtin).to("cuda")).fit(uv.cuda(), cam.to("cuda"))
    assert gpu.frame.pose.device.type == "cuda"
    assert torch.allclose(gpu.frame.pose.cpu(), cpu.frame.pose, atol=2e-3)
    assert torch.allclose(gpu.error_px.cpu(), cpu.error_px, atol=0.05)
