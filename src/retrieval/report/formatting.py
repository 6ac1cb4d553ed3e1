"""How numbers are printed, the same in every table and sentence of the report.

Metrics get 3 decimals (`fmt`), so a test can find each metric of the JSON files in the report;
parameters keep their own precision (`fmt_param`: a learning rate stays 0.0005).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def fmt(value: Any) -> str:
    """A metric as printed everywhere in the report: 3 decimals, integers as they are."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def fmt_param(value: Any) -> str:
    """A parameter value (learning rates stay 0.0005, not 0.001)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt_param(v) for v in value) or "(none)"
    return "(empty)" if value == "" else str(value)


def with_ci(scores: Mapping[str, Any], name: str) -> str:
    """'0.410 [0.390, 0.430]': the metric and its 95% bootstrap interval, when there is one."""
    low, high = scores.get(f"{name}_ci_low"), scores.get(f"{name}_ci_high")
    if low is None or high is None:
        return fmt(scores.get(name))
    return f"{fmt(scores.get(name))} [{fmt(low)}, {fmt(high)}]"


def times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count} times")


def change(old: float, new: float, noun: str) -> str:
    """'raised mAP from 0.410 to 0.580' (as printed: equal at 3 decimals reads 'left')."""
    if fmt(old) == fmt(new):
        return f"left {noun} unchanged at {fmt(new)}"
    return f"{'raised' if new > old else 'lowered'} {noun} from {fmt(old)} to {fmt(new)}"


def number(value: Any) -> float | None:
    """The value as a finite float, or None (missing, NaN, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
