"""The reproduction pipeline at the micro preset: every step runs, writes its results and the
paper's generated files, and a rerun skips finished steps."""

import json

import pandas as pd
import pytest

from crosslayer.cli import main
from crosslayer.corpus import load_corpus
from crosslayer.errors import CrosslayerError
from crosslayer.pipeline import STEP_NAMES, reproduce, study
from crosslayer.store import ActivationStore
from studies import STUDY_NAMES


def test_micro_reproduce_runs_everything_and_skips_finished_steps(micro_ctx, capsys, tmp_path):
    out, paper = micro_ctx.out, micro_ctx.paper
    reproduce("micro", out=out, paper=paper, progress=False)
    assert sorted(p.stem for p in (out / "done").glob("*.json")) == sorted(STEP_NAMES)
    loss = pd.read_csv(out / "results" / "heldout_loss.csv")
    assert list(loss.columns) == ["label", "tokens", "ce_loss"] and (loss.ce_loss > 0).all()
    assert set(loss.label) == set(load_corpus("builtin").label_names) | {"all"}  # every label scored
    norms = pd.read_csv(out / "results" / "residual_norms.csv")
    assert set(norms.layer) == {0, 1, 2, 3}
    train, held = ActivationStore(out / "stores" / "train"), ActivationStore(out / "stores" / "heldout")
    assert train.manifest["split"] == "train" and held.manifest["split"] == "heldout"
    assert train.n_layers == 4 and train.n_rows > 3000
    for name in ("saes", "crosscoder"):
        table = pd.read_csv(out / "results" / f"eval_{name}.csv")
        assert set(table.layer.astype(str)) == {"0", "1", "2", "3", "all"}
        per_layer = table[table.layer.astype(str) != "all"]
        assert (per_layer.fvu < 1.0).all() and (per_layer.l0 <= 8 + 1e-6).all()
        assert table.ce_recovered.notna().all()
    # the paper's generated files: every study's table, answer and figure list, and the setup macros
    tables = paper / "tables"
    for name in STUDY_NAMES:
        for suffix in ("", "_answer", "_figures"):
            assert (tables / f"{name}{suffix}.tex").stat().st_size > 0, (name, suffix)
        assert json.loads((out / "results" / name / "summary.json").read_text())["study"] == name
    setup = (tables / "setup.tex").read_text()
    assert "\\newcommand{\\clpresetname}{micro}" in setup and "\\clsteptimes" in setup
    figures = list((paper / "figures").glob("*.png"))
    assert len(figures) >= len(STUDY_NAMES)
    capsys.readouterr()
    reproduce("micro", out=out, paper=paper, progress=False)
    assert capsys.readouterr().out.count("done already") == len(STEP_NAMES)
    # `crosslayer figures` redraws every study's figures, tables and answers from the CSVs alone
    redrawn = tmp_path / "redrawn"
    assert main(["figures", "--results", str(out / "results"), "--paper", str(redrawn)]) == 0
    for name in STUDY_NAMES:
        answer = (redrawn / "tables" / f"{name}_answer.tex").read_text()
        assert answer == (tables / f"{name}_answer.tex").read_text(), name
    assert sorted(p.name for p in (redrawn / "figures").glob("*.png")) == sorted(p.name for p in figures)
    assert main(["figures", "astrology", "--results", str(out / "results")]) == 2


def test_reproduce_rejects_bad_input(tmp_path, micro_ctx):
    with pytest.raises(CrosslayerError, match="unknown preset"):
        reproduce("huge", out=tmp_path)
    with pytest.raises(CrosslayerError, match="unknown step"):
        reproduce("micro", out=tmp_path, only=["train-everything"])
    with pytest.raises(CrosslayerError, match="unknown study"):
        study("astrology", "micro", out=tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "preset.json").write_text(json.dumps({"preset": "micro", "layers": "0"}))
    with pytest.raises(CrosslayerError, match="other settings"):
        reproduce("micro", out=tmp_path / "other")
