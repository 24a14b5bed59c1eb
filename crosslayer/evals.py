"""Evaluation of any Dictionary: reconstruction, sparsity, dead/dense features, downstream loss with intervals.

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
   concatenated [L * d] vector in raw units (dominated by high-norm layers). ``prefix_fvu`` (layer rows
   of dictionaries whose all row is "none", see step 4) is the FVU at l of the prefix reconstruction of
   step 4, on the same rows.
2. Sparsity: a feature is active where f_i != 0. ``l0_feat`` = E sum_i 1[f_i != 0] (each feature counted
   once). Feature i counts at layer l when it is active and writes l with a decoder norm of at least
   ``l0_frac`` (column ``l0_frac``, default 0.1) times its largest layer norm (``decoder_norms``;
   :func:`l0_pairs`): per layer ``l0`` = E sum_i 1[f_i != 0] 1[pair (i, l) counts]; ``l0_tuple`` (all row)
   = their sum over layers, the number of (feature, layer) pairs; the all row's ``l0`` is ``l0_feat``.
   A per-layer SAE latent writes exactly its own layer, so for per-layer SAEs all three agree with the
   per-SAE L0s and their sum, whatever ``l0_frac``.
3. Dead / dense: a feature is dead if it never fires on the tokens measured (``n_tokens`` column)
   and dense if it fires on more than ``dense_threshold`` (10 %) of them. Per-layer rows count the
   features whose decoder norm peaks at that layer (for per-layer SAEs: that layer's SAE).
4. Downstream (when a model is given).
   Text: ``n_windows`` windows of the store, spread evenly over it (window floor(j N / n) for j < n, N the
   store's windows; :func:`choose_windows`) so they come from as many documents as the store's order
   allows. A next-token prediction is made at position t (of token t+1) and belongs to the document of
   t. It is scored when the store kept t (positions excluded at harvest — position 0, special tokens,
   dropped outliers — are never replaced and never scored) and t and t+1 are in the same document
   (``windows_doc``): the end-of-text separator belongs to no document, so each document's prediction
   of its separator and the separator's prediction of the next document are excluded; no scored
   prediction crosses a document join. ``n_predictions`` / ``n_docs`` count what was scored.
   Runs per row (column ``splice``), all replacing only kept positions, the model running on above:
   - ``"layer"`` (layer rows): the dictionary reconstructs its layers from the clean activations and
     layer l alone is replaced. A dictionary that reads later layers (acausal crosscoders) uses the
     clean future here; see the prefix splice.
   - ``"sequential"`` (all row of a layerwise dictionary, per-layer SAEs): one forward pass in which
     each hook replaces its layer by that SAE's reconstruction of the activation arriving there,
     computed by the model from the stream already spliced below (errors compound).
   - ``"causal"`` (all row of a dictionary in which every feature reads only layers <= every layer it
     writes, e.g. weakly causal crosscoders; ``reads_FL`` / ``writes_FL``; :func:`multi_layer_splice`):
     one forward pass in layer order; at hook l the dictionary encodes [a_0, .., a_l, m_l+1, .., m_L-1]
     and layer l of its reconstruction replaces a_l. a_j is the activation that arrived at hook j in
     this pass (before its replacement; computed from the spliced stream below j, never from the clean
     run); the later layers do not exist yet and are filled with the store's per-layer mean m_j. A
     feature that writes l reads only a_0..a_l, so its pre-activation is exact, the same at every hook
     after its read layers, and with a per-feature rule (ReLU, JumpReLU, BatchTopK's inference
     threshold) so is its activation. Under TopK the features that read a later layer still compete for
     the k slots, with the score they have on the mean activation there, so the features selected among
     those writing l can differ from an encode of the full stream (a later feature's mean-input score
     can take a slot, or leave one free). For a layerwise dictionary this is the sequential splice.
   - ``"none"`` (all row of any other dictionary: acausal, window > 1): no multi-layer run; its
     downstream columns are NaN. Replacing every resid_post at once with a reconstruction of the clean
     activations is the last layer's splice alone (at the replaced positions a later resid_post
     overwrites everything written below it; only the unreplaced excluded positions carry the lower
     splices on through attention), and a causal run does not exist, since a feature that writes l
     reads a layer after it.
   - prefix (layer rows of the "none" dictionaries): layer l reconstructed from [x_0, .., x_l, m_l+1, ..],
     the clean activations up to l and the store's mean at the later layers, replaced at l alone:
     ``prefix_ce_spliced``, ``prefix_ce_recovered``, ``prefix_kl`` (and ``prefix_fvu``, step 1). Its gap
     to ``ce_spliced`` shows how much layer l's reconstruction leans on the future. NaN elsewhere.
   Baselines, on every row with a run: mean ablation (primary) replaces the same positions of the same
   layers with the store's mean raw activation per layer (over every stored row of the evaluated store,
   :meth:`ActivationStore.mean`); zero ablation replaces them with zeros. On the all row both replace every
   layer at once (a "dictionary" that always outputs the mean, spliced sequentially or causally, does
   exactly that). ``ce_recovered`` = (CE_mean - CE_spliced) / (CE_mean - CE_clean), ``ce_recovered_zero``
   the same with CE_zero; ``kl`` / ``kl_mean`` / ``kl_zero`` = KL(clean || run) per prediction.
   Intervals (``_lo`` / ``_hi``): every run's CE and KL are summed per document (float64); point values
   are ratios of the totals; the 95 % interval is the 2.5 / 97.5 percentile of the same ratio over
   ``n_boot`` resamples of DOCUMENTS (a cluster bootstrap: a document's tokens are not independent).
   Resample b draws D documents with replacement: ``numpy.random.default_rng(seed).integers(0, D,
   (n_boot, D))`` row b, documents numbered by increasing store doc id; every row and column of one
   call shares the resamples.
   Cost per batch of windows: one clean pass (the cache of the dictionary's hooks), and per row one
   spliced pass (plus one prefix pass for "none" dictionaries, whose all row has none), one mean- and one
   zero-ablation pass. A pass starts at the first spliced block from the clean run's cached
   ``resid_pre`` (``start_at_layer``; the blocks below are unchanged). The ablations do not depend on
   the dictionary and are memoised in a ``zero_cache`` dict the caller passes (keyed by model weights,
   store, hooks, windows, batch and run); the clean pass is not, as every spliced run needs its cached
   activations and log-probabilities.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from crosslayer.dictionary import WRITE_FRACTION, Dictionary, check_compatible, written_pairs
from crosslayer.errors import CrosslayerError
from crosslayer.hooks import block_index
from crosslayer.io import write_csv

CI_COLUMNS = ("ce_spliced", "ce_recovered", "ce_recovered_zero", "kl", "prefix_ce_spliced", "prefix_ce_recovered",
              "prefix_kl")
"""Downstream columns reported with a 95 % document-bootstrap interval (``<name>_lo``, ``<name>_hi``)."""

TABLE_COLUMNS = ["kind", "scope", "layer", "hook", "splice", "fvu", "fvu_pooled", "prefix_fvu", "mse", "cos",
                 "rel_norm", "l0", "l0_frac", "l0_feat", "l0_tuple", "n_features", "dead_frac", "dense_frac",
                 "n_tokens"]
"""Columns of every :func:`evaluate` table, in order."""

DOWNSTREAM_COLUMNS = ["n_predictions", "n_docs", "ce_clean"] + [
    c for name in ("ce_spliced", "ce_mean", "ce_zero", "ce_recovered", "ce_recovered_zero", "kl", "kl_mean", "kl_zero",
                   "prefix_ce_spliced", "prefix_ce_recovered", "prefix_kl")
    for c in ((name, f"{name}_lo", f"{name}_hi") if name in CI_COLUMNS else (name,))]
"""Columns appended when a model is given (module docstring, step 4)."""


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


# ----------------------------------------------------------------------------- what is counted and spliced

l0_pairs = written_pairs
"""The (feature, layer) pairs L0 counts (module docstring, step 2): :func:`crosslayer.dictionary.written_pairs`."""


def is_causal(reads_FL: Tensor, writes_FL: Tensor) -> bool:
    """True when every feature reads only layers <= every layer it writes (positions in the layer axis)."""
    L = reads_FL.shape[1]
    index_L = torch.arange(L)
    last_read_F = torch.where(reads_FL.bool(), index_L, -1).max(dim=1).values
    first_write_F = torch.where(writes_FL.bool(), index_L, L).min(dim=1).values
    return bool((last_read_F <= first_write_F).all())


def multi_layer_splice(dictionary: Dictionary) -> str:
    """The all row's splice (module docstring, step 4): "sequential" (layerwise dictionaries), "causal" (every
    feature reads only layers <= every layer it writes) or "none"."""
    if dictionary.layerwise:
        return "sequential"
    return "causal" if is_causal(dictionary.reads_FL(), dictionary.writes_FL()) else "none"


def prefix_reconstruction(dictionary: Dictionary, x_NLD: Tensor, mean_LD: Tensor) -> Tensor:
    """``[N, L, d]`` raw: layer l reconstructed from ``x_NLD`` (raw) at layers <= l and ``mean_LD`` at the later
    layers (module docstring, step 4, prefix); one encode per layer."""
    mean_LD = mean_LD.to(x_NLD)
    out_NLD = torch.empty_like(x_NLD)
    for i in range(x_NLD.shape[1]):
        inputs_NLD = x_NLD.clone()
        inputs_NLD[:, i + 1:] = mean_LD[i + 1:]
        out_NLD[:, i] = dictionary.reconstruct(inputs_NLD, normalized=False)[:, i]
    return out_NLD


# ----------------------------------------------------------------------------- the text of the downstream runs

def choose_windows(store, n_windows: int) -> np.ndarray:
    """Indices of ``min(n_windows, N)`` of the store's N windows, spread evenly over it (floor(j N / n))."""
    N = int(store.manifest["n_windows"])
    n = min(int(n_windows), N)
    if n < 1:
        raise CrosslayerError(f"need n_windows >= 1 (the store has {N}), got {n_windows}")
    return np.arange(n, dtype=np.int64) * N // n


