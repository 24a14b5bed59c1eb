"""Interventions: exactness of the error-term patch, predicted logit change, generation, bad input."""

import numpy as np
import pytest
import torch

from crosslayer import CrosslayerError
from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.interventions import Edit, deltas, generate, run_with_edits, steer


def make_crosscoder(store, layers, seed=0, n_features=48):
    idx = [store.layers.index(l) for l in layers]
    cc = Crosscoder(CrosscoderConfig(layers=tuple(layers), d_model=store.width, n_features=n_features,
                                     activation="relu"),
                    hooks=[store.hooks[i] for i in idx], norm_factors=store.norm_factors[idx], seed=seed)
    with torch.no_grad():
        cc.b_enc.fill_(0.5)  # make most features fire so clamps change something
    return cc


@pytest.fixture(scope="module")
def tokens(tiny_store):
    return tiny_store.window_tokens()[:2, :12]


def test_unchanged_values_leave_logits_unchanged(tiny_model, tiny_store, tokens):
    cc = make_crosscoder(tiny_store, [0, 1])
    clean = tiny_model(tokens)
    for edit in (Edit(3, "scale", 1.0), Edit(5, "add", 0.0)):
        assert torch.allclose(run_with_edits(tiny_model, cc, tokens, [edit]), clean, atol=1e-5)


def test_patch_keeps_the_error_term(tiny_model, tiny_store, tokens):
    cc = make_crosscoder(tiny_store, [0, 1])
    delta, feats = deltas(tiny_model, cc, tokens, [Edit(7, "clamp", 3.0)])
    _, cache = tiny_model.run_with_cache(tokens)
    x = torch.stack([cache[h] for h in cc.hooks], dim=2).reshape(-1, 2, tiny_store.width)
    f = cc.encode(x, normalized=False)
    f_new = f.clone()
    f_new[:, 7] = 3.0
    want = cc.decode(f_new, normalized=False) + (x - cc.decode(f, normalized=False))
    got = (x + delta.reshape(-1, 2, tiny_store.width))
    first = torch.arange(x.shape[0]) % tokens.shape[1] == 0
    assert torch.allclose(got[~first], want[~first], atol=1e-4)
    assert torch.equal(got[first], x[first])  # the attention sink is never edited
    # the crosscoder writes both layers: the delta at each is (v - f) d_7^l / factor_l
    for i in range(2):
        d = cc.W_dec_masked()[7, i].detach() / cc.norm_factors[i]
        expect = (3.0 - f[:, 7])[:, None] * d
        assert torch.allclose(delta.reshape(-1, 2, tiny_store.width)[~first, i], expect[~first], atol=1e-4)


def test_clamp_at_the_last_layer_moves_logits_by_the_predicted_amount(tiny_model, tiny_store, tokens):
    last = tiny_model.cfg.n_layers - 1
    cc = make_crosscoder(tiny_store, [last])
    feature, value = 11, 4.0
    _, cache = tiny_model.run_with_cache(tokens)
    x = cache[f"blocks.{last}.hook_resid_post"]
    f = cc.encode(x.reshape(-1, 1, tiny_store.width), normalized=False)[:, feature].reshape(x.shape[:2])
    direction = cc.W_dec_masked()[feature, 0].detach() / cc.norm_factors[0]
    shift = (value - f)[..., None] * direction
    shift[:, 0] = 0
    predicted = tiny_model.unembed(tiny_model.ln_final(x + shift))
    got = run_with_edits(tiny_model, cc, tokens, [Edit(feature, "clamp", value)])
    assert (got - tiny_model(tokens)).abs().max() > 1e-3  # the clamp does something
    assert torch.allclose(got, predicted, atol=1e-4)


def test_steer_table_with_per_layer_saes(tiny_model, tiny_store):
    from conftest import random_saes

    saes = random_saes(tiny_store)
    prompt = "the cat sat on a mat while rivers flow"
    edits = [Edit(100, "clamp", 8.0)]
    table, summary = steer(tiny_model, saes, prompt, edits, top=5)
    assert list(table.direction.unique()) == ["up", "down"] and len(table) == 10
    assert np.isclose(table.p_steered - table.p_clean, table.delta_p, atol=1e-6).all()
    tokens = tiny_model.to_tokens(prompt, prepend_bos=False)
    with torch.no_grad():
        clean = torch.log_softmax(tiny_model(tokens)[0, -1].float(), -1)
        steered = torch.log_softmax(run_with_edits(tiny_model, saes, tokens, edits)[0, -1].float(), -1)
        cached = tiny_model.run_with_cache(tokens)[1]
        feats = saes.encode(torch.stack([cached[h][0, -1] for h in saes.hooks])[None], normalized=False)
    diff = steered.exp() - clean.exp()
    assert table[table.direction == "up"].token_id.tolist() == diff.topk(5).indices.tolist()
    assert summary["kl"] == pytest.approx(float((clean.exp() * (clean - steered)).sum()), rel=1e-5)
    assert summary["kl"] > 1e-6  # the clamp changes the prediction
    assert summary["clean_activation"][100] == pytest.approx(float(feats[0, 100]), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_generation_is_seeded_and_steerable(tiny_model, tiny_store):
    from conftest import random_saes

    saes = random_saes(tiny_store)
    prompt = "the cat sat on a mat while rivers flow"
    clean_a = generate(tiny_model, None, prompt, max_new_tokens=6, seed=3)
    clean_b = generate(tiny_model, saes, prompt, [], max_new_tokens=6, seed=3)
    assert clean_a == clean_b  # same seed, no edit -> same continuation
    steered_text = generate(tiny_model, saes, prompt, [Edit(100, "clamp", 50.0)], max_new_tokens=6, seed=3)
    assert steered_text != clean_a  # a strong clamp changes the sampled continuation


def test_bad_input(tiny_model, tiny_store, tokens):
    from crosslayer.models import load_model

    cc = make_crosscoder(tiny_store, [0, 1])
    with pytest.raises(CrosslayerError, match="out of range"):
        run_with_edits(tiny_model, cc, tokens, [Edit(10_000, "clamp", 1.0)])
    with pytest.raises(CrosslayerError, match="unknown intervention"):
        Edit(1, "boost", 1.0)
    with pytest.raises(CrosslayerError, match="has d_model 32, the dictionary 64"):
        run_with_edits(load_model("tiny-2l-32d"), cc, tokens, [Edit(1, "clamp", 1.0)])
    with pytest.raises(CrosslayerError, match="no features"):
        run_with_edits(tiny_model, cc, tokens, [])
