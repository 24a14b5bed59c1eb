"""Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens").

The logit lens decodes layer l's residual stream ``h_l`` as if it were the last layer's; it is biased
where a layer's basis has not yet rotated into the unembedding's ("predictions form late" may be
the lens's own artefact). The tuned lens learns, per layer read, an affine translator

    T_l(h) = h + A_l h + b_l        (A_l, b_l initialised at 0, so training starts at the logit lens)

and decodes ``unembed(ln_final(T_l(h_l)))``. Training (as the tuned-lens project does, with Adam
instead of its Nesterov SGD): minimise KL(p_final || p_l) over tokens of a training corpus, the
model frozen, each layer's translator independent of the others. Held-out KL by layer then says
how much of the logit lens's KL is the lens's bias rather than the model's computation.

Everything is float32 here (the model's final norm and unembedding are copied in float32, whatever
the model's compute dtype). Training subsamples ``positions`` tokens per step (skipping position 0,
the attention sink) because the full-vocabulary decode of every layer dominates the cost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from crosslayer.errors import CrosslayerError
from crosslayer.io import atomic_path, write_json
from crosslayer.lens import EMBED_LAYER, _hook_name, check_layers

WEIGHTS, CFG = "tuned_lens.safetensors", "tuned_lens.json"


@dataclass(frozen=True)
class TunedLensConfig:
    steps: int = 200
    """Optimiser steps."""
    batch_windows: int = 8
    """Token windows run through the model per step."""
    positions: int = 256
    """Tokens per step whose layers are decoded (sampled from the batch's windows, position 0 excluded)."""
    lr: float = 1e-3
    """Adam learning rate (linear warm-up over the first tenth of the steps)."""
    seed: int = 0


class TunedLens(nn.Module):
    """One affine translator per layer read (``-1`` is the embedding); see the module docstring."""

    def __init__(self, layers: list[int], d_model: int, meta: dict | None = None):
        super().__init__()
        self.layers, self.d_model, self.meta = list(layers), int(d_model), dict(meta or {})
        self.weight_LDD = nn.Parameter(torch.zeros(len(self.layers), d_model, d_model))
        self.bias_LD = nn.Parameter(torch.zeros(len(self.layers), d_model))

    def translate(self, layer: int, resid_ND: Tensor) -> Tensor:
        """``T_l(h) = h + h A_l + b_l`` in float32."""
        if layer not in self.layers:
            raise CrosslayerError(f"the tuned lens has no translator for layer {layer}; it reads {self.layers}")
        i = self.layers.index(layer)
        x = resid_ND.float()
        return x + x @ self.weight_LDD[i] + self.bias_LD[i]

    def decoder(self, model):
        """``decode(layer, resid) -> log-probabilities`` through the translators (the last layer, which
        needs none, is decoded as it is)."""
        float_decoder, last = FloatDecoder(model), model.cfg.n_layers - 1

        def decode(layer: int, resid: Tensor) -> Tensor:
            return float_decoder(resid.float() if layer == last and layer not in self.layers
                                 else self.translate(layer, resid))
        return decode

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / WEIGHTS) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json({"kind": "tuned_lens", "layers": self.layers, "d_model": self.d_model, **self.meta}, out / CFG)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "TunedLens":
        path = Path(path)
        try:
            cfg = json.loads((path / CFG).read_text())
            weights = load_file(str(path / WEIGHTS))
        except (OSError, ValueError) as err:
            raise CrosslayerError(f"{path} is not a tuned lens ({type(err).__name__}: {CFG} and {WEIGHTS} "
                                  "expected); train one with `crosslayer train-lens`") from None
        lens = cls(cfg["layers"], cfg["d_model"], {k: v for k, v in cfg.items() if k not in ("layers", "d_model")})
        lens.load_state_dict(weights)
        return lens

    def check_model(self, model) -> None:
        name = self.meta.get("model")
        if model.cfg.d_model != self.d_model or (name and name != model.cfg.model_name):
            raise CrosslayerError(f"the tuned lens was trained on {name} (d_model {self.d_model}), not "
                                  f"{model.cfg.model_name}; train one for this model with `crosslayer train-lens`")


