"""The reproduction pipeline at the micro preset: steps run, write their results, and resume."""

import pandas as pd

from crosslayer.corpus import load_corpus
from crosslayer.pipeline import reproduce
from crosslayer.store import ActivationStore


def test_micro_reproduce_runs_and_skips_finished_steps(tmp_path, capsys):
    out = reproduce("micro", out=tmp_path / "run")
    loss = pd.read_csv(out / "results" / "heldout_loss.csv")
    assert list(loss.columns) == ["label", "tokens", "ce_loss"] and (loss.ce_loss > 0).all()
    assert set(loss.label) == set(load_corpus("builtin").label_names) | {"all"}  # every label scored
    norms = pd.read_csv(out / "results" / "residual_norms.csv")
    assert set(norms.layer) == {0, 1, 2, 3}
    train, held = ActivationStore(out / "stores" / "train"), ActivationStore(out / "stores" / "heldout")
    assert train.manifest["split"] == "train" and held.manifest["split"] == "heldout"
    assert train.n_layers == 4 and train.n_rows > 3000
    capsys.readouterr()
    reproduce("micro", out=tmp_path / "run")
    table = pd.read_csv(out / "results" / "eval_saes.csv")
    assert set(table.layer.astype(str)) == {"0", "1", "2", "3", "all"}
    per_layer = table[table.layer.astype(str) != "all"]
    assert (per_layer.fvu < 0.9).all() and (per_layer.l0 <= 8 + 1e-6).all()
    assert table.ce_recovered.notna().all()
    assert capsys.readouterr().out.count("done already") == 5
