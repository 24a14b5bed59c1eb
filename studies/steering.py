"""Steering: does clamping one SAE feature or one crosscoder feature make the model say "scam"?

Question
    The seed's motivating example: clamping a "suspicion" feature up makes " scam" more probable and clamping it
    down makes it less probable. Does that reproduce here, for a feature of the main per-layer SAEs and one of the
    main crosscoder (Templeton et al. 2024, "Scaling Monosemanticity", steering; research-notes section 5)?

Method
    Three disjoint sets of text, all fixed in this module before any steering outcome was computed on them:
    the selection sentences (``CONCEPT_TEXTS`` / ``CONTROL_TEXTS``, used only to choose the feature), the
    development prompts (``PROMPTS`` rows ``dev``, used only to choose the clamp-up value) and the evaluation
    prompts (``PROMPTS`` rows ``eval``, the only source of reported effects).

    1. Concept tokens: the entries of ``CONCEPT_TOKENS`` that are one token for the model's tokenizer
       (``concept_tokens.csv`` also counts how often each occurs in the training and held-out stores). The key
       token is the first of them (" scam"). The builtin corpus carries the concept in its ``concept_fraud``
       label (SMS scam messages and chat excerpts about scams, fraud, lying and suspicion; data/README.md gives
       the words' counts).
    2. Candidates: (a) per concept token the ``Config.n_logit`` features whose raw decoder direction most
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
    3. Choice of the feature (fixed before any steering outcome): features firing on more than
       ``Config.max_density`` of held-out tokens are excluded (session 1 found that the top " scam" feature by
       logit effect was a dense one whose clamping lowered " scam"), as are features that never fire (a feature
       silent on the store but active on the sentences is scaled by its maximum there). Score = ``logit_z`` +
       activation contrast, each standardised over the candidate pool; the best-scoring eligible feature is
       chosen (if none is eligible, the best-scoring one that fires, flagged ``eligible`` False).
    4. Clamp (:func:`crosslayer.interventions.run_with_edits`, error term kept, every position but the
       first; a crosscoder feature edited as ``Config.at`` says: ``each`` pins every layer it writes to
       the clean run plus its intended change, ``first`` / ``peak`` edit one layer and let the model carry
       it) to each of ``Config.multiples`` times the feature's maximum held-out activation (0 = ablation;
       negative = pushed against), on every prompt, at the last position: per concept token p clean / steered
       and their ratio; per prompt KL(clean || steered), the top tokens up and down, and the vocabulary ratio
       (geometric mean of p steered / p clean over the whole vocabulary: a flattened distribution raises rare
       tokens without any concept) (``effects.csv``, ``split`` dev / eval).
    5. Clamp-up value, from development rows only (:func:`choose_multiples`): per positive multiple the
       concept ratio (geometric mean of p steered / p clean over concept tokens and dev prompts) and the lift
       (concept ratio / vocabulary ratio); the chosen multiple maximises the smaller of the two logs (the
       verdict needs both above 1). Clamp-down: the fixed ``Config.down``.
    6. Per evaluation prompt, clamped up and down (``prompts.csv``): p(key token), the concept tokens' total
       probability (mass), the concept ratio (geometric mean over concept tokens), the vocabulary ratio, the
       lift and the KL. Over evaluation prompts (``stats.csv``, all prompts and per context, concept / neutral):
       the geometric mean of each ratio with a 95 % percentile-bootstrap interval over prompts
       (:func:`bootstrap_mean` on logs, ``Config.n_boot`` resamples), and the mean KL.
    7. Verdict (:func:`verdict`, all evaluation prompts): the seed's result reproduces with a feature only if
       clamping up raises the concept tokens (concept-ratio interval above 1) beyond the vocabulary control
       (lift interval above 1) and clamping down lowers them (concept-ratio interval below 1).
    8. Generations: ``Config.gen_tokens`` tokens sampled with one seed, clean, clamped up and clamped down,
       on the first ``Config.gen_prompts`` evaluation prompts (:func:`crosslayer.interventions.generate`).

    Cost: every (dictionary, multiple) is one batched clamped forward (plus the clean encode) over all
    ``len(PROMPTS)`` prompts, so the prompt count sets the batch, not the number of passes.

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
from studies.common import bootstrap_mean, fmt, latex_escape, latex_table, read_csv, save_figure, theme, token_tex

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
PROMPTS = (
    # (split, context, prompt). dev: the earlier study's three prompts (their outcomes were seen) and one neutral
    # context, used only to choose the clamp-up value. eval: written for this protocol before any outcome on them
    # was computed; "concept" contexts make a concept token plausible but not certain, "neutral" ones do not.
    ("dev", "concept", "The email asked me to send my bank details, which seemed"),
    ("dev", "concept", "He offered me a deal that was"),
    ("dev", "concept", "The caller said I had won a prize, but it was clearly a"),
    ("dev", "neutral", "The garden gate was open, and the dog ran into the"),
    ("eval", "concept", "I got a text saying my parcel was stuck at customs, and it turned out to be a"),
    ("eval", "concept", "The website wanted my card number before it showed the price, which felt"),
    ("eval", "concept", "My grandmother nearly lost her savings to a phone"),
    ("eval", "concept", "The bank blocked the payment because it looked"),
    ("eval", "concept", "All the reviews for that shop were five stars and looked"),
    ("eval", "concept", "He was sentenced to three years for insurance"),
    ("eval", "concept", "The police said the bike in his garage had been"),
    ("eval", "concept", "Before you click the link, check whether the message is a"),
    ("eval", "concept", "The investment promised to double her money in a week, a classic"),
    ("eval", "concept", "The auditor flagged several transactions as"),
    ("eval", "concept", "She forwarded the email to the IT team as a possible"),
    ("eval", "concept", "The man collecting money for the charity had a badge that was"),
    ("eval", "concept", "They warned customers about a new wave of online"),
    ("eval", "concept", "The landlord asked for the deposit in gift cards, which is a sign of a"),
    ("eval", "neutral", "After lunch we walked along the river and watched the"),
    ("eval", "neutral", "The teacher asked the class to open their books to the"),
    ("eval", "neutral", "The forecast for tomorrow says it will be"),
    ("eval", "neutral", "She poured the tea and said the cake was"),
    ("eval", "neutral", "The new library has a quiet reading room on the"),
    ("eval", "neutral", "He tuned the guitar before the concert and then"),
)


@dataclass(frozen=True)
class Config:
    """Settings of the steering study (defaults: the demo preset)."""

    multiples: tuple[float, ...] = (-1.0, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    """Clamp values as multiples of the feature's maximum activation on the held-out store."""
    down: float = -1.0
    """The clamp-down multiple reported against the dev-chosen clamp-up one (negative, one of ``multiples``)."""
    n_boot: int = 2000
    """Bootstrap resamples of the evaluation prompts."""
    gen_tokens: int = 12
    """Tokens sampled per generation."""
    gen_prompts: int = 3
    """Evaluation prompts generated from (the first ones)."""
    gen_temperature: float = 0.7
    """Sampling temperature of the generations."""
    seed: int = 0
    """Seeds the generations (the clean and steered ones share it) and the bootstrap."""
    at: str = "each"
    """Where a multi-layer feature is edited (:data:`crosslayer.interventions.AT`): first | peak | each."""
    max_density: float = 0.10
    """Candidates firing on more of the held-out tokens than this are not chosen."""
    n_logit: int = 8
    """Candidates per concept token by logit effect."""
    n_act: int = 16
    """Candidates by activation contrast (concept vs control sentences)."""
    top_tokens: int = 5
    """Tokens listed per direction (up / down) and per feature."""

    def __post_init__(self):
        if self.down >= 0 or self.down not in self.multiples:
            raise CrosslayerError(f"down={self.down} must be a negative entry of multiples {self.multiples}")
        if not any(m > 0 for m in self.multiples):
            raise CrosslayerError(f"multiples {self.multiples} need a positive entry to clamp up")


