"""``hravatar eval``: self-reenactment metrics on the test frames, plus ground-truth relighting,
albedo and normal errors on synthetic data."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hravatar.avatar.gaussians import FrameParams
from hravatar.io.checkpoint import AvatarBundle, load_checkpoint
from hravatar.io.safe import atomic_write_bytes


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder's ``avatar.safetensors``, or the file itself."""
    p = Path(path)
    return p / "avatar.safetensors" if p.is_dir() else p


def _train_config(bundle: AvatarBundle):
    from hravatar.train.config import TrainConfig

    return TrainConfig.from_dict(bundle.meta.get("train_config", {}))


def _encoder_from_bundle(bundle: AvatarBundle, cfg, device):
    if not cfg.encoder or not any(k.startswith("encoder.") for k in bundle.extra):
        return None
    from hravatar.encoder import EncoderConfig, ExpressionEncoder, load_encoder_state

    enc = ExpressionEncoder(EncoderConfig(n_expr=bundle.avatar.num_expr, input_size=cfg.encoder_res)).to(device)
    load_encoder_state(enc, bundle.extra, prefix="encoder.", source="checkpoint")
    return enc.eval()


def _mean_training_expression(ds) -> tuple:
    """(expr [1, E], eyelids [1, 2], jaw [3]): the mean tracked values of the training split."""
    f = ds.frame_params(ds.meta.split_indices("train"))
    return f.expr.mean(0, keepdim=True), f.eyelids.mean(0, keepdim=True), f.pose[:, 2].mean(0)


@torch.no_grad()
def evaluate(checkpoint: str | Path, data: str | Path, device=None, max_frames: int | None = None,
             strip_path: str | Path | None = None) -> dict:
    """Evaluate a trained avatar on the dataset's test frames.

    Returns:
        {"psnr", "ssim", "mae100", "lpips" (None unless LPIPS weights are local), "frames",
         "psnr_tracked" (PSNR when driven by the dataset's tracked parameters instead of the
         encoder's: what sliders and landmark driving get; None without an encoder),
         "psnr_mean_expr" (PSNR when every test frame gets the training frames' mean tracked
         expression, eyelids and jaw, with its tracked head pose: the floor a learned encoder
         has to beat; None without an encoder),
         and on synthetic data "relight_psnr", "relight_ssim", "relight" (per environment),
         "albedo_lmse", "normal_cos"}.
    """
    from hravatar.data import HeadVideoDataset
    from hravatar.eval.metrics import error_strip, lpips_or_none, mae100, psnr, ssim
    from hravatar.shading import LearnedLighting, load_brdf_lut
    from hravatar.train.model import encoded_frame, face_crop_boxes, forward_render, mesh_rig_for

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle = load_checkpoint(resolve_checkpoint(checkpoint), device)
    cfg = _train_config(bundle)
    avatar = bundle.avatar.eval()
    ds = HeadVideoDataset(data, "test", resolution=cfg.resolution, device=device)
    if len(ds) == 0:
        raise ValueError(f"{data}: the dataset has no test frames")
    idx = list(range(len(ds)))
    if max_frames and len(idx) > max_frames:
        idx = np.linspace(0, len(ds) - 1, max_frames).round().astype(int).tolist()
    light = LearnedLighting(**bundle.light_config).to(device) if bundle.light_state else None
    if light is not None:
        light.load_state_dict(bundle.light_state)
        learned_env = light.environment()
    else:
        learned_env = None
    lut = load_brdf_lut(device)
    enc = _encoder_from_bundle(bundle, cfg, device)
    boxes = face_crop_boxes(ds, device) if enc is not None else None
    rig = None
    if cfg.deformation == "mesh":
        rig = mesh_rig_for(avatar, bundle.meta.get("data", {}).get("head", avatar.head_identity),
                           {k[4:]: v for k, v in bundle.extra.items() if k.startswith("rig.")}, device)

    gt_info = ds.gt_info
    intrinsics = _IntrinsicErrors(ds, gt_info, device) if gt_info else None
    frames, scores = {}, {"psnr": [], "ssim": [], "mae100": [], "lpips": []}
    psnr_tracked, psnr_mean_expr = [], []
    mean_expr = _mean_training_expression(ds) if enc is not None else None
    strip_rows = []

    def render(frame: FrameParams, cam) -> dict:
        return forward_render(avatar, frame, cam, learned_env, lut, response=cfg.camera_response, shading=cfg.shading, rig=rig)

    for j, i in enumerate(idx):
        s = ds[i]
        f = s.params.to(device)
        cam, mask, gt = s.camera.to(device), s.mask.to(device), s.image.to(device)
        if enc is not None:
            # the tracked parameters are what sliders, the landmark tracker and the app drive with
            psnr_tracked.append(psnr(render(f, cam)["rgb"].clamp(0, 1), gt))
            psnr_mean_expr.append(psnr(render(f.with_expression(*mean_expr), cam)["rgb"].clamp(0, 1), gt))
            f, _ = encoded_frame(enc, f, gt, boxes[i], cfg.encoder_res)
        frames[i] = (f, cam, mask)
        out = render(f, cam)
        pred = out["rgb"].clamp(0, 1)
        scores["psnr"].append(psnr(pred, gt))
        scores["ssim"].append(ssim(pred, gt))
        scores["mae100"].append(mae100(pred, gt))
        scores["lpips"].append(lpips_or_none(pred, gt))
        if intrinsics is not None:
            intrinsics.add(ds.frame_indices[i], out["gb"], mask)
        if j < 4:
            strip_rows.append((gt, pred))
    res: dict = {
        "psnr": float(np.mean(scores["psnr"])),
        "ssim": float(np.mean(scores["ssim"])),
        "mae100": float(np.mean(scores["mae100"])),
        "lpips": None if any(v is None for v in scores["lpips"]) else float(np.mean(scores["lpips"])),
        "psnr_tracked": float(np.mean(psnr_tracked)) if psnr_tracked else None,
        "psnr_mean_expr": float(np.mean(psnr_mean_expr)) if psnr_mean_expr else None,
        "frames": len(idx),
        "checkpoint": str(resolve_checkpoint(checkpoint)),
    }
    if strip_path is not None and strip_rows:
        gt = torch.cat([g for g, _ in strip_rows], 0)
        pr = torch.cat([p for _, p in strip_rows], 0)
        error_strip(gt, pr, strip_path)
    if intrinsics is not None:
        res.update(intrinsics.result())
        res.update(_relighting_metrics(avatar, ds, frames, gt_info, lut, cfg, intrinsics.albedo_scale(), device, rig))
    return res


