"""A site's acceptance criteria and their verdicts from confidence intervals.

Criteria are written ``[CLASS:]FIGURE OP NUMBER``, comma-separated, e.g.
``"Normal:recall>=0.8,COVID-19:recall>=0.9,ece<=0.1"``. Per-class figures: recall, precision,
specificity, f1, auroc; overall: accuracy, ece. OP is ``>=`` or ``<=``.

A criterion **passes** when its whole 95 % interval meets the bound, **fails** when its whole interval
misses it, and is **undecided** otherwise (or when the figure is undefined on the site's films). The
overall verdict is ``fail`` if any criterion fails, ``pass`` if all pass, else ``undecided``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import CXRMonaiError
from cxr_monai.evaluation.metrics import PER_CLASS_FIGURES

OVERALL_FIGURES: tuple[str, ...] = ("accuracy", "ece")
_CRITERION = re.compile(
    r"^\s*(?:(?P<cls>[^:]+?)\s*:\s*)?(?P<fig>[a-z0-9_]+)\s*(?P<op>>=|<=)\s*(?P<num>\S+)\s*$"
)


class AcceptanceError(CXRMonaiError):
    """An acceptance criterion cannot be parsed; the message names it and the syntax."""


@dataclass(frozen=True)
class Criterion:
    """``figure`` of ``class_name`` (None: an overall figure) compared with ``bound`` by ``op``."""

    class_name: str | None
    figure: str
    op: str
    bound: float

    def __str__(self) -> str:
        prefix = f"{self.class_name}:" if self.class_name else ""
        return f"{prefix}{self.figure}{self.op}{self.bound:g}"


def parse_criteria(text: str) -> list[Criterion]:
    """``"Normal:recall>=0.8,ece<=0.1"`` -> criteria; AcceptanceError naming the first bad one."""
    criteria = []
    for part in (p for p in text.split(",") if p.strip()):
        match = _CRITERION.match(part)
        if match is None:
            raise AcceptanceError(
                f"acceptance criterion {part.strip()!r}: expected [CLASS:]FIGURE>=NUMBER or <=NUMBER, "
                "e.g. Normal:recall>=0.8"
            )
        cls, figure, op = match["cls"], match["fig"], match["op"]
        try:
            bound = float(match["num"])
        except ValueError:
            raise AcceptanceError(
                f"acceptance criterion {part.strip()!r}: {match['num']!r} is no number"
            ) from None
        if cls is None and figure not in OVERALL_FIGURES:
            raise AcceptanceError(
                f"acceptance criterion {part.strip()!r}: {figure!r} is not an overall figure "
                f"({', '.join(OVERALL_FIGURES)}); per-class figures need CLASS: before them"
            )
        if cls is not None and cls not in CLASS_NAMES:
            raise AcceptanceError(
                f"acceptance criterion {part.strip()!r}: unknown class {cls!r}; expected one of "
                f"{', '.join(CLASS_NAMES)}"
            )
        if cls is not None and figure not in PER_CLASS_FIGURES:
            raise AcceptanceError(
                f"acceptance criterion {part.strip()!r}: unknown per-class figure {figure!r}; expected one "
                f"of {', '.join(PER_CLASS_FIGURES)}"
            )
        criteria.append(Criterion(cls, figure, op, bound))
    if not criteria:
        raise AcceptanceError("no acceptance criterion given")
    return criteria


def _estimate(figures: Mapping[str, Any], criterion: Criterion) -> Mapping[str, Any]:
    if criterion.class_name is not None:
        return figures["per_class"][criterion.class_name][criterion.figure]
    key = "expected_calibration_error" if criterion.figure == "ece" else criterion.figure
    return figures[key]


def judge(criteria: Sequence[Criterion], figures: Mapping[str, Any]) -> dict[str, Any]:
    """Verdict of each criterion on ``figures`` (:func:`~cxr_monai.site.crossfit.site_figures` output):
    ``{"verdict": pass|fail|undecided, "criteria": [{criterion, value, ci_low, ci_high, verdict}]}``."""
    results = []
    for criterion in criteria:
        estimate = _estimate(figures, criterion)
        value, low, high = estimate["value"], estimate["ci_low"], estimate["ci_high"]
        if value is None or low is None or high is None:
            verdict = "undecided"
        elif criterion.op == ">=":
            verdict = "pass" if low >= criterion.bound else "fail" if high < criterion.bound else "undecided"
        else:
            verdict = "pass" if high <= criterion.bound else "fail" if low > criterion.bound else "undecided"
        results.append(
            {"criterion": str(criterion), "value": value, "ci_low": low, "ci_high": high, "verdict": verdict}
        )
    verdicts = {r["verdict"] for r in results}
    overall = "fail" if "fail" in verdicts else "pass" if verdicts == {"pass"} else "undecided"
    return {"verdict": overall, "criteria": results}
