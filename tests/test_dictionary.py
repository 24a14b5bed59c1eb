"""The Dictionary interface and the per-layer SAE baseline (crosslayer.dictionary, crosslayer.saes).

Invariants (forward == decode(encode), raw/normalised units, layer masks, save/load with meta), parity
against the sae-lens SAE objects and SAETrainer.fit, the one compatibility check, training quality on
the tiny model's store, and resume.
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import random_saes

from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.dictionary import check_compatible, load_dictionary
from crosslayer.errors import CrosslayerError
from crosslayer.saes import PerLayerSAEs, SAETrainConfig, train_per_layer_saes

TRAIN = SAETrainConfig(width=128, k=8, tokens=16384, batch_size=256, lr=3e-3)
MIXED = dict(d=16, archs=("topk", "jumprelu", "standard"), scale=0.3)
"""Untrained SAEs of three architectures with random weights, off any store."""


@pytest.fixture(scope="session")
def trained(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("saes") / "topk"
    return train_per_layer_saes(tiny_store, TRAIN, out_dir=out, progress=False), out


# ----------------------------------------------------------------------------- parity and invariants

@pytest.mark.parametrize("widths", [(24, 40), (24, 40, 8)])
def test_parity_with_sae_lens(widths):
    saes = random_saes(widths=widths, **MIXED)
    x_BLD = torch.randn(33, len(widths), 16)  # raw: the sae-lens SAEs take raw activations
    feats_BF = saes.encode(x_BLD, normalized=False)
    assert feats_BF.shape == (33, sum(widths))
    off = 0
    for i, sae in enumerate(saes.saes):
        expected = sae.encode(x_BLD[:, i])
        assert torch.equal(feats_BF[:, off:off + widths[i]], expected)
        assert torch.equal(saes.decode(feats_BF, normalized=False)[:, i], sae.decode(expected))
        assert torch.equal(saes.decode(feats_BF)[:, i], sae.decode(expected) * saes.norm_factors[i])
        assert torch.allclose(saes.reconstruct(x_BLD, normalized=False)[:, i], sae(x_BLD[:, i]), atol=1e-6)
        assert torch.equal(saes.reconstruct_layer(x_BLD[:, i], i, normalized=False), sae(x_BLD[:, i]))
        off += widths[i]
    assert (feats_BF != 0).any()
    out = saes(x_BLD)
    assert torch.equal(out.recon_BLD, saes.decode(saes.encode(x_BLD)))


def test_raw_units_fold_the_norm_factors():
    saes = random_saes(widths=(24, 40), **MIXED)
    raw_BLD = torch.randn(20, 2, 16) * 7
    factors = torch.tensor([0.5, 2.0])
    norm_BLD = raw_BLD * factors[None, :, None]
    assert torch.allclose(saes.encode(raw_BLD, normalized=False), saes.encode(norm_BLD))
    recon_raw = saes.reconstruct(raw_BLD, normalized=False)
    assert torch.allclose(recon_raw * factors[None, :, None], saes.reconstruct(norm_BLD), atol=1e-5)
    for i in range(2):
        assert torch.allclose(saes.reconstruct_layer(norm_BLD[:, i], i), saes.reconstruct(norm_BLD)[:, i], atol=1e-5)


def test_decoder_norms_and_masks_are_one_layer_per_feature():
    saes = random_saes(widths=(24, 40, 8), **MIXED)
    norms_FL = saes.decoder_norms()
    assert norms_FL.shape == (72, 3)
    assert torch.allclose(norms_FL[:24, 0], saes.saes[0].W_dec.norm(dim=-1) * 0.5)  # normalised units: x factor
    assert torch.allclose(norms_FL[24:64, 1], saes.saes[1].W_dec.norm(dim=-1) * 2.0)
    writes_FL = saes.writes_FL()
    assert writes_FL.dtype == torch.bool and writes_FL.shape == (72, 3)
    assert (writes_FL.sum(1) == 1).all()  # one-hot per feature
    assert writes_FL.sum(0).tolist() == [24, 40, 8]
    assert torch.equal(writes_FL, norms_FL > 0)
    assert torch.equal(saes.reads_FL(), writes_FL)


def test_decoder_vectors_equal_the_sae_blocks():
    saes = random_saes(widths=(24, 40), **MIXED)
    for i, layer in enumerate(saes.layers):
        W_FD = saes.decoder_vectors(layer)
        assert W_FD.shape == (64, 16) and W_FD.dtype == torch.float32 and not W_FD.requires_grad
        own = saes.writes_FL()[:, i]
        assert torch.equal(W_FD[own], saes.saes[i].W_dec.detach() * saes.norm_factors[i])
        assert (W_FD[~own] == 0).all()
        raw = saes.decoder_vectors(layer, normalized=False)
        assert torch.allclose(raw, W_FD / saes.norm_factors[i])
        assert torch.allclose(raw[own], saes.saes[i].W_dec.detach())
        assert torch.allclose(raw.norm(dim=-1), saes.decoder_norms()[:, i] / saes.norm_factors[i])
    with pytest.raises(CrosslayerError, match="not one of the dictionary's layers"):
        saes.decoder_vectors(7)


def test_decoder_vectors_of_rescaled_topk_saes_are_unit_raw_rows():
    """A sae-lens TopK SAE with rescale_acts_by_decoder_norm writes unit rows in raw units: f in normalised units."""
    import sae_lens as sl

    sae = sl.TopKSAE(sl.TopKSAEConfig(d_in=8, d_sae=12, k=3, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(12, 1) * 5 + 0.1)
    saes = PerLayerSAEs([sae], layers=[4], hooks=["blocks.4.hook_resid_post"], norm_factors=[2.0])
    W_FD = saes.decoder_vectors(4)
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
    torch.testing.assert_close(saes.decoder_vectors(4, normalized=False), unit)
    torch.testing.assert_close(W_FD, unit * 2.0)
    torch.testing.assert_close(saes.decoder_norms()[:, 0], W_FD.norm(dim=-1))


def test_crosscoder_masks_and_decoder_vectors():
    cfg = CrosscoderConfig(layers=(1, 3, 5, 7), d_model=8, n_features=20, variant="weakly_causal", k=2)
    cc = Crosscoder(cfg, norm_factors=[0.5, 1.0, 2.0, 4.0], seed=1)
    reads_FL, writes_FL = cc.reads_FL(), cc.writes_FL()
    assert (reads_FL.sum(1) == 1).all()
    home_F = reads_FL.int().argmax(1)
    assert torch.equal(writes_FL, torch.arange(4)[None] >= home_F[:, None])  # home layer and every later one
    assert torch.equal(writes_FL, cc.decoder_norms() > 0)
    assert cc.hooks == [f"blocks.{l}.hook_resid_post" for l in cfg.layers]
    for i, layer in enumerate(cfg.layers):
        W_FD = cc.decoder_vectors(layer)
        assert torch.equal(W_FD, cc.W_dec_masked()[:, i].detach())
        assert (W_FD[~writes_FL[:, i]] == 0).all() and (W_FD[writes_FL[:, i]].norm(dim=-1) > 0).all()
        torch.testing.assert_close(cc.decoder_vectors(layer, normalized=False), W_FD / float(cc.norm_factors[i]))
    with pytest.raises(CrosslayerError, match="not one of"):
        cc.decoder_vectors(2)


def test_bad_shapes_raise():
    saes = random_saes(widths=(24, 40), **MIXED)
    with pytest.raises(CrosslayerError, match="reads"):
        saes.encode(torch.randn(4, 3, 16))
    with pytest.raises(CrosslayerError, match="decodes"):
        saes.decode(torch.randn(4, 7))


# ----------------------------------------------------------------------------- save / load

def test_save_load_roundtrip_keeps_weights_and_meta(tmp_path):
    from sae_lens import SAE

    meta = {"store": {"model": "tiny-2l-64d", "weights_id": "w1"}, "training": {"k": 5}, "note": [1, 2]}
    saes = random_saes(widths=(24, 40), **MIXED)
    saes.meta = dict(meta)
    saes.save(tmp_path / "d")
    again = load_dictionary(tmp_path / "d")
    assert isinstance(again, PerLayerSAEs) and again.layers == saes.layers and again.hooks == saes.hooks
    assert again.meta == meta and again.model_name == "tiny-2l-64d"
    assert json.loads((tmp_path / "d" / "cfg.json").read_text())["units"] == "raw"
    assert torch.equal(again.norm_factors, saes.norm_factors)
    x_BLD = torch.randn(10, 2, 16)
    assert torch.equal(again.reconstruct(x_BLD), saes.reconstruct(x_BLD))
    one = SAE.load_from_disk(tmp_path / "d" / saes.hooks[1])
    assert torch.equal(one.encode(x_BLD[:, 1]), saes.saes[1].encode(x_BLD[:, 1]))
    assert random_saes(widths=(24,), **MIXED).model_name is None


def test_crosscoder_meta_round_trip_and_unfinished_training_is_refused(tmp_path):
    meta = {"store": {"model": "m", "weights_id": "w"}, "training": {"tokens": 64}}
    cc = Crosscoder(CrosscoderConfig(layers=(0, 1), d_model=4, n_features=8, k=2), meta=meta)
    cc.save(tmp_path / "cc")
    back = load_dictionary(tmp_path / "cc")
    assert back.meta == meta and back.model_name == "m"
    cfg = json.loads((tmp_path / "cc" / "cfg.json").read_text())
    assert cfg["status"] == "complete"
    (tmp_path / "cc" / "cfg.json").write_text(json.dumps({**cfg, "status": "training"}))
    for load in (load_dictionary, Crosscoder.load):
        with pytest.raises(CrosslayerError, match="unfinished crosscoder training"):
            load(tmp_path / "cc")
    with pytest.raises(CrosslayerError, match="not a 'per_layer_saes'"):
        PerLayerSAEs.load(tmp_path / "cc")


def test_load_errors(tmp_path):
    with pytest.raises(CrosslayerError, match="not a saved dictionary"):
        load_dictionary(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"kind": "hologram"}))
    with pytest.raises(CrosslayerError, match="unknown kind"):
        load_dictionary(tmp_path)


# ----------------------------------------------------------------------------- check_compatible

def test_check_compatible_with_a_store(tiny_store):
    check_compatible(random_saes(tiny_store), tiny_store)
    saes = random_saes(tiny_store)
    saes.layers = [0, 5]
    with pytest.raises(CrosslayerError, match=r"lacks \[5\]"):
        check_compatible(saes, tiny_store)
    saes = random_saes(tiny_store)
    saes.hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    with pytest.raises(CrosslayerError, match="hooks blocks.0.hook_resid_pre.. differ"):
        check_compatible(saes, tiny_store)
    narrow = Crosscoder(CrosscoderConfig(layers=tuple(tiny_store.layers), d_model=tiny_store.width // 2,
                                         n_features=8, k=2), hooks=tiny_store.hooks)
    with pytest.raises(CrosslayerError, match=f"width {tiny_store.width // 2} != store width {tiny_store.width}"):
        check_compatible(narrow, tiny_store)
    for key, value in (("model", "smollm2-135m"), ("weights_id", "other-weights")):
        saes = random_saes(tiny_store)
        saes.meta["store"][key] = value
        with pytest.raises(CrosslayerError, match=f"trained on {key} '{value}'"):
            check_compatible(saes, tiny_store)
    saes.meta["store"]["weights_id"] = tiny_store.manifest["weights_id"]
    check_compatible(saes, tiny_store)


def test_check_compatible_with_a_model(tiny_store, tiny_model):
    from crosslayer.models import load_model

    saes = random_saes(tiny_store)
    check_compatible(saes, tiny_model)
    with pytest.raises(CrosslayerError, match="has d_model 32, the dictionary 64"):
        check_compatible(saes, load_model("tiny-2l-32d"))
    deep = Crosscoder(CrosscoderConfig(layers=(0, 5), d_model=tiny_store.width, n_features=8, k=2))
    with pytest.raises(CrosslayerError, match="reads layer 5, model .* has only 2 layers"):
        check_compatible(deep, tiny_model)
    saes.hooks = ["blocks.0.hook_nowhere", "blocks.1.hook_nowhere"]
    with pytest.raises(CrosslayerError, match="has no hook blocks.0.hook_nowhere"):
        check_compatible(saes, tiny_model)
    saes = random_saes(tiny_store)
    saes.meta["store"]["weights_id"] = "other-weights"
    with pytest.raises(CrosslayerError, match="differ from those the dictionary was trained on"):
        check_compatible(saes, tiny_model)
    saes.meta["store"]["weights_id"] = tiny_model.crosslayer_weights_id
    check_compatible(saes, tiny_model)
    with pytest.raises(CrosslayerError, match="pass an activation store or a TransformerLens model"):
        check_compatible(saes, "a string")


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_fit_matches_sae_trainer_fit():
    """Our loop over SAETrainer's public seams gives exactly the weights and statistics of its fit()."""
    from sae_lens import SAETrainer

    from crosslayer.saes import fit, sae_lens_trainer_config, training_sae

    cfg = SAETrainConfig(width=32, k=4, tokens=40 * 64, batch_size=64, lr=3e-3, lr_warm_up_steps=3,
                         dead_after_tokens=5 * 64)
    x = torch.randn(40, 64, 16) * torch.linspace(0.2, 3.0, 16)
    runs = []
    for use_fit in (True, False):
        torch.manual_seed(0)
        sae = training_sae(cfg, d_in=16)
        init_W_dec = sae.W_dec.detach().clone()
        trainer_cfg = replace(sae_lens_trainer_config(cfg), feature_sampling_window=7)  # exercise the resets
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(x))
        trainer.fit() if use_fit else fit(trainer, progress=False)
        runs.append((sae, trainer))
    (a, ta), (b, tb) = runs
    assert ta.n_training_steps == tb.n_training_steps == 40
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.W_dec, init_W_dec)  # training changed the weights
    assert torch.equal(ta.log_feature_sparsity, tb.log_feature_sparsity)
    assert (a.cfg.metadata.l0, a.cfg.metadata.num_dead_features) == (b.cfg.metadata.l0, b.cfg.metadata.num_dead_features)


