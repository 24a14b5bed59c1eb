"""Cross-layer superposition: is one feature learnt once by a crosscoder but again at every layer by SAEs?

Question
    Over how many layers does a crosscoder feature write, where does it peak and how much does its
    direction drift? Do per-layer SAEs learn the same feature again at adjacent layers (chains of
    matching latents), and how many SAE latents correspond to one crosscoder feature, against two SAE seeds matched
    the same way? Does removing a crosscoder feature change the next token as removing its SAE chain does? On synthetic
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
    - Profiles over training (``profiles_over_training.csv``): training keeps every multi-layer dictionary's
      per-feature per-layer decoder norms at step 0 (after calibration), ten steps evenly spaced by tokens and the
      final step (:func:`crosslayer.training.read_profile_snapshots`). For the main crosscoder, and the ReLU /
      L1-of-norms crosscoder (``crosscoder_relu``) when the run has trained it, each snapshot's span and entropy
      (:func:`crosslayer.features.profile_stats`, the code behind ``decoder_profile``) are averaged over the features
      live at the end, with 95 % bootstrap intervals over those features (:func:`profiles_over_training`), and set
      against the step-0 profile (flat) and the two persistence nulls: the answer says whether the final interval
      lies below the initial one and below, within or above each null's.
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
    - Seed-to-seed baseline (research-notes section 10; ``seed_baseline.csv``): the same matching between two seeds of
      the SAE set (``saes`` and ``saes_seed1``, same budget, :func:`seed_matches`): for each live seed-0 latent at
      layer l, the live seed-1 latents of layer l with cosine > tau and the best cosine. Per tau, side by side with
      95 % bootstrap intervals over features / latents (:func:`seed_baseline_rows`): SAE latents per spanned layer
      of a crosscoder feature vs seed-1 latents per seed-0 latent, fraction matched, mean best cosine. The chain
      statistics of the seed-1 set (summary part ``chains_seed1``) give the chain counts a seed spread.
    - Causal check (:mod:`studies.superposition_causal`, ``causal.csv``): for ``Config.causal_features`` live
      crosscoder features drawn by a seeded draw among those matched at >= 2 layers at tau with density in
      ``Config.causal_density`` (fixed before any outcome), on up to ``Config.causal_windows`` held-out windows each
      (first ``Config.causal_ctx`` tokens), remove (a) the feature's f_i(x) d_i^l at every layer it writes, (b) its
      SAE chain (the best-matching latent's contribution at each matched layer), (c) a random chain (one live SAE
      latent per layer, nearest in density); raw residual units, clean-run activations, removal pinned per layer
      (``each``) or subtracted from the running residual (``add``). KL(p_a || p_b), KL(p_a || p_c) and each against
      clean at the positions where the feature fires; 95 % bootstrap intervals over features and a paired one-sided
      Wilcoxon test of "chain KL < random-chain KL".
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
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from crosslayer.errors import CrosslayerError
from crosslayer.io import write_csv
from crosslayer.matching import (build_chains, chance_cosine, decoders, match_adjacent, sae_blocks,  # noqa: F401
                                 sae_per_crosscoder, unit)
from studies.base import Study
from studies.common import (bootstrap_mean, column_corr, encode_rows, fmt, latex_escape, latex_table, read_csv,
                            sample_rows, save_figure, theme)
from studies import synthetic_regimes

NAME = "cross_layer_superposition"
SAE, CC = synthetic_regimes.SAE, synthetic_regimes.CC  # one set of labels for both modules


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
    # The causal check (studies.superposition_causal): features drawn (seeded, fixed in advance) among live crosscoder
    # features matched at >= 2 layers at tau with held-out density within causal_density; per feature up to
    # causal_windows of causal_search_windows held-out windows, cut to causal_ctx tokens; random chains drawn among
    # the causal_pool SAE latents nearest in density; removal semantics causal_at; causal_batch windows per forward.
    causal_features: int = 8
    causal_windows: int = 4
    causal_ctx: int = 32
    causal_search_windows: int = 256
    causal_density: tuple[float, float] = (1e-3, 0.1)
    causal_pool: int = 16
    causal_at: tuple[str, ...] = ("each", "add")
    causal_batch: int = 16

    def __post_init__(self):
        unknown = [r for r in self.syn_regimes if r not in synthetic_regimes.REGIMES]
        if unknown:
            raise CrosslayerError(f"unknown synthetic regimes {unknown}; use names from "
                                  f"{', '.join(synthetic_regimes.REGIMES)}")


CHAIN_COLUMNS = ["chain", "start_layer", "end_layer", "length", "mean_cos", "min_cos", "mean_act_corr", "latents"]
SEED_COLUMNS = ["tau", "matching", "statistic", "mean", "lo", "hi", "n"]
SEED_MATCHINGS = {"crosscoder": "crosscoder feature -> seed-0 SAE latents (per spanned layer)",
                  "sae_seed": "seed-0 SAE latent -> seed-1 SAE latents (its layer)"}
SEED_STATISTICS = ["latents_per_layer", "frac_matched", "best_cos"]
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


class SAEChains(NamedTuple):
    """One SAE set's latents per layer and its chains (:func:`sae_chain_stats`)."""

    blocks: list[Tensor]
    index: list[Tensor]
    widths: list[int]
    live_blocks: list[Tensor]
    f_blocks: list[Tensor]
    chain_ids: dict[float, np.ndarray]


