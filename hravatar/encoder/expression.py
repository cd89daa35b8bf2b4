"""SMIRK's expression encoder: MobileNetV3 features -> 50 expressions, 2 eyelids, 3 jaw angles.

The module tree matches SMIRK's ``ExpressionEncoder`` (``.encoder`` backbone,
``.expression_layers`` = ``nn.Sequential(nn.Linear(960, n_expr + 5))``), so the public
``SMIRK_em1.pt`` weights load directly when a user supplies them; without them the backbone
is randomly initialised (TF-style) and the head starts near zero, as SMIRK's does.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hravatar.io.safe import CheckpointError

from .mobilenetv3 import MobileNetV3LargeMinimal

#: Key prefix of the expression encoder inside SMIRK checkpoints (``SMIRK_em1.pt``).
SMIRK_PREFIX = "smirk_encoder.expression_encoder."
#: Outputs besides the expressions: 2 eyelids + 3 jaw angles.
N_EXTRA = 5


@dataclass
class EncoderConfig:
    """Expression-encoder settings.

    n_expr: expression coefficients predicted (SMIRK: 50).
    init_scale: factor applied to the default-initialised head (weight and bias) at creation,
        so the first predictions stay near the neutral face (SMIRK: 0.1).
    jaw_side_limit: bound (radians) of the 2nd and 3rd jaw angles (SMIRK: 0.2).
    input_size: side of the square face crop the encoder expects (SMIRK: 224).
    bn_momentum: BatchNorm momentum while training (PyTorch convention; timm/SMIRK: 0.1).
    freeze_bn: keep BatchNorm layers in eval mode (running statistics) even when the
        encoder is in training mode; useful for batch-size-1 fine-tuning.
    """

    n_expr: int = 50
    init_scale: float = 0.1
    jaw_side_limit: float = 0.2
    input_size: int = 224
    bn_momentum: float = 0.1
    freeze_bn: bool = False


def split_encoder_outputs(raw: Tensor, n_expr: int, jaw_side_limit: float = 0.2) -> dict[str, Tensor]:
    """SMIRK's output processing of the linear head.

    Args:
        raw: [B, n_expr + 5] head outputs.
        n_expr: number of expression coefficients at the front of ``raw``.
        jaw_side_limit: clamp bound of the 2nd/3rd jaw angles.
    Returns:
        dict with ``expr`` [B, n_expr] (unbounded), ``eyelids`` [B, 2] clamped to [0, 1] and
        ``jaw`` [B, 3] = (relu(x0), clamp(x1, +-limit), clamp(x2, +-limit)): the jaw only opens
        (first angle >= 0) and moves sideways a little; ``raw`` [B, n_expr + 5] (the input).
    """
    expr = raw[:, :n_expr]
    eyelids = raw[:, n_expr : n_expr + 2].clamp(0.0, 1.0)
    jaw_open = F.relu(raw[:, n_expr + 2 : n_expr + 3])
    jaw_side = raw[:, n_expr + 3 : n_expr + 5].clamp(-jaw_side_limit, jaw_side_limit)
    return {"expr": expr, "eyelids": eyelids, "jaw": torch.cat([jaw_open, jaw_side], dim=1), "raw": raw}


def output_regression_loss(raw: Tensor, target: Tensor, jaw_side_limit: float = 0.2) -> Tensor:
    """Mean squared error of the head's outputs to target values, through the output clamps.

    Regressing the clamped outputs (``split_encoder_outputs``) stops the gradient of a component
    whose raw value left its range, and a jaw-opening unit that went negative on every input
    never comes back (seen when regressing avatar renders). Here a component is compared on its
    raw value; where the target sits on a bound of the range, only the raw value's excess
    beyond that bound costs (any raw value past the bound gives the same clamped output).

    Args:
        raw: [B, n_expr + 5] head outputs (``out["raw"]``).
        target: [B, n_expr + 5] expression, eyelids, jaw values (inside the output ranges).
    Returns:
        scalar loss.
    """
    lo, hi = output_bounds(raw.shape[-1] - 5, jaw_side_limit, raw)
    return (bounded_regression_error(raw, target, lo, hi) ** 2).mean()


def output_bounds(n_expr: int, jaw_side_limit: float = 0.2, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ranges :func:`split_encoder_outputs` clamps the raw outputs to.

    Args:
        like: tensor whose dtype and device the bounds take (float32 on the CPU if None).
    Returns:
        (lo [n_expr + 5], hi [n_expr + 5]): expression unbounded, eyelids [0, 1], jaw opening
        [0, inf), jaw sides [-limit, limit].
    """
    inf = float("inf")
    kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
    lo = torch.tensor([-inf] * n_expr + [0.0, 0.0, 0.0, -jaw_side_limit, -jaw_side_limit], **kw)
    hi = torch.tensor([inf] * n_expr + [1.0, 1.0, inf, jaw_side_limit, jaw_side_limit], **kw)
    return lo, hi


