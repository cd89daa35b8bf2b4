"""Avatar checkpoints: safetensors tensors + JSON metadata. Never pickle.

Layout of a checkpoint file (one ``.safetensors`` file):
    tensors  ``avatar.<param>``   per-Gaussian parameters (see GaussianAvatar), N first
             ``avatar.log_global_scale``, ``avatar.joints`` [5,3], ``avatar.beta`` [S]
             ``light.<name>``     learned lighting parameters (optional)
             ``sequence.<name>``  tracked per-frame parameters of the training video (optional):
                                  expr [T,E], pose [T,5,3], eyelids [T,2], transl [T,3]
             ``camera.K`` [3,3], ``camera.viewmat`` [4,4] the training camera (optional)
             ``extra.<name>``     anything else a component stores (encoder weights, optimiser-free)
    metadata ``hravatar`` = JSON {format, version, avatar_config, expr_names, head, light_config,
             camera_size, data, configs, created}
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hravatar.avatar.config import AvatarConfig
from hravatar.avatar.gaussians import PARAM_KEYS, FrameParams, GaussianAvatar
from hravatar.head.model import NUM_JOINTS
from hravatar.render.camera import Camera

from hravatar.utils.dataclass_cli import dataclass_from_dict

from .safe import CheckpointError, load_safetensors_checked, read_safetensors_header, save_safetensors_atomic

FORMAT = "hravatar-avatar"
VERSION = 2  # 2: compact files may hold int8 bases (key + Q8_SCALE)


@dataclass
class AvatarBundle:
    """Everything a checkpoint holds.

    avatar: the Gaussian avatar.
    light_state: learned lighting tensors (empty when none) and ``light_config`` to rebuild it.
    sequence: tracked training parameters (``FrameParams`` with T frames) or None.
    camera: the training camera or None.
    extra: additional named tensors (e.g. ``encoder.*``).
    meta: free-form JSON metadata (data summary, configs, ...).
    """

    avatar: GaussianAvatar
    light_state: dict[str, Tensor] = field(default_factory=dict)
    light_config: dict = field(default_factory=dict)
    sequence: FrameParams | None = None
    camera: Camera | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


#: Large per-Gaussian bases that ``save_checkpoint(..., compact=True)`` stores as int8 with
#: one float32 scale per Gaussian (key + ``Q8_SCALE``).
COMPACT_KEYS = ("avatar.shapedirs", "avatar.exprdirs", "avatar.posedirs", "avatar.eyelid_dirs")
Q8_SCALE = ".q8scale"


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation with one scale per row (first dimension).

    Args:
        x: [N, ...] float.
    Returns:
        (q [N, ...] int8, scale [N] float32) with ``x ~= q * scale[:, None, ...]``; the error
        of an entry is at most half a step, i.e. max(|row|) / 254.
    """
    x = x.detach().float()
    scale = x.reshape(x.shape[0], -1).abs().amax(-1).clamp_min(1e-12) / 127.0 if x.numel() else torch.zeros(x.shape[0])
    q = torch.round(x / scale.reshape(-1, *([1] * (x.dim() - 1)))).clamp(-127, 127).to(torch.int8)
    return q, scale


