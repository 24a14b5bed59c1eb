"""Polysemanticity: how many concepts does one unit respond to, for four kinds of unit?

Question: on the corpus's own concept labels, are per-layer SAE features or crosscoder features
more monosemantic, and how do both compare with the model's MLP neurons and the residual stream's
basis directions (research-notes §4; Towards Monosemanticity, Bricken et al. 2023, §"Detailed
investigations": specificity and sensitivity of a feature for a concept)?

Method:
1. Tokens: the first ``Config.tokens`` rows of the held-out store (position 0, separators and
   norm outliers were excluded at harvest). Each token gets one concept in each of three families:
   ``source`` (the corpus source label of its document), ``language`` (the document's language:
   ``code`` for Python sources, ISO codes otherwise; languages under 1 % of the sample are pooled
   as ``other``) and ``token_class`` (from the decoded token string, see :func:`token_class`:
   whitespace, digit, code keyword, punctuation, capitalised word, lowercase word, other). Code
   keywords are Python's keywords minus the ten that are common English words (``and as for from
   if in is not or with``), which would otherwise make most English prose tokens "code".
2. Units, all at the middle stored layer L (layer 12 of the demo's 8-15; the same residual the
   per-layer SAE of L reads): (a) ``neuron``: MLP neurons of block L (``blocks.L.mlp.hook_post``,
   the model re-run on the held-out windows up to block L and aligned with the rows by window and
   position; the re-run residual is checked against the store); (b) ``basis``: the coordinates of
   ``resid_post`` at L in raw units; (c) ``sae``: the latents of the main per-layer SAE of L;
   (d) ``crosscoder``: all latents of the main crosscoder. The crosscoder reads every stored layer,
   so each of its latents is a function of the token's residual at L among others; choosing only
   latents whose decoder peaks at L would select on decoder geometry (and, at the demo, on a few
   dozen live latents), so all are kept and each unit's peak layer is recorded (``peak_layer``).
   Neurons (gated SiLU products) and basis coordinates are signed, while dictionary latents are
   non-negative: each dense unit is split into its two half-lines, ``+x`` and ``-x``, which are
   scored as separate units (``n17+``, ``n17-``), so every unit is a one-sided detector.
   A fifth type, ``random``, scores random token sets (uniform random activations): the chance
   level of each metric given the concepts' base rates.
3. Active tokens. Fairness across unit types is the point: plug-in entropy falls and specificity
   rises as a unit's sample shrinks, and density differs by orders of magnitude between a neuron
   (always non-zero), an SAE latent (k/width of tokens) and a crosscoder latent. Main rule ``top``
   (all types): a unit's active set is its ``n_top = max(20, round(1 % of tokens))`` highest
   activations (the tokens above its 99th percentile), all of which must be positive; a unit with
   fewer positive activations is skipped (mostly silent dictionary latents; counts in summary.csv).
   Every scored unit thus has exactly ``n_top`` active tokens. Second rule ``fires`` (dictionary
   latents only; dense units have no natural firing threshold): active = f > 0, for units firing
   at least ``n_top`` times; it gives the dictionaries' own sensitivity.
4. Per unit and family with C concepts present in the sample: counts n_i(c) over its active set,
   p_i(c) = n_i(c) / n_i; concept entropy H_i = -sum_c p_i(c) log p_i(c) (nats) and H_i / log C;
   best concept = argmax_c p_i(c); specificity = P(c* | active) = max_c p_i(c); sensitivity =
   P(active | c*) = n_i(c*) / #tokens of c* (bounded by n_top / #c* under rule ``top``); F1 = their
   harmonic mean. All vectorised over tokens and units (top-k along tokens, scatter-add counts).
5. Statistics: medians per unit type; two-sided Mann-Whitney U tests (``scipy.stats``) between
   every pair of unit types (rule ``top``; also each type against ``random``) and SAE vs crosscoder
   (rule ``fires``), for entropy, specificity and F1 in each family; effect size = rank-biserial
   correlation r = 2U/(n_a n_b) - 1 (positive: type a's values tend to be larger; for entropy,
   larger means less monosemantic); Holm-adjusted p-values over the whole table. Units of one
   type are not independent (two halves of one neuron, latents of one dictionary), so p-values
   are optimistic; with hundreds of units per type even small shifts are "significant", and the
   effect sizes are the numbers to read.

Outputs (``results/polysemanticity/``): ``units.csv`` (rule, unit_type, unit, peak_layer,
concept_family, n_active, entropy, entropy_norm, best_concept, specificity, sensitivity, f1),
``summary.csv`` (rule, unit_type, concept_family, layer, n_tokens, n_top, n_candidates, n_silent,
n_units, n_skipped, medians and quartiles), ``tests.csv`` (rule, concept_family, metric, a, b, n_a,
n_b, median_a, median_b, U, p_value, p_holm, effect_size) and ``concepts.csv`` (concept_family,
concept, n_tokens, fraction).

Answer
    Generated from the CSVs by every run into ``paper/tables/polysemanticity_answer.tex`` (numbers are never
    typed here).
"""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crosslayer.errors import CrosslayerError
from crosslayer.io import write_csv
from crosslayer.dictionary import check_compatible
from studies.base import Study
from studies.common import fmt, latex_escape, latex_table, read_csv, save_figure, theme

