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

import functools

import torch
from torch import Tensor

from deepmetric._validation import CheckedBatch, check_batch, check_labels
from deepmetric.blocks import PASS_BLOCK_ELEMENTS, row_blocks
from deepmetric.tuples import PositiveLists

__all__ = [
    "Relation",
    "build_relation",
    "check_class_labels",
    "check_ids",
    "check_pair_batch",
    "drop_same_items",
]


def check_class_labels(
    labels: object, num_rows: int, name: str, rows_name: str, multi_hot: bool = False
) -> Tensor:
    """`labels` as int64 class ids if it is a 1-D tensor of any integer dtype or bool with
    `num_rows` entries, or (with `multi_hot`) as a bool (N, L) label-set matrix if it is 2-D
    of bool or 0/1 integers; raise a TypeError or ValueError naming `name` otherwise."""
    if multi_hot and isinstance(labels, Tensor) and labels.dim() == 2:
        return _check_multi_hot(labels, num_rows, name, rows_name)
    return check_labels(labels, num_rows, name, rows_name).long()


def _check_multi_hot(labels: Tensor, num_rows: int, name: str, rows_name: str) -> Tensor:
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"{name} is 2-D of dtype {labels.dtype}: labels are 1-D class ids or a 2-D multi-hot "
            "(N, L) matrix of bool or 0/1 integers; use labels.bool() for label sets"
        )
    if len(labels) != num_rows:
        raise ValueError(f"{name} has {len(labels)} rows but {rows_name} has {num_rows} rows")
    if labels.dtype != torch.bool:
        if bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError(
                f"{name} is a multi-hot (N, L) matrix, so its entries must be 0 or 1; map "
                "class ids to label sets first (torch.nn.functional.one_hot)"
            )
        labels = labels.bool()
    return labels


def check_relevance(relevance: object, num_query: int, num_ref: int, device) -> Tensor:
    """`relevance` if it is an (N, M) tensor of bool or finite non-negative numbers (a pair is
    positive where it is > 0); raise a TypeError or ValueError naming it otherwise."""
    if not isinstance(relevance, Tensor) or relevance.dim() != 2:
        raise TypeError(
            "relevance must be a 2-D torch.Tensor (N, M): one row per embedding, one column per "
            "reference row (the batch itself without ref_emb), > 0 where the pair is positive"
        )
    if tuple(relevance.shape) != (num_query, num_ref):
        raise ValueError(
            f"relevance has shape {tuple(relevance.shape)} but the batch and the reference set "
            f"have {num_query} and {num_ref} rows; pass an ({num_query}, {num_ref}) matrix"
        )
    if relevance.is_complex():
        raise TypeError("relevance must be bool, integer or floating, not complex")
    if relevance.dtype != torch.bool:
        if relevance.is_floating_point() and not bool(torch.isfinite(relevance).all()):
            raise ValueError("relevance contains NaN or inf; pass finite values >= 0")
        if bool((relevance < 0).any()):
            raise ValueError("relevance must be >= 0 (0: not relevant, > 0: positive pair)")
    if relevance.device != device:
        raise ValueError(f"relevance is on {relevance.device} but embeddings on {device}")
    return relevance


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
    relevance: Tensor | None = None,
) -> tuple[CheckedBatch, tuple[Tensor, Tensor] | None]:
    """Check the inputs of a pair-based loss or miner once: the batch and its reference set
    (upcast from half precision), labels as int64 class ids or bool multi-hot (N, L) sets,
    the item ids (`check_ids`) and an explicit `relevance` (`check_relevance`). Labels may
    be missing when `labels_optional` (a loss given an indices_tuple) or with `relevance`."""
    labels_optional = labels_optional or relevance is not None
    check_label = functools.partial(check_class_labels, multi_hot=True)
    batch = check_batch(embeddings, labels, ref_emb, ref_labels, labels_optional, check_label)
    labels, ref_labels = batch.labels, batch.ref_labels
    if labels is not None and ref_labels is not None and ref_labels.shape[1:] != labels.shape[1:]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} and ref_labels {tuple(ref_labels.shape)}"
            ": both must be class ids (1-D) or label sets over the same L labels (N, L)"
        )
    num_query, num_ref = len(batch.embeddings), len(batch.ref_emb)
    device = batch.embeddings.device
    ids = check_ids(query_ids, ref_ids, num_query, num_ref, batch.ref_is_query, device)
    if relevance is not None:
        check_relevance(relevance, num_query, num_ref, device)
    return batch, ids


