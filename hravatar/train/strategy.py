"""Adaptive density control of the Gaussians: the 3DGS grow / prune / opacity-reset rules.

The rules, state and call protocol are those of gsplat's ``DefaultStrategy``: call
:meth:`DensifyStrategy.step_pre_backward` before ``loss.backward()`` and
:meth:`DensifyStrategy.step_post_backward` after it, with a gsplat-style ``info`` dict
(``means2d`` with its ``.grad``, ``radii``, ``width``, ``height``, ``n_cameras``), which both
rasterizer backends give through :meth:`hravatar.render.rasterize.RasterOutput.info`.

Every per-Gaussian tensor of the parameter dict is edited by ONE generic row operation,
:func:`rebuild_gaussians`: kept rows carry their optimizer state, new rows copy every attribute
of their source Gaussian (deformation bases, skinning weights, material logits...) and start
with zero Adam moments. Only a split overrides ``means``, ``scales`` (and, with
``revised_opacity``, ``opacities``) of the new rows.

Deliberate differences from gsplat (>= 1.4):

* The screen-size rules (split when the 2D radius exceeds ``grow_scale2d``, prune when it
  exceeds ``prune_scale2d``) are active *after* ``refine_scale2d_stop_iter``, not before it:
  the method prunes by screen size only after iteration 3000, as the original 3DGS code
  intends (``size_threshold = 20 if iteration > opacity_reset_interval``).
* A split by screen size still needs a high gradient (gsplat <= 1.4; later versions split
  every screen-large Gaussian), and a Gaussian that qualifies for both is split, not both.
* The opacity reset never fires at step 0 (3DGS counts iterations from 1).
* ``max_gaussians`` caps growth, keeping the candidates with the highest gradients.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hravatar.utils.rotation import quat_to_matrix

#: Parameters the rules read; every other entry only needs N as its first dimension.
REQUIRED_KEYS = ("means", "quats", "scales", "opacities")

#: A split child's scale is its parent's divided by this (3DGS).
SPLIT_SCALE_DIVISOR = 1.6

Params = MutableMapping[str, nn.Parameter]
Optimizers = Mapping[str, torch.optim.Optimizer]


@dataclass
class DensifyConfig:
    """Schedule and thresholds of densification (defaults = the method's).

    Attributes:
        refine_start_iter: grow/prune only at steps strictly after this one (1000).
        refine_every: grow/prune every this many steps (500).
        refine_stop_iter: no statistics, refinement or opacity reset from this step on;
            None means ``total_iters - 500`` (given to :class:`DensifyStrategy`).
        grow_grad2d: mean screen-space gradient norm above which a Gaussian grows (3e-4).
        reset_every: clamp opacities to ``2 * prune_opa`` every this many steps (3000); the
            world-size pruning is also active only after the first reset.
        prune_opa: prune Gaussians whose opacity is below this (0.005).
        grow_scale3d: largest axis (relative to ``scene_scale``) up to which a growing
            Gaussian is duplicated; above it, it is split (0.01).
        grow_scale2d: max 2D radius (relative to max(width, height)) above which a growing
            Gaussian is split, when the screen-size rules are active (0.05).
        prune_scale3d: prune Gaussians whose largest axis exceeds this times ``scene_scale``
            (0.1), after the first opacity reset.
        prune_scale2d: prune Gaussians whose max 2D radius (relative) exceeds this, when the
            screen-size rules are active (0.15).
        refine_scale2d_stop_iter: the screen-size rules are active at steps strictly AFTER this
            one (3000; the method's "screen-size pruning after 3000"); None disables them and
            the tracking of 2D radii. The name is gsplat's, whose rule runs before it instead.
        absgrad: use ``means2d.absgrad`` (AbsGS; gsplat backend only) instead of ``.grad``.
        revised_opacity: split children get opacity ``1 - sqrt(1 - a)`` (arXiv:2404.06109)
            so that the pair composites to the parent's ``a``; otherwise they copy it.
        max_gaussians: growth never takes the count above this (None: no cap).
    """

    refine_start_iter: int = 1000
    refine_every: int = 500
    refine_stop_iter: int | None = None
    grow_grad2d: float = 3e-4
    reset_every: int = 3000
    prune_opa: float = 0.005
    grow_scale3d: float = 0.01
    grow_scale2d: float = 0.05
    prune_scale3d: float = 0.1
    prune_scale2d: float = 0.15
    refine_scale2d_stop_iter: int | None = 3000
    absgrad: bool = False
    revised_opacity: bool = False
    max_gaussians: int | None = None

    def resolve_stop_iter(self, total_iters: int | None) -> int:
        """The step from which refinement stops: ``refine_stop_iter`` or ``total_iters - 500``.

        Raises:
            ValueError: ``refine_stop_iter`` is None and ``total_iters`` is not given.
        """
        if self.refine_stop_iter is not None:
            return int(self.refine_stop_iter)
        if total_iters is None:
            raise ValueError("DensifyConfig.refine_stop_iter is None (meaning total_iters - 500) but total_iters was not given")
        return int(total_iters) - 500


# ------------------------------------------------------------------------------ row operations
def _locate(optimizer: torch.optim.Optimizer, param: Tensor) -> tuple[int, int] | None:
    """(group, position) of ``param`` (by identity) in ``optimizer.param_groups``, or None."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p is param:
                return gi, pi
    return None


@torch.no_grad()
def replace_parameter(
    params: Params,
    optimizers: Optimizers,
    name: str,
    new: nn.Parameter,
    state_fn: Callable[[Tensor], Tensor],
) -> None:
    """Swap ``params[name]`` for ``new`` and remap the per-row optimizer state with ``state_fn``.

    Args:
        params: name -> parameter; ``params[name]`` is replaced.
        optimizers: name -> the optimizer holding ``params[name]`` (it may hold other
            parameters too). A name without an optimizer must be a frozen parameter.
        name: the parameter to replace.
        new: the replacement parameter.
        state_fn: maps an optimizer state tensor shaped like the old parameter (Adam's
            ``exp_avg`` / ``exp_avg_sq``: [N, ...]) to one shaped like ``new``; other state
            (Adam's scalar ``step``) is kept as is.
    Raises:
        RuntimeError: trainable parameter without optimizer, or the optimizer does not hold it.
    """
    old = params[name]
    opt = optimizers.get(name)
    if opt is None:
        if old.requires_grad:
            raise RuntimeError(f"parameter '{name}' is trainable but has no optimizer")
        params[name] = new
        return
    where = _locate(opt, old)
    if where is None:
        raise RuntimeError(f"the optimizer given for '{name}' does not hold params['{name}']")
    params[name] = new
    gi, pi = where
    opt.param_groups[gi]["params"][pi] = new
    st = opt.state.pop(old, None)
    if st:  # empty before the first optimizer step
        opt.state[new] = {
            k: state_fn(v) if torch.is_tensor(v) and v.shape == old.shape else v for k, v in st.items()
        }


@torch.no_grad()
def rebuild_gaussians(
    params: Params,
    optimizers: Optimizers,
    state: MutableMapping[str, Any],
    keep: Tensor,
    source: Tensor,
    overrides: Mapping[str, Tensor] | None = None,
) -> None:
    """Make the Gaussians rows ``keep`` of the old ones followed by copies of rows ``source``.

    The one generic operation behind duplicate / split / remove: every per-Gaussian tensor
    is treated alike. Kept rows keep their optimizer state rows; new rows copy every
    attribute of their source row and get zero optimizer moments.

    Args:
        params: name -> [N, ...] per-Gaussian parameters; replaced by [K + M, ...] ones.
        optimizers: name -> optimizer holding that parameter (see :func:`replace_parameter`).
        state: strategy state; its [N] tensors are remapped the same way (new rows copy).
        keep: [K] int64 old row indices kept, in their new order.
        source: [M] int64 old row index copied by each new row.
        overrides: name -> [M, ...] values of the new rows for some parameters.
    """
    overrides = overrides or {}
    m = source.numel()
    for name in list(params.keys()):
        old = params[name]
        added = overrides[name].to(old.dtype) if name in overrides else old[source]
        new = nn.Parameter(torch.cat([old[keep], added]), requires_grad=old.requires_grad)
        replace_parameter(
            params, optimizers, name, new,
            lambda v: torch.cat([v[keep], v.new_zeros((m, *v.shape[1:]))]),
        )
    for k, v in state.items():
        if torch.is_tensor(v) and v.dim() > 0:
            state[k] = torch.cat([v[keep], v[source]])


def sample_split_means(means: Tensor, quats: Tensor, log_scales: Tensor, n_children: int = 2) -> Tensor:
    """Draw split children's centres from their parent Gaussian, ``mu + R diag(s) eps``.

    Args:
        means: [M, 3] parent centres; quats: [M, 4] (w, x, y, z); log_scales: [M, 3].
        n_children: children per parent.
    Returns:
        [n_children, M, 3] centres (global torch RNG of the inputs' device).
    """
    R = quat_to_matrix(quats)
    eps = torch.randn(n_children, *means.shape, device=means.device, dtype=means.dtype)
    return means + torch.einsum("mij,mj,cmj->cmi", R, log_scales.exp(), eps)


@torch.no_grad()
def duplicate_gaussians(params: Params, optimizers: Optimizers, state: MutableMapping[str, Any], mask: Tensor) -> None:
    """Append an exact copy (every attribute) of each masked Gaussian.

    Args:
        mask: [N] bool. The copies come after the N originals, in index order.
    """
    sel = mask.nonzero(as_tuple=True)[0]
    keep = torch.arange(mask.numel(), device=mask.device)
    rebuild_gaussians(params, optimizers, state, keep, sel)


@torch.no_grad()
def split_gaussians(
    params: Params, optimizers: Optimizers, state: MutableMapping[str, Any], mask: Tensor,
    revised_opacity: bool = False,
) -> None:
    """Replace each masked Gaussian by two children sampled from it, scales divided by 1.6.

    Children copy every other attribute of their parent (opacity too, unless
    ``revised_opacity``: ``1 - sqrt(1 - a)`` each, so that the pair composites to ``a``).

    Args:
        mask: [N] bool. Unmasked Gaussians keep their order; then the first child of every
            parent (in index order), then the second ones.
    """
    sel = mask.nonzero(as_tuple=True)[0]
    keep = (~mask).nonzero(as_tuple=True)[0]
    means, scales = params["means"][sel], params["scales"][sel]
    children = sample_split_means(means, params["quats"][sel], scales)  # [2, M, 3]
    small = scales - math.log(SPLIT_SCALE_DIVISOR)
    overrides = {"means": children.reshape(-1, 3), "scales": torch.cat([small, small])}
    if revised_opacity:
        a = torch.sigmoid(params["opacities"][sel])
        op = torch.logit(1.0 - torch.sqrt((1.0 - a).clamp_min(0.0)), eps=1e-6)
        overrides["opacities"] = torch.cat([op, op])
    rebuild_gaussians(params, optimizers, state, keep, torch.cat([sel, sel]), overrides)


@torch.no_grad()
def remove_gaussians(params: Params, optimizers: Optimizers, state: MutableMapping[str, Any], mask: Tensor) -> None:
    """Drop the masked Gaussians (and their optimizer / strategy state rows).

    Args:
        mask: [N] bool, True = remove.
    """
    keep = (~mask).nonzero(as_tuple=True)[0]
    rebuild_gaussians(params, optimizers, state, keep, keep[:0])


@torch.no_grad()
def reset_opacities(params: Params, optimizers: Optimizers, max_opacity: float) -> None:
    """Clamp opacities to at most ``max_opacity`` and zero their optimizer moments (3DGS).

    Args:
        params: ``params["opacities"]`` [N] (or [N, 1]) logits, clamped in place.
        max_opacity: in (0, 1), clamped in logit space to ``logit(max_opacity)``.
    """
    p = params["opacities"]
    p.clamp_(max=math.log(max_opacity / (1.0 - max_opacity)))
    opt = optimizers.get("opacities")
    if opt is not None:
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.shape == p.shape:
                v.zero_()


# ------------------------------------------------------------------------------ statistics
def screen_space_stats(info: Mapping[str, Any], packed: bool = False, absgrad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per-visible-projection gradient norms and radii, normalised like gsplat.

    The gradient is scaled to a [-1, 1] screen (x by ``width / 2``, y by ``height / 2``) and
    by ``n_cameras`` (the loss averages over cameras).

    Args:
        info: ``means2d`` [..., N, 2] (or [nnz, 2] packed) holding ``.grad`` (``.absgrad``);
            ``radii`` [..., N] or per-axis [..., N, 2] in pixels (0 = not rendered);
            ``width``, ``height``, ``n_cameras``; ``gaussian_ids`` [nnz] when packed.
        packed: gsplat's packed layout.
        absgrad: read ``means2d.absgrad``.
    Returns:
        gaussian ids [nnz] int64, gradient norms [nnz], radii [nnz] as fractions of
        max(width, height); one entry per (camera, visible Gaussian).
    Raises:
        RuntimeError: ``means2d`` has no gradient.
    """
    m2d = info["means2d"]
    g = getattr(m2d, "absgrad", None) if absgrad else m2d.grad
    if g is None:
        what = "absgrad (render with absgrad=True)" if absgrad else "gradient (call step_pre_backward before backward)"
        raise RuntimeError(f"info['means2d'] has no {what}")
    w, h, c = float(info["width"]), float(info["height"]), float(info["n_cameras"])
    g = g.detach() * torch.tensor([w / 2.0 * c, h / 2.0 * c], device=g.device, dtype=g.dtype)
    radii = info["radii"]
    per_axis = radii.shape == g.shape  # gsplat >= 1.5 gives [..., 2] radii
    if packed:
        ids = info["gaussian_ids"].long()
        r = radii.max(dim=-1).values if per_axis else radii
    else:
        vis = (radii > 0).all(dim=-1) if per_axis else radii > 0
        r = (radii.max(dim=-1).values if per_axis else radii)[vis]
        ids = vis.nonzero()[:, -1]
        g = g[vis]
    return ids, g.norm(dim=-1), r.float() / max(w, h)


# ------------------------------------------------------------------------------ strategy
class DensifyStrategy:
    """3DGS densification (gsplat ``DefaultStrategy`` protocol) for any rasterizer backend.

    Optimizers: ``optimizers[name]`` must be the optimizer holding ``params[name]``. One
    optimizer per key (gsplat's layout) is the intended use; an optimizer holding several
    parameters (one param group each, or shared groups) also works because parameters are
    found in the groups by identity. Frozen parameters may have no optimizer. Adam-like
    state is supported: every state tensor shaped like its parameter is remapped by rows.

    Example::

        strategy = DensifyStrategy(DensifyConfig(), total_iters=30_000)
        strategy.check(avatar.params, optimizers)
        state = strategy.initialize_state(scene_scale)
        for step in range(30_000):
            out = rasterize_gaussians(...)
            info = out.info()
            strategy.step_pre_backward(avatar.params, optimizers, state, step, info)
            loss.backward()
            for opt in optimizers.values(): opt.step(); opt.zero_grad()
            strategy.step_post_backward(avatar.params, optimizers, state, step, info)
    """

    def __init__(self, config: DensifyConfig | None = None, total_iters: int | None = None) -> None:
        self.config = config or DensifyConfig()
        self.refine_stop_iter = self.config.resolve_stop_iter(total_iters)

    # ------------------------------------------------------------------ setup
    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        """Running statistics, created lazily on the Gaussians' device at the first step.

        Args:
            scene_scale: the length the 3D thresholds are relative to (e.g. the head's radius
                in canonical units).
        Returns:
            ``{"grad2d": None, "count": None, "radii": None, "scene_scale": float}``; after
            the first step grad2d / count / radii (radii only with screen-size rules) are [N].
        """
        return {"grad2d": None, "count": None, "radii": None, "scene_scale": float(scene_scale)}

    def check(self, params: Params, optimizers: Optimizers) -> None:
        """Validate the parameter / optimizer layout before training.

        Raises:
            ValueError: a required key is missing, a tensor's first dimension is not N or the
                key shapes are wrong, a trainable parameter has no optimizer, an optimizer
                does not hold its parameter, or an optimizer name has no parameter.
        """
        missing = [k for k in REQUIRED_KEYS if k not in params]
        if missing:
            raise ValueError(f"densification needs parameters {', '.join(missing)}")
        n = params["means"].shape[0]
        expected = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3)}
        for name, p in params.items():
            if p.dim() == 0 or p.shape[0] != n:
                raise ValueError(f"parameter '{name}' has shape {tuple(p.shape)}, expected N={n} as first dimension")
            if name in expected and tuple(p.shape) != expected[name]:
                raise ValueError(f"parameter '{name}' has shape {tuple(p.shape)}, expected {expected[name]}")
            if name == "opacities" and tuple(p.shape) not in ((n,), (n, 1)):
                raise ValueError(f"parameter 'opacities' has shape {tuple(p.shape)}, expected ({n},) or ({n}, 1)")
            opt = optimizers.get(name)
            if opt is None and p.requires_grad:
                raise ValueError(f"parameter '{name}' is trainable but has no optimizer")
            if opt is not None and _locate(opt, p) is None:
                raise ValueError(f"the optimizer given for '{name}' does not hold params['{name}']")
        extra = [k for k in optimizers if k not in params]
        if extra:
            raise ValueError(f"optimizers without a per-Gaussian parameter: {', '.join(extra)}")

    # ------------------------------------------------------------------ schedule
    def is_refine_step(self, step: int) -> bool:
        """True when ``step`` grows and prunes (after start, on the period, before stop)."""
        c = self.config
        return c.refine_start_iter < step < self.refine_stop_iter and step % c.refine_every == 0

    def is_reset_step(self, step: int) -> bool:
        """True when ``step`` resets opacities (on the period, not step 0, before stop)."""
        return 0 < step < self.refine_stop_iter and step % self.config.reset_every == 0

    def screen_size_active(self, step: int) -> bool:
        """True when the 2D-radius split / prune rules apply at ``step``."""
        s = self.config.refine_scale2d_stop_iter
        return s is not None and step > s

    # ------------------------------------------------------------------ protocol
    def step_pre_backward(self, params: Params, optimizers: Optimizers, state: dict, step: int, info: dict) -> None:
        """Before ``loss.backward()``: keep the gradient of the non-leaf ``info["means2d"]``.

        Raises:
            KeyError: ``info`` has no ``means2d``.
        """
        if "means2d" not in info:
            raise KeyError("info has no 'means2d' (pass RasterOutput.info())")
        if step < self.refine_stop_iter and info["means2d"].requires_grad:
            info["means2d"].retain_grad()

    def step_post_backward(
        self, params: Params, optimizers: Optimizers, state: dict, step: int, info: dict, packed: bool = False,
    ) -> dict[str, Any]:
        """After ``loss.backward()``: accumulate statistics, then grow / prune / reset when due.

        Args:
            params: name -> [N, ...] per-Gaussian parameters (edited in place: entries are
                replaced by new ``nn.Parameter`` objects when N changes).
            optimizers: see the class docstring.
            state: from :meth:`initialize_state`.
            step: 0-based index of the iteration just back-propagated (as gsplat).
            info: gsplat-style info of the render (see :func:`screen_space_stats`).
            packed: gsplat's packed layout.
        Returns:
            ``{"duplicated": int, "split": int, "pruned": int, "reset": bool, "n": int}``.
        """
        out = {"duplicated": 0, "split": 0, "pruned": 0, "reset": False, "n": int(params["means"].shape[0])}
        if step >= self.refine_stop_iter:
            return out
        self.update_state(params, state, info, packed=packed)
        if self.is_refine_step(step):
            out["duplicated"], out["split"] = self.grow(params, optimizers, state, step)
            out["pruned"] = self.prune(params, optimizers, state, step)
            for k in ("grad2d", "count", "radii"):
                if state[k] is not None:
                    state[k].zero_()
        if self.is_reset_step(step):
            reset_opacities(params, optimizers, 2.0 * self.config.prune_opa)
            out["reset"] = True
        out["n"] = int(params["means"].shape[0])
        return out

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def update_state(self, params: Params, state: dict, info: dict, packed: bool = False) -> None:
        """Add one render's screen-space statistics to ``state``.

        ``grad2d`` [N] += normalised gradient norm per visible projection, ``count`` [N] +=
        number of cameras seeing it, ``radii`` [N] = running max of the relative 2D radius.

        Raises:
            RuntimeError: the state's size does not match N (parameters changed elsewhere).
        """
        n = params["means"].shape[0]
        dev = params["means"].device
        for k in ("grad2d", "count") + (("radii",) if self.config.refine_scale2d_stop_iter is not None else ()):
            if state[k] is None:
                state[k] = torch.zeros(n, device=dev)
            elif state[k].shape[0] != n:
                raise RuntimeError(f"densification state '{k}' has {state[k].shape[0]} rows but there are {n} Gaussians")
        ids, gnorm, radii = screen_space_stats(info, packed=packed, absgrad=self.config.absgrad)
        ids = ids.to(dev)
        state["grad2d"].index_add_(0, ids, gnorm.to(dev, torch.float32))
        state["count"].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        if state["radii"] is not None:
            state["radii"].scatter_reduce_(0, ids, radii.to(dev), reduce="amax")

    def _max_scale(self, params: Params) -> Tensor:
        return params["scales"].exp().amax(dim=-1)

    @torch.no_grad()
    def grow(self, params: Params, optimizers: Optimizers, state: dict, step: int) -> tuple[int, int]:
        """Duplicate small and split large Gaussians whose mean gradient is high.

        grad = grad2d / max(count, 1) > grow_grad2d. Split: largest axis > grow_scale3d *
        scene_scale, or (screen-size rules active) 2D radius > grow_scale2d; duplicate: the
        other high-gradient ones. With ``max_gaussians``, only the highest-gradient
        candidates that fit are grown (a duplicate or a split each add one Gaussian).

        Returns:
            (number duplicated, number split).
        """
        c = self.config
        n = params["means"].shape[0]
        grads = state["grad2d"] / state["count"].clamp_min(1.0)
        high = grads > c.grow_grad2d
        large = self._max_scale(params) > c.grow_scale3d * state["scene_scale"]
        if self.screen_size_active(step):
            large |= state["radii"] > c.grow_scale2d
        is_split = high & large
        is_dupli = high & ~large
        if c.max_gaussians is not None:
            budget = max(c.max_gaussians - n, 0)
            cand = is_split | is_dupli
            if int(cand.sum()) > budget:
                top = torch.where(cand, grads, torch.full_like(grads, -math.inf)).topk(budget).indices
                chosen = torch.zeros_like(cand)
                chosen[top] = True
                is_split &= chosen
                is_dupli &= chosen
        n_dupli, n_split = int(is_dupli.sum()), int(is_split.sum())
        if n_dupli:
            duplicate_gaussians(params, optimizers, state, is_dupli)
            # copies are appended and are never split in the same step
            is_split = torch.cat([is_split, is_split.new_zeros(n_dupli)])
        if n_split:
            split_gaussians(params, optimizers, state, is_split, revised_opacity=c.revised_opacity)
        return n_dupli, n_split

    @torch.no_grad()
    def prune(self, params: Params, optimizers: Optimizers, state: dict, step: int) -> int:
        """Remove Gaussians that are transparent or too large.

        opacity < prune_opa; after the first opacity reset (step > reset_every) also
        largest axis > prune_scale3d * scene_scale; with screen-size rules active also
        2D radius > prune_scale2d.

        Returns:
            number removed.
        """
        c = self.config
        is_prune = torch.sigmoid(params["opacities"].flatten()) < c.prune_opa
        if step > c.reset_every:
            is_prune |= self._max_scale(params) > c.prune_scale3d * state["scene_scale"]
        if self.screen_size_active(step):
            is_prune |= state["radii"] > c.prune_scale2d
        n_prune = int(is_prune.sum())
        if n_prune:
            remove_gaussians(params, optimizers, state, is_prune)
        return n_prune
