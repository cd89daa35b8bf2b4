"""Trainer: learning happens, events flow, kill + resume reproduces the uninterrupted run,
NaN and disk-full stop cleanly without harming the last checkpoint."""
import errno
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_head

from hravatar.avatar.config import AvatarConfig
from hravatar.avatar.gaussians import FrameParams, GaussianAvatar
from hravatar.data.format import DatasetMeta, write_dataset
from hravatar.io.checkpoint import load_checkpoint
from hravatar.render.camera import orbit_camera
from hravatar.render.pipeline import render_gbuffers
from hravatar.train.config import DensifySettings, TrainConfig
from hravatar.train.events import EventBus, read_events, JsonlLog
from hravatar.train.trainer import Trainer, TrainingStopped
from hravatar.utils.rotation import quat_multiply


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """6 frames of a coloured tiny head at 32x32 (rendered albedo over black)."""
    head = tiny_head(0)
    gt = GaussianAvatar.from_head(head, AvatarConfig(gaussians_per_face=2, init_mode="surface", albedo_init="vertex"))
    cam = orbit_camera(distance=0.6, width=32, height=32, fov_y_deg=30)
    T = 6
    g = torch.Generator().manual_seed(0)
    pose = torch.zeros(T, 5, 3)
    pose[:, 0, 1] = torch.linspace(-0.3, 0.3, T)
    expr = torch.randn(T, head.num_expr, generator=g) * 0.5
    frames = []
    with torch.no_grad():
        for t in range(T):
            f = FrameParams(expr[t : t + 1], pose[t : t + 1], torch.zeros(1, 2), torch.zeros(1, 3))
            gb = render_gbuffers(gt.deform(f), cam, backend="torch")
            frames.append(((gb.albedo * gb.alpha).numpy(), gb.alpha[..., 0].numpy()))
    meta = DatasetMeta(num_frames=T, width=32, height=32, fps=25.0, test_frames=2, head=head.identity(),
                       expr_dim=head.num_expr, shape_dim=head.num_shape)
    params = {"beta": torch.zeros(head.num_shape), "K": cam.K, "viewmat": cam.viewmat[None].repeat(T, 1, 1), "expr": expr,
              "pose": pose, "eyelids": torch.zeros(T, 2), "transl": torch.zeros(T, 3)}
    root = tmp_path_factory.mktemp("data") / "tiny"
    write_dataset(root, meta, iter(frames), params)
    return root, head


def _cfg(iters=30, **kw):
    return replace(TrainConfig(profile="test", resolution=32, iterations=iters, albedo_warmup=5, encoder=False,
                               checkpoint_every=10, eval_every=10, eval_frames=2, preview_every=1000, log_every=5,
                               avatar=AvatarConfig(gaussians_per_face=1, init_mode="surface"),
                               densify=DensifySettings(start=8, every=8, stop_before_end=4, reset_every=1000)), **kw)


def test_training_learns_and_reports(tiny_dataset, tmp_path):
    root, head = tiny_dataset
    bus = EventBus()
    events = []
    bus.subscribe(events.append)
    log = JsonlLog(tmp_path / "run" / "events.jsonl")
    bus.subscribe(log)
    cfg = _cfg(40, shading="color", densify=DensifySettings(start=1000))
    cfg = replace(cfg, lr=replace(cfg.lr, material=0.05))  # tiny run: learn colours fast
    tr = Trainer(root, tmp_path / "run", cfg, bus=bus, head=head)
    before = tr.quick_eval()["psnr"]
    path = tr.run()
    log.close()
    after = tr.quick_eval()["psnr"]
    assert after > before + 2.0  # it learned the colours of held-out frames
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "iter" in kinds and "eval" in kinds and "checkpoint" in kinds
    it = [e for e in events if e["kind"] == "iter"]
    assert all({"losses", "lrs", "num_gaussians", "its", "eta_s"} <= set(e) for e in it)
    assert it[-1]["losses"]["total"] < it[0]["losses"]["total"]
    # the JSONL log has the same stream (the app tails it)
    logged, off = read_events(tmp_path / "run" / "events.jsonl")
    assert [e["kind"] for e in logged] == kinds and off > 0
    b = load_checkpoint(path)
    assert b.avatar.num_gaussians == tr.avatar.num_gaussians and b.light_state
    assert b.meta["train"]["iteration"] == 40