class Relation:
    """Positive and negative pairs of a batch (N rows) against its reference set (M rows).

    Built by `build_relation` from class ids, multi-hot label sets or an explicit relevance
    matrix, and from the item ids. Nothing of size N x K or N x M is stored: the lists and
    masks of a block of query rows are made when asked for, in O(rows x K) from the class
    table (class ids) or O(rows x M) from the labels (multi-hot, relevance); only the (N,)
    counts are kept.

    - `positive_rows(rows)` / `non_negative_rows(rows)`: (R, K) column lists, valid slots
      first (non-negatives: related, or the same item);
    - `positive_mask(rows)`, `negative_mask(rows)`, `non_negative_mask(rows)`, `pair_mask(rows)`:
      dense (R, M) masks;
    - `positive_weights(rows, lists)`: (R, K) weights of the listed positives (1 for class
      ids; the Jaccard overlap |A & B| / |A | B| for multi-hot; the relevance values);
    - `positive_count`, `num_negatives`: (N,) counts; `positives`: the lists of every row.
    """

    def __init__(
        self,
        num_query: int,
        num_ref: int,
        ids: tuple[Tensor, Tensor] | None,
        device: torch.device,
        *,
        classes: tuple[Tensor, Tensor] | None = None,
        multi_hot: tuple[Tensor, Tensor] | None = None,
        relevance: Tensor | None = None,
        own_rows: bool = False,
    ) -> None:
        self.num_query, self.num_ref, self.ids, self.device = num_query, num_ref, ids, device
        self.own_rows = own_rows  # the default ids of a batch against itself: arange(N)
        self._multi_hot, self._relevance = multi_hot, relevance
        self._labels = None
        self._global: dict[str, PositiveLists] = {}
        if classes is not None:
            self._init_classes(*classes)
        else:
            self._init_dense()

    # -- class ids: a table of each class's reference rows ------------------------------------

    def _init_classes(self, labels: Tensor, ref_labels: Tensor) -> None:
        self._labels = (labels, ref_labels)
        classes, class_of_ref = torch.unique(ref_labels, return_inverse=True)
        sizes = torch.bincount(class_of_ref, minlength=len(classes))
        self._order = torch.argsort(class_of_ref, stable=True)
        slot = torch.searchsorted(classes, labels).clamp_max(len(classes) - 1)
        present = classes[slot] == labels
        self._size = torch.where(present, sizes[slot], 0)
        self._start = (torch.cumsum(sizes, 0) - sizes)[slot]
        self.num_negatives = self.num_ref - self._size
        equal_ids = 0
        if self.own_rows:  # row i against row i: one same-item column in the row's class
            equal_ids = 1
        elif self.ids is not None:
            equal_ids = _check_same_item_same_label(*self.ids, labels, ref_labels)
        self.positive_count = self._size - equal_ids

    def _class_rows(self, rows: slice) -> PositiveLists:
        size = self._size[rows]
        width = max(int(size.max()) if len(size) else 0, 1)
        slot = torch.arange(width, device=self.device)
        valid = slot < size.unsqueeze(1)
        place = (self._start[rows].unsqueeze(1) + slot).clamp_max(self.num_ref - 1)
        index = self._order[place].masked_fill_(~valid, 0)
        return PositiveLists(index, valid, size)

    # -- multi-hot labels or relevance: dense blocks ------------------------------------------

    def _init_dense(self) -> None:
        self.positive_count = torch.zeros(self.num_query, dtype=torch.long, device=self.device)
        non_negative = torch.zeros_like(self.positive_count)
        if self.ids is not None and self._multi_hot is not None:
            query_hot, ref_hot = self._multi_hot
            _check_same_item_same_label(*self.ids, query_hot, ref_hot)
        for rows in self.row_blocks():
            related, excluded = self._related(rows), self._excluded(rows)
            if excluded is None:
                self.positive_count[rows] = related.sum(dim=1)
                non_negative[rows] = self.positive_count[rows]
            else:
                self.positive_count[rows] = (related & ~excluded).sum(dim=1)
                non_negative[rows] = (related | excluded).sum(dim=1)
        self.num_negatives = self.num_ref - non_negative

    def _related(self, rows: slice) -> Tensor:
        if self._labels is not None:
            labels, ref_labels = self._labels
            return labels[rows].unsqueeze(1) == ref_labels.unsqueeze(0)
        if self._relevance is not None:
            return self._relevance[rows] > 0
        return self._overlap(rows) > 0

    def _overlap(self, rows: slice) -> Tensor:
        query_hot, ref_hot = self._multi_hot
        return query_hot[rows] @ ref_hot.T

    def _excluded(self, rows: slice) -> Tensor | None:
        if self.ids is None:
            return None
        query_ids, ref_ids = self.ids
        return query_ids[rows].unsqueeze(1) == ref_ids.unsqueeze(0)

    def row_blocks(self):
        """Slices of query rows whose (rows, M) masks are built one at a time."""
        return row_blocks(self.num_query, self.num_ref, PASS_BLOCK_ELEMENTS)

    # -- what the losses and miners read ------------------------------------------------------

    def positive_rows(self, rows: slice) -> PositiveLists:
        """The positive columns of the query rows in `rows`, as (R, K) lists."""
        if self._labels is None:
            return _lists(self.positive_mask(rows))
        return self._without_same_items(self._class_rows(rows), rows)

    def _without_same_items(self, lists: PositiveLists, rows: slice) -> PositiveLists:
        if self.ids is None:
            return lists
        query_ids, ref_ids = self.ids
        valid = lists.valid & (ref_ids[lists.index] != query_ids[rows].unsqueeze(1))
        return PositiveLists(lists.index, valid, self.positive_count[rows])

    def non_negative_rows(self, rows: slice) -> PositiveLists:
        """The columns that are not negatives (related, or the same item) of the rows in
        `rows`, as (R, S) lists."""
        if self._labels is None:
            return _lists(self.non_negative_mask(rows))
        return self._class_rows(rows)

    def block_lists(self, rows: slice) -> tuple[PositiveLists, tuple[Tensor, Tensor]]:
        """`positive_rows(rows)` and `same_columns(rows)` at once (one class-table read)."""
        if self._labels is None:
            return self.positive_rows(rows), self.same_columns(rows)
        same = self._class_rows(rows)
        columns = (torch.where(same.valid, same.index, same.index[:, :1]), same.count > 0)
        return self._without_same_items(same, rows), columns

    def same_columns(self, rows: slice) -> tuple[Tensor, Tensor]:
        """(R, S) non-negative columns of `rows` whose invalid slots repeat a valid one, and
        (R,) whether a row has any (see `deepmetric.triplet_counting.fill_same_label_`)."""
        index, valid, count = self.non_negative_rows(rows)
        return torch.where(valid, index, index[:, :1]), count > 0

    def positive_mask(self, rows: slice) -> Tensor:
        """(R, M) dense mask of the positive pairs of the rows in `rows`."""
        related, excluded = self._related(rows), self._excluded(rows)
        return related if excluded is None else related & ~excluded

    def non_negative_mask(self, rows: slice) -> Tensor:
        """(R, M) mask of the entries that are not negative pairs."""
        related = self._related(rows)
        if self._labels is not None:  # same item implies same class (checked): related
            return related
        excluded = self._excluded(rows)
        return related if excluded is None else related | excluded

    def negative_mask(self, rows: slice) -> Tensor:
        """(R, M) dense mask of the negative pairs of the rows in `rows`."""
        if self._labels is not None:
            labels, ref_labels = self._labels
            return labels[rows].unsqueeze(1) != ref_labels.unsqueeze(0)
        return ~self.non_negative_mask(rows)

    def pair_mask(self, rows: slice) -> Tensor | None:
        """(R, M) mask of every pair, positive or negative (not the same item); None when
        that is every entry."""
        excluded = self._excluded(rows)
        return None if excluded is None else ~excluded

    def positive_weights(self, rows: slice, lists: PositiveLists) -> Tensor:
        """(R, K) float64 weight of each listed positive: 1 for class ids, the Jaccard overlap
        for multi-hot labels, the relevance value for a relevance matrix; 0 in invalid slots."""
        if self._relevance is not None:
            weights = self._relevance[rows].gather(1, lists.index).to(torch.float64)
        elif self._multi_hot is not None:
            query_hot, ref_hot = self._multi_hot
            shared = self._overlap(rows).gather(1, lists.index).double()
            sizes = query_hot[rows].sum(dim=1, keepdim=True) + ref_hot.sum(dim=1)[lists.index]
            weights = shared / (sizes.double() - shared).clamp_min(1)
        else:
            weights = lists.valid.to(torch.float64)
        return weights * lists.valid

    @property
    def positives(self) -> PositiveLists:
        """The positive lists of every query row (N, K); for miners, whose output has one
        entry per positive pair anyway."""
        if "positives" not in self._global:
            self._global["positives"] = self.positive_rows(slice(0, self.num_query))
        return self._global["positives"]

    @property
    def from_class_ids(self) -> bool:
        """Whether the positives come from class ids, whose lists are as wide as the largest
        class of the rows (multi-hot labels and relevance: as wide as a row's positives)."""
        return self._labels is not None

    def num_pairs(self) -> Tensor:
        """(N,) number of pairs (positive or negative) of each query row."""
        return self.positive_count + self.num_negatives


