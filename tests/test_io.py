"""Checkpoint and PLY I/O: round trips and one-line errors for bad files."""
import json
import struct

import pytest
import torch
from helpers import tiny_head

from hravatar.avatar.config import AvatarConfig
from hravatar.avatar.gaussians import FrameParams, GaussianAvatar
from hravatar.io.checkpoint import AvatarBundle, load_checkpoint, read_checkpoint_meta, save_checkpoint
from hravatar.io.ply import read_gaussian_ply, write_gaussian_ply
from hravatar.io.safe import CheckpointError, save_safetensors_atomic
from hravatar.render.camera import orbit_camera


@pytest.fixture()
def bundle():
    av = GaussianAvatar.from_head(tiny_head(0), AvatarConfig(gaussians_per_face=1, albedo_init="vertex"))
    with torch.no_grad():
        av.params["albedo"].add_(torch.randn_like(av.params["albedo"]))
        av.log_global_scale.fill_(0.1)
    seq = FrameParams(torch.randn(7, av.num_expr), torch.randn(7, 5, 3), torch.rand(7, 2), torch.randn(7, 3))
    cam = orbit_camera(width=64, height=48)
    return AvatarBundle(av, {"irradiance": torch.rand(6, 16, 16, 3)}, {"activation": "sigmoid"}, seq, cam,
                        {"encoder.w": torch.randn(3, 4)}, {"data": {"frames": 7}})


def test_checkpoint_round_trip(tmp_path, bundle):
    p = tmp_path / "a.safetensors"
    save_checkpoint(p, bundle)
    b = load_checkpoint(p)
    for k, v in bundle.avatar.params.items():
        assert torch.equal(b.avatar.params[k], v.detach()), k
    assert float(b.avatar.log_global_scale.detach()) == pytest.approx(0.1)
    assert torch.equal(b.avatar.joints, bundle.avatar.joints)
    assert b.avatar.expr_names == bundle.avatar.expr_names
    assert b.avatar.config == bundle.avatar.config
    assert torch.equal(b.light_state["irradiance"], bundle.light_state["irradiance"])
    assert b.light_config == {"activation": "sigmoid"}
    assert torch.equal(b.sequence.pose, bundle.sequence.pose)
    assert b.camera.width == 64 and torch.equal(b.camera.K, bundle.camera.K)
    assert torch.equal(b.extra["encoder.w"], bundle.extra["encoder.w"])
    assert b.meta["data"] == {"frames": 7}
    # deformation of the loaded avatar is identical
    f = bundle.avatar.neutral_frame()
    assert torch.equal(b.avatar.deform(f).means, bundle.avatar.deform(f).means)
    # the file is a plain safetensors file: no pickle anywhere
    assert p.read_bytes()[8:9] == b"{"


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, bundle, monkeypatch):
    p = tmp_path / "a.safetensors"
    save_checkpoint(p, bundle)
    before = p.read_bytes()
    import hravatar.io.safe as safe

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safe.os, "fsync", boom)
    with pytest.raises(OSError):
        save_checkpoint(p, bundle)
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_bad_checkpoints_give_one_line_errors(tmp_path, bundle):
    p = tmp_path / "a.safetensors"
    save_checkpoint(p, bundle)
    raw = p.read_bytes()
    # truncated
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "trunc.safetensors")
    assert "truncated" in _one_line(e) and "trunc.safetensors" in str(e.value)
    # corrupted header
    bad = bytearray(raw)
    bad[10:20] = b"\xff" * 10
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "corrupt.safetensors")
    _one_line(e)
    # foreign files: a PNG and a safetensors file without our metadata
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "x.png")
    _one_line(e)
    save_safetensors_atomic({"w": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "foreign.safetensors")
    assert "not a hravatar" in _one_line(e)
    # missing file
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "not found" in _one_line(e)


def _rewrite(path, out, mutate_meta=None, mutate_tensors=None):
    from safetensors.torch import load_file

    from hravatar.io.safe import read_safetensors_header

    meta = json.loads(read_safetensors_header(path)["__metadata__"]["hravatar"])
    t = load_file(str(path))
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(t)
    save_safetensors_atomic(t, out, {"hravatar": json.dumps(meta)})


def test_version_shape_and_nan_validation(tmp_path, bundle):
    p = tmp_path / "a.safetensors"
    save_checkpoint(p, bundle)
    _rewrite(p, tmp_path / "v.safetensors", mutate_meta=lambda m: m.update(version=99))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "v.safetensors")
    assert "version 99" in _one_line(e)
    _rewrite(p, tmp_path / "s.safetensors", mutate_tensors=lambda t: t.update({"avatar.albedo": torch.zeros(5, 3)}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "s.safetensors")
    assert "avatar.albedo" in _one_line(e)

    def nan(t):
        t["avatar.means"][0, 0] = float("nan")

    _rewrite(p, tmp_path / "n.safetensors", mutate_tensors=nan)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "n.safetensors")
    assert "non-finite" in _one_line(e)
    assert read_checkpoint_meta(p)["num_gaussians"] == bundle.avatar.num_gaussians


