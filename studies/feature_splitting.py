"""Feature splitting: how do per-layer SAE latents and crosscoder features split as the dictionary widens?

Question
    When a dictionary's width doubles, does a latent of the smaller dictionary reappear as one latent
    of the larger one, split into several more specific ones, or vanish? How often does each happen,
    how faithful is the larger dictionary to the smaller one, and does splitting differ between
    per-layer SAEs and sparse crosscoders?

Method
    - Dictionaries (trained on the training store with the preset's token budgets): single-layer
      sae-lens TopK SAEs at the middle stored layer at each width of ``Config.sae_widths`` (k =
      ``Config.sae_k``), and acausal TopK crosscoders over every stored layer at each width of
      ``Config.cc_widths`` (k = the run's ``cc_k``; the width equal to the main crosscoder's is the main one).
    - Decoder directions, in normalised units (each layer scaled to mean norm sqrt(d)). An SAE latent
      is its decoder row ``[d]``. A crosscoder feature is one latent that writes a ``[L, d]`` vector,
      so it is compared as that vector concatenated over layers and unit-normalised ``[L*d]``: the
      cosine of two such vectors is the norm-weighted mean of their per-layer cosines, so layers where
      both features write strongly dominate, and a child that writes other layers than its parent is
      (rightly) a weaker match. The crosscoder's decoder at the SAE's layer alone is reported as a
      sensitivity check (``space`` column of ``summary.csv``).
    - Families (Towards Monosemanticity; Bussmann et al. 2025, research-notes section 4): for the
      small dictionary's latent i and the big dictionary's latents j, the children are
      C(i) = {j : cos(d_i^small, d_j^big) > tau}; the split count is |C(i)|, the fidelity
      max_j cos(d_i^small, d_j^big). Each adjacent pair of widths (w -> 2w) and the smallest ->
      largest pair are compared; tau = ``Config.tau`` for the main numbers, with a sweep over ``Config.taus``.
    - Activation version: on a fixed random sample of held-out rows (``Config.n_rows``), the correlation
      of f_i with sum_{j in C(i)} f_j, and with the best child's f_j alone. A latent counts as live
      when it fires on at least one sampled row; the rates are over live small-dictionary latents.
    - Example families: per approach, a live parent with 2-4 live children and the highest
      activation correlation, shown with the tokens of its top sampled activations and the tokens
      its decoder (at its last written layer) raises most through the unembedding.

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
ADJACENT, OVERALL = "adjacent", "smallest-largest"
FAMILY_COLUMNS = ["approach", "width_small", "width_big", "pair", "pair_kind", "step", "parent", "density",
                  "n_children", "fidelity", "best_child", "act_corr", "act_corr_best", "children"]
SUMMARY_COLUMNS = ["approach", "space", "width_small", "width_big", "pair", "pair_kind", "step", "tau", "n_live",
                   "n_dead", "mean_children", "mean_children_matched", "frac_split", "frac_kept", "frac_unmatched",
                   "median_fidelity", "mean_fidelity", "median_act_corr", "median_act_corr_split", "frac_new_big"]
EXAMPLE_COLUMNS = ["approach", "width_small", "width_big", "role", "feature", "cos_to_parent", "act_corr", "density",
                   "top_tokens", "top_context", "logits_up"]


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
    """(small, big, kind, step) of each adjacent pair of sorted ``widths`` and the smallest -> largest pair."""
    pairs = [(a, b, ADJACENT, i + 1) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
    if len(widths) > 2:
        pairs.append((widths[0], widths[-1], OVERALL, len(widths)))
    return pairs


def analyse_pair(approach: str, space: str, small: int, big: int, kind: str, step: int, dirs_small: Tensor,
                 dirs_big: Tensor, f_small: Tensor, f_big: Tensor, cfg: Config) -> tuple[pd.DataFrame, list[dict]]:
    """The family table (at ``cfg.tau``) and one summary row per tau of one (small, big) pair."""
    matches = decoder_matches(dirs_small, dirs_big, min_cos=min(cfg.taus))
    live_s, live_b = (f_small > 0).any(0), (f_big > 0).any(0)
    pair = f"{small}->{big}"
    rows, table = [], None
    for tau in cfg.taus:
        fam = families(matches, tau, f_small=f_small, f_big=f_big)
        n = fam["n_children"][live_s].float()
        corr = fam["act_corr"][live_s]
        split = fam["act_corr"][live_s & (fam["n_children"] >= 2)]
        rows.append({"approach": approach, "space": space, "width_small": small, "width_big": big, "pair": pair,
                     "pair_kind": kind, "step": step, "tau": tau, "n_live": int(live_s.sum()),
                     "n_dead": int((~live_s).sum()), "mean_children": _mean(n),
                     "mean_children_matched": _mean(n[n > 0]), "frac_split": _mean(n >= 2), "frac_kept": _mean(n == 1),
                     "frac_unmatched": _mean(n == 0), "median_fidelity": _median(matches["fidelity"][live_s]),
                     "mean_fidelity": _mean(matches["fidelity"][live_s]), "median_act_corr": _median(corr),
                     "median_act_corr_split": _median(split),
                     "frac_new_big": _mean(~fam["has_parent"][live_b])})
        if tau == cfg.tau:
            order = torch.argsort(fam["parent"] * dirs_big.shape[0] + fam["child"])  # by parent, then child
            counts = fam["n_children"].numpy()
            lists = np.split(fam["child"][order].numpy(), np.cumsum(counts)[:-1])
            table = pd.DataFrame({"approach": approach, "width_small": small, "width_big": big, "pair": pair,
                                  "pair_kind": kind, "step": step, "parent": np.arange(dirs_small.shape[0]),
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


# ----------------------------------------------------------------------------- examples

def _pick_example(table: pd.DataFrame, f_big: dict[int, Tensor]) -> pd.Series | None:
    """A live parent with 2-4 live children, highest activation correlation (adjacent pairs only)."""
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


# ----------------------------------------------------------------------------- the study

def run(ctx, cfg: Config) -> dict:
    results = ctx.results(NAME)
    heldout = ctx.store("heldout")
    train = ctx.store("train")
    mid = train.layers[train.n_layers // 2]
    sae_widths, cc_widths = sorted(set(cfg.sae_widths)), sorted(set(cfg.cc_widths))
    if len(sae_widths) < 2 or len(cc_widths) < 2 or cfg.tau not in cfg.taus:
        raise CrosslayerError(f"feature splitting needs at least two widths per approach and tau among taus, got "
                              f"sae_widths={cfg.sae_widths}, cc_widths={cfg.cc_widths}, tau={cfg.tau}, taus={cfg.taus}")
    dicts = {SAE: {w: ctx.saes(f"split_sae_w{w}", width=w, k=cfg.sae_k, layers=[mid]) for w in sae_widths},
             CC: {w: ctx.crosscoder() if w == ctx.cc_width else
                  ctx.crosscoder(f"split_cc_w{w}", width=w, k=ctx.sizes.cc_k) for w in cc_widths}}
    rows = sample_rows(heldout, cfg.n_rows)
    feats = {a: {w: encode_rows(d, heldout, rows) for w, d in ds.items()} for a, ds in dicts.items()}
    spaces = {SAE: [("layer", None)], CC: [("concat", None), (f"layer {mid}", [mid])]}
    tables, summary = [], []
    for approach, ds in dicts.items():
        for space, layers in spaces[approach]:
            dirs = {w: unit_decoders(d, layers) for w, d in ds.items()}
            for small, big, kind, step in _pairs(sorted(ds)):
                table, srows = analyse_pair(approach, space, small, big, kind, step, dirs[small], dirs[big],
                                            feats[approach][small], feats[approach][big], cfg)
                summary += srows
                if space in ("layer", "concat"):
                    tables.append(table)
    fam = pd.concat(tables, ignore_index=True)[FAMILY_COLUMNS]
    summ = pd.DataFrame(summary)[SUMMARY_COLUMNS]
    write_csv(fam, results / "families.csv")
    write_csv(summ, results / "summary.csv")
    examples = []
    model = ctx.model
    for approach, ds in dicts.items():
        pick = _pick_example(fam[fam.approach == approach], feats[approach])
        if pick is None:
            continue
        small, big = int(pick.width_small), int(pick.width_big)
        parent = int(pick.parent)
        children = [int(j) for j in pick.children.split()]
        dirs_s, dirs_b = unit_decoders(ds[small]), unit_decoders(ds[big])
        f_s, f_b = feats[approach][small][:, parent], feats[approach][big]
        base = {"approach": approach, "width_small": small, "width_big": big}
        examples.append({**base, "role": "parent", "feature": parent, "cos_to_parent": 1.0,
                         "act_corr": float(pick.act_corr),
                         **_describe(ds[small], parent, f_s, heldout, rows, model, model.tokenizer)})
        for j in children:
            corr = float(column_corr(f_s[:, None], f_b[:, j:j + 1])[0])
            described = _describe(ds[big], j, f_b[:, j], heldout, rows, model, model.tokenizer)
            examples.append({**base, "role": "child", "feature": j, "cos_to_parent": float(dirs_s[parent] @ dirs_b[j]),
                             "act_corr": corr, **described})
    write_csv(pd.DataFrame(examples, columns=EXAMPLE_COLUMNS), results / "example.csv")
    main = summ[(summ.tau == cfg.tau) & (summ.pair_kind == ADJACENT) & summ.space.isin(["layer", "concat"])]
    info = {"layer": mid, "rows": len(rows)}
    for approach, part in main.groupby("approach"):
        key = approach.lower()
        info[f"{key}_frac_split"] = round(float(part.frac_split.mean()), 4)
        info[f"{key}_mean_children_matched"] = round(float(part.mean_children_matched.mean()), 3)
        info[f"{key}_median_fidelity"] = round(float(part.median_fidelity.mean()), 4)
    return info


# ----------------------------------------------------------------------------- figures, tables, answer

def _step_label(frame: pd.DataFrame) -> np.ndarray:
    return np.where(frame.pair_kind == ADJACENT, "×2 (step " + frame.step.astype(str) + ")", "smallest→largest")


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    fam = read_csv(results, "families")
    live = fam[fam.density > 0].copy()
    live["children"] = live.n_children.clip(upper=5).map(lambda n: "5+" if n >= 5 else str(n))
    live["pair"] = live.pair.str.replace("->", "→")
    counts = (live.groupby(["approach", "pair", "step", "children"]).size()
              / live.groupby(["approach", "pair", "step"]).size()).rename("fraction").reset_index()
    order = ["0", "1", "2", "3", "4", "5+"]
    approaches = [a for a in (SAE, CC) if a in set(counts.approach)]
    fig, axes = plt.subplots(1, len(approaches), figsize=(5.2 * len(approaches), 3.8), squeeze=False, sharey=True)
    for ax, approach in zip(axes[0], approaches):
        part = counts[counts.approach == approach].sort_values("step")
        sns.barplot(data=part, x="children", y="fraction", hue="pair", order=order, ax=ax, palette="viridis")
        ax.set(title=approach, xlabel=f"children (decoder cosine > {cfg.tau})", ylabel="fraction of live latents")
        ax.legend(title="widths", fontsize=7, title_fontsize=8)
    paths = [(save_figure(fig, figures_dir / f"{NAME}_counts.png"),
              f"Split counts: how many latents of the wider dictionary have decoder cosine above {cfg.tau} with each "
              "live latent of the narrower one (0: no counterpart, 1: kept, 2+: split), per approach and width pair.")]

    live["step_label"] = _step_label(live)
    long = pd.concat([live.assign(metric="fidelity (max decoder cosine)", value=live.fidelity),
                      live.assign(metric="act. corr. with children's sum", value=live.act_corr)])
    long = long[long.value.notna()]
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.8))
    for ax, metric in zip(axes, ["fidelity (max decoder cosine)", "act. corr. with children's sum"]):
        part = long[long.metric == metric].sort_values("step")
        sns.boxplot(data=part, x="step_label", y="value", hue="approach", hue_order=approaches, ax=ax,
                    fliersize=1.5, linewidth=0.8)
        ax.set(xlabel="", ylabel=metric, ylim=(-0.05 if metric.startswith("act") else 0, 1.02))
        ax.tick_params(axis="x", labelsize=8)
    paths.append((save_figure(fig, figures_dir / f"{NAME}_fidelity.png"),
                  "Fidelity of each live latent of the narrower dictionary (its largest decoder cosine with the "
                  "wider one) and the held-out correlation of its activation with the summed activations of its "
                  f"children (cosine $>{cfg.tau}$), per width doubling and from the smallest to the largest width."))

    summ = read_csv(results, "summary")
    summ = summ[(summ.pair_kind == ADJACENT)].copy()
    summ["dictionary"] = np.where(summ.space.isin(["layer", "concat"]), summ.approach,
                                  summ.approach + " (" + summ.space + " only)")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [("frac_split", "fraction split (2+ children)"), ("frac_kept", "fraction kept (1 child)"),
              ("frac_unmatched", "fraction without children")]
    for ax, (col, label) in zip(axes, panels):
        sns.lineplot(data=summ, x="tau", y=col, hue="dictionary", marker="o", ax=ax, errorbar=("pi", 100))
        ax.set(xlabel="cosine threshold τ", ylabel=label, ylim=(0, 1))
        ax.axvline(cfg.tau, color="grey", lw=0.8, ls=":")
    for ax in axes[1:]:
        if ax.get_legend():
            ax.get_legend().remove()
    paths.append((save_figure(fig, figures_dir / f"{NAME}_tau.png"),
                  "Sensitivity to the child threshold $\\tau$: mean over the width doublings (band: range over them). "
                  "The crosscoder compared at the SAE's layer only is a check of the concatenated-layer comparison."))
    return paths


def _tokens_tex(value, n: int = 4) -> str:
    tokens = (json.loads(value) if isinstance(value, str) and value else [])[:n]
    return ", ".join(token_tex(t) for t in tokens) if tokens else "--"


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    summ = read_csv(results, "summary")
    main = summ[(summ.tau == cfg.tau) & summ.space.isin(["layer", "concat"])].copy()
    main["widths"] = main.width_small.astype(str) + r"$\to$" + main.width_big.astype(str)
    out = [latex_table(main, tables_dir / f"{NAME}.tex", raw_columns=("widths",),
                       columns={"approach": "approach", "widths": "widths", "n_live": "live", "frac_split": "split",
                                "frac_kept": "kept", "frac_unmatched": "none", "mean_children_matched": "children",
                                "median_fidelity": "fidelity", "median_act_corr": "act. corr.",
                                "frac_new_big": "new"},
                       caption=f"Feature splitting at decoder-cosine threshold {cfg.tau}: fractions of the narrower "
                               "dictionary's live latents with 2+ children (split), one (kept) or none; mean children "
                               "of those with any; median fidelity (max cosine) and median held-out correlation with "
                               "the children's summed activation; fraction of the wider dictionary's live latents "
                               "that are nobody's child (new). SAEs: one layer; crosscoders: decoders concatenated "
                               "over layers.", label=f"tab:{NAME}")]
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
                                       "and its children in the wider one, with decoder cosine and held-out activation "
                                       "correlation to the parent, firing density on the sampled held-out rows, the "
                                       "tokens of its top activations and the tokens its decoder raises most.",
                               label=f"tab:{NAME}-example", digits=2))
    return out


def answer(results: Path, cfg: Config) -> str:
    summ = read_csv(results, "summary")
    main = summ[summ.space.isin(["layer", "concat"])]
    at = main[main.tau == cfg.tau]
    parts = []
    for approach, label in ((SAE, "single-layer SAEs"), (CC, "crosscoders")):
        adj = at[(at.approach == approach) & (at.pair_kind == ADJACENT)]
        if adj.empty:
            continue
        overall = at[(at.approach == approach) & (at.pair_kind == OVERALL)]
        widths = sorted(set(adj.width_small) | set(adj.width_big))
        def pct(x: float) -> str:
            return f"{fmt(100 * x, 2)}\\%"

        text = (f"For {label} (widths {', '.join(str(int(w)) for w in widths)}), at each doubling "
                f"{pct(adj.frac_split.mean())} of the live latents split into two or more children "
                f"(decoder cosine $>{cfg.tau}$; range {fmt(100 * adj.frac_split.min(), 2)}--{pct(adj.frac_split.max())}), "
                f"{pct(adj.frac_kept.mean())} keep exactly one and {pct(adj.frac_unmatched.mean())} "
                f"have none; latents with children have {fmt(adj.mean_children_matched.mean(), 3)} on average. "
                f"Median fidelity is {fmt(adj.median_fidelity.mean(), 3)} and the median held-out correlation of a "
                f"latent with its children's summed activation {fmt(adj.median_act_corr.mean(), 3)}; "
                f"{pct(adj.frac_new_big.mean())} of the wider dictionary's live latents are nobody's child.")
        if len(overall):
            o = overall.iloc[0]
            text += (f" From {int(o.width_small)} to {int(o.width_big)} latents, {fmt(100 * o.frac_split, 2)}\\% split "
                     f"(median fidelity {fmt(o.median_fidelity, 3)}).")
        parts.append(text)
    sweep = main[(main.pair_kind == ADJACENT)].groupby(["approach", "tau"]).frac_split.mean().reset_index()
    if len(sweep):
        lo, hi = min(cfg.taus), max(cfg.taus)
        bits = [f"{a}: {fmt(100 * g[g.tau == lo].frac_split.iloc[0], 2)}\\% at $\\tau={lo}$ to "
                f"{fmt(100 * g[g.tau == hi].frac_split.iloc[0], 2)}\\% at $\\tau={hi}$"
                for a, g in sweep.groupby("approach")]
        parts.append("The split fraction depends on the threshold (" + "; ".join(bits) + ").")
    check = summ[(summ.approach == CC) & ~summ.space.isin(["layer", "concat"]) & (summ.tau == cfg.tau)
                 & (summ.pair_kind == ADJACENT)]
    if len(check):
        parts.append(f"Comparing crosscoder decoders at the SAE's layer only ({check.space.iloc[0]}) instead of "
                     f"concatenated over layers gives {fmt(100 * check.frac_split.mean(), 2)}\\% split.")
    ex = read_csv(results, "example")
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
    return " ".join(parts)


STUDY = Study(name=NAME, title="Feature splitting across dictionary widths", config=Config, run=run, figures=figures,
              tables=tables, answer=answer, dictionaries=("crosscoder",), order=40,
              presets={"micro": Config(sae_widths=(16, 32, 64, 128), sae_k=4, cc_widths=(16, 32, 64, 128)),
                       "paper": Config(sae_widths=(576, 1152, 2304, 4608), sae_k=32,
                                       cc_widths=(4320, 8640, 17280, 34560))})
