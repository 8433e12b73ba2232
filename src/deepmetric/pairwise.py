"""Which (query, reference) pairs of a batch are positives, negatives, or neither.

Every pair, triplet and structured loss and every miner reads its pairs from one `Relation`,
built once per call from the labels and the identities of the rows:

- a positive pair (i, j) is related (same class id) and not the same item;
- a negative pair is unrelated and not the same item;
- a pair of the same item (equal ids) is neither.

Identities: `query_ids` (N,) and `ref_ids` (M,) name the item of each row of the batch and
of the reference set; rows with equal ids are the same item and are never paired. When the
batch is its own reference set and no ids are given, row i is the same item as row i only
(ids = arange(N)); with a separate reference set and no ids, nothing is excluded. This is
what a distributed loss in local-anchor mode needs (the rank's rows against the gathered
batch, ids = global row numbers) and what cross-batch memory needs (a batch never paired
with its own stale copies).

A `Relation` stores each row's positives and each row's non-negatives (related or same item)
as padded (N, K) column lists (`PositiveLists`), so that a row's few same-class entries can
be read with `gather` and cleared with one small `scatter`, and dense (rows, M) masks are
built one block of rows at a time (`positive_mask`, `negative_mask`, `pair_mask`).

Example:
    >>> import torch
    >>> relation = build_relation(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 3)
    >>> relation.negative_mask(slice(0, 3))
    tensor([[False, False,  True],
            [False, False,  True],
            [ True,  True, False]])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from deepmetric._validation import CheckedBatch, check_batch, check_same_device
from deepmetric.tuples import PositiveLists, positive_lists

__all__ = [
    "Relation",
    "build_relation",
    "check_class_labels",
    "check_ids",
    "check_pair_batch",
    "drop_same_items",
]


def check_class_labels(labels: object, num_rows: int, name: str, rows_name: str) -> Tensor:
    """`labels` as int64 class ids if it is a 1-D tensor of any integer dtype or bool with
    `num_rows` entries; raise a TypeError or ValueError naming `name` otherwise."""
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"{name} must be a 1-D torch.Tensor of integer class ids, got {type(labels)!r}"
        )
    if labels.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (one class id per row), got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{name} has dtype {labels.dtype}; class labels must be integers or bool "
            "(use labels.long(), or map class names to ids first)"
        )
    if len(labels) != num_rows:
        raise ValueError(f"{name} has {len(labels)} entries but {rows_name} has {num_rows} rows")
    return labels.long()


def check_ids(
    query_ids: Tensor | None,
    ref_ids: Tensor | None,
    num_query: int,
    num_ref: int,
    ref_is_query: bool,
    device: torch.device,
) -> tuple[Tensor, Tensor] | None:
    """The item ids of the batch and of the reference set, as int64, or None when none is given.

    None means the default exclusion: each row against itself when the batch is its own
    reference set (`build_relation` with `ref_is_query`), nothing otherwise. `query_ids`
    alone, with no `ref_emb`, serves for both sets; with a separate reference set both or
    neither must be given.
    """
    for name, ids, rows, rows_name in (
        ("query_ids", query_ids, num_query, "embeddings"),
        ("ref_ids", ref_ids, num_ref, "ref_emb" if not ref_is_query else "embeddings"),
    ):
        if ids is None:
            continue
        if not isinstance(ids, Tensor) or ids.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor (one item id per row)")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} has dtype {ids.dtype}; item ids must be integers")
        if len(ids) != rows:
            raise ValueError(f"{name} has {len(ids)} entries but {rows_name} has {rows} rows")
        if ids.device != device:
            raise ValueError(f"{name} is on {ids.device} but embeddings on {device}; move it")
    if query_ids is None and ref_ids is None:
        return None
    if ref_is_query:
        if query_ids is not None and ref_ids is not None and not torch.equal(query_ids, ref_ids):
            raise ValueError(
                "without ref_emb the batch is its own reference set, so query_ids and ref_ids "
                "must be equal; pass query_ids only"
            )
        ids = (query_ids if query_ids is not None else ref_ids).long()
        return ids, ids
    if query_ids is None or ref_ids is None:
        missing = "query_ids" if query_ids is None else "ref_ids"
        raise ValueError(
            f"{missing} is missing: with ref_emb, pass both query_ids and ref_ids (to exclude "
            "pairs of the same item) or neither"
        )
    return query_ids.long(), ref_ids.long()


def check_pair_batch(
    embeddings: Tensor,
    labels: Tensor | None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    labels_optional: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
) -> tuple[CheckedBatch, tuple[Tensor, Tensor] | None]:
    """Check the inputs of a pair-based loss or miner once: the batch and its reference set
    (upcast from half precision), labels as int64 class ids, and the item ids (`check_ids`).
    Labels may be missing only when `labels_optional` (a loss given an indices_tuple)."""
    if labels is None and not labels_optional:
        raise ValueError("labels are required (a 1-D integer tensor, one class id per row)")
    if ref_labels is not None and ref_emb is None:
        raise ValueError("ref_labels was given without ref_emb; pass both or neither")
    batch = check_batch(embeddings, None, ref_emb, None, labels_optional=True)
    if ref_emb is not None and ref_labels is None and not labels_optional:
        raise ValueError("ref_emb needs ref_labels, one class id per reference row")
    if labels is not None:
        labels = check_class_labels(labels, len(batch.embeddings), "labels", "embeddings")
    if ref_labels is not None:
        ref_labels = check_class_labels(ref_labels, len(batch.ref_emb), "ref_labels", "ref_emb")
    check_same_device(embeddings=embeddings, labels=labels, ref_labels=ref_labels)
    num_query, num_ref = len(batch.embeddings), len(batch.ref_emb)
    device = batch.embeddings.device
    ids = check_ids(query_ids, ref_ids, num_query, num_ref, batch.ref_is_query, device)
    ref_labels = labels if batch.ref_is_query else ref_labels
    return batch._replace(labels=labels, ref_labels=ref_labels), ids


class Relation(NamedTuple):
    """Positive and non-negative pairs of a batch against its reference set.

    `positives`: each query row's positive columns (N, K). `non_negatives`: each row's
    columns that are not negatives (related, or the same item), valid slots first.
    `num_negatives`: (N,) negatives per row. `ids`: (query_ids, ref_ids) or None.
    """

    positives: PositiveLists
    non_negatives: PositiveLists
    num_negatives: Tensor
    ids: tuple[Tensor, Tensor] | None
    num_ref: int

    def same_columns(self) -> tuple[Tensor, Tensor]:
        """(N, S) non-negative columns whose invalid slots repeat a valid one, and (N,)
        whether a row has any (see `deepmetric.triplet_counting.fill_same_label_`)."""
        index, valid, count = self.non_negatives
        return torch.where(valid, index, index[:, :1]), count > 0

    def positive_rows(self, rows: slice) -> PositiveLists:
        """The positive lists of the query rows in `rows`."""
        lists = self.positives
        return PositiveLists(lists.index[rows], lists.valid[rows], lists.count[rows])

    def _scatter(self, lists: PositiveLists, rows: slice) -> Tensor:
        index = lists.index[rows].masked_fill(~lists.valid[rows], self.num_ref)
        mask = torch.zeros(len(index), self.num_ref + 1, dtype=torch.bool, device=index.device)
        return mask.scatter_(1, index, True)[:, : self.num_ref]

    def positive_mask(self, rows: slice) -> Tensor:
        """(rows, M) dense mask of the positive pairs of the rows in `rows`."""
        return self._scatter(self.positives, rows)

    def negative_mask(self, rows: slice) -> Tensor:
        """(rows, M) dense mask of the negative pairs of the rows in `rows`."""
        return ~self._scatter(self.non_negatives, rows)

    def non_negative_mask(self, rows: slice) -> Tensor:
        """(rows, M) mask of the entries that are not negative pairs."""
        return self._scatter(self.non_negatives, rows)

    def pair_mask(self, rows: slice) -> Tensor | None:
        """(rows, M) mask of every pair, positive or negative (not the same item); None when
        that is every entry."""
        if self.ids is None:
            return None
        query_ids, ref_ids = self.ids
        return query_ids[rows].unsqueeze(1) != ref_ids.unsqueeze(0)

    def num_pairs(self) -> Tensor:
        """(N,) number of pairs (positive or negative) of each query row."""
        return self.positives.count + self.num_negatives


def _equal_id_counts(query_ids: Tensor, ref_ids: Tensor) -> Tensor:
    """(N,) how many reference rows carry each query row's id, by sort and binary search."""
    ordered = torch.sort(ref_ids).values
    upper = torch.searchsorted(ordered, query_ids, right=True)
    return upper - torch.searchsorted(ordered, query_ids)


