"""Reconstruction: how much sparser is a crosscoder than per-layer SAEs at equal reconstruction error,
and how much next-token loss does each recover, layer by layer?

Question
    At a matched total dictionary size, how does the reconstruction error (FVU) fall with the number of
    active (feature, layer) pairs for per-layer SAEs and for sparse crosscoders, and how many fewer
    does the crosscoder need at equal FVU? Spliced into the model one layer at a time -- the one
    splice every dictionary kind has with the same meaning -- how much of the next-token loss does
    each recover, and how much of an acausal crosscoder's recovery comes from reading later layers?

Method
    - Per-layer TopK SAEs (``sae_width`` latents per layer) at each k of ``Config.sae_k``, and acausal
      TopK crosscoders with ``sae_width * n_layers`` latents (the same total number of latents, "matched
      total dictionary size") at each k of ``Config.cc_k``; one weakly causal crosscoder at the main k;
      two capacity controls (``CCP``, ``RELU``). All are trained by the same trainer, on the same
      training store, batch and token budget, each approach at its swept learning rate (the main
      dictionaries are the sweep points at ``sae_k`` / ``cc_k``).
    - Sweep (``sweep.csv``): :func:`crosslayer.evals.evaluate` on the held-out store, reconstruction
      only: FVU (mean of the per-layer FVUs) and L0. The primary L0 counts active (feature, layer)
      pairs whose decoder norm at the layer is at least ``l0_frac`` of the feature's largest
      (``l0_tuple``): an SAE latent writes exactly one layer, so this is the like-for-like count; the
      crosscoder's count of features (``l0_feat``) is reported next to it.
    - Headline (``headline.csv``): the FVU-vs-log(L0) curve of each approach is interpolated linearly in
      log L0; at every FVU both curves reach, the ratio L0_SAE / L0_crosscoder (pairs; and with the
      crosscoder's features). Where the curves do not overlap, the nearest sweep points, flagged.
    - Downstream (``downstream.csv``), the main dictionaries only: each stored layer spliced alone, CE
      recovered against mean ablation (zero ablation as a second column) and KL, with 95 % bootstrap
      intervals over held-out documents; for the acausal crosscoder also the causal-prefix splice
      (later layers' inputs replaced by their mean), and each dictionary's multi-layer splice where it
      has a defined meaning (SAEs: sequential; weakly causal crosscoder: causal), listed under its name
      and never compared across names (:mod:`crosslayer.evals`).
    - Transcoders (``clt_vs_plt.csv``): a cross-layer transcoder against per-layer transcoders at matched L0, every
      MLP output replaced, CE recovered with document intervals -- trained and evaluated once per run by
      :func:`studies.attribution.transcoder_comparison` (settings: the attribution study's config).

Answer
    Generated from the CSVs by every run into ``paper/tables/reconstruction_answer.tex`` (numbers are
    never typed here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from crosslayer.io import write_csv
from studies.attribution import clt_plt_figure, clt_plt_table, clt_plt_text, transcoder_comparison
from studies.base import Study
from studies.common import fmt, latex_table, read_csv, save_figure, theme

NAME = "reconstruction"
CLT_PLT = "clt_vs_plt"
"""``clt_vs_plt.csv``: the attribution study's CLT-vs-PLT comparison (:func:`studies.attribution.transcoder_comparison`,
trained once per run and shared), reported here as the transcoders' reconstruction result."""


@dataclass(frozen=True)
class Config:
    """Settings of the reconstruction study (defaults: the demo preset)."""

    sae_k: tuple[int, ...] = (8, 16, 32)
    """Per-layer k of the SAE sparsity sweep (the run's main ``sae_k`` is always added)."""
    cc_k: tuple[int, ...] = (16, 32, 64)
    """k of the crosscoder sparsity sweep at matched total dictionary size (main ``cc_k`` added)."""