def test_kill_and_resume_matches_uninterrupted_run(tiny_dataset, tmp_path):
    root, head = tiny_dataset
    cfg = _cfg(30)
    full = Trainer(root, tmp_path / "a", cfg, head=head)
    full.run()
    # "killed" at iteration 15: the stop flag saves a checkpoint, as a crash after one would
    part = Trainer(root, tmp_path / "b", cfg, head=head)
    part.run(stop_flag=lambda: part.iteration >= 15)
    assert part.iteration == 15
    resumed = Trainer(root, tmp_path / "b", cfg, head=head)
    starts = []
    resumed.bus.subscribe(lambda e: e["kind"] == "start" and starts.append(e))
    resumed.run(resume=True)
    assert starts[0]["iteration"] == 15 and starts[0]["resumed"]
    assert resumed.iteration == 30
    # float round-off differs after reloading (tensor layouts), so compare what matters
    assert abs(resumed.avatar.num_gaussians - full.avatar.num_gaussians) <= 0.05 * full.avatar.num_gaussians
    assert abs(full.quick_eval()["psnr"] - resumed.quick_eval()["psnr"]) < 0.2


def test_resume_accepts_options_added_since_and_refuses_changed_ones(tiny_dataset, tmp_path):
    from hravatar.io.safe import CheckpointError
    from hravatar.train.config import LossConfig
    from hravatar.train.state import load_train_state, save_train_state

    root, head = tiny_dataset
    cfg = _cfg(10)
    part = Trainer(root, tmp_path / "r", cfg, head=head)
    part.run(stop_flag=lambda: part.iteration >= 5)
    # a state written before the eyelid anchor existed: its config has no such key
    path = tmp_path / "r" / "state.safetensors"
    t, meta = load_train_state(path)
    del meta["config"]["loss"]["eyelids"]
    meta.pop("format")
    save_train_state(path, t, meta)
    resumed = Trainer(root, tmp_path / "r", cfg, head=head)
    assert resumed.resume() and resumed.iteration == 5
    changed = Trainer(root, tmp_path / "r", replace(cfg, loss=LossConfig(jaw=0.1)), head=head)
    with pytest.raises(CheckpointError, match=r"different configuration \(loss\)"):
        changed.resume()


def test_random_background_composites_render_and_frame_over_the_same_colour(tiny_dataset, tmp_path, monkeypatch):
    root, head = tiny_dataset
    from hravatar.train.config import LossConfig
    import hravatar.train.trainer as T

    with pytest.raises(ValueError, match="training background 'grey'"):
        Trainer(root, tmp_path / "bad", _cfg(4, loss=LossConfig(background="grey")), head=head)
    tr = Trainer(root, tmp_path / "r", _cfg(4, loss=LossConfig(background="random")), head=head)
    seen = []
    real = T.photometric_loss
    monkeypatch.setattr(T, "photometric_loss", lambda pred, gt, *a: seen.append((pred.detach(), gt)) or real(pred, gt, *a))
    tr.train_step()
    tr.train_step()
    bg0, bg1 = tr._background(0), tr._background(1)
    assert not torch.allclose(bg0, bg1) and torch.equal(bg0, tr._background(0))  # per iteration, reproducible
    for (pred, gt), bg in zip(seen, (bg0, bg1)):
        # the tiny frames are black outside the mask: there the target is exactly the colour
        corner = gt[0, 0]
        assert torch.allclose(corner, bg, atol=1e-6)
        # the render of an empty corner is the background too (alpha ~ 0 there)
        assert torch.allclose(pred[0, 0], bg, atol=1e-3)


