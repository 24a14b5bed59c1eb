"""Causal check of SAE chains: does removing a crosscoder feature change the next token as removing its SAE chain does?

Method (issue 14; the removal semantics of :mod:`crosslayer.interventions`, research-notes section 5)
    1. Sample, fixed before any outcome is seen: live crosscoder features matched by SAE latents (cosine > tau) at
       >= 2 of their spanned layers, with held-out density in ``density`` bounds and firing in at least one of the
       searched held-out windows (positions 1..ctx-1); ``n_features`` of them by a seeded random draw
       (:func:`select_features`). Per feature, up to ``n_windows`` of those windows, seeded.
    2. Three removals, each from the clean run's activations (raw residual units: a dictionary's decoder divided by
       its layer's norm factor, :meth:`Dictionary.decoder_vectors` with ``normalized=False``), position 0 untouched:
       (a) the crosscoder feature: f_i(x) d_i^l at every layer it writes
       (:func:`crosslayer.interventions.written_layers`);
       (b) its SAE chain: at each matched layer, the best-matching SAE latent's g_j(x) e_j^l;
       (c) a random chain: at the same layers, one random live SAE latent among the ``pool`` nearest in firing density
       to the chain's latent (:func:`random_chain`).
    3. Where the removal goes (``at``): ``each`` pins the residual at every edited layer to clean - contribution (the
       library's default semantics; the hooks are residual snapshots, so the logits then depend only on the last edited
       layer); ``add`` subtracts the contribution from the running residual at every edited layer (what was removed
       below is carried up and removed again: compounding, the same for (a), (b) and (c)).
    4. At every position where the crosscoder feature fires (clean run): KL(p_a || p_b) (feature vs chain),
       KL(p_a || p_c) (feature vs random chain) and KL(p_clean || p_x) for each removal; averaged per feature.
       :func:`summarise`: means with 95 % bootstrap intervals over features, and the paired test "chain KL <
       random-chain KL" (Wilcoxon signed-rank over features, and the bootstrap interval of the mean paired difference).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from crosslayer.errors import CrosslayerError
from studies.common import bootstrap_mean

COMPARISONS = {"feature_vs_chain": ("feature", "chain"), "feature_vs_random": ("feature", "random"),
               "clean_vs_feature": ("clean", "feature"), "clean_vs_chain": ("clean", "chain"),
               "clean_vs_random": ("clean", "random")}
"""comparison -> (p, q) of KL(p || q)."""
COLUMNS = ["feature", "at", "comparison", "kl", "n_windows", "n_positions", "chain_layers"]
AT = ("each", "add")


def select_features(candidates: np.ndarray, n_matched_layers: np.ndarray, density: np.ndarray, fires: np.ndarray,
                    *, n: int, density_bounds: tuple[float, float], seed: int) -> np.ndarray:
    """The pre-declared sample (Method step 1): ``candidates`` (feature ids) matched at >= 2 layers, density within
    ``density_bounds``, firing somewhere (``fires``); ``n`` of them by a seeded permutation, in feature order."""
    lo, hi = density_bounds
    ok = (n_matched_layers >= 2) & (density >= lo) & (density <= hi) & fires
    pool = candidates[ok]
    draw = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n].numpy()
    return np.sort(pool[draw])


def random_chain(chain_EL: Tensor, density_N: Tensor, live_N: Tensor, index: list[Tensor], *, pool: int,
                 seed: int) -> Tensor:
    """``[E, L]``: at each layer where ``chain_EL`` has a latent (global id, -1 none), a random live latent of that
    layer's ``index`` (not the chain's), drawn from the ``pool`` nearest to it in firing density."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full_like(chain_EL, -1)
    for l, idx in enumerate(index):
        has = chain_EL[:, l] >= 0
        cand = idx[live_N[idx]]
        if not bool(has.any()) or len(cand) < 2:
            continue
        target = chain_EL[has, l]
        gap = (density_N[cand][None] - density_N[target][:, None]).abs()
        gap[cand[None] == target[:, None]] = float("inf")
        near = gap.topk(min(pool, len(cand) - 1), dim=1, largest=False).indices
        pick = near.gather(1, torch.randint(near.shape[1], (len(target), 1), generator=gen))[:, 0]
        out[has, l] = cand[pick]
    return out


