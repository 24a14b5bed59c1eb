"""Polysemanticity: how many concepts does one unit respond to, against controls that share the data's structure?

Question: on the corpus's own concept labels, are per-layer SAE features or crosscoder features
more monosemantic, at equal width and firing density, and do either, the model's MLP neurons or the
residual stream's basis directions beat what untrained dictionaries and random directions score on the
same text (research-notes §4; Towards Monosemanticity, Bricken et al. 2023, §"Detailed
investigations": specificity and sensitivity of a feature for a concept)?

Method:
1. Tokens (:func:`spread_rows`): ``Config.tokens`` rows of the held-out store (rows with a document and
   a source label; position 0, separators and norm outliers were excluded at harvest), spread over as
   many documents as possible: every document contributes a run of consecutive rows from a seeded
   random offset (wrapping to its start), the documents taking turns row by row until the budget is
   spent, so each contributes about ``tokens / documents`` rows (all of its rows if it has fewer) and
   every source label with a document in the store is covered. Consecutive rows keep the model re-run
   (step 2) to a window or two per document. ``n_docs`` and the documents of each concept are in
   summary.csv / concepts.csv. Each token gets one concept in each of three families: ``source`` (the
   corpus source label of its document), ``language`` (the document's language: ``code`` for Python
   sources, ISO codes otherwise; languages under 1 % of the sample are pooled as ``other``) and
   ``token_class`` (from the decoded token string, see :func:`token_class`: whitespace, digit, code
   keyword, punctuation, capitalised word, lowercase word, other). Code keywords are Python's keywords
   minus the ten that are common English words (``and as for from if in is not or with``). ``language``
   is a coarsening of ``source`` (a document's language follows from its source label, except within
   ``multilingual``; concepts.csv lists the sources of each language): its rows are reported, each test
   concerns one family, and the answer does not count language as evidence independent of source.
2. Units, all at the middle stored layer L (the residual the per-layer SAE of L reads): (a) ``neuron``:
   MLP neurons of block L (``blocks.L.mlp.hook_post``, the model re-run on the sampled windows up to
   block L, aligned with the rows by window and position; the re-run residual is checked against the
   store); (b) ``basis``: the coordinates of ``resid_post`` at L in raw units; (c) ``sae``: the latents
   of the main per-layer SAE of L; (d) ``crosscoder``: all latents of the main crosscoder (it reads
   every stored layer; each latent's decoder peak layer is recorded in ``peak_layer``). Controls with the
   data's structure (same tokens, documents and residual geometry): (e) ``random_dir``: ``random_dirs``
   random unit vectors of the residual at L (default d_model, as many as basis directions), the raw
   residual projected on them; (f) ``sae_init`` and ``crosscoder_init``: untrained dictionaries of the
   same architecture and width (a fresh per-layer SAE of L and a fresh crosscoder with the trained one's
   config, seed ``seed + 1000``, the trained ones' norm factors, biases calibrated on the sample as the
   trainer does at step 0, ``calibrate_``). Signed units (neurons, basis, random directions) are split
   into their half-lines ``+x`` and ``-x``, scored as separate units (``n17+``, ``n17-``), so every
   unit is a one-sided detector. ``random`` (uniform random activations: random token sets) is kept as
   an extra reference only; it ignores documents and token frequencies.
3. Active tokens. Rule ``top`` (all types): a unit's active set is its ``n_top = max(min_top,
   round(top_fraction * tokens))`` highest activations, all of which must be positive; a unit with fewer
   positive activations is skipped (counts in summary.csv), so every scored unit has exactly ``n_top``
   active tokens whatever its density. Rule ``fires`` (dictionary types): active = f > 0, for the same
   units; it gives the dictionaries' own sensitivity.
4. Per unit and family with C concepts in the sample: counts n_i(c) over its active set, p_i(c) =
   n_i(c) / n_i; entropy H_i = -sum_c p_i(c) log p_i(c) (nats) and H_i / log C (``entropy_norm``);
   best concept c* = argmax_c p_i(c); specificity = p_i(c*); sensitivity = n_i(c*) / #tokens of c*;
   F1 = their harmonic mean. Vectorised over tokens and units (top-k along tokens, scatter-add counts).
5. Width and density matching (:func:`density_match`), the headline SAE vs crosscoder comparison:
   firing density = share of the sample's tokens on which a latent is positive. The scored latents of
   both are binned by log10 density (``match_bins`` bins per decade); each bin keeps the same number of
   each (the smaller count; a seeded random choice on the larger side). Equal counts, matched densities
   within a factor 10^(1 / match_bins) (column ``matched`` in units.csv, subset ``matched`` in
   summary.csv). The comparison over all scored latents is reported next to it.
6. Statistics over documents (:func:`resample_medians`, :func:`interval`). The units are fixed (the
   trained dictionaries; their seeds are not resampled); the text is. ``n_boot`` resamples draw the
   sample's D documents with replacement (:func:`crosslayer.evals.bootstrap_counts`), a token of a
   document drawn m times counting m times, and every unit's metrics are recomputed: rule ``top``
   re-selects each active set as the first ``n_top`` (weighted) positive tokens among the unit's
   ``boot_depth * n_top`` highest activations in the sample (shorter when those lie mostly in undrawn
   documents: ``boot_short`` in summary.csv); rule ``fires`` re-weights per-document firing counts. For
   each comparison of :data:`COMPARISONS`, family and metric (``entropy_norm``, ``specificity``): the
   difference of medians over units a - b (``delta``), its 95 % percentile interval over resamples and
   standard error, and a two-sided p-value from z = delta / se (a percentile p-value cannot fall below
   1 / n_boot, too coarse for a correction over the table); Holm-adjusted over the whole table. With
   fewer than ``min_docs`` documents in the sample, intervals and p-values are left empty.

Outputs (``results/polysemanticity/``): ``units.csv`` (rule, unit_type, unit, peak_layer,
concept_family, n_active, density, matched, entropy, entropy_norm, best_concept, specificity,
sensitivity, f1), ``summary.csv`` (rule, unit_type, subset, concept_family, layer, n_tokens, n_docs,
n_docs_store, n_top, n_candidates, n_silent, n_units, n_skipped, boot_short, medians and quartiles),
``tests.csv`` (rule, subset, concept_family, independent, metric, a, b, n_a, n_b, median_a, median_b,
delta, ci_lo, ci_hi, se, p_value, n_docs, n_boot, p_holm) and ``concepts.csv`` (concept_family, concept,
n_tokens, fraction, n_docs, sources).

Answer
    Generated from the CSVs by every run into ``paper/tables/polysemanticity_answer.tex`` (numbers are never
    typed here).
"""

from __future__ import annotations

import itertools
import keyword
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch

from crosslayer.dictionary import check_compatible
from crosslayer.errors import CrosslayerError
from crosslayer.io import write_csv
from studies.base import Study
from studies.common import fmt, latex_escape, latex_table, read_csv, save_figure, theme

NAME = "polysemanticity"

UNIT_TYPES = ("neuron", "basis", "sae", "crosscoder")
"""The four approaches compared."""
CONTROL_TYPES = ("random_dir", "sae_init", "crosscoder_init")
"""Controls that share the data's structure (module docstring, step 2)."""
NULL_TYPE = "random"
"""Random token sets: an extra reference, not a control."""
ALL_TYPES = UNIT_TYPES + CONTROL_TYPES + (NULL_TYPE,)
DICT_TYPES = ("sae", "crosscoder", "sae_init", "crosscoder_init")
"""Types scored under rule ``fires`` as well."""
TYPE_LABELS = {"neuron": "MLP neuron", "basis": "residual basis", "sae": "per-layer SAE",
               "crosscoder": "crosscoder", "random_dir": "random direction", "sae_init": "untrained SAE",
               "crosscoder_init": "untrained crosscoder", "random": "random tokens"}