def true_albedo(ds, g_idx: int, mask) -> "torch.Tensor":
    """The stored true albedo of a frame [H, W, 3], un-premultiplied by its coverage ``mask``
    [H, W, 1] (the files hold albedo * alpha, so silhouette pixels would read too dark)."""
    return ds.gt_image("albedo", g_idx) / mask.clamp(min=0.5)


class _IntrinsicErrors:
    """Albedo (scale-invariant MSE) and normal (cosine) errors against the synthetic ground
    truth, accumulated from the G-buffers of the evaluation renders, plus the per-channel albedo
    scale that aligns the avatar's albedo with the true one (albedo and light are only known up
    to a factor; relighting benchmarks align it once before relighting with a known light)."""

    def __init__(self, ds, gt_info: dict, device) -> None:
        self.ds = ds
        self.albedo_frames = set(gt_info.get("albedo_frames", []))
        self.normal_frames = set(gt_info.get("normal_frames", []))
        self.num, self.den = torch.zeros(3, device=device), torch.zeros(3, device=device)
        self.lmse: list[float] = []
        self.ncos: list[float] = []

    def add(self, g_idx: int, gb, mask) -> None:
        """Accumulate one test frame (mask: its true coverage [H, W, 1])."""
        from hravatar.eval.metrics import normal_cosine, scale_invariant_mse

        m = gb.alpha[..., 0] > 0.5
        if g_idx in self.albedo_frames:
            ga = true_albedo(self.ds, g_idx, mask)
            gm = m & (ga.sum(-1) > 0)
            self.num += (gb.albedo[gm] * ga[gm]).sum(0)
            self.den += (gb.albedo[gm] ** 2).sum(0)
            self.lmse.append(scale_invariant_mse(gb.albedo, ga, gm[..., None].float()))
        if g_idx in self.normal_frames:
            gn = self.ds.gt_image("normal", g_idx)
            gm = m & (gn.abs().sum(-1) > 0)
            self.ncos.append(normal_cosine(gb.normal, gn, gm[..., None].float()))

    def albedo_scale(self):
        return (self.num / self.den.clamp(min=1e-8)) if self.den.sum() > 0 else None

    def result(self) -> dict:
        out: dict = {}
        if self.lmse:
            out["albedo_lmse"] = float(np.mean(self.lmse))
            out["albedo_scale"] = [float(x) for x in self.albedo_scale()]
        if self.ncos:
            out["normal_cos"] = float(np.mean(self.ncos))
        return out


