"""The feature-splitting study: planted families are found, its figures/tables render from CSVs, and it
runs end to end at the micro preset."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from studies import feature_splitting as fs
from studies.pipeline import render, run_study

CFG = fs.Config()


def _planted(n_children=(0, 1, 2, 3, 1, 2, 0, 4), D=256, noise=0.25, n_filler=20, N=3000, seed=0):
    """Small decoder [F, D] and big decoder built from its rows: parent i gets n_children[i] noisy copies
    (cosine ~0.97), plus random filler latents. Activations: each parent's firing rows are divided among
    its children, so the children's sum equals the parent exactly."""
    gen = torch.Generator().manual_seed(seed)
    F = len(n_children)
    small = torch.nn.functional.normalize(torch.randn(F, D, generator=gen), dim=-1)
    rows, owner = [], []
    for i, n in enumerate(n_children):
        for _ in range(n):
            rows.append(small[i] + noise * torch.randn(D, generator=gen) / D ** 0.5)
            owner.append(i)
    rows += list(torch.randn(n_filler, D, generator=gen))
    big = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    f_small = torch.rand(N, F, generator=gen) * (torch.rand(N, F, generator=gen) < 0.1)
    f_big = torch.zeros(N, big.shape[0])
    pick = torch.randint(0, 1000, (N,), generator=gen)
    for i, n in enumerate(n_children):
        kids = [j for j, o in enumerate(owner) if o == i]
        for c, j in enumerate(kids):
            f_big[:, j] = f_small[:, i] * (pick % n == c)
    f_big[:, len(owner):] = torch.rand(N, n_filler, generator=gen) * (torch.rand(N, n_filler, generator=gen) < 0.1)
    return small, big, f_small, f_big, torch.tensor(owner)


def test_planted_split_counts_fidelity_and_activation_correlation():
    planted = (0, 1, 2, 3, 1, 2, 0, 4)
    small, big, f_small, f_big, owner = _planted(planted)
    matches = fs.decoder_matches(small, big, min_cos=0.5, chunk=3)  # blocks smaller than F exercise the chunking
    fam = fs.families(matches, CFG.tau, f_small=f_small, f_big=f_big)
    assert fam["n_children"].tolist() == list(planted)
    assert torch.equal(fam["has_parent"][:len(owner)], torch.ones(len(owner), dtype=torch.bool))
    assert not fam["has_parent"][len(owner):].any()  # random fillers are nobody's child
    has = torch.tensor(planted) > 0
    assert (matches["fidelity"][has] > 0.9).all() and (matches["fidelity"][~has] < 0.5).all()
    assert (owner[matches["best"][has]] == torch.nonzero(has).squeeze(1)).all()
    corr = fam["act_corr"]
    assert torch.allclose(corr[has], torch.ones(int(has.sum())), atol=1e-5) and corr[~has].isnan().all()
    single = torch.tensor(planted) == 1  # one child: the best child carries the whole activation
    assert torch.allclose(fam["act_corr_best"][single], torch.ones(int(single.sum())), atol=1e-5)
    # a stricter threshold than the planted cosine finds nothing
    assert fs.families(matches, 0.999)["n_children"].sum() == 0


def test_analyse_pair_summary_and_table():
    planted = (0, 1, 2, 3)
    small, big, f_small, f_big, _ = _planted(planted)
    table, rows = fs.analyse_pair(fs.SAE, "layer 1", 4, big.shape[0], fs.ADJACENT, 1, small, big, f_small, f_big,
                                  CFG)
    assert list(table.columns) == fs.FAMILY_COLUMNS[:len(table.columns)] and len(table) == 4
    assert table.n_children.tolist() == list(planted)
    assert [len(c.split()) for c in table.children] == list(planted)
    assert [r["tau"] for r in rows] == list(CFG.taus)
    main = next(r for r in rows if r["tau"] == CFG.tau)
    assert main["frac_split"] == 0.5 and main["frac_kept"] == 0.25 and main["frac_unmatched"] == 0.25
    assert (main["n_split"], main["n_kept"], main["n_unmatched"], main["n_live"]) == (2, 1, 1, 4)
    assert main["n_new_big"] == 20 and main["n_live_big"] == big.shape[0]  # the random fillers are new
    assert main["frac_new_big"] == pytest.approx(20 / big.shape[0])
    assert main["mean_children_matched"] == pytest.approx(2.0)
    assert set(rows[0]) == set(fs.SUMMARY_COLUMNS)


