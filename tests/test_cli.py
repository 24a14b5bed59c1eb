"""The CLI verbs end to end on a tiny model: harvest -> train-saes / train-crosscoder -> eval."""

import pandas as pd
import pytest

from crosslayer.cli import build_parser, main
from crosslayer.dictionary import load_dictionary

from conftest import make_toy_corpus


@pytest.mark.slow
def test_cli_pipeline_on_a_tiny_model(tmp_path, capsys):
    corpus = make_toy_corpus(tmp_path / "toy.jsonl", n_docs=200)
    for split, tokens in (("train", "4k"), ("heldout", "1k")):
        assert main(["harvest", "--model", "tiny-2l-64d", "--corpus", str(corpus), "--split", split,
                     "--tokens", tokens, "--seq-len", "32", "--out", str(tmp_path / split)]) == 0
    assert main(["train-saes", "--store", str(tmp_path / "train"), "--out", str(tmp_path / "saes"),
                 "--width", "64", "--k", "4", "--tokens", "4k", "--batch-size", "128", "--lr", "3e-3"]) == 0
    assert main(["train-crosscoder", "--store", str(tmp_path / "train"), "--out", str(tmp_path / "cc"),
                 "--width", "128", "--k", "4", "--tokens", "4k", "--batch-size", "128", "--lr", "3e-3"]) == 0
    assert load_dictionary(tmp_path / "saes").n_features == 128
    assert load_dictionary(tmp_path / "cc").n_features == 128
    # the reference trainer (sae-lens) is one option away; other architectures need it
    assert main(["train-saes", "--store", str(tmp_path / "train"), "--out", str(tmp_path / "saes_ref"), "--width", "64",
                 "--k", "4", "--tokens", "1k", "--batch-size", "128", "--trainer", "sae-lens", "--arch", "jumprelu"]) == 0
    assert load_dictionary(tmp_path / "saes_ref").meta["training"]["arch"] == "jumprelu"
    assert main(["train-saes", "--store", str(tmp_path / "train"), "--out", str(tmp_path / "saes_j"), "--width", "64",
                 "--arch", "jumprelu"]) == 2
    assert "use --trainer sae-lens" in capsys.readouterr().err
    # --heldout gives the curve its held-out FVU and the saved verdict
    assert main(["train-crosscoder", "--store", str(tmp_path / "train"), "--out", str(tmp_path / "cc_h"), "--width",
                 "32", "--k", "4", "--tokens", "2k", "--batch-size", "128", "--heldout", str(tmp_path / "heldout"),
                 "--aux-frac", "0.5"]) == 0
    assert load_dictionary(tmp_path / "cc_h").meta["convergence"]["final_fvu"] > 0
    assert load_dictionary(tmp_path / "cc_h").cfg.aux_frac == 0.5
    for name in ("saes", "cc"):
        out = tmp_path / f"eval_{name}.csv"
        assert main(["eval", "--dictionary", str(tmp_path / name), "--store", str(tmp_path / "heldout"),
                     "--tokens", "1k", "--windows", "2", "--out", str(out)]) == 0
        table = pd.read_csv(out)
        assert {"fvu", "l0", "ce_recovered", "kl"} <= set(table.columns)
        assert table.fvu.between(0, 2).all()
    assert main(["steer", "the cat sat on a mat", "--dictionary", str(tmp_path / "cc"), "--feature", "3",
                 "--value", "5", "--tokens", "4"]) == 0
    assert "steered:" in capsys.readouterr().out
    assert main(["features", "--dictionary", str(tmp_path / "saes"), "--store", str(tmp_path / "heldout"),
                 "--feature", "3", "--examples", "2"]) == 0
    assert main(["features", "--dictionary", str(tmp_path / "saes"), "--store", str(tmp_path / "heldout"),
                 "--search", " cat", "--top", "3"]) == 0
    assert main(["steer", "the cat", "--dictionary", str(tmp_path / "cc"), "--feature", "999"]) == 2
    # a dictionary evaluated on a store of another model is a one-line error, exit status 2
    assert main(["harvest", "--model", "tiny-4l-64d", "--corpus", str(corpus), "--split", "heldout",
                 "--tokens", "1k", "--seq-len", "32", "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert main(["eval", "--dictionary", str(tmp_path / "saes"), "--store", str(tmp_path / "other"),
                 "--windows", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_cli_lens_prints_a_table_and_writes_plot_and_csv(tmp_path, capsys):
    assert main(["lens", "The cat sat on the", "--model", "tiny-2l-64d", "--target", " mat",
                 "--plot", str(tmp_path / "lens.png"), "--out", str(tmp_path / "lens.csv")]) == 0
    out = capsys.readouterr().out
    assert "prompt 0" in out and (tmp_path / "lens.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "lens.csv")
    assert {"layer", "position", "top1_token", "kl_final", "target_rank"} <= set(table.columns)
    assert main(["lens", "   ", "--model", "tiny-2l-64d"]) == 2


def test_cli_defaults_come_from_the_config_dataclasses():
    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.saes import SAETrainConfig
    from crosslayer.training import TrainConfig

    parser = build_parser()
    base = ["--store", "s", "--out", "o", "--width", "8"]
    saes = parser.parse_args(["train-saes", *base])
    assert (saes.batch_size, saes.lr, saes.k, saes.arch, saes.seed) == (
        SAETrainConfig.batch_size, SAETrainConfig.lr, SAETrainConfig.k, SAETrainConfig.arch, SAETrainConfig.seed)
    cc = parser.parse_args(["train-crosscoder", *base])
    assert (cc.batch_size, cc.lr, cc.checkpoint_every, cc.seed) == (
        TrainConfig.batch_size, TrainConfig.lr, TrainConfig.checkpoint_every, TrainConfig.seed)
    assert (cc.k, cc.variant, cc.activation, cc.sparsity, cc.window) == (
        CrosscoderConfig.k, CrosscoderConfig.variant, CrosscoderConfig.activation, CrosscoderConfig.sparsity,
        CrosscoderConfig.window)


def test_cli_options_have_one_name_each(capsys):
    parser = build_parser()
    assert parser.parse_args(["lens", "x", "--model-dtype", "float32"]).model_dtype == "float32"
    assert parser.parse_args(["inspect", "--model-dtype", "float32"]).model_dtype == "float32"
    assert parser.parse_args(["harvest", "--out", "o", "--store-dtype", "float16"]).store_dtype == "float16"
    for old in (["lens", "x", "--dtype", "float32"], ["harvest", "--out", "o", "--dtype", "float16"],
                ["train-saes", "--store", "s", "--out", "o", "--width", "8", "--sparsity-coefficient", "1"],
                ["features", "--dictionary", "d", "--store", "s", "--feature", "1", "--k", "3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(old)
    assert parser.parse_args(["train-saes", "--store", "s", "--out", "o", "--width", "8",
                              "--sparsity-coef", "2"]).sparsity_coef == 2.0
    capsys.readouterr()


@pytest.mark.parametrize("count", ["inf", "nan", "-5", "1.5", "abc"])
def test_bad_counts_are_one_line_errors(count, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["harvest", "--out", "o", "--tokens", count])
    assert exit_info.value.code == 2 and "--tokens" in capsys.readouterr().err
