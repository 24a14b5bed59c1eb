"""Logit lens: read each layer's residual stream as if it were the last (nostalgebraist 2020).

The method, as in nostalgebraist's "interpreting GPT: the logit lens" (LessWrong, 2020) and the
baseline of Belrose et al. 2023 ("Eliciting Latent Predictions ... with the Tuned Lens", §2):

1. Tokenize the prompts (no BOS, as everywhere in crosslayer) and run the model once, caching only
   the residual stream: ``blocks.0.hook_resid_pre`` (the embedding, reported as layer -1) and
   ``blocks.{l}.hook_resid_post`` for each layer read.
2. Decode layer l exactly as the model decodes its last layer:
   ``logits_l = unembed(ln_final(resid_post_l))`` — the model's own final norm (RMSNorm or
   LayerNorm, with its learned scale) and unembedding, bias included. At the last layer this is
   the model's output.
3. ``logp_l = log_softmax(logits_l)``; per position report the top-k tokens and probabilities,
   the entropy ``H(p_l)``, ``KL(p_final || p_l)`` (0 at the last layer), and for a target token
   (the first token of ``target``) its rank (1 = top-1) and probability.
4. For the final layer's top-1 token at each position, ``first_layer_in_topk`` is the first layer
   read at which that token is among the layer's top-k.

Everything is vectorised over prompts, positions and the vocabulary; the loop runs over layers.
:func:`format_lens` prints one position as a per-layer table; :func:`plot_lens` draws the classic
layer x position grid of top-1 tokens coloured by their probability.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from crosslayer.errors import CrosslayerError
from crosslayer.hooks import hook_name
from crosslayer.io import atomic_path
from crosslayer.models import tokenize_padded

EMBED_LAYER = -1
COLUMNS = ["prompt", "layer", "position", "token", "top1_token", "top1_prob", "topk_tokens", "topk_probs",
           "entropy", "kl_final", "final_top1_token", "first_layer_in_topk"]
TARGET_COLUMNS = ["target_token", "target_rank", "target_prob"]


def _hook_name(layer: int) -> str:
    """The residual stream read at ``layer``: layer -1 is the embedding, ``blocks.0.hook_resid_pre``."""
    return hook_name("resid_pre", 0) if layer == EMBED_LAYER else hook_name("resid_post", layer)


def check_layers(model, layers) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return [EMBED_LAYER, *range(n_layers)]
    chosen = sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not EMBED_LAYER <= layer < n_layers]
    if bad or not chosen:
        raise CrosslayerError(f"layers {bad or '[]'} out of range; the model has layers 0..{n_layers - 1} "
                              f"(and -1 for the embedding)")
    return chosen


def _target_id(model, target: str) -> int:
    ids = model.to_tokens(target, prepend_bos=False)[0] if target else []
    if len(ids) == 0:
        raise CrosslayerError(f"target {target!r} tokenizes to nothing; give a non-empty token such as ' Paris'")
    return int(ids[0])


def decode_layer(model, resid_BPD: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos vocab"]:
    """Log-probabilities from one residual stream through the model's final norm and unembedding."""
    logits_BPV = model.unembed(model.ln_final(resid_BPD))
    return torch.log_softmax(logits_BPV.float(), dim=-1)


