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
from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.evals import (DOWNSTREAM_COLUMNS, TABLE_COLUMNS, ReconstructionStats, choose_windows, downstream,
                              eval_windows, evaluate, kept_mask, l0_pairs, multi_layer_splice)


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
    assert list(table.columns[:5]) == ["kind", "scope", "layer", "hook", "splice"]
    assert list(table.columns) == TABLE_COLUMNS  # no model: no downstream columns
    assert table.splice.tolist() == ["layer"] * store.n_layers + ["sequential"]
    assert table.prefix_fvu.isna().all() and (table.l0_frac == 0.1).all()
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
    meta = store.meta()
    special = torch.tensor(store.manifest["exclusion_policy"]["special_token_ids"])
    for windows in (10, np.array([3, 17, 40, 99])):
        index = np.arange(windows) if isinstance(windows, int) else windows
        mask = kept_mask(store, windows)
        tokens = store.window_tokens()[index]
        assert mask.shape == (len(index), store.seq_len) and not mask[:, 0].any()
        assert not mask[torch.isin(tokens, special)].any()
        rows = np.isin(meta["window"], index)
        assert int(mask.sum()) == int(rows.sum())
        where = torch.from_numpy(np.searchsorted(index, meta["window"][rows]))
        assert mask[where, torch.from_numpy(meta["position"][rows])].all()


def test_eval_windows_spread_and_stay_inside_documents(tiny):
    _, store = tiny
    N = store.manifest["n_windows"]
    index = choose_windows(store, 10)
    assert len(set(index.tolist())) == 10 and index[0] == 0 and index[-1] >= N - N // 10 - 1
    assert choose_windows(store, 10**6).tolist() == list(range(N))
    win = eval_windows(store, 10)
    docs = store.window_docs()[index]
    src, tgt = docs[:, :-1], docs[:, 1:]
    assert win.pred.any() and (src[win.pred] == tgt[win.pred]).all() and (src[win.pred] >= 0).all()
    assert (win.pred <= win.kept[:, :-1]).all()
    crossing = win.kept[:, :-1] & (src != tgt)  # kept inputs whose target is a separator / another document
    assert crossing.any() and not win.pred[crossing].any()
    assert win.n_docs == len(torch.unique(src[win.pred])) and int(win.doc.max()) == win.n_docs - 1
    first = store.window_docs()[:10, :-1]
    assert win.n_docs > len(torch.unique(first[first >= 0]))  # spread windows reach more documents


def test_store_mean_is_the_mean_of_every_row(tiny):
    _, store = tiny
    x = store.get(np.arange(store.n_rows), layers=[1]).double()
    mean = store.mean([1], batch_rows=1000)
    assert mean.shape == (1, store.width) and mean.dtype == torch.float32
    assert torch.allclose(mean.double(), x.mean(0), rtol=1e-6, atol=1e-7)
    assert torch.allclose(store.mean()[1], mean[0], rtol=1e-6)


# ----------------------------------------------------------------------------- downstream ground truth

def scored(store, n_windows):
    """(tokens, kept, pred, doc of each scored prediction) by hand: kept input, same document as the target."""
    index = choose_windows(store, n_windows)
    tokens, docs = store.window_tokens()[index], store.window_docs()[index]
    kept = kept_mask(store, index)
    pred = kept[:, :-1] & (docs[:, :-1] >= 0) & (docs[:, :-1] == docs[:, 1:])
    return tokens, kept, pred, docs[:, :-1][pred]


@torch.no_grad()
def logp_at(model, tokens, pred, fwd_hooks=()):
    logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    return torch.log_softmax(logits[:, :-1].float(), -1)[pred]


def ce_of(logp, tokens, pred):
    """Per-prediction CE."""
    return -logp.gather(-1, tokens[:, 1:][pred][:, None])[:, 0].double()


def kl_of(logp_clean, logp):
    return (logp_clean.exp() * (logp_clean - logp)).sum(-1).double()


def put_kept(kept, values):
    """A hook writing ``values`` (broadcastable to the activation) at the kept positions."""
    return lambda act, hook: torch.where(kept[..., None], values.to(act).expand_as(act), act)


def scale_kept(kept, scale):
    return lambda act, hook: torch.where(kept[..., None], act * scale, act)


