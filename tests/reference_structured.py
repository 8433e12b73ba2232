"""Slow references for the structured losses, written from the papers with explicit loops.

Each takes the (N, M) matrix `mat` from the distance module (differentiable, so gradients can
be compared) and the pair sets as Python sets of (anchor, reference) index pairs, and follows
the paper's formula term by term. They are meant for batches of about a dozen items.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from deepmetric import blocks


def pair_sets(labels, ref_labels=None, indices_tuple=None):
    """(positive pairs, negative pairs) as sets of (i, j): from labels, or from mined tuples."""
    if indices_tuple is not None:
        if len(indices_tuple) == 3:
            a, p, n = (t.tolist() for t in indices_tuple)
            return set(zip(a, p, strict=True)), set(zip(a, n, strict=True))
        a1, p, a2, n = (t.tolist() for t in indices_tuple)
        return set(zip(a1, p, strict=True)), set(zip(a2, n, strict=True))
    same_set = ref_labels is None
    ref_labels = labels if same_set else ref_labels
    pos, neg = set(), set()
    for i, yi in enumerate(labels.tolist()):
        for j, yj in enumerate(ref_labels.tolist()):
            if yi == yj and not (same_set and i == j):
                pos.add((i, j))
            elif yi != yj:
                neg.add((i, j))
    return pos, neg


def _lse(values):
    return torch.logsumexp(torch.stack(values), dim=0)


def lifted(dis, pos, neg, neg_margin, pos_margin, smooth, same_set):
    """Song et al. 2016 eq. 4 (smooth) / survey eq. 3 (hard): 1/(2|P|) sum [J_ij]+^2."""
    total = dis.sum() * 0
    for i, j in pos:
        side_i = [neg_margin - dis[i, k] for (a, k) in neg if a == i]
        if same_set:  # the negatives of j: row j, as the paper writes D_jl
            side_j = [neg_margin - dis[j, l] for (a, l) in neg if a == j]
        else:  # j is a reference item: the batch items of another class, column j
            side_j = [neg_margin - dis[l, j] for (l, b) in neg if b == j]
        values = side_i + side_j
        if not values:
            continue
        hardest = _lse(values) if smooth else torch.stack(values).max()
        total = total + torch.relu(hardest + dis[i, j] - pos_margin) ** 2
    return total / (2 * max(len(pos), 1))


def multi_similarity(sim, pos, neg, alpha, beta, base, num_rows):
    """Wang et al. 2019 eq. 6, averaged over anchors with a pair."""
    total, anchors = sim.sum() * 0, 0
    for i in range(num_rows):
        p = [sim[i, j] for (a, j) in pos if a == i]
        n = [sim[i, j] for (a, j) in neg if a == i]
        if not p and not n:
            continue
        anchors += 1
        pos_sum = sum((torch.exp(-alpha * (s - base)) for s in p), sim.new_zeros(()))
        neg_sum = sum((torch.exp(beta * (s - base)) for s in n), sim.new_zeros(()))
        total = total + torch.log1p(pos_sum) / alpha + torch.log1p(neg_sum) / beta
    return total / max(anchors, 1)


def circle(sim, pos, neg, m, gamma, num_rows):
    """Sun et al. 2020 eq. 6 with the eq. 7-8 weights detached, averaged over anchors."""
    total, anchors = sim.sum() * 0, 0
    for i in range(num_rows):
        p = [sim[i, j] for (a, j) in pos if a == i]
        n = [sim[i, j] for (a, j) in neg if a == i]
        if not p or not n:
            continue
        anchors += 1
        pos_logits = [-gamma * torch.relu(1 + m - s.detach()) * (s - (1 - m)) for s in p]
        neg_logits = [gamma * torch.relu(s.detach() + m) * (s - m) for s in n]
        total = total + torch.nn.functional.softplus(_lse(neg_logits) + _lse(pos_logits))
    return total / max(anchors, 1)


def ranked_list(dis, pos, neg, margin, alpha, Tn, Tp, imbalance, num_rows):  # noqa: N803
    """Wang et al. 2019 (RLL) eq. 3-7, weights as constants, averaged over anchors."""
    total, anchors = dis.sum() * 0, 0
    for i in range(num_rows):
        p = [dis[i, j] for (a, j) in pos if a == i]
        n = [dis[i, j] for (a, j) in neg if a == i]
        if not p and not n:
            continue
        anchors += 1
        p_star = [d for d in p if d > alpha - margin]
        n_star = [d for d in n if d < alpha]
        loss_p = dis.new_zeros(())
        if p_star:
            w = [math.exp(Tp * float(d.detach() - (alpha - margin))) for d in p_star]
            loss_p = sum(wi * (d - (alpha - margin)) for wi, d in zip(w, p_star, strict=True))
            loss_p = loss_p / sum(w)
        loss_n = dis.new_zeros(())
        if n_star:
            w = [math.exp(Tn * float(alpha - d.detach())) for d in n_star]
            loss_n = sum(wi * (alpha - d) for wi, d in zip(w, n_star, strict=True)) / sum(w)
        total = total + (1 - imbalance) * loss_p + imbalance * loss_n
    return total / max(anchors, 1)


def margin(dis, pos, neg, margin_value, beta_of_anchor, nu, reduction):
    """Wu et al. 2017 eq. 3 over all listed pairs, plus nu * mean beta; beta_of_anchor(i)."""
    terms = []
    for i, j in pos:
        terms.append(torch.relu(margin_value + (dis[i, j] - beta_of_anchor(i))))
    for i, j in neg:
        terms.append(torch.relu(margin_value - (dis[i, j] - beta_of_anchor(i))))
    total = sum(terms, dis.sum() * 0)
    if reduction == "nonzero_mean":
        total = total / max(sum(1 for t in terms if t > 0), 1)
    elif reduction == "mean":
        total = total / max(len(terms), 1)
    return total


def ntxent(sim, pos, neg, temperature):
    """InfoNCE / NT-Xent: mean over positive pairs of -log softmax against the negatives."""
    total = sim.sum() * 0
    for a, p in pos:
        numerator = torch.exp(sim[a, p] / temperature)
        denominator = numerator + sum(
            (torch.exp(sim[a, n] / temperature) for (b, n) in neg if b == a), sim.new_zeros(())
        )
        total = total - torch.log(numerator / denominator)
    return total / max(len(pos), 1)


def npairs(x, sim, pos, neg, l2_reg_weight):
    """Survey eq. 4: -1/|P| sum log(e^S_ij / (e^S_ij + sum_k e^S_ik)) + lambda/m sum ||x_i||."""
    loss = ntxent(sim, pos, neg, 1.0)
    norms = sum(torch.sqrt((x[i] ** 2).sum()) for i in range(len(x)))
    return loss + l2_reg_weight * norms / len(x)


def supcon(sim, pos, neg, temperature, num_rows):
    """Khosla et al. 2020 eq. 2 (L_out), averaged over anchors with a positive."""
    total, anchors = sim.sum() * 0, 0
    for i in range(num_rows):
        p = [j for (a, j) in pos if a == i]
        if not p:
            continue
        anchors += 1
        others = sorted({j for (a, j) in pos | neg if a == i})
        denominator = sum(torch.exp(sim[i, k] / temperature) for k in others)
        total = total - sum(
            torch.log(torch.exp(sim[i, j] / temperature) / denominator) for j in p
        ) / len(p)
    return total / max(anchors, 1)


def histogram(sim, pos, neg, n_bins, low, high):
    """Ustinova & Lempitsky 2016 eq. 1-4, node by node."""
    delta = (high - low) / n_bins
    nodes = [low + r * delta for r in range(n_bins + 1)]

    def density(pairs):
        h = [sim.new_zeros(()) for _ in nodes]
        for i, j in pairs:
            s = sim[i, j].clamp(low, high)
            for r, t in enumerate(nodes):
                if r > 0 and nodes[r - 1] <= s <= t:
                    h[r] = h[r] + (s - nodes[r - 1]) / delta
                elif r < n_bins and t < s <= nodes[r + 1]:
                    h[r] = h[r] + (nodes[r + 1] - s) / delta
                elif r < n_bins and s == t:
                    h[r] = h[r] + (nodes[r + 1] - s) / delta
        return [v / len(pairs) for v in h]

    if not pos or not neg:
        return sim.sum() * 0
    h_pos, h_neg = density(pos), density(neg)
    total = sim.new_zeros(())
    for r in range(n_bins + 1):
        total = total + h_neg[r] * sum(h_pos[: r + 1])
    return total


def coupled_clusters(x, labels, distance, margin_value):
    """Liu et al. 2016 (survey eq. 5-6): per class, centre, nearest negative, halved hinge."""
    terms = []
    y = labels.tolist()
    for c in sorted(set(y)):
        members = [i for i in range(len(y)) if y[i] == c]
        others = [i for i in range(len(y)) if y[i] != c]
        if len(members) < 2 or not others:
            continue
        centre = sum(x[i] for i in members) / len(members)
        d = lambda i, c=centre: distance.as_dissimilarity(distance(x[i : i + 1], c[None]))[0, 0]  # noqa: E731
        nearest_negative = torch.stack([d(n) for n in others]).min()
        for i in members:
            terms.append(0.5 * torch.relu(d(i) + margin_value - nearest_negative))
    return sum(terms, x.sum() * 0) / max(len(terms), 1)


def nmi(a, b):
    """MI(a, b) / ((H(a) + H(b)) / 2) from counts, 1 if both are single clusters."""
    n = len(a)
    count = lambda items: {k: items.count(k) for k in set(items)}  # noqa: E731
    ca, cb, cab = count(a), count(b), count(list(zip(a, b, strict=True)))
    h = lambda c: -sum(v / n * math.log(v / n) for v in c.values())  # noqa: E731
    mi = sum(v / n * math.log(n * v / (ca[i] * cb[j])) for (i, j), v in cab.items())
    if h(ca) < 1e-12 and h(cb) < 1e-12:
        return 1.0
    if h(ca) + h(cb) < 1e-12:
        return 0.0
    return min(max(mi / ((h(ca) + h(cb)) / 2), 0.0), 1.0)


def facility_location(x, labels, distance, gamma):
    """Song et al. 2017 eq. 8-11 with the paper's greedy loss-augmented inference."""
    n = len(x)
    mat = distance.as_dissimilarity(distance(x))
    d = mat.detach().tolist()
    y = labels.tolist()
    k = len(set(y))

    def assign(medoids):  # nearest medoid, the earliest chosen on ties
        out = []
        for i in range(n):
            best = 0
            for t in range(1, len(medoids)):
                if d[i][medoids[t]] < d[i][medoids[best]]:
                    best = t
            out.append(best)
        return out

    def objective(medoids):
        f = -sum(min(d[i][j] for j in medoids) for i in range(n))
        return f + gamma * (1 - nmi(assign(medoids), y))

    medoids = []
    for _ in range(k):
        scores = [(objective(medoids + [j]), -j) for j in range(n) if j not in medoids]
        medoids.append(-max(scores)[1])
    clusters = assign(medoids)
    chosen = sum(mat[i, medoids[clusters[i]]] for i in range(n))
    oracle = x.sum() * 0
    for c in sorted(set(y)):
        members = [i for i in range(n) if y[i] == c]
        costs = [sum(d[i][j] for i in members) for j in members]
        medoid = members[costs.index(min(costs))]
        oracle = oracle + sum(mat[i, medoid] for i in members)
    return torch.relu(-chosen + gamma * (1 - nmi(clusters, y)) + oracle), medoids


