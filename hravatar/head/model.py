"""The parametric head model abstraction shared by the built-in head, FLAME and ICT-FaceKit."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .lbs import (
    apply_transforms,
    axis_angle_to_matrix,
    blend_offsets,
    blend_transforms,
    pose_feature,
    rigid_transforms,
)

#: Joint order used by every head model (FLAME's): root(global), neck, jaw, left eye, right eye.
JOINT_NAMES = ("root", "neck", "jaw", "eye_l", "eye_r")
JOINT_PARENTS = (-1, 0, 1, 1, 1)
NUM_JOINTS = len(JOINT_NAMES)
#: Region names every head model provides as per-vertex boolean masks.
REGION_NAMES = ("face", "scalp", "ears", "neck", "eyes", "lips", "teeth", "mouth_interior")
#: Number of MediaPipe face-mesh landmarks (468 mesh points + 10 iris points).
NUM_MEDIAPIPE_LANDMARKS = 478


@dataclass
class HeadOutput:
    """Result of :meth:`HeadModel.forward`.

    vertices: [B, V, 3] posed vertices.
    joints: [B, K, 3] posed joint positions.
    transforms: [B, K, 4, 4] LBS transforms ``A_k`` (rest -> posed).
    landmarks: [B, 478, 3] MediaPipe landmarks on the posed surface.
    """

    vertices: Tensor
    joints: Tensor
    transforms: Tensor
    landmarks: Tensor


class HeadModel(nn.Module):
    """A linear parametric head with LBS, as FLAME.

    All tensors are registered buffers, so ``.to(device)`` works and the model is
    device-agnostic. Coordinates: metres, +y up, +z out of the face (the head looks along +z).

    Buffers (V vertices, F faces, S shape modes, E expression modes, K=5 joints):
        v_template: [V, 3] neutral template.
        faces: [F, 3] int64 triangle indices.
        shapedirs: [V, 3, S] identity basis.
        exprdirs: [V, 3, E] expression basis.
        posedirs: [V, 3, (K-1)*9] pose-corrective basis (driven by R - I of non-root joints).
        J_regressor: [K, V] joint regressor (rows sum to 1).
        parents: [K] kinematic parents (-1 for the root).
        lbs_weights: [V, K] skinning weights (rows sum to 1).
        eyelid_dirs: [2, V, 3] eyelid-closing displacements (index 0 right, 1 left).
        regions: [R, V] bool masks, one per name in ``region_names``.
        lmk_faces: [478] int64 face index of each MediaPipe landmark.
        lmk_bary: [478, 3] barycentric coordinates of each landmark in its face.
        vertex_colors: [V, 3] optional default albedo, sRGB-encoded in [0,1] (zeros when unknown).
    """

    def __init__(
        self,
        *,
        name: str,
        v_template: Tensor,
        faces: Tensor,
        shapedirs: Tensor,
        exprdirs: Tensor,
        posedirs: Tensor,
        J_regressor: Tensor,
        lbs_weights: Tensor,
        eyelid_dirs: Tensor,
        regions: dict[str, Tensor],
        lmk_faces: Tensor,
        lmk_bary: Tensor,
        expr_names: list[str] | None = None,
        shape_names: list[str] | None = None,
        parents: Tensor | None = None,
        vertex_colors: Tensor | None = None,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        V = v_template.shape[0]
        f32 = dict(dtype=torch.float32)
        self.name = name
        self.expr_names = list(expr_names) if expr_names is not None else [f"expr{i:02d}" for i in range(exprdirs.shape[-1])]
        self.shape_names = list(shape_names) if shape_names is not None else [f"shape{i:02d}" for i in range(shapedirs.shape[-1])]
        self.region_names = list(REGION_NAMES)
        self.joint_names = list(JOINT_NAMES)
        self.meta = dict(meta or {})
        if parents is None:
            parents = torch.tensor(JOINT_PARENTS)
        self.register_buffer("v_template", v_template.to(**f32).contiguous())
        self.register_buffer("faces", faces.to(torch.int64).contiguous())
        self.register_buffer("shapedirs", shapedirs.to(**f32).contiguous())
        self.register_buffer("exprdirs", exprdirs.to(**f32).contiguous())
        self.register_buffer("posedirs", posedirs.to(**f32).contiguous())
        self.register_buffer("J_regressor", J_regressor.to(**f32).contiguous())
        self.register_buffer("parents", parents.to(torch.int64))
        self.register_buffer("lbs_weights", lbs_weights.to(**f32).contiguous())
        self.register_buffer("eyelid_dirs", eyelid_dirs.to(**f32).contiguous())
        reg = torch.zeros(len(REGION_NAMES), V, dtype=torch.bool)
        for i, rn in enumerate(REGION_NAMES):
            if rn in regions:
                reg[i] = regions[rn].to(torch.bool)
        self.register_buffer("regions", reg)
        self.register_buffer("lmk_faces", lmk_faces.to(torch.int64))
        self.register_buffer("lmk_bary", lmk_bary.to(**f32))
        if vertex_colors is None:
            vertex_colors = torch.zeros(V, 3)
        self.register_buffer("vertex_colors", vertex_colors.to(**f32))
        self.validate()

    # ------------------------------------------------------------------ sizes
    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def num_shape(self) -> int:
        return self.shapedirs.shape[-1]

    @property
    def num_expr(self) -> int:
        return self.exprdirs.shape[-1]

    def region(self, name: str) -> Tensor:
        """[V] bool mask of a named region."""
        return self.regions[self.region_names.index(name)]

    def validate(self) -> None:
        """Check buffer shapes; raises ValueError naming the first inconsistency."""
        V, K = self.num_vertices, NUM_JOINTS
        checks = [
            ("faces", self.faces.dim() == 2 and self.faces.shape[1] == 3 and int(self.faces.max()) < V),
            ("shapedirs", self.shapedirs.shape[:2] == (V, 3)),
            ("exprdirs", self.exprdirs.shape[:2] == (V, 3)),
            ("posedirs", tuple(self.posedirs.shape) == (V, 3, (K - 1) * 9)),
            ("J_regressor", tuple(self.J_regressor.shape) == (K, V)),
            ("lbs_weights", tuple(self.lbs_weights.shape) == (V, K)),
            ("eyelid_dirs", tuple(self.eyelid_dirs.shape) == (2, V, 3)),
            ("lmk_faces", tuple(self.lmk_faces.shape) == (NUM_MEDIAPIPE_LANDMARKS,)),
            ("lmk_bary", tuple(self.lmk_bary.shape) == (NUM_MEDIAPIPE_LANDMARKS, 3)),
            ("expr_names", len(self.expr_names) == self.num_expr),
            ("shape_names", len(self.shape_names) == self.num_shape),
        ]
        for what, ok in checks:
            if not ok:
                raise ValueError(f"head model '{self.name}': inconsistent {what}")

    # --------------------------------------------------------------- forward
    def shaped_template(self, beta: Tensor | None) -> Tensor:
        """[B, V, 3] template with identity offsets (B=1 when beta is None)."""
        v = self.v_template[None]
        if beta is None:
            return v
        return v + blend_offsets(self.shapedirs, beta)

    def joints_rest(self, beta: Tensor | None = None) -> Tensor:
        """[B, K, 3] rest joint positions of the shaped template."""
        return torch.einsum("kv,bvi->bki", self.J_regressor, self.shaped_template(beta))

    def forward(
        self,
        beta: Tensor | None = None,
        psi: Tensor | None = None,
        pose: Tensor | None = None,
        eyelids: Tensor | None = None,
        transl: Tensor | None = None,
    ) -> HeadOutput:
        """Evaluate the head.

        Args:
            beta: [B, S'] identity coefficients (S' <= S), or None.
            psi: [B, E'] expression coefficients (E' <= E), or None.
            pose: [B, K, 3] axis-angle per joint (root, neck, jaw, eye_l, eye_r) or [B, 15].
            eyelids: [B, 2] eyelid closure (right, left), 0 open .. 1 closed.
            transl: [B, 3] global translation.
        Returns:
            :class:`HeadOutput`.
        """
        B = next((t.shape[0] for t in (beta, psi, pose, eyelids, transl) if t is not None), 1)
        dev, dt = self.v_template.device, self.v_template.dtype
        v = self.shaped_template(beta).expand(B, -1, -1)
        J = torch.einsum("kv,bvi->bki", self.J_regressor, v)
        if psi is not None:
            v = v + blend_offsets(self.exprdirs, psi)
        if eyelids is not None:
            v = v + torch.einsum("bl,lvi->bvi", eyelids, self.eyelid_dirs)
        if pose is None:
            pose = torch.zeros(B, NUM_JOINTS, 3, device=dev, dtype=dt)
        pose = pose.reshape(B, NUM_JOINTS, 3)
        R = axis_angle_to_matrix(pose)
        v = v + blend_offsets(self.posedirs, pose_feature(R))
        posed_joints, A = rigid_transforms(R, J, self.parents)
        T = blend_transforms(self.lbs_weights, A)
        verts = apply_transforms(T, v)
        if transl is not None:
            verts = verts + transl[:, None]
            posed_joints = posed_joints + transl[:, None]
            A = A.clone()
            A[..., :3, 3] = A[..., :3, 3] + transl[:, None]
        lmk = self.landmarks(verts)
        return HeadOutput(vertices=verts, joints=posed_joints, transforms=A, landmarks=lmk)

    def landmarks(self, vertices: Tensor) -> Tensor:
        """[B, 478, 3] barycentric landmarks of ``vertices`` [B, V, 3]."""
        tri = self.faces[self.lmk_faces]  # [L,3]
        return (vertices[:, tri] * self.lmk_bary[None, :, :, None]).sum(2)

    # --------------------------------------------------------------- identity / io
    def identity(self) -> str:
        """Short content hash identifying this exact model (stored in checkpoints)."""
        h = hashlib.sha1()
        h.update(self.name.encode())
        for t in (self.v_template, self.faces, self.shapedirs, self.exprdirs):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return f"{self.name}:{h.hexdigest()[:12]}"

    def tensors(self) -> dict[str, Tensor]:
        """All buffers as a flat dict (for safetensors)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.named_buffers()}

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "expr_names": self.expr_names,
            "shape_names": self.shape_names,
            "region_names": self.region_names,
            "joint_names": self.joint_names,
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> None:
        """Write the model as safetensors (+ JSON metadata in the header), atomically."""
        from hravatar.io.safe import save_safetensors_atomic

        save_safetensors_atomic(self.tensors(), path, {"hravatar_head": json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | Path) -> "HeadModel":
        from hravatar.io.safe import load_safetensors_checked

        tensors, header = load_safetensors_checked(path, required_meta=("hravatar_head",))
        meta = json.loads(header["hravatar_head"])
        regions = {n: tensors["regions"][i] for i, n in enumerate(meta["region_names"]) if n in REGION_NAMES}
        return cls(
            name=meta["name"],
            v_template=tensors["v_template"],
            faces=tensors["faces"],
            shapedirs=tensors["shapedirs"],
            exprdirs=tensors["exprdirs"],
            posedirs=tensors["posedirs"],
            J_regressor=tensors["J_regressor"],
            lbs_weights=tensors["lbs_weights"],
            eyelid_dirs=tensors["eyelid_dirs"],
            regions=regions,
            lmk_faces=tensors["lmk_faces"],
            lmk_bary=tensors["lmk_bary"],
            expr_names=meta["expr_names"],
            shape_names=meta["shape_names"],
            parents=tensors["parents"],
            vertex_colors=tensors["vertex_colors"],
            meta=meta.get("meta", {}),
        )