def _lists(mask: Tensor) -> PositiveLists:
    """(R, K) lists of the True columns of each row of `mask`, valid slots first."""
    count = mask.sum(dim=1)
    width = max(int(count.max()) if len(count) else 0, 1)
    index = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
    index = index[:, :width]
    valid = torch.arange(width, device=mask.device) < count.unsqueeze(1)
    return PositiveLists(index.masked_fill_(~valid, 0), valid, count)


def _check_same_item_same_label(
    query_ids: Tensor, ref_ids: Tensor, labels: Tensor, ref_labels: Tensor
) -> Tensor:
    """(N,) how many reference rows carry each query row's id; raise a ValueError if two
    rows with equal ids carry different labels. O((N + M) log M + number of such pairs)."""
    order = torch.argsort(ref_ids)
    ordered = ref_ids[order]
    lower = torch.searchsorted(ordered, query_ids)
    count = torch.searchsorted(ordered, query_ids, right=True) - lower
    query_row = torch.repeat_interleave(torch.arange(len(query_ids), device=count.device), count)
    offset = (
        torch.arange(len(query_row), device=count.device)
        - (torch.cumsum(count, 0) - count)[query_row]
    )
    ref_row = order[lower[query_row] + offset]
    differ = labels[query_row] != ref_labels[ref_row]
    if differ.dim() > 1:
        differ = differ.any(dim=1)
    if bool(differ.any()):
        raise ValueError(
            "rows with equal query_ids/ref_ids are the same item but carry different labels; "
            "give each item one id and one label"
        )
    return count


