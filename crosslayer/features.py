"""Feature analysis: max-activating examples, logit effects, decoder profiles, a text dashboard.

Written once against :class:`~crosslayer.dictionary.Dictionary`, so it serves per-layer SAEs and
crosscoders alike (research-notes §6: sae_vis / SAEDashboard / Neuronpedia feature dashboards).

1. :func:`top_activations` streams the store once, in row order, encoding each batch from RAW
   activations (``normalized=False``, the dictionary's own factors). For the chosen features it keeps
   a running ``[n_feat, k]`` buffer of the largest activations and their rows, merged per batch with
   ``torch.topk`` over the batch's firing entries only (no full activation matrix), counts firing rows
   (density), fills a fixed log10 histogram of the non-zero activations, and keeps a uniform sample of the
   firing rows (reservoir by random priority: each firing (feature, row) gets a U(0,1) key and the
   ``sample`` largest keys are kept, merged like the top-k). Quantile examples are drawn from equal-count
   bands of that sample (:func:`pick_examples`, vectorised over features), and each example's context is
   rebuilt from the store with every context token's activation (:func:`example_contexts`).
2. :func:`logit_effects` (one feature; :func:`logit_effect_arrays` many, in blocks) maps a feature's decoder vector, in RAW units (``d_norm / factor_l``), through
   the final RMSNorm's gain ``w`` (when the model has one; ``through_norm=True``) and ``W_U``. The
   norm's 1/rms scale is positive and shared by all tokens, so it changes no ranking and is left
   out: the effect of adding ``a * d`` to the residual is ``a * (d * w) @ W_U`` up to that scale
   (direct logit attribution, Elhage et al. 2021; ``W_dec[f] @ W_U`` in sae_vis).
3. :func:`decoder_profile`: relative decoder norms ``r_i^l = ||d_i^l|| / max_l ||d_i^l||`` (normalised
   units, as :meth:`Dictionary.decoder_norms`), peak layer, span ``#{l: r > tau}``, normalised
   entropy of ``r / sum r`` (0 = one layer, 1 = flat), and direction drift ``cos(d_i^peak, d_i^l)``
   over the spanned layers (crosscoder replications, Lindsey et al. 2024).
4. :func:`find_features_for_token`: one matmul per layer of all decoder directions with the token's
   (gain-scaled) unembedding column; features ranked by their largest effect over layers.
5. :func:`dashboard` renders 1-3 as text for ``crosslayer features``; :mod:`crosslayer.browse` renders the
   same analysis of every feature as a site.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from crosslayer.dictionary import Dictionary, check_compatible
from crosslayer.errors import CrosslayerError

HIST_LOG10_RANGE = (-3.0, 3.0)
"""Histogram bins span log10(activation) in this range; values outside go to the end bins."""
HIST_BINS = 30
FOCUS_MARK = ("[[", "]]")
"""How the focus token is marked in context text."""


class FeatureActivations(NamedTuple):
    """What :func:`top_activations` returns (all tidy DataFrames)."""

    examples: "pd.DataFrame"  # noqa: F821
    """One row per example: feature, kind ("top" | "quantile"), band (quantile band, -1 for top), rank,
    row, activation, token_id, token, context (focus token marked ``[[...]]``), label, doc, position,
    focus (index of the example's token in the context lists), context_tokens (the context's tokens,
    decoded one by one) and context_acts (the feature's activation on each of them; NaN where the
    store holds no row for that position, e.g. position 0)."""
    stats: "pd.DataFrame"  # noqa: F821
    """One row per feature: feature, n_rows, n_fire, density (fraction of rows with f > 0), max, mean_nonzero."""
    histogram: "pd.DataFrame"  # noqa: F821
    """feature, bin, log10_lo, log10_hi, count: histogram of the non-zero activations."""


# ----------------------------------------------------------------------------- checks and weights

def check_features(dictionary: Dictionary, features) -> list[int]:
    """``features`` as a list of ints, each in ``0..F-1``, or a one-line CrosslayerError."""
    feats = [int(f) for f in ([features] if isinstance(features, (int, np.integer)) else features)]
    if not feats:
        raise CrosslayerError("no features given; pass at least one feature index")
    bad = [f for f in feats if not 0 <= f < dictionary.n_features]
    if bad:
        raise CrosslayerError(f"feature index {bad[0]} is out of range: the dictionary has "
                              f"{dictionary.n_features} features (0..{dictionary.n_features - 1})")
    return feats


def unembed_matrix(model, through_norm: bool = True) -> Tensor:
    """``W_U [d, vocab]``, scaled row-wise by the final norm's gain ``w`` when asked and present."""
    W_U = model.W_U.detach().float().cpu()
    w = getattr(model.ln_final, "w", None) if through_norm else None
    return W_U * w.detach().float().cpu()[:, None] if w is not None else W_U


