"""Distances and similarities between two sets of embeddings (SPEC §1).

Every class maps a query set (N, D) and a reference set (M, D) to the full (N, M) matrix with
`distance(query, ref)` (the reference defaults to the query set), and row-aligned pairs to an
(N,) vector with `distance.pairwise_distance(query, ref)`. `is_inverted` says whether larger
means closer (similarities), `is_metric` whether the axioms of a metric hold.

Inputs are normalised to unit length only when `normalize_embeddings=True` (default off),
except for the cosine family, which is defined on unit vectors and always normalises
(`safe_normalize`: an all-zero row stays zero and passes no gradient). float16 and bfloat16
inputs are computed in float32 and the result returned in the input dtype.

Gradients are finite where a distance is zero (the diagonal, duplicate points): square roots
go through `safe_sqrt`, whose derivative at 0 is taken as 0. The Euclidean matrix is one fused
autograd step (`euclidean_matrix`) that follows the same rule with a single (N, M) array.

Example:
    >>> import torch
    >>> from deepmetric.distances import LpDistance
    >>> LpDistance()(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]))
    tensor([[5.]])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from deepmetric._validation import HyperParameter, check_count, check_finite, check_positive
from deepmetric.blocks import RowBlocks, backward_by_autograd


class _SafeSqrt(torch.autograd.Function):
    """sqrt(max(x, 0)) with derivative 1 / (2 sqrt(x)) for x > 0 and 0 elsewhere."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        root = x.clamp_min(0).sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, grad / (2 * root).clamp_min(torch.finfo(root.dtype).tiny), 0)


def safe_sqrt(x: Tensor) -> Tensor:
    """Square root of max(x, 0) whose gradient is 0 (not inf or NaN) where x <= 0."""
    return _SafeSqrt.apply(x)


class _EuclideanMatrix(torch.autograd.Function):
    """The (N, M) Euclidean distance matrix, or its square, with one (N, M) array in all.

    Forward: one `addmm` for -2 q.r + ||r||^2, then in place on its output: + ||q||^2,
    clamp at 0, exact zeros at (i, i + offset) when `offset` is not None (the query rows are
    rows offset.. of the reference set: 0 for a set against itself, `same_set`, whose
    gradient is then returned once), and the square root when `root`. The
    output is the only thing saved besides the inputs.

    Backward, in row blocks of the incoming gradient G: W = G / d where d > 0 and 0 where
    d = 0 (the `safe_sqrt` rule; W = 2 G for the square; see `_distance_weights`), then
    grad_q = rowsum(W) q - W r and grad_r = colsum(W) r - W^T q, two matrix products as in
    the backward of a plain similarity matmul, with no (N, M) temporary. When a graph of the
    gradient is asked for (second derivatives), backward differentiates the unfused steps.
    """

    @staticmethod
    def forward(
        ctx, query: Tensor, ref: Tensor, root: bool, same_set: bool, offset: int | None
    ) -> Tensor:
        query_sq = query.pow(2).sum(dim=1, keepdim=True)
        ref_sq = ref.pow(2).sum(dim=1)
        out = torch.addmm(ref_sq.unsqueeze(0), query, ref.T, alpha=-2)
        out.add_(query_sq).clamp_min_(0)
        if offset is not None:
            out.diagonal(offset).zero_()  # exact zeros where the expansion leaves rounding error
        if root:
            out.sqrt_()
        ctx.save_for_backward(query, ref, out)
        ctx.root, ctx.same_set, ctx.offset = root, same_set, offset
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        query, ref, out = ctx.saved_tensors
        need_query, need_ref = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            if ctx.same_set:
                (grad_query,) = backward_by_autograd(
                    lambda: _unfused_matrix(query, query, ctx.root, 0), (query,), grad
                )
                return grad_query, None, None, None, None
            inputs = (query if need_query else None, ref if need_ref else None)
            grads = backward_by_autograd(
                lambda: _unfused_matrix(query, ref, ctx.root, ctx.offset), inputs, grad
            )
            return *grads, None, None, None
        grad_query = out.new_empty(query.shape) if need_query else None
        grad_ref = out.new_zeros(ref.shape) if need_ref else None
        col_sum = out.new_zeros(out.shape[1]) if need_ref else None
        blocks = RowBlocks(*out.shape)
        for rows in blocks:
            weights = blocks.buffer("weights", out)
            row_sum = _distance_weights(grad[rows], out[rows], ctx, rows, weights)
            if need_query:
                torch.addmm(query[rows] * row_sum, weights, ref, alpha=-1, out=grad_query[rows])
            if need_ref:
                col_sum += weights.sum(dim=0)
                grad_ref.addmm_(weights.T, query[rows], alpha=-1)
        if need_ref:
            grad_ref.addcmul_(col_sum.unsqueeze(1), ref)
        return grad_query, grad_ref, None, None, None