def build_relation(
    labels: Tensor,
    ref_labels: Tensor,
    num_ref: int,
    ids: tuple[Tensor, Tensor] | None = None,
    ref_is_query: bool = True,
) -> Relation:
    """The `Relation` of class ids `labels` (N,) against `ref_labels` (M,), excluding the
    pairs of equal ids (without ids: row i against row i when `ref_is_query`, else nothing);
    O((N + M) log M + N K) for K the largest class size.

    Rows with equal ids are the same item, so they must carry the same class id; a ValueError
    says so otherwise.
    """
    if ids is None and ref_is_query:
        own = torch.arange(len(labels), device=labels.device)
        ids = (own, own)
    same = positive_lists(labels, ref_labels, ref_is_query=False)
    valid = same.valid
    if ids is not None:
        query_ids, ref_ids = ids
        is_self = valid & (ref_ids[same.index] == query_ids.unsqueeze(1))
        if not torch.equal(is_self.sum(dim=1), _equal_id_counts(query_ids, ref_ids)):
            raise ValueError(
                "rows with equal query_ids/ref_ids are the same item but carry different labels; "
                "give each item one id and one label"
            )
        valid = valid & ~is_self
    positives = PositiveLists(same.index, valid, valid.sum(dim=1))
    return Relation(positives, same, num_ref - same.count, ids, num_ref)


def drop_same_items(
    pairs: tuple[Tensor, ...], ids: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, ...]:
    """Mined pairs (a1, p, a2, n) or triplets (a, p, n) without those that pair two rows of
    the same item (equal ids); unchanged when `ids` is None."""
    if ids is None:
        return pairs
    query_ids, ref_ids = ids
    if len(pairs) == 3:
        anchor, positive, negative = pairs
        keep = (query_ids[anchor] != ref_ids[positive]) & (query_ids[anchor] != ref_ids[negative])
        return anchor[keep], positive[keep], negative[keep]
    anchor1, positive, anchor2, negative = pairs
    keep_pos = query_ids[anchor1] != ref_ids[positive]
    keep_neg = query_ids[anchor2] != ref_ids[negative]
    return anchor1[keep_pos], positive[keep_pos], anchor2[keep_neg], negative[keep_neg]
