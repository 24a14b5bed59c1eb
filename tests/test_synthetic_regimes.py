"""The synthetic regimes of the cross-layer superposition study (studies.synthetic_regimes): each regime generates
what it claims, the per-feature metrics on planted answers, intervals over seeds and verdicts, and the figure, table
and answer rendered from CSVs."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from crosslayer.errors import CrosslayerError
from studies import synthetic_regimes as sr

L, D, N = 4, 16, 20_000


def _layer_projections(acts_NLD, truth, fires_NG, g):
    """``[n_fired, span]`` projections of the rows where feature g fires on its direction at each of its layers."""
    layers = torch.nonzero(truth.profiles_GL[g] > 0).flatten()
    return torch.einsum("nld,ld->nl", acts_NLD[fires_NG[:, g]][:, layers], truth.directions_GLD[g, layers])


def _median_adjacent_corr(name):
    acts, truth, fires = sr.regime_data(name, L, D, N, seed=0)
    multi = torch.nonzero((truth.span_len_G > 1) & (fires.sum(0) >= 200)).flatten()
    corr = [torch.corrcoef(_layer_projections(acts, truth, fires, g)[:, :2].T)[0, 1] for g in multi.tolist()]
    return float(torch.stack(corr).median())


def test_heavy_regime_has_at_least_8x_features_per_dimension_per_layer():
    _, truth, _ = sr.regime_data("heavy", L, D, 100, seed=0)
    easy = sr.regime_data("easy", L, D, 100, seed=0)[1]
    per_layer = (truth.profiles_GL > 0).sum(0).float()
    assert per_layer.min() >= 8 * D and (easy.profiles_GL > 0).sum(0).float().mean() <= 2 * D


def test_independent_regime_decorrelates_a_features_layers():
    """Projections of a firing multi-layer feature on its directions at two adjacent layers: strongly correlated
    when its layers move together (easy), much less when each layer's magnitude is drawn apart (independent)."""
    easy, independent = _median_adjacent_corr("easy"), _median_adjacent_corr("independent")
    assert easy > 0.6 and independent < 0.35 and easy - independent > 0.3


def test_weak_features_are_below_single_layer_detection_but_found_across_layers():
    """d' (shift of the projection when the feature fires, over its spread when it does not): a weak feature sits
    below 1 at every single layer, while the sum of its projections over all layers separates better (above 1
    typically; not the full sqrt(L) gain, as drifting multi-layer features make the interference correlated)."""
    acts, truth, fires = sr.regime_data("weak", L, D, N, seed=0)
    weak = torch.nonzero(truth.weak_G & (fires.sum(0) >= 200)).flatten()
    assert len(weak) >= 3 and (truth.span_len_G[truth.weak_G] == L).all()
    proj_NGL = torch.einsum("nld,gld->ngl", acts, truth.directions_GLD[weak])
    on_NG = fires[:, weak]

    def dprime(x_NG):
        on = torch.where(on_NG, x_NG, torch.nan)
        off = torch.where(~on_NG, x_NG, torch.nan)
        spread = ((off - off.nanmean(0)) ** 2).nanmean(0).sqrt()
        return (on.nanmean(0) - off.nanmean(0)) / spread

    per_layer = torch.stack([dprime(proj_NGL[..., l]) for l in range(L)], 1)
    across = dprime(proj_NGL.sum(-1))
    assert (per_layer < 1).all() and across.median() > 1 and (across > 1.3 * per_layer.mean(1)).all()


