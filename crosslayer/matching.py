"""Matching dictionary features by decoder cosine: SAE latents across layers, and multi-layer features to them.

The residual stream keeps one basis across layers and the per-layer normalisation is a scalar, so
decoder cosines across layers and across dictionaries of the same hooks are meaningful.

1. :func:`layer_blocks`: a single-layer dictionary's latents per layer (the features that write that layer,
   ``writes_FL``), as unit decoder rows ``[W_l, d]`` and their global feature indices.
2. :func:`match_adjacent`: latents of adjacent layers l, l+1 matched one-to-one maximising the summed cosine
   (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`; SAE Match, Balagansky et al. 2024).
   :func:`build_chains` joins links with cosine > tau into chains (the same feature learnt again at each layer).
3. :func:`sae_per_crosscoder`: for each multi-layer feature and each layer it spans, the live latents of that
   layer with cosine > tau (count, best cosine, best latent).
4. :func:`top_matches`: for the browser, both directions at once from one cosine matrix per layer: each
   multi-layer feature's ``k`` best latents at every layer, and each latent's ``k`` best multi-layer features
   (the features that absorb it), computed in blocks of features (bounded memory).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def unit(W: Tensor) -> Tensor:
    return torch.nn.functional.normalize(W.float(), dim=-1)


def decoders(dictionary) -> Tensor:
    """Every feature's decoder at every layer ``[F, L, d]`` (normalised units)."""
    return torch.stack([dictionary.decoder_vectors(l) for l in dictionary.layers], dim=1)


def is_single_layer(dictionary) -> bool:
    """True when every feature writes exactly one layer (per-layer SAEs and any kind shaped like them)."""
    return bool((dictionary.writes_FL().sum(1) == 1).all())


def layer_blocks(dictionary) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's latents: their decoder rows ``[W_l, d]`` (normalised units, unit norm) and their
    indices among all the dictionary's features (the features that write that layer)."""
    writes_FL = dictionary.writes_FL()
    index = [writes_FL[:, i].nonzero().squeeze(1) for i in range(dictionary.n_layers)]
    return [unit(dictionary.decoder_vectors(l)[idx]) for l, idx in zip(dictionary.layers, index)], index


sae_blocks = layer_blocks
"""The name the cross-layer superposition study uses."""


def match_adjacent(a_WD: Tensor, b_VD: Tensor, *, live_a: Tensor | None = None,
                   live_b: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of rows of ``a`` to rows of ``b`` maximising the summed cosine (Hungarian).

    Returns ``match [W]`` (index into ``b``, -1 for unmatched or dead rows) and its cosine ``[W]``
    (NaN where unmatched). Dead rows (``live_* False``) take part in no match.
    """
    from scipy.optimize import linear_sum_assignment

    cos = (unit(a_WD) @ unit(b_VD).T).double()
    if live_a is not None:
        cos[~live_a] = -2.0
    if live_b is not None:
        cos[:, ~live_b] = -2.0
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    match = np.full(a_WD.shape[0], -1)
    value = np.full(a_WD.shape[0], np.nan)
    ok = cos.numpy()[rows, cols] > -2.0
    match[rows[ok]], value[rows[ok]] = cols[ok], cos.numpy()[rows[ok], cols[ok]]
    return match, value


def build_chains(matches: list[np.ndarray], cosines: list[np.ndarray], widths: list[int],
                 tau: float) -> np.ndarray:
    """Chain id of every latent (concatenated over layers ``[sum W_l]``) given adjacent-layer matches.

    Latent i of layer l and ``matches[l][i]`` of layer l+1 share a chain when their cosine > ``tau``.
    Matches are one-to-one, so a chain is a path of latents at consecutive layers.
    """
    ids = [np.arange(widths[0])]
    next_id = widths[0]
    for l, (match, cos) in enumerate(zip(matches, cosines)):
        cur = np.full(widths[l + 1], -1)
        link = (match >= 0) & (np.nan_to_num(cos, nan=-2.0) > tau)
        cur[match[link]] = ids[l][link]
        new = cur < 0
        cur[new] = next_id + np.arange(int(new.sum()))
        next_id += int(new.sum())
        ids.append(cur)
    return np.concatenate(ids)


def chance_cosine(a_WD: Tensor, *, seed: int = 12345, q: float = 0.99) -> float:
    """The ``q`` quantile of Hungarian-matched cosines between ``a`` and as many random directions."""
    gen = torch.Generator().manual_seed(seed)
    _, value = match_adjacent(a_WD, torch.randn(a_WD.shape, generator=gen))
    return float(np.nanquantile(value, q))


@torch.no_grad()
def sae_per_crosscoder(cc_FLD: Tensor, span_FL: Tensor, blocks: list[Tensor], live_blocks: list[Tensor],
                       tau: float) -> dict[str, Tensor]:
    """For each crosscoder feature (decoders ``[F, L, d]``) and each layer in ``span_FL``, the live SAE
    latents of that layer (``blocks[l]`` ``[W_l, d]``) with decoder cosine > ``tau``.

    Returns ``count_FL`` (matches per spanned layer, 0 elsewhere), ``best_FL`` (best cosine, NaN off
    the span) and ``arg_FL`` (best latent, -1 off the span).
    """
    counts, bests, args = [], [], []
    for l, (W, live) in enumerate(zip(blocks, live_blocks)):
        cos_FW = (unit(cc_FLD[:, l]) @ W.T).masked_fill(~live[None], -2.0)
        best, arg = cos_FW.max(dim=1)
        counts.append((cos_FW > tau).sum(1) * span_FL[:, l])
        bests.append(best.masked_fill(~span_FL[:, l], float("nan")))
        args.append(arg.masked_fill(~span_FL[:, l], -1))
    return {"count_FL": torch.stack(counts, 1), "best_FL": torch.stack(bests, 1), "arg_FL": torch.stack(args, 1)}


@torch.no_grad()
def top_matches(multi_FD: Tensor, block_WD: Tensor, k: int, *, chunk: int = 4096) -> dict[str, Tensor]:
    """Both directions of the cosine matrix between ``multi_FD`` (one layer's decoders of a multi-layer
    dictionary) and ``block_WD`` (a single-layer dictionary's latents at that layer), in blocks of ``chunk``
    rows of ``multi``: ``fwd_cos``/``fwd_idx`` ``[F, k]`` (each feature's best latents, into ``block``) and
    ``back_cos``/``back_idx`` ``[W, k]`` (each latent's best features, into ``multi``). Zero rows give cosine 0."""
    k_f, k_b = min(k, block_WD.shape[0]), min(k, multi_FD.shape[0])
    B = unit(block_WD)
    fwd_cos, fwd_idx = [], []
    back_cos = torch.full((B.shape[0], k_b), -2.0)
    back_idx = torch.full((B.shape[0], k_b), -1, dtype=torch.long)
    for start in range(0, multi_FD.shape[0], chunk):
        cos_CW = unit(multi_FD[start:start + chunk]) @ B.T
        vals, idx = cos_CW.topk(k_f, dim=1)
        fwd_cos.append(vals)
        fwd_idx.append(idx)
        vals_WK, idx_WK = cos_CW.T.topk(min(k_b, cos_CW.shape[0]), dim=1)
        merged, pos = torch.cat([back_cos, vals_WK], 1).topk(k_b, dim=1)
        back_idx = torch.cat([back_idx, idx_WK + start], 1).gather(1, pos)
        back_cos = merged
    return {"fwd_cos": torch.cat(fwd_cos), "fwd_idx": torch.cat(fwd_idx), "back_cos": back_cos,
            "back_idx": back_idx}