def test_helpers():
    a = torch.randn(200, 3)
    b = a * torch.tensor([2.0, -1.0, 0.0]) + 1
    corr = fs.column_corr(a, b)
    assert corr[0] == pytest.approx(1.0, abs=1e-6) and corr[1] == pytest.approx(-1.0, abs=1e-6) and corr[2].isnan()
    x, y = torch.randn(200, 1), torch.randn(200, 1)  # agrees with numpy on arbitrary columns
    assert fs.column_corr(x, y)[0] == pytest.approx(float(np.corrcoef(x[:, 0], y[:, 0])[0, 1]), abs=1e-5)
    # crosscoder decoders: concatenated over layers, unit norm; a layer subset is that layer's slice
    from crosslayer.crosscoder import Crosscoder, CrosscoderConfig

    cc = Crosscoder(CrosscoderConfig(layers=(3, 4, 5), d_model=8, n_features=5, k=2))
    dirs = fs.unit_decoders(cc)
    assert dirs.shape == (5, 24)
    assert torch.allclose(dirs, torch.nn.functional.normalize(cc.W_dec.detach().reshape(5, 24), dim=-1))
    assert torch.allclose(fs.unit_decoders(cc, [4]), torch.nn.functional.normalize(cc.W_dec.detach()[:, 1], dim=-1))
    assert [p[:3] for p in fs._pairs([8, 16, 32])] == [(8, 16, fs.ADJACENT), (16, 32, fs.ADJACENT), (8, 32, fs.OVERALL),
                                                       (8, 8, fs.SEED), (16, 16, fs.SEED), (32, 32, fs.SEED)]


def test_intervals_and_exact_test_match_scipy_and_hand_values():
    from scipy.stats import binomtest

    k, n = np.array([0, 1, 9, 50, 17, 20]), np.array([20, 20, 1700, 100, 17, 0])
    lo, hi = fs.clopper_pearson(k, n)
    for i in range(len(k) - 1):  # parity with scipy's exact interval, the edges 0/n and n/n included
        ref = binomtest(int(k[i]), int(n[i])).proportion_ci(confidence_level=0.95, method="exact")
        assert (lo[i], hi[i]) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert lo[0] == 0 and hi[4] == 1 and np.isnan(lo[-1]) and np.isnan(hi[-1])
    assert hi[0] == pytest.approx(1 - 0.025 ** (1 / 20))  # 0 of n: upper bound 1 - (alpha/2)^(1/n)
    # hand: [[3, 0], [0, 3]] has two tables as extreme as itself out of C(6, 3) = 20 -> p = 2/20
    odds, p = fs.fisher_tests([3, 9, 1], [3, 1700, 0], [0, 6, 1], [3, 1800, 5])
    assert p[0] == pytest.approx(0.1) and np.isinf(odds[0])
    from scipy.stats import fisher_exact

    ref = fisher_exact([[9, 1691], [6, 1794]])
    assert (odds[1], p[1]) == pytest.approx((ref.statistic, ref.pvalue))
    assert np.isnan(p[2]) and np.isnan(odds[2])  # an empty total: no test


def _summary_row(approach, space, small, big, kind, tau, n_split, n_live, n_new, n_live_big):
    return {"approach": approach, "space": space, "width_small": small, "width_big": big,
            "pair": fs.pair_label(small, big, kind), "pair_kind": kind, "tau": tau, "n_split": n_split,
            "n_live": n_live, "n_new_big": n_new, "n_live_big": n_live_big}


def test_seed_tests_match_each_doubling_with_the_baseline_at_the_counted_width():
    rows = [_summary_row(fs.SAE, "layer 1", 8, 16, fs.ADJACENT, 0.7, 3, 8, 10, 16),
            _summary_row(fs.SAE, "layer 1", 16, 32, fs.ADJACENT, 0.7, 5, 16, 20, 30),
            _summary_row(fs.SAE, "layer 1", 8, 32, fs.OVERALL, 0.7, 4, 8, 25, 30),
            _summary_row(fs.SAE, "layer 1", 8, 8, fs.SEED, 0.7, 0, 8, 1, 7),
            _summary_row(fs.SAE, "layer 1", 16, 16, fs.SEED, 0.7, 1, 16, 2, 15),
            _summary_row(fs.SAE, "layer 1", 32, 32, fs.SEED, 0.7, 2, 30, 3, 29)]
    tests = fs.seed_tests(pd.DataFrame(rows))
    assert list(tests.columns) == fs.TEST_COLUMNS and len(tests) == 2 * 4  # 2 doublings, overall, pooled
    key = tests.set_index(["statistic", "pair"])
    # split: the parents' (narrower) width; new: the wider width
    assert tuple(key.loc[("split", "16->32"), ["k", "n", "k_seed", "n_seed"]]) == (5, 16, 1, 16)
    assert tuple(key.loc[("new", "16->32"), ["k", "n", "k_seed", "n_seed"]]) == (20, 30, 3, 29)
    assert tuple(key.loc[("new", "8->32"), ["k", "n", "k_seed", "n_seed"]]) == (25, 30, 3, 29)
    pooled = key.loc[("split", "doublings pooled")]  # the doublings only, not smallest -> largest
    assert (pooled.k, pooled.n, pooled.k_seed, pooled.n_seed, pooled.pair_kind) == (8, 24, 1, 24, fs.POOLED)
    from scipy.stats import fisher_exact

    assert pooled.p_fisher == pytest.approx(fisher_exact([[8, 16], [1, 23]]).pvalue)
    assert pooled.frac == pytest.approx(8 / 24) and pooled.ci_lo < 8 / 24 < pooled.ci_hi


