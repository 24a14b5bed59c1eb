"""Synthetic multi-layer activations with known features, and how well a dictionary recovers them.

Generation (toy models of superposition, Elhage et al. 2022, extended across layers as in the
crosslayer-features picture of Lindsey et al. 2024, research-notes §3):
1. G ground-truth features, more than d (superposition). Feature g fires independently on each
   token with probability p_g = max_freq * (1 + rank_g)^(-freq_exponent) (a power law over a
   random ranking), with magnitude m ~ Uniform(0.5, 1.5).
2. A fraction ``frac_multi`` of the features span s >= 2 contiguous layers (s uniform in
   2..max_span, start uniform), the rest live at one layer. Over its span a feature's magnitude
   profile is decay^|l - peak| (peak uniform in the span); 0 elsewhere.
3. Directions are unit vectors; along a span they drift: u^{l+1} = normalise(sqrt(1 - drift^2) u^l
   + drift r) with r a random unit vector orthogonal to u^l (cos(u^l, u^{l+1}) = sqrt(1 - drift^2)).
4. a^l = sum_g m_g profile_g^l u_g^l + noise * N(0, I) / sqrt(d); with ``normalize`` each layer is
   then scaled to mean norm sqrt(d) (as the activation store serves it) and the directions stay unit.

Harder ground truth (options; at their defaults the data above are unchanged):
- heavier superposition: ``n_features`` well above ``d_model`` (8x and more);
- ``layer_coupling`` < 1: a feature's magnitude at each layer of its span is scaled by
  ``c + (1 - c) U(0, 2)``, independently per (token, layer), so its layers merely co-occur instead
  of moving together (c = 1: one rank-1 vector across layers, the crosscoder's own model);
- ``frac_weak``: that fraction of features spans every layer with a flat profile ``weak_scale``,
  weaker at each layer than the others' peaks but present everywhere (where crosscoders should win);
- ``n_parents`` x ``n_children``: hierarchical features; a child fires only when its parent fires,
  then with probability ``child_prob`` (the setting of feature-absorption studies).

Recovery (research-notes §4, "seed consistency / recovery"): for each ground-truth feature g and
layer l where it is present, max_j cos(u_g^l, W_dec,j^l) over dictionary features j (features
with zero decoder at l count as cos 0); a feature's score is the mean over its layers; MMCS is the
mean over features. ``n_latents`` is the number of distinct best-matching latents over a feature's
layers: 1 for a crosscoder that learned it as one feature, its span for per-layer SAEs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from crosslayer.errors import CrosslayerError


@dataclass
class SyntheticTruth:
    """The ground truth behind :func:`make_synthetic` data."""

    directions_GLD: Tensor
    """Unit direction of feature g at layer l ``[G, L, d]`` (zero where absent)."""
    profiles_GL: Tensor
    """Magnitude profile ``[G, L]`` (peak 1, 0 outside the span)."""
    frequencies_G: Tensor
    """Firing probability per token ``[G]``."""
    spans_G2: Tensor
    """First and last layer (inclusive) of each feature ``[G, 2]``."""
    parent_G: Tensor | None = None
    """Parent feature of each feature (-1: none) ``[G]``: a child fires only when its parent does."""
    weak_G: Tensor | None = None
    """Whether each feature is a weak, all-layer one ``[G]``."""

    @property
    def span_len_G(self) -> Tensor:
        return self.spans_G2[:, 1] - self.spans_G2[:, 0] + 1


def make_synthetic(n_layers: int, d_model: int, n_features: int, n_tokens: int, *, seed: int = 0,
                   frac_multi: float = 0.5, max_span: int | None = None, drift: float = 0.3, decay: float = 0.7,
                   max_freq: float = 0.1, freq_exponent: float = 0.5, noise: float = 0.05,
                   normalize: bool = True, layer_coupling: float = 1.0, frac_weak: float = 0.0,
                   weak_scale: float = 0.3, n_parents: int = 0, n_children: int = 3, child_prob: float = 0.3,
                   return_fires: bool = False, chunk: int = 16384):
    """Generate ``n_tokens`` rows ``[N, L, d]`` and their :class:`SyntheticTruth` (module docstring); with
    ``return_fires`` also the ``[N, G]`` boolean firing matrix. The harder options (module docstring,
    "Harder ground truth") draw from a second generator, so at their defaults the data are unchanged."""
    L, d, G = n_layers, d_model, n_features
    max_span = L if max_span is None else max_span
    _check_options(L, d, G, n_tokens, frac_multi, max_span, drift, decay, max_freq, layer_coupling, frac_weak,
                   weak_scale, n_parents, n_children, child_prob)
    gen, extra = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 7919)
    multi_G = torch.rand(G, generator=gen) < frac_multi
    span_G = torch.where(multi_G, torch.randint(2, max_span + 1, (G,), generator=gen), torch.ones(G, dtype=torch.long))
    start_G = (torch.rand(G, generator=gen) * (L - span_G + 1)).long()
    peak_G = start_G + (torch.rand(G, generator=gen) * span_G).long()
    weak_G = torch.rand(G, generator=extra) < frac_weak if frac_weak > 0 else torch.zeros(G, dtype=torch.bool)
    span_G, start_G = torch.where(weak_G, L, span_G), torch.where(weak_G, 0, start_G)
    layer_L = torch.arange(L)
    inside_GL = (layer_L >= start_G[:, None]) & (layer_L < (start_G + span_G)[:, None])
    profiles_GL = decay ** (layer_L[None] - peak_G[:, None]).abs().float() * inside_GL
    profiles_GL = torch.where(weak_G[:, None], weak_scale * inside_GL.float(), profiles_GL)
    directions_GLD = _drifting_directions(G, L, d, drift, gen) * inside_GL[..., None]
    rank_G = torch.randperm(G, generator=gen)
    freq_G = max_freq * (1.0 + rank_G.float()) ** (-freq_exponent)
    parent_G = _hierarchy(G, n_parents, n_children, extra)
    child_G = parent_G >= 0
    freq_G = torch.where(child_G, child_prob * freq_G[parent_G.clamp_min(0)], freq_G)
    write_GLD = directions_GLD * profiles_GL[..., None]
    parts, fires = [], []
    for begin in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - begin)
        fires_NG = torch.rand(n, G, generator=gen) < freq_G.where(~child_G, torch.ones(()))
        mag_NG = fires_NG * (0.5 + torch.rand(n, G, generator=gen))
        if child_G.any():  # a child fires only with its parent, then with probability child_prob
            fires_NG[:, child_G] = fires_NG[:, parent_G[child_G]] & (torch.rand(n, int(child_G.sum()), generator=extra)
                                                                    < child_prob)
            mag_NG = fires_NG * mag_NG.where(fires_NG, 0.5 + torch.rand(n, G, generator=extra))
        acts = _write(mag_NG, write_GLD, layer_coupling, extra)
        parts.append(acts + noise * torch.randn(n, L, d, generator=gen) / d ** 0.5)
        fires.append(fires_NG) if return_fires else None
    acts_NLD = torch.cat(parts)
    if normalize:
        acts_NLD = acts_NLD * (d ** 0.5 / acts_NLD.norm(dim=-1).mean(0).clamp_min(1e-12))[None, :, None]
    spans_G2 = torch.stack([start_G, start_G + span_G - 1], dim=1)
    truth = SyntheticTruth(directions_GLD, profiles_GL, freq_G, spans_G2, parent_G, weak_G)
    return (acts_NLD, truth, torch.cat(fires)) if return_fires else (acts_NLD, truth)


def _check_options(L, d, G, n_tokens, frac_multi, max_span, drift, decay, max_freq, layer_coupling, frac_weak,
                   weak_scale, n_parents, n_children, child_prob) -> None:
    if L < 1 or d < 1 or G < 1 or n_tokens < 1:
        raise CrosslayerError(f"need positive sizes, got n_layers={L}, d_model={d}, n_features={G}, "
                              f"n_tokens={n_tokens}")
    if not (0 <= frac_multi <= 1 and 0 <= drift <= 1 and 0 < decay <= 1 and 0 < max_freq <= 1):
        raise CrosslayerError("need 0 <= frac_multi, drift <= 1 and 0 < decay, max_freq <= 1")
    if frac_multi > 0 and not 2 <= max_span <= L:
        raise CrosslayerError(f"multi-layer features need 2 <= max_span <= n_layers ({L}), got {max_span}")
    if not (0 <= layer_coupling <= 1 and 0 <= frac_weak <= 1 and weak_scale > 0 and 0 < child_prob <= 1):
        raise CrosslayerError("need 0 <= layer_coupling, frac_weak <= 1, weak_scale > 0 and 0 < child_prob <= 1")
    if n_parents < 0 or n_children < 1 or n_parents * (1 + n_children) > G:
        raise CrosslayerError(f"{n_parents} parents with {n_children} children each need "
                              f"{n_parents * (1 + n_children)} features, more than n_features={G}")


def _drifting_directions(G: int, L: int, d: int, drift: float, gen: torch.Generator) -> Tensor:
    """``[G, L, d]`` unit directions drifting layer to layer (step 3 of the module docstring)."""
    dirs = [torch.nn.functional.normalize(torch.randn(G, d, generator=gen), dim=-1)]
    for _ in range(L - 1):  # L is small; vectorised over features
        u = dirs[-1]
        r = torch.randn(G, d, generator=gen)
        r = torch.nn.functional.normalize(r - (r * u).sum(-1, keepdim=True) * u, dim=-1)
        dirs.append(torch.nn.functional.normalize((1 - drift ** 2) ** 0.5 * u + drift * r, dim=-1))
    return torch.stack(dirs, dim=1)


def _hierarchy(G: int, n_parents: int, n_children: int, gen: torch.Generator) -> Tensor:
    """``[G]`` parent index of each feature (-1: none): ``n_parents`` random features with ``n_children``
    random children each."""
    parent_G = torch.full((G,), -1, dtype=torch.long)
    if n_parents:
        order = torch.randperm(G, generator=gen)
        parents, children = order[:n_parents], order[n_parents:n_parents * (1 + n_children)]
        parent_G[children] = parents.repeat_interleave(n_children)
    return parent_G


def _write(mag_NG: Tensor, write_GLD: Tensor, coupling: float, gen: torch.Generator) -> Tensor:
    """``[N, L, d]`` activations: each firing feature writes its magnitude times its profile and direction;
    below ``coupling`` 1 each layer's magnitude is scaled by ``coupling + (1 - coupling) * U(0, 2)``,
    drawn independently per (token, feature, layer)."""
    G, L, d = write_GLD.shape
    if coupling == 1.0:
        return (mag_NG @ write_GLD.reshape(G, -1)).reshape(-1, L, d)
    return torch.stack([(mag_NG * (coupling + (1 - coupling) * 2 * torch.rand(mag_NG.shape, generator=gen)))
                        @ write_GLD[:, l] for l in range(L)], dim=1)


@torch.no_grad()
def recovery(decoder_FLD: Float[Tensor, "feat layer d_model"], truth: SyntheticTruth):
    """Per ground-truth feature: max cosine per layer with any dictionary feature, its mean, and n_latents.

    Returns a DataFrame with one row per truth feature: ``feature, start, span, frequency,
    mean_max_cos, min_max_cos, n_latents``, ``max_cos_l<i>`` per layer (NaN where absent) and ``latent_l<i>``, the
    best-matching dictionary feature per layer (-1 where absent).
    """
    import pandas as pd

    G, L, d = truth.directions_GLD.shape
    if decoder_FLD.ndim != 3 or tuple(decoder_FLD.shape[1:]) != (L, d):
        raise CrosslayerError(f"decoder must be [F, {L}, {d}] to match the truth, got {list(decoder_FLD.shape)}")
    dec_FLD = torch.nn.functional.normalize(decoder_FLD.detach().float().cpu(), dim=-1)
    cos_GLF = torch.einsum("gld,fld->glf", truth.directions_GLD, dec_FLD)
    best_GL, arg_GL = cos_GLF.max(dim=-1)
    present_GL = truth.profiles_GL > 0
    best_GL = best_GL.masked_fill(~present_GL, float("nan"))
    arg_GL = arg_GL.masked_fill(~present_GL, -1)
    sorted_GL = arg_GL.sort(dim=1).values  # -1 (absent) first; count distinct latents after it
    new_GL = (sorted_GL[:, 1:] != sorted_GL[:, :-1]) & (sorted_GL[:, 1:] >= 0)
    n_latents_G = (sorted_GL[:, :1] >= 0).sum(1) + new_GL.sum(1)
    table = pd.DataFrame({"feature": range(G), "start": truth.spans_G2[:, 0].tolist(),
                          "span": truth.span_len_G.tolist(), "frequency": truth.frequencies_G.tolist(),
                          "mean_max_cos": best_GL.nanmean(dim=1).tolist(),
                          "min_max_cos": best_GL.nan_to_num(2.0).min(dim=1).values.tolist(),
                          "n_latents": n_latents_G.tolist()})
    for l in range(L):
        table[f"max_cos_l{l}"] = best_GL[:, l].tolist()
    for l in range(L):
        table[f"latent_l{l}"] = arg_GL[:, l].tolist()
    return table


def mmcs(table) -> float:
    """Mean max cosine similarity over the ground-truth features of a :func:`recovery` table."""
    return float(table["mean_max_cos"].mean())
