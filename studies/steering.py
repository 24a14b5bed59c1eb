"""Steering: can one SAE feature and one crosscoder feature make the model say "scam"?

Question
    Find a feature tied to a concept (scam / fraud / suspicion) in the main per-layer SAEs and in the
    main crosscoder, clamp it up and down, and measure what moves: the concept tokens' next-token
    probabilities, the KL to the clean distribution, the tokens that rise and fall, and a seeded
    generation (Templeton et al. 2024, "Scaling Monosemanticity", steering; research-notes section 5).

Method
    - Concept tokens: the entries of ``CONCEPT_TOKENS`` that are one token for the model's tokenizer
      (``concept_tokens.csv`` also counts how often each occurs in the training store). The builtin
      corpus carries the concept in its ``concept_fraud`` label (SMS scam messages and chat excerpts
      about scams, fraud, lying and suspicion; data/README.md gives the words' counts).
    - Candidates: (a) per concept token the ``Config.n_logit`` features whose raw decoder direction most
      raises its logit (:func:`crosslayer.features.find_features_for_token`, best layer per feature);
      (b) the ``Config.n_act`` features whose mean activation on concept sentences (``CONCEPT_TEXTS``) most
      exceeds that on control sentences (``CONTROL_TEXTS``), position 0 excluded. For each candidate:
      ``logit_z``, the mean over concept tokens of the standardised logit effect (effect minus its
      vocabulary mean, over its vocabulary standard deviation; direct logit attribution through the
      final norm's gain, as :func:`crosslayer.features.logit_effects`), the best vocabulary rank of a
      concept token, the activation contrast, and from :func:`crosslayer.features.top_activations` on
      the held-out store its density, maximum activation and top examples. A candidate's ``layer`` is
      its own layer (per-layer SAEs) or, for a crosscoder, the layer of its largest concept logit
      effect (logit candidates) or of its largest decoder norm (activation candidates).
    - Choice: features firing on more than ``Config.max_density`` of held-out tokens are excluded (session 1
      found that the top " scam" feature by logit effect was a dense one whose clamping lowered
      " scam"), as are features that never fire (a feature silent on the store but active on the
      sentences is scaled by its maximum there). Score = ``logit_z`` + activation contrast, each
      standardised over the candidate pool; the best-scoring eligible feature is chosen (if none is
      eligible, the best-scoring one that fires, flagged ``eligible`` False in ``candidates.csv``).
    - Clamp (:func:`crosslayer.interventions.run_with_edits`, error term kept, every position but the
      first; a crosscoder feature edited as ``Config.at`` says: ``each`` pins every layer it writes to
      the clean run plus its intended change, ``first`` / ``peak`` edit one layer and let the model carry
      it) to ``Config.multiples`` of the feature's maximum
      held-out activation (0 = ablation; negative = pushed against) on ``STEER_PROMPTS``. Per concept
      token: p clean / steered and their ratio; per prompt: KL(clean || steered) and the top tokens up
      and down, and as a control the vocabulary ratio (geometric mean of p steered / p clean over the
      whole vocabulary: a flattened distribution raises rare tokens without any concept). The "best"
      multiple is the positive one with the largest concept ratio (geometric mean of p steered / p clean
      over concept tokens and prompts); the answer calls a feature steering when that ratio, and its
      ratio to the vocabulary ratio, are both at least ``Config.steer_ratio``. Generations: ``Config.gen_tokens`` tokens
      sampled with one seed, clean and clamped at the best multiple, on the first ``Config.gen_prompts``
      prompt(s) (:func:`crosslayer.interventions.generate`).

Answer
    Generated from the CSVs by every run into ``paper/tables/steering_answer.tex`` (numbers are never
    typed here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from crosslayer.errors import CrosslayerError
from crosslayer.models import tokenize_padded
from crosslayer.io import write_csv, write_text
from studies.base import Study
from studies.common import fmt, latex_escape, latex_table, read_csv, save_figure, theme, token_tex

NAME = "steering"

CONCEPT_TOKENS = (" scam", " fraud", " suspicious", " fake", " stolen", " scams", " fraudulent", " phishing")
CONCEPT_TEXTS = (
    "The email promised a prize, but it was a scam to steal my bank details.",
    "Police arrested the man for fraud after he sold fake tickets online.",
    "Never give your password to a caller; it is a phishing scam.",
    "The stolen credit card was used for fraudulent purchases.",
    "That offer looks suspicious, like a trick to take your money.",
)
CONTROL_TEXTS = (
    "The museum opened a new room for paintings from the last century.",
    "She planted tomatoes and beans in the garden behind the house.",
    "The train to the coast leaves every morning at eight o'clock.",
    "He read the instructions twice before assembling the shelf.",
    "The recipe needs two cups of flour and a pinch of salt.",
)
STEER_PROMPTS = (
    "The email asked me to send my bank details, which seemed",
    "He offered me a deal that was",
    "The caller said I had won a prize, but it was clearly a",
)


@dataclass(frozen=True)
class Config:
    """Settings of the steering study (defaults: the demo preset)."""

    multiples: tuple[float, ...] = (-1.0, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    """Clamp values as multiples of the feature's maximum activation on the held-out store."""
    gen_tokens: int = 12
    """Tokens sampled per generation."""
    gen_prompts: int = 1
    """Prompts generated from (the first ones)."""
    gen_temperature: float = 0.7
    """Sampling temperature of the generations."""
    seed: int = 0
    """Sampling seed, shared by the clean and steered generations."""
    at: str = "each"
    """Where a multi-layer feature is edited (:data:`crosslayer.interventions.AT`): first | peak | each."""
    max_density: float = 0.10
    """Candidates firing on more of the held-out tokens than this are not chosen."""
    steer_ratio: float = 2.0
    """A feature "steers" when its concept ratio, and that ratio over the vocabulary-wide one, reach this."""
    n_logit: int = 8
    """Candidates per concept token by logit effect."""
    n_act: int = 16
    """Candidates by activation contrast (concept vs control sentences)."""
    top_tokens: int = 5
    """Tokens listed per direction (up / down) and per feature."""