FAMILIES = ("source", "language", "token_class")
FAMILY_LABELS = {"source": "source label", "language": "language", "token_class": "token class"}
DEPENDENT_FAMILIES = {"language": "source"}
"""Families that coarsen another: reported, not counted as independent evidence."""
RULES = ("top", "fires")
METRICS = ("entropy_norm", "specificity")
"""Metrics compared between unit types (lower entropy, higher specificity: more monosemantic)."""
COMPARISONS = (("top", "matched", "sae", "crosscoder"), ("fires", "matched", "sae", "crosscoder"),
               ("top", "all", "sae", "crosscoder"),
               ("top", "all", "sae", "sae_init"), ("top", "all", "crosscoder", "crosscoder_init"),
               ("top", "all", "sae", "random_dir"), ("top", "all", "crosscoder", "random_dir"),
               ("top", "all", "neuron", "random_dir"), ("top", "all", "basis", "random_dir"),
               ("top", "all", "sae", "neuron"), ("top", "all", "crosscoder", "neuron"),
               ("top", "all", "neuron", "basis"))
"""(rule, subset, a, b): the tests of tests.csv, each in every family and metric; the first is the headline."""

BATCH_ROWS = 1024
CHUNK_ELEMENTS = 1 << 23
"""Elements of one resample chunk's largest tensor (bounds the bootstrap's memory)."""
UNTRAINED_SEED = 1000


@dataclass(frozen=True)
class Config:
    """Settings of the polysemanticity study (defaults: the demo preset)."""

    tokens: int = 8_192
    """Held-out tokens on which units are labelled, spread over the store's documents."""
    top_fraction: float = 0.01
    """Rule ``top``: the active set is the top ``top_fraction`` of tokens (at least ``min_top``)."""
    min_top: int = 20
    n_random: int = 1024
    """Random-token reference units."""
    random_dirs: int | None = None
    """Random residual directions of the ``random_dir`` control (None: d_model)."""
    lang_min_fraction: float = 0.01
    """Languages with a smaller share of the sample are pooled as ``other``."""
    match_bins: int = 20
    """Density matching: log10-density bins per decade (matched densities within 10^(1/match_bins))."""
    n_boot: int = 500
    """Document-bootstrap resamples."""
    boot_depth: int = 4
    """A resample re-selects each active set among the unit's ``boot_depth * n_top`` highest activations."""
    min_docs: int = 20
    """With fewer documents in the sample, no intervals or p-values (a bootstrap over a handful means nothing)."""
    seed: int = 0
    """Seeds the row sample, random directions, untrained dictionaries, matching and bootstrap."""

ENGLISH_KEYWORDS = {"and", "as", "for", "from", "if", "in", "is", "not", "or", "with"}
CODE_KEYWORDS = frozenset(set(keyword.kwlist) - ENGLISH_KEYWORDS)


# ----------------------------------------------------------------------------- rows and concepts

def group_rank(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank (0, 1, ...) of each element within its group, in increasing order of ``key``."""
    order = np.lexsort((key, group))
    g = np.asarray(group)[order]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.searchsorted(g, g, side="left")
    return rank


def spread_rows(doc_N: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(n, #rows with doc >= 0)`` rows spread over the documents (module docstring, step 1).

    ``doc_N``: document id of every store row in row order (-1: not eligible).
    """
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(np.asarray(doc_N) >= 0)
    docs, doc = np.unique(np.asarray(doc_N)[rows], return_inverse=True)
    size_D = np.bincount(doc, minlength=len(docs))
    position = group_rank(doc, rows)
    turn = (position - rng.integers(0, size_D)[doc]) % size_D[doc]
    order = np.lexsort((rng.permutation(len(docs))[doc], turn))
    return np.sort(rows[order[:min(int(n), len(rows))]])


def token_class(text: str) -> str:
    """The class of a decoded token string (leading/trailing whitespace ignored unless it is all)."""
    word = text.strip()
    if not word:
        return "whitespace"
    if all("0" <= ch <= "9" for ch in word):
        return "digit"
    if word in CODE_KEYWORDS:
        return "code_keyword"
    if not any(ch.isalnum() for ch in word):
        return "punctuation"
    if word.isalpha() and word[0].isupper():
        return "capitalised"
    if word.isalpha() and word.islower():
        return "lowercase"
    return "other"


def _codes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    names, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]


