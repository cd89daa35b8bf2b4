"""The small public API the CLI and the app use: open avatars, pick lighting, frame cameras.

    bundle = open_avatar(None)                 # bundled demo avatar (or the untrained built-in head)
    env = resolve_environment("builtin:studio", bundle)
    renderer = AvatarRenderer(bundle.avatar)
    img = renderer.render(default_camera(bundle, 512), None, env).image
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from hravatar.avatar.config import AvatarConfig
from hravatar.avatar.gaussians import FrameParams, GaussianAvatar
from hravatar.io.checkpoint import AvatarBundle, load_checkpoint
from hravatar.render.camera import Camera, look_at, intrinsics_from_fov
from hravatar.render.pipeline import AvatarRenderer, MaterialEdit, RenderSettings  # noqa: F401  (re-export)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_CHECKPOINT = ASSETS / "demo_avatar.safetensors"


def untrained_avatar(num_gaussians: int | None = None, per_face: int = 2) -> AvatarBundle:
    """An untrained avatar on the built-in head, coloured from its procedural albedo.

    Uses the "surface" initialisation (opaque discs on the mesh) so it renders a clean head;
    ``per_face`` Gaussians per triangle follow the mesh density (fine eyes and lips), or
    ``num_gaussians`` spread by area.
    """
    from hravatar.head.builtin import load_builtin_head

    head = load_builtin_head()
    cfg = AvatarConfig(gaussians_per_face=per_face, num_gaussians=num_gaussians, init_mode="surface", albedo_init="vertex",
                       roughness_init=0.65)
    av = GaussianAvatar.from_head(head, cfg)
    return AvatarBundle(av, meta={"data": {"source": "untrained built-in head"}})


def open_avatar(path: str | Path | None = None, device: str | torch.device = "cpu") -> AvatarBundle:
    """Load a checkpoint; with no path, the bundled demo avatar (or the untrained built-in head)."""
    if path is None:
        if DEMO_CHECKPOINT.exists():
            return load_checkpoint(DEMO_CHECKPOINT, device)
        b = untrained_avatar()
        b.avatar.to(device)
        return b
    return load_checkpoint(path, device)


def resolve_environment(spec: str | None, bundle: AvatarBundle | None = None, width: int = 512):
    """Prefiltered environment from a spec.

    Args:
        spec: "builtin:NAME" (procedural), "learned" (the avatar's captured lighting), a path to
            a lat-long ``.hdr``/``.exr`` file, or None (learned if the avatar has it, else studio).
    Returns:
        ``(environment, tonemap_operator)``: for the learned light the training camera response
        ("linear" = clamp + sRGB, or "clamp"), "aces" for HDR maps.
    """
    from hravatar.shading import load_envmap, make_builtin_environment, prefilter_latlong

    if spec is None:
        spec = "learned" if bundle is not None and bundle.light_state else "builtin:studio"
    if spec == "learned":
        if bundle is None or not bundle.light_state:
            raise ValueError("this avatar has no learned lighting; choose builtin:NAME or an HDR file")
        from hravatar.shading import LearnedLighting

        light = LearnedLighting(**bundle.light_config)
        light.load_state_dict(bundle.light_state)
        # the learned light reproduces pixel values through the training camera response
        response = (bundle.meta.get("train_config") or {}).get("camera_response", "none")
        with torch.no_grad():
            return light.environment(), ("linear" if response == "srgb" else "clamp")
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        env = prefilter_latlong(make_builtin_environment(name, width=width))
        env.name = name
        return env, "aces"
    env = prefilter_latlong(load_envmap(spec))
    env.name = Path(spec).stem
    return env, "aces"


def head_bounds(avatar: GaussianAvatar, frame: FrameParams | None = None) -> tuple[torch.Tensor, float]:
    """(centre [3], radius) of the opaque Gaussians of a posed avatar."""
    with torch.no_grad():
        g = avatar.deform(frame or avatar.neutral_frame())
        m = g.means[0][g.opacities > 0.05]
        if m.numel() == 0:
            m = g.means[0]
        lo, hi = m.quantile(0.01, dim=0), m.quantile(0.99, dim=0)
    return (lo + hi) / 2, float((hi - lo).norm() / 2)


def default_camera(bundle: AvatarBundle, res: int = 512, yaw_deg: float = 0.0, pitch_deg: float = 0.0, fov_y_deg: float = 20.0,
                   zoom: float = 1.0) -> Camera:
    """The training camera when the checkpoint has one (resized), else a front view framing the
    whole head (``zoom`` > 1 moves closer, centred a little above the middle)."""
    if bundle.camera is not None and yaw_deg == 0.0 and pitch_deg == 0.0:
        return bundle.camera.resized(res, res)
    c, r = head_bounds(bundle.avatar)
    c = c.cpu()
    if zoom != 1.0:
        c = c + torch.tensor([0.0, 0.25 * r * (1 - 1 / zoom), 0.0])  # favour the face over the neck
    dist = r / math.sin(math.radians(fov_y_deg) / 2) * 0.95 / zoom
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    eye = c + dist * torch.tensor([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    return Camera(look_at(eye, c), intrinsics_from_fov(fov_y_deg, res, res), res, res)


def parse_expression_args(avatar: GaussianAvatar, exprs: list[str] | None, jaw: float | None = None) -> FrameParams:
    """FrameParams from ``NAME=VALUE`` strings (names from the head model, or indices) and a jaw angle."""
    f = avatar.neutral_frame()
    for item in exprs or []:
        if "=" not in item:
            raise ValueError(f"expression '{item}' must be NAME=VALUE")
        name, val = item.split("=", 1)
        if name in avatar.expr_names:
            i = avatar.expr_names.index(name)
        elif name.isdigit() and int(name) < avatar.num_expr:
            i = int(name)
        else:
            close = [n for n in avatar.expr_names if name.lower() in n.lower()][:5]
            raise ValueError(f"unknown expression '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        f.expr[0, i] = float(val)
    if jaw is not None:
        f.pose[0, 2, 0] = float(jaw)
    return f
