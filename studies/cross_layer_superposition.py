"""Cross-layer superposition: is one feature learnt once by a crosscoder but again at every layer by SAEs?

Question
    Over how many layers does a crosscoder feature write, where does it peak and how much does its
    direction drift? Do per-layer SAEs learn the same feature again at adjacent layers (chains of
    matching latents), and how many SAE latents correspond to one crosscoder feature? On synthetic
    data with known multi-layer features, which approach recovers a feature as one latent?

Method
    - Live features: those that fire on at least one of ``Config.n_rows`` sampled held-out rows; dead
      features keep their random initial decoders and are left out of every statistic.
    - Crosscoder profiles (:func:`crosslayer.features.decoder_profile`, research-notes section 4):
      relative decoder norm r_i^l = ||d_i^l|| / max_l ||d_i^l|| (normalised units), peak layer,
      span #{l : r_i^l > Config.span_tau} (also at 0.5), normalised entropy of r_i and direction drift
      cos(d_i^peak, d_i^l) over the spanned layers.
    - Nulls for the profiles (``profile_nulls.csv``): a TopK crosscoder puts no per-layer sparsity pressure on its
      profile and contiguous layers share most of the residual stream, so "spans every layer" is compared with
      (a) the same crosscoder at initialisation (flat by construction) and (b) residual persistence: the
      least-squares decoder of every layer given only the projection on one direction at one layer (random, or
      a top principal direction of that layer), :func:`persistence_profiles`. Means of span and entropy with 95 %
      bootstrap intervals over features / directions; the figure groups profiles by peak layer (Anthropic's).
    - SAE chains (SAE Match, Balagansky et al. 2024; feature flow, Laptev et al. 2025): the live
      latents of the SAEs at adjacent layers l, l+1 are matched one-to-one by decoder cosine
      (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`); a match with cosine >
      tau is a link. The residual stream keeps one basis across layers and the per-layer
      normalisation is a scalar, so decoder cosines across layers are meaningful. Links form chains
      (paths through the layers: the same feature learnt again at each layer); a chain's length is
      its number of latents. The held-out activation correlation of each linked pair is reported,
      and chance is the 99th percentile of Hungarian-matched cosines against random directions.
    - SAE latents per crosscoder feature: for each live crosscoder feature and each layer it spans,
      the live SAE latents of that layer with cosine > tau to the crosscoder's layer-l decoder
      direction, summed over layers (one SAE copy per spanned layer gives the span), with the
      number of distinct SAE chains among the best matches and their activation correlation.
    - Synthetic ground truth (:mod:`studies.synthetic_regimes`, its Method): named regimes of
      :func:`crosslayer.synthetic.make_synthetic` (``Config.syn_regimes``: easy, heavy superposition, independent
      per-layer magnitudes, weak all-layer features, parent/child hierarchy), ``Config.syn_seeds`` seeds each; an
      acausal TopK crosscoder and per-layer TopK SAEs trained by the same trainer at matched L0 per (feature, layer)
      (k per layer for the SAEs, k for the crosscoder, which writes every layer: k L pairs each) and matched
      parameters (each layer's SAE as wide as the crosscoder). Per regime: MMCS (all, multi-layer, weak features),
      latents per multi-layer feature, false merges, absorption and held-out FVU, with 95 % t-intervals over seeds;
      the paired crosscoder-minus-SAEs interval says which wins or that they tie, a random decoder is the null.
    - tau = ``Config.tau`` (0.5) for the main numbers (well above chance), swept over ``Config.taus``.

Answer
    Generated from the CSVs by every run into ``paper/tables/cross_layer_superposition_answer.tex`` (numbers are never
    typed here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from crosslayer.errors import CrosslayerError
from crosslayer.io import write_csv
from crosslayer.matching import (build_chains, chance_cosine, decoders, match_adjacent, sae_blocks,  # noqa: F401
                                 sae_per_crosscoder, unit)
from studies.base import Study
from studies.common import (bootstrap_mean, column_corr, encode_rows, fmt, latex_table, read_csv, sample_rows,
                            save_figure, theme)
from studies import synthetic_regimes

NAME = "cross_layer_superposition"
SAE, CC = "per-layer SAEs", "crosscoder"


@dataclass(frozen=True)
class Config:
    """Settings of the cross-layer superposition study (defaults: the demo preset)."""

    tau: float = 0.5
    """Decoder-cosine threshold of a cross-layer link and of an SAE latent matching a crosscoder feature."""
    taus: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    """Thresholds of the sweep (must include ``tau``)."""
    span_tau: float = 0.1
    """A feature spans layer l when r_i^l > span_tau (the default of decoder_profile)."""
    n_rows: int = 4096
    """Held-out rows sampled to find live features and activation correlations."""
    synthetic_tokens: int = 20_000
    """Training rows of the synthetic ground-truth data (per regime and seed)."""
    null_random: int = 256
    """Random directions per layer in the residual-persistence null."""
    null_pcs: int = 16
    """Top principal directions per layer in the residual-persistence null."""
    syn_regimes: tuple[str, ...] = ("easy", "heavy", "independent", "weak", "hierarchical")
    """Synthetic regimes (:data:`studies.synthetic_regimes.REGIMES`), each trained and scored per seed."""
    syn_seeds: int = 3
    """Seeds per regime (data, batch order and initialisation); intervals are over them."""
    syn_layers: int = 4
    """Layers of the synthetic data."""
    syn_d: int = 16
    """Width d of each synthetic layer."""
    syn_k: int = 4
    """TopK of the crosscoder and of each layer's SAE: k L active (feature, layer) pairs per token for both."""
    syn_width: int = 2
    """Latents per true feature: the crosscoder's width, and each layer's SAE's (matched parameters)."""
    syn_batch: int = 256
    """Rows per training step of the synthetic runs."""
    syn_lr: float = 3e-3
    """Learning rate of the synthetic runs."""
    syn_steps: int = 150
    """Training steps of each synthetic run."""
    syn_heldout: int = 4096
    """Held-out synthetic rows (FVU, absorption) per regime and seed."""
    syn_recovered: float = 0.9
    """A method fails a regime when its MMCS interval lies below this."""
    often: float = 0.02
    """Synthetic features firing at least this often count as learnable at these token budgets."""

    def __post_init__(self):
        unknown = [r for r in self.syn_regimes if r not in synthetic_regimes.REGIMES]
        if unknown:
            raise CrosslayerError(f"unknown synthetic regimes {unknown}; use names from "
                                  f"{', '.join(synthetic_regimes.REGIMES)}")


