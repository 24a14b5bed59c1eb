"""Sparse crosscoders: one dictionary that reads and writes the residual stream of L layers at once.

Method (Lindsey et al., "Sparse Crosscoders for Cross-Layer Features and Model Diffing",
Transformer Circuits, Oct 2024; research-notes §3):
1. Encode: pre_i = sum_l W_enc^l[:, i] . a^l + b_enc_i (one [B, L*d] x [L*d, F] GEMM), then an
   activation f = act(pre): ReLU; TopK or BatchTopK selecting on the score
   f_i * ||W_dec,i|| (Gao et al. 2024; Bussmann et al. 2024); or JumpReLU f_i = pre_i * H(pre_i - theta_i)
   (Rajamanoharan et al. 2024). ||W_dec,i|| is sum_l ||W_dec,i^l|| ("l1_norms", the paper's
   choice) or sqrt(sum_l ||W_dec,i^l||^2) ("l2_norms"). BatchTopK keeps a training batch's B * k
   largest scores; at inference a feature fires when its score exceeds one threshold, set after
   training with the final weights so that inference L0 = k (:meth:`Crosscoder.calibrate_threshold_`;
   an EMA of the threshold started at 0 left held-out L0 several times k after short runs;
   tests/test_synthetic.py asserts held-out L0 within 10 % of k on synthetic data).
2. Decode: a_hat^l = sum_i f_i W_dec,i^l + b_dec^l. TopK decodes sparsely: only the k active
   rows of W_dec are gathered (``embedding_bag``), so decoding costs O(B k L d), not O(B F L d).
3. Loss = sum_l ||a^l - a_hat^l||^2 (mean over the batch) plus, by activation:
   ReLU: lambda * sum_i f_i ||W_dec,i||; TopK / BatchTopK: AuxK (Gao et al. App. A.2): the
   k_aux dead latents with the largest scores reconstruct the detached residual, coefficient
   aux_coef * min(n_dead / k_aux, 1); JumpReLU (Anthropic, Jan 2025 update): lambda * sum_i
   tanh(c f_i ||W_dec,i||) with c = 4, plus 3e-6 * sum_i ReLU(theta_i - pre_i) ||W_dec,i||, and
   rectangle-kernel straight-through gradients for theta and the pre-activations (``_JumpReLU``:
   Anthropic's choice, sae-lens's ``jumprelu_ste_to_input=True``).
4. Layer masks: ``read_FL`` / ``write_FL`` say which layers feature i reads / writes. Acausal:
   all. Weakly causal: feature i has a home layer h_i (spread evenly), reads h_i, writes l >= h_i.
   Window: reads and writes h_i .. h_i + window - 1. The weights are multiplied by the masks in
   every forward pass, so masked weights are exactly 0 and receive exactly 0 gradient.
5. Init (crosscoder replications): W_dec random with per-layer norm ``init_dec_norm``,
   W_enc = W_dec transposed; :meth:`Crosscoder.calibrate_` sets b_dec to a sample's mean and b_enc
   so that each latent fires on ~10,000 / F of the sample's tokens (4k / F for TopK). For masked
   variants each feature's decoder is then scaled so that its combined norm ||W_dec,i|| equals an
   acausal feature's (L or sqrt(L) times init_dec_norm): otherwise a weakly causal feature homed at the first
   layer (writing L layers) would start with an L times larger TopK score and penalty weight than
   one homed at the last, and most late-layer features would never be selected.

Conventions shared with sae-lens 6.x (checked by the parity test): the input is NOT shifted by
b_dec before encoding (sae-lens's ``apply_b_dec_to_input``; fold ``-b_dec @ W_enc`` into b_enc to
convert); the reconstruction loss is summed over dimensions and averaged over tokens; AuxK uses
the dead latents' raw (not ReLU'd) pre-activations and k_aux = d_model // 2 by default. Our
``feats`` are pre-activations, sae-lens's TopK training SAE reports them times ||W_dec,i||.

k_aux = d_model // 2, not scaled with the input width L * d, by measurement (issue 12):
``experiments/auxk_k_aux.py`` trains acausal TopK crosscoders (d = 32, k = 4, 1500 steps of 256, 3
seeds) on synthetic truth for k_aux in {d/4, d/2, L d/4, L d/2, L d} and without AuxK, for L = 4, 6;
every run is in ``experiments/results/auxk_k_aux_G64_F256.csv`` and ``..._G256_F512.csv`` (G true
features, F latents). Read from those files (``tests/test_crosscoder.py::test_auxk_measurement_supports_the_default``
checks each statement): without AuxK many more latents end dead, and with G 256 the held-out FVU is
clearly worse; with any k_aux from d/4 to L d the mean FVU over seeds stays within two seed standard
deviations of d/2's; the dead fraction at L d is higher than at d/2. So scaling k_aux with L * d buys
nothing, and d/2 (Gao et al.'s value, sae-lens parity) is kept.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F_
from jaxtyping import Bool, Float
from torch import Tensor, nn

from crosslayer.dictionary import Dictionary, DictionaryOutput, meta_from_cfg, read_saved_cfg, register_dictionary
from crosslayer.errors import CrosslayerError
from crosslayer.io import atomic_path

VARIANTS = ("acausal", "weakly_causal", "window")
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
SPARSITIES = ("l1_norms", "l2_norms")
WEIGHTS_FILE = "crosscoder.safetensors"


@dataclass(frozen=True)
class CrosscoderConfig:
    """Architecture of a crosscoder (saved in ``cfg.json["crosscoder"]``)."""

    layers: tuple[int, ...]
    """Model layer indices read and written, in order."""
    d_model: int
    """Residual width d."""
    n_features: int
    """Dictionary width F."""
    variant: str = "acausal"
    """acausal | weakly_causal | window (layer masks, see the module docstring)."""
    window: int = 2
    """Layers read and written per feature (variant window)."""
    activation: str = "topk"
    """relu | topk | batchtopk | jumprelu."""
    k: int = 32
    """Active features per token (topk; batch mean for batchtopk)."""
    sparsity: str = "l1_norms"
    """How per-layer decoder norms combine in penalties and TopK scores: l1_norms | l2_norms."""
    init_dec_norm: float = 0.08
    """Initial decoder norm of each feature at each layer it writes."""
    k_aux: int | None = None
    """Dead latents in the AuxK loss; None = d_model // 2 (Gao et al.), not L * d_model // 2: on synthetic
    truth scaling with the input width gave no lower FVU and more dead latents (module docstring)."""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient (Gao et al.)."""
    aux_frac: float = 1.0
    """Share of each batch's rows that carry the AuxK loss (:func:`crosslayer.crosscoder.aux_row_count`; 1 = all,
    the published recipe; less makes the AuxK decode and backward proportionally cheaper)."""
    threshold_lr: float = 0.01
    """BatchTopK: EMA rate of the running threshold during training (min selected score per batch, started
    at the first batch's); the trainer replaces it at the end by :meth:`Crosscoder.calibrate_threshold_`."""
    jump_bandwidth: float = 2.0
    """JumpReLU rectangle-kernel width epsilon."""
    jump_init_threshold: float = 0.1
    """JumpReLU initial threshold theta."""
    tanh_scale: float = 4.0
    """JumpReLU tanh sparsity scale c."""
    pre_act_coef: float = 3e-6
    """JumpReLU pre-activation loss coefficient."""

    def __post_init__(self):
        L = len(self.layers)
        if L < 1 or len(set(self.layers)) != L:
            raise CrosslayerError(f"crosscoder layers must be distinct and non-empty, got {list(self.layers)}")
        if self.d_model < 1 or self.n_features < 1:
            raise CrosslayerError(f"need d_model >= 1 and n_features >= 1, got {self.d_model}, {self.n_features}")
        for name, value, allowed in (("variant", self.variant, VARIANTS), ("activation", self.activation, ACTIVATIONS),
                                     ("sparsity", self.sparsity, SPARSITIES)):
            if value not in allowed:
                raise CrosslayerError(f"unknown crosscoder {name} {value!r}; use one of {', '.join(allowed)}")
        if self.variant == "window" and not 1 <= self.window <= L:
            raise CrosslayerError(f"window must be in 1..{L} (number of layers), got {self.window}")
        if self.activation in ("topk", "batchtopk") and not 0 < self.k <= self.n_features:
            raise CrosslayerError(f"{self.activation} needs 0 < k <= n_features ({self.n_features}), got k={self.k}")
        if self.k_aux is not None and self.k_aux < 1:
            raise CrosslayerError(f"k_aux must be >= 1 or None, got {self.k_aux}")
        if not 0 < self.aux_frac <= 1:
            raise CrosslayerError(f"aux_frac must be in (0, 1], got {self.aux_frac}")
        if self.init_dec_norm <= 0 or self.jump_bandwidth <= 0 or self.jump_init_threshold <= 0:
            raise CrosslayerError("init_dec_norm, jump_bandwidth and jump_init_threshold must be positive")

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def layer_masks(cfg: CrosscoderConfig) -> tuple[Tensor, Tensor]:
    """``(read_FL, write_FL)`` bool masks of the config's variant (home layers spread evenly)."""
    F, L = cfg.n_features, cfg.n_layers
    if cfg.variant == "acausal":
        full = torch.ones(F, L, dtype=torch.bool)
        return full, full.clone()
    n_homes = L if cfg.variant == "weakly_causal" else L - cfg.window + 1
    home_F = torch.arange(F) * n_homes // F
    layer_L = torch.arange(L)
    if cfg.variant == "weakly_causal":
        return layer_L[None] == home_F[:, None], layer_L[None] >= home_F[:, None]
    inside = (layer_L[None] >= home_F[:, None]) & (layer_L[None] < home_F[:, None] + cfg.window)
    return inside, inside.clone()


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta) with rectangle-kernel straight-through gradients (Anthropic, Jan 2025).

    Backward, with K = 1[|pre - theta| < eps / 2] and g the incoming gradient:
    d/dtheta = -(theta / eps) K g (Rajamanoharan et al. 2024, summed over the batch) and
    d/dpre = H(pre - theta) g + (theta / eps) K g. The second term is the same straight-through
    estimate of the jump with the opposite sign (the jump depends on pre - theta only). DeepMind
    gives it to theta alone; the Anthropic January 2025 update (transformer-circuits.pub/2025/
    january-update: "unlike Rajamanoharan et al. we allow the gradient to flow through
    straight-through estimator to all model parameters, not just the JumpReLU thresholds") also
    gives it to the pre-activations, hence the encoder. We follow Anthropic because our JumpReLU loss
    is theirs: the tanh penalty saturates for active features (tanh' < 0.08 once c f ||W_dec|| > 2), so
    the penalty's pull on the encoder comes almost only through the jump; without the term the
    encoder never learns that switching a feature off would save lambda tanh(c theta ||W_dec||).
    sae-lens 6.54's ``JumpReLU`` equals this with ``jumprelu_ste_to_input=True`` (its docs: "True
    matches Anthropic's setup"); its default ``False`` (DeepMind) has the same theta gradient and
    d/dpre = H g. tests/test_crosscoder.py::test_jumprelu_gradients_match_sae_lens checks both.
    (theta = exp(log_threshold), so autograd gives d/dlog_threshold = theta * d/dtheta, where the update
    writes -(exp(t) / eps) K for d/dt; Adam's per-parameter scaling makes that factor minor.)
    """

    @staticmethod
    def forward(ctx, pre_BF, theta_F, bandwidth):
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > theta_F)

    @staticmethod
    def backward(ctx, grad_BF):
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        ste_BF = theta_F / eps * ((pre_BF - theta_F).abs() < eps / 2) * grad_BF
        return (pre_BF > theta_F) * grad_BF + ste_BF, (-ste_BF).sum_to_size(theta_F.shape), None  # over broadcast dims


def _bags_by(bag_N: Tensor, member_N: Tensor, weight_N: Tensor, n_bags: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(members, offsets, weights)`` for ``embedding_bag``: the entries grouped by bag (stable: an entry keeps
    its place within its bag), so that bag b sums weight[n] * table[member[n]] over the entries with bag[n] = b."""
    order = bag_N.argsort(stable=True)
    offsets = bag_N.new_zeros(n_bags)
    offsets[1:] = torch.bincount(bag_N, minlength=n_bags).cumsum(0)[:-1]
    return member_N[order], offsets, weight_N[order]


def scatter_rows(bag_N: Tensor, member_N: Tensor, weight_N: Tensor, table_MD: Tensor, n_bags: int) -> Tensor:
    """``out[b] = sum_n weight[n] * table[member[n]]`` over the entries with ``bag[n] = b``: ``[n_bags, D]``, the
    transposed sparse product S^T table of a sparse S with entries (member, bag, weight). One ``embedding_bag``
    over the entries sorted by bag (the weight gradients of the sparse encoder and decoder; 2.4-2.8x faster here than
    the CSR ``addmm`` it replaces for the standard crosscoder's encoder gradient at batch 4096:
    ``experiments/results/step_parts_s9.txt``)."""
    members, offsets, weights = _bags_by(bag_N, member_N, weight_N.to(table_MD.dtype), n_bags)
    return F_.embedding_bag(members, table_MD, offsets, mode="sum", per_sample_weights=weights)


_WORKSPACE: dict[torch.dtype, Tensor] = {}


def _workspace(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable buffer of ``like``'s dtype (CPU): a fresh tensor the size of the encoder's [G, B, F] scores costs
    the kernel's page faults at every step (the standard crosscoder's 151 MB score pass at batch 4096 took 8x longer
    into a fresh tensor than in place: ``experiments/results/step_parts_s9.txt``). The largest buffer asked for is kept and views of it are handed out; safe because the
    encoder returns only gathered copies of it."""
    n = math.prod(shape)
    buf = _WORKSPACE.get(like.dtype)
    if buf is None or buf.numel() < n:
        _WORKSPACE[like.dtype] = buf = like.new_empty(n)
    return buf[:n].view(shape)


def _scores(x_GBI: Tensor, W_GFI: Tensor, b_GF: Tensor, scale_GF: Tensor) -> Tensor:
    """The TopK scores (x W^T + b) * scale, [G, B, F]. On a CPU without autocast: the GEMM into the reused
    :func:`_workspace`, then bias and scale in place (one pass, no fresh 4 B F bytes); elsewhere (GPUs' caching
    allocators, bf16 autocast) a fresh float32 tensor as autocast gives it."""
    bias_G1F, scale_G1F = (b_GF * scale_GF)[:, None], scale_GF[:, None]
    if x_GBI.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        out = _workspace((x_GBI.shape[0], x_GBI.shape[1], W_GFI.shape[1]), x_GBI)
        torch.bmm(x_GBI, W_GFI.transpose(1, 2), out=out)
        return torch.addcmul(bias_G1F, out, scale_G1F, out=out)
    return torch.addcmul(bias_G1F, torch.bmm(x_GBI, W_GFI.transpose(1, 2)), scale_G1F)


def _pre_at(score_GBF: Tensor, scale_GF: Tensor, idx_GBK: Tensor) -> Tensor:
    """Pre-activations at ``idx`` from the scores pre * scale (0 where a latent's decoder norm is 0: such a latent
    writes nothing, so its value carries no loss and no gradient)."""
    scale_at = scale_GF[:, None].expand(-1, idx_GBK.shape[1], -1).gather(-1, idx_GBK)
    safe_at = scale_at.clamp(min=torch.finfo(scale_at.dtype).tiny)
    return torch.where(scale_at > 0, score_GBF.gather(-1, idx_GBK) / safe_at, 0)


class _SparseTopKEncode(torch.autograd.Function):
    """TopK encoder of G independent groups with a sparse backward (the crosscoder is G = 1 over the
    concatenated layers; a stack of per-layer SAEs is G = L, one group per layer).

    The weight ``W_GFI`` is feature-major ([G, F, I], the layout of the encoder parameters): the forward GEMM reads
    its transpose (BLAS takes a transposed operand at full speed), and the backward's sparse product yields dL/dW in
    that same contiguous layout, so autograd accumulates it without a copy (an input-major [G, I, F] parameter
    got a transposed gradient that AccumulateGrad copied: ~74 ms a step at batch 4096, issue 13).
    Forward: score = (x @ W^T + b) * scale (scale = the detached decoder norms): one batched GEMM into a reused
    buffer (:func:`_workspace`), then bias and scale in place in one pass; TopK on the score, vals = relu(pre) there
    (pre = score / scale at the selected entries); with ``dead_GF``, the AuxK selection: the ``k_aux`` best scores
    among each group's dead latents, with their raw pre-activations (0 where a group has fewer dead latents).
    Returns ``(vals_GBK, idx_GBK, aux_vals_GBA, aux_idx_GBA)``.
    Backward: only the k + k_aux selected entries per row carry gradient, so dL/dW = G^T x is one
    sparse-dense product over G B (k + k_aux) entries (O(B k I), as EleutherAI sparsify's fused
    encoder; :func:`scatter_rows`), never the dense [F, B] x [B, I] GEMM autograd would run; dL/db = column sums
    of G; dL/dx = G W (gathered rows of W, only when x requires grad).
    """

    @staticmethod
    def forward(ctx, x_GBI, W_GFI, b_GF, scale_GF, k: int, dead_GF: Tensor | None, k_aux: int, aux_rows: int):
        score_GBF = _scores(x_GBI, W_GFI, b_GF, scale_GF)
        idx = score_GBF.topk(k, dim=-1, sorted=False).indices
        vals = _pre_at(score_GBF, scale_GF, idx).relu_()
        aux_idx, aux_vals = idx.new_zeros(idx.shape[0], aux_rows, 0), vals.new_zeros(vals.shape[0], aux_rows, 0)
        aux_on = aux_vals  # AuxK on the first aux_rows rows only
        if dead_GF is not None and k_aux > 0:
            aux_score = score_GBF[:, :aux_rows].masked_fill_(~dead_GF[:, None], -torch.inf)  # main values taken
            aux_idx = aux_score.topk(k_aux, dim=-1, sorted=False).indices
            aux_on = dead_GF[:, None].expand(-1, aux_idx.shape[1], -1).gather(-1, aux_idx)
            aux_vals = torch.where(aux_on, _pre_at(aux_score, scale_GF, aux_idx), 0)
            aux_on = aux_on.to(vals.dtype)
        ctx.save_for_backward(x_GBI, W_GFI, idx, vals, aux_idx, aux_on)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        x_GBI, W_GFI, idx, vals, aux_idx, aux_on = ctx.saved_tensors
        (G, B, I), n_feats, A = x_GBI.shape, W_GFI.shape[1], aux_idx.shape[1]
        # in the weights' dtype (float32 under bf16 autocast: the CPU's sparse kernels have no bfloat16)
        g_main, g_aux = (g_vals * (vals > 0)).to(W_GFI.dtype), (g_aux * aux_on).to(W_GFI.dtype)
        offset_G = torch.arange(G, device=idx.device)[:, None, None] * n_feats
        gid_main, gid_aux = idx + offset_G, aux_idx + offset_G  # feature ids over all groups
        rows_G = torch.arange(G, device=idx.device)[:, None, None] * B
        row_main = (rows_G + torch.arange(B, device=idx.device)[None, :, None]).expand_as(idx)
        row_aux = (rows_G + torch.arange(A, device=idx.device)[None, :, None]).expand_as(aux_idx)
        entries = [torch.cat([m.reshape(-1), a.reshape(-1)]) for m, a in
                   ((gid_main, gid_aux), (row_main, row_aux), (g_main, g_aux))]
        g_x = g_W = g_b = None
        if ctx.needs_input_grad[1]:  # [G F, I], contiguous in the parameter's own layout: accumulated without a copy
            g_W = scatter_rows(*entries, x_GBI.reshape(G * B, I).to(W_GFI.dtype), G * n_feats).reshape(G, n_feats, I)
        if ctx.needs_input_grad[2]:
            g_b = g_main.new_zeros(G * n_feats).index_add_(0, entries[0], entries[2]).reshape(G, n_feats)
        if ctx.needs_input_grad[0]:
            W_FI = W_GFI.reshape(G * n_feats, I)
            g_x = F_.embedding_bag(gid_main.reshape(G * B, -1), W_FI, mode="sum",
                                   per_sample_weights=g_main.reshape(G * B, -1)).reshape(G, B, I)
            if A and aux_idx.shape[-1]:
                g_x[:, :A] += F_.embedding_bag(gid_aux.reshape(G * A, -1), W_FI, mode="sum",
                                               per_sample_weights=g_aux.reshape(G * A, -1)).reshape(G, A, I)
        return g_x, g_W, g_b, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``out[n] = sum_j vals[n, j] * table[idx[n, j]]`` (``embedding_bag``) with a backward written for the CPU:
    dL/dtable by :func:`scatter_rows` and dL/dvals as a sampled dense product (``torch.sparse.sampled_addmm`` at
    the N K selected entries), in place of ``embedding_bag``'s own backward (its per-sample-weight gradient is a
    slow loop: 79 of the 131 ms of the standard crosscoder's decode backward at batch 4096 in session 8's profile,
    against ~10 ms for the sampled product, ``experiments/results/step_parts_s9.txt``). ``idx`` must
    not repeat within a row (TopK selections do not)."""

    @staticmethod
    def forward(ctx, vals_NK, idx_NK, table_RD):
        ctx.save_for_backward(vals_NK, idx_NK, table_RD)
        return F_.embedding_bag(idx_NK, table_RD, mode="sum", per_sample_weights=vals_NK)

    @staticmethod
    def backward(ctx, g_ND):
        vals_NK, idx_NK, table_RD = ctx.saved_tensors
        (N, K), R = idx_NK.shape, table_RD.shape[0]
        g_ND = g_ND.to(table_RD.dtype).contiguous()
        g_vals = g_table = None
        if ctx.needs_input_grad[0]:
            crow = torch.arange(0, N * K + 1, K, device=idx_NK.device)
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, idx_NK.reshape(-1), g_ND.new_ones(N * K), (N, R))
                g_vals = torch.sparse.sampled_addmm(pattern, g_ND, table_RD.T, beta=0).values().reshape(N, K)
        if ctx.needs_input_grad[2]:
            rows_N = torch.arange(N, device=idx_NK.device).repeat_interleave(K)
            g_table = scatter_rows(idx_NK.reshape(-1), rows_N, vals_NK.reshape(-1), g_ND, R)
        return g_vals, None, g_table


def sparse_decode(vals_NK: Tensor, idx_NK: Tensor, table_RD: Tensor) -> Tensor:
    """``sum_j vals[n, j] * table[idx[n, j]]``, [N, D]: the rows of ``table`` that ``idx`` selects, weighted (the
    TopK decoders). ``embedding_bag``; on a CPU, when a gradient is wanted, with :class:`_SparseDecode`'s backward."""
    vals_NK = vals_NK.to(table_RD.dtype)
    wants_grad = torch.is_grad_enabled() and (vals_NK.requires_grad or table_RD.requires_grad)
    if wants_grad and table_RD.device.type == "cpu" and idx_NK.numel():
        return _SparseDecode.apply(vals_NK, idx_NK, table_RD)
    return F_.embedding_bag(idx_NK, table_RD, mode="sum", per_sample_weights=vals_NK)


def sparse_topk(x_GBI: Tensor, W_GFI: Tensor, b_GF: Tensor, scale_GF: Tensor, k: int,
                dead_GF: Tensor | None = None, k_aux: int = 0, aux_rows: int | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`_SparseTopKEncode` (TopK of G groups, sparse backward; ``W_GFI`` feature-major):
    ``(vals, idx, aux_vals, aux_idx)``; the AuxK part covers the first ``aux_rows`` rows (None: all; see
    :func:`aux_row_count`)."""
    rows = x_GBI.shape[1] if aux_rows is None else min(aux_rows, x_GBI.shape[1])
    return _SparseTopKEncode.apply(x_GBI, W_GFI, b_GF, scale_GF.detach(), k, dead_GF, k_aux, rows)


def aux_row_count(aux_frac: float, n_rows: int) -> int:
    """Rows of a batch that carry the AuxK loss: ceil(aux_frac * n_rows), at least 1. Batches are shuffled, so the
    first rows are a uniform sample and the loss, a mean over rows, stays an unbiased estimate; the AuxK decode
    and its backward shrink in proportion."""
    return max(1, math.ceil(aux_frac * n_rows))


class _SumSquaredError(torch.autograd.Function):
    """sum((a - b)^2) / n_rows in one pass each way (the reconstruction loss; b is data, no gradient)."""

    @staticmethod
    def forward(ctx, a, b):
        diff = a - b
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff).square() / a.shape[0]

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return diff.mul_(2 * grad / diff.shape[0]), None


def _output(feats_BF: Tensor | None, recon_BLD: Tensor, acts_BLD: Tensor, losses: dict, *,
            fired_F: Tensor | None = None, l0: float | None = None) -> "CrosscoderOutput":
    """The training output: total loss = squared error + the ``losses`` terms; firing statistics from
    ``feats_BF`` unless given (sparse encoders pass them without a dense ``[B, F]`` tensor)."""
    mse = _SumSquaredError.apply(recon_BLD, acts_BLD)
    total = mse + sum(losses.values())
    detached = {"mse": mse.detach(), **{k: v.detach() for k, v in losses.items()}}
    if fired_F is None:
        active_BF = feats_BF != 0
        fired_F, l0 = active_BF.any(0), float(active_BF.sum(1).float().mean())
    return CrosscoderOutput(feats_BF, recon_BLD, total, detached, fired_F, l0)


def sparse_firing(vals_NK: Tensor, idx_NK: Tensor, n_features: int, n_rows: int) -> tuple[Tensor, float]:
    """``(fired_F, l0)`` from a TopK selection (no dense ``[B, F]`` tensor): the features with a positive value
    somewhere, and the positive values per row (``n_rows`` rows; idx may number features over several groups)."""
    active = vals_NK > 0
    fired_F = torch.zeros(n_features, dtype=torch.bool, device=idx_NK.device).index_fill_(0, idx_NK[active], True)
    return fired_F, float(active.sum()) / n_rows


class CrosscoderOutput(NamedTuple):
    """What :meth:`Crosscoder.loss` returns."""

    feats_BF: Tensor | None
    """Feature activations ``[batch, F]`` (detached; 0 = not firing); None where a sparse encoder skips them."""
    recon_BLD: Tensor
    """Reconstruction ``[batch, L, d]`` in normalised units."""
    loss: Tensor
    """Scalar total loss (differentiable)."""
    losses: dict[str, Tensor]
    """Detached terms: ``mse`` (sum over layers and dims, mean over tokens), ``sparsity``, ``aux``, ``pre_act``."""
    fired_F: Tensor
    """``[F]`` bool: the features that fired on some row of the batch."""
    l0: float
    """Mean active features per row."""


@register_dictionary("crosscoder")
class Crosscoder(Dictionary):
    """A sparse crosscoder (see the module docstring). Computes in normalised units."""

    def __init__(self, cfg: CrosscoderConfig, *, hooks: list[str] | None = None, norm_factors=None,
                 meta: dict | None = None, seed: int = 0):
        super().__init__(layers=list(cfg.layers), hooks=hooks, norm_factors=norm_factors, d_model=cfg.d_model,
                         meta=meta)
        self.cfg = cfg
        F, L, d = cfg.n_features, cfg.n_layers, cfg.d_model
        read_FL, write_FL = layer_masks(cfg)
        self.register_buffer("read_FL", read_FL, persistent=False)
        self.register_buffer("write_FL", write_FL, persistent=False)
        self.masked = not bool(read_FL.all() and write_FL.all())
        gen = torch.Generator().manual_seed(seed)
        W_dec_FLD = torch.randn(F, L, d, generator=gen)
        W_dec_FLD = W_dec_FLD / W_dec_FLD.norm(dim=-1, keepdim=True) * cfg.init_dec_norm * write_FL[..., None]
        self.W_enc_FLD = nn.Parameter(W_dec_FLD * read_FL[..., None])  # feature-major: see :attr:`W_enc`
        # Equal combined decoder norm for every feature, however many layers it writes (see step 5).
        n_written_F = write_FL.sum(-1).clamp_min(1).float()
        scale_F = L / n_written_F if cfg.sparsity == "l1_norms" else (L / n_written_F).sqrt()
        self.W_dec = nn.Parameter(W_dec_FLD * scale_F[:, None, None])
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((F,), float(cfg.jump_init_threshold)).log())
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK inference threshold (score units)
        self.data_group = None
        """torch.distributed group that splits a training batch (data parallel, set by
        :func:`crosslayer.distributed.prepare`): BatchTopK selects and calibrates over the whole batch."""

    # ---------------------------------------------------------------- weights and norms
    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    enc_param, enc_from_saved = "W_enc_FLD", (2, 0, 1)
    """The encoder parameter's name; the permutation from the saved ``W_enc`` [L, d, F] to it (:func:`saved_state`)."""

    @property
    def W_enc(self) -> Float[Tensor, "layer d_model feat"]:
        """The encoder as readers and saved folders see it, ``[L, d, F]``: a view of the parameter ``W_enc_FLD``
        (feature-major, so its gradient needs no copy: :class:`_SparseTopKEncode`). In-place edits under
        ``torch.no_grad()`` write through; train, and read ``.grad`` of, ``W_enc_FLD``."""
        return self.W_enc_FLD.permute(1, 2, 0)

    def W_enc_masked(self) -> Float[Tensor, "feat layer d_model"]:
        return self.W_enc_FLD * self.read_FL[..., None] if self.masked else self.W_enc_FLD

    def W_dec_masked(self) -> Float[Tensor, "feat layer d_model"]:
        return self.W_dec * self.write_FL[..., None] if self.masked else self.W_dec

    def writes_FL(self) -> Bool[Tensor, "feat layer"]:
        """The variant's write mask (``layer_masks``), on the CPU."""
        return self.write_FL.cpu().clone()

    def reads_FL(self) -> Bool[Tensor, "feat layer"]:
        """The variant's read mask (``layer_masks``), on the CPU."""
        return self.read_FL.cpu().clone()

    def decoder_vectors_normalized(self, index: int) -> Float[Tensor, "feat d_model"]:
        return self.W_dec_masked()[:, index]

    def decoder_norms(self) -> Float[Tensor, "feat layer"]:
        return self.W_dec_masked().detach().norm(dim=-1)

    def _norm_F(self, W_dec_FLD: Tensor) -> Tensor:
        """Combined decoder norm ||W_dec,i|| per the ``sparsity`` setting (differentiable)."""
        norms_FL = W_dec_FLD.norm(dim=-1)
        return norms_FL.sum(-1) if self.cfg.sparsity == "l1_norms" else norms_FL.pow(2).sum(-1).sqrt()

    # ---------------------------------------------------------------- encode / decode
    def pre_acts(self, acts_BLD: Tensor) -> Float[Tensor, "batch feat"]:
        L, d = self.n_layers, self.d_model
        return acts_BLD.reshape(-1, L * d) @ self.W_enc_masked().reshape(-1, L * d).T + self.b_enc

    def _activate(self, pre_BF: Tensor, norm_F: Tensor, *, training: bool) -> Tensor:
        """Dense feature activations from pre-activations (TopK excluded: see ``_topk``)."""
        act = self.cfg.activation
        if act == "relu":
            return pre_BF.relu()
        if act == "jumprelu":
            return _JumpReLU.apply(pre_BF, self.log_threshold.exp(), self.cfg.jump_bandwidth)
        f_BF = pre_BF.relu()
        score_BF = f_BF * norm_F.detach()
        if training and self.data_group is not None:  # the B * k largest scores of the batch all ranks hold
            from crosslayer.distributed import top_values

            n_keep = self.cfg.k * pre_BF.shape[0] * torch.distributed.get_world_size(self.data_group)
            return f_BF * (score_BF >= top_values(score_BF, n_keep, self.data_group)[-1])
        if training:  # BatchTopK: the B * k largest scores of the whole batch
            keep = torch.zeros_like(score_BF, dtype=torch.bool).reshape(-1)
            keep[score_BF.reshape(-1).topk(self.cfg.k * pre_BF.shape[0], sorted=False).indices] = True
            return f_BF * keep.reshape(score_BF.shape)
        return f_BF * (score_BF > self.threshold)

    def _topk(self, acts_BLD: Tensor, norm_F: Tensor, dead_F: Tensor | None = None) -> tuple[Tensor, ...]:
        """TopK on the score pre_i * ||W_dec,i|| (= relu(pre_i) * ||W_dec,i|| wherever a value is non-zero):
        ``(values_BK, indices_BK, aux_values_BA, aux_indices_BA)`` with a sparse backward
        (:class:`_SparseTopKEncode`); the AuxK part is empty unless ``dead_F`` marks dead latents."""
        L, d = self.n_layers, self.d_model
        k_aux = min(self.k_aux, int(dead_F.sum())) if dead_F is not None else 0
        out = sparse_topk(acts_BLD.reshape(1, -1, L * d), self.W_enc_masked().reshape(1, -1, L * d), self.b_enc[None],
                          norm_F[None], self.cfg.k, None if dead_F is None else dead_F[None], k_aux,
                          aux_row_count(self.cfg.aux_frac, acts_BLD.shape[0]))
        return tuple(t[0] for t in out)

    @property
    def k_aux(self) -> int:
        """Dead latents in the AuxK loss (``cfg.k_aux``, default d_model // 2)."""
        return self.cfg.k_aux or max(1, self.d_model // 2)

    def encode_normalized(self, acts_BLD: Float[Tensor, "batch layer d_model"]) -> Float[Tensor, "batch feat"]:
        norm_F = self._norm_F(self.W_dec_masked())
        if self.cfg.activation == "topk":
            vals_BK, idx_BK = self._topk(acts_BLD, norm_F)[:2]
            return vals_BK.new_zeros(vals_BK.shape[0], self.n_features).scatter(1, idx_BK, vals_BK)
        return self._activate(self.pre_acts(acts_BLD), norm_F, training=False)

    def decode_normalized(self, feats_BF: Float[Tensor, "batch feat"]) -> Float[Tensor, "batch layer d_model"]:
        W_dec_FLD = self.W_dec_masked()
        return (feats_BF @ W_dec_FLD.reshape(self.n_features, -1)).reshape(-1, self.n_layers, self.d_model) + self.b_dec

    def decode_sparse(self, vals_BK: Tensor, idx_BK: Tensor, *, bias: bool = True,
                      W_dec_FLD: Tensor | None = None) -> Float[Tensor, "batch layer d_model"]:
        """sum_j vals[b, j] W_dec[idx[b, j]] (+ b_dec): gathers only the active rows, O(B k L d)."""
        W_dec_FLD = self.W_dec_masked() if W_dec_FLD is None else W_dec_FLD
        out = sparse_decode(vals_BK, idx_BK, W_dec_FLD.reshape(self.n_features, -1))
        out_BLD = out.reshape(-1, self.n_layers, self.d_model)
        return out_BLD + self.b_dec if bias else out_BLD

    def forward(self, acts_BLD: Float[Tensor, "batch layer d_model"], *, normalized: bool = True) -> DictionaryOutput:
        """As :meth:`Dictionary.forward`; TopK decodes sparsely (same result, O(k) decoding)."""
        if self.cfg.activation != "topk":
            return super().forward(acts_BLD, normalized=normalized)
        self.check_acts(acts_BLD)
        x_BLD = acts_BLD if normalized else self.normalize(acts_BLD)
        vals_BK, idx_BK = self._topk(x_BLD, self._norm_F(self.W_dec_masked()))[:2]
        recon_BLD = self.decode_sparse(vals_BK, idx_BK)
        feats_BF = vals_BK.new_zeros(vals_BK.shape[0], self.n_features).scatter(1, idx_BK, vals_BK)
        return DictionaryOutput(feats_BF, recon_BLD if normalized else self.denormalize(recon_BLD))

    # ---------------------------------------------------------------- training loss
    def loss(self, acts_BLD: Float[Tensor, "batch layer d_model"], *, sparsity_coef: float = 0.0,
             dead_F: Tensor | None = None) -> CrosscoderOutput:
        """Training forward pass: reconstruction and loss terms (module docstring, step 3).

        ``sparsity_coef`` is lambda (ReLU, JumpReLU); ``dead_F`` marks dead latents for AuxK.
        """
        cfg = self.cfg
        W_dec_FLD = self.W_dec_masked()
        norm_F = self._norm_F(W_dec_FLD)
        losses = {name: norm_F.new_zeros(()) for name in ("sparsity", "aux", "pre_act")}
        if cfg.activation == "topk":
            dead_F = dead_F if dead_F is not None and bool(dead_F.any()) else None
            vals_BK, idx_BK, aux_vals, aux_idx = self._topk(acts_BLD, norm_F, dead_F)
            recon_BLD = self.decode_sparse(vals_BK, idx_BK, W_dec_FLD=W_dec_FLD)
            if dead_F is not None:
                aux_BLD = self.decode_sparse(aux_vals, aux_idx, bias=False, W_dec_FLD=W_dec_FLD)
                resid_BLD = (acts_BLD[:len(aux_BLD)] - recon_BLD[:len(aux_BLD)]).detach()
                scale = min(int(dead_F.sum()) / self.k_aux, 1.0)
                losses["aux"] = cfg.aux_coef * scale * _SumSquaredError.apply(aux_BLD, resid_BLD)
            fired_F, l0 = sparse_firing(vals_BK.detach(), idx_BK, cfg.n_features, acts_BLD.shape[0])
            return _output(None, recon_BLD, acts_BLD, losses, fired_F=fired_F, l0=l0)  # no dense [B, F] in training
        else:
            pre_BF = self.pre_acts(acts_BLD)
            f_BF = self._activate(pre_BF, norm_F, training=True)
            recon_BLD = (f_BF @ W_dec_FLD.reshape(cfg.n_features, -1)).reshape(acts_BLD.shape) + self.b_dec
            feats_BF = f_BF.detach()
            if cfg.activation == "relu":
                losses["sparsity"] = sparsity_coef * (f_BF * norm_F).sum(-1).mean()
            elif cfg.activation == "jumprelu":
                losses["sparsity"] = sparsity_coef * torch.tanh(cfg.tanh_scale * f_BF * norm_F).sum(-1).mean()
                theta_F = self.log_threshold.exp()
                losses["pre_act"] = cfg.pre_act_coef * ((theta_F - pre_BF).relu() * norm_F).sum(-1).mean()
            elif dead_F is not None and bool(dead_F.any()):  # BatchTopK
                losses["aux"] = self._aux_loss(acts_BLD, recon_BLD, pre_BF, norm_F, W_dec_FLD, dead_F)
        return _output(feats_BF, recon_BLD, acts_BLD, losses)

    def _aux_loss(self, acts_BLD, recon_BLD, pre_BF, norm_F, W_dec_FLD, dead_F) -> Tensor:
        """AuxK on dense pre-activations (BatchTopK; TopK selects these in :class:`_SparseTopKEncode`): the
        top-k_aux dead latents (by pre_i * ||W_dec,i||) reconstruct the detached residual."""
        n_dead = int(dead_F.sum())
        score_BF = torch.where(dead_F[None], pre_BF * norm_F.detach(), -torch.inf)
        idx_BK = score_BF.topk(min(self.k_aux, n_dead), dim=-1, sorted=False).indices
        resid_BLD = (acts_BLD - recon_BLD).detach()
        aux_BLD = self.decode_sparse(pre_BF.gather(1, idx_BK), idx_BK, bias=False, W_dec_FLD=W_dec_FLD)
        return self.cfg.aux_coef * min(n_dead / self.k_aux, 1.0) * _SumSquaredError.apply(aux_BLD, resid_BLD)

    # ---------------------------------------------------------------- init and in-place helpers
    @torch.no_grad()
    def calibrate_(self, sample_BLD: Tensor, *, fires_per_feature: float = 10_000.0) -> None:
        """Set b_dec to the sample mean and b_enc so each latent fires on ~fires_per_feature / F of tokens.

        TopK / BatchTopK use the rate 4k / F instead: every latent's pre-activation then crosses 0 on
        the same share of the sample, so no latent starts out winning (or losing) every selection,
        and a token nearly always has k positive candidates.
        """
        if self.cfg.activation in ("topk", "batchtopk"):
            rate = min(1.0, 4 * self.cfg.k / self.n_features)
        else:
            rate = min(1.0, fires_per_feature / self.n_features)
        self.b_dec.copy_(sample_BLD.mean(0) * self.write_FL.any(0)[:, None])
        self.b_enc.zero_()
        pre_NF = self.pre_acts(sample_BLD)
        n = pre_NF.shape[0]
        q_F = pre_NF.kthvalue(min(n, max(1, round((1 - rate) * n))), dim=0).values
        offset = self.log_threshold.exp() if self.cfg.activation == "jumprelu" else 0.0
        self.b_enc.copy_(offset - q_F)

    @torch.no_grad()
    def update_threshold_(self, feats_BF: Tensor) -> None:
        """BatchTopK during training: EMA (rate ``threshold_lr``) of each batch's smallest selected score,
        started at the first batch's value (an EMA from 0 stays biased low for ~1 / rate steps). A running
        estimate that lags the moving weights; :meth:`calibrate_threshold_` replaces it at the end."""
        score_BF = feats_BF * self._norm_F(self.W_dec_masked())
        smallest = torch.where(score_BF > 0, score_BF, torch.inf).min()
        if self.data_group is not None:
            from crosslayer.distributed import global_min

            smallest = global_min(smallest, self.data_group)
        if torch.isfinite(smallest):
            lr = torch.where(self.threshold > 0, self.cfg.threshold_lr, 1.0)
            self.threshold.copy_((1 - lr) * self.threshold + lr * smallest)

    @torch.no_grad()
    def calibrate_threshold_(self, acts_BLD: Tensor) -> None:
        """BatchTopK: set the inference threshold so that, on ``acts_BLD`` and with the current weights,
        inference keeps exactly what training's batch selection keeps (mean L0 = k): midway between the
        (B k)-th and (B k + 1)-th largest scores relu(pre_i) ||W_dec,i|| (0 if fewer are positive)."""
        score_N = (self.pre_acts(acts_BLD).relu() * self._norm_F(self.W_dec_masked())).reshape(-1)
        n = self.cfg.k * acts_BLD.shape[0]
        if self.data_group is None:
            top = score_N.topk(min(n + 1, score_N.numel())).values
        else:  # the rows of every data-parallel rank
            from crosslayer.distributed import top_values

            n *= torch.distributed.get_world_size(self.data_group)
            top = top_values(score_N, n + 1, self.data_group)
            top = top[torch.isfinite(top)]
        below = top[n] if n < top.numel() else top.new_zeros(())
        self.threshold.copy_((top[n - 1] + below) / 2)

    # ---------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> None:
        """``path/cfg.json`` (kind crosscoder, status complete, architecture, meta) and ``path/crosscoder.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(saved_state(self), str(tmp))
        self.write_cfg(path, crosscoder=asdict(self.cfg))

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> "Crosscoder":
        from safetensors.torch import load_file

        cfg = read_saved_cfg(path, "crosscoder")
        arch = dict(cfg["crosscoder"])
        arch["layers"] = tuple(arch["layers"])
        model = cls(CrosscoderConfig(**arch), hooks=cfg["hooks"], norm_factors=cfg["norm_factors"],
                    meta=meta_from_cfg(cfg, ("crosscoder",)))
        try:
            model.load_state_dict(from_saved(model, load_file(str(Path(path) / WEIGHTS_FILE))))
        except (OSError, RuntimeError) as err:
            raise CrosslayerError(f"{Path(path) / WEIGHTS_FILE} cannot be loaded ({err}); train again") from None
        return model.to(device)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Crosscoder({c.variant}, {c.activation}{f' k={c.k}' if 'topk' in c.activation else ''}, "
                f"layers={self.layers[0]}..{self.layers[-1]} ({self.n_layers}), d_model={self.d_model}, "
                f"n_features={self.n_features})")


def saved_state(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state as saved (contiguous, on the CPU), its feature-major encoder parameter ``module.enc_param``
    written as ``W_enc`` in the readers' ``[..., d, F]`` layout: the format of every saved folder, before the
    encoder became feature-major (issue 13) and since."""
    enc = module.enc_param
    return {("W_enc" if k == enc else k): (module.W_enc if k == enc else v).detach().cpu().contiguous()
            for k, v in module.state_dict().items()}


def from_saved(module: nn.Module, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`saved_state`: a saved state with ``W_enc`` permuted back into ``module.enc_param``."""
    return {(module.enc_param if k == "W_enc" else k): (v.permute(module.enc_from_saved) if k == "W_enc" else v)
            for k, v in saved.items()}
