"""Batch samplers for metric learning (SPEC §3, §8): P classes x K samples per batch.

Every anchor of a P x K batch has K - 1 positives and (P - 1) K negatives, which is what pair,
triplet and structured losses need. The sampler is a `batch_sampler`: it yields lists of
dataset indices, one list per batch. `DistributedPKBatchSampler` gives each process of a
torch.distributed job its share of the same global P x K batches.

    loader = DataLoader(dataset, batch_sampler=PKBatchSampler(labels, 16, 4))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from deepmetric._validation import HyperParameter, check_count


def _check_optional_count(value: object, name: str) -> int | None:
    return None if value is None else check_count(value, name)


def _check_seed(value: object, name: str) -> int:
    return check_count(value, name, minimum=0)


class PKBatchSampler(Sampler[list[int]]):
    """Batches of `classes_per_batch` (P) distinct classes, `samples_per_class` (K) items each.

    An epoch visits the classes in rounds: each round is a fresh random permutation of all
    classes, so every class appears equally often, and batches never repeat a class (the
    start of a round is reordered where it shares a batch with the end of the previous one).
    The r-th time a class is visited it gives the next K items of a per-epoch shuffle of its
    members, wrapping around, so all members are used evenly. Per epoch the work is a few
    vectorised NumPy passes over the items, fine for millions of them.

    Classes with fewer than K items: with `replacement=False` (default) they are left out
    (see `excluded_classes`), and a ValueError is raised if fewer than P classes remain;
    with `replacement=True` their items are repeated within the batch.

    Args:
        labels: class of each dataset item (integers or strings), length = len(dataset).
        classes_per_batch: P, distinct classes per batch.
        samples_per_class: K, items per class per batch.
        num_batches: batches per epoch; default: enough to visit every usable item about once.
        replacement: allow repeated items for classes smaller than K.
        seed: base seed; epoch e uses the seed (seed, e), so runs are reproducible.

    Example:
        >>> sampler = PKBatchSampler([0, 0, 1, 1, 2, 2], classes_per_batch=2, samples_per_class=2)
        >>> [len(batch) for batch in sampler]
        [4, 4]
    """

    classes_per_batch = HyperParameter(check_count)
    samples_per_class = HyperParameter(check_count)
    seed = HyperParameter(_check_seed)

    def __init__(
        self,
        labels: Sequence | np.ndarray,
        classes_per_batch: int,
        samples_per_class: int,
        num_batches: int | None = None,
        replacement: bool = False,
        seed: int = 0,
    ) -> None:
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.seed = seed
        num_batches = _check_optional_count(num_batches, "num_batches")
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
        classes, class_of_item, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        usable = sizes >= samples_per_class if not replacement else np.ones(len(sizes), bool)
        self.excluded_classes = classes[~usable]
        if usable.sum() < classes_per_batch:
            hint = (
                f"; {len(self.excluded_classes)} classes have fewer than {samples_per_class} "
                "items: pass replacement=True to use them"
                if len(self.excluded_classes)
                else ""
            )
            raise ValueError(
                f"classes_per_batch={classes_per_batch} but only {int(usable.sum())} classes "
                f"have at least {samples_per_class} items: lower classes_per_batch{hint}"
            )
        keep = usable[class_of_item]
        remap = np.cumsum(usable) - 1
        self._items = np.flatnonzero(keep)
        self._class_of_item = remap[class_of_item[keep]]
        self._sizes = sizes[usable]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)[:-1]])
        batch_size = classes_per_batch * samples_per_class
        self.num_batches = (
            max(1, -(-len(self._items) // batch_size)) if num_batches is None else num_batches
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields (for exact resumption)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._next_epoch()
        for batch in batches:
            yield batch.tolist()

    def _next_epoch(self) -> np.ndarray:
        """The (num_batches, P K) items of the current epoch; moves to the next epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        return self._epoch_batches(rng)

    def _epoch_batches(self, rng: np.random.Generator) -> np.ndarray:
        p, k = self.classes_per_batch, self.samples_per_class
        visits = self._class_sequence(rng, self.num_batches * p)
        # Members of each class, grouped by class, in a fresh random order within the class.
        members = self._items[np.lexsort((rng.random(len(self._items)), self._class_of_item))]
        # How many times each visited class was visited before in this epoch.
        order = np.argsort(visits, kind="stable")
        first_visit = np.searchsorted(visits[order], visits[order])
        previous = np.empty_like(visits)
        previous[order] = np.arange(len(visits)) - first_visit
        positions = (previous[:, None] * k + np.arange(k)) % self._sizes[visits][:, None]
        items = members[self._starts[visits][:, None] + positions]
        return items.reshape(self.num_batches, p * k)

    def _class_sequence(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """`length` class visits in rounds of random permutations, no class twice per batch."""
        num_classes, p = len(self._sizes), self.classes_per_batch
        rounds = [rng.permutation(num_classes)]
        total = num_classes
        while total < length:
            tail = rounds[-1][len(rounds[-1]) - total % p :] if total % p else rounds[-1][:0]
            following = rng.permutation(num_classes)
            clashes = np.isin(following, tail)
            rounds.append(following[np.argsort(clashes, kind="stable")])
            total += num_classes
        return np.concatenate(rounds)[:length]


class DistributedPKBatchSampler(PKBatchSampler):
    """This process's share of global P x K batches: its own classes, K items each.

    Every rank draws the same global batches as `PKBatchSampler` with the same arguments
    (one shared seed) and keeps a disjoint block of their classes: with W ranks, rank r
    keeps classes r P/W .. (r + 1) P/W - 1 of each batch (P need not be divisible by W: the
    first P mod W ranks keep one class more). So the global batch is P distinct classes x K
    items, no class is split across ranks, and the ranks' batches concatenated in rank order
    are exactly the batches of one process running `PKBatchSampler` (the single-process
    run it must equal). Resuming works as for `PKBatchSampler`: `set_epoch(e)`, then skip
    the batches already done.

    Args:
        labels, classes_per_batch (global P), samples_per_class (K), num_batches,
            replacement, seed: as for `PKBatchSampler`, identical on every rank.
        num_replicas: W, the number of ranks (default: torch.distributed's world size, 1
            when it is not initialised).
        rank: this rank, 0 <= rank < W (default: torch.distributed's rank).

    Example:
        >>> labels, Sampler = [0, 0, 1, 1, 2, 2, 3, 3], DistributedPKBatchSampler
        >>> ranks = [Sampler(labels, 3, 2, num_replicas=2, rank=r) for r in (0, 1)]
        >>> whole = list(PKBatchSampler(labels, 3, 2))
        >>> [a + b for a, b in zip(*ranks)] == whole
        True
    """

    def __init__(
        self,
        labels: Sequence | np.ndarray,
        classes_per_batch: int,
        samples_per_class: int,
        num_batches: int | None = None,
        replacement: bool = False,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            labels, classes_per_batch, samples_per_class, num_batches, replacement, seed
        )
        if num_replicas is None or rank is None:
            from deepmetric.distributed import rank_and_world_size

            default_rank, default_world = rank_and_world_size()
            num_replicas = default_world if num_replicas is None else num_replicas
            rank = default_rank if rank is None else rank
        self.num_replicas = check_count(num_replicas, "num_replicas")
        if self.num_replicas > self.classes_per_batch:
            raise ValueError(
                f"classes_per_batch={self.classes_per_batch} is the global P, split over "
                f"num_replicas={self.num_replicas} ranks: each rank needs at least one class; "
                f"set classes_per_batch >= {self.num_replicas}"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an integer in [0, {num_replicas}), got {rank!r}")
        self.rank = rank
        share, extra = divmod(self.classes_per_batch, self.num_replicas)
        first = rank * share + min(rank, extra)
        # The positions, among each global batch's P classes, of this rank's classes.
        self.classes = slice(first, first + share + (rank < extra))

    def _next_epoch(self) -> np.ndarray:
        batches = super()._next_epoch()
        blocks = batches.reshape(len(batches), self.classes_per_batch, self.samples_per_class)
        return blocks[:, self.classes].reshape(len(batches), -1)


__all__ = ["DistributedPKBatchSampler", "PKBatchSampler"]
