"""Every public component of deepmetric.losses, deepmetric.miners, deepmetric.distances and
deepmetric.samplers, found by introspection, through the cases of SPEC §9 (issue 10).

A class added to one of these modules is covered without editing this file: components are
the public classes that are `nn.Module`s (losses, miners, distances) or torch `Sampler`s;
they are built from their defaults plus a small table of arguments keyed by parameter name
(`REQUIRED_ARGUMENTS`). A class whose call raises NotImplementedError on a plain batch is an
abstract base and is left out (and must have a concrete subclass in the module).

Every case ends in one of two outcomes, and which ones are allowed is part of the case:
- "works": a finite result; for losses finite gradients for the embeddings and the loss's
  parameters, and the input dtype back;
- "fails clearly": a ValueError or TypeError whose message names the argument.
Any other exception, a NaN or inf, or silence where an error is due, fails the test.

Known failures of classes fixed in parallel by other people are listed in KNOWN_FAILURES
(class, case) -> "owner: what"; each runs as a strict xfail, so an entry must be removed
when its fix lands. The same list is in /work/coord/bad_inputs_failures.md.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Sampler

from deepmetric import distances, losses, miners, samplers

KNOWN_FAILURES: dict[tuple[str, str], str] = {}

N, DIM, NUM_CLASSES = 8, 4, 8
PK_LABELS = [0, 0, 1, 1, 2, 2, 3, 3]
SAMPLER_LABELS = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]

REQUIRED_ARGUMENTS: dict[str, object] = {
    "num_classes": NUM_CLASSES,
    "embedding_size": DIM,
    "embedding_dim": DIM,
    "heat_up_at": 1,
    "labels": SAMPLER_LABELS,
    "classes_per_batch": 2,
    "samples_per_class": 2,
}
"""Arguments by parameter name, for the parameters that have no default."""

PROCESS_GROUP = {"num_replicas": 2, "rank": 0}
"""Passed where a class takes them keyword-only: their default asks a running process group."""

CALL_KEYWORDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "teacher_emb": lambda x: torch.ones_like(x) if x.dim() == 2 else torch.ones(len(x), DIM),
}
"""Required keyword-only arguments of a call, built from the embeddings."""


# ---------------------------------------------------------------- discovery


def _public_classes(module) -> list[type]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    found = (getattr(module, name) for name in names)
    return [
        c
        for c in found
        if inspect.isclass(c)
        and c.__module__.startswith("deepmetric")
        and (issubclass(c, nn.Module) or issubclass(c, Sampler))
    ]


def build(cls: type, **overrides):
    """An instance from its defaults, REQUIRED_ARGUMENTS and PROCESS_GROUP."""
    kwargs = {}
    for name, parameter in inspect.signature(cls).parameters.items():
        if parameter.default is inspect.Parameter.empty and name in REQUIRED_ARGUMENTS:
            kwargs[name] = REQUIRED_ARGUMENTS[name]
        elif name in PROCESS_GROUP and parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[name] = PROCESS_GROUP[name]
    return cls(**{**kwargs, **overrides})


def _call_keywords(component: nn.Module, x: torch.Tensor) -> dict:
    parameters = inspect.signature(component.forward).parameters.values()
    return {
        p.name: CALL_KEYWORDS[p.name](x)
        for p in parameters
        if p.kind is p.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    }


def _plain_batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, DIM, generator=g, dtype=dtype), torch.tensor(PK_LABELS)


def _is_abstract(cls: type) -> bool:
    if issubclass(cls, Sampler):
        return False
    x, y = _plain_batch()
    try:
        run(build(cls), x, y)
    except NotImplementedError:
        return True
    except Exception:  # noqa: BLE001 (any other failure is for the tests to report)
        return False
    return False


def _components(module) -> list[type]:
    classes = _public_classes(module)
    concrete = [c for c in classes if not _is_abstract(c)]
    for abstract in set(classes) - set(concrete):
        assert any(issubclass(c, abstract) for c in concrete), abstract
    return concrete


# ---------------------------------------------------------------- running and judging


def run(component, x, labels=None, **kwargs):
    """Call a loss, miner or distance the way it is meant to be called."""
    if isinstance(component, distances.BaseDistance):
        return component(x, kwargs.get("ref_emb"))
    return component(x, labels, **kwargs, **_call_keywords(component, x))


def check_result(component, x, result) -> None:
    """A finite result; for a loss, finite gradients in the input dtype."""
    if isinstance(component, miners.BaseMiner):
        assert isinstance(result, tuple) and len(result) in (3, 4), result
        groups = [result] if len(result) == 3 else [result[:2], result[2:]]
        for group in groups:
            assert len({len(indices) for indices in group}) == 1, "tuple of unequal lengths"
        for indices in result:
            assert indices.dim() == 1 and not indices.is_floating_point()
            if len(indices):
                assert 0 <= int(indices.min()) and int(indices.max()) < max(len(x), N)
        return
    assert bool(torch.isfinite(result).all()), f"non-finite result {result}"
    if isinstance(component, distances.BaseDistance):
        assert result.shape[0] == len(x)
    else:
        assert result.dim() == 0 and result.dtype == x.dtype, (result.shape, result.dtype)
    if x.requires_grad:
        result.float().sum().backward()
        grads = [x.grad] + [p.grad for p in component.parameters() if p.grad is not None]
        for grad in grads:
            assert grad is not None and bool(torch.isfinite(grad).all()), "non-finite gradient"


def names_argument(error: Exception, names: tuple[str, ...]) -> bool:
    message = str(error)
    return any(name in message for name in names)


def judge(action: Callable[[], object], check: Callable[[object], None], errors: tuple[str, ...]):
    """Run `action`: a result must pass `check`; a ValueError/TypeError must name one of
    `errors` (when `errors` is empty, no error is allowed)."""
    try:
        result = action()
    except (ValueError, TypeError) as error:
        if not errors:
            raise AssertionError(f"must work, raised {type(error).__name__}: {error}") from error
        assert names_argument(error, errors), (
            f"{type(error).__name__} names none of {errors}: {error}"
        )
        return
    check(result)


def must_fail(action: Callable[[], object], errors: tuple[str, ...]) -> None:
    try:
        action()
    except (ValueError, TypeError) as error:
        assert names_argument(error, errors), (
            f"{type(error).__name__} names none of {errors}: {error}"
        )
    else:
        raise AssertionError(f"accepted; expected a ValueError/TypeError naming one of {errors}")


LOSSES = _components(losses)
MINERS = _components(miners)
DISTANCES = _components(distances)
SAMPLERS = _components(samplers)
MODULES = LOSSES + MINERS + DISTANCES


def kind(cls: type) -> str:
    if cls in LOSSES:
        return "loss"
    if cls in MINERS:
        return "miner"
    return "distance" if cls in DISTANCES else "sampler"


def test_discovery_finds_every_family():
    assert len(LOSSES) >= 25 and len(MINERS) >= 8 and len(DISTANCES) >= 8 and SAMPLERS
    names = {c.__name__ for c in MODULES + SAMPLERS}
    assert {"TripletMarginLoss", "ArcFaceLoss", "BatchHardMiner", "EuclideanDistance"} <= names
    assert "PKBatchSampler" in names


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    """embeddings, labels and call keywords for one SPEC §9 case; `errors` the argument names
    an error may name (must_fail: one of them must be named)."""

    make: Callable[[], tuple[torch.Tensor, torch.Tensor | None, dict]]
    errors: tuple[str, ...] = ()
    must_fail: bool = False
    kinds: tuple[str, ...] = ("loss", "miner", "distance")
    grad: bool = True
    extra: dict = field(default_factory=dict)


def _batch(labels=PK_LABELS, dtype=torch.float32, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g, dtype=dtype), torch.as_tensor(labels)


def _with(x, y, **kwargs):
    return x, y, kwargs


def _duplicates():
    x, y = _batch()
    return _with(x[:1].repeat(N, 1), y)


def _zero_rows():
    x, y = _batch()
    x[[1, 4]] = 0
    return _with(x, y)


def _non_contiguous():
    x, y = _batch()
    wide = torch.randn(DIM, N * 2).T[::2]
    wide.copy_(x)
    assert not wide.is_contiguous()
    return _with(wide, y)


def _label_dtype(dtype):
    def make():
        x, _ = _batch()
        if dtype is torch.bool:
            return _with(x, torch.tensor([0, 1] * (N // 2), dtype=torch.bool))
        return _with(x, torch.tensor(PK_LABELS, dtype=dtype))

    return make


def _float_dtype(dtype):
    def make():
        x, y = _batch()
        return _with(x.to(dtype), y)

    return make


def _nan(value):
    def make():
        x, y = _batch()
        x[2, 1] = value
        return _with(x, y)

    return make


def _ref_unseen():
    x, y = _batch()
    ref, _ = _batch(seed=1)
    return _with(x, y, ref_emb=ref, ref_labels=torch.tensor([0, 0, 1, 1, 5, 5, 6, 6]))


def _indices(*tensors):
    def make():
        x, y = _batch()
        return _with(x, y, indices_tuple=tuple(torch.tensor(t) for t in tensors))

    return make


EMBEDDING_NAMES = ("embeddings", "query", "input")
LABEL_NAMES = ("labels", "num_classes")

CASES: dict[str, Case] = {
    "plain": Case(lambda: _with(*_batch())),
    "one_class": Case(lambda: _with(*_batch([0] * N))),
    "singletons": Case(lambda: _with(*_batch(list(range(N))))),
    "duplicates": Case(_duplicates),
    "zero_rows": Case(_zero_rows),
    "batch_of_one": Case(lambda: _with(*_batch([3], n=1))),
    "non_contiguous": Case(_non_contiguous),
    "arbitrary_labels": Case(
        lambda: _with(*_batch([-5, -5, 10**12, 10**12, 7, 7, -(2**40), -(2**40)])),
        errors=LABEL_NAMES,
    ),
    "ref_emb_unseen_labels": Case(
        _ref_unseen, errors=("ref_emb", "ref_labels"), kinds=("loss", "miner")
    ),
    "float64": Case(_float_dtype(torch.float64)),
    "float16": Case(_float_dtype(torch.float16)),
    "bfloat16": Case(_float_dtype(torch.bfloat16)),
    **{
        f"labels_{str(dtype).removeprefix('torch.')}": Case(
            _label_dtype(dtype), kinds=("loss", "miner")
        )
        for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool)
    },
    "embeddings_1d": Case(
        lambda: _with(torch.randn(N), torch.tensor(PK_LABELS)), EMBEDDING_NAMES, True
    ),
    "embeddings_3d": Case(
        lambda: _with(torch.randn(N, 2, 2), torch.tensor(PK_LABELS)), EMBEDDING_NAMES, True
    ),
    # distances are numeric kernels that losses and miners call after their own checks: a
    # NaN check there would add a host synchronisation to every call, so they are left out
    "embeddings_nan": Case(_nan(math.nan), EMBEDDING_NAMES, True, ("loss", "miner")),
    "embeddings_inf": Case(_nan(math.inf), EMBEDDING_NAMES, True, ("loss", "miner")),
    "labels_wrong_length": Case(
        lambda: _with(_batch()[0], torch.tensor(PK_LABELS[:-1])),
        ("labels",),
        True,
        ("loss", "miner"),
    ),
    "labels_float": Case(
        lambda: _with(_batch()[0], torch.tensor(PK_LABELS, dtype=torch.float32)),
        ("labels",),
        True,
        ("loss", "miner"),
    ),
    "labels_3d": Case(
        lambda: _with(_batch()[0], torch.zeros(N, 2, 2, dtype=torch.long)),
        ("labels",),
        True,
        ("loss", "miner"),
    ),
    "indices_tuple_arity": Case(_indices([0, 2], [1, 3]), ("indices_tuple",), True, ("loss",)),
    "indices_tuple_out_of_range": Case(
        _indices([0, 2], [1, 3], [4, N + 3]), ("indices_tuple",), True, ("loss",)
    ),
}


def _params(classes, cases=CASES):
    out = []
    for cls in classes:
        for name, case in cases.items():
            if kind(cls) not in case.kinds:
                continue
            reason = KNOWN_FAILURES.get((cls.__name__, name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(cls, name, marks=marks, id=f"{cls.__name__}-{name}"))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("cls", "case_name"), _params(MODULES))
def test_spec_9_case(cls, case_name):
    case = CASES[case_name]
    torch.manual_seed(0)
    component = build(cls)
    x, labels, kwargs = case.make()
    if x.is_floating_point() and x.dim() == 2 and kind(cls) != "miner":
        x.requires_grad_()
    if kind(cls) == "distance" and "ref_emb" in kwargs:
        kwargs = {"ref_emb": kwargs["ref_emb"]}
    action = lambda: run(component, x, labels, **kwargs)  # noqa: E731
    if case.must_fail:
        must_fail(action, case.errors)
    else:
        judge(action, lambda result: check_result(component, x, result), case.errors)


# ---------------------------------------------------------------- hyper-parameters


def _numeric_parameters(cls: type) -> list[str]:
    """Constructor parameters whose default (or REQUIRED_ARGUMENTS value) is a real number."""
    names = []
    for name, parameter in inspect.signature(cls).parameters.items():
        value = parameter.default
        if value is inspect.Parameter.empty:
            value = REQUIRED_ARGUMENTS.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            names.append(name)
    return names


INFINITY_ALLOWED = {"p": "the order of an Lp norm: p = inf is the maximum norm"}
"""Parameters (by name) for which +inf is a meaningful value, not an error."""


def _hyper_params():
    out = []
    for cls in MODULES + SAMPLERS:
        for name in _numeric_parameters(cls):
            for label, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
                case = f"{name}={label}"
                reason = KNOWN_FAILURES.get((cls.__name__, case))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                out.append(pytest.param(cls, name, value, marks=marks, id=f"{cls.__name__}-{case}"))
    return out


@pytest.mark.parametrize(("cls", "name", "value"), _hyper_params())
def test_non_finite_hyper_parameter_is_rejected(cls, name, value):
    """NaN and inf are refused with an error naming the parameter, at construction and, for
    a parameter kept as an attribute, when assigned later (+inf where INFINITY_ALLOWED
    says it is meaningful: it must then work or fail clearly)."""
    if value == math.inf and name in INFINITY_ALLOWED:
        x, y = _plain_batch()
        judge(lambda: run(build(cls, **{name: value}), x, y), lambda r: None, (name,))
        return
    must_fail(lambda: build(cls, **{name: value}), (name,))
    instance = build(cls)
    if hasattr(instance, name):
        must_fail(lambda: setattr(instance, name, value), (name,))


def test_hyper_parameter_table_is_not_empty():
    assert sum(len(_numeric_parameters(c)) for c in MODULES + SAMPLERS) > 40


# ---------------------------------------------------------------- samplers


def _sampler_params(cases):
    return [
        pytest.param(
            cls,
            case,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(cls.__name__, case)])]
            if (cls.__name__, case) in KNOWN_FAILURES
            else [],
            id=f"{cls.__name__}-{case}",
        )
        for cls in SAMPLERS
        for case in cases
    ]


SAMPLER_LABEL_LAYOUTS = {
    "list": SAMPLER_LABELS,
    "strings": [f"class {v}" for v in SAMPLER_LABELS],
    "negative_huge": [v * 10**12 - 7 for v in SAMPLER_LABELS],
    **{
        f"numpy_{dtype.__name__}": np.array(SAMPLER_LABELS, dtype=dtype)
        for dtype in (np.int64, np.int32, np.int16, np.uint8)
    },
    "numpy_bool": np.array([0, 1] * 5, dtype=bool),
    "tensor_int32": torch.tensor(SAMPLER_LABELS, dtype=torch.int32),
}


@pytest.mark.parametrize(("cls", "layout"), _sampler_params(SAMPLER_LABEL_LAYOUTS))
def test_sampler_label_layouts(cls, layout):
    labels = SAMPLER_LABEL_LAYOUTS[layout]
    sampler = build(cls, labels=labels)
    as_list = list(np.asarray(labels))
    batches = list(sampler)
    assert batches
    for batch in batches:
        assert batch and all(0 <= i < len(as_list) for i in batch)
        counts = {}
        for i in batch:
            counts[as_list[i]] = counts.get(as_list[i], 0) + 1
        assert len(set(counts.values())) == 1, counts  # K items of each class (per rank)


SAMPLER_FAILURES = {
    "more_classes_than_exist": ({"classes_per_batch": 9}, ("classes_per_batch",)),
    "labels_2d": ({"labels": np.zeros((4, 2), dtype=int)}, ("labels",)),
    "labels_empty": ({"labels": []}, ("labels",)),
    "classes_per_batch_zero": ({"classes_per_batch": 0}, ("classes_per_batch",)),
    "samples_per_class_negative": ({"samples_per_class": -1}, ("samples_per_class",)),
    "classes_per_batch_float": ({"classes_per_batch": 2.5}, ("classes_per_batch",)),
}


@pytest.mark.parametrize(("cls", "case"), _sampler_params(SAMPLER_FAILURES))
def test_sampler_bad_arguments_fail_clearly(cls, case):
    overrides, errors = SAMPLER_FAILURES[case]
    must_fail(lambda: list(build(cls, **overrides)), errors)


# ---------------------------------------------------------------- property tests


SCALES = (1e-6, 1e-3, 1.0, 1e2, 1e4)
HYPER_VALUES = (math.nan, math.inf, -1.0, 0.0, 1e-3, 0.5, 10.0)


@st.composite
def batches(draw, num_classes_limit: int):
    n = draw(st.integers(1, N))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from(SCALES))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g) * scale
    zero = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    x[torch.tensor(zero, dtype=torch.bool)] = 0
    if n > 1 and draw(st.booleans()):
        x[n // 2 :] = x[0]
    layout = draw(st.sampled_from(["one_class", "singletons", "pairs", "random"]))
    labels = {
        "one_class": [0] * n,
        "singletons": list(range(n)),
        "pairs": [i // 2 for i in range(n)],
        "random": draw(st.lists(st.integers(0, num_classes_limit - 1), min_size=n, max_size=n)),
    }[layout]
    return x, torch.tensor(labels)


def _property_params(classes):
    out = []
    for cls in classes:
        reason = KNOWN_FAILURES.get((cls.__name__, "property"))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(cls, marks=marks, id=cls.__name__))
    return out


@pytest.mark.parametrize("cls", _property_params(LOSSES + MINERS))
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure costs one example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_drawn_batches_and_hyper_parameters(cls, data):
    """Drawn embeddings (scales 1e-6 to 1e4, zero rows, duplicates), label layouts and one
    drawn hyper-parameter (NaN, inf, negative, zero, ordinary): a finite loss with finite
    gradients (a valid miner output), or an error naming the hyper-parameter."""
    x, labels = data.draw(batches(NUM_CLASSES))
    numeric = _numeric_parameters(cls)
    overrides, errors = {}, ()
    if numeric and data.draw(st.booleans()):
        name = data.draw(st.sampled_from(numeric))
        overrides, errors = {name: data.draw(st.sampled_from(HYPER_VALUES))}, (name,)
    torch.manual_seed(0)
    try:
        component = build(cls, **overrides)
    except (ValueError, TypeError) as error:
        assert errors and names_argument(error, errors), error
        return
    if kind(cls) == "loss":
        x.requires_grad_()
    judge(lambda: run(component, x, labels), lambda r: check_result(component, x, r), errors)