def deep_clustering(v, r, labels, ref_labels):
    """Hershey et al. 2016: ||V R^T - Y Y_r^T||_F^2 entry by entry."""
    total = v.sum() * 0
    for i in range(len(v)):
        for j in range(len(r)):
            target = 1.0 if int(labels[i]) == int(ref_labels[j]) else 0.0
            total = total + ((v[i] * r[j]).sum() - target) ** 2
    return total


def as_matrix(distance, x, ref=None) -> Tensor:
    """The distance module's matrix (the foundation's, tested there)."""
    return distance(x, x if ref is None else ref)


# ---------------------------------------------------------------------------------------------
# Test helpers

SEEDS = [0, 1, 2]


@pytest.fixture(params=["one block", "row blocks"])
def block_size(request, monkeypatch):
    """Run each test with the default block size and with blocks of one or two rows."""
    if request.param == "row blocks":
        monkeypatch.setattr(blocks, "SWEEP_BLOCK_ELEMENTS", 16)
        monkeypatch.setattr(blocks, "PASS_BLOCK_ELEMENTS", 16)
    return request.param


def batch(seed, n=11, dim=5, num_ref=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=gen)
    y[-1] = 17  # a singleton class with an arbitrary id
    if not num_ref:
        return x, y, None, None
    r = torch.randn(num_ref, dim, generator=gen, dtype=torch.float64)
    ry = torch.randint(0, 5, (num_ref,), generator=gen)
    return x, y, r, ry


def assert_same(fast_fn, slow_fn, *tensors, atol=1e-9):
    """Values and gradients (w.r.t. every tensor) of the fast loss and the reference agree."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    fast = fast_fn(*leaves)
    fast_grads = torch.autograd.grad(fast, leaves, allow_unused=True)
    leaves2 = [t.detach().clone().requires_grad_() for t in tensors]
    slow = slow_fn(*leaves2)
    slow_grads = torch.autograd.grad(slow, leaves2, allow_unused=True)
    torch.testing.assert_close(fast, slow.to(fast.dtype), atol=atol, rtol=1e-7)
    for f, s in zip(fast_grads, slow_grads, strict=True):
        f = torch.zeros_like(leaves[0]) if f is None else f
        s = torch.zeros_like(leaves[0]) if s is None else s
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f, s, atol=atol, rtol=1e-6)


def mined_pairs(seed, n, m):
    gen = torch.Generator().manual_seed(100 + seed)
    count = 3 * n
    return (
        torch.randint(0, n, (count,), generator=gen),
        torch.randint(0, m, (count,), generator=gen),
        torch.randint(0, n, (count,), generator=gen),
        torch.randint(0, m, (count,), generator=gen),
    )
