"""How far apart two sets of feature vectors are, with error bars (the statistics behind ``quality``).

* :func:`frechet_distance`: the distance behind FID (Heusel et al. 2017). Biased: two sets drawn
  from one distribution score above 0, the more so the fewer the samples.
* :func:`kernel_inception_distance`: KID (Bińkowski et al. 2018, arXiv:1801.01401), the unbiased
  estimate of the squared maximum mean discrepancy (MMD) with the kernel k(x, y) = (x.y / d + 1)^3.
  Two sets from one distribution score 0 on average, at any sample count, so it can go below 0.
* :func:`kid_interval`: a bootstrap confidence interval for KID.
* :func:`mmd_permutation_test`: can the two sets be told apart at all? A p-value from relabelling.
* :func:`nearest_neighbours`: each image's nearest image in another set (for near-copy checks).

Every input is an (N, D) tensor of features; everything is computed in float64.
"""

from __future__ import annotations

import torch


def _check_pair(features_a: torch.Tensor, features_b: torch.Tensor, minimum: int = 2) -> None:
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"need two (N, D) feature sets of one D, got {tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    if len(features_a) < minimum or len(features_b) < minimum:
        raise ValueError(f"need at least {minimum} samples in each feature set")


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) (Heusel et al. 2017):

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric matrix S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues, in float64.
    """
    _check_pair(features_a, features_b)
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0)
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle.sqrt().sum()
    return max(distance.item(), 0.0)


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel between every row of ``a`` and of ``b``: k(x, y) = (x.y / d + 1)^3, (N_a, N_b)."""
    return (a.double() @ b.double().T / a.shape[1] + 1) ** 3


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The unbiased estimate of MMD^2 between the distributions behind two feature sets (KID):

    MMD^2 = mean_{i != j} k(a_i, a_j) + mean_{i != j} k(b_i, b_j) - 2 mean_{i, j} k(a_i, b_j)
    (Gretton et al. 2012, Eq. 3). The diagonals i = j are left out, which removes the bias.
    """
    _check_pair(features_a, features_b)
    kernels = _Kernels(features_a, features_b)
    ones_a = torch.ones(1, kernels.n, dtype=torch.float64)
    ones_b = torch.ones(1, kernels.m, dtype=torch.float64)
    return kernels.mmd_from_counts(ones_a, ones_b).item()


def kid_interval(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    rounds: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A percentile-bootstrap interval for KID: ``(low, high, standard error)``.

    Each round redraws both sets with replacement (as many as each has) and recomputes the unbiased
    estimate, leaving out every pair of copies of one original, as the estimate leaves out i = j.
    """
    _check_pair(features_a, features_b)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    kernels = _Kernels(features_a, features_b)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, rounds, 100):  # in blocks, to bound memory
        size = min(100, rounds - start)
        counts_a = _bootstrap_counts(kernels.n, size, generator)
        counts_b = _bootstrap_counts(kernels.m, size, generator)
        values.append(kernels.mmd_from_counts(counts_a, counts_b))
    values = torch.cat(values)
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high, values.std().item()


def mmd_permutation_test(features_a: torch.Tensor, features_b: torch.Tensor, rounds: int = 500, seed: int = 0) -> float:
    """The p-value of "both sets come from one distribution" (a permutation two-sample test).

    Pool the two sets, split the pool at random into parts of the original sizes ``rounds`` times,
    and count how often the split's KID is at least the observed one. A small p-value (below 0.05,
    say) means the sets can be told apart at this sample count.
    """
    _check_pair(features_a, features_b)
    n, m = len(features_a), len(features_b)
    pooled = torch.cat([features_a, features_b]).double()
    kernel = polynomial_kernel(pooled, pooled)
    diagonal = kernel.diagonal()
    total = kernel.sum()
    generator = torch.Generator().manual_seed(seed)
    first = torch.zeros(rounds + 1, n + m, dtype=torch.float64)
    first[0, :n] = 1  # the observed split
    for row in range(1, rounds + 1):
        first[row, torch.randperm(n + m, generator=generator)[:n]] = 1
    within_first = ((first @ kernel) * first).sum(1)  # sum over pairs inside the first part, i = j included
    cross = ((first @ kernel) * (1 - first)).sum(1)
    within_second = total - within_first - 2 * cross
    diagonal_first = first @ diagonal
    diagonal_second = diagonal.sum() - diagonal_first
    statistics = (
        (within_first - diagonal_first) / (n * (n - 1))
        + (within_second - diagonal_second) / (m * (m - 1))
        - 2 * cross / (n * m)
    )
    observed = statistics[0]
    return ((statistics[1:] >= observed).sum().item() + 1) / (rounds + 1)


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor, pool: torch.Tensor, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``queries`` (flattened), the Euclidean distance to its nearest row of ``pool``
    and that row's index: ``(distances (N,), indices (N,))``."""
    queries, pool = queries.flatten(1).double(), pool.flatten(1).double()
    if queries.shape[1] != pool.shape[1]:
        raise ValueError(f"queries and pool differ in size: {queries.shape[1]} and {pool.shape[1]} numbers each")
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        nearest = torch.cdist(queries[start : start + chunk], pool).min(dim=1)
        distances.append(nearest.values)
        indices.append(nearest.indices)
    return torch.cat(distances), torch.cat(indices)


class _Kernels:
    """The three kernel matrices of two sets, and MMD^2 for weighted (bootstrap) copies of them."""

    def __init__(self, features_a: torch.Tensor, features_b: torch.Tensor):
        self.aa = polynomial_kernel(features_a, features_a)
        self.bb = polynomial_kernel(features_b, features_b)
        self.ab = polynomial_kernel(features_a, features_b)
        self.n, self.m = len(features_a), len(features_b)

    def mmd_from_counts(self, counts_a: torch.Tensor, counts_b: torch.Tensor) -> torch.Tensor:
        """MMD^2 for sets holding each original ``counts`` times, (R, N) -> (R,).

        Pairs of two copies of one original are left out, like i = j in the plain estimate; with
        all counts 1 this is exactly the unbiased estimate.
        """
        within_a = ((counts_a @ self.aa) * counts_a).sum(1) - (counts_a.square() * self.aa.diagonal()).sum(1)
        within_b = ((counts_b @ self.bb) * counts_b).sum(1) - (counts_b.square() * self.bb.diagonal()).sum(1)
        pairs_a = counts_a.sum(1).square() - counts_a.square().sum(1)
        pairs_b = counts_b.sum(1).square() - counts_b.square().sum(1)
        cross = ((counts_a @ self.ab) * counts_b).sum(1) / (counts_a.sum(1) * counts_b.sum(1))
        return within_a / pairs_a + within_b / pairs_b - 2 * cross


def _bootstrap_counts(size: int, rounds: int, generator: torch.Generator) -> torch.Tensor:
    """How often each of ``size`` originals is drawn in each of ``rounds`` redraws, (rounds, size)."""
    draws = torch.randint(size, (rounds, size), generator=generator)
    counts = torch.zeros(rounds, size, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