@pytest.mark.slow
def test_trained_topk_beats_mean_at_requested_l0(trained, tiny_store, tiny_model):
    from crosslayer.evals import evaluate

    saes, _ = trained
    table = evaluate(saes, tiny_store, model=tiny_model, n_tokens=4000, batch_size=512, n_windows=4)
    per_layer, overall = table[table.scope == "layer"], table[table.scope == "all"]
    assert (per_layer.fvu < 0.45).all(), table  # mean prediction: FVU 1
    assert per_layer.l0.to_numpy() == pytest.approx([8.0, 8.0])
    assert overall.l0.item() == pytest.approx(16.0)
    assert table.kl.notna().all() and (table.kl > 0).all() and table.ce_recovered.notna().all()
    stats = saes.meta["layer_stats"]
    assert [s["layer"] for s in stats] == [0, 1] and all(s["train_sample_fvu"] < 0.45 for s in stats)


@pytest.mark.slow
def test_trained_saes_load_back_and_with_sae_lens(trained, tiny_store):
    from sae_lens import SAE

    saes, out = trained
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["kind"] == "per_layer_saes" and cfg["status"] == "complete"
    assert cfg["store"]["model"] == "tiny-2l-64d" and cfg["training"]["k"] == 8
    assert cfg["norm_factors"] == tiny_store.norm_factors.tolist() and cfg["units"] == "raw"
    again = load_dictionary(out)
    assert again.meta == saes.meta and again.model_name == "tiny-2l-64d"
    check_compatible(again, tiny_store)
    raw_BLD = tiny_store.get(range(50), normalized=False)
    assert torch.equal(again.encode(raw_BLD, normalized=False), saes.encode(raw_BLD, normalized=False))
    factors = torch.tensor(cfg["norm_factors"])[None, :, None]
    recon_raw = again.reconstruct(raw_BLD, normalized=False)
    torch.testing.assert_close(again.reconstruct(raw_BLD * factors), recon_raw * factors)
    for i, hook in enumerate(cfg["hooks"]):
        sae = SAE.load_from_disk(out / hook)  # as a sae-lens user would, on raw activations, nothing folded
        assert sae.cfg.metadata.hook_name == hook and sae.cfg.normalize_activations == "none"
        assert sae.cfg.metadata.crosslayer_folded_norm_factor == pytest.approx(cfg["norm_factors"][i])
        assert "norm_scaling_factor" not in sae.cfg.metadata and not sae.cfg.rescale_acts_by_decoder_norm
        assert torch.equal(sae.decode(sae.encode(raw_BLD[:, i])), recon_raw[:, i])
        assert json.loads((out / hook / "crosslayer_train.json").read_text())["train_sample_fvu"] < 0.45


