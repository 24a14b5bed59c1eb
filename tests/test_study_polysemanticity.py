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


@pytest.mark.parametrize("rule", poly.RULES)
def test_planted_unit_is_monosemantic_and_random_unit_is_not(rule):
    acts_NU, concepts = _synthetic()
    counts_UC, n_U = poly.active_counts(acts_NU, concepts, 3, rule=rule, n_top=50)
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
    counts, n = poly.active_counts(acts, concepts, 4, rule="top", n_top=25)
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


def test_holm_and_rank_biserial():
    adj = poly.holm([0.01, 0.04, float("nan"), 0.03])
    assert adj[0] == pytest.approx(0.03) and adj[3] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06)
    assert math.isnan(adj[2])
    assert poly.rank_biserial(0.0, 4, 5) == -1.0 and poly.rank_biserial(20.0, 4, 5) == 1.0


# ----------------------------------------------------------------------------- figures / tables from hand-made CSVs

def _hand_made(results):
    rng = np.random.default_rng(0)
    rows = []
    for t in poly.UNIT_TYPES + (poly.NULL_TYPE,):
        for rule in (("top", "fires") if t in ("sae", "crosscoder") else ("top",)):
            for f in poly.FAMILIES:
                for j in range(12):
                    h = float(rng.uniform(0, 1))
                    rows.append({"rule": rule, "unit_type": t, "unit": f"{t}{j}",
                                 "peak_layer": 2 if t != "random" else None, "concept_family": f,
                                 "n_active": 20, "entropy": h * math.log(3), "entropy_norm": h,
                                 "best_concept": "a", "specificity": float(rng.uniform(0.3, 1)),
                                 "sensitivity": 0.1, "f1": 0.2})
    units = pd.DataFrame(rows)
    counts = units.groupby(["rule", "unit_type"]).unit.nunique().rename("n_units").reset_index()
    counts["n_candidates"], counts["n_silent"] = 16, 1
    summary = poly.summarise(units, counts, layer=2, n_tokens=1000, n_top=20)
    units.to_csv(results / "units.csv", index=False)
    summary.to_csv(results / "summary.csv", index=False)
    poly.compare_types(units).to_csv(results / "tests.csv", index=False)
    pd.DataFrame([{"concept_family": f, "concept": c, "n_tokens": n, "fraction": n / 1000}
                  for f in poly.FAMILIES for c, n in (("a", 800), ("b", 150), ("c", 50))]).to_csv(
        results / "concepts.csv", index=False)


def test_figures_tables_answer_from_csvs(tmp_path):
    _hand_made(tmp_path)
    figs = poly.figures(tmp_path, tmp_path / "figures", poly.Config())
    assert len(figs) == 2 and all(p.is_file() and p.stat().st_size > 1000 for p, _ in figs)
    tables = poly.tables(tmp_path, tmp_path / "tables", poly.Config())
    assert all(p.is_file() for p in tables)
    assert "per-layer SAE" in tables[0].read_text()
    text = poly.answer(tmp_path, poly.Config())
    assert "layer 2" in text and "Holm" in text and "per-layer SAE" in text


# ----------------------------------------------------------------------------- the study on the micro reproduction

@pytest.mark.slow
def test_study_on_micro(micro_ctx):
    from studies.pipeline import run_study

    info = run_study("polysemanticity", micro_ctx)
    assert info["resid_relerr"] < 0.05
    out = micro_ctx.results("polysemanticity")
    units = pd.read_csv(out / "units.csv")
    assert list(units.columns) == ["rule", "unit_type", "unit", "peak_layer", "concept_family", "n_active",
                                   "entropy", "entropy_norm", "best_concept", "specificity", "sensitivity", "f1"]
    assert set(units.unit_type) == set(poly.UNIT_TYPES) | {poly.NULL_TYPE}
    assert set(units.concept_family) >= {"source", "token_class"}
    concepts = pd.read_csv(out / "concepts.csv", keep_default_na=False)
    n_conc = concepts.groupby("concept_family").size()
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
            "n_skipped"} <= set(summary.columns)
    assert (summary.n_units + summary.n_skipped == summary.n_candidates).all()
    tests = pd.read_csv(out / "tests.csv")
    assert {"a", "b", "U", "p_value", "p_holm", "effect_size"} <= set(tests.columns)
    assert {("sae", "crosscoder"), ("sae", "neuron"), ("crosscoder", "neuron")} <= set(zip(tests.a, tests.b))
    valid = tests.dropna(subset=["p_value"])
    assert len(valid) and valid.p_value.between(0, 1).all() and valid.effect_size.between(-1, 1).all()
    tables = micro_ctx.paper / "tables"
    for name in ("polysemanticity.tex", "polysemanticity_answer.tex", "polysemanticity_figures.tex"):
        assert (tables / name).is_file(), name
    assert "includegraphics" in (tables / "polysemanticity_figures.tex").read_text()