def _unfused_matrix(query: Tensor, ref: Tensor, root: bool, offset: int | None) -> Tensor:
    """`_EuclideanMatrix` by plain differentiable steps (its backward under create_graph)."""
    squared = torch.addmm(ref.pow(2).sum(dim=1).unsqueeze(0), query, ref.T, alpha=-2)
    squared = squared.add(query.pow(2).sum(dim=1, keepdim=True)).clamp_min(0)
    if offset is not None:
        rows = torch.arange(len(query), device=query.device).unsqueeze(1) + offset
        squared = squared.masked_fill(rows == torch.arange(len(ref), device=ref.device), 0)
    return safe_sqrt(squared) if root else squared


def _distance_weights(grad: Tensor, block: Tensor, ctx, rows: slice, weights: Tensor) -> Tensor:
    """Fill `weights` with grad / d (root) or 2 grad (square), 0 where d = 0; return row sums.

    For the root, a zero distance makes grad / d infinite or NaN, which the row sums reveal:
    only then is the mask of zeros built. The diagonal of a set against itself (entries (i,
    i + offset) of a block of its rows) is exactly 0 and is cleared directly.
    """
    if ctx.root:
        torch.div(grad, block, out=weights)
    else:
        torch.mul(grad, 2, out=weights)
    if ctx.offset is not None:
        weights.diagonal(offset=rows.start + ctx.offset).zero_()
    if not ctx.root:
        weights.masked_fill_(block == 0, 0)
        return weights.sum(dim=1, keepdim=True)
    row_sum = weights.sum(dim=1, keepdim=True)
    if not bool(torch.isfinite(row_sum).all()):
        weights.masked_fill_(block == 0, 0)
        row_sum = weights.sum(dim=1, keepdim=True)
    return row_sum


def euclidean_matrix(query: Tensor, ref: Tensor) -> Tensor:
    """||q_i - r_j|| for all pairs: `safe_sqrt` of `squared_euclidean_matrix`, fused.

    Same values and gradients (0 at zero distance) as the unfused form, with one (N, M) array
    in forward and backward instead of one per elementwise step.
    """
    return _EuclideanMatrix.apply(query, ref, True, query is ref, 0 if query is ref else None)


def squared_euclidean_matrix(query: Tensor, ref: Tensor) -> Tensor:
    """||q_i - r_j||^2 for all pairs, by ||q||^2 + ||r||^2 - 2 q.r (one matmul), clamped at 0.

    The expansion loses precision for nearly coincident points (an absolute error of about
    sqrt(eps) ||q|| on the distance); the diagonal of a set against itself is set to 0.
    """
    return _EuclideanMatrix.apply(query, ref, False, query is ref, 0 if query is ref else None)


def cosine_matrix(query: Tensor, ref: Tensor) -> Tensor:
    """q_i . r_j of unit vectors; the diagonal of a set against itself is exactly 1."""
    similarity = query @ ref.T
    if query is ref:
        similarity.fill_diagonal_(1)
    return similarity