def concept_labels(meta: dict, *, label_names: list[str], doc_keys: list[str], doc_lang: dict[str, str],
                   tokenizer, lang_min_fraction: float = 0.01) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per-token concept codes of each family: ``{family: (codes [N], concept names)}``."""
    source = np.asarray(label_names, dtype=object)[meta["label"]]
    lang_of_doc = np.asarray([doc_lang.get(k, "unknown") for k in doc_keys], dtype=object)
    language = lang_of_doc[meta["doc_id"]]
    names, counts = np.unique(language.astype(str), return_counts=True)
    rare = set(names[counts < lang_min_fraction * len(language)].tolist())
    if rare:
        language = np.where(np.isin(language.astype(str), list(rare)), "other", language)
    unique_ids, inverse = np.unique(meta["token_id"], return_inverse=True)
    classes = np.asarray([token_class(tokenizer.decode([int(t)])) for t in unique_ids], dtype=object)
    return {"source": _codes(source), "language": _codes(language), "token_class": _codes(classes[inverse])}


def concept_table(concepts: dict, doc_N: np.ndarray, label_names: list[str]) -> pd.DataFrame:
    """concepts.csv: tokens, share and documents of each concept (source labels absent from the sample with
    zeros); ``sources``: the source labels a language's tokens come from."""
    src_codes, src_names = concepts["source"]
    rows = []
    for family, (codes, names) in concepts.items():
        C = len(names)
        n_tok = np.bincount(codes, minlength=C)
        n_doc = np.bincount(np.unique(doc_N * C + codes) % C, minlength=C)
        pairs = np.unique(codes * len(src_names) + src_codes) if family in DEPENDENT_FAMILIES else np.zeros(0, int)
        for c, name in enumerate(names):
            sources = "|".join(src_names[p % len(src_names)] for p in pairs[pairs // len(src_names) == c])
            rows.append({"concept_family": family, "concept": name, "n_tokens": int(n_tok[c]),
                         "fraction": n_tok[c] / len(codes), "n_docs": int(n_doc[c]), "sources": sources})
    rows += [{"concept_family": "source", "concept": name, "n_tokens": 0, "fraction": 0.0, "n_docs": 0,
              "sources": ""} for name in label_names if name not in src_names]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- metrics

class TopSets(NamedTuple):
    """Each unit's highest activations in the sample, descending."""

    idx_KU: torch.Tensor
    """``[K, U]`` int64 token indices."""
    pos_KU: torch.Tensor
    """``[K, U]`` float: 1 where the activation is positive."""


def top_sets(acts_NU: torch.Tensor, depth: int) -> TopSets:
    vals_KU, idx_KU = acts_NU.topk(min(depth, acts_NU.shape[0]), dim=0)
    return TopSets(idx_KU, (vals_KU > 0).float())


def top_take(top: TopSets, w_BN: torch.Tensor, n_top: int) -> torch.Tensor:
    """``[b, K, U]``: how often each of a unit's top tokens enters its active set under token weights
    ``w_BN`` (a token of weight m counts m times): the first ``n_top`` weighted positive tokens."""
    w_BKU = w_BN[:, top.idx_KU] * top.pos_KU
    before_BKU = w_BKU.cumsum(1) - w_BKU
    return torch.minimum(w_BKU, (n_top - before_BKU).clamp(min=0))


def scatter_counts(take_BKU: torch.Tensor, codes_KU: torch.Tensor, n_concepts: int) -> torch.Tensor:
    """``[b, U, C]`` concept counts of weighted active sets (``codes_KU``: concept of each top token)."""
    b, _, n_units = take_BKU.shape
    flat = (codes_KU + torch.arange(n_units)[None, :] * n_concepts).reshape(-1)
    out = take_BKU.new_zeros(b, n_units * n_concepts).index_add_(1, flat, take_BKU.reshape(b, -1))
    return out.view(b, n_units, n_concepts)


def doc_fire_counts(acts_NU: torch.Tensor, codes_N: torch.Tensor, doc_N: torch.Tensor, n_docs: int,
                    n_concepts: int) -> torch.Tensor:
    """``[U, D, C]``: how often each unit fires (> 0) on tokens of each document and concept."""
    n_units = acts_NU.shape[1]
    tok, unit = torch.nonzero(acts_NU > 0, as_tuple=True)
    flat = (unit * n_docs + doc_N[tok]) * n_concepts + codes_N[tok]
    return torch.bincount(flat, minlength=n_units * n_docs * n_concepts).view(n_units, n_docs, n_concepts).float()


def entropy_specificity(counts_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept entropy (nats) and specificity of count vectors along the last axis (NaN where empty)."""
    n = counts_C.sum(-1, keepdim=True)
    p = counts_C / n.clamp(min=1e-12)
    entropy = (-torch.xlogy(p, p).sum(-1)).clamp(min=0)
    empty = n[..., 0] <= 0
    return entropy.masked_fill(empty, float("nan")), p.max(-1).values.masked_fill(empty, float("nan"))


def unit_metrics(counts_UC: torch.Tensor, totals_C: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy (nats and / log C), best concept, specificity, sensitivity and F1 of each unit.

    ``counts_UC``: concept counts of each unit's active tokens; ``totals_C``: tokens per concept
    in the sample (C = concepts with at least one token).
    """
    counts_UC, totals_C = counts_UC.double(), torch.as_tensor(totals_C).double()
    entropy, specificity = entropy_specificity(counts_UC)
    n_present = int((totals_C > 0).sum())
    entropy_norm = entropy / math.log(n_present) if n_present > 1 else torch.full_like(entropy, float("nan"))
    best = counts_UC.argmax(1)
    sensitivity = counts_UC.gather(1, best[:, None])[:, 0] / totals_C[best].clamp(min=1)
    f1 = 2 * specificity * sensitivity / (specificity + sensitivity).clamp(min=1e-12)
    return {"entropy": entropy, "entropy_norm": entropy_norm, "best": best, "specificity": specificity,
            "sensitivity": sensitivity, "f1": f1, "n_active": counts_UC.sum(1)}


def density_match(dens_a: np.ndarray, dens_b: np.ndarray, *, bins_per_decade: int = 20,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``dens_a`` and ``dens_b`` (positive densities) of equally many units per log10-density bin
    (module docstring, step 5): equal counts, matched densities within a factor 10^(1/bins_per_decade)."""
    rng = np.random.default_rng(seed)
    bins = [np.floor(np.log10(np.asarray(d, dtype=float)) * bins_per_decade).astype(np.int64)
            for d in (dens_a, dens_b)]
    if not all(len(b) for b in bins):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    low = min(int(b.min()) for b in bins)
    size = max(int(b.max()) for b in bins) - low + 1
    n_bin = np.minimum(*(np.bincount(b - low, minlength=size) for b in bins))
    return tuple(np.flatnonzero(group_rank(b, rng.random(len(b))) < n_bin[b - low]) for b in bins)


# ----------------------------------------------------------------------------- document bootstrap

def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaNs kept)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(order) - np.arange(len(order)))))
    out[order] = adjusted
    return out


class TopCounter:
    """Rule ``top`` concept counts of every family under document weights (module docstring, step 6)."""

    def __init__(self, top: TopSets, families: dict[str, tuple[torch.Tensor, int]], doc_N: torch.Tensor,
                 n_top: int):
        self.top, self.doc_N, self.n_top = top, doc_N, n_top
        self.codes = {f: (codes_N[top.idx_KU], C) for f, (codes_N, C) in families.items()}
        self.short_U = torch.zeros(top.idx_KU.shape[1])
        self.chunk = max(1, CHUNK_ELEMENTS // max(1, top.idx_KU.numel()))

    def __call__(self, w_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        take_BKU = top_take(self.top, w_BD[:, self.doc_N], self.n_top)
        self.short_U += (take_BKU.sum(1) < self.n_top - 0.5).sum(0)
        return {f: scatter_counts(take_BKU, codes_KU, C) for f, (codes_KU, C) in self.codes.items()}


class FireCounter:
    """Rule ``fires`` concept counts of every family under document weights: re-weighted per-document counts."""

    def __init__(self, per_doc: dict[str, torch.Tensor]):
        self.per_doc = per_doc
        self.chunk = max(1, CHUNK_ELEMENTS // max([1] + [p.numel() for p in per_doc.values()]))

    def __call__(self, w_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f: torch.einsum("bd,udc->buc", w_BD, counts_UDC) for f, counts_UDC in self.per_doc.items()}


def _median(values_BU: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    if len(cols) == 0:
        return torch.full((values_BU.shape[0],), float("nan"), dtype=torch.float64)
    return torch.nanquantile(values_BU[:, cols].double(), 0.5, dim=1)


def resample_medians(counter: Callable, n_docs: int, groups: dict[str, torch.Tensor], log_c: dict[str, float], *,
                     n_boot: int, seed: int) -> dict[tuple[str, str, str], np.ndarray]:
    """``{(group, family, metric): [1 + n_boot]}``: the median over each group's units (column indices into
    the counter's units) of each metric, on the sample (element 0) and on each document resample."""
    from crosslayer.evals import bootstrap_counts

    weights = np.vstack([np.ones((1, n_docs)), bootstrap_counts(n_docs, n_boot, seed)])
    out: dict = {}
    for s in range(0, len(weights), counter.chunk):
        for family, counts_BUC in counter(torch.from_numpy(weights[s:s + counter.chunk]).float()).items():
            entropy, specificity = entropy_specificity(counts_BUC.double())
            for metric, values in (("entropy_norm", entropy / log_c[family]), ("specificity", specificity)):
                for name, cols in groups.items():
                    out.setdefault((name, family, metric), []).append(_median(values, cols))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def interval(diff_B: np.ndarray) -> dict[str, float]:
    """Point value (element 0), 95 % percentile interval and standard error over the resamples (the rest),
    and the two-sided p-value of z = point / se."""
    point, boot = float(diff_B[0]), np.asarray(diff_B[1:], dtype=float)
    boot = boot[~np.isnan(boot)]
    if point != point or len(boot) < 2:
        return {"delta": point, "ci_lo": float("nan"), "ci_hi": float("nan"), "se": float("nan"),
                "p_value": float("nan")}
    lo, hi = np.quantile(boot, [0.025, 0.975])
    se = float(boot.std(ddof=1))
    p = math.erfc(abs(point) / se / math.sqrt(2)) if se > 0 else float(point == 0)
    return {"delta": point, "ci_lo": float(lo), "ci_hi": float(hi), "se": se, "p_value": p}


# ----------------------------------------------------------------------------- units

def mlp_post(model, window_tokens: torch.Tensor, window: np.ndarray, position: np.ndarray, layer: int, *,
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocks.layer.mlp.hook_post`` and ``blocks.layer.hook_resid_post`` at the rows
    (``window``, ``position``), running the model on the needed windows up to block ``layer``."""
    hooks = [f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_resid_post"]
    wins = np.unique(window)
    slot = np.searchsorted(wins, window)
    device = next(model.parameters()).device
    post = resid = None
    grabbed: dict = {}

    def grab(act, hook):
        grabbed[hook.name] = act.float().cpu()

    with torch.no_grad():
        for s in range(0, len(wins), batch_size):
            tokens = window_tokens[torch.from_numpy(wins[s:s + batch_size])].to(device)
            model.run_with_hooks(tokens, fwd_hooks=[(h, grab) for h in hooks], stop_at_layer=layer + 1,
                                 return_type=None)
            mlp_BTM, res_BTD = (grabbed[h] for h in hooks)
            if post is None:
                post = torch.zeros(len(window), mlp_BTM.shape[-1])
                resid = torch.zeros(len(window), res_BTD.shape[-1])
            sel = np.flatnonzero((slot >= s) & (slot < s + batch_size))
            b, t = torch.from_numpy(slot[sel] - s), torch.from_numpy(position[sel])
            post[sel], resid[sel] = mlp_BTM[b, t], res_BTD[b, t]
    return post, resid


def _two_sided(x_NU: torch.Tensor, prefix: str) -> tuple[torch.Tensor, list[str]]:
    n = x_NU.shape[1]
    return torch.cat([x_NU, -x_NU], dim=1), [f"{prefix}{j}+" for j in range(n)] + [f"{prefix}{j}-" for j in range(n)]


@torch.no_grad()
def untrained_like(saes, cc, layer: int, k: int, sample_BLD: torch.Tensor, store, *, seed: int) -> tuple:
    """A fresh per-layer SAE of ``layer`` (width of the trained one there, TopK ``k``) and a fresh crosscoder
    with ``cc``'s config, both with the trained ones' norm factors and biases calibrated on ``sample_BLD``
    (raw rows of every store layer) as the trainer does at step 0."""
    from crosslayer.sae_stack import SAEStack, SAEStackConfig

    i = saes.layers.index(layer)
    width = int(saes.writes_FL()[:, i].sum())
    sae = SAEStack(SAEStackConfig(layers=(layer,), d_model=saes.d_model, width=width, k=k), hooks=[saes.hooks[i]],
                   norm_factors=saes.norm_factors[i:i + 1], seed=seed)
    fresh_cc = type(cc)(cc.cfg, hooks=cc.hooks, norm_factors=cc.norm_factors, seed=seed)
    for fresh in (sae, fresh_cc):
        x_BLD = fresh.normalize(_layers_of(sample_BLD, store, fresh))
        fresh.calibrate_(x_BLD)
        if getattr(fresh.cfg, "activation", "topk") == "batchtopk":
            fresh.calibrate_threshold_(x_BLD)
    return sae, fresh_cc


def encode_rows(store, rows: np.ndarray, layer: int, dictionaries: dict) -> dict[str, torch.Tensor]:
    """The raw residual at ``layer`` (``"resid"``) and each dictionary's activations on ``rows``:
    ``dictionaries`` maps a name to ``(dictionary, feature mask or None)``."""
    parts: dict[str, list] = {name: [] for name in ["resid", *dictionaries]}
    with torch.no_grad():
        for s in range(0, len(rows), BATCH_ROWS):
            x_BLD = store.get(rows[s:s + BATCH_ROWS], layers=store.layers)
            parts["resid"].append(x_BLD[:, store.layers.index(layer)])
            for name, (d, mask_F) in dictionaries.items():
                f_BF = d.encode(_layers_of(x_BLD, store, d), normalized=False)
                parts[name].append(f_BF if mask_F is None else f_BF[:, mask_F])
    return {k: torch.cat(v) for k, v in parts.items()}


def unit_activations(ctx, rows: np.ndarray, meta: dict, layer: int, cfg: Config) -> dict:
    """``{unit_type: (acts [N, U], unit names, peak layers [U])}`` at model layer ``layer``, plus the
    relative error between the re-run residual and the stored one (``"resid_relerr"``)."""
    store = ctx.store("heldout")
    saes, cc = ctx.saes(), ctx.crosscoder()
    check_compatible(saes, store)
    check_compatible(cc, store)
    if layer not in saes.layers:
        raise CrosslayerError(f"the per-layer SAEs (layers {saes.layers}) must include layer {layer}; train them "
                              "on every stored layer")
    own_F = saes.writes_FL()[:, saes.layers.index(layer)]  # the latents of layer L's SAE
    sample = store.get(rows[::max(1, len(rows) // 4096)], layers=store.layers)
    sae0, cc0 = untrained_like(saes, cc, layer, ctx.sizes.sae_k, sample, store, seed=cfg.seed + UNTRAINED_SEED)
    acts = encode_rows(store, rows, layer, {"sae": (saes, own_F), "crosscoder": (cc, None),
                                            "sae_init": (sae0, None), "crosscoder_init": (cc0, None)})
    resid = acts.pop("resid")
    post, rerun = mlp_post(ctx.model, store.window_tokens(), meta["window"], meta["position"], layer,
                           batch_size=ctx.sizes.batch_size)
    relerr = float((rerun - resid).norm() / resid.norm().clamp(min=1e-12))
    if not relerr < 0.05:
        raise CrosslayerError(f"the model re-run on the held-out windows differs from the store at layer {layer} "
                              f"(relative error {relerr:.3f}); the store was harvested from other weights or windows")
    gen = torch.Generator().manual_seed(cfg.seed)
    dirs_DR = torch.randn(resid.shape[1], cfg.random_dirs or resid.shape[1], generator=gen)
    signed = {"neuron": _two_sided(post, "n"), "basis": _two_sided(resid, "e"),
              "random_dir": _two_sided(resid @ (dirs_DR / dirs_DR.norm(dim=0)), "d")}
    out = {t: (a, names, np.full(len(names), layer)) for t, (a, names) in signed.items()}
    prefix = {"sae": "s", "crosscoder": "c", "sae_init": "s0_", "crosscoder_init": "c0_"}
    out.update({t: (a, [f"{prefix[t]}{j}" for j in range(a.shape[1])], np.full(a.shape[1], layer if t == "sae" else -1))
                for t, a in acts.items()})
    out["crosscoder"] = out["crosscoder"][:2] + (torch.tensor(cc.layers)[cc.decoder_norms().argmax(1)].numpy(),)
    out[NULL_TYPE] = (torch.rand(len(rows), cfg.n_random, generator=gen), [f"r{j}" for j in range(cfg.n_random)],
                      np.full(cfg.n_random, -1))
    out["resid_relerr"] = relerr
    return out


def _layers_of(x_BLD: torch.Tensor, store, dictionary) -> torch.Tensor:
    """The dictionary's layers out of a batch of all the store's layers."""
    return x_BLD[:, [store.layers.index(l) for l in dictionary.layers]]


class Units(NamedTuple):
    """The scored units of one type (those with at least ``n_top`` positive activations)."""

    names: np.ndarray
    peak: np.ndarray
    """Decoder peak layer (-1: none)."""
    density: np.ndarray
    """Share of the sample's tokens on which the unit is positive."""
    top: TopSets
    fires: dict[str, torch.Tensor] | None
    """Dictionary types: per family ``[U, D, C]`` per-document firing counts."""
    n_candidates: int
    n_silent: int


def prepare_units(acts_NU: torch.Tensor, names, peak, families: dict[str, tuple[torch.Tensor, int]],
                  doc_N: torch.Tensor, *, n_top: int, depth: int, fires: bool) -> Units:
    """:class:`Units` of one type: the units kept, their densities, top sets and (``fires``) firing counts."""
    positive_U = (acts_NU > 0).sum(0)
    keep = torch.nonzero(positive_U >= n_top).flatten()
    kept_NU = acts_NU[:, keep]
    n_docs = int(doc_N.max()) + 1
    per_doc = {f: doc_fire_counts(kept_NU, codes_N, doc_N, n_docs, C) for f, (codes_N, C) in families.items()} \
        if fires else None
    return Units(np.asarray(names, dtype=object)[keep.numpy()], np.asarray(peak)[keep.numpy()],
                 (positive_U[keep].double() / acts_NU.shape[0]).numpy(), top_sets(kept_NU, depth), per_doc,
                 acts_NU.shape[1], int((positive_U == 0).sum()))


def units_frame(units: dict[str, Units], matched: dict[str, np.ndarray], concepts: dict, n_top: int) -> pd.DataFrame:
    """units.csv: every scored unit's metrics per rule and family."""
    frames = []
    families = {f: v for f, v in concepts.items() if len(v[1]) > 1}
    ones = torch.ones(1, len(next(iter(concepts.values()))[0]))
    for unit_type, u in units.items():
        is_matched = np.isin(np.arange(len(u.names)), matched.get(unit_type, []))
        take_KU = top_take(u.top, ones, n_top)[0]
        for rule in ("top", "fires") if u.fires is not None else ("top",):
            for family, (codes, names) in families.items():
                totals = torch.bincount(torch.from_numpy(codes), minlength=len(names))
                counts = (scatter_counts(take_KU[None], torch.from_numpy(codes)[u.top.idx_KU], len(names))[0]
                          if rule == "top" else u.fires[family].sum(1))
                m = {k: v.numpy() for k, v in unit_metrics(counts, totals).items()}
                frames.append(pd.DataFrame({
                    "rule": rule, "unit_type": unit_type, "unit": u.names,
                    "peak_layer": pd.Series(u.peak, dtype="Int64").mask(u.peak < 0).array,
                    "concept_family": family, "n_active": m["n_active"].astype(np.int64), "density": u.density,
                    "matched": is_matched, "entropy": m["entropy"], "entropy_norm": m["entropy_norm"],
                    "best_concept": np.asarray(names, dtype=object)[m["best"]],
                    "specificity": m["specificity"], "sensitivity": m["sensitivity"], "f1": m["f1"]}))
    return pd.concat(frames, ignore_index=True)


def _columns(units: dict[str, Units], types: tuple[str, ...],
             matched: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Column indices of each group (``type`` and ``type:matched``) in the concatenation of ``types``' units."""
    offsets = np.cumsum([0] + [len(units[t].names) for t in types])
    cols = {t: torch.arange(int(o), int(o) + len(units[t].names)) for t, o in zip(types, offsets)}
    cols.update({f"{t}:matched": torch.from_numpy(int(o) + np.asarray(matched[t], dtype=np.int64))
                 for t, o in zip(types, offsets) if t in matched})
    return cols


def _counter(rule: str, units: dict[str, Units], types: tuple[str, ...], families: dict, doc_N: torch.Tensor,
             n_top: int):
    """The :class:`TopCounter` or :class:`FireCounter` of the concatenated units of ``types``."""
    if rule == "top":
        top = TopSets(*(torch.cat([getattr(units[t].top, k) for t in types], dim=1) for k in TopSets._fields))
        return TopCounter(top, families, doc_N, n_top)
    return FireCounter({f: torch.cat([units[t].fires[f] for t in types]) for f in families})


def _test_rows(meds: dict, cols: dict, comparisons: list, families: dict) -> list[dict]:
    """tests.csv rows of one rule's comparisons (before Holm's correction)."""
    rows = []
    for (rule, subset, a, b), family, metric in itertools.product(comparisons, families, METRICS):
        ga, gb = (a, b) if subset == "all" else (f"{a}:{subset}", f"{b}:{subset}")
        med_a, med_b = meds[(ga, family, metric)], meds[(gb, family, metric)]
        rows.append({"rule": rule, "subset": subset, "concept_family": family,
                     "independent": family not in DEPENDENT_FAMILIES, "metric": metric, "a": a, "b": b,
                     "n_a": len(cols[ga]), "n_b": len(cols[gb]), "median_a": float(med_a[0]),
                     "median_b": float(med_b[0]), **interval(med_a - med_b)})
    return rows


def compare_types(units: dict[str, Units], matched: dict[str, np.ndarray], families: dict, doc_N: torch.Tensor, *,
                  n_top: int, cfg: Config) -> tuple[pd.DataFrame, dict[str, float]]:
    """tests.csv (module docstring, step 6) and each type's share of short bootstrap active sets."""
    log_c = {f: math.log(C) for f, (_, C) in families.items()}
    n_docs = int(doc_N.max()) + 1
    rows, short = [], {}
    for rule in RULES:
        comparisons = [c for c in COMPARISONS if c[0] == rule and c[2] in units and c[3] in units]
        types = tuple(t for t in units if any(t in c[2:] for c in comparisons))
        if not comparisons:
            continue
        counter = _counter(rule, units, types, families, doc_N, n_top)
        cols = _columns(units, types, matched)
        meds = resample_medians(counter, n_docs, cols, log_c, n_boot=cfg.n_boot, seed=cfg.seed + 1)
        rows += _test_rows(meds, cols, comparisons, families)
        if rule == "top":
            short = {t: float(counter.short_U[c].sum()) / max(1, len(c) * cfg.n_boot) for t, c in cols.items()
                     if ":" not in t}
    tests = pd.DataFrame(rows).assign(n_docs=n_docs, n_boot=cfg.n_boot)
    if len(tests) and n_docs < cfg.min_docs:
        tests[["ci_lo", "ci_hi", "se", "p_value"]] = np.nan
    if len(tests):
        tests["p_holm"] = holm(tests.p_value)
    return tests, short


def summarise(units: pd.DataFrame, counts: pd.DataFrame, *, layer: int, n_tokens: int, n_docs: int,
              n_docs_store: int, n_top: int) -> pd.DataFrame:
    """summary.csv: medians (and quartiles) per rule, unit type, subset (all scored units; density-matched) and
    family. ``counts``: per (rule, unit_type) n_candidates, n_silent and boot_short."""
    both = pd.concat([units.assign(subset="all"), units[units.matched].assign(subset="matched")], ignore_index=True)
    g = both.groupby(["rule", "unit_type", "subset", "concept_family"], sort=False)
    summary = g.agg(n_units=("unit", "size"), median_density=("density", "median"),
                    median_entropy=("entropy", "median"), median_entropy_norm=("entropy_norm", "median"),
                    q25_entropy_norm=("entropy_norm", lambda x: x.quantile(0.25)),
                    q75_entropy_norm=("entropy_norm", lambda x: x.quantile(0.75)),
                    median_specificity=("specificity", "median"), median_sensitivity=("sensitivity", "median"),
                    median_f1=("f1", "median"), frac_specific=("specificity", lambda x: float((x >= 0.9).mean())),
                    top_concept=("best_concept", lambda x: x.mode().iloc[0])).reset_index()
    summary = summary.merge(counts, on=["rule", "unit_type"], how="left")
    summary["n_skipped"] = summary.n_candidates - summary.n_units
    summary = summary.assign(layer=layer, n_tokens=n_tokens, n_docs=n_docs, n_docs_store=n_docs_store, n_top=n_top)
    first = ["rule", "unit_type", "subset", "concept_family", "layer", "n_tokens", "n_docs", "n_docs_store", "n_top",
             "n_candidates", "n_silent", "n_units", "n_skipped", "boot_short"]
    return summary[first + [c for c in summary.columns if c not in first]]


def sample_tokens(store, n: int, *, seed: int) -> tuple[np.ndarray, dict, int]:
    """Rows of ``store`` spread over its documents (:func:`spread_rows`), their metadata, and the number of
    documents the store holds."""
    meta = store.meta()
    eligible = (meta["label"] >= 0) & (meta["doc_id"] >= 0)
    rows = spread_rows(np.where(eligible, meta["doc_id"], -1), n, seed=seed)
    return rows, {k: v[rows] for k, v in meta.items()}, len(np.unique(meta["doc_id"][eligible]))


def run(ctx, cfg: Config) -> dict:
    store = ctx.store("heldout")
    rows, meta, n_docs_store = sample_tokens(store, cfg.tokens, seed=cfg.seed)
    layer = store.layers[len(store.layers) // 2]
    n_top = max(cfg.min_top, round(cfg.top_fraction * len(rows)))
    doc_lang = {d.key: d.lang for d in ctx.corpus.documents}
    concepts = concept_labels(meta, label_names=store.label_names, doc_keys=store.doc_keys, doc_lang=doc_lang,
                              tokenizer=ctx.model.tokenizer, lang_min_fraction=cfg.lang_min_fraction)
    doc_N = torch.from_numpy(np.unique(meta["doc_id"], return_inverse=True)[1].astype(np.int64))
    families = {f: (torch.from_numpy(codes), len(names)) for f, (codes, names) in concepts.items() if len(names) > 1}
    acts = unit_activations(ctx, rows, meta, layer, cfg)
    relerr = acts.pop("resid_relerr")
    units = {t: prepare_units(*acts.pop(t), families, doc_N, n_top=n_top, depth=cfg.boot_depth * n_top,
                              fires=t in DICT_TYPES) for t in ALL_TYPES}
    ms, mc = density_match(units["sae"].density, units["crosscoder"].density, bins_per_decade=cfg.match_bins,
                           seed=cfg.seed)
    matched = {"sae": ms, "crosscoder": mc}
    frame = units_frame(units, matched, concepts, n_top)
    tests, short = compare_types(units, matched, families, doc_N, n_top=n_top, cfg=cfg)
    counts = pd.DataFrame([{"rule": r, "unit_type": t, "n_candidates": u.n_candidates, "n_silent": u.n_silent,
                            "boot_short": short.get(t, float("nan")) if r == "top" else float("nan")}
                           for t, u in units.items() for r in RULES])
    n_docs = int(doc_N.max()) + 1
    summary = summarise(frame, counts, layer=layer, n_tokens=len(rows), n_docs=n_docs,
                        n_docs_store=n_docs_store, n_top=n_top)
    out = ctx.results(NAME)
    for name, table in (("units", frame), ("summary", summary), ("tests", tests),
                        ("concepts", concept_table(concepts, meta["doc_id"], store.label_names))):
        write_csv(table, out / f"{name}.csv")
    head = tests[(tests.rule == "top") & (tests.subset == "matched") & (tests.metric == "entropy_norm")]
    return {"layer": layer, "n_tokens": len(rows), "n_docs": n_docs, "n_top": n_top, "n_matched": len(ms),
            "resid_relerr": round(relerr, 4),
            "matched_entropy_diff": {f: [round(float(v), 4) for v in (r.delta, r.ci_lo, r.ci_hi)]
                                     for f, r in zip(head.concept_family, head.itertuples())}}


# ----------------------------------------------------------------------------- figures, tables, answer

def _type_order(frame: pd.DataFrame) -> list[str]:
    return [t for t in ALL_TYPES if t in set(frame.unit_type)]


def _palette() -> dict:
    import seaborn as sns

    colours = sns.color_palette("colorblind", 4) + sns.color_palette("pastel", 4)[:3] + [(0.6, 0.6, 0.6)]
    return dict(zip(ALL_TYPES, colours))


def _violins(units: pd.DataFrame, metric: str, ylabel: str, path: Path):
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    top = units[units.rule == "top"]
    families = [f for f in FAMILIES if f in set(top.concept_family)]
    order = _type_order(top)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        sub = top[top.concept_family == family]
        sns.violinplot(data=sub, x="unit_type", y=metric, hue="unit_type", order=order, hue_order=order,
                       palette=_palette(), cut=0, inner="quartile", density_norm="width", legend=False, ax=ax)
        ax.set_title(FAMILY_LABELS[family])
        ax.set_xlabel("")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(order)), [TYPE_LABELS[t].replace(" ", "\n", 1) for t in order], fontsize=7)
    return save_figure(fig, path)


def _pair_label(row) -> str:
    rule = " (f>0)" if row.rule == "fires" else ""
    subset = ", matched" if row.subset == "matched" else ""
    return f"{TYPE_LABELS[row.a]} vs {TYPE_LABELS[row.b]}{subset}{rule}"


def _intervals(tests: pd.DataFrame, path: Path):
    import matplotlib.pyplot as plt

    theme()
    sel = tests[tests.metric == "entropy_norm"]
    families = [f for f in FAMILIES if f in set(sel.concept_family)]
    fig, axes = plt.subplots(1, len(families), figsize=(3.6 * len(families), 0.3 * len(COMPARISONS) + 1.6),
                             sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        sub = sel[sel.concept_family == family].reset_index(drop=True)
        y = np.arange(len(sub))[::-1]
        sig = (sub.p_holm < 0.05).to_numpy()
        for mask, colour in ((sig, "black"), (~sig, "0.6")):  # a percentile interval need not contain the estimate
            ax.hlines(y[mask], sub.ci_lo[mask], sub.ci_hi[mask], color=colour, lw=1)
            ax.plot(sub.delta[mask], y[mask], "o", color=colour, ms=3)
        ax.axvline(0, color="0.3", lw=0.8, ls="--")
        ax.set_title(FAMILY_LABELS[family] + ("" if family not in DEPENDENT_FAMILIES else " (coarsens source)"))
        ax.set_xlabel("difference of median H / log C (a - b)")
        ax.set_yticks(y, [_pair_label(r) for r in sub.itertuples()], fontsize=7)
    return save_figure(fig, path)


def figures(results, figures_dir, cfg: Config) -> list:
    units = read_csv(results, "units")
    summary = read_csv(results, "summary")
    tests = read_csv(results, "tests")
    s = summary[summary.rule == "top"].iloc[0]
    setup = (f"Each unit's active set is its {int(s.n_top)} highest activations among {int(s.n_tokens):,} held-out "
             f"tokens from {int(s.n_docs)} documents (layer {int(s.layer)}); signed units count each sign as a unit; "
             "random directions and untrained dictionaries are the controls, random tokens an extra reference; "
             "dashed lines: medians, dotted: quartiles.")
    out = []
    path = _violins(units, "entropy_norm", "concept entropy / log C", Path(figures_dir) / f"{NAME}_entropy.png")
    out.append((path, "Polysemanticity: concept entropy (normalised by log of the number of concepts; 0 = one "
                      "concept) of each unit's active tokens, by unit type and concept family. " + setup))
    path = _violins(units, "specificity", "specificity P(best concept | active)",
                    Path(figures_dir) / f"{NAME}_specificity.png")
    out.append((path, "Polysemanticity: specificity of each unit for its most frequent concept, by unit type and "
                      "concept family. " + setup))
    path = _intervals(tests, Path(figures_dir) / f"{NAME}_intervals.png")
    out.append((path, f"Polysemanticity: differences of median normalised concept entropy between unit types (a - b; "
                      f"negative: a is more monosemantic) with 95\\% intervals from {int(tests.n_boot.iloc[0])} "
                      f"bootstrap resamples of the {int(tests.n_docs.iloc[0])} documents; black: Holm-adjusted "
                      "p < 0.05. Matched: equal numbers of SAE and crosscoder latents with matched firing density."))
    return out


def _subset_rows(top: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    rows = [(TYPE_LABELS[t], t, top[(top.unit_type == t) & (top.subset == "all")]) for t in _type_order(top)]
    rows += [(TYPE_LABELS[t] + " (matched)", t, top[(top.unit_type == t) & (top.subset == "matched")])
             for t in ("sae", "crosscoder") if ((top.unit_type == t) & (top.subset == "matched")).any()]
    return rows


def tables(results, tables_dir, cfg: Config) -> list:
    summary = read_csv(results, "summary")
    tests = read_csv(results, "tests")
    top = summary[summary.rule == "top"]
    wide = []
    for label, _, sub in _subset_rows(top):
        sub = sub.set_index("concept_family")
        row = {"type": label, "n": int(sub.n_units.iloc[0]), "density": float(sub.median_density.iloc[0])}
        for f in FAMILIES:
            if f in sub.index:
                row[f"H_{f}"] = float(sub.loc[f, "median_entropy_norm"])
                row[f"S_{f}"] = float(sub.loc[f, "median_specificity"])
        wide.append(row)
    wide = pd.DataFrame(wide)
    cols = {"type": "unit type", "n": "units", "density": "median density"}
    for f in FAMILIES:
        if f"H_{f}" in wide:
            cols[f"H_{f}"] = f"H/log C ({FAMILY_LABELS[f]})"
            cols[f"S_{f}"] = f"spec. ({FAMILY_LABELS[f]})"
    s = top.iloc[0]
    main = latex_table(wide, Path(tables_dir) / f"{NAME}.tex", columns=cols, label=f"tab:{NAME}",
                       caption=(f"Polysemanticity at layer {int(s.layer)}: median normalised concept entropy "
                                f"(lower = more monosemantic) and median specificity for the best concept, over "
                                f"each unit's top {int(s.n_top)} of {int(s.n_tokens):,} held-out tokens from "
                                f"{int(s.n_docs)} documents. Units: scored units (at least {int(s.n_top)} positive "
                                "activations); matched: the density-matched SAE and crosscoder subsets."))
    sel = tests[tests.metric == "entropy_norm"].copy()
    sel["pair"] = [_pair_label(r) for r in sel.itertuples()]
    sel["family"] = [FAMILY_LABELS[f] + ("*" if f in DEPENDENT_FAMILIES else "") for f in sel.concept_family]
    sel["ci"] = [f"[{lo:+.3f}, {hi:+.3f}]" if lo == lo else "--" for lo, hi in zip(sel.ci_lo, sel.ci_hi)]
    path = latex_table(sel, Path(tables_dir) / f"{NAME}_tests.tex", label=f"tab:{NAME}:tests",
                       columns={"family": "family", "pair": "a vs b", "n_a": "n a", "n_b": "n b",
                                "median_a": "median a", "median_b": "median b", "delta": "a - b", "ci": "95 % CI",
                                "p_holm": "p (Holm)"},
                       caption=(f"Differences of median normalised concept entropy between unit types with 95\\% "
                                f"intervals from {int(tests.n_boot.iloc[0])} bootstrap resamples of the "
                                f"{int(tests.n_docs.iloc[0])} documents (rule top unless marked f>0); negative: a is "
                                "more monosemantic. Holm over every row of tests.csv (both metrics). *Language "
                                "coarsens the source label: not independent evidence."))
    return [main, path]


def _p_num(p: float) -> str:
    """A p-value as LaTeX math content (without ``$``)."""
    if p != p:
        return "\\text{n/a}"
    if p >= 1e-3:
        return f"{p:.3f}"
    if p <= 1e-300:
        return "{<}10^{-300}"
    exponent = math.floor(math.log10(p))
    return f"{p / 10 ** exponent:.1f}\\times10^{{{exponent}}}"


def _delta(row) -> str:
    """``$\\Delta=...$ [lo, hi], Holm $p=...$`` of one tests.csv row."""
    if row.delta != row.delta:
        return "n/a (no units)"
    if row.ci_lo != row.ci_lo:
        return f"$\\Delta={row.delta:+.3f}$ (no interval)"
    return (f"$\\Delta={row.delta:+.3f}$ [{row.ci_lo:+.3f}, {row.ci_hi:+.3f}], Holm $p={_p_num(float(row.p_holm))}$")


def _outcome(row, metric: str) -> int | None:
    """-1 / +1: a is more / less monosemantic (interval excludes 0 and Holm p < 0.05); 0: no difference detected;
    None: not tested."""
    if row.p_holm != row.p_holm:
        return None
    if not (row.p_holm < 0.05 and (row.ci_lo > 0 or row.ci_hi < 0)):
        return 0
    return int(np.sign(row.delta)) * (1 if metric == "entropy_norm" else -1)


def _rows(tests: pd.DataFrame, rule: str, subset: str, a: str, b: str, metric: str) -> pd.DataFrame:
    sel = tests[(tests.rule == rule) & (tests.subset == subset) & (tests.a == a) & (tests.b == b)
                & (tests.metric == metric)]
    return sel.set_index("concept_family").reindex([f for f in FAMILIES if f in set(sel.concept_family)])


def _sample_text(s, concepts: pd.DataFrame) -> str:
    src = concepts[concepts.concept_family == "source"].sort_values("n_docs", ascending=False)
    have, missing = src[src.n_docs > 0], src[src.n_docs == 0]
    text = (f"The {int(s.n_tokens):,} held-out tokens come from {int(s.n_docs)} documents (the held-out store holds "
            f"{int(s.n_docs_store)}; each contributes about the same number of consecutive tokens), covering "
            + ("every" if missing.empty else f"{len(have)} of {len(src)}") + " source label"
            + ("s" if len(have) > 1 else "") + ": " + ", ".join(f"{latex_escape(r.concept)} ({int(r.n_docs)} "
                                                                  f"document{'s' * (r.n_docs != 1)})"
                                                                  for r in have.itertuples()) + ".")
    if not missing.empty:
        text += " No document of " + ", ".join(latex_escape(c) for c in missing.concept) + "."
    if int(s.n_docs) < 200:
        text += (f" That is fewer than 200 documents, because the held-out store has only {int(s.n_docs_store)}; "
                 "the intervals below are correspondingly wide.")
    return text


def _medians_text(top: pd.DataFrame) -> str:
    items = []
    for f in FAMILIES:
        sub = top[(top.concept_family == f) & (top.subset == "all")].set_index("unit_type")
        if sub.empty:
            continue
        parts = ", ".join(f"{latex_escape(TYPE_LABELS[t])} {fmt(float(sub.loc[t, 'median_entropy_norm']))} / "
                          f"{fmt(float(sub.loc[t, 'median_specificity']))}" for t in _type_order(sub.reset_index()))
        items.append(f"\\item {latex_escape(FAMILY_LABELS[f])} (entropy / specificity): {parts}.")
    return ("Median normalised concept entropy $H/\\log C$ (0 = one concept, 1 = uniform) and median specificity "
            "of each unit type's scored units (random tokens: an extra reference only):\n\\begin{itemize}\n"
            + "\n".join(items) + "\n\\end{itemize}")


def _headline_text(tests: pd.DataFrame, summary: pd.DataFrame) -> str:
    m = summary[(summary.rule == "top") & (summary.subset == "matched") & (summary.concept_family == "source")]
    m = m.set_index("unit_type")
    if not {"sae", "crosscoder"} <= set(m.index):
        return "No SAE and crosscoder latents could be matched in firing density, so there is no matched comparison."
    a = summary[(summary.rule == "top") & (summary.subset == "all") & (summary.concept_family == "source")]
    a = a.set_index("unit_type")
    text = (f"Headline, at equal width and density: {int(m.loc['sae', 'n_units'])} per-layer SAE latents (of "
            f"{int(a.loc['sae', 'n_units'])} scored, {int(a.loc['sae', 'n_candidates'])} in all) and as many crosscoder "
            f"latents (of {int(a.loc['crosscoder', 'n_units'])} scored, {int(a.loc['crosscoder', 'n_candidates'])} "
            f"in all) with matched firing densities (median {fmt(float(m.loc['sae', 'median_density']))} vs "
            f"{fmt(float(m.loc['crosscoder', 'median_density']))}). SAE minus crosscoder, medians over latents, 95\\% "
            "document-bootstrap intervals:")
    verdicts = []
    for metric, what in (("entropy_norm", "entropy"), ("specificity", "specificity")):
        rows = _rows(tests, "top", "matched", "sae", "crosscoder", metric)
        text += f" {what}: " + "; ".join(f"{latex_escape(FAMILY_LABELS[f])} {_delta(r)}" for f, r in rows.iterrows())
        text += "."
        verdicts += [(f, what, _outcome(r, metric)) for f, r in rows.iterrows() if f not in DEPENDENT_FAMILIES]
    said = {-1: "the SAE latents are more monosemantic", 1: "the crosscoder latents are more monosemantic",
            0: "no difference after Holm's correction", None: "not tested (too few documents or units)"}
    text += " Reading: " + "; ".join(f"{what} on {latex_escape(FAMILY_LABELS[f])}: {said[o]}"
                                     for f, what, o in verdicts) + "."
    if verdicts and all(o == 0 for *_, o in verdicts):
        text += (" At this sample the numbers support no difference in monosemanticity between matched SAE and "
                 "crosscoder latents on these labels, within the intervals above.")
    return text


def _controls_text(tests: pd.DataFrame) -> str:
    parts = []
    for a, b in (("sae", "sae_init"), ("crosscoder", "crosscoder_init"), ("sae", "random_dir"),
                 ("crosscoder", "random_dir"), ("neuron", "random_dir"), ("basis", "random_dir")):
        rows = _rows(tests, "top", "all", a, b, "entropy_norm")
        rows = rows[[f not in DEPENDENT_FAMILIES for f in rows.index]]
        if rows.empty:
            continue
        outcomes = [_outcome(r, "entropy_norm") for _, r in rows.iterrows()]
        verdict = ("not tested" if None in outcomes else "lower entropy" if all(o == -1 for o in outcomes)
                   else "higher entropy" if all(o == 1 for o in outcomes) else "no consistent difference")
        parts.append(f"{latex_escape(TYPE_LABELS[a])} vs {latex_escape(TYPE_LABELS[b])}: {verdict} ("
                     + "; ".join(f"{latex_escape(FAMILY_LABELS[f])} {_delta(r)}" for f, r in rows.iterrows()) + ")")
    return ("Against the controls that share the data's structure (entropy differences a $-$ control; the chance "
            "level is what an untrained dictionary or a random residual direction scores on the same documents): "
            + "; ".join(parts) + ".") if parts else ""


def _others_text(tests: pd.DataFrame) -> str:
    parts = []
    for rule, subset, a, b in (("top", "all", "sae", "crosscoder"), ("fires", "matched", "sae", "crosscoder"),
                               ("top", "all", "sae", "neuron"), ("top", "all", "crosscoder", "neuron"),
                               ("top", "all", "neuron", "basis")):
        rows = _rows(tests, rule, subset, a, b, "entropy_norm")
        rows = rows[[f not in DEPENDENT_FAMILIES for f in rows.index]]
        if len(rows):
            label = _pair_label(rows.iloc[0])
            parts.append(f"{latex_escape(label)}: " + "; ".join(f"{latex_escape(FAMILY_LABELS[f])} {_delta(r)}"
                                                                 for f, r in rows.iterrows()))
    return ("Other entropy comparisons (a $-$ b): " + ". ".join(parts) + ".") if parts else ""


def _language_text(concepts: pd.DataFrame) -> str:
    lang = concepts[(concepts.concept_family == "language") & (concepts.n_tokens > 0)]
    if lang.empty:
        return ""
    srcs = [str(s).split("|") if s == s and s else [] for s in lang.sources]
    split = sorted({x for s in srcs for x in s if sum(x in t for t in srcs) > 1})
    mapping = "; ".join(f"{latex_escape(c)} $\\leftarrow$ {latex_escape(', '.join(s))}"
                        for c, s in zip(lang.concept, srcs))
    return ("Language is a coarsening of the source label (" + mapping + ")"
            + (f"; only {latex_escape(', '.join(split))} spans several languages" if split else "")
            + "; its rows in tests.csv are not counted as evidence beyond the source label's.")


def _method_text(tests: pd.DataFrame, s, short: float, cfg: Config) -> str:
    n_docs, n_boot = int(tests.n_docs.iloc[0]), int(tests.n_boot.iloc[0])
    if tests.ci_lo.isna().all():
        text = (f"With {n_docs} documents (fewer than {cfg.min_docs}) the sample is too small for intervals or "
                "$p$-values over documents, so none are reported and no difference is claimed. ")
    else:
        text = (f"Intervals and $p$-values come from {n_boot} bootstrap resamples of the {n_docs} documents, every "
                f"unit's active set recomputed in each, with Holm's correction over all {len(tests)} rows of "
                "tests.csv; they measure the uncertainty from the text with the trained dictionaries fixed (the "
                "run's first seed), not the variation between training runs. ")
        if short == short:
            text += (f"In at most {100 * short:.1f}\\% of resampled active sets (per unit type) a unit had fewer than "
                     f"{int(s.n_top)} positive tokens among its top {cfg.boot_depth * int(s.n_top)} in the drawn "
                     "documents. ")
    return text + ("The labels are coarse (source, language, token class): a unit tracking a finer concept still "
                   "spreads over several of them.")


def answer(results, cfg: Config) -> str:
    summary = read_csv(results, "summary")
    tests = read_csv(results, "tests")
    concepts = read_csv(results, "concepts")
    top = summary[summary.rule == "top"]
    s = top.iloc[0]
    lines = [_sample_text(s, concepts) + f" Units at layer {int(s.layer)} are scored on their top {int(s.n_top)} "
             "activations (equal sample sizes for every unit type).",
             _medians_text(top), _headline_text(tests, summary), _controls_text(tests), _others_text(tests),
             _language_text(concepts), _method_text(tests, s, top[top.subset == "all"].boot_short.max(), cfg)]
    return "\n\n".join(line for line in lines if line)


STUDY = Study(name=NAME, title="Polysemanticity of MLP neurons, residual basis directions, SAE and crosscoder features",
              config=Config, run=run, figures=figures, tables=tables, answer=answer,
              dictionaries=("saes", "crosscoder"), order=30,
              presets={"micro": Config(tokens=1_024, n_boot=100, min_docs=2), "paper": Config(tokens=65_536, n_boot=1000)})