@torch.no_grad()
def removal_delta(dictionary, clean_RTLD: Tensor, latents_RL: Tensor) -> tuple[Tensor, Tensor]:
    """``(delta_RTLD, act_RTL)``: minus each row's latent's contribution g(x) d^l at each layer (raw units; latent
    ``latents_RL[r, l]``, -1 = none there; zero at position 0), and the latents' clean activations."""
    R, T, L, d = clean_RTLD.shape
    feats_RTF = dictionary.encode(clean_RTLD.reshape(R * T, L, d), normalized=False).reshape(R, T, -1)
    has_RL = latents_RL >= 0
    safe_RL = latents_RL.clamp_min(0)
    act_RTL = feats_RTF.gather(2, safe_RL[:, None].expand(R, T, L)) * has_RL[:, None]
    dec_RLD = torch.stack([dictionary.decoder_vectors(l, normalized=False)[safe_RL[:, i]]
                           for i, l in enumerate(dictionary.layers)], 1).to(clean_RTLD)
    delta_RTLD = -act_RTL[..., None] * dec_RLD[:, None]
    delta_RTLD[:, 0] = 0
    return delta_RTLD, act_RTL


@torch.no_grad()
def removal_logprobs(model, hooks: list[str], tokens_RT: Tensor, clean_RTLD: Tensor, delta_RTLD: Tensor,
                     pos_RT: Tensor, *, at: str) -> Tensor:
    """Next-token log-probabilities ``[P, V]`` at ``pos_RT`` with ``delta_RTLD`` placed at ``hooks`` per ``at``
    (Method step 3; rows without an edit at a layer are left alone there)."""
    if at not in AT:
        raise CrosslayerError(f"unknown removal semantics at={at!r}; use one of {', '.join(AT)}")
    edited_RL = (delta_RTLD != 0).any(-1).any(1)

    def place(act, hook, i):
        if at == "add":
            return act + delta_RTLD[:, :, i].to(act)
        pinned = (clean_RTLD[:, :, i] + delta_RTLD[:, :, i]).to(act)
        return torch.where(edited_RL[:, i, None, None], pinned, act)

    fwd = [(h, partial(place, i=i)) for i, h in enumerate(hooks)]
    return _logprobs_at(model, model.run_with_hooks(tokens_RT, fwd_hooks=fwd, stop_at_layer=model.cfg.n_layers), pos_RT)


def _logprobs_at(model, resid_RTD: Tensor, pos_RT: Tensor) -> Tensor:
    """Log-probabilities ``[P, V]`` from the last block's residual at ``pos_RT`` only (the unembedding of P rows)."""
    logits = model.unembed(model.ln_final(resid_RTD[pos_RT.to(resid_RTD.device)][:, None]))[:, 0]
    return torch.log_softmax(logits.float(), -1).cpu()


def kl(logp_PV: Tensor, logq_PV: Tensor) -> Tensor:
    """KL(p || q) per row ``[P]``."""
    return (logp_PV.exp() * (logp_PV - logq_PV)).sum(-1)


