"""Cross-batch memory (Wang, Zhang, Huang & Scott 2020, "Cross-Batch Memory for Embedding
Learning"; SPEC §8): the embeddings of recent batches as extra references.

Embeddings drift slowly once training has warmed up, so the embeddings of the last few
batches are still good stand-ins for the current ones. `CrossBatchMemory` keeps a queue of
the last `memory_size` rows (detached embeddings, labels and item ids); `CrossBatchMemoryLoss`
computes any pair, triplet or structured loss (and its miner) of the batch's anchors against
the batch followed by the memory, so each anchor meets thousands of pairs per step for the
cost of a batch.

- Warm-up: during the first `warmup_steps` calls the memory is neither used nor filled (the
  paper starts it after 1k iterations, when the features have stopped moving fast).
- Identity: rows are the same item when their ids are equal (pass dataset indices as `ids`).
  An anchor is never paired with a row of the same id, so the batch's rows never meet their
  own stale copies from earlier batches. Without ids every row is a new item.
- Several processes: under `deepmetric.distributed.DistributedLoss` every rank enqueues the
  gathered global batch in rank order, so the memory is identical on every rank.
- Checkpoints: the queue is made of buffers, so `state_dict()` / `load_state_dict()` carry it
  and a resumed run continues exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepmetric._validation import HyperParameter, check_count, check_labels

__all__ = ["CrossBatchMemory", "CrossBatchMemoryLoss"]


def _check_steps(value: object, name: str) -> int:
    return check_count(value, name, minimum=0)


class CrossBatchMemory(nn.Module):
    """A first-in first-out queue of the last `memory_size` rows: embeddings, labels, ids.

    Args:
        memory_size: M, rows kept (the paper uses M of a few thousand up to the data set size).
        embedding_dim: D, the width of the embeddings.
        warmup_steps: calls of the loss before the memory is used and filled.

    Example:
        >>> memory = CrossBatchMemory(memory_size=3, embedding_dim=2)
        >>> memory.enqueue(torch.ones(2, 2), torch.tensor([0, 1]), torch.tensor([10, 11]))
        >>> memory.enqueue(torch.zeros(2, 2), torch.tensor([2, 3]), torch.tensor([12, 13]))
        >>> memory.contents()[2].tolist()  # oldest first; row 10 was pushed out
        [11, 12, 13]
    """

    memory_size = HyperParameter(check_count)
    embedding_dim = HyperParameter(check_count)
    warmup_steps = HyperParameter(_check_steps)

    def __init__(self, memory_size: int, embedding_dim: int, warmup_steps: int = 0) -> None:
        super().__init__()
        self.memory_size, self.embedding_dim = memory_size, embedding_dim
        self.warmup_steps = warmup_steps
        self.register_buffer("embeddings", torch.zeros(memory_size, embedding_dim))
        self.register_buffer("labels", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("ids", torch.zeros(memory_size, dtype=torch.long))
        counters = ("head", "filled", "steps", "issued")
        for name in counters:  # next row to write, rows in use, calls so far, ids handed out
            self.register_buffer(name, torch.zeros((), dtype=torch.long))

    @property
    def active(self) -> bool:
        """Whether the warm-up is over (the memory is used and filled from this call on)."""
        return int(self.steps) >= self.warmup_steps

    def __len__(self) -> int:
        return int(self.filled)

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """The stored (embeddings, labels, ids), oldest row first."""
        filled, head = int(self.filled), int(self.head)
        order = torch.arange(filled, device=self.ids.device)
        if filled == self.memory_size:
            order = (order + head) % self.memory_size
        return self.embeddings[order], self.labels[order], self.ids[order]

    def enqueue(self, embeddings: Tensor, labels: Tensor, ids: Tensor) -> None:
        """Append rows (detached), dropping the oldest beyond `memory_size`."""
        check_labels(labels, len(embeddings))
        check_labels(ids, len(embeddings), "ids")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must be (N, {self.embedding_dim}) to enter this memory, got "
                f"shape {tuple(embeddings.shape)}; build the memory with embedding_dim="
                f"{embeddings.shape[-1]}"
            )
        size, keep = self.memory_size, min(len(embeddings), self.memory_size)
        rows = (int(self.head) + len(embeddings) - keep + torch.arange(keep)) % size
        rows = rows.to(self.ids.device)
        with torch.no_grad():
            self.embeddings[rows] = embeddings[-keep:].detach().to(self.embeddings)
            self.labels[rows] = labels[-keep:].to(self.labels)
            self.ids[rows] = ids[-keep:].to(self.ids)
            self.head.fill_((int(self.head) + len(embeddings)) % size)
            self.filled.fill_(min(int(self.filled) + len(embeddings), size))

    def fresh_ids(self, count: int) -> Tensor:
        """`count` ids that no row had before (negative, so they never equal dataset
        indices); they are part of the state, so a resumed run hands out the same ones."""
        start = int(self.issued)
        self.issued.fill_(start + count)
        return -1 - start - torch.arange(count, device=self.ids.device)

    def extra_repr(self) -> str:
        return (
            f"memory_size={self.memory_size}, embedding_dim={self.embedding_dim}, "
            f"warmup_steps={self.warmup_steps}, filled={int(self.filled)}"
        )


class CrossBatchMemoryLoss(nn.Module):
    """Any pair, triplet or structured batch loss (and miner) with a cross-batch memory.

    Each call (a training step) computes `loss(anchors, labels, mined, ref_emb=R, ...)`
    with the reference set R = [the batch; the memory] and ids that keep every anchor away
    from rows of the same item, then enqueues the batch. Gradients flow through the anchors
    and the batch's rows of R; the memory is detached. During the warm-up R is the batch.

    Called like a loss: `loss_fn(embeddings, labels, ids=None)`, `ids` being one integer
    per row (dataset indices: rows of the same item, in this batch or in the memory, are
    never paired). `deepmetric.distributed.DistributedLoss` calls it with the gathered
    global batch as `ref_emb` (and the local rows as anchors in local-anchor mode); that
    batch is what it enqueues.

    Args:
        loss: a batch loss that takes `ref_emb`, `ref_labels`, `query_ids`, `ref_ids`.
        memory_size, embedding_dim, warmup_steps: of the `CrossBatchMemory`.
        miner: an optional miner, run on the anchors against R.

    Example:
        >>> from deepmetric.losses import ContrastiveLoss
        >>> loss_fn = CrossBatchMemoryLoss(ContrastiveLoss(), memory_size=16, embedding_dim=4)
        >>> for step in range(3):
        ...     loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> len(loss_fn.memory)  # 3 batches of 6 rows, the 2 oldest dropped
        16
    """

    def __init__(
        self,
        loss: nn.Module,
        memory_size: int,
        embedding_dim: int,
        warmup_steps: int = 0,
        miner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if getattr(loss, "num_classes", None) is not None:
            raise ValueError(
                f"{type(loss).__name__} compares embeddings with its class vectors, not with "
                "other rows: a memory of embeddings gives it nothing; use a pair, triplet or "
                "structured loss"
            )
        self.loss, self.miner = loss, miner
        self.memory = CrossBatchMemory(memory_size, embedding_dim, warmup_steps)
        self.stats = None

    @property
    def local_anchor_supported(self) -> bool:
        """As the wrapped loss: the memory only adds references."""
        return bool(getattr(self.loss, "local_anchor_supported", False))

    @property
    def local_anchor_reason(self) -> str:
        return getattr(self.loss, "local_anchor_reason", "")

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ids: Tensor | None = None,
        query_ids: Tensor | None = None,
        ref_ids: Tensor | None = None,
    ) -> Tensor:
        """The loss of the anchors against [batch; memory]; then the batch is enqueued.

        The batch is `ref_emb` (with `ref_labels`, `ref_ids`) when given, else the anchors
        themselves (with `ids`, or `query_ids`)."""
        if indices_tuple is not None:
            raise ValueError(
                "indices_tuple cannot index the memory, which the loss appends to the "
                "references: pass the miner to CrossBatchMemoryLoss(miner=...) instead"
            )
        if ids is not None and query_ids is not None:
            raise ValueError("pass ids or query_ids, not both (they mean the same)")
        query_ids = ids if query_ids is None else query_ids
        if ref_emb is None:
            batch, batch_labels = embeddings, labels
            if query_ids is None:
                query_ids = self.memory.fresh_ids(len(embeddings))
            batch_ids = query_ids
        else:
            if ref_ids is None or query_ids is None:
                raise ValueError(
                    "with ref_emb (the batch to remember), pass query_ids and ref_ids: the "
                    "memory needs to know which rows are the same item"
                )
            batch, batch_labels, batch_ids = ref_emb, ref_labels, ref_ids
        check_labels(batch_ids, len(batch), "ids" if ref_emb is None else "ref_ids", "the batch")
        active = self.memory.active
        if active:
            stored, stored_labels, stored_ids = self.memory.contents()
            references = torch.cat([batch, stored.to(batch)])
            reference_labels = torch.cat([batch_labels, stored_labels])
            reference_ids = torch.cat([batch_ids, stored_ids])
        else:
            references, reference_labels, reference_ids = batch, batch_labels, batch_ids
        tuples = None
        if self.miner is not None:
            tuples = self.miner(
                embeddings,
                labels,
                ref_emb=references,
                ref_labels=reference_labels,
                query_ids=query_ids,
                ref_ids=reference_ids,
            )
        value = self.loss(
            embeddings,
            labels,
            tuples,
            ref_emb=references,
            ref_labels=reference_labels,
            query_ids=query_ids,
            ref_ids=reference_ids,
        )
        self.stats = getattr(self.loss, "stats", None)
        if active:
            self.memory.enqueue(batch, batch_labels, batch_ids)
        self.memory.steps += 1
        return value
