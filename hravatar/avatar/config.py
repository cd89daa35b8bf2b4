"""Hyper-parameters of the Gaussian avatar (defaults = the paper's)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AvatarConfig:
    """Initialisation and attribute ranges of the Gaussian avatar.

    Attributes:
        gaussians_per_face: Gaussians sampled per mesh triangle (method: 8).
        num_gaussians: if set, sample this many Gaussians area-weighted over the mesh instead.
        init_opacity: initial opacity (method: 0.1).
        init_mode: "method" (isotropic, nearest-neighbour scale, opacity ``init_opacity``) or
            "surface" (flat discs aligned with the surface, opaque: renders a clean head
            before any training; used for the untrained demo avatar).
        albedo_init: initial albedo; "vertex" takes the head model's vertex colours.
        roughness_init / f0_init: initial material values (method: 0.9 / 0.04).
        roughness_range / f0_range: ranges the logits are mapped into (method: [0.5, 1] and
            [0.04, 0.15]; [0.04, 0.8] for unevenly lit real footage).
        n_shape / n_expr: number of identity / expression components used (method: 100 / 50),
            clipped to what the head model has.
        seed: sampling seed (initialisation is deterministic).
    """

    gaussians_per_face: int = 8
    num_gaussians: int | None = None
    init_opacity: float = 0.1
    init_mode: str = "method"
    albedo_init: str = "0.5"
    roughness_init: float = 0.9
    f0_init: float = 0.04
    roughness_range: tuple[float, float] = (0.5, 1.0)
    f0_range: tuple[float, float] = (0.04, 0.15)
    n_shape: int = 100
    n_expr: int = 50
    seed: int = 0