class FloatDecoder:
    """The model's final norm and unembedding as float32 copies: ``logp(resid)`` with gradients."""

    def __init__(self, model):
        kind = model.cfg.normalization_type
        if kind not in ("RMS", "RMSPre", "LN", "LNPre"):
            raise CrosslayerError(f"final norm {kind!r} is not supported by the tuned lens (RMS or LN models)")
        self.center, self.eps = kind.startswith("LN"), model.cfg.eps
        w, b = getattr(model.ln_final, "w", None), getattr(model.ln_final, "b", None)
        self.w = None if w is None else w.detach().float()
        self.b = None if b is None else b.detach().float()
        self.W_U, self.b_U = model.W_U.detach().float(), model.b_U.detach().float()

    def __call__(self, x: Tensor) -> Tensor:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.w is not None:
            x = x * self.w
        if self.b is not None:
            x = x + self.b
        return torch.log_softmax(x @ self.W_U + self.b_U, dim=-1)


def kl_final(final_logp_NV: Tensor, logp_NV: Tensor) -> Tensor:
    """KL(p_final || p) per row, nats."""
    return (final_logp_NV.exp() * (final_logp_NV - logp_NV)).sum(-1)


def _sample(model, tokens_BT: Tensor, layers: list[int], positions: int, generator: torch.Generator):
    """The residual stream at each layer read and the final log-probabilities, at ``positions`` tokens
    drawn from the batch (position 0 excluded): ``({layer: [N, D]}, [N, V])``."""
    names = {_hook_name(layer) for layer in layers}
    with torch.no_grad():
        logits_BTV, cache = model.run_with_cache(tokens_BT, names_filter=lambda name: name in names)
    B, T = tokens_BT.shape
    flat = torch.randperm(B * (T - 1), generator=generator)[:positions]
    b_N, t_N = flat // (T - 1), flat % (T - 1) + 1
    resid = {layer: cache[_hook_name(layer)][b_N, t_N].float() for layer in layers}
    return resid, torch.log_softmax(logits_BTV[b_N, t_N].float(), dim=-1)


