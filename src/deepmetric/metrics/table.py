"""A plain-text table of evaluation results, for humans."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["format_table"]


def format_table(
    results: Mapping[str, float | int], *, title: str | None = None, digits: int = 4
) -> str:
    """Render a results dict (e.g. from `evaluate`) as an aligned two-column table.

    Floats are shown with ``digits`` decimals, integers as they are.

    Parameters:
        results: metric name -> value.
        title: optional first line.
        digits: decimals for floats.

    Example:
        >>> print(format_table({"recall@1": 0.5, "num_queries": 10}))
        metric       value
        -----------  ------
        recall@1     0.5000
        num_queries  10
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be an integer >= 0, got {digits!r}")
    cells = [
        (name, f"{value:.{digits}f}" if isinstance(value, float) else str(value))
        for name, value in results.items()
    ]
    name_width = max([len("metric")] + [len(name) for name, _ in cells])
    value_width = max([len("value")] + [len(text) for _, text in cells])
    lines = [] if title is None else [title]
    lines.append(f"{'metric':<{name_width}}  value".rstrip())
    lines.append(f"{'-' * name_width}  {'-' * value_width}")
    lines.extend(f"{name:<{name_width}}  {text}" for name, text in cells)
    return "\n".join(lines)
