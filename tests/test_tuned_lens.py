"""Tuned lens: parity of its float32 decoder with the model's own final norm and unembedding, an
untrained lens is the logit lens, training lowers held-out KL (with document-bootstrap intervals),
save/load round trip, and the CLI."""

import numpy as np
import pytest
import torch

from crosslayer.cli import main
from crosslayer.corpus import load_corpus, make_windows
from crosslayer.errors import CrosslayerError
from crosslayer.lens import _hook_name, decode_layer, logit_lens
from crosslayer.tuned_lens import FloatDecoder, TunedLens, TunedLensConfig, lens_kl_by_layer, train_tuned_lens

from conftest import make_toy_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(make_toy_corpus(tmp_path_factory.mktemp("lens") / "toy.jsonl", n_docs=200))


def test_float_decoder_equals_the_models_own_decoding(tiny_model):
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (2, 9))
    _, cache = tiny_model.run_with_cache(tokens)
    for layer in (-1, 0, 1):
        resid = cache[_hook_name(layer)]
        torch.testing.assert_close(FloatDecoder(tiny_model)(resid), decode_layer(tiny_model, resid),
                                   atol=2e-5, rtol=1e-5)


def test_an_untrained_tuned_lens_is_the_logit_lens(tiny_model):
    lens = TunedLens([-1, 0], tiny_model.cfg.d_model, {"model": tiny_model.cfg.model_name})
    prompts = ["the cat sat on a mat", "rivers flow"]
    plain, tuned = logit_lens(tiny_model, prompts, layers=[-1, 0, 1]), logit_lens(tiny_model, prompts, tuned=lens,
                                                                                    layers=[-1, 0, 1])
    assert (plain.top1_token == tuned.top1_token).all()
    np.testing.assert_allclose(plain.kl_final, tuned.kl_final, atol=1e-4)
    assert (tuned[tuned.layer == 1].kl_final.abs() < 1e-4).all()  # the last layer needs no translator


def test_training_lowers_heldout_kl_below_the_logit_lens(tiny_model, corpus, tmp_path):
    train = make_windows(corpus, tiny_model.tokenizer, split="train", seq_len=32, n_tokens=4000)
    held = make_windows(corpus, tiny_model.tokenizer, split="heldout", seq_len=32, n_tokens=1500)
    cfg = TunedLensConfig(steps=60, batch_windows=8, positions=128, lr=3e-3)
    lens = train_tuned_lens(tiny_model, train, cfg=cfg, progress=False)
    assert lens.layers == [-1, 0]
    first, last = lens.meta["train_kl_first_last"]
    assert last < first
    table = lens_kl_by_layer(tiny_model, held, lens, n_boot=200).set_index(["layer", "lens"])
    for layer in lens.layers:  # held-out, the tuned lens beats the logit lens: the paired CI is below 0
        diff = table.loc[(layer, "tuned_minus_logit")]
        assert diff.kl_hi < 0, (layer, diff)
        assert table.loc[(layer, "logit")].kl_lo <= table.loc[(layer, "logit")].kl <= table.loc[(layer, "logit")].kl_hi
    loaded = TunedLens.load(lens.save(tmp_path / "lens"))
    x = torch.randn(5, tiny_model.cfg.d_model)
    torch.testing.assert_close(loaded.translate(0, x), lens.translate(0, x))
    assert loaded.meta["model"] == tiny_model.cfg.model_name


def test_a_lens_of_another_model_or_layer_is_refused(tiny_model):
    lens = TunedLens([0], tiny_model.cfg.d_model + 1, {"model": "other"})
    with pytest.raises(CrosslayerError, match="train one for this model"):
        logit_lens(tiny_model, "the cat", tuned=lens)
    with pytest.raises(CrosslayerError, match="no translator for layer 3"):
        TunedLens([0], 4).translate(3, torch.zeros(1, 4))
    with pytest.raises(CrosslayerError, match="not a tuned lens"):
        TunedLens.load("/nonexistent")


def test_cli_trains_a_lens_and_the_lens_verb_reads_it(tmp_path, capsys):
    corpus = make_toy_corpus(tmp_path / "toy.jsonl", n_docs=60)
    out = tmp_path / "lens"
    assert main(["train-lens", "--model", "tiny-2l-64d", "--corpus", str(corpus), "--seq-len", "32", "--out",
                 str(out), "--steps", "5", "--positions", "32", "--heldout-tokens", "256"]) == 0
    assert (out / "heldout_kl.csv").is_file() and "held-out KL" in capsys.readouterr().out
    assert main(["lens", "the cat sat", "--model", "tiny-2l-64d", "--tuned", str(out)]) == 0
    assert main(["lens", "the cat sat", "--model", "tiny-2l-64d", "--tuned", str(tmp_path / "nope")]) == 2
    assert main(["train-lens", "--model", "tiny-2l-64d", "--out", str(out), "--lr", "nan"]) == 2


@pytest.mark.slow
def test_on_smollm2_the_tuned_lens_beats_the_logit_lens_at_middle_layers(smollm2):
    """The issue's check, on the embedded model and the builtin corpus: at middle layers a short training
    lowers held-out KL(final || layer) below the logit lens's, with a paired document-bootstrap CI."""
    corpus = load_corpus("builtin")
    middle = [10, 15]
    train = make_windows(corpus, smollm2.tokenizer, split="train", seq_len=64, n_tokens=40 * 4 * 64)
    held = make_windows(corpus, smollm2.tokenizer, split="heldout", seq_len=64, n_tokens=4096)
    lens = train_tuned_lens(smollm2, train, layers=middle,
                            cfg=TunedLensConfig(steps=40, batch_windows=4, positions=128, lr=1e-3), progress=False)
    table = lens_kl_by_layer(smollm2, held, lens, n_boot=200).set_index(["layer", "lens"])
    for layer in middle:
        assert table.loc[(layer, "tuned_minus_logit")].kl_hi < 0, table.loc[layer]