NAME = "polysemanticity"

UNIT_TYPES = ("neuron", "basis", "sae", "crosscoder")
"""The four approaches compared (``random`` is the chance reference)."""
NULL_TYPE = "random"
TYPE_LABELS = {"neuron": "MLP neuron", "basis": "residual basis", "sae": "per-layer SAE",
               "crosscoder": "crosscoder", "random": "random tokens"}
FAMILIES = ("source", "language", "token_class")
FAMILY_LABELS = {"source": "source label", "language": "language", "token_class": "token class"}
RULES = ("top", "fires")
PAIRS = (("sae", "crosscoder"), ("sae", "neuron"), ("crosscoder", "neuron"), ("sae", "basis"),
         ("crosscoder", "basis"), ("neuron", "basis"))
"""Pairs of unit types tested against each other (each type is also tested against ``random``)."""
METRICS = ("entropy", "specificity", "f1")
"""Metrics tested between unit types (entropy_norm is entropy rescaled within a family)."""

BATCH_ROWS = 1024


@dataclass(frozen=True)
class Config:
    """Settings of the polysemanticity study (defaults: the demo preset)."""

    tokens: int = 8_192
    """Held-out tokens (the store's first rows) on which units are labelled."""
    top_fraction: float = 0.01
    """Rule ``top``: the active set is the top ``top_fraction`` of tokens (at least ``min_top``)."""
    min_top: int = 20
    n_random: int = 1024
    """Random-token reference units."""
    lang_min_fraction: float = 0.01
    """Languages with a smaller share of the sample are pooled as ``other``."""

ENGLISH_KEYWORDS = {"and", "as", "for", "from", "if", "in", "is", "not", "or", "with"}
CODE_KEYWORDS = frozenset(set(keyword.kwlist) - ENGLISH_KEYWORDS)


# ----------------------------------------------------------------------------- concepts

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


# ----------------------------------------------------------------------------- metrics

