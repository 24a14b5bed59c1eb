"""Interventions: clamp, scale or ablate dictionary features during the forward pass.

Method (Templeton et al. 2024, "Scaling Monosemanticity", §steering; research-notes §5):
1. Run the model clean on the tokens and cache the dictionary's hooks (every layer it reads).
2. Encode the clean activations: f = encode(x) (raw units in, the dictionary's normalisation inside).
3. Edit the chosen features: clamp (f_i := v), scale (f_i := s f_i), ablate (f_i := 0) or add
   (f_i := f_i + v), giving f'.
4. The intended change at layer l is delta^l = decode(f')^l - decode(f)^l (raw units; the bias and
   all unedited features cancel). Editing the model's own activation by delta keeps the
   reconstruction error: x' = x + delta = x_hat(f') + (x - x_hat(f)), so only the chosen features change.
5. Where delta goes (``at``). A feature *writes* layer l when the dictionary's mask lets it and its
   decoder norm there is at least ``WRITE_FRACTION`` (0.1) of its largest layer norm (the L0-per-layer
   rule). Adding delta at every written layer in one pass compounds: what is added at an early layer
   is carried by the residual stream to the later ones, which add their own delta on top (a flat
   profile over 8 layers gets up to ~8x the edit at the last). The modes:
   - ``first``: add the feature's delta at the first layer it writes only; later layers follow
     through the model (the causal intervention).
   - ``peak``: add its delta at its peak layer only (largest decoder norm, ``decoder_norms``).
   - ``each``: at every written layer l, replace the residual by clean^l + delta^l, i.e. subtract what
     the edits below already propagated; the difference from the clean run at l is then exactly delta^l.
   A per-layer SAE feature writes one layer, so the three modes coincide for it.
   Several features: ``first`` / ``peak`` add each feature's own delta at its own layer (deltas of
   features sharing a layer add up; a later feature's delta lands on a stream already changed by the
   earlier ones). ``each`` pins every layer any edited feature writes to clean + the summed delta of
   all edits there (decode(f') - decode(f) at l, every edit at once).
   Consequence of pinning: the hooks are full residual snapshots, so everything after the last pinned
   layer L* depends only on the residual at L*; the logits of ``each`` equal those of setting L* alone
   to clean + delta (tested). An edited feature that does not write L* would therefore have no effect,
   and ``each`` refuses such a combination (e.g. SAE features at different layers: use ``first``).
   Transcoders (CLT / PLT, ``Dictionary.is_transcoder``) read resid_mid and write MLP outputs, which are
   not residual snapshots: every mode adds the feature's delta to the MLP output (``target_hooks``) of
   each layer it places it at, so nothing compounds and ``each`` is the CLT's own semantics (the feature's
   whole write, as in the attribution graph's replacement model); ``first`` / ``peak`` keep one layer of it.
   Default ``each``: it is the only mode in which every layer the feature writes carries exactly the
   change the dictionary describes (its own reconstruction semantics, the same meaning as a per-layer
   SAE edit at its one layer), and it cannot compound; ``first`` / ``peak`` measure instead how the
   model propagates the feature's direction from one layer.
6. Position 0 (the attention sink) is left untouched. Report the next-token distribution at the
   last position: tokens whose probability rose / fell most, and KL(clean || steered). Steered
   generation re-does 1-5 for every new token and samples with the same seeded generator as the
   clean generation, so the two continuations differ only through the intervention.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor

from crosslayer.dictionary import WRITE_FRACTION, Dictionary, check_compatible, written_pairs
from crosslayer.errors import CrosslayerError

MODES = ("clamp", "scale", "ablate", "add")
AT = ("first", "peak", "each")
"""Where a feature's delta goes (module docstring, step 5)."""
DEFAULT_AT = "each"


@dataclass(frozen=True)
class Edit:
    """One feature edit: ``clamp`` to ``value``, ``scale`` by ``value``, ``ablate``, or ``add`` ``value``."""

    feature: int
    mode: str = "clamp"
    value: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise CrosslayerError(f"unknown intervention {self.mode!r}; use one of {', '.join(MODES)}")


def check_edits(dictionary: Dictionary, model, edits: list[Edit]) -> None:
    """Raise a one-line CrosslayerError unless ``edits`` name features of ``dictionary`` and it fits ``model``."""
    if not edits:
        raise CrosslayerError("no features to edit; give at least one --feature")
    bad = [e.feature for e in edits if not 0 <= e.feature < dictionary.n_features]
    if bad:
        raise CrosslayerError(f"feature {bad[0]} is out of range: the dictionary has features "
                              f"0..{dictionary.n_features - 1}")
    check_compatible(dictionary, model)


def check_at(at: str) -> None:
    if at not in AT:
        raise CrosslayerError(f"unknown edit site at={at!r}; use one of {', '.join(AT)}")