CANDIDATE_COLUMNS = ["dictionary", "feature", "layer", "source", "logit_effect", "logit_z", "concept_rank",
                     "concept_act", "control_act", "act_contrast", "density", "store_max", "scale", "eligible",
                     "score", "chosen", "top_logits", "top_examples"]
EFFECT_COLUMNS = ["dictionary", "feature", "at", "multiple", "value", "split", "context", "prompt_id", "prompt",
                  "clean_activation", "token", "p_clean", "p_steered", "ratio", "vocab_ratio", "kl"]
PROMPT_COLUMNS = ["dictionary", "feature", "at", "direction", "multiple", "value", "prompt_id", "context", "prompt",
                  "key_token", "p_key_clean", "p_key", "key_ratio", "mass_clean", "mass", "mass_ratio",
                  "concept_ratio", "vocab_ratio", "lift", "kl"]
RATIOS = ("concept_ratio", "lift", "vocab_ratio", "mass_ratio", "key_ratio")
"""Per-prompt ratios summarised by geometric means over evaluation prompts (``stats.csv``)."""
STAT_COLUMNS = (["dictionary", "feature", "at", "direction", "multiple", "prompts", "n_prompts"]
                + [f"{m}{s}" for m in (*RATIOS, "kl") for s in ("", "_lo", "_hi")])


