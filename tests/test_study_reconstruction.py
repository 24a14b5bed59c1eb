"""The reconstruction study: its equal-FVU interpolation (pairs primary), the downstream rows it keeps, the
micro run, and its figures and answer from CSVs."""

import numpy as np
import pandas as pd
import pytest

from studies import reconstruction
from studies.pipeline import render, run_study
from studies.reconstruction import CC, CCP, SAE, WC, downstream_rows, equal_fvu_ratios, seed_rows, seed_text


def _sweep(sae_pts, cc_pts):
    """Sweep rows; a crosscoder feature writes 4 layers, so its pairs are 4x its features."""
    rows = [{"approach": SAE, "dictionary": f"s{k}", "k": k, "n_features": 128, "l0_frac": 0.1, "l0_tuple": l0,
             "l0_feat": l0, "fvu": fvu, "dead_frac": 0.0} for k, (l0, fvu) in enumerate(sae_pts)]
    rows += [{"approach": CC, "dictionary": f"c{k}", "k": k, "n_features": 128, "l0_frac": 0.1, "l0_tuple": l0,
              "l0_feat": l0 / 4, "fvu": fvu, "dead_frac": 0.0} for k, (l0, fvu) in enumerate(cc_pts)]
    return pd.DataFrame(rows)


def test_equal_fvu_ratio_recovers_a_known_factor():
    # FVU = 1 - 0.2 log(L0): the crosscoder reaches the same FVU with exactly 1.5x fewer (feature, layer) pairs
    sae_l0 = np.array([48.0, 96.0, 192.0, 384.0])
    fvu = 1 - 0.2 * np.log(sae_l0 / 10)
    head = equal_fvu_ratios(_sweep(zip(sae_l0, fvu), zip(sae_l0 / 1.5, fvu)))
    assert head.interpolated.all() and len(head) > 1
    np.testing.assert_allclose(head.l0_ratio, 1.5, rtol=1e-9)
    np.testing.assert_allclose(head.feat_ratio, 6.0, rtol=1e-9)  # each feature counted once: 4 layers per feature


def test_equal_fvu_ratio_without_overlap_is_flagged():
    head = equal_fvu_ratios(_sweep([(100, 0.5), (200, 0.4)], [(10, 0.3), (20, 0.2)]))
    assert len(head) == 1 and not head.interpolated.iloc[0]
    assert head.l0_ratio.iloc[0] == pytest.approx(200 / 10)


def _eval_table(splice_all: str, prefix: bool) -> pd.DataFrame:
    rows = []
    for layer in (None, 3, 4):
        row = {"scope": "all" if layer is None else "layer", "layer": layer,
               "splice": splice_all if layer is None else "layer", "n_predictions": 100, "n_docs": 7,
               "ce_clean": 2.0, "ce_mean": 5.0, "ce_zero": 9.0, "ce_spliced": 3.0}
        for c in ("ce_recovered", "ce_recovered_zero", "kl"):
            row.update({c: 0.5, f"{c}_lo": 0.4, f"{c}_hi": 0.6})
        for c in ("ce_spliced", "ce_recovered", "kl"):
            value = 0.3 if prefix and layer is not None else np.nan
            row.update({f"prefix_{c}": value, f"prefix_{c}_lo": value - 0.1, f"prefix_{c}_hi": value + 0.1})
        rows.append(row)
    return pd.DataFrame(rows).astype({"layer": "Int64"})


def test_downstream_rows_keep_only_splices_with_a_meaning():
    cc = downstream_rows(CC, _eval_table("none", prefix=True))  # acausal: no multi-layer row, prefix rows
    assert list(cc.splice) == ["layer", "layer", "layer (causal prefix)", "layer (causal prefix)"]
    prefix = cc[cc.splice == "layer (causal prefix)"]
    assert (prefix.ce_recovered == 0.3).all() and np.allclose(prefix.ce_recovered_lo, 0.2)
    sae = downstream_rows(SAE, _eval_table("sequential", prefix=False))
    assert list(sae.splice) == ["layer", "layer", "sequential"] and pd.isna(sae.layer.iloc[-1])
    wc = downstream_rows(WC, _eval_table("causal", prefix=False))
    assert list(wc.splice)[-1] == "causal" and (wc.dictionary == "crosscoder_wc").all()


