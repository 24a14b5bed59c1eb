"""Evaluation of a transcoder (CLT or PLT): MLP-output reconstruction, L0 per layer and per (feature, layer
written), and the replacement model's CE with document-bootstrap intervals.

Method (Ameisen et al. 2025, §5 "Evaluating CLTs"; research-notes §4, §9); the shared pieces are
:mod:`crosslayer.evals`'s (FVU sums, windows, document bootstrap):
1. Reconstruction: ``n_tokens`` aligned rows of the pair (resid_mid -> mlp_out), raw units; FVU of each layer's
   MLP output (:class:`~crosslayer.evals.ReconstructionStats`). L0: ``l0_read`` = features of layer l's group active
   per token (what a PLT's L0 is); ``l0`` = active (feature, layer written) pairs at layer l (decoder norm >= ``l0_frac``
   x the feature's largest, :func:`~crosslayer.dictionary.written_pairs`); the all row's ``l0_feat`` and ``l0_tuple``
   are their sums over layers.
2. Replacement model (the store's windows and scored predictions, :func:`crosslayer.evals.eval_windows`): one forward
   pass in which, at each covered layer l, the group-l features are encoded from the resid_mid that arrived in this
   pass and every MLP output l' is replaced by sum_{l <= l'} W_dec^{l -> l'} f^l + b_dec^{l'} (the replacement model:
   errors compound through the layers). ``replacement_error`` adds the error terms e_l = mlp_out_l - CLT(clean)_l of
   the clean run at every layer, which must reproduce the clean run (a check: CE = clean CE, KL ~ 0). Only positions
   the store kept are replaced (as in every splice of :mod:`crosslayer.evals`). Baselines: every covered MLP output
   mean-ablated (the store's mean) or zeroed at the same positions; ``ce_recovered`` = (CE_mean - CE_run) /
   (CE_mean - CE_clean); 95 % intervals by resampling documents.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crosslayer.dictionary import WRITE_FRACTION, Dictionary, check_compatible, written_pairs
from crosslayer.errors import CrosslayerError
from crosslayer.evals import ReconstructionStats, _per_doc, _row_values, bootstrap_counts, eval_windows
from crosslayer.io import write_csv

COLUMNS = ["kind", "cross_layer", "scope", "layer", "splice", "fvu", "mse", "l0_read", "l0", "l0_feat", "l0_tuple",
           "l0_frac", "dead_frac", "n_features", "n_tokens"]


@torch.no_grad()
def _reconstruction(clt: Dictionary, pair, n_tokens: int, batch_size: int, seed: int, l0_frac: float):
    writes_FL = written_pairs(clt.decoder_norms(), clt.writes_FL(), l0_frac)
    stats = ReconstructionStats(clt.n_layers, clt.d_model, writes_FL)
    read = ReconstructionStats(clt.n_layers, clt.d_model, clt.reads_FL())
    kw = dict(layers=clt.layers, normalized=False, seed=seed, epochs=1, drop_last=False, buffer_rows=max(batch_size, 4096))
    left, device = n_tokens, clt.norm_factors.device
    for x, y in zip(pair.inputs.iter_batches(batch_size, **kw), pair.targets.iter_batches(batch_size, **kw)):
        x, y = x[:left].to(device), y[:left].to(device)
        feats, recon = clt(x, normalized=False)
        stats.update(y, recon, feats)
        read.update(y, recon, feats)
        left -= x.shape[0]
        if left <= 0:
            break
    return stats.compute(), read.compute()["l0"], stats.n


def _replacement_hooks(model, clt: Dictionary, mask_BT, error_LNd=None):
    """Hooks of one replacement-model pass (method step 2): encode each group from the arriving resid_mid
    (:meth:`~crosslayer.clt.CrossLayerTranscoder.encode_group`), add its write to the layers it writes, replace
    each MLP output by the accumulated writes + b_dec (+ the clean error terms if given)."""
    n_kept, device = int(mask_BT.sum()), clt.norm_factors.device
    bias_LD = clt.decode(torch.zeros(1, clt.n_features, device=device), normalized=False)[0]
    acc_NLD = torch.zeros(n_kept, clt.n_layers, clt.d_model, device=device)

    def read(act, hook, i):
        f_NW = clt.encode_group(act[mask_BT].float().to(device), i, normalized=False)
        write = clt.decode_group(f_NW, i, normalized=False)
        acc_NLD[:, i:i + write.shape[1]] += write
        return act

    def write(act, hook, i):
        out = act.clone()
        value = acc_NLD[:, i] + bias_LD[i] + (0 if error_LNd is None else error_LNd[i])
        out[mask_BT] = value.to(act)
        return out

    hooks = []
    for i, (h_in, h_out) in enumerate(zip(clt.hooks, clt.target_hooks)):
        hooks += [(h_in, lambda a, hook, i=i: read(a, hook, i)), (h_out, lambda a, hook, i=i: write(a, hook, i))]
    return hooks


def _score(logits, pred_BT, target, logp_clean):
    logp = torch.log_softmax(logits[:, :-1][pred_BT].float(), dim=-1)
    ce = -logp.gather(1, target[:, None])[:, 0]
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
    return torch.stack([ce, kl]).double().cpu()


@torch.no_grad()
def replacement_ce(clt: Dictionary, pair, model, *, n_windows: int = 32, batch_size: int = 8, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, dict]:
    """Downstream values of the ``replacement`` and ``replacement_error`` runs (method step 2), keyed by run."""
    check_compatible(clt, model)
    win = eval_windows(pair.inputs, n_windows)
    if win.n_docs == 0:
        raise CrosslayerError("no next-token predictions at kept positions; use more or longer windows")
    mean_LD = pair.targets.mean(clt.layers)
    sums, clean = defaultdict(lambda: np.zeros((2, win.n_docs))), np.zeros((2, win.n_docs))
    device = next(iter(model.parameters())).device
    for start in range(0, len(win.index), batch_size):
        sl = slice(start, start + batch_size)
        tokens, mask, pred = (t[sl].to(device) for t in (win.tokens, win.kept, win.pred))
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in set(clt.hooks) | set(clt.target_hooks))
        logp_clean = torch.log_softmax(logits[:, :-1][pred].float(), dim=-1)
        target, doc = tokens[:, 1:][pred], win.doc[sl][win.pred[sl]].numpy()
        ce = -logp_clean.gather(1, target[:, None])[:, 0]
        clean += _per_doc(torch.stack([ce, torch.ones_like(ce)]).cpu(), doc, win.n_docs)
        x_NLD = torch.stack([cache[h][mask] for h in clt.hooks], 1).float()
        y_NLD = torch.stack([cache[h][mask] for h in clt.target_hooks], 1).float()
        error_LNd = (y_NLD - clt.reconstruct(x_NLD.to(clt.norm_factors.device), normalized=False).to(y_NLD)).transpose(0, 1)
        runs = {"replacement": _replacement_hooks(model, clt, mask),
                "replacement_error": _replacement_hooks(model, clt, mask, error_LNd.to(clt.norm_factors.device))}
        for kind, values in (("mean", mean_LD), ("zero", torch.zeros_like(mean_LD))):
            runs[kind] = [(h, lambda a, hook, v=values[i]: torch.where(mask[..., None], v.to(a), a))
                          for i, h in enumerate(clt.target_hooks)]
        for name, hooks in runs.items():
            sums[name] += _per_doc(_score(model.run_with_hooks(tokens, fwd_hooks=hooks), pred, target, logp_clean),
                                   doc, win.n_docs)
    counts = bootstrap_counts(win.n_docs, n_boot, seed)
    out = {}
    for run in ("replacement", "replacement_error"):
        per_doc = {"n": clean[1], "ce_clean": clean[0], "ce_spliced": sums[run][0], "kl": sums[run][1],
                   "ce_mean": sums["mean"][0], "kl_mean": sums["mean"][1], "ce_zero": sums["zero"][0],
                   "kl_zero": sums["zero"][1]}
        out[run] = _row_values(per_doc, counts)
    return out


@torch.no_grad()
def evaluate_transcoder(clt: Dictionary, pair, *, model=None, n_tokens: int = 50_000, batch_size: int = 512,
                        n_windows: int = 32, window_batch_size: int = 8, l0_frac: float = WRITE_FRACTION,
                        n_boot: int = 1000, seed: int = 0,
                        out: str | Path | None = None) -> pd.DataFrame:
    """One row per layer (scope "layer": MLP-output FVU, L0s) and, with a model, one row per replacement run
    (scope "all", splice "replacement" | "replacement_error", with the columns of
    :data:`crosslayer.evals.DOWNSTREAM_COLUMNS` that apply); module docstring."""
    if not getattr(clt, "is_transcoder", False):
        raise CrosslayerError(f"{clt.kind} is not a transcoder; use `crosslayer eval` with an ordinary store")
    check_compatible(clt, pair.inputs)
    m, l0_read, n = _reconstruction(clt, pair, n_tokens, batch_size, seed, l0_frac)
    dead_F = m["freq_F"] == 0
    groups = clt.reads_FL().float().argmax(1)
    rows = [{"scope": "layer", "layer": layer, "splice": "layer", "fvu": float(m["fvu"][i]), "mse": float(m["mse"][i]),
             "l0_read": float(l0_read[i]), "l0": float(m["l0"][i]), "n_features": int((groups == i).sum()),
             "dead_frac": float(dead_F[groups == i].double().mean())} for i, layer in enumerate(clt.layers)]
    base = {"scope": "all", "layer": pd.NA, "fvu": float(m["fvu"].mean()), "mse": float(m["mse"].mean()),
            "l0_read": float(l0_read.sum()), "l0": float(m["l0_feat"]), "l0_feat": float(m["l0_feat"]),
            "l0_tuple": float(m["l0"].sum()), "n_features": clt.n_features, "dead_frac": float(dead_F.double().mean())}
    if model is None:
        rows.append({**base, "splice": "none"})
    else:
        for run, values in replacement_ce(clt, pair, model, n_windows=n_windows, batch_size=window_batch_size,
                                          n_boot=n_boot, seed=seed).items():
            rows.append({**base, "splice": run, **values})
    table = pd.DataFrame(rows).assign(kind=clt.kind, cross_layer=bool(getattr(clt.cfg, "cross_layer", True)),
                                      l0_frac=l0_frac, n_tokens=n)
    extra = [c for c in table.columns if c not in COLUMNS]
    table = table.reindex(columns=COLUMNS + extra)
    table["layer"] = table["layer"].astype("Int64")
    if out is not None:
        write_csv(table, out)
    return table