def sae_chain_stats(saes, f_sae: Tensor, cfg: Config, add, part: str, table_path: Path | None) -> SAEChains:
    """Match the live latents of adjacent layers, build the chains at every tau, and ``add`` the chain statistics
    as ``part`` rows (``f_sae``: the held-out activations; the table at ``cfg.tau`` goes to ``table_path``)."""
    L, layers = saes.n_layers, saes.layers
    live_sae = (f_sae > 0).any(0)
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
    add(part, "chance_cos_p99", chance_cosine(blocks[L // 2]) if L > 1 else float("nan"))
    layer_N = np.repeat(np.arange(L), widths)
    latent_N = np.concatenate([np.arange(w) for w in widths])
    keep_N = torch.cat(live_blocks).numpy()
    chain_ids = {}
    for tau in cfg.taus:
        chain_ids[tau] = build_chains(matches, cosines, widths, tau)
        link_cos = np.concatenate([np.where(c > tau, c, np.nan) for c in cosines] + [np.full(widths[-1], np.nan)])
        link_corr = np.concatenate([np.where(c > tau, k, np.nan) for c, k in zip(cosines, corrs)]
                                   + [np.full(widths[-1], np.nan)])
        table = chain_table(chain_ids[tau], layer_N, latent_N, link_cos, link_corr, keep_N, layers)
        per_latent = np.repeat(table.length.to_numpy(), table.length.to_numpy())  # chain length seen by each latent
        add(part, "n_live_latents", int(keep_N.sum()), tau)
        add(part, "n_chains", len(table), tau)
        add(part, "mean_chain_length", table.length.mean(), tau)
        add(part, "frac_latents_chained", (per_latent >= 2).mean(), tau)
        add(part, "frac_latents_full_length", (per_latent == L).mean(), tau)
        add(part, "mean_link_cos", np.nanmean(link_cos) if np.isfinite(link_cos).any() else np.nan, tau)
        add(part, "median_link_act_corr", np.nanmedian(link_corr) if np.isfinite(link_corr).any() else np.nan, tau)
        if tau == cfg.tau and table_path is not None:
            write_csv(table, table_path)
    all_cos = np.concatenate(cosines) if cosines else np.array([np.nan])
    add(part, "median_matched_cos", np.nanmedian(all_cos) if np.isfinite(all_cos).any() else np.nan)
    return SAEChains(blocks, index, widths, live_blocks, f_blocks, chain_ids)


def seed_matches(blocks0: list[Tensor], live0: list[Tensor], blocks1: list[Tensor], live1: list[Tensor],
                 tau: float) -> tuple[Tensor, Tensor]:
    """For each live latent of SAE set 0 (concatenated over layers), the live latents of set 1 at its layer with
    decoder cosine > ``tau``: ``(count_N, best_cos_N)`` (:func:`sae_per_crosscoder` with one-layer spans)."""
    L, d = len(blocks0), blocks0[0].shape[1]
    layer_N = torch.cat([torch.full((len(b),), l) for l, b in enumerate(blocks0)])[torch.cat(live0)]
    W_NLD = torch.zeros(len(layer_N), L, d)
    W_NLD[torch.arange(len(layer_N)), layer_N] = torch.cat(blocks0)[torch.cat(live0)]
    span_NL = torch.nn.functional.one_hot(layer_N, L).bool()
    m = sae_per_crosscoder(W_NLD, span_NL, blocks1, live1, tau)
    return m["count_FL"].sum(1), m["best_FL"].nan_to_num(-2.0).max(1).values


def seed_values(ch: SAEChains, ch1: SAEChains, tau: float) -> np.ndarray:
    """``[N, 3]`` per live latent of ``ch``'s SAEs against the seed-1 set ``ch1``: matches, matched (0/1), best cos."""
    count_N, best_N = seed_matches(ch.blocks, ch.live_blocks, ch1.blocks, ch1.live_blocks, tau)
    return np.stack([count_N.numpy(), (count_N > 0).numpy(), best_N.numpy()], 1).astype(np.float64)


def seed_baseline_rows(tau: float, cc_FM: np.ndarray, sae_NM: np.ndarray) -> pd.DataFrame:
    """Rows of ``seed_baseline.csv`` at ``tau``: the mean of each statistic (columns: latents per layer, fraction
    matched, best cosine) over crosscoder features ``cc_FM`` and over seed-0 SAE latents ``sae_NM``, with 95 %
    bootstrap intervals over features / latents."""
    frames = []
    for key, values in (("crosscoder", cc_FM), ("sae_seed", sae_NM)):
        mean, lo, hi = bootstrap_mean(values, n_boot=1000, seed=0)
        frames.append(pd.DataFrame({"tau": tau, "matching": key, "statistic": SEED_STATISTICS, "mean": mean,
                                    "lo": lo, "hi": hi, "n": len(values)}))
    return pd.concat(frames, ignore_index=True)[SEED_COLUMNS]


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


TRAINING_COLUMNS = ["dictionary", "step", "tokens", "n_live"] + [f"{m}{s}" for m in ("mean_span", "mean_entropy",
                                                                                    "frac_span_1", "frac_span_all")
                                                                   for s in ("", "_lo", "_hi")]
RELU_NAME = "crosscoder_relu"
"""The ReLU / L1-of-norms crosscoder the reconstruction study trains (presets with ``relu_crosscoder``)."""


def profiles_over_training(snaps, live_F: np.ndarray, *, dictionary: str, span_tau: float,
                           n_boot: int = 1000) -> pd.DataFrame:
    """One row per decoder-norm snapshot (:func:`crosslayer.training.read_profile_snapshots`) of the features live at
    the end (``live_F``): mean span and normalised entropy, the fractions spanning one and every layer, each with a
    95 % bootstrap interval over those features (the same draws for every snapshot).
    Columns: :data:`TRAINING_COLUMNS`."""
    from crosslayer.features import profile_stats

    _, _, _, span_SF, ent_SF = profile_stats(snaps.norms_SFL[:, live_F], tau=span_tau)
    span_FS, L, S = span_SF.T.double().numpy(), len(snaps.layers), len(snaps.step_S)
    values_FM = np.concatenate([span_FS, ent_SF.T.double().numpy(), span_FS == 1, span_FS == L], axis=1)
    mean_M, lo_M, hi_M = bootstrap_mean(values_FM, n_boot=n_boot, seed=0)
    table = pd.DataFrame({"dictionary": dictionary, "step": snaps.step_S, "tokens": snaps.tokens_S,
                          "n_live": int(live_F.sum())})
    for i, metric in enumerate(("mean_span", "mean_entropy", "frac_span_1", "frac_span_all")):
        for suffix, values in (("", mean_M), ("_lo", lo_M), ("_hi", hi_M)):
            table[metric + suffix] = values[i * S:(i + 1) * S]
    return table[TRAINING_COLUMNS]


def _training_rows(ctx, rows: np.ndarray, live_cc: Tensor, span_tau: float) -> pd.DataFrame:
    """:func:`profiles_over_training` of the main crosscoder and, when the run has trained it, the ReLU / L1-of-norms
    crosscoder (liveness: firing on the sampled held-out ``rows``); a dictionary trained before training kept
    snapshots is skipped with a note."""
    from crosslayer.dictionary import load_dictionary
    from crosslayer.training import PROFILE_SNAPSHOTS, read_profile_snapshots

    names = ["crosscoder"] + ([RELU_NAME] if ctx.sizes.relu_crosscoder and (ctx.dicts / RELU_NAME).is_dir() else [])
    frames = []
    for name in names:
        folder = ctx.dicts / name
        if not (folder / PROFILE_SNAPSHOTS).is_file():
            print(f"[{NAME}] {folder} has no {PROFILE_SNAPSHOTS} (unfinished, or trained before training kept "
                  "decoder-norm snapshots): left out of the profiles over training", flush=True)
            continue
        live = live_cc if name == "crosscoder" else (encode_rows(load_dictionary(folder), ctx.store("heldout"),
                                                                 rows) > 0).any(0)
        frames.append(profiles_over_training(read_profile_snapshots(folder), live.numpy(), dictionary=name,
                                             span_tau=span_tau))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRAINING_COLUMNS)


# ----------------------------------------------------------------------------- the study

def run(ctx, cfg: Config) -> dict:
    from studies.pipeline import seed_name

    if cfg.tau not in cfg.taus:
        raise CrosslayerError(f"tau {cfg.tau} must be one of taus {cfg.taus}")
    results = ctx.results(NAME)
    heldout = ctx.store("heldout")
    saes, cc = ctx.saes(), ctx.crosscoder()
    if saes.layers != cc.layers:
        raise CrosslayerError(f"the main SAEs read layers {saes.layers}, the crosscoder {cc.layers}; retrain one")
    rows = sample_rows(heldout, cfg.n_rows)
    f_cc, f_sae = encode_rows(cc, heldout, rows), encode_rows(saes, heldout, rows)
    summary: list[dict] = []

    def add(part: str, metric: str, value, tau: float = float("nan")) -> None:
        summary.append({"part": part, "metric": metric, "tau": tau, "value": float(value)})

    prof = _profiles_part(ctx, cc, f_cc, rows, cfg, add, results)
    # -- per-layer SAE chains, of the main SAEs and of a second seed of them
    ch = sae_chain_stats(saes, f_sae, cfg, add, "chains", results / "sae_chains.csv")
    saes1 = ctx.saes(seed_name("saes", 1), seed=1)
    ch1 = sae_chain_stats(saes1, encode_rows(saes1, heldout, rows), cfg, add, "chains_seed1", None)
    per_cc, chain_CL = _sae_per_cc_part(cc, f_cc, prof, ch, ch1, cfg, add, results)
    _causal_part(ctx, cc, saes, f_sae, prof, per_cc, chain_CL, ch.index, cfg, add, results)
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
            "syn_mmcs_better": synthetic_regimes.verdicts(syn_summary, "mmcs"),
            "causal_random_minus_chain_kl": round(get("causal", f"{cfg.causal_at[0]}|difference"), 4)}


def _profiles_part(ctx, cc, f_cc: Tensor, rows, cfg: Config, add, results: Path) -> pd.DataFrame:
    """The crosscoder's decoder-norm profiles (``cc_profiles.csv``, with density and liveness), their nulls
    (``profile_nulls.csv``) and their course over training (``profiles_over_training.csv``); returns the profiles."""
    from crosslayer.features import decoder_profile

    layers, L = cc.layers, cc.n_layers
    live_cc = (f_cc > 0).any(0)
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
    heldout = ctx.store("heldout")
    x_NLD = cc.normalize(heldout.get(rows, layers=layers).float())
    null = pd.concat([persistence_profiles(x_NLD, layers, n_random=cfg.null_random, n_pcs=cfg.null_pcs,
                                           span_tau=cfg.span_tau), init_profiles(cc, cfg.span_tau)], ignore_index=True)
    write_csv(null[NULL_COLUMNS + [f"r_{l}" for l in layers]], results / "profile_nulls.csv")
    _null_rows(null, live_prof, L, add)
    write_csv(_training_rows(ctx, rows, live_cc, cfg.span_tau), results / "profiles_over_training.csv")
    return prof


def _sae_per_cc_part(cc, f_cc: Tensor, prof: pd.DataFrame, ch, ch1, cfg: Config, add,
                     results: Path) -> tuple[pd.DataFrame, Tensor]:
    """SAE latents per live crosscoder feature over the tau sweep, with the seed baseline (``seed_baseline.csv``);
    at ``cfg.tau`` the per-feature table (``sae_per_cc.csv``). Returns it and the matched chains ``[E, L]``."""
    blocks, index, widths, live_blocks, f_blocks, chain_ids = ch
    L = cc.n_layers
    idx = (f_cc > 0).any(0).nonzero().squeeze(1)
    r = prof[[f"r_{l}" for l in cc.layers]].to_numpy()
    W_FLD = decoders(cc)[idx]
    span_FL = torch.as_tensor(r[idx.numpy()] > cfg.span_tau)
    f_live = f_cc[:, idx]
    seed_frames = []
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
        cc_FM = np.stack([(n_FL.sum(1) / spans).numpy(), (matched_FL.sum(1) / spans).numpy(),
                          m["best_FL"].nanmean(1).numpy()], 1)
        seed_frames.append(seed_baseline_rows(tau, cc_FM, seed_values(ch, ch1, tau)))
        if tau == cfg.tau:
            chain_CL = torch.stack([torch.where(matched_FL[:, l], index[l][m["arg_FL"][:, l].clamp_min(0)], -1)
                                    for l in range(L)], 1)
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
    write_csv(pd.concat(seed_frames, ignore_index=True), results / "seed_baseline.csv")
    return per_cc, chain_CL


def _causal_part(ctx, cc, saes, f_sae: Tensor, prof: pd.DataFrame, per_cc: pd.DataFrame, chain_CL: Tensor,
                 index: list, cfg: Config, add, results: Path) -> None:
    """The causal check: removing a crosscoder feature vs its SAE chain vs a random chain (``causal.csv``)."""
    from studies.superposition_causal import causal_check, summarise

    features = per_cc.feature.to_numpy()
    causal = causal_check(ctx.model, cc, saes, ctx.store("heldout"), candidates=features,
                          n_matched=per_cc.n_matched_layers.to_numpy(), density=prof.density.to_numpy()[features],
                          chain_CL=chain_CL, sae_density=(f_sae > 0).float().mean(0), sae_live=(f_sae > 0).any(0),
                          index=index, cfg=cfg)
    write_csv(causal, results / "causal.csv")
    add("causal", "n_features_drawn", causal.feature.nunique())
    for metric, value in summarise(causal):
        add("causal", metric, value)


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
    training = Path(results) / "profiles_over_training.csv"
    if training.is_file() and len(frame := pd.read_csv(training)):
        paths.append(_training_figure(frame, pd.read_csv(nulls) if nulls.is_file() else None, cfg.span_tau,
                                      figures_dir / f"{NAME}_profiles_over_training.png"))
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
    for name, draw in (("seed_baseline", _seed_figure), ("causal", _causal_figure)):
        frame = read_csv(results, name) if (Path(results) / f"{name}.csv").is_file() else pd.DataFrame()
        if len(frame):
            paths.append(draw(frame, figures_dir, cfg))
    if (Path(results) / "synthetic_runs.csv").is_file():
        paths.append(synthetic_regimes.figure(results, figures_dir / f"{NAME}_synthetic.png"))
    return paths


def _seed_figure(seed: pd.DataFrame, figures_dir: Path, cfg: Config) -> tuple[Path, str]:
    """SAE latents per crosscoder feature against the seed baseline, over the tau sweep (``seed_baseline.csv``)."""
    import matplotlib.pyplot as plt

    labels = {"latents_per_layer": "matching latents per layer", "frac_matched": "fraction matched",
              "best_cos": "best cosine"}
    fig, axes = plt.subplots(1, len(labels), figsize=(11.5, 3.4))
    for ax, (stat, label) in zip(axes, labels.items()):
        for i, (key, part) in enumerate(seed[seed.statistic == stat].groupby("matching", sort=False)):
            ax.errorbar(part.tau, part["mean"], yerr=[part["mean"] - part.lo, part.hi - part["mean"]], marker="o",
                        capsize=2, color=f"C{i}", label=SEED_MATCHINGS.get(key, key))
        ax.set(xlabel="cosine threshold $\\tau$", ylabel=label)
    axes[0].legend(fontsize=7)
    return (save_figure(fig, figures_dir / f"{NAME}_seed_baseline.png"),
            "SAE latents matching a crosscoder feature (per layer it spans) against the seed baseline: seed-1 SAE "
            "latents matching a seed-0 SAE latent at its layer, by cosine threshold (means, 95\\% bootstrap "
            "intervals over features / latents).")


def _causal_figure(causal: pd.DataFrame, figures_dir: Path, cfg: Config) -> tuple[Path, str]:
    """Mean KL per comparison and removal semantics (``causal.csv``), 95 % bootstrap intervals over features."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    sns.barplot(data=causal, x="comparison", y="kl", hue="at", errorbar=("ci", 95), n_boot=1000, seed=0, ax=ax)
    ax.set(xlabel="", ylabel="KL (nats)", yscale="log")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.legend(title="removal", fontsize=8)
    return (save_figure(fig, figures_dir / f"{NAME}_causal.png"),
            f"Removing a crosscoder feature vs its matched SAE chain vs a density-matched random chain, at the "
            f"positions where the feature fires: KL between the two ablated next-token distributions and of each to "
            f"the clean run, per removal semantics ({len(causal.feature.unique())} features, mean and 95\\% "
            "bootstrap interval over features).")


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


def _training_figure(frame: pd.DataFrame, nulls: pd.DataFrame | None, span_tau: float, path: Path) -> tuple[Path, str]:
    """Mean entropy and span of the live features at each training snapshot (95 % intervals over features), with the
    mean levels of the initialisation and residual-persistence nulls as reference lines."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    names = list(dict.fromkeys(frame.dictionary))
    colors = dict(zip(names, sns.color_palette(n_colors=len(names))))
    levels = nulls.groupby("kind", sort=False)[["entropy", "span"]].mean() if nulls is not None else pd.DataFrame()
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.6))
    labels = {"entropy": "normalised entropy of $r$", "span": f"span ($r>{span_tau}$)"}
    for ax, (col, label) in zip(axes, labels.items()):
        for name in names:
            part = frame[frame.dictionary == name]
            sns.lineplot(data=part, x="tokens", y=f"mean_{col}", marker="o", color=colors[name], label=name, ax=ax)
            ax.fill_between(part.tokens, part[f"mean_{col}_lo"], part[f"mean_{col}_hi"], color=colors[name], alpha=0.25)
        for (kind, level), style in zip(levels.get(col, pd.Series(dtype=float)).items(), (":", "--", "-.")):
            ax.axhline(level, color="0.3", ls=style, lw=1.2, label=f"null: {kind}")
        ax.set(xlabel="training tokens", ylabel=f"{label}, live features")
    axes[0].get_legend().remove()
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)  # off the data: the lines and the nulls
    return (save_figure(fig, path),
            "Decoder-norm profiles over training: mean normalised entropy and span of the features live at the end, at "
            "each snapshot of the decoder norms (95\\% bootstrap intervals over features), against the mean levels of "
            "the nulls (the crosscoder at initialisation; least-squares profiles of random and top principal "
            "directions carried across layers by residual persistence).")


