"""Per-layer SAEs trained by the crosscoder trainer (crosslayer.sae_stack): brute-force parity of the batched,
sparse-backward module with L separate dense TopK SAEs, independence of the layers, and training."""

import pytest
import torch

from crosslayer.sae_stack import SAEStack, SAEStackConfig

L, D, W, K = 3, 8, 24, 4


def stack(**kw) -> SAEStack:
    torch.manual_seed(0)
    s = SAEStack(SAEStackConfig(layers=(2, 5, 7), d_model=D, width=W, k=K, **kw), seed=1)
    with torch.no_grad():
        s.b_enc.normal_(0, 0.1)
        s.b_dec.normal_()
        s.W_dec.mul_(torch.rand(L, W, 1) + 0.5)  # unequal decoder norms: the TopK score weights them
    return s


def dense_reference(s: SAEStack, x_BLD: torch.Tensor, dead_LW: torch.Tensor | None, aux_rows: int | None = None):
    """L dense TopK SAEs written the obvious way: scores relu(pre) * ||W_dec||, k best per layer,
    AuxK over each layer's dead latents (raw pre-activations) on the first ``aux_rows`` rows, squared errors
    summed, mean over rows."""
    B = x_BLD.shape[0]
    A = aux_rows or B
    loss, aux, recons = 0.0, 0.0, []
    for l in range(L):
        pre = x_BLD[:, l] @ s.W_enc[l] + s.b_enc[l]
        norm = s.W_dec[l].norm(dim=-1).detach()
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, (pre.relu() * norm).topk(K, dim=1).indices, True)
        recon = (pre.relu() * keep) @ s.W_dec[l] + s.b_dec[l]
        recons.append(recon)
        loss = loss + (recon - x_BLD[:, l]).pow(2).sum() / B
        if dead_LW is not None:
            n_dead = int(dead_LW[l].sum())
            k_aux = min(s.k_aux, int(dead_LW.sum(1).max()))
            score = (pre * norm).masked_fill(~dead_LW[l], -torch.inf)
            pick = torch.zeros_like(keep).scatter(1, score.topk(min(k_aux, n_dead), dim=1).indices, True)
            resid = (x_BLD[:, l] - recon).detach()
            err = ((pre * pick) @ s.W_dec[l] - resid)[:A].pow(2).sum() / A
            aux = aux + s.cfg.aux_coef * min(n_dead / s.k_aux, 1.0) * err
    return loss + aux, torch.stack(recons, 1)


@pytest.mark.parametrize("with_dead,aux_frac", [(False, 1.0), (True, 1.0), (True, 0.3)])
def test_loss_and_gradients_match_dense_per_layer_saes(with_dead, aux_frac):
    s = stack(k_aux=5, aux_frac=aux_frac)
    x = torch.randn(50, L, D)
    dead_LW = torch.zeros(L, W, dtype=torch.bool)
    dead_LW[0, :7] = True  # layer 0: 7 dead (> k_aux), layer 1: 2 (< k_aux), layer 2: none
    dead_LW[1, 10:12] = True
    dead = dead_LW if with_dead else None
    out = s.loss(x, dead_F=None if dead is None else dead.reshape(-1))
    want, recon = dense_reference(s, x, dead, aux_rows=15 if aux_frac < 1 else None)  # ceil(0.3 * 50)
    torch.testing.assert_close(out.recon_BLD, recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, want, atol=1e-4, rtol=1e-5)
    params = [s.W_enc, s.b_enc, s.W_dec, s.b_dec]
    for got, ref in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert out.l0 == pytest.approx(L * K, abs=0.2)


