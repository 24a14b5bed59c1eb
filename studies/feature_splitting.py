"""Feature splitting: how do per-layer SAE latents and crosscoder features split as the dictionary widens?

Question
    When a dictionary's width doubles, does a latent of the smaller dictionary reappear as one latent
    of the larger one, split into several more specific ones, or vanish? How often does each happen,
    and more often than between two dictionaries of the same width that differ only by their seed?
    Does splitting differ between per-layer SAEs and sparse crosscoders?

Method
    1. Dictionaries (trained on the training store with the preset's trainer and token budget), each at
       seed 0 and at ``Config.baseline_seed``: single-layer TopK SAEs at the middle stored layer at each
       width of ``Config.sae_widths`` (k = ``Config.sae_k``; ``split_sae_w<W>``, ``split_sae_w<W>_seed1``),
       and acausal TopK crosscoders over every stored layer at each width of ``Config.cc_widths`` (k = the
       run's ``cc_k``; ``split_cc_w<W>``, ``split_cc_w<W>_seed1``; the width equal to the main crosscoder's
       reuses ``crosscoder`` and ``crosscoder_seed1``).
    2. Decoder directions, in normalised units (each layer scaled to mean norm sqrt(d)), unit-normalised.
       Headline space, the same for both approaches: the decoder at the middle layer (``space`` =
       ``"layer <mid>"``, d = d_model), so one cosine threshold means the same in both. A crosscoder
       feature's ``[L, d]`` decoder concatenated over layers (``space`` = ``"concat"``, L*d dimensions) is
       reported as a secondary view: its cosine is the norm-weighted mean of per-layer cosines, which is
       not on the scale of a d-dimensional cosine, so its threshold is not comparable with the SAE's.
    3. Families (Towards Monosemanticity; Bussmann et al. 2025, research-notes section 4): for latent i of
       dictionary A and the latents j of dictionary B, the children are C(i) = {j : cos(d_i^A, d_j^B) > tau};
       i splits when |C(i)| >= 2; its fidelity is max_j cos(d_i^A, d_j^B); a live latent of B with no
       parent in A is new. A is always the seed-0 dictionary and B the baseline seed's: each doubling
       (w at seed 0 -> 2w at seed 1, ``pair_kind`` ``"adjacent"``), the smallest -> largest width, and the
       seed baseline, every width against its second seed (w -> w, ``pair_kind`` ``"seed"``). Two
       dictionaries of one seed share the initialisation of their first w latents (the seeded ``randn``
       of the wider one starts with the narrower one's) and the order of their training batches, so a
       same-seed doubling would measure persistence of the initialisation, not splitting. tau =
       ``Config.tau`` for the main numbers; every statistic, the baseline's too, at each tau of ``Config.taus``.
    4. Tests (``tests.csv``): each fraction as a count k/n with its exact (Clopper-Pearson) 95% interval,
       against the seed baseline at the width of the latents counted, by two-sided Fisher's exact test on
       the 2x2 counts, per pair and pooled over the doublings (summed counts). Split counts the same
       parents (w, seed 0) against 2w or w at seed 1; new counts the same latents (2w, seed 1) against w
       or 2w at seed 0: only the partner's width differs. Fisher's test ignores that pairing, which is
       conservative when the two outcomes are positively correlated. p-values are not corrected across
       taus or pairs.
    5. Activation version: on a fixed random sample of held-out rows (``Config.n_rows``), the correlation
       of f_i with sum_{j in C(i)} f_j, and with the best child's f_j alone. A latent counts as live
       when it fires on at least one sampled row; every fraction is over live latents.
    6. Example families: per approach, a live parent with 2-4 live children (headline space, a doubling)
       and the highest activation correlation, shown with the tokens of its top sampled activations and
       the tokens its decoder (at its last written layer) raises most through the unembedding.

Answer
    Generated from the CSVs by every run into ``paper/tables/feature_splitting_answer.tex`` (numbers are never
    typed here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from crosslayer.errors import CrosslayerError
from crosslayer.io import write_csv
from studies.base import Study
from studies.common import (column_corr, encode_rows, fmt, latex_table, read_csv, sample_rows, save_figure, theme,
                            token_tex)

NAME = "feature_splitting"
SAE, CC = "SAE", "crosscoder"


@dataclass(frozen=True)
class Config:
    """Settings of the feature-splitting study (defaults: the demo preset)."""

    sae_widths: tuple[int, ...] = (256, 512, 1024, 2048)
    """Widths of the single-layer SAEs (at the middle stored layer), doubling."""
    sae_k: int = 16
    """k of those SAEs."""
    cc_widths: tuple[int, ...] = (512, 1024, 2048, 4096)
    """Crosscoder widths (doubling; k = the run's ``cc_k``; the main crosscoder's width reuses it)."""
    tau: float = 0.7
    """Decoder-cosine threshold of a child (main numbers)."""
    taus: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    """Thresholds of the sensitivity sweep (must include ``tau``)."""
    n_rows: int = 4096
    """Held-out rows sampled for the activation correlations (and the examples' top tokens)."""
    baseline_seed: int = 1
    """Seed of the same-width baseline dictionary trained at every width (the others use seed 0)."""


ADJACENT, OVERALL, SEED, POOLED = "adjacent", "smallest-largest", "seed", "pooled"
"""``pair_kind`` values: a width doubling, smallest -> largest width, same width at another seed, and (in
``tests.csv``) the doublings' counts summed."""
CONCAT = "concat"
"""The crosscoder's decoders concatenated over layers (secondary; every other ``space`` is one layer)."""
ALPHA = 0.05
"""Level of the intervals (1 - ALPHA) and of the verdicts in the answer."""
FAMILY_COLUMNS = ["approach", "space", "width_small", "width_big", "pair", "pair_kind", "step", "parent", "density",
                  "n_children", "fidelity", "best_child", "act_corr", "act_corr_best", "children"]
SUMMARY_COLUMNS = ["approach", "space", "width_small", "width_big", "pair", "pair_kind", "step", "tau", "n_live",
                   "n_dead", "n_split", "n_kept", "n_unmatched", "mean_children", "mean_children_matched",
                   "frac_split", "frac_kept", "frac_unmatched", "median_fidelity", "mean_fidelity", "median_act_corr",
                   "median_act_corr_split", "n_live_big", "n_new_big", "frac_new_big"]
TEST_COLUMNS = ["approach", "space", "tau", "statistic", "pair", "pair_kind", "width_small", "width_big", "k", "n",
                "frac", "ci_lo", "ci_hi", "k_seed", "n_seed", "frac_seed", "ci_lo_seed", "ci_hi_seed", "odds_ratio",
                "p_fisher"]
STATISTICS = {"split": ("n_split", "n_live", "width_small"), "new": ("n_new_big", "n_live_big", "width_big")}
"""Tested statistic -> (count column, total column, width of the counted latents) of ``summary.csv``."""
EXAMPLE_COLUMNS = ["approach", "width_small", "width_big", "role", "feature", "cos_to_parent", "act_corr", "density",
                   "top_tokens", "top_context", "logits_up"]


def headline(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``frame`` in the headline (single-layer) decoder space."""
    return frame[frame.space != CONCAT]


# ----------------------------------------------------------------------------- helpers (shared with other studies)

@torch.no_grad()
def unit_decoders(dictionary, layers: list[int] | None = None) -> Tensor:
    """Decoder directions ``[F, n*d]``: each feature's normalised-unit decoder at ``layers`` (default all of
    the dictionary's), concatenated over those layers and unit-normalised (zero rows stay zero)."""
    layers = dictionary.layers if layers is None else layers
    W = torch.cat([dictionary.decoder_vectors(l, normalized=True) for l in layers], dim=1)
    return torch.nn.functional.normalize(W.float(), dim=-1)


# ----------------------------------------------------------------------------- families

@torch.no_grad()
def decoder_matches(small_FD: Tensor, big_GD: Tensor, *, min_cos: float,
                    chunk: int = 1024) -> dict[str, Tensor]:
    """Cosines of unit decoders ``small [F, D]`` vs ``big [G, D]``, computed in blocks of parents.

    Returns ``fidelity`` and ``best`` ``[F]`` (max cosine and its big latent) and the sparse list of
    pairs with cosine > ``min_cos``: ``parent``, ``child``, ``cos`` ``[P]``.
    """
    if small_FD.ndim != 2 or big_GD.ndim != 2 or small_FD.shape[1] != big_GD.shape[1]:
        raise CrosslayerError(f"decoders must be [F, D] and [G, D] with the same D, got {list(small_FD.shape)} "
                              f"and {list(big_GD.shape)}")
    fid, best, parent, child, cos = [], [], [], [], []
    for start in range(0, small_FD.shape[0], chunk):
        cos_CG = small_FD[start:start + chunk] @ big_GD.T
        value, index = cos_CG.max(dim=1)
        fid.append(value)
        best.append(index)
        i, j = (cos_CG > min_cos).nonzero(as_tuple=True)
        parent.append(i + start)
        child.append(j)
        cos.append(cos_CG[i, j])
    return {"fidelity": torch.cat(fid), "best": torch.cat(best), "parent": torch.cat(parent),
            "child": torch.cat(child), "cos": torch.cat(cos)}


@torch.no_grad()
def families(matches: dict[str, Tensor], tau: float, *, f_small: Tensor | None = None,
             f_big: Tensor | None = None) -> dict[str, Tensor]:
    """Split families at threshold ``tau`` from :func:`decoder_matches` (``tau`` >= its ``min_cos``).

    Returns ``n_children`` ``[F]``, ``has_parent`` ``[G]`` (bool) and, given activations
    ``f_small [N, F]`` and ``f_big [N, G]``, ``act_corr`` = corr(f_i, sum_{j in C(i)} f_j) and
    ``act_corr_best`` = corr(f_i, f_best(i)) ``[F]`` (NaN without children or firing).
    """
    F = matches["fidelity"].shape[0]
    keep = matches["cos"] > tau
    parent, child = matches["parent"][keep], matches["child"][keep]
    n_children = torch.bincount(parent, minlength=F)
    out = {"n_children": n_children, "parent": parent, "child": child}
    if f_big is not None:
        out["has_parent"] = torch.bincount(child, minlength=f_big.shape[1]) > 0
    if f_small is not None and f_big is not None:
        M_FG = torch.sparse_coo_tensor(torch.stack([parent, child]), torch.ones(len(parent)), (F, f_big.shape[1]),
                                       check_invariants=True)
        sum_NF = torch.sparse.mm(M_FG, f_big.T.float()).T  # sum of each parent's children, O(N * pairs) memory-light
        corr = column_corr(f_small, sum_NF)
        out["act_corr"] = corr.masked_fill(n_children == 0, float("nan"))
        best = column_corr(f_small, f_big[:, matches["best"]])
        out["act_corr_best"] = best.masked_fill(matches["fidelity"] <= tau, float("nan"))
    return out


def _pairs(widths: list[int]) -> list[tuple[int, int, str, int]]:
    """(small, big, kind, step) of each adjacent pair of sorted ``widths``, the smallest -> largest pair, and
    each width against itself (``SEED``: its second seed; step = the width's 1-based rank)."""
    pairs = [(a, b, ADJACENT, i + 1) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
    if len(widths) > 2:
        pairs.append((widths[0], widths[-1], OVERALL, len(widths)))
    return pairs + [(w, w, SEED, i + 1) for i, w in enumerate(widths)]


def pair_label(small: int, big: int, kind: str) -> str:
    return f"{small}->{big}" + (" (seed)" if kind == SEED else "")


def analyse_pair(approach: str, space: str, small: int, big: int, kind: str, step: int, dirs_small: Tensor,
                 dirs_big: Tensor, f_small: Tensor, f_big: Tensor, cfg: Config) -> tuple[pd.DataFrame, list[dict]]:
    """The family table (at ``cfg.tau``) and one summary row per tau of one (small, big) pair."""
    matches = decoder_matches(dirs_small, dirs_big, min_cos=min(cfg.taus))
    live_s, live_b = (f_small > 0).any(0), (f_big > 0).any(0)
    pair = pair_label(small, big, kind)
    base = {"approach": approach, "space": space, "width_small": small, "width_big": big, "pair": pair,
            "pair_kind": kind, "step": step}
    rows, table = [], None
    for tau in cfg.taus:
        fam = families(matches, tau, f_small=f_small, f_big=f_big)
        n = fam["n_children"][live_s].float()
        corr = fam["act_corr"][live_s]
        split = fam["act_corr"][live_s & (fam["n_children"] >= 2)]
        new = ~fam["has_parent"][live_b]
        rows.append({**base, "tau": tau, "n_live": int(live_s.sum()), "n_dead": int((~live_s).sum()),
                     "n_split": int((n >= 2).sum()), "n_kept": int((n == 1).sum()), "n_unmatched": int((n == 0).sum()),
                     "mean_children": _mean(n), "mean_children_matched": _mean(n[n > 0]), "frac_split": _mean(n >= 2),
                     "frac_kept": _mean(n == 1), "frac_unmatched": _mean(n == 0),
                     "median_fidelity": _median(matches["fidelity"][live_s]),
                     "mean_fidelity": _mean(matches["fidelity"][live_s]), "median_act_corr": _median(corr),
                     "median_act_corr_split": _median(split), "n_live_big": int(live_b.sum()),
                     "n_new_big": int(new.sum()), "frac_new_big": _mean(new)})
        if tau == cfg.tau:
            order = torch.argsort(fam["parent"] * dirs_big.shape[0] + fam["child"])  # by parent, then child
            counts = fam["n_children"].numpy()
            lists = np.split(fam["child"][order].numpy(), np.cumsum(counts)[:-1])
            table = pd.DataFrame({**base, "parent": np.arange(dirs_small.shape[0]),
                                  "density": (f_small > 0).float().mean(0).numpy(),
                                  "n_children": fam["n_children"].numpy(), "fidelity": matches["fidelity"].numpy(),
                                  "best_child": matches["best"].numpy(), "act_corr": fam["act_corr"].numpy(),
                                  "act_corr_best": fam["act_corr_best"].numpy(),
                                  "children": [" ".join(map(str, c)) for c in lists]})
    return table, rows


def _mean(x: Tensor) -> float:
    x = x.float()
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else float("nan")


def _median(x: Tensor) -> float:
    x = x.float()
    x = x[~x.isnan()]
    return float(x.median()) if x.numel() else float("nan")


# ----------------------------------------------------------------------------- counts, intervals, exact tests

def clopper_pearson(k, n, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) two-sided ``1 - alpha`` interval of each binomial proportion ``k / n``
    (arrays; NaN where ``n`` is 0)."""
    from scipy.stats import beta

    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, beta.ppf(alpha / 2, np.maximum(k, 1), n - k + 1), 0.0)
        hi = np.where(k < n, beta.isf(alpha / 2, k + 1, np.maximum(n - k, 1)), 1.0)
    return np.where(n > 0, lo, np.nan), np.where(n > 0, hi, np.nan)


def fisher_tests(k1, n1, k2, n2) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Fisher's exact test of ``k1/n1`` against ``k2/n2``, per element of the arrays: (sample odds
    ratio, p); NaN where either total is 0. One scipy call per comparison (a few hundred rows, never features)."""
    from scipy.stats import fisher_exact

    out = [fisher_exact([[a, b - a], [c, d - c]]) if b > 0 and d > 0 else (np.nan, np.nan)
           for a, b, c, d in zip(*(np.asarray(x, dtype=np.int64) for x in (k1, n1, k2, n2)))]
    odds, p = np.array(out, dtype=float).reshape(-1, 2).T
    return odds, p


def seed_tests(summary: pd.DataFrame) -> pd.DataFrame:
    """``tests.csv``: each doubling's (and the smallest -> largest pair's) split and new-latent counts against
    the seed baseline at the width of the counted latents (:data:`STATISTICS`), per approach, space and tau;
    plus the doublings pooled (counts summed). Clopper-Pearson 95% intervals and Fisher's exact test."""
    keys = ["approach", "space", "tau"]
    wide = summary[summary.pair_kind.isin([ADJACENT, OVERALL])]
    seed = summary[summary.pair_kind == SEED]
    parts = []
    for stat, (k, n, width) in STATISTICS.items():
        base = seed[keys + [width, k, n]].rename(columns={k: "k_seed", n: "n_seed"})
        both = wide.merge(base, on=keys + [width], validate="many_to_one")
        parts.append(both.assign(statistic=stat, k=both[k], n=both[n]))
    table = pd.concat(parts, ignore_index=True)
    pooled = (table[table.pair_kind == ADJACENT].groupby(keys + ["statistic"], as_index=False)
              .agg(width_small=("width_small", "min"), width_big=("width_big", "max"), k=("k", "sum"),
                   n=("n", "sum"), k_seed=("k_seed", "sum"), n_seed=("n_seed", "sum"))
              .assign(pair="doublings pooled", pair_kind=POOLED))
    table = pd.concat([table, pooled], ignore_index=True)
    for suffix in ("", "_seed"):
        k, n = table[f"k{suffix}"].to_numpy(), table[f"n{suffix}"].to_numpy()
        table[f"frac{suffix}"] = np.where(n > 0, k / np.maximum(n, 1), np.nan)
        table[f"ci_lo{suffix}"], table[f"ci_hi{suffix}"] = clopper_pearson(k, n)
    table["odds_ratio"], table["p_fisher"] = fisher_tests(table.k, table.n, table.k_seed, table.n_seed)
    order = table.assign(concat=table.space == CONCAT, stat=table.statistic.map(list(STATISTICS).index),
                         kind=table.pair_kind.map({ADJACENT: 0, OVERALL: 1, POOLED: 2}))
    order = order.sort_values(["approach", "concat", "space", "stat", "tau", "kind", "width_small"])
    return order[TEST_COLUMNS].reset_index(drop=True)


# ----------------------------------------------------------------------------- examples

def _pick_example(table: pd.DataFrame, f_big: dict[int, Tensor]) -> pd.Series | None:
    """A live parent with 2-4 live children, highest activation correlation (doublings, headline space)."""
    table = headline(table[table.pair_kind != SEED])
    cand = table[(table.pair_kind == ADJACENT) & table.n_children.between(2, 4) & (table.density > 0)].copy()
    if cand.empty:
        cand = table[(table.n_children >= 1) & (table.density > 0)].copy()
    if cand.empty:
        return None
    cand["live_children"] = [all(bool((f_big[r.width_big][:, int(j)] > 0).any()) for j in r.children.split())
                             for r in cand.itertuples()]
    cand = cand[cand.live_children] if cand.live_children.any() else cand
    return cand.sort_values(["act_corr", "fidelity"], ascending=False, na_position="last").iloc[0]


def _describe(dictionary, feature: int, f_N: Tensor, store, rows: np.ndarray, model, tokenizer) -> dict:
    """Top tokens (distinct, from the top sampled activations), the top context and the top logit tokens."""
    from crosslayer.features import context_text, logit_effects

    vals, idx = f_N.topk(min(10, f_N.numel()))
    top_rows = rows[idx[vals > 0].numpy()]
    tokens: list[str] = []
    if len(top_rows):
        for t in store.meta(top_rows)["token_id"].tolist():
            text = tokenizer.decode([t])
            if text not in tokens:
                tokens.append(text)
    context = context_text(tokenizer, store, int(top_rows[0]), before=12, after=3)[1] if len(top_rows) else ""
    writes = dictionary.writes_FL()[feature]
    last = dictionary.layers[int(writes.nonzero().max())] if writes.any() else dictionary.layers[-1]
    up = logit_effects(dictionary, model, feature, k=5, layer=last, tokenizer=tokenizer)
    return {"density": float((f_N > 0).float().mean()), "top_tokens": json.dumps(tokens[:6]),
            "top_context": context, "logits_up": json.dumps(up[up.direction == "up"].token.tolist())}


def _examples(ctx, dicts: dict, feats: dict, fam: pd.DataFrame, rows: np.ndarray, mid: int,
              seed: int) -> pd.DataFrame:
    """One example family per approach (parent at seed 0, children at ``seed``; cosines at layer ``mid``)."""
    heldout, model = ctx.store("heldout"), ctx.model
    examples = []
    for approach, ds in dicts.items():
        f_big = {w: f for (w, s), f in feats[approach].items() if s == seed}
        pick = _pick_example(fam[fam.approach == approach], f_big)
        if pick is None:
            continue
        small, big, parent = int(pick.width_small), int(pick.width_big), int(pick.parent)
        d_s, d_b = ds[(small, 0)], ds[(big, seed)]
        dirs_s, dirs_b = unit_decoders(d_s, [mid]), unit_decoders(d_b, [mid])
        f_s, f_b = feats[approach][(small, 0)][:, parent], f_big[big]
        base = {"approach": approach, "width_small": small, "width_big": big}
        examples.append({**base, "role": "parent", "feature": parent, "cos_to_parent": 1.0,
                         "act_corr": float(pick.act_corr),
                         **_describe(d_s, parent, f_s, heldout, rows, model, model.tokenizer)})
        for j in (int(j) for j in pick.children.split()):
            corr = float(column_corr(f_s[:, None], f_b[:, j:j + 1])[0])
            described = _describe(d_b, j, f_b[:, j], heldout, rows, model, model.tokenizer)
            examples.append({**base, "role": "child", "feature": j, "cos_to_parent": float(dirs_s[parent] @ dirs_b[j]),
                             "act_corr": corr, **described})
    return pd.DataFrame(examples, columns=EXAMPLE_COLUMNS)


# ----------------------------------------------------------------------------- the study

def _dictionaries(ctx, cfg: Config, mid: int) -> dict[str, dict[tuple[int, int], object]]:
    """Every dictionary of the study, by approach and (width, seed): seed 0 and ``cfg.baseline_seed`` at every
    width. The main crosscoder's width reuses the run's ``crosscoder`` (and its seed's ``crosscoder_seed<s>``)."""
    from studies.pipeline import seed_name

    def sae(w: int, seed: int):
        return ctx.saes(seed_name(f"split_sae_w{w}", seed), width=w, k=cfg.sae_k, layers=[mid], seed=seed)

    def cc(w: int, seed: int):
        if w == ctx.cc_width:
            return ctx.crosscoder(seed_name("crosscoder", seed), seed=seed)
        return ctx.crosscoder(seed_name(f"split_cc_w{w}", seed), width=w, k=ctx.sizes.cc_k, seed=seed)

    seeds = (0, cfg.baseline_seed)
    return {SAE: {(w, s): sae(w, s) for w in sorted(set(cfg.sae_widths)) for s in seeds},
            CC: {(w, s): cc(w, s) for w in sorted(set(cfg.cc_widths)) for s in seeds}}


def _check(cfg: Config) -> None:
    if len(set(cfg.sae_widths)) < 2 or len(set(cfg.cc_widths)) < 2 or cfg.tau not in cfg.taus \
            or cfg.baseline_seed == 0:
        raise CrosslayerError(f"feature splitting needs at least two widths per approach, tau among taus and a "
                              f"baseline seed other than 0, got sae_widths={cfg.sae_widths}, cc_widths="
                              f"{cfg.cc_widths}, tau={cfg.tau}, taus={cfg.taus}, baseline_seed={cfg.baseline_seed}")


def run(ctx, cfg: Config) -> dict:
    _check(cfg)
    results, heldout, train = ctx.results(NAME), ctx.store("heldout"), ctx.store("train")
    mid = train.layers[train.n_layers // 2]
    dicts = _dictionaries(ctx, cfg, mid)
    rows = sample_rows(heldout, cfg.n_rows)
    feats = {a: {key: encode_rows(d, heldout, rows) for key, d in ds.items()} for a, ds in dicts.items()}
    spaces = {SAE: [(f"layer {mid}", None)], CC: [(f"layer {mid}", [mid]), (CONCAT, None)]}
    tables, summary = [], []
    for approach, ds in dicts.items():
        for space, layers in spaces[approach]:
            dirs = {key: unit_decoders(d, layers) for key, d in ds.items()}
            for small, big, kind, step in _pairs(sorted({w for w, _ in ds})):
                a, b = (small, 0), (big, cfg.baseline_seed)  # never a shared initialisation (see Method 3)
                table, srows = analyse_pair(approach, space, small, big, kind, step, dirs[a], dirs[b],
                                            feats[approach][a], feats[approach][b], cfg)
                tables.append(table)
                summary += srows
    fam = pd.concat(tables, ignore_index=True)[FAMILY_COLUMNS]
    summ = pd.DataFrame(summary)[SUMMARY_COLUMNS]
    tests = seed_tests(summ)
    write_csv(fam, results / "families.csv")
    write_csv(summ, results / "summary.csv")
    write_csv(tests, results / "tests.csv")
    write_csv(_examples(ctx, dicts, feats, fam, rows, mid, cfg.baseline_seed), results / "example.csv")
    info = {"layer": mid, "rows": len(rows)}
    pooled = headline(tests[(tests.tau == cfg.tau) & (tests.pair_kind == POOLED)])
    for r in pooled.itertuples():
        key = f"{r.approach.lower()}_{r.statistic}"
        info |= {key: f"{r.k}/{r.n}", f"{key}_seed": f"{r.k_seed}/{r.n_seed}", f"{key}_p": float(f"{r.p_fisher:.3g}")}
    return info


# ----------------------------------------------------------------------------- figures, tables, answer

KIND_ORDER = {ADJACENT: 0, OVERALL: 1, SEED: 2}


def _step_label(frame: pd.DataFrame) -> np.ndarray:
    step = frame.step.astype(str)
    labels = np.where(frame.pair_kind == ADJACENT, "×2 (step " + step + ")", "smallest→largest")
    return np.where(frame.pair_kind == SEED, "same width (w" + step + ")", labels)


def _label_order(frame: pd.DataFrame) -> list[str]:
    """The step labels of ``frame`` ordered doublings, smallest->largest, then seed baselines by width."""
    keyed = frame.assign(kind_order=frame.pair_kind.map(KIND_ORDER)).sort_values(["kind_order", "step"])
    return list(dict.fromkeys(keyed.step_label))


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    fam = headline(read_csv(results, "families"))
    live = fam[fam.density > 0].copy()
    live["children"] = live.n_children.clip(upper=5).map(lambda n: "5+" if n >= 5 else str(n))
    live["pair"] = live.pair.str.replace("->", "→")
    grown = live[live.pair_kind != SEED]
    counts = (grown.groupby(["approach", "pair", "step", "children"]).size()
              / grown.groupby(["approach", "pair", "step"]).size()).rename("fraction").reset_index()
    order = ["0", "1", "2", "3", "4", "5+"]
    approaches = [a for a in (SAE, CC) if a in set(counts.approach)]
    fig, axes = plt.subplots(1, len(approaches), figsize=(5.2 * len(approaches), 3.8), squeeze=False, sharey=True)
    for ax, approach in zip(axes[0], approaches):
        part = counts[counts.approach == approach].sort_values("step")
        sns.barplot(data=part, x="children", y="fraction", hue="pair", order=order, ax=ax, palette="viridis")
        ax.set(title=approach, xlabel=f"children (decoder cosine > {cfg.tau})", ylabel="fraction of live latents")
        ax.legend(title="widths", fontsize=7, title_fontsize=8)
    space = fam.space.iloc[0] if len(fam) else "one layer"
    paths = [(save_figure(fig, figures_dir / f"{NAME}_counts.png"),
              f"Split counts: how many latents of the wider dictionary have decoder cosine above {cfg.tau} (decoders "
              f"at {space} for both approaches) with each live latent of the narrower one (0: no counterpart, "
              "1: kept, 2+: split), per approach and width pair.")]

    live["step_label"] = _step_label(live)
    long = pd.concat([live.assign(metric="fidelity (max decoder cosine)", value=live.fidelity),
                      live.assign(metric="act. corr. with children's sum", value=live.act_corr)])
    long = long[long.value.notna()]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, metric in zip(axes, ["fidelity (max decoder cosine)", "act. corr. with children's sum"]):
        part = long[long.metric == metric]
        sns.boxplot(data=part, x="step_label", y="value", hue="approach", hue_order=approaches, ax=ax,
                    order=_label_order(part), fliersize=1.5, linewidth=0.8)
        ax.set(xlabel="", ylabel=metric, ylim=(-0.05 if metric.startswith("act") else 0, 1.02))
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    paths.append((save_figure(fig, figures_dir / f"{NAME}_fidelity.png"),
                  "Fidelity of each live latent of the narrower dictionary (its largest decoder cosine with the "
                  "wider one) and the held-out correlation of its activation with the summed activations of its "
                  f"children (cosine $>{cfg.tau}$), per width doubling, from the smallest to the largest width, and "
                  "against a second seed of the same width (w1 the smallest width)."))
    paths.append(_tau_figure(read_csv(results, "summary"), figures_dir, cfg))
    paths.append(_seed_figure(read_csv(results, "tests"), figures_dir, cfg))
    return paths


def _tau_figure(summ: pd.DataFrame, figures_dir: Path, cfg: Config) -> tuple[Path, str]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    summ = summ[summ.pair_kind.isin([ADJACENT, SEED])].copy()
    summ["dictionary"] = np.where(summ.space == CONCAT, summ.approach + " (concat)", summ.approach)
    summ["comparison"] = np.where(summ.pair_kind == SEED, "same width (seed baseline)", "×2 width")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    panels = [("frac_split", "fraction split (2+ children)"), ("frac_kept", "fraction kept (1 child)"),
              ("frac_unmatched", "fraction without children"), ("frac_new_big", "fraction of wider latents new")]
    for ax, (col, label) in zip(axes, panels):
        sns.lineplot(data=summ, x="tau", y=col, hue="dictionary", style="comparison", marker="o", ax=ax,
                     errorbar=("pi", 100))
        ax.set(xlabel="cosine threshold τ", ylabel=label, ylim=(0, 1))
        ax.axvline(cfg.tau, color="grey", lw=0.8, ls=":")
    for ax in axes[1:]:
        if ax.get_legend():
            ax.get_legend().remove()
    return (save_figure(fig, figures_dir / f"{NAME}_tau.png"),
            "Sensitivity to the child threshold $\\tau$: mean over the width doublings (solid; band: range over them) "
            "and over the same-width second-seed baselines (dashed). Single-layer decoders unless marked concat "
            "(the crosscoder's decoders concatenated over layers, a different cosine scale).")


def _seed_figure(tests: pd.DataFrame, figures_dir: Path, cfg: Config) -> tuple[Path, str]:
    import matplotlib.pyplot as plt

    part = headline(tests[(tests.tau == cfg.tau) & (tests.pair_kind == ADJACENT)])
    approaches = [a for a in (SAE, CC) if a in set(part.approach)]
    fig, axes = plt.subplots(2, len(approaches), figsize=(5.2 * len(approaches), 6.6), squeeze=False)
    labels = {"split": "% of live latents split (2+ children)", "new": "% of live latents new (no parent)"}
    for col, approach in enumerate(approaches):
        for row, (stat, (_, _, width)) in enumerate(STATISTICS.items()):
            ax, sub = axes[row, col], part[(part.approach == approach) & (part.statistic == stat)]
            for shift, suffix, label in ((0.96, "", "×2 width"), (1.04, "_seed", "same width (seed baseline)")):
                frac = 100 * sub[f"frac{suffix}"]
                err = [frac - 100 * sub[f"ci_lo{suffix}"], 100 * sub[f"ci_hi{suffix}"] - frac]
                ax.errorbar(sub[width] * shift, frac, yerr=err, fmt="o", capsize=3, label=label)
            for x, y, p in zip(sub[width], 100 * sub[["ci_hi", "ci_hi_seed"]].max(axis=1), sub.p_fisher):
                ax.annotate(f"p={fmt(p, 2)}", (x, y), textcoords="offset points", xytext=(0, 4), ha="center",
                            fontsize=7)
            ax.set_xscale("log", base=2)
            ax.margins(y=0.15)
            ax.set(title=f"{approach}: {stat}", xlabel="width of the latents counted", ylabel=labels[stat])
            ax.legend(fontsize=7)
    space = part.space.iloc[0] if len(part) else "one layer"
    return (save_figure(fig, figures_dir / f"{NAME}_seed.png"),
            f"Split and new-latent fractions at $\\tau={cfg.tau}$ (decoders at {space}): each width doubling (the "
            "wider dictionary at a second seed) against the same statistic between two seeds of the same width "
            "(split: the same parent latents of the narrower width; new: the same latents of the wider width), "
            "with exact 95\\% intervals and two-sided Fisher's exact p.")


def _tokens_tex(value, n: int = 4) -> str:
    tokens = (json.loads(value) if isinstance(value, str) and value else [])[:n]
    return ", ".join(token_tex(t) for t in tokens) if tokens else "--"


def count_text(k, n, lo, hi, *, ci: str = "95\\% CI ") -> str:
    """``k/n (x%, 95% CI lo--hi%)`` for the paper (no interval for an empty total; ``ci`` names the interval)."""
    k, n = int(k), int(n)
    if n == 0:
        return f"{k:,}/{n:,}"
    return f"{k:,}/{n:,} ({_pct(k / n)}, {ci}{fmt(100 * float(lo), 3)}--{_pct(hi)})"


def p_text(p) -> str:
    return fmt(float(p), 2)


def _pct(x) -> str:
    return f"{fmt(100 * float(x), 3)}\\%"


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    summ = read_csv(results, "summary")
    main = summ[summ.tau == cfg.tau].copy()
    main = main.assign(kind_order=main.pair_kind.map(KIND_ORDER)).sort_values(["approach", "space", "kind_order",
                                                                               "width_small"])
    main["widths"] = (main.width_small.astype(str) + r"$\to$" + main.width_big.astype(str)
                      + np.where(main.pair_kind == SEED, " (seeds)", ""))
    out = [latex_table(main, tables_dir / f"{NAME}.tex", raw_columns=("widths",),
                       columns={"approach": "approach", "space": "decoder", "widths": "widths", "n_live": "live",
                                "frac_split": "split", "frac_kept": "kept", "frac_unmatched": "none",
                                "mean_children_matched": "children", "median_fidelity": "fidelity",
                                "median_act_corr": "act. corr.", "frac_new_big": "new"},
                       caption=f"Feature splitting at decoder-cosine threshold {cfg.tau}: fractions of the narrower "
                               "dictionary's live latents with 2+ children (split), one (kept) or none; mean children "
                               "of those with any; median fidelity (max cosine) and median held-out correlation with "
                               "the children's summed activation; fraction of the wider dictionary's live latents "
                               "that are nobody's child (new). The wider dictionary of a pair is trained with a "
                               "second seed (no shared initialisation); rows marked seeds compare a dictionary with a "
                               "second seed of the same width (the baseline). Decoder: one layer for both approaches "
                               "(headline), or the crosscoder's decoders concatenated over layers.",
                       label=f"tab:{NAME}")]
    out.append(_tests_table(read_csv(results, "tests"), tables_dir, cfg))
    ex = read_csv(results, "example")
    if len(ex):
        ex = ex.copy()
        ex["latent"] = [("parent " if r.role == "parent" else r"\quad child ") + f"{int(r.feature)} (w={int(w)})"
                        for r, w in zip(ex.itertuples(), np.where(ex.role == "parent", ex.width_small, ex.width_big))]
        ex["tokens"] = ex.top_tokens.map(_tokens_tex)
        ex["logits"] = ex.logits_up.map(_tokens_tex)
        out.append(latex_table(ex, tables_dir / f"{NAME}_example.tex", raw_columns=("latent", "tokens", "logits"),
                               columns={"approach": "approach", "latent": "latent", "cos_to_parent": "cos",
                                        "act_corr": "act. corr.", "density": "density", "tokens": "top tokens",
                                        "logits": "raises logits of"},
                               caption="An example family per approach: a parent latent of the narrower dictionary "
                                       "and its children in the wider one, with decoder cosine (at the middle layer) "
                                       "and held-out activation correlation to the parent, firing density on the "
                                       "sampled held-out rows, the tokens of its top activations and the tokens its "
                                       "decoder raises most.",
                               label=f"tab:{NAME}-example", digits=2))
    return out


def _tests_table(tests: pd.DataFrame, tables_dir: Path, cfg: Config) -> Path:
    at = tests[tests.tau == cfg.tau].copy()
    at["widths"] = at.pair.str.replace("->", r"$\to$", regex=False)
    at["wider"] = [count_text(r.k, r.n, r.ci_lo, r.ci_hi, ci="") for r in at.itertuples()]
    at["seed"] = [count_text(r.k_seed, r.n_seed, r.ci_lo_seed, r.ci_hi_seed, ci="") for r in at.itertuples()]
    return latex_table(at, tables_dir / f"{NAME}_tests.tex", raw_columns=("widths", "wider", "seed"),
                       columns={"approach": "approach", "space": "decoder", "statistic": "statistic",
                                "widths": "widths", "wider": "wider: k/n", "seed": "same width: k/n",
                                "odds_ratio": "odds ratio", "p_fisher": "p"},
                       caption=f"Width doubling against the same-width seed baseline at $\\tau={cfg.tau}$: split "
                               "(live latents of the narrower dictionary with 2+ children in the wider one, against "
                               "2+ matches in a second seed of the narrower width) and new (live latents of the wider "
                               "dictionary with no parent, against those of a second seed of the wider width with no "
                               "match in the first). Counts k/n (percentage, exact 95\\% interval); two-sided "
                               "Fisher's exact test, uncorrected.", label=f"tab:{NAME}-tests", digits=2)


def _verdict(r) -> str:
    if not r.p_fisher < ALPHA:
        return f"no difference at the {fmt(100 * ALPHA)}\\% level"
    return "more than the baseline" if r.frac > r.frac_seed else "fewer than the baseline"


def _versus(r, what: str, baseline: str) -> str:
    """One test of ``tests.csv`` as a clause: counts, intervals, p and the verdict."""
    return (f"{count_text(r.k, r.n, r.ci_lo, r.ci_hi)} {what}, against "
            f"{count_text(r.k_seed, r.n_seed, r.ci_lo_seed, r.ci_hi_seed)} {baseline} "
            f"(Fisher's exact test p = {p_text(r.p_fisher)}; {_verdict(r)})")


SPLIT_WORDS = ("of the narrower dictionaries' live latents split into two or more children",
               "of the same latents with two or more matches in a second seed of their own width")
NEW_WORDS = ("of the wider dictionaries' live latents are nobody's child",
             "of a second seed's live latents with no match in the first seed of the same width")


def _headline_text(tests: pd.DataFrame, approach: str, label: str, cfg: Config) -> str:
    part = headline(tests[(tests.approach == approach) & (tests.tau == cfg.tau)])
    pooled = part[part.pair_kind == POOLED].set_index("statistic")
    split, new = pooled.loc["split"], pooled.loc["new"]
    adj = part[part.pair_kind == ADJACENT]
    p_adj = {s: ", ".join(p_text(p) for p in g.sort_values("width_small").p_fisher)
             for s, g in adj.groupby("statistic")}
    return (f"For {label} (decoders at {split.space}; widths {int(split.width_small)} to {int(split.width_big)}, "
            f"{len(adj) // 2} doublings pooled; cosine $>{cfg.tau}$), "
            f"{_versus(split, *SPLIT_WORDS)}; {_versus(new, *NEW_WORDS)}. "
            f"Per doubling, the split test gives p = {p_adj['split']} and the new-latent test p = {p_adj['new']}.")


def _sweep_text(tests: pd.DataFrame, approach: str) -> str:
    part = headline(tests[(tests.approach == approach) & (tests.pair_kind == POOLED)])
    bits = []
    for tau, g in part.groupby("tau"):
        s, n = g.set_index("statistic").loc["split"], g.set_index("statistic").loc["new"]
        bits.append(f"$\\tau={tau:g}$: split {_pct(s.frac)} vs {_pct(s.frac_seed)} (p = {p_text(s.p_fisher)}), "
                    f"new {_pct(n.frac)} vs {_pct(n.frac_seed)} (p = {p_text(n.p_fisher)})")
    sig = part.groupby("statistic").p_fisher.apply(lambda p: int((p < ALPHA).sum()))
    return (f"Across thresholds ({approach}, doublings pooled vs seed baseline): " + "; ".join(bits)
            + f" --- p below {fmt(ALPHA)} at {sig.get('split', 0)} of {part.tau.nunique()} thresholds for the split "
            f"fraction and {sig.get('new', 0)} for the new fraction.")


def _fidelity_text(summ: pd.DataFrame, cfg: Config) -> str:
    at = headline(summ[summ.tau == cfg.tau])
    med = at.groupby(["approach", "pair_kind"]).median_fidelity.mean()
    bits = [f"{a}: {fmt(med[(a, ADJACENT)], 3)} at a doubling, {fmt(med[(a, SEED)], 3)} against a second seed"
            for a in (SAE, CC) if (a, ADJACENT) in med and (a, SEED) in med]
    return ("Median fidelity (a latent's best decoder cosine in the other dictionary, mean over pairs): "
            + "; ".join(bits) + ".") if bits else ""


def _concat_text(tests: pd.DataFrame, cfg: Config) -> str:
    part = tests[(tests.space == CONCAT) & (tests.tau == cfg.tau) & (tests.pair_kind == POOLED)]
    if part.empty:
        return ""
    s, n = part.set_index("statistic").loc["split"], part.set_index("statistic").loc["new"]
    return ("Comparing crosscoder decoders concatenated over layers instead (a cosine over all layers' dimensions, "
            "not on the single-layer scale, hence not the headline): "
            f"split {_versus(s, 'of the narrower latents', 'for a second seed')}; "
            f"new {_versus(n, 'of the wider latents', 'for a second seed')}.")


def _example_text(ex: pd.DataFrame) -> list[str]:
    parts = []
    for approach, grp in ex.groupby("approach", sort=False):
        par = grp[grp.role == "parent"].iloc[0]
        kids = grp[grp.role == "child"]
        first = json.loads(par.top_tokens)[:3] if isinstance(par.top_tokens, str) and par.top_tokens else []
        kid_tokens = [", ".join(token_tex(t) for t in (json.loads(c)[:2] if isinstance(c, str) and c else []))
                      for c in kids.top_tokens]
        parts.append(f"Example ({approach}): latent {int(par.feature)} of width {int(par.width_small)} (top tokens "
                     f"{', '.join(token_tex(t) for t in first) or '--'}) has {len(kids)} "
                     f"{'child' if len(kids) == 1 else 'children'} at width "
                     f"{int(par.width_big)} (" + "; ".join(f"{int(c.feature)}: {t or '--'}" for c, t in
                                                          zip(kids.itertuples(), kid_tokens)) + ").")
    return parts


def answer(results: Path, cfg: Config) -> str:
    tests, summ = read_csv(results, "tests"), read_csv(results, "summary")
    parts = ["Each width doubling (the narrower dictionary at one seed, the wider at another, so that no two "
             "compared dictionaries share an initialisation) is compared with the same statistic between two seeds "
             "of one width: a dictionary differs from a second seed of itself too, so only an excess over that "
             "baseline is evidence of splitting. Both approaches are compared in the same single-layer decoder "
             "space."]
    present = set(tests.approach)
    for approach, label in ((SAE, "single-layer SAEs"), (CC, "crosscoders")):
        if approach in present:
            parts.append(_headline_text(tests, approach, label, cfg))
    parts += [_sweep_text(tests, a) for a in (SAE, CC) if a in present]
    parts += [_fidelity_text(summ, cfg), _concat_text(tests, cfg)]
    parts += _example_text(read_csv(results, "example"))
    return " ".join(p for p in parts if p)


STUDY = Study(name=NAME, title="Feature splitting across dictionary widths", config=Config, run=run, figures=figures,
              tables=tables, answer=answer, dictionaries=("crosscoder",), order=40,
              presets={"micro": Config(sae_widths=(16, 32, 64, 128), sae_k=4, cc_widths=(16, 32, 64, 128)),
                       "paper": Config(sae_widths=(576, 1152, 2304, 4608), sae_k=32,
                                       cc_widths=(4320, 8640, 17280, 34560))})
