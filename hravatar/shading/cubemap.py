"""Cube maps and lat-long environment maps, in pure torch (differentiable).

Cube-map layout
---------------
A cube map is a tensor ``[6, R, R, C]``: faces in OpenGL order (+x, -x, +y, -y, +z, -z),
each face indexed ``[row, col]`` with ``row`` following the OpenGL face coordinate ``t`` and
``col`` following ``s`` (texel ``(i, j)`` has its centre at ``s = (j + 0.5) / R``,
``t = (i + 0.5) / R``). The (s, t) of a direction follow the OpenGL cube-map table
(major axis ``ma``, ``s = (sc / |ma| + 1) / 2``, ``t = (tc / |ma| + 1) / 2``)::

    face  major  sc    tc
    +x    +x     -z    -y
    -x    -x     +z    -y
    +y    +y     +x    +z
    -y    -y     +x    -z
    +z    +z     +x    -y
    -z    -z     -x    -y

This is exactly what nvdiffrast's ``texture(..., boundary_mode='cube')`` expects for a
``[1, 6, R, R, C]`` texture, so the same tensors can be sampled with either backend.
Ties between axes are broken like nvdiffrast: z wins over x/y, then y over x.

Bilinear filtering is continuous across face edges: every face is padded by one texel taken
from the neighbouring faces; a padded corner (where only three real texels meet) takes the
average of those three texels, as nvdiffrast does.

Lat-long layout
---------------
A lat-long (equirectangular) map is ``[H, W, C]`` with ``H = W / 2``; pixel ``(i, j)`` has its
centre at ``u = (j + 0.5) / W``, ``v = (i + 0.5) / H``. World axes: +y up (as the head model).
With polar angle ``theta = pi * v`` (0 at the top = +y) and azimuth ``phi = 2 * pi * u - pi``::

    d = (sin(theta) * sin(phi), cos(theta), -sin(theta) * cos(phi))

so the image centre (u = 0.5) looks towards -z (what a camera in front of the face sees
behind the head), u = 0.75 looks towards +x (to the right of that view: the image is not
mirrored), and the left/right borders (u = 0 / 1) look towards +z, i.e. the light that
falls on the face from the camera side.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

FACE_NAMES = ("+x", "-x", "+y", "-y", "+z", "-z")


# --------------------------------------------------------------------------- directions
def face_uv_to_dir(face: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Direction of a point on a cube face (inverse of :func:`dir_to_cube_uv`).

    ``u``/``v`` may lie outside [0, 1]: the point is then on the face's extended plane,
    which is what seam padding needs.

    Args:
        face: [...] int64 face index (0..5, OpenGL order).
        u: [...] face coordinate s.
        v: [...] face coordinate t.
    Returns:
        [..., 3] unit directions.
    """
    sc = 2.0 * u - 1.0
    tc = 2.0 * v - 1.0
    one = torch.ones_like(sc)
    # rows: the (x, y, z) of each face written with sc / tc / the major axis sign
    cand = torch.stack(
        [
            torch.stack([one, -tc, -sc], -1),   # +x
            torch.stack([-one, -tc, sc], -1),   # -x
            torch.stack([sc, one, tc], -1),     # +y
            torch.stack([sc, -one, -tc], -1),   # -y
            torch.stack([sc, -tc, one], -1),    # +z
            torch.stack([-sc, -tc, -one], -1),  # -z
        ],
        0,
    )  # [6, ..., 3]
    idx = face.long().expand(sc.shape)[None, ..., None].expand(1, *sc.shape, 3)
    d = torch.gather(cand, 0, idx)[0]
    return F.normalize(d, dim=-1)