def test_downstream_ground_truth(tiny):
    model, store = tiny
    tokens, kept, pred, _ = scored(store, 6)
    cache = {}
    table = evaluate(ScaleDictionary(store, [1.0, 1.0]), store, model=model, n_tokens=256, n_windows=6,
                     window_batch_size=6, n_boot=100, zero_cache=cache)
    assert list(table.columns) == TABLE_COLUMNS + DOWNSTREAM_COLUMNS
    identity, overall = by_layer(table)
    assert overall.splice == "causal"  # each feature reads and writes one layer
    logp_clean = logp_at(model, tokens, pred)
    ce_clean = float(ce_of(logp_clean, tokens, pred).mean())
    assert table.n_predictions.tolist() == [int(pred.sum())] * 3
    assert table.ce_clean.to_numpy() == pytest.approx([ce_clean] * 3, rel=1e-5)
    assert table.ce_spliced.to_numpy() == pytest.approx([ce_clean] * 3, abs=1e-4)
    for col in ("ce_recovered", "ce_recovered_lo", "ce_recovered_hi", "ce_recovered_zero"):
        assert table[col].to_numpy() == pytest.approx([1.0] * 3, abs=1e-3), col  # zero-width interval at 1
    assert table.kl.abs().max() < 1e-5 and table.kl_hi.abs().max() < 1e-5

    mean = store.mean()
    runs = {"ce_zero_l1": [(store.hooks[1], put_kept(kept, torch.zeros(1)))],
            "ce_zero_all": [(h, put_kept(kept, torch.zeros(1))) for h in store.hooks],
            "ce_mean_l1": [(store.hooks[1], put_kept(kept, mean[1]))],
            "ce_mean_all": [(h, put_kept(kept, mean[i])) for i, h in enumerate(store.hooks)]}
    ce = {k: float(ce_of(logp_at(model, tokens, pred, hooks), tokens, pred).mean()) for k, hooks in runs.items()}
    assert identity.loc[1, "ce_zero"] == pytest.approx(ce["ce_zero_l1"], rel=1e-5)
    assert overall.ce_zero == pytest.approx(ce["ce_zero_all"], rel=1e-5)
    assert identity.loc[1, "ce_mean"] == pytest.approx(ce["ce_mean_l1"], rel=1e-5)
    assert overall.ce_mean == pytest.approx(ce["ce_mean_all"], rel=1e-5)
    assert min(abs(ce["ce_zero_l1"] - ce_clean), abs(ce["ce_mean_l1"] - ce_clean)) > 1e-3  # not degenerate

    mixed, _ = by_layer(evaluate(ScaleDictionary(store, [1.0, 0.0]), store, model=model, n_tokens=256,
                                 n_windows=6, window_batch_size=6, n_boot=100, zero_cache=cache))
    assert mixed.loc[0, "ce_recovered"] == pytest.approx(1.0, abs=1e-3) and mixed.loc[0, "kl"] < 1e-5
    assert mixed.loc[1, "ce_recovered_zero"] == pytest.approx(0.0, abs=1e-6)  # scale 0 is zero ablation
    assert mixed.loc[1, "kl"] == pytest.approx(mixed.loc[1, "kl_zero"], rel=1e-6) and mixed.loc[1, "kl"] > 1e-3


class MeanDictionary(ScaleDictionary):
    """Reconstructs every token as the store's mean: the mean-ablation "dictionary"."""

    def __init__(self, store):
        super().__init__(store, [0.0] * store.n_layers)
        self.mean_LD = store.mean() * store.norm_factors[:, None]  # normalised units

    def decode_normalized(self, feats_BF):
        return super().decode_normalized(feats_BF) + self.mean_LD


def test_intervals_contain_estimates_and_mean_ablation_recovers_nothing(tiny):
    model, store = tiny
    cache = {}
    table = evaluate(ScaleDictionary(store, [0.5, 0.8]), store, model=model, n_tokens=256, n_windows=8,
                     window_batch_size=8, n_boot=200, zero_cache=cache)
    for name in ("ce_spliced", "ce_recovered", "ce_recovered_zero", "kl"):
        assert (table[f"{name}_lo"] <= table[name]).all() and (table[name] <= table[f"{name}_hi"]).all(), name
        assert (table[f"{name}_lo"] < table[f"{name}_hi"]).all(), name  # a real spread across documents
    assert (table.n_docs >= 5).all() and table.prefix_ce_spliced.isna().all()
    mean = evaluate(MeanDictionary(store), store, model=model, n_tokens=256, n_windows=8, window_batch_size=8,
                    n_boot=200, zero_cache=cache)
    assert mean.splice.iloc[-1] == "causal"
    assert mean.ce_recovered.to_numpy() == pytest.approx([0.0] * 3, abs=1e-4)
    assert mean.kl.to_numpy() == pytest.approx(mean.kl_mean.to_numpy(), rel=1e-4)


