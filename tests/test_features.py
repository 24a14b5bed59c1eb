import pytest
import torch
from conftest import random_saes

from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.errors import CrosslayerError
from crosslayer.features import (FOCUS_MARK, HIST_BINS, HIST_LOG10_RANGE, dashboard, decoder_profile,
                                 find_features_for_token, logit_effects, profile_stats, top_activations)


def random_crosscoder(store, width=64, k=8):
    cfg = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=width, k=k)
    return Crosscoder(cfg, hooks=store.hooks, norm_factors=store.norm_factors, seed=3)


@pytest.fixture(params=["saes", "crosscoder"])
def dictionary(request, tiny_store):
    return random_saes(tiny_store, width=48) if request.param == "saes" else random_crosscoder(tiny_store)


def brute_force(dictionary, store):
    x = store.get(list(range(store.n_rows)), layers=dictionary.layers, normalized=False)
    with torch.no_grad():
        return dictionary.encode(x, normalized=False)


def test_streaming_topk_density_hist_match_brute_force(dictionary, tiny_store, tiny_model):
    feats_NF = brute_force(dictionary, tiny_store)
    fire_F = (feats_NF > 0).sum(0)
    chosen = [int(f) for f in fire_F.argsort(descending=True)[:3]] + [int(fire_F.argmin())]
    k = 7
    res = top_activations(dictionary, tiny_store, chosen, k=k, batch_size=97, tokenizer=tiny_model.tokenizer)
    for f in chosen:
        col = feats_NF[:, f]
        n_pos = int((col > 0).sum())
        vals, rows = col.topk(min(k, n_pos))
        top = res.examples[(res.examples.feature == f) & (res.examples.kind == "top")].sort_values("rank")
        assert len(top) == min(k, n_pos)
        assert top.activation.tolist() == pytest.approx(vals.tolist(), rel=1e-4, abs=1e-5)
        assert top.row.tolist() == rows.tolist()
        st = res.stats[res.stats.feature == f].iloc[0]
        assert st.n_fire == n_pos and st.density == pytest.approx(n_pos / tiny_store.n_rows)
        lo, hi = HIST_LOG10_RANGE
        pos = col[col > 0]
        bins = ((pos.log10() - lo) / (hi - lo) * HIST_BINS).floor().long().clamp(0, HIST_BINS - 1)
        hist = res.histogram[res.histogram.feature == f].sort_values("bin")["count"].tolist()
        assert hist == torch.bincount(bins, minlength=HIST_BINS).tolist()
        quant = res.examples[(res.examples.feature == f) & (res.examples.kind == "quantile")]
        for row, act in zip(quant.row, quant.activation):  # quantile examples are real firing rows
            assert col[row] > 0 and act == pytest.approx(float(col[row]), rel=1e-4, abs=1e-5)
        if n_pos >= 8:
            bands = quant.groupby("band").activation.max().sort_index().tolist()
            assert bands == sorted(bands)
    # per-token activations of every example's context equal the brute force over the window's rows
    flat_all = tiny_store.flat_index(range(tiny_store.n_rows))
    row_of = {int(fl): r for r, fl in enumerate(flat_all)}
    for ex in res.examples.itertuples():
        win_pos = int(flat_all[ex.row]) - ex.focus
        assert len(ex.context_acts) == len(ex.context_tokens)
        assert ex.context_acts[ex.focus] == pytest.approx(ex.activation, rel=1e-4, abs=1e-5)
        for j, act in enumerate(ex.context_acts):
            r = row_of.get(win_pos + j)
            if r is None:
                assert act != act  # position not stored (e.g. position 0): NaN
            else:
                assert act == pytest.approx(float(feats_NF[r, ex.feature]), rel=1e-4, abs=1e-5)
    ex = res.examples.iloc[0]
    assert "".join(ex.context_tokens) == tiny_model.tokenizer.decode(tiny_store.context(ex.row, before=16, after=4)["token_ids"])
    assert FOCUS_MARK[0] + ex.token + FOCUS_MARK[1] in ex.context.replace("\\n", "\n")
    assert ex.token_id == int(tiny_store.meta([ex.row])["token_id"][0])
    assert ex.label in tiny_store.label_names


