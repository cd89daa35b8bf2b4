"""Learned environment lighting (the method's two learnable cube maps).

Two parameterisations (``mode``):

``"direct"`` (default, the method's): an irradiance cube map (16 x 16 per face) and every
    level of a prefiltered specular cube map (32 x 32 down to 4 x 4, sampled at
    ``rough * 3``) are free texels. This reproduces the paper's model and its numbers; its
    weakness is that the levels are unrelated, so a level the training never looked at (e.g.
    the mirror level when all roughness stays in [0.5, 1]) holds whatever it was initialised
    with, and editing roughness after training can expose that.
``"derived"``: only a base radiance cube (32 x 32) is learned; the specular levels are its
    GGX prefiltering and the irradiance its cosine convolution, each a fixed matrix
    (:func:`prefilter_operators`, brute-force quadrature over a box mip of the base) applied
    on every call. Fewer unknowns and physically consistent levels: a direction is as bright
    in the irradiance as in the specular maps, so the albedo cannot trade one against the
    other, and relighting-style edits of roughness stay plausible.
``"sh"``: the specular levels are free texels as in ``"direct"``, but the irradiance is
    band-limited: activation(spherical harmonics of the normal up to band ``sh_order``),
    (sh_order + 1)^2 coefficients per channel. Real irradiance is this smooth (see :mod:`hravatar.shading.sh`); free texels let
    directions that the training views rarely see (the crown's normals, the sun side at
    grazing angles) take values unrelated to their neighbours, which the albedo then absorbs
    and relighting exposes.

Texels are stored through an activation: ``"sigmoid"`` (the method's default; LDR, radiance in
(0, 1)), ``"softplus"`` or ``"exp"`` (HDR, unbounded).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .cubemap import cube_dirs, cube_to_latlong, resample_cube, sample_cube
from .prefilter import Environment, prefilter_operators, specular_resolutions
from .sh import project_cube_sh, sh_basis

ACTIVATIONS = ("sigmoid", "softplus", "exp")
MODES = ("direct", "derived", "sh")


def apply_activation(x: Tensor, activation: str) -> Tensor:
    """Raw parameter -> radiance. Shape preserved."""
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "softplus":
        return nn.functional.softplus(x)
    if activation == "exp":
        return torch.exp(x)
    raise ValueError(f"unknown lighting activation '{activation}' (expected one of {', '.join(ACTIVATIONS)})")


def inverse_activation(y: Tensor, activation: str) -> Tensor:
    """Radiance -> raw parameter (values outside the activation's range are clamped into it)."""
    if activation == "sigmoid":
        y = y.clamp(1e-4, 1.0 - 1e-4)
        return torch.log(y) - torch.log1p(-y)
    if activation == "softplus":
        y = y.clamp_min(1e-6)
        return y + torch.log(-torch.expm1(-y))  # log(exp(y) - 1) without overflow
    if activation == "exp":
        return torch.log(y.clamp_min(1e-6))
    raise ValueError(f"unknown lighting activation '{activation}' (expected one of {', '.join(ACTIVATIONS)})")


class LearnedLighting(nn.Module):
    """Learnable split-sum lighting.

    Args:
        irr_res: irradiance face size (method: 16).
        spec_res: specular level-0 face size (method: 32).
        num_levels: specular levels, halving in size (method: 4, i.e. 32 -> 4; mip = rough * 3).
        activation: "sigmoid" | "softplus" | "exp".
        mode: "direct" | "derived" (see the module doc).
        init_value: initial constant radiance.
        sh_order: highest SH band of the "sh" irradiance.
    """

    def __init__(
        self,
        irr_res: int = 16,
        spec_res: int = 32,
        num_levels: int = 4,
        activation: str = "sigmoid",
        mode: str = "direct",
        init_value: float = 0.5,
        sh_order: int = 2,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown lighting activation '{activation}' (expected one of {', '.join(ACTIVATIONS)})")
        if mode not in MODES:
            raise ValueError(f"unknown lighting mode '{mode}' (expected one of {', '.join(MODES)})")
        self.activation = activation
        self.mode = mode
        self.irr_res = irr_res
        self.num_levels = num_levels
        self.sh_order = sh_order
        self.spec_res = specular_resolutions(spec_res, num_levels, min_res=1)
        raw = float(inverse_activation(torch.tensor(init_value), activation))
        if mode in ("direct", "sh"):
            if mode == "direct":
                self.irradiance_raw = nn.Parameter(torch.full((6, irr_res, irr_res, 3), raw))
            else:
                basis = sh_basis(cube_dirs(irr_res), sh_order)
                sh = torch.zeros(basis.shape[-1], 3)
                sh[0] = raw / float(basis[0, 0, 0, 0])  # the constant function = raw
                self.irradiance_sh = nn.Parameter(sh)
                # basis at the irradiance texels, rebuilt on load (not part of the state)
                self.register_buffer("_irr_basis", basis, persistent=False)
            self.specular_raw = nn.ParameterList([nn.Parameter(torch.full((6, r, r, 3), raw)) for r in self.spec_res])
        else:
            self.base_raw = nn.Parameter(torch.full((6, self.spec_res[0], self.spec_res[0], 3), raw))

    def extra_repr(self) -> str:
        sh = f", sh_order={self.sh_order}" if self.mode == "sh" else ""
        return f"mode={self.mode}, activation={self.activation}, irr_res={self.irr_res}, spec_res={self.spec_res}{sh}"

    def environment(self) -> Environment:
        """The current lighting as an :class:`Environment` (differentiable w.r.t. the parameters)."""
        if self.mode in ("direct", "sh"):
            if self.mode == "direct":
                irr = apply_activation(self.irradiance_raw, self.activation)
            else:
                irr = apply_activation(self._irr_basis @ self.irradiance_sh, self.activation)
            spec = [apply_activation(p, self.activation) for p in self.specular_raw]
            return Environment(irr, spec, "learned")
        base = apply_activation(self.base_raw, self.activation)
        ops = prefilter_operators(base.shape[1], self.num_levels, self.irr_res, 1, base.device)
        return ops.apply(base, name="learned")

    @torch.no_grad()
    def init_from(self, env: Environment) -> None:
        """Set the parameters so that :meth:`environment` approximates ``env``.

        Values outside the activation's range (e.g. HDR radiance > 1 with "sigmoid") are clamped.
        """
        dev = next(self.parameters()).device
        env = env.to(dev)
        if self.mode in ("direct", "sh"):
            d = cube_dirs(self.irr_res, device=dev)
            raw_irr = inverse_activation(sample_cube(env.irradiance, d), self.activation)
            if self.mode == "direct":
                self.irradiance_raw.copy_(raw_irr)
            else:
                self.irradiance_sh.copy_(project_cube_sh(raw_irr, self.sh_order))
            for l, p in enumerate(self.specular_raw):
                rough = l / max(self.num_levels - 1, 1)
                d = cube_dirs(self.spec_res[l], device=dev)
                val = env.lookup_specular(d, torch.full(d.shape[:-1], rough, device=dev))
                p.copy_(inverse_activation(val, self.activation))
        else:
            base = resample_cube(env.specular[0], self.spec_res[0])
            self.base_raw.copy_(inverse_activation(base, self.activation))

    @torch.no_grad()
    def to_latlong(self, height: int = 64) -> Tensor:
        """Level-0 (mirror) radiance as a lat-long map [height, 2 height, 3] for display/export."""
        return cube_to_latlong(self.environment().specular[0], height, 2 * height)
