"""Evaluation of any Dictionary: reconstruction, sparsity, dead/dense features, downstream loss.

Method (research-notes §4):
1. Reconstruction, in the model's RAW units: ``n_tokens`` store rows (seeded shuffle) of the
   dictionary's layers are read raw, reconstructed with ``dictionary.forward(x, normalized=False)``
   (normalise with the dictionary's factors, encode, decode, undo the factors), and streaming sums
   are kept per layer in float64: n, sum_t x_t, sum_t x_t^2 (per dimension), the squared error
   sum_t ||x_t - x_hat_t||^2, sum of cos(x_t, x_hat_t) and of ||x_hat_t|| / ||x_t||. The x sums are
   of x - c with c the first batch's mean (a constant shift leaves the variance unchanged and avoids
   the cancellation in E[x^2] - E[x]^2 for dimensions whose mean dwarfs their spread).
   FVU_l = (SSE_l / n) / sum_d Var(x_d) with Var(x_d) = sum x_d^2 / n - (sum x_d / n)^2 — the
   plain definition, NOT the SAELens <= 6.18 / SAEBench 0.6.0 formula that subtracts the squared
   mean of squares (:func:`fvu` is the same computation on one batch). MSE_l = SSE_l / (n d). The
   "all" row (``scope`` "all", ``layer`` <NA>) gives ``fvu`` as the mean of the layers' FVUs (every
   layer weighs the same, as in training on normalised layers) and ``fvu_pooled`` as the FVU of the
   concatenated [L * d] vector in raw units (dominated by high-norm layers).
2. Sparsity: a feature is active where f_i != 0. ``l0_feat`` = E sum_i 1[f_i != 0] (counted once
   per feature); per layer ``l0`` = E sum_i 1[f_i != 0] 1[feature i writes layer l] (the
   dictionary's ``writes_FL``); ``l0_tuple`` = their sum over layers. For per-layer SAEs all three
   agree with the per-SAE L0s and their sum.
3. Dead / dense: a feature is dead if it never fires on the tokens measured (``n_tokens`` column)
   and dense if it fires on more than ``dense_threshold`` (10 %) of them. Per-layer rows count the
   features whose decoder norm peaks at that layer (for per-layer SAEs: that layer's SAE).
4. Downstream (when a model is given): the store's first ``n_windows`` windows run through the
   model clean (cache of the dictionary's hooks), zero-ablated and with the reconstruction spliced
   in, at each layer separately and at all layers at once. At all layers at once, a layerwise
   dictionary (per-layer SAEs: ``dictionary.layerwise``) is applied in sequence during one forward
   pass, each layer's SAE reading the stream already spliced below it (errors compound, the usual
   "all SAEs spliced" number); a dictionary that reads every layer (a crosscoder) encodes the clean
   activations once and its reconstruction replaces every layer. (Computing per-layer SAE
   reconstructions from clean activations instead would make the all-layer number equal to the
   last layer's alone, since a later resid_post overwrites everything earlier.) Only positions the
   store kept are replaced; positions excluded at harvest (``exclusion_policy``: position 0, special
   tokens; and dropped norm outliers) are left as the model computes them. CE is averaged over
   next-token predictions made at replaced positions; CE recovered = (CE_zero - CE_spliced) /
   (CE_zero - CE_clean); KL(clean || spliced) per token.
   Cost: a spliced run starts at the first spliced block from the clean run's cached ``resid_pre``
   (``start_at_layer``; the blocks below are unchanged, the logits identical), and zero-ablation
   runs, which do not depend on the dictionary, can be memoised across calls in a ``zero_cache`` dict
   the caller passes (keyed by model weights, store, hooks and windows).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from crosslayer.dictionary import Dictionary, check_compatible
from crosslayer.errors import CrosslayerError
from crosslayer.hooks import block_index
from crosslayer.io import write_csv


class ReconstructionStats:
    """Streaming float64 sums for reconstruction and sparsity metrics (see the module docstring)."""

    def __init__(self, n_layers: int, d_model: int, writes_FL: Tensor | None = None):
        self.n = 0
        self.shift_LD: Tensor | None = None
        f64 = dict(dtype=torch.float64)
        self.sum_x_LD = torch.zeros(n_layers, d_model, **f64)
        self.sum_x2_LD = torch.zeros(n_layers, d_model, **f64)
        self.sse_L = torch.zeros(n_layers, **f64)
        self.cos_L = torch.zeros(n_layers, **f64)
        self.rel_norm_L = torch.zeros(n_layers, **f64)
        self.writes_FL = writes_FL
        if writes_FL is not None:
            self.fires_F = torch.zeros(writes_FL.shape[0], **f64)
            self.l0_feat = 0.0
            self.l0_L = torch.zeros(n_layers, **f64)

    @torch.no_grad()
    def update(self, x_BLD: Tensor, xhat_BLD: Tensor, feats_BF: Tensor | None = None) -> None:
        x, xh = x_BLD.double().cpu(), xhat_BLD.double().cpu()
        if self.shift_LD is None:
            self.shift_LD = x.mean(0)
        self.n += x.shape[0]
        centred = x - self.shift_LD
        self.sum_x_LD += centred.sum(0)
        self.sum_x2_LD += centred.pow(2).sum(0)
        self.sse_L += (x - xh).pow(2).sum(dim=(0, 2))
        self.cos_L += torch.nn.functional.cosine_similarity(x, xh, dim=-1, eps=1e-12).sum(0)
        self.rel_norm_L += (xh.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum(0)
        if feats_BF is not None and self.writes_FL is not None:
            fires_F = (feats_BF != 0).sum(0).cpu().double()  # sum_t 1[f_ti != 0]
            self.fires_F += fires_F
            self.l0_feat += float(fires_F.sum())
            self.l0_L += fires_F @ self.writes_FL.cpu().double()  # = sum_t sum_i 1[f_ti != 0] 1[writes_il]

    def var_L(self) -> Tensor:
        """sum_d Var(x_d) per layer (population variance)."""
        return (self.sum_x2_LD / self.n - (self.sum_x_LD / self.n).pow(2)).clamp_min(0).sum(-1)

    def fvu_L(self) -> Tensor:
        return self.sse_L / self.n / self.var_L()

    def compute(self) -> dict[str, Tensor | float]:
        """Per-layer ``[L]`` tensors and whole-dictionary floats."""
        if self.n == 0:
            raise CrosslayerError("no tokens were evaluated; use a non-empty store and n_tokens >= 1")
        var_L = self.var_L()
        out = {"fvu": self.fvu_L(), "mse": self.sse_L / (self.n * self.sum_x_LD.shape[1]),
               "cos": self.cos_L / self.n, "rel_norm": self.rel_norm_L / self.n,
               "fvu_pooled_all": float(self.sse_L.sum() / self.n / var_L.sum())}
        if self.writes_FL is not None:
            out.update(freq_F=self.fires_F / self.n, l0=self.l0_L / self.n, l0_feat=self.l0_feat / self.n)
        return out


def fvu(x_BLD: Tensor, recon_BLD: Tensor) -> Tensor:
    """FVU per layer ``[L]`` of one batch: SSE_l / sum_d Var(x_d), computed exactly as
    :class:`ReconstructionStats` does (the one FVU definition; see the module docstring)."""
    stats = ReconstructionStats(x_BLD.shape[1], x_BLD.shape[2])
    stats.update(x_BLD.detach(), recon_BLD.detach())
    return stats.fvu_L()


def kept_mask(store, n_windows: int) -> Tensor:
    """``[n_windows, seq_len]`` bool: positions the store kept (True) vs excluded at harvest."""
    T = store.seq_len
    limit = n_windows * T
    flat = store.flat_index(np.arange(min(store.n_rows, limit)))  # rows are in flat order, flat >= row
    stored = torch.zeros(limit, dtype=torch.bool)
    stored[torch.from_numpy(flat[flat < limit])] = True
    tokens = store.window_tokens()[:n_windows]
    policy = store.manifest["exclusion_policy"]
    allowed = ~torch.isin(tokens, torch.tensor(policy["special_token_ids"], dtype=torch.int64))
    if policy["position0"]:
        allowed[:, 0] = False
    return stored.reshape(n_windows, T) & allowed


ZeroCache = dict
"""Memo of zero-ablation runs, which do not depend on the dictionary: (model weights id, store, hooks,
batch start, batch size, splice) -> (CE sum, KL sum). Pass one dict to several :func:`evaluate` calls
on the same model and store to run each zero ablation once."""


class _CleanBatch(NamedTuple):
    """One batch of windows run clean, with what every splice of it needs."""

    tokens: Tensor
    mask_BT: Tensor
    cache: dict
    acts_BTLD: Tensor
    pred_BT: Tensor
    target: Tensor
    logp_clean: Tensor


def _check_model_store(model, store) -> None:
    wid = getattr(model, "crosslayer_weights_id", None)
    if wid is not None and wid != store.manifest["weights_id"]:
        raise CrosslayerError(f"model weights {wid} differ from the store's ({store.manifest['weights_id']}); "
                              "pass the model the store was harvested from")


def _block_starts(dictionary: Dictionary) -> dict[int, int]:
    """Layer position -> block index of each hook; empty when a hook is outside the blocks."""
    block_of = [block_index(h) for h in dictionary.hooks]
    return {} if None in block_of else {i: b for i, b in enumerate(block_of)}


def _run_clean(model, dictionary: Dictionary, tokens: Tensor, mask_BT: Tensor, cache_names: set) -> _CleanBatch:
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in cache_names)
    acts_BTLD = torch.stack([cache[h] for h in dictionary.hooks], dim=2)
    pred_BT = mask_BT[:, :-1]
    target = tokens[:, 1:][pred_BT]
    logp_clean = torch.log_softmax(logits[:, :-1][pred_BT].float(), dim=-1)
    return _CleanBatch(tokens, mask_BT, cache, acts_BTLD, pred_BT, target, logp_clean)


def _spliced_recon(dictionary: Dictionary, batch: _CleanBatch) -> Tensor:
    """The clean activations with the dictionary's reconstruction at the kept positions."""
    dict_device = dictionary.norm_factors.device
    recon_ND = dictionary.reconstruct(batch.acts_BTLD[batch.mask_BT].float().to(dict_device), normalized=False)
    recon_BTLD = batch.acts_BTLD.clone()
    recon_BTLD[batch.mask_BT] = recon_ND.to(batch.acts_BTLD)
    return recon_BTLD