# ----------------------------------------------------------------------------- streaming top-k

def _merge_entries(keys_NK: Tensor, payload_NK: list[Tensor], feat_E: Tensor, key_E: Tensor,
                   payload_E: list[Tensor]) -> None:
    """Merge entries ``(feat_E, key_E, payload_E)`` into each feature's ``K`` largest keys ``keys_NK`` (sorted
    descending, -inf = empty) and their payloads, in place. Only entries above their feature's current K-th key
    take part, scattered into a ``[features touched, most entries of one]`` block merged with ``topk``."""
    f_E = feat_E.numpy()
    acc = key_E.numpy() > keys_NK[:, -1].numpy()[f_E]  # numpy: boolean masks and sorts are several times faster
    if not acc.any():
        return
    f = f_E[acc]
    order = np.argsort(f, kind="stable")
    uniq, first, counts = np.unique(f[order], return_index=True, return_counts=True)
    at = (torch.from_numpy(np.repeat(np.arange(len(uniq)), counts)),
          torch.from_numpy(np.arange(len(order)) - np.repeat(first, counts)))
    pick = torch.from_numpy(np.flatnonzero(acc)[order])  # the accepted entries, grouped by feature
    key, pay, uniq = key_E[pick], [p[pick] for p in payload_E], torch.from_numpy(uniq)
    width = int(counts.max())
    block = torch.full((len(uniq), width), -math.inf)
    block[at] = key
    merged, pos = torch.cat([keys_NK[uniq], block], 1).topk(keys_NK.shape[1], dim=1)
    keys_NK[uniq] = merged
    for P_NK, p in zip(payload_NK, pay):
        block = torch.zeros((len(uniq), width), dtype=P_NK.dtype)
        block[at] = p
        P_NK[uniq] = torch.cat([P_NK[uniq], block], 1).gather(1, pos)


@torch.no_grad()
def stream_feature_stats(dictionary: Dictionary, store, features: list[int], *, k: int = 20,
                         sample: int = 256, batch_size: int = 1024, seed: int = 0,
                         keep_max: int = 0) -> dict[str, Tensor]:
    """One pass over ``store``: top-k values/rows, firing counts, log10 histogram, a uniform firing sample.

    Returns tensors: ``top_vals``/``top_rows`` ``[n, k]`` (value -inf, row -1 where fewer than k rows
    fire), ``n_fire`` ``[n]``, ``hist`` ``[n, HIST_BINS]``, ``sample_vals``/``sample_rows`` ``[n, sample]``,
    ``n_rows``. With ``keep_max`` > 0, also ``sparse``: every firing (row, feature) activation, sorted by the key
    ``row * n + position in features`` (``keys``, ``vals``), for :func:`sparse_lookup`; None when more than
    ``keep_max`` activations fire (the caller then re-encodes the rows it needs). Only firing entries are
    touched after the encoding (:func:`_merge_entries`), so the cost per batch follows the activations that fire.
    """
    feats = check_features(dictionary, features)
    check_compatible(dictionary, store)
    n = len(feats)
    idx_N = torch.tensor(feats)
    every = feats == list(range(dictionary.n_features))
    gen = torch.Generator().manual_seed(seed)
    top_vals = torch.full((n, k), -math.inf)
    top_rows = torch.full((n, k), -1, dtype=torch.long)
    key_vals = torch.full((n, sample), -math.inf)  # random priorities of the kept sample
    smp_vals = torch.zeros(n, sample)
    smp_rows = torch.full((n, sample), -1, dtype=torch.long)
    n_fire = torch.zeros(n, dtype=torch.long)
    hist = torch.zeros(n * HIST_BINS, dtype=torch.long)
    lo, hi = HIST_LOG10_RANGE
    start, n_kept = 0, 0
    kept: list | None = [] if keep_max > 0 else None
    for acts_BLD in store.iter_batches(batch_size, layers=dictionary.layers, normalized=False, shuffle=False,
                                       drop_last=False):
        B = acts_BLD.shape[0]
        f_BF = dictionary.encode(acts_BLD.to(dictionary.norm_factors.device), normalized=False).float().cpu()
        f_BN = f_BF if every else f_BF[:, idx_N]
        col, feat = (f_BN > 0).nonzero(as_tuple=True)
        val, row = f_BN[col, feat], col + start
        start += B
        n_fire += torch.bincount(feat, minlength=n)
        bins = ((val.log10() - lo) / (hi - lo) * HIST_BINS).floor().long().clamp(0, HIST_BINS - 1)
        hist.index_add_(0, feat * HIST_BINS + bins, torch.ones_like(bins))
        _merge_entries(top_vals, [top_rows], feat, val, [row])
        # reservoir by random priority: each firing (feature, row) gets a U(0,1) key; the largest keys are kept
        _merge_entries(key_vals, [smp_vals, smp_rows], feat, torch.rand(val.shape, generator=gen), [val, row])
        n_kept += val.numel()
        if kept is not None and n_kept <= keep_max:
            kept.append((row * n + feat, val))
        elif kept is not None:
            kept = None
    if start == 0:
        raise CrosslayerError(f"store {store.path} has no rows")
    smp_rows = smp_rows.masked_fill(key_vals == -math.inf, -1)
    top_rows = top_rows.masked_fill(top_vals == -math.inf, -1)
    out = {"top_vals": top_vals, "top_rows": top_rows, "n_fire": n_fire, "hist": hist.view(n, HIST_BINS),
           "sample_vals": smp_vals, "sample_rows": smp_rows, "n_rows": start}
    if keep_max > 0:
        out["sparse"] = None
        if kept is not None:
            # nonzero() lists a batch in row-major order and batches come in row order: the keys are sorted already
            keys = torch.cat([key for key, _ in kept]) if kept else torch.zeros(0, dtype=torch.long)
            vals = torch.cat([val for _, val in kept]) if kept else torch.zeros(0)
            out["sparse"] = {"keys": keys, "vals": vals, "n": n}
    return out