def test_logit_effects_equal_direct_computation(dictionary, tiny_model):
    f = 5
    table = logit_effects(dictionary, tiny_model, f, k=4)
    W_U = tiny_model.W_U.detach() * tiny_model.ln_final.w.detach()[:, None]
    writes = [l for i, l in enumerate(dictionary.layers) if dictionary.writes_FL()[f, i]]
    assert writes == (dictionary.layers if isinstance(dictionary, Crosscoder) else [dictionary.layers[0]])
    assert sorted(set(table.layer)) == writes
    assert table[table.is_last].layer.unique().tolist() == [writes[-1]]
    for layer in writes:
        i = dictionary.layers.index(layer)
        effect = (dictionary.decoder_vectors(layer)[f] / dictionary.norm_factors[i]) @ W_U
        up = table[(table.layer == layer) & (table.direction == "up")].sort_values("rank")
        down = table[(table.layer == layer) & (table.direction == "down")].sort_values("rank")
        assert up.token_id.tolist() == effect.topk(4).indices.tolist()
        assert up.effect.tolist() == pytest.approx(effect.topk(4).values.tolist(), rel=1e-4)
        assert down.token_id.tolist() == (-effect).topk(4).indices.tolist()
        assert down.effect.tolist() == pytest.approx(effect[(-effect).topk(4).indices].tolist(), rel=1e-4)


