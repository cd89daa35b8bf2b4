"""Training hyper-parameters (defaults = the paper's; profiles override a few)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hravatar.avatar.config import AvatarConfig


@dataclass
class LightConfig:
    """Learned lighting (method: irradiance 16^2, specular 32^2 with 4 levels, sigmoid, lr 5e-2).

    One departure from the method, measured: ``mode="derived"`` with ``activation="exp"``
    learns one HDR radiance cube (32^2) and derives the irradiance and the four specular
    levels from it, where the method (``mode="direct"``, ``activation="sigmoid"``) learns the
    irradiance map and each specular level as separate LDR texels. With separate maps the
    training light can be dim in the irradiance and bright in the specular maps for the same
    direction; on the synthetic benchmark it did so above the head (irradiance 0.3-0.5x the
    truth, specular 2-3x), and the hair albedo doubled to compensate. The quick profile:
    relighting 25.65 -> 26.46 dB, albedo si-MSE 0.0084 -> 0.0064, test PSNR 30.12 -> 30.07 dB
    (docs/benchmarks.md). ``exp`` because a sun is hundreds of times brighter than the sky.
    """

    irr_res: int = 16
    spec_res: int = 32
    num_levels: int = 4
    activation: str = "exp"  # the method: "sigmoid"
    mode: str = "derived"  # the method: "direct"; or "sh" (see shading.lighting)
    init_value: float = 0.5
    sh_order: int = 2  # band limit of the "sh" irradiance


@dataclass
class LossConfig:
    """Loss weights: L = 0.8 L1 + 0.2 D-SSIM + w_jaw jaw + l_n normal + 0.25 albedo + 0.02 TV(rough) (method: w_jaw = 0.1)."""

    l1: float = 0.8
    dssim: float = 0.2
    # Method: 0.1. The jaw is in radians (training range ~0-0.2), so 0.1 x its squared error is
    # ~1e-4 and anchors nothing: end to end, the encoder's jaw and the learnable LBS weights
    # trade scale freely (w.theta is what the image sees), and on the synthetic benchmark the
    # avatar then opened its mouth 30% too little when driven by the head model's jaw (sliders,
    # landmark tracking). 10 makes the jaw mean what the head model means; test PSNR moved by
    # -0.16 dB, within run-to-run noise (docs/benchmarks.md, "Driving with tracked parameters").
    jaw: float = 10.0
    # extra (not in the method, which starts from SMIRK's trained encoder): the same anchor for
    # the eyelids, through their clamp (losses.eyelid_loss). An encoder trained from scratch sees
    # a blink in a few frames only, its eyelid units fall below the [0, 1] clamp, lose their
    # gradient and never blink. With 10 the encoder blinks again, but on the synthetic benchmark
    # the avatar's closed eyes did not improve and test PSNR fell 0.1 dB (one run), so off.
    eyelids: float = 0.0
    normal: float = 1e-2  # implementation's weight (paper: 1e-5)
    normal_alpha_min: float = 0.9  # "confident alpha" pixels for the normal loss
    # extra: also differentiate the depth-derived normals, so the loss pulls the depth surface
    # (Gaussian centres) toward the rendered normals as in 2DGS, not only the normals toward it.
    # Synthetic benchmark: fewer Gaussians off the surface, test PSNR within run-to-run noise
    # (+0.66 / -0.44 dB on two seeds, docs/benchmarks.md), so off
    normal_depth_grad: bool = False
    # extra (not in the method): keep skin Gaussians within ``surface_tol`` (metres) of the
    # tracked head mesh along its normal (losses.surface_distance_loss; hair and mouth are free);
    # anchors are re-found every ``surface_every`` iterations (~0.3 s for 40K Gaussians on 2 CPU
    # cores) and after densification
    surface: float = 0.0
    surface_tol: float = 2e-3
    # the same Gaussians' thin axes within ``surface_max_tilt`` degrees of the mesh normal
    # (losses.surface_normal_loss)
    surface_normal: float = 0.0
    surface_max_tilt: float = 15.0
    surface_regions: tuple[str, ...] = ("face", "ears", "neck")
    surface_every: int = 50
    albedo: float = 0.25  # only when the dataset has pseudo-albedo maps
    albedo_every: int = 3
    rough_tv: float = 0.02
    albedo_smooth: float = 0.0  # extra (not in the method): edge-aware albedo smoothness, see losses.edge_aware_smoothness
    alpha_mask: float = 0.0  # optional extra: L1 between rendered alpha and the foreground mask
    flatness: float = 0.0  # extra (not in the method): keeps Gaussians flat so their normals stay defined, see losses.flatness_loss
    flatness_max_ratio: float = 0.3
    # "black": compare renders and frames over black (the method). "random": a random uniform
    # colour behind both each iteration, so opaque Gaussians outside the silhouette cost pixels
    # even where the training light leaves them dark
    background: str = "black"
    # extra (not in the method): cycle consistency of the expression encoder. Every
    # ``cycle_every`` iterations from ``cycle_start`` on, the current avatar is rendered (no
    # gradient) with expression/eyelid/jaw values it has not been trained on (each component
    # drawn from the encoder's outputs on a different training frame, the whole vector scaled by
    # a random factor in ``cycle_scale``) in the pose of a random training frame, and the encoder
    # must recover those values from the render. An encoder trained from scratch on a few hundred
    # frames otherwise memorises them and barely generalises to new expressions. Measured on the
    # synthetic benchmark (docs/benchmarks.md): no gain on the test frames, so off by default.
    cycle: float = 0.0
    cycle_every: int = 2
    cycle_start: int = 500
    cycle_scale: tuple[float, float] = (0.8, 1.3)


@dataclass
class LRConfig:
    """Learning rates and schedules (Adam)."""

    means: float = 5e-4
    means_final: float = 5e-6
    means_delay_mult: float = 0.01
    opacities: float = 0.05
    scales: float = 5e-3
    quats: float = 1e-3
    material: float = 5e-3  # albedo, roughness, f0
    material_final_ratio: float = 1e-2
    bases: float = 1e-6  # shape / expression / pose-corrective / eyelid bases
    lbs_weights: float = 1e-4
    global_scale: float = 1e-5
    encoder: float = 5e-5
    light: float = 5e-2


@dataclass
class DensifySettings:
    """3DGS densification (method: every 500 from 1000 to end-500, grad 3e-4, reset 3000)."""

    start: int = 1000
    every: int = 500
    stop_before_end: int = 500
    grad_threshold: float = 3e-4
    reset_every: int = 3000
    prune_opacity: float = 0.005
    screen_prune_after: int = 3000
    max_gaussians: int | None = None
    # AbsGS (not in the method): grow by the sum over pixels of |screen-space gradient| instead
    # of |sum|, so large Gaussians over detail, whose per-pixel gradients cancel, still split.
    # Its values are larger: gsplat pairs it with a 4x threshold; on the synthetic benchmark ~2x
    # keeps the same number of candidates (6e-4). Measured there (seed 3): test PSNR 29.99 (30.10
    # without), training frames better fitted, silhouette rim in new views wider: off.
    # CPU (numba pass) only.
    absgrad: bool = False


@dataclass
class TrainConfig:
    """Everything a training run needs (saved inside every checkpoint).

    ``iterations`` None means ``epochs * num_train_frames`` (method: 15 epochs).
    Ablation switches (the method's table): ``deformation`` "learnable" (full), "fixed" (bases
    and LBS weights frozen at their mesh initialisation: no learnable deformation), "mlp" (one
    shared MLP of the canonical position predicts basis/weight offsets instead of free
    per-Gaussian values), "mesh" (rigged to mesh: each Gaussian follows its triangle of the
    posed head mesh, see :mod:`hravatar.avatar.mesh_rig`); ``encoder`` False (pre-tracked
    expressions); ``shading`` "pbr" or "color" (plain colour per Gaussian).
    """

    profile: str = "full"
    resolution: int = 512
    epochs: int = 15
    iterations: int | None = None
    albedo_warmup: int = 1500
    encoder: bool = True
    encoder_pretrain_iters: int = 2000
    encoder_res: int = 224
    encoder_weights: str = ""  # path to SMIRK_em1.pt (user-supplied); empty: regress the tracked parameters first
    deformation: str = "learnable"
    # extra (not in the method): every N iterations, move the constant offset between the
    # encoder's and the tracked expressions into the canonical means (an exact
    # reparametrisation, see Trainer.recenter_expressions); 0 = off
    recenter_expr_every: int = 100
    # extra (not in the method): the final weights are the running mean of the iterates of the
    # last N iterations (stochastic weight averaging), which must lie after the last
    # densification step so the Gaussian count is fixed; 0 = off (the last iterate). Synthetic
    # benchmark, quick profile, 500: +0.17 / +0.55 / -0.25 dB test PSNR on three seeds
    # (docs/benchmarks.md), within run-to-run noise, so off
    average_last: int = 0
    shading: str = "pbr"
    # "none" (the method: shading output compared to pixels), "srgb" (pixels = sRGB(clamp(radiance)),
    # physically right for cameras and what HDR relighting needs) or "auto": the dataset's declared
    # response (synthetic data declares "srgb"), else "none"
    camera_response: str = "auto"
    checkpoint_every: int = 1000
    eval_every: int = 1000
    eval_frames: int = 8
    preview_every: int = 500
    log_every: int = 10
    seed: int = 0
    avatar: AvatarConfig = field(default_factory=AvatarConfig)
    light: LightConfig = field(default_factory=LightConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    densify: DensifySettings = field(default_factory=DensifySettings)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        from hravatar.utils.dataclass_cli import dataclass_from_dict

        return dataclass_from_dict(cls, d)


def profile_config(name: str) -> TrainConfig:
    """The named profile.

    "full": the method's schedule at 512x512 (for a GPU).
    "quick": CPU-friendly: 256x256, 20K Gaussians densified up to 40K, 4,500 iterations (14.5
    min of training + ~30 s of evaluation on the 2-core CI VM, 2026-12-04) with the
    densification/lighting schedule compressed to fit. Measured on the synthetic benchmark:
    3,000 -> 5,000 iterations (30K Gaussians): relighting 24.82 -> 25.43 dB, test PSNR 30.79 ->
    30.47 dB; then up to 40K Gaussians at 4,500 iterations: relighting 25.65 dB, test PSNR
    30.12 dB; then the derived HDR learned light (:class:`LightConfig`): relighting 26.46 dB,
    test PSNR 30.07 dB, 17.5 minutes; then expression recentering and the jaw anchor (the
    tracked parameters drive the avatar as the head model means them): test PSNR 30.08 dB
    (30.24 with recentering alone), 31.12 dB driven by the tracked parameters, relighting
    26.27 dB; then a faster step (same results up to rounding): 30.53 dB, 31.58 dB tracked,
    relighting 26.40 dB. Relighting needs fine normals (docs/benchmarks.md), so
    Gaussians beat iterations.
    Two deliberate departures from the
    method, both measured on the synthetic benchmark: no albedo-only warm-up (the surface
    initialisation already gives good geometry, and a warm-up lets the albedo absorb the
    shading), and an alpha-vs-mask loss at weight 1 (with black backgrounds, dark hair otherwise
    becomes transparent; weight 0.1 -> 1: test PSNR 30.60 -> 30.79 dB, relighting
    24.43 -> 24.82 dB on the synthetic benchmark at 3,000 iterations).
    A third (2026-12-05): a surface prior on skin Gaussians, within 2 mm of the tracked head
    mesh along its normal (weight 0.1) and their thin axes within 15 degrees of that normal
    (weight 1). Without it, a fifth of the skin Gaussians tilt more than 30 degrees and stick
    out of the surface at silhouettes the training views never showed. Synthetic benchmark,
    seeds 1 / 3 / 0: test PSNR 29.82 / 30.10 / 30.20 -> 30.78 / 30.86 / 30.88 dB, relighting
    26.28 / 26.22 / 26.29 -> 27.46 / 27.43 / 27.47 dB, 15.7-17.8 min of training.
    """
    if name == "full":
        return TrainConfig(profile="full")
    if name == "quick":
        return TrainConfig(
            profile="quick",
            resolution=256,
            iterations=4500,
            albedo_warmup=0,
            encoder_pretrain_iters=300,
            encoder_res=224,
            checkpoint_every=250,
            eval_every=500,
            eval_frames=4,
            preview_every=250,
            avatar=AvatarConfig(num_gaussians=20000, init_mode="surface"),
            loss=LossConfig(alpha_mask=1.0, surface=0.1, surface_normal=1.0),
            densify=DensifySettings(start=500, every=250, stop_before_end=500, reset_every=100000,
                                    grad_threshold=3e-4, screen_prune_after=1000, max_gaussians=40000),
        )
    raise ValueError(f"unknown profile '{name}' (choose quick or full)")
