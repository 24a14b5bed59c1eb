"""crosslayer.saes.export_sae_lens: sae-lens folders that take RAW activations, and PerLayerSAEs over them.

Parity of ``SAE.load_from_disk(folder)`` on raw activations with the normalised-unit reference computation
(same active set, values x decoder norm, reconstruction / f), for random weights and for sae-lens training
SAEs (normalized_inference_weights); PerLayerSAEs.load of an exported set in both units; the refusals.
"""

import json

import pytest
import torch

from crosslayer.dictionary import load_dictionary
from crosslayer.errors import CrosslayerError
from crosslayer.hooks import hook_name
from crosslayer.saes import PerLayerSAEs, export_sae_lens, normalized_inference_weights

D, F, K = 16, 48, 5
ATOL = 1e-5


def random_weights(arch="topk", seed=0):
    """Normalised-unit weights with decoder norms spread over [0.1, 3] (so the norms matter to TopK)."""
    gen = torch.Generator().manual_seed(seed)
    w = {"W_enc_DF": torch.randn(D, F, generator=gen) * 0.4, "b_enc_F": torch.randn(F, generator=gen) * 0.2,
         "W_dec_FD": torch.nn.functional.normalize(torch.randn(F, D, generator=gen), dim=-1)
         * (torch.rand(F, 1, generator=gen) * 2.9 + 0.1),
         "b_dec_D": torch.randn(D, generator=gen) * 0.3, "arch": arch}
    if arch == "topk":
        w["k"] = K
    if arch == "jumprelu":
        w["threshold_F"] = torch.rand(F, generator=gen) * 0.5
    return w


def reference(x_ND, w):
    """The SAE of ``w`` in normalised units: (feats, recon) as export_sae_lens's docstring defines them."""
    pre = x_ND @ w["W_enc_DF"] + w["b_enc_F"]
    if w["arch"] == "topk":
        idx = (pre.relu() * w["W_dec_FD"].norm(dim=-1)).topk(w["k"], dim=-1).indices
        feats = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    elif w["arch"] == "jumprelu":
        feats = pre.relu() * (pre > w["threshold_F"])
    else:
        feats = pre.relu()
    return feats, feats @ w["W_dec_FD"] + w["b_dec_D"]


def export(path, w, f, hook="blocks.0.hook_resid_post"):
    return export_sae_lens(path, **w, norm_factor=f, hook_name=hook, model_name="tiny-2l-64d")


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "standard"])
def test_exported_folder_takes_raw_activations(arch, tmp_path):
    from sae_lens import SAE

    w, f = random_weights(arch), 3.7
    sae = SAE.load_from_disk(export(tmp_path / "sae", w, f))
    raw_ND = torch.randn(200, D) * 2
    ref_feats, ref_recon = reference(raw_ND * f, w)
    with torch.no_grad():
        feats = sae.encode(raw_ND)
        recon = sae.decode(feats)
    assert (ref_feats > 0).any() and (ref_feats == 0).any()
    assert torch.equal(feats != 0, ref_feats != 0)  # the same active set
    torch.testing.assert_close(feats, ref_feats * w["W_dec_FD"].norm(dim=-1), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(recon, ref_recon / f, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=-1), torch.full((F,), 1 / f))


def test_exported_cfg_needs_no_folding(tmp_path):
    """normalize_activations none, no decoder-norm rescaling, f in the metadata only as provenance."""
    export(tmp_path / "sae", random_weights(), 2.5, hook="blocks.3.hook_resid_post")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["normalize_activations"] == "none"
    assert cfg.get("rescale_acts_by_decoder_norm", False) is False and cfg["apply_b_dec_to_input"] is False
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["model_name"] == "tiny-2l-64d"
    assert meta["crosslayer_units"] == "raw" and meta["crosslayer_folded_norm_factor"] == 2.5
    assert "norm_scaling_factor" not in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary folder left