def test_hierarchical_regime_has_parents_with_children():
    _, truth, fires = sr.regime_data("hierarchical", L, D, 5_000, seed=0)
    children = truth.parent_G >= 0
    G = truth.profiles_GL.shape[0]
    assert children.sum() == 3 * (G // 8) and len(truth.parent_G[children].unique()) == G // 8
    assert not (fires[:, children] & ~fires[:, truth.parent_G[children]]).any()
    with pytest.raises(CrosslayerError, match="regime"):
        sr.regime_data("hard", L, D, 10, seed=0)
    from studies.cross_layer_superposition import Config
    with pytest.raises(CrosslayerError, match="hard"):
        Config(syn_regimes=("easy", "hard"))


def test_false_merges_on_a_planted_table():
    """Features 0 and 1 share latent 5 above tau (both merged); feature 2 shares it below tau; 3 has its own."""
    table = pd.DataFrame({"latent_l0": [5, 7, 5, 9], "latent_l1": [-1, 5, -1, 9],
                          "max_cos_l0": [0.9, 0.8, 0.3, 0.95], "max_cos_l1": [np.nan, 0.7, np.nan, 0.9]})
    assert sr.false_merges(table, 0.5).tolist() == [True, True, False, False]
    assert not sr.false_merges(table, 0.85).any()


def test_absorption_on_planted_firing():
    """Parent 0 with children 1 and 2. The parent's latent 0 stops firing whenever child 1 fires (absorption 1)
    and keeps firing with child 2 (absorption 0); feature 3 is no child (NaN), and an unrecovered or
    undetected parent gives NaN."""
    gen = torch.Generator().manual_seed(0)
    parent = torch.rand(4000, generator=gen) < 0.5
    c1 = parent & (torch.rand(4000, generator=gen) < 0.3)
    c2 = parent & ~c1 & (torch.rand(4000, generator=gen) < 0.3)
    fires = torch.stack([parent, c1, c2, torch.rand(4000, generator=gen) < 0.2], 1)
    f = fires.float() * torch.tensor([1.0, 1, 1, 1])
    f[:, 0] = (parent & ~c1).float()
    truth = SimpleNamespace(parent_G=torch.tensor([-1, 0, 0, -1]))
    out = sr.absorption(f, fires, truth, np.array([0, 1, 2, 3]))
    assert out[1] == pytest.approx(1.0) and out[2] == pytest.approx(0.0) and np.isnan(out[[0, 3]]).all()
    assert np.isnan(sr.absorption(f, fires, truth, np.array([-1, 1, 2, 3]))).all()
    f[:, 0] = 0.0  # a parent latent that never fires on the parent alone measures nothing
    assert np.isnan(sr.absorption(f, fires, truth, np.array([0, 1, 2, 3]))).all()


def test_feature_table_of_the_truth_itself():
    """The truth as a crosscoder (one latent per feature) and a perfect encoder: MMCS 1, one latent each, no false
    merge, no absorption, and its recovered span is the true span."""
    _, truth, fires = sr.regime_data("hierarchical", L, D, 3_000, seed=1)
    cfg = SimpleNamespace(span_tau=0.1, tau=0.5, often=0.02)
    W = truth.directions_GLD * truth.profiles_GL[..., None]
    table = sr.feature_table(W, fires.float(), fires, truth, cfg)
    assert np.allclose(table.mean_max_cos, 1, atol=1e-5) and (table.n_latents == 1).all()
    assert not table.false_merge.any() and (table.recovered_span == (truth.profiles_GL > 0.1).sum(1).numpy()).all()
    assert np.allclose(table.absorption[table.parent >= 0], 0) and table.absorption[table.parent < 0].isna().all()
    metrics = sr.run_metrics(table)
    assert metrics["mmcs"] == pytest.approx(1, abs=1e-5) and metrics["latents_per_multi"] == 1
    assert np.isnan(metrics["mmcs_weak"]) and metrics["false_merge"] == 0


def test_seed_interval_and_verdicts():
    mean, lo, hi = sr.seed_interval(np.array([1.0, 2.0, 3.0, np.nan]))
    assert mean == 2 and hi - mean == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5) and mean - lo == hi - mean
    assert np.isnan(sr.seed_interval(np.array([1.0]))[1]) and np.isnan(sr.seed_interval(np.array([]))[0])
    assert sr.verdict("mmcs", 0.1, 0.2) == sr.CC and sr.verdict("fvu", 0.1, 0.2) == sr.SAE
    assert sr.verdict("mmcs", -0.1, 0.2) == "tie" and sr.verdict("latents_per_multi", 1, 2) == ""


