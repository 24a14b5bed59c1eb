"""The cross-layer superposition study: planted SAE chains and crosscoder-to-SAE matches are found, synthetic
multi-layer features are one crosscoder latent, figures/tables render from CSVs, and the study runs at micro."""

import numpy as np
import pytest
import pandas as pd
import torch

from studies import cross_layer_superposition as xl
from studies import synthetic_regimes as sr
from studies.pipeline import render, run_study


def _planted_saes(L=5, W=6, d=48, seed=0):
    """Per-layer SAE decoders [W, d] per layer: latent 0 is the same direction u at every layer, latent 1
    shares v at layers 0-2 (then jumps to w at 3-4), the rest are random."""
    gen = torch.Generator().manual_seed(seed)
    u, v, w = torch.nn.functional.normalize(torch.randn(3, d, generator=gen), dim=-1)
    blocks = []
    for l in range(L):
        B = torch.randn(W, d, generator=gen)
        B[0] = u + 0.02 * torch.randn(d, generator=gen)
        B[1] = (v if l < 3 else w) + 0.02 * torch.randn(d, generator=gen)
        blocks.append(torch.nn.functional.normalize(B, dim=-1))
    return blocks


def _chains(blocks, tau=0.8, live=None):
    L, W = len(blocks), blocks[0].shape[0]
    live = live or [torch.ones(W, dtype=torch.bool)] * L
    matches, cosines = zip(*[xl.match_adjacent(blocks[l], blocks[l + 1], live_a=live[l], live_b=live[l + 1])
                             for l in range(L - 1)])
    chain_N = xl.build_chains(list(matches), list(cosines), [W] * L, tau)
    link_cos = np.concatenate([np.where(c > tau, c, np.nan) for c in cosines] + [np.full(W, np.nan)])
    keep = torch.cat(live).numpy()
    table = xl.chain_table(chain_N, np.repeat(np.arange(L), W), np.tile(np.arange(W), L), link_cos,
                           np.zeros_like(link_cos), keep, list(range(10, 10 + L)))
    return chain_N, table


def test_planted_chains():
    L, W = 5, 6
    blocks = _planted_saes(L, W)
    chain_N, table = _chains(blocks)
    ids = chain_N.reshape(L, W)
    assert (ids[:, 0] == ids[0, 0]).all()  # one full-length chain
    assert (ids[:3, 1] == ids[0, 1]).all() and (ids[3:, 1] == ids[3, 1]).all() and ids[3, 1] != ids[0, 1]
    assert sorted(table.length.tolist(), reverse=True)[:3] == [5, 3, 2]
    assert table.length.sum() == L * W and (table.length == 1).sum() == L * W - 10
    full = table[table.length == 5].iloc[0]
    assert full.start_layer == 10 and full.end_layer == 14 and full.min_cos > 0.9
    assert full.latents.split() == [f"{10 + l}:0" for l in range(L)]
    assert list(table.columns) == xl.CHAIN_COLUMNS
    # a dead latent breaks the chain and is left out
    live = [torch.ones(W, dtype=torch.bool) for _ in range(L)]
    live[2][0] = False
    chain_N, table = _chains(blocks, live=live)
    assert table.length.sum() == L * W - 1 and sorted(table.length.tolist(), reverse=True)[:3] == [3, 2, 2]
    # chance: matched cosines against random directions are low in 48 dims
    assert xl.chance_cosine(blocks[0]) < 0.7


def test_sae_latents_per_crosscoder_feature():
    L, d = 4, 40
    gen = torch.Generator().manual_seed(1)
    cc = torch.randn(3, L, d, generator=gen)
    span = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    blocks, live = [], []
    for l in range(L):
        B = torch.randn(7, d, generator=gen)
        B[0] = cc[0, l] + 0.05 * torch.randn(d, generator=gen)  # feature 0 copied at every layer
        B[1] = cc[1, l] + 0.05 * torch.randn(d, generator=gen)  # feature 1 copied at every layer, spans 2
        B[2] = -cc[0, l]
        blocks.append(torch.nn.functional.normalize(B, dim=-1))
        live.append(torch.ones(7, dtype=torch.bool))
    live[3][0] = False  # a dead copy does not count
    out = xl.sae_per_crosscoder(cc, span, blocks, live, 0.8)
    assert out["count_FL"].sum(1).tolist() == [3, 2, 0]
    assert out["arg_FL"][0, :3].tolist() == [0, 0, 0] and out["arg_FL"][1].tolist() == [-1, 1, 1, -1]
    assert out["best_FL"][1, 0].isnan() and out["best_FL"][0, 0] > 0.95
    assert xl.distinct_per_row(np.array([[3, 3, -1, 4], [-1, -1, -1, -1], [0, 1, 2, 3]])).tolist() == [2, 0, 4]


