"""Suite results built from per-case outcomes, for tests of the gates (no model runs)."""

from __future__ import annotations

from tuneship import stats
from tuneship.evaluate import SuiteResult


def result(outcomes: dict[str, list[bool | None]], name: str = "triage") -> SuiteResult:
    """A suite's result from per-case outcomes (None: the metric does not apply), as `score`
    builds it. For the shipped triage suite, the reference answers' log-likelihood is the
    same -1.0 nats for every case and model unless a test sets it."""
    n = len(next(iter(outcomes.values())))
    if name == "triage":  # the same likelihood and calibration for every model unless a test sets them
        outcomes = {"answer_loglik": [-1.0] * n, "category_ece": [[0.9, i % 10 != 0] for i in range(n)],
                    "category_brier": [0.1] * n, **outcomes}

    def value(k: str, v: list) -> float:
        hits = [x for x in v if x is not None]
        return stats.ece([h[0] for h in hits], [h[1] for h in hits], 5) if k.endswith("_ece") else sum(hits) / len(hits)

    metrics = {k: value(k, v) for k, v in outcomes.items()}
    return SuiteResult(name, 1, metrics, len(next(iter(outcomes.values()))), [], outcomes)