def edit_features(feats_NF: Tensor, edits: list[Edit]) -> Tensor:
    """Apply ``edits`` to a copy of ``feats_NF``."""
    out = feats_NF.clone()
    for e in edits:
        col = out[:, e.feature]
        out[:, e.feature] = {"clamp": torch.full_like(col, e.value), "scale": col * e.value,
                             "ablate": torch.zeros_like(col), "add": col + e.value}[e.mode]
    return out


@torch.no_grad()
def written_layers(dictionary: Dictionary, features: list[int], fraction: float = WRITE_FRACTION) -> Tensor:
    """``[E, L]`` bool: the layers each of ``features`` writes (mask, and norm >= ``fraction`` of its largest)."""
    return written_pairs(dictionary.decoder_norms()[features], dictionary.writes_FL()[features], fraction)


@torch.no_grad()
def edit_layers(dictionary: Dictionary, features: list[int], at: str) -> Tensor:
    """``[E, L]`` bool: where each of ``features`` is edited in mode ``at`` (module docstring, step 5)."""
    check_at(at)
    written_EL = written_layers(dictionary, features)
    if at == "each":
        return written_EL
    norms_EL = dictionary.decoder_norms().detach().float().cpu()[features]
    pick_E = ((norms_EL if at == "peak" else 1.0) * written_EL).argmax(-1)  # the first of equal maxima
    return torch.nn.functional.one_hot(pick_E, dictionary.n_layers).bool() & written_EL.any(-1, keepdim=True)


class EditPlan(NamedTuple):
    """What :func:`plan_edits` computes from the clean run; :func:`edit_hooks` turns it into hooks."""

    at: str | None
    clean_BTLD: Tensor
    """The clean activations at the dictionary's hooks (raw units, float32)."""
    delta_BTLD: Tensor
    """``first`` / ``peak``: what is added at each layer; ``each``: the pinned difference from the clean
    run; ``None``: the intended delta decode(f') - decode(f) at every layer. Zero at position 0."""
    feats_BTF: Tensor
    """The clean features."""
    features: list[int]
    """The edited features, in order of first appearance."""
    place_EL: Tensor
    """``[E, L]`` bool: where each feature is edited (all True for ``at=None``)."""

    @property
    def layers_L(self) -> Tensor:
        """``[L]`` bool: the dictionary layers that get a hook."""
        return self.place_EL.any(0)


@torch.no_grad()
def plan_edits(model, dictionary: Dictionary, tokens_BT: Tensor, edits: list[Edit], *, at: str | None = DEFAULT_AT,
               keep_first: bool = True) -> EditPlan:
    """Encode the clean run, apply ``edits`` and place their deltas per ``at`` (``None``: everywhere, unplaced)."""
    _, cache = model.run_with_cache(tokens_BT, names_filter=lambda n: n in dictionary.hooks)
    clean = torch.stack([cache[h] for h in dictionary.hooks], dim=2).float()  # [B, T, L, d]
    B, T, L, d = clean.shape
    param = next(dictionary.parameters(), None)
    flat = clean.reshape(B * T, L, d).to(param.device if param is not None else clean.device)
    feats = dictionary.encode(flat, normalized=False)
    base = dictionary.decode(feats, normalized=False)
    features = list(dict.fromkeys(e.feature for e in edits))
    place = torch.ones(len(features), L, dtype=torch.bool) if at is None else edit_layers(dictionary, features, at)
    mask = place.to(flat.device)[:, :, None]

    def change(some: list[Edit]) -> Tensor:
        return dictionary.decode(edit_features(feats, some), normalized=False) - base

    if at in (None, "each"):
        delta = change(edits) * mask.any(0)
    else:  # each feature's own delta at its own layer
        delta = torch.zeros_like(base)
        for i, f in enumerate(features):
            delta += change([e for e in edits if e.feature == f]) * mask[i]
    delta = delta.reshape(B, T, L, d).to(clean.device)
    if keep_first:
        delta[:, 0] = 0
    plan = EditPlan(at, clean, delta, feats.reshape(B, T, -1), features, place)
    if at == "each":
        _check_pinned(dictionary, plan)
    return plan


def _check_pinned(dictionary: Dictionary, plan: EditPlan) -> None:
    """``each``: refuse features whose edit the pin at the last edited layer would erase (step 5)."""
    if not plan.layers_L.any() or dictionary.is_transcoder:  # MLP outputs are not snapshots: nothing is erased
        return
    last = int(plan.layers_L.nonzero().max())
    lost = [f for f, w in zip(plan.features, written_layers(dictionary, plan.features, 0.0)[:, last]) if not w]
    if lost:
        raise CrosslayerError(f"at='each' pins layer {dictionary.layers[last]} to the clean run plus the edits written "
                              f"there; feature(s) {lost} do not write it, so their edit would vanish; edit them "
                              "separately or use at='first' or 'peak'")