CANDIDATE_COLUMNS = ["dictionary", "feature", "layer", "source", "logit_effect", "logit_z", "concept_rank",
                     "concept_act", "control_act", "act_contrast", "density", "store_max", "scale", "eligible",
                     "score", "chosen", "top_logits", "top_examples"]
EFFECT_COLUMNS = ["dictionary", "feature", "at", "multiple", "value", "prompt_id", "prompt", "clean_activation", "token",
                  "p_clean", "p_steered", "ratio", "vocab_ratio", "kl"]


# ----------------------------------------------------------------------------- helpers

def concept_ids(tokenizer, tokens=CONCEPT_TOKENS) -> dict[str, int]:
    """``{token: id}`` of the entries that are exactly one token (others are dropped)."""
    ids = {t: tokenizer.encode(t, add_special_tokens=False) for t in tokens}
    return {t: i[0] for t, i in ids.items() if len(i) == 1}


def _pad(model, texts) -> tuple[Tensor, Tensor]:
    """Right-padded tokens ``[B, T]`` (no BOS) and each text's length as a tensor."""
    tokens_BT, lengths = tokenize_padded(model, list(texts))
    return tokens_BT, torch.tensor(lengths)


@torch.no_grad()
def text_features(model, dictionary, texts) -> Tensor:
    """Feature activations ``[N, F]`` at every real position but the first of ``texts``."""
    tokens_BT, lengths = _pad(model, texts)
    _, cache = model.run_with_cache(tokens_BT, names_filter=lambda n: n in dictionary.hooks)
    acts_BTLD = torch.stack([cache[h] for h in dictionary.hooks], dim=2).float()
    pos_T = torch.arange(tokens_BT.shape[1])
    keep_BT = (pos_T[None] < lengths[:, None]) & (pos_T[None] >= 1)
    device = dictionary.norm_factors.device
    return dictionary.encode(acts_BTLD[keep_BT.to(acts_BTLD.device)].to(device), normalized=False).float().cpu()