def _forward(model, batch: _CleanBatch, hooks: list, idx: list[int], starts: dict[int, int]) -> Tensor:
    """Logits with ``hooks``, starting at the first spliced block from the clean cache (the blocks below
    it are unchanged)."""
    first = min((starts[i] for i in idx), default=None) if starts else None
    if first is None:
        return model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
    return model.run_with_hooks(batch.cache[f"blocks.{first}.hook_resid_pre"], start_at_layer=first, fwd_hooks=hooks)


def _score(batch: _CleanBatch, logits: Tensor) -> tuple[float, float]:
    """(CE sum, KL(clean || spliced) sum) over the batch's predictions at kept positions."""
    logp = torch.log_softmax(logits[:, :-1][batch.pred_BT].float(), dim=-1)
    ce = float(-logp.gather(1, batch.target[:, None]).sum())
    return ce, float((batch.logp_clean.exp() * (batch.logp_clean - logp)).sum())


def _run_values(model, hooks: list[str], batch: _CleanBatch, values_BTLD: Tensor, which: list[int] | None,
                starts: dict[int, int]) -> tuple[float, float]:
    """Splice ``values_BTLD`` at the kept positions of layers ``which`` (None: all)."""
    def splice(act, hook, i):
        return torch.where(batch.mask_BT[..., None], values_BTLD[:, :, i], act)

    idx = list(range(len(hooks)) if which is None else which)
    fwd = [(hooks[i], lambda act, hook, i=i: splice(act, hook, i)) for i in idx]
    return _score(batch, _forward(model, batch, fwd, idx, starts))