def build_relation(
    labels: Tensor | None,
    ref_labels: Tensor | None,
    num_ref: int,
    ids: tuple[Tensor, Tensor] | None = None,
    ref_is_query: bool = True,
    relevance: Tensor | None = None,
) -> Relation:
    """The `Relation` of `labels` against `ref_labels` (class ids (N,) and (M,), or multi-hot
    (N, L) and (M, L)), or of an explicit `relevance` (N, M); pairs of equal ids are never
    paired (without ids: row i against row i when `ref_is_query`, else nothing).

    Class ids cost O((N + M) log M) here; multi-hot labels and relevance one pass of
    O(N M) (times L for multi-hot) to count each row's positives and negatives. Rows with
    equal ids are the same item, so they must carry the same labels (a ValueError otherwise).
    """
    num_query = len(labels) if relevance is None else len(relevance)
    device = (labels if relevance is None else relevance).device
    own_rows = ids is None and ref_is_query
    if own_rows:
        own = torch.arange(num_query, device=device)
        ids = (own, own)
    if relevance is not None:
        return Relation(num_query, num_ref, ids, device, relevance=relevance)
    if labels.dim() == 2:
        work = torch.float32 if labels.shape[1] < 1 << 24 else torch.float64
        hot = (labels.to(work), ref_labels.to(work))
        return Relation(num_query, num_ref, ids, device, multi_hot=hot)
    return Relation(
        num_query, num_ref, ids, device, classes=(labels, ref_labels), own_rows=own_rows
    )


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