def test_nan_stops_cleanly_and_keeps_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    root, head = tiny_dataset
    tr = Trainer(root, tmp_path / "r", _cfg(30), head=head)
    tr.run(stop_flag=lambda: tr.iteration >= 10)
    good = (tmp_path / "r" / "avatar.safetensors").read_bytes()
    import hravatar.train.trainer as T

    real = T.photometric_loss
    monkeypatch.setattr(T, "photometric_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    tr2 = Trainer(root, tmp_path / "r", _cfg(30), head=head)
    with pytest.raises(TrainingStopped) as e:
        tr2.run(resume=True)
    assert "iteration 10" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "r" / "avatar.safetensors").read_bytes() == good


def test_disk_full_keeps_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    root, head = tiny_dataset
    tr = Trainer(root, tmp_path / "r", _cfg(30), head=head)
    tr.run(stop_flag=lambda: tr.iteration >= 10)
    good = (tmp_path / "r" / "avatar.safetensors").read_bytes()
    import hravatar.io.safe as safe

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe.os, "fsync", full)
    tr2 = Trainer(root, tmp_path / "r", _cfg(30), head=head)
    with pytest.raises(TrainingStopped) as e:
        tr2.run(resume=True)
    assert "disk full" in str(e.value)
    monkeypatch.undo()
    assert (tmp_path / "r" / "avatar.safetensors").read_bytes() == good
    assert load_checkpoint(tmp_path / "r" / "avatar.safetensors").meta["train"]["iteration"] == 10


@pytest.mark.parametrize("deformation", ["fixed", "mlp"])
def test_deformation_ablations_train_and_bake_into_checkpoints(tiny_dataset, tmp_path, deformation):
    root, head = tiny_dataset
    cfg = _cfg(12, deformation=deformation, densify=DensifySettings(start=1000))
    cfg = replace(cfg, lr=replace(cfg.lr, lbs_weights=1e-2))  # MLP lr: make a visible change in a few steps
    tr = Trainer(root, tmp_path / "r", cfg, head=head)
    before = {k: v.detach().clone() for k, v in tr.avatar.params.items()}
    tr.run()
    for k in ("exprdirs", "posedirs", "lbs_weights", "eyelid_dirs"):
        assert torch.equal(tr.avatar.params[k].detach(), before[k]), k  # per-Gaussian deformation stays frozen
    b = load_checkpoint(tmp_path / "r" / "avatar.safetensors")
    f = FrameParams(torch.randn(1, head.num_expr) * 0.5, torch.randn(1, 5, 3) * 0.2, torch.rand(1, 2), torch.zeros(1, 3))
    with torch.no_grad():
        offsets = tr.deform_mlp(tr.avatar.params["means"]) if tr.deform_mlp is not None else None
        want = tr.avatar.deform(f, offsets).means
        if deformation == "mlp":
            assert offsets["exprdirs"].abs().max() > 0  # the MLP learned something
    assert torch.allclose(b.avatar.deform(f).means, want, atol=1e-6)


def test_rigged_to_mesh_ablation_trains_and_evaluates_through_the_mesh(tiny_dataset, tmp_path, monkeypatch):
    import hravatar.head
    from hravatar.eval.evaluate import evaluate

    root, head = tiny_dataset
    tr = Trainer(root, tmp_path / "r", _cfg(12, deformation="mesh"), head=head)
    before = {k: v.detach().clone() for k, v in tr.avatar.params.items()}
    tr.run()
    for k in ("exprdirs", "posedirs", "lbs_weights", "eyelid_dirs"):
        assert torch.equal(tr.avatar.params[k].detach(), before[k]), k
    assert not torch.equal(tr.avatar.params["means"].detach(), before["means"])
    # evaluation rebuilds the rig from the head the dataset names
    monkeypatch.setattr(hravatar.head, "load_head_model", lambda spec: head)
    res = evaluate(tmp_path / "r", root, "cpu")
    assert abs(res["psnr"] - tr.quick_eval(2)["psnr"]) < 1e-3