def _fixture_results(folder):
    rng = np.random.default_rng(0)
    L = 4
    r = rng.uniform(0, 1, (30, L))
    r[np.arange(30), rng.integers(0, L, 30)] = 1.0
    prof = pd.DataFrame({"feature": range(30), "density": 0.01, "live": [True] * 25 + [False] * 5,
                         "peak_layer": r.argmax(1) + 2, "peak_norm": 1.0, "span": (r > 0.1).sum(1),
                         "span_50": (r > 0.5).sum(1), "entropy": 0.8, "drift_mean": 0.7, "drift_min": 0.5,
                         **{f"r_{l + 2}": r[:, l] for l in range(L)}})
    prof.to_csv(folder / "cc_profiles.csv", index=False)
    pd.DataFrame({"chain": range(5), "start_layer": [2, 2, 3, 4, 5], "end_layer": [5, 3, 3, 4, 5],
                  "length": [4, 2, 1, 1, 1], "mean_cos": [0.8, 0.6, np.nan, np.nan, np.nan],
                  "min_cos": [0.7, 0.6, np.nan, np.nan, np.nan], "mean_act_corr": [0.5, 0.4, np.nan, np.nan, np.nan],
                  "latents": ["2:0 3:1 4:0 5:2", "2:1 3:0", "3:3", "4:4", "5:5"]}).to_csv(folder / "sae_chains.csv",
                                                                                    index=False)
    pd.DataFrame({"feature": range(6), "peak_layer": 3, "span": [1, 2, 2, 4, 4, 3], "n_sae_latents": [1, 2, 1, 3, 4, 0],
                  "n_matched_layers": [1, 2, 1, 3, 4, 0], "frac_layers_matched": 0.5, "mean_best_cos": 0.6,
                  "mean_best_act_corr": 0.3, "n_chains": [1, 1, 1, 2, 1, 0]}).to_csv(folder / "sae_per_cc.csv",
                                                                                     index=False)
    runs = pd.DataFrame([{"regime": r, "approach": a, "seed": s, "metric": m,
                          "value": 0.9 + 0.01 * s + (a == xl.CC) * 0.02}
                         for r in ("easy", "independent") for a in (xl.CC, xl.SAE) for s in range(3)
                         for m in ("mmcs", "mmcs_multi", "latents_per_multi", "fvu")])
    sr.write_results(pd.DataFrame([dict.fromkeys(sr.FEATURE_COLUMNS, 0)]), runs, folder)
    rows = [("profiles", m, np.nan, 1.0) for m in ("n_features", "n_live", "mean_span", "mean_span_50", "mean_entropy",
                                                   "mean_drift", "mean_drift_min", "frac_span_1", "frac_span_all")]
    rows += [("chains", m, np.nan, 0.3) for m in ("chance_cos_p99", "median_matched_cos")]
    rows += [("chains", m, t, 0.5) for t in xl.Config().taus for m in ("n_live_latents", "n_chains", "mean_chain_length",
                                                              "frac_latents_chained", "frac_latents_full_length",
                                                              "mean_link_cos", "median_link_act_corr")]
    rows += [("sae_per_cc", m, t, 1.5) for t in xl.Config().taus for m in ("mean_sae_latents", "mean_sae_latents_per_span_layer",
                                                                  "frac_layers_matched", "frac_features_matched",
                                                                  "mean_distinct_chains", "mean_best_cos", "mean_span")]
    pd.DataFrame(rows, columns=["part", "metric", "tau", "value"]).to_csv(folder / "summary.csv", index=False)