def train_tuned_lens(model, windows, *, layers=None, cfg: TunedLensConfig = TunedLensConfig(),
                     progress: bool = True) -> TunedLens:
    """Train a tuned lens on ``windows`` (a :class:`~crosslayer.corpus.TokenWindows`) for ``layers``
    (default: the embedding and every layer but the last, whose logit lens is exact)."""
    chosen = check_layers(model, layers if layers is not None else [EMBED_LAYER, *range(model.cfg.n_layers - 1)])
    if cfg.steps < 1 or cfg.batch_windows < 1 or cfg.positions < 1 or not cfg.lr > 0:
        raise CrosslayerError(f"tuned-lens settings must be positive, got {cfg}")
    if windows.seq_len < 2:
        raise CrosslayerError("tuned-lens training needs windows of at least 2 tokens")
    decoder, generator = FloatDecoder(model), torch.Generator().manual_seed(cfg.seed)
    lens = TunedLens(chosen, model.cfg.d_model, {"model": model.cfg.model_name, "training": asdict(cfg),
                                                 "corpus": windows.corpus_id})
    opt = torch.optim.Adam(lens.parameters(), lr=cfg.lr)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    order = torch.randperm(len(windows.tokens), generator=generator)
    curve = []
    for step in tqdm(range(cfg.steps), desc="tuned lens", unit="step", disable=not progress):
        pick = order[(torch.arange(cfg.batch_windows) + step * cfg.batch_windows) % len(order)]
        resid, final_logp_NV = _sample(model, windows.tokens[pick].to(model.cfg.device), chosen, cfg.positions,
                                       generator)
        loss = sum(kl_final(final_logp_NV, decoder(lens.translate(layer, resid[layer]))).mean()
                   for layer in chosen) / len(chosen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
    lens.meta["train_kl_first_last"] = [curve[0], curve[-1]]
    return lens.requires_grad_(False)


@torch.no_grad()
def lens_kl_by_layer(model, windows, lens: TunedLens | None, *, layers=None, batch_windows: int = 8,
                     n_boot: int = 1000, seed: int = 0):
    """Mean KL(p_final || p_layer) per token of ``windows`` (position 0 and separators excluded), per layer,
    for the logit lens and (given ``lens``) the tuned lens and their paired difference, with 95 %
    bootstrap intervals over documents: a tidy frame ``layer, lens, kl, kl_lo, kl_hi, tokens, docs``."""
    chosen = check_layers(model, layers if layers is not None else (lens.layers if lens else None))
    kinds = ["logit", "tuned"] if lens is not None else ["logit"]
    sums_KD, counts_D = _kl_per_document(model, windows, lens, chosen, kinds, batch_windows)
    return _kl_table(chosen, kinds, sums_KD, counts_D, n_boot, seed)


def _kl_per_document(model, windows, lens, chosen, kinds, batch_windows):
    """``[len(chosen) * len(kinds), n_docs]`` KL sums (row = layer-major, lens-minor) and ``[n_docs]`` token
    counts."""
    decoder, names = FloatDecoder(model), {_hook_name(layer) for layer in chosen}
    doc_BT = windows.doc_ids.long()
    n_docs = int(doc_BT.max()) + 1
    sums_KD, counts_D = np.zeros((len(chosen) * len(kinds), n_docs)), np.zeros(n_docs)
    for start in range(0, len(windows.tokens), batch_windows):
        tokens_BT = windows.tokens[start:start + batch_windows].to(model.cfg.device)
        doc_N = doc_BT[start:start + batch_windows, 1:].flatten()
        keep = doc_N >= 0
        logits_BTV, cache = model.run_with_cache(tokens_BT, names_filter=lambda name: name in names)
        final_NV = torch.log_softmax(logits_BTV[:, 1:].float(), -1).flatten(0, 1)[keep]
        counts_D += np.bincount(doc_N[keep].numpy(), minlength=n_docs)
        for i, layer in enumerate(chosen):
            resid_ND = cache[_hook_name(layer)][:, 1:].float().flatten(0, 1)[keep]
            for j, kind in enumerate(kinds):
                x = lens.translate(layer, resid_ND) if kind == "tuned" else resid_ND
                kl_N = kl_final(final_NV, decoder(x)).double().numpy()
                sums_KD[i * len(kinds) + j] += np.bincount(doc_N[keep].numpy(), weights=kl_N, minlength=n_docs)
    return sums_KD, counts_D


def _kl_table(chosen, kinds, sums_KD, counts_D, n_boot, seed):
    import pandas as pd

    from crosslayer.evals import bootstrap_counts

    present = counts_D > 0
    sums_KD, counts_D = sums_KD[:, present], counts_D[present]
    boot_BD = bootstrap_counts(len(counts_D), n_boot, seed)
    mean_K, boot_KB = sums_KD.sum(1) / counts_D.sum(), (sums_KD @ boot_BD.T) / (boot_BD @ counts_D)
    rows = []
    for i, layer in enumerate(chosen):
        block = slice(i * len(kinds), (i + 1) * len(kinds))
        values = list(zip(kinds, mean_K[block], boot_KB[block]))
        if len(kinds) == 2:
            values.append(("tuned_minus_logit", mean_K[block][1] - mean_K[block][0], boot_KB[block][1] - boot_KB[block][0]))
        for kind, mean, boot in values:
            lo, hi = np.percentile(boot, [2.5, 97.5])
            rows.append({"layer": layer, "lens": kind, "kl": mean, "kl_lo": lo, "kl_hi": hi,
                         "tokens": int(counts_D.sum()), "docs": len(counts_D)})
    return pd.DataFrame(rows)
