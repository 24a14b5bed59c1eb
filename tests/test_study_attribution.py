"""The attribution study at the micro preset: CLT and PLT rows per k, an exact error-term check, a traced graph,
and figures/tables/answer rendered from the CSVs alone."""

import json

import pandas as pd
import pytest

from studies.pipeline import RunContext, run_study
from studies.presets import get_preset


@pytest.mark.slow  # ~40 s: harvests a pair, trains four transcoders, evaluates them, traces a prompt
def test_attribution_study_micro(tmp_path, tiny_model):
    ctx = RunContext(get_preset("micro"), tmp_path / "run", paper=tmp_path / "paper", model=tiny_model, progress=False)
    info = run_study("attribution", ctx)
    results = tmp_path / "run" / "results" / "attribution"
    compare = pd.read_csv(results / "compare.csv")
    cfg = get_preset("micro").config("attribution")
    assert sorted(zip(compare.approach, compare.k)) == sorted((a, k) for a in ("CLT", "PLT") for k in cfg.ks)
    assert (compare.exact_kl < 1e-5).all()  # error terms reproduce the model
    assert (compare.l0_read <= compare.k * compare.n_layers + 1e-9).all()
    assert (compare.ce_recovered_lo <= compare.ce_recovered).all() and (compare.ce_recovered <= compare.ce_recovered_hi).all()
    graph = json.loads((results / "graph_0.json").read_text())
    assert graph["metadata"]["prompt"] == cfg.prompts[0]
    assert (tmp_path / "paper" / "figures" / "attribution_graph_0.png").is_file()
    assert "converged" in compare  # the answer says when the transcoders are unconverged
    assert (tmp_path / "paper" / "tables" / "attribution.tex").is_file()
    assert info["k"] == max(cfg.ks) and "->" in info["top_path"]