def sparse_lookup(sparse: dict, rows_NC: np.ndarray, pos_N) -> np.ndarray:
    """``[N, C]`` float64: the activation of feature position ``pos_N[n]`` at store row ``rows_NC[n, c]`` from the
    ``sparse`` firing activations of :func:`stream_feature_stats` (0 where it does not fire, NaN where the row is -1)."""
    rows_NC = np.asarray(rows_NC, dtype=np.int64)
    keys = torch.as_tensor(rows_NC * sparse["n"] + np.asarray(pos_N, dtype=np.int64)[:, None])
    at = torch.searchsorted(sparse["keys"], keys).clamp(max=max(len(sparse["keys"]) - 1, 0))
    if len(sparse["keys"]) == 0:
        return np.where(rows_NC >= 0, 0.0, np.nan)
    hit = sparse["keys"][at] == keys
    acts = torch.where(hit, sparse["vals"][at].double(), torch.zeros((), dtype=torch.float64)).numpy()
    return np.where(rows_NC >= 0, acts, np.nan)


def focus_text(pieces: list[str], focus: int) -> str:
    """``pieces`` joined into one line: ``pieces[focus]`` marked ``[[...]]`` (:data:`FOCUS_MARK`), newlines
    shown as ``\\n``."""
    marked = [FOCUS_MARK[0] + p + FOCUS_MARK[1] if i == focus else p for i, p in enumerate(pieces)]
    return "".join(marked).replace("\n", "\\n")


def context_text(tokenizer, store, row: int, *, before: int, after: int) -> tuple[str, str, dict]:
    """``(token, one-line context with the token marked, store.context(row))`` of store row ``row``."""
    ctx = store.context(row, before=before, after=after)
    ids, f = ctx["token_ids"], ctx["focus"]
    token = tokenizer.decode(ids[f:f + 1])
    return token, focus_text([tokenizer.decode(ids[:f]), token, tokenizer.decode(ids[f + 1:])], 1), ctx


