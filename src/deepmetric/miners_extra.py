"""Multi-similarity miner (Wang et al. 2019), written to move into `deepmetric.miners`.

It follows the miner interface: `miner(embeddings, labels, ref_emb=None, ref_labels=None)`
returns a `MinedTuple` of pairs (a1, p, a2, n) whose `reference_key` names the reference set.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepmetric._validation import check_batch, check_positive
from deepmetric.distances import BaseDistance, CosineSimilarity
from deepmetric.tuples import MinedTuple, reference_key

BLOCK_ELEMENTS = 1 << 22


class MultiSimilarityMiner(nn.Module):
    """Pair mining of the multi-similarity loss (Wang, Han, Huang, Dong & Scott 2019, eq. 7-8).

    For anchor i with similarities s to its positives P_i and negatives N_i:

        keep negative n  if  s_in + epsilon > min_{p in P_i} s_ip
        keep positive p  if  s_ip - epsilon < max_{n in N_i} s_in

    i.e. the negatives that come close to the hardest positive and the positives that come
    close to the hardest negative. An anchor without positives keeps no negative and one
    without negatives keeps no positive. With a distance d, s = -d (so d_in < max d_ip + eps).
    Computed without gradient, one block of anchors at a time; the number of pairs returned
    depends on the data.

    Args:
        epsilon: slack, >= 0 (similarity units, or distance units for a distance).
        distance: default cosine similarity.

    Example:
        >>> miner = MultiSimilarityMiner(epsilon=0.1)
        >>> a1, p, a2, n = miner(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    def __init__(self, epsilon: float = 0.1, distance: BaseDistance | None = None) -> None:
        super().__init__()
        self.epsilon = check_positive(epsilon, "epsilon", allow_zero=True)
        self.distance = CosineSimilarity() if distance is None else distance

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> MinedTuple:
        """Mine pairs (a1, p, a2, n): a1, a2 index the batch, p, n the reference set."""
        batch = check_batch(embeddings, labels, ref_emb, ref_labels)
        query, labels = batch.embeddings.detach(), batch.labels
        ref, ref_labels = batch.ref_emb.detach(), batch.ref_labels
        found: list[list[Tensor]] = [[], [], [], []]
        step = max(1, BLOCK_ELEMENTS // len(ref))
        with torch.no_grad():
            for start in range(0, len(query), step):
                rows = slice(start, min(start + step, len(query)))
                block = self.distance(query[rows], ref)
                sim = block if self.distance.is_inverted else -block
                same = labels[rows].unsqueeze(1) == ref_labels.unsqueeze(0)
                positive = same.clone()
                if batch.ref_is_query:
                    positive.diagonal(offset=start).fill_(False)
                negative = ~same
                hardest_pos = sim.masked_fill(~positive, torch.inf).amin(dim=1, keepdim=True)
                hardest_neg = sim.masked_fill(~negative, -torch.inf).amax(dim=1, keepdim=True)
                keep_neg = negative & (sim + self.epsilon > hardest_pos)
                keep_pos = positive & (sim - self.epsilon < hardest_neg)
                for slot, mask in ((0, keep_pos), (2, keep_neg)):
                    anchor, other = mask.nonzero(as_tuple=True)
                    found[slot].append(anchor + start)
                    found[slot + 1].append(other)
        tensors = tuple(torch.cat(parts) for parts in found)
        return MinedTuple(tensors, reference_key(ref_emb))

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"
