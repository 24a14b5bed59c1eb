"""Model loading: the embedded SmolLM2 against transformers' own GGUF model, caching, tiny models."""

import subprocess
import sys

import pytest
import torch

from crosslayer import CrosslayerError
from crosslayer.models import load_model, load_tokenizer, tokenize_padded

PARAGRAPH = (
    "The history of the city goes back to Roman times, when a small settlement was founded on the "
    "banks of the river. Over the following centuries it grew into an important centre of trade, and "
    "by the Middle Ages its markets attracted merchants from across the region. Today the old town is "
    "known for its narrow streets, its cathedral and its many museums, which draw visitors from all "
    "over the world.")


def test_unknown_model_is_a_clear_error():
    with pytest.raises(CrosslayerError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


def test_hub_model_offline_names_the_default(monkeypatch):
    import crosslayer.models as models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(CrosslayerError, match="cannot be downloaded here.*smollm2-135m"):
        load_model("gpt2")


@pytest.mark.slow
def test_cli_unknown_model_exits_nonzero_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "crosslayer.cli", "inspect", "--model", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "unknown model 'nope'" in lines[0]


def test_bad_tiny_name_and_dtype():
    with pytest.raises(CrosslayerError, match="bad tiny model"):
        load_model("tiny-2l-20d")
    with pytest.raises(CrosslayerError, match="unknown dtype"):
        load_model("tiny-2l-64d", dtype="int8")


def test_tiny_model_is_deterministic_and_runs_in_both_dtypes(tiny_model):
    a, b = tiny_model, load_model("tiny-2l-64d")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    tokens = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        logits32 = a(tokens)
        logits16 = load_model("tiny-2l-64d", dtype="bfloat16")(tokens)
    assert logits32.shape == (2, 16, a.cfg.d_vocab) and logits16.dtype == torch.bfloat16
    assert torch.allclose(logits32, logits16.float(), atol=0.1)
    assert a.cfg.n_layers == 2 and a.cfg.d_model == 64
    assert load_model("tiny-3l-32d").cfg.n_layers == 3


def test_tokenizer_round_trips_and_adds_no_bos():
    tok = load_tokenizer()
    text = "Hello, world! def f(x): return x ** 2  # ünïcödé 1234"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] not in (0, 1, 2)
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_tokenize_padded_right_pads_without_bos(tiny_model):
    texts = ["one", "The capital of France is", "a b"]
    tokens_BT, lengths = tokenize_padded(tiny_model, texts)
    singles = [tiny_model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert lengths == [len(ids) for ids in singles] and tokens_BT.shape == (3, max(lengths))
    for row, ids in zip(tokens_BT.tolist(), singles):
        assert row == ids + [0] * (tokens_BT.shape[1] - len(ids))
    for bad in ([], ["fine", ""], ["  "], [None]):
        with pytest.raises(CrosslayerError):
            tokenize_padded(tiny_model, bad)


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_model(smollm2):
    from transformers import AutoModelForCausalLM

    from crosslayer.models import gguf_path

    tokens = smollm2.to_tokens(PARAGRAPH, prepend_bos=False)
    path = gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        ours = smollm2(tokens)
        theirs = hf(tokens).logits
    loss_ours = torch.nn.functional.cross_entropy(ours[0, :-1], tokens[0, 1:]).item()
    loss_theirs = torch.nn.functional.cross_entropy(theirs[0, :-1], tokens[0, 1:]).item()
    assert abs(loss_ours - loss_theirs) < 0.1
    assert 1.5 < loss_ours < 2.6  # a Q/K permutation bug gives ~4.3
    assert (ours - theirs).abs().max().item() < 1e-3


@pytest.mark.slow
def test_smollm2_knows_paris_and_runs_in_bfloat16(smollm2):
    from crosslayer.scoring import greedy

    assert greedy(smollm2, "The capital of France is", max_new_tokens=2).startswith(" Paris")
    bf16 = load_model("smollm2-135m", dtype="bfloat16")
    tokens = smollm2.to_tokens(PARAGRAPH, prepend_bos=False)
    with torch.no_grad():
        loss = bf16(tokens, return_type="loss").float().item()
    assert 1.5 < loss < 2.6


@pytest.mark.slow
def test_cached_weights_equal_a_fresh_conversion(smollm2, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import crosslayer.models as models

    fresh_meta, fresh = models._convert_gguf(models.gguf_path())
    folder = models.build_smollm2_cache()
    cached = load_file(str(folder / "model.safetensors"))
    assert set(fresh) == set(cached)
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    # a corrupted cache is rebuilt, not trusted
    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path))
    folder = models.build_smollm2_cache()
    (folder / "model.safetensors").write_bytes(b"garbage")
    rebuilt = load_model("smollm2-135m")
    tokens = smollm2.to_tokens(PARAGRAPH, prepend_bos=False)
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), smollm2(tokens))
