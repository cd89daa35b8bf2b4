"""Rigged-to-mesh deformation (the method's ablation, as in GaussianAvatars).

Every Gaussian is bound to its nearest triangle of the head mesh in the canonical (shaped,
neutral) state and follows that triangle rigidly, with the triangle's scale change:

    x' = s * (k/k0 * R R0^T (x_c - T0) + T),   q' = quat(R R0^T) q,   scale' = s * k/k0 * scale

where (R0, T0, k0) and (R, T, k) are the triangle's frame (edge, normal, their cross),
centroid and mean edge length in the canonical and the posed mesh, x_c the Gaussian's
canonical position with the subject's shape applied, and s the avatar's global scale.
The per-Gaussian bases and skinning weights are not used: the mesh carries the expression.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hravatar.head.model import HeadModel
from hravatar.utils.rotation import matrix_to_quat, quat_multiply, quat_to_matrix

from .gaussians import DeformedGaussians, FrameParams, GaussianAvatar


def triangle_frames(verts: Tensor, faces: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal frame, centroid and size of every triangle.

    Args:
        verts: [B, V, 3]; faces: [F, 3].
    Returns:
        R [B, F, 3, 3] (columns: first edge, normal, their cross), T [B, F, 3] centroids,
        k [B, F] mean edge length.
    """
    tri = verts[:, faces]  # [B, F, 3, 3]
    e0 = tri[:, :, 1] - tri[:, :, 0]
    e1 = tri[:, :, 2] - tri[:, :, 0]
    a = F.normalize(e0, dim=-1)
    n = F.normalize(torch.linalg.cross(e0, e1, dim=-1), dim=-1)
    b = torch.linalg.cross(a, n, dim=-1)
    R = torch.stack([a, n, b], -1)
    T = tri.mean(2)
    k = (e0.norm(dim=-1) + e1.norm(dim=-1) + (tri[:, :, 2] - tri[:, :, 1]).norm(dim=-1)) / 3
    return R, T, k


def nearest_faces(points: Tensor, centroids: Tensor, chunk: int = 4096) -> Tensor:
    """[N] index of the nearest centroid [F, 3] for each point [N, 3] (chunked brute force)."""
    out = []
    for p in points.split(chunk):
        out.append(torch.cdist(p, centroids).argmin(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=points.device)


class MeshRig(nn.Module):
    """Drives a :class:`GaussianAvatar` by the head mesh's triangles instead of its own bases.

    The binding ([N] triangle index, a buffer saved with the rig) is recomputed (nearest
    canonical triangle centroid) whenever the number of Gaussians changes, i.e. after
    densification or pruning; between those it stays fixed while the Gaussians move.
    """

    def __init__(self, head: HeadModel, beta: Tensor) -> None:
        super().__init__()
        self._head = (head,)  # not a child module: its tensors are not part of the rig's state
        self.register_buffer("beta", beta.float().reshape(1, -1), persistent=False)
        with torch.no_grad():
            v0 = head(beta=self.beta).vertices
            R0, T0, k0 = triangle_frames(v0, head.faces)
        self.register_buffer("R0", R0[0], persistent=False)
        self.register_buffer("T0", T0[0], persistent=False)
        self.register_buffer("k0", k0[0].clamp(min=1e-8), persistent=False)
        self.register_buffer("binding", torch.zeros(0, dtype=torch.long))

    @property
    def head(self) -> HeadModel:
        return self._head[0]

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the head too
        self._head[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "binding"
        if key in state_dict:  # the number of Gaussians is the checkpoint's, not ours
            self.binding = torch.empty_like(state_dict[key], device=self.binding.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def bind(self, x_c: Tensor) -> Tensor:
        """[N] triangle of each Gaussian (recomputed when N changed)."""
        if self.binding.shape[0] != x_c.shape[0]:
            self.binding = nearest_faces(x_c.detach(), self.T0)
        return self.binding

    def deform(self, avatar: GaussianAvatar, frame: FrameParams) -> DeformedGaussians:
        """Canonical -> pose space through the posed head mesh (B frames)."""
        x_c = avatar.canonical_means()  # what the bindings refer to
        f = self.bind(x_c)
        B = frame.expr.shape[0]
        E = min(frame.expr.shape[-1], self.head.num_expr)
        out = self.head(beta=self.beta.expand(B, -1), psi=frame.expr[:, :E], pose=frame.pose,
                        eyelids=frame.eyelids, transl=frame.transl)
        R, T, k = triangle_frames(out.vertices, self.head.faces)
        rel = R[:, f] @ self.R0[f].transpose(-1, -2)[None]  # [B, N, 3, 3]
        ratio = (k[:, f] / self.k0[f][None])[..., None]  # [B, N, 1]
        s = avatar.log_global_scale.exp()
        local = (x_c - self.T0[f])[None, ..., None]
        means = s * (ratio * (rel @ local)[..., 0] + T[:, f])
        q = F.normalize(quat_multiply(matrix_to_quat(rel), F.normalize(avatar.params["quats"], dim=-1)[None].expand(B, -1, -1)), dim=-1)
        scales = torch.exp(avatar.params["scales"])[None] * ratio * s
        return DeformedGaussians(means, q, scales, avatar.opacity(), avatar.albedo(), avatar.roughness(), avatar.f0(), quat_to_matrix(q))
