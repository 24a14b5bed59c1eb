"""Cross-layer transcoders (CLT) and per-layer transcoders (PLT): features that read the residual stream
entering an MLP and write MLP outputs.

Method (Ameisen et al., "Circuit Tracing", Transformer Circuits 2025, §2.1; research-notes §9):
1. Group l (``width`` features) reads ``hook_resid_mid`` of layer l (the stream after attention, entering
   the MLP): pre^l = x^l @ W_enc[l] + b_enc[l], one batched GEMM over the groups ([L, B, d] x [L, d, W]).
   TopK keeps each group's ``k`` best scores relu(pre_i) * ||W_dec,i|| (||W_dec,i|| = sum over the layers
   it writes of the decoder norms, as a crosscoder's l1_norms), so a group's features depend on layer l's
   input alone and the replacement model can run layer by layer; the sparse backward is
   :func:`crosslayer.crosscoder.sparse_topk` with G = L. JumpReLU (Anthropic's choice) uses the
   crosscoder's ``_JumpReLU`` (rectangle-kernel straight-through gradients), the tanh sparsity penalty
   and the pre-activation loss.
2. Decode: mlp_out_hat^{l'} = sum_{l <= l'} W_dec^{l -> l'} f^l + b_dec^{l'}. The decoder is stored per
   TARGET layer: ``W_dec[l']`` of shape [(l' + 1) W, d] holds the rows of every group that writes l'
   (groups 0..l', group-major), so a CLT stores L (L + 1) / 2 W d decoder weights and decoding layer l' is
   one ``embedding_bag`` over the active features of groups <= l' (TopK: (l' + 1) k rows per token). (A
   per-source layout [W, L - l, d] needs the writes of every group accumulated into slices of one output,
   whose backward materialised a full-size gradient per group: 7x slower at 30 layers.) A PLT
   (``cross_layer=False``) keeps only l -> l ([W, d]): the transcoder analogue of
   :class:`~crosslayer.sae_stack.SAEStack`.
3. Loss: sum_l ||mlp_out^l - mlp_out_hat^l||^2 (normalised units, mean over tokens) plus AuxK (TopK:
   the ceil(k_aux / L) best dead latents of each group, k_aux in all as one crosscoder's, reconstruct the
   detached residual, Gao et al.) or the
   JumpReLU penalties (lambda sum_i tanh(c f_i ||W_dec,i||) + pre_act_coef sum_i relu(theta_i - pre_i) ||W_dec,i||).
4. Init: decoder rows random with norm ``init_dec_norm`` / (number of layers written), so every feature
   starts with the same combined norm; W_enc[l] = the transpose of group l's first decoder block;
   :meth:`CrossLayerTranscoder.calibrate_` sets b_dec to the sample's mean MLP output and b_enc so each
   latent's pre-activation crosses 0 on min(1, 4 k / W) of the sample.
Units: inputs are normalised with the resid_mid store's factors, targets with the mlp_out store's
(``norm_factors`` / ``target_norm_factors``), each layer to mean norm sqrt(d).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F_
from jaxtyping import Float
from torch import Tensor, nn

from crosslayer.crosscoder import (CrosscoderOutput, _JumpReLU, _output, _SumSquaredError, aux_row_count, from_saved,
                                   saved_state, sparse_topk)
from crosslayer.dictionary import Dictionary, meta_from_cfg, read_saved_cfg, register_dictionary
from crosslayer.errors import CrosslayerError
from crosslayer.hooks import hook_name
from crosslayer.io import atomic_path

ACTIVATIONS = ("topk", "jumprelu")
WEIGHTS_FILE = "clt.safetensors"


@dataclass(frozen=True)
class CLTConfig:
    """Architecture of a cross-layer (or per-layer) transcoder (saved in ``cfg.json["clt"]``)."""

    layers: tuple[int, ...]
    """Model layers, ascending and contiguous: group l reads resid_mid of layer l and writes mlp_out of l (and later)."""
    d_model: int
    """Residual width d."""
    width: int
    """Features per layer."""
    cross_layer: bool = True
    """True: a CLT (features write their own and every later layer's MLP output); False: per-layer transcoders."""
    activation: str = "topk"
    """topk | jumprelu."""
    k: int = 16
    """Active features per token in each layer's group (topk)."""
    init_dec_norm: float = 0.08
    """Initial combined decoder norm of a feature (split evenly over the layers it writes)."""
    k_aux: int | None = None
    """Dead latents in the AuxK loss, over all layers together (ceil(k_aux / L) per layer's group); None =
    d_model // 2, as one crosscoder's. (Per group, the aux writes of all earlier groups would add up in
    every later layer: with L = 30 and d / 2 per group the aux term was ~6x the reconstruction loss at
    step 8 of a SmolLM2 run.)"""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient."""
    aux_frac: float = 1.0
    """Share of each batch's rows that carry the AuxK loss (:func:`crosslayer.crosscoder.aux_row_count`; 1 = all,
    the published recipe; less makes the AuxK decode and backward proportionally cheaper)."""
    jump_bandwidth: float = 2.0
    """JumpReLU rectangle-kernel width."""
    jump_init_threshold: float = 0.1
    """JumpReLU initial threshold."""
    tanh_scale: float = 4.0
    """JumpReLU tanh sparsity scale c."""
    pre_act_coef: float = 3e-6
    """JumpReLU pre-activation loss coefficient."""

    def __post_init__(self):
        L = len(self.layers)
        if L < 1 or list(self.layers) != list(range(self.layers[0], self.layers[0] + L)):
            raise CrosslayerError(f"transcoder layers must be ascending and contiguous, got {list(self.layers)}")
        if self.activation not in ACTIVATIONS:
            raise CrosslayerError(f"unknown transcoder activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.d_model < 1 or not 0 < self.k <= self.width:
            raise CrosslayerError(f"need d_model >= 1 and 0 < k <= width, got d_model={self.d_model}, k={self.k}, "
                                  f"width={self.width}")
        if (self.k_aux is not None and self.k_aux < 1) or min(self.init_dec_norm, self.jump_bandwidth,
                                                              self.jump_init_threshold) <= 0:
            raise CrosslayerError("k_aux must be >= 1 or None; init_dec_norm, jump_bandwidth, jump_init_threshold > 0")
        if not 0 < self.aux_frac <= 1:
            raise CrosslayerError(f"aux_frac must be in (0, 1], got {self.aux_frac}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_features(self) -> int:
        return self.n_layers * self.width


@register_dictionary("clt")
class CrossLayerTranscoder(Dictionary):
    """A CLT or PLT (module docstring). ``encode`` reads ``[B, L, d]`` resid_mid rows, ``decode`` gives
    ``[B, L, d]`` mlp_out rows; features are ordered by layer (feature ``l * width + i``)."""

    layerwise = False

    def __init__(self, cfg: CLTConfig, *, hooks: list[str] | None = None, norm_factors=None,
                 target_hooks: list[str] | None = None, target_norm_factors=None, meta: dict | None = None,
                 seed: int = 0):
        hooks = hooks if hooks is not None else [hook_name("resid_mid", l) for l in cfg.layers]
        target_hooks = target_hooks if target_hooks is not None else [hook_name("mlp_out", l) for l in cfg.layers]
        super().__init__(layers=list(cfg.layers), hooks=hooks, norm_factors=norm_factors, d_model=cfg.d_model,
                         meta=meta, target_hooks=target_hooks, target_norm_factors=target_norm_factors)
        self.cfg = cfg
        L, W, d = cfg.n_layers, cfg.width, cfg.d_model
        gen = torch.Generator().manual_seed(seed)
        decs = []  # per source group: [W, layers written, d]
        for l in range(L):
            n_out = self.n_written(l)
            W_dec = torch.randn(W, n_out, d, generator=gen)
            decs.append(W_dec / W_dec.norm(dim=-1, keepdim=True) * cfg.init_dec_norm / n_out)
        self.W_enc_LWD = nn.Parameter(torch.stack([w[:, 0] * n for w, n in zip(decs, map(self.n_written, range(L)))]))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.cat([decs[l][:, m - l] for l in self.sources(m)]))
                                       for m in range(L)])
        self.b_enc = nn.Parameter(torch.zeros(L, W))
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((L, W), float(cfg.jump_init_threshold)).log())

    def n_written(self, index: int) -> int:
        """Layers written by group ``index``: L - index (CLT) or 1 (PLT)."""
        return self.cfg.n_layers - index if self.cfg.cross_layer else 1

    def sources(self, index: int) -> range:
        """The groups that write layer ``index`` (rows of ``W_dec[index]``, in this order): 0..index or index alone."""
        return range(0, index + 1) if self.cfg.cross_layer else range(index, index + 1)

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    @property
    def k_aux(self) -> int:
        """AuxK dead latents over all groups (``cfg.k_aux``, default d_model // 2)."""
        return self.cfg.k_aux or max(1, self.d_model // 2)

    enc_param, enc_from_saved = "W_enc_LWD", (0, 2, 1)
    """The encoder parameter's name and the permutation from the saved ``W_enc`` [L, d, W] to it."""

    @property
    def W_enc(self) -> Tensor:
        """The encoders as readers and saved folders see them, ``[L, d, W]``: a view of the parameter ``W_enc_LWD``
        (feature-major, so its gradient needs no copy: :class:`~crosslayer.crosscoder._SparseTopKEncode`). In-place
        edits under ``torch.no_grad()`` write through; train, and read ``.grad`` of, ``W_enc_LWD``."""
        return self.W_enc_LWD.transpose(1, 2)

    @property
    def k_aux_group(self) -> int:
        """AuxK dead latents per group: ceil(k_aux / L)."""
        return -(-self.k_aux // self.cfg.n_layers)

    # ---------------------------------------------------------------- weights and masks
    def norms_LW(self) -> Tensor:
        """Combined decoder norm of every feature ``[L, W]`` (sum over the layers it writes; differentiable)."""
        L, W = self.cfg.n_layers, self.cfg.width
        out = self.W_dec[0].new_zeros(L, W)
        for m, table in enumerate(self.W_dec):
            src = self.sources(m)
            out = out.index_add(0, torch.arange(src.start, src.stop, device=out.device), table.norm(dim=-1).reshape(-1, W))
        return out

    def writes_FL(self) -> Tensor:
        L, W = self.cfg.n_layers, self.cfg.width
        src = torch.arange(L).repeat_interleave(W)[:, None]
        tgt = torch.arange(L)[None]
        return (tgt >= src) if self.cfg.cross_layer else (tgt == src)

    def reads_FL(self) -> Tensor:
        L, W = self.cfg.n_layers, self.cfg.width
        return F_.one_hot(torch.arange(L).repeat_interleave(W), L).bool()

    def _rows(self, index: int) -> slice:
        """The features (global ids) whose decoder rows ``W_dec[index]`` holds."""
        src = self.sources(index)
        return slice(src.start * self.cfg.width, src.stop * self.cfg.width)

    @torch.no_grad()
    def decoder_vectors_normalized(self, index: int) -> Tensor:
        out = self.W_dec[0].new_zeros(self.n_features, self.d_model)
        out[self._rows(index)] = self.W_dec[index]
        return out

    @torch.no_grad()
    def decoder_norms(self) -> Tensor:
        out = self.W_dec[0].new_zeros(self.n_features, self.cfg.n_layers)
        for m, table in enumerate(self.W_dec):
            out[self._rows(m), m] = table.norm(dim=-1)
        return out

    # ---------------------------------------------------------------- encode / decode
    def pre_acts(self, acts_BLD: Tensor) -> Float[Tensor, "layer batch width"]:
        # as (W x^T)^T: autograd then hands the feature-major encoder its gradient in its own layout (no copy)
        return torch.baddbmm(self.b_enc[:, :, None], self.W_enc_LWD, acts_BLD.permute(1, 2, 0)).transpose(1, 2)

    def _topk(self, acts_BLD: Tensor, dead_LW: Tensor | None = None) -> tuple[Tensor, ...]:
        k_aux = min(self.k_aux_group, int(dead_LW.sum(1).max())) if dead_LW is not None else 0
        return sparse_topk(acts_BLD.transpose(0, 1), self.W_enc_LWD, self.b_enc, self.norms_LW(), self.cfg.k,
                           dead_LW, k_aux, aux_row_count(self.cfg.aux_frac, acts_BLD.shape[0]))

    def _dense_feats(self, acts_BLD: Tensor) -> tuple[Tensor, Tensor]:
        """JumpReLU: ``(pre_LBW, f_LBW)``."""
        pre = self.pre_acts(acts_BLD)
        return pre, _JumpReLU.apply(pre, self.log_threshold.exp()[:, None], self.cfg.jump_bandwidth)

    def decode_groups(self, vals_LBK: Tensor, idx_LBK: Tensor, *, bias: bool = True) -> Tensor:
        """Sparse decode ``[B, L, d]`` from each group's active (value, index) pairs: for each layer, one
        ``embedding_bag`` over the active features of the groups that write it."""
        L, B, K = idx_LBK.shape
        offset_L = torch.arange(L, device=idx_LBK.device)[:, None, None] * self.cfg.width
        outs = []
        for m, table in enumerate(self.W_dec):
            src = slice(self.sources(m).start, self.sources(m).stop)
            rows = (idx_LBK[src] + offset_L[src] - offset_L[src.start]).permute(1, 0, 2).reshape(B, -1)
            weights = vals_LBK[src].permute(1, 0, 2).reshape(B, -1).to(table.dtype)
            outs.append(F_.embedding_bag(rows, table, mode="sum", per_sample_weights=weights))
        out = torch.stack(outs, 1)
        return out + self.b_dec if bias else out

    def _decode_dense(self, f_LBW: Tensor) -> Tensor:
        B = f_LBW.shape[1]
        outs = []
        for m, table in enumerate(self.W_dec):
            src = slice(self.sources(m).start, self.sources(m).stop)
            outs.append(f_LBW[src].permute(1, 0, 2).reshape(B, -1) @ table)
        return torch.stack(outs, 1) + self.b_dec

    def encode_group(self, x_ND: Tensor, index: int, *, normalized: bool = True) -> Float[Tensor, "batch width"]:
        """Features ``[N, width]`` of group ``index`` from that layer's input alone (the replacement model runs layer
        by layer); equal to the group's slice of :meth:`encode`."""
        x_ND = x_ND if normalized else x_ND * self.norm_factors[index].to(x_ND)
        one = slice(index, index + 1)
        if self.cfg.activation == "jumprelu":
            pre = x_ND @ self.W_enc[index] + self.b_enc[index]
            return _JumpReLU.apply(pre, self.log_threshold[index].exp(), self.cfg.jump_bandwidth)
        vals, idx = sparse_topk(x_ND[None], self.W_enc_LWD[one], self.b_enc[one], self.norms_LW()[one], self.cfg.k)[:2]
        return vals.new_zeros(x_ND.shape[0], self.cfg.width).scatter(1, idx[0], vals[0])

    def decode_group(self, f_NW: Tensor, index: int, *, normalized: bool = True) -> Tensor:
        """Group ``index``'s write ``[N, n_written, d]`` to layers index, index + 1, ... (no bias); raw units with
        ``normalized=False`` (the target factors of those layers)."""
        W = self.cfg.width
        targets = range(index, index + self.n_written(index))
        blocks = [self.W_dec[m][(index - self.sources(m).start) * W:(index - self.sources(m).start + 1) * W]
                  for m in targets]
        out = torch.stack([f_NW @ block for block in blocks], 1)
        if normalized:
            return out
        return out / self.target_norm_factors[targets.start:targets.stop].to(out)[:, None]

    def encode_normalized(self, acts_BLD: Tensor) -> Tensor:
        L, W = self.cfg.n_layers, self.cfg.width
        if self.cfg.activation == "jumprelu":
            return self._dense_feats(acts_BLD)[1].transpose(0, 1).reshape(-1, L * W)
        vals, idx = self._topk(acts_BLD)[:2]
        B = idx.shape[1]
        flat = (idx + torch.arange(L, device=idx.device)[:, None, None] * W).transpose(0, 1).reshape(B, -1)
        return vals.new_zeros(B, L * W).scatter(1, flat, vals.transpose(0, 1).reshape(B, -1))

    def decode_normalized(self, feats_BF: Tensor) -> Tensor:
        return self._decode_dense(feats_BF.reshape(-1, self.cfg.n_layers, self.cfg.width).transpose(0, 1))

    # ---------------------------------------------------------------- training
    @torch.no_grad()
    def calibrate_(self, sample_BLD: Tensor, target_BLD: Tensor | None = None) -> None:
        """b_dec = the sample's mean target; b_enc so each latent crosses 0 (or its JumpReLU threshold) on
        min(1, 4 k / W) of the sample."""
        self.b_dec.copy_((sample_BLD if target_BLD is None else target_BLD).mean(0))
        self.b_enc.zero_()
        pre_LNW = self.pre_acts(sample_BLD)
        n = pre_LNW.shape[1]
        rate = min(1.0, 4 * self.cfg.k / self.cfg.width)
        offset = self.log_threshold.exp() if self.cfg.activation == "jumprelu" else 0.0
        self.b_enc.copy_(offset - pre_LNW.kthvalue(min(n, max(1, round((1 - rate) * n))), dim=1).values)

    def loss(self, acts_BLD: Tensor, *, target_BLD: Tensor | None = None, sparsity_coef: float = 0.0,
             dead_F: Tensor | None = None) -> CrosscoderOutput:
        """Training pass on normalised resid_mid rows ``acts_BLD`` against normalised mlp_out rows ``target_BLD``
        (module docstring, step 3). Without a target (a held-out check of inputs alone) the input is the target."""
        target_BLD = acts_BLD if target_BLD is None else target_BLD
        L, W, cfg = self.cfg.n_layers, self.cfg.width, self.cfg
        losses = {name: acts_BLD.new_zeros(()) for name in ("sparsity", "aux", "pre_act")}
        if cfg.activation == "topk":
            dead_LW = dead_F.reshape(L, W) if dead_F is not None and bool(dead_F.any()) else None
            vals, idx, aux_vals, aux_idx = self._topk(acts_BLD, dead_LW)
            recon_BLD = self.decode_groups(vals, idx)
            if dead_LW is not None:
                scale = min(int(dead_LW.sum()) / self.k_aux, 1.0)
                aux_BLD = self.decode_groups(aux_vals, aux_idx, bias=False)
                resid_BLD = (target_BLD[:len(aux_BLD)] - recon_BLD[:len(aux_BLD)]).detach()
                losses["aux"] = cfg.aux_coef * scale * _SumSquaredError.apply(aux_BLD, resid_BLD)
            active = vals > 0
            gid = idx + torch.arange(L, device=idx.device)[:, None, None] * W
            fired_F = torch.zeros(L * W, dtype=torch.bool, device=idx.device).index_fill_(0, gid[active], True)
            return _output(None, recon_BLD, target_BLD, losses, fired_F=fired_F, l0=float(active.sum() / acts_BLD.shape[0]))
        pre_LBW, f_LBW = self._dense_feats(acts_BLD)
        recon_BLD = self._decode_dense(f_LBW)
        norm_LW = self.norms_LW()
        losses["sparsity"] = sparsity_coef * torch.tanh(cfg.tanh_scale * f_LBW * norm_LW[:, None]).sum((0, 2)).mean()
        theta_LW = self.log_threshold.exp()
        losses["pre_act"] = cfg.pre_act_coef * ((theta_LW[:, None] - pre_LBW).relu() * norm_LW[:, None]).sum((0, 2)).mean()
        feats_BF = f_LBW.detach().transpose(0, 1).reshape(-1, L * W)
        return _output(feats_BF, recon_BLD, target_BLD, losses)

    # ---------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> None:
        """``path/cfg.json`` (kind clt) and ``path/clt.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(saved_state(self), str(tmp))
        self.write_cfg(path, clt=asdict(self.cfg), target_hooks=self.target_hooks,
                       target_norm_factors=self.target_norm_factors.tolist())

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> "CrossLayerTranscoder":
        from safetensors.torch import load_file

        cfg = read_saved_cfg(path, "clt")
        arch = dict(cfg["clt"], layers=tuple(cfg["clt"]["layers"]))
        model = cls(CLTConfig(**arch), hooks=cfg["hooks"], norm_factors=cfg["norm_factors"],
                    target_hooks=cfg["target_hooks"], target_norm_factors=cfg["target_norm_factors"],
                    meta=meta_from_cfg(cfg, ("clt", "target_hooks", "target_norm_factors")))
        try:
            model.load_state_dict(from_saved(model, load_file(str(Path(path) / WEIGHTS_FILE))))
        except (OSError, RuntimeError) as err:
            raise CrosslayerError(f"{Path(path) / WEIGHTS_FILE} cannot be loaded ({err}); train again") from None
        return model.to(device)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"CrossLayerTranscoder({'CLT' if c.cross_layer else 'PLT'}, {c.activation}"
                f"{f' k={c.k}' if c.activation == 'topk' else ''}, layers={self.layers[0]}..{self.layers[-1]}, "
                f"d_model={self.d_model}, width={c.width}/layer)")
