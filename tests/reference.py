"""Slow, obviously-correct references written from the papers: explicit loops over pairs and
triplets, one scalar at a time. Only the tests use them."""

from __future__ import annotations

import math

import torch


def euclidean(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b, strict=True)))


def pairwise_matrix(fn, query, ref):
    """Matrix of fn(q_i, r_j) computed one pair at a time (torch scalars, differentiable)."""
    return torch.stack([torch.stack([fn(q, r) for r in ref]) for q in query])


def lp(p, power=1.0):
    def fn(a, b):
        diff = (a - b).abs()
        norm = diff.max() if math.isinf(p) else diff.pow(p).sum().pow(1 / p)
        return norm.pow(power)

    return fn


def cosine(a, b):
    return (a @ b) / (a.norm() * b.norm())


def is_positive(labels, ref_labels, i, j, ref_is_query):
    return labels[i] == ref_labels[j] and not (ref_is_query and i == j)


def contrastive_terms(d, labels, ref_labels, ref_is_query, pos_margin, neg_margin, power):
    """Positive and negative terms of the contrastive loss, one pair at a time (distance d)."""
    pos, neg = [], []
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            if is_positive(labels, ref_labels, i, j, ref_is_query):
                pos.append(torch.relu(d[i, j] - pos_margin) ** power)
            elif labels[i] != ref_labels[j]:
                neg.append(torch.relu(neg_margin - d[i, j]) ** power)
    return pos, neg


def triplet_terms(d, labels, ref_labels, ref_is_query, margin, smooth=False, swap_d=None):
    """[d(a,p) - d(a,n) + margin]+ for every triplet, looping over a, p, n as in the paper."""
    terms = []
    for a in range(d.shape[0]):
        for p in range(d.shape[1]):
            if not is_positive(labels, ref_labels, a, p, ref_is_query):
                continue
            for n in range(d.shape[1]):
                if labels[a] == ref_labels[n]:
                    continue
                d_an = d[a, n] if swap_d is None else torch.minimum(d[a, n], swap_d[p, n])
                v = d[a, p] - d_an + margin
                terms.append(torch.nn.functional.softplus(v) if smooth else torch.relu(v))
    return terms


def reduce(terms, reduction, like):
    if not terms:
        return like.sum() * 0
    t = torch.stack(terms)
    if reduction == "sum":
        return t.sum()
    if reduction == "mean":
        return t.mean()
    nonzero = int((t > 0).sum())
    return t.sum() / max(nonzero, 1)


def triplet_category(d_ap, d_an, margin):
    """seed 002: easy v >= m, semi-hard 0 <= v < m, hard v < 0, with v = d(a,n) - d(a,p)."""
    v = d_an - d_ap
    return "easy" if v >= margin else "hard" if v < 0 else "semihard"


def all_triplets(labels, ref_labels, ref_is_query):
    return [
        (a, p, n)
        for a in range(len(labels))
        for p in range(len(ref_labels))
        if is_positive(labels, ref_labels, a, p, ref_is_query)
        for n in range(len(ref_labels))
        if labels[a] != ref_labels[n]
    ]
