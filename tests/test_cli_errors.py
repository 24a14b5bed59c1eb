"""Bad command-line input: every case exits with status 2 and one line ``error: ...`` on stderr, never a
traceback, and leaves nothing new at ``--out``."""

import os

import pytest

from crosslayer.cli import main

from conftest import make_toy_corpus, random_saes

HARVEST = ["harvest", "--model", "tiny-2l-64d", "--tokens", "1k", "--seq-len", "32"]


def _train(verb, store, *extra):
    return [verb, "--store", store, "--width", "16", "--k", "2", "--tokens", "512", "--batch-size", "64", *extra]


# name -> (argv builder of (store, corpus, out), where --out points: "new" folder, "file", "under_file")
CASES = {
    "cc_batch_size_0": (lambda s, c, o: _train("train-crosscoder", s, "--out", o, "--batch-size", "0"), "new"),
    "cc_lr_nan": (lambda s, c, o: _train("train-crosscoder", s, "--out", o, "--lr", "nan"), "new"),
    "cc_lr_negative": (lambda s, c, o: _train("train-crosscoder", s, "--out", o, "--lr", "-1"), "new"),
    "cc_tokens_inf": (lambda s, c, o: _train("train-crosscoder", s, "--out", o, "--tokens", "inf"), "new"),
    "cc_layers_repeated": (lambda s, c, o: _train("train-crosscoder", s, "--out", o, "--layers", "1,1"), "new"),
    "cc_aux_frac_over_1": (lambda s, c, o: _train("train-crosscoder", s, "--out", o, "--aux-frac", "2"), "new"),
    "saes_aux_frac_sae_lens": (lambda s, c, o: _train("train-saes", s, "--out", o, "--trainer", "sae-lens",
                                                      "--aux-frac", "0.5"), "new"),
    "saes_lr_decay_sae_lens": (lambda s, c, o: _train("train-saes", s, "--out", o, "--trainer", "sae-lens",
                                                      "--lr-decay-frac", "1"), "new"),
    "saes_sparsity_nan": (lambda s, c, o: _train("train-saes", s, "--out", o, "--sparsity-coef", "nan"), "new"),
    "eval_windows_negative": (lambda s, c, o: ["eval", "--dictionary", o, "--store", s, "--windows", "-1"], "new"),
    "harvest_out_file": (lambda s, c, o: HARVEST + ["--corpus", c, "--out", o], "file"),
    "harvest_out_unwritable": (lambda s, c, o: HARVEST + ["--corpus", c, "--out", o], "under_file"),
    "saes_out_file": (lambda s, c, o: _train("train-saes", s, "--out", o), "file"),
    "saes_out_unwritable": (lambda s, c, o: _train("train-saes", s, "--out", o), "under_file"),
    "cc_out_file": (lambda s, c, o: _train("train-crosscoder", s, "--out", o), "file"),
    "cc_out_unwritable": (lambda s, c, o: _train("train-crosscoder", s, "--out", o), "under_file"),
    "reproduce_out_file": (lambda s, c, o: ["reproduce", "--preset", "micro", "--corpus", c, "--out", o], "file"),
    "reproduce_out_unwritable": (lambda s, c, o: ["reproduce", "--preset", "micro", "--corpus", c, "--out", o],
                                 "under_file"),
    "reproduce_corpus_missing": (lambda s, c, o: ["reproduce", "--preset", "micro", "--corpus", "nope", "--out", o],
                                 "new"),
    "harvest_seq_len_over_context": (lambda s, c, o: HARVEST + ["--corpus", c, "--out", o, "--seq-len", "2048"], "new"),
    "harvest_layers_repeated": (lambda s, c, o: HARVEST + ["--corpus", c, "--out", o, "--layers", "1,1"], "new"),
    "harvest_binary_corpus": (lambda s, c, o: HARVEST + ["--corpus", "/bin/ls", "--out", o], "new"),
    "harvest_outlier_negative": (lambda s, c, o: HARVEST + ["--corpus", c, "--out", o, "--outlier-factor", "-1"],
                                 "new"),
    "harvest_batch_size_0": (lambda s, c, o: HARVEST + ["--corpus", c, "--out", o, "--batch-size", "0"], "new"),
}
MUST_NAME = {"cc_layers_repeated": "layer 1 is repeated", "harvest_layers_repeated": "layer 1 is repeated",
             "harvest_seq_len_over_context": "1024", "harvest_binary_corpus": "/bin/ls is not text",
             "cc_lr_nan": "--lr", "cc_aux_frac_over_1": "aux_frac", "saes_aux_frac_sae_lens": "--aux-frac",
             "saes_lr_decay_sae_lens": "--lr-decay-frac", "eval_windows_negative": "--windows", "reproduce_corpus_missing": "nope"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_toy_corpus(tmp_path_factory.mktemp("corpus") / "toy.jsonl", n_docs=120))


