"""The Gaussian head avatar: per-Gaussian attributes, initialisation on a head mesh, deformation.

Per-Gaussian parameters live in one ``nn.ParameterDict`` whose keys follow gsplat's
densification strategies (``means``, ``scales`` (log), ``quats``, ``opacities`` (logit));
every other per-Gaussian tensor also has N as its first dimension, so a strategy can
duplicate, split and prune all of them alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hravatar.head.lbs import (
    apply_transforms,
    axis_angle_to_matrix,
    blend_offsets,
    blend_transforms,
    normalize_skinning_weights,
    pose_feature,
    rigid_transforms,
)
from hravatar.head.model import JOINT_PARENTS, NUM_JOINTS, HeadModel
from hravatar.utils.rotation import matrix_to_quat, quat_multiply, quat_to_matrix

from .config import AvatarConfig

#: Per-Gaussian parameter names and their trailing shapes (N is always first).
PARAM_KEYS = (
    "means", "quats", "scales", "opacities", "albedo", "roughness", "f0",
    "shapedirs", "exprdirs", "posedirs", "lbs_weights", "eyelid_dirs",
)


@dataclass
class FrameParams:
    """Per-frame driving parameters (B frames).

    expr: [B, E] expression coefficients.
    pose: [B, 5, 3] axis-angle of root, neck, jaw, eye_l, eye_r.
    eyelids: [B, 2] eyelid closure (right, left).
    transl: [B, 3] global translation.
    """

    expr: Tensor
    pose: Tensor
    eyelids: Tensor
    transl: Tensor

    @staticmethod
    def neutral(n_expr: int, batch: int = 1, device=None) -> "FrameParams":
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        return FrameParams(z(batch, n_expr), z(batch, NUM_JOINTS, 3), z(batch, 2), z(batch, 3))

    def to(self, device) -> "FrameParams":
        return FrameParams(self.expr.to(device), self.pose.to(device), self.eyelids.to(device), self.transl.to(device))

    def with_expression(self, expr: Tensor, eyelids: Tensor, jaw: Tensor) -> "FrameParams":
        """The same head pose (root, neck, eyes) and translation with another expression [B, E],
        eyelids [B, 2] and jaw [B, 3] (or [3]): what an expression encoder drives."""
        pose = self.pose.clone()
        pose[:, 2] = jaw
        return FrameParams(expr, pose, eyelids, self.transl)


@dataclass
class DeformedGaussians:
    """Gaussians in pose space for B frames.

    means: [B, N, 3]; quats: [B, N, 4] (unit); scales: [B, N, 3] (linear);
    opacities: [N] in (0, 1); albedo: [N, 3]; roughness: [N, 1]; f0: [N, 1];
    rotmats: [B, N, 3, 3] rotation matrices of the deformed Gaussians.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    albedo: Tensor
    roughness: Tensor
    f0: Tensor
    rotmats: Tensor


def _logit(x: float | Tensor) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
    return torch.log(x / (1 - x))


def _range_logit(value: Tensor, lo: float, hi: float) -> Tensor:
    return _logit((value - lo) / (hi - lo))


def sample_on_mesh(
    vertices: Tensor, faces: Tensor, per_face: int, total: int | None, generator: torch.Generator, stratified: bool = False
) -> tuple[Tensor, Tensor]:
    """Random points on a triangle mesh.

    Args:
        vertices: [V, 3]; faces: [F, 3].
        per_face: points per triangle (used when ``total`` is None).
        total: if given, this many points distributed by area: i.i.d. (multinomial) or, with
            ``stratified``, a deterministic per-face count proportional to area (largest
            remainder), which leaves no clumps or holes.
    Returns:
        face_idx: [N] triangle of each point; bary: [N, 3] barycentric coordinates.
    """
    Fn = faces.shape[0]
    if total is None:
        face_idx = torch.arange(Fn).repeat_interleave(per_face)
    else:
        tri = vertices[faces]
        area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1).double()
        if stratified:
            want = area / area.sum() * total
            counts = want.floor().long()
            rest = total - int(counts.sum())
            if rest > 0:
                counts[torch.argsort(want - counts, descending=True)[:rest]] += 1
            face_idx = torch.arange(Fn).repeat_interleave(counts)
        else:
            face_idx = torch.multinomial((area / area.sum()).float(), total, replacement=True, generator=generator)
    u = torch.rand(face_idx.shape[0], 2, generator=generator)
    flip = u.sum(-1) > 1  # fold the unit square onto the triangle: uniform on its area
    u[flip] = 1 - u[flip]
    bary = torch.stack([1 - u[:, 0] - u[:, 1], u[:, 0], u[:, 1]], -1)
    return face_idx, bary