def _run_sequential(model, dictionary: Dictionary, batch: _CleanBatch, starts: dict[int, int]) -> tuple[float, float]:
    """Every layer's reconstruction from the stream already spliced below it, in one forward pass."""
    dict_device = dictionary.norm_factors.device

    def splice(act, hook, i):
        rec = dictionary.reconstruct_layer(act[batch.mask_BT].float().to(dict_device), i, normalized=False)
        out = act.clone()
        out[batch.mask_BT] = rec.to(act)
        return out

    fwd = [(h, lambda act, hook, i=i: splice(act, hook, i)) for i, h in enumerate(dictionary.hooks)]
    return _score(batch, _forward(model, batch, fwd, list(range(len(dictionary.hooks))), starts))


def _zero_ablation(model, hooks: list[str], batch: _CleanBatch, which: list[int] | None, starts: dict[int, int],
                   key: tuple, zero_cache: ZeroCache | None) -> tuple[float, float]:
    """(CE sum, KL sum) with zeros spliced at layers ``which``, memoised in ``zero_cache`` under ``key``."""
    if zero_cache is not None and key in zero_cache:
        return zero_cache[key]
    result = _run_values(model, hooks, batch, torch.zeros_like(batch.acts_BTLD), which, starts)
    if zero_cache is not None:
        zero_cache[key] = result
    return result