def test_bootstrap_over_documents_matches_brute_force(tiny):
    model, store = tiny
    n_boot, seed, scale = 50, 3, 0.8
    tokens, kept, pred, doc_P = scored(store, 8)
    logp_clean = logp_at(model, tokens, pred)
    per_pred = {"ce_clean": ce_of(logp_clean, tokens, pred), "n": torch.ones(len(doc_P), dtype=torch.float64)}
    for name, hook in (("ce_spliced", scale_kept(kept, scale)), ("ce_mean", put_kept(kept, store.mean()[1]))):
        per_pred[name] = ce_of(logp_at(model, tokens, pred, [(store.hooks[1], hook)]), tokens, pred)
    docs = sorted(set(doc_P.tolist()))
    per_doc = {k: np.array([float(v[doc_P == d].sum()) for d in docs]) for k, v in per_pred.items()}

    def recovered(t):
        return (t["ce_mean"] - t["ce_spliced"]) / (t["ce_mean"] - t["ce_clean"])

    draws = np.random.default_rng(seed).integers(0, len(docs), size=(n_boot, len(docs)))
    boot = [recovered({k: v[b].sum() for k, v in per_doc.items()}) for b in draws]
    spliced = [per_doc["ce_spliced"][b].sum() / per_doc["n"][b].sum() for b in draws]
    row = downstream(ScaleDictionary(store, [1.0, scale]), store, model, n_windows=8, batch_size=8,
                     n_boot=n_boot, seed=seed)[1]
    assert row["n_docs"] == len(docs) and row["n_predictions"] == len(doc_P)
    assert row["ce_recovered"] == pytest.approx(recovered({k: v.sum() for k, v in per_doc.items()}), rel=1e-4)
    assert [row["ce_recovered_lo"], row["ce_recovered_hi"]] == pytest.approx(np.percentile(boot, [2.5, 97.5]),
                                                                                rel=1e-4)
    assert [row["ce_spliced_lo"], row["ce_spliced_hi"]] == pytest.approx(np.percentile(spliced, [2.5, 97.5]),
                                                                          rel=1e-5)


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


def test_sequential_and_causal_splices_compound(tiny):
    model, store = tiny
    tokens, kept, pred, _ = scored(store, 6)
    scales = [0.5, 0.8]
    sequential = float(ce_of(logp_at(model, tokens, pred, [(h, scale_kept(kept, scales[i]))
                                                           for i, h in enumerate(store.hooks)]), tokens, pred).mean())
    last_only = float(ce_of(logp_at(model, tokens, pred, [(store.hooks[1], scale_kept(kept, scales[1]))]),
                            tokens, pred).mean())
    assert abs(sequential - last_only) > 1e-4  # the two definitions really differ here
    kw = dict(n_windows=6, batch_size=6, per_layer=False, n_boot=10)
    assert multi_layer_splice(LayerwiseScale(store, scales)) == "sequential"
    assert downstream(LayerwiseScale(store, scales), store, model, **kw)["all"]["ce_spliced"] == \
        pytest.approx(sequential, rel=1e-5)
    # the same reconstruction, not declared layerwise, is causal: the same run
    assert downstream(ScaleDictionary(store, scales), store, model, **kw)["all"]["ce_spliced"] == \
        pytest.approx(sequential, rel=1e-5)


def tiny_crosscoder(store, variant, *, n_features=64, k=4, seed=0):
    cfg = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=n_features, k=k,
                           variant=variant)
    cc = Crosscoder(cfg, hooks=store.hooks, norm_factors=store.norm_factors,
                    meta={"store": {"model": store.manifest["model"]}}, seed=seed)
    cc.calibrate_(next(store.iter_batches(256, normalized=True, seed=seed)))
    return cc


