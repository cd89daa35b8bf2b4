"""``hravatar preprocess``: video -> dataset (landmarks, crop, matting, tracking, QC), error
messages for bad input, resuming after an interruption.

The end-to-end tests use a tiny synthetic video: the demo avatar rendered over a dark background
with a little head motion and jaw opening (MediaPipe detects faces on such renders). The pure
helpers (gap handling, crops, intrinsics, metadata) are tested without MediaPipe.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from hravatar.data.format import DatasetMeta, partial_path, validate_dataset
from hravatar.data.preprocess import (
    PreprocessConfig,
    PreprocessError,
    crop_frame,
    crop_intrinsics,
    plan_frames,
    segments_of,
)
from hravatar.encoder.crop import points_to_crop

FAST = dict(res=128, fit_frames=8, identity_rounds=3, chains=4, threads=1)


def _write_video(path, frames, fps=24):
    import imageio_ffmpeg

    h, w = frames[0].shape[:2]
    gen = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", quality=8, macro_block_size=2,
                                      ffmpeg_log_level="error")
    gen.send(None)
    for f in frames:
        gen.send(np.ascontiguousarray(f))
    gen.close()


@pytest.fixture(scope="module")
def rendered_frames():
    """12 frames (192 px) of the demo avatar turning its head and opening the jaw, dark background."""
    pytest.importorskip("mediapipe")
    from hravatar.api import AvatarRenderer, default_camera, open_avatar, resolve_environment
    from hravatar.render.pipeline import RenderSettings

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    b = open_avatar(None)
    cam = default_camera(b, 192)
    env, tm = resolve_environment(None, b)
    r = AvatarRenderer(b.avatar)
    settings = RenderSettings(background=(0.06, 0.06, 0.08), tonemap=tm)
    frames = []
    for i in range(12):
        t = i / 11
        f = b.avatar.neutral_frame()
        f.pose[0, 0, 1] = 0.25 * math.sin(2 * math.pi * t)  # yaw
        f.pose[0, 0, 0] = 0.08 * math.cos(2 * math.pi * t)  # pitch
        f.pose[0, 2, 0] = 0.2 * max(0.0, math.sin(math.pi * t))  # jaw
        img = r.render(cam, f, env, settings).image
        frames.append((img.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8))
    torch.set_num_threads(n)
    return frames


@pytest.fixture(scope="module")
def face_video(rendered_frames, tmp_path_factory):
    """The rendered frames as a 24 fps H.264 MP4."""
    path = tmp_path_factory.mktemp("video") / "avatar.mp4"
    _write_video(path, rendered_frames)
    return path


@pytest.fixture(scope="module")
def dataset(face_video, tmp_path_factory):
    from hravatar.data.preprocess import preprocess_video

    out = tmp_path_factory.mktemp("ds") / "avatar_ds"
    stages = set()
    report = preprocess_video(face_video, out, PreprocessConfig(**FAST), progress=lambda s, d, t: stages.add(s))
    return out, report, stages


# ------------------------------------------------------------------------------------ end to end
def test_preprocess_synthetic_video(dataset):
    out, rep, stages = dataset
    meta = validate_dataset(out)
    assert meta.width == meta.height == 128 and meta.num_frames == 12 and meta.test_frames == 2
    assert meta.head_spec == "builtin" and meta.fps == pytest.approx(24.0)
    assert {"detect", "track", "write"} <= stages
    assert not partial_path(out).exists() and not (out / ".work").exists()  # finished: no leftovers
    assert (out / "QC.mp4").stat().st_size > 1000
    saved = json.loads((out / "qc.json").read_text())
    assert saved["tracking"]["mean_error_rel"] == pytest.approx(rep["tracking"]["mean_error_rel"])
    tr = rep["tracking"]
    assert tr["max_error_rel"] < 0.02, tr  # landmark reprojection error < 2% of the face size
    assert len(tr["per_frame"]) == 12 and rep["faces"]["max_seen"] == 1 and rep["dropped"] == []
    for step in ("decode", "detect", "camera", "identity", "track_chains", "track_smooth", "crop", "matte", "write", "qc"):
        assert rep["timings"][step]["frames"] > 0 and rep["timings"][step]["cached"] is False, step
    import imageio.v3 as iio

    masks = np.stack([iio.imread(out / "masks" / f"{i:06d}.png") for i in range(12)]).astype(np.float32) / 255
    assert 0.1 < masks.mean() < 0.8  # the head, not nothing and not everything
    assert (masks.reshape(12, -1).mean(1) > 0.1).all()
    frame = iio.imread(out / "frames" / "000000.png").astype(np.float32) / 255
    assert frame[masks[0] < 0.01].max() < 0.02  # background black


def test_dataset_loads_and_trains(dataset, tmp_path):
    from hravatar.avatar.config import AvatarConfig
    from hravatar.data import HeadVideoDataset
    from hravatar.train.config import DensifySettings, TrainConfig
    from hravatar.train.trainer import Trainer

    out, _, _ = dataset
    ds = HeadVideoDataset(out, "train", resolution=64)
    assert len(ds) == 10
    s = ds[3]
    assert s.image.shape == (64, 64, 3) and s.landmarks is not None and s.landmarks.shape == (478, 2)
    # the stored landmarks lie on the face of the stored frame (inside the mask)
    xy = s.landmarks.round().long().clamp(0, 63)
    assert float(s.mask[xy[:, 1], xy[:, 0], 0].mean()) > 0.9
    # the stored camera and parameters reproduce the landmarks through the head model
    from hravatar.head import load_head_model
    from hravatar.track.fit import project

    head = load_head_model("builtin")
    p = s.params
    lmk = head(beta=ds.beta[None], psi=p.expr, pose=p.pose, eyelids=p.eyelids, transl=p.transl).landmarks[0]
    uv = project(lmk, s.camera.K, s.camera.viewmat[:3, :3], s.camera.viewmat[:3, 3])
    size = float((s.landmarks.amax(0) - s.landmarks.amin(0)).prod().sqrt())
    assert float((uv - s.landmarks).norm(dim=-1).mean()) < 0.02 * size
    cfg = TrainConfig(profile="test", resolution=64, iterations=5, albedo_warmup=2, encoder=False, checkpoint_every=5,
                      eval_every=1000, eval_frames=1, preview_every=1000, log_every=5,
                      avatar=AvatarConfig(num_gaussians=2000, init_mode="surface"), densify=DensifySettings(start=1000))
    tr = Trainer(out, tmp_path / "run", cfg, device="cpu")
    path = tr.run()
    assert path is not None and path.exists() and tr.iteration == 5


def test_resume_after_interruption(face_video, tmp_path, monkeypatch):
    pytest.importorskip("mediapipe")
    from hravatar.data import preprocess as pp

    out = tmp_path / "ds"
    real = {k: getattr(pp, k) for k in ("refine_mask", "detect_landmarks", "track_frames")}
    calls: dict[str, int] = {}

    def counting(name, fail_at=None):
        def fn(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == fail_at:
                raise RuntimeError("simulated crash")
            return real[name](*a, **k)
        return fn

    def must_not_run(*a, **k):
        raise AssertionError("a finished step ran again")

    cfg = PreprocessConfig(**FAST)
    # 1. the write step dies at its 5th frame
    monkeypatch.setattr(pp, "refine_mask", counting("refine_mask", fail_at=5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        pp.preprocess_video(face_video, out, cfg)
    staging = partial_path(out)
    assert not out.exists() and (staging / ".work" / "detect.npz").is_file() and (staging / ".work" / "track.npz").is_file()
    assert len(list((staging / "frames").glob("0*.png"))) == 4  # frames written before the crash are kept
    # 2. changed tracking settings: the landmarks are reused, the tracking runs again; crash again
    calls.clear()
    cfg2 = replace(cfg, temporal=0.1)
    monkeypatch.setattr(pp, "detect_landmarks", must_not_run)
    monkeypatch.setattr(pp, "track_frames", counting("track_frames"))
    monkeypatch.setattr(pp, "refine_mask", counting("refine_mask", fail_at=3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        pp.preprocess_video(face_video, out, cfg2)
    assert calls["track_frames"] == 1
    # 3. the same settings again: nothing but the rest of the write step runs
    monkeypatch.setattr(pp, "track_frames", must_not_run)
    monkeypatch.setattr(pp, "refine_mask", real["refine_mask"])
    rep = pp.preprocess_video(face_video, out, cfg2)
    validate_dataset(out)
    assert rep["timings"]["detect"]["cached"] and rep["timings"]["track_chains"]["cached"]
    assert not rep["timings"]["matte"]["cached"]
    assert not staging.exists() and not (out / ".work").exists()


def test_gaps_and_several_faces(rendered_frames, tmp_path):
    """Face lost for 2 frames (interpolated) and for 7 (dropped); a second, smaller face (reported)."""
    from hravatar.data.preprocess import preprocess_video

    f = rendered_frames
    blank = np.full_like(f[0], 15)

    def with_second_face(img):
        wide = np.full((192, 288, 3), 15, np.uint8)
        wide[:, :192] = img
        wide[48:144, 192:288] = img[::2, ::2]
        return wide

    def widen(img):
        wide = np.full((192, 288, 3), 15, np.uint8)
        wide[:, :192] = img
        return wide

    seq = [widen(x) for x in f[:6]] + [widen(blank)] * 2 + [with_second_face(x) for x in f[6:]] + [widen(blank)] * 7 \
        + [widen(x) for x in f[:6]]
    video = tmp_path / "gaps.mp4"
    _write_video(video, seq)
    rep = preprocess_video(video, tmp_path / "ds", PreprocessConfig(**{**FAST, "res": 64}))
    meta = validate_dataset(tmp_path / "ds")
    assert meta.num_frames == 6 + 2 + 6 + 6
    assert rep["interpolated"] == [{"first": 6, "last": 7, "count": 2}]
    assert [(d["first"], d["last"], d["count"]) for d in rep["dropped"]] == [(14, 20, 7)]
    assert "more than 5" in rep["dropped"][0]["reason"]
    assert rep["faces"]["max_seen"] == 2 and rep["faces"]["frames_with_several"] >= 3
    assert any("several faces" in w for w in rep["warnings"])
    from hravatar.data.format import read_params

    p = read_params(tmp_path / "ds")
    assert p["landmarks_valid"].tolist() == [True] * 6 + [False] * 2 + [True] * 12
    assert p["source_frame"].tolist() == list(range(14)) + list(range(21, 27))
    # the largest face was tracked: its landmarks stay in the left part of the wide frame
    assert float(p["crop_box"][:, 0].max()) < 192


def test_large_video_is_downscaled(rendered_frames, tmp_path):
    """A video larger than detect_max_side: detection and the crop decode run on ffmpeg-downscaled frames."""
    import cv2

    from hravatar.data.preprocess import preprocess_video

    big = [cv2.resize(f, (800, 800), interpolation=cv2.INTER_CUBIC) for f in rendered_frames]
    video = tmp_path / "big.mp4"
    _write_video(video, big)
    rep = preprocess_video(video, tmp_path / "ds", PreprocessConfig(**{**FAST, "detect_max_side": 320}))
    assert rep["video"]["width"] == 800 and rep["video"]["detect_scale"] == pytest.approx(0.4)
    assert rep["tracking"]["max_error_rel"] < 0.02
    from hravatar.data.format import read_params

    box = read_params(tmp_path / "ds")["crop_box"]
    assert 300 < float(box[:, 2].mean()) <= 800  # crop boxes in full-resolution video pixels


# ------------------------------------------------------------------------------------ bad input
def _cli(args, capsys):
    from hravatar.cli.main import main

    rc = main(["preprocess", *[str(a) for a in args], "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [ln for ln in err if ln.startswith("hravatar:")]


@pytest.mark.parametrize("kind", ["missing", "text", "empty"])
def test_bad_files_one_line_error(kind, tmp_path, capsys):
    pytest.importorskip("mediapipe")
    video = tmp_path / "clip.mp4"
    if kind == "text":
        video.write_text("this is not a video\n" * 50)
    elif kind == "empty":
        video.write_bytes(b"")
    out = tmp_path / "ds"
    rc, lines = _cli([video, "--out", out, "--res", 64], capsys)
    assert rc == 2 and len(lines) == 1 and str(video) in lines[0], lines
    want = {"missing": "file not found", "text": "not a readable video", "empty": "empty file"}[kind]
    assert want in lines[0]
    assert not out.exists() and not partial_path(out).exists()


def test_no_face_and_truncated(face_video, tmp_path, capsys):
    pytest.importorskip("mediapipe")
    ramp = np.linspace(0, 255, 96, dtype=np.float32)
    grad = [np.stack([np.add.outer(ramp * 0.5, ramp * 0.5 - i)] * 3, -1).clip(0, 255).astype(np.uint8) for i in range(12)]
    novid = tmp_path / "gradient.mp4"
    _write_video(novid, grad)
    out = tmp_path / "ds"
    rc, lines = _cli([novid, "--out", out, "--res", 64], capsys)
    assert rc == 2 and len(lines) == 1 and "no face found in any of the 12 frames" in lines[0] and str(novid) in lines[0]
    assert not out.exists() and not partial_path(out).exists()
    # a file cut short (the index at the end of the MP4 is lost)
    data = face_video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    rc, lines = _cli([cut, "--out", out, "--res", 64], capsys)
    assert rc == 2 and len(lines) == 1 and str(cut) in lines[0] and "truncated" in lines[0]
    assert not out.exists() and not partial_path(out).exists()
    # an existing output is not replaced without --overwrite
    out.mkdir()
    rc, lines = _cli([face_video, "--out", out, "--res", 64], capsys)
    assert rc == 2 and "already exists" in lines[0]


def test_bad_settings_one_line():
    for kw in ({"res": 8}, {"test_frac": 1.0}, {"focal": "guess"}, {"max_frames": 0}):
        with pytest.raises(PreprocessError):
            PreprocessConfig(**kw).check()


# ------------------------------------------------------------------------------------ helpers (no MediaPipe)
def test_plan_frames_gaps():
    N = 40
    lmk = np.random.default_rng(0).normal(size=(N, 478, 3)).astype(np.float32)
    lmk[:2] = np.nan  # faceless start: dropped
    lmk[10:13] = np.nan  # 3-frame gap: interpolated
    lmk[20:28] = np.nan  # 8-frame gap: dropped
    lmk[39] = np.nan  # faceless end: dropped
    cfg = PreprocessConfig(max_gap=5, min_frames=5)
    plan = plan_frames(lmk, cfg, "clip.mp4")
    kept = plan["kept"]
    assert kept.tolist() == list(range(2, 20)) + list(range(28, 39))
    assert plan["interpolated"].sum() == 3 and plan["interpolated"][kept.tolist().index(11)]
    mid = plan["landmarks"][kept.tolist().index(11)]
    assert np.allclose(mid, lmk[9] + (lmk[13] - lmk[9]) * 2 / 4, atol=1e-5)
    assert [(d["first"], d["last"]) for d in plan["dropped"]] == [(0, 1), (20, 27), (39, 39)]
    assert segments_of(kept) == [(0, 18), (18, 29)]
    with pytest.raises(PreprocessError, match="clip.mp4: no face found in any of the 40 frames"):
        plan_frames(np.full((40, 478, 3), np.nan, np.float32), cfg, "clip.mp4")
    few = lmk.copy()
    few[5:] = np.nan
    with pytest.raises(PreprocessError, match="only 3 usable frames"):
        plan_frames(few, cfg, "clip.mp4")


def test_crop_frame_matches_points_to_crop_and_intrinsics():
    pytest.importorskip("cv2")
    H, W = 300, 400
    img = np.zeros((H, W, 3), np.uint8)
    img[120:124, 250:254] = 255  # a 4x4 white square centred at (252, 122) (continuous coordinates)
    box = np.array([230.0, 140.0, 160.0])
    for res, (sx, sy) in ((64, (1.0, 1.0)), (320, (1.0, 1.0)), (64, (0.5, 0.5))):
        src = img if sx == 1 else img[::2, ::2]
        c = crop_frame(src, box, res, sx, sy).astype(np.float32).sum(-1)
        ys, xs = np.nonzero(c > 0)
        w = c[ys, xs]
        got = np.array([(xs + 0.5) @ w / w.sum(), (ys + 0.5) @ w / w.sum()])
        want = points_to_crop(torch.tensor([[[252.0, 122.0]]]), torch.from_numpy(box)[None].float(), res)[0, 0].numpy()
        assert np.allclose(got, want, atol=0.02 * res), (res, got, want)
    # a camera's crop intrinsics project points where points_to_crop maps their image projection
    from hravatar.track.fit import project, webcam_intrinsics

    K = webcam_intrinsics(W, H, 30.0)
    R, t = torch.eye(3), torch.tensor([0.0, 0.0, 0.6])
    pts = torch.randn(10, 3) * 0.05
    boxes = torch.tensor([[230.0, 140.0, 160.0], [200.0, 150.0, 220.0]])
    Kc = crop_intrinsics(K, boxes, 128)
    for b in range(2):
        a = project(pts, Kc[b], R, t)
        ref = points_to_crop(project(pts, K, R, t)[None], boxes[b : b + 1], 128)[0]
        assert torch.allclose(a, ref, atol=1e-3)


def test_refine_mask_and_matte_frame():
    pytest.importorskip("cv2")
    from hravatar.data.preprocess import matte_frame, refine_mask

    H = W = 96
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    head = ((xx - 48) ** 2 + (yy - 50) ** 2 < 30 ** 2)
    img = np.full((H, W, 3), 230, np.uint8)  # bright wall
    img[head] = (40, 30, 25)  # dark hair / head
    prob = head.astype(np.float32) * 0.95
    prob[5:12, 80:90] = 0.9  # a false-positive blob away from the head
    prob[40:60, 40:56] = 0.0  # a hole where the face is (segmentation miss)
    lmk = np.stack(np.meshgrid(np.linspace(38, 58, 10), np.linspace(40, 62, 10)), -1).reshape(-1, 2)
    a = refine_mask(prob, img, lmk)
    assert a.dtype == np.float32 and a.shape == (H, W) and 0 <= a.min() and a.max() <= 1
    assert a[5:12, 80:90].max() < 0.05  # the detached blob is gone
    assert a[45:55, 42:54].min() > 0.99  # the face hull is foreground
    assert a[head].mean() > 0.9 and a[~head].mean() < 0.05
    # soft edges: the wall's colour is removed (no bright halo around dark hair)
    soft = np.clip(1.5 - np.sqrt((xx - 48) ** 2 + (yy - 50) ** 2) / 20.0, 0, 1).astype(np.float32)
    blend = np.repeat(soft[..., None] * 40 + (1 - soft[..., None]) * 230, 3, -1).astype(np.uint8)  # dark disc, soft edge, wall
    out = matte_frame(blend, soft)
    edge = (soft > 0.2) & (soft < 0.8)
    naive = blend.astype(np.float32) * soft[..., None]
    assert out[edge].mean() < 0.5 * naive[edge].mean()
    assert np.abs(out[edge].astype(np.float32) - 40 * soft[edge][:, None]).mean() < 6
    assert out[soft == 0].max() == 0 and np.array_equal(out[soft == 1], blend[soft == 1])


def test_meta_head_spec_backward_compatible():
    meta = DatasetMeta(num_frames=3, width=8, height=8, fps=30.0, test_frames=1, head="builtin:abc", expr_dim=1, shape_dim=1)
    d = meta.to_json()
    assert "head_spec" not in d  # old readers see the same file as before
    assert DatasetMeta.from_json(d).head_spec is None
    d2 = replace(meta, head_spec="ict:/data/ict").to_json()
    assert DatasetMeta.from_json(d2).head_spec == "ict:/data/ict"


def test_fit_video_end_to_end_and_rerun(face_video, tmp_path):
    """``hravatar fit``'s pipeline: preprocess -> train -> eval.json (eval keys, last 20% held out)
    -> strip + preview video; running it again reuses the dataset and the finished run."""
    from hravatar.avatar.config import AvatarConfig
    from hravatar.fit import fit_video
    from hravatar.train.config import DensifySettings, TrainConfig

    cfg = TrainConfig(profile="test", resolution=64, iterations=4, albedo_warmup=0, encoder=False, checkpoint_every=4,
                      eval_every=1000, eval_frames=1, preview_every=1000, log_every=2,
                      avatar=AvatarConfig(num_gaussians=1500, init_mode="surface"), densify=DensifySettings(start=1000))
    run = tmp_path / "run"
    stages: set[str] = set()
    res = fit_video(face_video, run, cfg, "cpu", PreprocessConfig(**{**FAST, "res": 64}),
                    progress=lambda s, d, t: stages.add(s))
    assert {"detect", "track"} <= stages
    saved = json.loads((run / "eval.json").read_text())
    assert {"psnr", "ssim", "mae100", "lpips"} <= set(saved)
    assert saved["psnr"] == pytest.approx(res["psnr"]) and 5.0 < saved["psnr"] < 60.0
    assert saved["frames"] == 2  # 12 frames, the last 20% (2) held out
    assert (run / "eval_strip.png").stat().st_size > 0 and (run / "preview.mp4").stat().st_size > 1000
    stamp = (run / "dataset" / "dataset.json").stat().st_mtime_ns
    stages.clear()
    again = fit_video(face_video, run, cfg, "cpu", PreprocessConfig(**{**FAST, "res": 64}),
                      progress=lambda s, d, t: stages.add(s))
    assert stages == set() and (run / "dataset" / "dataset.json").stat().st_mtime_ns == stamp
    assert again["psnr"] == pytest.approx(res["psnr"], abs=1e-4)