def kept_mask(store, windows) -> Tensor:
    """``[n, seq_len]`` bool: positions of ``windows`` (window indices, or an int n: the first n) that the store
    kept (True) vs excluded at harvest."""
    if isinstance(windows, (int, np.integer)):
        windows = np.arange(min(int(windows), int(store.manifest["n_windows"])))
    index = np.asarray(windows, dtype=np.int64)
    T = store.seq_len
    stored = torch.from_numpy(store.row_of_flat(index[:, None] * T + np.arange(T)) >= 0)
    tokens = store.window_tokens()[torch.from_numpy(index)]
    policy = store.manifest["exclusion_policy"]
    allowed = ~torch.isin(tokens, torch.tensor(policy["special_token_ids"], dtype=torch.int64))
    if policy["position0"]:
        allowed[:, 0] = False
    return stored & allowed


class EvalWindows(NamedTuple):
    """The text of the downstream runs (module docstring, step 4)."""

    index: np.ndarray
    """Store windows used ``[n]``."""
    tokens: Tensor
    """Their token ids ``[n, T]``."""
    kept: Tensor
    """``[n, T]`` bool: positions the store kept (the ones every run replaces)."""
    pred: Tensor
    """``[n, T - 1]`` bool: the predictions scored (made at t, of t + 1)."""
    doc: Tensor
    """``[n, T - 1]`` int64: document number (0..n_docs-1, by increasing store doc id) of each scored
    prediction, -1 elsewhere."""
    n_docs: int
    key: str
    """Digest of the store and the windows (part of the ``zero_cache`` keys)."""