def test_encoder_cycle_loss_draws_new_values_and_trains_only_the_encoder(tiny_dataset, tmp_path):
    root, head = tiny_dataset
    from hravatar.train.config import LossConfig

    cfg = _cfg(6, encoder=True, encoder_res=32, encoder_pretrain_iters=0,
               loss=LossConfig(cycle=1.0, cycle_every=2, cycle_start=0, cycle_scale=(0.8, 1.3)))
    tr = Trainer(root, tmp_path / "c", cfg, head=head)
    tr.encoder.config.freeze_bn = True  # as after the pre-training: single crops in train mode
    tr.encoder.train()
    n, D = tr.enc_bank.shape
    E = D - 5
    assert n == len(tr.train_set) and E == tr.avatar.num_expr
    # distinct small positive values (no clamp applies): which row each component came from is recoverable
    bank = 0.01 * (torch.arange(n)[:, None] + 1) + 0.0005 * torch.arange(D)[None]
    tr.enc_bank.copy_(bank)
    tr.enc_bank_filled[:] = True
    frame, cam, box, target = tr.cycle_sample(7)
    again = tr.cycle_sample(7)[3]
    assert torch.equal(target, again) and not torch.equal(target, tr.cycle_sample(8)[3])  # seeded by the iteration
    # one scale factor in range maps every component onto some row's value of that component
    scales = [float(target[0] / bank[r, 0]) for r in range(n)]
    ok = [s for s in scales if 0.8 - 1e-6 <= s <= 1.3 + 1e-6
          and all(torch.isclose(target[j] / s, bank[:, j], atol=1e-6).any() for j in range(D))]
    assert ok
    assert torch.equal(frame.expr[0], target[:E]) and torch.equal(frame.eyelids[0], target[E:E + 2])
    assert torch.equal(frame.pose[0, 2], target[E + 2:])
    # global pose / neck / eyes come unchanged from one training frame
    donors = [k for k in range(n) if torch.equal(tr.train_set[k].params.pose[0, [0, 1, 3, 4]], frame.pose[0, [0, 1, 3, 4]])]
    assert donors and any(torch.equal(box, tr.crop_boxes["train"][k]) for k in donors)
    # the cycle loss reaches the encoder only (the render is a fixed target)
    lc = tr.cycle_loss(7)
    lc.backward()
    assert lc.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.encoder.parameters())
    assert all(p.grad is None for p in tr.avatar.params.values()) and all(p.grad is None for p in tr.light.parameters())
    tr.encoder.zero_grad(set_to_none=True)
    # logged on the iterations it runs, and the bank fills with the encoder's outputs as frames are seen
    tr2 = Trainer(root, tmp_path / "d", cfg, head=head)
    tr2.encoder.config.freeze_bn = True
    tr2.encoder.train()
    logs = [tr2.train_step() for _ in range(4)]
    assert ["cycle" in lg for lg in logs] == [True, False, True, False]
    assert tr2.enc_bank_filled.sum() >= 1 and tr2.enc_bank[tr2.enc_bank_filled].abs().sum() > 0
    # the bank is part of the resumable state
    tr2.save()
    tr3 = Trainer(root, tmp_path / "d", cfg, head=head)
    assert tr3.resume()
    assert torch.equal(tr3.enc_bank, tr2.enc_bank) and torch.equal(tr3.enc_bank_filled, tr2.enc_bank_filled)