@torch.no_grad()
def logit_lens(model, prompts: str | list[str], *, target: str | None = None, top_k: int = 5,
               layers=None, tuned=None) -> pd.DataFrame:
    """Logit-lens table, one row per (prompt, layer, position); see the module docstring.

    ``layers``: layer indices to read (``-1`` is the embedding); default all of them. Columns:
    ``prompt`` (index), ``layer``, ``position``, ``token`` (input token there), ``top1_token``,
    ``top1_prob``, ``topk_tokens`` / ``topk_probs`` (lists, best first), ``entropy`` (nats),
    ``kl_final`` (KL(final || layer), nats), ``final_top1_token`` (the model's own top-1 there),
    ``first_layer_in_topk`` (first layer read whose top-k holds it; <NA> if none), and with
    ``target`` also ``target_token``, ``target_rank`` (1 = top-1) and ``target_prob``. With ``tuned``
    (a :class:`~crosslayer.tuned_lens.TunedLens`), every layer is decoded through its translator
    instead: the same table for the tuned lens (default layers: those the lens reads).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise CrosslayerError("no prompts given; pass a string or a non-empty list of strings")
    if top_k < 1 or top_k > model.cfg.d_vocab:
        raise CrosslayerError(f"top_k={top_k} must be between 1 and the vocabulary size {model.cfg.d_vocab}")
    if tuned is not None:
        tuned.check_model(model)
    chosen = check_layers(model, layers if layers is not None or tuned is None else tuned.layers)
    decode = (lambda layer, resid: decode_layer(model, resid)) if tuned is None else tuned.decoder(model)
    target_id = _target_id(model, target) if target is not None else None
    tokens_BP, lengths = tokenize_padded(model, prompts)
    names = {_hook_name(layer) for layer in chosen}
    final_logits_BPV, cache = model.run_with_cache(tokens_BP, names_filter=lambda name: name in names)
    final_logp_BPV = torch.log_softmax(final_logits_BPV.float(), dim=-1)
    stacked, first_in_topk_BP = _layer_stats(decode, cache, chosen, final_logp_BPV, top_k, target_id)
    del cache
    per_position = {"token": tokens_BP.cpu(), "final_top1": final_logp_BPV.argmax(-1).cpu(),
                    "first_in_topk": first_in_topk_BP.cpu()}
    return _table(model, chosen, lengths, stacked, per_position, target_id)


def _layer_stats(decode, cache, chosen: list[int], final_logp_BPV: Tensor, top_k: int, target_id: int | None):
    """Per-layer statistics stacked to ``[layer, batch, pos, ...]`` (CPU), and for each position the first
    layer whose top-k holds the final top-1 token (-2: none)."""
    final_p_BPV = final_logp_BPV.exp()
    final_top1_BP = final_logp_BPV.argmax(-1)
    first_in_topk_BP = torch.full(final_top1_BP.shape, -2, dtype=torch.long, device=final_top1_BP.device)
    per_layer = []
    for layer in chosen:
        logp_BPV = decode(layer, cache[_hook_name(layer)])
        p_BPV = logp_BPV.exp()
        top_logp_BPK, top_ids_BPK = logp_BPV.topk(top_k, dim=-1)
        in_topk_BP = (top_ids_BPK == final_top1_BP[..., None]).any(-1)
        first_in_topk_BP = torch.where((first_in_topk_BP == -2) & in_topk_BP, layer, first_in_topk_BP)
        stats = {
            "top_ids": top_ids_BPK, "top_probs": top_logp_BPK.exp(),
            "entropy": -(p_BPV * logp_BPV).nansum(-1),
            "kl_final": (final_p_BPV * (final_logp_BPV - logp_BPV)).nansum(-1).clamp_min(0.0),
        }
        if target_id is not None:
            target_logp_BP = logp_BPV[..., target_id]
            stats["target_rank"] = (logp_BPV > target_logp_BP[..., None]).sum(-1) + 1
            stats["target_prob"] = target_logp_BP.exp()
        per_layer.append({key: value.cpu() for key, value in stats.items()})
    return {key: torch.stack([d[key] for d in per_layer]) for key in per_layer[0]}, first_in_topk_BP


def _table(model, chosen: list[int], lengths: list[int], stacked: dict[str, Tensor],
           per_position: dict[str, Tensor], target_id: int | None) -> pd.DataFrame:
    """The lens table from ``[layer, batch, pos, ...]`` statistics and ``[batch, pos]`` per-position values:
    only real (unpadded) positions, in prompt, layer, position order."""
    n_batch, n_pos = per_position["token"].shape
    layer_LBP = torch.tensor(chosen)[:, None, None].expand(len(chosen), n_batch, n_pos)
    batch_LBP = torch.arange(n_batch)[None, :, None].expand_as(layer_LBP)
    pos_LBP = torch.arange(n_pos)[None, None, :].expand_as(layer_LBP)
    keep_LBP = pos_LBP < torch.tensor(lengths)[None, :, None]
    order = np.lexsort((pos_LBP[keep_LBP].numpy(), layer_LBP[keep_LBP].numpy(), batch_LBP[keep_LBP].numpy()))

    def flat(t: Tensor) -> np.ndarray:  # [layer, batch, pos, ...] -> [row, ...]
        return t[keep_LBP].numpy()[order]

    batch_N, pos_N, top_ids_NK, top_probs_NK = (flat(t) for t in (batch_LBP, pos_LBP, stacked["top_ids"],
                                                                  stacked["top_probs"]))
    at_N = {key: value[batch_N, pos_N].numpy() for key, value in per_position.items()}
    vocab = _Decoder(model)
    table = pd.DataFrame({
        "prompt": batch_N, "layer": flat(layer_LBP), "position": pos_N, "token": vocab(at_N["token"]),
        "top1_token": vocab(top_ids_NK[:, 0]), "top1_prob": top_probs_NK[:, 0],
        "topk_tokens": [vocab(row) for row in top_ids_NK],
        "topk_probs": [[float(p) for p in row] for row in top_probs_NK],
        "entropy": flat(stacked["entropy"]), "kl_final": flat(stacked["kl_final"]),
        "final_top1_token": vocab(at_N["final_top1"]),
        "first_layer_in_topk": pd.array(np.where(at_N["first_in_topk"] == -2, None, at_N["first_in_topk"]),
                                        dtype="Int64"),
    })
    if target_id is not None:
        table["target_token"] = vocab(np.array([target_id]))[0]
        table["target_rank"] = flat(stacked["target_rank"])
        table["target_prob"] = flat(stacked["target_prob"])
    return table.reset_index(drop=True)


class _Decoder:
    """Token id -> string, decoding each distinct id once."""

    def __init__(self, model):
        self.tokenizer = model.tokenizer
        self.known: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        ids = [int(i) for i in np.asarray(ids).ravel()]
        new = sorted(set(ids) - self.known.keys())
        if new:
            self.known.update(zip(new, self.tokenizer.batch_decode([[i] for i in new])))
        return [self.known[i] for i in ids]


def _layer_label(layer: int) -> str:
    return "embed" if layer == EMBED_LAYER else str(layer)


def format_lens(table: pd.DataFrame, position: int = -1, *, prompt: int = 0) -> str:
    """A per-layer text table of one position (``-1``: the last) of one prompt of a lens table."""
    rows = table[table["prompt"] == prompt]
    if rows.empty:
        raise CrosslayerError(f"prompt {prompt} is not in the lens table (prompts 0..{table['prompt'].max()})")
    n_pos = int(rows["position"].max()) + 1
    pos = position + n_pos if position < 0 else position
    if not 0 <= pos < n_pos:
        raise CrosslayerError(f"position {position} out of range for a prompt of {n_pos} tokens")
    rows = rows[rows["position"] == pos].sort_values("layer")
    has_target = "target_rank" in rows
    header = f"{'layer':>5}  {'top-1':<16} {'prob':>6} {'entropy':>7} {'KL':>7}"
    if has_target:
        header += f" {'rank':>6} {'p(target)':>9}"
    lines = [f"position {pos}: input token {rows['token'].iloc[0]!r}"
             + (f", target {rows['target_token'].iloc[0]!r}" if has_target else ""), header]
    for row in rows.itertuples(index=False):
        line = (f"{_layer_label(row.layer):>5}  {repr(row.top1_token)[:16]:<16} {row.top1_prob:6.3f} "
                f"{row.entropy:7.3f} {row.kl_final:7.3f}")
        if has_target:
            line += f" {row.target_rank:6d} {row.target_prob:9.4f}"
        lines.append(line + "  " + " ".join(repr(t) for t in row.topk_tokens[1:]))
    final = rows.iloc[-1]
    lines.append(f"final top-1 {final['final_top1_token']!r} first enters the top-{len(final['topk_tokens'])} "
                 f"at layer {_layer_label(final['first_layer_in_topk'])}"
                 if pd.notna(final["first_layer_in_topk"]) else "")
    return "\n".join(line for line in lines if line)


def _cell_text(token: str, width: int = 10) -> str:
    """Printable token for a figure: escapes shown, blank tokens drawn as visible spaces."""
    text = repr(token)[1:-1]
    return (text.replace(" ", "\u2423") if not text.strip() else text)[:width]


def plot_lens(table: pd.DataFrame, path: str | Path, *, prompt: int = 0) -> Path:
    """Seaborn heatmap of one prompt: layer x position, top-1 token in each cell, coloured by its probability."""
    import seaborn as sns
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    rows = table[table["prompt"] == prompt]
    if rows.empty:
        raise CrosslayerError(f"prompt {prompt} is not in the lens table")
    probs = rows.pivot(index="layer", columns="position", values="top1_prob").sort_index(ascending=False)
    words = rows.pivot(index="layer", columns="position", values="top1_token").loc[probs.index]
    inputs = rows.drop_duplicates("position").set_index("position")["token"].loc[probs.columns]
    n_layers, n_pos = probs.shape
    fig = Figure(figsize=(1.0 + 0.9 * n_pos, 1.0 + 0.32 * n_layers))
    ax = fig.subplots()
    sns.heatmap(probs.astype(float), annot=words.map(_cell_text).to_numpy(), fmt="",
                cmap="viridis", vmin=0.0, vmax=1.0, ax=ax, annot_kws={"fontsize": 7},
                cbar_kws={"label": "top-1 probability"})
    ax.set_xticklabels([_cell_text(t, 16) for t in inputs], rotation=45, ha="right")
    ax.set_yticklabels([_layer_label(layer) for layer in probs.index], rotation=0)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer")
    ax.set_title("logit lens: top-1 next-token prediction per layer")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    return path
