"""``hravatar synth``: a ground-truth subject made by the project, rendered in the dataset format.

The subject is the built-in head with a known identity, procedural albedo / roughness / F0
detail (skin pores and freckles, a shinier T-zone and lips, hair strands, eyes, teeth) carried
by a dense Gaussian avatar, animated by a talking / blinking / head-turning sequence and lit by
a known HDR environment. Pixels follow a simple camera: ``srgb(clamp(exposure * radiance))``.
For the test frames it also writes ground-truth renders under other environments and
rotations, albedo maps and normal maps: our own relighting benchmark.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from hravatar.avatar.config import AvatarConfig
from hravatar.avatar.gaussians import FrameParams, GaussianAvatar
from hravatar.head.model import HeadModel

#: (environment, rotation in degrees) used for training and for the relit test ground truth.
TRAIN_ENV = ("sunset", 30.0)
RELIT_ENVS = (("studio", 0.0), ("overcast", 90.0), ("sunset", 210.0))


@dataclass
class SynthConfig:
    """Synthetic benchmark settings."""

    frames: int = 300
    res: int = 256
    seed: int = 0
    test_fraction: float = 0.2
    fps: float = 25.0
    gaussians: int = 120000
    fov_deg: float = 20.0
    zoom: float = 1.4  # frame the head like a face-tracking crop (the neck is cut)
    train_env: tuple = TRAIN_ENV
    relit_envs: tuple = field(default_factory=lambda: RELIT_ENVS)
    tracking_noise: float = 0.0  # std of noise added to the written (pre-tracked) expressions


# ---------------------------------------------------------------------------- procedural noise
def _hash3(i: Tensor, seed: int) -> Tensor:
    """Deterministic pseudo-random values in [0, 1) for integer lattice points [..., 3]."""
    x = (i[..., 0] * 73856093) ^ (i[..., 1] * 19349663) ^ (i[..., 2] * 83492791) ^ (seed * 2654435761)
    x = (x ^ (x >> 13)) * 1274126177
    x = x ^ (x >> 16)
    return (x & 0xFFFFFF).float() / float(0x1000000)


def value_noise(p: Tensor, seed: int = 0) -> Tensor:
    """Smooth 3D value noise in [0, 1] at points p [..., 3] (lattice spacing 1)."""
    f = torch.floor(p)
    t = p - f
    t = t * t * (3 - 2 * t)
    i0 = f.long()
    out = torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = (t[..., 0] if dx else 1 - t[..., 0]) * (t[..., 1] if dy else 1 - t[..., 1]) * (t[..., 2] if dz else 1 - t[..., 2])
                out = out + w * _hash3(i0 + torch.tensor([dx, dy, dz], device=p.device), seed)
    return out


def fbm(p: Tensor, octaves: int = 4, seed: int = 0) -> Tensor:
    """Fractal sum of value noise, roughly in [0, 1]."""
    amp, total, norm = 1.0, 0.0, 0.0
    for o in range(octaves):
        total = total + amp * value_noise(p * (2.0**o), seed + o)
        norm += amp
        amp *= 0.5
    return total / norm


# ---------------------------------------------------------------------------- subject
def _nearest_vertex(points: Tensor, verts: Tensor) -> Tensor:
    from scipy.spatial import cKDTree

    _, idx = cKDTree(verts.double().numpy()).query(points.double().numpy())
    return torch.from_numpy(idx).long()


def make_subject(head: HeadModel, cfg: SynthConfig) -> GaussianAvatar:
    """The ground-truth avatar: dense opaque surface Gaussians with procedural materials."""
    g = torch.Generator().manual_seed(cfg.seed)
    beta = torch.randn(head.num_shape, generator=g) * 0.6
    av = GaussianAvatar.from_head(head, AvatarConfig(num_gaussians=cfg.gaussians, init_mode="surface", albedo_init="vertex",
                                                      seed=cfg.seed, n_expr=head.num_expr), beta)
    p = av.params["means"].detach()
    vid = _nearest_vertex(p, head.v_template)
    reg = {n: head.region(n)[vid] for n in head.region_names}
    base = head.vertex_colors[vid].clone()
    mm = p * 1000.0  # millimetres: noise frequencies below are per mm
    skin = reg["face"] | reg["neck"] | reg["ears"]
    albedo = base.clone()
    # skin: mottling, pores and freckles
    mott = fbm(mm / 12.0, 4, cfg.seed + 1)[:, None]
    pores = value_noise(mm / 0.9, cfg.seed + 2)[:, None]
    freck = (fbm(mm / 2.5, 2, cfg.seed + 3) > 0.72).float()[:, None] * reg["face"].float()[:, None]
    skin_alb = base * (0.85 + 0.3 * mott) * (0.95 + 0.1 * pores) * (1 - 0.25 * freck * torch.tensor([0.6, 0.9, 1.0]))
    albedo = torch.where(skin[:, None], skin_alb, albedo)
    # hair: strands running from the crown, dark brown with highlights
    hair = reg["scalp"]
    ang = torch.atan2(p[:, 0], p[:, 2])
    strands = 0.5 + 0.5 * torch.sin(ang * 140.0 + 6.0 * fbm(mm / 6.0, 3, cfg.seed + 4))
    hair_alb = torch.tensor([0.16, 0.10, 0.06]) * (0.6 + 0.8 * strands[:, None]) * (0.8 + 0.4 * fbm(mm / 20.0, 2, cfg.seed + 5)[:, None])
    albedo = torch.where(hair[:, None], hair_alb, albedo)
    albedo = albedo.clamp(0.02, 0.95)
    # roughness: shinier T-zone and lips, rough hair
    rough = torch.full((p.shape[0], 1), 0.72)
    tzone = reg["face"] & (p[:, 0].abs() < 0.018) & (p[:, 1] > head.v_template[:, 1][head.region("face")].quantile(0.35))
    rough[tzone] = 0.56
    rough[reg["lips"]] = 0.55
    rough[hair] = 0.93
    rough[reg["eyes"]] = 0.5
    rough[reg["teeth"]] = 0.52
    rough = (rough + 0.06 * (fbm(mm / 8.0, 3, cfg.seed + 6)[:, None] - 0.5)).clamp(0.5, 1.0)
    f0 = torch.full((p.shape[0], 1), 0.045)
    f0[reg["lips"]] = 0.07
    f0[reg["eyes"]] = 0.13
    f0[reg["teeth"]] = 0.09
    f0[hair] = 0.05
    f0 = (f0 + 0.01 * (fbm(mm / 10.0, 2, cfg.seed + 7)[:, None] - 0.5)).clamp(0.04, 0.15)
    with torch.no_grad():
        av.params["albedo"].copy_(torch.logit(albedo, eps=1e-4))
        lo, hi = av.config.roughness_range
        av.params["roughness"].copy_(torch.logit((rough - lo) / (hi - lo), eps=1e-4))
        lo, hi = av.config.f0_range
        av.params["f0"].copy_(torch.logit((f0 - lo) / (hi - lo), eps=1e-4))
    return av


# ---------------------------------------------------------------------------- motion
def _smooth_noise(n: int, fps: float, freq_hz: float, g: torch.Generator) -> Tensor:
    """[n] smooth random signal (sum of random-phase sinusoids around ``freq_hz``), about unit std."""
    t = torch.arange(n, dtype=torch.float32) / fps
    out = torch.zeros(n)
    for _ in range(4):
        f = freq_hz * (0.5 + torch.rand(1, generator=g).item())
        ph = 2 * math.pi * torch.rand(1, generator=g).item()
        out = out + torch.sin(2 * math.pi * f * t + ph)
    return out / 2.0


def make_sequence(head: HeadModel, n: int, fps: float, seed: int, amplitude: float = 1.0) -> FrameParams:
    """A talking / blinking / head-turning sequence of n frames over the head's expressions."""
    g = torch.Generator().manual_seed(seed)
    E = head.num_expr
    names = head.expr_names
    expr = torch.zeros(n, E)

    def put(name: str, sig: Tensor) -> None:
        if name in names:
            expr[:, names.index(name)] = sig

    smile = (0.5 * _smooth_noise(n, fps, 0.15, g) + 0.1).clamp(0, 1) * amplitude
    put("mouthSmile_L", smile)
    put("mouthSmile_R", smile * 0.9)
    put("browInnerUp", (0.5 * _smooth_noise(n, fps, 0.3, g)).clamp(0, 1) * amplitude)
    brow_down = (0.4 * _smooth_noise(n, fps, 0.2, g) - 0.1).clamp(0, 1) * amplitude
    put("browDown_L", brow_down)
    put("browDown_R", brow_down)
    put("mouthPucker", (0.6 * _smooth_noise(n, fps, 0.5, g) - 0.2).clamp(0, 1) * amplitude)
    put("mouthFunnel", (0.5 * _smooth_noise(n, fps, 0.7, g) - 0.2).clamp(0, 1) * amplitude)
    put("mouthLeft", (0.4 * _smooth_noise(n, fps, 0.25, g)).clamp(0, 1) * amplitude)
    put("mouthRight", (-0.4 * _smooth_noise(n, fps, 0.25, g)).clamp(0, 1) * amplitude)
    put("cheekPuff", (0.5 * _smooth_noise(n, fps, 0.1, g) - 0.3).clamp(0, 1) * amplitude)
    squint = (0.4 * _smooth_noise(n, fps, 0.2, g)).clamp(0, 1) * amplitude
    put("eyeSquint_L", squint)
    put("eyeSquint_R", squint)
    pose = torch.zeros(n, 5, 3)
    # talking: syllable-rate jaw motion
    pose[:, 2, 0] = (0.09 * (_smooth_noise(n, fps, 3.0, g) + 0.6)).clamp(0, 0.3) * amplitude
    pose[:, 0, 0] = 0.12 * _smooth_noise(n, fps, 0.15, g) * amplitude  # pitch
    pose[:, 0, 1] = 0.35 * _smooth_noise(n, fps, 0.12, g) * amplitude  # yaw
    pose[:, 0, 2] = 0.06 * _smooth_noise(n, fps, 0.1, g) * amplitude  # roll
    pose[:, 1] = 0.3 * pose[:, 0]  # the neck follows a little
    gaze = torch.stack([0.12 * _smooth_noise(n, fps, 0.3, g), 0.2 * _smooth_noise(n, fps, 0.3, g)], -1)
    pose[:, 3, :2] = gaze
    pose[:, 4, :2] = gaze
    eyelids = torch.zeros(n, 2)
    t = 0.0
    while True:
        t += 1.5 + 3.0 * torch.rand(1, generator=g).item()
        c = int(t * fps)
        if c >= n:
            break
        for k in range(-4, 5):
            if 0 <= c + k < n:
                eyelids[c + k] = max(float(eyelids[c + k, 0]), math.cos(k / 4 * math.pi / 2) ** 2)
    transl = torch.stack([0.004 * _smooth_noise(n, fps, 0.1, g), 0.003 * _smooth_noise(n, fps, 0.1, g), torch.zeros(n)], -1)
    return FrameParams(expr, pose, eyelids, transl)


