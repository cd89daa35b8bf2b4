"""The "shared-MLP deformation" ablation: one MLP of the canonical position predicts every
Gaussian's expression basis, pose-corrective basis and skinning-weight offsets, instead of
free per-Gaussian values (as INSTA / PointAvatar-style methods do)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def positional_encoding(x: Tensor, n_freq: int, scale: float) -> Tensor:
    """NeRF-style encoding of positions x [N, 3] (divided by ``scale``) -> [N, 3 + 6 n_freq]."""
    xs = x / scale
    out = [xs]
    for k in range(n_freq):
        f = (2.0**k) * math.pi
        out += [torch.sin(f * xs), torch.cos(f * xs)]
    return torch.cat(out, -1)


class SharedDeformMLP(nn.Module):
    """MLP(PE(x)) -> offsets of exprdirs [N,3,E], posedirs [N,3,P] and lbs_weights [N,K].

    The offsets are added to the mesh-interpolated (frozen) bases, so at initialisation (zero
    last layer) the avatar deforms exactly like its head model.
    """

    def __init__(self, n_expr: int, n_pose: int = 36, n_joints: int = 5, hidden: int = 128, layers: int = 3,
                 n_freq: int = 6, scale: float = 0.15) -> None:
        super().__init__()
        self.n_expr, self.n_pose, self.n_joints = n_expr, n_pose, n_joints
        self.n_freq, self.scale = n_freq, scale
        dims = [3 + 6 * n_freq] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.trunk = nn.Sequential(*mods)
        self.head = nn.Linear(hidden, 3 * n_expr + 3 * n_pose + n_joints)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, means: Tensor) -> dict[str, Tensor]:
        """Args: means [N, 3] canonical positions. Returns offsets keyed like the avatar params."""
        h = self.head(self.trunk(positional_encoding(means, self.n_freq, self.scale)))
        E3, P3 = 3 * self.n_expr, 3 * self.n_pose
        N = means.shape[0]
        return {
            "exprdirs": h[:, :E3].reshape(N, 3, self.n_expr) * 1e-2,  # metres per unit: keep the start gentle
            "posedirs": h[:, E3 : E3 + P3].reshape(N, 3, self.n_pose) * 1e-2,
            "lbs_weights": h[:, E3 + P3 :],
        }