def context_rows(store, rows, *, before: int, after: int) -> dict[str, np.ndarray]:
    """The token windows around store rows ``rows`` as arrays ``[N, C]`` (``C = before + 1 + after``; column
    ``before`` is the row itself): ``token_ids`` (-1 outside the window), ``store_rows`` (the store row of each
    position, -1 where none is stored), ``window``, ``position``, ``label``, ``doc`` ``[N]``."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    flat_N = store.flat_index(rows)
    window_N, position_N = flat_N // store.seq_len, flat_N % store.seq_len
    pos_NC = position_N[:, None] + np.arange(-before, after + 1)[None]
    inside = (pos_NC >= 0) & (pos_NC < store.seq_len)
    flat_NC = np.where(inside, window_N[:, None] * store.seq_len + pos_NC, -1)
    win = store._window_arrays()
    token_ids = np.where(inside, win["windows"].reshape(-1)[np.clip(flat_NC, 0, None)], -1).astype(np.int64)
    return {"token_ids": token_ids, "store_rows": np.where(inside, store.row_of_flat(flat_NC), -1),
            "window": window_N, "position": position_N,
            "label": win["windows_label"][window_N, position_N].astype(np.int64),
            "doc": win["windows_doc"][window_N, position_N].astype(np.int64)}


@torch.no_grad()
def activations_at(dictionary: Dictionary, store, rows_NC: np.ndarray, features_N, *,
                   batch_size: int = 2048) -> np.ndarray:
    """``[N, C]`` float64: feature ``features_N[n]``'s activation at store row ``rows_NC[n, c]`` (NaN where the
    row is -1). Each distinct row is read and encoded once, ``batch_size`` rows at a time."""
    rows_NC = np.asarray(rows_NC, dtype=np.int64)
    feat_NC = np.broadcast_to(np.asarray(features_N, dtype=np.int64)[:, None], rows_NC.shape)
    out = np.full(rows_NC.shape, np.nan)
    stored = rows_NC >= 0
    unique, inverse = np.unique(rows_NC[stored], return_inverse=True)
    values = np.empty(inverse.shape[0])
    feat_of = feat_NC[stored]
    device = dictionary.norm_factors.device
    for start in range(0, len(unique), batch_size):
        x_BLD = store.get(unique[start:start + batch_size], layers=dictionary.layers, normalized=False)
        feats_BF = dictionary.encode(x_BLD.to(device), normalized=False)
        sel = (inverse >= start) & (inverse < start + batch_size)
        values[sel] = feats_BF[torch.as_tensor(inverse[sel] - start), torch.as_tensor(feat_of[sel])].double().cpu().numpy()
    out[stored] = values
    return out


def _group_rank(*keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal ``keys`` (the arrays are already grouped)."""
    n = len(keys[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = np.any([k[1:] != k[:-1] for k in keys], axis=0)
    starts = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    return np.arange(n) - starts


def pick_examples(s: dict, n_bands: int, per_band: int, seed: int) -> dict[str, np.ndarray]:
    """The top and quantile examples of :func:`stream_feature_stats`'s output ``s``, vectorised over features.

    Quantile examples: each feature's firing sample sorted and cut into ``min(n_bands, n_sample)`` equal-count
    bands (band 0 lowest; the first ``n % bands`` one longer, as ``tensor_split``), ``per_band`` random rows of
    each (seeded), ordered by activation. Returns arrays over examples, grouped by feature (tops first): ``pos``
    (index into the features given), ``kind`` (0 top, 1 quantile), ``band`` (-1 for top), ``rank``, ``row``,
    ``activation``.
    """
    n, k = s["top_rows"].shape
    top_ok = (s["top_rows"] >= 0).numpy()
    top = {"pos": np.broadcast_to(np.arange(n)[:, None], (n, k))[top_ok], "kind": np.zeros(top_ok.sum(), np.int64),
           "band": np.full(top_ok.sum(), -1), "rank": np.broadcast_to(np.arange(k)[None], (n, k))[top_ok],
           "row": s["top_rows"].numpy()[top_ok], "activation": s["top_vals"].double().numpy()[top_ok]}
    vals, rows = s["sample_vals"], s["sample_rows"]
    S = rows.shape[1]
    m = (rows >= 0).sum(1, keepdim=True)
    order = torch.where(rows >= 0, vals, torch.full_like(vals, math.inf)).argsort(dim=1, stable=True)
    vals, rows = vals.gather(1, order), rows.gather(1, order)
    nb = m.clamp(max=n_bands).clamp_min(1)
    q, r = m // nb, m % nb
    pos = torch.arange(S)[None]
    band = torch.where(pos < r * (q + 1), pos // (q + 1), r + (pos - r * (q + 1)) // q.clamp_min(1))
    key = torch.rand(n, S, generator=torch.Generator().manual_seed(seed))
    inside = pos < m
    pick = torch.where(inside, band * 2 + 1 - key, torch.full_like(key, math.inf)).argsort(dim=1)
    band = band.gather(1, pick)
    start = band * q + torch.minimum(band, r)
    chosen = ((pos - start) < per_band) & inside
    rows, vals = rows.gather(1, pick)[chosen].numpy(), vals.gather(1, pick)[chosen].double().numpy()
    feat = np.broadcast_to(np.arange(n)[:, None], (n, S))[chosen.numpy()]
    band = band[chosen].numpy()
    o = np.lexsort((-vals, band, feat))
    quant = {"pos": feat[o], "kind": np.ones(len(o), np.int64), "band": band[o], "row": rows[o], "activation": vals[o]}
    quant["rank"] = _group_rank(quant["pos"], quant["band"])
    both = {key: np.concatenate([top[key], quant[key]]) for key in top}
    o = np.lexsort((both["kind"], both["pos"]))  # stable: keeps the rank order inside each (feature, kind)
    return {key: value[o] for key, value in both.items()}


def example_contexts(dictionary: Dictionary, store, features: np.ndarray, rows: np.ndarray, *, before: int,
                     after: int, batch_size: int = 2048, sparse: dict | None = None,
                     positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`context_rows` of the examples at ``rows`` plus ``acts`` ``[N, C]``: feature ``features[n]``'s
    activation on each context token (NaN where no row is stored); looked up in ``sparse`` (with the features'
    ``positions`` in it) when given, else the context rows are encoded again (:func:`activations_at`)."""
    ctx = context_rows(store, rows, before=before, after=after)
    ctx["acts"] = (sparse_lookup(sparse, ctx["store_rows"], positions) if sparse is not None else
                   activations_at(dictionary, store, ctx["store_rows"], features, batch_size=batch_size))
    return ctx


def _examples_table(dictionary: Dictionary, store, feats: list[int], picks: dict, tokenizer, before: int, after: int):
    import pandas as pd

    features = np.asarray(feats, dtype=np.int64)[picks["pos"]]
    ctx = example_contexts(dictionary, store, features, picks["row"], before=before, after=after)
    records, labels, docs = [], store.label_names, store.doc_keys
    for n, f in enumerate(features.tolist()):
        keep = ctx["token_ids"][n] >= 0
        ids, acts = ctx["token_ids"][n][keep].tolist(), ctx["acts"][n][keep].tolist()
        focus = before - int((~keep[:before]).sum())
        pieces = [tokenizer.decode([t]) for t in ids]
        records.append({"feature": f, "kind": ("top", "quantile")[picks["kind"][n]], "band": int(picks["band"][n]),
                        "rank": int(picks["rank"][n]), "row": int(picks["row"][n]),
                        "activation": float(picks["activation"][n]), "token_id": ids[focus], "token": pieces[focus],
                        "context": focus_text([tokenizer.decode(ids[:focus]), pieces[focus],
                                               tokenizer.decode(ids[focus + 1:])], 1),
                        "label": labels[int(ctx["label"][n])], "doc": docs[int(ctx["doc"][n])],
                        "position": int(ctx["position"][n]), "focus": focus, "context_tokens": pieces,
                        "context_acts": acts})
    return pd.DataFrame.from_records(records, columns=["feature", "kind", "band", "rank", "row", "activation",
                                                       "token_id", "token", "context", "label", "doc", "position",
                                                       "focus", "context_tokens", "context_acts"])


def _stats_tables(feats: list[int], s: dict):
    """(per-feature stats, histogram) tables of :func:`stream_feature_stats`'s output."""
    import pandas as pd

    n_rows = s["n_rows"]
    stats = pd.DataFrame({"feature": feats, "n_rows": n_rows, "n_fire": s["n_fire"].numpy(),
                          "density": s["n_fire"].numpy() / n_rows,
                          "max": [float(v[0]) if r[0] >= 0 else 0.0 for v, r in zip(s["top_vals"], s["top_rows"])],
                          "mean_nonzero": [float(v[r >= 0].mean()) if (r >= 0).any() else 0.0
                                           for v, r in zip(s["sample_vals"], s["sample_rows"])]})
    lo, hi = HIST_LOG10_RANGE
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    histogram = pd.DataFrame([{"feature": f, "bin": b, "log10_lo": edges[b], "log10_hi": edges[b + 1],
                               "count": int(s["hist"][i, b])} for i, f in enumerate(feats) for b in range(HIST_BINS)])
    return stats, histogram


def top_activations(dictionary: Dictionary, store, features: list[int], *, k: int = 20, n_bands: int = 4,
                    per_band: int = 3, sample: int = 256, batch_size: int = 1024, tokenizer=None,
                    before: int = 16, after: int = 4, seed: int = 0) -> FeatureActivations:
    """Top-``k`` activating rows, quantile examples, density and histogram of ``features`` over ``store``.

    Streaming (see the module docstring); quantile examples: the firing sample is sorted and cut into
    ``n_bands`` equal-count bands (band 0 lowest), ``per_band`` random rows from each.
    """
    if k < 1 or sample < 1 or n_bands < 1 or per_band < 0:
        raise CrosslayerError(f"need k, sample, n_bands >= 1 and per_band >= 0; got {k}, {sample}, {n_bands}, {per_band}")
    feats = check_features(dictionary, features)
    s = stream_feature_stats(dictionary, store, feats, k=k, sample=sample, batch_size=batch_size, seed=seed)
    if tokenizer is None:
        from crosslayer.models import load_tokenizer

        tokenizer = load_tokenizer()
    examples = _examples_table(dictionary, store, feats, pick_examples(s, n_bands, per_band, seed), tokenizer,
                               before, after)
    return FeatureActivations(examples, *_stats_tables(feats, s))


# ----------------------------------------------------------------------------- logit effects

def _top_effects(W_CD: Tensor, W_U: Tensor, W_U_low: Tensor | None, k: int) -> tuple:
    """(up values, up ids, down values, down ids) ``[C, k]`` of ``W_CD @ W_U``. With ``W_U_low`` (``W_U``'s
    transpose ``[vocab, d]`` in bfloat16, where its matmul is fast) that product only screens ``8 k`` candidates per
    side, whose effects are then computed exactly in float32 from ``W_U``, so the result is the float32 one unless a
    true top-k token ranks below 8k in bfloat16."""
    if W_U_low is None:
        effect_CV = W_CD @ W_U
        up, down = effect_CV.topk(k, dim=1), (-effect_CV).topk(k, dim=1)
        return up.values, up.indices, -down.values, down.indices
    rough_CV = W_CD.to(W_U_low.dtype) @ W_U_low.T
    out = []
    for sign in (1.0, -1.0):
        cand_CM = (rough_CV if sign > 0 else -rough_CV).topk(min(8 * k, rough_CV.shape[1]), dim=1).indices
        exact_CM = torch.einsum("cd,cmd->cm", W_CD, W_U.T[cand_CM])
        vals, pos = (sign * exact_CM).topk(k, dim=1)
        out += [sign * vals, cand_CM.gather(1, pos)]
    return tuple(out)


@torch.no_grad()
def logit_effect_arrays(dictionary: Dictionary, model, features: list[int], where_FL: Tensor, *, k: int = 10,
                        through_norm: bool = True, chunk: int = 512) -> dict[str, Tensor]:
    """The ``k`` tokens each of ``features`` pushes up / down most at each layer where ``where_FL`` ``[n, L]``
    is True (module docstring, step 2), in blocks of ``chunk`` features (one ``[chunk, vocab]`` product at a time;
    screened in bfloat16 where that is fast, :func:`_top_effects`).

    Returns ``up_ids``/``up_vals``/``down_ids``/``down_vals`` ``[n, L, k]`` (ids -1 and values NaN elsewhere;
    ``down_vals`` are the (negative) effects themselves).
    """
    from crosslayer.models import fast_bfloat16

    feats = check_features(dictionary, features)
    check_compatible(dictionary, model)
    W_U = unembed_matrix(model, through_norm)
    W_U_low = W_U.T.contiguous().to(torch.bfloat16) if fast_bfloat16() else None
    W_U = W_U.T.contiguous().T  # [d, vocab] with contiguous token rows: the candidates' columns gather fast
    n, L = len(feats), dictionary.n_layers
    k = min(k, W_U.shape[1])
    out = {name: torch.full((n, L, k), -1 if name.endswith("ids") else math.nan,
                            dtype=torch.long if name.endswith("ids") else torch.float32)
           for name in ("up_ids", "up_vals", "down_ids", "down_vals")}
    idx = torch.tensor(feats)
    for i, layer in enumerate(dictionary.layers):
        todo = where_FL[:, i].nonzero().squeeze(1)
        W_FD = dictionary.decoder_vectors(layer, normalized=False)
        for part in todo.split(chunk):
            (out["up_vals"][part, i], out["up_ids"][part, i], out["down_vals"][part, i],
             out["down_ids"][part, i]) = _top_effects(W_FD[idx[part]], W_U, W_U_low, k)
    return out


@torch.no_grad()
def logit_effects(dictionary: Dictionary, model, feature: int, *, k: int = 10, layer: int | None = None,
                  through_norm: bool = True, tokenizer=None) -> "pd.DataFrame":  # noqa: F821
    """Tokens pushed up / down most by ``feature``'s raw decoder direction at each layer it writes.

    ``layer=None``: every dictionary layer the feature writes (``writes_FL``: a per-layer SAE feature,
    its own layer; a crosscoder feature, each layer of its variant; the last flagged ``is_last``). Columns:
    feature, layer, is_last, direction ("up" | "down"), rank, token_id, token, effect (logit change per
    unit activation, before the final norm's 1/rms scale).
    """
    import pandas as pd

    (feature,) = check_features(dictionary, [feature])
    check_compatible(dictionary, model)
    tokenizer = tokenizer or model.tokenizer
    writes_L = dictionary.writes_FL()[feature]
    written = [i for i in range(dictionary.n_layers) if writes_L[i]]
    indices = [dictionary.layer_index(layer)] if layer is not None else written
    where = torch.zeros(1, dictionary.n_layers, dtype=torch.bool)
    where[0, indices] = True
    eff = logit_effect_arrays(dictionary, model, [feature], where, k=k, through_norm=through_norm)
    last = max(written, default=-1)
    records = []
    for i in indices:
        for direction in ("up", "down"):
            ids, vals = eff[f"{direction}_ids"][0, i].tolist(), eff[f"{direction}_vals"][0, i].tolist()
            for rank, (t, v) in enumerate(zip(ids, vals)):
                records.append({"feature": feature, "layer": dictionary.layers[i], "is_last": i == last,
                                "direction": direction, "rank": rank, "token_id": t,
                                "token": tokenizer.decode([t]), "effect": v})
    return pd.DataFrame.from_records(records, columns=["feature", "layer", "is_last", "direction", "rank",
                                                       "token_id", "token", "effect"])


@torch.no_grad()
def find_features_for_token(dictionary: Dictionary, model, token: str, *, top: int = 10,
                            through_norm: bool = True) -> "pd.DataFrame":  # noqa: F821
    """Features whose raw decoder direction most raises ``token``'s logit (best layer per feature).

    ``token`` must encode to one token (e.g. " scam"). Columns: rank, feature, layer, effect,
    cosine (decoder direction vs the token's gain-scaled unembedding column).
    """
    import pandas as pd

    check_compatible(dictionary, model)
    ids = model.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise CrosslayerError(f"{token!r} is {len(ids)} tokens ({ids}); give a string that is exactly one token")
    u_D = unembed_matrix(model, through_norm)[:, ids[0]]
    W_LFD = [dictionary.decoder_vectors(l, normalized=False) for l in dictionary.layers]
    effect_LF = torch.stack([W_FD @ u_D for W_FD in W_LFD])
    best_F, layer_F = effect_LF.max(dim=0)
    vals, feats = best_F.topk(min(top, dictionary.n_features))
    records = []
    for rank, (v, f) in enumerate(zip(vals.tolist(), feats.tolist())):
        i = int(layer_F[f])
        d_D = W_LFD[i][f]
        cos = float(d_D @ u_D / (d_D.norm() * u_D.norm()).clamp_min(1e-12))
        records.append({"rank": rank, "feature": f, "layer": dictionary.layers[i], "effect": v, "cosine": cos})
    return pd.DataFrame.from_records(records, columns=["rank", "feature", "layer", "effect", "cosine"])


# ----------------------------------------------------------------------------- decoder profile

@torch.no_grad()
def profile_stats(norms_FL, *, tau: float = 0.1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(peak_norm_F, peak_F, r_FL, span_F, entropy_F)`` of per-layer decoder norms ``[..., F, L]`` (a tensor or
    array, any leading dimensions, e.g. training snapshots ``[S, F, L]``; computed in float32): r = norm / its row's
    largest, peak = the layer index of that largest, span = #{l : r_l > tau}, entropy = of r normalised to sum 1,
    divided by log L (1 = flat, 0 = one layer). The one implementation behind :func:`decoder_profile`."""
    norms_FL = torch.as_tensor(norms_FL).float()
    L = norms_FL.shape[-1]
    peak_norm_F, peak_F = norms_FL.max(dim=-1)
    r_FL = norms_FL / peak_norm_F.clamp_min(1e-12)[..., None]
    p_FL = r_FL / r_FL.sum(-1, keepdim=True).clamp_min(1e-12)
    ent_F = -(p_FL * p_FL.clamp_min(1e-30).log()).sum(-1) / (math.log(L) if L > 1 else 1.0)
    return peak_norm_F, peak_F, r_FL, (r_FL > tau).sum(-1), ent_F


def decoder_profile(dictionary: Dictionary, *, tau: float = 0.1, features: list[int] | None = None) -> "pd.DataFrame":  # noqa: F821
    """Per-feature decoder-norm profile across layers (see the module docstring, step 3).

    Columns: feature, peak_layer, peak_norm, span, entropy, drift_mean, drift_min, and ``r_<layer>``
    for each layer. drift_* are over the spanned layers other than the peak (1.0 when there are none).
    """
    import pandas as pd

    feats = check_features(dictionary, features) if features is not None else list(range(dictionary.n_features))
    idx = torch.tensor(feats)
    norms_FL = dictionary.decoder_norms().float().cpu()[idx]
    L = dictionary.n_layers
    peak_norm_F, peak_F, r_FL, span_F, ent_F = profile_stats(norms_FL, tau=tau)
    W_LFD = torch.stack([dictionary.decoder_vectors(l)[idx] for l in dictionary.layers])
    peak_FD = W_LFD[peak_F, torch.arange(len(feats))]
    cos_FL = torch.nn.functional.cosine_similarity(W_LFD, peak_FD[None], dim=-1).T
    other_FL = (r_FL > tau) & (torch.arange(L)[None] != peak_F[:, None])
    n_other = other_FL.sum(1)
    drift_mean = torch.where(n_other > 0, (cos_FL * other_FL).sum(1) / n_other.clamp_min(1), torch.ones(len(feats)))
    drift_min = torch.where(n_other > 0, cos_FL.masked_fill(~other_FL, math.inf).min(1).values, torch.ones(len(feats)))
    table = pd.DataFrame({"feature": feats, "peak_layer": [dictionary.layers[i] for i in peak_F.tolist()],
                          "peak_norm": peak_norm_F.numpy(), "span": span_F.numpy(), "entropy": ent_F.numpy(),
                          "drift_mean": drift_mean.numpy(), "drift_min": drift_min.numpy()})
    for i, l in enumerate(dictionary.layers):
        table[f"r_{l}"] = r_FL[:, i].numpy()
    return table


# ----------------------------------------------------------------------------- dashboard

SHADES = " ░▒▓█"
"""Shading of a token by its activation relative to the example's maximum (blank = not firing)."""


def shade_context(tokens: list[str], acts: list[float], focus: int, scale: float | None = None) -> str:
    """The context as text with each firing token prefixed by a shade (``░▒▓█`` of ``acts / scale``) and
    the example's own token marked ``[[...]]``; tokens without a stored row are left plain."""
    finite = [a for a in acts if a == a]
    scale = scale or (max(finite) if finite and max(finite) > 0 else 1.0)
    parts = []
    for tok, a in zip(tokens, acts):
        if a == a and a > 0:
            tok = SHADES[min(len(SHADES) - 1, 1 + int(a / scale * (len(SHADES) - 1.001)))] + tok
        parts.append(tok)
    return focus_text(parts, focus)


def _bar(x: float, width: int = 30) -> str:
    n = int(round(max(0.0, min(1.0, x)) * width))
    return "#" * n + "." * (width - n)


def dashboard(dictionary: Dictionary, store, model, feature: int, *, k: int = 10, n_logits: int = 8,
              batch_size: int = 1024, tokenizer=None) -> str:
    """A text dashboard of one feature: density + histogram, top and quantile examples, logit effects,
    decoder profile."""
    (feature,) = check_features(dictionary, [feature])
    check_compatible(dictionary, store)
    check_compatible(dictionary, model)
    tokenizer = tokenizer or model.tokenizer
    acts = top_activations(dictionary, store, [feature], k=k, batch_size=batch_size, tokenizer=tokenizer)
    st = acts.stats.iloc[0]
    prof = decoder_profile(dictionary, features=[feature]).iloc[0]
    out = [f"feature {feature} of {dictionary!r}",
           f"density {st.density:.4%} ({int(st.n_fire):,} of {int(st.n_rows):,} rows), max {st['max']:.4g}, "
           f"mean when firing {st.mean_nonzero:.4g}", "", "activation histogram (log10 bins, non-zero only):"]
    hist = acts.histogram[acts.histogram["count"] > 0]
    peak = max(1, int(hist["count"].max())) if len(hist) else 1
    for h in hist.itertuples():
        out.append(f"  [{10 ** h.log10_lo:9.3g}, {10 ** h.log10_hi:9.3g})  {_bar(h.count / peak)} {h.count}")
    scale = float(st["max"]) or None
    out += ["", f"top activations (tokens shaded {SHADES[1:]} by activation / max, example token in [[ ]]):"]
    for e in acts.examples[acts.examples.kind == "top"].itertuples():
        out.append(f"  {e.activation:8.3f}  [{e.label}] {shade_context(e.context_tokens, e.context_acts, e.focus, scale)}")
    out += ["", "quantile examples (band 0 = weakest):"]
    for e in acts.examples[acts.examples.kind == "quantile"].itertuples():
        out.append(f"  band {e.band} {e.activation:8.3f}  [{e.label}] "
                   f"{shade_context(e.context_tokens, e.context_acts, e.focus, scale)}")
    effects = logit_effects(dictionary, model, feature, k=n_logits, tokenizer=tokenizer)
    for layer, grp in effects.groupby("layer", sort=True):
        tag = " (last)" if grp.is_last.iloc[0] else ""
        for direction in ("up", "down"):
            toks = ", ".join(f"{t!r} {v:+.3g}" for t, v in zip(grp[grp.direction == direction].token,
                                                                grp[grp.direction == direction].effect))
            out.append(f"logits {direction:>4} @ layer {layer}{tag}: {toks}")
    out += ["", f"decoder profile: peak layer {int(prof.peak_layer)}, span {int(prof.span)}, entropy {prof.entropy:.3f}, "
                f"drift mean {prof.drift_mean:.3f} / min {prof.drift_min:.3f}"]
    for l in dictionary.layers:
        out.append(f"  layer {l:>3}  {_bar(prof[f'r_{l}'])} {prof[f'r_{l}']:.3f}")
    return "\n".join(out)