@torch.no_grad()
def causal_table(model, cc, saes, tokens_RT: Tensor, kept_RT: Tensor, feature_R: np.ndarray,
                 latents: dict[str, Tensor], *, ats: tuple[str, ...] = AT, batch: int = 16) -> pd.DataFrame:
    """Method steps 2-4 for rows (windows) ``tokens_RT``, each for the crosscoder feature ``feature_R[r]``: KL per
    comparison, averaged over the feature's firing positions per window, then over its windows.

    ``latents``: ``feature`` (crosscoder ids ``[R, L]``), ``chain`` and ``random`` (SAE ids ``[R, L]``), -1 = none.
    Columns: :data:`COLUMNS`."""
    if cc.hooks != saes.hooks:
        raise CrosslayerError(f"the crosscoder reads {cc.hooks}, the SAEs {saes.hooks}; use dictionaries of one store")
    frames = []
    for s in range(0, len(tokens_RT), batch):
        sl = slice(s, s + batch)
        tok = tokens_RT[sl]
        resid, cache = model.run_with_cache(tok, names_filter=lambda n: n in cc.hooks, stop_at_layer=model.cfg.n_layers)
        clean = torch.stack([cache[h] for h in cc.hooks], 2).float().cpu()
        deltas, acts = {}, {}
        for name, dictionary in (("feature", cc), ("chain", saes), ("random", saes)):
            deltas[name], acts[name] = removal_delta(dictionary, clean, latents[name][sl])
        pos = (acts["feature"] > 0).any(-1) & kept_RT[sl]
        pos[:, 0] = False
        logp = {"clean": _logprobs_at(model, resid, pos)}
        row_P = pos.nonzero()[:, 0].numpy() + s
        for at in ats:
            both = removal_logprobs(model, cc.hooks, tok.repeat(3, 1), clean.repeat(3, 1, 1, 1),
                                    torch.cat(list(deltas.values())), pos.repeat(3, 1), at=at)
            logp.update(zip(deltas, both.split(len(row_P))))
            for comp, (p, q) in COMPARISONS.items():
                frames.append(pd.DataFrame({"row": row_P, "at": at, "comparison": comp,
                                            "kl": kl(logp[p], logp[q]).double().numpy()}))
    return _per_feature(pd.concat(frames, ignore_index=True), feature_R, latents["chain"])


def _per_feature(per_pos: pd.DataFrame, feature_R: np.ndarray, chain_RL: Tensor) -> pd.DataFrame:
    """Mean KL over positions per window, then over windows per feature."""
    per_pos["feature"] = feature_R[per_pos.row.to_numpy()]
    win = per_pos.groupby(["feature", "at", "comparison", "row"], sort=False).kl.agg(["mean", "size"]).reset_index()
    out = win.groupby(["feature", "at", "comparison"], sort=False).agg(
        kl=("mean", "mean"), n_windows=("row", "size"), n_positions=("size", "sum")).reset_index()
    n_chain = pd.Series((chain_RL >= 0).sum(1).numpy(), index=feature_R).groupby(level=0).first()
    out["chain_layers"] = n_chain.reindex(out.feature).to_numpy()
    return out[COLUMNS]