def prompt_table() -> pd.DataFrame:
    """``PROMPTS`` as a frame: prompt_id (row order), split, context, prompt."""
    table = pd.DataFrame(PROMPTS, columns=["split", "context", "prompt"])
    return table.rename_axis("prompt_id").reset_index()


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


def _generations(model, dictionary, feature: int, direction: str, multiple: float, value: float,
                 prompts: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Seeded generations on ``prompts``, clean (``dictionary`` None) or with ``feature`` clamped at ``value``
    (edited ``cfg.at``)."""
    from crosslayer.interventions import Edit, generate

    edits = [] if dictionary is None else [Edit(feature, "clamp", value)]
    rows = [{"dictionary": "clean", "feature": feature, "direction": direction, "multiple": multiple, "value": value,
             "prompt_id": int(r.prompt_id), "prompt": r.prompt, "at": cfg.at if edits else "",
             "text": generate(model, dictionary, r.prompt, edits, at=cfg.at, max_new_tokens=cfg.gen_tokens,
                              seed=cfg.seed, temperature=cfg.gen_temperature)}
            for r in prompts.itertuples()]
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
    prompts = prompt_table()
    gen_prompts = prompts[prompts["split"] == "eval"].head(cfg.gen_prompts)
    nan = float("nan")
    cands, effects, tops, gens = [], [], [], [_generations(model, None, -1, "clean", nan, nan, gen_prompts, cfg)]
    for name, dictionary in (("SAE", ctx.saes()), ("crosscoder", ctx.crosscoder())):
        table = candidates(model, dictionary, heldout, ids, cfg, name=name)
        cands.append(table)
        chosen = table[table["chosen"]].iloc[0]
        feature, scale = int(chosen["feature"]), float(chosen["scale"])
        eff, top = clamp_effects(model, dictionary, feature, {m: m * scale for m in cfg.multiples},
                                 prompts["prompt"].tolist(), ids, top=cfg.top_tokens, at=cfg.at)
        split = prompts[["prompt_id", "split", "context"]]
        effects.append(eff.merge(split, on="prompt_id").assign(dictionary=name))
        tops.append(top.merge(split, on="prompt_id").assign(dictionary=name))
        up = float(choose_multiples(effects[-1], cfg.down)["up"].iloc[0])  # dev rows only
        gens += [_generations(model, dictionary, feature, d, m, m * scale, gen_prompts, cfg).assign(dictionary=name)
                 for d, m in (("up", up), ("down", cfg.down))]
    write_csv(pd.concat(cands, ignore_index=True), results / "candidates.csv")
    effects = pd.concat(effects, ignore_index=True)[EFFECT_COLUMNS]
    write_csv(effects, results / "effects.csv")
    write_csv(pd.concat(tops, ignore_index=True)[["dictionary", "feature", "multiple", "value", "split", "prompt_id",
                                                  "prompt", "direction", "rank", "token", "p_clean", "p_steered"]],
              results / "top_tokens.csv")
    write_csv(pd.concat(gens, ignore_index=True), results / "generations.csv")
    stats = write_summaries(effects, results, cfg)
    main = stats[stats["prompts"] == "all"]
    info = {f"{r.dictionary}_{r.direction}_{k}": float(getattr(r, k)) for r in main.itertuples()
            for k in ("multiple", "concept_ratio", "lift")}
    return {**info, **{f"{d}_reproduces": bool(v) for d, v in verdict(stats)["reproduces"].items()}}


# ----------------------------------------------------------------------------- protocol and statistics

def dev_curve(effects: pd.DataFrame) -> pd.DataFrame:
    """Development rows only, per (dictionary, multiple): concept_ratio (geometric mean of p steered / p clean
    over concept tokens and prompts), vocab_ratio (geometric mean over prompts), lift (their ratio), mean kl."""
    dev = effects[effects["split"] == "dev"]
    dev = dev.assign(log_ratio=np.log(dev["ratio"].clip(lower=1e-30)),
                     log_vocab=np.log(dev["vocab_ratio"].clip(lower=1e-30)))
    per = dev.groupby(["dictionary", "multiple", "prompt_id"], sort=False)[["log_ratio", "log_vocab", "kl"]].mean()
    curve = per.groupby(level=["dictionary", "multiple"], sort=False).mean()
    return pd.DataFrame({"concept_ratio": np.exp(curve["log_ratio"]), "vocab_ratio": np.exp(curve["log_vocab"]),
                         "lift": np.exp(curve["log_ratio"] - curve["log_vocab"]), "kl": curve["kl"]}).reset_index()


def choose_multiples(effects: pd.DataFrame, down: float) -> pd.DataFrame:
    """Per dictionary (feature, at): the clamp-up multiple ``up``, the positive multiple whose smaller of log
    concept ratio and log lift on the development prompts is largest, and the fixed ``down``."""
    curve = dev_curve(effects)
    curve = curve[curve["multiple"] > 0]
    score = np.minimum(np.log(curve["concept_ratio"]), np.log(curve["lift"]))
    best = curve.loc[score.groupby(curve["dictionary"], sort=False).idxmax()]
    first = effects.drop_duplicates("dictionary").set_index("dictionary")
    return pd.DataFrame({"dictionary": best["dictionary"], "feature": best["dictionary"].map(first["feature"]),
                         "at": best["dictionary"].map(first["at"]), "up": best["multiple"], "down": down}
                        ).reset_index(drop=True)


def per_prompt(effects: pd.DataFrame, choice: pd.DataFrame) -> pd.DataFrame:
    """Evaluation rows only, per (dictionary, direction up / down at ``choice``'s multiples, prompt): the key
    token's (the first concept token) probability, the concept mass, concept_ratio (geometric mean over concept
    tokens), vocab_ratio, lift = concept_ratio / vocab_ratio, and kl (:data:`PROMPT_COLUMNS`)."""
    runs = choice.melt(id_vars="dictionary", value_vars=["up", "down"], var_name="direction", value_name="multiple")
    ev = effects[effects["split"] == "eval"].merge(runs, on=["dictionary", "multiple"])
    key = str(effects["token"].iloc[0])
    ev = ev.assign(log_ratio=np.log(ev["ratio"].clip(lower=1e-30)),
                   p_key_clean=ev["p_clean"].where(ev["token"] == key, 0.0),
                   p_key=ev["p_steered"].where(ev["token"] == key, 0.0))
    out = ev.groupby(["dictionary", "direction", "prompt_id"], sort=False).agg(
        feature=("feature", "first"), at=("at", "first"), multiple=("multiple", "first"), value=("value", "first"),
        context=("context", "first"), prompt=("prompt", "first"), p_key_clean=("p_key_clean", "sum"),
        p_key=("p_key", "sum"), mass_clean=("p_clean", "sum"), mass=("p_steered", "sum"),
        log_ratio=("log_ratio", "mean"), vocab_ratio=("vocab_ratio", "first"), kl=("kl", "first")).reset_index()
    out["concept_ratio"] = np.exp(out["log_ratio"])
    return out.assign(key_token=key, key_ratio=out["p_key"] / out["p_key_clean"].clip(lower=1e-30),
                      mass_ratio=out["mass"] / out["mass_clean"].clip(lower=1e-30),
                      lift=out["concept_ratio"] / out["vocab_ratio"].clip(lower=1e-30))[PROMPT_COLUMNS]


def prompt_stats(prompts: pd.DataFrame, *, n_boot: int, seed: int) -> pd.DataFrame:
    """Per (prompt subset: all / each context, dictionary, direction): the geometric mean over evaluation prompts
    of each of :data:`RATIOS` and the mean kl, each with its 95 % bootstrap interval over prompts."""
    rows = []
    for subset, part in [("all", prompts), *prompts.groupby("context", sort=True)]:
        for (name, direction), grp in part.groupby(["dictionary", "direction"], sort=False):
            values_PM = np.column_stack([np.log(grp[list(RATIOS)].clip(lower=1e-30)), grp["kl"]])
            est, lo, hi = bootstrap_mean(values_PM, n_boot=n_boot, seed=seed)
            back = np.r_[np.ones(len(RATIOS), bool), False]  # logs back to ratios; kl stays a mean
            est, lo, hi = (np.where(back, np.exp(v), v) for v in (est, lo, hi))
            row = {"dictionary": name, "feature": int(grp["feature"].iloc[0]), "at": grp["at"].iloc[0],
                   "direction": direction, "multiple": float(grp["multiple"].iloc[0]), "prompts": subset,
                   "n_prompts": len(grp)}
            for j, metric in enumerate((*RATIOS, "kl")):
                row.update({metric: est[j], f"{metric}_lo": lo[j], f"{metric}_hi": hi[j]})
            rows.append(row)
    return pd.DataFrame(rows, columns=STAT_COLUMNS)


def write_summaries(effects: pd.DataFrame, results: Path, cfg: Config) -> pd.DataFrame:
    """From ``effects``: ``prompts.csv`` (:func:`per_prompt` at the dev-chosen multiples) and ``stats.csv``
    (:func:`prompt_stats`); returns the stats."""
    prompts = per_prompt(effects, choose_multiples(effects, cfg.down))
    stats = prompt_stats(prompts, n_boot=cfg.n_boot, seed=cfg.seed)
    write_csv(prompts, results / "prompts.csv")
    write_csv(stats, results / "stats.csv")
    return stats


def verdict(stats: pd.DataFrame) -> pd.DataFrame:
    """Per dictionary, over all evaluation prompts: up_raises (concept-ratio interval above 1), up_beyond_vocab
    (lift interval above 1), down_lowers (concept-ratio interval below 1) and reproduces (all three)."""
    main = stats[stats["prompts"] == "all"].set_index(["direction", "dictionary"])
    up, down = main.loc["up"], main.loc["down"]
    out = pd.DataFrame({"up_raises": up["concept_ratio_lo"] > 1, "up_beyond_vocab": up["lift_lo"] > 1,
                        "down_lowers": down["concept_ratio_hi"].reindex(up.index) < 1})
    return out.assign(reproduces=out.all(axis=1))


# ----------------------------------------------------------------------------- rendering (CSVs only)

def _tex_tokens(joined: str, n: int = 4) -> str:
    parts = list(dict.fromkeys(str(joined).split("|")))[:n] if joined == joined and joined != "" else []
    return ", ".join(token_tex(t) for t in parts) if parts else "--"


def _ci(row, metric: str) -> str:
    """``estimate [lo, hi]`` of ``metric`` in a stats row."""
    return f"{fmt(float(row[metric]))} [{fmt(float(row[metric + '_lo']))}, {fmt(float(row[metric + '_hi']))}]"


def _clamp_axis(ax, multiples) -> None:
    """Evenly spaced clamp multiples on the x axis (the data's x is their index)."""
    ax.set_xticks(range(len(multiples)), [fmt(float(m)) for m in multiples], rotation=45)
    ax.set_xlabel("clamp / max activation")


def _dev_figure(effects: pd.DataFrame, stats: pd.DataFrame, path: Path):
    import matplotlib.pyplot as plt

    curve = dev_curve(effects)
    multiples = sorted(curve["multiple"].unique())
    curve["x"] = curve["multiple"].map({m: i for i, m in enumerate(multiples)})
    up = stats[(stats["direction"] == "up") & (stats["prompts"] == "all")].set_index("dictionary")["multiple"]
    names = list(dict.fromkeys(curve["dictionary"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1.2, 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        part = curve[curve["dictionary"] == name]
        for col, style, label in (("concept_ratio", "o-", "concept tokens"), ("lift", "s--", "concept / vocabulary"),
                                  ("vocab_ratio", ":", "whole vocabulary")):
            ax.plot(part["x"], np.log2(part[col].clip(lower=1e-30)), style, label=label)
        if name in up.index:
            ax.axvline(multiples.index(float(up[name])), color="black", lw=0.8, ls="-.", label="chosen clamp-up")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=name, ylabel="log2 p steered / p clean (dev prompts)" if ax is axes[0, 0] else "")
        _clamp_axis(ax, multiples)
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=7)
    return (save_figure(fig, path),
            "Steering, development prompts only (where the clamp-up value is chosen): log2 geometric-mean ratio of "
            "steered to clean probability of the concept tokens, of the whole vocabulary, and their ratio, against "
            "the clamp value (multiples of the feature's maximum held-out activation; 0 = ablated); dash-dotted: "
            "the chosen clamp-up multiple.")


def _eval_figure(prompts: pd.DataFrame, stats: pd.DataFrame, path: Path):
    import matplotlib.pyplot as plt
    import seaborn as sns

    names = list(dict.fromkeys(prompts["dictionary"]))
    main = stats[stats["prompts"] == "all"]
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names) + 1.2, 6.0), sharey="row", squeeze=False)
    for j, name in enumerate(names):
        part = prompts[prompts["dictionary"] == name].assign(
            **{f"log2_{m}": lambda d, m=m: np.log2(d[m].clip(lower=1e-30)) for m in ("concept_ratio", "lift")})
        for i, metric in enumerate(("concept_ratio", "lift")):
            ax = axes[i, j]
            sns.stripplot(data=part, x="direction", y=f"log2_{metric}", hue="context", order=["down", "up"],
                          hue_order=["concept", "neutral"], ax=ax, size=4, alpha=0.7,
                          legend=(i, j) == (0, len(names) - 1))
            s = main[main["dictionary"] == name].set_index("direction").reindex(["down", "up"])
            mid, lo, hi = (np.log2(s[c].to_numpy(float)) for c in (metric, f"{metric}_lo", f"{metric}_hi"))
            ax.errorbar([0, 1], mid, yerr=[mid - lo, hi - mid], fmt="D", color="black", capsize=4, zorder=5)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set(title=name if i == 0 else "", xlabel="clamp" if i == 1 else "",
                   ylabel="log2 concept / vocabulary" if i else "log2 concept p steered / clean")
    sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1), fontsize=7, title="context")
    return (save_figure(fig, path),
            "Steering, held-out evaluation prompts: per prompt (points), the log2 geometric-mean ratio of steered to "
            "clean probability of the concept tokens (top) and that ratio over the whole vocabulary's (bottom), "
            "clamped down and at the clamp-up value chosen on the development prompts; black: geometric mean over "
            "prompts with its 95\\% bootstrap interval over prompts.")


