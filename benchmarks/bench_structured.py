"""Forward+backward time and peak memory of the structured losses (SPEC §4) vs the pair floor.

.venv/bin/python benchmarks/bench_structured.py --sizes 1024 4096
.venv/bin/python benchmarks/bench_structured.py --sizes 16384 --repeats 1

Batches are P x K with 8 items per class and D = 128 (harness defaults).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import main  # noqa: E402

from deepmetric.losses.boundary import margin_loss, ranked_list_loss  # noqa: E402
from deepmetric.losses.clustering import (  # noqa: E402
    coupled_clusters_loss,
    deep_clustering_loss,
    facility_location_loss,
)
from deepmetric.losses.histogram import histogram_loss  # noqa: E402
from deepmetric.losses.softmax_pairs import npairs_loss, ntxent_loss, supcon_loss  # noqa: E402
from deepmetric.losses.structured import (  # noqa: E402
    circle_loss,
    lifted_structure_loss,
    multi_similarity_loss,
)
from deepmetric.miners import MultiSimilarityMiner  # noqa: E402


def lifted_smooth(x, y):
    return lifted_structure_loss(x, y)


def lifted_hard(x, y):
    return lifted_structure_loss(x, y, smooth=False)


def npairs(x, y):
    return npairs_loss(x, y)


def ntxent(x, y):
    return ntxent_loss(x, y)


def supcon(x, y):
    return supcon_loss(x, y)


def multi_similarity(x, y):
    return multi_similarity_loss(x, y)


def multi_similarity_mined(x, y):
    return multi_similarity_loss(x, y, MultiSimilarityMiner()(x, y))


def circle(x, y):
    return circle_loss(x, y)


def ranked_list(x, y):
    return ranked_list_loss(x, y)


def margin(x, y):
    return margin_loss(x, y)


def histogram(x, y):
    return histogram_loss(x, y)


def coupled_clusters(x, y):
    return coupled_clusters_loss(x, y)


def deep_clustering(x, y):
    return deep_clustering_loss(x, y)


def facility_location(x, y):
    return facility_location_loss(x, y)


CASES = {
    "lifted structure (smooth)": lifted_smooth,
    "lifted structure (hard)": lifted_hard,
    "n-pairs": npairs,
    "nt-xent": ntxent,
    "supcon": supcon,
    "multi-similarity": multi_similarity,
    "multi-similarity + miner": multi_similarity_mined,
    "circle": circle,
    "ranked list": ranked_list,
    "margin": margin,
    "histogram": histogram,
    "coupled clusters": coupled_clusters,
    "deep clustering": deep_clustering,
    "facility location": facility_location,
}

if __name__ == "__main__":
    main(CASES, [1024, 4096])