def _training_text(results: Path, get) -> str:
    """One sentence per dictionary from ``profiles_over_training.csv``: entropy and span at the first snapshot (step 0,
    unless the run resumed from a checkpoint older than the snapshots) vs the last, whether the entropy moved away
    from the initial profile (intervals apart) and where it ends against the persistence nulls' intervals."""
    path = Path(results) / "profiles_over_training.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=TRAINING_COLUMNS)

    def ci(row, col: str) -> str:
        return f"{fmt(row[col], 3)} [{fmt(row[col + '_lo'], 3)}, {fmt(row[col + '_hi'], 3)}]"

    def side(row, kind: str) -> str:
        lo, hi = get("null", f"{kind}|mean_entropy_lo"), get("null", f"{kind}|mean_entropy_hi")
        where = ("below" if row.mean_entropy_hi < lo else "above" if row.mean_entropy_lo > hi else "within")
        return f"{where} the interval of {kind}s carried across layers by least squares ({fmt(lo, 3)} to {fmt(hi, 3)})"

    parts = []
    for name, part in frame.groupby("dictionary", sort=False):
        part = part.sort_values("step")
        first, last = part.iloc[0], part.iloc[-1]
        moved = last.mean_entropy_hi < first.mean_entropy_lo
        start = "the flat initial profile" if first.step == 0 else f"the profile at step {int(first.step)}"
        text = (f"Over training ({len(part)} snapshots of the decoder norms), the {int(last.n_live)} live features of "
                f"the {latex_escape(name)} go from mean profile entropy {ci(first, 'mean_entropy')} and span "
                f"{ci(first, 'mean_span')} at step {int(first.step)} to {ci(last, 'mean_entropy')} and "
                f"{ci(last, 'mean_span')} after {fmt(int(last.tokens))} tokens "
                f"({fmt(100 * last.frac_span_1, 2)}\\% single-layer): "
                f"{'away from' if moved else 'not measurably away from'} {start}")
        if np.isfinite(get("null", "random direction|mean_entropy_lo")):
            text += f"; its final entropy is {side(last, 'random direction')} and {side(last, 'principal direction')}"
        parts.append(text + ".")
    return " ".join(parts)


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