@pytest.mark.slow
def test_reconstruction_study_micro(micro_ctx):
    info = run_study("reconstruction", micro_ctx)
    results = micro_ctx.results("reconstruction")
    sweep = pd.read_csv(results / "sweep.csv")
    p, cfg = micro_ctx.sizes, micro_ctx.preset.config("reconstruction")
    assert set(sweep.approach) == {SAE, CC, WC, CCP}  # micro has no ReLU crosscoder (relu_crosscoder False)
    assert sorted(sweep[sweep.approach == SAE].k) == sorted(set(cfg.sae_k) | {p.sae_k})
    sae, cc = sweep[sweep.approach == SAE], sweep[sweep.approach == CC]
    # an SAE latent writes one layer: pairs = features = k per layer's SAE, summed over layers
    np.testing.assert_allclose(sae.l0_tuple, sae.k * micro_ctx.n_layers, rtol=1e-2)
    np.testing.assert_allclose(sae.l0_feat, sae.l0_tuple)
    np.testing.assert_allclose(cc.l0_feat, cc.k, rtol=1e-2)
    assert (cc.l0_tuple >= cc.l0_feat - 1e-6).all() and (cc.l0_tuple <= cc.l0_feat * micro_ctx.n_layers + 1e-6).all()
    matched = sweep[sweep.approach != CCP]
    assert (matched.n_features == p.sae_width * micro_ctx.n_layers).all()  # matched total dictionary size
    # the parameter-matched control: as many parameters as the SAE set (F 2 L d = L W 2 d)
    assert (sweep[sweep.approach == CCP].n_features == p.sae_width).all()
    assert "Control: the crosscoder with as many parameters" in (micro_ctx.paper / "tables" /
                                                                "reconstruction_answer.tex").read_text()
    for part in (sae, cc):  # more active latents never reconstruct worse by much, within one approach
        part = part.sort_values("k")
        assert part.fvu.iloc[-1] <= part.fvu.iloc[0] + 0.02
    head = pd.read_csv(results / "headline.csv")
    np.testing.assert_allclose(head.l0_ratio, head.l0_sae / head.l0_cc)
    down = pd.read_csv(results / "downstream.csv")
    layers = micro_ctx.store("heldout").layers
    for approach, splices in ((SAE, {"layer", "sequential"}), (CC, {"layer", "layer (causal prefix)"}),
                              (WC, {"layer", "causal"})):
        part = down[down.approach == approach]
        assert set(part.splice) == splices, approach
        assert sorted(part[part.splice == "layer"].layer) == layers
        assert (part.ce_recovered_lo <= part.ce_recovered + 1e-9).all()
        assert (part.ce_recovered <= part.ce_recovered_hi + 1e-9).all()
    answer = (micro_ctx.paper / "tables" / "reconstruction_answer.tex").read_text()
    assert f"{head.l0_ratio.median():.2g}" in answer  # the answer quotes the median ratio from the CSV
    for name in ("reconstruction.tex", "reconstruction_headline.tex", "reconstruction_downstream.tex",
                 "reconstruction_figures.tex", "reconstruction_clt_vs_plt.tex"):
        assert (micro_ctx.paper / "tables" / name).stat().st_size > 0
    assert info["points"] == len(sweep)
    seeds = pd.read_csv(results / "seeds.csv")  # every seed of the main SAEs and acausal crosscoder (micro: one)
    assert set(zip(seeds.approach, seeds.seed)) == {(a, s) for a in (SAE, CC) for s in range(p.seeds)}
    assert len(seeds) == 2 * p.seeds * (len(layers) + 1)
    # CLT vs PLT: the attribution study's comparison, trained once and shared (its own CSV is the same table)
    transcoders = pd.read_csv(results / "clt_vs_plt.csv")
    acfg = micro_ctx.preset.config("attribution")
    assert sorted(zip(transcoders.approach, transcoders.k)) == sorted((a, k) for a in ("CLT", "PLT") for k in acfg.ks)
    pd.testing.assert_frame_equal(transcoders, pd.read_csv(micro_ctx.results("attribution") / "compare.csv"))
    assert (micro_ctx.paper / "figures" / "reconstruction_clt_vs_plt.png").is_file()
    k = max(acfg.ks)
    clt = transcoders[(transcoders.approach == "CLT") & (transcoders.k == k)].iloc[0]
    assert f"the CLT recovers {clt.ce_recovered:.3g}" in answer