SAE, CC, WC = "per-layer SAEs", "crosscoder (acausal)", "crosscoder (weakly causal)"
CCP, RELU = "crosscoder (matched parameters)", "crosscoder (ReLU, L1 of norms)"
"""Capacity controls: an acausal TopK crosscoder with ``sae_width`` latents (the per-layer SAE set's parameter
count and encoder FLOPs; the main crosscoder matches its total number of latents), and a ReLU crosscoder
with Anthropic's L1-of-decoder-norms penalty, also with ``sae_width`` latents (its dense ReLU step costs about four
encoder GEMMs, so at the main width it would cost as much as the rest of the training; presets with
``relu_crosscoder``)."""
MAIN = {SAE: "saes", CC: "crosscoder", WC: "crosscoder_wc"}
"""The main dictionary of each approach (the one whose downstream splices are measured)."""
SWEEP_COLUMNS = ["approach", "dictionary", "k", "n_features", "l0_frac", "l0_tuple", "l0_feat", "fvu", "fvu_pooled",
                 "mse", "cos", "dead_frac", "n_tokens"]
CI = ("ce_recovered", "ce_recovered_zero", "kl")
SEEDS = "seeds"
"""``seeds.csv``: the main SAEs' and acausal crosscoder's evaluation at every seed (:func:`seed_rows`)."""
DOWNSTREAM_COLUMNS = ["approach", "dictionary", "splice", "layer", "n_predictions", "n_docs", "ce_clean", "ce_mean",
                      "ce_zero", "ce_spliced"] + [f"{c}{s}" for c in CI for s in ("", "_lo", "_hi")]


def _plan(ctx, cfg: Config) -> list[dict]:
    """Every sweep point: approach, dictionary name, k and how to train it."""
    p = ctx.sizes
    plan = [{"approach": SAE, "dictionary": "saes" if k == p.sae_k else f"saes_k{k}", "k": int(k)}
            for k in sorted(set(cfg.sae_k) | {p.sae_k})]
    plan += [{"approach": CC, "dictionary": "crosscoder" if k == p.cc_k else f"crosscoder_k{k}", "k": int(k)}
             for k in sorted(set(cfg.cc_k) | {p.cc_k})]
    plan.append({"approach": CCP, "dictionary": "crosscoder_params", "k": int(p.cc_k), "width": p.sae_width})
    if ctx.n_layers > 1:
        plan.append({"approach": WC, "dictionary": "crosscoder_wc", "k": int(p.cc_k), "variant": "weakly_causal"})
    if p.relu_crosscoder:
        plan.append({"approach": RELU, "dictionary": "crosscoder_relu", "k": int(p.cc_k), "activation": "relu",
                     "width": p.sae_width})
    return plan


def _train(ctx, point: dict):
    if point["approach"] == SAE:
        return ctx.saes(point["dictionary"], k=point["k"])
    return ctx.crosscoder(point["dictionary"], k=point["k"], width=point.get("width"),
                          variant=point.get("variant", "acausal"), activation=point.get("activation", "topk"))


def _sweep_rows(ctx, cfg: Config, results: Path) -> tuple[list[dict], list[dict]]:
    rows, layer_rows = [], []
    for point in _plan(ctx, cfg):
        _train(ctx, point)
        approach, name, k = point["approach"], point["dictionary"], point["k"]
        table = ctx.evaluation(name, folder=results, downstream=False)
        overall = table[table.scope == "all"].iloc[0]
        rows.append({"approach": approach, "dictionary": name, "k": k,
                     **{c: overall[c] for c in SWEEP_COLUMNS[3:]}})
        layer_rows += [{"approach": approach, "dictionary": name, "k": k, "layer": int(r.layer), "fvu": r.fvu,
                        "prefix_fvu": r.prefix_fvu, "l0": r.l0} for r in table[table.scope == "layer"].itertuples()]
    return rows, layer_rows


def downstream_rows(approach: str, table: pd.DataFrame) -> pd.DataFrame:
    """``downstream.csv`` rows of one main dictionary's evaluation table: its per-layer splices, its
    causal-prefix splices (where the table has them) and its multi-layer splice (where it has one)."""
    name = MAIN[approach]
    layer = table[table.scope == "layer"]
    parts = [layer.assign(splice="layer")]
    if layer["prefix_ce_recovered"].notna().any():
        prefix = layer[["layer", "n_predictions", "n_docs", "ce_clean", "ce_mean", "ce_zero"]].copy()
        for c in ("ce_spliced", "ce_recovered", "kl"):
            for s in ("", "_lo", "_hi"):
                prefix[f"{c}{s}"] = layer.get(f"prefix_{c}{s}", np.nan)
        parts.append(prefix.assign(splice="layer (causal prefix)"))
    overall = table[(table.scope == "all") & (table.splice != "none")]
    parts.append(overall.assign(layer=np.nan))
    out = pd.concat(parts, ignore_index=True).assign(approach=approach, dictionary=name)
    return out.reindex(columns=DOWNSTREAM_COLUMNS)