def _dequantize(tensors: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Replace every int8 tensor that has a ``Q8_SCALE`` partner by its float32 values."""
    out = dict(tensors)
    for k in [k for k in tensors if k.endswith(Q8_SCALE)]:
        base = k[: -len(Q8_SCALE)]
        q, scale = out.pop(base, None), out.pop(k)
        if q is None or q.dtype != torch.int8 or scale.dim() != 1 or q.dim() < 1 or scale.shape[0] != q.shape[0]:
            raise CheckpointError(f"{path}: quantised tensor '{base}' does not match its scale")
        out[base] = q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))
    return out


def bake_identity(avatar: GaussianAvatar) -> GaussianAvatar:
    """Fold the subject's shape offsets into the canonical means (S -> 0 components).

    Deformation is unchanged (shape offsets are a constant per subject), and the file shrinks by
    3*S floats per Gaussian.
    """
    from hravatar.head.lbs import blend_offsets

    p = {k: v.detach() for k, v in avatar.params.items()}
    if avatar.beta.numel():
        p["means"] = p["means"] + blend_offsets(p["shapedirs"], avatar.beta[None])[0]
    p["shapedirs"] = p["shapedirs"][..., :0]
    out = GaussianAvatar(p, avatar.joints, avatar.beta[:0], avatar.config, avatar.expr_names, avatar.head_identity,
                         float(avatar.log_global_scale.detach()))
    return out.to(avatar.device)


def save_checkpoint(path: str | Path, bundle: AvatarBundle, compact: bool = False) -> None:
    """Write ``bundle`` to ``path`` atomically (temp file + rename).

    ``compact`` stores the per-Gaussian blendshape bases as int8 with a scale per Gaussian
    (:func:`quantize_rows_int8`: an offset is off by at most 1/254 of that Gaussian's largest
    one, well under a pixel for a head) and the encoder weights as float16: about a third of
    the size, used for the bundled demo avatar. Loading always gives float32.
    """
    av = bundle.avatar
    t: dict[str, Tensor] = {f"avatar.{k}": v for k, v in av.params.items()}
    t["avatar.log_global_scale"] = av.log_global_scale.detach().reshape(1)
    t["avatar.joints"] = av.joints
    t["avatar.beta"] = av.beta
    for k, v in bundle.light_state.items():
        t[f"light.{k}"] = v
    if bundle.sequence is not None:
        s = bundle.sequence
        t.update({"sequence.expr": s.expr, "sequence.pose": s.pose, "sequence.eyelids": s.eyelids, "sequence.transl": s.transl})
    cam_size = None
    if bundle.camera is not None:
        t["camera.K"], t["camera.viewmat"] = bundle.camera.K, bundle.camera.viewmat
        cam_size = [bundle.camera.width, bundle.camera.height]
    for k, v in bundle.extra.items():
        t[f"extra.{k}"] = v
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "avatar_config": asdict(av.config),
        "expr_names": av.expr_names,
        "head": av.head_identity,
        "num_gaussians": av.num_gaussians,
        "light_config": bundle.light_config,
        "camera_size": cam_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **{k: v for k, v in bundle.meta.items() if k not in ("format", "version")},
    }
    out: dict[str, Tensor] = {}
    for k, v in t.items():
        v = v.detach()
        if not v.is_floating_point():
            out[k] = v
        elif compact and k in COMPACT_KEYS:
            out[k], out[k + Q8_SCALE] = quantize_rows_int8(v)
        elif compact and k.startswith("extra.") and v.dim() > 1:
            out[k] = v.half()
        else:
            out[k] = v.float()
    save_safetensors_atomic(out, path, {"hravatar": json.dumps(meta)})


def read_checkpoint_meta(path: str | Path) -> dict:
    """Metadata of a checkpoint without loading its tensors (validates the container)."""
    path = Path(path)
    header = read_safetensors_header(path)
    raw = (header.get("__metadata__") or {}).get("hravatar")
    if raw is None:
        raise CheckpointError(f"{path}: not a hravatar checkpoint (no 'hravatar' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupted checkpoint metadata") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a hravatar avatar checkpoint (format '{meta.get('format')}')")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is newer than supported ({VERSION}); upgrade hravatar")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> AvatarBundle:
    """Load and validate a checkpoint. Raises :class:`CheckpointError` with a one-line message."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a checkpoint file (e.g. {path}/avatar.safetensors)")
    meta = read_checkpoint_meta(path)
    tensors, _ = load_safetensors_checked(path)
    tensors = _dequantize(tensors, path)
    tensors = {k: (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v) for k, v in tensors.items()}
    params = {}
    for k in PARAM_KEYS:
        if f"avatar.{k}" not in tensors:
            raise CheckpointError(f"{path}: missing tensor 'avatar.{k}'")
        params[k] = tensors[f"avatar.{k}"]
        if not params[k].is_floating_point():
            raise CheckpointError(f"{path}: tensor 'avatar.{k}' holds {params[k].dtype} values, expected floating point")
    N = params["means"].shape[0]
    expected = {
        "means": (N, 3), "quats": (N, 4), "scales": (N, 3), "opacities": (N,), "albedo": (N, 3),
        "roughness": (N, 1), "f0": (N, 1), "lbs_weights": (N, NUM_JOINTS), "eyelid_dirs": (N, 2, 3),
    }
    for k, shp in expected.items():
        if tuple(params[k].shape) != shp:
            raise CheckpointError(f"{path}: tensor 'avatar.{k}' has shape {tuple(params[k].shape)}, expected {shp}")
    for k, nd in (("shapedirs", 3), ("exprdirs", 3), ("posedirs", 3)):
        if params[k].dim() != nd or params[k].shape[:2] != (N, 3):
            raise CheckpointError(f"{path}: tensor 'avatar.{k}' has shape {tuple(params[k].shape)}, expected ({N}, 3, *)")
    if params["posedirs"].shape[-1] != (NUM_JOINTS - 1) * 9:
        raise CheckpointError(f"{path}: tensor 'avatar.posedirs' must have {(NUM_JOINTS - 1) * 9} components")
    expr_names = meta.get("expr_names") or []
    if len(expr_names) != params["exprdirs"].shape[-1]:
        raise CheckpointError(f"{path}: {len(expr_names)} expression names for {params['exprdirs'].shape[-1]} components")
    for k in ("joints", "beta", "log_global_scale"):
        if f"avatar.{k}" not in tensors:
            raise CheckpointError(f"{path}: missing tensor 'avatar.{k}'")
    if tuple(tensors["avatar.joints"].shape) != (NUM_JOINTS, 3):
        raise CheckpointError(f"{path}: tensor 'avatar.joints' must be ({NUM_JOINTS}, 3)")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite values in '{bad[0]}'")
    try:
        cfg = dataclass_from_dict(AvatarConfig, meta.get("avatar_config", {}))
    except TypeError as e:
        raise CheckpointError(f"{path}: invalid avatar config ({e})") from None
    avatar = GaussianAvatar(params, tensors["avatar.joints"], tensors["avatar.beta"], cfg, expr_names,
                            meta.get("head", ""), float(tensors["avatar.log_global_scale"].reshape(-1)[0]))
    seq = None
    if "sequence.expr" in tensors:
        try:
            seq = FrameParams(tensors["sequence.expr"], tensors["sequence.pose"], tensors["sequence.eyelids"], tensors["sequence.transl"])
        except KeyError as e:
            raise CheckpointError(f"{path}: incomplete tracked sequence (missing {e})") from None
    cam = None
    if "camera.K" in tensors and meta.get("camera_size"):
        w, h = meta["camera_size"]
        cam = Camera(tensors["camera.viewmat"], tensors["camera.K"], int(w), int(h))
    light = {k[len("light."):]: v for k, v in tensors.items() if k.startswith("light.")}
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    bundle = AvatarBundle(avatar.to(device), {k: v.to(device) for k, v in light.items()}, meta.get("light_config") or {},
                          seq.to(device) if seq is not None else None, cam.to(device) if cam is not None else None,
                          {k: v.to(device) for k, v in extra.items()}, meta)
    return bundle
