"""The transcoder verbs end to end on a tiny model: harvest a pair -> train-clt (CLT and --per-layer PLT) ->
eval -> attribute; bad input is a one-line error with exit status 2."""

import json

from crosslayer.cli import main
from crosslayer.dictionary import load_dictionary

from conftest import make_toy_corpus


def test_cli_clt_pipeline_on_a_tiny_model(tmp_path, capsys):
    corpus = make_toy_corpus(tmp_path / "toy.jsonl", n_docs=80)
    assert main(["harvest", "--model", "tiny-2l-64d", "--corpus", str(corpus), "--tokens", "2k", "--seq-len", "32",
                 "--hook", "resid_mid,mlp_out", "--out", str(tmp_path / "pair")]) == 0
    assert (tmp_path / "pair" / "resid_mid" / "manifest.json").is_file()
    for name, extra in (("clt", []), ("plt", ["--per-layer"])):
        assert main(["train-clt", "--store", str(tmp_path / "pair"), "--out", str(tmp_path / name), "--width", "32",
                     "--k", "4", "--tokens", "2k", "--batch-size", "256", *extra]) == 0
    assert load_dictionary(tmp_path / "plt").cfg.cross_layer is False
    capsys.readouterr()
    assert main(["eval", "--dictionary", str(tmp_path / "clt"), "--store", str(tmp_path / "pair"), "--tokens", "1k",
                 "--windows", "4", "--boot", "20", "--out", str(tmp_path / "eval.csv")]) == 0
    out = capsys.readouterr().out
    assert "replacement_error" in out and (tmp_path / "eval.csv").is_file()
    assert main(["attribute", "The capital of France is", "--dictionary", str(tmp_path / "clt"),
                 "--out", str(tmp_path / "graph.json"), "--model-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "top_path:" in out
    data = json.loads((tmp_path / "graph.json").read_text())
    assert data["metadata"]["prompt"] == "The capital of France is" and (tmp_path / "graph.png").is_file()
    # one-line errors
    assert main(["train-clt", "--store", str(tmp_path / "pair" / "resid_mid"), "--out", str(tmp_path / "x"),
                 "--width", "8"]) == 2
    assert main(["attribute", "hi", "--dictionary", str(tmp_path / "nothing")]) == 2
    assert main(["train-clt", "--store", str(tmp_path / "pair"), "--out", str(tmp_path / "y"), "--width", "8",
                 "--layers", "1", "--k", "9"]) == 2
    err = capsys.readouterr().err
    assert all(line.startswith("error: ") for line in err.strip().splitlines())