def _interp(values: Tensor, faces: Tensor, face_idx: Tensor, bary: Tensor) -> Tensor:
    """Barycentric interpolation of per-vertex ``values`` [V, ...] -> [N, ...]."""
    tri = values[faces[face_idx]]  # [N,3,...]
    w = bary.reshape(bary.shape + (1,) * (values.dim() - 1))
    return (tri * w).sum(1)


def _knn_mean_dist(points: Tensor, k: int = 3) -> Tensor:
    """[N] mean distance of each of ``points`` [N, 3] to its k nearest neighbours (k-d tree)."""
    from scipy.spatial import cKDTree

    p = points.detach().cpu().double().numpy()
    d, _ = cKDTree(p).query(p, k=k + 1)
    return torch.from_numpy(d[:, 1:].mean(-1)).float()


class GaussianAvatar(nn.Module):
    """Animatable, relightable Gaussian head (the method's canonical Gaussians + bases).

    Parameters (``self.params``, N Gaussians):
        means [N,3], quats [N,4] (w,x,y,z), scales [N,3] (log), opacities [N] (logit),
        albedo [N,3] (logit), roughness [N,1] (logit into ``roughness_range``),
        f0 [N,1] (logit into ``f0_range``), shapedirs [N,3,S], exprdirs [N,3,E],
        posedirs [N,3,36], lbs_weights [N,5] (raw; normalised by relu/sum at use),
        eyelid_dirs [N,2,3] (right, left).
    Other state: ``global_scale`` (learnable, log), buffers ``beta`` [S] (subject shape),
    ``joints`` [5,3] (rest joints of the shaped template), ``parents`` [5].
    """

    def __init__(self, params: dict[str, Tensor], joints: Tensor, beta: Tensor, config: AvatarConfig,
                 expr_names: list[str], head_identity: str = "", log_global_scale: float = 0.0) -> None:
        super().__init__()
        missing = [k for k in PARAM_KEYS if k not in params]
        if missing:
            raise ValueError(f"avatar parameters missing: {', '.join(missing)}")
        self.params = nn.ParameterDict({k: nn.Parameter(params[k].float().contiguous()) for k in PARAM_KEYS})
        self.log_global_scale = nn.Parameter(torch.tensor(float(log_global_scale)))
        self.register_buffer("joints", joints.float().reshape(NUM_JOINTS, 3))
        self.register_buffer("beta", beta.float().reshape(-1))
        self.register_buffer("parents", torch.tensor(JOINT_PARENTS, dtype=torch.int64))
        self.config = config
        self.expr_names = list(expr_names)
        self.head_identity = head_identity

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_head(cls, head: HeadModel, config: AvatarConfig | None = None, beta: Tensor | None = None) -> "GaussianAvatar":
        """Initialise on the head mesh by barycentric sampling (attributes interpolated).

        Args:
            head: the parametric head (any device; sampling is done on CPU).
            config: :class:`AvatarConfig`.
            beta: [S'] the subject's identity coefficients (zeros when None).
        """
        cfg = config or AvatarConfig()
        head = head.to("cpu")
        S, E = min(cfg.n_shape, head.num_shape), min(cfg.n_expr, head.num_expr)
        beta_full = torch.zeros(S)
        if beta is not None:
            beta_full[: min(S, beta.numel())] = beta.reshape(-1)[:S].float().cpu()
        g = torch.Generator().manual_seed(cfg.seed)
        faces = head.faces
        v_shaped = head.shaped_template(beta_full[None])[0]
        face_idx, bary = sample_on_mesh(v_shaped, faces, cfg.gaussians_per_face, cfg.num_gaussians, g,
                                        stratified=cfg.init_mode == "surface")
        N = face_idx.shape[0]

        # canonical = un-shaped template position; shape offsets are applied at deform time
        means = _interp(head.v_template, faces, face_idx, bary)
        shapedirs = _interp(head.shapedirs[..., :S], faces, face_idx, bary)
        exprdirs = _interp(head.exprdirs[..., :E], faces, face_idx, bary)
        posedirs = _interp(head.posedirs, faces, face_idx, bary)
        lbs_w = _interp(head.lbs_weights, faces, face_idx, bary)
        eyelid = _interp(head.eyelid_dirs.permute(1, 0, 2), faces, face_idx, bary)  # [N,2,3]

        pos = _interp(v_shaped, faces, face_idx, bary)
        nn_d = _knn_mean_dist(pos).clamp(min=1e-5)
        tri = v_shaped[faces[face_idx]]
        e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        normal = F.normalize(torch.linalg.cross(e1, e2), dim=-1)
        if cfg.init_mode == "surface":
            # flat discs in the triangle plane covering it: opaque, clean silhouettes untrained
            t1 = F.normalize(e1, dim=-1)
            t2 = torch.linalg.cross(normal, t1)
            R = torch.stack([t1, t2, normal], -1)  # columns = local axes
            quats = matrix_to_quat(R)
            area = 0.5 * torch.linalg.cross(e1, e2).norm(dim=-1)
            counts = torch.bincount(face_idx, minlength=faces.shape[0]).clamp(min=1)[face_idx].float()
            r = torch.sqrt(area / counts / math.pi).clamp(min=1e-4) * 1.5
            r = torch.minimum(r, nn_d * 2.0).clamp(min=2e-4)
            scales = torch.log(torch.stack([r, r, r * 0.1], -1))
            opac = torch.full((N,), 0.95)
        else:
            quats = torch.zeros(N, 4)
            quats[:, 0] = 1
            scales = torch.log(nn_d)[:, None].repeat(1, 3)
            opac = torch.full((N,), cfg.init_opacity)

        if cfg.albedo_init == "vertex" and head.vertex_colors.abs().sum() > 0:
            # vertex colours are display (sRGB) values; albedo is linear reflectance
            from hravatar.shading.tonemap import srgb_eotf

            albedo = srgb_eotf(_interp(head.vertex_colors, faces, face_idx, bary)).clamp(0.02, 0.98)
        else:
            albedo = torch.full((N, 3), float(cfg.albedo_init) if cfg.albedo_init != "vertex" else 0.5)
        rlo, rhi = cfg.roughness_range
        flo, fhi = cfg.f0_range
        params = {
            "means": means,
            "quats": quats,
            "scales": scales,
            "opacities": _logit(opac),
            "albedo": _logit(albedo),
            "roughness": _range_logit(torch.full((N, 1), cfg.roughness_init), rlo, rhi),
            "f0": _range_logit(torch.full((N, 1), cfg.f0_init), flo, fhi),
            "shapedirs": shapedirs,
            "exprdirs": exprdirs,
            "posedirs": posedirs,
            "lbs_weights": lbs_w,
            "eyelid_dirs": eyelid,
        }
        joints = head.joints_rest(beta_full[None])[0]
        return cls(params, joints, beta_full, cfg, head.expr_names[:E], head.identity())

    # ---------------------------------------------------------------- properties
    @property
    def num_gaussians(self) -> int:
        return self.params["means"].shape[0]

    @property
    def num_expr(self) -> int:
        return self.params["exprdirs"].shape[-1]

    @property
    def device(self) -> torch.device:
        return self.params["means"].device

    def opacity(self) -> Tensor:
        """[N] opacities in (0, 1)."""
        return torch.sigmoid(self.params["opacities"])

    def albedo(self) -> Tensor:
        """[N, 3] albedo in (0, 1)."""
        return torch.sigmoid(self.params["albedo"])

    def roughness(self) -> Tensor:
        """[N, 1] roughness in ``config.roughness_range``."""
        lo, hi = self.config.roughness_range
        return lo + (hi - lo) * torch.sigmoid(self.params["roughness"])

    def f0(self) -> Tensor:
        """[N, 1] Fresnel reflectance at normal incidence in ``config.f0_range``."""
        lo, hi = self.config.f0_range
        return lo + (hi - lo) * torch.sigmoid(self.params["f0"])

    def with_offsets(self, basis_offsets: dict[str, Tensor]) -> "GaussianAvatar":
        """A copy whose per-Gaussian parameters include ``basis_offsets`` (baked, detached)."""
        p = {k: v.detach() + (basis_offsets[k].detach() if k in basis_offsets else 0) for k, v in self.params.items()}
        return GaussianAvatar(p, self.joints, self.beta, self.config, self.expr_names, self.head_identity,
                              float(self.log_global_scale.detach())).to(self.device)

    def canonical_means(self) -> Tensor:
        """[N, 3] canonical positions with the subject's shape applied (X + sum_m beta_m S_m)."""
        x = self.params["means"]
        if self.beta.numel():
            x = x + blend_offsets(self.params["shapedirs"], self.beta[None])[0]
        return x

    def neutral_frame(self, batch: int = 1) -> FrameParams:
        return FrameParams.neutral(self.num_expr, batch, self.device)

    # ---------------------------------------------------------------- deformation
    def deform(self, frame: FrameParams, basis_offsets: dict[str, Tensor] | None = None) -> DeformedGaussians:
        """Canonical -> pose space, exactly the method's order (see :func:`deform_gaussians`).

        ``basis_offsets`` (optional, e.g. from the shared-MLP ablation) are added to the
        per-Gaussian parameters of the same names before deforming.
        """
        p = dict(self.params)
        for k, v in (basis_offsets or {}).items():
            p[k] = p[k] + v
        means, quats, scales, R = deform_gaussians(
            means=p["means"], quats=p["quats"], log_scales=p["scales"],
            shapedirs=p["shapedirs"], exprdirs=p["exprdirs"], posedirs=p["posedirs"],
            lbs_weights=p["lbs_weights"], eyelid_dirs=p["eyelid_dirs"],
            beta=self.beta, joints=self.joints, parents=self.parents,
            expr=frame.expr, pose=frame.pose, eyelids=frame.eyelids, transl=frame.transl,
            global_scale=self.log_global_scale.exp(),
        )
        return DeformedGaussians(means, quats, scales, self.opacity(), self.albedo(), self.roughness(), self.f0(), R)


