"""Exact, deterministic k-means on a handful of scalars (one per layer), by dynamic programming.

In one dimension the optimal clusters are contiguous runs of the sorted values, so the minimum within-cluster sum of
squares is found exactly in O(k n^2) — no random restarts, no scikit-learn.
"""

from __future__ import annotations

from typing import Sequence


def kmeans_1d(values: Sequence[float], k: int) -> tuple[list[int], list[float]]:
    """Cluster ``values`` into at most ``k`` groups minimising the within-cluster sum of squares.

    Returns ``(labels, centers)`` with clusters numbered by increasing centre (label 0 = smallest centre). ``k`` is
    lowered to the number of distinct values when there are fewer.
    """
    n = len(values)
    if n == 0:
        raise ValueError("kmeans_1d needs at least one value")
    if k < 1:
        raise ValueError(f"kmeans_1d k={k} is out of range: must be >= 1")
    k = min(k, len(set(values)))
    order = sorted(range(n), key=lambda i: (values[i], i))
    x = [float(values[i]) for i in order]
    pre = [0.0] * (n + 1)
    pre2 = [0.0] * (n + 1)
    for i, v in enumerate(x):
        pre[i + 1] = pre[i] + v
        pre2[i + 1] = pre2[i] + v * v

    def sse(a: int, b: int) -> float:  # cost of x[a:b] as one cluster
        s = pre[b] - pre[a]
        return (pre2[b] - pre2[a]) - s * s / (b - a)

    inf = float("inf")
    # cost[j][i]: best cost of x[:i] in j clusters; cut[j][i]: start of the last cluster
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for a in range(j - 1, i):
                c = cost[j - 1][a] + sse(a, i)
                if c < cost[j][i] - 1e-15:
                    cost[j][i] = c
                    cut[j][i] = a
    bounds = []
    i = n
    for j in range(k, 0, -1):
        a = cut[j][i]
        bounds.append((a, i))
        i = a
    bounds.reverse()
    labels = [0] * n
    centers = []
    for label, (a, b) in enumerate(bounds):
        centers.append((pre[b] - pre[a]) / (b - a))
        for pos in range(a, b):
            labels[order[pos]] = label
    return labels, centers