@torch.no_grad()
def test_causal_splice_matches_brute_force(tiny):
    model, store = tiny
    cc = tiny_crosscoder(store, "weakly_causal")
    assert multi_layer_splice(cc) == "causal"
    tokens, kept, pred, _ = scored(store, 8)
    mean = store.mean()
    arrived, fixed = [], []
    for i, hook in enumerate(store.hooks):  # layer by layer: each splice from the prefix spliced by hand
        seen = {}
        capture = [(hook, lambda act, hook: seen.setdefault("act", act.clone()))]
        model.run_with_hooks(tokens, fwd_hooks=[(store.hooks[j], put_kept(kept, fixed[j])) for j in range(i)] + capture)
        arrived.append(seen["act"])
        inputs = torch.stack([a[kept] for a in arrived] + [mean[j].expand(int(kept.sum()), -1)
                                                           for j in range(i + 1, store.n_layers)], dim=1)
        recon = torch.zeros_like(seen["act"])
        recon[kept] = cc.reconstruct(inputs, normalized=False)[:, i]
        fixed.append(recon)
    hooks = [(h, put_kept(kept, fixed[j])) for j, h in enumerate(store.hooks)]
    logp_clean, logp = logp_at(model, tokens, pred), logp_at(model, tokens, pred, hooks)
    row = downstream(cc, store, model, n_windows=8, batch_size=8, per_layer=False, n_boot=10)["all"]
    assert row["ce_spliced"] == pytest.approx(float(ce_of(logp, tokens, pred).mean()), rel=1e-5)
    assert row["kl"] == pytest.approx(float(kl_of(logp_clean, logp).mean()), rel=1e-4)
    clean = model.run_with_cache(tokens, names_filter=lambda n: n in store.hooks)[1]
    last = torch.zeros_like(arrived[-1])
    last[kept] = cc.reconstruct(torch.stack([clean[h][kept] for h in store.hooks], 1), normalized=False)[:, -1]
    last_only = ce_of(logp_at(model, tokens, pred, [(store.hooks[-1], put_kept(kept, last))]), tokens, pred)
    assert abs(row["ce_spliced"] - float(last_only.mean())) > 1e-4  # not the last layer's splice from clean


def test_acausal_crosscoder_has_no_all_row_but_a_prefix_splice(tiny):
    model, store = tiny
    cc = tiny_crosscoder(store, "acausal")
    table = evaluate(cc, store, model=model, n_tokens=10**9, n_windows=4, window_batch_size=4, n_boot=50)
    rows, overall = by_layer(table)
    assert overall.splice == "none" and overall[DOWNSTREAM_COLUMNS].isna().all()
    assert rows[["prefix_ce_spliced", "prefix_ce_recovered", "prefix_kl", "prefix_fvu"]].notna().all().all()
    # the last layer has no future: its prefix splice is the plain one
    last = rows.loc[store.layers[-1]]
    assert last.prefix_ce_spliced == pytest.approx(last.ce_spliced, rel=1e-6)
    assert last.prefix_fvu == pytest.approx(last.fvu, rel=1e-6)
    # layer 0 by hand: reconstructed from [x_0, mean_1], spliced at layer 0 alone
    tokens, kept, pred, _ = scored(store, 4)
    mean = store.mean()
    with torch.no_grad():
        x = model.run_with_cache(tokens, names_filter=store.hooks[0])[1][store.hooks[0]]
        inputs = torch.stack([x[kept], mean[1].expand(int(kept.sum()), -1)], dim=1)
        recon = torch.zeros_like(x)
        recon[kept] = cc.reconstruct(inputs, normalized=False)[:, 0]
        x_all = store.get(np.arange(store.n_rows), normalized=False)
        prefix_all = cc.reconstruct(torch.stack([x_all[:, 0], mean[1].expand(len(x_all), -1)], 1), normalized=False)
    ce = ce_of(logp_at(model, tokens, pred, [(store.hooks[0], put_kept(kept, recon))]), tokens, pred)
    assert rows.loc[0, "prefix_ce_spliced"] == pytest.approx(float(ce.mean()), rel=1e-5)
    err = (x_all[:, 0] - prefix_all[:, 0]).double().pow(2).sum(-1).mean()
    assert rows.loc[0, "prefix_fvu"] == pytest.approx(float(err / x_all[:, 0].double().var(0, unbiased=False).sum()),
                                                      rel=1e-4)


def test_prefix_splice_of_a_crosscoder_reading_one_layer_is_its_layer_splice(tiny):
    model, store = tiny
    cc = tiny_crosscoder(store, "acausal")
    with torch.no_grad():
        cc.W_enc[1:] = 0  # every feature reads layer 0 only (the masks still say acausal)
    table = evaluate(cc, store, model=model, n_tokens=1024, n_windows=4, window_batch_size=4, n_boot=20)
    row = by_layer(table)[0].loc[0]
    assert table.splice.iloc[-1] == "none"
    for plain, prefix in (("ce_spliced", "prefix_ce_spliced"), ("kl", "prefix_kl"), ("fvu", "prefix_fvu"),
                          ("ce_recovered", "prefix_ce_recovered")):
        assert row[prefix] == pytest.approx(row[plain], rel=1e-5, abs=1e-7), prefix


