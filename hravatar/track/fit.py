"""Fit a head model's expression and pose to 2D face landmarks (batched Levenberg-Marquardt).

The residual of one frame is the reprojection error of the head's 478 MediaPipe landmarks
(in units of the face size, optionally robust) plus priors (L2 on expressions, jaw, eyes,
eyelids, neck), an optional temporal term towards the previous frame, and hard box limits on
every parameter (projected steps). The model is a small landmark-only copy of the head
(:class:`LandmarkRig`: only the vertices of the triangles holding landmarks, ~1.3K of the
built-in head's 11K); its Jacobian is analytic for the blendshapes (skinned bases) and the
translation, and the 5-joint kinematics are differentiated numerically in float64 (tiny), all
vectorised over frames. A few iterations suffice from a warm start because the landmarks are
linear in the expression coefficients before skinning. :meth:`LandmarkFitter.fit_identity`
estimates one shared shape vector from several frames.

Camera convention: :class:`hravatar.render.camera.Camera` (OpenCV world -> camera matrix,
pixel centres at integer + 0.5, the convention of MediaPipe landmarks times the image size).
The world frame is the head model's: metres, +y up, the face looks along +z.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hravatar.avatar.gaussians import FrameParams
from hravatar.head.lbs import axis_angle_to_matrix
from hravatar.head.model import NUM_JOINTS, HeadModel
from hravatar.render.camera import Camera, look_at

#: MediaPipe face-mesh landmarks on the face outline. They slide along the silhouette when the
#: head turns while the model's embedded points stay on the surface, so they get less weight.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149,
             150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
#: Lip contour landmarks (outer and inner lips); they carry the mouth expressions and the jaw.
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409, 78, 95, 88, 178, 87, 14,
        317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415)
#: Iris landmarks of the refined face mesh (centre + 4 points per eye).
IRIS = tuple(range(468, 478))
#: Nominal distance (metres) of a person in front of a webcam.
WEBCAM_DISTANCE = 0.6

_ROOT, _NECK, _JAW, _EYE_L, _EYE_R = range(NUM_JOINTS)


def webcam_intrinsics(width: int, height: int, fov_deg: float = 40.0, device=None) -> Tensor:
    """[3, 3] intrinsics of an uncalibrated camera: ``fov_deg`` across the image's shorter side.

    40 degrees over the short side (~52 over the long side of a 4:3 image) is typical of
    webcams and phone selfie cameras; focal length and distance are nearly interchangeable for
    a face, so an approximate value only changes the fitted depth.
    """
    short = min(width, height)
    f = 0.5 * short / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], device=device)


def estimate_camera(width: int, height: int, fov_deg: float = 40.0, distance: float = WEBCAM_DISTANCE, device=None) -> Camera:
    """A camera for uncalibrated footage: :func:`webcam_intrinsics`, placed at ``(0, 0, distance)``
    looking at the origin (a head at the origin faces it; fitted translations are offsets from
    that nominal position)."""
    eye = torch.tensor([0.0, 0.0, float(distance)])
    return Camera(look_at(eye, torch.zeros(3), device=device), webcam_intrinsics(width, height, fov_deg, device), width, height)


def _as_camera(camera: Camera | Tensor, device) -> tuple[Tensor, Tensor, Tensor]:
    """(K [B|1,3,3], R [3,3], t [3]) from a Camera or bare intrinsics (camera at the default webcam place)."""
    if isinstance(camera, Camera):
        vm = camera.viewmat.to(device, torch.float32)
        K = camera.K.to(device, torch.float32)
    else:
        K = torch.as_tensor(camera, dtype=torch.float32, device=device)
        vm = look_at(torch.tensor([0.0, 0.0, WEBCAM_DISTANCE]), torch.zeros(3), device=device)
    if K.dim() == 2:
        K = K[None]
    return K, vm[:3, :3], vm[:3, 3]


class LandmarkRig:
    """The part of a :class:`HeadModel` that moves its 478 landmarks, as functional torch code.

    Holds only the U vertices of the triangles that embed landmarks, with their expression,
    eyelid, pose-corrective bases and skinning weights, so evaluating the landmarks costs a few
    hundred microseconds. Written without in-place operations so ``torch.func`` transforms
    (``vmap``, ``jacfwd``) apply. Equal to ``head(...).landmarks`` (see the tests).

    Args:
        head: the head model (its device is used).
        beta: [S'] identity coefficients of the tracked person, or None (the template).
    """

    def __init__(self, head: HeadModel, beta: Tensor | None = None):
        tri = head.faces[head.lmk_faces]  # [L,3]
        uniq, inv = torch.unique(tri, return_inverse=True)
        self._head = head
        self._uniq = uniq
        self.num_expr = head.num_expr
        self.corner = inv  # [L,3] index into the U kept vertices
        self.bary = head.lmk_bary  # [L,3]
        self.shapedirs = head.shapedirs[uniq]  # [U,3,S]
        self.set_beta(beta)
        self.exprdirs = head.exprdirs[uniq]  # [U,3,E]
        self.posedirs = head.posedirs[uniq]  # [U,3,36]
        self.weights = head.lbs_weights[uniq]  # [U,K]
        self.eyelid_dirs = head.eyelid_dirs[:, uniq]  # [2,U,3]
        self.parents = [int(p) for p in head.parents.tolist()]
        self.has_posedirs = bool(self.posedirs.abs().max() > 0)

    def set_beta(self, beta: Tensor | None) -> None:
        """Change the identity: shaped rest vertices and joints for ``beta`` [S'] (None = template)."""
        dev = self._head.v_template.device
        b = None if beta is None else beta.reshape(1, -1).to(dev, torch.float32)
        self.beta = torch.zeros(self._head.num_shape, device=dev) if b is None else \
            torch.cat([b[0], torch.zeros(self._head.num_shape - b.shape[1], device=dev)])[: self._head.num_shape]
        self.v = self._head.shaped_template(b)[0][self._uniq]  # [U,3]
        self.joints = self._head.joints_rest(b)[0]  # [K,3]

    @property
    def device(self) -> torch.device:
        return self.v.device

    def landmarks(self, expr: Tensor, pose: Tensor, eyelids: Tensor, transl: Tensor) -> Tensor:
        """Posed landmarks of ONE frame (use ``torch.func.vmap`` for batches).

        Args:
            expr: [E'] expression coefficients (E' <= E); pose: [5, 3] axis-angle per joint;
            eyelids: [2]; transl: [3].
        Returns:
            [478, 3] landmark positions (world, metres).
        """
        v = self.v + self.exprdirs[..., : expr.shape[0]] @ expr
        v = v + torch.einsum("l,lui->ui", eyelids, self.eyelid_dirs)
        Rs, At, R = self.kinematics(pose)
        if self.has_posedirs:
            eye = torch.eye(3, dtype=R.dtype, device=R.device)
            v = v + self.posedirs @ (R[1:] - eye).reshape(-1)
        TR = torch.einsum("uk,kij->uij", self.weights, Rs)
        Tt = self.weights @ At
        verts = (TR @ v[:, :, None])[..., 0] + Tt + transl
        return (verts[self.corner] * self.bary[:, :, None]).sum(1)

    def kinematics(self, pose: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Forward kinematics of ONE frame, without in-place writes (so torch.func can transform it).

        Args:
            pose: [5, 3] axis-angle per joint.
        Returns:
            Rs [5, 3, 3] and At [5, 3]: the LBS transforms A_k (rotation, translation with the
            rest joint removed); R [5, 3, 3]: the local joint rotations.
        """
        R = axis_angle_to_matrix(pose)
        J = self.joints.to(pose.dtype)
        Rw: list[Tensor] = []
        tw: list[Tensor] = []
        for k, p in enumerate(self.parents):
            if p < 0:
                Rw.append(R[k])
                tw.append(J[k])
            else:
                Rw.append(Rw[p] @ R[k])
                tw.append(Rw[p] @ (J[k] - J[p]) + tw[p])
        Rs, ts = torch.stack(Rw), torch.stack(tw)
        return Rs, ts - (Rs @ J[:, :, None])[..., 0], R


def project(points: Tensor, K: Tensor, R: Tensor, t: Tensor) -> Tensor:
    """Pinhole projection of world points [..., N, 3] -> pixels [..., N, 2] (OpenCV camera R, t; K [3, 3])."""
    pc = points @ R.T + t
    z = pc[..., 2:3].clamp(min=1e-4)
    return (pc[..., :2] / z) * torch.stack([K[0, 0], K[1, 1]]) + torch.stack([K[0, 2], K[1, 2]])


@dataclass
class FitWeights:
    """Weights of the fitting terms (landmark residuals are in units of the face size).

    landmarks: reprojection term; oval / lips / iris: per-group multipliers of it.
    robust: Huber threshold of a landmark's residual (face-size units, 0 = plain least squares).
    expr, jaw, eyes, eyelids, neck: L2 priors (towards zero).
    temporal: pull towards ``prev`` (the previous frame), per parameter in natural units
        (1 expression unit, 0.1 rad, 1 cm, 0.2 eyelid).
    """

    landmarks: float = 1.0
    oval: float = 0.3
    lips: float = 2.0
    iris: float = 1.0
    robust: float = 0.05
    expr: float = 0.1
    jaw: float = 0.01
    eyes: float = 0.01
    eyelids: float = 0.005
    neck: float = 0.05
    temporal: float = 0.0


@dataclass
class FitResult:
    """Output of :meth:`LandmarkFitter.fit`.

    frame: fitted :class:`FrameParams` (B frames; expr has the head's E coefficients).
    error_px: [B] mean landmark reprojection error in pixels (unweighted, all 478).
    error_rel: [B] the same divided by the face size (sqrt of the landmark box area).
    projected: [B, 478, 2] fitted landmarks in pixels.
    """

    frame: FrameParams
    error_px: Tensor
    error_rel: Tensor
    projected: Tensor


def _is_arkit(names: list[str]) -> bool:
    return "jawOpen" in names and "mouthSmile_L" in names


@dataclass
class _Layout:
    """Where each quantity sits in the per-frame parameter vector theta [P].

    Order: expression (fitted modes), eyelids, then the joint parameters (head rotation, jaw,
    eye pitch/yaw x2, optionally neck), then translation. The blendshape block and the joint
    block are contiguous so their Jacobians concatenate.
    """

    free: Tensor  # [Ef] indices of the fitted expression modes
    E: int
    fit_neck: bool
    sl: dict = field(default_factory=dict)

    def __post_init__(self):
        n = 0
        for name, size in (("expr", len(self.free)), ("eyelids", 2), ("rot", 3), ("jaw", 3), ("eyes", 4),
                           ("neck", 3 if self.fit_neck else 0), ("transl", 3)):
            self.sl[name] = slice(n, n + size)
            n += size
        self.P = n
        self.sl["pose"] = slice(self.sl["rot"].start, self.sl["neck"].stop)


class LandmarkFitter:
    """Reusable fitter of one head model (and identity) to 2D landmarks.

    Levenberg-Marquardt with projected (box-constrained) steps: blendshape Jacobian columns
    are the skinned bases, joint columns come from central differences of the 5-joint
    kinematics only, translation columns are the identity; priors and the temporal term enter
    the normal equations as diagonals. Everything is batched over frames.

    Args:
        head: the head model.
        beta: [S'] identity of the tracked person (None: the template).
        weights: :class:`FitWeights`.
        rotation_joint: joint that takes the global head rotation, "root" (default) or "neck".
        fit_neck: also fit the neck joint (with its prior) besides the root rotation.
        expr_bounds: (lo, hi) box of the expression coefficients; default (0, 1) for ARKit
            names (one-sided blendshapes), else (-3, 3).
        num_expr: fit only the first ``num_expr`` modes (e.g. the avatar's count).
    """

    def __init__(self, head: HeadModel, beta: Tensor | None = None, weights: FitWeights | None = None,
                 rotation_joint: str = "root", fit_neck: bool = False, expr_bounds: tuple[float, float] | None = None,
                 num_expr: int | None = None):
        if rotation_joint not in ("root", "neck"):
            raise ValueError(f"rotation_joint must be 'root' or 'neck', got '{rotation_joint}'")
        self.head = head
        self.rig = LandmarkRig(head, beta)
        self.weights = weights or FitWeights()
        self.rot_joint = _ROOT if rotation_joint == "root" else _NECK
        dev = self.rig.device
        E = head.num_expr
        self.num_expr = min(E, num_expr) if num_expr is not None else E
        if expr_bounds is None:
            expr_bounds = (0.0, 1.0) if _is_arkit(head.expr_names) else (-3.0, 3.0)
        # expression modes that move the landmarks like a fitted joint or the eyelids (the built-in
        # head's jawOpen/jawLeft/jawRight, eyeBlink_*) are left to those: avatars are driven by them,
        # and duplicates only make the fit ambiguous
        free = self._independent_modes(torch.arange(self.num_expr, device=dev), E, fit_neck and self.rot_joint == _ROOT)
        self.layout = L = _Layout(free, E, fit_neck and self.rot_joint == _ROOT)
        self.exprdirs_free = self.rig.exprdirs[..., L.free].contiguous()  # [U,3,Ef]
        self.eyelid_basis = self.rig.eyelid_dirs.permute(1, 2, 0).contiguous()  # [U,3,2]
        w = self.weights
        lo = torch.full((L.P,), -math.inf, device=dev)
        hi = torch.full((L.P,), math.inf, device=dev)
        prior_w = torch.zeros(L.P, device=dev)  # diagonal L2 prior weights (towards zero)
        unit = torch.ones(L.P, device=dev)  # natural step sizes (temporal term)

        def setp(name, a, b, pw, u):
            lo[L.sl[name]] = torch.as_tensor(a, dtype=torch.float32, device=dev)
            hi[L.sl[name]] = torch.as_tensor(b, dtype=torch.float32, device=dev)
            prior_w[L.sl[name]] = torch.as_tensor(pw, dtype=torch.float32, device=dev)
            unit[L.sl[name]] = u

        setp("expr", expr_bounds[0], expr_bounds[1], w.expr, 1.0)
        setp("eyelids", -0.3, 1.2, w.eyelids, 0.2)
        setp("rot", -math.pi, math.pi, 0.0, 0.1)
        setp("jaw", [-0.05, -0.2, -0.2], [0.6, 0.2, 0.2], w.jaw / 0.1, 0.1)
        setp("eyes", -0.6, 0.6, w.eyes / 0.1, 0.1)
        if L.fit_neck:
            setp("neck", -1.0, 1.0, w.neck / 0.1, 0.1)
        setp("transl", -math.inf, math.inf, 0.0, 0.01)
        self.lo, self.hi, self.prior_w, self.unit = lo, hi, prior_w, unit
        self.rigid_mask = torch.zeros(L.P, device=dev)
        self.rigid_mask[L.sl["rot"]] = 1.0
        self.rigid_mask[L.sl["transl"]] = 1.0
        lw = torch.full((478,), w.landmarks, device=dev)
        lw[list(FACE_OVAL)] *= w.oval
        lw[list(LIPS)] *= w.lips
        lw[list(IRIS)] *= w.iris
        self.lmk_weights = lw
        z = torch.zeros
        self._neutral_lmk = self.rig.landmarks(z(E, device=dev), z(NUM_JOINTS, 3, device=dev), z(2, device=dev), z(3, device=dev))
        self._kin = torch.func.vmap(self._kinematics)

    def _independent_modes(self, modes: Tensor, E: int, fit_neck: bool, threshold: float = 0.97) -> Tensor:
        """Expression modes whose landmark motion (at the neutral pose) is not within the span of the
        jaw, eye and eyelid parameters' motion (cosine of the principal angle <= ``threshold``)."""
        self.layout = L = _Layout(modes, E, fit_neck)
        self.exprdirs_free = self.rig.exprdirs[..., modes].contiguous()
        self.eyelid_basis = self.rig.eyelid_dirs.permute(1, 2, 0).contiguous()
        self._kin = torch.func.vmap(self._kinematics)
        theta = torch.zeros(1, L.P, device=modes.device)
        _, J = self.landmarks(theta, torch.zeros(1, NUM_JOINTS, 3, device=modes.device), jacobian=True)
        J = J[0].reshape(-1, L.P)
        others = torch.cat([J[:, L.sl["eyelids"]], J[:, L.sl["jaw"]], J[:, L.sl["eyes"]]], 1)
        U, S, _ = torch.linalg.svd(others, full_matrices=False)
        Q = U[:, S > 1e-6 * S.max().clamp(min=1e-12)]
        ex = J[:, L.sl["expr"]]
        cos = (Q.T @ ex).norm(dim=0) / ex.norm(dim=0).clamp(min=1e-12)
        return modes[cos <= threshold]

    # ---------------------------------------------------------------- parameter packing
    def _pose_rows(self, tp: Tensor, base_pose: Tensor) -> Tensor:
        """Joint parameters of ONE frame ``tp`` [Pp] (+ base pose [5,3] for the joints not fitted) -> pose [5, 3]."""
        L = self.layout
        o = L.sl["rot"].start
        get = lambda name: tp[L.sl[name].start - o: L.sl[name].stop - o]  # noqa: E731
        eyes = get("eyes")
        zero = torch.zeros(1, dtype=tp.dtype, device=tp.device)
        rows = []
        for k in range(NUM_JOINTS):
            if k == self.rot_joint:
                rows.append(get("rot"))
            elif k == _NECK and L.fit_neck:
                rows.append(get("neck"))
            elif k == _JAW:
                rows.append(get("jaw"))
            elif k == _EYE_L:
                rows.append(torch.cat([eyes[0:2], zero]))
            elif k == _EYE_R:
                rows.append(torch.cat([eyes[2:4], zero]))
            else:
                rows.append(base_pose[k])
        return torch.stack(rows)

    def _kinematics(self, tp: Tensor, base_pose: Tensor):
        """ONE frame: joint parameters -> (Rs [5,3,3], At [5,3], pose feature [36]), aux = pose [5,3]."""
        pose = self._pose_rows(tp, base_pose)
        Rs, At, R = self.rig.kinematics(pose)
        eye = torch.eye(3, dtype=R.dtype, device=R.device)
        return (Rs, At, (R[1:] - eye).reshape(-1)), pose

    def _kinematics_jacobian(self, tp: Tensor, base_pose: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Derivatives of (Rs, At, feature) w.r.t. the joint parameters tp [B, Pp]: [B,5,3,3,Pp], [B,5,3,Pp], [B,36,Pp].

        Central differences in float64 on the 5-joint chain only (all 2*Pp evaluations in one
        vectorised call): exact to ~1e-9, and several times cheaper than forward-mode autodiff
        through vmap on a CPU.
        """
        B, Pp = tp.shape
        h = 1e-5
        step = torch.eye(Pp, dtype=torch.float64, device=tp.device) * h
        pts = torch.cat([tp.double()[:, None] + step, tp.double()[:, None] - step], 1).reshape(B * 2 * Pp, Pp)
        bp = base_pose.double()[:, None].expand(B, 2 * Pp, NUM_JOINTS, 3).reshape(B * 2 * Pp, NUM_JOINTS, 3)
        outs, _ = self._kin(pts, bp)
        d = []
        for o in outs:
            o = o.reshape(B, 2, Pp, *o.shape[1:])
            d.append(((o[:, 0] - o[:, 1]) / (2 * h)).movedim(1, -1).float())
        return d[0], d[1], d[2]

    def pack(self, frame: FrameParams) -> tuple[Tensor, Tensor]:
        """FrameParams (B) -> (theta [B, P], base pose [B, 5, 3])."""
        L = self.layout
        B = frame.pose.shape[0]
        dev = self.rig.device
        theta = torch.zeros(B, L.P, device=dev)
        expr = torch.zeros(B, L.E, device=dev)
        n = min(L.E, frame.expr.shape[1])
        expr[:, :n] = frame.expr[:, :n].to(dev)
        pose = frame.pose.to(dev).float().reshape(B, NUM_JOINTS, 3)
        theta[:, L.sl["expr"]] = expr[:, L.free]
        theta[:, L.sl["eyelids"]] = frame.eyelids.to(dev)
        theta[:, L.sl["rot"]] = pose[:, self.rot_joint]
        theta[:, L.sl["jaw"]] = pose[:, _JAW]
        theta[:, L.sl["eyes"]] = torch.cat([pose[:, _EYE_L, :2], pose[:, _EYE_R, :2]], 1)
        if L.fit_neck:
            theta[:, L.sl["neck"]] = pose[:, _NECK]
        theta[:, L.sl["transl"]] = frame.transl.to(dev)
        return torch.maximum(torch.minimum(theta, self.hi), self.lo), pose

    def to_frame(self, theta: Tensor, base_pose: Tensor) -> FrameParams:
        """theta [B, P] (+ base pose [B, 5, 3]) -> FrameParams with the first ``num_expr`` modes."""
        L = self.layout
        B = theta.shape[0]
        expr = torch.zeros(B, L.E, device=theta.device)
        expr[:, L.free] = theta[:, L.sl["expr"]]
        pose = torch.func.vmap(self._pose_rows)(theta[:, L.sl["pose"]], base_pose)
        return FrameParams(expr[:, : self.num_expr].contiguous(), pose, theta[:, L.sl["eyelids"]].clone(),
                           theta[:, L.sl["transl"]].clone())

    # ---------------------------------------------------------------- model + Jacobian
    def landmarks(self, theta: Tensor, base_pose: Tensor, jacobian: bool = False,
                  shape_jacobian: bool = False) -> tuple[Tensor, Tensor | None]:
        """Posed landmarks [B, 478, 3] and optionally their Jacobian [B, 478, 3, P] w.r.t. theta
        (``shape_jacobian``: S more columns w.r.t. the identity coefficients, joints held fixed)."""
        L, rig = self.layout, self.rig
        B = theta.shape[0]
        tp = theta[:, L.sl["pose"]]
        (Rs, At, feat), _ = self._kin(tp, base_pose)
        if jacobian:
            dRs, dAt, dfeat = self._kinematics_jacobian(tp, base_pose)
        v = rig.v + torch.einsum("uie,be->bui", self.exprdirs_free, theta[:, L.sl["expr"]])
        v = v + torch.einsum("uil,bl->bui", self.eyelid_basis, theta[:, L.sl["eyelids"]])
        if rig.has_posedirs:
            v = v + torch.einsum("uif,bf->bui", rig.posedirs, feat)
        TR = torch.einsum("uk,bkij->buij", rig.weights, Rs)
        Tt = torch.einsum("uk,bki->bui", rig.weights, At)
        verts = (TR @ v[..., None])[..., 0] + Tt  # [B,U,3]
        bary = rig.bary[None, :, :, None]
        lmk = (verts[:, rig.corner] * bary).sum(2) + theta[:, None, L.sl["transl"]]
        if not jacobian:
            return lmk, None
        d_blend = TR @ torch.cat([self.exprdirs_free, self.eyelid_basis], -1)  # [B,U,3,Ef+2]
        d_pose = torch.einsum("uk,bkijp,buj->buip", rig.weights, dRs, v) + torch.einsum("uk,bkip->buip", rig.weights, dAt)
        if rig.has_posedirs:
            d_pose = d_pose + TR @ torch.einsum("uif,bfp->buip", rig.posedirs, dfeat)
        dV = torch.cat([d_blend, d_pose], -1)  # [B,U,3,P-3]
        dL = (dV[:, rig.corner] * bary[..., None]).sum(2)  # [B,L,3,P-3]
        eye = torch.eye(3, device=theta.device, dtype=theta.dtype).expand(B, 478, 3, 3)
        cols = [dL, eye]
        if shape_jacobian:
            cols.append(((TR @ rig.shapedirs)[:, rig.corner] * bary[..., None]).sum(2))  # [B,L,3,S]
        return lmk, torch.cat(cols, -1)

    def _residuals(self, theta, base_pose, target, lw, scale, K, R, t, jacobian: bool, shape_jacobian: bool = False):
        """Weighted landmark residuals [B, 956] (face-size units) and their Jacobian [B, 956, P (+S)]."""
        lmk, dL = self.landmarks(theta, base_pose, jacobian, shape_jacobian)
        pc = lmk @ R.T + t  # [B,L,3]
        z = pc[..., 2].clamp(min=1e-4)
        f = torch.stack([K[:, 0, 0], K[:, 1, 1]], -1)[:, None]  # [B,1,2]
        c = torch.stack([K[:, 0, 2], K[:, 1, 2]], -1)[:, None]
        uv = pc[..., :2] / z[..., None] * f + c
        s = (lw / scale[:, None])[..., None]  # [B,L,1]
        r = ((uv - target) * s).reshape(theta.shape[0], -1)
        if dL is None:
            return r, None, uv
        # d uv / d pc = f / z * [[1, 0, -x/z], [0, 1, -y/z]]
        xy = pc[..., :2] / z[..., None]
        Dpi = torch.cat([torch.diag_embed(torch.ones_like(xy)), -xy[..., None]], -1) * (f / z[..., None])[..., None]  # [B,L,2,3]
        J = (Dpi @ R) @ dL * s[..., None]  # [B,L,2,P]
        return r, J.reshape(theta.shape[0], -1, J.shape[-1]), uv

    def _initial_theta(self, target: Tensor, K: Tensor, R: Tensor, t: Tensor) -> Tensor:
        """[B, P] cold start: neutral face, no rotation, placed so that its landmarks' centroid and
        spread match the targets (closed form, perspective at the centroid)."""
        B = target.shape[0]
        L = self.layout
        theta = torch.zeros(B, L.P, device=target.device)
        mdl = self._neutral_lmk  # [L,3], world
        mdl_cam = mdl @ R.T  # spread in the camera's image plane (rotation only) vs. in pixels
        spread_m = (mdl_cam[:, :2] - mdl_cam[:, :2].mean(0)).norm(dim=-1).mean()
        c_px = target.mean(1)  # [B,2]
        spread_px = (target - c_px[:, None]).norm(dim=-1).mean(1)  # [B]
        f = 0.5 * (K[:, 0, 0] + K[:, 1, 1])
        z = f * spread_m / spread_px.clamp(min=1e-3)  # [B] depth of the centroid
        x = (c_px[:, 0] - K[:, 0, 2]) / K[:, 0, 0] * z
        y = (c_px[:, 1] - K[:, 1, 2]) / K[:, 1, 1] * z
        world = (torch.stack([x, y, z], -1) - t) @ R  # R^T (pc - t)
        theta[:, L.sl["transl"]] = world - mdl.mean(0)
        return theta

    # ---------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, landmarks_2d: Tensor, camera: Camera | Tensor, init: FrameParams | None = None, iters: int | None = None,
            prev: FrameParams | None = None, rigid_iters: int | None = None, visibility: Tensor | None = None) -> FitResult:
        """Fit B frames independently (vectorised).

        Args:
            landmarks_2d: [B, 478, 2] target pixel coordinates (x, y).
            camera: a :class:`Camera` (its viewmat and K) or intrinsics [3, 3] / [B, 3, 3] (then the
                camera of :func:`estimate_camera`).
            init: warm start (B or 1 frames, e.g. the previous frame's result); None = cold start.
            iters: LM iterations (default 3 warm, 12 cold).
            prev: anchor of the temporal term (``weights.temporal``); defaults to ``init``.
            rigid_iters: first iterations that move only rotation + translation (default 0 warm, 4 cold).
            visibility: [B, 478] optional per-landmark weights in [0, 1] (0 = ignore).
        Returns:
            :class:`FitResult`.
        """
        dev = self.rig.device
        target = landmarks_2d.to(dev, torch.float32)
        if target.dim() == 2:
            target = target[None]
        B = target.shape[0]
        if tuple(target.shape[1:]) != (478, 2):
            raise ValueError(f"landmarks_2d must be [B, 478, 2], got {list(landmarks_2d.shape)}")
        K, R, t = _as_camera(camera, dev)
        K = K.expand(B, 3, 3)
        cold = init is None
        iters = (12 if cold else 3) if iters is None else iters
        rigid_iters = (4 if cold else 0) if rigid_iters is None else rigid_iters
        if cold:
            theta = self._initial_theta(target, K, R, t)
            base_pose = torch.zeros(B, NUM_JOINTS, 3, device=dev)
        else:
            theta, base_pose = self.pack(init)
            theta, base_pose = theta.expand(B, -1).clone(), base_pose.expand(B, -1, -1).clone()
        anchor_frame = prev if prev is not None else init
        if anchor_frame is not None and self.weights.temporal > 0:
            anchor = self.pack(anchor_frame)[0].expand(B, -1)
            tw = self.weights.temporal / self.unit  # [P]
        else:
            anchor, tw = theta.clone(), torch.zeros_like(self.unit)
        scale = (target.amax(1) - target.amin(1)).prod(-1).clamp(min=1.0).sqrt()  # [B] face size in pixels
        lw_base = self.lmk_weights[None].expand(B, -1)
        if visibility is not None:
            lw_base = lw_base * visibility.to(dev, torch.float32)
        pw2, tw2 = self.prior_w.square(), tw.square()

        def total_cost(r, th):
            return r.square().sum(1) + (pw2 * th.square()).sum(1) + (tw2 * (th - anchor).square()).sum(1)

        lw = lw_base
        lam = torch.full((B,), 1e-3, device=dev)
        eye = torch.eye(self.layout.P, device=dev)
        for it in range(iters):
            r, Jm, _ = self._residuals(theta, base_pose, target, lw, scale, K, R, t, True)
            if self.weights.robust > 0:
                # Huber IRLS: landmarks far off (occlusion, detector slips) count linearly, not squared
                e = (r.reshape(B, 478, 2).norm(dim=-1) / lw.clamp(min=1e-8)).clamp(min=1e-12)
                rw = (self.weights.robust / e).clamp(max=1.0).sqrt()
                lw = lw * rw
                r = (r.reshape(B, 478, 2) * rw[..., None]).reshape(B, -1)
                Jm = (Jm.reshape(B, 478, 2, -1) * rw[..., None, None]).reshape(B, 956, -1)
            H = Jm.transpose(1, 2) @ Jm + torch.diag_embed((pw2 + tw2).expand(B, -1))
            g = (Jm.transpose(1, 2) @ r[..., None])[..., 0] + pw2 * theta + tw2 * (theta - anchor)
            # projected Newton: parameters held at a bound by the gradient leave the system this step
            free = ~(((theta <= self.lo + 1e-6) & (g > 0)) | ((theta >= self.hi - 1e-6) & (g < 0)))
            if it < rigid_iters:
                free = free & (self.rigid_mask > 0)
            fm = free.to(H.dtype)
            H = H * fm[:, :, None] * fm[:, None, :] + torch.diag_embed(1.0 - fm)
            g = g * fm
            D = torch.diagonal(H, dim1=1, dim2=2).clamp(min=1e-9)
            delta = torch.linalg.solve(H + lam[:, None, None] * torch.diag_embed(D) + 1e-9 * eye, -g[..., None])[..., 0] * fm
            cand = torch.maximum(torch.minimum(theta + delta, self.hi), self.lo)
            r_new, _, _ = self._residuals(cand, base_pose, target, lw, scale, K, R, t, False)
            better = total_cost(r_new, cand) < total_cost(r, theta)
            theta = torch.where(better[:, None], cand, theta)
            lam = torch.where(better, lam * 0.3, lam * 5.0).clamp(1e-7, 1e4)
            lw = lw_base
        _, _, uv = self._residuals(theta, base_pose, target, lw_base, scale, K, R, t, False)
        err = (uv - target).norm(dim=-1).mean(1)
        return FitResult(self.to_frame(theta, base_pose), err, err / scale, uv)


    # ---------------------------------------------------------------- identity
    @property
    def beta(self) -> Tensor:
        """[S] identity coefficients the fitter uses."""
        return self.rig.beta

    def set_identity(self, beta: Tensor | None) -> None:
        """Use the identity ``beta`` [S'] (None = template) from now on."""
        self.rig.set_beta(beta)
        E, dev = self.layout.E, self.rig.device
        z = torch.zeros
        self._neutral_lmk = self.rig.landmarks(z(E, device=dev), z(NUM_JOINTS, 3, device=dev), z(2, device=dev), z(3, device=dev))

    @torch.no_grad()
    def fit_identity(self, landmarks_2d: Tensor, camera: Camera | Tensor, rounds: int = 6, iters: int = 4,
                     shape_prior: float = 0.01) -> FitResult:
        """Estimate one identity (shape coefficients) shared by T frames of the same person.

        Alternates per-frame fits (expression, pose, ...) with a Gauss-Newton step on the shared
        identity from all frames' normal equations (with an L2 prior ``shape_prior`` per
        coefficient); the fitter keeps the identity found (see :attr:`beta`).

        Args:
            landmarks_2d: [T, 478, 2] landmarks of several frames (varied poses help the depth).
            camera: as :meth:`fit`.
            rounds: identity updates; iters: LM iterations of the per-frame fits between them.
        Returns:
            :class:`FitResult` of the frames with the final identity.
        """
        dev = self.rig.device
        target = landmarks_2d.to(dev, torch.float32)
        T = target.shape[0]
        K, R, t = _as_camera(camera, dev)
        K = K.expand(T, 3, 3)
        scale = (target.amax(1) - target.amin(1)).prod(-1).clamp(min=1.0).sqrt()
        lw = self.lmk_weights[None].expand(T, -1)
        S = self.rig.shapedirs.shape[-1]
        res = self.fit(target, camera)
        for _ in range(rounds):
            theta, base = self.pack(res.frame)
            r, J, _ = self._residuals(theta, base, target, lw, scale, K, R, t, True, shape_jacobian=True)
            Jb = J[..., -S:].reshape(-1, S)  # all frames stacked: [T*956, S]
            beta = self.beta
            H = Jb.T @ Jb + shape_prior ** 2 * torch.eye(S, device=dev)
            g = Jb.T @ r.reshape(-1) + shape_prior ** 2 * beta
            self.set_identity(beta - torch.linalg.solve(H, g))
            res = self.fit(target, camera, init=res.frame, iters=iters)
        return res


def fit_expression_pose(head: HeadModel, landmarks_2d: Tensor, camera: Camera | Tensor, init: FrameParams | None = None,
                        iters: int | None = None, weights: FitWeights | None = None, beta: Tensor | None = None,
                        **fitter_kwargs) -> FrameParams:
    """Fit expression, jaw, head rotation, translation, eyes and eyelids of ``head`` to 2D landmarks.

    One-shot convenience around :class:`LandmarkFitter` (build the fitter once for video).

    Args:
        head: the head model.
        landmarks_2d: [B, 478, 2] MediaPipe landmarks in pixels (x, y).
        camera: :class:`Camera` or intrinsics [3, 3] (see :meth:`LandmarkFitter.fit`).
        init: warm start (and temporal anchor when ``weights.temporal`` > 0), or None.
        iters: Levenberg-Marquardt iterations (default 4 warm / 12 cold).
        weights: :class:`FitWeights`.
        beta: identity of the tracked person (None: the template).
    Returns:
        :class:`FrameParams` with B frames.
    """
    return LandmarkFitter(head, beta, weights, **fitter_kwargs).fit(landmarks_2d, camera, init=init, iters=iters).frame