@pytest.mark.gpu
def test_training_on_cuda_tracks_cpu_and_loads_on_cpu(tiny_dataset, tmp_path):
    """The CUDA path (gsplat when installed, else the torch rasterizer on CUDA) trains like the CPU
    path: same losses over the first iterations, and its checkpoint renders on a CPU machine."""
    root, head = tiny_dataset
    cfg = _cfg(20)
    losses, paths = {}, {}
    for dev in ("cpu", "cuda"):
        bus = EventBus()
        ev = []
        bus.subscribe(ev.append)
        tr = Trainer(root, tmp_path / dev, cfg, device=dev, bus=bus, head=head)
        assert tr.device.type == dev
        paths[dev] = tr.run()
        losses[dev] = [e["losses"]["total"] for e in ev if e["kind"] == "iter"]
    assert len(losses["cuda"]) == len(losses["cpu"]) >= 3
    # the first logged loss comes before any densification: the two rasterizers agree closely
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=0.02)
    assert losses["cuda"][-1] < losses["cuda"][0]
    b = load_checkpoint(paths["cuda"])
    assert b.avatar.device.type == "cpu"
    f = FrameParams(torch.zeros(1, head.num_expr), torch.zeros(1, 5, 3), torch.zeros(1, 2), torch.zeros(1, 3))
    cam = orbit_camera(distance=0.6, width=32, height=32, fov_y_deg=30)
    with torch.no_grad():
        gb = render_gbuffers(b.avatar.deform(f), cam, backend="torch")
    assert torch.isfinite(gb.albedo).all() and gb.alpha.max() > 0.5


def test_fused_adam_matches_reference_adam_and_resumes_across_implementations():
    from hravatar.train.state import load_optimizer_tensors, optimizer_tensors
    from hravatar.train.trainer import adam

    g = torch.Generator().manual_seed(0)
    init = torch.randn(50, 3, generator=g)
    grads = [torch.randn(50, 3, generator=g) for _ in range(6)]
    fast = torch.nn.Parameter(init.clone())
    ref = torch.nn.Parameter(init.clone())
    opt_fast = adam([fast], lr=1e-2, eps=1e-15)
    opt_ref = torch.optim.Adam([ref], lr=1e-2, eps=1e-15, foreach=False, fused=False)  # the for-loop reference
    assert opt_fast.param_groups[0]["fused"]
    for i, gr in enumerate(grads):
        if i == 3:  # save the reference's state and continue it in the fused optimiser, and back
            t_ref, m_ref = optimizer_tensors("o", opt_ref)
            t_fast, m_fast = optimizer_tensors("o", opt_fast)
            load_optimizer_tensors("o", opt_fast, t_ref, m_ref)
            load_optimizer_tensors("o", opt_ref, t_fast, m_fast)
            assert opt_fast.param_groups[0]["fused"] and not opt_ref.param_groups[0]["fused"]
        for p, o in ((fast, opt_fast), (ref, opt_ref)):
            p.grad = gr.clone()
            o.step()
    assert (fast - init).abs().max() > 1e-2  # it moved
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)


def test_expression_recentering_is_exact_and_removes_the_offset(tiny_dataset, tmp_path):
    root, head = tiny_dataset
    cfg = _cfg(4, encoder=True, encoder_res=32, encoder_pretrain_iters=0, recenter_expr_every=0)
    tr = Trainer(root, tmp_path / "r", cfg, head=head)
    tr.encoder.config.freeze_bn = True
    tr.encoder.train()
    for _ in range(3):
        tr.train_step()
    E = tr.avatar.num_expr
    with torch.no_grad():  # the encoder drifted by a constant offset (the gauge the loss cannot see)
        tr.encoder.expression_layers[0].bias[:E] += 0.7
    tr.enc_bank[:, :E] = tr.tracked_expr + 0.7 + 0.01 * torch.randn_like(tr.tracked_expr)
    tr.enc_bank_filled[:] = True
    tr.encoder.eval()
    s = tr.train_set[1]
    with torch.no_grad():
        before_f, before_e = tr.frame_params(s, "train", 1)
        before = tr.avatar.deform(before_f).means
        c = tr.recenter_expressions()
        after_f, after_e = tr.frame_params(s, "train", 1)
        after = tr.avatar.deform(after_f).means
    assert (c - 0.7).abs().max() < 0.03
    torch.testing.assert_close(after_e["expr"], before_e["expr"] - c, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)  # every Gaussian stays where it was
    off = (tr.enc_bank[:, :E] - tr.tracked_expr).mean(0)
    assert off.abs().max() < 1e-5
    # not applicable without an encoder
    tr2 = Trainer(root, tmp_path / "s", _cfg(2), head=head)
    assert tr2.recenter_expressions() is None