def seed_rows(tables: dict[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """``seeds.csv``: for each (approach, seed) evaluation table of a main dictionary, its held-out FVU (``layer``
    empty: over all layers) and, per layer, FVU and single-layer CE recovered with the document interval."""
    rows = []
    for (approach, seed), table in tables.items():
        overall = table[table.scope == "all"].iloc[0]
        rows.append({"approach": approach, "seed": seed, "layer": np.nan, "fvu": overall.fvu})
        rows += [{"approach": approach, "seed": seed, "layer": int(r.layer), "fvu": r.fvu,
                  "ce_recovered": r.ce_recovered, "ce_recovered_lo": r.ce_recovered_lo,
                  "ce_recovered_hi": r.ce_recovered_hi}
                 for r in table[(table.scope == "layer") & (table.splice == "layer")].itertuples()]
    return pd.DataFrame(rows, columns=["approach", "seed", "layer", "fvu", "ce_recovered", "ce_recovered_lo",
                                       "ce_recovered_hi"])


def _seed_gap(means: pd.DataFrame, value: str) -> tuple[float, float, float]:
    """(smallest, largest) |SAEs - crosscoder| of ``value`` over every pairing of one seed of each, and the
    largest difference between two seeds of one approach."""
    a, b = (means.loc[means.approach == name, value].to_numpy() for name in (SAE, CC))
    gaps = np.abs(a[:, None] - b[None, :])
    spread = max(np.ptp(a), np.ptp(b))
    return float(gaps.min()), float(gaps.max()), float(spread)


def seed_text(seeds: pd.DataFrame | None) -> str:
    """The approaches' difference against their seed-to-seed spread (main dictionaries, every seed trained)."""
    counts = None if seeds is None else seeds.groupby("approach").seed.nunique()
    if counts is None or not {SAE, CC} <= set(counts.index) or counts[[SAE, CC]].min() < 2:
        return ""  # a seed spread needs two seeds of each approach
    fvu = seeds[seeds.layer.isna()][["approach", "seed", "fvu"]]
    ce = seeds[seeds.layer.notna()].groupby(["approach", "seed"], as_index=False).ce_recovered.mean()
    parts = []
    for frame, value, what in ((fvu, "fvu", "held-out FVU"), (ce, "ce_recovered", "mean single-layer CE recovered")):
        lo, hi, spread = _seed_gap(frame, value)
        per = "; ".join(f"{name}: " + ", ".join(fmt(v, 3) for v in frame.loc[frame.approach == name, value])
                        for name in (SAE, CC))
        verdict = "larger than" if lo > spread else "not larger than"
        parts.append(f"{what} by seed ({per}): the gap between the approaches ({fmt(lo, 2)}--{fmt(hi, 2)} over "
                     f"pairings of seeds) is {verdict} the largest seed-to-seed difference ({fmt(spread, 2)})")
    n = int(counts[[SAE, CC]].min())
    return f"Seeds ({n} of each main dictionary, same data and budget): " + "; ".join(parts) + "."


def run(ctx, cfg: Config) -> dict:
    from studies.pipeline import seed_name

    results = ctx.results(NAME)
    rows, layer_rows = _sweep_rows(ctx, cfg, results)
    sweep = pd.DataFrame(rows)[SWEEP_COLUMNS]
    write_csv(sweep, results / "sweep.csv")
    write_csv(pd.DataFrame(layer_rows), results / "per_layer.csv")
    headline = equal_fvu_ratios(sweep)
    write_csv(headline, results / "headline.csv")
    down = pd.concat([downstream_rows(a, ctx.evaluation(MAIN[a])) for a in (SAE, CC, WC)
                      if MAIN[a] in set(sweep.dictionary)], ignore_index=True)
    write_csv(down, results / "downstream.csv")
    write_csv(seed_rows({(a, seed): ctx.evaluation(name) for a in (SAE, CC) for seed in range(ctx.sizes.seeds)
                         if (ctx.dicts / (name := seed_name(MAIN[a], seed))).exists()}), results / f"{SEEDS}.csv")
    transcoders, _ = transcoder_comparison(ctx, ctx.preset.config("attribution"))
    write_csv(transcoders, results / f"{CLT_PLT}.csv")
    mid = headline.iloc[len(headline) // 2] if len(headline) else None
    per_layer = down[down.splice == "layer"].groupby("approach").ce_recovered.mean()
    return {"points": len(sweep), "l0_ratio_mid": None if mid is None else float(mid["l0_ratio"]),
            "overlap": None if mid is None else bool(mid["interpolated"]),
            "mean_layer_ce_recovered": {a: round(float(v), 4) for a, v in per_layer.items()}}


def _curve(points: pd.DataFrame, l0: str) -> tuple[np.ndarray, np.ndarray]:
    """(fvu ascending, log L0) of one approach's sweep, made monotone (best FVU per L0)."""
    pts = points.sort_values(l0)
    fvu = np.minimum.accumulate(pts["fvu"].to_numpy(float))  # more active latents never hurt (drop noise)
    order = np.argsort(fvu)
    return fvu[order], np.log(pts[l0].to_numpy(float)[order])


HEADLINE_COLUMNS = ["fvu", "l0_sae", "l0_cc", "l0_ratio", "l0_feat_cc", "feat_ratio", "interpolated"]


def equal_fvu_ratios(sweep: pd.DataFrame, n: int = 9) -> pd.DataFrame:
    """L0 of per-layer SAEs / L0 of the acausal crosscoder at equal FVU (log-linear interpolation).

    ``l0_*`` count active (feature, layer) pairs (``l0_tuple``, the primary count); ``l0_feat_cc`` and
    ``feat_ratio`` count the crosscoder's features once. With overlapping FVU ranges, ``n`` evenly spaced
    FVUs of the overlap; otherwise one row comparing the sweep points closest in FVU (``interpolated``
    False).
    """
    sae, cc = sweep[sweep.approach == SAE], sweep[sweep.approach == CC]
    if sae.empty or cc.empty:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    (f_s, l_s), (f_c, l_c), (f_f, l_f) = _curve(sae, "l0_tuple"), _curve(cc, "l0_tuple"), _curve(cc, "l0_feat")
    lo, hi = max(f_s.min(), f_c.min()), min(f_s.max(), f_c.max())
    if lo <= hi and len(f_s) > 1 and len(f_c) > 1:
        grid = np.linspace(lo, hi, n) if hi > lo else np.array([lo])
        l0_s, l0_c, l0_f = (np.exp(np.interp(grid, f, l)) for f, l in ((f_s, l_s), (f_c, l_c), (f_f, l_f)))
        return pd.DataFrame({"fvu": grid, "l0_sae": l0_s, "l0_cc": l0_c, "l0_ratio": l0_s / l0_c,
                             "l0_feat_cc": l0_f, "feat_ratio": l0_s / l0_f, "interpolated": True})
    i, j = np.unravel_index(np.abs(sae.fvu.to_numpy()[:, None] - cc.fvu.to_numpy()[None]).argmin(),
                            (len(sae), len(cc)))
    s, c = sae.iloc[i], cc.iloc[j]
    return pd.DataFrame([{"fvu": (s.fvu + c.fvu) / 2, "l0_sae": s.l0_tuple, "l0_cc": c.l0_tuple,
                          "l0_ratio": s.l0_tuple / c.l0_tuple, "l0_feat_cc": c.l0_feat,
                          "feat_ratio": s.l0_tuple / c.l0_feat, "interpolated": False}])


# ----------------------------------------------------------------------------- rendering (CSVs only)

def _fvu_l0_figure(sweep: pd.DataFrame, path: Path) -> tuple[Path, str]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = pd.concat([sweep.assign(count="(feature, layer) pairs", l0=sweep.l0_tuple),
                      sweep[sweep.approach != SAE].assign(count="features", l0=lambda d: d.l0_feat)])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(data=long.sort_values("l0"), x="l0", y="fvu", hue="approach", style="count", markers=True,
                 dashes={"(feature, layer) pairs": "", "features": (3, 2)}, ax=ax, estimator=None, sort=False)
    for r in sweep.itertuples():
        ax.annotate(f"k={r.k}", (r.l0_tuple, r.fvu), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xscale="log", xlabel="L0 per token", ylabel="FVU (mean over layers)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), fontsize=7)
    frac = fmt(float(sweep.l0_frac.iloc[0]))
    return (save_figure(fig, path),
            f"FVU against L0. Solid: active (feature, layer) pairs (a pair counts when the feature's decoder norm "
            f"at the layer is at least {frac} of its largest; a per-layer SAE latent is one pair); dashed: the "
            f"crosscoders' active features counted once.")


def _downstream_figure(down: pd.DataFrame, path: Path) -> tuple[Path, str]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    per_layer = down[down.layer.notna()].copy()
    per_layer["curve"] = per_layer.approach + np.where(per_layer.splice == "layer", "", ", causal prefix")
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    palette = dict(zip(sorted(per_layer.curve.unique()), sns.color_palette(n_colors=per_layer.curve.nunique())))
    for i, (curve, part) in enumerate(per_layer.groupby("curve", sort=True)):
        x = part.layer.to_numpy(float) + (i - 1.5) * 0.08  # dodge the interval bars
        ax.errorbar(x, part.ce_recovered, yerr=[part.ce_recovered - part.ce_recovered_lo,
                                                part.ce_recovered_hi - part.ce_recovered],
                    fmt="o-", ms=3, capsize=2, lw=1, color=palette[curve], label=curve)
    ax.set(xlabel="layer spliced (alone)", ylabel="CE recovered (vs mean ablation)")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=7)
    n_docs = int(per_layer.n_docs.min())
    return (save_figure(fig, path),
            f"Next-token loss recovered when one layer is replaced by its reconstruction (main dictionaries), "
            f"against mean ablation of that layer, with 95\\% bootstrap intervals over {n_docs} held-out documents. "
            f"The causal prefix replaces the crosscoder's inputs at later layers by their mean.")


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    paths = [_fvu_l0_figure(read_csv(results, "sweep"), figures_dir / "reconstruction_fvu_l0.png")]
    down = read_csv(results, "downstream")
    if down.layer.notna().any():
        paths.append(_downstream_figure(down, figures_dir / "reconstruction_ce_per_layer.png"))
    per_layer = read_csv(results, "per_layer")
    main = per_layer[per_layer.dictionary.isin(MAIN.values())]
    if not main.empty:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        sns.lineplot(data=main, x="layer", y="fvu", hue="approach", marker="o", ax=ax)
        ax.set(xlabel="layer", ylabel="FVU")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), fontsize=7)
        paths.append((save_figure(fig, figures_dir / "reconstruction_per_layer.png"),
                      "FVU per layer of the main dictionaries (per-layer SAEs and crosscoders at the main k)."))
    transcoders = _optional(results, CLT_PLT)
    if transcoders is not None:
        paths.append(clt_plt_figure(transcoders, figures_dir / "reconstruction_clt_vs_plt.png"))
    return paths


def _optional(results: Path, name: str) -> pd.DataFrame | None:
    """``<name>.csv`` of the results, or None for a run made before the study wrote it."""
    path = Path(results) / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def _interval(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.Series([f"{fmt(v, 3)} [{fmt(lo, 3)}, {fmt(hi, 3)}]" if pd.notna(v) else "--"
                      for v, lo, hi in zip(frame[name], frame[f"{name}_lo"], frame[f"{name}_hi"])], index=frame.index)


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    sweep = read_csv(results, "sweep")
    frac = fmt(float(sweep.l0_frac.iloc[0]))
    main = latex_table(sweep, tables_dir / f"{NAME}.tex", label="tab:reconstruction",
                       columns={"approach": "approach", "k": "k", "n_features": "latents",
                                "l0_tuple": "L0 (pairs)", "l0_feat": "L0 (features)", "fvu": "FVU",
                                "dead_frac": "dead"},
                       caption=f"Sparsity sweep at matched total dictionary size (held-out tokens). L0 (pairs) counts "
                               f"active (feature, layer) pairs with decoder norm at least {frac} of the feature's "
                               "largest; L0 (features) counts each active feature once.")
    head = read_csv(results, "headline")
    second = latex_table(head, tables_dir / f"{NAME}_headline.tex", label="tab:reconstruction-headline",
                         columns={"fvu": "FVU", "l0_sae": "L0 SAEs", "l0_cc": "L0 crosscoder", "l0_ratio": "ratio",
                                  "feat_ratio": "ratio (crosscoder features)"},
                         caption="L0 needed to reach the same FVU (interpolated in log L0), in (feature, layer) "
                                 "pairs; the last column counts the crosscoder's features once.")
    down = read_csv(results, "downstream")
    down["layer_tex"] = down.layer.map(lambda v: str(int(v)) if pd.notna(v) else "all")
    for name in CI:
        down[f"{name}_tex"] = _interval(down, name)
    third = latex_table(down, tables_dir / f"{NAME}_downstream.tex", label="tab:reconstruction-downstream",
                        raw_columns=("ce_recovered_tex", "ce_recovered_zero_tex", "kl_tex"),
                        columns={"approach": "approach", "splice": "splice", "layer_tex": "layer",
                                 "ce_recovered_tex": "CE rec. (mean abl.)", "ce_recovered_zero_tex": "CE rec. (zero abl.)",
                                 "kl_tex": "KL", "n_docs": "docs"},
                        caption="Downstream loss of the main dictionaries: CE recovered against mean (and zero) "
                                "ablation and KL(clean || spliced), with 95\\% bootstrap intervals over held-out "
                                "documents. Rows compare only within one splice name.")
    transcoders = _optional(results, CLT_PLT)
    extra = [] if transcoders is None else [clt_plt_table(transcoders, tables_dir / f"{NAME}_{CLT_PLT}.tex")]
    return [main, second, third] + extra


def _layer_text(down: pd.DataFrame) -> str:
    """Per-layer CE recovered of the SAEs and the acausal crosscoder, and in how many layers their
    intervals do not overlap (which is higher there)."""
    lay = down[down.splice == "layer"].pivot_table(index="layer", columns="approach",
                                                    values=["ce_recovered", "ce_recovered_lo", "ce_recovered_hi"])
    if SAE not in lay["ce_recovered"] or CC not in lay["ce_recovered"]:
        return ""
    s, c = (lay["ce_recovered"][a] for a in (SAE, CC))
    cc_above = lay["ce_recovered_lo"][CC] > lay["ce_recovered_hi"][SAE]
    sae_above = lay["ce_recovered_lo"][SAE] > lay["ce_recovered_hi"][CC]
    return (f"Spliced one layer at a time (the like-for-like comparison), the per-layer SAEs recover "
            f"{fmt(s.min(), 3)}--{fmt(s.max(), 3)} of the next-token loss (against mean ablation; mean over "
            f"layers {fmt(s.mean(), 3)}) and the acausal crosscoder {fmt(c.min(), 3)}--{fmt(c.max(), 3)} (mean "
            f"{fmt(c.mean(), 3)}); the 95\\% intervals separate in {int(cc_above.sum() + sae_above.sum())} of "
            f"{len(lay)} layers ({int(cc_above.sum())} with the crosscoder higher, {int(sae_above.sum())} with the "
            f"SAEs higher).")


def _prefix_text(down: pd.DataFrame) -> str:
    plain = down[(down.approach == CC) & (down.splice == "layer")].set_index("layer").ce_recovered
    prefix = down[(down.approach == CC) & (down.splice == "layer (causal prefix)")].set_index("layer").ce_recovered
    if prefix.empty:
        return ""
    gap = (plain - prefix).dropna() + 0.0  # + 0.0: no "-0"
    return (f"Without the later layers (their inputs replaced by the mean), the acausal crosscoder's per-layer "
            f"recovery falls by {fmt(gap.min(), 3)} to {fmt(gap.max(), 3)} (mean {fmt(gap.mean(), 3)}; negative: "
            f"rises): what it gains from reading the future.")


def _times(ratio: float) -> str:
    """A ratio L0(SAEs) / L0(crosscoder) as what the crosscoder needs: "2.1x fewer" or "1.5x more"."""
    return f"{fmt(ratio, 2)}$\\times$ fewer" if ratio >= 1 else f"{fmt(1 / ratio, 2)}$\\times$ more"


def _sweep_text(sweep: pd.DataFrame, head: pd.DataFrame) -> list[str]:
    parts = []
    if len(head):
        how = ("over the FVU range both sweeps reach" if bool(head.interpolated.iloc[0])
               else "at the sweep points closest in FVU (the curves do not overlap, so this is not interpolated)")
        mid = head.iloc[len(head) // 2]
        parts.append(f"At equal FVU, {how}, the ratio L0(per-layer SAEs) / L0(acausal crosscoder) in active (feature, "
                     f"layer) pairs is {fmt(head.l0_ratio.min(), 2)}--{fmt(head.l0_ratio.max(), 2)} (median "
                     f"{fmt(float(head.l0_ratio.median()), 2)}: the crosscoder needs {_times(float(head.l0_ratio.median()))}"
                     f" pairs; at FVU {fmt(float(mid.fvu), 2)}: {fmt(float(mid.l0_sae), 3)} vs {fmt(float(mid.l0_cc), 3)}); "
                     f"counting each crosscoder feature once, the ratio is {fmt(float(head.feat_ratio.median()), 2)} (the "
                     f"crosscoder needs {_times(float(head.feat_ratio.median()))} active latents).")
    for name in (SAE, CC):
        part = sweep[sweep.approach == name]
        if len(part):
            parts.append(f"{name[0].upper() + name[1:]}: FVU {fmt(part.fvu.max(), 3)} to {fmt(part.fvu.min(), 3)} "
                         f"at L0 {fmt(part.l0_tuple.min(), 3)} to {fmt(part.l0_tuple.max(), 3)} pairs.")
    for name, what in ((CCP, "with as many parameters as the per-layer SAEs"),
                       (RELU, "trained with ReLU and the L1-of-norms penalty")):
        ctrl = sweep[sweep.approach == name]
        if len(ctrl):
            c = ctrl.iloc[0]
            parts.append(f"Control: the crosscoder {what} ({int(c.n_features)} latents) reaches FVU "
                         f"{fmt(c.fvu, 3)} at L0 {fmt(c.l0_tuple, 3)} pairs ({fmt(c.l0_feat, 3)} features).")
    wc, cc = sweep[sweep.approach == WC], sweep[sweep.approach == CC]
    if len(wc):
        w = wc.iloc[0]
        acausal = cc[cc.k == w.k]
        than = f" (acausal at the same k: {fmt(acausal.fvu.iloc[0], 3)})" if len(acausal) else ""
        parts.append(f"The weakly causal crosscoder (k={int(w.k)}) reaches FVU {fmt(w.fvu, 3)}{than}; "
                     f"{fmt(100 * w.dead_frac, 2)}\\% of its latents never fire on the held-out tokens.")
    return parts


def answer(results: Path, cfg: Config) -> str:
    sweep, head, down = read_csv(results, "sweep"), read_csv(results, "headline"), read_csv(results, "downstream")
    transcoders = _optional(results, CLT_PLT)
    parts = _sweep_text(sweep, head) + [_layer_text(down), seed_text(_optional(results, SEEDS)), _prefix_text(down),
                                        "" if transcoders is None else clt_plt_text(transcoders)]
    return " ".join(p for p in parts if p)


STUDY = Study(name=NAME, title="Reconstruction against sparsity", config=Config, run=run, figures=figures,
              tables=tables, answer=answer, dictionaries=("saes", "crosscoder"), order=20,
              presets={"micro": Config(sae_k=(2, 4), cc_k=(4, 8)),
                       "standard": Config(sae_k=(8, 16, 32), cc_k=(16, 32)),
                       "paper": Config(sae_k=(8, 16, 32, 64), cc_k=(32, 64, 128, 256))})