def test_figures_tables_answer_from_fixture_csvs(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _fixture_results(results)
    out = render(xl.NAME, results, tmp_path / "paper")
    names = [p.split("/")[-1] for p in out["figures"]]
    assert names == [f"{xl.NAME}_{s}.png" for s in ("profiles", "spans", "sae_per_cc", "synthetic")]
    for path in out["figures"]:
        assert (tmp_path / "paper" / "figures" / path.split("/")[-1]).stat().st_size > 0
    tables = tmp_path / "paper" / "tables"
    assert (tables / f"{xl.NAME}.tex").stat().st_size and (tables / f"{xl.NAME}_synthetic.tex").stat().st_size
    text = (tables / f"{xl.NAME}_answer.tex").read_text()
    assert "nan" not in text.lower() and "of 4 layers" in text and "synthetic" in text
    assert "\\emph{independent}" in text and "crosscoder is better" in text


@pytest.mark.slow
def test_cross_layer_superposition_study_micro(micro_ctx):
    run_study(xl.NAME, micro_ctx)
    cfg = micro_ctx.preset.config(xl.NAME)
    results = micro_ctx.results(xl.NAME)
    L = micro_ctx.n_layers
    layers = micro_ctx.store("train").layers
    prof = pd.read_csv(results / "cc_profiles.csv")
    assert len(prof) == micro_ctx.cc_width and {"feature", "peak_layer", "span", "span_50", "entropy", "drift_mean",
                                                 "density", "live"} <= set(prof.columns)
    r = prof[[f"r_{l}" for l in layers]].to_numpy()
    norms = micro_ctx.crosscoder().decoder_norms().numpy()  # r is each feature's norm profile over its peak
    np.testing.assert_allclose(r, norms / norms.max(1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert (prof.span >= prof.span_50).all() and prof.span.between(1, L).all() and prof.peak_layer.isin(layers).all()
    chains = pd.read_csv(results / "sae_chains.csv")
    assert list(chains.columns) == xl.CHAIN_COLUMNS and chains.length.between(1, L).all()
    summ = pd.read_csv(results / "summary.csv")
    live = summ[(summ.metric == "n_live_latents") & np.isclose(summ.tau, cfg.tau)].value.iloc[0]
    assert chains.length.sum() == live  # each live latent in exactly one chain
    assert (chains.end_layer - chains.start_layer + 1 == chains.length).all()
    assert (chains[chains.length > 1].min_cos > cfg.tau).all()
    per_cc = pd.read_csv(results / "sae_per_cc.csv")
    assert list(per_cc.columns) == xl.PER_CC_COLUMNS and len(per_cc) == prof.live.sum()
    assert (per_cc.n_sae_latents >= per_cc.n_matched_layers).all() and (per_cc.n_matched_layers <= per_cc.span).all()
    assert (per_cc.n_chains <= per_cc.n_matched_layers).all()
    syn = pd.read_csv(results / "synthetic.csv")
    assert set(syn.approach) == {xl.CC, xl.SAE} and set(syn.regime) == set(cfg.syn_regimes)
    assert (syn.groupby(["regime", "approach"]).seed.nunique() == cfg.syn_seeds).all()
    assert syn.mean_max_cos.between(-1, 1 + 1e-6).all() and syn[syn.approach == xl.SAE].recovered_span.eq(1).all()
    syn_summary = pd.read_csv(results / "synthetic_summary.csv")
    diff = syn_summary[(syn_summary.approach == sr.DIFF) & (syn_summary.metric == "mmcs")]
    assert set(diff.regime) == set(cfg.syn_regimes) and diff.verdict.isin([xl.CC, xl.SAE, "tie"]).all()
    for part in ("chains", "chains_seed1"):
        chained = summ[(summ.part == part) & (summ.metric == "frac_latents_chained")].sort_values("tau").value
        assert len(chained) == len(cfg.taus) and chained.is_monotonic_decreasing  # stricter links never chain more
    seed = pd.read_csv(results / "seed_baseline.csv")
    assert list(seed.columns) == xl.SEED_COLUMNS and set(seed.matching) == set(xl.SEED_MATCHINGS)
    assert ((seed.lo <= seed["mean"] + 1e-9) & (seed["mean"] <= seed.hi + 1e-9)).all()
    for _, part in seed[seed.statistic != "best_cos"].groupby(["matching", "statistic"]):
        assert part.sort_values("tau")["mean"].is_monotonic_decreasing  # a stricter threshold never matches more
    causal = pd.read_csv(results / "causal.csv", keep_default_na=False)
    from studies import superposition_causal as sc
    assert list(causal.columns) == sc.COLUMNS and 1 <= causal.feature.nunique() <= cfg.causal_features
    assert (causal.groupby("feature").size() == len(sc.COMPARISONS) * len(cfg.causal_at)).all()
    assert (causal.kl > -1e-6).all() and (causal.chain_layers >= 2).all()
    assert (causal.n_windows <= cfg.causal_windows).all()
    assert per_cc.set_index("feature").loc[causal.feature.unique()].n_matched_layers.ge(2).all()
    tables = micro_ctx.paper / "tables"
    for name in (f"{xl.NAME}.tex", f"{xl.NAME}_synthetic.tex", f"{xl.NAME}_answer.tex", f"{xl.NAME}_figures.tex"):
        assert (tables / name).stat().st_size > 0
    assert "nan" not in (tables / f"{xl.NAME}_answer.tex").read_text().lower()
    nulls = pd.read_csv(results / "profile_nulls.csv")
    assert set(nulls.kind) == {"random direction", "principal direction", "initialisation"}
    assert (nulls[nulls.kind == "random direction"].groupby("source_layer").size() == cfg.null_random).all()
    init = nulls[nulls.kind == "initialisation"]
    assert (init.span == L).all() and np.allclose(init.entropy, 1.0)  # every feature starts flat over the layers
    assert "persistence alone" in (tables / f"{xl.NAME}_answer.tex").read_text()
    assert "Causal check" in (tables / f"{xl.NAME}_answer.tex").read_text()
    assert (micro_ctx.paper / "figures" / f"{xl.NAME}_causal.png").is_file()
    assert (micro_ctx.paper / "figures" / f"{xl.NAME}_profiles_vs_null.png").is_file()
    over = pd.read_csv(results / "profiles_over_training.csv")  # the main crosscoder's snapshots (micro: no ReLU one)
    assert list(over.columns) == xl.TRAINING_COLUMNS and set(over.dictionary) == {"crosscoder"}
    assert over.step.iloc[0] == 0 and over.step.is_monotonic_increasing and over.step.is_unique
    assert (over.n_live == prof.live.sum()).all() and over.mean_entropy.iloc[0] == pytest.approx(1.0, abs=1e-3)
    assert over.mean_span.iloc[-1] == pytest.approx(prof[prof.live].span.mean())  # the last snapshot is the dictionary
    assert (micro_ctx.paper / "figures" / f"{xl.NAME}_profiles_over_training.png").is_file()
    assert "Over training" in (tables / f"{xl.NAME}_answer.tex").read_text()


def test_persistence_null_ground_truth():
    """Independent layers: a direction at layer p explains nothing elsewhere (span 1, peak p); identical layers: the
    least-squares decoder is the same at every layer (span L, entropy 1); a layer that copies p at half scale has r
    = 0.5 there."""
    torch.manual_seed(0)
    n, d, layers = 20_000, 8, [2, 5, 9]
    kw = dict(n_random=32, n_pcs=4, span_tau=0.1)
    indep = xl.persistence_profiles(torch.randn(n, 3, d), layers, **kw)
    assert (indep.span == 1).all() and (indep.peak_layer == indep.source_layer).all()
    base = torch.randn(n, 1, d)
    same = xl.persistence_profiles(base.expand(n, 3, d).clone(), layers, **kw)
    assert (same.span == 3).all() and np.allclose(same.entropy, 1.0, atol=1e-4)
    half = xl.persistence_profiles(torch.cat([base, 0.5 * base, torch.randn(n, 1, d)], 1), layers, **kw)
    from_first = half[half.source_layer == 2]
    np.testing.assert_allclose(from_first.r_5, 0.5, atol=1e-4)
    assert (from_first.r_9 < 0.1).all()


def _planted_snapshots(L=4, F=40, S=3):
    """Live features (the first 30) go from flat to one layer over S snapshots; dead ones stay flat."""
    from crosslayer.training import ProfileSnapshots

    norms = np.full((S, F, L), 0.08, np.float32)
    for s in range(1, S):
        norms[s, :30] = 0.08 * (1 - s / (S - 1))  # shrinking to 0 everywhere but the peak layer...
        norms[s, np.arange(30), np.arange(30) % L] = 1.0  # ...which grows
    steps = np.arange(S) * 50
    return ProfileSnapshots(steps, steps * 64, list(range(2, 2 + L)), norms.astype(np.float16))


def test_profiles_over_training_planted():
    L, F = 4, 40
    snaps, live = _planted_snapshots(L, F), np.arange(F) < 30
    table = xl.profiles_over_training(snaps, live, dictionary="crosscoder", span_tau=0.1, n_boot=200)
    assert list(table.columns) == xl.TRAINING_COLUMNS and table.step.tolist() == [0, 50, 100]
    assert (table.n_live == 30).all() and table.tokens.tolist() == [0, 3200, 6400]
    first, last = table.iloc[0], table.iloc[-1]
    assert first.mean_span == L and first.mean_entropy == pytest.approx(1.0, abs=1e-4) and first.frac_span_all == 1
    # the dead features, flat to the end, are left out
    assert last.mean_span == 1 and last.frac_span_1 == 1 and last.mean_entropy == pytest.approx(0, abs=1e-6)
    for metric in ("mean_span", "mean_entropy", "frac_span_1", "frac_span_all"):
        lo, mean, hi = table[f"{metric}_lo"], table[metric], table[f"{metric}_hi"]
        assert (lo <= mean + 1e-12).all() and (mean <= hi + 1e-12).all()
    everyone = xl.profiles_over_training(snaps, np.ones(F, bool), dictionary="crosscoder", span_tau=0.1, n_boot=200)
    assert everyone.mean_span.iloc[-1] == pytest.approx((30 + 10 * L) / F)


def test_profiles_over_training_figure_and_answer_from_csvs(tmp_path):
    """With the snapshot table and the nulls: its figure, and an answer sentence that reads the verdicts off the CSVs
    (a profile that ends on one layer is away from the flat start and below both persistence nulls)."""
    results = tmp_path / "results"
    results.mkdir()
    _fixture_results(results)
    L = 4
    table = xl.profiles_over_training(_planted_snapshots(L), np.arange(40) < 30, dictionary="crosscoder",
                                      span_tau=0.1, n_boot=200)
    table.to_csv(results / "profiles_over_training.csv", index=False)
    nulls = pd.DataFrame([{"kind": kind, "source_layer": 2, "direction": i, "peak_layer": 2, "span": span,
                           "span_50": span, "entropy": ent + 0.01 * i, **{f"r_{l}": 1.0 for l in range(2, 2 + L)}}
                          for kind, span, ent in (("random direction", 3, 0.8), ("principal direction", 4, 0.9),
                                                  ("initialisation", L, 1.0)) for i in range(5)])
    nulls.to_csv(results / "profile_nulls.csv", index=False)
    summ = pd.read_csv(results / "summary.csv")
    extra = [("null", f"{kind}|mean_{col}{s}", np.nan, v + d) for kind, v in (("random direction", 0.8),
                                                                         ("principal direction", 0.9),
                                                                         ("initialisation", 1.0), ("crosscoder", 0.5))
             for col in ("span", "span_50", "entropy") for s, d in (("", 0), ("_lo", -0.02), ("_hi", 0.02))]
    pd.concat([summ, pd.DataFrame(extra, columns=summ.columns)]).to_csv(results / "summary.csv", index=False)
    out = render(xl.NAME, results, tmp_path / "paper")
    assert f"{xl.NAME}_profiles_over_training.png" in [p.split("/")[-1] for p in out["figures"]]
    assert (tmp_path / "paper" / "figures" / f"{xl.NAME}_profiles_over_training.png").stat().st_size > 0
    text = (tmp_path / "paper" / "tables" / f"{xl.NAME}_answer.tex").read_text()
    assert "nan" not in text.lower() and "3 snapshots" in text and "30 live features of the crosscoder" in text
    assert "away from the flat initial profile" in text and "not measurably" not in text
    assert "below the interval of random directions" in text and "below the interval of principal directions" in text