def test_reconstruction_figures_tables_answer_from_fixture_csvs(tmp_path):
    sweep = _sweep([(64, 0.5), (128, 0.4), (256, 0.3)], [(8, 0.45), (16, 0.35), (32, 0.3)])
    results = tmp_path / "results"
    results.mkdir()
    sweep.to_csv(results / "sweep.csv", index=False)
    pd.DataFrame({"approach": [SAE, SAE, CC, CC], "dictionary": ["saes", "saes", "crosscoder", "crosscoder"],
                  "k": 2, "layer": [0, 1, 0, 1], "fvu": [0.3, 0.4, 0.3, 0.35], "prefix_fvu": np.nan,
                  "l0": 2}).to_csv(results / "per_layer.csv", index=False)
    equal_fvu_ratios(sweep).to_csv(results / "headline.csv", index=False)
    down = pd.concat([downstream_rows(SAE, _eval_table("sequential", False)),
                      downstream_rows(CC, _eval_table("none", True))], ignore_index=True)
    down.loc[(down.approach == CC) & (down.splice == "layer"), ["ce_recovered", "ce_recovered_lo",
                                                                  "ce_recovered_hi"]] = [0.8, 0.7, 0.9]
    down.to_csv(results / "downstream.csv", index=False)
    out = render("reconstruction", results, tmp_path / "paper")
    assert len(out["figures"]) == 3 and all((tmp_path / "paper" / "figures" / p.split("/")[-1]).stat().st_size > 1000
                                             for p in out["figures"])
    assert reconstruction.NAME in (tmp_path / "paper" / "tables" / "reconstruction_figures.tex").read_text()
    text = (tmp_path / "paper" / "tables" / "reconstruction_answer.tex").read_text()
    # SAEs 0.5 [0.4, 0.6] vs crosscoder 0.8 [0.7, 0.9] at both layers: intervals separate, crosscoder higher
    assert "separate in 2 of 2 layers (2 with the crosscoder higher, 0 with the SAEs higher)" in text
    assert "falls by 0.5 to 0.5" in text  # prefix 0.3 vs plain 0.8


def _seed_eval(fvu: float, ce: list[float]) -> pd.DataFrame:
    rows = [{"scope": "all", "layer": np.nan, "splice": "none", "fvu": fvu, "ce_recovered": np.nan,
             "ce_recovered_lo": np.nan, "ce_recovered_hi": np.nan}]
    rows += [{"scope": "layer", "layer": i, "splice": "layer", "fvu": fvu, "ce_recovered": c,
              "ce_recovered_lo": c - 0.01, "ce_recovered_hi": c + 0.01} for i, c in enumerate(ce)]
    return pd.DataFrame(rows)


def test_seed_text_weighs_the_approach_gap_against_the_seed_spread():
    """The seed control: the gap between approaches counts only when every pairing of seeds exceeds the largest
    seed-to-seed difference (known tables: a clear gap, then seeds as far apart as the approaches)."""
    clear = seed_rows({(SAE, 0): _seed_eval(0.19, [0.95, 0.93]), (SAE, 1): _seed_eval(0.191, [0.95, 0.94]),
                       (CC, 0): _seed_eval(0.21, [0.90, 0.92]), (CC, 1): _seed_eval(0.209, [0.91, 0.91])})
    text = seed_text(clear)
    assert text.count("is larger than") == 2 and "not larger" not in text
    assert "per-layer SAEs: 0.19, 0.191" in text  # the FVU of each seed, from the tables
    noisy = seed_rows({(SAE, 0): _seed_eval(0.19, [0.95]), (SAE, 1): _seed_eval(0.23, [0.90]),
                       (CC, 0): _seed_eval(0.21, [0.92]), (CC, 1): _seed_eval(0.21, [0.92])})
    assert seed_text(noisy).count("not larger than") == 2
    one_seed = seed_rows({(SAE, 0): _seed_eval(0.19, [0.95]), (CC, 0): _seed_eval(0.21, [0.92])})
    assert seed_text(one_seed) == "" and seed_text(None) == ""
    sae_only = seed_rows({(SAE, 0): _seed_eval(0.19, [0.95]), (SAE, 1): _seed_eval(0.2, [0.94])})
    assert seed_text(sae_only) == ""  # no crosscoder seeds: nothing to weigh
