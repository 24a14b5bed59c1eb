"""The Dictionary interface and the per-layer SAE baseline (crosslayer.dictionary, crosslayer.saes).

Invariants (forward == decode(encode), raw/normalised units, save/load), parity against the
sae-lens SAE objects, training quality on the tiny model's store, and resume.
"""

import json
import shutil

import pytest
import torch

from crosslayer.dictionary import load_dictionary
from crosslayer.errors import CrosslayerError
from crosslayer.saes import PerLayerSAEs, train_per_layer_saes

TRAIN = dict(width=128, k=8, tokens=16384, batch_size=256, lr=3e-3, progress=False)


@pytest.fixture(scope="session")
def trained(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("saes") / "topk"
    return train_per_layer_saes(tiny_store, out_dir=out, seed=0, **TRAIN), out


def random_saes(d=16, widths=(24, 40), k=5, factors=(0.5, 2.0)):
    """PerLayerSAEs of untrained inference SAEs of three architectures, with random weights."""
    import sae_lens as sl

    makers = [lambda w: sl.TopKSAE(sl.TopKSAEConfig(d_in=d, d_sae=w, k=k)),
              lambda w: sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=d, d_sae=w)),
              lambda w: sl.StandardSAE(sl.StandardSAEConfig(d_in=d, d_sae=w))]
    saes = []
    for i, w in enumerate(widths):
        sae = makers[i % 3](w)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.2)
        saes.append(sae)
    layers = list(range(len(widths)))
    return PerLayerSAEs(saes, layers=layers, hooks=[f"blocks.{l}.hook_resid_post" for l in layers],
                        norm_factors=list(factors[:len(widths)]))


@pytest.mark.parametrize("widths", [(24, 40), (24, 40, 8)])
def test_parity_with_sae_lens(widths):
    saes = random_saes(widths=widths, factors=(0.5, 2.0, 1.5))
    x_BLD = torch.randn(33, len(widths), 16)
    feats_BF = saes.encode(x_BLD)
    assert feats_BF.shape == (33, sum(widths))
    off = 0
    for i, sae in enumerate(saes.saes):
        expected = sae.encode(x_BLD[:, i])
        assert torch.equal(feats_BF[:, off:off + widths[i]], expected)
        assert torch.equal(saes.decode(feats_BF)[:, i], sae.decode(expected))
        assert torch.allclose(saes.reconstruct(x_BLD)[:, i], sae(x_BLD[:, i]), atol=1e-6)
        off += widths[i]
    assert (feats_BF != 0).any()
    out = saes(x_BLD)
    assert torch.equal(out.recon_BLD, saes.decode(saes.encode(x_BLD)))


def test_raw_units_fold_the_norm_factors():
    saes = random_saes()
    raw_BLD = torch.randn(20, 2, 16) * 7
    factors = torch.tensor([0.5, 2.0])
    norm_BLD = raw_BLD * factors[None, :, None]
    assert torch.allclose(saes.encode(raw_BLD, normalized=False), saes.encode(norm_BLD))
    recon_raw = saes.reconstruct(raw_BLD, normalized=False)
    assert torch.allclose(recon_raw * factors[None, :, None], saes.reconstruct(norm_BLD), atol=1e-5)


def test_decoder_norms_block_diagonal():
    saes = random_saes(widths=(24, 40))
    norms_FL = saes.decoder_norms()
    assert norms_FL.shape == (64, 2)
    assert torch.allclose(norms_FL[:24, 0], saes.saes[0].W_dec.norm(dim=-1))
    assert torch.allclose(norms_FL[24:, 1], saes.saes[1].W_dec.norm(dim=-1))
    assert (norms_FL[:24, 1] == 0).all() and (norms_FL[24:, 0] == 0).all()
    assert saes.feature_layer().tolist() == [0] * 24 + [1] * 40


def test_bad_shapes_raise():
    saes = random_saes()
    with pytest.raises(CrosslayerError, match="reads"):
        saes.encode(torch.randn(4, 3, 16))
    with pytest.raises(CrosslayerError, match="decodes"):
        saes.decode(torch.randn(4, 7))


def test_save_load_roundtrip(tmp_path):
    from sae_lens import SAE

    saes = random_saes()
    saes.save(tmp_path / "d")
    again = load_dictionary(tmp_path / "d")
    assert isinstance(again, PerLayerSAEs) and again.layers == saes.layers and again.hooks == saes.hooks
    assert torch.equal(again.norm_factors, saes.norm_factors)
    x_BLD = torch.randn(10, 2, 16)
    assert torch.equal(again.reconstruct(x_BLD), saes.reconstruct(x_BLD))
    one = SAE.load_from_disk(tmp_path / "d" / saes.hooks[1])
    assert torch.equal(one.encode(x_BLD[:, 1]), saes.saes[1].encode(x_BLD[:, 1]))


def test_load_errors(tmp_path):
    with pytest.raises(CrosslayerError, match="not a saved dictionary"):
        load_dictionary(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"kind": "hologram"}))
    with pytest.raises(CrosslayerError, match="unknown kind"):
        load_dictionary(tmp_path)