def bounded_regression_error(raw: Tensor, target: Tensor, lo, hi) -> Tensor:
    """Error of raw outputs that are clamped to [lo, hi] downstream, to targets inside that range.

    ``raw - target``, except where the target sits on a bound: there only the raw value's excess
    beyond the bound counts (any raw value past it gives the same clamped output). Unlike the
    error of the clamped output, it keeps a gradient on raw values that left the range.

    Args:
        raw, target: [..., D]; lo, hi: bounds broadcastable to them (+-inf for none).
    Returns:
        [..., D] error.
    """
    err = raw - target
    err = torch.where(target <= lo, (raw - lo).clamp(min=0), err)
    return torch.where(target >= hi, (raw - hi).clamp(max=0), err)


class ExpressionEncoder(nn.Module):
    """Face crop -> expression, eyelid and jaw parameters (SMIRK architecture).

    Args:
        config: :class:`EncoderConfig` (defaults: SMIRK's).
    Attributes:
        encoder: :class:`MobileNetV3LargeMinimal` backbone.
        expression_layers: ``nn.Sequential(nn.Linear(960, n_expr + 5))``.
    """

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        self.config = config or EncoderConfig()
        self.encoder = MobileNetV3LargeMinimal(bn_momentum=self.config.bn_momentum)
        self.expression_layers = nn.Sequential(nn.Linear(self.encoder.num_features, self.config.n_expr + N_EXTRA))
        self.reset_head()

    @property
    def n_expr(self) -> int:
        return self.config.n_expr

    def reset_head(self) -> None:
        """Re-initialise the head: PyTorch's default Linear init times ``init_scale``."""
        lin = self.expression_layers[-1]
        lin.reset_parameters()
        with torch.no_grad():
            lin.weight.mul_(self.config.init_scale)
            lin.bias.mul_(self.config.init_scale)

    def train(self, mode: bool = True) -> "ExpressionEncoder":
        """As ``nn.Module.train``, but BatchNorm stays in eval mode when ``config.freeze_bn``."""
        super().train(mode)
        if mode and self.config.freeze_bn:
            for m in self.encoder.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def features(self, img: Tensor) -> Tensor:
        """Globally average-pooled last feature map.

        Args:
            img: [B, 3, H, W] RGB in [0, 1] (no ImageNet normalisation); H = W = 224 for SMIRK.
        Returns:
            [B, 960].
        """
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"expression encoder expects images [B, 3, H, W], got {tuple(img.shape)}")
        if img.device.type == "cpu":
            # oneDNN's channels-last convolutions (the depthwise ones above all) run forward +
            # backward ~1.5x faster on a CPU; the layout follows the input, the weights stay as
            # they are (checkpoints and optimiser state unchanged)
            img = img.contiguous(memory_format=torch.channels_last)
        return self.encoder.forward_features(img)[-1].mean(dim=(2, 3))

    def forward(self, img: Tensor) -> dict[str, Tensor]:
        """Predict expression parameters.

        Args:
            img: [B, 3, 224, 224] face crops, RGB in [0, 1] (see :mod:`hravatar.encoder.crop`).
        Returns:
            dict with ``expr`` [B, n_expr], ``eyelids`` [B, 2] in [0, 1] and ``jaw`` [B, 3]
            (axis-angle, first component >= 0, others within +-``jaw_side_limit``).
        """
        raw = self.expression_layers(self.features(img))
        return split_encoder_outputs(raw, self.config.n_expr, self.config.jaw_side_limit)


# ----------------------------------------------------------------------------- loading


def _unnest_state_dict(obj: object, path: Path) -> dict:
    """Find the flat name -> tensor mapping inside a loaded checkpoint object."""
    for _ in range(4):  # checkpoints wrap the weights at most a couple of levels deep
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model", "model_state_dict", "module", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            break
    raise CheckpointError(f"{path}: no tensor state dict found in the checkpoint")


def _describe_mismatch(what: str, names: list[str]) -> str:
    return f"{len(names)} {what} (e.g. '{sorted(names)[0]}')" if names else ""


def _select_encoder_tensors(sd: dict, path: Path) -> dict[str, Tensor]:
    """Strip SMIRK's (or a bare ExpressionEncoder's) key prefix; other entries are ignored."""
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}
    for prefix in (SMIRK_PREFIX, "expression_encoder.", ""):
        if any(k.startswith(prefix + "encoder.") for k in sd):
            out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            bad = [k for k, v in out.items() if not isinstance(v, Tensor)]
            if bad:
                raise CheckpointError(f"{path}: entry '{prefix}{bad[0]}' is not a tensor")
            return out
    raise CheckpointError(f"{path}: not a SMIRK checkpoint (no '{SMIRK_PREFIX}encoder.*' keys)")