# ---------------------------------------------------------------------------- rendering + writing
def _frame(seq: FrameParams, i: int) -> FrameParams:
    return FrameParams(seq.expr[i : i + 1], seq.pose[i : i + 1], seq.eyelids[i : i + 1], seq.transl[i : i + 1])


def pixel_values(radiance: Tensor, exposure: float) -> Tensor:
    """The synthetic camera: sRGB(clamp(exposure * radiance)), [..., 3] -> [0, 1]."""
    from hravatar.shading import srgb_oetf

    return srgb_oetf((radiance * exposure).clamp(0.0, 1.0))


def auto_exposure(radiance: Tensor, alpha: Tensor, target: float = 0.8) -> float:
    """Exposure that maps the 99th percentile of covered radiance to ``target``."""
    m = alpha[..., 0] > 0.5
    v = radiance[m].max(-1).values
    return float(target / v.quantile(0.99).clamp(min=1e-6)) if v.numel() else 1.0


def generate_synthetic(out_dir, cfg: SynthConfig, progress=None, device=None):
    """Render the synthetic benchmark into ``out_dir`` (atomic, resumable). Returns its Path.

    Args:
        out_dir: dataset folder to create.
        cfg: :class:`SynthConfig`.
        progress: optional callback ``(stage: str, done: int, total: int)``.
        device: where to render (default: CUDA when available, else CPU). The subject, sequence
            and written parameters are built on the CPU either way, so the dataset only differs
            by float rounding in the rendered pixels.
    """
    from pathlib import Path

    from hravatar.api import default_camera
    from hravatar.data.format import DatasetMeta, gt_path, write_dataset, write_png
    from hravatar.head.builtin import load_builtin_head
    from hravatar.io.checkpoint import AvatarBundle
    from hravatar.io.safe import atomic_write_bytes
    from hravatar.render.pipeline import render_gbuffers, shade_gbuffers
    from hravatar.shading import load_brdf_lut, make_builtin_environment, prefilter_latlong, write_exr

    out_dir = Path(out_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    head = load_builtin_head()
    subject = make_subject(head, cfg)
    n_test = max(1, int(round(cfg.frames * cfg.test_fraction)))
    n_train = cfg.frames - n_test
    train_seq = make_sequence(head, n_train, cfg.fps, cfg.seed * 7 + 1)
    test_seq = make_sequence(head, n_test, cfg.fps, cfg.seed * 7 + 2, amplitude=1.15)  # unseen values
    seq = FrameParams(*(torch.cat([getattr(train_seq, k), getattr(test_seq, k)]) for k in ("expr", "pose", "eyelids", "transl")))
    camera = default_camera(AvatarBundle(subject), cfg.res, fov_y_deg=cfg.fov_deg, zoom=cfg.zoom)
    camera = camera.resized(cfg.res, cfg.res)
    subject.to(dev)  # in place (nn.Module); parameters written below come back to the CPU
    camera_dev = camera.to(dev)
    lut = load_brdf_lut(device=dev)
    env_cache: dict[str, object] = {}

    def env_for(name: str):
        if name not in env_cache:
            latlong = make_builtin_environment(name, width=512)
            env_cache[name] = (latlong, prefilter_latlong(latlong, device=dev))
        return env_cache[name]

    @torch.no_grad()
    def render(i: int, env_name: str, rot: float):
        gb = render_gbuffers(subject.deform(_frame(seq, i).to(dev)), camera_dev, backend="torch")
        sh = shade_gbuffers(gb, camera_dev, env_for(env_name)[1], lut, rotation_deg=rot)
        gb = replace(gb, **{k: getattr(gb, k).cpu() for k in ("albedo", "roughness", "f0", "normal", "depth", "alpha")})
        return gb, sh["shaded"].cpu()

    # exposures: fixed per environment from a neutral reference frame
    exposures = {}
    for name, rot in (cfg.train_env,) + tuple(cfg.relit_envs):
        gb, rad = render(0, name, rot)
        exposures[(name, rot)] = auto_exposure(rad, gb.alpha)

    def frames():
        for i in range(cfg.frames):
            gb, rad = render(i, *cfg.train_env)
            img = pixel_values(rad, exposures[tuple(cfg.train_env)]) * gb.alpha
            if progress:
                progress("frames", i + 1, cfg.frames)
            yield img.numpy(), gb.alpha[..., 0].numpy()

    relit_names = []
    for name, rot in cfg.relit_envs:
        relit_names.append((f"{name}_r{int(rot)}", name, rot))
    test_idx = list(range(n_train, cfg.frames))

    def extras(staging: Path) -> None:
        envs = []
        for label, name, rot in relit_names:
            write_exr(staging / "gt" / "envmaps" / f"{label}.exr", env_for(name)[0])
            envs.append({"name": label, "envmap": f"envmaps/{label}.exr", "rotation_deg": rot, "exposure": exposures[(name, rot)]})
        for k, i in enumerate(test_idx):
            gb, _ = render(i, *cfg.train_env)
            write_png(gt_path(staging, "albedo", i), (gb.albedo * gb.alpha).numpy())
            write_png(gt_path(staging, "normal", i), ((gb.normal * 0.5 + 0.5) * (gb.alpha > 0.5)).numpy())
            for label, name, rot in relit_names:
                gb2, rad = render(i, name, rot)
                write_png(gt_path(staging, "relit", i, label), (pixel_values(rad, exposures[(name, rot)]) * gb2.alpha).numpy())
            if progress:
                progress("ground truth", k + 1, len(test_idx))
        train_label = f"{cfg.train_env[0]}_r{int(cfg.train_env[1])}"
        write_exr(staging / "gt" / "envmaps" / f"{train_label}.exr", env_for(cfg.train_env[0])[0])
        gt = {"envs": envs, "relit_frames": test_idx, "albedo_frames": test_idx, "normal_frames": test_idx,
              "normal_space": "world", "camera_response": "srgb",
              "train_env": {"name": train_label, "envmap": f"envmaps/{train_label}.exr", "rotation_deg": cfg.train_env[1],
                            "exposure": exposures[tuple(cfg.train_env)]}}
        import json

        atomic_write_bytes(staging / "gt" / "gt.json", json.dumps(gt, indent=2).encode())

    g = torch.Generator().manual_seed(cfg.seed + 99)
    expr_written = seq.expr + cfg.tracking_noise * torch.randn(seq.expr.shape, generator=g)
    params = {
        "beta": subject.beta.cpu().clone(),
        "K": camera.K.clone(),
        "viewmat": camera.viewmat[None].repeat(cfg.frames, 1, 1).clone(),
        "expr": expr_written,
        "pose": seq.pose.clone(),
        "eyelids": seq.eyelids.clone(),
        "transl": seq.transl.clone(),
    }
    meta = DatasetMeta(num_frames=cfg.frames, width=cfg.res, height=cfg.res, fps=cfg.fps, test_frames=n_test,
                       head=head.identity(), expr_dim=head.num_expr, shape_dim=head.num_shape, has_albedo=False,
                       source="synthetic",
                       synthetic={"seed": cfg.seed, "gaussians": cfg.gaussians, "train_env": list(cfg.train_env),
                                  "relit_envs": [list(e) for e in cfg.relit_envs], "camera_response": "srgb",
                                  "exposure": exposures[tuple(cfg.train_env)]})
    return write_dataset(out_dir, meta, frames(), params, extras=extras, overwrite=False)
