"""Synthetic ground truth in named regimes: where do per-layer SAEs and a crosscoder recover known features?

Part of the cross-layer superposition study (it calls :func:`synthetic_recovery` from its ``run`` and the figure,
table and answer functions below from its own). Settings are the study's ``Config.syn_*`` fields.

Method
1. Regimes (:data:`REGIMES`, :func:`crosslayer.synthetic.make_synthetic` options): ``easy`` (the crosscoder's own
   model: rank-1 features across layers, 2x more features than dimensions), ``heavy`` (20 d features, about 10x more
   features than dimensions at each layer), ``independent`` (``layer_coupling`` 0: a feature's per-layer magnitudes
   vary independently, its layers merely co-occur), ``weak`` (a quarter of the features span every layer at 0.2 of
   a peak, under noise that hides them at any one layer) and ``hierarchical`` (G/8 parents with 3 children each,
   a child firing only with its parent, half the time).
2. Per regime and seed s: ``synthetic_tokens`` training rows and ``syn_heldout`` held-out rows of one truth seeded
   by s; batch order and initialisation seeded by s + :data:`TRAIN_SEED` (an offset, so that no initial decoder
   reuses the random numbers of a true direction).
3. Matched L0 per (feature, layer), the like-for-like count of research-notes section 4: an acausal TopK crosscoder
   with k = ``syn_k`` writes every layer, so it has k x L active (feature, layer) pairs per token; the per-layer
   TopK SAEs (:class:`crosslayer.sae_stack.SAEStackConfig`) keep k per layer, sum_l k = k x L as well. Widths:
   the crosscoder has F = ``syn_width`` x G latents and each layer's SAE as many, so both have 2 L d F parameters
   (matched parameters) and the SAEs L times the crosscoder's latents. Both are trained by
   :func:`crosslayer.training.train_crosscoder` with the same batch, steps, learning rate and AuxK.
4. Metrics per regime x approach x seed from :func:`crosslayer.synthetic.recovery`: MMCS over all features, over
   frequent (>= ``often``) multi-layer ones and over weak ones; distinct best-matching latents per frequent
   multi-layer feature; false merges (a true feature whose best latent at some layer, cosine > ``tau``, is also the
   best latent of another true feature); absorption per child (Chanin et al. 2024): 1 - P(parent's latent fires |
   child fires) / P(parent's latent fires | parent fires, none of its children does), on held-out rows, for parents
   recovered at their peak layer (cosine > ``tau``) whose latent fires on >= 10 % of the parent-alone rows;
   held-out FVU. Null: MMCS of a random decoder with the same
   per-(latent, layer) support.
5. Intervals: mean over seeds with a 95 % t-interval (the seed is the independent unit). The crosscoder-minus-SAEs
   difference is paired by seed (same data); its interval decides: the crosscoder wins, the SAEs win, or they tie
   (the interval contains 0). A method fails a regime when its MMCS interval lies below ``syn_recovered``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from crosslayer.errors import CrosslayerError
from crosslayer.io import write_csv
from studies.common import fmt, latex_table, read_csv, save_figure, theme

SAE, CC, DIFF = "per-layer SAEs", "crosscoder", "crosscoder - SAEs"
FEATURE_COLUMNS = ["regime", "approach", "seed", "feature", "start", "span", "frequency", "weak", "parent", "multi",
                   "often", "mean_max_cos", "min_max_cos", "n_latents", "recovered_span", "false_merge", "absorption"]
HIGHER_BETTER = {"mmcs": True, "mmcs_multi": True, "mmcs_weak": True, "false_merge": False, "absorption": False,
                 "fvu": False}
"""Metrics with a winner, and whether higher is better (the others are descriptive)."""
TRAIN_SEED = 1_000_003
"""Offset of the training seed (initialisation, batch order) from the data seed: seeded alike, the initial decoders
would be drawn from the same random numbers as the true directions."""
MIN_DETECTION = 0.1
"""Absorption is measured only through a parent latent that fires on at least this share of the parent-alone rows."""
METRIC_NAMES = {"mmcs": "MMCS", "mmcs_multi": "MMCS (multi-layer)", "mmcs_weak": "MMCS (weak)",
                "latents_per_multi": "latents per multi-layer feature", "false_merge": "false merges",
                "absorption": "absorption", "fvu": "held-out FVU", "mmcs_null": "MMCS of a random decoder"}


@dataclass(frozen=True)
class Regime:
    """A named ground-truth setting: G = ``features_per_d`` x d features and :func:`make_synthetic` options."""

    description: str
    features_per_d: float
    options: Callable[[int], dict] = field(default=lambda G: {})
    """G -> keyword options of :func:`crosslayer.synthetic.make_synthetic`."""
    focus: tuple[str, ...] = ()
    """Metrics the answer reports for this regime besides MMCS."""


REGIMES: dict[str, Regime] = {
    "easy": Regime("rank-1 features, 2x superposition", 2, focus=("latents_per_multi",)),
    "heavy": Regime("about 10x more features than dimensions per layer", 20, focus=("mmcs_multi", "fvu")),
    "independent": Regime("per-layer magnitudes independent", 2, lambda G: {"layer_coupling": 0.0},
                          focus=("latents_per_multi", "false_merge", "fvu")),
    "weak": Regime("weak all-layer features under noise", 2,
                   lambda G: {"frac_weak": 0.25, "weak_scale": 0.2, "noise": 1.0}, focus=("mmcs_weak",)),
    "hierarchical": Regime("parent/child features", 2,
                           lambda G: {"n_parents": G // 8, "n_children": 3, "child_prob": 0.5},
                           focus=("absorption",)),
}


def regime_data(name: str, n_layers: int, d_model: int, n_tokens: int, *, seed: int):
    """``(acts_NLD, truth, fires_NG)`` of regime ``name`` (:data:`REGIMES`)."""
    from crosslayer.synthetic import make_synthetic

    if name not in REGIMES:
        raise CrosslayerError(f"unknown synthetic regime {name!r}; use one of {', '.join(REGIMES)}")
    regime = REGIMES[name]
    G = max(1, round(regime.features_per_d * d_model))
    return make_synthetic(n_layers, d_model, G, n_tokens, seed=seed, return_fires=True, **regime.options(G))


def _stream(acts: Tensor, batch: int, seed: int) -> Callable[[int], Iterator[Tensor]]:
    """``make_batches(start_step)``: endless seeded epochs of shuffled ``batch``-row slices of ``acts``."""
    def make(start: int) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(seed)

        def epochs():
            while True:
                perm = torch.randperm(acts.shape[0], generator=gen)
                for b in range(0, acts.shape[0] - batch + 1, batch):
                    yield acts[perm[b:b + batch]]

        return itertools.islice(epochs(), start, None)

    return make


def train_pair(cfg, acts_NLD: Tensor, n_true: int, folder: Path, *, seed: int, progress: bool) -> dict:
    """The crosscoder and the per-layer SAE stack at matched L0 per (feature, layer) and matched parameters
    (module docstring, step 3), trained by the same trainer on the same batches: ``{approach: dictionary}``."""
    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.sae_stack import SAEStackConfig
    from crosslayer.training import TrainConfig, train_crosscoder

    L, d, width = acts_NLD.shape[1], acts_NLD.shape[2], cfg.syn_width * n_true
    train = TrainConfig(tokens=cfg.syn_steps * cfg.syn_batch, batch_size=cfg.syn_batch, lr=cfg.syn_lr,
                        dead_after_tokens=20_000, log_every=cfg.syn_steps, checkpoint_every=cfg.syn_steps, seed=seed)
    archs = {CC: CrosscoderConfig(layers=tuple(range(L)), d_model=d, n_features=width, k=cfg.syn_k),
             SAE: SAEStackConfig(layers=tuple(range(L)), d_model=d, width=width, k=cfg.syn_k)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are tiny: one thread is several times faster than two
    try:
        return {name: train_crosscoder(train, arch, _stream(acts_NLD, cfg.syn_batch, seed),
                                       out_dir=folder / ("crosscoder" if name == CC else "saes"), progress=progress)
                for name, arch in archs.items()}
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- per-feature metrics

def false_merges(table: pd.DataFrame, tau: float) -> np.ndarray:
    """Per true feature: is its best latent at some layer (cosine > tau) also another true feature's best latent
    (cosine > tau) at some layer? (a :func:`crosslayer.synthetic.recovery` table with ``latent_l<i>`` columns)"""
    L = sum(c.startswith("latent_l") for c in table.columns)
    lat_GL = table[[f"latent_l{l}" for l in range(L)]].to_numpy()
    ok_GL = np.nan_to_num(table[[f"max_cos_l{l}" for l in range(L)]].to_numpy(), nan=-1.0) > tau
    g_GL = np.broadcast_to(np.arange(len(table))[:, None], lat_GL.shape)
    pairs = np.unique(np.stack([lat_GL[ok_GL], g_GL[ok_GL]], 1), axis=0)  # distinct (latent, true feature)
    n_true = np.bincount(pairs[:, 0], minlength=int(lat_GL.max(initial=0)) + 1) if len(pairs) else np.zeros(1, int)
    return (ok_GL & (n_true[np.maximum(lat_GL, 0)] >= 2)).any(1)


def absorption(f_NF: Tensor, fires_NG: Tensor, truth, parent_latent_G: np.ndarray) -> np.ndarray:
    """Per true feature: 1 - P(parent's latent fires | child fires) / P(parent's latent fires | parent fires and none
    of its children does) for children whose ``parent_latent_G[parent]`` >= 0 and fires on at least
    :data:`MIN_DETECTION` of the parent-alone rows; NaN otherwise."""
    parent_G = truth.parent_G if truth.parent_G is not None else torch.full((fires_NG.shape[1],), -1)
    out = np.full(fires_NG.shape[1], np.nan)
    child_C = torch.nonzero((parent_G >= 0) & torch.as_tensor(parent_latent_G[parent_G.clamp_min(0)] >= 0)).flatten()
    if not len(child_C):
        return out
    p_C = parent_G[child_C]
    onehot_CG = torch.nn.functional.one_hot(parent_G[parent_G >= 0], fires_NG.shape[1]).float()
    any_child_NG = fires_NG[:, parent_G >= 0].float() @ onehot_CG > 0  # some child of this parent fires
    latent_NC = f_NF[:, torch.as_tensor(parent_latent_G)[p_C]] > 0
    with_C = (latent_NC & fires_NG[:, child_C]).sum(0) / fires_NG[:, child_C].sum(0).clamp_min(1)
    alone_NC = fires_NG[:, p_C] & ~any_child_NG[:, p_C]
    without_C = (latent_NC & alone_NC).sum(0) / alone_NC.sum(0).clamp_min(1)
    detects_C = without_C >= MIN_DETECTION  # a latent that misses the parent alone measures no absorption
    out[child_C.numpy()] = torch.where(detects_C, 1 - with_C / without_C.clamp_min(1e-12), torch.nan).numpy()
    return out


def feature_table(W_FLD: Tensor, f_NF: Tensor, fires_NG: Tensor, truth, cfg) -> pd.DataFrame:
    """:func:`crosslayer.synthetic.recovery` of one dictionary plus recovered span, false merges and absorption."""
    from crosslayer.synthetic import recovery

    table = recovery(W_FLD, truth)
    G = len(table)
    peak_G = truth.profiles_GL.argmax(1).numpy()
    best_G = table[[f"latent_l{l}" for l in range(W_FLD.shape[1])]].to_numpy()[np.arange(G), peak_G]
    cos_G = table[[f"max_cos_l{l}" for l in range(W_FLD.shape[1])]].to_numpy()[np.arange(G), peak_G]
    norms_FL = W_FLD.norm(dim=-1)
    r_FL = norms_FL / norms_FL.max(1, keepdim=True).values.clamp_min(1e-12)
    weak_G = truth.weak_G if truth.weak_G is not None else torch.zeros(G, dtype=torch.bool)
    parent_G = truth.parent_G if truth.parent_G is not None else torch.full((G,), -1)
    return table.assign(recovered_span=(r_FL[torch.as_tensor(best_G)] > cfg.span_tau).sum(1).numpy(),
                        false_merge=false_merges(table, cfg.tau),
                        absorption=absorption(f_NF, fires_NG, truth, np.where(cos_G > cfg.tau, best_G, -1)),
                        weak=weak_G.numpy(), parent=parent_G.numpy(), multi=(table.span > 1) & ~weak_G.numpy(),
                        often=table.frequency >= cfg.often)


def run_metrics(features: pd.DataFrame) -> dict[str, float]:
    """One run's metrics from its feature rows (module docstring, step 4; FVU and the null are added apart)."""
    target = features[features.multi & features.often]

    def mean(series: pd.Series) -> float:
        return float(series.mean()) if len(series.dropna()) else float("nan")

    return {"mmcs": mean(features.mean_max_cos), "mmcs_multi": mean(target.mean_max_cos),
            "mmcs_weak": mean(features[features.weak].mean_max_cos), "latents_per_multi": mean(target.n_latents),
            "false_merge": mean(features.false_merge.astype(float)), "absorption": mean(features.absorption)}


