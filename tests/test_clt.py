"""Cross-layer / per-layer transcoders: invariants, parity of the sparse paths, training on planted truth,
the aligned store pair, save/load and the evaluation table."""

import pytest
import torch

from crosslayer.clt import CLTConfig, CrossLayerTranscoder
from crosslayer.dictionary import load_dictionary
from crosslayer.errors import CrosslayerError
from crosslayer.training import TrainConfig, train_crosscoder


def _clt(cross_layer=True, activation="topk", L=3, d=8, W=16, k=3, seed=0):
    return CrossLayerTranscoder(CLTConfig(layers=tuple(range(L)), d_model=d, width=W, k=k, cross_layer=cross_layer,
                                          activation=activation), seed=seed)


@pytest.mark.parametrize("cross_layer", [True, False])
def test_masks_and_decoder_shapes(cross_layer):
    clt = _clt(cross_layer)
    writes, reads = clt.writes_FL(), clt.reads_FL()
    assert reads.sum(1).eq(1).all()
    first_write = writes.float().argmax(1)
    assert torch.equal(first_write, reads.float().argmax(1))  # a feature writes its own layer first
    if cross_layer:
        assert torch.equal(writes.sum(1), 3 - reads.float().argmax(1))  # and every later one
    else:
        assert torch.equal(writes, reads)
    norms = clt.decoder_norms()
    assert ((norms > 0) == writes).all()
    for i in range(3):
        assert torch.equal(clt.decoder_vectors_normalized(i).norm(dim=-1), norms[:, i])


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_forward_equals_decode_of_encode_and_sparse_path(activation):
    clt = _clt(activation=activation)
    x, y = torch.randn(20, 3, 8), torch.randn(20, 3, 8)
    clt.calibrate_(x, y)
    feats, recon = clt(x)
    assert torch.allclose(recon, clt.decode(clt.encode(x)))
    out = clt.loss(x, target_BLD=y, sparsity_coef=1.0)
    assert torch.allclose(out.recon_BLD, recon, atol=1e-5)  # training path (sparse decode for topk) = dense
    assert torch.isfinite(out.loss)
    if activation == "topk":
        per_layer = (feats.reshape(20, 3, 16) > 0).sum(-1)
        assert (per_layer <= 3).all() and per_layer.float().mean() > 2
    # a group's features depend on its own layer's input alone (the replacement model runs layer by layer)
    x2 = x.clone()
    x2[:, 2] = torch.randn(20, 8)
    assert torch.equal(clt.encode(x2)[:, :32], feats[:, :32])


def test_raw_units_use_input_and_target_factors():
    clt = CrossLayerTranscoder(CLTConfig(layers=(0, 1), d_model=4, width=8, k=2), norm_factors=[2.0, 4.0],
                               target_norm_factors=[0.5, 3.0])
    x = torch.randn(5, 2, 4)
    raw = clt.reconstruct(x, normalized=False)
    normed = clt.reconstruct(x * torch.tensor([2.0, 4.0])[:, None])
    assert torch.allclose(raw, normed / torch.tensor([0.5, 3.0])[:, None], atol=1e-6)
    assert torch.allclose(clt.decoder_vectors(1, normalized=False), clt.decoder_vectors(1) / 3.0)


