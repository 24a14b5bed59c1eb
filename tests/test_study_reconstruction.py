"""The reconstruction study at the micro preset, its equal-FVU interpolation, and its figures."""

import numpy as np
import pandas as pd
import pytest

from studies import reconstruction
from studies.pipeline import render, run_study
from studies.reconstruction import CC, SAE, equal_fvu_ratios


def _sweep(sae_pts, cc_pts):
    rows = [{"approach": SAE, "dictionary": f"s{k}", "k": k, "n_features": 128, "l0_total": l0, "l0_tuple": l0,
             "fvu": fvu, "ce_recovered": 0.5, "kl": 0.1, "dead_frac": 0.0} for k, (l0, fvu) in enumerate(sae_pts)]
    rows += [{"approach": CC, "dictionary": f"c{k}", "k": k, "n_features": 128, "l0_total": l0, "l0_tuple": 4 * l0,
              "fvu": fvu, "ce_recovered": 0.6, "kl": 0.1, "dead_frac": 0.0} for k, (l0, fvu) in enumerate(cc_pts)]
    return pd.DataFrame(rows)


def test_equal_fvu_ratio_recovers_a_known_factor():
    # FVU = 1 - 0.2 log(L0): the crosscoder reaches the same FVU with exactly 6x fewer latents
    sae_l0 = np.array([48.0, 96.0, 192.0, 384.0])
    cc_l0 = sae_l0 / 6
    fvu = 1 - 0.2 * np.log(sae_l0 / 10)
    head = equal_fvu_ratios(_sweep(zip(sae_l0, fvu), zip(cc_l0, fvu)))
    assert head.interpolated.all() and len(head) > 1
    np.testing.assert_allclose(head.l0_ratio, 6.0, rtol=1e-9)
    np.testing.assert_allclose(head.tuple_ratio, 1.5, rtol=1e-9)  # 4 layers written per feature


def test_equal_fvu_ratio_without_overlap_is_flagged():
    head = equal_fvu_ratios(_sweep([(100, 0.5), (200, 0.4)], [(10, 0.3), (20, 0.2)]))
    assert len(head) == 1 and not head.interpolated.iloc[0]
    assert head.l0_ratio.iloc[0] == pytest.approx(200 / 10)


@pytest.mark.slow
def test_reconstruction_study_micro(micro_ctx):
    info = run_study("reconstruction", micro_ctx)
    results = micro_ctx.results("reconstruction")
    sweep = pd.read_csv(results / "sweep.csv")
    p, cfg = micro_ctx.sizes, micro_ctx.preset.config("reconstruction")
    assert set(sweep.approach) == {SAE, CC, "crosscoder (weakly causal)"}
    assert sorted(sweep[sweep.approach == SAE].k) == sorted(set(cfg.sae_k) | {p.sae_k})
    sae = sweep[sweep.approach == SAE]
    cc = sweep[sweep.approach == CC]
    # total L0: summed over the layers' SAEs (k per layer); a crosscoder feature counted once
    np.testing.assert_allclose(sae.l0_total, sae.k * micro_ctx.n_layers, rtol=1e-2)
    np.testing.assert_allclose(cc.l0_total, cc.k, rtol=1e-2)
    assert (cc.l0_tuple >= cc.l0_total - 1e-6).all() and (cc.l0_tuple <= cc.l0_total * micro_ctx.n_layers + 1e-6).all()
    assert (sweep.n_features == p.sae_width * micro_ctx.n_layers).all()  # matched total dictionary size
    assert sweep.fvu.between(0, 1.5).all() and sweep.ce_recovered.notna().all() and (sweep.kl >= 0).all()
    # more active latents never reconstruct worse by much, within one approach
    for part in (sae, cc):
        part = part.sort_values("k")
        assert part.fvu.iloc[-1] <= part.fvu.iloc[0] + 0.02
    head = pd.read_csv(results / "headline.csv")
    assert len(head) >= 1
    np.testing.assert_allclose(head.l0_ratio, head.l0_sae / head.l0_cc)
    if head.interpolated.iloc[0]:  # interpolated FVUs lie inside both sweeps' ranges
        for part in (sae, cc):
            assert head.fvu.between(part.fvu.min() - 1e-9, part.fvu.max() + 1e-9).all()
    tables = micro_ctx.paper / "tables"
    for name in ("reconstruction.tex", "reconstruction_headline.tex", "reconstruction_answer.tex",
                 "reconstruction_figures.tex"):
        assert (tables / name).stat().st_size > 0
    answer = (tables / "reconstruction_answer.tex").read_text()
    assert f"{head.l0_ratio.median():.2g}" in answer  # the answer quotes the median ratio from the CSV
    assert info["points"] == len(sweep)


def test_reconstruction_figures_from_fixture_csv(tmp_path):
    sweep = _sweep([(64, 0.5), (128, 0.4), (256, 0.3)], [(8, 0.45), (16, 0.35), (32, 0.3)])
    results = tmp_path / "results"
    results.mkdir()
    sweep.to_csv(results / "sweep.csv", index=False)
    pd.DataFrame({"approach": [SAE, SAE, CC, CC], "dictionary": ["saes", "saes", "crosscoder", "crosscoder"],
                  "k": 2, "layer": [0, 1, 0, 1], "fvu": [0.3, 0.4, 0.3, 0.35], "l0": 2}).to_csv(
        results / "per_layer.csv", index=False)
    equal_fvu_ratios(sweep).to_csv(results / "headline.csv", index=False)
    out = render("reconstruction", results, tmp_path / "paper")
    assert len(out["figures"]) == 2 and all((tmp_path / "paper" / "figures" / p.split("/")[-1]).stat().st_size > 1000
                                             for p in out["figures"])
    assert reconstruction.NAME in (tmp_path / "paper" / "tables" / "reconstruction_figures.tex").read_text()