class ProfileDictionary(ScaleDictionary):
    """Features that always fire, with a given decoder-norm profile ``[F, L]``."""

    def __init__(self, store, norms_FL):
        super().__init__(store, [1.0] * store.n_layers)
        self.norms_FL = torch.tensor(norms_FL)

    @property
    def n_features(self):
        return self.norms_FL.shape[0]

    def encode_normalized(self, acts_BLD):
        return torch.ones(acts_BLD.shape[0], self.n_features)

    def decode_normalized(self, feats_BF):
        return torch.zeros(feats_BF.shape[0], self.n_layers, self.d_model)

    def decoder_norms(self):
        return self.norms_FL

    def writes_FL(self):
        return self.norms_FL > 0

    def reads_FL(self):
        return torch.ones_like(self.norms_FL, dtype=torch.bool)


def test_l0_counts_pairs_above_a_fraction_of_the_peak_norm(tiny):
    _, store = tiny
    norms = [[1.0, 0.05], [0.5, 1.0], [0.0, 0.2], [0.25, 1.0], [0.0, 0.0]]
    # 0.1:  f0 -> layer 0; f1 -> both; f2 -> layer 1; f3 -> both; f4 writes nothing
    # 0.25: f3's 0.25 is exactly a quarter of its peak and still counts; 0.5: it no longer does
    expected = {0.1: ([3, 3], 6), 0.25: ([3, 3], 6), 0.5: ([2, 3], 5), 0.0: ([3, 4], 7), 1.0: ([1, 3], 4)}
    for frac, (per_layer, total) in expected.items():
        assert l0_pairs(torch.tensor(norms), torch.tensor(norms) > 0, frac).sum(0).tolist() == per_layer
        table = evaluate(ProfileDictionary(store, norms), store, n_tokens=100, l0_frac=frac)
        rows, overall = by_layer(table)
        assert rows.l0.tolist() == per_layer and overall.l0_tuple == total and overall.l0_feat == 5
        assert (table.l0_frac == frac).all()
    with pytest.raises(CrosslayerError, match="l0_frac"):
        evaluate(ProfileDictionary(store, norms), store, n_tokens=100, l0_frac=1.5)


def test_zero_cache_is_used_and_changes_no_number(tiny):
    model, store = tiny
    kw = dict(n_windows=2, batch_size=2, per_layer=False, n_boot=10)
    plain = downstream(ScaleDictionary(store, [0.5, 0.8]), store, model, **kw)["all"]
    cache = {}
    assert downstream(ScaleDictionary(store, [0.5, 0.8]), store, model, zero_cache=cache, **kw)["all"] == plain
    assert len(cache) == 2  # mean and zero ablation per batch of windows
    other = downstream(ScaleDictionary(store, [0.9, 0.1]), store, model, zero_cache=cache, **kw)["all"]
    assert len(cache) == 2 and all(other[c] == plain[c] for c in ("ce_zero", "kl_zero", "ce_mean", "kl_mean"))
    # other windows (3 spread windows share only window 0 with these 2): new keys, no collision
    three = {**kw, "n_windows": 3, "batch_size": 3}
    assert downstream(ScaleDictionary(store, [0.5, 0.8]), store, model, zero_cache=cache, **three)["all"] == \
        downstream(ScaleDictionary(store, [0.5, 0.8]), store, model, **three)["all"]
    assert len(cache) == 4
    for key in cache:  # a poisoned cache shows that the entries are read, not recomputed
        cache[key] = torch.zeros_like(cache[key])
    poisoned = downstream(ScaleDictionary(store, [0.5, 0.8]), store, model, zero_cache=cache, **kw)["all"]
    assert poisoned["ce_zero"] == poisoned["ce_mean"] == 0 and poisoned["ce_spliced"] == plain["ce_spliced"]


@pytest.mark.parametrize("variant, window, splice", [("acausal", 2, "none"), ("weakly_causal", 2, "causal"),
                                                     ("window", 2, "none"), ("window", 1, "causal")])
def test_multi_layer_splice_follows_the_read_write_masks(variant, window, splice):
    cfg = CrosscoderConfig(layers=(3, 4, 5), d_model=8, n_features=12, k=2, variant=variant, window=window)
    assert multi_layer_splice(Crosscoder(cfg)) == splice
    assert multi_layer_splice(random_saes(widths=[4, 4])) == "sequential"