def test_save_load_keeps_the_input_major_w_enc_on_disk(tmp_path):
    """Saved CLTs hold ``W_enc`` [L, d, W] (the format from before the feature-major parameter, issue 13) and load back
    to the same state."""
    from safetensors.torch import load_file

    clt = _clt()
    clt.save(tmp_path / "clt")
    saved = load_file(str(tmp_path / "clt" / "clt.safetensors"))
    assert "W_enc_LWD" not in saved and saved["W_enc"].shape == (3, 8, 16) and torch.equal(saved["W_enc"], clt.W_enc)
    back = load_dictionary(tmp_path / "clt")
    for key, value in clt.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_dense_encoder_gradient_needs_no_copy():
    """JumpReLU's dense pre-activations hand the feature-major encoder its gradient in its own layout: autograd's
    AccumulateGrad copies nothing (torch's profiler)."""
    clt = _clt(activation="jumprelu")
    loss = clt.pre_acts(torch.randn(29, 3, 8)).pow(2).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    accumulate = [e for e in prof.events() if e.name == "torch::autograd::AccumulateGrad"]
    assert len(accumulate) == 2  # W_enc_LWD and b_enc
    assert not [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone") and e.cpu_parent in accumulate]


def test_config_rejects_bad_layers():
    with pytest.raises(CrosslayerError, match="contiguous"):
        CLTConfig(layers=(0, 2), d_model=4, width=8, k=2)
    with pytest.raises(CrosslayerError, match="activation"):
        CLTConfig(layers=(0,), d_model=4, width=8, k=2, activation="relu")


def _planted(n=6000, L=3, d=16, G=24, seed=0):
    """Synthetic transcoder truth: x^l sparse in G directions per layer; feature g of layer l writes fixed
    directions to mlp_out of l and (cross-layer truth) every later layer."""
    gen = torch.Generator().manual_seed(seed)
    enc = torch.randn(L, G, d, generator=gen)
    enc /= enc.norm(dim=-1, keepdim=True)
    dec = torch.randn(L, G, L, d, generator=gen) * torch.triu(torch.ones(L, L))[None].permute(1, 0, 2)[..., None]
    mask = (torch.rand(n, L, G, generator=gen) < 2 / G).float()
    coef = mask * (1 + torch.rand(n, L, G, generator=gen))
    x = torch.einsum("nlg,lgd->nld", coef, enc) + 0.01 * torch.randn(n, L, d, generator=gen)
    y = torch.einsum("nlg,lgmd->nmd", coef, dec)
    y = y * d ** 0.5 / y.norm(dim=-1).mean(0)[:, None]  # each layer at mean norm sqrt(d), as the store serves it
    return x, y


@pytest.mark.slow  # ~30 s per case on the shared 2-core CPU
@pytest.mark.parametrize("cross_layer", [True, False])
def test_training_recovers_planted_transcoder(tmp_path, cross_layer):
    x, y = _planted()
    cfg = TrainConfig(tokens=64 * 300, batch_size=64, lr=1e-2, log_every=50)
    arch = CLTConfig(layers=(0, 1, 2), d_model=16, width=48, k=3, cross_layer=cross_layer)
    batches = ((x[i % 90 * 64:(i % 90 + 1) * 64], y[i % 90 * 64:(i % 90 + 1) * 64]) for i in range(10**6))
    clt = train_crosscoder(cfg, arch, batches, out_dir=tmp_path / "clt", heldout=(x[-512:], y[-512:]), progress=False)
    assert isinstance(clt, CrossLayerTranscoder) and clt.cfg.cross_layer == cross_layer
    fvu = clt.meta["convergence"]["final_fvu"]
    if cross_layer:
        assert fvu < 0.2  # the CLT can express the truth
    else:
        assert fvu > 0.35  # a PLT cannot write later layers; later layers' targets depend on earlier inputs
    again = load_dictionary(tmp_path / "clt")
    assert torch.equal(again.reconstruct(x[:10]), clt.reconstruct(x[:10]))
    assert again.target_hooks == clt.target_hooks and again.hooks[0] == "blocks.0.hook_resid_mid"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_model):
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.transcoder_data import harvest_pair
    from tests.conftest import make_toy_corpus

    root = tmp_path_factory.mktemp("pair")
    windows = make_windows(load_corpus(make_toy_corpus(root / "toy.jsonl", n_docs=80)), tiny_model.tokenizer,
                           seq_len=32, n_tokens=3000)
    return harvest_pair(tiny_model, windows, out_dir=root / "pair", batch_size=8, shard_mb=1, progress=False)


def test_pair_is_token_aligned(tiny_pair, tiny_model):
    from crosslayer.transcoder_data import pair_batches

    x, y = next(pair_batches(tiny_pair, 64, seed=3))
    rows = [0, 5, 17]
    meta_in, meta_out = tiny_pair.inputs.meta(rows), tiny_pair.targets.meta(rows)
    assert (meta_in["token_id"] == meta_out["token_id"]).all()
    # the aligned rows come from one forward pass: mlp_out = resid_post - resid_mid of that token
    win, pos = int(meta_in["window"][0]), int(meta_in["position"][0])
    _, cache = tiny_model.run_with_cache(tiny_pair.inputs.window_tokens()[win:win + 1])
    got = tiny_pair.targets.get([0], normalized=False)[0, 1]
    assert torch.allclose(got, cache["blocks.1.hook_mlp_out"][0, pos], atol=0.05 * got.norm())
    assert x.shape == y.shape == (64, 2, 64)