CHAIN_COLUMNS = ["chain", "start_layer", "end_layer", "length", "mean_cos", "min_cos", "mean_act_corr", "latents"]
PER_CC_COLUMNS = ["feature", "peak_layer", "span", "n_sae_latents", "n_matched_layers", "frac_layers_matched",
                  "mean_best_cos", "mean_best_act_corr", "n_chains"]


# ----------------------------------------------------------------------------- chains of SAE latents across layers
# (matching itself lives in the library: crosslayer.matching)

def chain_table(chain_N: np.ndarray, layer_N: np.ndarray, latent_N: np.ndarray, link_cos_N: np.ndarray,
                link_corr_N: np.ndarray, keep_N: np.ndarray, layers: list[int]) -> pd.DataFrame:
    """One row per chain of kept latents: start/end layer, length, link cosines and activation correlations.

    ``link_cos_N`` / ``link_corr_N``: each latent's link to the next layer (NaN without one).
    """
    frame = pd.DataFrame({"chain": chain_N, "layer": np.asarray(layers)[layer_N], "latent": latent_N,
                          "cos": link_cos_N, "corr": link_corr_N})[keep_N]
    frame["member"] = frame.layer.astype(str) + ":" + frame.latent.astype(str)
    grouped = frame.groupby("chain", sort=True)
    table = pd.DataFrame({"start_layer": grouped.layer.min(), "end_layer": grouped.layer.max(),
                          "length": grouped.size(), "mean_cos": grouped.cos.mean(), "min_cos": grouped.cos.min(),
                          "mean_act_corr": grouped["corr"].mean(), "latents": grouped.member.agg(" ".join)})
    table = table.reset_index(drop=True).rename_axis("chain").reset_index()
    return table[CHAIN_COLUMNS]


def distinct_per_row(ids_FL: np.ndarray) -> np.ndarray:
    """Number of distinct non-negative values in each row of ``ids_FL`` (-1 = none)."""
    s = np.sort(ids_FL, axis=1)
    new = (s[:, 1:] != s[:, :-1]) & (s[:, 1:] >= 0)
    return (s[:, :1] >= 0).sum(1) + new.sum(1)


# ----------------------------------------------------------------------------- nulls for the decoder-norm profiles

NULL_COLUMNS = ["kind", "source_layer", "direction", "peak_layer", "span", "span_50", "entropy"]


