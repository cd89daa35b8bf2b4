"""The HRAvatar optimisation: one trainer for every profile and ablation, resumable, event-driven."""
from __future__ import annotations

import errno
import json
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hravatar.avatar.gaussians import FrameParams, GaussianAvatar
from hravatar.io.checkpoint import AvatarBundle, save_checkpoint
from hravatar.io.safe import CheckpointError
from hravatar.render.camera import Camera

from .config import TrainConfig
from .events import EventBus
from .model import encoded_frame, face_crop_boxes, forward_render
from .losses import SurfaceAnchors, edge_aware_smoothness, eyelid_loss, flatness_loss, jaw_loss, normal_consistency_loss, normals_from_depth, photometric_loss, surface_distance_loss, surface_normal_loss, total_variation
from .state import load_optimizer_tensors, load_train_state, optimizer_tensors, save_train_state

#: Which learning-rate group each per-Gaussian parameter belongs to.
PARAM_GROUPS = {
    "means": "means", "quats": "quats", "scales": "scales", "opacities": "opacities",
    "albedo": "material", "roughness": "material", "f0": "material",
    "shapedirs": "bases", "exprdirs": "bases", "posedirs": "bases", "eyelid_dirs": "bases",
    "lbs_weights": "lbs_weights",
}


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (NaN, disk full, user request); the message is one line."""


def expon_lr(step: int, lr_init: float, lr_final: float, max_steps: int, delay_steps: int = 0, delay_mult: float = 1.0) -> float:
    """3DGS's log-linear learning-rate decay with an optional sinusoidal warm-up delay."""
    if lr_init == 0.0 and lr_final == 0.0:
        return 0.0
    delay = 1.0
    if delay_steps > 0:
        delay = delay_mult + (1 - delay_mult) * math.sin(0.5 * math.pi * min(max(step / delay_steps, 0.0), 1.0))
    t = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return delay * math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)