def _relighting_metrics(avatar, ds, frames, gt_info, lut, cfg, scale, device, rig=None) -> dict:
    """PSNR/SSIM of the avatar relit by each ground-truth environment (frames: i -> (params,
    camera, true coverage mask [H, W, 1])).

    Also attributes the relighting error: the same frames shaded with the true albedo, the true
    normals, or both in place of the avatar's (its other G-buffers kept), as
    "relight_attribution": {"gt_albedo", "gt_normal", "gt_albedo_normal"} mean PSNRs. The gap
    each closes says how much of the error that channel carries.
    """
    from hravatar.eval.metrics import psnr, ssim
    from hravatar.render.pipeline import render_gbuffers, shade_gbuffers
    from hravatar.shading import load_envmap, prefilter_latlong
    from hravatar.train.model import camera_response

    relit_frames = set(gt_info.get("relit_frames", []))
    have_albedo = set(gt_info.get("albedo_frames", []))
    have_normal = set(gt_info.get("normal_frames", []))
    envs = [(e, prefilter_latlong(load_envmap(ds.root / "gt" / e["envmap"]).to(device))) for e in gt_info.get("envs", [])]
    response = gt_info.get("camera_response", "srgb")
    scores: dict[str, dict[str, list]] = {e["name"]: {"psnr": [], "ssim": []} for e, _ in envs}
    swaps: dict[str, list] = {"gt_albedo": [], "gt_normal": [], "gt_albedo_normal": []}
    for i, (f, cam, mask) in frames.items():
        g_idx = ds.frame_indices[i]
        if g_idx not in relit_frames:
            continue
        g = rig.deform(avatar, f) if rig is not None else avatar.deform(f)
        gb = render_gbuffers(g, cam)
        if scale is not None:
            gb.albedo = gb.albedo * scale
        variants = {"avatar": gb}
        if g_idx in have_albedo and g_idx in have_normal and cfg.shading != "color":
            true_alb, true_n = true_albedo(ds, g_idx, mask), ds.gt_image("normal", g_idx)
            known = true_n.abs().sum(-1, keepdim=True) > 0  # inside the true silhouette
            alb = torch.where(known, true_alb, gb.albedo)
            nrm = torch.where(known, true_n, gb.normal)
            variants["gt_albedo"] = replace(gb, albedo=alb)
            variants["gt_normal"] = replace(gb, normal=nrm)
            variants["gt_albedo_normal"] = replace(gb, albedo=alb, normal=nrm)
        for e, env in envs:
            gt = ds.gt_image("relit", g_idx, e["name"])
            for name, v in variants.items():
                if cfg.shading == "color":  # the no-PBS ablation: baked colours, nothing to relight
                    rgb = (v.albedo * v.alpha).clamp(0, 1)
                else:
                    sh = shade_gbuffers(v, cam, env, lut, rotation_deg=float(e.get("rotation_deg", 0.0)))
                    rgb = (camera_response(sh["shaded"] * float(e.get("exposure", 1.0)), response) * v.alpha).clamp(0, 1)
                if name == "avatar":
                    scores[e["name"]]["psnr"].append(psnr(rgb, gt))
                    scores[e["name"]]["ssim"].append(ssim(rgb, gt))
                else:
                    swaps[name].append(psnr(rgb, gt))
    per_env = {k: {"psnr": float(np.mean(v["psnr"])), "ssim": float(np.mean(v["ssim"]))} for k, v in scores.items() if v["psnr"]}
    out: dict = {}
    if per_env:
        out["relight"] = per_env
        out["relight_psnr"] = float(np.mean([v["psnr"] for v in per_env.values()]))
        out["relight_ssim"] = float(np.mean([v["ssim"] for v in per_env.values()]))
    if all(swaps.values()):
        out["relight_attribution"] = {k: float(np.mean(v)) for k, v in swaps.items()}
    return out


def markdown_table(rows: dict[str, dict]) -> str:
    """Markdown table of result dicts keyed by a row name."""
    cols = ["psnr", "psnr_tracked", "psnr_mean_expr", "ssim", "mae100", "lpips", "relight_psnr", "relight_ssim", "albedo_lmse", "normal_cos"]
    cols = [c for c in cols if any(c in r for r in rows.values())]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("n/a" if v is None else (f"{v:.4f}" if c in ("ssim", "albedo_lmse", "normal_cos", "relight_ssim", "lpips") else f"{v:.2f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, json_path: str | Path, name: str = "avatar") -> None:
    """Write ``json_path`` and a markdown table beside it (``.md``)."""
    json_path = Path(json_path)
    atomic_write_bytes(json_path, (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(json_path.with_suffix(".md"), markdown_table({name: result}).encode())