@dataclass(frozen=True)
class SmirkLoadResult:
    """What :func:`load_smirk_weights` loaded: backbone tensor count and whether the head was used."""

    backbone_tensors: int
    head_loaded: bool


def load_smirk_weights(encoder: ExpressionEncoder, path: str | Path) -> SmirkLoadResult:
    """Load SMIRK's expression-encoder weights (``SMIRK_em1.pt``) into ``encoder`` in place.

    The file is read with ``torch.load(weights_only=True)`` (no arbitrary pickle code). Keys
    under ``smirk_encoder.expression_encoder.`` are used (also accepted: the weights nested
    under "state_dict"/"model", a ``module.`` prefix, or a bare ExpressionEncoder state dict);
    other networks in the file (pose/shape encoders, generator) are ignored. The backbone must
    match exactly (names and shapes). The head is loaded when its shape matches
    ``n_expr + 5`` outputs; otherwise (``n_expr`` != 50) it is re-initialised.

    Raises:
        CheckpointError: one line naming the file and the problem (missing file, unreadable
            or unsafe pickle, missing/unexpected/mis-shaped keys).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses any pickled object that is not a tensor / container / number
        raise CheckpointError(f"{path}: refused, the checkpoint pickles Python objects other than tensors (only plain state dicts are loaded)") from None
    except Exception as e:  # not a zip / legacy torch file, truncated, ...
        msg = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({msg[:160]})") from None
    sd = _select_encoder_tensors(_unnest_state_dict(obj, path), path)

    backbone = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    head = {k[len("expression_layers.") :]: v for k, v in sd.items() if k.startswith("expression_layers.")}
    own = encoder.encoder.state_dict()
    missing = [k for k in own if k not in backbone]
    unexpected = [k for k in backbone if k not in own]
    if missing or unexpected:
        parts = [p for p in (_describe_mismatch("missing keys", missing), _describe_mismatch("unexpected keys", unexpected)) if p]
        raise CheckpointError(f"{path}: backbone does not match tf_mobilenetv3_large_minimal_100: {'; '.join(parts)}")
    for k, v in own.items():
        if tuple(backbone[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: shape mismatch for 'encoder.{k}': file {tuple(backbone[k].shape)}, model {tuple(v.shape)}")
    head_own = encoder.expression_layers.state_dict()
    if set(head) != set(head_own):
        raise CheckpointError(f"{path}: expression head keys {sorted(head)} do not match {sorted(head_own)}")
    feat = encoder.encoder.num_features
    if tuple(head["0.weight"].shape[1:]) != (feat,) or head["0.weight"].shape[0] != head["0.bias"].shape[0]:
        raise CheckpointError(f"{path}: expression head has shape {tuple(head['0.weight'].shape)}, expected [n, {feat}]")

    encoder.encoder.load_state_dict(backbone, strict=True)
    head_loaded = tuple(head["0.weight"].shape) == tuple(head_own["0.weight"].shape)
    if head_loaded:
        encoder.expression_layers.load_state_dict(head, strict=True)
    else:
        encoder.reset_head()
    return SmirkLoadResult(backbone_tensors=len(backbone), head_loaded=head_loaded)


def encoder_state(encoder: ExpressionEncoder, prefix: str = "encoder.") -> dict[str, Tensor]:
    """Flat ``prefix + name -> tensor`` dict of all encoder parameters and buffers (for safetensors).

    Tensors are detached CPU copies, contiguous.
    """
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}


def load_encoder_state(encoder: ExpressionEncoder, tensors: dict[str, Tensor], prefix: str = "encoder.", source: str = "checkpoint") -> None:
    """Load what :func:`encoder_state` wrote, in place; keys outside ``prefix`` are ignored.

    Args:
        encoder: destination (its ``n_expr`` must match the stored head).
        tensors: flat dict, e.g. from a safetensors file holding other components too.
        prefix: key prefix used when saving.
        source: name of the file (for the error message).
    Raises:
        CheckpointError: one line naming ``source`` when keys are missing / unexpected or
            shapes differ.
    """
    sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = encoder.state_dict()
    missing = [k for k in own if k not in sub]
    unexpected = [k for k in sub if k not in own]
    if missing or unexpected:
        parts = [p for p in (_describe_mismatch("missing keys", missing), _describe_mismatch("unexpected keys", unexpected)) if p]
        raise CheckpointError(f"{source}: encoder weights under '{prefix}' do not match: {'; '.join(parts)}")
    for k, v in own.items():
        if tuple(sub[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: shape mismatch for '{prefix}{k}': stored {tuple(sub[k].shape)}, model {tuple(v.shape)}")
    encoder.load_state_dict(sub, strict=True)