def _fixture_results(folder):
    """families.csv / summary.csv / tests.csv from planted families of two approaches (doublings and seed
    baselines), and a hand-made example.csv."""
    tables, rows = [], []
    pairs = fs._pairs([8, 16, 32])
    for approach, space, seed in ((fs.SAE, "layer 1", 0), (fs.CC, "layer 1", 1), (fs.CC, fs.CONCAT, 1)):
        for i, (small, big, kind, step) in enumerate(pairs):
            planted = (1,) * 8 if kind == fs.SEED else (0, 1, 2, 3, 1, 2, 0, 4)  # the baseline: no splits
            f_small_, big_, f_s, f_b, _ = _planted(planted, seed=10 * seed + i, N=500)
            table, srows = fs.analyse_pair(approach, space, small, big, kind, step, f_small_, big_, f_s, f_b, CFG)
            rows += srows
            tables.append(table)
    pd.concat(tables).to_csv(folder / "families.csv", index=False)
    summary = pd.DataFrame(rows)
    summary.to_csv(folder / "summary.csv", index=False)
    fs.seed_tests(summary).to_csv(folder / "tests.csv", index=False)
    ex = [{"approach": a, "width_small": 8, "width_big": 16, "role": role, "feature": f, "cos_to_parent": c,
           "act_corr": 0.8, "density": 0.01, "top_tokens": json.dumps([" the", "\n", "$_{x}"]),
           "top_context": "a [[b]] c", "logits_up": json.dumps([" cat", "&"])}
          for a in (fs.SAE, fs.CC) for role, f, c in (("parent", 3, 1.0), ("child", 5, 0.9), ("child", 7, 0.8))]
    pd.DataFrame(ex, columns=fs.EXAMPLE_COLUMNS).to_csv(folder / "example.csv", index=False)


def _assert_answer_quotes_tests(text, tests, cfg):
    """The answer quotes each approach's pooled headline counts, intervals and Fisher p from tests.csv."""
    pooled = fs.headline(tests[(tests.tau == cfg.tau) & (tests.pair_kind == fs.POOLED)])
    assert set(pooled.approach) == {fs.SAE, fs.CC} and len(pooled) == 4
    for r in pooled.itertuples():
        assert fs.count_text(r.k, r.n, r.ci_lo, r.ci_hi) in text
        assert fs.count_text(r.k_seed, r.n_seed, r.ci_lo_seed, r.ci_hi_seed) in text
        assert f"Fisher's exact test p = {fs.p_text(r.p_fisher)}" in text
    for tau in cfg.taus:
        assert f"$\\tau={tau:g}$" in text
    assert "nan" not in text.lower()