class BaseDistance(nn.Module):
    """A distance or similarity between the rows of two embedding sets.

    Subclasses define `compute_matrix(query, ref)` and `compute_pairwise(query, ref)` on
    already-normalised inputs and set `is_inverted` (larger means closer) and `is_metric`.
    """

    is_inverted: bool = False
    is_metric: bool = False

    def __init__(self, normalize_embeddings: bool = False) -> None:
        super().__init__()
        self.normalize_embeddings = normalize_embeddings

    def forward(self, query: Tensor, ref: Tensor | None = None) -> Tensor:
        """The (N, M) matrix between `query` (N, D) and `ref` (M, D); `ref` defaults to `query`."""
        same_set = ref is None or ref is query
        ref = query if ref is None else ref
        _check_same_width(query, ref)
        dtype = query.dtype
        query = self.normalize(_upcast(query))
        ref = query if same_set else self.normalize(_upcast(ref))
        return self.compute_matrix(query, ref).to(dtype)

    def pairwise_distance(self, query: Tensor, ref: Tensor) -> Tensor:
        """The (N,) vector between row i of `query` and row i of `ref`."""
        _check_same_width(query, ref)
        if query.shape[0] != ref.shape[0]:
            raise ValueError(
                f"pairwise_distance needs row-aligned inputs, got {query.shape[0]} and "
                f"{ref.shape[0]} rows"
            )
        dtype = query.dtype
        query, ref = self.normalize(_upcast(query)), self.normalize(_upcast(ref))
        return self.compute_pairwise(query, ref).to(dtype)

    def normalize(self, x: Tensor) -> Tensor:
        """Rows scaled to unit L2 norm (`safe_normalize`) when `normalize_embeddings` is set,
        else `x` unchanged."""
        return safe_normalize(x) if self.normalize_embeddings else x

    @property
    def sign(self) -> float:
        """The orientation: +1.0 for a distance (smaller is closer), -1.0 for a similarity
        (larger is closer); sign * value is a dissimilarity. Every loss reads its orientation
        from here, `as_dissimilarity`, `as_similarity` or `margin`."""
        return -1.0 if self.is_inverted else 1.0

    def margin(self, closer: Tensor | float, farther: Tensor | float) -> Tensor | float:
        """How far `closer` is from being closer than `farther`: `closer - farther` for a
        distance, `farther - closer` for a similarity. Positive means the order is violated."""
        return farther - closer if self.is_inverted else closer - farther

    def as_dissimilarity(self, matrix: Tensor) -> Tensor:
        """`matrix` turned so that smaller means closer: negated for similarities."""
        return -matrix if self.is_inverted else matrix

    def as_similarity(self, matrix: Tensor) -> Tensor:
        """`matrix` turned so that larger means closer: negated for distances."""
        return matrix if self.is_inverted else -matrix

    def compute_matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        raise NotImplementedError

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        raise NotImplementedError

    def compute_block(self, query: Tensor, ref: Tensor, rows: slice, same_set: bool) -> Tensor:
        """The rows `rows` of `compute_matrix(query, ref)`; `same_set` says that `ref` is
        `query`, so that entry (i, rows.start + i) is a row against itself."""
        return self.compute_matrix(query[rows], ref)

    def extra_repr(self) -> str:
        return f"normalize_embeddings={self.normalize_embeddings}"


def _upcast(x: Tensor) -> Tensor:
    """float16 and bfloat16 as float32 (cdist and several CPU kernels lack half support, and
    float32 keeps the distances of nearby points); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


NORMALIZE_EPS = 1e-12
"""Rows with a smaller L2 norm count as zero in `safe_normalize` (the eps of F.normalize)."""


def safe_normalize(x: Tensor) -> Tensor:
    """Rows of `x` scaled to unit L2 norm; rows of norm <= 1e-12 map to 0 with zero gradient.

    The values are those of `torch.nn.functional.normalize(x, dim=-1)` (x / max(||x||, eps)),
    which also maps a zero row to 0. Its gradient there is 1/eps = 1e12 times the incoming
    one, which made cosine losses return gradients of 1e10 to 1e13 on all-zero rows; here a
    row that small is a constant zero vector, as `safe_sqrt` takes the slope of sqrt at 0 as 0.

    Example:
        >>> safe_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    alive = norm > NORMALIZE_EPS
    return torch.where(alive, x / torch.where(alive, norm, 1), 0)


def _check_same_width(query: Tensor, ref: Tensor) -> None:
    if query.dim() != 2 or ref.dim() != 2:
        raise ValueError(
            f"distances take 2-D inputs (N, D) and (M, D), got shapes {tuple(query.shape)} "
            f"and {tuple(ref.shape)}"
        )
    if query.shape[1] != ref.shape[1]:
        raise ValueError(
            f"query has {query.shape[1]} features per row but ref has {ref.shape[1]}; "
            "both sets must be embedded in the same space"
        )


