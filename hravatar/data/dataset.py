"""Reading a hravatar dataset folder for training and evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hravatar.avatar.gaussians import FrameParams
from hravatar.render.camera import Camera

from .format import (
    DatasetError,
    frame_path,
    gt_path,
    open_validated,
    read_gt_info,
    read_png,
)


@dataclass
class FrameSample:
    """One frame of a dataset, on the dataset's device.

    index: global frame index (0..T-1) in the video.
    image: [H, W, 3] float RGB in [0, 1], background black.
    mask: [H, W, 1] float foreground mask in [0, 1].
    albedo: [H, W, 3] pseudo-albedo in [0, 1], or None when the dataset has none.
    camera: the frame's camera (intrinsics scaled to H x W).
    params: tracked driving parameters, batch of 1.
    landmarks: [478, 2] tracked 2D landmarks in pixels of the H x W image, or None when the
        dataset has none or tracking failed on this frame.
    """

    index: int
    image: Tensor
    mask: Tensor
    albedo: Tensor | None
    camera: Camera
    params: FrameParams
    landmarks: Tensor | None


def resize_image(image: Tensor, width: int, height: int) -> Tensor:
    """Resize with antialiasing: area averaging when shrinking, bilinear otherwise.

    Args:
        image: [H, W, C] float.
    Returns:
        [height, width, C] (the input itself when the size already matches).
    """
    H, W = image.shape[:2]
    if (W, H) == (width, height):
        return image
    x = image.permute(2, 0, 1)[None]
    if width <= W and height <= H:
        # area = exact box average for integer factors; no aliasing of fine hair/eye detail
        y = F.interpolate(x, size=(height, width), mode="area")
    else:
        y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0)


def _target_size(resolution, width: int, height: int) -> tuple[int, int]:
    """(width, height) for ``resolution``: None, an int (longer side) or (width, height)."""
    if resolution is None:
        return width, height
    if isinstance(resolution, int):
        s = resolution / max(width, height)
        return max(1, round(width * s)), max(1, round(height * s))
    w, h = (int(v) for v in resolution)
    if w < 1 or h < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return w, h


class HeadVideoDataset(torch.utils.data.Dataset):
    """Frames of a hravatar dataset folder with their cameras and tracked parameters.

    Images are decoded to uint8 (optionally resized, then re-quantised to 8 bits so that the
    preloaded and lazy paths give identical samples) and converted to float per item, which
    keeps 1000 frames of 512 x 512 at about 0.8 GB instead of 3 GB.

    Args:
        root: dataset folder (validated on open; raises :class:`DatasetError`).
        split: "train" (first T-K frames), "test" (last K frames) or "all".
        resolution: None (stored size), an int (longer side; aspect kept) or (width, height).
        device: where samples (and preloaded images) live.
        preload: decode all frames of the split once at open; False reads PNGs per item.

    Attributes:
        meta: the :class:`DatasetMeta`.
        beta: [S] shared shape vector.
        frame_indices: global frame indices of the split, in order.
        width, height: output image size.
    """

    def __init__(self, root: str | Path, split: str = "train", resolution=None, device="cpu", preload: bool = True) -> None:
        self.root = Path(root)
        self.meta, p = open_validated(self.root)
        self.split = split
        self.frame_indices = self.meta.split_indices(split)
        self.device = torch.device(device)
        self.width, self.height = _target_size(resolution, self.meta.width, self.meta.height)
        dev = self.device
        self.beta = p["beta"].float().to(dev)
        T = self.meta.num_frames
        K = p["K"].float()
        self._K = (K if K.dim() == 3 else K.expand(T, 3, 3)).to(dev)
        self._viewmat = p["viewmat"].float().to(dev)
        self._expr = p["expr"].float().to(dev)
        self._pose = p["pose"].float().to(dev)
        self._eyelids = p["eyelids"].float().to(dev)
        self._transl = p["transl"].float().to(dev)
        self._landmarks = None
        if "landmarks" in p:
            scale = torch.tensor([self.width / self.meta.width, self.height / self.meta.height])
            self._landmarks = (p["landmarks"].float() * scale).to(dev)
            self._landmarks_valid = p["landmarks_valid"].to(dev)
        self._kinds = ("frames", "masks") + (("albedo",) if self.meta.has_albedo else ())
        self._cache: dict[str, Tensor] | None = None
        if preload:
            per = [self._decode(i) for i in self.frame_indices]
            self._cache = {k: torch.stack([d[k] for d in per]) for k in self._kinds} if per else None

    # ------------------------------------------------------------------ images
    def _decode(self, index: int) -> dict[str, Tensor]:
        """uint8 [h, w, C] images of frame ``index`` at the output size, per kind."""
        out = {}
        for kind in self._kinds:
            a = read_png(frame_path(self.root, kind, index))
            a = a[..., None] if a.ndim == 2 else a
            a = a[..., :1] if kind == "masks" else a[..., :3]  # drop a PNG alpha channel
            t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
            if (self.width, self.height) != (self.meta.width, self.meta.height):
                t = resize_image(t.float() / 255.0, self.width, self.height)
                t = (t * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
            out[kind] = t
        return out

    def __len__(self) -> int:
        return len(self.frame_indices)

    def __getitem__(self, i: int) -> FrameSample:
        """The ``i``-th frame of the split (``FrameSample.index`` is its global index)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a split of {len(self)} frames")
        i = i % len(self)
        index = self.frame_indices[i]
        raw = {k: v[i] for k, v in self._cache.items()} if self._cache is not None else self._decode(index)
        f = {k: v.float() / 255.0 for k, v in raw.items()}
        lmk = None
        if self._landmarks is not None and bool(self._landmarks_valid[index]):
            lmk = self._landmarks[index]
        return FrameSample(
            index=index,
            image=f["frames"],
            mask=f["masks"],
            albedo=f.get("albedo"),
            camera=self.camera(index),
            params=self.frame_params([index]),
            landmarks=lmk,
        )

    # ------------------------------------------------------------------ parameters
    def camera(self, index: int) -> Camera:
        """Camera of global frame ``index`` at the output size."""
        cam = Camera(self._viewmat[index], self._K[index], self.meta.width, self.meta.height)
        if (self.width, self.height) == (self.meta.width, self.meta.height):
            return cam
        return cam.resized(self.width, self.height)

    def frame_params(self, indices) -> FrameParams:
        """Tracked parameters of the given *global* frame indices (any split), batched.

        Args:
            indices: sequence of B ints or a [B] int tensor.
        Returns:
            :class:`FrameParams` with B frames, on the dataset's device.
        """
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device).reshape(-1)
        return FrameParams(
            expr=self._expr[idx].clone(),
            pose=self._pose[idx].clone(),
            eyelids=self._eyelids[idx].clone(),
            transl=self._transl[idx].clone(),
        )

    # ------------------------------------------------------------------ ground truth (synthetic data)
    @property
    def gt_info(self) -> dict | None:
        """Parsed ``gt/gt.json`` (envs, rotations, frame lists), or None without ground truth."""
        return read_gt_info(self.root)

    def gt_envmap_path(self, env: str) -> Path:
        """Path of the ground-truth environment map named ``env``."""
        info = self.gt_info
        for e in (info or {}).get("envs", []):
            if e["name"] == env:
                return self.root / "gt" / e["envmap"]
        raise DatasetError(f"{self.root / 'gt' / 'gt.json'}: no environment named '{env}'")

    def gt_image(self, kind: str, index: int, env: str | None = None) -> Tensor:
        """A ground-truth image of global frame ``index`` at the output size.

        Args:
            kind: "relit" (RGB under environment ``env``), "albedo" (RGB) or "normal".
        Returns:
            [H, W, 3] float: RGB in [0, 1]; for "normal" unit world-space normals decoded from
            the stored ``n * 0.5 + 0.5`` (zero vectors where the stored pixel is black).
        """
        a = read_png(gt_path(self.root, kind, index, env))
        a = np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]
        t = resize_image(torch.from_numpy(np.ascontiguousarray(a)).to(self.device).float() / 255.0, self.width, self.height)
        if kind != "normal":
            return t
        background = t.amax(-1, keepdim=True) == 0
        n = F.normalize(t * 2.0 - 1.0, dim=-1)
        return torch.where(background, torch.zeros_like(n), n)