def test_evaluation_reports_tracked_driving_beside_encoder_driving(tiny_dataset, tmp_path, monkeypatch):
    import hravatar.train.model
    from hravatar.eval.evaluate import evaluate

    root, head = tiny_dataset
    Trainer(root, tmp_path / "e", _cfg(4, encoder=True, encoder_res=32, encoder_pretrain_iters=2), head=head).run()
    res = evaluate(tmp_path / "e", root, "cpu")
    assert res["psnr_tracked"] is not None and res["psnr_tracked"] != res["psnr"]
    # an encoder that returns the tracked parameters makes the two figures the same
    monkeypatch.setattr(hravatar.train.model, "encoded_frame", lambda enc, f, *a: (f, None))
    same = evaluate(tmp_path / "e", root, "cpu")
    assert same["psnr_tracked"] == pytest.approx(same["psnr"], abs=1e-9)
    assert same["psnr_mean_expr"] != pytest.approx(same["psnr"], abs=1e-6)
    # an encoder that returns the training frames' mean expression, eyelids and jaw on every
    # frame (tracked head pose) scores the constant baseline
    from hravatar.avatar.gaussians import FrameParams
    from hravatar.data import HeadVideoDataset

    ds = HeadVideoDataset(root, "train", device="cpu", preload=False)
    m = ds.frame_params(ds.frame_indices)

    def constant(enc, f, *a):
        pose = f.pose.clone()
        pose[:, 2] = m.pose[:, 2].mean(0)
        return FrameParams(m.expr.mean(0, keepdim=True), pose, m.eyelids.mean(0, keepdim=True), f.transl), None

    monkeypatch.setattr(hravatar.train.model, "encoded_frame", constant)
    const = evaluate(tmp_path / "e", root, "cpu")
    assert const["psnr_mean_expr"] == pytest.approx(const["psnr"], abs=1e-9)
    Trainer(root, tmp_path / "n", _cfg(2, encoder=False), head=head).run()
    res_n = evaluate(tmp_path / "n", root, "cpu")
    assert res_n["psnr_tracked"] is None and res_n["psnr_mean_expr"] is None


@pytest.mark.skipif(not __import__("hravatar.render.numba_raster", fromlist=["x"]).numba_available(), reason="needs numba")
def test_absgrad_densification_trains_on_the_cpu_and_is_refused_where_it_is_not_computed(tiny_dataset, tmp_path, monkeypatch):
    """``densify.absgrad`` grows by AbsGS's statistic (the numba pass computes it); the torch
    and gsplat passes do not, so the trainer refuses at start rather than at the first growth."""
    root, head = tiny_dataset
    cfg = _cfg(20, densify=DensifySettings(start=4, every=4, stop_before_end=4, reset_every=1000, grad_threshold=1e-9, absgrad=True))
    tr = Trainer(root, tmp_path / "run", cfg, head=head, device="cpu")
    n0 = tr.avatar.num_gaussians
    tr.run()
    assert tr.avatar.num_gaussians > n0
    import hravatar.render.rasterize as rz

    monkeypatch.setattr(rz, "select_backend", lambda device, requested="auto": "gsplat")
    with pytest.raises(ValueError, match="absgrad needs the numba"):
        Trainer(root, tmp_path / "run2", cfg, head=head, device="cpu")


