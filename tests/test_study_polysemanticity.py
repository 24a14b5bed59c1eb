import math

import numpy as np
import pandas as pd
import pytest
import torch

from studies import polysemanticity as poly


# ----------------------------------------------------------------------------- ground truth on synthetic units

def _synthetic(n_per=200, n_concepts=3):
    concepts = np.repeat(np.arange(n_concepts), n_per)
    gen = torch.Generator().manual_seed(0)
    n = len(concepts)
    planted = torch.where(torch.from_numpy(concepts) == 1, 1 + torch.rand(n, generator=gen), torch.zeros(n))
    dense = torch.randn(n, generator=gen)
    rare = torch.zeros(n)
    rare[:5] = 1.0
    return torch.stack([planted, dense, rare], dim=1), concepts


def active_counts(acts_NU, concepts_N, n_concepts, *, rule, n_top):
    """Concept counts ``[U, C]`` and sizes ``[U]`` of each unit's active set on unweighted tokens."""
    codes_N = torch.as_tensor(concepts_N, dtype=torch.long)
    if rule == "top":
        top = poly.top_sets(acts_NU, 3 * n_top)
        take_BKU = poly.top_take(top, torch.ones(1, acts_NU.shape[0]), n_top)
        return poly.scatter_counts(take_BKU, codes_N[top.idx_KU], n_concepts)[0], take_BKU[0].sum(0)
    counts_UC = poly.doc_fire_counts(acts_NU, codes_N, torch.zeros_like(codes_N), 1, n_concepts)[:, 0]
    return counts_UC, counts_UC.sum(1)


@pytest.mark.parametrize("rule", poly.RULES)
def test_planted_unit_is_monosemantic_and_random_unit_is_not(rule):
    acts_NU, concepts = _synthetic()
    counts_UC, n_U = active_counts(acts_NU, concepts, 3, rule=rule, n_top=50)
    m = poly.unit_metrics(counts_UC, torch.bincount(torch.from_numpy(concepts)))
    assert m["entropy"][0].item() == pytest.approx(0.0, abs=1e-9)
    assert m["specificity"][0].item() == pytest.approx(1.0)
    assert m["best"][0].item() == 1
    assert m["sensitivity"][0].item() == pytest.approx(0.25 if rule == "top" else 1.0)
    # the dense random unit spreads over the concepts: entropy close to log 3
    assert m["entropy_norm"][1].item() > 0.8
    assert m["entropy"][1].item() <= math.log(3) + 1e-9
    assert m["specificity"][1].item() < 0.6
    # the rare unit has too few positive activations for a full active set
    assert n_U[2].item() == 5
    assert n_U[0].item() == (50 if rule == "top" else 200)


def test_metrics_match_hand_computation():
    counts = torch.tensor([[2.0, 2.0, 0.0], [3.0, 1.0, 0.0]])
    totals = torch.tensor([10, 4, 6])
    m = poly.unit_metrics(counts, totals)
    assert m["entropy"][0].item() == pytest.approx(math.log(2))
    assert m["entropy_norm"][0].item() == pytest.approx(math.log(2) / math.log(3))
    assert m["specificity"][1].item() == pytest.approx(0.75)
    assert m["sensitivity"][1].item() == pytest.approx(0.3)
    assert m["f1"][1].item() == pytest.approx(2 * 0.75 * 0.3 / 1.05)


def test_top_rule_counts_match_a_loop():
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(300, 7, generator=gen)
    concepts = torch.randint(0, 4, (300,), generator=gen).numpy()
    counts, n = active_counts(acts, concepts, 4, rule="top", n_top=25)
    for u in range(7):
        idx = acts[:, u].argsort(descending=True)[:25]
        idx = idx[acts[idx, u] > 0]
        expected = np.bincount(concepts[idx.numpy()], minlength=4)
        assert counts[u].numpy().tolist() == expected.tolist()
        assert n[u].item() == len(idx)


def test_token_classes():
    cases = {" The": "capitalised", "42": "digit", " def": "code_keyword", " None": "code_keyword",
             " if": "lowercase", "\n\n": "whitespace", ",": "punctuation", "):": "punctuation",
             "x1": "other", " cat": "lowercase"}
    for text, cls in cases.items():
        assert poly.token_class(text) == cls, text


def test_holm():
    adj = poly.holm([0.01, 0.04, float("nan"), 0.03])
    assert adj[0] == pytest.approx(0.03) and adj[3] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06)
    assert math.isnan(adj[2])