def eval_windows(store, n_windows: int) -> EvalWindows:
    """The windows, scored predictions and their documents (module docstring, step 4)."""
    index = choose_windows(store, n_windows)
    kept = kept_mask(store, index)
    doc_NT = store.window_docs()[torch.from_numpy(index)]
    src, tgt = doc_NT[:, :-1], doc_NT[:, 1:]
    pred = kept[:, :-1] & (src >= 0) & (tgt == src)
    ids, number = torch.unique(src[pred], return_inverse=True)
    doc = torch.full_like(src, -1)
    doc[pred] = number
    key = hashlib.sha1(f"{store.path}|{store.n_rows}|{store.seq_len}|".encode() + index.tobytes()).hexdigest()[:16]
    return EvalWindows(index, store.window_tokens()[torch.from_numpy(index)], kept, pred, doc, len(ids), key)


ZeroCache = dict
"""Memo of the ablation runs, which do not depend on the dictionary: (model weights id, model dtype, store and
windows digest, batch size, batch start, hooks, "mean" | "zero") -> per-prediction scores ``[2, P]``. Pass one
dict to several :func:`evaluate` calls on the same model and store to run each ablation once."""


class _CleanBatch(NamedTuple):
    """One batch of windows run clean, with what every run of it needs."""

    tokens: Tensor
    mask_BT: Tensor
    cache: dict
    acts_BTLD: Tensor
    pred_BT: Tensor
    doc_P: np.ndarray
    target: Tensor
    logp_clean: Tensor


