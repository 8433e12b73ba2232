"""scikit-learn's bundled 8x8 digits as a tiny open-set data set for fast smoke tests."""

from __future__ import annotations

import numpy as np

from deepmetric.data.base import ArrayDataset, Transform, check_split, split_indices


def load_digits(split: str = "train", transform: Transform | None = None) -> ArrayDataset:
    """The 1,797 handwritten digits of ``sklearn.datasets.load_digits`` as (1, 8, 8) images.

    Pixel values are scaled to [0, 1]. ``split`` "train" holds digits 0-4 and "test" digits
    5-9 (the open-set split), "all" every digit; labels are the digits themselves, and so
    are the class names ("0" to "9").

    >>> ds = load_digits("test")
    >>> len(ds), sorted(set(ds.labels.tolist())), ds.class_names[7]
    (896, [5, 6, 7, 8, 9], '7')
    """
    from sklearn.datasets import load_digits as sklearn_digits

    check_split(split)
    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    keep = split_indices(labels, split)
    names = [str(digit) for digit in range(10)]
    return ArrayDataset(images[keep], labels[keep], transform, class_names=names)
