"""Deferred rendering of an avatar: deform -> rasterize G-buffers -> physically-based shading.

This is the library's small public rendering API used by the CLI and the app.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from hravatar.avatar.gaussians import DeformedGaussians, FrameParams, GaussianAvatar, gaussian_normals

from .camera import Camera
from .rasterize import RasterOutput, rasterize_gaussians

#: Channels a renderer can show.
CHANNELS = ("shaded", "albedo", "normal", "roughness", "f0", "diffuse", "specular", "irradiance", "depth", "alpha")


@dataclass
class GBuffers:
    """Deferred-shading inputs for one view (alpha-normalised, H x W).

    albedo [H,W,3], roughness [H,W,1], f0 [H,W,1], normal [H,W,3] (unit, world space),
    depth [H,W,1] (camera z), alpha [H,W,1]; ``raster`` holds the per-Gaussian info a
    densification strategy needs (means2d, radii, ...).
    """

    albedo: Tensor
    roughness: Tensor
    f0: Tensor
    normal: Tensor
    depth: Tensor
    alpha: Tensor
    raster: RasterOutput


@dataclass
class MaterialEdit:
    """Live material edits (method: rough' = rough * s_r; F0' = F0 + (1 - F0) * s_f) plus albedo tint."""

    rough_scale: float = 1.0
    f0_edit: float = 0.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    saturation: float = 1.0

    def is_identity(self) -> bool:
        return self == MaterialEdit()


def render_gbuffers(g: DeformedGaussians, camera: Camera, frame_index: int = 0, backend: str = "auto") -> GBuffers:
    """Rasterize the G-buffers of deformed Gaussians for one camera.

    Args:
        g: deformed Gaussians (means [B,N,3], ...); frame ``frame_index`` is rendered.
        camera: the view.
        backend: rasterizer backend ("auto", "torch", "numba", "gsplat").
    Returns:
        :class:`GBuffers`.
    """
    means, quats, scales, R = g.means[frame_index], g.quats[frame_index], g.scales[frame_index], g.rotmats[frame_index]
    normals = gaussian_normals(R, scales, means, camera.position.to(means))
    feats = torch.cat([g.albedo, g.roughness, g.f0, normals], -1)  # [N, 8]
    out = rasterize_gaussians(means, quats, scales, g.opacities, feats, camera, backend=backend)
    inv = 1.0 / out.alpha.clamp(min=1e-6)
    f = out.features
    return GBuffers(
        albedo=f[..., 0:3] * inv,
        roughness=f[..., 3:4] * inv,
        f0=f[..., 4:5] * inv,
        normal=F.normalize(f[..., 5:8], dim=-1, eps=1e-8),
        depth=out.depth,
        alpha=out.alpha,
        raster=out,
    )


def apply_material_edit(albedo: Tensor, roughness: Tensor, f0: Tensor, edit: MaterialEdit) -> tuple[Tensor, Tensor, Tensor]:
    """Edited (albedo [...,3], roughness [...,1], f0 [...,1]); see :func:`hravatar.shading.edit_material`."""
    from hravatar.shading import edit_material

    if edit.is_identity():
        return albedo, roughness, f0
    rough, f0e, alb = edit_material(roughness, f0, albedo, edit.rough_scale, edit.f0_edit, edit.tint, edit.saturation)
    return alb, rough, f0e


def shade_gbuffers(gb: GBuffers, camera: Camera, env, brdf_lut: Tensor, rotation_deg: float = 0.0,
                   material: MaterialEdit | None = None, compact: bool | None = None) -> dict[str, Tensor]:
    """Split-sum image-based shading of G-buffers (linear radiance, no background).

    Args:
        gb: G-buffers of one view.
        env: a prefiltered :class:`hravatar.shading.Environment`.
        brdf_lut: [S, S, 2] split-sum LUT.
        rotation_deg: environment rotation about +y.
        compact: shade only the covered pixels (gathered, then scattered back) rather than
            all of them; None picks compact on CPU and full-frame on CUDA. Same result.
    Returns:
        dict with "shaded", "diffuse", "specular", "irradiance" [H,W,3] (linear, premultiplied
        by nothing: composite with :func:`composite`).
    """
    from hravatar.shading import shade

    albedo, rough, f0 = apply_material_edit(gb.albedo, gb.roughness, gb.f0, material or MaterialEdit())
    viewdir = camera.view_dirs().to(gb.normal)
    mask = gb.alpha[..., 0] > 1.0 / 255.0
    names = (("shaded", "rgb"), ("diffuse", "diffuse"), ("specular", "specular"), ("irradiance", "irradiance"))
    if compact is None:
        compact = not gb.alpha.is_cuda
    if not compact:
        # a GPU shades every pixel faster than it can compact the covered ones (no host sync)
        out = shade(albedo, rough, f0, gb.normal, viewdir, env, brdf_lut, rotation_deg=rotation_deg)
        return {ours: torch.where(mask[..., None], out[theirs], 0.0) for ours, theirs in names}
    # on a CPU shade only covered pixels: the head rarely fills the frame
    out = shade(albedo[mask], rough[mask], f0[mask], gb.normal[mask], viewdir[mask], env, brdf_lut, rotation_deg=rotation_deg)
    res = {}
    for ours, theirs in names:
        full = gb.albedo.new_zeros(*mask.shape, 3)
        res[ours] = full.masked_scatter(mask[..., None].expand_as(full), out[theirs])
    return res


def composite(color: Tensor, alpha: Tensor, background: Tensor | tuple | None) -> Tensor:
    """Alpha-composite [H,W,C] colour over a background colour [C] or image [H,W,C]."""
    if background is None:
        return color * alpha
    bg = torch.as_tensor(background, dtype=color.dtype, device=color.device)
    return color * alpha + bg * (1 - alpha)


@dataclass
class RenderSettings:
    """What to show: channel, lighting controls, material edits, background, tone mapping."""

    channel: str = "shaded"
    rotation_deg: float = 0.0
    exposure: float = 0.0
    tonemap: str = "aces"  # a hravatar.shading.tonemap operator for HDR light; "clamp" for the learned (LDR) light
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    material: MaterialEdit = field(default_factory=MaterialEdit)


@dataclass
class RenderResult:
    """image [H,W,3] display values in [0,1]; ``linear`` the un-tonemapped channel; timings in ms."""

    image: Tensor
    linear: Tensor
    alpha: Tensor
    gbuffers: GBuffers
    timings: dict[str, float]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def channel_image(name: str, gb: GBuffers, shaded: dict[str, Tensor] | None) -> Tensor:
    """[H,W,3] linear image of one channel (G-buffer channels are shown directly)."""
    if name in ("shaded", "diffuse", "specular", "irradiance"):
        assert shaded is not None
        return shaded[name]
    if name == "albedo":
        return gb.albedo
    if name == "normal":
        return gb.normal * 0.5 + 0.5
    if name in ("roughness", "f0"):
        return getattr(gb, name).expand(*gb.alpha.shape[:2], 3)
    if name == "depth":
        d = gb.depth[..., 0]
        valid = gb.alpha[..., 0] > 0.5
        if valid.any():
            lo, hi = d[valid].min(), d[valid].max()
            d = 1 - (d - lo) / (hi - lo + 1e-8)  # near = bright
        return d.clamp(0, 1)[..., None].expand(*d.shape, 3)
    if name == "alpha":
        return gb.alpha.expand(*gb.alpha.shape[:2], 3)
    raise ValueError(f"unknown channel '{name}' (choose from {', '.join(CHANNELS)})")


class _FallbackToEager:
    """``fn`` through ``torch.compile`` when asked, falling back to ``fn`` itself for good if the
    compiled version fails (e.g. no C++ compiler for the CPU backend, no Triton for CUDA).

    Compilation happens on the first call (tens of seconds); later calls with new shapes or
    flags recompile (the environment rotation and material values are not baked in).
    """

    def __init__(self, fn, compile: bool, what: str) -> None:
        self.eager, self.what = fn, what
        self.compiled = bool(compile)
        self._fn = torch.compile(fn) if compile else fn

    def __call__(self, *args, **kwargs):
        if not self.compiled:
            return self.eager(*args, **kwargs)
        try:
            return self._fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any backend failure: the eager path is the reference
            import warnings

            first = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile of the {self.what} failed ({type(e).__name__}: {first}); running it uncompiled",
                          RuntimeWarning, stacklevel=2)
            self.compiled, self._fn = False, self.eager
            return self.eager(*args, **kwargs)


class AvatarRenderer:
    """Renders a :class:`GaussianAvatar` under an environment; keeps the BRDF LUT on device.

    Args:
        avatar: the avatar (moved to ``device``).
        device: torch device ("cuda" when available if None).
        backend: rasterizer backend ("auto" picks gsplat on CUDA when installed).
        compile: run deformation and shading through ``torch.compile`` (fused kernels: fewer
            launches on a GPU, fewer memory passes on a CPU). Needs a C++ compiler on CPU,
            Triton on CUDA; falls back to eager with a warning when compilation fails. The first
            frame pays the compilation (tens of seconds, cached on disk afterwards).
    """

    def __init__(self, avatar: GaussianAvatar, device: str | torch.device | None = None, backend: str = "auto",
                 compile: bool = False) -> None:
        from hravatar.shading import load_brdf_lut

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.avatar = avatar.to(self.device)
        self.backend = backend
        self.brdf_lut = load_brdf_lut(self.device)
        self._env_src = None  # the last environment passed in and its copy on self.device
        self._env_dev = None
        self._deform = _FallbackToEager(self.avatar.deform, compile, "deformation")
        # compiled shading runs on every pixel: fixed shapes, and fused kernels beat compaction
        self._shade = _FallbackToEager(partial(shade_gbuffers, compact=False if compile else None), compile, "shading")

    @property
    def compiled(self) -> bool:
        """True while deformation and shading run through ``torch.compile`` (False after a fallback)."""
        return self._deform.compiled and self._shade.compiled

    def deform(self, frame: FrameParams) -> DeformedGaussians:
        """The avatar's Gaussians posed by ``frame`` (on the render device)."""
        return self._deform(frame.to(self.device))

    def shade(self, gb: GBuffers, camera: Camera, env, rotation_deg: float = 0.0,
              material: MaterialEdit | None = None) -> dict[str, Tensor]:
        """:func:`shade_gbuffers` with this renderer's BRDF table and a device copy of ``env``."""
        return self._shade(gb, camera, self._device_env(env), self.brdf_lut, rotation_deg, material)

    def _device_env(self, env):
        """``env`` on the render device, copied once per environment object, not per frame."""
        if env is not self._env_src:
            self._env_src, self._env_dev = env, env.to(self.device)
        return self._env_dev

    @torch.no_grad()
    def render(self, camera: Camera, frame: FrameParams | None, env, settings: RenderSettings | None = None) -> RenderResult:
        """Render one frame.

        Args:
            camera: the view.
            frame: driving parameters (B=1); neutral when None.
            env: prefiltered :class:`hravatar.shading.Environment` on any device.
            settings: :class:`RenderSettings`.
        """
        from hravatar.shading import tonemap

        s = settings or RenderSettings()
        if s.channel not in CHANNELS:
            raise ValueError(f"unknown channel '{s.channel}' (choose from {', '.join(CHANNELS)})")
        cam = camera.to(self.device)
        frame = (frame or self.avatar.neutral_frame()).to(self.device)
        t0 = time.perf_counter()
        g = self.deform(frame)
        _sync(self.device)
        t1 = time.perf_counter()
        gb = render_gbuffers(g, cam, backend=self.backend)
        _sync(self.device)
        t2 = time.perf_counter()
        shaded = None
        if s.channel in ("shaded", "diffuse", "specular", "irradiance"):
            shaded = self.shade(gb, cam, env, s.rotation_deg, s.material)
        lin = channel_image(s.channel, gb, shaded)
        if s.channel in ("shaded", "diffuse", "specular", "irradiance") and s.tonemap != "clamp":
            disp = tonemap(lin, exposure_stops=s.exposure, operator=s.tonemap)
        elif s.channel in ("shaded", "diffuse", "specular", "irradiance"):
            # learned (LDR) lighting is fitted in display space: no tone curve, only exposure
            disp = (lin * 2.0 ** s.exposure).clamp(0, 1)
        else:
            disp = lin.clamp(0, 1)
        # the alpha channel is shown as is; everything else goes over the background
        img = disp if s.channel == "alpha" else composite(disp, gb.alpha, s.background)
        _sync(self.device)
        t3 = time.perf_counter()
        ms = {"deform": (t1 - t0) * 1e3, "raster": (t2 - t1) * 1e3, "shade": (t3 - t2) * 1e3}
        ms["total"] = sum(ms.values())
        return RenderResult(img, lin, gb.alpha, gb, ms)