def adam(params, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam, fused where the device has the fused kernel (CPU and CUDA): one pass over each
    tensor instead of a dozen. On the 2-core CPU that is 81 -> 6 ms a step for the expression
    bases of 40K Gaussians; the arithmetic is the same."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=fused or None)


def head_spec_from_identity(identity: str) -> str:
    """The ``load_head_model`` spec a dataset's head identity refers to."""
    if identity.startswith(("flame:", "ict:")):
        return identity.rsplit(":", 1)[0] if identity.count(":") > 1 else identity
    return "builtin"


class Trainer:
    """Optimises a :class:`GaussianAvatar`, learned lighting and the expression encoder.

    Args:
        data_root: a dataset in the hravatar format (docs/dataset-format.md).
        run_dir: output folder: ``avatar.safetensors`` (checkpoint), ``state.safetensors``
            (resumable state), ``events.jsonl``, ``previews/``.
        config: :class:`TrainConfig`.
        device: torch device (CUDA when available if None).
        bus: event bus; listeners subscribe to it.
    """

    def __init__(self, data_root: str | Path, run_dir: str | Path, config: TrainConfig, device=None, bus: EventBus | None = None,
                 head=None) -> None:
        from hravatar.data import HeadVideoDataset

        self.cfg = config
        self.run_dir = Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bus = bus or EventBus()
        self.train_set = HeadVideoDataset(data_root, "train", resolution=config.resolution, device=self.device)
        self.test_set = HeadVideoDataset(data_root, "test", resolution=config.resolution, device=self.device)
        self.data_root = Path(data_root)
        if config.camera_response == "auto":
            declared = (self.train_set.meta.synthetic or {}).get("camera_response", "none")
            self.cfg = config = replace(config, camera_response=declared)
        n_train = len(self.train_set)
        self.total = config.iterations or config.epochs * n_train
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        if head is None:
            from hravatar.head import load_head_model

            head = load_head_model(self.train_set.meta.head_spec or head_spec_from_identity(self.train_set.meta.head))
        self.avatar = GaussianAvatar.from_head(head, config.avatar, beta=self.train_set.beta.cpu()).to(self.device)
        self._init_lighting()
        self._init_encoder()
        self.deform_mlp = None
        self.rig = None
        if config.deformation == "mesh":
            from hravatar.avatar.mesh_rig import MeshRig

            self.rig = MeshRig(head, self.avatar.beta.cpu()).to(self.device)
        elif config.deformation == "mlp":
            from hravatar.avatar.mlp_deform import SharedDeformMLP

            self.deform_mlp = SharedDeformMLP(self.avatar.num_expr).to(self.device)
        elif config.deformation not in ("learnable", "fixed"):
            raise ValueError(f"unknown deformation '{config.deformation}' (learnable, fixed, mlp or mesh)")
        if config.average_last > config.densify.stop_before_end:
            raise ValueError(f"average_last ({config.average_last}) must not exceed densify.stop_before_end "
                             f"({config.densify.stop_before_end}): weights are averaged only once the Gaussian count is fixed")
        if config.loss.background not in ("black", "random"):
            raise ValueError(f"unknown training background '{config.loss.background}' (black or random)")
        use_surface = config.loss.surface > 0 or config.loss.surface_normal > 0
        self.surface = SurfaceAnchors(head, self.avatar.beta, config.loss.surface_regions) if use_surface else None
        self._anchors: tuple | None = None  # (anchors, normals, weights, the means parameter they were found for)
        from hravatar.shading import load_brdf_lut

        self.brdf_lut = load_brdf_lut(self.device)
        self._build_optimizers()
        self._init_strategy()
        self.iteration = 0
        self._order: list[int] = []
        self.avg: dict[str, Tensor] | None = None  # running mean of the last iterates (cfg.average_last)
        self.avg_count = 0

    # ------------------------------------------------------------------ setup
    def _init_lighting(self) -> None:
        from hravatar.shading import LearnedLighting

        self.light = LearnedLighting(**asdict(self.cfg.light)).to(self.device)

    def _init_encoder(self) -> None:
        self.encoder = None
        self.crop_boxes = None
        if not self.cfg.encoder:
            return
        from hravatar.encoder import EncoderConfig, ExpressionEncoder

        self.encoder = ExpressionEncoder(EncoderConfig(n_expr=self.avatar.num_expr, input_size=self.cfg.encoder_res)).to(self.device)
        if self.cfg.encoder_weights:
            from hravatar.encoder import load_smirk_weights

            load_smirk_weights(self.encoder, self.cfg.encoder_weights)
        self.crop_boxes = {"train": face_crop_boxes(self.train_set, self.device), "test": face_crop_boxes(self.test_set, self.device)}
        # the encoder's latest (expression, eyelids, jaw) on each training frame: what the cycle loss samples from
        E = self.avatar.num_expr
        self.enc_bank = torch.zeros(len(self.train_set), E + 2 + 3, device=self.device)
        self.enc_bank_filled = torch.zeros(len(self.train_set), dtype=torch.bool, device=self.device)
        tracked = self.train_set.frame_params(self.train_set.frame_indices).expr
        self.tracked_expr = torch.zeros(len(self.train_set), E, device=self.device)
        self.tracked_expr[:, : min(E, tracked.shape[1])] = tracked[:, :E]

    @torch.no_grad()
    def recenter_expressions(self) -> Tensor | None:
        """Remove the constant offset between the encoder's expressions and the tracked ones.

        (canonical means, expression) -> (means + exprdirs c, expression - c) leaves every
        deformed Gaussian where it was, so the photometric loss cannot see c, and end to end
        training lets it drift: on the synthetic benchmark the encoder's expressions ended up
        0.65 RMS away from the tracked ones (which have RMS 0.12), almost all of it one
        constant offset. The avatar then looks wrong at zero expression, with the tracked
        sequence and under sliders or landmark driving, all of which speak the head model's
        expression space. Shifting the means by exprdirs c and the encoder's expression bias
        by -c, with c the mean offset over the frames seen so far, is exact for the linear
        expression outputs and the per-Gaussian bases (learnable and fixed deformation).

        Returns:
            c [E], or None when not applicable.
        """
        if self.encoder is None or self.cfg.deformation not in ("learnable", "fixed") or not bool(self.enc_bank_filled.any()):
            return None
        E = self.avatar.num_expr
        filled = self.enc_bank_filled
        c = (self.enc_bank[filled, :E] - self.tracked_expr[filled]).mean(0)
        self.avatar.params["means"].add_(torch.einsum("nde,e->nd", self.avatar.params["exprdirs"], c))
        self.encoder.expression_layers[0].bias[:E] -= c
        self.enc_bank[:, :E] -= c
        if self.avg is not None:  # the same reparametrisation of the running mean
            self.avg["params.means"].add_(torch.einsum("nde,e->nd", self.avg["params.exprdirs"], c))
            self.avg["encoder.expression_layers.0.bias"][:E] -= c
        return c

    # ------------------------------------------------------------------ weight averaging
    def _averaged(self) -> dict[str, Tensor]:
        """The tensors that weight averaging covers (live, not copies), by state-file name."""
        t = {f"params.{k}": v for k, v in self.avatar.params.items()}
        t["global_scale"] = self.avatar.log_global_scale
        for prefix, mod in self._modules().items():
            for k, v in mod.state_dict(keep_vars=True).items():
                if v.dtype.is_floating_point:
                    t[f"{prefix}.{k}"] = v
        return t

    @torch.no_grad()
    def update_average(self) -> None:
        """Fold the current iterate into the running mean during the last ``average_last`` iterations."""
        k = self.cfg.average_last
        if k <= 0 or self.iteration <= self.total - k:
            return
        cur = self._averaged()
        if self.avg is None or any(self.avg[n].shape != v.shape for n, v in cur.items()):
            # first iterate of the window (or the Gaussian count changed): start over
            self.avg = {n: v.detach().clone() for n, v in cur.items()}
            self.avg_count = 1
            return
        self.avg_count += 1
        for n, v in cur.items():
            self.avg[n].lerp_(v.detach(), 1.0 / self.avg_count)

    @torch.no_grad()
    def apply_average(self) -> None:
        """Replace the weights by their running mean (no-op when averaging is off)."""
        if self.avg is None:
            return
        for n, v in self._averaged().items():
            v.copy_(self.avg[n])
        self.avg = None

    def _param_lr(self, key: str) -> float:
        lr = self.cfg.lr
        group = PARAM_GROUPS[key]
        if group == "material":
            return lr.material
        if group in ("bases", "lbs_weights") and self.cfg.deformation != "learnable":
            return 0.0
        return {"means": lr.means, "quats": lr.quats, "scales": lr.scales, "opacities": lr.opacities,
                "bases": lr.bases, "lbs_weights": lr.lbs_weights}[group]

    def _build_optimizers(self) -> None:
        """One Adam per per-Gaussian parameter (what the densification strategy expects)."""
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for k, p in self.avatar.params.items():
            self.optimizers[k] = adam([p], lr=self._param_lr(k), eps=1e-15)
        self.extra_optimizers: dict[str, torch.optim.Optimizer] = {
            "global_scale": adam([self.avatar.log_global_scale], lr=self.cfg.lr.global_scale),
            "light": adam(self.light.parameters(), lr=self.cfg.lr.light),
        }
        if self.encoder is not None:
            self.extra_optimizers["encoder"] = adam(self.encoder.parameters(), lr=self.cfg.lr.encoder)
        if self.deform_mlp is not None:
            self.extra_optimizers["deform_mlp"] = adam(self.deform_mlp.parameters(), lr=self.cfg.lr.lbs_weights)

    def _init_strategy(self) -> None:
        from .strategy import DensifyConfig, DensifyStrategy

        d = self.cfg.densify
        if d.absgrad:
            from hravatar.render.rasterize import select_backend

            if select_backend(self.device, "auto") != "numba":
                raise ValueError("densify.absgrad needs the numba rasterizer pass (CPU with numba installed); "
                                 "the gsplat and pure-torch passes do not compute it here")
        self.strategy = DensifyStrategy(DensifyConfig(
            refine_start_iter=d.start, refine_every=d.every, refine_stop_iter=max(self.total - d.stop_before_end, 0),
            grow_grad2d=d.grad_threshold, reset_every=d.reset_every, prune_opa=d.prune_opacity,
            refine_scale2d_stop_iter=d.screen_prune_after, max_gaussians=d.max_gaussians, absgrad=d.absgrad,
        ))
        with torch.no_grad():
            m = self.avatar.params["means"]
            scene_scale = float((m - m.mean(0)).norm(dim=-1).max()) * 1.1
        self.strategy_state = self.strategy.initialize_state(scene_scale=scene_scale)

    # ------------------------------------------------------------------ schedules
    def _update_lrs(self, it: int) -> dict[str, float]:
        lr = self.cfg.lr
        means_lr = expon_lr(it, lr.means, lr.means_final, self.total, 0, lr.means_delay_mult)
        mat_lr = expon_lr(it, lr.material, lr.material * lr.material_final_ratio, self.total)
        for k, opt in self.optimizers.items():
            g = PARAM_GROUPS[k]
            if g == "means":
                opt.param_groups[0]["lr"] = means_lr
            elif g == "material":
                opt.param_groups[0]["lr"] = mat_lr
        return {"means": means_lr, "material": mat_lr}

    # ------------------------------------------------------------------ model evaluation
    def frame_params(self, s, split: str, i: int) -> tuple[FrameParams, dict | None]:
        """Driving parameters of sample ``s`` (frame i of ``split``): pre-tracked, with the
        encoder's expression/eyelids/jaw."""
        f = s.params.to(self.device)
        if self.encoder is None:
            return f, None
        return encoded_frame(self.encoder, f, s.image.to(self.device), self.crop_boxes[split][i], self.cfg.encoder_res)

    def render(self, frame: FrameParams, camera: Camera, iteration: int | None = None, env=None) -> dict[str, Tensor]:
        """Forward model: {"rgb": [H,W,3] pixel values over black, "gb": G-buffers}."""
        warm = iteration is not None and iteration < self.cfg.albedo_warmup
        offsets = self.deform_mlp(self.avatar.params["means"]) if self.deform_mlp is not None else None
        return forward_render(self.avatar, frame, camera, env if env is not None else self.light.environment(), self.brdf_lut,
                              response=self.cfg.camera_response, shading=self.cfg.shading, albedo_only=warm, basis_offsets=offsets,
                              rig=self.rig)

    # ------------------------------------------------------------------ training
    def _next_index(self) -> int:
        if not self._order:
            g = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.iteration)
            self._order = torch.randperm(len(self.train_set), generator=g).tolist()
        return self._order.pop()

    def pretrain_encoder(self, stop_flag=None) -> bool:
        """Regress the encoder onto the pre-tracked expression/eyelids/jaw (no SMIRK weights).
        Returns False when ``stop_flag()`` interrupted it (nothing is saved: it is cheap to redo)."""
        if self.encoder is None or self.cfg.encoder_pretrain_iters <= 0:
            return True
        opt = torch.optim.Adam(self.encoder.parameters(), lr=1e-4)
        from hravatar.encoder.crop import crop_and_resize

        n = len(self.train_set)
        for it in range(self.cfg.encoder_pretrain_iters):
            if stop_flag is not None and stop_flag():
                return False
            idx = [random.randrange(n) for _ in range(4)]
            imgs = torch.stack([self.train_set[i].image for i in idx]).to(self.device).permute(0, 3, 1, 2)
            crops = crop_and_resize(imgs, self.crop_boxes["train"][idx], out=self.cfg.encoder_res)
            out = self.encoder(crops)
            f = self.train_set.frame_params([self.train_set.frame_indices[i] for i in idx]).to(self.device)
            E = out["expr"].shape[-1]
            loss = ((out["expr"] - f.expr[:, :E]) ** 2).mean() + ((out["eyelids"] - f.eyelids) ** 2).mean() \
                + ((out["jaw"] - f.pose[:, 2]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % 20 == 0:
                self.bus.emit("encoder_pretrain", it, loss=float(loss.detach()), total=self.cfg.encoder_pretrain_iters)
        # end-to-end training sees one image at a time: keep the batch statistics learned here
        self.encoder.config.freeze_bn = True
        self.encoder.train()
        return True

    def _background(self, it: int) -> Tensor:
        """[3] training background colour of iteration ``it`` (reproducible across resumes)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + it)
        return torch.rand(3, generator=g).to(self.device)

    def cycle_sample(self, it: int) -> tuple[FrameParams, Camera, Tensor, Tensor]:
        """Driving values the avatar was not trained on, for the encoder's cycle loss.

        Each of the E + 2 + 3 encoder outputs is taken from a different (random) training frame's
        bank row, and the vector is scaled by one factor drawn from ``loss.cycle_scale``; global
        pose, neck, eyes, translation, camera and crop box come from one random training frame.
        Reproducible across resumes (the generator is seeded by the iteration).

        Returns:
            (frame params, camera, crop box [4], target [E + 5] = expression, eyelids, jaw).
        """
        g = torch.Generator().manual_seed(self.cfg.seed * 104729 + it)
        rows = self.enc_bank_filled.nonzero()[:, 0].cpu()
        D = self.enc_bank.shape[1]
        pick = rows[torch.randint(len(rows), (D,), generator=g)].to(self.device)
        lo, hi = self.cfg.loss.cycle_scale
        scale = lo + (hi - lo) * float(torch.rand(1, generator=g))
        v = self.enc_bank[pick, torch.arange(D, device=self.device)] * scale
        E = D - 5
        # keep the values inside the encoder's output ranges (eyelids [0, 1], jaw as its clamps)
        v[E:E + 2] = v[E:E + 2].clamp(0, 1)
        v[E + 2] = v[E + 2].clamp(min=0)
        lim = self.encoder.config.jaw_side_limit
        v[E + 3:] = v[E + 3:].clamp(-lim, lim)
        k = int(torch.randint(len(self.train_set), (1,), generator=g))
        s = self.train_set[k]
        frame = s.params.to(self.device).with_expression(v[None, :E], v[None, E:E + 2], v[E + 2:])
        return frame, s.camera.to(self.device), self.crop_boxes["train"][k], v

    def cycle_loss(self, it: int) -> Tensor:
        """Squared error of the encoder's reading of an avatar render with known values (see ``cycle_sample``)."""
        from hravatar.encoder import output_regression_loss
        from hravatar.encoder.crop import crop_and_resize

        frame, cam, box, target = self.cycle_sample(it)
        with torch.no_grad():
            img = self.render(frame, cam, iteration=it)["rgb"].clamp(0, 1)
        out = self.encoder(crop_and_resize(img.permute(2, 0, 1)[None], box[None], out=self.cfg.encoder_res))
        return output_regression_loss(out["raw"], target[None], self.encoder.config.jaw_side_limit)

    def train_step(self) -> dict[str, float]:
        it = self.iteration
        cfg = self.cfg
        lrs = self._update_lrs(it)
        i = self._next_index()
        s = self.train_set[i]
        frame, enc = self.frame_params(s, "train", i)
        cam = s.camera.to(self.device)
        out = self.render(frame, cam, iteration=it)
        gb = out["gb"]
        info = gb.raster.info()
        self.strategy.step_pre_backward(self.avatar.params, self.optimizers, self.strategy_state, it, info)
        image = s.image.to(self.device)
        gt, pred = image, out["rgb"]
        if cfg.loss.background == "random":
            bg = self._background(it)
            pred = pred + (1 - gb.alpha) * bg
            gt = gt + (1 - s.mask.to(self.device)) * bg  # frames are foreground over black (premultiplied)
        loss, logs = photometric_loss(pred, gt, cfg.loss.l1, cfg.loss.dssim)
        if enc is not None:
            self.enc_bank[i] = torch.cat([enc["expr"], enc["eyelids"], enc["jaw"]], -1)[0].detach()
            self.enc_bank_filled[i] = True
            if cfg.loss.cycle > 0 and it >= cfg.loss.cycle_start and it % cfg.loss.cycle_every == 0:
                lc = self.cycle_loss(it)
                loss = loss + cfg.loss.cycle * lc
                logs["cycle"] = lc.detach()
        if enc is not None and cfg.loss.jaw > 0:
            E = self.avatar.num_expr
            lj = jaw_loss(enc["raw"][:, E + 2 : E + 5], s.params.pose[:, 2].to(self.device), self.encoder.config.jaw_side_limit)
            loss = loss + cfg.loss.jaw * lj
            logs["jaw"] = lj.detach()
        if enc is not None and cfg.loss.eyelids > 0:
            E = self.avatar.num_expr
            le = eyelid_loss(enc["raw"][:, E : E + 2], s.params.eyelids.to(self.device))
            loss = loss + cfg.loss.eyelids * le
            logs["eyelids"] = le.detach()
        if cfg.loss.normal > 0:
            depth = gb.depth if cfg.loss.normal_depth_grad else gb.depth.detach()
            dn = normals_from_depth(depth, cam)
            ln = normal_consistency_loss(gb.normal, dn, gb.alpha, cfg.loss.normal_alpha_min, cfg.loss.normal_depth_grad)
            loss = loss + cfg.loss.normal * ln
            logs["normal"] = ln.detach()
        if cfg.loss.rough_tv > 0 and cfg.shading == "pbr":
            tv = total_variation(gb.roughness, s.mask.to(self.device))
            loss = loss + cfg.loss.rough_tv * tv
            logs["rough_tv"] = tv.detach()
        if cfg.loss.albedo_smooth > 0 and cfg.shading == "pbr":
            las = edge_aware_smoothness(gb.albedo, image, s.mask.to(self.device))
            loss = loss + cfg.loss.albedo_smooth * las
            logs["albedo_smooth"] = las.detach()
        if cfg.loss.albedo > 0 and s.albedo is not None and it % cfg.loss.albedo_every == 0:
            la = ((gb.albedo - s.albedo.to(self.device)).abs() * s.mask.to(self.device)).mean()
            loss = loss + cfg.loss.albedo * la
            logs["albedo"] = la.detach()
        if cfg.loss.flatness > 0:
            lf = flatness_loss(self.avatar.params["scales"], cfg.loss.flatness_max_ratio)
            loss = loss + cfg.loss.flatness * lf
            logs["flatness"] = lf.detach()
        if self.surface is not None:
            ls, lt = self.surface_losses(it)
            loss = loss + cfg.loss.surface * ls + cfg.loss.surface_normal * lt
            logs["surface"] = ls.detach()
            logs["surface_normal"] = lt.detach()
        if cfg.loss.alpha_mask > 0:
            lm = (gb.alpha - s.mask.to(self.device)).abs().mean()
            loss = loss + cfg.loss.alpha_mask * lm
            logs["mask"] = lm.detach()
        if not torch.isfinite(loss):
            raise TrainingStopped(f"loss became {float(loss.detach())} at iteration {it}; the last good checkpoint is kept in {self.run_dir}")
        loss.backward()
        self.strategy.step_post_backward(self.avatar.params, self.optimizers, self.strategy_state, it, info, packed=False)
        for opt in list(self.optimizers.values()) + list(self.extra_optimizers.values()):
            opt.step()
            opt.zero_grad(set_to_none=True)
        logs["total"] = loss.detach()
        self.iteration += 1
        return {k: float(v) for k, v in logs.items()} | {"_lr_means": lrs["means"]}

    def surface_losses(self, it: int) -> tuple[Tensor, Tensor]:
        """(:func:`surface_distance_loss`, :func:`surface_normal_loss`) of the canonical (shaped)
        Gaussians against the tracked head mesh; the anchors are re-found every
        ``loss.surface_every`` iterations and whenever densification replaced the means."""
        from hravatar.avatar.gaussians import thin_axes
        from hravatar.utils.rotation import quat_to_matrix

        p, lc = self.avatar.params, self.cfg.loss
        x = self.avatar.canonical_means()
        a = self._anchors
        if a is None or a[3] is not p["means"] or it % lc.surface_every == 0:
            a = self._anchors = (*self.surface.lookup(x), p["means"])
        dist = surface_distance_loss(x, a[0], a[1], a[2], lc.surface_tol)
        if lc.surface_normal <= 0:
            return dist, dist.new_zeros(())
        axes = thin_axes(quat_to_matrix(F.normalize(p["quats"], dim=-1)), p["scales"].detach())  # canonical
        return dist, surface_normal_loss(axes, a[1], a[2], lc.surface_max_tilt)

    # ------------------------------------------------------------------ evaluation during training
    @torch.no_grad()
    def quick_eval(self, n: int | None = None) -> dict[str, float]:
        from hravatar.eval.metrics import psnr

        n = min(n or self.cfg.eval_frames, len(self.test_set))
        idx = np.linspace(0, len(self.test_set) - 1, n).round().astype(int).tolist() if n > 0 else []
        vals = []
        for i in idx:
            s = self.test_set[i]
            frame, _ = self.frame_params(s, "test", i)
            out = self.render(frame, s.camera.to(self.device))
            vals.append(psnr(out["rgb"].clamp(0, 1), s.image.to(self.device)))
        return {"psnr": float(np.mean(vals)) if vals else float("nan")}

    @torch.no_grad()
    def save_preview(self) -> Path:
        import imageio.v3 as iio

        from hravatar.io.safe import atomic_write_bytes

        s = self.test_set[0] if len(self.test_set) else self.train_set[0]
        split = "test" if len(self.test_set) else "train"
        frame, _ = self.frame_params(s, split, 0)
        out = self.render(frame, s.camera.to(self.device), iteration=self.iteration)
        img = torch.cat([s.image.to(self.device), out["rgb"].clamp(0, 1)], 1)
        arr = (img.cpu().numpy() * 255 + 0.5).astype(np.uint8)
        path = self.run_dir / "previews" / f"{self.iteration:06d}.png"
        atomic_write_bytes(path, iio.imwrite("<bytes>", arr, extension=".png"))
        return path

    # ------------------------------------------------------------------ checkpoints
    def _modules(self) -> dict[str, nn.Module]:
        """The trained modules besides the Gaussians, by state-file prefix."""
        mods = {"light": self.light, "encoder": self.encoder, "deform_mlp": self.deform_mlp, "rig": self.rig}
        return {k: m for k, m in mods.items() if m is not None}

    def bundle(self) -> AvatarBundle:
        """The current avatar as a checkpoint bundle (learned light, encoder, tracked sequence)."""
        extra = {}
        if self.encoder is not None:
            extra = {f"encoder.{k}": v.detach() for k, v in self.encoder.state_dict().items()}
        if self.rig is not None:
            extra["rig.binding"] = self.rig.binding.detach()
        ts = self.train_set
        seq = ts.frame_params(ts.frame_indices)
        cam = ts[0].camera
        avatar = self.avatar
        if self.deform_mlp is not None:  # checkpoints hold plain per-Gaussian bases: bake the MLP in
            with torch.no_grad():
                avatar = self.avatar.with_offsets(self.deform_mlp(self.avatar.params["means"]))
        return AvatarBundle(
            avatar, {k: v.detach() for k, v in self.light.state_dict().items()}, asdict(self.cfg.light), seq, cam, extra,
            {"data": {"root": str(self.data_root), "frames": len(ts) + len(self.test_set), "train": len(ts),
                      "test": len(self.test_set), "head": ts.meta.head, "fps": ts.meta.fps},
             "train": {"iteration": self.iteration, "total": self.total, "profile": self.cfg.profile},
             "train_config": self.cfg.to_dict()},
        )

    def save(self) -> Path:
        """Write ``avatar.safetensors`` and ``state.safetensors`` atomically; returns the checkpoint path."""
        ck = self.run_dir / "avatar.safetensors"
        try:
            save_checkpoint(ck, self.bundle())
            t: dict[str, Tensor] = {}
            meta: dict = {"iteration": self.iteration, "total": self.total, "order": self._order, "config": self.cfg.to_dict(),
                          "optimizers": {}}
            for k, v in self.avatar.params.items():
                t[f"params.{k}"] = v.detach()
            t["global_scale"] = self.avatar.log_global_scale.detach().reshape(1)
            for prefix, mod in self._modules().items():
                t.update({f"{prefix}.{k}": v for k, v in mod.state_dict().items()})
            for name, opt in list(self.optimizers.items()) + [(f"x_{k}", o) for k, o in self.extra_optimizers.items()]:
                ot, om = optimizer_tensors(f"opt.{name}", opt)
                t.update(ot)
                meta["optimizers"][name] = om
            st_meta = {}
            for k, v in self.strategy_state.items():
                if torch.is_tensor(v):
                    t[f"strategy.{k}"] = v
                else:
                    st_meta[k] = v
            meta["strategy"] = st_meta
            if self.encoder is not None:
                t["cycle.bank"] = self.enc_bank.detach()
                t["cycle.filled"] = self.enc_bank_filled
            if self.avg is not None:
                t.update({f"avg.{n}": v for n, v in self.avg.items()})
                meta["avg_count"] = self.avg_count
            t["rng.torch"] = torch.get_rng_state()
            save_train_state(self.run_dir / "state.safetensors", t, meta)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise TrainingStopped(f"disk full while writing a checkpoint in {self.run_dir}; the previous checkpoint is intact") from None
            raise
        return ck

    def resume(self) -> bool:
        """Continue from ``state.safetensors`` if present. Returns whether a state was loaded."""
        path = self.run_dir / "state.safetensors"
        if not path.exists():
            return False
        t, meta = load_train_state(path)
        # cadence options may change between runs; everything that shapes the result may not
        free = ("iterations", "checkpoint_every", "eval_every", "eval_frames", "preview_every", "log_every")
        # options added since the state was written read as their defaults (which keep the old behaviour)
        old_cfg = TrainConfig.from_dict(meta["config"]).to_dict()
        old = {k: v for k, v in json.loads(json.dumps(old_cfg)).items() if k not in free}
        new = {k: v for k, v in json.loads(json.dumps(self.cfg.to_dict())).items() if k not in free}
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CheckpointError(f"{path}: was written with a different configuration ({', '.join(diff)}); use the same options or a new --out")
        with torch.no_grad():
            for k in list(self.avatar.params.keys()):
                self.avatar.params[k] = nn.Parameter(t[f"params.{k}"].to(self.device))
            self.avatar.log_global_scale.copy_(t["global_scale"].reshape(()))
            for prefix, mod in self._modules().items():
                mod.load_state_dict({k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + ".")})
        self._build_optimizers()
        for name, opt in list(self.optimizers.items()) + [(f"x_{k}", o) for k, o in self.extra_optimizers.items()]:
            load_optimizer_tensors(f"opt.{name}", opt, {k: v.to(self.device) for k, v in t.items()}, meta["optimizers"][name])
        self.strategy_state = dict(meta.get("strategy", {}))
        for k, v in t.items():
            if k.startswith("strategy."):
                self.strategy_state[k[len("strategy."):]] = v.to(self.device)
        if self.encoder is not None and "cycle.bank" in t:
            self.enc_bank = t["cycle.bank"].to(self.device)
            self.enc_bank_filled = t["cycle.filled"].to(self.device)
        avg = {k[len("avg."):]: v.to(self.device) for k, v in t.items() if k.startswith("avg.")}
        self.avg, self.avg_count = (avg, int(meta["avg_count"])) if avg else (None, 0)
        self.iteration = int(meta["iteration"])
        self._order = list(meta.get("order", []))
        torch.set_rng_state(t["rng.torch"])
        return True

    # ------------------------------------------------------------------ main loop
    def run(self, resume: bool = False, stop_flag=None) -> Path | None:
        """Train to the end (or until ``stop_flag()`` is true); returns the checkpoint path
        (None when stopped during the encoder pre-training, before anything was saved)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resume() if resume else False
        if not resumed and self.iteration == 0 and not self.cfg.encoder_weights:
            if not self.pretrain_encoder(stop_flag):
                self.bus.emit("stopped", 0, path="")
                return None
        elif self.encoder is not None:
            self.encoder.config.freeze_bn = True
            self.encoder.train()
        cfg = self.cfg
        self.bus.emit("start", self.iteration, total=self.total, num_gaussians=self.avatar.num_gaussians,
                      resumed=resumed, device=str(self.device), profile=cfg.profile)
        t_last = time.time()
        it_last = self.iteration
        try:
            while self.iteration < self.total:
                if stop_flag is not None and stop_flag():
                    self.save()
                    self.bus.emit("stopped", self.iteration, path=str(self.run_dir / "avatar.safetensors"))
                    return self.run_dir / "avatar.safetensors"
                logs = self.train_step()
                it = self.iteration
                if cfg.recenter_expr_every and it % cfg.recenter_expr_every == 0:
                    self.recenter_expressions()
                self.update_average()
                if it == self.total:
                    self.apply_average()
                if it % cfg.log_every == 0 or it == self.total:
                    now = time.time()
                    its = (it - it_last) / max(now - t_last, 1e-9)
                    t_last, it_last = now, it
                    lr_means = logs.pop("_lr_means")
                    self.bus.emit("iter", it, losses=logs, lrs={"means": lr_means}, num_gaussians=self.avatar.num_gaussians,
                                  its=its, eta_s=(self.total - it) / max(its, 1e-9), total=self.total)
                if it % cfg.eval_every == 0 or it == self.total:
                    self.bus.emit("eval", it, **self.quick_eval())
                if it % cfg.preview_every == 0:
                    self.bus.emit("preview", it, path=str(self.save_preview()))
                if it % cfg.checkpoint_every == 0 and it < self.total:
                    self.bus.emit("checkpoint", it, path=str(self.save()))
            path = self.save()
            self.bus.emit("done", self.iteration, path=str(path))
            return path
        except TrainingStopped as e:
            self.bus.emit("error", self.iteration, message=str(e))
            raise