def persistence_profiles(x_NLD: Tensor, layers: list[int], *, n_random: int, n_pcs: int, span_tau: float,
                         seed: int = 0) -> pd.DataFrame:
    """Decoder-norm profiles that residual persistence alone produces (the null for "a feature spans many layers").

    For a direction v at layer p -- ``n_random`` random unit directions, and the ``n_pcs`` top principal directions
    of layer p's centred activations -- the least-squares decoder of every layer l given only the centred projection
    s = (x_p - mean_p) . v is w_l = E[(x_l - mean_l) s] / E[s^2]; its profile r_l = ||w_l|| / max_l ||w_l|| is what a
    crosscoder latent that only carries "v at layer p" forward would learn (``x_NLD`` in the dictionary's normalised
    units). Columns: :data:`NULL_COLUMNS` plus ``r_<layer>``.
    """
    from crosslayer.features import profile_stats

    X = x_NLD.double() - x_NLD.double().mean(0)
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for p in range(X.shape[1]):
        principal = torch.linalg.svd(X[:, p], full_matrices=False).Vh[:n_pcs]
        random = unit(torch.randn(n_random, X.shape[2], generator=gen)).double()
        for kind, dirs in (("random direction", random), ("principal direction", principal)):
            s_NV = X[:, p] @ dirs.T
            W_VLD = torch.einsum("nv,nld->vld", s_NV, X) / s_NV.pow(2).sum(0).clamp_min(1e-12)[:, None, None]
            _, peak, r_VL, span, ent = profile_stats(W_VLD.norm(dim=-1).float(), tau=span_tau)
            frame = pd.DataFrame({"kind": kind, "source_layer": layers[p], "direction": np.arange(len(dirs)),
                                  "peak_layer": np.asarray(layers)[peak.numpy()], "span": span.numpy(),
                                  "span_50": (r_VL > 0.5).sum(1).numpy(), "entropy": ent.numpy()})
            for i, l in enumerate(layers):
                frame[f"r_{l}"] = r_VL[:, i].numpy()
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def init_profiles(cc, span_tau: float) -> pd.DataFrame:
    """The profiles of the same crosscoder at initialisation (same config, a fresh seed): the other null."""
    from crosslayer.crosscoder import Crosscoder
    from crosslayer.features import decoder_profile

    fresh = Crosscoder(cc.cfg, seed=1_000)
    prof = decoder_profile(fresh, tau=span_tau)
    r = prof[[c for c in prof.columns if c.startswith("r_")]].to_numpy()
    return prof.assign(kind="initialisation", source_layer=np.nan, direction=prof.feature, span_50=(r > 0.5).sum(1))


def _null_rows(null: pd.DataFrame, live_prof: pd.DataFrame, n_layers: int, add) -> None:
    """Summary rows comparing the live crosscoder features' profiles with each null: mean span and entropy with
    95 % bootstrap intervals over features / directions, and the fraction spanning every layer."""
    groups = [("crosscoder", live_prof)] + [(kind, part) for kind, part in null.groupby("kind", sort=False)]
    for kind, part in groups:
        for col in ("span", "span_50", "entropy"):
            _, (lo,), (hi,) = bootstrap_mean(part[col].to_numpy(float)[:, None], n_boot=1000, seed=0)
            add("null", f"{kind}|mean_{col}", part[col].mean())
            add("null", f"{kind}|mean_{col}_lo", lo)
            add("null", f"{kind}|mean_{col}_hi", hi)
        add("null", f"{kind}|frac_span_all", (part.span == n_layers).mean())
        add("null", f"{kind}|n", len(part))


# ----------------------------------------------------------------------------- the study