def active_counts(acts_NU: torch.Tensor, concepts_N, n_concepts: int, *, rule: str,
                  n_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept counts of each unit's active tokens ``[U, C]`` and active-set sizes ``[U]``.

    ``rule="top"``: a unit's ``n_top`` largest activations that are positive; ``rule="fires"``:
    every positive activation.
    """
    concepts_N = torch.as_tensor(np.asarray(concepts_N), dtype=torch.long)
    n_tok, n_units = acts_NU.shape
    if rule == "top":
        vals_KU, idx_KU = acts_NU.topk(min(n_top, n_tok), dim=0)
        valid_KU = (vals_KU > 0).float()
        flat_KU = torch.arange(n_units)[None, :] * n_concepts + concepts_N[idx_KU]
        counts = torch.zeros(n_units * n_concepts).index_add_(0, flat_KU.reshape(-1), valid_KU.reshape(-1))
        return counts.view(n_units, n_concepts), valid_KU.sum(0)
    if rule == "fires":
        onehot_NC = torch.nn.functional.one_hot(concepts_N, n_concepts).float()
        counts_UC = torch.cat([(acts_NU[:, s:s + 2048] > 0).float().T @ onehot_NC
                               for s in range(0, n_units, 2048)]) if n_units else torch.zeros(0, n_concepts)
        return counts_UC, counts_UC.sum(1)
    raise CrosslayerError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")


def unit_metrics(counts_UC: torch.Tensor, totals_C: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy (nats and / log C), best concept, specificity, sensitivity and F1 of each unit.

    ``counts_UC``: concept counts of each unit's active tokens; ``totals_C``: tokens per concept
    in the sample (C = concepts with at least one token).
    """
    counts_UC, totals_C = counts_UC.double(), torch.as_tensor(totals_C).double()
    n_U = counts_UC.sum(1)
    p_UC = counts_UC / n_U.clamp(min=1)[:, None]
    entropy = -(p_UC * p_UC.clamp(min=1e-300).log()).sum(1)
    n_present = int((totals_C > 0).sum())
    entropy_norm = entropy / math.log(n_present) if n_present > 1 else torch.full_like(entropy, float("nan"))
    specificity, best = p_UC.max(1)
    sensitivity = counts_UC.gather(1, best[:, None])[:, 0] / totals_C[best].clamp(min=1)
    f1 = 2 * specificity * sensitivity / (specificity + sensitivity).clamp(min=1e-12)
    return {"entropy": entropy.clamp(min=0), "entropy_norm": entropy_norm.clamp(min=0), "best": best,
            "specificity": specificity, "sensitivity": sensitivity, "f1": f1, "n_active": n_U}


def rank_biserial(u: float, n_a: int, n_b: int) -> float:
    """Rank-biserial correlation of a Mann-Whitney U of sample a: P(a > b) - P(a < b)."""
    return 2.0 * u / (n_a * n_b) - 1.0


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaNs kept)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(order) - np.arange(len(order)))))
    out[order] = adjusted
    return out


def compare_types(units: pd.DataFrame) -> pd.DataFrame:
    """Mann-Whitney U tests between unit types (see the module docstring, step 5)."""
    from scipy.stats import mannwhitneyu

    rows = []
    present = set(units.unit_type)
    pairs = {"top": list(PAIRS) + [(a, NULL_TYPE) for a in UNIT_TYPES], "fires": [("sae", "crosscoder")]}
    for rule, rule_pairs in pairs.items():
        for family in FAMILIES:
            sub = units[(units.rule == rule) & (units.concept_family == family)]
            for metric in METRICS:
                for a, b in rule_pairs:
                    if a not in present or b not in present:
                        continue
                    xa = sub.loc[sub.unit_type == a, metric].dropna().to_numpy()
                    xb = sub.loc[sub.unit_type == b, metric].dropna().to_numpy()
                    if len(xa) < 2 or len(xb) < 2:
                        u = p = eff = float("nan")
                    else:
                        res = mannwhitneyu(xa, xb, alternative="two-sided")
                        u, p = float(res.statistic), float(res.pvalue)
                        eff = rank_biserial(u, len(xa), len(xb))
                    rows.append({"rule": rule, "concept_family": family, "metric": metric, "a": a, "b": b,
                                 "n_a": len(xa), "n_b": len(xb),
                                 "median_a": float(np.median(xa)) if len(xa) else float("nan"),
                                 "median_b": float(np.median(xb)) if len(xb) else float("nan"),
                                 "U": u, "p_value": p, "effect_size": eff})
    tests = pd.DataFrame(rows)
    if len(tests):
        tests["p_holm"] = holm(tests.p_value)
    return tests


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