def _interval(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    return f"{fmt(mean, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def _seed_text(seed: pd.DataFrame, get, cfg: Config) -> str:
    """Crosscoder-to-SAE matching against the same matching between two SAE seeds, at ``cfg.tau``."""
    at = seed[np.isclose(seed.tau, cfg.tau)].set_index(["matching", "statistic"])

    def val(key: str, stat: str) -> str:
        row = at.loc[(key, stat)]
        return _interval(row["mean"], row.lo, row.hi)

    cc, sd = at.loc[("crosscoder", "latents_per_layer")], at.loc[("sae_seed", "latents_per_layer")]
    verdict = ("fewer matches than" if cc.hi < sd.lo else "more matches than" if cc.lo > sd.hi else
               "as many matches (overlapping intervals) as")
    return (f"Seed baseline (cosine $>{cfg.tau}$, means with 95\\% bootstrap intervals over features or latents): a "
            f"crosscoder feature is matched by {val('crosscoder', 'latents_per_layer')} SAE latents per layer it spans "
            f"(fraction of spanned layers matched {val('crosscoder', 'frac_matched')}, best cosine "
            f"{val('crosscoder', 'best_cos')}), while a seed-0 SAE latent is matched by "
            f"{val('sae_seed', 'latents_per_layer')} latents of a second seed of the same SAEs (fraction matched "
            f"{val('sae_seed', 'frac_matched')}, best cosine {val('sae_seed', 'best_cos')}): a crosscoder feature gets "
            f"{verdict} an SAE latent gets from its own re-run (the seed baseline). The second seed's SAE latents "
            f"chain at a rate of "
            f"{fmt(100 * get('chains_seed1', 'frac_latents_chained', cfg.tau), 3)}\\% (mean chain length "
            f"{fmt(get('chains_seed1', 'mean_chain_length', cfg.tau), 3)}) against "
            f"{fmt(100 * get('chains', 'frac_latents_chained', cfg.tau), 3)}\\% "
            f"({fmt(get('chains', 'mean_chain_length', cfg.tau), 3)}) for the first.")


def _causal_text(get, cfg: Config) -> str:
    """The causal check's outcome per removal semantics (summary rows of part ``causal``)."""
    def kl(at: str, comp: str) -> str:
        return _interval(get("causal", f"{at}|{comp}"), get("causal", f"{at}|{comp}_lo"),
                         get("causal", f"{at}|{comp}_hi"))

    n = int(get("causal", "n_features_drawn"))
    rule = (f"matched at two or more layers, density in [{fmt(cfg.causal_density[0], 2)}, "
            f"{fmt(cfg.causal_density[1], 2)}], firing in the first {cfg.causal_ctx} tokens of one of "
            f"{cfg.causal_search_windows} held-out windows")
    if n == 0:
        return f"Causal check: no live crosscoder feature met the pre-declared criterion ({rule}), so none was run."
    names = {"each": "pinning each edited layer to clean minus the contribution",
             "add": "subtracting the contribution from the running residual at each edited layer (compounding)"}
    parts = []
    for at in cfg.causal_at:
        closer = get("causal", f"{at}|difference_lo") > 0
        parts.append(f"Removal by {names.get(at, at)}: KL(feature $\\|$ chain) {kl(at, 'feature_vs_chain')} against "
                     f"KL(feature $\\|$ random chain) {kl(at, 'feature_vs_random')} (paired difference "
                     f"{kl(at, 'difference')}, chain closer for "
                     f"{fmt(100 * get('causal', f'{at}|frac_chain_closer'), 3)}\\% "
                     f"of features, one-sided Wilcoxon $p={fmt(get('causal', f'{at}|wilcoxon_p'), 2)}$), so the matched "
                     f"chain {'does' if closer else 'does not demonstrably'} act more like the feature than a random "
                     f"chain; removing the feature itself moves the clean distribution by "
                     f"{kl(at, 'clean_vs_feature')}, "
                     f"its chain by {kl(at, 'clean_vs_chain')}, a random chain by {kl(at, 'clean_vs_random')}")
    return (f"Causal check on {n} crosscoder features drawn in advance ({rule}; up to {cfg.causal_windows} held-out "
            f"windows each, KL in nats at the positions where the feature fires, 95\\% bootstrap intervals over "
            f"features). " + ". ".join(parts) + ".")


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
        ("SAEs, second seed", f"latents in a chain of 2+ (cos $>{cfg.tau}$)",
         get("chains_seed1", "frac_latents_chained", cfg.tau)),
        ("SAEs, second seed", "mean chain length", get("chains_seed1", "mean_chain_length", cfg.tau)),
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
    if training := _training_text(results, get):
        parts.append(training)
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
    if (Path(results) / "seed_baseline.csv").is_file():
        parts.append(_seed_text(read_csv(results, "seed_baseline"), get, cfg))
    if (summ.part == "causal").any():
        parts.append(_causal_text(get, cfg))
    if (Path(results) / "synthetic_summary.csv").is_file():
        parts.append(synthetic_regimes.answer_text(results, cfg.syn_recovered))
    return " ".join(parts)


STUDY = Study(name=NAME, title="Cross-layer superposition", config=Config, run=run, figures=figures, tables=tables,
              answer=answer, dictionaries=("saes", "crosscoder"), order=50,
              presets={"micro": Config(synthetic_tokens=2_048, syn_regimes=("easy", "independent"), syn_seeds=2,
                                      syn_steps=40, syn_heldout=1_024),
                       "standard": Config(causal_features=24, synthetic_tokens=30_000, syn_steps=500),
                       "paper": Config(synthetic_tokens=200_000, syn_steps=2_000, syn_seeds=5, causal_features=24)})