def _kl_figure(effects: pd.DataFrame, path: Path):
    import matplotlib.pyplot as plt
    import seaborn as sns

    multiples = sorted(effects["multiple"].unique())
    kl = effects.drop_duplicates(["dictionary", "multiple", "prompt_id"])
    kl = kl.assign(x=kl["multiple"].map({m: i for i, m in enumerate(multiples)}))
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    sns.lineplot(data=kl, x="x", y="kl", hue="dictionary", style="split", marker="o", errorbar=None, ax=ax)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set(ylabel="KL(clean || steered) [nats]", ylim=(0, None))
    _clamp_axis(ax, multiples)
    return (save_figure(fig, path),
            "Steering: KL divergence of the steered from the clean next-token distribution at the last position "
            "(mean over development or evaluation prompts) against the clamp value.")


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    theme()
    effects, prompts, stats = (read_csv(results, n) for n in ("effects", "prompts", "stats"))
    return [_dev_figure(effects, stats, figures_dir / "steering_dev.png"),
            _eval_figure(prompts, stats, figures_dir / "steering_eval.png"),
            _kl_figure(effects, figures_dir / "steering_kl.png")]


def _chosen_table(results: Path, tables_dir: Path) -> Path:
    cands, stats = read_csv(results, "candidates"), read_csv(results, "stats")
    main = stats[stats["prompts"] == "all"].set_index(["direction", "dictionary"])
    chosen = cands[cands["chosen"].astype(str) == "True"].copy()
    chosen["dict_tex"] = chosen["dictionary"].map(latex_escape)
    chosen["feature_tex"] = chosen["feature"].astype(int).astype(str)
    chosen["logits_tex"] = chosen["top_logits"].map(_tex_tokens)
    chosen["examples_tex"] = chosen["top_examples"].map(_tex_tokens)
    for d in ("up", "down"):
        part = main.loc[d]
        chosen[f"{d}_x"] = chosen["dictionary"].map(part["multiple"])
        chosen[f"{d}_ratio"] = chosen["dictionary"].map(lambda n: _ci(part.loc[n], "concept_ratio"))
        chosen[f"{d}_lift"] = chosen["dictionary"].map(lambda n: _ci(part.loc[n], "lift"))
        chosen[f"{d}_kl"] = chosen["dictionary"].map(part["kl"])
    n = int(main["n_prompts"].iloc[0])
    return latex_table(
        chosen, tables_dir / f"{NAME}.tex", label="tab:steering",
        caption=("Steering: the feature chosen in each dictionary -- density on held-out tokens, maximum activation, "
                 "mean standardised logit effect on the concept tokens (z), best vocabulary rank of a concept token "
                 "by logit effect, top logit effects and top-activating held-out tokens -- and, clamped up (at the "
                 "multiple of the maximum activation chosen on the development prompts) and down, on "
                 f"{n} held-out evaluation prompts: the concept ratio (geometric mean over prompts of p steered / "
                 "p clean, itself a geometric mean over concept tokens), its ratio to the vocabulary-wide ratio, "
                 "each with a 95\\% bootstrap interval over prompts, and the mean KL (nats)."),
        columns={"dict_tex": "dictionary", "feature_tex": "feature", "layer": "layer", "density": "density",
                 "scale": "max act.", "logit_z": "z", "concept_rank": "rank", "logits_tex": "top logits",
                 "examples_tex": "top examples", "up_x": "up x", "up_ratio": "ratio up", "up_lift": "/ vocab. up",
                 "up_kl": "KL up", "down_x": "down x", "down_ratio": "ratio down", "down_lift": "/ vocab. down",
                 "down_kl": "KL down"},
        raw_columns=("dict_tex", "feature_tex", "logits_tex", "examples_tex", "up_ratio", "up_lift", "down_ratio",
                     "down_lift"))


