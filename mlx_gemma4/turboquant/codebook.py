"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector in R^d.

After a random rotation every coordinate of a unit vector follows
    f(x) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 - x²)^((d-3)/2),  x in [-1, 1]
(≈ N(0, 1/d) for large d). The b-bit Lloyd-Max quantizer of that law (centroids = conditional means
of their cells, boundaries = midpoints) minimises the expected squared error of that coordinate.
We solve it by Lloyd iteration on a fine grid in the scaled variable t = x·√d, where the law barely
depends on d; the tests compare with the published tables (research/turboquant.md §1.3).
"""

from functools import lru_cache

import numpy as np

GRID_POINTS = 400_001
TAIL = 12.0  # |t| beyond 12 carries < 1e-30 of the mass for every d >= 32


@lru_cache(maxsize=None)
def _grid(dim: int):
    """t, and cumulative integrals of g(t), t·g(t), t²·g(t) for the density g of t = x·√d."""
    half = min(TAIL, np.sqrt(dim))
    t = np.linspace(-half, half, GRID_POINTS)
    with np.errstate(divide="ignore"):
        log_g = (dim - 3) / 2 * np.log1p(-np.minimum(t * t / dim, 1.0))
    g = np.exp(log_g - log_g.max())
    cumulative = []
    for moment in (g, t * g, t * t * g):
        steps = (moment[1:] + moment[:-1]) / 2 * np.diff(t)  # trapezoids
        cumulative.append(np.concatenate([[0.0], np.cumsum(steps)]))
    total = cumulative[0][-1]
    return t, [c / total for c in cumulative]


def _cell_integrals(dim: int, edges: np.ndarray):
    t, (mass, first, second) = _grid(dim)
    at = lambda c: np.interp(edges, t, c)  # noqa: E731
    return np.diff(at(mass)), np.diff(at(first)), np.diff(at(second))


@lru_cache(maxsize=None)
def lloyd_max(dim: int, bits: int, iterations: int = 20_000, tolerance: float = 1e-13):
    """(centroids, boundaries, d·MSE) of the `bits`-bit quantizer, centroids in unit-vector scale.

    Centroids are ascending, 2**bits of them; the 2**bits - 1 boundaries are their midpoints.
    d·MSE is the expected squared error of a unit vector's coordinate times d (the distortion of a
    whole unit vector, E‖u - ũ‖²).
    """
    if dim < 4 or bits < 1:
        raise ValueError(f"need dim >= 4 and bits >= 1, got dim={dim}, bits={bits}")
    levels = 2**bits
    half = min(TAIL, np.sqrt(dim))
    # start from uniform quantiles of N(0, 1), which the law approaches
    centroids = np.linspace(-2.5, 2.5, levels) * (1 if levels > 2 else 0.32)
    for _ in range(iterations):
        edges = np.concatenate([[-half], (centroids[1:] + centroids[:-1]) / 2, [half]])
        mass, first, _ = _cell_integrals(dim, edges)
        updated = first / mass
        done = np.max(np.abs(updated - centroids)) < tolerance
        centroids = updated
        if done:
            break
    edges = np.concatenate([[-half], (centroids[1:] + centroids[:-1]) / 2, [half]])
    mass, first, second = _cell_integrals(dim, edges)
    mse = float(np.sum(second - 2 * centroids * first + centroids**2 * mass))
    scale = 1 / np.sqrt(dim)
    return centroids * scale, (centroids[1:] + centroids[:-1]) / 2 * scale, mse