@torch.no_grad()
def evaluate(dictionary, heldout_NLD: Tensor, fires_NG: Tensor, truth, cfg, seed: int) -> tuple[pd.DataFrame, dict]:
    """Feature rows and run metrics (with held-out FVU and the random-decoder null) of one trained dictionary."""
    from crosslayer.evals import fvu
    from crosslayer.matching import decoders
    from crosslayer.synthetic import mmcs, recovery

    W_FLD = decoders(dictionary)
    out = dictionary(heldout_NLD)
    features = feature_table(W_FLD, out[0].float(), fires_NG, truth, cfg)
    support = W_FLD.norm(dim=-1, keepdim=True) > 0
    # a stream of its own: the data's generators start at seed and seed + 7919 (the same numbers would match the truth)
    noise = torch.randn(W_FLD.shape, generator=torch.Generator().manual_seed(2 ** 31 - 1 - seed))
    metrics = {**run_metrics(features), "fvu": float(fvu(heldout_NLD, out[1]).mean()),
               "mmcs_null": mmcs(recovery(noise * support, truth))}
    return features, metrics


def synthetic_recovery(cfg, out_dir: Path, *, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and score both approaches on every regime in ``cfg.syn_regimes`` and seed in ``range(cfg.syn_seeds)``.

    Returns ``(features, runs)``: one row per feature x regime x approach x seed (:data:`FEATURE_COLUMNS`), and
    one per regime x approach x seed x metric (``regime, approach, seed, metric, value``).
    """
    n_train, L, d = cfg.synthetic_tokens, cfg.syn_layers, cfg.syn_d
    if n_train < cfg.syn_batch or cfg.syn_seeds < 1 or not cfg.syn_regimes:
        raise CrosslayerError(f"need synthetic_tokens >= syn_batch ({cfg.syn_batch}), syn_seeds >= 1 and a regime; "
                              f"got {n_train}, {cfg.syn_seeds}, {cfg.syn_regimes}")
    features, runs = [], []
    for name, seed in itertools.product(cfg.syn_regimes, range(cfg.syn_seeds)):
        acts, truth, fires = regime_data(name, L, d, n_train + cfg.syn_heldout, seed=seed)
        folder = (out_dir / f"synthetic_{name}_L{L}_d{d}_n{n_train}_k{cfg.syn_k}_w{cfg.syn_width}_t{cfg.syn_steps}"
                            f"_s{seed}")
        trained = train_pair(cfg, acts[:n_train], truth.profiles_GL.shape[0], folder, seed=TRAIN_SEED + seed,
                             progress=progress)
        for approach, dictionary in trained.items():
            rows, metrics = evaluate(dictionary, acts[n_train:], fires[n_train:], truth, cfg, seed)
            features.append(rows.assign(regime=name, approach=approach, seed=seed)[FEATURE_COLUMNS])
            runs += [{"regime": name, "approach": approach, "seed": seed, "metric": m, "value": v}
                     for m, v in metrics.items()]
    return pd.concat(features, ignore_index=True), pd.DataFrame(runs)


# ----------------------------------------------------------------------------- intervals over seeds

def seed_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean of ``values`` (one per seed, NaN dropped) and its 95 % t-interval (NaN bounds with one seed)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan"), float("nan")
    half = t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def verdict(metric: str, lo: float, hi: float) -> str:
    """Who wins on ``metric`` given the interval of the paired crosscoder-minus-SAEs difference."""
    if metric not in HIGHER_BETTER or not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    if lo <= 0 <= hi:
        return "tie"
    return CC if (lo > 0) == HIGHER_BETTER[metric] else SAE


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per regime x approach x metric: mean and 95 % t-interval over seeds, plus the paired difference rows
    (approach :data:`DIFF`) with their ``verdict``."""
    wide = runs.pivot_table(index=["regime", "metric", "seed"], columns="approach", values="value", dropna=False)
    long = runs.copy()
    if {CC, SAE} <= set(wide.columns):
        diff = (wide[CC] - wide[SAE]).rename("value").reset_index().assign(approach=DIFF)
        long = pd.concat([long, diff], ignore_index=True)
    rows = []
    for (regime, approach, metric), part in long.groupby(["regime", "approach", "metric"], sort=False):
        mean, lo, hi = seed_interval(part.value.to_numpy())
        rows.append({"regime": regime, "approach": approach, "metric": metric, "mean": mean, "lo": lo, "hi": hi,
                     "n_seeds": int(part.value.notna().sum()),
                     "verdict": verdict(metric, lo, hi) if approach == DIFF else ""})
    return pd.DataFrame(rows)


def verdicts(summary: pd.DataFrame, metric: str) -> dict[str, str]:
    """``{regime: verdict}`` of ``metric``'s paired difference in a :func:`summarise` table."""
    rows = summary[(summary.approach == DIFF) & (summary.metric == metric)]
    return dict(zip(rows.regime, rows.verdict.fillna("")))


def write_results(features: pd.DataFrame, runs: pd.DataFrame, results: Path) -> pd.DataFrame:
    """``synthetic.csv`` (per feature), ``synthetic_runs.csv`` (per run and metric) and ``synthetic_summary.csv``
    (intervals over seeds); returns the summary."""
    summary = summarise(runs)
    write_csv(features, results / "synthetic.csv")
    write_csv(runs, results / "synthetic_runs.csv")
    write_csv(summary, results / "synthetic_summary.csv")
    return summary


# ----------------------------------------------------------------------------- figure, table, answer (from the CSVs)

def figure(results: Path, path: Path) -> tuple[Path, str]:
    """Each metric by regime, the two approaches side by side, mean and 95 % t-interval over seeds."""
    import seaborn as sns

    theme()
    runs = read_csv(results, "synthetic_runs").dropna(subset=["value"])
    runs = runs[runs.metric.isin(METRIC_NAMES)].assign(metric=lambda r: r.metric.map(METRIC_NAMES))
    grid = sns.catplot(data=runs, x="regime", y="value", hue="approach", col="metric", kind="point", dodge=0.3,
                       col_wrap=4, sharey=False, sharex=False, linestyle="none", height=2.6, aspect=1.15,
                       errorbar=lambda v: seed_interval(v)[1:], col_order=[m for m in METRIC_NAMES.values()
                                                                            if m in set(runs.metric)])
    grid.set_titles("{col_name}").set_xticklabels(rotation=30, ha="right").set_axis_labels("", "")
    labels = [t.get_text() for t in grid.legend.texts]
    grid.axes.flat[-1].legend(grid.legend.legend_handles, labels, fontsize=7)  # inside an axis: tight_layout keeps it
    grid.legend.remove()
    n_seeds = int(runs.groupby(["regime", "approach", "metric"]).seed.nunique().max())
    return (save_figure(grid.figure, path),
            f"Synthetic ground truth by regime: per-layer SAEs and a crosscoder at matched L0 per (feature, layer) and "
            f"matched parameters; mean and 95\\% t-interval over {n_seeds} seeds (data and initialisation).")


def _cell(row: pd.Series) -> str:
    if not np.isfinite(row["mean"]):
        return "--"
    bounds = f" [{fmt(row.lo, 3)}, {fmt(row.hi, 3)}]" if np.isfinite(row.lo) else ""
    return f"{fmt(row['mean'], 3)}{bounds}"


def table(results: Path, path: Path, label: str) -> Path:
    """Per regime and metric: both approaches and their paired difference with 95 % intervals, and the verdict."""
    summ = read_csv(results, "synthetic_summary")
    summ = summ[summ.metric.isin(METRIC_NAMES) & np.isfinite(summ["mean"])]
    cells = summ.assign(cell=summ.apply(_cell, axis=1)).pivot_table(index=["regime", "metric"], columns="approach",
                                                                  values="cell", aggfunc="first", sort=False)
    verdicts = summ[summ.approach == DIFF].set_index(["regime", "metric"]).verdict.fillna("")
    frame = cells.reindex(columns=[CC, SAE, DIFF]).fillna("--").join(verdicts).fillna("").reset_index()
    frame["metric"] = frame.metric.map(METRIC_NAMES)
    n_seeds = int(summ.n_seeds.max()) if len(summ) else 0
    return latex_table(frame, path, raw_columns=(CC, SAE, DIFF), label=label,
                       columns={"regime": "regime", "metric": "metric", CC: CC, SAE: SAE, DIFF: "difference",
                                "verdict": "better"},
                       caption=f"Synthetic ground truth by regime at matched L0 per (feature, layer): mean [95\\% "
                               f"t-interval] over {n_seeds} seeds; the difference is paired by seed, and a method is "
                               "better where its interval excludes 0.")


def _say(summ: pd.DataFrame, regime: str, metric: str) -> str:
    """``metric`` in ``regime``: both approaches with intervals and who wins (from the summary rows)."""
    rows = summ[(summ.regime == regime) & (summ.metric == metric)].set_index("approach")
    if CC not in rows.index or SAE not in rows.index or not np.isfinite(rows.loc[CC, "mean"]):
        return ""
    text = (f"{METRIC_NAMES[metric]} {_cell(rows.loc[CC])} for the crosscoder vs {_cell(rows.loc[SAE])} for the SAEs")
    said = {"tie": " (a tie: the paired interval contains 0)", CC: " (the crosscoder is better)",
            SAE: " (the SAEs are better)"}
    return text + said.get(rows.verdict.fillna("").get(DIFF, ""), "")


def answer_text(results: Path, recovered: float) -> str:
    """Per regime, where each method wins, ties or fails (from ``synthetic_summary.csv``)."""
    summ = read_csv(results, "synthetic_summary")
    sentences = []
    for regime in summ.regime.unique():
        parts = [p for p in [_say(summ, regime, "mmcs")] + [_say(summ, regime, m)
                                                            for m in REGIMES[regime].focus] if p]
        mmcs = summ[(summ.regime == regime) & (summ.metric == "mmcs")].set_index("approach")
        failed = [a for a in (CC, SAE) if a in mmcs.index and np.isfinite(mmcs.loc[a, "hi"])
                  and mmcs.loc[a, "hi"] < recovered]
        fails = (f"; below MMCS {recovered} (fails): {' and '.join(failed)}" if failed else
                 f"; neither fails (no MMCS interval below {recovered})")
        null = summ[(summ.regime == regime) & (summ.metric == "mmcs_null") & (summ.approach == CC)]["mean"]
        chance = f", chance (random decoder) {fmt(float(null.iloc[0]), 3)}" if len(null) else ""
        sentences.append(f"\\emph{{{regime}}} ({REGIMES[regime].description}): " + "; ".join(parts) + fails
                         + chance + ".")
    n_seeds = int(summ.n_seeds.max()) if len(summ) else 0
    return (f"On synthetic data with known features, at matched L0 per (feature, layer) and matched parameters "
            f"(mean [95\\% t-interval] over {n_seeds} seeds): " + " ".join(sentences))