def test_profile_stats_planted_snapshots():
    """Snapshots [S, F, L] as a float16 array (what training writes): norms on one layer give span 1, entropy 0 and
    that peak; flat norms span L with entropy 1; each snapshot's statistics are those of its own [F, L] slice."""
    import numpy as np

    L = 5
    one = np.zeros((3, L), np.float16)
    one[np.arange(3), [0, 2, 4]] = [0.08, 1.5, 3.0]
    flat = np.full((3, L), 0.08, np.float16)
    snaps = np.stack([np.concatenate([one, flat]), np.concatenate([flat, one])])
    peak_norm, peak, r, span, ent = profile_stats(snaps)
    assert span.tolist() == [[1] * 3 + [L] * 3, [L] * 3 + [1] * 3]
    assert peak[0, :3].tolist() == [0, 2, 4] and peak[1, 3:].tolist() == [0, 2, 4]
    torch.testing.assert_close(ent[0], torch.tensor([0.0] * 3 + [1.0] * 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(peak_norm[0, :3], torch.tensor([0.08, 1.5, 3.0]), rtol=1e-3, atol=0)
    for s in range(2):
        torch.testing.assert_close(profile_stats(torch.as_tensor(snaps[s]).float())[4], ent[s])
    assert profile_stats(np.zeros((2, L)))[3].tolist() == [0, 0]  # an all-zero decoder spans nothing


def test_decoder_profile_known_norms():
    cc = Crosscoder(CrosscoderConfig(layers=(0, 2, 4, 6), d_model=8, n_features=3, k=1))
    base = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    norms = torch.tensor([[0.0, 1.0, 0.05, 0.5],   # peak 2, span 2 (0.05 < tau)
                          [2.0, 2.0, 2.0, 2.0],    # flat: entropy 1, span 4
                          [0.0, 0.0, 0.0, 3.0]])   # one layer: entropy 0, span 1
    with torch.no_grad():
        cc.W_dec.copy_(base[:, None, :] * norms[..., None])
        cc.W_dec[0, 3] = -cc.W_dec[0, 3]  # feature 0 flips direction at layer 6
    prof = decoder_profile(cc).set_index("feature")
    assert prof.peak_layer.tolist() == [2, 0, 6]
    assert prof.span.tolist() == [2, 4, 1]
    assert prof.loc[1, "entropy"] == pytest.approx(1.0) and prof.loc[2, "entropy"] == pytest.approx(0.0, abs=1e-6)
    assert prof.loc[0, "r_6"] == pytest.approx(0.5) and prof.loc[0, "r_4"] == pytest.approx(0.05)
    assert prof.loc[0, "drift_min"] == pytest.approx(-1.0, abs=1e-5)
    assert prof.loc[1, "drift_mean"] == pytest.approx(1.0, abs=1e-5)
    assert prof.loc[2, "drift_mean"] == 1.0


def test_find_features_for_token_finds_planted_feature(dictionary, tiny_model):
    tok = tiny_model.tokenizer.encode(" scam", add_special_tokens=False)
    assert len(tok) == 1
    u = tiny_model.W_U.detach()[:, tok[0]] * tiny_model.ln_final.w.detach()
    i = dictionary.n_layers - 1
    with torch.no_grad():
        if isinstance(dictionary, Crosscoder):
            f = 17
            dictionary.W_dec[f, i] = u / u.norm() * 3.0
        else:
            start = sum(dictionary.widths[:i])
            f = start + 9
            dictionary.saes[i].W_dec[9] = u / u.norm() * 3.0
    table = find_features_for_token(dictionary, tiny_model, " scam", top=5)
    assert table.feature.iloc[0] == f and table.layer.iloc[0] == dictionary.layers[i]
    assert table.cosine.iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert table.effect.is_monotonic_decreasing


def test_dashboard_text(tiny_store, tiny_model):
    cc = random_crosscoder(tiny_store)
    text = dashboard(cc, tiny_store, tiny_model, 3, k=3, n_logits=3)
    col = brute_force(cc, tiny_store)[:, 3]
    n_fire = int((col > 0).sum())
    assert f"({n_fire:,} of {tiny_store.n_rows:,} rows), max {float(col.max()):.4g}" in text
    top_lines = text.split("top activations")[1].split("quantile examples")[0].strip().splitlines()[1:]
    assert [float(line.split()[0]) for line in top_lines] == pytest.approx(col.topk(3).values.tolist(), abs=1e-3)
    assert "[[█" in top_lines[0]  # the top example's own token is shaded at the maximum
    W_U = tiny_model.W_U.detach() * tiny_model.ln_final.w.detach()[:, None]
    last = tiny_store.layers[-1]
    best = int(((cc.decoder_vectors(last, normalized=False)[3]) @ W_U).argmax())
    up_last = [line for line in text.splitlines() if line.startswith(f"logits   up @ layer {last}")]
    assert up_last and up_last[0].split(": ", 1)[1].startswith(repr(tiny_model.tokenizer.decode([best])))


def test_shade_context():
    from crosslayer.features import shade_context

    text = shade_context(["a", " b", " c", "\n"], [float("nan"), 0.0, 2.0, 1.0], focus=2)
    assert text == "a b[[█ c]]▒\\n"


def test_bad_input(tiny_store, tiny_model):
    cc = random_crosscoder(tiny_store)
    for call in (lambda: top_activations(cc, tiny_store, [cc.n_features], tokenizer=tiny_model.tokenizer),
                 lambda: logit_effects(cc, tiny_model, -1),
                 lambda: decoder_profile(cc, features=[10**6]),
                 lambda: top_activations(cc, tiny_store, [], tokenizer=tiny_model.tokenizer)):
        with pytest.raises(CrosslayerError) as err:
            call()
        assert "\n" not in str(err.value)
    wrong = Crosscoder(CrosscoderConfig(layers=(max(tiny_store.layers) + 5,), d_model=tiny_store.width,
                                        n_features=8, k=2))
    with pytest.raises(CrosslayerError, match="lacks"):
        top_activations(wrong, tiny_store, [0], tokenizer=tiny_model.tokenizer)
    narrow = Crosscoder(CrosscoderConfig(layers=tuple(tiny_store.layers), d_model=tiny_store.width // 2,
                                         n_features=8, k=2), hooks=tiny_store.hooks)
    with pytest.raises(CrosslayerError, match="width"):
        top_activations(narrow, tiny_store, [0], tokenizer=tiny_model.tokenizer)
    with pytest.raises(CrosslayerError, match="d_model"):
        logit_effects(narrow, tiny_model, 0)
    with pytest.raises(CrosslayerError, match="one token"):
        find_features_for_token(cc, tiny_model, " scamming artists everywhere")