def _prompt_table(results: Path, tables_dir: Path) -> Path:
    prompts = read_csv(results, "prompts")
    wide = prompts.pivot_table(index=["prompt_id", "prompt", "context", "p_key_clean"],
                               columns=["dictionary", "direction"], values=["p_key", "lift", "kl"], sort=False)
    wide.columns = [f"{d}|{s}|{m}" for m, d, s in wide.columns]
    wide = wide.reset_index()
    wide["prompt_tex"] = wide["prompt"].map(_ascii)
    key = token_tex(str(prompts["key_token"].iloc[0]))
    columns = {"prompt_tex": "prompt", "context": "context", "p_key_clean": "p clean"}
    for name in dict.fromkeys(prompts["dictionary"]):
        columns.update({f"{name}|up|p_key": f"{name} p up", f"{name}|down|p_key": f"{name} p down",
                        f"{name}|up|lift": f"{name} / vocab. up", f"{name}|down|lift": f"{name} / vocab. down",
                        f"{name}|up|kl": f"{name} KL up"})
    return latex_table(wide, tables_dir / f"{NAME}_prompts.tex", label="tab:steering_prompts",
                       caption=(f"Steering, per held-out evaluation prompt: p({key}) clean and with the chosen feature "
                                "clamped up (dev-chosen multiple) and down, the concept tokens' geometric-mean ratio "
                                "steered / clean over the vocabulary-wide one, and the KL (nats) when clamped up."),
                       columns=columns, raw_columns=("prompt_tex",))


