"""How numbers and names read in the report's text, tables and figures: one definition for all of them."""

from __future__ import annotations

import math
from typing import Any

ALPHA = 0.05
"""Significance level the report's verdicts use (two-sided)."""


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: ``n/a`` for a missing or NaN value, scientific below 1e-3."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
    return str(x)


def num(x: Any, spec: str) -> str:
    """``format(x, spec)``, or ``n/a`` for a missing (null in report.json) or NaN value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


def pct(p: str | float) -> str:
    """A real-data fraction as a percentage: ``0.25`` -> ``25%``."""
    return f"{float(p):.0%}"


def metric_label(metric: str) -> str:
    """``balanced_accuracy`` -> ``balanced accuracy``."""
    return metric.replace("_", " ")


def primary_metric(report: dict) -> str:
    """The report's primary metric, or its first metric when the primary was not measured."""
    metrics = report["metrics"]
    return report["primary_metric"] if report["primary_metric"] in metrics else (metrics or [""])[0]