# ----------------------------------------------------------------------------- rows, matching, document bootstrap

def _store_docs(seed=0, n_docs=60):
    """Document id of every row of a store-like layout: documents of varied length one after the other,
    separators (-1) between them."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.append(np.full(rng.integers(20, 400), d), -1) for d in range(n_docs)])


def test_spread_rows_cover_more_documents_than_the_first_rows():
    doc = _store_docs()
    rows = poly.spread_rows(doc, 600, seed=0)
    first = np.flatnonzero(doc >= 0)[:600]
    assert len(rows) == 600 and len(np.unique(rows)) == 600 and (np.diff(rows) > 0).all()
    assert (doc[rows] >= 0).all()
    n_docs = len(np.unique(doc[rows]))
    assert n_docs == 60 > len(np.unique(doc[first]))
    per_doc = np.bincount(doc[rows])
    assert per_doc.max() - per_doc.min() <= 1  # every document is longer than the 10 rows each gets
    # a document's rows are one run of consecutive rows (possibly wrapping to its start): at most two runs
    for d in range(5):
        runs = np.diff(np.flatnonzero(doc == d)[np.isin(np.flatnonzero(doc == d), rows)])
        assert (runs != 1).sum() <= 1
    assert len(poly.spread_rows(doc, 10**6)) == (doc >= 0).sum()


def test_group_rank():
    rank = poly.group_rank(np.array([1, 0, 1, 0, 1]), np.array([5.0, 2.0, 1.0, 3.0, 9.0]))
    assert rank.tolist() == [1, 0, 0, 1, 2]


def test_density_match_equal_counts_and_tolerance():
    rng = np.random.default_rng(0)
    dens_a = 10 ** rng.uniform(-2, -0.5, 300)
    dens_b = 10 ** rng.uniform(-2.5, -1, 2000)
    ia, ib = poly.density_match(dens_a, dens_b, bins_per_decade=20, seed=0)
    assert len(ia) == len(ib) > 50
    assert len(np.unique(ia)) == len(ia) and len(np.unique(ib)) == len(ib)
    ratio = np.log10(np.sort(dens_a[ia])) - np.log10(np.sort(dens_b[ib]))
    assert np.abs(ratio).max() < 1 / 20
    # nothing matches outside the common range
    assert dens_a[ia].max() <= 10 ** -1 * 10 ** (1 / 20)


def test_top_take_counts_a_token_of_weight_m_m_times():
    acts = torch.tensor([[5.0], [4.0], [3.0], [2.0], [-1.0]])
    top = poly.top_sets(acts, 5)
    take = poly.top_take(top, torch.tensor([[0.0, 2.0, 1.0, 3.0, 4.0]]), 4)[0, :, 0]
    assert take.tolist() == [0.0, 2.0, 1.0, 1.0, 0.0]  # token 0 undrawn, the negative one never active


def _clustered(seed, planted, n_docs=60, per_doc=50, n_units=20):
    """Tokens in documents whose concept (one of 4) is drawn per document; group a detects concept 1; group b
    detects concept 2 (null: same population median by symmetry) or concepts 1 and 2 (planted: polysemantic)."""
    gen = torch.Generator().manual_seed(seed)
    doc_N = torch.arange(n_docs).repeat_interleave(per_doc)
    concept_N = torch.randint(0, 4, (n_docs,), generator=gen)[doc_N]
    noise = torch.randn(len(doc_N), 2 * n_units, generator=gen)
    b_hits = ((concept_N == 1) | (concept_N == 2)) if planted else (concept_N == 2)
    noise[:, :n_units] += 1.0 * (concept_N == 1).float()[:, None]
    noise[:, n_units:] += 1.0 * b_hits.float()[:, None]
    return noise, concept_N, doc_N


def _diff(acts, concept_N, doc_N, n_boot=200, n_top=40, seed=0):
    top = poly.top_sets(acts, 4 * n_top)
    counter = poly.TopCounter(top, {"c": (concept_N, 4)}, doc_N, n_top)
    n = acts.shape[1] // 2
    groups = {"a": torch.arange(n), "b": torch.arange(n, 2 * n)}
    meds = poly.resample_medians(counter, int(doc_N.max()) + 1, groups, {"c": math.log(4)}, n_boot=n_boot, seed=seed)
    return poly.interval(meds[("a", "c", "entropy_norm")] - meds[("b", "c", "entropy_norm")])


def test_document_bootstrap_finds_planted_difference():
    res = _diff(*_clustered(0, planted=True))
    assert res["delta"] < 0 and res["ci_hi"] < 0 and res["p_value"] < 0.01


def test_document_bootstrap_interval_covers_a_null_difference():
    results = [_diff(*_clustered(seed, planted=False), n_boot=150, seed=seed) for seed in range(30)]
    covered = np.mean([r["ci_lo"] <= 0 <= r["ci_hi"] for r in results])
    assert covered >= 0.8
    assert np.mean([r["p_value"] < 0.05 for r in results]) <= 0.2
    assert all(r["ci_hi"] - r["ci_lo"] > 0 for r in results)


def test_interval_and_point_value():
    rng = np.random.default_rng(0)
    res = poly.interval(np.concatenate([[0.5], rng.normal(0.5, 0.1, 2000)]))
    assert res["delta"] == 0.5 and res["ci_lo"] == pytest.approx(0.3, abs=0.02)
    assert res["se"] == pytest.approx(0.1, abs=0.01) and res["p_value"] < 1e-5
    assert math.isnan(poly.interval(np.array([np.nan, 1.0, 2.0]))["ci_lo"])


# ----------------------------------------------------------------------------- figures / tables from hand-made CSVs

def _hand_made(results):
    rng = np.random.default_rng(0)
    rows = []
    for t in poly.ALL_TYPES:
        for rule in (("top", "fires") if t in poly.DICT_TYPES else ("top",)):
            for f in poly.FAMILIES:
                for j in range(12):
                    h = float(rng.uniform(0, 1))
                    rows.append({"rule": rule, "unit_type": t, "unit": f"{t}{j}",
                                 "peak_layer": 2 if t != "random" else None, "concept_family": f,
                                 "n_active": 20, "density": float(rng.uniform(0.02, 0.2)),
                                 "matched": t in ("sae", "crosscoder") and j < 8, "entropy": h * math.log(3),
                                 "entropy_norm": h, "best_concept": "a", "specificity": float(rng.uniform(0.3, 1)),
                                 "sensitivity": 0.1, "f1": 0.2})
    units = pd.DataFrame(rows)
    counts = pd.DataFrame([{"rule": r, "unit_type": t, "n_candidates": 16, "n_silent": 1, "boot_short": 0.01}
                           for t in poly.ALL_TYPES for r in poly.RULES])
    summary = poly.summarise(units, counts, layer=2, n_tokens=1000, n_docs=40, n_docs_store=50, n_top=20)
    tests = []
    for rule, subset, a, b in poly.COMPARISONS:
        for f in poly.FAMILIES:
            for m in poly.METRICS:
                d = float(rng.normal(0, 0.1))
                tests.append({"rule": rule, "subset": subset, "concept_family": f,
                              "independent": f not in poly.DEPENDENT_FAMILIES, "metric": m, "a": a, "b": b,
                              "n_a": 12, "n_b": 12, "median_a": 0.5 + d, "median_b": 0.5, "delta": d,
                              # a percentile interval may exclude its estimate: the figure must still draw it
                              "ci_lo": d + 0.01 if (m, f) == ("entropy_norm", poly.FAMILIES[0]) else d - 0.05, "ci_hi": d + 0.05, "se": 0.025,
                              "p_value": 0.01,
                              "p_holm": float(rng.uniform(0, 0.2)), "n_docs": 40, "n_boot": 100})
    units.to_csv(results / "units.csv", index=False)
    summary.to_csv(results / "summary.csv", index=False)
    pd.DataFrame(tests).to_csv(results / "tests.csv", index=False)
    pd.DataFrame([{"concept_family": f, "concept": c, "n_tokens": n, "fraction": n / 1000, "n_docs": n // 50,
                   "sources": ("x|y" if c == "a" else "y") if f == "language" else ""}
                  for f in poly.FAMILIES for c, n in (("a", 800), ("b", 150), ("c", 50))]
                 + [{"concept_family": "source", "concept": "gone", "n_tokens": 0, "fraction": 0.0, "n_docs": 0,
                     "sources": ""}]).to_csv(results / "concepts.csv", index=False)


def test_figures_tables_answer_from_csvs(tmp_path):
    _hand_made(tmp_path)
    figs = poly.figures(tmp_path, tmp_path / "figures", poly.Config())
    assert len(figs) == 3 and all(p.is_file() and p.stat().st_size > 1000 for p, _ in figs)
    tables = poly.tables(tmp_path, tmp_path / "tables", poly.Config())
    assert all(p.is_file() for p in tables)
    assert "per-layer SAE (matched)" in tables[0].read_text() and "untrained crosscoder" in tables[0].read_text()
    text = poly.answer(tmp_path, poly.Config())
    assert "layer 2" in text and "Holm" in text and "per-layer SAE" in text
    assert "40 documents" in text and "No document of gone" in text and "fewer than 200" in text
    assert "coarsening" in text and "untrained SAE" in text and "random direction" in text
    assert "Headline, at equal width and density: 8 per-layer SAE latents" in text


# ----------------------------------------------------------------------------- the study on the micro reproduction

@pytest.mark.slow
def test_study_on_micro(micro_ctx):
    from studies.pipeline import run_study

    info = run_study("polysemanticity", micro_ctx)
    assert info["resid_relerr"] < 0.05
    out = micro_ctx.results("polysemanticity")
    units = pd.read_csv(out / "units.csv")
    assert list(units.columns) == ["rule", "unit_type", "unit", "peak_layer", "concept_family", "n_active", "density",
                                   "matched", "entropy", "entropy_norm", "best_concept", "specificity", "sensitivity",
                                   "f1"]
    assert set(units.unit_type) == set(poly.ALL_TYPES)  # the controls are scored like the units
    assert set(units.concept_family) >= {"source", "token_class"}
    concepts = pd.read_csv(out / "concepts.csv", keep_default_na=False)
    assert {"n_docs", "sources"} <= set(concepts.columns)
    n_conc = concepts[concepts.n_tokens > 0].groupby("concept_family").size()
    for family, sub in units.groupby("concept_family"):
        assert (sub.entropy >= 0).all() and (sub.entropy <= math.log(n_conc[family]) + 1e-9).all()
    assert units.entropy_norm.between(0, 1 + 1e-9).all()
    for col in ("specificity", "sensitivity", "f1"):
        assert units[col].between(0, 1).all(), col
    summary = pd.read_csv(out / "summary.csv")
    n_top = int(summary.n_top.iloc[0])
    assert (units[units.rule == "top"].n_active == n_top).all()
    assert (units[units.rule == "fires"].n_active >= n_top).all()
    assert {"median_entropy", "median_entropy_norm", "median_specificity", "median_sensitivity", "n_units",
            "n_skipped", "n_docs", "n_docs_store", "boot_short"} <= set(summary.columns)
    assert (summary.n_units + summary.n_skipped == summary.n_candidates).all()
    # the sample spreads over more documents than the store's first rows
    store = micro_ctx.store("heldout")
    first_docs = len(np.unique(store.meta(np.arange(int(summary.n_tokens.iloc[0]) // 4))["doc_id"]))
    spread = poly.spread_rows(store.meta()["doc_id"], int(summary.n_tokens.iloc[0]) // 4)
    assert len(np.unique(store.meta(spread)["doc_id"])) >= first_docs
    assert int(summary.n_docs.iloc[0]) == int(concepts[concepts.concept_family == "source"].n_docs.sum())
    # matched comparison: equal unit counts, densities within the bin tolerance
    m = units[(units.rule == "top") & (units.concept_family == "source") & units.matched]
    sae, cc = (np.sort(m[m.unit_type == t].density.to_numpy()) for t in ("sae", "crosscoder"))
    assert len(sae) == len(cc) and set(m.unit_type) <= {"sae", "crosscoder"}
    assert (np.abs(np.log10(sae) - np.log10(cc)) < 1 / poly.Config().match_bins + 1e-9).all()
    tests = pd.read_csv(out / "tests.csv")
    assert {"delta", "ci_lo", "ci_hi", "se", "p_value", "p_holm", "n_docs", "n_boot", "independent"} <= set(tests.columns)
    assert {("sae", "crosscoder"), ("sae", "sae_init"), ("crosscoder", "random_dir")} <= set(zip(tests.a, tests.b))
    head = tests[(tests.subset == "matched") & (tests.rule == "top")]
    assert len(head) == len(poly.FAMILIES) * len(poly.METRICS) - (2 if "language" not in set(units.concept_family) else 0)
    valid = tests.dropna(subset=["p_value"])
    assert len(valid) and valid.p_value.between(0, 1).all() and (valid.ci_lo <= valid.ci_hi + 1e-12).all()
    assert (~tests[tests.concept_family == "language"].independent).all()
    tables = micro_ctx.paper / "tables"
    for name in ("polysemanticity.tex", "polysemanticity_answer.tex", "polysemanticity_figures.tex"):
        assert (tables / name).is_file(), name
    assert "includegraphics" in (tables / "polysemanticity_figures.tex").read_text()