@torch.no_grad()
def logit_table(dictionary, model, features: list[int], layers: list[int], ids: list[int], *,
                top_tokens: int = 5) -> pd.DataFrame:
    """Per feature, at the given layer: logit_effect (mean raw effect on ``ids``), logit_z, concept_rank
    (best vocabulary rank of an ``ids`` token), top_logits (the ``top_tokens`` most raised, joined by "|")."""
    from crosslayer.features import unembed_matrix

    W_U = unembed_matrix(model)  # W_U scaled by the final norm's gain, as in features.logit_effects
    rows = []
    for layer in sorted(set(layers)):
        feats = [f for f, l in zip(features, layers) if l == layer]
        effect_NV = dictionary.decoder_vectors(layer, normalized=False)[feats] @ W_U
        concept_NC = effect_NV[:, ids]
        z_NC = (concept_NC - effect_NV.mean(1, keepdim=True)) / effect_NV.std(1, keepdim=True).clamp_min(1e-12)
        rank_N = ((effect_NV[:, None, :] > concept_NC[:, :, None]).sum(-1) + 1).min(1).values
        top_NK = effect_NV.topk(top_tokens, dim=1).indices
        for j, f in enumerate(feats):
            rows.append({"feature": f, "layer": layer, "logit_effect": float(concept_NC[j].mean()),
                         "logit_z": float(z_NC[j].mean()), "concept_rank": int(rank_N[j]),
                         "top_logits": "|".join(model.tokenizer.decode([t]) for t in top_NK[j].tolist())})
    return pd.DataFrame(rows)


def _standardise(x: pd.Series) -> pd.Series:
    sd = x.std()
    return (x - x.mean()) / sd if sd and sd == sd else x * 0.0


def candidates(model, dictionary, store, ids: dict[str, int], cfg: Config = Config(), *,
               name: str = "") -> pd.DataFrame:
    """Candidate features of ``dictionary`` for the concept (see the module docstring), one row each."""
    from crosslayer.features import find_features_for_token, top_activations

    found = pd.concat([find_features_for_token(dictionary, model, t, top=cfg.n_logit) for t in ids])
    best = found.sort_values("effect").drop_duplicates("feature", keep="last").set_index("feature")["layer"]
    concept_NF = text_features(model, dictionary, CONCEPT_TEXTS)
    control_MF = text_features(model, dictionary, CONTROL_TEXTS)
    contrast_F = concept_NF.mean(0) - control_MF.mean(0)
    by_act = contrast_F.topk(min(cfg.n_act, dictionary.n_features)).indices.tolist()
    pool = sorted(set(best.index) | set(by_act))
    writes_FL = dictionary.writes_FL().cpu()
    norms_FL = dictionary.decoder_norms().float().cpu()
    # a feature writing one layer is read there; otherwise where its logit effect is largest, else its peak
    layer_of = {f: dictionary.layers[int(writes_FL[f].float().argmax())] if int(writes_FL[f].sum()) == 1
                else int(best[f]) if f in best.index else dictionary.layers[int(norms_FL[f].argmax())] for f in pool}
    table = logit_table(dictionary, model, pool, [layer_of[f] for f in pool], list(ids.values()),
                        top_tokens=cfg.top_tokens)
    table["source"] = ["both" if f in best.index and f in by_act else "logit" if f in best.index else "activation"
                       for f in table["feature"]]
    table["concept_act"] = concept_NF.mean(0)[table["feature"]].numpy()
    table["control_act"] = control_MF.mean(0)[table["feature"]].numpy()
    table["act_contrast"] = contrast_F[table["feature"]].numpy()
    acts = top_activations(dictionary, store, table["feature"].tolist(), k=8, per_band=0,
                           tokenizer=model.tokenizer)
    stats = acts.stats.set_index("feature")
    table["density"] = table["feature"].map(stats["density"])
    table["store_max"] = table["feature"].map(stats["max"])
    prompt_max = torch.cat([concept_NF, control_MF]).max(0).values
    table["scale"] = np.where(table["store_max"] > 0, table["store_max"], prompt_max[table["feature"]].numpy())
    examples = acts.examples[acts.examples.kind == "top"].groupby("feature")["token"]
    table["top_examples"] = table["feature"].map(examples.apply(lambda s: "|".join(s))).fillna("")
    table["eligible"] = (table["density"] <= cfg.max_density) & (table["scale"] > 0)
    table["score"] = _standardise(table["logit_z"]) + _standardise(table["act_contrast"])
    pick = table[table["eligible"]] if table["eligible"].any() else table[table["scale"] > 0]
    if pick.empty:
        raise CrosslayerError(f"no candidate feature of the {name or 'dictionary'} ever fires; train it longer")
    table["chosen"] = table["feature"] == pick.loc[pick["score"].idxmax(), "feature"]
    table.insert(0, "dictionary", name)
    return table.sort_values("score", ascending=False)[CANDIDATE_COLUMNS].reset_index(drop=True)


