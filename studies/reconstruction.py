"""Reconstruction: how much sparser is a crosscoder than per-layer SAEs at equal reconstruction error?

Question
    At a matched total dictionary size, how does the reconstruction error (FVU) fall with the total
    number of active latents (L0) for per-layer SAEs and for sparse crosscoders, and how much lower
    is the crosscoder's total L0 at equal FVU? How much next-token loss is recovered when every
    stored layer is spliced at once?

Method
    - Per-layer sae-lens TopK SAEs (``sae_width`` latents per layer) at each k of ``Config.sae_k``,
      and acausal TopK crosscoders with ``sae_width * n_layers`` latents (the same total number of
      latents, "matched total dictionary size") at each k of ``Config.cc_k``; one weakly causal
      crosscoder at the main k. All are trained on the same training store with the preset's token
      budgets (the main dictionaries are the sweep points at ``sae_k`` / ``cc_k``).
    - Each is evaluated on the held-out store with :func:`crosslayer.evals.evaluate`: FVU (mean of
      the per-layer FVUs, research-notes section 4), the total L0 -- summed over the layers' SAEs
      for per-layer SAEs, counted once per feature (``l0_feat``) and per active feature-layer pair
      (``l0_tuple``) for crosscoders -- and CE loss recovered / KL with every stored layer spliced
      (per-layer SAEs in sequence in one forward pass; a crosscoder encodes the clean activations
      once and replaces every layer).
    - Headline: the FVU-vs-log(L0) curve of each approach is interpolated linearly in log L0; at
      every FVU both curves reach, the ratio L0_SAE / L0_crosscoder is reported (``headline.csv``).
      Where the curves do not overlap, the ratio at the nearest sweep points is reported and flagged.

Answer
    Generated from the CSVs by every run into ``paper/tables/reconstruction_answer.tex`` (numbers are never
    typed here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from crosslayer.io import write_csv
from studies.base import Study
from studies.common import fmt, latex_table, read_csv, save_figure, theme

NAME = "reconstruction"


@dataclass(frozen=True)
class Config:
    """Settings of the reconstruction study (defaults: the demo preset)."""

    sae_k: tuple[int, ...] = (8, 16, 32)
    """Per-layer k of the SAE sparsity sweep (the run's main ``sae_k`` is always added)."""
    cc_k: tuple[int, ...] = (16, 32, 64)
    """k of the crosscoder sparsity sweep at matched total dictionary size (main ``cc_k`` added)."""

SAE, CC, WC = "per-layer SAEs", "crosscoder (acausal)", "crosscoder (weakly causal)"
SWEEP_COLUMNS = ["approach", "dictionary", "k", "n_features", "l0_total", "l0_tuple", "fvu", "fvu_pooled", "mse",
                 "cos", "ce_clean", "ce_spliced", "ce_recovered", "kl", "dead_frac", "n_tokens", "n_predictions"]


def _plan(ctx, cfg: Config) -> list[tuple[str, str, int, str]]:
    """(approach, dictionary name, k, variant) of every sweep point."""
    p = ctx.sizes
    plan = [(SAE, "saes" if k == p.sae_k else f"saes_k{k}", int(k), "") for k in sorted(set(cfg.sae_k) | {p.sae_k})]
    plan += [(CC, "crosscoder" if k == p.cc_k else f"crosscoder_k{k}", int(k), "acausal")
             for k in sorted(set(cfg.cc_k) | {p.cc_k})]
    if ctx.n_layers > 1:
        plan.append((WC, "crosscoder_wc", int(p.cc_k), "weakly_causal"))
    return plan


def run(ctx, cfg: Config) -> dict:
    from crosslayer.evals import evaluate

    results = ctx.results(NAME)
    rows, layer_rows = [], []
    for approach, name, k, variant in _plan(ctx, cfg):
        dictionary = ctx.saes(name, k=k) if approach == SAE else ctx.crosscoder(name, k=k, variant=variant)
        cached = results / f"eval_{name}.csv"
        if cached.is_file():
            table = pd.read_csv(cached)
        else:
            table = evaluate(dictionary, ctx.store("heldout"), model=ctx.model, n_tokens=ctx.sizes.eval_tokens,
                             n_windows=ctx.sizes.eval_windows, per_layer_downstream=False, out=cached,
                             progress=ctx.progress)
        overall = table[table.scope == "all"].iloc[0]
        rows.append({"approach": approach, "dictionary": name, "k": k, "n_features": int(overall["n_features"]),
                     "l0_total": float(overall["l0_feat"]), **{c: float(overall[c]) for c in SWEEP_COLUMNS[5:]
                                                                if c in overall}})
        per_layer = table[table.scope == "layer"]
        layer_rows += [{"approach": approach, "dictionary": name, "k": k, "layer": int(r.layer), "fvu": r.fvu,
                        "l0": r.l0} for r in per_layer.itertuples()]
    sweep = pd.DataFrame(rows)[[c for c in SWEEP_COLUMNS if c in pd.DataFrame(rows).columns]]
    write_csv(sweep, results / "sweep.csv")
    write_csv(pd.DataFrame(layer_rows), results / "per_layer.csv")
    headline = equal_fvu_ratios(sweep)
    write_csv(headline, results / "headline.csv")
    best = headline.iloc[len(headline) // 2] if len(headline) else None
    return {"points": len(sweep), "l0_ratio_mid": None if best is None else float(best["l0_ratio"]),
            "overlap": None if best is None else bool(best["interpolated"])}


def _curve(points: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(fvu ascending, log L0) of one approach's sweep, made monotone (best FVU per L0)."""
    pts = points.sort_values("l0_total")
    fvu = np.minimum.accumulate(pts["fvu"].to_numpy(float))  # more active latents never hurt (drop noise)
    order = np.argsort(fvu)
    return fvu[order], np.log(pts["l0_total"].to_numpy(float)[order])


def equal_fvu_ratios(sweep: pd.DataFrame, n: int = 9) -> pd.DataFrame:
    """L0 of per-layer SAEs / L0 of the acausal crosscoder at equal FVU (log-linear interpolation).

    Columns: fvu, l0_sae, l0_cc, l0_ratio, l0_tuple_cc, tuple_ratio, interpolated. With overlapping
    FVU ranges, ``n`` evenly spaced FVUs of the overlap; otherwise one row comparing the sweep points
    closest in FVU (``interpolated`` False).
    """
    sae, cc = sweep[sweep.approach == SAE], sweep[sweep.approach == CC]
    if sae.empty or cc.empty:
        return pd.DataFrame(columns=["fvu", "l0_sae", "l0_cc", "l0_ratio", "l0_tuple_cc", "tuple_ratio",
                                     "interpolated"])
    f_s, l_s = _curve(sae)
    f_c, l_c = _curve(cc)
    cc_sorted = cc.sort_values("l0_total")
    lo, hi = max(f_s.min(), f_c.min()), min(f_s.max(), f_c.max())
    if lo <= hi and len(f_s) > 1 and len(f_c) > 1:
        grid = np.linspace(lo, hi, n) if hi > lo else np.array([lo])
        l0_s, l0_c = np.exp(np.interp(grid, f_s, l_s)), np.exp(np.interp(grid, f_c, l_c))
        l0_t = np.exp(np.interp(np.log(l0_c), np.log(cc_sorted.l0_total), np.log(cc_sorted.l0_tuple)))
        return pd.DataFrame({"fvu": grid, "l0_sae": l0_s, "l0_cc": l0_c, "l0_ratio": l0_s / l0_c,
                             "l0_tuple_cc": l0_t, "tuple_ratio": l0_s / l0_t, "interpolated": True})
    i, j = np.unravel_index(np.abs(sae.fvu.to_numpy()[:, None] - cc.fvu.to_numpy()[None]).argmin(),
                            (len(sae), len(cc)))
    s, c = sae.iloc[i], cc.iloc[j]
    return pd.DataFrame([{"fvu": (s.fvu + c.fvu) / 2, "l0_sae": s.l0_total, "l0_cc": c.l0_total,
                          "l0_ratio": s.l0_total / c.l0_total, "l0_tuple_cc": c.l0_tuple,
                          "tuple_ratio": s.l0_total / c.l0_tuple, "interpolated": False}])


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    sweep = read_csv(results, "sweep")
    long = pd.concat([sweep.assign(count="per feature", l0=sweep.l0_total),
                      sweep[sweep.approach != SAE].assign(count="per feature-layer pair", l0=lambda d: d.l0_tuple)])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(data=long.sort_values("l0"), x="l0", y="fvu", hue="approach", style="count", markers=True,
                 dashes={"per feature": "", "per feature-layer pair": (3, 2)}, ax=ax, estimator=None, sort=False)
    for r in sweep.itertuples():
        ax.annotate(f"k={r.k}", (r.l0_total, r.fvu), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xscale="log", xlabel="total L0 (active latents per token, all layers)", ylabel="FVU (mean over layers)")
    paths = [(save_figure(fig, figures_dir / "reconstruction_fvu_l0.png"),
              "FVU against total L0. Per-layer SAEs count the active latents of every layer's SAE; the "
              "crosscoder counts each active feature once (solid) or once per layer it writes (dashed).")]
    per_layer = read_csv(results, "per_layer")
    main = per_layer[per_layer.dictionary.isin(["saes", "crosscoder", "crosscoder_wc"])]
    if not main.empty:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        sns.lineplot(data=main, x="layer", y="fvu", hue="approach", marker="o", ax=ax)
        ax.set(xlabel="layer", ylabel="FVU")
        paths.append((save_figure(fig, figures_dir / "reconstruction_per_layer.png"),
                      "FVU per layer of the main dictionaries (per-layer SAEs and crosscoders at the main k)."))
    return paths


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    sweep = read_csv(results, "sweep")
    cols = {"approach": "approach", "k": "k", "n_features": "latents", "l0_total": "L0 (total)",
            "l0_tuple": "L0 (feature-layer)", "fvu": "FVU", "ce_recovered": "CE rec. (all layers)", "kl": "KL",
            "dead_frac": "dead"}
    main = latex_table(sweep, tables_dir / f"{NAME}.tex", columns={c: h for c, h in cols.items() if c in sweep},
                       caption="Sparsity sweep at matched total dictionary size (held-out tokens). L0 (total) "
                               "sums per-layer SAE L0s and counts each crosscoder feature once.",
                       label="tab:reconstruction")
    head = read_csv(results, "headline")
    second = latex_table(head, tables_dir / f"{NAME}_headline.tex",
                         columns={"fvu": "FVU", "l0_sae": "L0 SAEs", "l0_cc": "L0 crosscoder",
                                  "l0_ratio": "ratio", "tuple_ratio": "ratio (feature-layer)"},
                         caption="Total L0 needed to reach the same FVU (interpolated in log L0).",
                         label="tab:reconstruction-headline")
    return [main, second]


def answer(results: Path, cfg: Config) -> str:
    sweep, head = read_csv(results, "sweep"), read_csv(results, "headline")
    sae, cc = sweep[sweep.approach == SAE], sweep[sweep.approach == CC]
    parts = []
    if len(head):
        how = ("over the FVU range both sweeps reach" if bool(head.interpolated.iloc[0])
               else "at the sweep points closest in FVU (the curves do not overlap, so this is not interpolated)")
        parts.append(f"At equal FVU, {how}, the acausal crosscoder needs {fmt(head.l0_ratio.min(), 2)}--"
                     f"{fmt(head.l0_ratio.max(), 2)}$\\times$ fewer active latents than the per-layer SAEs "
                     f"together (median {fmt(float(head.l0_ratio.median()), 2)}$\\times$; e.g. at FVU "
                     f"{fmt(float(head.fvu.iloc[len(head) // 2]), 2)}: {fmt(float(head.l0_sae.iloc[len(head) // 2]), 3)} "
                     f"vs {fmt(float(head.l0_cc.iloc[len(head) // 2]), 3)}). Counting every layer a crosscoder "
                     f"feature writes to, the ratio is {fmt(float(head.tuple_ratio.median()), 2)}$\\times$.")
    for name, part in ((SAE, sae), (CC, cc)):
        if len(part):
            best = part.sort_values("fvu").iloc[0]
            parts.append(f"{name[0].upper() + name[1:]}: FVU {fmt(part.fvu.max(), 3)} to {fmt(part.fvu.min(), 3)} at total "
                         f"L0 {fmt(part.l0_total.min(), 3)} to {fmt(part.l0_total.max(), 3)}; splicing every "
                         f"stored layer recovers {fmt(best.ce_recovered, 2)} of the CE loss (KL "
                         f"{fmt(best.kl, 3)}) at k={int(best.k)}.")
    wc = sweep[sweep.approach == WC]
    if len(wc):
        w = wc.iloc[0]
        acausal = cc[cc.k == w.k]
        than = f" (acausal at the same k: {fmt(acausal.fvu.iloc[0], 3)})" if len(acausal) else ""
        parts.append(f"The weakly causal crosscoder (k={int(w.k)}) reaches FVU {fmt(w.fvu, 3)}{than} and CE "
                     f"recovered {fmt(w.ce_recovered, 2)}; {fmt(100 * w.dead_frac, 2)}\% of its latents never "
                     "fire on the held-out tokens.")
    return " ".join(parts)


STUDY = Study(name=NAME, title="Reconstruction against sparsity", config=Config, run=run, figures=figures,
              tables=tables, answer=answer, dictionaries=("saes", "crosscoder"), order=20,
              presets={"micro": Config(sae_k=(2, 4), cc_k=(4, 8)),
                       "paper": Config(sae_k=(8, 16, 32, 64), cc_k=(32, 64, 128, 256))})
