"""Small synthetic fixtures shared by the tests (no files, deterministic)."""
from __future__ import annotations

import math

import torch

from hravatar.head.model import NUM_MEDIAPIPE_LANDMARKS, HeadModel


def uv_sphere(n_lat: int = 12, n_lon: int = 16, radius: float = 0.1):
    """Closed UV sphere: vertices [V,3], faces [F,3] (outward winding)."""
    verts = [[0.0, radius, 0.0]]
    for i in range(1, n_lat):
        th = math.pi * i / n_lat
        for j in range(n_lon):
            ph = 2 * math.pi * j / n_lon
            verts.append([radius * math.sin(th) * math.sin(ph), radius * math.cos(th), radius * math.sin(th) * math.cos(ph)])
    verts.append([0.0, -radius, 0.0])
    faces = []
    ring = lambda i, j: 1 + (i - 1) * n_lon + (j % n_lon)  # noqa: E731
    for j in range(n_lon):
        faces.append([0, ring(1, j), ring(1, j + 1)])
    for i in range(1, n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)
            faces += [[a, c, b], [b, c, d]]
    last = len(verts) - 1
    for j in range(n_lon):
        faces.append([last, ring(n_lat - 1, j + 1), ring(n_lat - 1, j)])
    return torch.tensor(verts), torch.tensor(faces)


def tiny_head(seed: int = 0, n_shape: int = 4, n_expr: int = 6) -> HeadModel:
    """A random but valid head model on a small sphere (for deformation / IO tests)."""
    g = torch.Generator().manual_seed(seed)
    v, f = uv_sphere()
    V = v.shape[0]
    K = 5
    # joints: root below, neck, jaw in front-low, eyes in front
    J = torch.tensor([[0, -0.12, 0], [0, -0.05, -0.01], [0, -0.02, 0.03], [0.03, 0.03, 0.07], [-0.03, 0.03, 0.07]])
    d = torch.cdist(v, J)
    w = torch.softmax(-d / 0.03, -1)
    # regressor: each joint = weighted average of its 4 nearest vertices, then exact via lstsq-free trick
    reg = torch.zeros(K, V)
    idx = d.topk(4, dim=0, largest=False).indices  # [4,K]
    for k in range(K):
        reg[k, idx[:, k]] = 0.25
    return HeadModel(
        name="tiny",
        v_template=v,
        faces=f,
        shapedirs=torch.randn(V, 3, n_shape, generator=g) * 0.003,
        exprdirs=torch.randn(V, 3, n_expr, generator=g) * 0.003,
        posedirs=torch.randn(V, 3, 36, generator=g) * 0.001,
        J_regressor=reg,
        lbs_weights=w,
        eyelid_dirs=torch.randn(2, V, 3, generator=g) * 0.002,
        regions={"face": v[:, 2] > 0, "scalp": v[:, 1] > 0.05},
        lmk_faces=torch.randint(0, f.shape[0], (NUM_MEDIAPIPE_LANDMARKS,), generator=g),
        lmk_bary=torch.softmax(torch.randn(NUM_MEDIAPIPE_LANDMARKS, 3, generator=g), -1),
        vertex_colors=torch.rand(V, 3, generator=g),
    )
