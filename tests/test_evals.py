"""Evaluation suite (crosslayer.evals): metrics against direct torch computations, property tests,
and downstream ground truth with dictionaries whose reconstructions are known exactly.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_saes
from crosslayer.dictionary import Dictionary
from crosslayer.errors import CrosslayerError
from crosslayer.evals import ReconstructionStats, downstream, evaluate, kept_mask


class ScaleDictionary(Dictionary):
    """Ground-truth dictionary: features = the normalised activations, recon_l = scale_l * x_l.

    scale 1 reconstructs perfectly; scale 0 reconstructs zeros (decoder norms 0 at that layer).
    Written outside the package, it also checks that the interface is implementable as documented
    (a scale-0 layer's features read it but write nowhere).
    """

    kind = "test_scale"

    def __init__(self, store, scales):
        super().__init__(layers=store.layers, hooks=store.hooks, norm_factors=store.norm_factors,
                         d_model=store.width)
        self.scales = torch.tensor(scales, dtype=torch.float32)

    @property
    def n_features(self):
        return self.n_layers * self.d_model

    def encode_normalized(self, acts_BLD):
        return acts_BLD.reshape(acts_BLD.shape[0], -1)

    def decode_normalized(self, feats_BF):
        return feats_BF.reshape(-1, self.n_layers, self.d_model) * self.scales[:, None]

    def decoder_norms(self):
        return torch.block_diag(*[s.abs().repeat(self.d_model, 1) for s in self.scales])

    def writes_FL(self):
        return self.decoder_norms() > 0

    def reads_FL(self):
        return torch.block_diag(*[torch.ones(self.d_model, 1, dtype=torch.bool) for _ in self.scales])

    def decoder_vectors_normalized(self, index):
        W_FD = torch.zeros(self.n_features, self.d_model)
        W_FD[index * self.d_model:(index + 1) * self.d_model] = torch.eye(self.d_model) * self.scales[index]
        return W_FD

    def save(self, path):
        raise NotImplementedError

    @classmethod
    def load(cls, path, *, device="cpu"):
        raise NotImplementedError


@pytest.fixture(scope="session")
def tiny(tiny_model, tiny_store):
    return tiny_model, tiny_store


# ----------------------------------------------------------------------------- streaming sums

shapes = st.tuples(st.integers(2, 40), st.integers(1, 3), st.integers(1, 9))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, scale=st.floats(1e-2, 1e3), offset=st.floats(-1e3, 1e3), seed=st.integers(0, 10**6))
def test_fvu_perfect_is_zero_mean_is_one(shape, scale, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset
    perfect = ReconstructionStats(shape[1], shape[2])
    perfect.update(x, x)
    assert torch.allclose(perfect.fvu_L(), torch.zeros(shape[1], dtype=torch.float64))
    mean = ReconstructionStats(shape[1], shape[2])
    mean.update(x, x.mean(0, keepdim=True).expand_as(x))
    assert torch.allclose(mean.fvu_L(), torch.ones(shape[1], dtype=torch.float64), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, noise=st.floats(0.0, 3.0), split=st.integers(1, 39), seed=st.integers(0, 10**6))
def test_streaming_metrics_match_torch(shape, noise, split, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * 3 + 1
    xh = x + noise * torch.randn(*shape, generator=gen)
    stats = ReconstructionStats(shape[1], shape[2])
    split = min(split, shape[0])
    stats.update(x[:split], xh[:split])
    stats.update(x[split:], xh[split:])
    m = stats.compute()
    for l in range(shape[1]):
        err = (x[:, l] - xh[:, l]).double().pow(2)
        var = torch.var(x[:, l].double(), dim=0, unbiased=False).sum()
        assert m["fvu"][l] == pytest.approx(float(err.sum(-1).mean() / var), rel=1e-6, abs=1e-9)
        assert m["mse"][l] == pytest.approx(float(err.mean()), rel=1e-6, abs=1e-12)
        cos = torch.nn.functional.cosine_similarity(x[:, l].double(), xh[:, l].double(), dim=-1, eps=1e-12)
        assert m["cos"][l] == pytest.approx(float(cos.mean()), rel=1e-6)


def test_fvu_by_hand():
    # dim 0: 1, 3, 5 (var 8/3); dim 1: 10, 14, 6 (var 32/3); prediction = mean + 1 in both dims:
    # squared errors per token 10, 10, 26 -> mean 46/3; FVU = (46/3) / (40/3) = 1.15.
    x = torch.tensor([[[1.0, 10.0]], [[3.0, 14.0]], [[5.0, 6.0]]])
    stats = ReconstructionStats(1, 2)
    stats.update(x, torch.tensor([[[4.0, 11.0]]]).expand_as(x))
    assert float(stats.fvu_L()[0]) == pytest.approx(1.15, rel=1e-12)


# ----------------------------------------------------------------------------- evaluate on a store

def test_evaluate_matches_direct_computation(tiny, tmp_path):
    _, store = tiny
    saes = random_saes(store)
    table = evaluate(saes, store, n_tokens=10**9, batch_size=700, out=tmp_path / "eval.csv")
    x = store.get(list(range(store.n_rows)), normalized=False)
    with torch.no_grad():
        feats, recon = saes(x, normalized=False)
    assert table.n_tokens.iloc[0] == store.n_rows
    for i, layer in enumerate(store.layers):
        row = by_layer(table)[0].loc[layer]
        err = (x[:, i] - recon[:, i]).double().pow(2).sum(-1)
        var = torch.var(x[:, i].double(), dim=0, unbiased=False).sum()
        assert row.fvu == pytest.approx(float(err.mean() / var), rel=1e-5)
        assert row.mse == pytest.approx(float(err.mean() / store.width), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(x[:, i], recon[:, i], dim=-1)
        assert row.cos == pytest.approx(float(cos.mean()), rel=1e-4)
        rel = recon[:, i].norm(dim=-1) / x[:, i].norm(dim=-1)
        assert row.rel_norm == pytest.approx(float(rel.mean()), rel=1e-4)
        block = feats[:, i * 96:(i + 1) * 96]
        assert row.l0 == pytest.approx(float((block != 0).sum(-1).double().mean()))
        freq = (block != 0).double().mean(0)
        assert row.dead_frac == pytest.approx(float((freq == 0).double().mean()))
        assert row.dense_frac == pytest.approx(float((freq > 0.1).double().mean()))
    total = table[table.scope == "all"].iloc[0]
    assert total.l0 == pytest.approx(12.0) and total.l0_tuple == pytest.approx(12.0)
    assert total.n_features == 192
    assert pd.read_csv(tmp_path / "eval.csv").shape == table.shape


def test_table_columns_are_typed(tiny, tmp_path):
    _, store = tiny
    table = evaluate(random_saes(store), store, n_tokens=256, out=tmp_path / "eval.csv")
    assert list(table.columns[:4]) == ["kind", "scope", "layer", "hook"]
    assert str(table.layer.dtype) == "Int64"
    assert table.scope.tolist() == ["layer"] * store.n_layers + ["all"]
    assert table.layer.iloc[:-1].tolist() == store.layers and table.layer.isna().tolist()[-1]
    back = pd.read_csv(tmp_path / "eval.csv")
    assert back.scope.tolist() == table.scope.tolist() and back.layer.iloc[:-1].tolist() == store.layers
    assert np.isnan(back.layer.iloc[-1])


def test_evaluate_ground_truth_dictionaries(tiny):
    _, store = tiny
    perfect = evaluate(ScaleDictionary(store, [1.0, 1.0]), store, n_tokens=2000, batch_size=512)
    assert perfect.fvu.abs().max() < 1e-6 and (perfect.cos > 0.999999).all()
    half = evaluate(ScaleDictionary(store, [1.0, 0.0]), store, n_tokens=10**9, batch_size=512)
    rows, overall = by_layer(half)
    x = store.get(list(range(store.n_rows)), layers=[1])[:, 0].double()
    fvu_zero = float(x.pow(2).sum(-1).mean() / torch.var(x, dim=0, unbiased=False).sum())
    assert rows.loc[1, "fvu"] == pytest.approx(fvu_zero, rel=1e-6) and fvu_zero > 1
    # L0 accounting of a general dictionary: every feature of layer 1 fires but writes nowhere.
    d = store.width
    assert overall.l0_feat == pytest.approx(2 * d, rel=1e-3)
    assert overall.l0_tuple == pytest.approx(d, rel=1e-3)
    assert rows.loc[0, "l0"] == pytest.approx(d, rel=1e-3) and rows.loc[1, "l0"] == 0


def by_layer(table):
    """(per-layer rows indexed by model layer, the whole-dictionary row)."""
    return table[table.scope == "layer"].set_index("layer"), table[table.scope == "all"].iloc[0]


def test_layer_mismatch_raises(tiny):
    _, store = tiny
    saes = random_saes(store)
    saes.layers = [0, 5]
    with pytest.raises(CrosslayerError, match=r"lacks \[5\]"):
        evaluate(saes, store)
    saes = random_saes(store)
    saes.meta["store"]["model"] = "smollm2-135m"
    with pytest.raises(CrosslayerError, match="trained on model 'smollm2-135m'"):
        evaluate(saes, store)
    saes = random_saes(store)
    saes.meta["store"]["weights_id"] = "other-weights"
    with pytest.raises(CrosslayerError, match="trained on weights_id 'other-weights'"):
        evaluate(saes, store)


def test_kept_mask_matches_store_and_policy(tiny):
    _, store = tiny
    mask = kept_mask(store, 10)
    tokens = store.window_tokens()[:10]
    assert not mask[:, 0].any()
    special = torch.tensor(store.manifest["exclusion_policy"]["special_token_ids"])
    assert not mask[torch.isin(tokens, special)].any()
    meta = store.meta()
    in_windows = meta["window"] < 10
    assert int(mask.sum()) == int(in_windows.sum())
    assert mask[torch.from_numpy(meta["window"][in_windows]), torch.from_numpy(meta["position"][in_windows])].all()


# ----------------------------------------------------------------------------- downstream ground truth

@torch.no_grad()
def direct_ce(model, tokens, mask, fwd_hooks=()):
    """Mean next-token CE at kept positions, straight from the model."""
    logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    ce = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return float(ce[mask[:, :-1]].mean())


def test_downstream_ground_truth(tiny):
    model, store = tiny
    n_windows = 6
    tokens, mask = store.window_tokens()[:n_windows], kept_mask(store, n_windows)
    table = evaluate(ScaleDictionary(store, [1.0, 1.0]), store, model=model, n_tokens=256,
                     n_windows=n_windows, window_batch_size=4)
    identity, overall = by_layer(table)
    ce_clean = direct_ce(model, tokens, mask)
    assert table.ce_clean.to_numpy() == pytest.approx([ce_clean] * 3, rel=1e-5)
    assert table.ce_recovered.to_numpy() == pytest.approx([1.0] * 3, abs=1e-3)
    assert table.kl.abs().max() < 1e-5
    assert table.ce_spliced.to_numpy() == pytest.approx([ce_clean] * 3, abs=1e-4)

    def zero_kept(act, hook):
        return torch.where(mask[..., None], torch.zeros_like(act), act)

    ce_zero_l1 = direct_ce(model, tokens, mask, [("blocks.1.hook_resid_post", zero_kept)])
    ce_zero_all = direct_ce(model, tokens, mask, [(h, zero_kept) for h in store.hooks])
    assert identity.loc[1, "ce_zero"] == pytest.approx(ce_zero_l1, rel=1e-5)
    assert overall.ce_zero == pytest.approx(ce_zero_all, rel=1e-5)
    assert abs(ce_zero_l1 - ce_clean) > 1e-3  # the denominator of CE recovered is not degenerate

    mixed, _ = by_layer(evaluate(ScaleDictionary(store, [1.0, 0.0]), store, model=model, n_tokens=256,
                                 n_windows=n_windows))
    assert mixed.loc[0, "ce_recovered"] == pytest.approx(1.0, abs=1e-3) and mixed.loc[0, "kl"] < 1e-5
    assert mixed.loc[1, "ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert mixed.loc[1, "kl"] == pytest.approx(mixed.loc[1, "kl_zero"], rel=1e-6)
    assert mixed.loc[1, "kl"] > 1e-3


def test_downstream_rejects_other_weights(tiny):
    model, store = tiny
    saes = random_saes(store)
    model.crosslayer_weights_id, old = "tiny-seeded:other", model.crosslayer_weights_id
    try:
        with pytest.raises(CrosslayerError, match="weights"):
            evaluate(saes, store, model=model, n_tokens=64, n_windows=2)
    finally:
        model.crosslayer_weights_id = old


class LayerwiseScale(ScaleDictionary):
    """The same dictionary declared layerwise: the all-layer splice must run in sequence."""

    layerwise = True

    def reconstruct_layer(self, acts_ND, index, *, normalized=True):
        return acts_ND * self.scales[index]


def test_all_layer_splice_is_sequential_for_layerwise_dictionaries(tiny):
    model, store = tiny
    n_windows = 6
    tokens, mask = store.window_tokens()[:n_windows], kept_mask(store, n_windows)
    scales = [0.5, 0.8]

    def scale_kept(i):
        return lambda act, hook: torch.where(mask[..., None], act * scales[i], act)

    sequential = direct_ce(model, tokens, mask, [(h, scale_kept(i)) for i, h in enumerate(store.hooks)])
    last_only = direct_ce(model, tokens, mask, [(store.hooks[1], scale_kept(1))])
    assert abs(sequential - last_only) > 1e-4  # the two definitions really differ here
    got = evaluate(LayerwiseScale(store, scales), store, model=model, n_tokens=256, n_windows=n_windows)
    assert by_layer(got)[1].ce_spliced == pytest.approx(sequential, rel=1e-5)
    from_clean = evaluate(ScaleDictionary(store, scales), store, model=model, n_tokens=256, n_windows=n_windows)
    assert by_layer(from_clean)[1].ce_spliced == pytest.approx(last_only, rel=1e-5)


def test_zero_cache_is_used_and_changes_no_number(tiny):
    model, store = tiny
    kw = dict(n_windows=2, batch_size=1, per_layer=False)
    plain = downstream(ScaleDictionary(store, [0.5, 0.8]), store, model, **kw)["all"]
    cache = {}
    assert downstream(ScaleDictionary(store, [0.5, 0.8]), store, model, zero_cache=cache, **kw)["all"] == plain
    assert len(cache) == 2  # one entry per batch of windows
    other = downstream(ScaleDictionary(store, [0.9, 0.1]), store, model, zero_cache=cache, **kw)["all"]
    assert len(cache) == 2 and (other["ce_zero"], other["kl_zero"]) == (plain["ce_zero"], plain["kl_zero"])
    for key in cache:  # a poisoned cache shows that the entries are read, not recomputed
        cache[key] = (0.0, 0.0)
    poisoned = downstream(ScaleDictionary(store, [0.5, 0.8]), store, model, zero_cache=cache, **kw)["all"]
    assert poisoned["ce_zero"] == 0 and poisoned["ce_spliced"] == plain["ce_spliced"]