def dir_to_cube_uv(dirs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cube face and face coordinates of directions (OpenGL convention, see module doc).

    Args:
        dirs: [..., 3] directions (need not be unit length; a zero vector maps to face 0, centre).
    Returns:
        face: [...] int64 in 0..5.
        u: [...] s coordinate in [0, 1] (column direction).
        v: [...] t coordinate in [0, 1] (row direction).
    """
    x, y, z = dirs.unbind(-1)
    ax, ay, az = x.abs(), y.abs(), z.abs()
    is_z = az > torch.maximum(ax, ay)
    is_y = ~is_z & (ay > ax)
    is_x = ~is_z & ~is_y
    ma = torch.where(is_z, z, torch.where(is_y, y, x))
    neg = ma < 0
    sgn = torch.where(neg, -torch.ones_like(ma), torch.ones_like(ma))
    face = torch.where(is_z, 4, torch.where(is_y, 2, 0)).to(torch.int64) + neg.to(torch.int64)
    sc = torch.where(is_x, -sgn * z, torch.where(is_y, x, sgn * x))
    tc = torch.where(is_y, sgn * z, -y)
    inv = 1.0 / ma.abs().clamp_min(torch.finfo(dirs.dtype).tiny)
    u = (0.5 * (sc * inv + 1.0)).clamp(0.0, 1.0)
    v = (0.5 * (tc * inv + 1.0)).clamp(0.0, 1.0)
    return face, u, v


def cube_dirs(res: int, device=None, dtype=torch.float32) -> Tensor:
    """Unit directions through the texel centres of a cube map.

    Args:
        res: face resolution R.
    Returns:
        [6, R, R, 3].
    """
    c = (torch.arange(res, device=device, dtype=torch.float64) + 0.5) / res
    v, u = torch.meshgrid(c, c, indexing="ij")
    face = torch.arange(6, device=device)[:, None, None].expand(6, res, res)
    return face_uv_to_dir(face, u.expand(6, res, res), v.expand(6, res, res)).to(dtype)


def cube_texel_solid_angle(res: int, device=None, dtype=torch.float32) -> Tensor:
    """Exact solid angle of every cube texel (they sum to 4 pi).

    Uses the closed form of the solid angle subtended by the rectangle [0,x]x[0,y] on the
    plane at unit distance: atan2(x y, sqrt(x^2 + y^2 + 1)).

    Returns:
        [6, R, R].
    """
    e = torch.linspace(-1.0, 1.0, res + 1, device=device, dtype=torch.float64)

    def area(x: Tensor, y: Tensor) -> Tensor:
        return torch.atan2(x * y, torch.sqrt(x * x + y * y + 1.0))

    x0, x1 = e[:-1][None, :], e[1:][None, :]
    y0, y1 = e[:-1][:, None], e[1:][:, None]
    sa = area(x1, y1) - area(x0, y1) - area(x1, y0) + area(x0, y0)
    return sa.abs().expand(6, res, res).to(dtype).contiguous()


def rotate_y(dirs: Tensor, angle_deg: float | Tensor) -> Tensor:
    """Rotate directions about the +y axis (right-handed: +z turns towards +x).

    Args:
        dirs: [..., 3].
        angle_deg: rotation angle in degrees (float or a tensor broadcastable to [...]).
    Returns:
        [..., 3].
    """
    a = torch.as_tensor(angle_deg, dtype=dirs.dtype, device=dirs.device) * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    x, y, z = dirs.unbind(-1)
    return torch.stack([c * x + s * z, y, -s * x + c * z], -1)


# --------------------------------------------------------------------------- sampling
@functools.lru_cache(maxsize=64)
def _seam_source_index(res: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Where every texel of the padded cube [6, R+2, R+2] comes from.

    Memoised per (res, device): it only depends on the layout. Built outside inference mode
    so that autograd may save it as an index.

    Returns:
        src: [6*(R+2)^2] flat source texel in the cube [6*R*R] (corners: any valid texel);
        corner_rows: [24] flat padded rows of the corners;
        corner_src: [24, 3] the three cube texels each corner averages.
    """
    with torch.inference_mode(False), torch.no_grad():
        P = res + 2
        k = torch.arange(P, device=device, dtype=torch.float64)
        ii, jj = torch.meshgrid(k, k, indexing="ij")
        face = torch.arange(6, device=device)[:, None, None].expand(6, P, P)
        # padded (i, j) is texel (i-1, j-1) of the face, possibly on its extended plane
        u = ((jj - 1.0 + 0.5) / res).expand(6, P, P)
        v = ((ii - 1.0 + 0.5) / res).expand(6, P, P)
        # project the extended-plane point back onto the cube; half a texel beyond an edge lands
        # inside the first texel row of the neighbouring face (the shrink is < half a texel)
        f2, u2, v2 = dir_to_cube_uv(face_uv_to_dir(face, u, v))
        j2 = (u2 * res).floor().long().clamp(0, res - 1)
        i2 = (v2 * res).floor().long().clamp(0, res - 1)
        src = (f2 * res + i2) * res + j2  # [6, P, P]
        rows, srcs = [], []
        f = torch.arange(6, device=device)
        # a padded corner takes the mean of its two edge neighbours and its diagonal one
        for ci, cj, ni, nj in ((0, 0, 1, 1), (0, P - 1, 1, P - 2), (P - 1, 0, P - 2, 1), (P - 1, P - 1, P - 2, P - 2)):
            rows.append((f * P + ci) * P + cj)
            srcs.append(torch.stack([src[:, ci, nj], src[:, ni, cj], src[:, ni, nj]], -1))
        return src.reshape(-1), torch.cat(rows), torch.cat(srcs)


def pad_cube(cube: Tensor) -> Tensor:
    """Pad every face with one texel borrowed from its neighbours (for seamless filtering).

    Padded corners, where only three real texels meet, take the mean of those three.

    Args:
        cube: [6, R, R, C].
    Returns:
        [6, R+2, R+2, C] (differentiable w.r.t. ``cube``).
    """
    R, C = cube.shape[1], cube.shape[3]
    src, corner_rows, corner_src = _seam_source_index(R, torch.device(cube.device))
    flat = cube.reshape(6 * R * R, C)
    p = flat[src].index_put((corner_rows,), flat[corner_src].mean(1))
    return p.reshape(6, R + 2, R + 2, C)


def _bilinear_padded(padded: Tensor, face: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Bilinear lookup in a padded cube [6, R+2, R+2, C]; face/u/v: [N] -> [N, C]."""
    R, C = padded.shape[1] - 2, padded.shape[3]
    zero, res = (torch.tensor(x, device=face.device) for x in (0, R))  # 0-dim: broadcast over samples
    return _bilinear_flat(padded.reshape(-1, C), zero, res, face, u, v)


def _bilinear_flat(table: Tensor, offset: Tensor, res: Tensor, face: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Bilinear lookup of padded cubes stored flat.

    Args:
        table: [T, C] texels of one or more padded cubes [6, R+2, R+2, C], concatenated.
        offset: [N] (or 0-dim) int64 first row of each sample's cube in ``table``.
        res: [N] (or 0-dim) int64 face resolution R of each sample's cube.
        face, u, v: [N] cube coordinates (:func:`dir_to_cube_uv`).
    Returns:
        [N, C].
    """
    R = res.to(u.dtype)
    P = res + 2
    # continuous padded-texel coordinate: texel j's centre (j + 0.5) / R sits at j + 1
    x = u * R + 0.5
    y = v * R + 0.5
    j0 = torch.minimum(x.detach().floor().clamp_min(0), R).long()
    i0 = torch.minimum(y.detach().floor().clamp_min(0), R).long()
    fx = (x - j0.to(x.dtype))[:, None]
    fy = (y - i0.to(y.dtype))[:, None]
    base = offset + (face * P + i0) * P + j0
    t00 = table[base]
    t01 = table[base + 1]
    t10 = table[base + P]
    t11 = table[base + P + 1]
    top = t00 + (t01 - t00) * fx
    bot = t10 + (t11 - t10) * fx
    return top + (bot - top) * fy


def _nvdiffrast():
    """The nvdiffrast torch module, or None when it is not installed (imported lazily)."""
    try:
        import nvdiffrast.torch as dr  # noqa: PLC0415 - optional CUDA backend
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return dr


def _use_nvdiffrast(backend: str, *tensors: Tensor):
    if backend == "torch":
        return None
    on_cuda = all(t.is_cuda for t in tensors)
    dr = _nvdiffrast() if on_cuda else None
    if backend == "nvdiffrast" and dr is None:
        raise RuntimeError("backend='nvdiffrast' needs nvdiffrast installed and CUDA tensors")
    return dr


def sample_cube(cube: Tensor, dirs: Tensor, backend: str = "auto", padded: Tensor | None = None) -> Tensor:
    """Bilinear cube-map lookup, continuous across face edges and corners.

    Args:
        cube: [6, R, R, C] texels.
        dirs: [..., 3] lookup directions (any length > 0).
        backend: "auto" (nvdiffrast when installed and both tensors are on CUDA, else torch),
            "torch" or "nvdiffrast".
        padded: ``pad_cube(cube)`` when the caller has it already (the torch path then skips it).
    Returns:
        [..., C], differentiable w.r.t. ``cube`` (and ``dirs`` inside a face).
    """
    lead = dirs.shape[:-1]
    dr = _use_nvdiffrast(backend, cube, dirs)
    if dr is not None:
        out = dr.texture(
            cube[None].float().contiguous(), dirs.reshape(1, 1, -1, 3).float().contiguous(),
            filter_mode="linear", boundary_mode="cube",
        )
        return out.reshape(*lead, cube.shape[-1]).to(cube.dtype)
    face, u, v = dir_to_cube_uv(dirs.reshape(-1, 3))
    out = _bilinear_padded(pad_cube(cube) if padded is None else padded, face, u.to(cube.dtype), v.to(cube.dtype))
    return out.reshape(*lead, cube.shape[-1])


def _is_mip_chain(mips: list[Tensor]) -> bool:
    r0 = mips[0].shape[1]
    return all(m.shape[1] == max(r0 >> i, 1) for i, m in enumerate(mips))


def sample_cube_mips(mips: list[Tensor], dirs: Tensor, level: Tensor | float, backend: str = "auto",
                     padded: list[Tensor] | None = None) -> Tensor:
    """Trilinear lookup in a list of cube-map levels (linear between the two nearest levels).

    Levels need not halve in size (each level is sampled at its own resolution); the
    nvdiffrast backend is only used when they form a standard mip chain.

    Args:
        mips: list of L tensors [6, R_l, R_l, C].
        dirs: [..., 3] lookup directions.
        level: [...] float level per lookup (or a float), clamped to [0, L-1].
        backend: as in :func:`sample_cube`.
        padded: ``[pad_cube(m) for m in mips]`` when the caller has them already.
    Returns:
        [..., C].
    """
    lead = dirs.shape[:-1]
    L, C = len(mips), mips[0].shape[-1]
    level = torch.as_tensor(level, dtype=mips[0].dtype, device=dirs.device).expand(lead).clamp(0.0, L - 1.0)
    dr = _use_nvdiffrast(backend, mips[0], dirs) if _is_mip_chain(mips) else None
    if dr is not None and L > 1:
        out = dr.texture(
            mips[0][None].float().contiguous(), dirs.reshape(1, 1, -1, 3).float().contiguous(),
            mip=[m[None].float().contiguous() for m in mips[1:]],
            mip_level_bias=level.reshape(1, 1, -1).float().contiguous(),
            filter_mode="linear-mipmap-linear", boundary_mode="cube",
        )
        return out.reshape(*lead, C).to(mips[0].dtype)
    face, u, v = dir_to_cube_uv(dirs.reshape(-1, 3))
    u, v = u.to(mips[0].dtype), v.to(mips[0].dtype)
    lv = level.reshape(-1)
    pads = [pad_cube(m) for m in mips] if padded is None else padded
    if L == 1:
        return _bilinear_padded(pads[0], face, u, v).reshape(*lead, C)
    # all padded levels in one flat table: each sample blends two bilinear taps of adjacent
    # levels, gathered in one pass (no per-level loop, no data-dependent indexing)
    table = torch.cat([p.reshape(-1, C) for p in pads])
    sizes = torch.tensor([m.shape[1] for m in mips], device=dirs.device)
    rows = 6 * (sizes + 2) ** 2
    offsets = rows.cumsum(0) - rows
    l0 = lv.detach().floor().clamp(0, L - 2).long()
    t = (lv - l0.to(lv.dtype))[:, None]
    lo = _bilinear_flat(table, offsets[l0], sizes[l0], face, u, v)
    hi = _bilinear_flat(table, offsets[l0 + 1], sizes[l0 + 1], face, u, v)
    out = lo + (hi - lo) * t
    return out.reshape(*lead, C)


def downsample_cube(cube: Tensor) -> Tensor:
    """2x2 box filter of every face (R must be even).

    Args:
        cube: [6, R, R, C].
    Returns:
        [6, R/2, R/2, C].
    """
    R, C = cube.shape[1], cube.shape[3]
    if R % 2:
        raise ValueError(f"downsample_cube: face size {R} is odd")
    return cube.reshape(6, R // 2, 2, R // 2, 2, C).mean(dim=(2, 4))


def cube_mip_chain(cube: Tensor, min_res: int = 1) -> list[Tensor]:
    """Box-filtered mip pyramid [R, R/2, ..., min_res] of a cube map.

    Returns:
        list of [6, R_l, R_l, C].
    """
    mips = [cube]
    while mips[-1].shape[1] > min_res and mips[-1].shape[1] % 2 == 0:
        mips.append(downsample_cube(mips[-1]))
    return mips


# --------------------------------------------------------------------------- lat-long
def latlong_dirs(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Unit directions through the pixel centres of a lat-long map (module convention).

    Returns:
        [H, W, 3].
    """
    v = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width
    theta, phi = torch.broadcast_tensors(math.pi * v[:, None], 2.0 * math.pi * u[None, :] - math.pi)
    st = torch.sin(theta)
    d = torch.stack([st * torch.sin(phi), torch.cos(theta), -st * torch.cos(phi)], -1)
    return d.to(dtype)


def latlong_solid_angle(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Exact solid angle of every lat-long pixel (rows sum to 4 pi overall).

    Returns:
        [H, W].
    """
    edges = torch.linspace(0.0, math.pi, height + 1, device=device, dtype=torch.float64)
    row = (torch.cos(edges[:-1]) - torch.cos(edges[1:])) * (2.0 * math.pi / width)
    return row[:, None].expand(height, width).to(dtype).contiguous()


def dir_to_latlong_uv(dirs: Tensor) -> tuple[Tensor, Tensor]:
    """Lat-long coordinates of directions (module convention).

    Args:
        dirs: [..., 3] (need not be unit length).
    Returns:
        u: [...] in [0, 1) (azimuth), v: [...] in [0, 1] (0 = +y).
    """
    d = F.normalize(dirs, dim=-1)
    x, y, z = d.unbind(-1)
    phi = torch.atan2(x, -z)
    u = torch.remainder(phi / (2.0 * math.pi) + 0.5, 1.0)
    v = torch.acos(y.clamp(-1.0, 1.0)) / math.pi
    return u, v


def sample_latlong(latlong: Tensor, dirs: Tensor) -> Tensor:
    """Bilinear lat-long lookup (wraps horizontally, clamps at the poles).

    Args:
        latlong: [H, W, C].
        dirs: [..., 3].
    Returns:
        [..., C], differentiable w.r.t. ``latlong``.
    """
    H, W, C = latlong.shape
    lead = dirs.shape[:-1]
    u, v = dir_to_latlong_uv(dirs.reshape(-1, 3))
    x = u.to(latlong.dtype) * W - 0.5
    y = (v.to(latlong.dtype) * H - 0.5).clamp(0.0, H - 1.0)
    x0 = x.detach().floor()
    y0 = y.detach().floor()
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    j0 = torch.remainder(x0.long(), W)
    j1 = torch.remainder(j0 + 1, W)
    i0 = y0.long().clamp(0, H - 1)
    i1 = (i0 + 1).clamp(max=H - 1)
    flat = latlong.reshape(H * W, C)
    t00, t01 = flat[i0 * W + j0], flat[i0 * W + j1]
    t10, t11 = flat[i1 * W + j0], flat[i1 * W + j1]
    top = t00 + (t01 - t00) * fx
    bot = t10 + (t11 - t10) * fx
    return (top + (bot - top) * fy).reshape(*lead, C)


def _subtexel_offsets(n: int, device, dtype) -> Tensor:
    """[n] offsets in (-0.5, 0.5) for an n x n supersampling grid."""
    return (torch.arange(n, device=device, dtype=dtype) + 0.5) / n - 0.5


def latlong_to_cube(latlong: Tensor, res: int, supersample: int | None = None) -> Tensor:
    """Resample a lat-long map into a cube map.

    Every cube texel averages an ``s x s`` grid of bilinear lat-long lookups, with ``s`` chosen
    so that the lookups are about as dense as the lat-long pixels at the equator (a small bright
    sun then keeps its energy instead of being missed between texel centres).

    Args:
        latlong: [H, W, C].
        res: cube face resolution R.
        supersample: grid size per texel axis; None picks ceil(W / (pi R)), capped at 8.
    Returns:
        [6, R, R, C].
    """
    H, W, C = latlong.shape
    if supersample is None:
        supersample = int(min(8, max(1, math.ceil(W / (math.pi * res)))))
    off = _subtexel_offsets(supersample, latlong.device, torch.float64)
    c = torch.arange(res, device=latlong.device, dtype=torch.float64)
    s = (c[:, None] + 0.5 + off[None, :]) / res  # [R, S]
    # grid [R(i), S(a), R(j), S(b)]
    v = s[:, :, None, None].expand(res, supersample, res, supersample)
    u = s[None, None, :, :].expand(res, supersample, res, supersample)
    face = torch.arange(6, device=latlong.device).view(6, 1, 1, 1, 1).expand(6, *u.shape)
    d = face_uv_to_dir(face, u.expand(6, *u.shape), v.expand(6, *v.shape)).to(latlong.dtype)
    vals = sample_latlong(latlong, d)  # [6, R, S, R, S, C]
    return vals.mean(dim=(2, 4))


def cube_to_latlong(cube: Tensor, height: int, width: int) -> Tensor:
    """Resample a cube map into a lat-long map (bilinear, seamless).

    Args:
        cube: [6, R, R, C].
        height, width: output size (normally width = 2 * height).
    Returns:
        [H, W, C].
    """
    d = latlong_dirs(height, width, device=cube.device, dtype=cube.dtype)
    return sample_cube(cube, d)


def resample_cube(cube: Tensor, res: int) -> Tensor:
    """Change the face size of a cube map.

    Downsizing by a power of two uses exact 2x2 box filtering; other sizes average a small
    grid of seamless bilinear lookups per output texel.

    Args:
        cube: [6, R, R, C].
        res: output face size.
    Returns:
        [6, res, res, C] (differentiable w.r.t. ``cube``).
    """
    out = cube
    while out.shape[1] > res and out.shape[1] % 2 == 0 and (out.shape[1] // 2) % res == 0:
        out = downsample_cube(out)
    if out.shape[1] == res:
        return out
    n = max(1, math.ceil(out.shape[1] / res))
    off = _subtexel_offsets(n, cube.device, torch.float64)
    c = torch.arange(res, device=cube.device, dtype=torch.float64)
    s = (c[:, None] + 0.5 + off[None, :]) / res
    shape = (6, res, n, res, n)
    v = s[None, :, :, None, None].expand(shape)
    u = s[None, None, None, :, :].expand(shape)
    face = torch.arange(6, device=cube.device).view(6, 1, 1, 1, 1).expand(shape)
    d = face_uv_to_dir(face, u, v).to(cube.dtype)
    return sample_cube(out, d).mean(dim=(2, 4))


def cube_from_function(fn, res: int, device=None, dtype=torch.float32) -> Tensor:
    """Cube map whose texels are ``fn(direction)`` at the texel centres.

    Args:
        fn: callable [N, 3] -> [N, C].
        res: face resolution.
    Returns:
        [6, R, R, C].
    """
    d = cube_dirs(res, device=device, dtype=dtype)
    out = fn(d.reshape(-1, 3))
    return out.reshape(6, res, res, -1)
