"""Generic triangle-mesh helpers used to build and query head models.

Array conventions: ``vertices`` [V, 3] float, ``faces`` [F, 3] integer vertex indices with
counter-clockwise winding seen from outside (normal = (v1 - v0) x (v2 - v0)).
Topology helpers take and return numpy arrays; geometric queries that other modules run at
training time (normals, closest points) take torch tensors and stay on their device.
"""
from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import torch
from torch import Tensor


# ----------------------------------------------------------------------------- geometry (torch)
def face_normals(vertices: Tensor, faces: Tensor, normalize: bool = True) -> Tensor:
    """Per-face normals.

    Args:
        vertices: [..., V, 3].
        faces: [F, 3] int64.
        normalize: unit vectors if True, else area-weighted (|n| = 2 * area).
    Returns:
        [..., F, 3].
    """
    v0 = vertices[..., faces[:, 0], :]
    v1 = vertices[..., faces[:, 1], :]
    v2 = vertices[..., faces[:, 2], :]
    n = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)
    return torch.nn.functional.normalize(n, dim=-1) if normalize else n


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals.

    Args:
        vertices: [..., V, 3].
        faces: [F, 3] int64.
    Returns:
        [..., V, 3] (zero-length normals of isolated vertices stay zero).
    """
    fn = face_normals(vertices, faces, normalize=False)  # [..., F, 3]
    out = torch.zeros_like(vertices)
    for k in range(3):
        out.index_add_(-2, faces[:, k], fn)
    return torch.nn.functional.normalize(out, dim=-1)


def closest_points_on_triangles(points: Tensor, tri: Tensor) -> tuple[Tensor, Tensor]:
    """Closest point of each triangle to each point (region-based, Ericson's method).

    Args:
        points: [N, 3].
        tri: [N, 3, 3] one triangle per point (or broadcastable [N, T, ...] with points [N, 1, 3]).
    Returns:
        closest: [..., 3] closest points, bary: [..., 3] their barycentric coordinates.
    """
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    ab, ac, ap = b - a, c - a, points - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = points - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = points - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    eps = torch.finfo(points.dtype).tiny
    # interior by default
    denom = (va + vb + vc).clamp_min(eps)
    v = vb / denom
    w = vc / denom
    u = 1 - v - w
    bary = torch.stack([u, v, w], -1)

    def put(mask: Tensor, val: Tensor) -> None:
        nonlocal bary
        bary = torch.where(mask[..., None], val, bary)

    one, zero = torch.ones_like(d1), torch.zeros_like(d1)
    # edge bc
    t_bc = ((d4 - d3) / ((d4 - d3) + (d5 - d6)).clamp_min(eps)).clamp(0, 1)
    put((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), torch.stack([zero, 1 - t_bc, t_bc], -1))
    # edge ac
    t_ac = (d2 / (d2 - d6).clamp_min(eps)).clamp(0, 1)
    put((vb <= 0) & (d2 >= 0) & (d6 <= 0), torch.stack([1 - t_ac, zero, t_ac], -1))
    # edge ab
    t_ab = (d1 / (d1 - d3).clamp_min(eps)).clamp(0, 1)
    put((vc <= 0) & (d1 >= 0) & (d3 <= 0), torch.stack([1 - t_ab, t_ab, zero], -1))
    # vertices
    put((d6 >= 0) & (d5 <= d6), torch.stack([zero, zero, one], -1))
    put((d3 >= 0) & (d4 <= d3), torch.stack([zero, one, zero], -1))
    put((d1 <= 0) & (d2 <= 0), torch.stack([one, zero, zero], -1))
    closest = (bary[..., None] * tri).sum(-2)
    return closest, bary


def closest_point_on_mesh(
    points: Tensor, vertices: Tensor, faces: Tensor, chunk: int = 2_000_000, candidates: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Closest surface point of a mesh for each query point (brute force, chunked).

    Args:
        points: [N, 3].
        vertices: [V, 3].
        faces: [F, 3] int64.
        chunk: max number of point-triangle pairs evaluated at once (memory bound).
        candidates: if given, only the this many faces with the nearest centroids (a k-d
            tree query) are tested per point (much faster; exact unless a large face's centroid
            is far from its closest point, and never an underestimate of the distance).
    Returns:
        face_idx: [N] int64, bary: [N, 3] barycentric coordinates in that face,
        dist: [N] distances.
    """
    tri = vertices[faces]  # [F,3,3]
    F = tri.shape[0]
    if candidates is not None and candidates < F:
        from scipy.spatial import cKDTree

        tree = cKDTree(tri.mean(1).detach().cpu().double().numpy())
        fidx, bary_out, dist = [], [], []
        per = max(1, chunk // candidates)
        for s in range(0, points.shape[0], per):
            p = points[s:s + per]
            _, near = tree.query(p.detach().cpu().double().numpy(), k=candidates, workers=-1)
            cand = torch.from_numpy(near.reshape(p.shape[0], candidates)).to(p.device)  # [n,k]
            cl, bc = closest_points_on_triangles(p[:, None, :], tri[cand])
            d = (cl - p[:, None, :]).norm(dim=-1)
            dm, im = d.min(1)
            rows = torch.arange(len(im), device=im.device)
            fidx.append(cand[rows, im])
            bary_out.append(bc[rows, im])
            dist.append(dm)
        return torch.cat(fidx), torch.cat(bary_out), torch.cat(dist)
    per = max(1, chunk // max(F, 1))
    fidx, bary_out, dist = [], [], []
    for s in range(0, points.shape[0], per):
        p = points[s:s + per, None, :]  # [n,1,3]
        cl, bc = closest_points_on_triangles(p, tri[None])
        d = (cl - p).norm(dim=-1)  # [n,F]
        dm, im = d.min(1)
        fidx.append(im)
        bary_out.append(bc[torch.arange(len(im), device=im.device), im])
        dist.append(dm)
    return torch.cat(fidx), torch.cat(bary_out), torch.cat(dist)


# ----------------------------------------------------------------------------- topology (numpy)
def unique_edges(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges of a triangle mesh.

    Args:
        faces: [F, 3].
    Returns:
        edges: [E, 2] sorted vertex pairs (lower index first), counts: [E] number of faces per edge.
    """
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 0), axis=1)
    edges, counts = np.unique(e, axis=0, return_counts=True)
    return edges.astype(np.int64), counts


def boundary_edges(faces: np.ndarray) -> np.ndarray:
    """Directed boundary edges (used by exactly one face), in that face's winding, [B, 2]."""
    d = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 0)
    key = np.sort(d, axis=1)
    _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    return d[counts[inv.reshape(-1)] == 1].astype(np.int64)


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops as ordered vertex index arrays (longest first).

    Vertices where several loops touch are resolved greedily; each loop follows the
    faces' winding.
    """
    nxt = defaultdict(list)
    for a, b in boundary_edges(faces):
        nxt[int(a)].append(int(b))
    loops = []
    while nxt:
        start = next(iter(nxt))
        loop, cur = [start], start
        while True:
            b = nxt[cur].pop()
            if not nxt[cur]:
                del nxt[cur]
            if b == start:
                break
            loop.append(b)
            cur = b
            if cur not in nxt:  # open chain (non-manifold input)
                break
        loops.append(np.asarray(loop, np.int64))
    return sorted(loops, key=len, reverse=True)


def triangles_from_edges(edges: np.ndarray) -> np.ndarray:
    """All 3-cliques of an undirected edge graph (a triangulation given as its edge set), [T, 3].

    Every triangle is listed once with ascending indices (orientation is not defined).
    """
    adj = defaultdict(set)
    for a, b in edges:
        a, b = int(a), int(b)
        if a != b:
            adj[a].add(b)
            adj[b].add(a)
    tris = []
    for a in sorted(adj):
        for b in sorted(x for x in adj[a] if x > a):
            for c in sorted(x for x in adj[a] & adj[b] if x > b):
                tris.append((a, b, c))
    return np.asarray(tris, np.int64).reshape(-1, 3)


def orient_faces(faces: np.ndarray, vertices: np.ndarray, outward: np.ndarray | None = None) -> np.ndarray:
    """Make the winding consistent across each connected component (breadth-first flips).

    Args:
        faces: [F, 3].
        vertices: [V, 3].
        outward: optional [3] direction; each component is flipped as a whole so that its
            area-weighted mean normal points along it (else: along the component's mean
            direction away from its centroid, right for closed outward surfaces).
    Returns:
        [F, 3] re-wound faces.
    """
    faces = faces.copy()
    F = len(faces)
    edge_faces = defaultdict(list)
    for i, f in enumerate(faces):
        for k in range(3):
            a, b = int(f[k]), int(f[(k + 1) % 3])
            edge_faces[(min(a, b), max(a, b))].append(i)
    seen = np.zeros(F, bool)
    for seed in range(F):
        if seen[seed]:
            continue
        comp, queue = [seed], deque([seed])
        seen[seed] = True
        while queue:
            i = queue.popleft()
            f = faces[i]
            for k in range(3):
                a, b = int(f[k]), int(f[(k + 1) % 3])
                for j in edge_faces[(min(a, b), max(a, b))]:
                    if seen[j]:
                        continue
                    g = list(faces[j])
                    # consistent neighbours traverse the shared edge in opposite directions
                    same_dir = any(g[m] == a and g[(m + 1) % 3] == b for m in range(3))
                    if same_dir:
                        faces[j] = faces[j][::-1]
                    seen[j] = True
                    comp.append(j)
                    queue.append(j)
        comp = np.asarray(comp)
        fc = faces[comp]
        n = np.cross(vertices[fc[:, 1]] - vertices[fc[:, 0]], vertices[fc[:, 2]] - vertices[fc[:, 0]])
        if outward is not None:
            score = (n @ np.asarray(outward, float)).sum()
        else:
            cen = vertices[fc].mean((0, 1))
            score = (n * (vertices[fc].mean(1) - cen)).sum()
        if score < 0:
            faces[comp] = faces[comp][:, ::-1]
    return faces


def vertex_adjacency(faces: np.ndarray, num_vertices: int):
    """Symmetric 0/1 vertex adjacency as a scipy CSR matrix [V, V]."""
    import scipy.sparse as sp

    e, _ = unique_edges(faces)
    data = np.ones(2 * len(e))
    rows = np.concatenate([e[:, 0], e[:, 1]])
    cols = np.concatenate([e[:, 1], e[:, 0]])
    return sp.csr_matrix((data, (rows, cols)), shape=(num_vertices, num_vertices))


def smooth_vertex_values(values: np.ndarray, faces: np.ndarray, iterations: int = 10, lam: float = 0.5, fixed: np.ndarray | None = None) -> np.ndarray:
    """Uniform-Laplacian smoothing of any per-vertex quantity (positions, weights, ...).

    Args:
        values: [V, C] (or [V]).
        faces: [F, 3].
        iterations: number of Jacobi steps ``x <- x + lam (mean(neighbours) - x)``.
        fixed: optional [V] bool, vertices that keep their value.
    Returns:
        same shape as ``values``.
    """
    x = np.asarray(values, float).copy()
    flat = x.ndim == 1
    if flat:
        x = x[:, None]
    A = vertex_adjacency(faces, len(x))
    deg = np.asarray(A.sum(1)).reshape(-1)
    deg[deg == 0] = 1
    move = np.ones(len(x), bool) if fixed is None else ~np.asarray(fixed, bool)
    for _ in range(iterations):
        avg = (A @ x) / deg[:, None]
        x[move] += lam * (avg[move] - x[move])
    return x[:, 0] if flat else x


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int = 10, lam: float = 0.5, mu: float = -0.53, fixed: np.ndarray | None = None) -> np.ndarray:
    """Taubin lambda|mu smoothing of positions [V, 3] (removes noise without shrinking)."""
    x = np.asarray(vertices, float).copy()
    for _ in range(iterations):
        x = smooth_vertex_values(x, faces, 1, lam, fixed)
        x = smooth_vertex_values(x, faces, 1, mu, fixed)
    return x


def loop_subdivide(vertices: np.ndarray, faces: np.ndarray, move_even: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of Loop subdivision (boundary-aware).

    Every edge gets a new (odd) vertex; each triangle becomes four. With ``move_even`` the
    original vertices are smoothed by Loop's vertex rule; without it they stay put (the
    surface interpolates them, useful to keep landmark vertices exact).

    Args:
        vertices: [V, 3].
        faces: [F, 3].
    Returns:
        new_vertices: [V + E, 3] (original vertices first, then one per edge),
        new_faces: [4F, 3] (same winding),
        edges: [E, 2] the parent edge of each new vertex (vertex V + i splits edges[i]), so
            any per-vertex attribute can be carried over by averaging its endpoints.
    """
    V = len(vertices)
    edges, counts = unique_edges(faces)
    E = len(edges)
    key = edges[:, 0] * V + edges[:, 1]
    order = np.argsort(key)
    skey = key[order]

    def edge_id(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        return order[np.searchsorted(skey, lo * V + hi)]

    # opposite vertices of each interior edge
    opp_sum = np.zeros((E, 3))
    for k in range(3):
        a, b, c = faces[:, k], faces[:, (k + 1) % 3], faces[:, (k + 2) % 3]
        np.add.at(opp_sum, edge_id(a, b), vertices[c])
    mid = 0.5 * (vertices[edges[:, 0]] + vertices[edges[:, 1]])
    odd = np.where((counts == 2)[:, None], 0.375 * (vertices[edges[:, 0]] + vertices[edges[:, 1]]) + 0.125 * opp_sum, mid)

    even = vertices.copy()
    if move_even:
        bnd = edges[counts == 1]
        is_bnd = np.zeros(V, bool)
        is_bnd[bnd.ravel()] = True
        nb_sum = np.zeros((V, 3))
        nb_cnt = np.zeros(V)
        np.add.at(nb_sum, edges[:, 0], vertices[edges[:, 1]])
        np.add.at(nb_sum, edges[:, 1], vertices[edges[:, 0]])
        np.add.at(nb_cnt, edges[:, 0], 1)
        np.add.at(nb_cnt, edges[:, 1], 1)
        n = np.maximum(nb_cnt, 1)
        beta = np.where(n > 3, 3.0 / (8.0 * n), 3.0 / 16.0)
        even = (1 - n[:, None] * beta[:, None]) * vertices + beta[:, None] * nb_sum
        bsum = np.zeros((V, 3))
        np.add.at(bsum, bnd[:, 0], vertices[bnd[:, 1]])
        np.add.at(bsum, bnd[:, 1], vertices[bnd[:, 0]])
        even[is_bnd] = 0.75 * vertices[is_bnd] + 0.125 * bsum[is_bnd]
    a, b, c = faces[:, 0], faces[:, 1], faces[:, 2]
    ab, bc, ca = V + edge_id(a, b), V + edge_id(b, c), V + edge_id(c, a)
    new_faces = np.concatenate(
        [np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1), np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1)], 0
    )
    return np.concatenate([even, odd], 0), new_faces.astype(np.int64), edges


def graph_distances(vertices: np.ndarray, faces: np.ndarray, sources: np.ndarray, limit: float = np.inf) -> np.ndarray:
    """Approximate geodesic distance (shortest path along mesh edges) from a vertex set.

    Args:
        vertices: [V, 3].
        faces: [F, 3].
        sources: [S] vertex indices (distance 0).
        limit: stop exploring beyond this distance (returns inf there).
    Returns:
        [V] distances (inf where unreachable).
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import dijkstra

    e, _ = unique_edges(faces)
    w = np.linalg.norm(vertices[e[:, 0]] - vertices[e[:, 1]], axis=1)
    V = len(vertices)
    G = sp.csr_matrix((np.concatenate([w, w]), (np.concatenate([e[:, 0], e[:, 1]]), np.concatenate([e[:, 1], e[:, 0]]))), shape=(V, V))
    d = dijkstra(G, directed=False, indices=np.asarray(sources, np.int64), limit=limit, min_only=True)
    return np.asarray(d)


def connected_components(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    """[V] component label of every vertex (isolated vertices get their own label)."""
    from scipy.sparse.csgraph import connected_components as cc

    _, labels = cc(vertex_adjacency(faces, num_vertices), directed=False)
    return labels
