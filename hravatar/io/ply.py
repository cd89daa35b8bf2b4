"""Export Gaussians in the standard 3DGS ``.ply`` layout (readable by common splat viewers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .safe import CheckpointError, atomic_write_bytes

#: Zeroth-order real spherical harmonic constant: colour = 0.5 + SH_C0 * f_dc.
SH_C0 = 0.28209479177387814


def _fields(n_rest: int) -> list[str]:
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(n_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def write_gaussian_ply(path: str | Path, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                       colors: Tensor, sh_degree: int = 3) -> None:
    """Write Gaussians as a binary little-endian 3DGS ``.ply`` (atomically).

    Args:
        means: [N, 3] positions; quats: [N, 4] (w, x, y, z); scales: [N, 3] linear scales;
        opacities: [N] in (0, 1); colors: [N, 3] display colours in [0, 1] (stored as SH DC).
        sh_degree: the file declares this SH degree with zero higher-order coefficients
            (degree 3 = 45 ``f_rest`` fields, what most viewers expect).
    """
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    names = _fields(n_rest)
    N = means.shape[0]
    data = np.zeros((N, len(names)), dtype=np.float32)
    col = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    data[:, 0:3] = col(means)
    data[:, 6:9] = (col(colors).clip(0, 1) - 0.5) / SH_C0
    o = col(opacities).reshape(N).clip(1e-6, 1 - 1e-6)
    base = 9 + n_rest
    data[:, base] = np.log(o / (1 - o))
    data[:, base + 1 : base + 4] = np.log(np.maximum(col(scales), 1e-12))
    q = col(quats)
    data[:, base + 4 : base + 8] = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {N}\n"
    header += "".join(f"property float {n}\n" for n in names) + "end_header\n"
    atomic_write_bytes(path, header.encode("ascii") + data.tobytes())


def read_gaussian_ply(path: str | Path) -> dict[str, Tensor]:
    """Read a 3DGS ``.ply`` written by any trainer (float properties, binary little endian).

    Returns:
        dict with means [N,3], quats [N,4], scales [N,3] (linear), opacities [N] (0..1),
        colors [N,3] (from SH DC, clamped to [0,1]).
    """
    path = Path(path)
    raw = path.read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply") or end < 0:
        raise CheckpointError(f"{path}: not a PLY file")
    lines = raw[:end].decode("ascii", "replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise CheckpointError(f"{path}: only binary little-endian PLY is supported")
    n = next(int(l.split()[2]) for l in lines if l.startswith("element vertex"))
    props = [l.split()[2] for l in lines if l.startswith("property")]
    if any(l.split()[1] != "float" for l in lines if l.startswith("property")):
        raise CheckpointError(f"{path}: non-float PLY properties are not supported")
    body = raw[end + len(b"end_header\n"):]
    if len(body) < n * len(props) * 4:
        raise CheckpointError(f"{path}: truncated PLY ({len(body)} bytes for {n} vertices)")
    arr = np.frombuffer(body[: n * len(props) * 4], dtype="<f4").reshape(n, len(props))
    g = lambda *ns: torch.from_numpy(np.stack([arr[:, props.index(k)] for k in ns], -1).copy())  # noqa: E731
    try:
        return {
            "means": g("x", "y", "z"),
            "quats": g("rot_0", "rot_1", "rot_2", "rot_3"),
            "scales": torch.exp(g("scale_0", "scale_1", "scale_2")),
            "opacities": torch.sigmoid(g("opacity")[:, 0]),
            "colors": (0.5 + SH_C0 * g("f_dc_0", "f_dc_1", "f_dc_2")).clamp(0, 1),
        }
    except ValueError as e:
        raise CheckpointError(f"{path}: missing 3DGS property ({e})") from None
