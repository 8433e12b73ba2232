"""Data sources: the bundled Kanji-Fonts-32 set, image folders and feature tables.

Every source is a ``torch.utils.data.Dataset`` of ``(tensor, label)`` pairs that exposes
``labels`` (a 1-D int64 NumPy array) so a P x K batch sampler can group samples by class,
and ``class_names`` (``class_names[label]``: the kanji, folder name or table value of a
class; ``str(label)`` where the data has no names), and every source offers the open-set
split of CUB-200 / Cars-196: classes sorted, the first half for training and the second
half for testing.

>>> from deepmetric.data import load_kanji_fonts
>>> train, test = load_kanji_fonts("train"), load_kanji_fonts("test")
>>> set(train.labels.tolist()).isdisjoint(test.labels.tolist())
True
>>> test.class_names[test.labels[0]]
'遂'

Data that cannot be used (an image folder without images, a table without its label column,
a truncated image) raises a `DataError` (a ValueError; `ImageReadError` is also an OSError)
whose message names the file and the fix.
"""

from __future__ import annotations

from deepmetric.data.base import (
    ArrayDataset,
    DataError,
    ImageReadError,
    LabeledDataset,
    encode_labels,
    open_set_split,
    split_indices,
)
from deepmetric.data.digits import load_digits
from deepmetric.data.feature_table import FeatureTableDataset, load_feature_table
from deepmetric.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, load_image
from deepmetric.data.kanji_fonts import KanjiFonts, load_kanji_fonts
from deepmetric.data.transforms import (
    Compose,
    Normalize,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    RandomShift,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "Compose",
    "DataError",
    "FeatureTableDataset",
    "ImageFolderDataset",
    "ImageReadError",
    "KanjiFonts",
    "LabeledDataset",
    "Normalize",
    "RandomAffine",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomShift",
    "encode_labels",
    "load_digits",
    "load_feature_table",
    "load_image",
    "load_kanji_fonts",
    "open_set_split",
    "split_indices",
]
