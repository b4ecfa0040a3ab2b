"""Balanced k-means: k clusters of exactly N / k points each, deterministic from a seed.

Used to split an FFN's neurons into equal experts (`--split kmeans`) and, later, to place router rows on
calibration hidden states. Why by hand: scikit-learn's KMeans has no size constraint (and is not a dependency);
the balanced variants live in small research packages. Lloyd iterations with a greedy capacity-constrained
assignment (every (point, centroid) pair in order of distance, a point taken by the nearest centroid that still has
room) are enough here: the clusters need to be equal and coherent, not optimal.
"""

from __future__ import annotations

import torch


def balanced_assign(distances: torch.Tensor, capacity: int) -> torch.Tensor:
    """Labels `(N,)` from `distances` `(N, k)`: each point to its nearest centroid with room (at most `capacity`)."""
    num_points, k = distances.shape
    order = torch.argsort(distances.flatten()).tolist()
    labels = [-1] * num_points
    room = [capacity] * k
    left = num_points
    for pair in order:
        point, cluster = divmod(pair, k)
        if labels[point] < 0 and room[cluster] > 0:
            labels[point] = cluster
            room[cluster] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels)


def balanced_kmeans(points: torch.Tensor, k: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster labels `(N,)` of `points` `(N, D)` into `k` clusters of `N // k` points (N must be a multiple of k)."""
    num_points = points.shape[0]
    if num_points % k:
        raise ValueError(f"balanced k-means needs a multiple of {k} points, got {num_points}.")
    points = points.float()
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(num_points, generator=generator)[:k]].clone()
    labels = torch.zeros(num_points, dtype=torch.long)
    for _ in range(iterations):
        new_labels = balanced_assign(torch.cdist(points, centroids), num_points // k)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        centroids = torch.stack([points[labels == c].mean(dim=0) for c in range(k)])
    return labels