def deform_gaussians(
    *, means: Tensor, quats: Tensor, log_scales: Tensor, shapedirs: Tensor, exprdirs: Tensor,
    posedirs: Tensor, lbs_weights: Tensor, eyelid_dirs: Tensor, beta: Tensor, joints: Tensor,
    parents: Tensor, expr: Tensor, pose: Tensor, eyelids: Tensor, transl: Tensor, global_scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The method's deformation of canonical Gaussians into pose space.

        X_c = X + sum_m beta_m S_m
        X_e = X_c + sum_k psi_k E_k + sum_j (R(theta)_j - I) P_j + sum_l eyelid_l D_l
        T   = sum_k relu(W_k)/(sum relu(W) + 1e-5) A_k
        X_p = s * (T[:3,:3] X_e + T[:3,3] + transl),   q_p = quat(T[:3,:3]) * q,   scale_p = s * exp(log_scale)

    Args:
        means: [N, 3]; quats: [N, 4]; log_scales: [N, 3].
        shapedirs: [N, 3, S]; exprdirs: [N, 3, E]; posedirs: [N, 3, 36]; lbs_weights: [N, 5];
        eyelid_dirs: [N, 2, 3].
        beta: [S'] subject shape; joints: [5, 3] rest joints of the shaped template; parents: [5].
        expr: [B, E']; pose: [B, 5, 3] axis-angle; eyelids: [B, 2]; transl: [B, 3].
        global_scale: scalar tensor s.
    Returns:
        means [B, N, 3], quats [B, N, 4], scales [B, N, 3], rotmats [B, N, 3, 3].
    """
    B = expr.shape[0]
    x = means[None]
    if beta.numel():
        x = x + blend_offsets(shapedirs, beta[None])
    x = x + blend_offsets(exprdirs, expr)
    R_local = axis_angle_to_matrix(pose.reshape(B, NUM_JOINTS, 3))
    x = x + blend_offsets(posedirs, pose_feature(R_local))
    x = x + torch.einsum("bl,nli->bni", eyelids, eyelid_dirs)
    _, A = rigid_transforms(R_local, joints[None].expand(B, -1, -1), parents)
    T = blend_transforms(normalize_skinning_weights(lbs_weights), A)
    x = (apply_transforms(T, x) + transl[:, None]) * global_scale
    q_T = matrix_to_quat(T[..., :3, :3])
    q = F.normalize(quat_multiply(q_T, F.normalize(quats, dim=-1)[None].expand(B, -1, -1)), dim=-1)
    scales = torch.exp(log_scales)[None].expand(B, -1, -1) * global_scale
    return x, q, scales, quat_to_matrix(q)


def thin_axes(rotmats: Tensor, scales: Tensor) -> Tensor:
    """Shortest axis of each Gaussian (either sign).

    Args:
        rotmats: [..., N, 3, 3] (columns are the local axes); scales: [..., N, 3] (linear or log).
    Returns:
        [..., N, 3] unit axes.
    """
    idx = scales.argmin(-1)  # [...,N]
    return torch.gather(rotmats, -1, idx[..., None, None].expand(*idx.shape, 3, 1))[..., 0]


def gaussian_normals(rotmats: Tensor, scales: Tensor, means: Tensor, cam_pos: Tensor) -> Tensor:
    """Normal of each Gaussian: its shortest axis, flipped to face the camera.

    Args:
        rotmats: [..., N, 3, 3] (columns are the local axes); scales: [..., N, 3];
        means: [..., N, 3]; cam_pos: [3] camera centre.
    Returns:
        [..., N, 3] unit normals.
    """
    axis = thin_axes(rotmats, scales)
    to_cam = cam_pos - means
    sign = torch.where((axis * to_cam).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    return axis * sign