def unit_activations(ctx, rows: np.ndarray, meta: dict, layer: int, n_random: int) -> dict:
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
    resid, sae_f, cc_f = [], [], []
    with torch.no_grad():
        for s in range(0, len(rows), BATCH_ROWS):
            x_BLD = store.get(rows[s:s + BATCH_ROWS], layers=store.layers)
            resid.append(x_BLD[:, store.layers.index(layer)])
            sae_f.append(saes.encode(_layers_of(x_BLD, store, saes), normalized=False)[:, own_F])
            cc_f.append(cc.encode(_layers_of(x_BLD, store, cc), normalized=False))
        peak = torch.tensor(cc.layers)[cc.decoder_norms().argmax(1)].numpy()
    resid = torch.cat(resid)
    post, rerun = mlp_post(ctx.model, store.window_tokens(), meta["window"], meta["position"], layer,
                           batch_size=ctx.sizes.batch_size)
    relerr = float((rerun - resid).norm() / resid.norm().clamp(min=1e-12))
    if not relerr < 0.05:
        raise CrosslayerError(f"the model re-run on the held-out windows differs from the store at layer {layer} "
                              f"(relative error {relerr:.3f}); the store was harvested from other weights or windows")
    gen = torch.Generator().manual_seed(0)
    neuron, neuron_names = _two_sided(post, "n")
    basis, basis_names = _two_sided(resid, "e")
    n_sae = int(own_F.sum())
    return {"neuron": (neuron, neuron_names, np.full(neuron.shape[1], layer)),
            "basis": (basis, basis_names, np.full(basis.shape[1], layer)),
            "sae": (torch.cat(sae_f), [f"s{j}" for j in range(n_sae)], np.full(n_sae, layer)),
            "crosscoder": (torch.cat(cc_f), [f"c{j}" for j in range(cc.n_features)], peak),
            NULL_TYPE: (torch.rand(len(rows), n_random, generator=gen), [f"r{j}" for j in range(n_random)],
                        np.full(n_random, -1)),
            "resid_relerr": relerr}


def _layers_of(x_BLD: torch.Tensor, store, dictionary) -> torch.Tensor:
    """The dictionary's layers out of a batch of all the store's layers."""
    return x_BLD[:, [store.layers.index(l) for l in dictionary.layers]]


