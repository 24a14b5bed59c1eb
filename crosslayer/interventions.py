"""Interventions: clamp, scale or ablate dictionary features during the forward pass.

Method (Templeton et al. 2024, "Scaling Monosemanticity", §steering; research-notes §5):
1. Run the model clean on the tokens and cache the dictionary's hooks (every layer it reads).
2. Encode the clean activations: f = encode(x) (raw units in, the dictionary's normalisation inside).
3. Edit the chosen features: clamp (f_i := v), scale (f_i := s f_i), ablate (f_i := 0) or add
   (f_i := f_i + v), giving f'.
4. The change at every layer the dictionary writes is delta^l = decode(f')^l - decode(f)^l (raw
   units; exact, the bias and all unedited features cancel). Adding delta to the model's own
   activation keeps the reconstruction error: x' = x + delta = x_hat(f') + (x - x_hat(f)), so only
   the chosen features change. A per-layer SAE feature changes its own layer; a crosscoder feature
   changes every layer it writes, all in one patched forward pass (deltas from the clean run).
5. Position 0 (the attention sink) is left untouched. Report the next-token distribution at the
   last position: tokens whose probability rose / fell most, and KL(clean || steered). Steered
   generation re-does 1-4 for every new token and samples with the same seeded generator as the
   clean generation, so the two continuations differ only through the intervention.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from crosslayer.dictionary import Dictionary, check_compatible
from crosslayer.errors import CrosslayerError

MODES = ("clamp", "scale", "ablate", "add")


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


def edit_features(feats_NF: Tensor, edits: list[Edit]) -> Tensor:
    """Apply ``edits`` to a copy of ``feats_NF``."""
    out = feats_NF.clone()
    for e in edits:
        col = out[:, e.feature]
        out[:, e.feature] = {"clamp": torch.full_like(col, e.value), "scale": col * e.value,
                             "ablate": torch.zeros_like(col), "add": col + e.value}[e.mode]
    return out


@torch.no_grad()
def deltas(model, dictionary: Dictionary, tokens_BT: Tensor, edits: list[Edit], *,
           keep_first: bool = True) -> tuple[Tensor, Tensor]:
    """``(delta_BTLD, feats_BTF)``: the raw-unit change at every dictionary layer, and the clean features."""
    _, cache = model.run_with_cache(tokens_BT, names_filter=lambda n: n in dictionary.hooks)
    B, T = tokens_BT.shape
    acts = torch.stack([cache[h] for h in dictionary.hooks], dim=2).float()  # [B, T, L, d]
    param = next(dictionary.parameters(), None)
    device = param.device if param is not None else acts.device
    flat = acts.reshape(B * T, dictionary.n_layers, dictionary.d_model).to(device)
    feats = dictionary.encode(flat, normalized=False)
    delta = dictionary.decode(edit_features(feats, edits), normalized=False) - dictionary.decode(feats, normalized=False)
    delta = delta.reshape(B, T, dictionary.n_layers, dictionary.d_model).to(acts.device)
    if keep_first:
        delta[:, 0] = 0
    return delta, feats.reshape(B, T, -1)


@torch.no_grad()
def run_with_edits(model, dictionary: Dictionary, tokens_BT: Tensor, edits: list[Edit], *,
                   keep_first: bool = True) -> Tensor:
    """Logits of the model with ``edits`` applied (error term kept; see the module docstring)."""
    check_edits(dictionary, model, edits)
    delta, _ = deltas(model, dictionary, tokens_BT, edits, keep_first=keep_first)

    def add(act, hook, i):
        return act + delta[:, :, i].to(act.dtype)

    hooks = [(h, lambda act, hook, i=i: add(act, hook, i)) for i, h in enumerate(dictionary.hooks)]
    return model.run_with_hooks(tokens_BT, fwd_hooks=hooks)


@torch.no_grad()
def steer(model, dictionary: Dictionary, prompt: str, edits: list[Edit], *, top: int = 10) -> tuple[pd.DataFrame, dict]:
    """Next-token effect of ``edits`` on ``prompt``: (table of tokens up/down, summary with KL)."""
    check_edits(dictionary, model, edits)
    tokens = model.to_tokens(prompt, prepend_bos=False)
    if tokens.shape[1] < 2:
        raise CrosslayerError("the prompt needs at least two tokens (position 0 is never edited)")
    clean = torch.log_softmax(model(tokens)[0, -1].float(), -1)
    steered = torch.log_softmax(run_with_edits(model, dictionary, tokens, edits)[0, -1].float(), -1)
    diff = steered.exp() - clean.exp()
    rows = []
    for direction, idx in (("up", diff.topk(top).indices), ("down", (-diff).topk(top).indices)):
        for rank, t in enumerate(idx.tolist(), 1):
            rows.append({"direction": direction, "rank": rank, "token_id": t,
                         "token": model.tokenizer.decode([t]), "p_clean": float(clean[t].exp()),
                         "p_steered": float(steered[t].exp()), "delta_p": float(diff[t])})
    _, feats = deltas(model, dictionary, tokens, edits)
    summary = {"kl": float((clean.exp() * (clean - steered)).sum()),
               "clean_activation": {e.feature: float(feats[0, -1, e.feature]) for e in edits}}
    return pd.DataFrame(rows), summary


@torch.no_grad()
def generate(model, dictionary: Dictionary | None, prompt: str, edits: list[Edit] | None = None, *,
             max_new_tokens: int = 20, seed: int = 0, temperature: float = 1.0) -> str:
    """Sample a continuation (clean when ``edits`` is empty); the same ``seed`` gives the same draws."""
    tokens = model.to_tokens(prompt, prepend_bos=False)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = run_with_edits(model, dictionary, tokens, edits) if edits else model(tokens)
        logits = logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, -1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=tokens.device)], dim=1)
    return model.tokenizer.decode(tokens[0, -max_new_tokens:])