def test_weight_averaging_gives_the_mean_of_the_last_iterates_and_survives_a_kill(tiny_dataset, tmp_path):
    root, head = tiny_dataset
    cfg = _cfg(20, average_last=4)  # densification stops 4 iterations before the end
    full = Trainer(root, tmp_path / "a", cfg, head=head)
    seen = []
    update = full.update_average

    def spy():
        update()
        if full.iteration > full.total - 4:
            seen.append({n: v.detach().clone() for n, v in full._averaged().items()})

    full.update_average = spy
    full.run()
    assert len(seen) == 4
    final = full._averaged()
    for n, v in final.items():  # brute force: the plain mean of the four iterates
        torch.testing.assert_close(v, torch.stack([s[n] for s in seen]).mean(0), atol=1e-6, rtol=1e-5)
    assert not torch.equal(final["params.means"], seen[-1]["params.means"])
    b = load_checkpoint(tmp_path / "a" / "avatar.safetensors")
    torch.testing.assert_close(b.avatar.params["means"], final["params.means"])
    # killed inside the window: the running mean is in the training state and resumes
    part = Trainer(root, tmp_path / "b", cfg, head=head)
    part.run(stop_flag=lambda: part.iteration >= 18)
    resumed = Trainer(root, tmp_path / "b", cfg, head=head)
    assert resumed.resume() and resumed.avg_count == 2
    resumed = Trainer(root, tmp_path / "b", cfg, head=head)
    resumed.run(resume=True)
    assert resumed.avg is None  # applied at the end
    assert abs(full.quick_eval()["psnr"] - resumed.quick_eval()["psnr"]) < 0.2
    # averaging across a densification step would mix different Gaussians
    with pytest.raises(ValueError, match="average_last"):
        Trainer(root, tmp_path / "c", _cfg(20, average_last=5), head=head)


def test_surface_losses_pull_gaussians_back_onto_the_mesh_and_follow_densification(tiny_dataset, tmp_path):
    from hravatar.train.config import LossConfig

    root, head = tiny_dataset
    loss_cfg = LossConfig(surface=1.0, surface_tol=1e-3, surface_normal=1.0, surface_max_tilt=10.0, surface_regions=("face",),
                          surface_every=1000)
    cfg = _cfg(16, loss=loss_cfg, densify=DensifySettings(start=4, every=4, stop_before_end=4, reset_every=1000, grad_threshold=1e-9))
    tr = Trainer(root, tmp_path / "run", cfg, head=head, device="cpu")
    dist0, tilt0 = tr.surface_losses(0)
    assert float(dist0.detach()) == 0.0 and float(tilt0.detach()) < 1e-6  # flat discs initialised on the mesh
    quats = tr.avatar.params["quats"]
    q0 = quats.detach().clone()
    with torch.no_grad():  # tilt every disc by 40 degrees about its first in-plane axis
        c, s_ = math.cos(math.radians(20.0)), math.sin(math.radians(20.0))
        quats.copy_(quat_multiply(F.normalize(quats, dim=-1), torch.tensor([c, s_, 0.0, 0.0]).expand_as(quats)))
    tilt = tr.surface_losses(0)[1]
    face = tr.surface.lookup(tr.avatar.params["means"])[2].bool()
    assert float(tilt.detach()) == pytest.approx((1 - math.cos(math.radians(40.0))) - (1 - math.cos(math.radians(10.0))), rel=1e-4)
    tilt.backward()
    assert torch.all(quats.grad[~face] == 0) and quats.grad[face].abs().sum() > 0
    with torch.no_grad():  # a small step down that gradient straightens them
        quats -= 1e-2 * quats.grad / quats.grad.abs().max()
    assert float(tr.surface_losses(0)[1].detach()) < float(tilt.detach())
    quats.grad = None
    with torch.no_grad():
        quats.copy_(q0)
    means = tr.avatar.params["means"]
    with torch.no_grad():
        means += 5e-3 * tr._anchors[1]  # 5 mm out along the normals: 4 tolerances beyond the band
    tr._anchors = None
    before = tr.surface_losses(1)[0]
    assert float(before.detach()) == pytest.approx(4.0, rel=1e-3)
    before.backward()
    g = means.grad
    assert torch.all(g[~face] == 0) and torch.all((g[face] * tr._anchors[1][face]).sum(-1) > 0)  # pushes back inward
    means.grad = None
    tr.run()
    n = tr.avatar.num_gaussians
    assert n > face.numel()  # densification replaced the parameters: the anchors followed
    assert tr._anchors[0].shape[0] == n and tr._anchors[3] is tr.avatar.params["means"]
    assert float(tr.surface_losses(tr.iteration)[0].detach()) < float(before.detach())