def run(ctx, cfg: Config) -> dict:
    from crosslayer.features import decoder_profile

    if cfg.tau not in cfg.taus:
        raise CrosslayerError(f"tau {cfg.tau} must be one of taus {cfg.taus}")

    results = ctx.results(NAME)
    heldout = ctx.store("heldout")
    saes, cc = ctx.saes(), ctx.crosscoder()
    if saes.layers != cc.layers:
        raise CrosslayerError(f"the main SAEs read layers {saes.layers}, the crosscoder {cc.layers}; retrain one")
    layers, L = cc.layers, cc.n_layers
    rows = sample_rows(heldout, cfg.n_rows)
    f_cc, f_sae = encode_rows(cc, heldout, rows), encode_rows(saes, heldout, rows)
    live_cc = (f_cc > 0).any(0)
    live_sae = (f_sae > 0).any(0)
    summary: list[dict] = []

    def add(part: str, metric: str, value, tau: float = float("nan")) -> None:
        summary.append({"part": part, "metric": metric, "tau": tau, "value": float(value)})

    # -- crosscoder decoder-norm profiles
    prof = decoder_profile(cc, tau=cfg.span_tau)
    r = prof[[f"r_{l}" for l in layers]].to_numpy()
    prof.insert(4, "span_50", (r > 0.5).sum(1))
    prof.insert(1, "density", (f_cc > 0).float().mean(0).numpy())
    prof.insert(2, "live", live_cc.numpy())
    write_csv(prof, results / "cc_profiles.csv")
    live_prof = prof[prof.live]
    add("profiles", "n_features", len(prof))
    add("profiles", "n_live", len(live_prof))
    for name, col in (("mean_span", "span"), ("mean_span_50", "span_50"), ("mean_entropy", "entropy"),
                      ("mean_drift", "drift_mean"), ("mean_drift_min", "drift_min")):
        add("profiles", name, live_prof[col].mean())
    add("profiles", "frac_span_1", (live_prof.span == 1).mean())
    add("profiles", "frac_span_all", (live_prof.span == L).mean())
    x_NLD = cc.normalize(heldout.get(rows, layers=layers).float())
    null = pd.concat([persistence_profiles(x_NLD, layers, n_random=cfg.null_random, n_pcs=cfg.null_pcs,
                                           span_tau=cfg.span_tau), init_profiles(cc, cfg.span_tau)], ignore_index=True)
    write_csv(null[NULL_COLUMNS + [f"r_{l}" for l in layers]], results / "profile_nulls.csv")
    _null_rows(null, live_prof, L, add)

    # -- per-layer SAE chains
    blocks, index = sae_blocks(saes)
    widths = [len(i) for i in index]
    live_blocks = [live_sae[i] for i in index]
    f_blocks = [f_sae[:, i] for i in index]
    matches, cosines, corrs = [], [], []
    for l in range(L - 1):
        m, c = match_adjacent(blocks[l], blocks[l + 1], live_a=live_blocks[l], live_b=live_blocks[l + 1])
        corr = column_corr(f_blocks[l], f_blocks[l + 1][:, np.maximum(m, 0)]).numpy()
        matches.append(m)
        cosines.append(c)
        corrs.append(np.where(m >= 0, corr, np.nan))
    chance = chance_cosine(blocks[L // 2]) if L > 1 else float("nan")
    add("chains", "chance_cos_p99", chance)
    layer_N = np.repeat(np.arange(L), widths)
    latent_N = np.concatenate([np.arange(w) for w in widths])
    keep_N = live_sae.numpy()
    chain_ids = {}
    for tau in cfg.taus:
        chain_N = build_chains(matches, cosines, widths, tau)
        chain_ids[tau] = chain_N
        link_cos = np.concatenate([np.where(c > tau, c, np.nan) for c in cosines] + [np.full(widths[-1], np.nan)])
        link_corr = np.concatenate([np.where(c > tau, k, np.nan) for c, k in zip(cosines, corrs)]
                                   + [np.full(widths[-1], np.nan)])
        table = chain_table(chain_N, layer_N, latent_N, link_cos, link_corr, keep_N, layers)
        per_latent = np.repeat(table.length.to_numpy(), table.length.to_numpy())  # chain length seen by each latent
        add("chains", "n_live_latents", int(keep_N.sum()), tau)
        add("chains", "n_chains", len(table), tau)
        add("chains", "mean_chain_length", table.length.mean(), tau)
        add("chains", "frac_latents_chained", (per_latent >= 2).mean(), tau)
        add("chains", "frac_latents_full_length", (per_latent == L).mean(), tau)
        add("chains", "mean_link_cos", np.nanmean(link_cos) if np.isfinite(link_cos).any() else np.nan, tau)
        add("chains", "median_link_act_corr", np.nanmedian(link_corr) if np.isfinite(link_corr).any() else np.nan, tau)
        if tau == cfg.tau:
            write_csv(table, results / "sae_chains.csv")
    all_cos = np.concatenate(cosines) if cosines else np.array([np.nan])
    add("chains", "median_matched_cos", np.nanmedian(all_cos) if np.isfinite(all_cos).any() else np.nan)

    # -- SAE latents per crosscoder feature
    idx = live_cc.nonzero().squeeze(1)
    W_FLD = decoders(cc)[idx]
    span_FL = torch.as_tensor(r[idx.numpy()] > cfg.span_tau)
    f_live = f_cc[:, idx]
    for tau in cfg.taus:
        m = sae_per_crosscoder(W_FLD, span_FL, blocks, live_blocks, tau)
        n_FL = m["count_FL"]
        matched_FL = n_FL > 0
        spans = span_FL.sum(1).clamp_min(1)
        best_N = np.cumsum([0] + widths)[:-1][None] + m["arg_FL"].clamp_min(0).numpy()  # best SAE latent among all
        chain_FL = np.where(matched_FL.numpy(), chain_ids[tau][best_N], -1)
        add("sae_per_cc", "mean_sae_latents", n_FL.sum(1).float().mean(), tau)
        add("sae_per_cc", "mean_sae_latents_per_span_layer", (n_FL.sum(1) / spans).float().mean(), tau)
        add("sae_per_cc", "frac_layers_matched", (matched_FL.sum(1) / spans).float().mean(), tau)
        add("sae_per_cc", "frac_features_matched", matched_FL.any(1).float().mean(), tau)
        add("sae_per_cc", "mean_distinct_chains", distinct_per_row(chain_FL)[matched_FL.any(1).numpy()].mean()
            if bool(matched_FL.any()) else np.nan, tau)
        if tau == cfg.tau:
            corr_FL = torch.stack([column_corr(f_live, f_blocks[l][:, m["arg_FL"][:, l].clamp_min(0)])
                                   for l in range(L)], 1).masked_fill(~matched_FL, float("nan"))
            per_cc = pd.DataFrame({"feature": idx.numpy(), "peak_layer": prof.peak_layer.to_numpy()[idx.numpy()],
                                   "span": span_FL.sum(1).numpy(), "n_sae_latents": n_FL.sum(1).numpy(),
                                   "n_matched_layers": matched_FL.sum(1).numpy(),
                                   "frac_layers_matched": (matched_FL.sum(1) / spans).numpy(),
                                   "mean_best_cos": m["best_FL"].nanmean(1).numpy(),
                                   "mean_best_act_corr": corr_FL.nanmean(1).numpy(),
                                   "n_chains": distinct_per_row(chain_FL)})
            write_csv(per_cc[PER_CC_COLUMNS], results / "sae_per_cc.csv")
            add("sae_per_cc", "mean_best_cos", per_cc.mean_best_cos.mean(), tau)
            add("sae_per_cc", "mean_span", per_cc.span.mean(), tau)

    # -- synthetic ground truth (studies.synthetic_regimes)
    features, runs = synthetic_regimes.synthetic_recovery(cfg, ctx.dicts, progress=ctx.progress)
    syn_summary = synthetic_regimes.write_results(features, runs, results)
    summ = pd.DataFrame(summary)
    write_csv(summ, results / "summary.csv")
    get = _getter(summ)
    return {"cc_live": int(get("profiles", "n_live")), "cc_mean_span": round(get("profiles", "mean_span"), 3),
            "cc_mean_drift": round(get("profiles", "mean_drift"), 3),
            "sae_frac_chained": round(get("chains", "frac_latents_chained", cfg.tau), 4),
            "sae_latents_per_cc": round(get("sae_per_cc", "mean_sae_latents", cfg.tau), 3),
            "syn_mmcs_better": synthetic_regimes.verdicts(syn_summary, "mmcs")}


def _getter(summ: pd.DataFrame) -> Callable[..., float]:
    def get(part: str, metric: str, tau: float | None = None) -> float:
        rows = summ[(summ.part == part) & (summ.metric == metric)]
        rows = rows[np.isclose(rows.tau, tau)] if tau is not None else rows
        return float(rows.value.iloc[0]) if len(rows) else float("nan")

    return get


# ----------------------------------------------------------------------------- figures, tables, answer

def _identity_marks(ax, values: list, *, label: str) -> None:
    """A dotted mark at height ``value`` over each categorical bar position (the y = x reference)."""
    for i, v in enumerate(values):
        ax.hlines(v, i - 0.45, i + 0.45, colors="k", linestyles=":", lw=1.2, label=label if i == 0 else None)


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    paths = []
    prof = read_csv(results, "cc_profiles")
    live = prof[prof.live.astype(str).str.lower() == "true"]
    rcols = [c for c in prof.columns if c.startswith("r_")]
    layers = [int(c[2:]) for c in rcols]
    if len(live):
        sample = live.sample(min(200, len(live)), random_state=0).sort_values(["peak_layer", "span", "entropy"])
        fig, ax = plt.subplots(figsize=(5.6, 5.2))
        sns.heatmap(sample[rcols].to_numpy(), ax=ax, cmap="viridis", vmin=0, vmax=1, xticklabels=layers,
                    yticklabels=False, cbar_kws={"label": "relative decoder norm $r_i^l$"})
        ax.set(xlabel="layer", ylabel=f"crosscoder features ({len(sample)} live, sorted by peak layer)")
        paths.append((save_figure(fig, figures_dir / f"{NAME}_profiles.png"),
                      "Relative decoder norms $r_i^l = \\|d_i^l\\| / \\max_l \\|d_i^l\\|$ of a random sample of live "
                      "crosscoder features, sorted by peak layer."))
    nulls = Path(results) / "profile_nulls.csv"
    if len(live) and nulls.is_file():
        paths.append(_profiles_by_peak(live, pd.read_csv(nulls), layers, figures_dir / f"{NAME}_profiles_vs_null.png"))
    chains = read_csv(results, "sae_chains")
    L = len(layers)
    frames = []
    if len(live):
        frames.append(pd.DataFrame({"length": live.span, "weight": 1.0 / len(live),
                                    "what": f"crosscoder feature: span ($r>{cfg.span_tau}$)"}))
    if len(chains):
        frames.append(pd.DataFrame({"length": chains.length, "weight": chains.length / chains.length.sum(),
                                    "what": f"SAE latent: length of its chain (cos $>{cfg.tau}$)"}))
    if frames:
        both = pd.concat(frames)
        agg = both.groupby(["what", "length"]).weight.sum().reset_index()
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        sns.barplot(data=agg, x="length", y="weight", hue="what", order=list(range(1, L + 1)), ax=ax)
        ax.set(xlabel="layers", ylabel="fraction")
        ax.legend(fontsize=8)
        paths.append((save_figure(fig, figures_dir / f"{NAME}_spans.png"),
                      "How many layers one feature covers: the span of each live crosscoder feature, and for each "
                      "live SAE latent the length of the chain of matching SAE latents at adjacent layers it "
                      "belongs to."))
    per_cc = read_csv(results, "sae_per_cc")
    if len(per_cc):
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        sns.barplot(data=per_cc, x="span", y="n_sae_latents", ax=ax, color="C0", errorbar=("ci", 95))
        _identity_marks(ax, sorted(per_cc.span.unique()), label="one SAE latent per spanned layer")
        top = max(per_cc.span.max(), per_cc.groupby("span").n_sae_latents.mean().max())
        ax.set(xlabel=f"crosscoder feature span (layers with $r>{cfg.span_tau}$)",
               ylabel=f"SAE latents with cos $>{cfg.tau}$", ylim=(0, 1.3 * top))
        ax.legend(fontsize=8, loc="upper left")
        paths.append((save_figure(fig, figures_dir / f"{NAME}_sae_per_cc.png"),
                      f"Number of live per-layer SAE latents whose decoder has cosine above {cfg.tau} with a live "
                      "crosscoder feature's decoder at a layer the feature spans, by the feature's span "
                      "(mean, 95\\% CI)."))
    if (Path(results) / "synthetic_runs.csv").is_file():
        paths.append(synthetic_regimes.figure(results, figures_dir / f"{NAME}_synthetic.png"))
    return paths


def _profiles_by_peak(live: pd.DataFrame, null: pd.DataFrame, layers: list[int], path: Path) -> tuple[Path, str]:
    """Mean decoder-norm profile by peak layer (Anthropic's grouping): live crosscoder features against the
    residual-persistence nulls (the initialisation null is flat by construction and left out)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rcols = [f"r_{l}" for l in layers]
    frames = [live.assign(kind="crosscoder (live features)")] + [null[null.kind != "initialisation"]]
    long = pd.concat(frames, ignore_index=True).melt(id_vars=["kind", "peak_layer"], value_vars=rcols,
                                                      var_name="layer", value_name="r")
    long["layer"] = long.layer.str[2:].astype(int)
    peaks = [l for l in layers if (long.peak_layer == l).any()]
    fig, axes = plt.subplots(1, len(peaks), figsize=(2.6 * len(peaks) + 1.8, 3.2), sharey=True, squeeze=False)
    for ax, peak in zip(axes[0], peaks):
        sns.lineplot(data=long[long.peak_layer == peak], x="layer", y="r", hue="kind", marker="o", errorbar=("ci", 95),
                     ax=ax, legend=ax is axes[0][-1])
        ax.set(title=f"peak at layer {peak}", xlabel="layer", ylabel="mean $r^l$", ylim=(0, 1.05), xticks=layers)
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1), fontsize=7, title=None)
    return (save_figure(fig, path),
            "Mean relative decoder norm by layer, grouped by the layer where it peaks: live crosscoder features against "
            "what residual persistence alone gives (the least-squares decoder of every layer given one random or top "
            "principal direction at the source layer), 95\\% intervals.")


def _null_text(get, cfg: Config, n_layers: int) -> str:
    """The crosscoder's spans and entropies against the nulls (from the summary's ``null`` rows)."""
    def mean(kind: str, col: str) -> str:
        return (f"{fmt(get('null', f'{kind}|mean_{col}'), 3)} [{fmt(get('null', f'{kind}|mean_{col}_lo'), 3)}, "
                f"{fmt(get('null', f'{kind}|mean_{col}_hi'), 3)}]")

    if not np.isfinite(get("null", "random direction|mean_entropy")):
        return ""
    cc_lo, cc_hi = get("null", "crosscoder|mean_entropy_lo"), get("null", "crosscoder|mean_entropy_hi")
    nu_lo, nu_hi = get("null", "random direction|mean_entropy_lo"), get("null", "random direction|mean_entropy_hi")
    verdict = ("more concentrated in few layers than persistence alone gives" if cc_hi < nu_lo else
               "flatter across layers than persistence alone gives" if cc_lo > nu_hi else
               "indistinguishable from what persistence alone gives")
    return (f"Against nulls (mean over features or directions, 95\\% bootstrap intervals): a random direction at one "
            f"layer carried to every layer by least squares spans {mean('random direction', 'span')} of {n_layers} layers "
            f"with profile entropy {mean('random direction', 'entropy')}; a top principal direction "
            f"{mean('principal direction', 'span')} (entropy {mean('principal direction', 'entropy')}); the crosscoder "
            f"at initialisation {mean('initialisation', 'span')} (entropy {mean('initialisation', 'entropy')}). The live "
            f"crosscoder features span {mean('crosscoder', 'span')} layers with entropy {mean('crosscoder', 'entropy')}: "
            f"{verdict}, so span alone {'does' if cc_hi < nu_lo else 'does not'} show cross-layer structure beyond "
            f"the residual stream's persistence.")


def _metric_rows(summ: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    get = _getter(summ)
    rows = [
        ("crosscoder", "live features", get("profiles", "n_live")),
        ("crosscoder", f"mean span ($r>{cfg.span_tau}$)", get("profiles", "mean_span")),
        ("crosscoder", "mean span ($r>0.5$)", get("profiles", "mean_span_50")),
        ("crosscoder", "single-layer features", get("profiles", "frac_span_1")),
        ("crosscoder", "features spanning every layer", get("profiles", "frac_span_all")),
        ("crosscoder", "normalised entropy of $r$", get("profiles", "mean_entropy")),
        ("crosscoder", "drift: mean cos to peak direction", get("profiles", "mean_drift")),
        ("SAEs", "live latents", get("chains", "n_live_latents", cfg.tau)),
        ("SAEs", "median matched cos, adjacent layers", get("chains", "median_matched_cos")),
        ("SAEs", "chance (99th pct., random directions)", get("chains", "chance_cos_p99")),
        ("SAEs", f"latents in a chain of 2+ (cos $>{cfg.tau}$)", get("chains", "frac_latents_chained", cfg.tau)),
        ("SAEs", "latents in a full-length chain", get("chains", "frac_latents_full_length", cfg.tau)),
        ("SAEs", "mean chain length", get("chains", "mean_chain_length", cfg.tau)),
        ("SAEs", "median act. corr. of linked latents", get("chains", "median_link_act_corr", cfg.tau)),
        ("SAEs per crosscoder feature", f"SAE latents with cos $>{cfg.tau}$", get("sae_per_cc", "mean_sae_latents", cfg.tau)),
        ("SAEs per crosscoder feature", "its mean span", get("sae_per_cc", "mean_span", cfg.tau)),
        ("SAEs per crosscoder feature", "spanned layers with a match", get("sae_per_cc", "frac_layers_matched", cfg.tau)),
        ("SAEs per crosscoder feature", "distinct SAE chains among them",
         get("sae_per_cc", "mean_distinct_chains", cfg.tau)),
    ]
    return pd.DataFrame(rows, columns=["part", "quantity", "value"])


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    summ = read_csv(results, "summary")
    main = latex_table(_metric_rows(summ, cfg), tables_dir / f"{NAME}.tex", raw_columns=("quantity",),
                       columns={"part": "", "quantity": "quantity", "value": "value"},
                       caption=f"Cross-layer superposition on held-out data: crosscoder decoder-norm profiles (live "
                               f"features), chains of per-layer SAE latents matched at adjacent layers (Hungarian, "
                               f"cosine $>{cfg.tau}$), and the SAE latents matching one crosscoder feature. Fractions are "
                               "of live features or latents.", label=f"tab:{NAME}")
    second = synthetic_regimes.table(results, tables_dir / f"{NAME}_synthetic.tex", f"tab:{NAME}-synthetic")
    return [main, second]


def answer(results: Path, cfg: Config) -> str:
    summ = read_csv(results, "summary")
    get = _getter(summ)
    n_layers = len([c for c in read_csv(results, "cc_profiles").columns if c.startswith("r_")])
    parts = [f"Of the crosscoder's {int(get('profiles', 'n_features'))} features, {int(get('profiles', 'n_live'))} "
             f"fire on the sampled held-out rows. They span {fmt(get('profiles', 'mean_span'), 3)} of {n_layers} "
             f"layers on average ($r>{cfg.span_tau}$; {fmt(get('profiles', 'mean_span_50'), 3)} at $r>0.5$); "
             f"{fmt(100 * get('profiles', 'frac_span_1'), 2)}\\% write one layer and "
             f"{fmt(100 * get('profiles', 'frac_span_all'), 2)}\\% every layer, with normalised entropy "
             f"{fmt(get('profiles', 'mean_entropy'), 3)}; their decoder direction keeps a mean cosine of "
             f"{fmt(get('profiles', 'mean_drift'), 3)} with its peak-layer direction (drift)."]
    if (summ.part == "null").any():
        parts.append(_null_text(get, cfg, n_layers))
    parts.append(f"Per-layer SAE latents matched one-to-one between adjacent layers have median decoder cosine "
                 f"{fmt(get('chains', 'median_matched_cos'), 3)} (chance: {fmt(get('chains', 'chance_cos_p99'), 2)}); "
                 f"at cosine $>{cfg.tau}$, {fmt(100 * get('chains', 'frac_latents_chained', cfg.tau), 2)}\\% of the live SAE "
                 f"latents belong to a chain of two or more layers and "
                 f"{fmt(100 * get('chains', 'frac_latents_full_length', cfg.tau), 2)}\\% to a chain through all {n_layers} "
                 f"(mean chain length {fmt(get('chains', 'mean_chain_length', cfg.tau), 3)}; linked latents' activations "
                 f"correlate with median {fmt(get('chains', 'median_link_act_corr', cfg.tau), 2)}). Sweeping the threshold "
                 f"from {min(cfg.taus)} to {max(cfg.taus)} moves the chained fraction from "
                 f"{fmt(100 * get('chains', 'frac_latents_chained', min(cfg.taus)), 2)}\\% to "
                 f"{fmt(100 * get('chains', 'frac_latents_chained', max(cfg.taus)), 2)}\\%.")
    parts.append(f"A live crosscoder feature (mean span {fmt(get('sae_per_cc', 'mean_span', cfg.tau), 3)}) corresponds to "
                 f"{fmt(get('sae_per_cc', 'mean_sae_latents', cfg.tau), 3)} SAE latents with cosine $>{cfg.tau}$ on average; "
                 f"{fmt(100 * get('sae_per_cc', 'frac_layers_matched', cfg.tau), 2)}\\% of its spanned layers have such a "
                 f"latent, and those with any match spread over "
                 f"{fmt(get('sae_per_cc', 'mean_distinct_chains', cfg.tau), 3)} distinct SAE chains.")
    if (Path(results) / "synthetic_summary.csv").is_file():
        parts.append(synthetic_regimes.answer_text(results, cfg.syn_recovered))
    return " ".join(parts)


STUDY = Study(name=NAME, title="Cross-layer superposition", config=Config, run=run, figures=figures, tables=tables,
              answer=answer, dictionaries=("saes", "crosscoder"), order=50,
              presets={"micro": Config(synthetic_tokens=2_048, syn_regimes=("easy", "independent"), syn_seeds=2, syn_steps=40,
                                      syn_heldout=1_024),
                       "standard": Config(synthetic_tokens=30_000, syn_steps=500),
                       "paper": Config(synthetic_tokens=200_000, syn_steps=2_000, syn_seeds=5)})