@torch.no_grad()
def clamp_effects(model, dictionary, feature: int, values: dict[float, float], prompts, ids: dict[str, int],
                  *, top: int = 5, at: str = "each") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clamp ``feature`` at each ``{multiple: value}`` on ``prompts``; (effects, top tokens up/down) tables.

    Effects: one row per (multiple, prompt, concept token) with p_clean, p_steered, ratio, and the
    prompt's vocab_ratio (geometric mean of the ratio over the whole vocabulary: a control for a merely
    flattened distribution) and KL(clean || steered) at the last position; top tokens: the ``top`` tokens whose
    probability rose / fell most per (multiple, prompt).
    """
    from crosslayer.interventions import Edit, deltas, run_with_edits

    tokens_BT, lengths = _pad(model, prompts)
    batch_B, last_B = torch.arange(len(prompts)), lengths - 1
    clean_BV = torch.log_softmax(model(tokens_BT).float().cpu()[batch_B, last_B], -1)
    _, feats_BTF = deltas(model, dictionary, tokens_BT, [Edit(feature, "scale", 1.0)])
    clean_act_B = feats_BTF[..., feature].float().cpu()[batch_B, last_B]
    tok_names, tok_ids = list(ids), torch.tensor(list(ids.values()), dtype=torch.long)
    effects, tops = [], []
    for multiple, value in values.items():
        logits = run_with_edits(model, dictionary, tokens_BT, [Edit(feature, "clamp", float(value))], at=at)
        steered_BV = torch.log_softmax(logits.float().cpu()[batch_B, last_B], -1)
        kl_B = (clean_BV.exp() * (clean_BV - steered_BV)).sum(-1).clamp_min(0.0)
        vocab_B = (steered_BV - clean_BV).mean(-1).exp()  # geometric-mean ratio over the whole vocabulary
        p0_BC, p1_BC = clean_BV[:, tok_ids].exp(), steered_BV[:, tok_ids].exp()
        for b, prompt in enumerate(prompts):
            base = {"feature": feature, "at": at, "multiple": multiple, "value": float(value), "prompt_id": b,
                    "prompt": prompt}
            effects += [{**base, "clean_activation": float(clean_act_B[b]), "token": t, "p_clean": float(p0_BC[b, c]),
                         "p_steered": float(p1_BC[b, c]), "ratio": float(p1_BC[b, c] / p0_BC[b, c].clamp_min(1e-30)),
                         "vocab_ratio": float(vocab_B[b]), "kl": float(kl_B[b])} for c, t in enumerate(tok_names)]
            diff_V = steered_BV[b].exp() - clean_BV[b].exp()
            for direction, idx in (("up", diff_V.topk(top).indices), ("down", (-diff_V).topk(top).indices)):
                tops += [{**base, "direction": direction, "rank": r, "token": model.tokenizer.decode([t]),
                          "p_clean": float(clean_BV[b, t].exp()), "p_steered": float(steered_BV[b, t].exp())}
                         for r, t in enumerate(idx.tolist(), 1)]
    return pd.DataFrame(effects), pd.DataFrame(tops)


def _generations(model, dictionary, feature: int, multiple: float, value: float, cfg: Config) -> pd.DataFrame:
    """Seeded generations on the first ``cfg.gen_prompts`` prompts, clean (``dictionary`` None) or with
    ``feature`` clamped at ``value`` (edited ``cfg.at``)."""
    from crosslayer.interventions import Edit, generate

    edits = [] if dictionary is None else [Edit(feature, "clamp", value)]
    rows = [{"dictionary": "clean", "feature": feature, "multiple": multiple, "value": value, "prompt_id": p,
             "prompt": prompt, "at": cfg.at if edits else "",
             "text": generate(model, dictionary, prompt, edits, at=cfg.at, max_new_tokens=cfg.gen_tokens,
                              seed=cfg.seed, temperature=cfg.gen_temperature)}
            for p, prompt in enumerate(STEER_PROMPTS[:cfg.gen_prompts])]
    return pd.DataFrame(rows)


def _store_counts(store, ids: dict[str, int]) -> dict[str, int]:
    token_ids = store.meta()["token_id"]
    return {t: int((token_ids == i).sum()) for t, i in ids.items()}


def run(ctx, cfg: Config) -> dict:
    model, heldout, results = ctx.model, ctx.store("heldout"), ctx.results(NAME)
    ids = concept_ids(model.tokenizer)
    if not ids:
        raise CrosslayerError(f"none of the concept tokens {CONCEPT_TOKENS} is one token for this tokenizer")
    train_counts, heldout_counts = _store_counts(ctx.store("train"), ids), _store_counts(heldout, ids)
    write_csv(pd.DataFrame({"token": list(ids), "token_id": list(ids.values()),
                            "n_train": [train_counts[t] for t in ids], "n_heldout": [heldout_counts[t] for t in ids]}),
              results / "concept_tokens.csv")
    cands, effects, tops, gens = [], [], [], [_generations(model, None, -1, float("nan"), float("nan"), cfg)]
    for name, dictionary in (("SAE", ctx.saes()), ("crosscoder", ctx.crosscoder())):
        table = candidates(model, dictionary, heldout, ids, cfg, name=name)
        cands.append(table)
        chosen = table[table["chosen"]].iloc[0]
        feature, scale = int(chosen["feature"]), float(chosen["scale"])
        eff, top = clamp_effects(model, dictionary, feature, {m: m * scale for m in cfg.multiples}, STEER_PROMPTS, ids,
                                 top=cfg.top_tokens, at=cfg.at)
        effects.append(eff.assign(dictionary=name))
        tops.append(top.assign(dictionary=name))
        best = float(headline(eff.assign(dictionary=name)).iloc[0]["best_multiple"])
        gens.append(_generations(model, dictionary, feature, best, best * scale, cfg).assign(dictionary=name))
    write_csv(pd.concat(cands, ignore_index=True), results / "candidates.csv")
    effects = pd.concat(effects, ignore_index=True)[EFFECT_COLUMNS]
    write_csv(effects, results / "effects.csv")
    write_csv(pd.concat(tops, ignore_index=True)[["dictionary", "feature", "multiple", "value", "prompt_id", "prompt",
                                                  "direction", "rank", "token", "p_clean", "p_steered"]],
              results / "top_tokens.csv")
    write_csv(pd.concat(gens, ignore_index=True), results / "generations.csv")
    head = headline(effects)
    return {f"{r.dictionary}_{k}": float(getattr(r, k)) for r in head.itertuples()
            for k in ("feature", "best_multiple", "concept_ratio_best", "kl_best")}


def _gmean(x: pd.Series) -> float:
    return float(np.exp(np.log(x.clip(lower=1e-30)).mean()))


def headline(effects: pd.DataFrame) -> pd.DataFrame:
    """Per dictionary: feature; the best positive multiple (largest concept ratio: geometric mean of p steered /
    p clean over concept tokens and prompts) with its concept ratio, the vocabulary ratio and the mean KL; the
    concept ratio when ablated (0) and the concept ratio and KL at the largest multiple."""
    rows = []
    for name, part in effects.groupby("dictionary", sort=False):
        ratio = part.groupby("multiple")["ratio"].apply(_gmean)
        per_prompt = part.drop_duplicates(["multiple", "prompt_id"]).groupby("multiple")
        kl, vocab = per_prompt["kl"].mean(), per_prompt["vocab_ratio"].apply(_gmean)
        positive = ratio[ratio.index > 0]
        best = float(positive.idxmax() if len(positive) else ratio.idxmax())
        top = float(ratio.index.max())
        rows.append({"dictionary": name, "feature": int(part["feature"].iloc[0]),
                     "best_multiple": best, "concept_ratio_best": float(ratio.loc[best]),
                     "kl_best": float(kl.loc[best]),
                     "vocab_ratio_best": float(vocab.loc[best]),
                     "concept_ratio_abl": float(ratio.loc[0.0]) if 0.0 in ratio.index else float("nan"),
                     "max_multiple": top, "concept_ratio_max": float(ratio.loc[top]), "kl_max": float(kl.loc[top])})
    return pd.DataFrame(rows)


def concept_mass(effects: pd.DataFrame, dictionary: str, multiple: float) -> pd.DataFrame:
    """Per prompt: the concept tokens' total probability clean and steered at ``multiple`` (``p_clean``,
    ``p_steered``, ``prompt_id``): a number not dominated by tokens whose probability is ~0."""
    part = effects[(effects["dictionary"] == dictionary) & np.isclose(effects["multiple"], multiple)]
    return part.groupby("prompt_id", sort=True)[["p_clean", "p_steered"]].sum().reset_index()


def _mass_text(mass: pd.DataFrame) -> str:
    """``p 0.01 -> 0.03 (rises) on prompt 1, ...``: each prompt's direction read from its numbers."""
    digits = [3 if fmt(r.p_clean) != fmt(r.p_steered) else 6 for r in mass.itertuples()]
    parts = [f"{fmt(r.p_clean, d)} $\\to$ {fmt(r.p_steered, d)} on prompt {int(r.prompt_id) + 1} ("
             + ("rises" if r.p_steered > r.p_clean else "falls" if r.p_steered < r.p_clean else "unchanged") + ")"
             for r, d in zip(mass.itertuples(), digits)]
    n_up = int((mass["p_steered"] > mass["p_clean"]).sum())
    return f"{'; '.join(parts)}: it rises on {n_up} of {len(mass)} prompts"