def test_train_and_evaluate_on_a_pair(tiny_pair, tiny_model, tmp_path):
    from crosslayer.transcoder_data import train_transcoder_from_pair
    from crosslayer.transcoder_evals import evaluate_transcoder

    cfg = TrainConfig(tokens=2048 * 2, batch_size=256, lr=2e-3)
    tables = {}
    for cross in (True, False):
        arch = CLTConfig(layers=(0, 1), d_model=64, width=64, k=4, cross_layer=cross)
        clt = train_transcoder_from_pair(tiny_pair, arch, cfg, out_dir=tmp_path / str(cross), progress=False)
        tables[cross] = evaluate_transcoder(clt, tiny_pair, model=tiny_model, n_tokens=1000, n_windows=6, n_boot=50)
    t = tables[True]
    layer_rows, exact = t[t.scope == "layer"], t[t.splice == "replacement_error"].iloc[0]
    assert list(layer_rows.layer) == [0, 1] and (layer_rows.fvu > 0).all()
    assert (layer_rows.l0_read <= 4 + 1e-9).all()
    # cross-layer pairs: layer 1 counts the writes of layer-0 features too, so l0 >= the features read there
    assert layer_rows.l0.iloc[1] >= layer_rows.l0_read.iloc[1] - 1e-9
    assert abs(exact.ce_spliced - exact.ce_clean) < 1e-4 and exact.kl < 1e-5  # error terms make it exact
    repl = t[t.splice == "replacement"].iloc[0]
    assert repl.ce_spliced_lo <= repl.ce_spliced <= repl.ce_spliced_hi
    plt = tables[False]
    assert (plt[plt.scope == "layer"].l0 == plt[plt.scope == "layer"].l0_read).all()  # a PLT writes only its layer


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_group_encode_and_decode_match_the_whole_dictionary(activation):
    clt = CrossLayerTranscoder(CLTConfig(layers=(0, 1, 2), d_model=8, width=16, k=3, activation=activation),
                               norm_factors=[2.0, 0.5, 1.0], target_norm_factors=[1.5, 3.0, 0.25])
    x = torch.randn(12, 3, 8)
    clt.calibrate_(x * clt.norm_factors[:, None])
    feats = clt.encode(x, normalized=False)
    writes = torch.zeros(12, 3, 8)
    for i in range(3):
        f = clt.encode_group(x[:, i], i, normalized=False)
        assert torch.allclose(f, feats[:, i * 16:(i + 1) * 16], atol=1e-6)
        w = clt.decode_group(f, i, normalized=False)
        writes[:, i:i + w.shape[1]] += w
    bias = clt.decode(torch.zeros(1, 48), normalized=False)
    assert torch.allclose(writes + bias, clt.decode(feats, normalized=False), atol=1e-5)


def test_jumprelu_loss_backward_reaches_every_threshold():
    """A JumpReLU CLT trains: its thresholds ([L, W], broadcast as [L, 1, W] over the batch) get a gradient of their own
    shape, equal to applying the crosscoder's 2-D JumpReLU layer by layer (the straight-through sum over rows)."""
    from crosslayer.crosscoder import _JumpReLU

    clt = _clt(activation="jumprelu")
    x, y = torch.randn(32, 3, 8), torch.randn(32, 3, 8)
    clt.loss(x, target_BLD=y, sparsity_coef=1.0).loss.backward()
    assert clt.log_threshold.grad.shape == clt.log_threshold.shape
    pre = clt.pre_acts(x).detach()
    pre = pre + clt.log_threshold.exp().detach()[:, None] - pre.mean(1, keepdim=True)  # many rows near the threshold
    weights = torch.randn_like(pre)
    theta = clt.log_threshold.detach().clone().requires_grad_(True)
    (_JumpReLU.apply(pre, theta.exp()[:, None], 1.0) * weights).sum().backward()
    per_layer = theta.detach().clone().requires_grad_(True)
    sum((_JumpReLU.apply(pre[l], per_layer.exp()[l], 1.0) * weights[l]).sum() for l in range(pre.shape[0])).backward()
    assert per_layer.grad.abs().sum() > 0 and torch.allclose(theta.grad, per_layer.grad)