@pytest.mark.slow
def test_resume_skips_finished_layers(tiny_store, tmp_path, monkeypatch):
    import crosslayer.saes as saes_module

    small = SAETrainConfig(width=32, k=4, tokens=2048, batch_size=256, lr=3e-3)
    full = train_per_layer_saes(tiny_store, small, out_dir=tmp_path / "full", progress=False)
    out = tmp_path / "resumed"
    real = saes_module._train_layer
    calls = []

    def killed_after_first(store, layer, *args, **kwargs):
        calls.append(layer)
        if len(calls) > 1:
            raise KeyboardInterrupt  # a kill while training the second layer
        return real(store, layer, *args, **kwargs)

    monkeypatch.setattr(saes_module, "_train_layer", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        train_per_layer_saes(tiny_store, small, out_dir=out, progress=False)
    assert json.loads((out / "cfg.json").read_text())["status"] == "training"
    with pytest.raises(CrosslayerError, match="unfinished"):
        load_dictionary(out)
    first = (out / full.hooks[0] / "sae_weights.safetensors").read_bytes()
    calls.clear()
    monkeypatch.setattr(saes_module, "_train_layer", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    resumed = train_per_layer_saes(tiny_store, small, out_dir=out, progress=False)
    assert calls == [1]  # layer 0 was not trained again
    assert (out / full.hooks[0] / "sae_weights.safetensors").read_bytes() == first
    x_BLD = torch.randn(40, 2, 64) * 8
    assert torch.equal(resumed.reconstruct(x_BLD), full.reconstruct(x_BLD))  # seeded: the same SAEs
    calls.clear()
    train_per_layer_saes(tiny_store, small, out_dir=out, progress=False)
    assert calls == []
    with pytest.raises(CrosslayerError, match=r"different per-layer SAE training \(training\.seed:"):
        train_per_layer_saes(tiny_store, replace(small, seed=1), out_dir=out, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "standard"])
def test_other_architectures_train_and_load(arch, tiny_store, tmp_path):
    cfg = SAETrainConfig(arch=arch, width=32, k=4, tokens=1024, batch_size=256)
    saes = train_per_layer_saes(tiny_store, cfg, out_dir=tmp_path / arch, layers=[1], progress=False)
    again = load_dictionary(tmp_path / arch)
    assert again.layers == [1] and again.n_features == 32
    x_BLD = tiny_store.get(list(range(64)), layers=[1], normalized=True)
    assert torch.equal(again.reconstruct(x_BLD), saes.reconstruct(x_BLD))
    assert torch.isfinite(again.reconstruct(x_BLD)).all()


def test_bad_training_input(tiny_store, tmp_path):
    tiny = SAETrainConfig(width=8, k=2, tokens=512, batch_size=256)
    with pytest.raises(CrosslayerError, match="not in store"):
        train_per_layer_saes(tiny_store, tiny, out_dir=tmp_path / "a", layers=[7], progress=False)
    with pytest.raises(CrosslayerError, match="architecture"):
        SAETrainConfig(arch="gated", width=8, k=2, tokens=512, batch_size=256)
    with pytest.raises(CrosslayerError, match="k <= width"):
        SAETrainConfig(width=8, k=9, tokens=512, batch_size=256)
    with pytest.raises(CrosslayerError, match="tokens"):
        SAETrainConfig(width=8, k=2, tokens=255, batch_size=256)
    with pytest.raises(CrosslayerError, match="fewer than one batch"):
        train_per_layer_saes(tiny_store, replace(tiny, batch_size=tiny_store.n_rows + 1, tokens=10**6),
                             out_dir=tmp_path / "b", progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "other.txt").write_text("x")
    with pytest.raises(CrosslayerError, match="not a per-layer SAE training folder"):
        train_per_layer_saes(tiny_store, tiny, out_dir=tmp_path / "d", progress=False)
    shutil.rmtree(tmp_path / "d")