def score_units(acts: dict, concepts: dict, *, n_top: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """units.csv rows of every (rule, unit type, family) and the per-(rule, type) unit counts."""
    frames, counts = [], []
    for unit_type in UNIT_TYPES + (NULL_TYPE,):
        acts_NU, names, peak = acts[unit_type]
        rules = ("top", "fires") if unit_type in ("sae", "crosscoder") else ("top",)
        positive_U = (acts_NU > 0).sum(0)
        keep = torch.nonzero(positive_U >= n_top).flatten()  # the same units under both rules
        kept_names = np.asarray(names, dtype=object)[keep.numpy()]
        kept_peak = pd.Series(peak[keep.numpy()], dtype="Int64").mask(peak[keep.numpy()] < 0)
        for rule in rules:
            for family, (codes, concept_names) in concepts.items():
                if len(concept_names) < 2:
                    continue
                totals = torch.bincount(torch.from_numpy(codes), minlength=len(concept_names))
                c_UC, _ = active_counts(acts_NU, codes, len(concept_names), rule=rule, n_top=n_top)
                m = {k: v.numpy() for k, v in unit_metrics(c_UC[keep], totals).items()}
                frames.append(pd.DataFrame({
                    "rule": rule, "unit_type": unit_type, "unit": kept_names, "peak_layer": kept_peak.array,
                    "concept_family": family, "n_active": m["n_active"].astype(np.int64),
                    "entropy": m["entropy"], "entropy_norm": m["entropy_norm"],
                    "best_concept": np.asarray(concept_names, dtype=object)[m["best"]],
                    "specificity": m["specificity"], "sensitivity": m["sensitivity"], "f1": m["f1"]}))
            counts.append({"rule": rule, "unit_type": unit_type, "n_candidates": acts_NU.shape[1],
                           "n_silent": int((positive_U == 0).sum()), "n_units": len(keep)})
    units = pd.concat(frames, ignore_index=True)
    return units, pd.DataFrame(counts)


def summarise(units: pd.DataFrame, counts: pd.DataFrame, *, layer: int, n_tokens: int, n_top: int) -> pd.DataFrame:
    """summary.csv: medians (and quartiles) per rule, unit type and family."""
    g = units.groupby(["rule", "unit_type", "concept_family"], sort=False)
    summary = g.agg(median_entropy=("entropy", "median"), median_entropy_norm=("entropy_norm", "median"),
                    q25_entropy_norm=("entropy_norm", lambda x: x.quantile(0.25)),
                    q75_entropy_norm=("entropy_norm", lambda x: x.quantile(0.75)),
                    median_specificity=("specificity", "median"), median_sensitivity=("sensitivity", "median"),
                    median_f1=("f1", "median"), frac_specific=("specificity", lambda x: float((x >= 0.9).mean())),
                    top_concept=("best_concept", lambda x: x.mode().iloc[0])).reset_index()
    summary = summary.merge(counts, on=["rule", "unit_type"], how="left")
    summary["n_skipped"] = summary.n_candidates - summary.n_units
    summary.insert(3, "layer", layer)
    summary.insert(4, "n_tokens", n_tokens)
    summary.insert(5, "n_top", n_top)
    first = ["rule", "unit_type", "concept_family", "layer", "n_tokens", "n_top", "n_candidates", "n_silent",
             "n_units", "n_skipped"]
    return summary[first + [c for c in summary.columns if c not in first]]


def run(ctx, cfg: Config) -> dict:
    store = ctx.store("heldout")
    rows = np.arange(min(cfg.tokens, store.n_rows))
    meta = store.meta(rows)
    ok = (meta["label"] >= 0) & (meta["doc_id"] >= 0)
    rows, meta = rows[ok], {k: v[ok] for k, v in meta.items()}
    layer = store.layers[len(store.layers) // 2]
    n_top = max(cfg.min_top, round(cfg.top_fraction * len(rows)))
    doc_lang = {d.key: d.lang for d in ctx.corpus.documents}
    concepts = concept_labels(meta, label_names=store.label_names, doc_keys=store.doc_keys, doc_lang=doc_lang,
                              tokenizer=ctx.model.tokenizer, lang_min_fraction=cfg.lang_min_fraction)
    acts = unit_activations(ctx, rows, meta, layer, cfg.n_random)
    units, counts = score_units(acts, concepts, n_top=n_top)
    summary = summarise(units, counts, layer=layer, n_tokens=len(rows), n_top=n_top)
    tests = compare_types(units)
    concept_rows = [{"concept_family": f, "concept": name, "n_tokens": int(n), "fraction": n / len(rows)}
                    for f, (codes, names) in concepts.items()
                    for name, n in zip(names, np.bincount(codes, minlength=len(names)))]
    out = ctx.results(NAME)
    for name, frame in (("units", units), ("summary", summary), ("tests", tests),
                        ("concepts", pd.DataFrame(concept_rows))):
        write_csv(frame, out / f"{name}.csv")
    top = summary[summary.rule == "top"]
    med = {f: {t: round(float(v), 3) for t, v in zip(s.unit_type, s.median_entropy_norm)}
           for f, s in top.groupby("concept_family")}
    key = tests[(tests.rule == "top") & (tests.metric == "entropy") & (tests.a == "sae") & (tests.b == "crosscoder")]
    return {"layer": layer, "n_tokens": len(rows), "n_top": n_top, "resid_relerr": round(acts["resid_relerr"], 4),
            "median_entropy_norm": med,
            "p_sae_vs_crosscoder_entropy": {f: float(p) for f, p in zip(key.concept_family, key.p_value)}}


# ----------------------------------------------------------------------------- figures, tables, answer

def _type_order(frame: pd.DataFrame) -> list[str]:
    return [t for t in UNIT_TYPES + (NULL_TYPE,) if t in set(frame.unit_type)]


def _violins(units: pd.DataFrame, metric: str, ylabel: str, path: Path):
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    top = units[units.rule == "top"]
    families = [f for f in FAMILIES if f in set(top.concept_family)]
    order = _type_order(top)
    palette = dict(zip(UNIT_TYPES + (NULL_TYPE,), sns.color_palette("colorblind", 4) + [(0.6, 0.6, 0.6)]))
    fig, axes = plt.subplots(1, len(families), figsize=(3.6 * len(families), 3.6), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        sub = top[top.concept_family == family]
        sns.violinplot(data=sub, x="unit_type", y=metric, hue="unit_type", order=order, hue_order=order,
                       palette=palette, cut=0, inner="quartile", density_norm="width", legend=False, ax=ax)
        ax.set_title(FAMILY_LABELS[family])
        ax.set_xlabel("")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(order)), [TYPE_LABELS[t].replace(" ", "\n", 1) for t in order], fontsize=8)
    return save_figure(fig, path)


def figures(results, figures_dir, cfg: Config) -> list:
    units = read_csv(results, "units")
    summary = read_csv(results, "summary")
    s = summary[summary.rule == "top"].iloc[0]
    setup = (f"Each unit's active set is its {int(s.n_top)} highest activations among {int(s.n_tokens):,} held-out "
             f"tokens (layer {int(s.layer)}); MLP neurons and basis directions count each sign as a unit; "
             "random tokens give the chance level; dashed lines: medians, dotted: quartiles.")
    out = []
    path = _violins(units, "entropy_norm", "concept entropy / log C", Path(figures_dir) / f"{NAME}_entropy.png")
    out.append((path, "Polysemanticity: concept entropy (normalised by log of the number of concepts; 0 = one "
                      "concept) of each unit's active tokens, by unit type and concept family. " + setup))
    path = _violins(units, "specificity", "specificity P(best concept | active)",
                    Path(figures_dir) / f"{NAME}_specificity.png")
    out.append((path, "Polysemanticity: specificity of each unit for its most frequent concept, by unit type and "
                      "concept family. " + setup))
    return out


def tables(results, tables_dir, cfg: Config) -> list:
    summary = read_csv(results, "summary")
    tests = read_csv(results, "tests")
    top = summary[summary.rule == "top"]
    wide = []
    for t in _type_order(top):
        sub = top[top.unit_type == t].set_index("concept_family")
        row = {"type": TYPE_LABELS[t], "n": int(sub.n_units.iloc[0]), "skipped": int(sub.n_skipped.iloc[0])}
        for f in FAMILIES:
            if f in sub.index:
                row[f"H_{f}"] = float(sub.loc[f, "median_entropy_norm"])
                row[f"S_{f}"] = float(sub.loc[f, "median_specificity"])
        wide.append(row)
    wide = pd.DataFrame(wide)
    cols = {"type": "unit type", "n": "units", "skipped": "skipped"}
    for f in FAMILIES:
        if f"H_{f}" in wide:
            cols[f"H_{f}"] = f"H/log C ({FAMILY_LABELS[f]})"
            cols[f"S_{f}"] = f"spec. ({FAMILY_LABELS[f]})"
    s = top.iloc[0]
    main = latex_table(wide, Path(tables_dir) / f"{NAME}.tex", columns=cols, label=f"tab:{NAME}",
                       caption=(f"Polysemanticity at layer {int(s.layer)}: median normalised concept entropy "
                                f"(lower = more monosemantic) and median specificity for the best concept, over "
                                f"each unit's top {int(s.n_top)} of {int(s.n_tokens):,} held-out tokens. Skipped: "
                                "units with fewer positive activations (mostly silent dictionary latents)."))
    sel = tests[tests.metric.isin(["entropy", "specificity"]) & (tests.b != NULL_TYPE)].copy()
    sel["pair"] = [f"{TYPE_LABELS[a]} vs {TYPE_LABELS[b]}" + (" (f>0)" if r == "fires" else "")
                   for a, b, r in zip(sel.a, sel.b, sel.rule)]
    sel["family"] = sel.concept_family.map(FAMILY_LABELS)
    path = latex_table(sel, Path(tables_dir) / f"{NAME}_tests.tex", label=f"tab:{NAME}:tests",
                       columns={"family": "family", "metric": "metric", "pair": "a vs b", "median_a": "median a",
                                "median_b": "median b", "effect_size": "rank-biserial r", "p_holm": "p (Holm)"},
                       caption=("Two-sided Mann-Whitney U tests between unit types (rule top unless marked "
                                "f>0); r > 0: a's values tend to be larger. Entropy in nats."))
    return [main, path]


def _p_num(p: float) -> str:
    """A p-value as LaTeX math content (without ``$``)."""
    if p != p:
        return "\\text{n/a}"
    if p >= 1e-3:
        return f"{p:.3f}"
    if p <= 0:
        return "{<}10^{-300}"  # below double precision; scipy returns 0
    exponent = math.floor(math.log10(p))
    return f"{p / 10 ** exponent:.1f}\\times10^{{{exponent}}}"


def _tied(sub: pd.DataFrame, column: str, types: list[str], *, lowest: bool) -> str:
    """The unit type(s) with the lowest (or highest) value of ``column`` (ties named together)."""
    values = sub.loc[types, column]
    target = values.min() if lowest else values.max()
    return " and ".join(latex_escape(TYPE_LABELS[t]) for t in types if values[t] == target)


def _pair_rows(tests: pd.DataFrame, a: str, b: str, *, rule: str = "top", metric: str = "entropy") -> pd.DataFrame:
    rows = tests[(tests.rule == rule) & (tests.metric == metric) & (tests.a == a) & (tests.b == b)]
    return rows.set_index("concept_family").reindex([f for f in FAMILIES if f in set(rows.concept_family)])


def _pair_text(rows: pd.DataFrame) -> str:
    """``r = ..., ... (families; Holm p = ..., ...)`` for one pair's tests across families."""
    rs = ", ".join(f"{r:+.2f}" for r in rows.effect_size)
    ps = ", ".join(_p_num(float(p)) for p in rows.p_holm)
    fams = ", ".join(latex_escape(FAMILY_LABELS[f]) for f in rows.index)
    return f"$r={rs}$ ({fams}; Holm-adjusted $p$: ${ps}$)"


def answer(results, cfg: Config) -> str:
    summary = read_csv(results, "summary")
    tests = read_csv(results, "tests")
    units = read_csv(results, "units")
    concepts = read_csv(results, "concepts")
    top = summary[summary.rule == "top"]
    s = top.iloc[0]
    types = [t for t in UNIT_TYPES if t in set(top.unit_type)]
    lines = [f"On {int(s.n_tokens):,} held-out tokens at layer {int(s.layer)}, scoring every unit on its top "
             f"{int(s.n_top)} activations (equal sample sizes for all unit types), the median normalised concept "
             "entropy $H/\\log C$ (0 = a single concept, 1 = uniform; lower is more monosemantic) and median "
             "specificity for the best concept were:"]
    items, skewed = [], []
    for f in FAMILIES:
        sub = top[top.concept_family == f].set_index("unit_type")
        if sub.empty or not all(t in sub.index for t in types):
            continue
        parts = ", ".join(f"{latex_escape(TYPE_LABELS[t])} {fmt(float(sub.loc[t, 'median_entropy_norm']))} / "
                          f"{fmt(float(sub.loc[t, 'median_specificity']))}"
                          for t in types + [NULL_TYPE] if t in sub.index)
        items.append(f"\\item {latex_escape(FAMILY_LABELS[f])} (entropy / specificity): {parts}. Lowest entropy: "
                     f"{_tied(sub, 'median_entropy_norm', types, lowest=True)}; highest specificity: "
                     f"{_tied(sub, 'median_specificity', types, lowest=False)}.")
        entropy = sub["median_entropy_norm"]
        if NULL_TYPE in sub.index and (entropy[types] > entropy[NULL_TYPE]).any():
            fam = concepts[concepts.concept_family == f].sort_values("fraction", ascending=False).iloc[0]
            skewed.append(f"{latex_escape(FAMILY_LABELS[f])} (largest concept {latex_escape(fam.concept)}, "
                          f"{100 * fam.fraction:.0f}\\% of tokens)")
    lines.append("\\begin{itemize}\n" + "\n".join(items) + "\n\\end{itemize}")
    if skewed:
        lines.append("Entropy is measured against the concepts' base rates; where they are skewed, as for "
                     + ", ".join(skewed) + ", random token sets already have low entropy and a unit that "
                     "concentrates on a minority concept can score above chance, so specificity and the "
                     "other families are the better guide there.")
    verdict = []
    dense = [(a, b) for a in ("sae", "crosscoder") for b in ("neuron", "basis") if a in types and b in types]
    dd = pd.concat([_pair_rows(tests, a, b) for a, b in dense]) if dense else pd.DataFrame()
    if len(dd) and dd.effect_size.notna().all():
        lower = bool((dd.effect_size < 0).all())
        sig = bool((dd.p_holm < 0.05).all())
        verdict.append(("Both dictionaries' latents have lower concept entropy than both MLP neurons and residual "
                        "basis directions in every family" if lower else
                        "Dictionary latents versus dense units (neurons, basis directions) do not order the same "
                        "way in every family")
                       + f" (rank-biserial $r$ from {dd.effect_size.min():+.2f} to {dd.effect_size.max():+.2f}; "
                       + ("all Holm-adjusted $p<0.05$" if sig else
                          f"Holm-adjusted $p$ up to {fmt(float(dd.p_holm.max()))}") + ").")
    for a, b in (("sae", "neuron"), ("crosscoder", "neuron")):
        rows = _pair_rows(tests, a, b)
        if len(rows):
            label = TYPE_LABELS[a][0].upper() + TYPE_LABELS[a][1:]
            verdict.append(f"{latex_escape(label)} vs {latex_escape(TYPE_LABELS[b])}: {_pair_text(rows)}.")
    sc = _pair_rows(tests, "sae", "crosscoder")
    if len(sc) and sc.effect_size.notna().all():
        if (sc.p_holm >= 0.05).all():
            verdict.append("Between per-layer SAE and crosscoder latents, equal-size active sets show no significant "
                           f"difference in entropy: {_pair_text(sc)}.")
        else:
            verdict.append(f"Per-layer SAE vs crosscoder entropy ($r>0$: the crosscoder's is lower): "
                           f"{_pair_text(sc)}.")
    fires = summary[(summary.rule == "fires") & (summary.concept_family == FAMILIES[0])].set_index("unit_type")
    if {"sae", "crosscoder"} <= set(fires.index):
        parts = []
        for t in ("sae", "crosscoder"):
            r = fires.loc[t]
            parts.append(f"{int(r.n_units):,} of {int(r.n_candidates):,} {latex_escape(TYPE_LABELS[t])} latents "
                         f"fire on at least {int(r.n_top)} tokens ({int(r.n_silent):,} never fire; median source "
                         f"entropy {fmt(float(r.median_entropy_norm))}, sensitivity {fmt(float(r.median_sensitivity))})")
        text = "Counting every firing ($f>0$) instead of the top activations: " + "; ".join(parts) + "."
        fr = _pair_rows(tests, "sae", "crosscoder", rule="fires")
        if len(fr) and fr.effect_size.notna().all():
            text += (" Per-layer SAE vs crosscoder entropy under this rule ($r>0$: the crosscoder's is lower): "
                     f"{_pair_text(fr)}.")
        verdict.append(text)
    cc = units[(units.rule == "top") & (units.unit_type == "crosscoder") & (units.concept_family == FAMILIES[0])]
    at_layer = cc[cc.peak_layer == s.layer]
    if len(cc):
        verdict.append(f"Of the {len(cc)} scored crosscoder latents, {len(at_layer)} have their largest decoder norm "
                       f"at layer {int(s.layer)}" + (f" (median source entropy "
                                                      f"{fmt(float(at_layer.entropy_norm.median()))})"
                                                      if len(at_layer) else "") + ".")
    lines.append(" ".join(verdict))
    lines.append("Units of one type are not independent and there are hundreds of them, so the effect sizes, "
                 "not the $p$-values, say how different the approaches are. The labels are coarse (source, "
                 "language, token class): a unit tracking a finer concept still spreads over several of them.")
    return "\n\n".join(lines)


STUDY = Study(name=NAME, title="Polysemanticity of MLP neurons, residual basis directions, SAE and crosscoder features",
              config=Config, run=run, figures=figures, tables=tables, answer=answer,
              dictionaries=("saes", "crosscoder"), order=30,
              presets={"micro": Config(tokens=1_024), "paper": Config(tokens=65_536)})