def _downstream_rows(sums: dict, ce_clean: float, n_pred: int) -> dict:
    if n_pred == 0:
        raise CrosslayerError("no next-token predictions at kept positions; use more or longer windows")
    out = {}
    for key, s in sums.items():
        row = {k: v / n_pred for k, v in s.items()}
        row["ce_clean"] = ce_clean / n_pred
        denom = row["ce_zero"] - row["ce_clean"]
        row["ce_recovered"] = (row["ce_zero"] - row["ce_spliced"]) / denom if abs(denom) > 1e-12 else float("nan")
        row["n_predictions"] = n_pred
        out[key] = row
    return out


@torch.no_grad()
def downstream(dictionary: Dictionary, store, model, *, n_windows: int = 32, batch_size: int = 4,
               per_layer: bool = True, zero_cache: ZeroCache | None = None, progress: bool = False) -> dict:
    """CE clean / zero / spliced, CE recovered and KL per splice, keyed by model layer (int) and ``"all"``
    (module docstring, step 4). ``zero_cache``: a :data:`ZeroCache` dict to reuse zero ablations across
    calls (None: no memo)."""
    check_compatible(dictionary, model)
    _check_model_store(model, store)
    n_windows = min(n_windows, store.manifest["n_windows"])
    tokens_NT, mask_NT = store.window_tokens()[:n_windows], kept_mask(store, n_windows)
    splices = ([(l, [i]) for i, l in enumerate(dictionary.layers)] if per_layer else []) + [("all", None)]
    sums = {key: dict(ce_spliced=0.0, ce_zero=0.0, kl=0.0, kl_zero=0.0) for key, _ in splices}
    ce_clean, n_pred = 0.0, 0
    device = next(iter(model.parameters())).device
    starts = _block_starts(dictionary)
    cache_names = set(dictionary.hooks) | {f"blocks.{b}.hook_resid_pre" for b in starts.values()}
    zero_key = (getattr(model, "crosslayer_weights_id", id(model)), str(store.path), tuple(dictionary.hooks))
    sequential = dictionary.layerwise and len(dictionary.hooks) > 1
    for start in tqdm(range(0, n_windows, batch_size), desc="downstream", unit="batch", disable=not progress):
        batch = _run_clean(model, dictionary, tokens_NT[start:start + batch_size].to(device),
                           mask_NT[start:start + batch_size].to(device), cache_names)
        ce_clean += float(-batch.logp_clean.gather(1, batch.target[:, None]).sum())
        n_pred += int(batch.pred_BT.sum())
        recon_BTLD = _spliced_recon(dictionary, batch)
        for key, which in splices:
            if which is None and sequential:
                ce, kl = _run_sequential(model, dictionary, batch, starts)
            else:
                ce, kl = _run_values(model, dictionary.hooks, batch, recon_BTLD, which, starts)
            zkey = zero_key + (start, batch_size, key if which is None else dictionary.hooks[which[0]])
            ce_z, kl_z = _zero_ablation(model, dictionary.hooks, batch, which, starts, zkey, zero_cache)
            s = sums[key]
            s["ce_spliced"] += ce
            s["kl"] += kl
            s["ce_zero"] += ce_z
            s["kl_zero"] += kl_z
    return _downstream_rows(sums, ce_clean, n_pred)