def test_figures_tables_answer_from_fixture_csvs(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _fixture_results(results)
    out = render(fs.NAME, results, tmp_path / "paper")
    assert [p.split("/")[-1] for p in out["figures"]] == [f"{fs.NAME}_counts.png", f"{fs.NAME}_fidelity.png",
                                                          f"{fs.NAME}_tau.png", f"{fs.NAME}_seed.png"]
    for path in out["figures"] + out["tables"]:
        folder = "figures" if path.endswith(".png") else "tables"
        assert (tmp_path / "paper" / folder / path.split("/")[-1]).stat().st_size
    text = (tmp_path / "paper" / "tables" / f"{fs.NAME}_answer.tex").read_text()
    assert "single-layer SAEs" in text and "crosscoders" in text and "layer 1" in text
    _assert_answer_quotes_tests(text, pd.read_csv(results / "tests.csv"), CFG)
    assert "more than the baseline" in text and "no difference at the 5\\% level" in text  # split; new latents
    example = (tmp_path / "paper" / "tables" / f"{fs.NAME}_example.tex").read_text()
    assert r"\texttt{\textvisiblespace{}the}" in example and r"\$\_\{x\}" in example
    assert "Fisher" in (tmp_path / "paper" / "tables" / f"{fs.NAME}_tests.tex").read_text()


@pytest.mark.slow
def test_feature_splitting_study_micro(micro_ctx):
    run_study(fs.NAME, micro_ctx)
    results = micro_ctx.results(fs.NAME)
    cfg = micro_ctx.preset.config(fs.NAME)
    fam = pd.read_csv(results / "families.csv")
    summ = pd.read_csv(results / "summary.csv")
    ex = pd.read_csv(results / "example.csv", keep_default_na=False)
    assert list(fam.columns) == fs.FAMILY_COLUMNS and list(summ.columns) == fs.SUMMARY_COLUMNS
    assert list(ex.columns) == fs.EXAMPLE_COLUMNS
    # every parent of every pair listed once; widths are the preset's
    sae, cc = fam[fam.approach == fs.SAE], fam[fam.approach == fs.CC]
    assert sorted(set(sae.width_small) | set(sae.width_big)) == sorted(cfg.sae_widths)
    assert sorted(set(cc.width_small) | set(cc.width_big)) == sorted(cfg.cc_widths)
    counts = fam.groupby(["approach", "space", "pair"]).size()
    assert all(counts[(a, sp, pr)] == int(pr.split("->")[0]) for a, sp, pr in counts.index)
    assert fam.fidelity.between(-1, 1 + 1e-5).all() and (fam.n_children >= 0).all()
    assert (fam[fam.n_children > 0].fidelity > cfg.tau).all() and (fam[fam.n_children == 0].fidelity <= cfg.tau).all()
    assert fam.act_corr.dropna().between(-1 - 1e-5, 1 + 1e-5).all()
    fractions = summ.frac_split + summ.frac_kept + summ.frac_unmatched
    assert np.allclose(fractions, 1.0)
    mid = micro_ctx.store("train").layers[micro_ctx.n_layers // 2]
    assert set(summ.tau) == set(cfg.taus) and set(summ.space) == {fs.CONCAT, f"layer {mid}"}
    assert set(summ[summ.approach == fs.SAE].space) == {f"layer {mid}"}  # the headline space of both approaches
    # a seed baseline at every width of each approach, in every space and at every tau
    seed = summ[summ.pair_kind == fs.SEED]
    for (approach, space), grp in summ.groupby(["approach", "space"]):
        widths = cfg.sae_widths if approach == fs.SAE else cfg.cc_widths
        base = seed[(seed.approach == approach) & (seed.space == space)]
        assert sorted(set(base.width_small)) == sorted(widths) and (base.width_small == base.width_big).all()
        assert len(base) == len(widths) * len(cfg.taus)
        assert (fam[(fam.approach == approach) & (fam.space == space) & (fam.pair_kind == fs.SEED)]
                .groupby("width_small").size().to_dict() == {w: w for w in widths})
    assert (micro_ctx.dicts / f"split_sae_w{min(cfg.sae_widths)}_seed1").is_dir()
    assert (micro_ctx.dicts / "crosscoder_seed1").is_dir()  # the main width's second seed is the run's
    assert (summ.n_split + summ.n_kept + summ.n_unmatched == summ.n_live).all()
    # doublings compare different seeds: a same-seed wider dictionary starts with the narrower one's latents, and
    # its best match would mostly be the same index (74-95% at micro) instead of about chance
    doubling = fam[(fam.pair_kind == fs.ADJACENT) & (fam.density > 0)]
    assert (doubling.best_child == doubling.parent).mean() < 0.25
    tests = pd.read_csv(results / "tests.csv")
    assert list(tests.columns) == fs.TEST_COLUMNS and set(tests.tau) == set(cfg.taus)
    assert ((tests.ci_lo <= tests.frac + 1e-12) & (tests.frac <= tests.ci_hi + 1e-12)).all()
    assert tests.p_fisher.between(0, 1 + 1e-9).all()
    _assert_answer_quotes_tests((micro_ctx.paper / "tables" / f"{fs.NAME}_answer.tex").read_text(), tests, cfg)
    # more children at a looser threshold
    for _, grp in summ.groupby(["approach", "space", "pair"]):
        assert grp.sort_values("tau").mean_children.is_monotonic_decreasing
    assert set(ex.role) <= {"parent", "child"} and (ex.role == "parent").sum() == ex.approach.nunique()
    assert (micro_ctx.dicts / f"split_sae_w{min(cfg.sae_widths)}").is_dir()
    tables = micro_ctx.paper / "tables"
    for name in (f"{fs.NAME}.tex", f"{fs.NAME}_answer.tex", f"{fs.NAME}_figures.tex"):
        assert (tables / name).stat().st_size > 0
    assert "includegraphics" in (tables / f"{fs.NAME}_figures.tex").read_text()