@pytest.mark.parametrize("kind", ["topk", "jumprelu", "batchtopk"])
def test_sae_lens_training_saes_export_in_raw_units(kind, tmp_path):
    """normalized_inference_weights of a sae-lens training SAE (TopK with decoder-norm rescaling and
    apply_b_dec_to_input; JumpReLU; BatchTopK): the exported folder on raw equals the training SAE on raw * f
    (BatchTopK: sae-lens's own inference SAE, a JumpReLU at the batch threshold)."""
    import sae_lens as sl
    from sae_lens import SAE

    sae = {"topk": lambda: sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K)),
           "jumprelu": lambda: sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(d_in=D, d_sae=F)),
           "batchtopk": lambda: sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=K)),
           }[kind]()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        sae.W_dec.mul_(torch.rand(F, 1) * 2.9 + 0.1)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(F) * 0.3)
        if kind == "batchtopk":
            sae.topk_threshold.fill_(0.4)
    assert sae.cfg.apply_b_dec_to_input and (kind == "jumprelu" or sae.cfg.rescale_acts_by_decoder_norm)
    w = normalized_inference_weights(sae)
    assert w["arch"] == ("topk" if kind == "topk" else "jumprelu")
    if kind == "batchtopk":
        sae.save_inference_model(tmp_path / "sae_lens_own")
        sae = SAE.load_from_disk(tmp_path / "sae_lens_own")
    f, raw_ND = 0.6, torch.randn(100, D) * 3
    folder = SAE.load_from_disk(export(tmp_path / "sae", w, f))
    with torch.no_grad():
        want = sae.encode(raw_ND * f)  # TopK: relu(pre * ||W_dec||), already x decoder norm
        got = folder.encode(raw_ND)
        want_recon, got_recon = sae.decode(want), folder.decode(got)
    scale = 1 if kind == "topk" else sae.W_dec.detach().norm(dim=-1)
    assert torch.equal(got != 0, want != 0) and (want != 0).any() and (want == 0).any()
    torch.testing.assert_close(got, want * scale, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(got_recon, want_recon / f, atol=ATOL, rtol=1e-5)


@pytest.fixture
def exported_set(tmp_path):
    """Two exported layers (topk, jumprelu) saved as a PerLayerSAEs set, with their weights."""
    from sae_lens import SAE

    ws, factors, hooks = [random_weights("topk", 1), random_weights("jumprelu", 2)], [3.7, 0.4], []
    for layer, (w, f) in enumerate(zip(ws, factors)):
        hooks.append(hook_name("resid_post", layer))
        export(tmp_path / "set" / hooks[-1], w, f, hook=hooks[-1])
    saes = [SAE.load_from_disk(tmp_path / "set" / h) for h in hooks]
    PerLayerSAEs(saes, layers=[0, 1], hooks=hooks, norm_factors=factors).write_cfg(tmp_path / "set")
    return tmp_path / "set", ws, torch.tensor(factors)


def test_per_layer_saes_over_an_exported_set(exported_set):
    from sae_lens import SAE

    path, ws, factors = exported_set
    saes = load_dictionary(path)
    assert isinstance(saes, PerLayerSAEs) and saes.meta == {}
    raw_BLD = torch.randn(64, 2, D) * 2
    norm_BLD = raw_BLD * factors[None, :, None]
    with torch.no_grad():
        feats_raw = saes.encode(raw_BLD, normalized=False)
        feats_norm = saes.encode(norm_BLD)
        for i, block in enumerate(feats_raw.split(saes.widths, dim=1)):
            sae = SAE.load_from_disk(path / saes.hooks[i])
            assert torch.equal(block, sae.encode(raw_BLD[:, i]))  # the same as sae-lens on raw
            assert torch.equal(saes.decode(feats_raw, normalized=False)[:, i], sae.decode(block))
            ref_feats, ref_recon = reference(norm_BLD[:, i], ws[i])
            torch.testing.assert_close(saes.decode(feats_raw)[:, i], ref_recon, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(saes.reconstruct_layer(norm_BLD[:, i], i), ref_recon, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(saes.reconstruct_layer(raw_BLD[:, i], i, normalized=False), sae(raw_BLD[:, i]))
        assert torch.equal(feats_norm != 0, feats_raw != 0)  # normalized=True on raw * f: the same features
        torch.testing.assert_close(feats_norm, feats_raw)
        torch.testing.assert_close(saes.reconstruct(norm_BLD), saes.reconstruct(raw_BLD, normalized=False)
                                   * factors[None, :, None])
    # every decoder row has norm 1 in normalised units, 1 / f in raw units
    torch.testing.assert_close(saes.decoder_norms(), saes.writes_FL().float())
    for i, layer in enumerate(saes.layers):
        own = saes.writes_FL()[:, i]
        torch.testing.assert_close(saes.decoder_vectors(layer)[own].norm(dim=-1), torch.ones(saes.widths[i]))
        torch.testing.assert_close(saes.decoder_vectors(layer, normalized=False)[own].norm(dim=-1),
                                   torch.full((saes.widths[i],), 1 / float(factors[i])))


def test_sets_in_the_old_format_are_refused(exported_set):
    path, _, _ = exported_set
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["units"]  # what crosslayer wrote before the folders were raw-unit
    (path / "cfg.json").write_text(json.dumps(cfg))
    for load in (load_dictionary, PerLayerSAEs.load):
        with pytest.raises(CrosslayerError, match="older crosslayer .* normalised inputs\\); train them again"):
            load(path)


def test_export_refusals(tmp_path):
    w = random_weights()
    with pytest.raises(CrosslayerError, match="cannot export a 'batchtopk' SAE"):
        export(tmp_path / "a", {**w, "arch": "batchtopk"}, 1.0)
    with pytest.raises(CrosslayerError, match="0 < k <= 48"):
        export(tmp_path / "a", {**w, "k": 0}, 1.0)
    with pytest.raises(CrosslayerError, match="threshold_F of shape"):
        export(tmp_path / "a", {**random_weights("jumprelu"), "threshold_F": None}, 1.0)
    with pytest.raises(CrosslayerError, match="W_enc \\[d, F\\]"):
        export(tmp_path / "a", {**w, "b_dec_D": torch.zeros(D + 1)}, 1.0)
    with pytest.raises(CrosslayerError, match="norm_factor must be positive"):
        export(tmp_path / "a", w, 0.0)
    export(tmp_path / "a", w, 1.0)
    with pytest.raises(CrosslayerError, match="exists; choose a new folder"):
        export(tmp_path / "a", w, 1.0)


def test_old_format_training_folders_are_not_resumed(tiny_store, tmp_path, monkeypatch):
    """An unfinished training folder of the old format (its cfg.json has no "units") is not resumed into a
    set that would mix normalised- and raw-unit folders."""
    import crosslayer.saes as saes_module
    from crosslayer.saes import SAETrainConfig, train_per_layer_saes

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saes_module, "_train_layer", killed)
    cfg = SAETrainConfig(width=8, k=2, tokens=256, batch_size=256)
    with pytest.raises(KeyboardInterrupt):
        train_per_layer_saes(tiny_store, cfg, out_dir=tmp_path / "old", progress=False)
    record = json.loads((tmp_path / "old" / "cfg.json").read_text())
    assert record["units"] == "raw" and record["status"] == "training"
    del record["units"]
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(record))
    with pytest.raises(CrosslayerError, match="different per-layer SAE training \\(units: None there, 'raw' now\\)"):
        train_per_layer_saes(tiny_store, cfg, out_dir=tmp_path / "old", progress=False)
