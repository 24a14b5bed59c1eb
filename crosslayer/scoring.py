"""Score a model on token windows: next-token loss per source label and per-layer residual norms.

Method:
1. Run the model over ``[N, T]`` windows in batches; take per-token cross-entropy of the next
   token (the last position of each window has no target).
2. Average the loss over tokens whose *target* is an ordinary token of a document (separators
   and targets that start a new document are skipped), grouped by the source label.
3. With a hook on every ``resid_post``, record the residual norm of each token; report per layer
   the median, 99th percentile and max of the norm, separately for position 0 (the attention
   sink) and the rest of the window.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from crosslayer.corpus import TokenWindows
from crosslayer.hooks import hook_name


@torch.no_grad()
def score(model, windows: TokenWindows, *, batch_size: int = 8, progress: bool = True
          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(loss_by_label, norms_by_layer)`` tidy tables for ``windows``."""
    n_layers = model.cfg.n_layers
    norms: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def keep_norm(act, hook):
        norms[hook.layer()].append(act.float().norm(dim=-1))

    hooks = [(hook_name("resid_post", layer), keep_norm) for layer in range(n_layers)]
    losses = []
    for start in tqdm(range(0, len(windows), batch_size), desc="score", disable=not progress,
                      unit="batch"):
        tokens = windows.tokens[start:start + batch_size]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        losses.append(-logp.gather(-1, tokens[:, 1:, None])[..., 0])
    loss_NT = torch.cat(losses)
    doc_NT = windows.doc_ids
    same_doc = (doc_NT[:, 1:] == doc_NT[:, :-1]) & (doc_NT[:, 1:] >= 0)
    label_NT = windows.labels[:, 1:]
    rows = []
    for i, name in enumerate(windows.label_names):
        mask = same_doc & (label_NT == i)
        if mask.any():
            rows.append({"label": name, "tokens": int(mask.sum()), "ce_loss": float(loss_NT[mask].mean())})
    rows.append({"label": "all", "tokens": int(same_doc.sum()), "ce_loss": float(loss_NT[same_doc].mean())})
    loss_table = pd.DataFrame(rows)

    norm_rows = []
    for layer in range(n_layers):
        norm_NT = torch.cat(norms[layer])
        for where, values in (("position 0", norm_NT[:, 0]), ("positions 1+", norm_NT[:, 1:].flatten())):
            norm_rows.append({"layer": layer, "where": where, "median_norm": float(values.median()),
                              "p99_norm": float(torch.quantile(values, 0.99)) if values.numel() < 2**24 else float("nan"),
                              "max_norm": float(values.max())})
    return loss_table, pd.DataFrame(norm_rows)


@torch.no_grad()
def greedy(model, prompt: str, *, max_new_tokens: int = 12) -> str:
    """Greedy continuation of ``prompt`` (no BOS), returned without the prompt."""
    tokens = model.to_tokens(prompt, prepend_bos=False)
    out = model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False, verbose=False,
                         prepend_bos=False, use_past_kv_cache=True)
    return model.tokenizer.decode(out[0, tokens.shape[1]:])