def test_trained_topk_beats_mean_at_requested_l0(trained, tiny_store, tiny_model):
    from crosslayer.evals import evaluate

    saes, _ = trained
    table = evaluate(saes, tiny_store, model=tiny_model, n_tokens=4000, batch_size=512, n_windows=4)
    per_layer = table[table.layer != "all"]
    assert (per_layer.fvu < 0.45).all(), table  # mean prediction: FVU 1
    assert per_layer.l0.to_numpy() == pytest.approx([8.0, 8.0])
    assert table[table.layer == "all"].l0.item() == pytest.approx(16.0)
    assert table.kl.notna().all() and (table.kl > 0).all() and table.ce_recovered.notna().all()
    stats = saes.meta["layer_stats"]
    assert [s["layer"] for s in stats] == [0, 1] and all(s["train_sample_fvu"] < 0.45 for s in stats)


def test_trained_saes_load_back_and_with_sae_lens(trained):
    from sae_lens import SAE

    saes, out = trained
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["kind"] == "per_layer_saes" and cfg["status"] == "complete"
    assert cfg["store"]["model"] == "tiny-2l-64d" and cfg["training"]["k"] == 8
    again = load_dictionary(out)
    x_BLD = torch.randn(50, 2, 64) * 8
    assert torch.equal(again.encode(x_BLD), saes.encode(x_BLD))
    for i, hook in enumerate(cfg["hooks"]):
        sae = SAE.load_from_disk(out / hook)
        assert sae.cfg.metadata.hook_name == hook
        assert sae.cfg.metadata.norm_scaling_factor == pytest.approx(cfg["norm_factors"][i])
        assert torch.equal(sae.decode(sae.encode(x_BLD[:, i])), again.reconstruct(x_BLD)[:, i])


def test_resume_skips_finished_layers(tiny_store, tmp_path, monkeypatch):
    import crosslayer.saes as saes_module

    small = dict(width=32, k=4, tokens=2048, batch_size=256, lr=3e-3, progress=False, seed=0)
    full = train_per_layer_saes(tiny_store, out_dir=tmp_path / "full", **small)
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
        train_per_layer_saes(tiny_store, out_dir=out, **small)
    assert json.loads((out / "cfg.json").read_text())["status"] == "training"
    with pytest.raises(CrosslayerError, match="unfinished"):
        load_dictionary(out)
    first = (out / full.hooks[0] / "sae_weights.safetensors").read_bytes()
    calls.clear()
    monkeypatch.setattr(saes_module, "_train_layer", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    resumed = train_per_layer_saes(tiny_store, out_dir=out, **small)
    assert calls == [1]  # layer 0 was not trained again
    assert (out / full.hooks[0] / "sae_weights.safetensors").read_bytes() == first
    x_BLD = torch.randn(40, 2, 64) * 8
    assert torch.allclose(resumed.reconstruct(x_BLD), full.reconstruct(x_BLD), atol=1e-5)  # seeded: same SAEs
    calls.clear()
    train_per_layer_saes(tiny_store, out_dir=out, **small)
    assert calls == []
    with pytest.raises(CrosslayerError, match="different SAE training"):
        train_per_layer_saes(tiny_store, out_dir=out, **{**small, "seed": 1})


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "standard"])
def test_other_architectures_train_and_load(arch, tiny_store, tmp_path):
    saes = train_per_layer_saes(tiny_store, out_dir=tmp_path / arch, arch=arch, layers=[1], width=32, k=4,
                                tokens=1024, batch_size=256, progress=False)
    again = load_dictionary(tmp_path / arch)
    assert again.layers == [1] and again.n_features == 32
    x_BLD = tiny_store.get(list(range(64)), layers=[1], normalized=True)
    assert torch.equal(again.reconstruct(x_BLD), saes.reconstruct(x_BLD))
    assert torch.isfinite(again.reconstruct(x_BLD)).all()


def test_bad_training_input(tiny_store, tmp_path):
    with pytest.raises(CrosslayerError, match="not in store"):
        train_per_layer_saes(tiny_store, out_dir=tmp_path / "a", layers=[7], width=8, k=2, tokens=512,
                             batch_size=256, progress=False)
    with pytest.raises(CrosslayerError, match="architecture"):
        train_per_layer_saes(tiny_store, out_dir=tmp_path / "b", arch="gated", width=8, k=2, tokens=512,
                             batch_size=256, progress=False)
    with pytest.raises(CrosslayerError, match="k <= width"):
        train_per_layer_saes(tiny_store, out_dir=tmp_path / "c", width=8, k=9, tokens=512, batch_size=256,
                             progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "other.txt").write_text("x")
    with pytest.raises(CrosslayerError, match="not an SAE training folder"):
        train_per_layer_saes(tiny_store, out_dir=tmp_path / "d", width=8, k=2, tokens=512, batch_size=256,
                             progress=False)
    shutil.rmtree(tmp_path / "d")