def edit_hooks(dictionary: Dictionary, plan: EditPlan, *, keep_first: bool = True) -> list:
    """TransformerLens ``fwd_hooks`` that apply ``plan``: add its delta (``first``, ``peak``) or pin the
    residual to clean + delta (``each``) at every position but the first. A plan with ``at=None`` adds the
    intended delta at every layer in one pass: the old, compounding patch (kept for comparison)."""
    start = 1 if keep_first else 0

    def add(act, hook, i):
        return act + plan.delta_BTLD[:, :, i].to(act.dtype)

    def pin(act, hook, i):
        out = act.clone()
        out[:, start:] = (plan.clean_BTLD[:, start:, i] + plan.delta_BTLD[:, start:, i]).to(act.dtype)
        return out

    fn = pin if plan.at == "each" and not dictionary.is_transcoder else add
    return [(dictionary.target_hooks[i], partial(fn, i=i)) for i in plan.layers_L.nonzero().flatten().tolist()]


@torch.no_grad()
def deltas(model, dictionary: Dictionary, tokens_BT: Tensor, edits: list[Edit], *, at: str | None = None,
           keep_first: bool = True) -> tuple[Tensor, Tensor]:
    """``(delta_BTLD, feats_BTF)``: the raw-unit change per layer (``at=None``: the intended delta at every
    layer; else as placed by ``at``, see :class:`EditPlan`), and the clean features."""
    plan = plan_edits(model, dictionary, tokens_BT, edits, at=at, keep_first=keep_first)
    return plan.delta_BTLD, plan.feats_BTF


@torch.no_grad()
def run_with_edits(model, dictionary: Dictionary, tokens_BT: Tensor, edits: list[Edit], *, at: str = DEFAULT_AT,
                   keep_first: bool = True) -> Tensor:
    """Logits of the model with ``edits`` applied at the layers ``at`` chooses (module docstring, step 5)."""
    check_edits(dictionary, model, edits)
    check_at(at)
    plan = plan_edits(model, dictionary, tokens_BT, edits, at=at, keep_first=keep_first)
    return model.run_with_hooks(tokens_BT, fwd_hooks=edit_hooks(dictionary, plan, keep_first=keep_first))


@torch.no_grad()
def steer(model, dictionary: Dictionary, prompt: str, edits: list[Edit], *, top: int = 10,
          at: str = DEFAULT_AT) -> tuple[pd.DataFrame, dict]:
    """Next-token effect of ``edits`` on ``prompt``: (table of tokens up/down, summary with KL, the mode
    ``at`` and the model layers edited per feature)."""
    check_edits(dictionary, model, edits)
    check_at(at)
    tokens = model.to_tokens(prompt, prepend_bos=False)
    if tokens.shape[1] < 2:
        raise CrosslayerError("the prompt needs at least two tokens (position 0 is never edited)")
    plan = plan_edits(model, dictionary, tokens, edits, at=at)
    clean = torch.log_softmax(model(tokens)[0, -1].float(), -1)
    steered = torch.log_softmax(model.run_with_hooks(tokens, fwd_hooks=edit_hooks(dictionary, plan))[0, -1].float(), -1)
    diff = steered.exp() - clean.exp()
    rows = []
    for direction, idx in (("up", diff.topk(top).indices), ("down", (-diff).topk(top).indices)):
        for rank, t in enumerate(idx.tolist(), 1):
            rows.append({"direction": direction, "rank": rank, "token_id": t,
                         "token": model.tokenizer.decode([t]), "p_clean": float(clean[t].exp()),
                         "p_steered": float(steered[t].exp()), "delta_p": float(diff[t])})
    summary = {"kl": float((clean.exp() * (clean - steered)).sum()), "at": at,
               "layers": {f: [dictionary.layers[i] for i in row.nonzero().flatten().tolist()]
                          for f, row in zip(plan.features, plan.place_EL)},
               "clean_activation": {e.feature: float(plan.feats_BTF[0, -1, e.feature]) for e in edits}}
    return pd.DataFrame(rows), summary


@torch.no_grad()
def generate(model, dictionary: Dictionary | None, prompt: str, edits: list[Edit] | None = None, *,
             max_new_tokens: int = 20, seed: int = 0, temperature: float = 1.0, at: str = DEFAULT_AT) -> str:
    """Sample a continuation (clean when ``edits`` is empty); the same ``seed`` gives the same draws."""
    tokens = model.to_tokens(prompt, prepend_bos=False)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = run_with_edits(model, dictionary, tokens, edits, at=at) if edits else model(tokens)
        logits = logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, -1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=tokens.device)], dim=1)
    return model.tokenizer.decode(tokens[0, -max_new_tokens:])