def _planted_runs():
    """Three seeds, two regimes: the crosscoder is better on MMCS in ``easy``, worse in ``weak``; FVU ties."""
    rows = []
    for regime, gap in (("easy", 0.05), ("weak", -0.2)):
        for seed in range(3):
            for approach, shift in ((sr.CC, gap), (sr.SAE, 0.0)):
                rows += [{"regime": regime, "approach": approach, "seed": seed, "metric": "mmcs",
                          "value": 0.9 + shift + 0.01 * seed},
                         {"regime": regime, "approach": approach, "seed": seed, "metric": "fvu",
                          "value": 0.1 + 0.05 * ((seed + (approach == sr.CC)) % 3)},
                         {"regime": regime, "approach": approach, "seed": seed, "metric": "mmcs_null", "value": 0.3},
                         {"regime": regime, "approach": approach, "seed": seed, "metric": "mmcs_weak",
                          "value": np.nan if regime == "easy" else 0.5 + shift}]
    return pd.DataFrame(rows)


def test_summary_figure_table_answer_from_csvs(tmp_path):
    features = pd.DataFrame([dict.fromkeys(sr.FEATURE_COLUMNS, 0)])
    summary = sr.write_results(features, _planted_runs(), tmp_path)
    diff = summary[summary.approach == sr.DIFF].set_index(["regime", "metric"])
    assert diff.loc[("easy", "mmcs"), "verdict"] == sr.CC and diff.loc[("weak", "mmcs"), "verdict"] == sr.SAE
    assert diff.loc[("easy", "fvu"), "verdict"] == "tie" and diff.loc[("easy", "mmcs"), "mean"] == pytest.approx(0.05)
    assert (summary.n_seeds[summary.metric != "mmcs_weak"] == 3).all()
    assert sr.verdicts(summary, "mmcs") == {"easy": sr.CC, "weak": sr.SAE}
    path, caption = sr.figure(tmp_path, tmp_path / "fig.png")
    assert path.stat().st_size > 0 and "3 seeds" in caption
    tex = sr.table(tmp_path, tmp_path / "t.tex", "tab:x").read_text()
    assert "easy" in tex and "MMCS (weak)" in tex and "nan" not in tex.lower()
    text = sr.answer_text(tmp_path, 0.9)
    assert "nan" not in text.lower() and "crosscoder is better" in text and "SAEs are better" in text
    assert "fails" in text and "\\emph{weak}" in text and "3 seeds" in text


@pytest.mark.slow
def test_easy_regime_crosscoder_one_latent_per_multilayer_feature(tmp_path):
    """Trained at demo-like size on the easy regime: both approaches recover the features; the crosscoder with
    one latent per frequent multi-layer feature, the SAEs with one per layer; a rerun loads the same results."""
    cfg = SimpleNamespace(synthetic_tokens=12_000, syn_layers=4, syn_d=16, syn_k=4, syn_width=2, syn_batch=256,
                          syn_lr=3e-3, syn_steps=400, syn_heldout=2048, syn_seeds=1, syn_regimes=("easy",),
                          span_tau=0.1, tau=0.5, often=0.02)
    features, runs = sr.synthetic_recovery(cfg, tmp_path)
    cc, sae = features[features.approach == sr.CC], features[features.approach == sr.SAE]
    target = cc.often & cc.multi
    assert target.sum() >= 3 and cc.mean_max_cos.mean() > 0.9 and sae.mean_max_cos.mean() > 0.9
    assert (cc[target].n_latents == 1).mean() >= 0.8 and (sae[target.to_numpy()].n_latents
                                                          == sae[target.to_numpy()].span).all()
    assert (sae.recovered_span == 1).all()
    null = runs[runs.metric == "mmcs_null"].value
    assert (null < 0.8).all()
    again = sr.synthetic_recovery(cfg, tmp_path)
    pd.testing.assert_frame_equal(features, again[0])
