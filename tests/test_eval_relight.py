"""The synthetic relighting benchmark end to end: ``hravatar synth`` ground truth scored by
``hravatar eval``. The ground-truth subject itself must score (nearly) perfectly, and damage
done to one of its channels must show up in that channel's error attribution."""
from dataclasses import asdict

import pytest
import torch

from hravatar.data.synth import SynthConfig, generate_synthetic, make_subject
from hravatar.eval.evaluate import evaluate
from hravatar.head.builtin import load_builtin_head
from hravatar.io.checkpoint import AvatarBundle, save_checkpoint
from hravatar.shading import LearnedLighting
from hravatar.train.config import LightConfig, TrainConfig
from hravatar.utils.rotation import quat_multiply

CFG = SynthConfig(frames=5, res=32, gaussians=6000, test_fraction=0.4)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "s"
    generate_synthetic(root, CFG)
    return root


def _save(avatar, path):
    light = LearnedLighting(**asdict(LightConfig()))
    tc = TrainConfig(profile="test", resolution=CFG.res, encoder=False, camera_response="srgb")
    save_checkpoint(path, AvatarBundle(avatar, {k: v.detach() for k, v in light.state_dict().items()}, asdict(LightConfig()),
                                       meta={"train_config": tc.to_dict()}))
    return path


def _subject():
    return make_subject(load_builtin_head(), CFG)


def test_the_true_subject_relights_exactly(synth, tmp_path):
    res = evaluate(_save(_subject(), tmp_path / "gt.safetensors"), synth, "cpu")
    assert res["frames"] == 2 and set(res["relight"]) == {"studio_r0", "overcast_r90", "sunset_r210"}
    # only 8-bit rounding of the stored frames separates the two renders
    assert res["relight_psnr"] > 45, res["relight"]
    assert res["albedo_lmse"] < 1e-4 and res["normal_cos"] > 0.999
    assert all(abs(s - 1) < 0.02 for s in res["albedo_scale"])
    assert all(v > 40 for v in res["relight_attribution"].values()), res["relight_attribution"]


def test_error_attribution_points_at_the_damaged_channel(synth, tmp_path):
    # albedo: a left/right brightness split (a global factor would be removed by the scale alignment)
    av = _subject()
    with torch.no_grad():
        a = torch.sigmoid(av.params["albedo"]) * torch.where(av.params["means"][:, :1] > 0, 1.4, 0.6)
        av.params["albedo"].copy_(torch.logit(a.clamp(1e-3, 1 - 1e-3)))
    res = evaluate(_save(av, tmp_path / "alb.safetensors"), synth, "cpu")
    att = res["relight_attribution"]
    assert res["relight_psnr"] < 30 and res["albedo_lmse"] > 1e-3
    assert att["gt_albedo"] > res["relight_psnr"] + 10 and att["gt_normal"] < res["relight_psnr"] + 2

    # normals: every Gaussian's disc tilted by 35 degrees about a random axis in its own plane
    av = _subject()
    phi = torch.rand(av.num_gaussians, 1, generator=torch.Generator().manual_seed(0)) * 6.2832
    axis = torch.cat([phi.cos(), phi.sin(), torch.zeros_like(phi)], -1)  # local frame: z is the normal
    half = torch.tensor(35.0).deg2rad() / 2
    dq = torch.cat([torch.cos(half).expand(av.num_gaussians, 1), torch.sin(half) * axis], -1)
    with torch.no_grad():
        av.params["quats"].copy_(quat_multiply(torch.nn.functional.normalize(av.params["quats"], dim=-1), dq))
    res = evaluate(_save(av, tmp_path / "nrm.safetensors"), synth, "cpu")
    att = res["relight_attribution"]
    assert res["normal_cos"] < 0.95 and res["relight_psnr"] < 35
    assert att["gt_normal"] > res["relight_psnr"] + 5 and att["gt_albedo"] < res["relight_psnr"] + 2
