"""PatchCore's arithmetic on plain tensors (Roth et al., "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022): locally aware patch features, the greedy coreset, nearest-neighbour
distances and the reweighted image score. No config, no files: tested against brute force.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

QUERY_CHUNK = 2048  # query rows per distance matrix: 2048 x a 20k bank is 160 MB of float32


def locally_aware_features(levels: list[torch.Tensor]) -> torch.Tensor:
    """Patch features of several backbone levels as one (B, sum C, h, w) map (paper Sec. 3.1).

    Each level is averaged over its 3x3 neighbourhood (the "locally aware" aggregation, which
    keeps the resolution), the coarser ones are resized bilinearly to the first level's grid, and
    the channels are concatenated.
    """
    size = levels[0].shape[-2:]
    pooled = []
    for level in levels:
        level = F.avg_pool2d(level.float(), kernel_size=3, stride=1, padding=1)
        if level.shape[-2:] != size:
            level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        pooled.append(level)
    return torch.cat(pooled, dim=1)


def squared_distances(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) squared Euclidean distances, as ||q||^2 - 2 q.b + ||b||^2 (one matmul), clamped at 0."""
    norms = bank_norms if bank_norms is not None else (bank * bank).sum(dim=1)
    d2 = (queries * queries).sum(dim=1, keepdim=True) - 2.0 * queries @ bank.T + norms.unsqueeze(0)
    return d2.clamp_min(0.0)


def nearest_neighbors(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
                      excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest bank rows of each query: (distances (M, k), indices (M, k)), nearest first.

    ``excluded`` is an (M, K) bool mask of bank rows a query may not match (a training image's
    own patches). Queries are processed in chunks of :data:`QUERY_CHUNK` rows.
    """
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    k = min(k, bank.shape[0])
    norms = (bank * bank).sum(dim=1)
    distances, indices = [], []
    for begin in range(0, queries.shape[0], QUERY_CHUNK):
        d2 = squared_distances(queries[begin:begin + QUERY_CHUNK], bank, norms)
        if excluded is not None:
            d2 = d2.masked_fill(excluded[begin:begin + QUERY_CHUNK], float("inf"))
        values, index = torch.topk(d2, k, dim=1, largest=False)
        distances.append(values.sqrt())
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def greedy_coreset(points: torch.Tensor, count: int, projection_dim: int = 128, seed: int = 0,
                   on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Indices of ``count`` points chosen by greedy k-center selection (paper Alg. 1).

    Start from one random point; each step adds the point farthest from everything chosen so far.
    Distances are measured after a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss; 0 keeps the points as they are), as the paper does to make the search
    affordable. Deterministic in ``seed``. ``on_step(done, count)`` is called every 10 % of the way.
    """
    n = points.shape[0]
    count = max(1, min(count, n))
    generator = torch.Generator().manual_seed(seed)
    work = points.float()
    if projection_dim and work.shape[1] > projection_dim:
        projection = torch.randn(work.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5
        work = work @ projection
    norms = (work * work).sum(dim=1)
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = (norms - 2.0 * work @ work[chosen[0]] + norms[chosen[0]]).clamp_min(0.0)
    for step in range(1, count):
        chosen[step] = int(torch.argmax(nearest))
        candidate = (norms - 2.0 * work @ work[chosen[step]] + norms[chosen[step]]).clamp_min(0.0)
        nearest = torch.minimum(nearest, candidate)
        if on_step is not None and (step + 1) % max(1, count // 10) == 0:
            on_step(step + 1, count)
    return chosen


def bank_neighbors(bank: torch.Tensor, count: int) -> torch.Tensor:
    """(K, count) indices: each bank row itself first, then its ``count - 1`` nearest other rows
    (the support set N_b of the reweighting), computed once at fit time."""
    count = min(count, bank.shape[0])
    own = torch.arange(bank.shape[0]).unsqueeze(1)
    if count == 1:
        return own
    excluded = torch.zeros(bank.shape[0], bank.shape[0], dtype=torch.bool)
    excluded[own[:, 0], own[:, 0]] = True
    _, others = nearest_neighbors(bank, bank, count - 1, excluded)
    return torch.cat([own, others], dim=1)


def reweighted_scores(patch_features: torch.Tensor, patch_distances: torch.Tensor, patch_nearest: torch.Tensor,
                      bank: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Image scores (B,) of paper eq. 7.

    For each image, the patch farthest from the bank (m_test*, at distance s*) and its nearest
    bank row m*: the score is ``s* (1 - softmax(d)[0])`` where ``d`` are the distances from m_test*
    to m* and to m*'s nearest bank rows (``support[m*]``). An outlying patch whose nearest normal
    is itself in a sparse region of the bank counts more than one near a dense cluster.

    Args:
        patch_features: (B, P, D) the images' patch features.
        patch_distances: (B, P) each patch's distance to its nearest bank row.
        patch_nearest: (B, P) that row's index.
        bank: (K, D) the memory bank.
        support: (K, b) each bank row's support set (itself first): :func:`bank_neighbors`.
    """
    worst = patch_distances.argmax(dim=1)
    rows = torch.arange(patch_distances.shape[0])
    s_star = patch_distances[rows, worst]
    m_test = patch_features[rows, worst]  # (B, D)
    neighbours = bank[support[patch_nearest[rows, worst]]]  # (B, b, D)
    d = (neighbours - m_test.unsqueeze(1)).pow(2).sum(dim=-1).sqrt()
    weight = 1.0 - torch.softmax(d, dim=1)[:, 0]
    return weight * s_star
