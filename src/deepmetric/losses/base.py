"""What every embedding loss shares: the calling convention and input checks.

    loss = loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)

`embeddings` (N, D) are the batch; `labels` (N,) their integer classes (any integers). With
`ref_emb` (M, D) and `ref_labels` (M,), positives and negatives are taken from that reference
set instead of the batch (cross-modal training, memory banks); anchors stay in the batch.
`indices_tuple` restricts the loss to mined triplets (a, p, n) or pairs (a1, p, a2, n).
Labels are class ids of any integer dtype or bool (used as int64). The keyword-only
`query_ids` (N,) and `ref_ids` (M,) name the item of each row: rows with equal ids are never
paired (`deepmetric.pairwise`); by default the batch as its own reference set excludes each
row against itself only.

Distributed local-anchor mode (`local_anchor_supported`): a loss whose value is a sum of
per-anchor terms divided by a count reports `loss_sum` and `normaliser` in its stats, with
loss = loss_sum / max(normaliser, 1), so that a wrapper can sum both over processes.

Losses compute in float32 when given float16 or bfloat16 inputs and return the input dtype.

Thin by construction: a loss function declares its checks once, where it is defined, with
`@checked(<distance rule>, <name>=<check>, ...)`; the decorator runs them on every call (and
resolves the distance and checks the reduction), so the body trusts its arguments. A module
names its function and gets the rest from it (`MetricLoss`):

    class TripletMarginLoss(MetricLoss):
        function = staticmethod(triplet_margin_loss)
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from deepmetric._validation import HyperParameter
from deepmetric.distances import BaseDistance, EuclideanDistance
from deepmetric.losses.reduction import check_reduction
from deepmetric.pairwise import check_pair_batch
from deepmetric.tuples import check_indices_tuple, reference_key


class LossInputs(NamedTuple):
    """Checked inputs of a loss call, cast to the dtype the loss computes in."""

    embeddings: Tensor
    labels: Tensor | None
    ref_emb: Tensor
    ref_labels: Tensor | None
    ref_is_query: bool
    indices_tuple: tuple[Tensor, ...] | None
    dtype: torch.dtype
    ids: tuple[Tensor, Tensor] | None = None
    relevance: Tensor | None = None

    def finish(self, loss: Tensor) -> Tensor:
        """The loss returned to the user, in the input dtype; a ValueError when a loss computed
        in float32 for half-precision inputs does not fit in that dtype (never inf)."""
        if self.dtype != loss.dtype and self.dtype in (torch.float16, torch.bfloat16):
            largest = torch.finfo(self.dtype).max
            value = float(loss.detach().abs().max()) if loss.numel() else 0.0
            if math.isfinite(value) and value > largest:
                raise ValueError(
                    f"the loss ({value:.4g}, computed in float32) does not fit in "
                    f"{self.dtype} (largest {largest:.4g}); scale the embeddings down (e.g. "
                    "normalise them) or pass float32 embeddings"
                )
        return loss.to(self.dtype)


def prepare_inputs(
    embeddings: Tensor,
    labels: Tensor | None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> LossInputs:
    """Check a loss call's arguments once, with messages that name the argument and the fix.

    Labels come back as int64 class ids (N,) or bool label sets (N, L); `ids` holds the
    checked (query_ids, ref_ids) (see `deepmetric.pairwise.check_ids`); `relevance` (N, M),
    when given, decides the positive pairs instead of the labels (docs/labels.md).
    """
    batch, ids = check_pair_batch(
        embeddings,
        labels,
        ref_emb,
        ref_labels,
        labels_optional=indices_tuple is not None,
        query_ids=query_ids,
        ref_ids=ref_ids,
        relevance=relevance,
    )
    if indices_tuple is not None:
        indices_tuple = check_indices_tuple(
            indices_tuple, len(batch.embeddings), len(batch.ref_emb), reference_key(ref_emb)
        )
    return LossInputs(
        batch.embeddings,
        batch.labels,
        batch.ref_emb,
        batch.ref_labels,
        batch.ref_is_query,
        indices_tuple,
        batch.dtype,
        ids,
        relevance,
    )


# ---------------------------------------------------------------- declared checks


class DistanceRule(NamedTuple):
    """Which distances a loss accepts (`accepts`), and the one it uses by default."""

    default: Callable[[], BaseDistance]
    accepts: Callable[[BaseDistance], bool]
    requirement: str

    def resolve(self, distance: object, loss: str) -> BaseDistance:
        """`distance`, or the default for None; raise naming `distance` if it is not accepted."""
        if distance is None:
            return self.default()
        if not isinstance(distance, BaseDistance):
            raise TypeError(
                f"distance must be a deepmetric.distances.BaseDistance instance, got "
                f"{type(distance).__name__}; pass e.g. distance={self.default()!r}"
            )
        if not self.accepts(distance):
            raise ValueError(
                f"distance={type(distance).__name__}(...) cannot be used by {loss}: it needs "
                f"{self.requirement}; pass distance={self.default()!r} or leave it out"
            )
        return distance


def any_distance(default: Callable[[], BaseDistance]) -> DistanceRule:
    """A rule that accepts every distance and similarity, with this default."""
    return DistanceRule(default, lambda d: True, "a deepmetric distance or similarity")


Check = Callable[[Any, str], Any]
"""`check(value, name)`: the value to use, or an error naming `name` (deepmetric._validation)."""


def checked(
    distances: DistanceRule | None = None,
    *,
    together: Callable[..., None] | None = None,
    **checks: Check,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a loss function's checks once, where the function is defined.

    On every call, before the body runs: `distance` is resolved by the `distances` rule (its
    default for None; an error naming `distance` for one the loss cannot use), `reduction`
    is checked, each keyword named in `checks` that the caller passes is replaced by
    `check(value, name)` (the defaults are the author's), and `together`, a check of several
    arguments at once (e.g. two margins whose order depends on the distance), is called with
    the arguments its parameters name. The body then trusts these arguments. The rule, the
    checks and `together` stay on the function, from which `MetricLoss` builds its module.

    Example:
        >>> from deepmetric._validation import check_positive
        >>> @checked(scale=check_positive)
        ... def scaled(embeddings, *, scale=1.0, distance=None, reduction="mean"):
        ...     return embeddings * scale
        >>> scaled(torch.ones(1), scale=2)
        tensor([2.])
        >>> scaled(torch.ones(1), scale=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: scale must be > 0, got -1.0
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(function).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        joint = () if together is None else tuple(inspect.signature(together).parameters)

        @functools.wraps(function)
        def checked_call(*args: Any, **kwargs: Any) -> Any:
            if distances is not None:
                kwargs["distance"] = distances.resolve(kwargs.get("distance"), function.__name__)
            if "reduction" in kwargs:
                check_reduction(kwargs["reduction"])
            for name, check in checks.items():
                if name in kwargs:
                    kwargs[name] = check(kwargs[name], name)
            if together is not None:
                together(**{name: kwargs.get(name, defaults.get(name)) for name in joint})
            return function(*args, **kwargs)

        checked_call.distances = distances  # type: ignore[attr-defined]
        checked_call.checks, checked_call.together = checks, together  # type: ignore[attr-defined]
        return checked_call

    return decorate


# ---------------------------------------------------------------- modules


class MetricLoss(nn.Module):
    """Base of the embedding losses: the module form of a `checked` loss function.

    A subclass names its functional form, `function = staticmethod(fn)`, and gets from it:
    its distance rule (`distances`); a `HyperParameter` for each checked keyword of the
    function that the class does not define itself (checked by the same check whenever it
    is set; a class defines one itself to accept more than the function, or as a property
    computed from its state); whether it has a reduction (`has_reduction`: whether the
    function takes one); and, unless it writes its own `__init__`, the constructor
    `(<the family's leading arguments>, <the function's hyper-parameters with their
    defaults>, distance=None, reduction=<the function's default>)`, which stores them, makes
    the module's state (`init_state`) and runs the function's `together` check. Each call
    passes the function's hyper-parameters from the module's attributes
    (`function_arguments`); `stats` holds the stats of the last call.

    It says whether it can run in distributed local-anchor mode (`local_anchor_supported`).
    """

    local_anchor_supported: bool = False
    """Whether the loss is a sum of per-anchor terms over one count, reported as `loss_sum`
    and `normaliser` in its stats (distributed local-anchor mode); see `local_anchor_reason`."""
    local_anchor_reason: str = "it does not report loss_sum and normaliser in its stats"
    """Why local-anchor mode is refused, when `local_anchor_supported` is False."""
    distances: ClassVar[DistanceRule] = any_distance(EuclideanDistance)
    passed: ClassVar[tuple[str, ...]] = ()
    """The function's hyper-parameters, passed from the module's attributes on each call."""
    hyper_parameters: ClassVar[tuple[str, ...]] = ()
    """Every `HyperParameter` of the module (the repr lists them)."""
    has_reduction: ClassVar[bool] = True
    """Whether `function` takes a `reduction` (the module's `reduction` is passed on)."""
    reduction = HyperParameter(lambda value, name: check_reduction(value))

    @staticmethod
    def function(*args: Any, **kwargs: Any) -> Any:
        """The functional form; a subclass sets its own."""
        raise NotImplementedError("a MetricLoss subclass sets `function`, its functional form")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "function" in vars(cls):
            function = cls.function
            if not hasattr(function, "checks"):
                raise TypeError(
                    f"{cls.__name__}.function must be declared with @checked(...) "
                    "(deepmetric.losses.base.checked): its checked keywords are the "
                    "hyper-parameters the module passes; use @checked() if it has none"
                )
            if getattr(function, "distances", None) is not None:
                cls.distances = function.distances
            cls.passed = tuple(function.checks)
            cls.has_reduction = "reduction" in inspect.signature(function).parameters
            for name in cls.passed:
                if not hasattr(cls, name):
                    descriptor = HyperParameter(function.checks[name])
                    descriptor.__set_name__(cls, name)
                    setattr(cls, name, descriptor)
            if "__init__" not in vars(cls):
                cls.__init__ = _stores_arguments(cls)  # type: ignore[method-assign]
        declared = (  # per class, the function's hyper-parameters first, in its order
            name
            for klass in reversed(cls.__mro__)
            for name in (*vars(klass).get("passed", ()), *vars(klass))
        )
        cls.hyper_parameters = tuple(
            name
            for name in dict.fromkeys(declared)
            if name != "reduction"
            and isinstance(inspect.getattr_static(cls, name, None), HyperParameter)
        )

    def __init__(self, distance: BaseDistance | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.distance = self.distances.resolve(distance, type(self).__name__)
        self.reduction = reduction
        self.stats: Any = None

    def init_state(self) -> None:
        """Make what the generated constructor makes beyond storing its arguments (class
        vectors, buffers); nothing by default."""

    def function_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `function` for the next call: its hyper-parameters, the
        distance and (if the loss has one) the reduction."""
        arguments = {name: getattr(self, name) for name in self.passed}
        arguments["distance"] = self.distance
        if self.has_reduction:
            arguments["reduction"] = self.reduction
        return arguments

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        **pairing: Tensor | None,
    ) -> Tensor:
        """`function(embeddings, labels, indices_tuple, ref_emb, ref_labels, **pairing)` with
        this module's hyper-parameters, distance and reduction; its stats in `self.stats`.
        `pairing`: the keyword-only `query_ids`, `ref_ids`, `relevance` (docs/labels.md)."""
        loss, self.stats = type(self).function(
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
            return_stats=True,
            **self.function_arguments(),
            **pairing,
        )
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.hyper_parameters)


def _family_init(cls: type[MetricLoss]) -> Callable[..., None]:
    """The constructor a generated one calls first: the nearest one written by hand."""
    for klass in cls.__mro__[1:]:
        init = vars(klass).get("__init__")
        if init is not None and not getattr(init, "generated", False):
            return init
    raise TypeError(f"{cls.__name__} is not a MetricLoss")  # pragma: no cover


def _stores_arguments(cls: type[MetricLoss]) -> Callable[..., None]:
    """The constructor of a `MetricLoss` subclass whose arguments are its function's: the
    family constructor's leading arguments (none for pair losses; num_classes and
    embedding_size for class-vector losses), then the function's hyper-parameters with the
    function's defaults and annotations (or the class's, where the class annotates one), then
    distance and, if the function has one, reduction with the function's default."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    own_annotations = inspect.get_annotations(cls)
    keywords = inspect.signature(cls.function).parameters
    hyper = [
        keywords[name].replace(
            kind=positional, annotation=own_annotations.get(name, keywords[name].annotation)
        )
        for name in cls.passed
    ]
    family = _family_init(cls)
    base = inspect.signature(family)
    *leading, distance, reduction = base.parameters.values()
    tail = [distance]
    if cls.has_reduction:
        tail.append(reduction.replace(default=keywords["reduction"].default))
    signature = base.replace(parameters=[*leading, *hyper, *tail])
    together = getattr(cls.function, "together", None)
    joint = () if together is None else tuple(inspect.signature(together).parameters)

    def __init__(self: MetricLoss, *args: Any, **kwargs: Any) -> None:
        arguments = signature.bind(self, *args, **kwargs)
        arguments.apply_defaults()
        values = arguments.arguments
        family(self, *(values[p.name] for p in leading[1:]), values["distance"])
        if cls.has_reduction:
            self.reduction = values["reduction"]
        for parameter in hyper:
            setattr(self, parameter.name, values[parameter.name])
        self.init_state()
        if together is not None:
            together(**{name: getattr(self, name) for name in joint})

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"Store the arguments (see `{cls.__name__}`) and make the module's state."
    __init__.generated = True  # type: ignore[attr-defined]
    return __init__