def _out(tmp_path, where):
    if where == "new":
        return tmp_path / "out"
    (tmp_path / "file").write_text("keep me\n")
    return tmp_path / "file" if where == "file" else tmp_path / "file" / "sub"


def _snapshot(tmp_path):
    return sorted((str(p.relative_to(tmp_path)), p.read_bytes() if p.is_file() else None)
                  for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_one_line_error(case, tiny_store, corpus, tmp_path, capsys):
    build, where = CASES[case]
    out = _out(tmp_path, where)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main([str(a) for a in build(str(tiny_store.path), corpus, str(out))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert MUST_NAME.get(case, "") in err[0]
    assert _snapshot(tmp_path) == before, "something was left at --out"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
@pytest.mark.parametrize("verb", ["harvest", "train-saes", "train-crosscoder", "reproduce"])
def test_out_in_a_read_only_folder(verb, tiny_store, corpus, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    out = str(locked / "out")
    argv = {"harvest": HARVEST + ["--corpus", corpus, "--out", out],
            "train-saes": _train("train-saes", str(tiny_store.path), "--out", out),
            "train-crosscoder": _train("train-crosscoder", str(tiny_store.path), "--out", out),
            "reproduce": ["reproduce", "--preset", "micro", "--corpus", corpus, "--out", out]}[verb]
    try:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "writable" in err[0], err
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_reproduce_with_a_bad_corpus_leaves_the_folder_usable(corpus, tmp_path):
    """`reproduce --corpus nope` checks the corpus before claiming --out, so the corrected rerun is not refused."""
    from crosslayer.errors import CrosslayerError
    from crosslayer.io import claim_folder
    from studies.pipeline import reproduce
    from studies.presets import get_preset

    with pytest.raises(CrosslayerError, match="nope"):
        reproduce("micro", out=tmp_path / "run", corpus="nope", only=["paper"], progress=False)
    assert not (tmp_path / "run").exists()
    plan = {**get_preset("micro").record(), "corpus": corpus}
    assert claim_folder(tmp_path / "run", plan, record="preset.json", what="reproduction") is None



def test_library_harvest_refuses_a_negative_outlier_factor(tiny_model, corpus, tmp_path):
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.errors import CrosslayerError
    from crosslayer.harvest import harvest

    windows = make_windows(load_corpus(corpus), tiny_model.tokenizer, seq_len=32, n_tokens=256)
    with pytest.raises(CrosslayerError, match="outlier_factor must be > 0"):
        harvest(tiny_model, windows, out_dir=tmp_path / "s", outlier_factor=-1, progress=False)
    assert not (tmp_path / "s").exists()


def test_steer_refuses_a_prompt_longer_than_the_context(tiny_store, tmp_path, capsys):
    random_saes(tiny_store, width=32, k=4).save(tmp_path / "dict")
    capsys.readouterr()
    assert main(["steer", "the cat " * 600, "--dictionary", str(tmp_path / "dict"), "--feature", "0",
                 "--value", "1", "--tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "exceeds the context" in err[0], err
