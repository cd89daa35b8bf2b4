"""Dataset format: write/read round trips, validation errors, atomic and resumable writing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hravatar.data import (
    DatasetError,
    DatasetMeta,
    HeadVideoDataset,
    frame_path,
    partial_path,
    validate_dataset,
    write_dataset,
    write_params,
    write_png,
)
from hravatar.data.format import PARAMS_FILE
from hravatar.head.model import NUM_MEDIAPIPE_LANDMARKS

T, W, H, K_TEST, E, S = 6, 32, 24, 2, 7, 4


def _meta(**kw) -> DatasetMeta:
    d = dict(num_frames=T, width=W, height=H, fps=25.0, test_frames=K_TEST, head="builtin:test", expr_dim=E,
             shape_dim=S, has_albedo=True, source="synthetic")
    d.update(kw)
    return DatasetMeta(**d)


def _frames(seed: int = 0, n: int = T):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        mask = rng.integers(0, 256, (H, W), dtype=np.uint8)
        alb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        out.append((img, mask, alb))
    return out


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    viewmat = torch.eye(4).repeat(T, 1, 1)
    viewmat[:, :3, 3] = torch.randn(T, 3, generator=g) * 0.01 + torch.tensor([0.0, 0.0, 1.0])
    lmk = torch.rand(T, NUM_MEDIAPIPE_LANDMARKS, 2, generator=g) * torch.tensor([W, H])
    valid = torch.ones(T, dtype=torch.bool)
    valid[1] = False
    lmk[1] = float("nan")  # tracking failed on frame 1: allowed because it is marked invalid
    return {
        "beta": torch.randn(S, generator=g),
        "K": torch.tensor([[40.0, 0.0, 15.5], [0.0, 41.0, 12.25], [0.0, 0.0, 1.0]]),
        "viewmat": viewmat,
        "expr": torch.randn(T, E, generator=g),
        "pose": torch.randn(T, 5, 3, generator=g) * 0.1,
        "eyelids": torch.rand(T, 2, generator=g),
        "transl": torch.randn(T, 3, generator=g) * 0.01,
        "landmarks": lmk,
        "landmarks_valid": valid,
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "tiny"
    frames, params = _frames(), _params()
    write_dataset(root, _meta(), iter(frames), params)
    return root, frames, params


def _copy(tiny, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny[0], dst)
    return dst


def _as_u8(x: torch.Tensor) -> np.ndarray:
    return (x.cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- round trip
def test_round_trip_splits_images_params(tiny):
    root, frames, params = tiny
    assert validate_dataset(root) == _meta()
    train, test = HeadVideoDataset(root, "train"), HeadVideoDataset(root, "test")
    assert len(train) == T - K_TEST and len(test) == K_TEST
    assert [train[i].index for i in range(len(train))] == list(range(T - K_TEST))
    assert [test[i].index for i in range(len(test))] == list(range(T - K_TEST, T))
    assert torch.equal(train.beta, params["beta"])
    for ds in (train, test):
        for i in range(len(ds)):
            s = ds[i]
            img, mask, alb = frames[s.index]
            assert s.image.shape == (H, W, 3) and s.mask.shape == (H, W, 1) and s.image.dtype == torch.float32
            np.testing.assert_array_equal(_as_u8(s.image), img)
            np.testing.assert_array_equal(_as_u8(s.mask)[..., 0], mask)
            np.testing.assert_array_equal(_as_u8(s.albedo), alb)
            assert torch.equal(s.camera.K, params["K"]) and torch.equal(s.camera.viewmat, params["viewmat"][s.index])
            assert (s.camera.width, s.camera.height) == (W, H)
            for name in ("expr", "pose", "eyelids", "transl"):
                assert torch.equal(getattr(s.params, name), params[name][s.index : s.index + 1])
            if s.index == 1:
                assert s.landmarks is None  # marked invalid
            else:
                assert torch.equal(s.landmarks, params["landmarks"][s.index])
    fp = train.frame_params([5, 0, 3])  # global indices, across splits
    assert torch.equal(fp.expr, params["expr"][[5, 0, 3]]) and torch.equal(fp.pose, params["pose"][[5, 0, 3]])


def test_lazy_loading_matches_preloaded(tiny):
    root = tiny[0]
    a = HeadVideoDataset(root, "all", resolution=(16, 12))
    b = HeadVideoDataset(root, "all", resolution=(16, 12), preload=False)
    assert len(a) == len(b) == T
    for i in range(T):
        assert torch.equal(a[i].image, b[i].image) and torch.equal(a[i].mask, b[i].mask)


def test_half_resolution_scales_images_cameras_landmarks(tiny):
    root, frames, params = tiny
    half = HeadVideoDataset(root, "all", resolution=(W // 2, H // 2))
    assert HeadVideoDataset(root, "test", resolution=W // 2).width == W // 2  # int = longer side
    s = half[2]
    # area downscaling by 2 = mean of each 2x2 block (then re-quantised to 8 bits)
    block = frames[2][0].astype(np.float64).reshape(H // 2, 2, W // 2, 2, 3).mean((1, 3)) / 255.0
    assert s.image.shape == (H // 2, W // 2, 3)
    assert np.abs(s.image.numpy() - block).max() <= 0.5 / 255 + 1e-6
    quarter = HeadVideoDataset(root, "all", resolution=(W // 4, H // 4), preload=False)[2].mask[..., 0]
    block4 = frames[2][1].astype(np.float64).reshape(H // 4, 4, W // 4, 4).mean((1, 3)) / 255.0
    assert np.abs(quarter.numpy() - block4).max() <= 0.5 / 255 + 1e-6
    # a 3D point must project to half the full-resolution pixel coordinates
    full = HeadVideoDataset(root, "all", preload=False).camera(2)
    X = torch.tensor([0.05, -0.03, 0.2, 1.0])

    def project(cam):
        xc = (cam.viewmat @ X)[:3]
        uvw = cam.K @ xc
        return uvw[:2] / uvw[2]

    assert torch.allclose(project(s.camera), project(full) / 2, atol=1e-5)
    assert (s.camera.width, s.camera.height) == (W // 2, H // 2)
    assert torch.allclose(s.landmarks, params["landmarks"][2] / 2)


# --------------------------------------------------------------------------- validation errors
def _expect_error(root, *needles):
    with pytest.raises(DatasetError) as ei:
        validate_dataset(root)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _rewrite_param(root, **changes):
    from safetensors.torch import load_file

    p = load_file(str(root / PARAMS_FILE))  # unchecked: the file may already be broken
    p.update(changes)
    write_params(root, p)


def test_missing_dataset_json(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    (root / "dataset.json").unlink()
    _expect_error(root, "dataset.json", "missing")
    with pytest.raises(DatasetError):
        HeadVideoDataset(root)


def test_wrong_format_and_version(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    d = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**d, "format": "something-else"}))
    _expect_error(root, "dataset.json", "format")
    (root / "dataset.json").write_text(json.dumps({**d, "version": 99}))
    _expect_error(root, "dataset.json", "version 99")
    (root / "dataset.json").write_text("{not json")
    _expect_error(root, "dataset.json", "JSON")


def test_missing_frames_names_first_and_count(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    frame_path(root, "frames", 4).unlink()
    frame_path(root, "frames", 2).unlink()
    _expect_error(root, "000002.png", "2 of 6", "frames")


def test_extra_mask_is_a_count_mismatch(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    shutil.copy(frame_path(root, "masks", 0), frame_path(root, "masks", T))
    _expect_error(root, "masks", "count mismatch", "000006.png")


def test_params_frame_count_mismatch(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    p = _params()
    _rewrite_param(root, expr=p["expr"][:5])
    _expect_error(root, PARAMS_FILE, "'expr'", "5 frames", "count mismatch")


def test_nan_names_tensor_and_first_bad_frame(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    pose = _params()["pose"].clone()
    pose[3, 2, 1] = float("nan")
    pose[5, 0, 0] = float("inf")
    _rewrite_param(root, pose=pose)
    _expect_error(root, "'pose'", "frame 3")
    # an invalid frame's landmarks may be NaN, a valid frame's may not
    lmk = _params()["landmarks"].clone()
    lmk[4, 7, 0] = float("inf")
    _rewrite_param(root, pose=_params()["pose"], landmarks=lmk)
    _expect_error(root, "'landmarks'", "frame 4")


def test_shared_intrinsics_inf(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    K = _params()["K"].clone()
    K[0, 2] = float("inf")
    _rewrite_param(root, K=K)
    _expect_error(root, "'K'", "NaN/inf")


def test_wrong_tensor_shape(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    _rewrite_param(root, eyelids=torch.zeros(T, 3))
    _expect_error(root, "'eyelids'", "[6, 3]", "[6, 2]")


def test_missing_params_file(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    (root / PARAMS_FILE).unlink()
    _expect_error(root, PARAMS_FILE, "missing")


def test_image_size_mismatch(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    write_png(frame_path(root, "albedo", 1), np.zeros((H, W - 2, 3), np.uint8))
    _expect_error(root, "albedo/000001.png", f"{W - 2}x{H}", f"{W}x{H}")


def test_test_frames_not_below_num_frames(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    d = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**d, "test_frames": T}))
    _expect_error(root, "dataset.json", "test_frames")


# --------------------------------------------------------------------------- atomic / resumable writing
def _interrupting(frames, after: int):
    for i, f in enumerate(frames):
        if i == after:
            raise RuntimeError("simulated crash")
        yield f


def test_interrupted_write_then_resume(tmp_path):
    root = tmp_path / "ds"
    frames, params = _frames(seed=3), _params(seed=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(root, _meta(), _interrupting(frames, 3), params)
    assert not root.exists()
    staging = partial_path(root)
    kept = {i: frame_path(staging, "frames", i).stat() for i in range(3)}
    # corrupt one completed frame: it must not count as verified
    frame_path(staging, "masks", 1).write_bytes(b"garbage")
    events = []
    write_dataset(root, _meta(), iter(frames), params, on_frame=lambda i, skipped: events.append((i, skipped)))
    assert events == [(0, True), (1, False), (2, True), (3, False), (4, False), (5, False)]
    assert not staging.exists() and root.is_dir()
    for i in (0, 2):  # verified frames were not rewritten: same inode and modification time
        st = frame_path(root, "frames", i).stat()
        assert (st.st_ino, st.st_mtime_ns) == (kept[i].st_ino, kept[i].st_mtime_ns)
    assert sorted(p.name for p in root.iterdir()) == ["albedo", "dataset.json", "frames", "masks", "params.safetensors"]
    ds = HeadVideoDataset(root, "all")
    for i in range(T):
        np.testing.assert_array_equal(_as_u8(ds[i].image), frames[i][0])
        np.testing.assert_array_equal(_as_u8(ds[i].mask)[..., 0], frames[i][1])


def test_resume_rewrites_changed_frames(tmp_path):
    root = tmp_path / "ds"
    frames, params = _frames(seed=4), _params()
    with pytest.raises(RuntimeError):
        write_dataset(root, _meta(), _interrupting(frames, 2), params)
    changed = list(frames)
    changed[0] = (255 - frames[0][0], frames[0][1], frames[0][2])  # the source changed since
    events = []
    write_dataset(root, _meta(), iter(changed), params, on_frame=lambda i, s: events.append(s))
    assert events == [False, True, False, False, False, False]
    np.testing.assert_array_equal(_as_u8(HeadVideoDataset(root, "all")[0].image), changed[0][0])


def test_write_refuses_bad_input_and_existing_root(tiny, tmp_path):
    root = tmp_path / "ds"
    bad = _params()
    bad["transl"] = torch.zeros(T, 2)
    with pytest.raises(DatasetError, match="'transl'"):
        write_dataset(root, _meta(), iter(_frames()), bad)
    assert not partial_path(root).exists()  # params are checked before anything is written
    with pytest.raises(DatasetError, match="ended after 4 frames"):
        write_dataset(root, _meta(), iter(_frames(n=4)), _params())
    assert not root.exists()
    with pytest.raises(DatasetError, match="already exists"):
        write_dataset(tiny[0], _meta(), iter(_frames()), _params())
    # overwrite replaces the old dataset in one rename
    other = tmp_path / "other"
    shutil.copytree(tiny[0], other)
    new_frames = _frames(seed=9)
    write_dataset(other, _meta(has_albedo=False), iter(new_frames), _params(), overwrite=True)
    assert not (other / "albedo").exists()
    np.testing.assert_array_equal(_as_u8(HeadVideoDataset(other, "test")[0].image), new_frames[T - K_TEST][0])


def test_ground_truth_extras(tmp_path):
    root = tmp_path / "synth"
    normal = np.zeros((H, W, 3), np.float64)
    normal[..., 2] = 1.0  # facing +z everywhere

    def add_gt(staging):
        (staging / "gt" / "envmaps").mkdir(parents=True)
        (staging / "gt" / "envmaps" / "sky.exr").write_bytes(b"placeholder")
        info = {"envs": [{"name": "sky", "rotation_deg": 90.0}], "relit_frames": [4, 5], "normal_frames": [4]}
        (staging / "gt" / "gt.json").write_text(json.dumps(info))
        for i in (4, 5):
            write_png(staging / "gt" / "relit" / "sky" / f"{i:06d}.png", np.full((H, W, 3), 0.25 * i - 0.75))
        write_png(staging / "gt" / "normal" / "000004.png", normal * 0.5 + 0.5)

    write_dataset(root, _meta(), iter(_frames()), _params(), extras=add_gt)
    ds = HeadVideoDataset(root, "test")
    assert [e["name"] for e in ds.gt_info["envs"]] == ["sky"] and ds.gt_envmap_path("sky").is_file()
    assert torch.allclose(ds.gt_image("relit", 5, "sky"), torch.full((H, W, 3), 0.5), atol=0.5 / 255)
    n = ds.gt_image("normal", 4)
    assert torch.allclose(n, torch.tensor([0.0, 0.0, 1.0]).expand(H, W, 3), atol=1e-2)
    (root / "gt" / "relit" / "sky" / "000005.png").unlink()
    _expect_error(root, "gt/relit/sky/000005.png", "missing")