def summarise(causal: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> list[tuple[str, float]]:
    """(metric, value) rows: per ``at`` and comparison the mean KL over features with its 95 % bootstrap interval;
    the paired difference KL(feature || random) - KL(feature || chain) per feature (mean, interval, the fraction of
    features where the chain is closer, and the one-sided Wilcoxon signed-rank p-value)."""
    from scipy.stats import wilcoxon

    rows = []
    for at, part in causal.groupby("at", sort=False):
        wide = part.pivot(index="feature", columns="comparison", values="kl")
        wide["difference"] = wide.feature_vs_random - wide.feature_vs_chain
        cols = list(COMPARISONS) + ["difference"]
        mean, lo, hi = bootstrap_mean(wide[cols].to_numpy(), n_boot=n_boot, seed=seed)
        for c, m, a, b in zip(cols, mean, lo, hi):
            rows += [(f"{at}|{c}", m), (f"{at}|{c}_lo", a), (f"{at}|{c}_hi", b)]
        diff = wide.difference.to_numpy()
        p = wilcoxon(diff, alternative="greater").pvalue if (diff != 0).any() else 1.0
        rows += [(f"{at}|frac_chain_closer", float((diff > 0).mean())), (f"{at}|wilcoxon_p", float(p)),
                 (f"{at}|n_features", float(len(wide)))]
    return rows


@torch.no_grad()
def firing_windows(dictionary, store, features: np.ndarray, *, n_search: int, ctx: int,
                   batch_size: int = 1024) -> tuple[np.ndarray, Tensor, Tensor]:
    """The searched held-out windows ``[M]`` (spread over the store), their kept positions ``[M, ctx]`` (position 0
    never) and ``fires_MC``: whether each of ``features`` fires at a kept position of the window's first ``ctx``."""
    from crosslayer.evals import choose_windows, kept_mask

    win = choose_windows(store, n_search)
    kept = kept_mask(store, win)[:, :ctx].clone()
    kept[:, 0] = False
    w_N, p_N = kept.nonzero(as_tuple=True)
    rows = store.row_of_flat(win[w_N.numpy()] * store.seq_len + p_N.numpy())
    cols = torch.as_tensor(features)
    fired = torch.cat([dictionary.encode(store.get(rows[s:s + batch_size], layers=dictionary.layers),
                                         normalized=False)[:, cols] > 0 for s in range(0, len(rows), batch_size)])
    fires_MC = torch.zeros(len(win), len(cols)).index_add_(0, w_N, fired.float()) > 0
    return win, kept, fires_MC


def pick_windows(fires_MC: Tensor, n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` seeded windows per column among those where it fires: ``(column_R, window_R)`` (searched-window
    positions), grouped by column."""
    score_MC = torch.rand(fires_MC.shape, generator=torch.Generator().manual_seed(seed)).masked_fill(~fires_MC, -1.0)
    top, idx = score_MC.topk(min(n, fires_MC.shape[0]), dim=0)
    col_KC = torch.arange(fires_MC.shape[1]).expand_as(idx)
    ok = (top >= 0).T
    return col_KC.T[ok].numpy(), idx.T[ok].numpy()


def causal_check(model, cc, saes, store, *, candidates: np.ndarray, n_matched: np.ndarray, density: np.ndarray,
                 chain_CL: Tensor, sae_density: Tensor, sae_live: Tensor, index: list[Tensor], cfg) -> pd.DataFrame:
    """Method steps 1-4 for the crosscoder features ``candidates`` (with their matched-layer counts, densities and SAE
    chains ``chain_CL``, global SAE ids or -1); settings from the study config's ``causal_*`` fields. No row when no
    feature meets the criterion."""
    from crosslayer.interventions import written_layers

    ok = (n_matched >= 2) & (density >= cfg.causal_density[0]) & (density <= cfg.causal_density[1])
    win, kept, fires = firing_windows(cc, store, candidates[ok], n_search=cfg.causal_search_windows,
                                      ctx=cfg.causal_ctx)
    fires_C = np.zeros(len(candidates), bool)
    fires_C[ok] = fires.any(0).numpy()
    chosen = select_features(candidates, n_matched, density, fires_C, n=cfg.causal_features,
                             density_bounds=cfg.causal_density, seed=0)
    if not len(chosen):  # an outcome of the data, reported as such (the answer says no feature qualified)
        return pd.DataFrame(columns=COLUMNS)
    at_C = np.searchsorted(candidates, chosen)
    col_R, w_R = pick_windows(fires[:, np.searchsorted(candidates[ok], chosen)], cfg.causal_windows, seed=1)
    written_EL = written_layers(cc, chosen.tolist())
    chain_EL = chain_CL[at_C]
    latents = {"feature": torch.where(written_EL, torch.as_tensor(chosen)[:, None], -1)[col_R],
               "chain": chain_EL[col_R],
               "random": random_chain(chain_EL, sae_density, sae_live, index, pool=cfg.causal_pool, seed=2)[col_R]}
    tokens = store.window_tokens()[torch.as_tensor(win[w_R])][:, :cfg.causal_ctx]
    return causal_table(model, cc, saes, tokens, kept[torch.as_tensor(w_R)], chosen[col_R], latents,
                        ats=cfg.causal_at, batch=cfg.causal_batch)
