"""Interventions: exactness of the error-term patch, predicted logit change, where a multi-layer feature is
edited (first / peak / each, against planted ground truth), generation, bad input."""

import numpy as np
import pytest
import torch

from crosslayer import CrosslayerError
from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.hooks import hook_name
from crosslayer.interventions import (AT, DEFAULT_AT, Edit, deltas, edit_hooks, edit_layers, generate, plan_edits,
                                      run_with_edits, steer)


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
        for at in AT:
            assert torch.allclose(run_with_edits(tiny_model, cc, tokens, [edit], at=at), clean, atol=1e-5)


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
    for at in AT:  # one written layer: every mode edits it
        got = run_with_edits(tiny_model, cc, tokens, [Edit(feature, "clamp", value)], at=at)
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
    assert summary["at"] == DEFAULT_AT and summary["layers"] == {100: [saes.layers[1]]}
    _, first = steer(tiny_model, saes, prompt, edits, top=5, at="first")
    assert first["at"] == "first" and first["kl"] == pytest.approx(summary["kl"], rel=1e-4)


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
    with pytest.raises(CrosslayerError, match="unknown edit site"):
        run_with_edits(tiny_model, cc, tokens, [Edit(1, "clamp", 1.0)], at="last")


# ------------------------------------------------------------------ where a multi-layer feature is edited

LAYERS4 = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def model4():
    from crosslayer.models import load_model

    return load_model("tiny-4l-64d")


def planted_crosscoder(profiles: dict[int, list[float]], factors=(1.0, 0.5, 2.0, 1.5)):
    """An acausal crosscoder on all four layers of ``model4``; feature i's decoder is ``profiles[i][l] * u_i``
    at layer l (normalised units, u_i a random unit vector), the others keep their random init."""
    cc = Crosscoder(CrosscoderConfig(layers=LAYERS4, d_model=64, n_features=16, activation="relu"),
                    norm_factors=list(factors), seed=1)
    with torch.no_grad():
        cc.b_enc.fill_(0.5)
        for i, profile in profiles.items():
            u = torch.randn(64)
            cc.W_dec[i] = torch.tensor(profile)[:, None] * u / u.norm()
    return cc


def add_at(layer, delta_BTLD):
    """A hook adding ``delta_BTLD``'s slice at ``layer`` to that layer's residual."""
    return hook_name("resid_post", layer), lambda act, hook: act + delta_BTLD[:, :, layer]


def residuals(model, tokens, hooks):
    """``[B, T, 4, d]`` residuals of ``model`` run with ``hooks`` (read after them)."""
    got = {}
    reads = [(hook_name("resid_post", l), lambda act, hook: got.__setitem__(hook.name, act.clone())) for l in LAYERS4]
    model.run_with_hooks(tokens, fwd_hooks=hooks + reads)
    return torch.stack([got[hook_name("resid_post", l)] for l in LAYERS4], dim=2)


def test_flat_feature_each_gives_the_intended_delta_first_the_propagated_one(model4, tokens):
    cc = planted_crosscoder({3: [0.0, 1.0, 1.0, 1.0]})  # flat over layers 1..3, nothing at 0
    edits = [Edit(3, "clamp", 5.0)]
    intended, _ = deltas(model4, cc, tokens, edits)  # decode(f') - decode(f) at every layer
    assert intended[:, :, 0].abs().max() == 0 and (intended[:, 1:, 1:].norm(dim=-1) > 0.1).all()
    clean = residuals(model4, tokens, [])

    def diff(at):
        return residuals(model4, tokens, edit_hooks(cc, plan_edits(model4, cc, tokens, edits, at=at))) - clean

    # each: every written layer, the last included, differs from the clean run by exactly the intended delta
    assert torch.allclose(diff("each"), intended, atol=1e-5)
    # first: the layer-1 delta alone, carried by the model; at layer 3 that is not the intended delta
    first = diff("first")
    propagated = residuals(model4, tokens, [add_at(1, intended)]) - clean
    assert torch.allclose(first, propagated, atol=1e-5)
    assert (first[:, 1:, 3] - intended[:, 1:, 3]).abs().max() > 0.1
    assert torch.equal(diff("peak"), first)  # a flat profile peaks (first of the ties) at its first layer
    # the old behaviour (intended delta added at every written layer in one pass) compounds
    naive = residuals(model4, tokens, [add_at(l, intended) for l in (1, 2, 3)]) - clean
    assert (naive[:, 1:, 3] - intended[:, 1:, 3]).abs().max() > 0.1
    along = intended[:, 1:, 3] / intended[:, 1:, 3].norm(dim=-1, keepdim=True)
    ratio = (naive[:, 1:, 3] * along).sum(-1) / intended[:, 1:, 3].norm(dim=-1)
    assert ratio.mean() > 2  # several times the intended edit along the feature's direction


