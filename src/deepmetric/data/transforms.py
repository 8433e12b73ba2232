"""Simple image augmentations written with torch (torchvision is not required).

Each transform maps one float image tensor of shape (C, H, W) to another of the same
shape. Random ones draw from ``generator`` when one is given, otherwise from torch's
global generator (which ``torch.utils.data.DataLoader`` seeds per worker).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepmetric.data.base import Transform


def _check_image(image: torch.Tensor, name: str) -> None:
    if image.ndim != 3:
        raise ValueError(f"{name} expects one image of shape (C, H, W), got {tuple(image.shape)}")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class Compose:
    """Apply transforms in order.

    >>> t = Compose([RandomShift(2), RandomHorizontalFlip()])
    >>> tuple(t(torch.zeros(1, 8, 8)).shape)
    (1, 8, 8)
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            image = transform(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomCrop:
    """Crop a random ``size`` window, after padding each side by ``padding`` pixels of ``fill``.

    ``size`` is an int (square) or (height, width) in pixels and must fit the padded image.
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        padding: int = 0,
        fill: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if min(self.size) < 1 or padding < 0:
            raise ValueError(f"size must be positive and padding >= 0, got {size}, {padding}")
        self.padding, self.fill, self.generator = padding, fill, generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image, "RandomCrop")
        if self.padding:
            image = F.pad(image, [self.padding] * 4, value=self.fill)
        height, width = image.shape[-2:]
        h, w = self.size
        if h > height or w > width:
            raise ValueError(
                f"RandomCrop size {self.size} is larger than the padded image {(height, width)}: "
                "resize the images first or use a smaller size"
            )
        top = int(torch.randint(0, height - h + 1, (), generator=self.generator))
        left = int(torch.randint(0, width - w + 1, (), generator=self.generator))
        return image[:, top : top + h, left : left + w]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomShift:
    """Shift the image by up to ``max_shift`` pixels each way, filling with ``fill``.

    >>> x = torch.zeros(1, 5, 5); x[0, 2, 2] = 1
    >>> bool(RandomShift(1)(x).sum() == 1)
    True
    """

    def __init__(
        self, max_shift: int, fill: float = 0.0, generator: torch.Generator | None = None
    ) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift, self.fill, self.generator = max_shift, fill, generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image, "RandomShift")
        m = self.max_shift
        if m == 0:
            return image
        height, width = image.shape[-2:]
        padded = F.pad(image, [m] * 4, value=self.fill)
        top = int(torch.randint(0, 2 * m + 1, (), generator=self.generator))
        left = int(torch.randint(0, 2 * m + 1, (), generator=self.generator))
        return padded[:, top : top + height, left : left + width]

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``.

    Not for characters, whose mirror image is another shape.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p, self.generator = p, generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image, "RandomHorizontalFlip")
        if float(torch.rand((), generator=self.generator)) < self.p:
            return image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomAffine:
    """A small random rotation, scaling and translation (bilinear, ``fill`` outside).

    ``degrees``: rotation drawn from [-degrees, degrees]; ``translate``: shift drawn from
    [-translate, translate] times the image size; ``scale``: zoom factor drawn from the
    interval (1 = unchanged).

    >>> tuple(RandomAffine(10, 0.1, (0.9, 1.1))(torch.rand(3, 16, 16)).shape)
    (3, 16, 16)
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        fill: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if degrees < 0 or not 0.0 <= translate <= 1.0 or not 0 < scale[0] <= scale[1]:
            raise ValueError(
                "need degrees >= 0, translate in [0, 1] and 0 < scale[0] <= scale[1], got "
                f"degrees={degrees}, translate={translate}, scale={scale}"
            )
        self.degrees, self.translate, self.scale = degrees, translate, tuple(scale)
        self.fill, self.generator = fill, generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image, "RandomAffine")
        angle = math.radians(_uniform(-self.degrees, self.degrees, self.generator))
        zoom = _uniform(self.scale[0], self.scale[1], self.generator)
        tx = _uniform(-self.translate, self.translate, self.generator) * 2
        ty = _uniform(-self.translate, self.translate, self.generator) * 2
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        # affine_grid maps output coordinates (in [-1, 1]) to input coordinates
        theta = torch.tensor([[cos, -sin, -tx], [sin, cos, -ty]], dtype=torch.float32)
        x = image.float()[None]
        grid = F.affine_grid(theta[None], list(x.shape), align_corners=False)
        out = F.grid_sample(x - self.fill, grid, mode="bilinear", align_corners=False)
        return (out + self.fill)[0].to(image.dtype)

    def __repr__(self) -> str:
        return (
            f"RandomAffine(degrees={self.degrees}, translate={self.translate}, scale={self.scale})"
        )


class Normalize:
    """Subtract ``mean`` and divide by ``std``, per channel.

    >>> Normalize([0.5], [0.5])(torch.ones(1, 2, 2)).tolist()
    [[[1.0, 1.0], [1.0, 1.0]]]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = torch.tensor(list(mean), dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(list(std), dtype=torch.float32)[:, None, None]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image, "Normalize")
        if image.shape[0] != self.mean.shape[0] and self.mean.shape[0] != 1:
            raise ValueError(
                f"Normalize has {self.mean.shape[0]} channel means but the image has "
                f"{image.shape[0]} channels"
            )
        return (image - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
