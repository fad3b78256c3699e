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

import math
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

# RE2 spelling of what separates \w+ runs (Python's \w: Unicode letters, digits, underscore)
_WORD_SEPARATOR_RE2 = r"[^\p{L}\p{N}_]+"


def length_bins(n_tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Index of the fixed length bin each length (in whitespace tokens) falls in."""
    return np.searchsorted(LENGTH_BIN_EDGES, np.asarray(n_tokens), side="right") - 1


def length_bin(n_tokens: int) -> int:
    return int(length_bins([n_tokens])[0])


def fold(text: str) -> str:
    """A text as the profile sees it: lower-cased, whitespace tokens joined by one space."""
    return " ".join(text.lower().split())


def fold_counts(folds: Sequence[str]) -> Any:
    """Vocabulary counts of folded texts (`fold`): an Arrow table (`word`, `counts`) of their
    `\\w+` runs, counted in C++ and cheap to pickle from a worker process.

    Tokens are split on the single spaces `fold` leaves; each distinct token is expanded
    into its runs once, weighted by its count, which is exactly the count of `\\w+` runs in
    the text since a run never spans whitespace. Most tokens are one run already
    (alphanumeric); only the rest are split further.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        arr = pa.array(folds, pa.string())
    except UnicodeEncodeError:  # lone surrogates cannot be UTF-8: count them as U+FFFD
        arr = pa.array([t.encode("utf-8", "replace").decode("utf-8") for t in folds], pa.string())
    vc = pc.value_counts(pc.list_flatten(pc.split_pattern(arr, " ")))
    values, counts = vc.field("values"), pc.cast(vc.field("counts"), pa.int64())
    plain = pc.utf8_is_alnum(values)
    rest = pc.invert(plain)
    runs = pc.split_pattern_regex(pc.filter(values, rest), _WORD_SEPARATOR_RE2)
    words = pa.concat_tables(
        [
            pa.table({"word": pc.filter(values, plain), "counts": pc.filter(counts, plain)}),
            pa.table(
                {
                    "word": pc.list_flatten(runs),
                    "counts": pc.filter(counts, rest).take(pc.list_parent_indices(runs)),
                }
            ),
        ]
    ).filter(pc.not_equal(pc.field("word"), ""))
    return _sum_counts([words])


def _sum_counts(parts: list[Any]) -> Any:
    import pyarrow as pa

    if not parts:
        return pa.table({"word": pa.array([], pa.string()), "counts": pa.array([], pa.int64())})
    table = pa.concat_tables(parts).group_by("word").aggregate([("counts", "sum")])
    return table.rename_columns(["word", "counts"])


class TextProfiler:
    """Incremental `text_profile`: feed texts one at a time or pre-split in bulk (streaming).

    Each batch is reduced to `fold_counts` (Arrow, C++), and batches are summed by
    group-bys (every `_COMPACT_EVERY` batches, the sums again every `_COMPACT_EVERY` sums, then
    once at the end). Memory grows with the number of distinct tokens, not with the number of
    texts. `vocabulary` restricts the stored counts to given tokens
    (exact counts for a reference's vocabulary when profiling the current side); every
    token still counts in the total.
    """

    _COMPACT_EVERY = 32  # this many new batches are summed into one part (never regrouping
    # the parts already summed: re-aggregating a growing table each time costs O(n^2))

    def __init__(self, *, top_k: int = DEFAULT_TOP_K, vocabulary: Iterable[str] | None = None):
        self.top_k = top_k
        self._vocab_filter = frozenset(vocabulary) if vocabulary is not None else None
        self._hist = np.zeros(len(LENGTH_BIN_EDGES), dtype=np.int64)
        self._parts: list[Any] = []  # Arrow tables (word, counts), one per batch
        self._summed_parts: list[Any] = []  # each the sum of _COMPACT_EVERY batches
        self._rows = 0
        self._length_sum = 0

    def add(self, text: str) -> None:
        self.add_texts([text])

    def add_texts(self, texts: Sequence[str]) -> None:
        folds = [fold(t) for t in texts]
        lengths = np.fromiter((f.count(" ") + 1 if f else 0 for f in folds), np.int64, len(folds))
        self.add_counts(fold_counts(folds), lengths)

    def add_counts(self, counts: Any, lengths: np.ndarray, *, sign: int = 1) -> None:
        """Add (or with sign=-1 take out) texts already reduced to `fold_counts` and
        per-text lengths in whitespace tokens: how worker processes hand them over."""
        import pyarrow.compute as pc

        if not len(lengths):
            return
        self._rows += sign * len(lengths)
        self._length_sum += sign * int(lengths.sum())
        self._hist += sign * np.bincount(length_bins(lengths), minlength=len(LENGTH_BIN_EDGES))
        if sign < 0:
            counts = counts.set_column(1, "counts", pc.negate(counts.column("counts")))
        self._parts.append(counts)
        if len(self._parts) >= self._COMPACT_EVERY:
            self._summed_parts.append(_sum_counts(self._parts))
            self._parts = []
            if len(self._summed_parts) >= self._COMPACT_EVERY:  # each is at most the vocabulary: summing
                self._summed_parts = [_sum_counts(self._summed_parts)]  # them keeps a long stream's state flat

    def result(self) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.compute as pc

        words = _sum_counts(self._summed_parts + self._parts)
        words = words.filter(pc.greater(pc.field("counts"), 0))
        total = int(pc.sum(words.column("counts")).as_py() or 0)
        if self._vocab_filter is not None:
            words = words.filter(pc.is_in(pc.field("word"), pa.array(sorted(self._vocab_filter))))
        elif words.num_rows > self.top_k:  # keep the top_k, and every word tied with the last
            kth = pc.select_k_unstable(words, self.top_k, [("counts", "descending")])
            floor = words.column("counts").take(kth[-1:])[0]
            words = words.filter(pc.greater_equal(pc.field("counts"), floor))
        # ties broken by the word, so the same data always gives the same profile
        order = pc.sort_indices(words, [("counts", "descending"), ("word", "ascending")])
        if self._vocab_filter is None:
            order = order[: self.top_k]
        words = words.take(order)
        vocab = dict(
            zip(words.column("word").to_pylist(), words.column("counts").to_pylist(), strict=True)
        )
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
                "total_tokens": int(total),
                "counts": vocab,
            },
        }


def text_profile(
    texts: Iterable[str], *, top_k: int = DEFAULT_TOP_K, vocabulary: Iterable[str] | None = None
) -> dict[str, Any]:
    """Reference statistics of `texts`: length histogram, top-token counts, row count."""
    profiler = TextProfiler(top_k=top_k, vocabulary=vocabulary)
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 10_000:
            profiler.add_texts(batch)
            batch = []
    profiler.add_texts(batch)
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