def test_edit_sites_and_how_several_features_combine(model4, tokens):
    cc = planted_crosscoder({3: [0.0, 1.0, 1.0, 1.0], 5: [0.3, 1.0, 2.0, 0.1]})  # 5 writes 0..2 (0.1 < 0.1 * 2)
    T, F = True, False
    assert edit_layers(cc, [5, 3], "first").tolist() == [[T, F, F, F], [F, T, F, F]]
    assert edit_layers(cc, [5, 3], "peak").tolist() == [[F, F, T, F], [F, T, F, F]]
    assert edit_layers(cc, [5, 3], "each").tolist() == [[T, T, T, F], [F, T, T, T]]
    edits = [Edit(5, "clamp", 4.0), Edit(3, "add", 2.0)]
    own = {e.feature: deltas(model4, cc, tokens, [e])[0] for e in edits}
    # first / peak: each feature's own delta at its own layer, on the stream the earlier edits changed
    for at, (l5, l3) in {"first": (0, 1), "peak": (2, 1)}.items():
        manual = model4.run_with_hooks(tokens, fwd_hooks=[add_at(l5, own[5]), add_at(l3, own[3])])
        assert torch.allclose(run_with_edits(model4, cc, tokens, edits, at=at), manual, atol=1e-5)
    # each: layers 0..3 pinned to clean + the summed delta of all edits (5's small delta at 3 included)
    total, _ = deltas(model4, cc, tokens, edits)
    assert torch.allclose(total, own[5] + own[3], atol=1e-5)
    pinned = residuals(model4, tokens, edit_hooks(cc, plan_edits(model4, cc, tokens, edits, at="each")))
    assert torch.allclose(pinned - residuals(model4, tokens, []), total, atol=1e-5)
    # ... so downstream it is the last pinned layer alone
    last_only = model4.run_with_hooks(tokens, fwd_hooks=[add_at(3, total)])
    assert torch.allclose(run_with_edits(model4, cc, tokens, edits, at="each"), last_only, atol=1e-5)


def test_modes_coincide_for_per_layer_sae_features(tiny_model, tiny_store, tokens):
    from conftest import random_saes

    saes = random_saes(tiny_store)  # features 0..95 read layer 0, 96..191 layer 1
    clean = tiny_model(tokens)
    for edits in ([Edit(5, "clamp", 8.0)], [Edit(100, "clamp", 8.0), Edit(120, "scale", 3.0)]):
        logits = {at: run_with_edits(tiny_model, saes, tokens, edits, at=at) for at in AT}
        assert (logits["each"] - clean).abs().max() > 1e-3
        for at in ("first", "peak"):
            assert torch.allclose(logits[at], logits["each"], atol=1e-5)
    # features at different layers: first and peak add both; each would pin layer 1 and erase feature 5's edit
    mixed = [Edit(5, "clamp", 8.0), Edit(100, "clamp", 8.0)]
    assert torch.allclose(run_with_edits(tiny_model, saes, tokens, mixed, at="first"),
                          run_with_edits(tiny_model, saes, tokens, mixed, at="peak"), atol=1e-5)
    with pytest.raises(CrosslayerError, match=r"feature\(s\) \[5\] do not write it"):
        run_with_edits(tiny_model, saes, tokens, mixed, at="each")
