"""Reference text statistics and the distances the drift monitor compares them with.

A dataset version stores `text_profile(train prompts)` in its manifest; the drift monitor
builds the same profile from the prompts in the inference log and calls `compare_profiles`.
Profiles are small, JSON-serialisable dicts so they travel inside manifests and XCom.

Conventions (so reference and current are always comparable):
- lengths are counted in whitespace tokens (`str.split()`), binned with the fixed edges
  `LENGTH_BIN_EDGES` (last bin open-ended), independent of the data;
- vocabulary tokens are lower-cased `\\w+` runs; the profile keeps the `top_k` most frequent
  with their counts plus the total token count, so the share outside the kept vocabulary
  (out-of-vocabulary share) is known for both sides.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

PROFILE_VERSION = 1
# Fixed edges in whitespace tokens: bin i holds lengths in [edges[i], edges[i+1]); the last
# bin holds everything >= edges[-1]. Fixed (not data-derived) so any two profiles line up.
LENGTH_BIN_EDGES: tuple[int, ...] = (0, 1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_TOP_K = 1000  # tokens stored in a profile
COMPARE_TOP_K = 100  # tokens compared bin by bin (the rest share one bucket)

# PSI conventions: < 0.1 stable, 0.1–0.25 moderate shift, > 0.25 significant shift.
PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25

_WORD = re.compile(r"\w+", re.UNICODE)


def length_bin(n_tokens: int) -> int:
    """Index of the fixed length bin that a prompt of `n_tokens` whitespace tokens falls in."""
    # bisect, not numpy: called once per row, where numpy's call overhead dominates
    return max(0, bisect.bisect_right(LENGTH_BIN_EDGES, n_tokens) - 1)


class TextProfiler:
    """Incremental `text_profile`: feed texts one at a time (streaming, one pass).

    Memory grows with the number of distinct tokens, not with the number of texts.
    `vocabulary` restricts counting to given tokens (exact counts for a reference's
    vocabulary when profiling the current side); everything else still counts as tokens.
    """

    def __init__(self, *, top_k: int = DEFAULT_TOP_K, vocabulary: Iterable[str] | None = None):
        self.top_k = top_k
        self._vocab_filter = frozenset(vocabulary) if vocabulary is not None else None
        self._hist = np.zeros(len(LENGTH_BIN_EDGES), dtype=np.int64)
        self._tokens: Counter[str] = Counter()
        self._total_tokens = 0
        self._rows = 0
        self._length_sum = 0

    def add(self, text: str) -> None:
        n = len(text.split())
        self._rows += 1
        self._length_sum += n
        self._hist[length_bin(n)] += 1
        words = _WORD.findall(text.lower())
        self._total_tokens += len(words)
        if self._vocab_filter is None:
            self._tokens.update(words)
        else:
            self._tokens.update(w for w in words if w in self._vocab_filter)

    def result(self) -> dict[str, Any]:
        if self._vocab_filter is None:
            vocab = dict(self._tokens.most_common(self.top_k))
        else:
            vocab = dict(self._tokens)
        return {
            "profile_version": PROFILE_VERSION,
            "row_count": self._rows,
            "length": {
                "unit": "whitespace_tokens",
                "bin_edges": list(LENGTH_BIN_EDGES),
                "counts": [int(c) for c in self._hist],
                "mean": (self._length_sum / self._rows) if self._rows else 0.0,
            },
            "vocabulary": {
                "top_k": len(vocab),
                "total_tokens": int(self._total_tokens),
                "counts": vocab,
            },
        }


def text_profile(
    texts: Iterable[str], *, top_k: int = DEFAULT_TOP_K, vocabulary: Iterable[str] | None = None
) -> dict[str, Any]:
    """Reference statistics of `texts`: length histogram, top-token counts, row count."""
    profiler = TextProfiler(top_k=top_k, vocabulary=vocabulary)
    for text in texts:
        profiler.add(text)
    return profiler.result()


def psi(
    expected_fractions: Sequence[float] | np.ndarray,
    actual_fractions: Sequence[float] | np.ndarray,
    eps: float = 1e-4,
) -> float:
    """Population Stability Index between two binned distributions (same bins).

    Inputs are normalised to sum 1 and floored at `eps` so an empty bin on one side gives a
    large but finite contribution instead of infinity.
    """
    e = np.asarray(expected_fractions, dtype=float)
    a = np.asarray(actual_fractions, dtype=float)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError(f"psi needs two 1-D arrays of equal length, got {e.shape} and {a.shape}")
    if (e < 0).any() or (a < 0).any():
        raise ValueError("psi needs non-negative fractions")
    e = _normalise(e)
    a = _normalise(a)
    e = np.clip(e, eps, None)
    a = np.clip(a, eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def _normalise(x: np.ndarray) -> np.ndarray:
    total = x.sum()
    if total <= 0:
        return np.full_like(x, 1.0 / len(x)) if len(x) else x
    return x / total


def _vocab_distribution(
    ref_vocab: Mapping[str, int], profile: Mapping[str, Any]
) -> tuple[np.ndarray, float]:
    """Counts over the reference vocabulary plus one out-of-vocabulary bucket, as fractions."""
    voc = profile["vocabulary"]
    counts = voc["counts"]
    total = float(voc["total_tokens"])
    in_vocab = np.array([float(counts.get(tok, 0)) for tok in ref_vocab], dtype=float)
    oov = max(total - in_vocab.sum(), 0.0)
    dist = np.append(in_vocab, oov)
    return _normalise(dist), (oov / total if total else 0.0)


def compare_profiles(
    reference: Mapping[str, Any],
    current: Mapping[str, Any] | Iterable[str],
    *,
    compare_top_k: int = COMPARE_TOP_K,
) -> dict[str, Any]:
    """How far `current` has moved from `reference`.

    `current` is a profile or the raw texts; raw texts are profiled against the reference's
    vocabulary, which gives exact counts (a separately built current profile only knows its
    own top tokens, so reference tokens outside those count as out-of-vocabulary there).

    Returns length PSI, token PSI and Jensen–Shannon divergence (base 2, in [0, 1]) over
    the reference's `compare_top_k` most frequent tokens + one bucket for all other tokens
    (few, well-filled bins keep sampling noise well under the PSI thresholds for a few
    hundred prompts), the out-of-vocabulary shares against the full stored vocabulary, and
    `score = max(length_psi, token_psi)` with `level` stable/moderate/significant.
    """
    from scipy.spatial.distance import jensenshannon

    if not isinstance(current, Mapping):
        current = text_profile(current, vocabulary=reference["vocabulary"]["counts"].keys())
    ref_len = reference["length"]
    cur_len = current["length"]
    if list(ref_len["bin_edges"]) != list(cur_len["bin_edges"]):
        raise ValueError("profiles use different length bin edges; rebuild one of them")
    length_psi = psi(ref_len["counts"], cur_len["counts"])

    full_vocab = reference["vocabulary"]["counts"]
    _, ref_oov = _vocab_distribution(full_vocab, reference)
    _, cur_oov = _vocab_distribution(full_vocab, current)
    top = dict(sorted(full_vocab.items(), key=lambda kv: (-kv[1], kv[0]))[:compare_top_k])
    p, _ = _vocab_distribution(top, reference)
    q, _ = _vocab_distribution(top, current)
    token_psi = psi(p, q)
    js = float(jensenshannon(p, q, base=2) ** 2) if p.sum() and q.sum() else 0.0
    if math.isnan(js):
        js = 0.0

    score = max(length_psi, token_psi)
    level = (
        "significant"
        if score > PSI_SIGNIFICANT
        else "moderate"
        if score > PSI_MODERATE
        else "stable"
    )
    return {
        "score": score,
        "level": level,
        "length_psi": length_psi,
        "token_psi": token_psi,
        "token_js_divergence": js,
        "reference_oov_share": ref_oov,
        "current_oov_share": cur_oov,
        "oov_share_delta": cur_oov - ref_oov,
        "compared_tokens": len(top),
        "reference_rows": int(reference.get("row_count", 0)),
        "current_rows": int(current.get("row_count", 0)),
        "thresholds": {"moderate": PSI_MODERATE, "significant": PSI_SIGNIFICANT},
    }