class _Plan(NamedTuple):
    """What the runs of one :func:`downstream` call share."""

    rows: list
    """(row key, layer positions spliced; None for the all row)."""
    prefix: bool
    mean_LD: Tensor
    starts: dict
    cache_key: tuple
    zero_cache: ZeroCache | None


def _check_model_store(model, store) -> None:
    wid = getattr(model, "crosslayer_weights_id", None)
    if wid is not None and wid != store.manifest["weights_id"]:
        raise CrosslayerError(f"model weights {wid} differ from the store's ({store.manifest['weights_id']}); "
                              "pass the model the store was harvested from")


def _block_starts(dictionary: Dictionary) -> dict[int, int]:
    """Layer position -> block index of each hook; empty when a hook is outside the blocks."""
    block_of = [block_index(h) for h in dictionary.hooks]
    return {} if None in block_of else {i: b for i, b in enumerate(block_of)}


def _plan(dictionary: Dictionary, store, model, win: EvalWindows, per_layer: bool, batch_size: int,
          zero_cache: ZeroCache | None) -> _Plan:
    if dictionary.layers != sorted(dictionary.layers):
        raise CrosslayerError(f"dictionary layers {dictionary.layers} are not ascending; cannot splice in layer order")
    splice = multi_layer_splice(dictionary)
    rows = ([(l, [i]) for i, l in enumerate(dictionary.layers)] if per_layer else [])
    rows += [("all", None)] if splice != "none" else []
    param = next(iter(model.parameters()))
    key = (getattr(model, "crosslayer_weights_id", id(model)), str(param.dtype), win.key, batch_size)
    return _Plan(rows, splice == "none" and per_layer, store.mean(dictionary.layers), _block_starts(dictionary), key,
                 zero_cache)


# ----------------------------------------------------------------------------- runs

def _run_clean(model, dictionary: Dictionary, win: EvalWindows, sl: slice, device, cache_names: set) -> _CleanBatch:
    tokens, mask_BT, pred_BT = (t[sl].to(device) for t in (win.tokens, win.kept, win.pred))
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in cache_names)
    acts_BTLD = torch.stack([cache[h] for h in dictionary.hooks], dim=2)
    logp_clean = torch.log_softmax(logits[:, :-1][pred_BT].float(), dim=-1)
    return _CleanBatch(tokens, mask_BT, cache, acts_BTLD, pred_BT, win.doc[sl][win.pred[sl]].numpy(),
                       tokens[:, 1:][pred_BT], logp_clean)


def _forward(model, batch: _CleanBatch, hooks: list, idx: list[int], starts: dict[int, int]) -> Tensor:
    """Logits with ``hooks``, starting at the first spliced block from the clean cache (the blocks below
    it are unchanged)."""
    first = min((starts[i] for i in idx), default=None) if starts else None
    if first is None:
        return model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
    return model.run_with_hooks(batch.cache[f"blocks.{first}.hook_resid_pre"], start_at_layer=first, fwd_hooks=hooks)


def _score(batch: _CleanBatch, logits: Tensor) -> Tensor:
    """``[2, P]`` float64 on the CPU: CE and KL(clean || run) of each scored prediction."""
    logp = torch.log_softmax(logits[:, :-1][batch.pred_BT].float(), dim=-1)
    ce_P = -logp.gather(1, batch.target[:, None])[:, 0]
    kl_P = (batch.logp_clean.exp() * (batch.logp_clean - logp)).sum(-1)
    return torch.stack([ce_P, kl_P]).double().cpu()


def _run_values(model, hooks: list[str], batch: _CleanBatch, values_BTLD: Tensor, which: list[int] | None,
                starts: dict[int, int]) -> Tensor:
    """Scores with ``values_BTLD`` (broadcastable to ``[B, T, L, d]``) at the kept positions of layers ``which``
    (None: all)."""
    def splice(act, hook, i):
        return torch.where(batch.mask_BT[..., None], values_BTLD[:, :, i].to(act), act)

    idx = list(range(len(hooks)) if which is None else which)
    fwd = [(hooks[i], partial(splice, i=i)) for i in idx]
    return _score(batch, _forward(model, batch, fwd, idx, starts))