def test_layers_are_independent_and_the_dictionary_view_agrees():
    """Changing layer 1's input changes layer 1's features only; encode/decode (dense view), reconstruct_layer
    and the training forward give one reconstruction; each feature reads and writes its own layer."""
    s = stack()
    x = torch.randn(20, L, D)
    x2 = x.clone()
    x2[:, 1] += 3.0
    f1, f2 = s.encode(x), s.encode(x2)
    torch.testing.assert_close(f1[:, :W], f2[:, :W])
    torch.testing.assert_close(f1[:, 2 * W:], f2[:, 2 * W:])
    assert not torch.equal(f1[:, W:2 * W], f2[:, W:2 * W])
    assert ((f1.reshape(20, L, W) != 0).sum(-1) <= K).all()
    recon = s.loss(x).recon_BLD
    torch.testing.assert_close(s.decode(f1), recon, atol=1e-5, rtol=1e-5)
    for i in range(L):
        torch.testing.assert_close(s.reconstruct_layer(x[:, i], i), recon[:, i], atol=1e-5, rtol=1e-5)
    assert torch.equal(s.writes_FL().sum(1), torch.ones(L * W, dtype=torch.long))
    assert torch.equal(s.decoder_norms() > 0, s.writes_FL())


def test_stack_trains_on_synthetic_truth(tmp_path):
    """The trainer learns each layer: held-out FVU of the stack falls well below 1 and the curve records it."""
    import pandas as pd

    from crosslayer.synthetic import make_synthetic
    from crosslayer.training import PROFILE_SNAPSHOTS, TrainConfig, train_crosscoder

    acts = make_synthetic(L, D, 24, 4096, seed=0)[0]
    gen = torch.Generator().manual_seed(0)
    batches = (acts[:3072][torch.randint(0, 3072, (128,), generator=gen)] for _ in iter(int, 1))
    cfg = SAEStackConfig(layers=(0, 1, 2), d_model=D, width=W, k=K)
    saes = train_crosscoder(TrainConfig(tokens=150 * 128, batch_size=128, lr=3e-3), cfg, batches,
                            out_dir=tmp_path / "stack", heldout=acts[3072:], progress=False)
    curve = pd.read_csv(tmp_path / "stack" / "train_log.csv")
    assert curve.heldout_fvu.iloc[-1] < 0.5 * curve.heldout_fvu.iloc[0]
    assert saes.kind == "per_layer_saes" and saes.n_features == L * W
    assert saes.meta["convergence"]["final_fvu"] == pytest.approx(curve.heldout_fvu.iloc[-1])
    assert not (tmp_path / "stack" / PROFILE_SNAPSHOTS).exists()  # its latents write one layer: no profiles


def test_saved_stack_is_a_raw_unit_sae_lens_set(tmp_path):
    """Parity with sae-lens: each saved folder, loaded by ``sae_lens.SAE.load_from_disk`` and fed RAW
    activations, fires the stack's features (values times the decoder norm) and gives the stack's
    reconstruction in raw units; PerLayerSAEs.load of the set agrees with the stack in normalised units."""
    from sae_lens import SAE

    from crosslayer.dictionary import load_dictionary

    factors = [0.5, 2.0, 1.5]
    s = stack()
    s.norm_factors.copy_(torch.tensor(factors))
    s.meta.update({"status": "complete"})
    s.save(tmp_path / "set")
    raw = torch.randn(30, L, D) * 3
    x = s.normalize(raw)
    feats = s.encode(x).reshape(30, L, W)
    recon = s.reconstruct(x)
    for i, hook in enumerate(s.hooks):
        sae = SAE.load_from_disk(tmp_path / "set" / hook)
        got = sae.encode(raw[:, i])
        assert torch.equal(got != 0, feats[:, i] != 0)
        torch.testing.assert_close(got, feats[:, i] * s.W_dec[i].norm(dim=-1).detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(got), recon[:, i] / factors[i], atol=1e-5, rtol=1e-5)
    back = load_dictionary(tmp_path / "set")
    assert back.kind == "per_layer_saes"
    torch.testing.assert_close(back.reconstruct(x), recon, atol=1e-5, rtol=1e-5)