def _generation_table(results: Path, tables_dir: Path, cfg: Config) -> Path:
    gens = read_csv(results, "generations")
    lines = ["% generated from CSV results; do not edit", "\\begin{table}[tbp]", "\\centering\\small",
             f"\\caption{{Steering: {cfg.gen_tokens} sampled tokens (temperature {fmt(cfg.gen_temperature)}, seed "
             f"{cfg.seed}, the same random draws in every row) after held-out evaluation prompts, clean and with the "
             f"chosen feature clamped up (dev-chosen multiple of its maximum activation) and down.}}",
             "\\label{tab:steering_generations}",
             "\\begin{tabular}{p{0.24\\linewidth}p{0.68\\linewidth}}", "\\toprule", "run & continuation \\\\"]
    for _, grp in gens.groupby("prompt_id", sort=True):
        prompt = _ascii(grp["prompt"].iloc[0])
        lines += ["\\midrule", f"\\multicolumn{{2}}{{p{{0.94\\linewidth}}}}{{\\emph{{{prompt}}}}} \\\\"]
        for r in grp.itertuples():
            run = "clean" if r.dictionary == "clean" else \
                f"{latex_escape(r.dictionary)} {int(r.feature)} {r.direction} ({fmt(float(r.multiple))}$\\times$)"
            lines.append(f"{run} & {_ascii(r.text)} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    path = tables_dir / f"{NAME}_generations.tex"
    write_text("\n".join(lines) + "\n", path)
    return path


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    return [_chosen_table(results, tables_dir), _prompt_table(results, tables_dir),
            _generation_table(results, tables_dir, cfg)]


def _ascii(text) -> str:
    """Escaped text with anything outside printable ASCII shown as '?' (generations can be any bytes)."""
    return latex_escape("".join(ch if 32 <= ord(ch) < 127 else ("\\n" if ch == "\n" else "?") for ch in str(text)))


_AT_TEXT = {"each": "every layer the feature writes is set to the clean run plus its intended change",
            "first": "only the first layer it writes is edited; the model carries the change on",
            "peak": "only its peak layer is edited; the model carries the change on"}


def _failures(v) -> str:
    """What part of the seed's result fails for one :func:`verdict` row."""
    parts = (["clamping up does not raise the concept tokens' probability (its interval does not lie above 1)"]
             if not v.up_raises else [] if v.up_beyond_vocab else
             ["clamping up raises the concept tokens no more than the whole vocabulary (the interval of its ratio to "
              "the vocabulary-wide ratio does not lie above 1)"])
    if not v.down_lowers:
        parts.append("clamping down does not lower the concept tokens' probability (its interval does not lie below 1)")
    return "; ".join(parts)


def _feature_text(name: str, cands: pd.DataFrame, stats: pd.DataFrame, prompts: pd.DataFrame, v, cfg: Config,
                  n_dev: int) -> str:
    mine = cands[cands["dictionary"] == name]
    c = mine[mine["chosen"].astype(str) == "True"].iloc[0]
    s = stats[(stats["dictionary"] == name) & (stats["prompts"] == "all")].set_index("direction")
    up, down = s.loc["up"], s.loc["down"]
    p = prompts[prompts["dictionary"] == name]
    rises = int((p[p["direction"] == "up"].eval("mass > mass_clean")).sum())
    falls = int((p[p["direction"] == "down"].eval("mass < mass_clean")).sum())
    key = token_tex(str(p["key_token"].iloc[0]))
    return (
        f"The chosen {latex_escape(name)} feature {int(c['feature'])} (layer {int(c['layer'])}, density "
        f"{fmt(100 * float(c['density']))}\\%; {int((mine['density'] > cfg.max_density).sum())} of {len(mine)} "
        f"candidates excluded as denser than {fmt(100 * cfg.max_density)}\\%) has its best-ranked concept token at "
        f"rank {int(c['concept_rank'])} of the vocabulary by logit effect. On the {n_dev} development prompts the "
        f"clamp-up value is {fmt(float(up['multiple']))}$\\times$ its maximum activation ({fmt(float(c['scale']))}). "
        f"On the {int(up['n_prompts'])} evaluation prompts, clamping up multiplies the concept tokens' probability by "
        f"{_ci(up, 'concept_ratio')} ({_ci(up, 'lift')} times the vocabulary-wide ratio; {key} alone "
        f"{_ci(up, 'key_ratio')}) at a mean KL of {fmt(float(up['kl']))} nats, and their total probability rises on "
        f"{rises} of {len(p[p['direction'] == 'up'])} prompts; clamping down ({fmt(float(down['multiple']))}$\\times$) "
        f"multiplies it by {_ci(down, 'concept_ratio')} ({_ci(down, 'lift')} times the vocabulary-wide ratio; {key} "
        f"alone {_ci(down, 'key_ratio')}), KL {fmt(float(down['kl']))} nats, the total falling on {falls} of "
        f"{len(p[p['direction'] == 'down'])} prompts. "
        + ("With this feature the seed's result reproduces." if v.reproduces else
           f"With this feature the seed's result does not reproduce: {_failures(v)}."))


def _summary(verdicts: pd.DataFrame) -> str:
    ok = verdicts["reproduces"]
    yes, no = ([latex_escape(n) for n in verdicts.index[mask]] for mask in (ok, ~ok))
    if not yes:
        return "In short, the seed's result does not reproduce on \\texttt{\\clmodelname} with any chosen feature."
    return (f"In short, the seed's result reproduces on \\texttt{{\\clmodelname}} with the {' and the '.join(yes)} "
            f"feature{'s' if len(yes) > 1 else ''}" + (f", not with the {' or the '.join(no)} feature" if no else "")
            + ".")


def answer(results: Path, cfg: Config) -> str:
    cands, effects, concept = (read_csv(results, n) for n in ("candidates", "effects", "concept_tokens"))
    stats, prompts = read_csv(results, "stats"), read_csv(results, "prompts")
    verdicts = verdict(stats)
    at = str(stats["at"].iloc[0])
    n_dev = int(effects.loc[effects["split"] == "dev", "prompt_id"].nunique())
    text = [f"The {len(concept)} one-token concept words ({', '.join(token_tex(t) for t in concept['token'])}) "
            f"occur {int(concept['n_train'].sum())} times in the training store. Features are chosen on selection "
            f"sentences, the clamp-up value on {n_dev} development prompts, and every effect below is measured on "
            f"held-out evaluation prompts (ratios are geometric means over prompts with 95\\% bootstrap intervals "
            f"over prompts). Features are clamped in mode \\texttt{{{at}}} "
            f"({_AT_TEXT.get(at, 'see crosslayer.interventions')})."]
    text += [_feature_text(name, cands, stats, prompts, v, cfg, n_dev) for name, v in verdicts.iterrows()]
    text.append(_summary(verdicts))
    return " ".join(text)


STUDY = Study(name=NAME, title="Steering with an SAE feature and a crosscoder feature", config=Config, run=run,
              figures=figures, tables=tables, answer=answer, dictionaries=("saes", "crosscoder"), order=60)