def _run_multi(model, dictionary: Dictionary, batch: _CleanBatch, plan: _Plan) -> Tensor:
    """Scores of the all row's sequential or causal run, one forward pass (module docstring, step 4)."""
    mask, device = batch.mask_BT, dictionary.norm_factors.device
    inputs_NLD = plan.mean_LD.to(device).expand(int(mask.sum()), -1, -1).clone()  # layers not reached: the mean

    def splice(act, hook, i):
        inputs_NLD[:, i] = act[mask].float().to(device)  # a_i: arrived from the stream spliced below
        if dictionary.layerwise:
            rec_ND = dictionary.reconstruct_layer(inputs_NLD[:, i], i, normalized=False)
        else:
            rec_ND = dictionary.reconstruct(inputs_NLD, normalized=False)[:, i]
        out = act.clone()
        out[mask] = rec_ND.to(act)
        return out

    fwd = [(h, partial(splice, i=i)) for i, h in enumerate(dictionary.hooks)]
    return _score(batch, _forward(model, batch, fwd, list(range(len(fwd))), plan.starts))


def _ablation(model, dictionary: Dictionary, batch: _CleanBatch, plan: _Plan, which: list[int] | None, kind: str,
              start: int) -> Tensor:
    """Scores with the store's mean (``kind`` "mean") or zeros ("zero") at the kept positions of ``which``,
    memoised in ``plan.zero_cache``."""
    hooks = tuple(dictionary.hooks[i] for i in (range(dictionary.n_layers) if which is None else which))
    key = plan.cache_key + (start, hooks, kind)
    if plan.zero_cache is not None and key in plan.zero_cache:
        return plan.zero_cache[key]
    values_LD = plan.mean_LD if kind == "mean" else torch.zeros_like(plan.mean_LD)
    result = _run_values(model, dictionary.hooks, batch, values_LD[None, None], which, plan.starts)
    if plan.zero_cache is not None:
        plan.zero_cache[key] = result
    return result


def _at_kept(batch: _CleanBatch, recon_NLD: Tensor) -> Tensor:
    """The clean activations ``[B, T, L, d]`` with ``recon_NLD`` at the kept positions."""
    out_BTLD = batch.acts_BTLD.clone()
    out_BTLD[batch.mask_BT] = recon_NLD.to(out_BTLD)
    return out_BTLD


def _batch_runs(model, dictionary: Dictionary, batch: _CleanBatch, plan: _Plan, start: int) -> Iterator[tuple]:
    """(row key, run, scores ``[2, P]``) of every run of one batch: spliced, prefix, mean, zero."""
    plain = prefix = None
    if any(which is not None for _, which in plan.rows):
        x_NLD = batch.acts_BTLD[batch.mask_BT].float().to(dictionary.norm_factors.device)
        plain = _at_kept(batch, dictionary.reconstruct(x_NLD, normalized=False))
        if plan.prefix:
            prefix = _at_kept(batch, prefix_reconstruction(dictionary, x_NLD, plan.mean_LD))
    for key, which in plan.rows:
        if which is None:
            yield key, "spliced", _run_multi(model, dictionary, batch, plan)
        else:
            yield key, "spliced", _run_values(model, dictionary.hooks, batch, plain, which, plan.starts)
            if prefix is not None:
                yield key, "prefix", _run_values(model, dictionary.hooks, batch, prefix, which, plan.starts)
        for kind in ("mean", "zero"):
            yield key, kind, _ablation(model, dictionary, batch, plan, which, kind, start)


# ----------------------------------------------------------------------------- per-document sums and intervals

RUN_COLUMNS = {"spliced": ("ce_spliced", "kl"), "mean": ("ce_mean", "kl_mean"), "zero": ("ce_zero", "kl_zero"),
               "prefix": ("prefix_ce_spliced", "prefix_kl")}
"""run -> the (CE, KL) columns it fills."""


def _per_doc(values_KP: Tensor, doc_P: np.ndarray, n_docs: int) -> np.ndarray:
    """``[K, n_docs]`` float64: each row of ``values_KP`` summed per document."""
    return np.stack([np.bincount(doc_P, weights=v, minlength=n_docs) for v in values_KP.double().numpy()])