def test_ply_round_trip_and_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    N = 33
    means = torch.randn(N, 3, generator=g)
    quats = torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1)
    scales = torch.rand(N, 3, generator=g) * 0.01 + 1e-3
    opac = torch.rand(N, generator=g) * 0.9 + 0.05
    cols = torch.rand(N, 3, generator=g)
    p = tmp_path / "g.ply"
    write_gaussian_ply(p, means, quats, scales, opac, cols)
    r = read_gaussian_ply(p)
    assert torch.allclose(r["means"], means)
    assert torch.allclose(r["quats"], quats, atol=1e-6)
    assert torch.allclose(r["scales"], scales, rtol=1e-5)
    assert torch.allclose(r["opacities"], opac, atol=1e-6)
    assert torch.allclose(r["colors"], cols, atol=1e-6)
    head = p.read_bytes()[:4000].split(b"end_header\n")[0].decode()
    props = [l.split()[2] for l in head.splitlines() if l.startswith("property")]
    # the standard 3DGS layout: 62 float properties in this order
    assert props[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert props[9:54] == [f"f_rest_{i}" for i in range(45)]
    assert props[54:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert len(p.read_bytes()) == len(head) + len("end_header\n") + N * 62 * 4
    # values as 3DGS stores them: logit opacity, log scale
    body = p.read_bytes()[len(head) + len("end_header\n"):]
    first = struct.unpack("<62f", body[: 62 * 4])
    assert first[54] == pytest.approx(float(torch.logit(opac[0])), rel=1e-5)
    assert first[55] == pytest.approx(float(torch.log(scales[0, 0])), rel=1e-5)


def test_compact_checkpoint_bakes_identity_and_halves_bases(tmp_path, bundle):
    from hravatar.io.checkpoint import bake_identity

    with torch.no_grad():
        bundle.avatar.beta.copy_(torch.randn_like(bundle.avatar.beta))
    baked = bake_identity(bundle.avatar)
    assert baked.params["shapedirs"].shape[-1] == 0
    f = FrameParams(torch.randn(1, bundle.avatar.num_expr) * 0.5, torch.randn(1, 5, 3) * 0.2, torch.rand(1, 2), torch.zeros(1, 3))
    assert torch.allclose(baked.deform(f).means, bundle.avatar.deform(f).means, atol=1e-6)
    full, small = tmp_path / "full.safetensors", tmp_path / "small.safetensors"
    save_checkpoint(full, bundle)
    bundle.avatar = baked
    save_checkpoint(small, bundle, compact=True)
    assert small.stat().st_size < 0.5 * full.stat().st_size
    b = load_checkpoint(small)
    for k in ("exprdirs", "posedirs", "eyelid_dirs"):
        got, ref = b.avatar.params[k], baked.params[k].detach()
        assert got.dtype == torch.float32
        # int8 with one scale per Gaussian: each entry within half a step of its row's range
        step = ref.reshape(ref.shape[0], -1).abs().amax(-1) / 127
        err = (got - ref).reshape(ref.shape[0], -1).abs().amax(-1)
        assert (err <= step / 2 * 1.001 + 1e-9).all(), k
        assert (err > 0).any()  # it is quantised, not stored as is
    # positions move by a small fraction of the offsets themselves
    off = (baked.deform(f).means - baked.params["means"]).abs().max()
    assert (b.avatar.deform(f).means - baked.deform(f).means).abs().max() < 0.02 * off


def test_int8_checkpoint_without_its_scale_is_refused(tmp_path, bundle):
    from safetensors.torch import load_file

    path = tmp_path / "small.safetensors"
    save_checkpoint(path, bundle, compact=True)
    t = load_file(path)
    assert t["avatar.exprdirs"].dtype == torch.int8
    del t["avatar.exprdirs.q8scale"]
    from hravatar.io.safe import read_safetensors_header

    meta = read_safetensors_header(path)["__metadata__"]
    save_safetensors_atomic(t, path, meta)
    with pytest.raises(CheckpointError, match="avatar.exprdirs"):
        load_checkpoint(path)


def test_bundled_demo_avatar_is_valid_and_small():
    from hravatar.api import DEMO_CHECKPOINT, open_avatar

    assert DEMO_CHECKPOINT.exists(), "assets/demo_avatar.safetensors is missing (rebuild: hravatar demo --work DIR)"
    assert DEMO_CHECKPOINT.stat().st_size <= 25 * 1024 * 1024
    b = open_avatar(None)
    assert b.light_state and b.camera is not None and b.sequence is not None
    assert b.meta["train"]["iteration"] == b.meta["train"]["total"]
    assert any(k.startswith("encoder.") for k in b.extra)  # webcam driving with the avatar's own encoder
