"""Pinhole cameras in the OpenCV convention (x right, y down, z forward), as gsplat."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Camera:
    """One pinhole camera.

    viewmat: [4, 4] world -> camera transform (OpenCV axes).
    K: [3, 3] intrinsics (pixels; pixel centres at integer + 0.5).
    width, height: image size in pixels.
    """

    viewmat: Tensor
    K: Tensor
    width: int
    height: int

    def to(self, device) -> "Camera":
        return Camera(self.viewmat.to(device), self.K.to(device), self.width, self.height)

    @property
    def device(self) -> torch.device:
        return self.viewmat.device

    @property
    def position(self) -> Tensor:
        """[3] camera centre in world coordinates."""
        R, t = self.viewmat[:3, :3], self.viewmat[:3, 3]
        return -R.T @ t

    def resized(self, width: int, height: int) -> "Camera":
        """Same view at another resolution (intrinsics scaled)."""
        K = self.K.clone()
        K[0] *= width / self.width
        K[1] *= height / self.height
        return Camera(self.viewmat, K, width, height)

    def view_dirs(self) -> Tensor:
        """[H, W, 3] unit world-space directions from each pixel centre *towards the camera*."""
        H, W = self.height, self.width
        dev, dt = self.viewmat.device, self.viewmat.dtype
        ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=dt) + 0.5, torch.arange(W, device=dev, dtype=dt) + 0.5, indexing="ij")
        fx, fy, cx, cy = self.K[0, 0], self.K[1, 1], self.K[0, 2], self.K[1, 2]
        d_cam = torch.stack([(xs - cx) / fx, (ys - cy) / fy, torch.ones_like(xs)], -1)
        d_world = d_cam @ self.viewmat[:3, :3]  # R^T d
        return -torch.nn.functional.normalize(d_world, dim=-1)


def intrinsics_from_fov(fov_y_deg: float, width: int, height: int, device=None, dtype=torch.float32) -> Tensor:
    """[3, 3] intrinsics for a vertical field of view, principal point at the centre."""
    f = 0.5 * height / math.tan(math.radians(fov_y_deg) * 0.5)
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], device=device, dtype=dtype)


def look_at(eye, target, up=(0.0, 1.0, 0.0), device=None, dtype=torch.float32) -> Tensor:
    """[4, 4] world -> camera (OpenCV) matrix for a camera at ``eye`` looking at ``target``."""
    eye = torch.as_tensor(eye, device=device, dtype=dtype)
    target = torch.as_tensor(target, device=device, dtype=dtype)
    up = torch.as_tensor(up, device=device, dtype=dtype)
    z = torch.nn.functional.normalize(target - eye, dim=0)  # forward
    x = torch.nn.functional.normalize(torch.linalg.cross(z, up), dim=0)  # right (OpenCV: x right)
    y = torch.linalg.cross(z, x)  # down
    R = torch.stack([x, y, z], 0)
    M = torch.eye(4, device=device, dtype=dtype)
    M[:3, :3] = R
    M[:3, 3] = -R @ eye
    return M


def orbit_camera(
    yaw_deg: float = 0.0,
    pitch_deg: float = 0.0,
    distance: float = 1.0,
    target=(0.0, 0.0, 0.0),
    fov_y_deg: float = 20.0,
    width: int = 512,
    height: int = 512,
    device=None,
) -> Camera:
    """Camera on a sphere around ``target``; yaw 0 / pitch 0 looks at the face (+z side)."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    t = torch.as_tensor(target, dtype=torch.float32)
    eye = t + distance * torch.tensor([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    return Camera(look_at(eye, t, device=device), intrinsics_from_fov(fov_y_deg, width, height, device=device), width, height)