def _table_rows(dictionary: Dictionary, m: dict, dec_FL: Tensor, dense_threshold: float) -> list[dict]:
    """One row per layer (scope "layer") and the whole-dictionary row (scope "all", layer <NA>)."""
    freq_F = m["freq_F"]
    dead_F, dense_F = freq_F == 0, freq_F > dense_threshold
    peak_F = dec_FL.argmax(dim=1).cpu()
    rows = []
    for i, (layer, hook) in enumerate(zip(dictionary.layers, dictionary.hooks)):
        own = peak_F == i
        n_own = int(own.sum())
        rows.append({"scope": "layer", "layer": layer, "hook": hook, "fvu": float(m["fvu"][i]),
                     "fvu_pooled": float(m["fvu"][i]), "mse": float(m["mse"][i]), "cos": float(m["cos"][i]),
                     "rel_norm": float(m["rel_norm"][i]), "l0": float(m["l0"][i]), "n_features": n_own,
                     "dead_frac": float(dead_F[own].double().mean()) if n_own else float("nan"),
                     "dense_frac": float(dense_F[own].double().mean()) if n_own else float("nan")})
    rows.append({"scope": "all", "layer": pd.NA, "hook": "", "fvu": float(m["fvu"].mean()),
                 "fvu_pooled": m["fvu_pooled_all"], "mse": float(m["mse"].mean()), "cos": float(m["cos"].mean()),
                 "rel_norm": float(m["rel_norm"].mean()), "l0": m["l0_feat"], "l0_feat": m["l0_feat"],
                 "l0_tuple": float(m["l0"].sum()), "n_features": dictionary.n_features,
                 "dead_frac": float(dead_F.double().mean()), "dense_frac": float(dense_F.double().mean())})
    return rows


@torch.no_grad()
def _reconstruction_stats(dictionary: Dictionary, store, *, n_tokens: int, batch_size: int, seed: int,
                          progress: bool) -> ReconstructionStats:
    """Stream ``n_tokens`` shuffled raw store rows through the dictionary (module docstring, steps 1-2)."""
    device = dictionary.norm_factors.device
    stats = ReconstructionStats(dictionary.n_layers, dictionary.d_model, dictionary.writes_FL())
    remaining = n_tokens
    bar = tqdm(total=min(n_tokens, store.n_rows), desc="evaluate", unit="tok", unit_scale=True, disable=not progress)
    for x_BLD in store.iter_batches(batch_size, layers=dictionary.layers, normalized=False, shuffle=True,
                                    seed=seed, epochs=1, drop_last=False, buffer_rows=max(batch_size, 4096)):
        x_BLD = x_BLD[:remaining].to(device)
        feats_BF, recon_BLD = dictionary(x_BLD, normalized=False)
        stats.update(x_BLD, recon_BLD, feats_BF)
        remaining -= x_BLD.shape[0]
        bar.update(x_BLD.shape[0])
        if remaining <= 0:
            break
    bar.close()
    return stats


@torch.no_grad()
def evaluate(dictionary: Dictionary, store, *, model=None, n_tokens: int = 100_000, batch_size: int = 512,
             n_windows: int = 32, window_batch_size: int = 4, per_layer_downstream: bool = True,
             dense_threshold: float = 0.1, seed: int = 0, zero_cache: ZeroCache | None = None,
             out: str | Path | None = None, progress: bool = False) -> pd.DataFrame:
    """Metrics of ``dictionary`` on ``store`` (and ``model``): one row per layer plus a whole-dictionary row.

    Columns: kind, scope ("layer" | "all"), layer (model layer, nullable ``Int64``: <NA> on the "all"
    row), hook, fvu, fvu_pooled, mse, cos, rel_norm, l0, n_features, dead_frac, dense_frac, l0_feat and
    l0_tuple ("all" row), n_tokens; with a model also ce_clean, ce_zero, ce_spliced, ce_recovered, kl,
    kl_zero, n_predictions. ``zero_cache``: see :data:`ZeroCache`. Written to ``out`` as CSV if given.
    """
    check_compatible(dictionary, store)
    if n_tokens < 1 or batch_size < 1:
        raise CrosslayerError(f"n_tokens and batch_size must be >= 1, got {n_tokens}, {batch_size}")
    stats = _reconstruction_stats(dictionary, store, n_tokens=n_tokens, batch_size=batch_size, seed=seed,
                                  progress=progress)
    rows = _table_rows(dictionary, stats.compute(), dictionary.decoder_norms().float(), dense_threshold)
    if model is not None:
        down = downstream(dictionary, store, model, n_windows=n_windows, batch_size=window_batch_size,
                          per_layer=per_layer_downstream, zero_cache=zero_cache, progress=progress)
        for row in rows:
            row.update(down.get(row["layer"] if row["scope"] == "layer" else "all", {}))
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    table.insert(0, "kind", dictionary.kind)
    table["n_tokens"] = stats.n
    if out is not None:
        write_csv(table, out)
    return table
