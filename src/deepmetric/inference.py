"""After training: load a run in Python, embed new items and search the run's index.

>>> import tempfile
>>> from deepmetric.training import load_config, train
>>> folder = tempfile.mkdtemp() + "/run"
>>> config = load_config(overrides=[
...     "data.name=digits", "model.name=mlp", "model.hidden_dims=[32]", "train.epochs=1",
...     "train.classes_per_batch=5", "train.batches_per_epoch=2", "train.threads=1",
...     "eval.metrics=[map@r]", "report.enabled=false"])
>>> _ = train(config, folder, quiet=True)
>>> run = load_run(folder)
>>> run.embed(np.zeros((3, 1, 8, 8))).shape  # three 8x8 grey images: embeddings (3, D)
(3, 64)
>>> best = run.search_items([0], k=2)[0][0]  # the item of the index closest to item 0
>>> best.rank, best.name == run.class_name(best.label)
(1, True)

The trainer uses the lower-level helpers here (`embed`, `build_index`,
`evaluate_embeddings`, `load_model`) for its evaluations, and the command line for
``evaluate``, ``embed``, ``index``, ``search``, ``export`` and ``serve``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from deepmetric.data import ArrayDataset, LabeledDataset, load_image
from deepmetric.index import NeighbourIndex
from deepmetric.metrics import evaluate

if TYPE_CHECKING:
    from deepmetric.training.config import Config, EvalConfig

# deepmetric.training imports this module, so its modules are imported where they are used:
# that way `import deepmetric.inference` works first as well as after `deepmetric.training`.

__all__ = [
    "Neighbour",
    "Run",
    "build_index",
    "embed",
    "evaluate_embeddings",
    "load_model",
    "load_run",
]


def embed(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: torch.dtype = torch.float32,
) -> np.ndarray:
    """The model's embeddings of every item of ``dataset``, as a float32 array (N, D)."""
    from deepmetric.training.data import gather

    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            x = gather(dataset, np.arange(start, min(start + batch_size, len(dataset))))
            with torch.autocast(device.type, precision, enabled=precision != torch.float32):
                chunks.append(model(x.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy()


def evaluate_embeddings(
    embeddings: np.ndarray, labels: np.ndarray, config: EvalConfig
) -> dict[str, float]:
    """The metrics of ``config`` for embeddings of one split (each item queries the rest)."""
    return evaluate(
        embeddings, labels, metrics=config.metrics, k=config.k, distance=config.distance
    )


def build_index(embeddings: np.ndarray, labels: np.ndarray, distance: str) -> NeighbourIndex:
    """An exact index over ``embeddings``: squared L2, or inner product of unit vectors."""
    if distance == "cosine":
        embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    index = NeighbourIndex(metric="ip" if distance == "cosine" else "l2")
    index.add(embeddings, labels=labels)
    return index


def load_model(
    path: str | Path, config: Config | None = None
) -> tuple[nn.Module, Config, tuple[int, ...]]:
    """The model of a checkpoint file (in eval mode), its config and the shape of one input.

    ``config`` defaults to the one stored in the checkpoint; a config whose model has
    another shape raises `CheckpointError` naming each tensor that does not fit.
    """
    from deepmetric.training.checkpoint import load_checkpoint, load_state
    from deepmetric.training.components import build_model_from_config
    from deepmetric.training.config import load_config

    checkpoint = load_checkpoint(path)
    if config is None:
        config = load_config(base=checkpoint["config"])
    input_shape = tuple(checkpoint["input_shape"])
    model = build_model_from_config(config.model, input_shape)
    load_state(model, checkpoint["model"], "model", str(path))
    return model.eval(), config, input_shape


@dataclass(frozen=True)
class Neighbour:
    """One item found by a search: its rank, its id in the run's index, its class, distance.

    Attributes:
        rank: 1 for the closest item.
        id: the item's position in the run's index (its row of ``embeddings.npz``).
        label: the item's integer class id.
        name: its class name (from ``class_names.json``; ``str(label)`` where there is none).
        distance: Euclidean distance, or the cosine distance 1 - cos for
            ``eval.distance=cosine``.
    """

    rank: int
    id: int
    label: int
    name: str
    distance: float


class Run:
    """A trained run loaded for inference: its model, config, class names and index.

    Built by `load_run`. `embed` and `search` run the model in eval mode without gradients,
    in batches of ``eval.batch_size``, on the run's device and with its autocast precision
    (as training's evaluations did, so the index's own items are found at distance 0).

    Attributes:
        root: the run folder.
        model: the embedder (an ``nn.Module`` in eval mode).
        config: the run's `Config`.
        input_shape: the shape of one model input: (C, H, W) for images, (F,) for features.
        class_names: ``class_names[label]`` is the name of a label id; None when the run
            folder has no ``class_names.json`` (names are then ``str(label)``).
        device: where the model runs.
        precision: the autocast dtype (torch.float32: none).
    """

    def __init__(
        self,
        root: Path,
        model: nn.Module,
        config: Config,
        input_shape: tuple[int, ...],
        class_names: list[str] | None,
        device: torch.device,
        precision: torch.dtype,
    ) -> None:
        self.root = root
        self.model = model
        self.config = config
        self.input_shape = input_shape
        self.class_names = class_names
        self.device = device
        self.precision = precision
        self._index: NeighbourIndex | None = None
        self._items: LabeledDataset | None = None
        self._item_labels: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r}, input_shape={self.input_shape}, device={self.device})"

    @property
    def takes_images(self) -> bool:
        """True when the model embeds images (C, H, W), False for feature rows."""
        return len(self.input_shape) == 3

    @property
    def index(self) -> NeighbourIndex:
        """The run's index (``index.npz``: the evaluation split's embeddings), read once."""
        if self._index is None:
            path = self.root / "index.npz"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{self.root} has no index.npz: let `deepmetric train` finish the run "
                    f"(or continue it with `deepmetric train --resume {self.root}`)"
                )
            self._index = NeighbourIndex.load(path)
        return self._index

    @property
    def item_labels(self) -> np.ndarray:
        """The label id of each item of the index, (len(index),) int64."""
        if self._item_labels is None:
            with np.load(self.root / "embeddings.npz", allow_pickle=False) as data:
                labels = data["labels"].astype(np.int64)
            if len(labels) != len(self.index):
                raise ValueError(
                    f"{self.root}/index.npz holds {len(self.index)} items but embeddings.npz "
                    f"{len(labels)}: the index was rebuilt from other data"
                )
            self._item_labels = labels
        return self._item_labels

    def class_name(self, label: int) -> str:
        """The name of label id ``label`` (``str(label)`` where the run has no names)."""
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else str(label)

    def items(self) -> LabeledDataset:
        """The data set of the index's items (the run's evaluation split), in index order."""
        if self._items is None:
            from deepmetric.training.data import load_split

            dataset = load_split(self.config.data, self.config.eval.split)
            if len(dataset) != len(self.index) or not np.array_equal(
                dataset.labels, self.item_labels
            ):
                raise ValueError(
                    f"the index of {self.root} does not hold the {self.config.eval.split} split "
                    f"of {self.config.data.name} as configured: it was built from other data"
                )
            self._items = dataset
        return self._items

    def item_images(self, ids: Sequence[int] | np.ndarray) -> np.ndarray | None:
        """The images of index items ``ids``, (n, C, H, W) floats in [0, 1]; None for
        feature rows."""
        from deepmetric.training.data import images_of

        if not self.takes_images:
            return None
        return images_of(self.items(), self._checked_ids(ids))

    def prepare(self, inputs: Any) -> torch.Tensor:
        """``inputs`` as one float32 batch (N, *input_shape), preprocessed as in training.

        See `embed` for the inputs accepted.
        """
        if isinstance(inputs, (torch.Tensor, np.ndarray)):
            batch = self._tensor(inputs, batch=True)
        elif _is_single(inputs):
            batch = self._item(inputs)[None]
        elif isinstance(inputs, Sequence):
            batch = torch.stack([self._item(item) for item in inputs]) if inputs else None
        else:
            raise TypeError(self._accepted(f"cannot embed a {type(inputs).__name__}"))
        if batch is None or len(batch) == 0:
            raise ValueError("inputs is empty: pass at least one item")
        return batch

    def embed(self, inputs: Any, *, batch_size: int | None = None) -> np.ndarray:
        """The embeddings of ``inputs``, a float32 array (N, D), one row per item.

        ``inputs`` is one item or a sequence of items; an item is an image file path, a PIL
        image, a tensor or array of shape ``input_shape``, or a feature row (a sequence of
        numbers) for runs trained on feature tables. A tensor or array with one more leading
        dimension is a batch. Images are converted to the run's mode (grey or RGB) and resized
        to its size (bilinear) as the training data were; uint8 image values are scaled to
        [0, 1]. ``batch_size`` defaults to the run's ``eval.batch_size``.

        Example (a digits run, 8x8 grey images): ``run.embed(["a.png", "b.png"])``,
        ``run.embed(torch.rand(10, 1, 8, 8))``.
        """
        batch = self.prepare(inputs)
        dataset = ArrayDataset(batch, np.zeros(len(batch), dtype=np.int64))
        size = self.config.eval.batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return embed(
            self.model, dataset, batch_size=size, device=self.device, precision=self.precision
        )

    def search(self, queries: Any, k: int = 5) -> list[list[Neighbour]]:
        """The ``k`` items of the index nearest to each query, closest first.

        ``queries`` is anything `embed` takes; the result holds one list per query.
        Distances are Euclidean (or 1 - cos for ``eval.distance=cosine``), ties ordered by id.
        """
        k = self._checked_k(k, len(self.index))
        return self._search(self.embed(queries), k, exclude=None)

    def search_items(self, ids: Sequence[int] | np.ndarray, k: int = 5) -> list[list[Neighbour]]:
        """The ``k`` items nearest to items ``ids`` of the index, each query leaving itself
        out (its duplicates, if any, are still found)."""
        ids = self._checked_ids(ids)
        k = self._checked_k(k, len(self.index) - 1)
        return self._search(self.index.vectors()[ids], k, exclude=ids)

    def _search(self, vectors: np.ndarray, k: int, exclude: np.ndarray | None) -> list:
        if self.index.metric == "ip":  # cosine: the index holds unit vectors
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        found = self.index.search(vectors, k, exclude=exclude)
        labels = self.item_labels
        raw = found.distances.astype(np.float64)
        distances = np.sqrt(np.maximum(raw, 0.0)) if self.index.metric == "l2" else 1.0 + raw
        results = []
        for row_ids, row_distances in zip(found.indices, distances, strict=True):
            found_ids = row_ids[row_ids >= 0]  # approximate indexes may find fewer than k
            results.append(
                [
                    Neighbour(
                        rank=rank + 1,
                        id=int(item),
                        label=int(labels[item]),
                        name=self.class_name(int(labels[item])),
                        distance=float(row_distances[rank]),
                    )
                    for rank, item in enumerate(found_ids)
                ]
            )
        return results

    def _checked_k(self, k: int, limit: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
            raise ValueError(
                f"k must be an integer from 1 to {limit} (the items the index of {self.root} "
                f"can return), got {k!r}"
            )
        return int(k)

    def _checked_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(f"ids must be a 1-D sequence of integer item ids, got {ids!r}")
        array = array.astype(np.int64)
        bad = array[(array < 0) | (array >= len(self.index))]
        if len(bad):
            raise ValueError(
                f"item id {int(bad[0])} is not in the index of {self.root}, which holds items "
                f"0 to {len(self.index) - 1}"
            )
        return array

    def _accepted(self, problem: str) -> str:
        shape = ", ".join(map(str, self.input_shape))
        kinds = "image file paths, PIL images, " if self.takes_images else "feature rows, "
        return f"{problem}: pass {kinds}or tensors / arrays of shape ({shape}) or (N, {shape})"

    def _item(self, item: Any) -> torch.Tensor:
        """One input as a float32 tensor of shape ``input_shape``."""
        if isinstance(item, (str, os.PathLike, Image.Image)):
            if not self.takes_images:
                raise ValueError(
                    f"the model of {self.root} embeds feature rows of length "
                    f"{self.input_shape[0]}, not images"
                )
            mode = "L" if self.input_shape[0] == 1 else "RGB"
            size = tuple(self.input_shape[1:])
            if isinstance(item, Image.Image):
                return _image_tensor(item, mode, size)
            return load_image(item, mode, size)
        if isinstance(item, (torch.Tensor, np.ndarray)):
            return self._tensor(item, batch=False)[0]
        if _is_single(item):  # a feature row
            return self._tensor(np.asarray(item, dtype=np.float32), batch=False)[0]
        raise TypeError(self._accepted(f"cannot embed a {type(item).__name__}"))

    def _tensor(self, x: torch.Tensor | np.ndarray, batch: bool) -> torch.Tensor:
        """A tensor or array as a float32 batch (N, *input_shape)."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        else:
            x = x.detach().cpu()
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"inputs must hold real numbers, got dtype {x.dtype}")
        if x.dtype == torch.uint8 and self.takes_images:
            x = x.float() / 255.0
        x = x.float()
        if tuple(x.shape) == self.input_shape:
            x = x[None]
        elif not (batch and tuple(x.shape[1:]) == self.input_shape):
            raise ValueError(
                self._accepted(
                    f"an input of shape {tuple(x.shape)} does not fit the model of {self.root}"
                )
            )
        if not torch.isfinite(x).all():
            raise ValueError("inputs contain NaN or inf")
        return x


def _is_single(value: Any) -> bool:
    """True for one item: a path, a PIL image, or a feature row (a sequence of numbers)."""
    if isinstance(value, (str, os.PathLike, Image.Image)):
        return True
    return (
        isinstance(value, Sequence)
        and len(value) > 0
        and all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
    )


def _image_tensor(image: Image.Image, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """A PIL image as ``deepmetric.data.load_image`` reads a file: mode, bilinear resize,
    float32 (C, H, W) in [0, 1]."""
    height, width = size
    image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def load_run(
    path: str | Path, *, checkpoint: str = "best", device: str | torch.device | None = None
) -> Run:
    """Load a run folder written by ``deepmetric train`` for inference.

    Parameters:
        path: the run folder.
        checkpoint: "best" (the model of the best evaluation, which the index was built
            from) or "last".
        device: where to run the model; default the run's ``train.device`` ("auto": cuda
            when available, else cpu).

    Example: ``run = load_run("runs/digits"); run.search("query.png", k=5)``.
    """
    from deepmetric.training.run_folder import RunFolder
    from deepmetric.training.trainer import pick_device, pick_precision

    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    folder = RunFolder(path)
    config = folder.read_config()
    file = folder.best if checkpoint == "best" else folder.last
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: the run has not finished an evaluation yet; continue it "
            f"with `deepmetric train --resume {folder.root}`"
        )
    model, config, input_shape = load_model(file, config)
    target = pick_device(config.train.device) if device is None else torch.device(device)
    return Run(
        root=folder.root,
        model=model.to(target),
        config=config,
        input_shape=tuple(int(n) for n in input_shape),
        class_names=folder.load_class_names(),
        device=target,
        precision=pick_precision(config.train.precision, target),
    )