def _check_order(value: float, name: str) -> float:
    """`value` if it is a norm order > 0 (math.inf allowed, for Chebyshev); raise otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    value = check_finite(value, name)
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (math.inf for Chebyshev), got {value}")
    return value


class LpDistance(BaseDistance):
    """Minkowski distance raised to a power: (sum_k |a_k - b_k|^p)^(power / p).

    p=2, power=1 is the Euclidean distance; power=2 its square (FaceNet; survey eq. 1-2);
    p=1 the Manhattan and p=inf the Chebyshev distance. A metric for p >= 1 and power = 1.
    The p = 2 matrix uses one matmul; other p use `torch.cdist`.

    Args:
        p: order of the norm, > 0 (math.inf for the maximum norm).
        power: exponent applied to the norm, > 0.
        normalize_embeddings: scale rows to unit length first.
    """

    p = HyperParameter(_check_order)
    power = HyperParameter(check_positive)

    def __init__(self, p: float = 2.0, power: float = 1.0, normalize_embeddings: bool = False):
        super().__init__(normalize_embeddings)
        self.p, self.power = p, power

    @property
    def is_metric(self) -> bool:
        """A metric for p >= 1 and power = 1."""
        return self.p >= 1 and self.power == 1

    def compute_matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        if self.p == 2 and self.power == 2:
            return squared_euclidean_matrix(query, ref)
        if self.p == 2:
            return self._raise(euclidean_matrix(query, ref))
        return self._raise(torch.cdist(query, ref, p=self.p))

    def compute_block(self, query: Tensor, ref: Tensor, rows: slice, same_set: bool) -> Tensor:
        """As `compute_matrix` on query[rows]; the fused p = 2 form zeroes the entries of a
        row against itself exactly (so their gradient needs no mask of zeros)."""
        if self.p != 2:
            return super().compute_block(query, ref, rows, same_set)
        offset = rows.start if same_set else None
        matrix = _EuclideanMatrix.apply(query[rows], ref, self.power != 2, False, offset)
        return matrix if self.power == 2 else self._raise(matrix)

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        diff = query - ref
        if self.p == 2:
            return self._from_squared(diff.pow(2).sum(dim=1))
        if math.isinf(self.p):
            return self._raise(diff.abs().amax(dim=1))
        return self._raise(safe_root(diff.abs().pow(self.p).sum(dim=1), self.p))

    def _from_squared(self, squared: Tensor) -> Tensor:
        if self.power == 2:
            return squared
        return self._raise(safe_sqrt(squared))

    def _raise(self, norm: Tensor) -> Tensor:
        return norm if self.power == 1 else norm.pow(self.power)

    def extra_repr(self) -> str:
        return f"p={self.p}, power={self.power}, {super().extra_repr()}"


def safe_root(x: Tensor, p: float) -> Tensor:
    """x^(1/p) for x >= 0 with gradient 0 at x = 0."""
    if p == 2:
        return safe_sqrt(x)
    positive = x > 0
    return torch.where(positive, x.clamp_min(torch.finfo(x.dtype).tiny).pow(1 / p), 0)


class EuclideanDistance(LpDistance):
    """Euclidean (L2) distance ||a - b||_2, the default distance of every loss."""

    def __init__(self, normalize_embeddings: bool = False) -> None:
        super().__init__(p=2, power=1, normalize_embeddings=normalize_embeddings)


class SquaredEuclideanDistance(LpDistance):
    """Squared Euclidean distance ||a - b||_2^2 (FaceNet, Schroff et al. 2015). Not a metric."""

    def __init__(self, normalize_embeddings: bool = False) -> None:
        super().__init__(p=2, power=2, normalize_embeddings=normalize_embeddings)


class ManhattanDistance(LpDistance):
    """Manhattan (L1) distance sum_k |a_k - b_k|."""

    def __init__(self, normalize_embeddings: bool = False) -> None:
        super().__init__(p=1, power=1, normalize_embeddings=normalize_embeddings)


class ChebyshevDistance(LpDistance):
    """Chebyshev (L-inf) distance max_k |a_k - b_k|."""

    def __init__(self, normalize_embeddings: bool = False) -> None:
        super().__init__(p=math.inf, power=1, normalize_embeddings=normalize_embeddings)


class DotProductSimilarity(BaseDistance):
    """Dot product a.b, a similarity (larger is closer). Not normalised unless asked."""

    is_inverted = True

    def compute_matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        return query @ ref.T

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        return (query * ref).sum(dim=1)


class CosineSimilarity(DotProductSimilarity):
    """Cosine similarity a.b / (||a|| ||b||), a similarity in [-1, 1].

    Defined on unit vectors, so inputs are always normalised.
    """

    def __init__(self) -> None:
        super().__init__(normalize_embeddings=True)

    def compute_matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        return cosine_matrix(query, ref)


class CosineDistance(BaseDistance):
    """1 - cos(a, b) in [0, 2]. Not a metric: it breaks the triangle inequality (seed 000);
    use `MetricCosineDistance` for a metric. Always normalises its inputs."""

    def __init__(self) -> None:
        super().__init__(normalize_embeddings=True)

    def compute_matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        return 1 - cosine_matrix(query, ref)

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        return 1 - (query * ref).sum(dim=1)


class MetricCosineDistance(BaseDistance):
    """sqrt(1 - cos(a, b)), or the chord length sqrt(2 - 2 cos(a, b)) = ||a/|a| - b/|b|||_2.

    Seed 000: 1 - cos violates the triangle inequality; its square root is a metric (the
    chord length is the Euclidean distance between unit vectors, scaled). Always normalises.

    Args:
        chord: return sqrt(2 - 2 cos) (the Euclidean distance of unit vectors) instead of
            sqrt(1 - cos).
    """

    is_metric = True

    def __init__(self, chord: bool = False) -> None:
        super().__init__(normalize_embeddings=True)
        self.chord = chord
        self._scale = 2.0 if chord else 1.0

    def compute_matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        return safe_sqrt(self._scale * (1 - cosine_matrix(query, ref)))

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        return safe_sqrt(self._scale * (1 - (query * ref).sum(dim=1)))

    def extra_repr(self) -> str:
        return f"chord={self.chord}"


class MahalanobisDistance(BaseDistance):
    """Learnable Mahalanobis distance (a - b)^T M (a - b) with M = L^T L (survey §1.1).

    M is positive semi-definite by construction because only L (rank x embedding_dim) is
    learned; L starts as the identity (truncated when rank < embedding_dim). With
    `squared=False` the square root is returned, a pseudo-metric.

    Args:
        embedding_dim: D, the width of the embeddings.
        rank: number of rows of L (default D); a smaller rank learns a low-rank projection.
        squared: return (a - b)^T M (a - b) (default) or its square root.
    """

    embedding_dim = HyperParameter(check_count)

    def __init__(
        self,
        embedding_dim: int,
        rank: int | None = None,
        squared: bool = True,
        normalize_embeddings: bool = False,
    ) -> None:
        super().__init__(normalize_embeddings)
        embedding_dim = check_count(embedding_dim, "embedding_dim")
        rank = embedding_dim if rank is None else check_count(rank, "rank")
        self.embedding_dim = embedding_dim
        self.squared = squared
        self.is_metric = not squared
        self.projection = nn.Parameter(torch.eye(rank, embedding_dim))

    @property
    def metric_matrix(self) -> Tensor:
        """M = L^T L, (D, D), symmetric positive semi-definite."""
        return self.projection.T @ self.projection

    def compute_matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        self._check_dim(query)
        squared = squared_euclidean_matrix(self._project(query), self._project(ref))
        return squared if self.squared else safe_sqrt(squared)

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        self._check_dim(query)
        squared = (self._project(query) - self._project(ref)).pow(2).sum(dim=1)
        return squared if self.squared else safe_sqrt(squared)

    def _project(self, x: Tensor) -> Tensor:
        return x @ self.projection.to(x.dtype).T

    def _check_dim(self, x: Tensor) -> None:
        if x.shape[1] != self.embedding_dim:
            raise ValueError(
                f"MahalanobisDistance was built for embedding_dim={self.embedding_dim} but got "
                f"embeddings with {x.shape[1]} features"
            )

    def extra_repr(self) -> str:
        rank = self.projection.shape[0]
        return f"embedding_dim={self.embedding_dim}, rank={rank}, squared={self.squared}"


__all__ = [
    "BaseDistance",
    "ChebyshevDistance",
    "CosineDistance",
    "CosineSimilarity",
    "DotProductSimilarity",
    "EuclideanDistance",
    "LpDistance",
    "MahalanobisDistance",
    "ManhattanDistance",
    "MetricCosineDistance",
    "SquaredEuclideanDistance",
    "euclidean_matrix",
    "safe_normalize",
    "safe_sqrt",
    "squared_euclidean_matrix",
]
