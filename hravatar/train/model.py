"""The trained forward model shared by training, evaluation and rendering of trained avatars."""
from __future__ import annotations

import torch
from torch import Tensor

from hravatar.avatar.gaussians import FrameParams, GaussianAvatar
from hravatar.render.camera import Camera
from hravatar.render.pipeline import render_gbuffers, shade_gbuffers


def camera_response(rgb: Tensor, kind: str) -> Tensor:
    """Map linear shading output to pixel values: "none" (the method) or "srgb"."""
    if kind == "none":
        return rgb
    if kind == "srgb":
        from hravatar.shading import srgb_oetf

        return srgb_oetf(rgb.clamp(0.0, 1.0))
    raise ValueError(f"unknown camera response '{kind}'")


def forward_render(avatar: GaussianAvatar, frame: FrameParams, camera: Camera, env, brdf_lut: Tensor, *,
                   response: str = "none", shading: str = "pbr", albedo_only: bool = False,
                   exposure: float = 1.0, rotation_deg: float = 0.0, albedo_scale: Tensor | None = None,
                   basis_offsets: dict | None = None, rig=None) -> dict:
    """Render pixel values of one frame over black.

    Args:
        avatar, frame, camera: what to render (frame with B=1).
        env: prefiltered environment (learned or HDR).
        response: camera response applied to the shaded radiance ("none" or "srgb").
        shading: "pbr" or "color" (plain colour per Gaussian, the no-PBS ablation).
        albedo_only: render the albedo instead of shading (the method's warm-up).
        exposure: radiance multiplier before the response (relighting with HDR maps).
        albedo_scale: optional [3] per-channel albedo factor (scale alignment for relighting).
        basis_offsets: optional per-Gaussian basis offsets (shared-MLP deformation ablation).
        rig: optional :class:`hravatar.avatar.mesh_rig.MeshRig` (rigged-to-mesh ablation).
    Returns:
        {"rgb": [H,W,3] over black, "gb": GBuffers}.
    """
    g = rig.deform(avatar, frame) if rig is not None else avatar.deform(frame, basis_offsets)
    gb = render_gbuffers(g, camera)
    if albedo_scale is not None:
        gb.albedo = gb.albedo * albedo_scale
    if shading == "color":
        rgb = gb.albedo
    elif albedo_only:  # the method's warm-up: unshaded albedo against the pixels
        rgb = camera_response(gb.albedo, response)
    else:
        sh = shade_gbuffers(gb, camera, env, brdf_lut, rotation_deg=rotation_deg)
        rgb = camera_response(sh["shaded"] * exposure, response)
    return {"rgb": rgb * gb.alpha, "gb": gb}


def mesh_rig_for(avatar: GaussianAvatar, head_identity: str, state: dict | None = None, device=None):
    """The :class:`MeshRig` of a rigged-to-mesh avatar, from the head model the dataset names
    (``state``: the rig's saved tensors, i.e. its Gaussian-to-triangle binding)."""
    from hravatar.avatar.mesh_rig import MeshRig
    from hravatar.head import load_head_model
    from hravatar.train.trainer import head_spec_from_identity

    head = load_head_model(head_spec_from_identity(head_identity))
    if head.identity() != avatar.head_identity and head_identity != avatar.head_identity:
        raise ValueError(f"the avatar was rigged to head '{avatar.head_identity}', which cannot be loaded here (got '{head.identity()}')")
    rig = MeshRig(head, avatar.beta.cpu())
    if state:
        rig.load_state_dict(state, strict=False)
    return rig.to(device or avatar.device)


def face_crop_boxes(ds, device) -> Tensor:
    """[T, 4] face-crop boxes (cx, cy, size) for every frame of a dataset split, smoothed in time.

    From the tracked landmarks (box scaled by 1.4, as SMIRK) when the dataset has them, else
    from the foreground mask. The same function serves training and test time.
    """
    from hravatar.encoder.crop import box_from_mask, crop_box_from_landmarks, smooth_boxes

    boxes = []
    for i in range(len(ds)):
        s = ds[i]
        if s.landmarks is not None and torch.isfinite(s.landmarks).all():
            boxes.append(crop_box_from_landmarks(s.landmarks[None].to(device), scale=1.4)[0])
        else:
            boxes.append(box_from_mask(s.mask.permute(2, 0, 1)[None].to(device), scale=1.1)[0])
    return smooth_boxes(torch.stack(boxes), 5)


def encoded_frame(encoder, tracked: FrameParams, image: Tensor, box: Tensor, res: int) -> tuple[FrameParams, dict]:
    """Driving parameters with the encoder's expression, eyelids and jaw (global pose, neck, eyes tracked).

    Args:
        encoder: :class:`hravatar.encoder.ExpressionEncoder`.
        tracked: pre-tracked parameters of the frame (B=1).
        image: [H, W, 3] frame in [0, 1].
        box: [4] crop box (cx, cy, size).
    """
    from hravatar.encoder.crop import crop_and_resize

    crop = crop_and_resize(image.permute(2, 0, 1)[None], box[None], out=res)
    enc = encoder(crop)
    return tracked.with_expression(enc["expr"], enc["eyelids"], enc["jaw"]), enc