def bootstrap_counts(n_docs: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_docs]`` float64: how often each document is drawn in each resample (``n_docs`` draws with
    replacement; row b is ``default_rng(seed).integers(0, n_docs, (n_boot, n_docs))[b]`` counted)."""
    draws = np.random.default_rng(seed).integers(0, n_docs, size=(n_boot, n_docs))
    flat = (draws + np.arange(n_boot)[:, None] * n_docs).ravel()
    return np.bincount(flat, minlength=n_boot * n_docs).reshape(n_boot, n_docs).astype(np.float64)


def _recovered(base, spliced, clean):
    """(base - spliced) / (base - clean), NaN where the denominator is ~0 (totals or arrays of totals)."""
    denom = np.asarray(base - clean, dtype=np.float64)
    ok = np.abs(denom) > 1e-9 * np.abs(base)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, (base - spliced) / np.where(ok, denom, 1.0), np.nan)


def downstream_metrics(totals: dict) -> dict:
    """Row values from totals over predictions (``n``, ``ce_clean`` and the :data:`RUN_COLUMNS` present; floats,
    or ``[n_boot]`` arrays of resampled totals)."""
    out = {name: t / totals["n"] for name, t in totals.items() if name != "n"}
    out["ce_recovered"] = _recovered(totals["ce_mean"], totals["ce_spliced"], totals["ce_clean"])
    out["ce_recovered_zero"] = _recovered(totals["ce_zero"], totals["ce_spliced"], totals["ce_clean"])
    if "prefix_ce_spliced" in totals:
        out["prefix_ce_recovered"] = _recovered(totals["ce_mean"], totals["prefix_ce_spliced"], totals["ce_clean"])
    return out


def _row_values(per_doc: dict[str, np.ndarray], counts_BD: np.ndarray) -> dict:
    """Point values and 95 % document-bootstrap intervals of one row from its per-document sums."""
    point = downstream_metrics({k: v.sum() for k, v in per_doc.items()})
    boot = downstream_metrics({k: counts_BD @ v for k, v in per_doc.items()})
    row = {k: float(v) for k, v in point.items()}
    for name in CI_COLUMNS:
        if name in boot:
            finite = boot[name][np.isfinite(boot[name])]
            lo, hi = np.percentile(finite, [2.5, 97.5]) if finite.size else (np.nan, np.nan)
            row[f"{name}_lo"], row[f"{name}_hi"] = float(lo), float(hi)
    row.update(n_predictions=int(per_doc["n"].sum()), n_docs=int((per_doc["n"] > 0).sum()))
    return row


@torch.no_grad()
def downstream(dictionary: Dictionary, store, model, *, n_windows: int = 32, batch_size: int = 8,
               per_layer: bool = True, n_boot: int = 1000, seed: int = 0, zero_cache: ZeroCache | None = None,
               progress: bool = False) -> dict:
    """Downstream columns keyed by model layer (int) and ``"all"`` (absent when the dictionary's all-row splice is
    "none"; no layer keys without ``per_layer``) (module docstring, step 4). ``zero_cache``: :data:`ZeroCache`."""
    check_compatible(dictionary, model)
    _check_model_store(model, store)
    win = eval_windows(store, n_windows)
    if win.n_docs == 0:
        raise CrosslayerError("no next-token predictions at kept positions; use more or longer windows")
    plan = _plan(dictionary, store, model, win, per_layer, batch_size, zero_cache)
    sums, clean_2D = defaultdict(lambda: np.zeros((2, win.n_docs))), np.zeros((2, win.n_docs))
    device = next(iter(model.parameters())).device
    cache_names = set(dictionary.hooks) | {f"blocks.{b}.hook_resid_pre" for b in plan.starts.values()}
    for start in tqdm(range(0, len(win.index) if plan.rows else 0, batch_size), desc="downstream", unit="batch",
                      disable=not progress):
        batch = _run_clean(model, dictionary, win, slice(start, start + batch_size), device, cache_names)
        ce_P = -batch.logp_clean.gather(1, batch.target[:, None])[:, 0]
        clean_2D += _per_doc(torch.stack([ce_P, torch.ones_like(ce_P)]).cpu(), batch.doc_P, win.n_docs)
        for key, run, scores in _batch_runs(model, dictionary, batch, plan, start):
            sums[(key, run)] += _per_doc(scores, batch.doc_P, win.n_docs)
    counts_BD = bootstrap_counts(win.n_docs, n_boot, seed)
    out = {}
    for key, _ in plan.rows:
        per_doc = {"n": clean_2D[1], "ce_clean": clean_2D[0]}
        for run, (ce, kl) in RUN_COLUMNS.items():
            if (key, run) in sums:
                per_doc[ce], per_doc[kl] = sums[(key, run)]
        out[key] = _row_values(per_doc, counts_BD)
    return out


# ----------------------------------------------------------------------------- the table

def _table_rows(dictionary: Dictionary, m: dict, dec_FL: Tensor, dense_threshold: float, splice: str,
                prefix_fvu_L: Tensor | None) -> list[dict]:
    """One row per layer (scope "layer") and the whole-dictionary row (scope "all", layer <NA>)."""
    freq_F = m["freq_F"]
    dead_F, dense_F = freq_F == 0, freq_F > dense_threshold
    peak_F = dec_FL.argmax(dim=1).cpu()
    rows = []
    for i, (layer, hook) in enumerate(zip(dictionary.layers, dictionary.hooks)):
        own = peak_F == i
        n_own = int(own.sum())
        rows.append({"scope": "layer", "layer": layer, "hook": hook, "splice": "layer", "fvu": float(m["fvu"][i]),
                     "fvu_pooled": float(m["fvu"][i]), "mse": float(m["mse"][i]), "cos": float(m["cos"][i]),
                     "prefix_fvu": float(prefix_fvu_L[i]) if prefix_fvu_L is not None else float("nan"),
                     "rel_norm": float(m["rel_norm"][i]), "l0": float(m["l0"][i]), "n_features": n_own,
                     "dead_frac": float(dead_F[own].double().mean()) if n_own else float("nan"),
                     "dense_frac": float(dense_F[own].double().mean()) if n_own else float("nan")})
    rows.append({"scope": "all", "layer": pd.NA, "hook": "", "splice": splice, "fvu": float(m["fvu"].mean()),
                 "fvu_pooled": m["fvu_pooled_all"], "mse": float(m["mse"].mean()), "cos": float(m["cos"].mean()),
                 "rel_norm": float(m["rel_norm"].mean()), "l0": m["l0_feat"], "l0_feat": m["l0_feat"],
                 "l0_tuple": float(m["l0"].sum()), "n_features": dictionary.n_features,
                 "dead_frac": float(dead_F.double().mean()), "dense_frac": float(dense_F.double().mean())})
    return rows


@torch.no_grad()
def _reconstruction_stats(dictionary: Dictionary, store, *, n_tokens: int, batch_size: int, seed: int,
                          writes_FL: Tensor, prefix_mean_LD: Tensor | None,
                          progress: bool) -> tuple[ReconstructionStats, ReconstructionStats | None]:
    """Stream ``n_tokens`` shuffled raw store rows through the dictionary (module docstring, steps 1-2); with
    ``prefix_mean_LD`` also the prefix reconstructions (step 4)."""
    device = dictionary.norm_factors.device
    stats = ReconstructionStats(dictionary.n_layers, dictionary.d_model, writes_FL)
    prefix = None if prefix_mean_LD is None else ReconstructionStats(dictionary.n_layers, dictionary.d_model)
    remaining = n_tokens
    bar = tqdm(total=min(n_tokens, store.n_rows), desc="evaluate", unit="tok", unit_scale=True, disable=not progress)
    for x_BLD in store.iter_batches(batch_size, layers=dictionary.layers, normalized=False, shuffle=True,
                                    seed=seed, epochs=1, drop_last=False, buffer_rows=max(batch_size, 4096)):
        x_BLD = x_BLD[:remaining].to(device)
        feats_BF, recon_BLD = dictionary(x_BLD, normalized=False)
        stats.update(x_BLD, recon_BLD, feats_BF)
        if prefix is not None:
            prefix.update(x_BLD, prefix_reconstruction(dictionary, x_BLD, prefix_mean_LD))
        remaining -= x_BLD.shape[0]
        bar.update(x_BLD.shape[0])
        if remaining <= 0:
            break
    bar.close()
    return stats, prefix


@torch.no_grad()
def evaluate(dictionary: Dictionary, store, *, model=None, n_tokens: int = 100_000, batch_size: int = 512,
             n_windows: int = 32, window_batch_size: int = 8, per_layer_downstream: bool = True,
             l0_frac: float = WRITE_FRACTION, n_boot: int = 1000, dense_threshold: float = 0.1, seed: int = 0,
             zero_cache: ZeroCache | None = None, out: str | Path | None = None,
             progress: bool = False) -> pd.DataFrame:
    """Metrics of ``dictionary`` on ``store`` (and ``model``): one row per layer plus a whole-dictionary row.

    Columns :data:`TABLE_COLUMNS` (``layer`` nullable ``Int64``, <NA> on the "all" row; ``splice`` "layer" on layer
    rows, "sequential" | "causal" | "none" on the all row), and with a model :data:`DOWNSTREAM_COLUMNS`
    (``n_predictions`` / ``n_docs`` nullable ``Int64``); the module docstring defines each. ``seed`` seeds the
    row shuffle and the bootstrap. ``zero_cache``: see :data:`ZeroCache`. Written to ``out`` as CSV if given.
    """
    check_compatible(dictionary, store)
    if n_tokens < 1 or batch_size < 1:
        raise CrosslayerError(f"n_tokens and batch_size must be >= 1, got {n_tokens}, {batch_size}")
    if not 0.0 <= l0_frac <= 1.0:
        raise CrosslayerError(f"l0_frac must be in [0, 1], got {l0_frac}")
    splice = multi_layer_splice(dictionary)
    dec_FL = dictionary.decoder_norms().detach().float()
    stats, prefix = _reconstruction_stats(
        dictionary, store, n_tokens=n_tokens, batch_size=batch_size, seed=seed,
        writes_FL=l0_pairs(dec_FL, dictionary.writes_FL(), l0_frac),
        prefix_mean_LD=store.mean(dictionary.layers) if splice == "none" else None, progress=progress)
    rows = _table_rows(dictionary, stats.compute(), dec_FL, dense_threshold, splice,
                       None if prefix is None else prefix.fvu_L())
    if model is not None:
        down = downstream(dictionary, store, model, n_windows=n_windows, batch_size=window_batch_size,
                          per_layer=per_layer_downstream, n_boot=n_boot, seed=seed, zero_cache=zero_cache,
                          progress=progress)
        for row in rows:
            row.update(down.get(row["layer"] if row["scope"] == "layer" else "all", {}))
    table = pd.DataFrame(rows).assign(kind=dictionary.kind, l0_frac=l0_frac, n_tokens=stats.n)
    table = table.reindex(columns=TABLE_COLUMNS + (DOWNSTREAM_COLUMNS if model is not None else []))
    for col in ("layer", "n_predictions", "n_docs"):
        if col in table:
            table[col] = table[col].astype("Int64")
    if out is not None:
        write_csv(table, out)
    return table


SPLICE_MEANING = {
    "layer": "that layer alone replaced by its reconstruction from clean inputs",
    "sequential": "every layer replaced in one pass, each SAE reading the stream spliced below it",
    "causal": "every layer replaced in one pass, each from the spliced stream at layers <= it",
    "none": "no multi-layer splice with a causal meaning (the dictionary reads later layers)",
}
"""What each value of the ``splice`` column means (printed under evaluation tables)."""

SUMMARY_COLUMNS = ("scope", "layer", "splice", "fvu", "prefix_fvu", "l0", "l0_tuple", "dead_frac", "n_predictions",
                   "n_docs", "ce_clean", "ce_mean", "ce_recovered", "ce_recovered_zero", "kl", "prefix_ce_recovered")


def _with_interval(table: pd.DataFrame, name: str) -> pd.Series:
    """``"x [lo, hi]"`` strings of column ``name`` and its bootstrap interval (blank where NaN)."""
    def one(x, lo, hi) -> str:
        return "" if pd.isna(x) else f"{x:.4g} [{lo:.4g}, {hi:.4g}]"

    return pd.Series([one(*v) for v in zip(table[name], table[f"{name}_lo"], table[f"{name}_hi"])],
                     index=table.index)


def summary_lines(table: pd.DataFrame) -> list[str]:
    """A readable summary of an :func:`evaluate` table: its main columns (downstream ones as ``x [lo, hi]``,
    95 % document-bootstrap intervals), the L0 fraction, and what each splice in it means."""
    view = table[[c for c in SUMMARY_COLUMNS if c in table.columns]].copy()
    for name in CI_COLUMNS:
        if name in view.columns and f"{name}_lo" in table.columns:
            view[name] = _with_interval(table, name)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        lines = view.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="").splitlines()
    lines.append(f"l0: active (feature, layer) pairs whose decoder norm at the layer is >= "
                 f"{float(table['l0_frac'].iloc[0]):g} x the feature's largest; intervals: 95 % bootstrap over documents")
    lines += [f"splice {s}: {SPLICE_MEANING[s]}" for s in dict.fromkeys(table["splice"]) if s in SPLICE_MEANING]
    return lines
