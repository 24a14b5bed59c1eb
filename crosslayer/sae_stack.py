"""Per-layer TopK SAEs trained by the crosscoder trainer: L independent SAEs in one batched module.

The baseline of every comparison must be trained the way the crosscoder is (same trainer, optimiser,
schedule, batch, token budget, dead-latent rule and AuxK), so that a difference between the two is
the architecture's, not the trainer's. :class:`SAEStack` is that baseline: identical in every setting
to a TopK :class:`~crosslayer.crosscoder.Crosscoder` except that each latent reads and writes one
layer, i.e. group l of ``width`` latents is a TopK SAE of layer l:

1. Encode: pre[l] = a^l @ W_enc[l] + b_enc[l] for all layers in one batched GEMM ([L, B, d] x
   [L, d, W]; the parameter ``W_enc_LWD`` is feature-major, so its gradient needs no copy); each layer
   keeps its own k best scores relu(pre_i) * ||W_dec,i|| (k per layer, so the stack's L0 is L k). The
   backward is sparse (:func:`crosslayer.crosscoder.sparse_topk`, G = L).
2. Decode: a_hat^l = sum over layer l's active latents of f_i W_dec[l, i] + b_dec[l] (gathered rows,
   ``embedding_bag`` with one bag per (layer, token)).
3. Loss: sum_l ||a^l - a_hat^l||^2 (mean over tokens), plus AuxK per layer: layer l's k_aux dead
   latents with the best scores reconstruct its detached residual, weighted aux_coef *
   min(n_dead_l / k_aux, 1) (Gao et al. App. A.2; k_aux = d // 2 as for the crosscoder).
4. Init and calibration as the crosscoder's: W_dec rows random with norm ``init_dec_norm``,
   W_enc = W_dec^T, b_dec = the sample mean of each layer, b_enc so that each latent's pre-activation
   crosses 0 on min(1, 4 k / W) of the sample.
5. Saved as one sae-lens folder per hook (:func:`crosslayer.saes.export_sae_lens`: the store's norm
   factor and the decoder norms folded in, so ``sae_lens.SAE.load_from_disk(folder).encode(raw)``
   works on raw activations) plus the set's ``cfg.json``; it loads as
   :class:`~crosslayer.saes.PerLayerSAEs`, like SAEs trained by sae-lens's own trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from crosslayer.crosscoder import CrosscoderOutput, _output, aux_row_count, sparse_decode, sparse_firing, sparse_topk
from crosslayer.dictionary import Dictionary
from crosslayer.errors import CrosslayerError


@dataclass(frozen=True)
class SAEStackConfig:
    """Architecture of a stack of per-layer TopK SAEs (saved in ``cfg.json["sae_stack"]``)."""

    layers: tuple[int, ...]
    """Model layer indices, one SAE each."""
    d_model: int
    """Residual width d."""
    width: int
    """Latents per layer (each SAE's d_sae)."""
    k: int = 32
    """Active latents per token in each layer's SAE."""
    k_aux: int | None = None
    """Dead latents per layer in the AuxK loss; None = d_model // 2 (as the crosscoder's)."""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient (Gao et al.)."""
    aux_frac: float = 1.0
    """Share of each batch's rows that carry the AuxK loss (:func:`crosslayer.crosscoder.aux_row_count`; 1 = all,
    the published recipe; less makes the AuxK decode and backward proportionally cheaper)."""
    init_dec_norm: float = 0.08
    """Initial decoder norm of each latent."""

    activation = "topk"
    """The trainer's view: a TopK dictionary (no sparsity coefficient)."""

    def __post_init__(self):
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise CrosslayerError(f"SAE stack layers must be distinct and non-empty, got {list(self.layers)}")
        if self.d_model < 1 or not 0 < self.k <= self.width:
            raise CrosslayerError(f"need d_model >= 1 and 0 < k <= width, got d_model={self.d_model}, "
                                  f"k={self.k}, width={self.width}")
        if (self.k_aux is not None and self.k_aux < 1) or self.init_dec_norm <= 0:
            raise CrosslayerError("k_aux must be >= 1 or None and init_dec_norm positive")
        if not 0 < self.aux_frac <= 1:
            raise CrosslayerError(f"aux_frac must be in (0, 1], got {self.aux_frac}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_features(self) -> int:
        """Latents of the whole stack, L * width."""
        return self.n_layers * self.width


class SAEStack(Dictionary):
    """L per-layer TopK SAEs as one batched, trainable module (module docstring). Normalised units."""

    layerwise = True

    def __init__(self, cfg: SAEStackConfig, *, hooks: list[str] | None = None, norm_factors=None,
                 meta: dict | None = None, seed: int = 0):
        super().__init__(layers=list(cfg.layers), hooks=hooks, norm_factors=norm_factors, d_model=cfg.d_model,
                         meta=meta)
        self.cfg = cfg
        L, W, d = cfg.n_layers, cfg.width, cfg.d_model
        W_dec_LWD = torch.randn(L, W, d, generator=torch.Generator().manual_seed(seed))
        W_dec_LWD = W_dec_LWD / W_dec_LWD.norm(dim=-1, keepdim=True) * cfg.init_dec_norm
        self.W_enc_LWD = nn.Parameter(W_dec_LWD.clone())  # feature-major: see :attr:`W_enc`
        self.W_dec = nn.Parameter(W_dec_LWD)
        self.b_enc = nn.Parameter(torch.zeros(L, W))
        self.b_dec = nn.Parameter(torch.zeros(L, d))

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    @property
    def k_aux(self) -> int:
        return self.cfg.k_aux or max(1, self.d_model // 2)

    enc_param, enc_from_saved = "W_enc_LWD", (0, 2, 1)
    """The encoder parameter's name; the permutation from ``W_enc``'s [L, d, W] (old checkpoints' layout) to it."""

    @property
    def W_enc(self) -> Tensor:
        """The encoders as readers see them, ``[L, d, W]``: a view of the parameter ``W_enc_LWD`` (feature-major, so
        its gradient needs no copy: :class:`~crosslayer.crosscoder._SparseTopKEncode`). In-place edits under
        ``torch.no_grad()`` write through; train, and read ``.grad`` of, ``W_enc_LWD``."""
        return self.W_enc_LWD.transpose(1, 2)

    # ---------------------------------------------------------------- encode / decode
    def _encode(self, acts_BLD: Tensor, dead_LW: Tensor | None = None) -> tuple[Tensor, ...]:
        """:func:`sparse_topk` over the layers: ``(vals_LBK, idx_LBK, aux_vals_LBA, aux_idx_LBA)``."""
        k_aux = min(self.k_aux, int(dead_LW.sum(1).max())) if dead_LW is not None else 0
        return sparse_topk(acts_BLD.transpose(0, 1), self.W_enc_LWD, self.b_enc, self.W_dec.norm(dim=-1), self.cfg.k,
                           dead_LW, k_aux, aux_row_count(self.cfg.aux_frac, acts_BLD.shape[0]))

    def _decode(self, vals_LBK: Tensor, idx_LBK: Tensor, *, bias: bool = True) -> Tensor:
        """sum of the active rows of each layer's decoder (one ``embedding_bag`` bag per layer and token)."""
        L, B, K = idx_LBK.shape
        gid = (idx_LBK + torch.arange(L, device=idx_LBK.device)[:, None, None] * self.cfg.width).reshape(L * B, K)
        out = sparse_decode(vals_LBK.reshape(L * B, K), gid, self.W_dec.reshape(-1, self.d_model))
        out_BLD = out.reshape(L, B, self.d_model).transpose(0, 1)
        return out_BLD + self.b_dec if bias else out_BLD

    def encode_normalized(self, acts_BLD: Tensor) -> Tensor:
        vals, idx = self._encode(acts_BLD)[:2]
        L, B, _ = idx.shape
        offset = torch.arange(L, device=idx.device)[:, None, None] * self.cfg.width
        flat_BN = (idx + offset).transpose(0, 1).reshape(B, -1)
        return vals.new_zeros(B, self.n_features).scatter(1, flat_BN, vals.transpose(0, 1).reshape(B, -1))

    def decode_normalized(self, feats_BF: Tensor) -> Tensor:
        f_BLW = feats_BF.reshape(-1, self.n_layers, self.cfg.width)
        return torch.einsum("blw,lwd->bld", f_BLW, self.W_dec) + self.b_dec

    def reconstruct_layer(self, acts_ND: Tensor, index: int, *, normalized: bool = True) -> Tensor:
        x_ND = acts_ND if normalized else acts_ND * self.norm_factors[index].to(acts_ND)
        one = slice(index, index + 1)
        vals, idx = sparse_topk(x_ND[None], self.W_enc_LWD[one], self.b_enc[one], self.W_dec[one].norm(dim=-1),
                                self.cfg.k)[:2]
        recon = F_.embedding_bag(idx[0], self.W_dec[index], mode="sum", per_sample_weights=vals[0]) + self.b_dec[index]
        return recon if normalized else recon / self.norm_factors[index].to(acts_ND)

    # ---------------------------------------------------------------- weights and layer masks
    def writes_FL(self) -> Tensor:
        layer_F = torch.arange(self.n_layers).repeat_interleave(self.cfg.width)
        return F_.one_hot(layer_F, self.n_layers).bool()

    def reads_FL(self) -> Tensor:
        return self.writes_FL()

    @torch.no_grad()
    def decoder_vectors_normalized(self, index: int) -> Tensor:
        W_FD = self.W_dec.new_zeros(self.n_features, self.d_model)
        W_FD[index * self.cfg.width:(index + 1) * self.cfg.width] = self.W_dec[index]
        return W_FD

    @torch.no_grad()
    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=-1).reshape(-1)[:, None] * self.writes_FL().to(self.W_dec)

    # ---------------------------------------------------------------- training
    @torch.no_grad()
    def calibrate_(self, sample_BLD: Tensor) -> None:
        """b_dec = each layer's sample mean; b_enc so each latent crosses 0 on min(1, 4k / W) of the sample."""
        self.b_dec.copy_(sample_BLD.mean(0))
        self.b_enc.zero_()
        pre_LNW = torch.bmm(sample_BLD.transpose(0, 1), self.W_enc)
        n = pre_LNW.shape[1]
        rate = min(1.0, 4 * self.cfg.k / self.cfg.width)
        self.b_enc.copy_(-pre_LNW.kthvalue(min(n, max(1, round((1 - rate) * n))), dim=1).values)

    def loss(self, acts_BLD: Tensor, *, sparsity_coef: float = 0.0, dead_F: Tensor | None = None) -> CrosscoderOutput:
        """Reconstruction error plus AuxK (module docstring, step 3); ``sparsity_coef`` is unused (TopK)."""
        L, W = self.n_layers, self.cfg.width
        dead_LW = dead_F.reshape(L, W) if dead_F is not None and bool(dead_F.any()) else None
        vals, idx, aux_vals, aux_idx = self._encode(acts_BLD, dead_LW)
        recon_BLD = self._decode(vals, idx)
        losses = {"sparsity": recon_BLD.new_zeros(()), "aux": recon_BLD.new_zeros(()), "pre_act": recon_BLD.new_zeros(())}
        if dead_LW is not None:
            aux_BLD = self._decode(aux_vals, aux_idx, bias=False)
            resid_BLD = (acts_BLD[:len(aux_BLD)] - recon_BLD[:len(aux_BLD)]).detach()
            err_L = (aux_BLD - resid_BLD).pow(2).sum((0, 2)) / len(aux_BLD)
            scale_L = (dead_LW.sum(1).float() / self.k_aux).clamp(max=1.0)
            losses["aux"] = self.cfg.aux_coef * (scale_L * err_L).sum()
        gid = idx + torch.arange(L, device=idx.device)[:, None, None] * W
        fired_F, l0 = sparse_firing(vals.detach(), gid, self.n_features, acts_BLD.shape[0])
        return _output(None, recon_BLD, acts_BLD, losses, fired_F=fired_F, l0=l0)

    # ---------------------------------------------------------------- save / load
    @torch.no_grad()
    def per_layer_weights(self, index: int) -> dict[str, Tensor]:
        """Layer ``layers[index]``'s SAE in normalised units: W_enc [d, W], b_enc, W_dec [W, d], b_dec."""
        W_enc_DW = self.W_enc[index].detach().cpu().clone(memory_format=torch.contiguous_format)
        return {"W_enc": W_enc_DW, "b_enc": self.b_enc[index].detach().cpu().clone(),
                "W_dec": self.W_dec[index].detach().cpu().clone(), "b_dec": self.b_dec[index].detach().cpu().clone()}

    def save(self, path: str | Path) -> None:
        """One raw-unit sae-lens folder per hook and the set's ``cfg.json`` (loads as PerLayerSAEs)."""
        from crosslayer.saes import save_sae_stack

        save_sae_stack(self, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu"):
        """A saved stack loads as :class:`~crosslayer.saes.PerLayerSAEs` (its sae-lens folders)."""
        from crosslayer.saes import PerLayerSAEs

        return PerLayerSAEs.load(path, device=device)
