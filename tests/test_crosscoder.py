"""The crosscoder module (crosslayer.crosscoder): parity with sae-lens TopK SAEs at one layer, exact
layer masks, sparse vs dense decoding, save / load, and the evaluation suite on a crosscoder.
"""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crosslayer.crosscoder import (ACTIVATIONS, VARIANTS, Crosscoder, CrosscoderConfig, _JumpReLU, _workspace, layer_masks,
                                   scatter_rows, sparse_decode, sparse_topk)
from crosslayer.dictionary import load_dictionary
from crosslayer.errors import CrosslayerError

D, F, K = 16, 48, 6


def one_layer(k=K, **kw):
    return Crosscoder(CrosscoderConfig(layers=(3,), d_model=D, n_features=F, activation="topk", k=k, **kw))


def copy_from_sae(cc, sae):
    with torch.no_grad():
        cc.W_enc.copy_(sae.W_enc[None])
        cc.W_dec.copy_(sae.W_dec[:, None])
        cc.b_enc.copy_(sae.b_enc)
        cc.b_dec.copy_(sae.b_dec[None])


def randomise(sae, unit_decoder: bool):
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        sae.b_enc.add_(0.2)
        if unit_decoder:
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))


# ----------------------------------------------------------------------------- parity with sae-lens
@pytest.mark.parametrize("apply_b_dec_to_input", [False, True])
def test_parity_topk_inference_sae(apply_b_dec_to_input):
    """sae-lens TopKSAE (selection on pre-activations, unit decoder rows) == one-layer crosscoder.

    sae-lens subtracts b_dec from the input when apply_b_dec_to_input; the crosscoder does not,
    so that SAE equals a crosscoder with b_enc - b_dec @ W_enc.
    """
    import sae_lens as sl

    sae = sl.TopKSAE(sl.TopKSAEConfig(d_in=D, d_sae=F, k=K, apply_b_dec_to_input=apply_b_dec_to_input))
    randomise(sae, unit_decoder=True)
    cc = one_layer()
    copy_from_sae(cc, sae)
    if apply_b_dec_to_input:
        with torch.no_grad():
            cc.b_enc.sub_(sae.b_dec @ sae.W_enc)
    x = torch.randn(64, D) * 2
    with torch.no_grad():
        feats = sae.encode(x)
        torch.testing.assert_close(cc.encode(x[:, None]), feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cc.decode(feats)[:, 0], sae.decode(feats), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cc(x[:, None]).recon_BLD[:, 0], sae(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_parity_topk_training_sae_loss(n_dead):
    """TopKTrainingSAE (rescale_acts_by_decoder_norm: selection on pre * ||W_dec||) vs crosscoder.

    Scaling convention: sae-lens's feature activations are ours times ||W_dec,i||; reconstructions,
    the MSE loss (sum over dims, mean over tokens) and the AuxK loss (same coefficient, k_aux = d/2,
    scale min(n_dead / k_aux, 1)) are equal.
    """
    import sae_lens as sl
    from sae_lens.saes.sae import TrainStepInput

    sae = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K, apply_b_dec_to_input=False,
                                                      aux_loss_coefficient=1 / 32))
    randomise(sae, unit_decoder=False)
    cc = one_layer()
    copy_from_sae(cc, sae)
    x = torch.randn(64, D) * 2
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F)[:n_dead]] = True
    ref = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    out = cc.loss(x[:, None], dead_F=dead)
    norms = sae.W_dec.norm(dim=-1)
    assert out.feats_BF is None  # the training pass never builds the dense [B, F] activations
    torch.testing.assert_close(cc.encode_normalized(x[:, None]) * norms, ref.feature_acts.detach(), atol=1e-5, rtol=1e-5)
    active = ref.feature_acts.detach() > 0
    assert out.l0 == pytest.approx(float(active.sum(1).float().mean())) and torch.equal(out.fired_F, active.any(0))
    torch.testing.assert_close(out.recon_BLD[:, 0], ref.sae_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.losses["mse"], ref.losses["mse_loss"].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["aux"], ref.losses["auxiliary_reconstruction_loss"].detach(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    assert (out.losses["aux"] > 0) == (n_dead > 0)


@pytest.mark.parametrize("ste_to_input", [True, False])
def test_jumprelu_gradients_match_sae_lens(ste_to_input):
    """Our JumpReLU vs sae-lens's (``sae_lens.saes.jumprelu_sae.JumpReLU``) on the same inputs, at our
    default bandwidth. Same forward and same threshold gradient -(theta / eps) K g summed over the batch.
    Pre-activation gradient: equal to sae-lens's with ``ste_to_input=True`` (Anthropic, Jan 2025: the
    estimator reaches all parameters; our choice, see ``_JumpReLU``); sae-lens's default ``False``
    (DeepMind: threshold only) lacks exactly the kernel term +(theta / eps) K g that we add."""
    from sae_lens.saes.jumprelu_sae import JumpReLU

    eps = CrosscoderConfig(layers=(0,), d_model=D, n_features=F, activation="jumprelu").jump_bandwidth
    gen = torch.Generator().manual_seed(0)
    theta_F = 0.05 + torch.rand(F, generator=gen)
    pre_BF = theta_F + (torch.rand(64, F, generator=gen) - 0.5) * 3 * eps  # a third inside the kernel
    g_BF = torch.randn(64, F, generator=gen)

    def grads(fn):
        pre, theta = pre_BF.clone().requires_grad_(), theta_F.clone().requires_grad_()
        out = fn(pre, theta)
        out.backward(g_BF)
        return out.detach(), pre.grad, theta.grad

    ours = grads(lambda pre, theta: _JumpReLU.apply(pre, theta, eps))
    theirs = grads(lambda pre, theta: JumpReLU.apply(pre, theta, eps, ste_to_input))
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=1e-6)
    inside_BF = (pre_BF - theta_F).abs() < eps / 2
    assert 0.2 < inside_BF.float().mean() < 0.5 and (ours[2] != 0).all()
    kernel_BF = theta_F / eps * inside_BF * g_BF
    torch.testing.assert_close(ours[1], theirs[1] + (0 if ste_to_input else kernel_BF), rtol=1e-6, atol=1e-6)
    if not ste_to_input:
        torch.testing.assert_close(theirs[1], (pre_BF > theta_F) * g_BF, rtol=0, atol=0)


@pytest.mark.slow
def test_auxk_default_k_aux_not_worse():
    """A cheap rerun of experiments/auxk_k_aux.py (issue 12): on synthetic truth where AuxK matters (no
    AuxK doubles the FVU), the default k_aux = d_model // 2 is not worse than scaling with the input
    width (L * d / 2) in held-out FVU (within 3 %) or dead fraction (within 5 points), two seeds."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "auxk_k_aux.py"
    spec = importlib.util.spec_from_file_location("auxk_k_aux", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    L, d = 4, 32
    small = {"n_layers": L, "d_model": d, "n_truth": 256, "n_features": 512, "k": 4, "steps": 600,
             "n_tokens": 20000, "n_heldout": 8192}
    runs = {name: [experiment.run_one(seed=seed, k_aux=k_aux, aux_coef=coef, **small) for seed in (0, 1)]
            for name, k_aux, coef in (("default", None, 1 / 32), ("scaled", L * d // 2, 1 / 32), ("off", None, 0.0))}
    mean = {name: {key: np.mean([r[key] for r in rows]) for key in ("fvu", "dead_train")}
            for name, rows in runs.items()}
    print(f"\n{mean}")
    assert mean["off"]["fvu"] > 1.5 * mean["default"]["fvu"]  # AuxK matters here
    assert mean["default"]["fvu"] <= 1.03 * mean["scaled"]["fvu"]
    assert mean["default"]["dead_train"] <= mean["scaled"]["dead_train"] + 0.05


# ----------------------------------------------------------------------------- masks
def test_layer_masks_shapes():
    cfg = CrosscoderConfig(layers=(0, 1, 2, 3), d_model=4, n_features=10, variant="weakly_causal", k=2)
    read, write = layer_masks(cfg)
    assert (read.sum(1) == 1).all()
    home = read.int().argmax(1)
    assert (home.bincount(minlength=4) >= 2).all()  # spread evenly
    assert torch.equal(write, torch.arange(4)[None] >= home[:, None])
    read, write = layer_masks(CrosscoderConfig(layers=(0, 1, 2, 3), d_model=4, n_features=9, variant="window", k=2,
                                               window=2))
    assert torch.equal(read, write) and (read.sum(1) == 2).all()
    assert set(read.int().argmax(1).tolist()) == {0, 1, 2}
    read, write = layer_masks(CrosscoderConfig(layers=(5, 7), d_model=4, n_features=3, k=1))
    assert read.all() and write.all()


@pytest.mark.parametrize("variant", ["weakly_causal", "window"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_masks_exact_zero_weights_and_grads(variant, activation):
    cfg = CrosscoderConfig(layers=(0, 1, 2, 3), d_model=8, n_features=24, variant=variant, window=2,
                           activation=activation, k=4)
    cc = Crosscoder(cfg)
    x = torch.randn(128, 4, 8)
    cc.calibrate_(x)
    enc_off = ~cc.read_FL[..., None].expand_as(cc.W_enc_FLD)
    dec_off = ~cc.write_FL[..., None].expand_as(cc.W_dec)
    optim = torch.optim.Adam(cc.parameters(), lr=1e-2)
    for _ in range(3):
        optim.zero_grad()
        cc.loss(x, sparsity_coef=1.0, dead_F=torch.ones(24, dtype=torch.bool)).loss.backward()
        assert (cc.W_enc_FLD.grad[enc_off] == 0).all() and (cc.W_dec.grad[dec_off] == 0).all()
        assert cc.W_enc_FLD.grad[~enc_off].abs().sum() > 0 and cc.W_dec.grad[~dec_off].abs().sum() > 0
        optim.step()
    assert (cc.W_enc_FLD[enc_off] == 0).all() and (cc.W_dec[dec_off] == 0).all()
    assert (cc.decoder_norms()[~cc.write_FL] == 0).all()
    # weakly causal: a feature's activation depends on its home layer only
    if variant == "weakly_causal":
        home = cc.read_FL.int().argmax(1)
        x2 = x.clone()
        x2[:, 3] += 5.0
        pre1, pre2 = cc.pre_acts(x), cc.pre_acts(x2)
        torch.testing.assert_close(pre1[:, home < 3], pre2[:, home < 3])


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("variant,aux_frac", [("acausal", 1.0), ("weakly_causal", 1.0), ("acausal", 0.3)])
def test_sparse_topk_backward_equals_dense_autograd(variant, aux_frac):
    """The sparse TopK encoder (_SparseTopKEncode) gives autograd's dense gradients: for W_enc, b_enc, the
    input and, with dead latents, through the AuxK selection -- on every row, or on the first ceil(aux_frac B)
    (brute force: pre-activations from a dense matmul, the same selections gathered, autograd)."""
    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(layers=(0, 1, 2), d_model=D, n_features=F, k=K, variant=variant, k_aux=5,
                                     aux_frac=aux_frac))
    x = torch.randn(40, 3, D, requires_grad=True)
    dead_F = torch.rand(F) < 0.3
    norm_F = cc._norm_F(cc.W_dec_masked())
    vals, idx, aux_vals, aux_idx = cc._topk(x, norm_F, dead_F)
    g1, g2 = torch.randn_like(vals), torch.randn_like(aux_vals)
    grads = torch.autograd.grad((vals * g1).sum() + (aux_vals * g2).sum(), (cc.W_enc_FLD, cc.b_enc, x))
    pre = cc.pre_acts(x)
    score = pre * norm_F.detach()
    assert torch.equal(idx.sort(1).values, score.topk(K, dim=1).indices.sort(1).values)
    A = 12 if aux_frac < 1 else 40  # ceil(0.3 * 40)
    dead_score = score.masked_fill(~dead_F, -torch.inf)[:A]
    assert aux_idx.shape == (A, 5) and torch.equal(aux_idx.sort(1).values, dead_score.topk(5, dim=1).indices.sort(1).values)
    ref = (pre.gather(1, idx).relu() * g1).sum() + (pre[:A].gather(1, aux_idx) * g2).sum()
    for got, want in zip(grads, torch.autograd.grad(ref, (cc.W_enc_FLD, cc.b_enc, x))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sparse_decode_backward_equals_embedding_bag_autograd():
    """sparse_decode's CPU backward (scatter_rows for the table, sampled_addmm for the values) gives the gradients
    autograd computes through embedding_bag (reference), for both inputs, with unique indices per row."""
    torch.manual_seed(0)
    N, R, Dd, Kk = 37, 50, 24, 7
    idx = torch.rand(N, R).topk(Kk, dim=1).indices
    vals, table = torch.randn(N, Kk, requires_grad=True), torch.randn(R, Dd, requires_grad=True)
    g = torch.randn(N, Dd)
    got = torch.autograd.grad((sparse_decode(vals, idx, table) * g).sum(), (vals, table))
    ref = torch.nn.functional.embedding_bag(idx, table, mode="sum", per_sample_weights=vals)
    want = torch.autograd.grad((ref * g).sum(), (vals, table))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sparse_decode(vals, idx, table), ref)


def test_scatter_rows_is_the_transposed_sparse_product():
    """scatter_rows(bag, member, weight, table, n) = S^T table with S[member, bag] += weight (brute force, dense S;
    repeated (member, bag) pairs add up; empty bags give 0)."""
    torch.manual_seed(1)
    bag, member, weight = torch.randint(0, 9, (60,)), torch.randint(0, 13, (60,)), torch.randn(60)
    table = torch.randn(13, 5)
    S = torch.zeros(13, 11).index_put_((member, bag), weight, accumulate=True)
    torch.testing.assert_close(scatter_rows(bag, member, weight, table, 11), S.T @ table, atol=1e-5, rtol=1e-5)


def test_encoder_workspace_is_reused_and_leaves_outputs_alone():
    """The encoder's score buffer is reused across calls (no fresh [G, B, F] tensor a step), a later call never
    changes an earlier call's outputs, and a latent with a zero decoder norm gets value 0, not NaN."""
    torch.manual_seed(2)
    W, b = torch.randn(1, F, 3 * D), torch.randn(1, F)
    scale = torch.rand(1, F) + 0.5
    scale[0, 0] = 0.0
    x1, x2 = torch.randn(1, 40, 3 * D), torch.randn(1, 20, 3 * D)
    vals1, idx1 = sparse_topk(x1, W, b, scale, K)[:2]
    kept = vals1.clone(), idx1.clone()
    buf = _workspace((1, 40, F), x1)
    sparse_topk(x2, W, b, scale, K)
    assert _workspace((1, 20, F), x1).data_ptr() == buf.data_ptr()
    assert torch.equal(vals1, kept[0]) and torch.equal(idx1, kept[1])
    pre = x1 @ W.transpose(1, 2) + b[:, None]
    torch.testing.assert_close(vals1, pre.gather(-1, idx1).relu().where(idx1 != 0, 0.0), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(vals1).all()


@pytest.mark.parametrize("variant", ["acausal", "weakly_causal"])
def test_encoder_grad_is_in_the_parameter_layout_and_equals_dense_autograd(variant):
    """After a TopK training backward (with AuxK) the feature-major encoder's ``.grad`` is contiguous with the
    parameter's strides (accumulated without a copy, issue 13) and equals dense autograd's gradient of the same
    loss, written with an input-major [L, d, F] leaf (brute force: every pre-activation, dense decodes)."""
    cc = Crosscoder(CrosscoderConfig(layers=(0, 1, 2), d_model=D, n_features=F, k=K, variant=variant, k_aux=5))
    x, dead_F = torch.randn(40, 3, D), torch.rand(F) < 0.3
    cc.loss(x, dead_F=dead_F).loss.backward()
    assert cc.W_enc_FLD.grad.is_contiguous() and cc.W_enc_FLD.grad.stride() == cc.W_enc_FLD.stride()
    W_LDF = cc.W_enc.detach().clone().requires_grad_()
    W_dec_FX = cc.W_dec_masked().detach().reshape(F, -1)
    norm_F = cc._norm_F(cc.W_dec_masked()).detach()
    pre = x.reshape(40, -1) @ (W_LDF * cc.read_FL.T[:, None, :]).reshape(-1, F) + cc.b_enc.detach()
    keep = torch.zeros_like(pre).scatter(1, (pre * norm_F).topk(K, dim=1).indices, 1.0)
    pick = torch.zeros_like(pre).scatter(1, (pre * norm_F).masked_fill(~dead_F, -torch.inf).topk(5, dim=1).indices, 1.0)
    recon = (pre.relu() * keep) @ W_dec_FX + cc.b_dec.detach().reshape(-1)
    resid = (x.reshape(40, -1) - recon).detach()
    aux = cc.cfg.aux_coef * min(int(dead_F.sum()) / 5, 1.0) * ((pre * pick) @ W_dec_FX - resid).pow(2).sum() / 40
    (g_LDF,) = torch.autograd.grad((recon - x.reshape(40, -1)).pow(2).sum() / 40 + aux, W_LDF)
    torch.testing.assert_close(cc.W_enc_FLD.grad, g_LDF.permute(2, 0, 1), atol=1e-5, rtol=1e-5)


def _dictionary(name: str):
    """A tiny dictionary over 3 layers: a crosscoder with activation ``name``, or ``sae_stack`` / ``clt_topk``."""
    from crosslayer.clt import CLTConfig, CrossLayerTranscoder
    from crosslayer.sae_stack import SAEStack, SAEStackConfig

    if name == "sae_stack":
        return SAEStack(SAEStackConfig(layers=(0, 1, 2), d_model=D, width=F // 3, k=K))
    if name == "clt_topk":
        return CrossLayerTranscoder(CLTConfig(layers=(0, 1, 2), d_model=D, width=F // 3, k=K))
    return Crosscoder(CrosscoderConfig(layers=(0, 1, 2), d_model=D, n_features=F, k=K, activation=name))


@pytest.mark.parametrize("name", [*ACTIVATIONS, "sae_stack", "clt_topk"])
def test_encoder_grad_is_accumulated_without_a_copy(name):
    """Every dictionary kind and activation: after a training backward the encoder parameter's ``.grad`` has the
    parameter's own strides, and (torch's profiler) no copy or clone of an encoder-sized tensor ran in the
    backward (AccumulateGrad copies a gradient whose layout differs from its parameter's: issue 13)."""
    model = _dictionary(name)
    enc = getattr(model, model.enc_param)
    x, dead_F = torch.randn(29, 3, D), torch.rand(model.n_features) < 0.3  # 29 rows: no index list of W_enc's size
    target = {"target_BLD": torch.randn(29, 3, D)} if name.startswith("clt") else {}
    out = model.loss(x, sparsity_coef=0.1, dead_F=dead_F, **target)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out.loss.backward()
    assert enc.grad.stride() == enc.stride() and enc.is_contiguous()
    copies = [(e.name, e.input_shapes, _parents(e)) for e in prof.events() if e.name in ("aten::copy_", "aten::clone")
              and any(math.prod(s) == enc.numel() for s in e.input_shapes if s)]
    # the sparse product's addmm(..., out=buffer) records result.copy_(self) on the buffer itself: a no-op
    assert [c for c in copies if c[2][:2] != ["aten::addmm", "_SparseTopKEncodeBackward"]] == []


def _parents(event) -> list[str]:
    """Names of the profiler ops enclosing ``event``, innermost first."""
    out, event = [], event.cpu_parent
    while event is not None:
        out, event = [*out, event.name], event.cpu_parent
    return out


@pytest.mark.parametrize("make", ["crosscoder", "sae_stack"])
def test_auxk_on_a_row_share_is_the_full_auxk_of_those_rows(make):
    """With aux_frac < 1 the AuxK term is exactly the full-batch AuxK of the batch's first ceil(aux_frac B) rows
    (a uniform sample of a shuffled batch: an unbiased estimate of the mean), and the reconstruction is untouched."""
    from crosslayer.sae_stack import SAEStack, SAEStackConfig

    def build(frac):
        torch.manual_seed(0)
        if make == "crosscoder":
            return Crosscoder(CrosscoderConfig(layers=(0, 1, 2), d_model=D, n_features=F, k=K, k_aux=5, aux_frac=frac))
        return SAEStack(SAEStackConfig(layers=(0, 1, 2), d_model=D, width=F // 3, k=K, k_aux=5, aux_frac=frac))

    x = torch.randn(40, 3, D)
    dead = torch.rand(build(1.0).n_features) < 0.3
    part, full = build(0.25).loss(x, dead_F=dead), build(1.0).loss(x[:10], dead_F=dead)
    torch.testing.assert_close(part.losses["aux"], full.losses["aux"])
    torch.testing.assert_close(part.recon_BLD, build(1.0).loss(x, dead_F=dead).recon_BLD)
    with pytest.raises(CrosslayerError, match="aux_frac"):
        build(0.0)


def test_sparse_and_dense_decoding_agree():
    cc = Crosscoder(CrosscoderConfig(layers=(0, 1, 2), d_model=D, n_features=F, k=K))
    with torch.no_grad():
        cc.b_dec.normal_()
    x = torch.randn(32, 3, D)
    pre = cc.pre_acts(x)
    vals, idx = cc._topk(x, cc._norm_F(cc.W_dec))[:2]
    dense = torch.zeros_like(pre).scatter(1, idx, vals)
    sparse_out = cc.decode_sparse(vals, idx)
    dense_out = cc.decode_normalized(dense)
    torch.testing.assert_close(sparse_out, dense_out, atol=1e-5, rtol=1e-5)
    g_sparse = torch.autograd.grad(sparse_out.pow(2).sum(), cc.W_dec)[0]
    g_dense = torch.autograd.grad(cc.decode_normalized(dense).pow(2).sum(), cc.W_dec)[0]
    torch.testing.assert_close(g_sparse, g_dense, atol=1e-5, rtol=1e-5)
    # forward and the training loss (both sparse) reconstruct what decode(encode(x)) (dense) does
    dense_recon = cc.decode(cc.encode(x))
    torch.testing.assert_close(cc(x).recon_BLD, dense_recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cc.loss(x).recon_BLD, dense_recon, atol=1e-5, rtol=1e-5)
    raw = x * 3
    torch.testing.assert_close(cc.reconstruct(raw, normalized=False),
                               cc.denormalize(cc.decode(cc.encode(raw, normalized=False))),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_is_decode_encode_and_units(activation):
    cc = Crosscoder(CrosscoderConfig(layers=(1, 4), d_model=8, n_features=20, activation=activation, k=3),
                    norm_factors=[0.5, 2.0])
    x = torch.randn(16, 2, 8)
    cc.calibrate_(x)
    feats, recon = cc(x)
    torch.testing.assert_close(recon, cc.decode(cc.encode(x)))
    raw = cc.denormalize(x)
    torch.testing.assert_close(cc.reconstruct(raw, normalized=False), cc.denormalize(recon))
    if activation == "topk":
        assert ((feats != 0).sum(1) <= 3).all()
    assert (feats >= 0).all()


def test_calibrate_sets_firing_rate():
    cc = Crosscoder(CrosscoderConfig(layers=(0, 1), d_model=16, n_features=2000, activation="relu"))
    x = torch.randn(2000, 2, 16)
    cc.calibrate_(x, fires_per_feature=100)  # target 100 / F = 5 % of tokens, for every latent
    rate_F = (cc.encode(x) > 0).float().mean(0)
    assert (rate_F - 0.05).abs().max() < 0.002
    torch.testing.assert_close(cc.b_dec, x.mean(0))


def test_calibrate_topk_balances_latents():
    """TopK calibration: every latent's pre-activation is positive on 4k / F of the sample, so
    the first selections are spread over the dictionary instead of a few high-variance latents."""
    cc = Crosscoder(CrosscoderConfig(layers=(0, 1), d_model=16, n_features=400, activation="topk", k=20))
    x = torch.randn(4000, 2, 16) * torch.linspace(0.1, 3, 16)  # anisotropic: some directions dominate
    cc.calibrate_(x)
    rate_F = (cc.pre_acts(x) > 0).float().mean(0)
    assert (rate_F - 4 * 20 / 400).abs().max() < 0.002
    fired_F = (cc.encode(x) != 0).any(0)
    assert fired_F.float().mean() > 0.95


@pytest.mark.parametrize("sparsity", ["l1_norms", "l2_norms"])
def test_weakly_causal_init_gives_every_home_layer_the_same_start(sparsity):
    """Combined decoder norms are equal at init whatever a feature's home layer, so TopK's
    first selections use features of every home layer about equally often."""
    L, F, k = 6, 600, 12
    cc = Crosscoder(CrosscoderConfig(layers=tuple(range(L)), d_model=16, n_features=F, variant="weakly_causal",
                                     k=k, sparsity=sparsity))
    norm_F = cc._norm_F(cc.W_dec_masked()).detach()
    acausal = L if sparsity == "l1_norms" else L ** 0.5  # an acausal feature's combined norm / init_dec_norm
    torch.testing.assert_close(norm_F, torch.full((F,), acausal * cc.cfg.init_dec_norm))
    x = torch.randn(3000, L, 16)
    cc.calibrate_(x)
    home_F = cc.read_FL.float().argmax(-1)
    picks_F = (cc.encode(x) != 0).float().sum(0)
    share_L = torch.zeros(L).index_add_(0, home_F, picks_F) / picks_F.sum()
    assert (share_L - 1 / L).abs().max() < 0.05, share_L


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(tmp_path, activation, variant):
    cfg = CrosscoderConfig(layers=(2, 5, 6), d_model=8, n_features=12, activation=activation, variant=variant, k=3)
    cc = Crosscoder(cfg, hooks=[f"blocks.{l}.hook_resid_post" for l in (2, 5, 6)], norm_factors=[0.5, 1, 2],
                    meta={"store": {"model": "tiny"}}, seed=3)
    x = torch.randn(20, 3, 8)
    cc.calibrate_(x)
    if activation == "batchtopk":
        cc.update_threshold_(cc.loss(x).feats_BF)
        assert cc.threshold > 0
    cc.save(tmp_path / "cc")
    saved = load_file(str(tmp_path / "cc" / "crosscoder.safetensors"))  # the format of folders from before issue 13
    assert "W_enc_FLD" not in saved and saved["W_enc"].shape == (3, 8, 12) and torch.equal(saved["W_enc"], cc.W_enc)
    back = load_dictionary(tmp_path / "cc")
    assert isinstance(back, Crosscoder) and back.cfg == cfg and back.meta == cc.meta
    assert back.layers == cc.layers and back.hooks == cc.hooks
    torch.testing.assert_close(back.norm_factors, cc.norm_factors)
    for key, value in cc.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert torch.equal(back.encode(x), cc.encode(x))


def test_config_validation():
    with pytest.raises(CrosslayerError, match="variant"):
        CrosscoderConfig(layers=(0,), d_model=4, n_features=8, k=2, variant="causal")
    with pytest.raises(CrosslayerError, match="k <= n_features"):
        CrosscoderConfig(layers=(0,), d_model=4, n_features=8, k=9)
    with pytest.raises(CrosslayerError, match="window"):
        CrosscoderConfig(layers=(0, 1), d_model=4, n_features=8, k=2, variant="window", window=3)
    with pytest.raises(CrosslayerError, match="distinct"):
        CrosscoderConfig(layers=(1, 1), d_model=4, n_features=8, k=2)
    cc = Crosscoder(CrosscoderConfig(layers=(0, 1), d_model=4, n_features=8, k=2))
    with pytest.raises(CrosslayerError, match="reads"):
        cc.encode(torch.randn(3, 3, 4))


# ----------------------------------------------------------------------------- evaluation suite
def test_evaluate_reports_l0_feat_and_tuple(tmp_path, tiny_model):
    from conftest import make_toy_corpus
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.evals import evaluate
    from crosslayer.harvest import harvest

    windows = make_windows(load_corpus(make_toy_corpus(tmp_path / "toy.jsonl", n_docs=40)), tiny_model.tokenizer,
                           seq_len=16, n_tokens=600)
    store = harvest(tiny_model, windows, out_dir=tmp_path / "store", batch_size=8, shard_mb=1, progress=False)
    cfg = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=64, k=5,
                           variant="weakly_causal")
    cc = Crosscoder(cfg, hooks=store.hooks, norm_factors=store.norm_factors,
                    meta={"store": {"model": store.manifest["model"]}})
    cc.calibrate_(next(store.iter_batches(256, normalized=True)))
    table = evaluate(cc, store, n_tokens=store.n_rows, batch_size=128)
    row = table[table.scope == "all"].iloc[0]
    assert row["kind"] == "crosscoder" and row["n_tokens"] == store.n_rows
    x = store.get(np.arange(store.n_rows), normalized=True)
    fires = (cc.encode(x) != 0).float()
    writes = (cc.decoder_norms() > 1e-6).float()
    assert row["l0_feat"] == pytest.approx(float(fires.sum(1).mean()), rel=1e-6)
    assert row["l0_feat"] == pytest.approx(5.0)  # TopK: k per token
    assert row["l0_tuple"] == pytest.approx(float((fires @ writes).sum(1).mean()), rel=1e-6)
    assert row["l0_feat"] < row["l0_tuple"] < row["l0_feat"] * store.n_layers  # weakly causal: partial writes


def test_auxk_measurement_supports_the_default():
    """The statements of the crosscoder docstring about k_aux, read from the committed measurement
    (experiments/auxk_k_aux.py, 3 seeds per cell)."""
    from pathlib import Path

    import pandas as pd

    folder = Path(__file__).resolve().parents[1] / "experiments" / "results"
    d = 32
    for name, fvu_worse_without in (("auxk_k_aux_G64_F256.csv", False), ("auxk_k_aux_G256_F512.csv", True)):
        runs = pd.read_csv(folder / name)
        assert runs.seed.nunique() == 3 and set(runs.layers) == {4, 6}
        for L, part in runs.groupby("layers"):
            cell = part.groupby("k_aux")[["dead_train", "fvu"]].agg(["mean", "std"])
            half = cell.loc[d // 2]
            assert cell.loc[0, ("dead_train", "mean")] > 2 * half[("dead_train", "mean")]  # AuxK keeps latents alive
            if fvu_worse_without:
                assert cell.loc[0, ("fvu", "mean")] > 1.1 * half[("fvu", "mean")]
            on = cell.drop(index=0)
            sd = max(float(on[("fvu", "std")].max()), 1e-12)
            assert ((on[("fvu", "mean")] - half[("fvu", "mean")]).abs() <= 2 * sd).all()  # k_aux barely matters
            assert cell.loc[L * d, ("dead_train", "mean")] > half[("dead_train", "mean")]