# ----------------------------------------------------------------------------- rendering (CSVs only)

def _tex_tokens(joined: str, n: int = 4) -> str:
    parts = list(dict.fromkeys(str(joined).split("|")))[:n] if joined == joined and joined != "" else []
    return ", ".join(token_tex(t) for t in parts) if parts else "--"


def _clamp_axis(ax, multiples) -> None:
    """Evenly spaced clamp multiples on the x axis (the data's x is their index)."""
    ax.set_xticks(range(len(multiples)), [fmt(float(m)) for m in multiples], rotation=45)
    ax.set_xlabel("clamp / max activation")


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    effects = read_csv(results, "effects")
    multiples = sorted(effects["multiple"].unique())
    effects["x"] = effects["multiple"].map({m: i for i, m in enumerate(multiples)})
    token = effects["token"].iloc[0]
    one = effects[effects["token"] == token]
    names = list(dict.fromkeys(one["dictionary"]))
    prompts = list(dict.fromkeys(one["prompt"]))
    palette = dict(zip(prompts, sns.color_palette(n_colors=len(prompts))))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1.2, 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        part = one[one["dictionary"] == name]
        sns.lineplot(data=part, x="x", y="p_steered", hue="prompt", hue_order=prompts, palette=palette,
                     marker="o", ax=ax, legend=ax is axes[0, -1])
        for prompt, grp in part.groupby("prompt"):
            ax.axhline(grp["p_clean"].iloc[0], color=palette[prompt], ls=":", lw=1)
        ax.set(yscale="log", title=f"{name}, feature {int(part['feature'].iloc[0])}", ylabel=f"p({token!r}) steered")
        _clamp_axis(ax, multiples)
    sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1), fontsize=7, title="prompt")
    paths = [(save_figure(fig, figures_dir / "steering_concept_prob.png"),
              f"Steering: next-token probability of {token_tex(token)} when the chosen feature is clamped to "
              f"multiples of its maximum held-out activation (0 = ablated), per dictionary and prompt; dotted "
              f"lines: the clean probability.")]

    eff = effects.assign(log2_ratio=np.log2(effects["ratio"].clip(lower=1e-30)))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1.2, 3.6), sharey=True, squeeze=False)
    order = list(dict.fromkeys(eff["token"]))
    for ax, name in zip(axes[0], names):
        sns.lineplot(data=eff[eff["dictionary"] == name], x="x", y="log2_ratio", hue="token", hue_order=order,
                     estimator="mean", errorbar=None, marker="o", ax=ax, legend=ax is axes[0, -1])
        vocab = eff[eff["dictionary"] == name].drop_duplicates(["x", "prompt_id"]).groupby("x")["vocab_ratio"]
        ax.plot(vocab.apply(lambda r: np.log2(r.clip(lower=1e-30)).mean()), color="black", ls="--", lw=1.2,
                label="whole vocabulary")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=name, ylabel="log2 p steered / p clean")
        _clamp_axis(ax, multiples)
    sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1), fontsize=7, title="token")
    paths.append((save_figure(fig, figures_dir / "steering_concept_ratio.png"),
                  "Steering: log2 ratio of steered to clean probability of each concept token (mean over the "
                  "prompts) against the clamp value, per dictionary; dashed: the mean log2 ratio over the whole "
                  "vocabulary (a flattened distribution raises rare tokens without any concept)."))

    kl = effects.drop_duplicates(["dictionary", "multiple", "prompt_id"])
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    sns.lineplot(data=kl, x="x", y="kl", hue="dictionary", hue_order=names, marker="o", errorbar=None, ax=ax)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set(ylabel="KL(clean || steered) [nats]", ylim=(0, None))
    _clamp_axis(ax, multiples)
    paths.append((save_figure(fig, figures_dir / "steering_kl.png"),
                  "Steering: KL divergence of the steered from the clean next-token distribution at the last "
                  "position (mean over prompts) against the clamp value."))
    return paths


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    cands = read_csv(results, "candidates")
    head = headline(read_csv(results, "effects")).set_index("dictionary")
    chosen = cands[cands["chosen"].astype(str) == "True"].copy()
    chosen["dict_tex"] = chosen["dictionary"].map(latex_escape)
    chosen["feature_tex"] = chosen["feature"].astype(int).astype(str)
    chosen["logits_tex"] = chosen["top_logits"].map(_tex_tokens)
    chosen["examples_tex"] = chosen["top_examples"].map(_tex_tokens)
    for col in ("best_multiple", "concept_ratio_best", "kl_best", "concept_ratio_abl", "kl_max"):
        chosen[col] = chosen["dictionary"].map(head[col])
    main = latex_table(chosen, tables_dir / f"{NAME}.tex", label="tab:steering",
                       caption=("Steering: the feature chosen in each dictionary -- its density on held-out tokens, "
                                "maximum activation, mean standardised logit effect on the concept tokens (z), best "
                                "vocabulary rank of a concept token by logit effect, top logit effects and "
                                "top-activating held-out tokens -- and, clamped at its best multiple of the maximum "
                                "activation, the concept ratio (geometric mean of p steered / p clean over concept "
                                "tokens and prompts) and the KL (nats); then the concept ratio when ablated and the "
                                "KL at the largest clamp."),
                       columns={"dict_tex": "dictionary", "feature_tex": "feature", "layer": "layer",
                                "density": "density", "scale": "max act.", "logit_z": "z", "concept_rank": "rank",
                                "logits_tex": "top logits", "examples_tex": "top examples",
                                "best_multiple": "best x", "concept_ratio_best": "ratio", "kl_best": "KL",
                                "concept_ratio_abl": "ratio abl.", "kl_max": "KL max"},
                       raw_columns=("dict_tex", "feature_tex", "logits_tex", "examples_tex"))
    gens = read_csv(results, "generations")
    lines = ["% generated from CSV results; do not edit", "\\begin{table}[tbp]", "\\centering\\small",
             f"\\caption{{Steering: {cfg.gen_tokens} sampled tokens (temperature {fmt(cfg.gen_temperature)}, seed {cfg.seed}, "
             f"the same random draws in every row) after the prompt, clean and with the chosen feature clamped at "
             f"its best multiple of its maximum activation.}}", "\\label{tab:steering_generations}",
             "\\begin{tabular}{p{0.24\\linewidth}p{0.68\\linewidth}}", "\\toprule", "run & continuation \\\\"]
    for _, grp in gens.groupby("prompt_id", sort=True):
        prompt = _ascii(grp["prompt"].iloc[0])
        lines += ["\\midrule", f"\\multicolumn{{2}}{{p{{0.94\\linewidth}}}}{{\\emph{{{prompt}}}}} \\\\"]
        for r in grp.itertuples():
            run = "clean" if r.dictionary == "clean" else \
                f"{latex_escape(r.dictionary)} {int(r.feature)} at {fmt(float(r.multiple))}$\\times$"
            lines.append(f"{run} & {_ascii(r.text)} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    gen_path = tables_dir / f"{NAME}_generations.tex"
    write_text("\n".join(lines) + "\n", gen_path)
    return [main, gen_path]


def _ascii(text) -> str:
    """Escaped text with anything outside printable ASCII shown as '?' (generations can be any bytes)."""
    return latex_escape("".join(ch if 32 <= ord(ch) < 127 else ("\\n" if ch == "\n" else "?") for ch in str(text)))


_AT_TEXT = {"each": "every layer the feature writes is set to the clean run plus its intended change",
            "first": "only the first layer it writes is edited; the model carries the change on",
            "peak": "only its peak layer is edited; the model carries the change on"}


def answer(results: Path, cfg: Config) -> str:
    cands = read_csv(results, "candidates")
    effects = read_csv(results, "effects")
    concept = read_csv(results, "concept_tokens")
    head = headline(effects)
    n_prompts, n_tokens = effects["prompt_id"].nunique(), effects["token"].nunique()
    at = str(effects["at"].iloc[0]) if "at" in effects else cfg.at
    text = [f"The {len(concept)} one-token concept words ({', '.join(token_tex(t) for t in concept['token'])}) "
            f"occur {int(concept['n_train'].sum())} times in the training store. Features are clamped in mode "
            f"\\texttt{{{at}}} ({_AT_TEXT.get(at, 'see crosslayer.interventions')})."]
    for r in head.itertuples():
        c = cands[(cands["dictionary"] == r.dictionary) & (cands["chosen"].astype(str) == "True")].iloc[0]
        mine = cands[cands["dictionary"] == r.dictionary]
        n_dense = int((mine["density"] > cfg.max_density).sum())
        lift = r.concept_ratio_best / max(r.vocab_ratio_best, 1e-30)
        works = r.concept_ratio_best >= cfg.steer_ratio and lift >= cfg.steer_ratio
        text.append(
            f"The chosen {latex_escape(r.dictionary)} feature {r.feature} (layer {int(c['layer'])}, density "
            f"{fmt(100 * float(c['density']))}\\%; {n_dense} of {len(mine)} candidates excluded as denser than "
            f"{fmt(100 * cfg.max_density)}\\%) has its best-ranked concept token at rank {int(c['concept_rank'])} of "
            f"the vocabulary by logit effect. Clamped at {fmt(r.best_multiple)}$\\times$ its maximum activation "
            f"({fmt(float(c['scale']))}), the best of the grid, it multiplies the concept tokens' probabilities by "
            f"{fmt(r.concept_ratio_best)} (geometric mean over {n_tokens} tokens and {n_prompts} prompts; "
            f"{fmt(lift)} times the vocabulary-wide ratio) at a KL of {fmt(r.kl_best)} nats. The concept words' "
            f"total probability goes {_mass_text(concept_mass(effects, r.dictionary, r.best_multiple))}. "
            + ("It passes" if works else "It fails")
            + f" the steering criterion (concept ratio and its ratio to the vocabulary-wide one both at least "
            f"{fmt(cfg.steer_ratio)})"
            + (f"; at {fmt(r.max_multiple)}$\\times$ the KL is {fmt(r.kl_max)} nats (concept ratio "
               f"{fmt(r.concept_ratio_max)})" if r.max_multiple != r.best_multiple else "")
            + f"; ablating it gives a concept ratio of {fmt(r.concept_ratio_abl)}.")
    if len(head) == 2:
        a, b = head.iloc[0], head.iloc[1]
        more, less = (a, b) if a.concept_ratio_best >= b.concept_ratio_best else (b, a)
        text.append(f"The {latex_escape(more.dictionary)} feature moves the concept more "
                    f"({fmt(more.concept_ratio_best)}$\\times$ against {fmt(less.concept_ratio_best)}$\\times$).")
    return " ".join(text)


STUDY = Study(name=NAME, title="Steering with an SAE feature and a crosscoder feature", config=Config, run=run,
              figures=figures, tables=tables, answer=answer, dictionaries=("saes", "crosscoder"), order=60)
