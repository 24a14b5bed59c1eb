"""Logit lens: at which layer do the model's next-token predictions form?

Question
    Reading every layer's residual stream through the model's own final norm and unembedding (the
    logit lens, nostalgebraist 2020; the baseline of Belrose et al. 2023), how far is each layer's
    next-token distribution from the final one (KL), what rank does the known answer have, and at
    which layer does the answer first enter the top-k and become the top-1 -- by prompt category?

Method
    - The first ``Config.prompts`` rows of ``data/prompts.jsonl`` (prompt, answer, category).
      Answers must be one token (tokenized without BOS, as the model reads them); multi-token answers
      are skipped and listed in ``skipped.csv``.
    - One batched forward pass caches ``blocks.0.hook_resid_pre`` (the embedding, layer -1) and every
      ``blocks.{l}.hook_resid_post``. At each prompt's last position, each layer is decoded with
      :func:`crosslayer.lens.decode_layer` (exactly as :func:`crosslayer.lens.logit_lens` decodes
      it; a test checks parity), giving ``KL(p_final || p_l)`` (nats), the entropy, the answer's
      rank (1 = top-1) and probability, and the layer's top-1 token. Only the last position is
      decoded: that is the next-token prediction the answer refers to, and it costs 1/positions
      of the full lens table.
    - Per prompt: the first layer at which the answer is in the top-``Config.top_k`` and at which it is
      the top-1 (empty if never), and the first layer from which KL stays below ``Config.kl_nats`` nat.
      Summaries per category are medians over prompts that reach the milestone.

Answer
    Generated from the CSVs by every run into ``paper/tables/logit_lens_answer.tex`` (numbers are never
    typed here).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crosslayer.errors import CrosslayerError
from crosslayer.hooks import hook_name
from crosslayer.io import write_csv
from crosslayer.models import tokenize_padded
from studies.base import Study
from studies.common import fmt, latex_escape, latex_table, read_csv, save_figure, theme

NAME = "logit_lens"
PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts.jsonl"
EMBED = -1


@dataclass(frozen=True)
class Config:
    """Settings of the logit-lens study (defaults: the demo preset)."""

    prompts: int = 64
    """Prompts of data/prompts.jsonl used (the first ones)."""
    top_k: int = 5
    """The answer "enters the top-k" at the first layer where its rank is at most this."""
    kl_nats: float = 1.0
    """The distribution "has formed" from the first layer after which KL to the final stays below this."""
    tuned_steps: int = 120
    """Training steps of the tuned lens (:mod:`crosslayer.tuned_lens`) compared with the logit lens (0: none)."""
    tuned_every: int = 4
    """The tuned lens reads the embedding and every ``tuned_every``-th layer (the full-vocabulary decode of
    each layer read dominates its training cost)."""
    tuned_positions: int = 128
    """Tokens decoded per tuned-lens training step (4 windows a step)."""
    kl_tokens: int = 4_096
    """Held-out tokens on which KL(final || layer) of both lenses is measured, with document-bootstrap CIs."""

BY_LAYER_COLUMNS = ["prompt_id", "category", "answer", "layer", "kl_to_final", "entropy", "answer_rank",
                    "answer_prob", "answer_in_topk", "answer_top1", "top1_token", "top1_prob"]
FIRST_COLUMNS = ["prompt_id", "category", "prompt", "answer", "final_top1_token", "final_rank", "final_correct",
                 "first_topk_layer", "first_top1_layer", "kl_settle_layer"]


def load_prompts(n: int, path: Path = PROMPTS) -> pd.DataFrame:
    """The first ``n`` rows of the prompt set (columns prompt, answer, category, prompt_id)."""
    if not path.is_file():
        raise CrosslayerError(f"prompt set {path} is missing; it ships with the repository (data/prompts.jsonl)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if n < 1 or n > len(rows):
        raise CrosslayerError(f"prompts={n} but {path} holds {len(rows)} prompts; use 1..{len(rows)}")
    frame = pd.DataFrame(rows[:n])[["prompt", "answer", "category"]]
    return frame.assign(prompt_id=range(n))


def _hook(layer: int) -> str:
    return hook_name("resid_pre", 0) if layer == EMBED else hook_name("resid_post", layer)


@torch.no_grad()
def answer_lens(model, prompts: list[str], answer_ids: list[int], *, top_k: int, tuned=None) -> pd.DataFrame:
    """Logit lens (or, given ``tuned``, the tuned lens) at each prompt's last position with a per-prompt
    answer token.

    One row per (prompt index, layer), layers -1 (embedding) .. n_layers-1 (with ``tuned``: the layers
    it reads, and the last). Columns: prompt, layer, kl_to_final, entropy, answer_rank, answer_prob,
    top1_id, top1_prob, answer_in_topk, answer_top1.
    """
    from crosslayer.lens import decode_layer

    tokens_BP, lengths = tokenize_padded(model, prompts)  # right padding never leaks into real positions
    layers = [EMBED, *range(model.cfg.n_layers)]
    decode = lambda layer, resid: decode_layer(model, resid)  # noqa: E731
    if tuned is not None:
        layers, decode = sorted({*tuned.layers, model.cfg.n_layers - 1}), tuned.decoder(model)
    names = {_hook(layer) for layer in layers}
    logits_BPV, cache = model.run_with_cache(tokens_BP, names_filter=lambda name: name in names)
    batch_B = torch.arange(len(prompts), device=tokens_BP.device)
    last_B = torch.tensor(lengths, device=tokens_BP.device) - 1
    final_logp_BV = torch.log_softmax(logits_BPV[batch_B, last_B].float(), dim=-1)
    answer_B = torch.tensor(answer_ids, device=tokens_BP.device)
    out = []
    for layer in layers:
        logp_BV = decode(layer, cache[_hook(layer)][batch_B, last_B][:, None])[:, 0]
        p_BV = logp_BV.exp()
        answer_logp_B = logp_BV[batch_B, answer_B]
        rank_B = (logp_BV > answer_logp_B[:, None]).sum(-1) + 1
        top_logp_B, top_id_B = logp_BV.max(-1)
        out.append(pd.DataFrame({
            "prompt": batch_B.cpu().numpy(), "layer": layer,
            "kl_to_final": (final_logp_BV.exp() * (final_logp_BV - logp_BV)).nansum(-1).clamp_min(0).cpu().numpy(),
            "entropy": (-(p_BV * logp_BV).nansum(-1)).cpu().numpy(),
            "answer_rank": rank_B.cpu().numpy(), "answer_prob": answer_logp_B.exp().cpu().numpy(),
            "top1_id": top_id_B.cpu().numpy(), "top1_prob": top_logp_B.exp().cpu().numpy()}))
    table = pd.concat(out, ignore_index=True).sort_values(["prompt", "layer"], kind="stable", ignore_index=True)
    table["answer_in_topk"] = table["answer_rank"] <= top_k
    table["answer_top1"] = table["answer_rank"] == 1
    return table


def milestones(by_layer: pd.DataFrame, *, kl_nats: float) -> pd.DataFrame:
    """Per prompt_id: first_topk_layer, first_top1_layer (NaN if never), kl_settle_layer, final_rank."""
    by_layer = by_layer.sort_values(["prompt_id", "layer"])
    g = by_layer.groupby("prompt_id", sort=True)

    def first(mask: pd.Series) -> pd.Series:
        return by_layer["layer"].where(mask).groupby(by_layer["prompt_id"]).min()

    # KL settles at the layer after the last one with KL >= threshold (the final layer has KL 0)
    layers = np.sort(by_layer["layer"].unique())
    above = by_layer["layer"].where(by_layer["kl_to_final"] >= kl_nats).groupby(by_layer["prompt_id"]).max()
    nxt = np.minimum(np.searchsorted(layers, above.fillna(layers[0]).to_numpy()) + 1, len(layers) - 1)
    settle = pd.Series(np.where(above.isna(), layers[0], layers[nxt]), index=above.index)
    return pd.DataFrame({"first_topk_layer": first(by_layer["answer_in_topk"].astype(bool)),
                         "first_top1_layer": first(by_layer["answer_top1"].astype(bool)),
                         "kl_settle_layer": settle,
                         "final_rank": g["answer_rank"].last()}).reset_index()


def run(ctx, cfg: Config) -> dict:
    model = ctx.model
    prompts = load_prompts(cfg.prompts)
    ids = [model.to_tokens(a, prepend_bos=False)[0].tolist() for a in prompts["answer"]]
    prompts["n_answer_tokens"] = [len(i) for i in ids]
    results = ctx.results(NAME)
    skipped = prompts[prompts.n_answer_tokens != 1]
    write_csv(skipped[["prompt_id", "category", "prompt", "answer", "n_answer_tokens"]], results / "skipped.csv")
    kept = prompts[prompts.n_answer_tokens == 1].reset_index(drop=True)
    if kept.empty:
        raise CrosslayerError("no prompt of the lens set has a one-token answer for this tokenizer")
    answer_ids = [ids[i][0] for i in kept["prompt_id"]]
    first = _lens_tables(model, kept, answer_ids, cfg, results, prefix="")
    if cfg.tuned_steps:
        _tuned_lens_tables(ctx, kept, answer_ids, cfg, results)
    summary = summarize(first)
    write_csv(summary, results / "summary.csv")
    overall = summary[summary.category == "all"].iloc[0]
    return {"prompts": int(len(kept)), "skipped": int(len(skipped)), "n_layers": int(model.cfg.n_layers),
            "final_accuracy": float(overall["final_accuracy"]),
            "median_first_topk_layer": _num(overall["median_first_topk"]),
            "median_first_top1_layer": _num(overall["median_first_top1"]),
            "median_kl_settle_layer": _num(overall["median_kl_settle"])}


def _lens_tables(model, kept: pd.DataFrame, answer_ids: list[int], cfg: Config, results: Path, *, prefix: str,
                 tuned=None) -> pd.DataFrame:
    """``<prefix>lens_by_layer.csv`` and ``<prefix>first_entry.csv`` of one lens; returns the latter."""
    table = answer_lens(model, kept["prompt"].tolist(), answer_ids, top_k=cfg.top_k, tuned=tuned)
    table["top1_token"] = model.tokenizer.batch_decode([[i] for i in table["top1_id"]])
    by_layer = table.drop(columns="prompt").assign(prompt_id=kept["prompt_id"].to_numpy()[table["prompt"]],
                                                   category=kept["category"].to_numpy()[table["prompt"]],
                                                   answer=kept["answer"].to_numpy()[table["prompt"]])
    write_csv(by_layer[BY_LAYER_COLUMNS], results / f"{prefix}lens_by_layer.csv")
    final = by_layer[by_layer.layer == by_layer.layer.max()].set_index("prompt_id")
    first = kept.merge(milestones(by_layer, kl_nats=cfg.kl_nats), on="prompt_id")
    first["final_top1_token"] = first["prompt_id"].map(final["top1_token"])
    first["final_correct"] = first["final_rank"] == 1
    write_csv(first[FIRST_COLUMNS], results / f"{prefix}first_entry.csv")
    return first


def tuned_layers(n_layers: int, every: int) -> list[int]:
    """The embedding and every ``every``-th layer below the last."""
    return [EMBED, *range(every - 1, n_layers - 1, every)]


def _tuned_lens_tables(ctx, kept: pd.DataFrame, answer_ids: list[int], cfg: Config, results: Path) -> None:
    """Train a tuned lens on the training split, then ``tuned_lens_by_layer.csv`` / ``tuned_first_entry.csv``
    (the same prompts through it) and ``lens_kl.csv`` (held-out KL by layer of both lenses, with CIs)."""
    from crosslayer.tuned_lens import TunedLens, TunedLensConfig, lens_kl_by_layer, train_tuned_lens

    model, folder = ctx.model, ctx.dicts / "tuned_lens"
    layers = tuned_layers(model.cfg.n_layers, cfg.tuned_every)
    lcfg = TunedLensConfig(steps=cfg.tuned_steps, batch_windows=4, positions=cfg.tuned_positions)
    try:
        lens = TunedLens.load(folder)
        assert lens.layers == layers and lens.meta["training"] == asdict(lcfg)
    except (CrosslayerError, AssertionError, KeyError):
        train = ctx.windows("train", lcfg.steps * lcfg.batch_windows * ctx.sizes.seq_len)
        lens = train_tuned_lens(model, train, layers=layers, cfg=lcfg, progress=ctx.progress)
        lens.save(folder)
    _lens_tables(model, kept, answer_ids, cfg, results, prefix="tuned_", tuned=lens)
    kl = lens_kl_by_layer(model, ctx.windows("heldout", cfg.kl_tokens), lens)
    write_csv(kl.assign(train_tokens=lcfg.steps * lcfg.positions), results / "lens_kl.csv")


def _num(x):
    return None if pd.isna(x) else float(x)


def summarize(first: pd.DataFrame) -> pd.DataFrame:
    """Per category (and "all"): prompts, final accuracy, reach counts and median milestone layers.

    Both milestone medians are taken over the SAME prompts, those whose answer becomes the top-1 at
    some layer (``n_reach_top1``; reaching the top-1 implies reaching the top-k), so that they can be
    compared; ``n_reach_topk`` counts the prompts that ever reach the top-k."""
    def one(part: pd.DataFrame, category: str) -> dict:
        both = part.dropna(subset=["first_topk_layer", "first_top1_layer"])
        return {"category": category, "n_prompts": len(part),
                "final_accuracy": float(part["final_correct"].astype(bool).mean()),
                "median_final_rank": float(part["final_rank"].median()),
                "n_reach_topk": int(part["first_topk_layer"].notna().sum()),
                "n_reach_top1": len(both),
                "median_first_topk": both["first_topk_layer"].median(),
                "median_first_top1": both["first_top1_layer"].median(),
                "median_kl_settle": part["kl_settle_layer"].median()}

    rows = [one(part, str(cat)) for cat, part in first.groupby("category", sort=True)]
    return pd.DataFrame(rows + [one(first, "all")])


# ----------------------------------------------------------------------------- rendering (CSVs only)

def _layer_name(layer) -> str:
    return "the embedding" if layer == EMBED else f"layer {fmt(float(layer), 3)}"


def _depth(layer: float, n_layers: int) -> str:
    frac = (layer + 1) / (n_layers + 1)
    return "in the first third of the network" if frac < 1 / 3 else \
        "in the middle third of the network" if frac < 2 / 3 else "in the last third of the network"


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    theme()
    by_layer = read_csv(results, "lens_by_layer")
    first = read_csv(results, "first_entry")
    n_layers = int(by_layer["layer"].max()) + 1
    order = sorted(by_layer["category"].unique())
    paths = []

    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    sns.lineplot(data=by_layer, x="layer", y="kl_to_final", hue="category", hue_order=order, estimator="mean",
                 errorbar=("ci", 95), marker="o", markersize=3, ax=ax)
    ax.axhline(cfg.kl_nats, color="grey", lw=0.8, ls="--")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    ax.set(xlabel="layer (-1 = embedding)", ylabel="KL(final || layer) [nats]")
    paths.append((save_figure(fig, figures_dir / "logit_lens_kl.png"),
                  f"Logit lens: KL divergence from the final next-token distribution to each layer's, at the "
                  f"last prompt position (mean over prompts with 95\\% bootstrap interval, by category; "
                  f"{len(first)} prompts, {n_layers} layers; symlog scale, dashed line {fmt(cfg.kl_nats)} nat)."))

    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    sns.lineplot(data=by_layer, x="layer", y="answer_rank", hue="category", hue_order=order, estimator="median",
                 errorbar=("pi", 50), marker="o", markersize=3, ax=ax)
    ax.axhline(cfg.top_k, color="grey", lw=0.8, ls="--")
    ax.set(yscale="log", xlabel="layer (-1 = embedding)", ylabel="rank of the answer token (1 = top-1)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    paths.append((save_figure(fig, figures_dir / "logit_lens_rank.png"),
                  f"Logit lens: rank of the known answer token in each layer's next-token distribution "
                  f"(median over prompts with interquartile band, by category; log scale, dashed line "
                  f"rank {cfg.top_k})."))

    long = first.melt(id_vars=["prompt_id", "category"], value_vars=["first_topk_layer", "first_top1_layer"],
                      var_name="milestone", value_name="layer").dropna(subset=["layer"])
    long["milestone"] = long["milestone"].map({"first_topk_layer": f"enters top-{cfg.top_k}",
                                               "first_top1_layer": "becomes top-1"})
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if long.empty:
        ax.text(0.5, 0.5, f"no answer reaches the top-{cfg.top_k} at any layer", ha="center", va="center",
                transform=ax.transAxes)
    else:
        hue_order = [m for m in (f"enters top-{cfg.top_k}", "becomes top-1") if m in set(long["milestone"])]
        sns.boxplot(data=long, x="category", y="layer", hue="milestone", order=order, hue_order=hue_order,
                    fliersize=0, ax=ax)
        sns.stripplot(data=long, x="category", y="layer", hue="milestone", order=order, hue_order=hue_order,
                      dodge=True, palette={m: "black" for m in hue_order}, size=3, legend=False, ax=ax)
    ax.set(ylim=(EMBED - 0.5, n_layers - 0.5), xlabel="category", ylabel="layer (-1 = embedding)")
    ax.tick_params(axis="x", rotation=30)
    n_topk, n_top1 = int(first["first_topk_layer"].notna().sum()), int(first["first_top1_layer"].notna().sum())
    paths.append((save_figure(fig, figures_dir / "logit_lens_first_entry.png"),
                  f"Logit lens: first layer at which the answer token enters the top-{cfg.top_k} ({n_topk} of "
                  f"{len(first)} prompts ever do) and becomes the top-1 ({n_top1} of {len(first)}), by category; "
                  f"prompts that never reach a milestone are left out."))
    if (results / "lens_kl.csv").is_file():
        paths.append(_tuned_figure(results, figures_dir))
    return paths


def _tuned_figure(results: Path, figures_dir: Path) -> tuple[Path, str]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    kl = read_csv(results, "lens_kl")
    both = kl[kl.lens.isin(["logit", "tuned"])]
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    for (name, part), color in zip(both.groupby("lens", sort=True), sns.color_palette(n_colors=2)):
        ax.plot(part.layer, part.kl, marker="o", markersize=3, color=color, label=f"{name} lens")
        ax.fill_between(part.layer, part.kl_lo, part.kl_hi, color=color, alpha=0.25, lw=0)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="layer (-1 = embedding)", ylabel="held-out KL(final || layer) [nats]")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    row = kl.iloc[0]
    return (save_figure(fig, figures_dir / "logit_lens_vs_tuned.png"),
            f"Logit lens vs tuned lens (an affine translator per layer trained on {int(row.train_tokens):,} "
            f"training tokens): mean KL from the final next-token distribution to each layer's, over "
            f"{int(row.tokens):,} held-out tokens of {int(row.docs)} documents, with 95\\% bootstrap intervals over "
            f"documents (symlog scale).")


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    summary = read_csv(results, "summary")
    summary["category_tex"] = summary["category"].map(latex_escape)
    path = latex_table(summary, tables_dir / f"{NAME}.tex", label="tab:logit_lens",
                       caption=(f"Logit lens by prompt category: final top-1 accuracy, median final rank of the "
                                f"answer, how many prompts' answers ever enter the top-{cfg.top_k} and become top-1 "
                                f"(n), and, over those n prompts that become top-1 (the same prompts for both "
                                f"columns), the median first layer at which the answer enters the top-{cfg.top_k} "
                                f"and becomes top-1; and the layer after which KL to the final distribution stays "
                                f"below {fmt(cfg.kl_nats)} nat. Layer -1 is the embedding."),
                       columns={"category_tex": "category", "n_prompts": "prompts", "final_accuracy": "top-1 acc.",
                                "median_final_rank": "final rank", "n_reach_topk": f"reach top-{cfg.top_k}",
                                "n_reach_top1": "reach top-1 (n)", "median_first_topk": f"top-{cfg.top_k} layer",
                                "median_first_top1": "top-1 layer", "median_kl_settle": "KL settled"},
                       raw_columns=("category_tex",))
    return [path]


def answer(results: Path, cfg: Config) -> str:
    first = read_csv(results, "first_entry")
    by_layer = read_csv(results, "lens_by_layer")
    skipped = read_csv(results, "skipped")
    summary = summarize(first).set_index("category")
    n, n_layers = len(first), int(by_layer["layer"].max()) + 1
    acc = int(first["final_correct"].astype(bool).sum())
    n_topk = int(first["first_topk_layer"].notna().sum())
    both = first.dropna(subset=["first_topk_layer", "first_top1_layer"])
    topk, top1 = both["first_topk_layer"], both["first_top1_layer"]
    text = [f"Over {n} known-answer prompts" + (f" ({len(skipped)} more skipped: multi-token answers)"
                                                  if len(skipped) else "")
            + f", the model's own top-1 next token is the answer for {acc} ({fmt(100 * acc / n, 3)}\\%)."]
    if len(both):
        text.append(f"Read through the logit lens, the answer of {n_topk} prompts enters the top-{cfg.top_k} at "
                    f"some layer and that of {len(both)} becomes the top-1. Over those {len(both)} prompts, it first "
                    f"enters the top-{cfg.top_k} at {_layer_name(topk.median())} on median (interquartile "
                    f"{fmt(topk.quantile(0.25))}--{fmt(topk.quantile(0.75))}) and becomes the top-1 at "
                    f"{_layer_name(top1.median())} (interquartile {fmt(top1.quantile(0.25))}--"
                    f"{fmt(top1.quantile(0.75))}).")
    else:
        text.append(f"The answer of {n_topk} of {n} prompts enters the top-{cfg.top_k} at some layer; none becomes "
                    "the top-1 at any layer.")
    settle = first["kl_settle_layer"]
    kl_mean = by_layer.groupby("layer")["kl_to_final"].mean()
    mid = int(kl_mean.index[len(kl_mean) // 2])
    text.append(f"KL to the final distribution stays below {fmt(cfg.kl_nats)} nat from {_layer_name(settle.median())} "
                f"on median of {n_layers} layers (mean KL {fmt(float(kl_mean.iloc[0]))} nats at the embedding, "
                f"{fmt(float(kl_mean.loc[mid]))} at layer {mid}): the final prediction takes shape "
                f"{_depth(settle.median(), n_layers)}.")
    cats = summary.drop(index="all")
    cats = cats[cats["n_reach_top1"] > 0]
    if len(cats) > 1 and cats["median_first_topk"].nunique() == 1:
        text.append(f"By category (same prompts), answers enter the top-{cfg.top_k} at the same median layer in all "
                    f"{len(cats)} categories that reach the top-1 ({', '.join(map(latex_escape, cats.index))}).")
    elif len(cats) > 1:
        early, late = cats["median_first_topk"].idxmin(), cats["median_first_topk"].idxmax()
        text.append(f"By category (same prompts), answers enter the top-{cfg.top_k} earliest for "
                    f"{latex_escape(early)} ({_layer_name(cats.loc[early, 'median_first_topk'])}, n = "
                    f"{int(cats.loc[early, 'n_reach_top1'])}) and latest for {latex_escape(late)} "
                    f"({_layer_name(cats.loc[late, 'median_first_topk'])}, n = {int(cats.loc[late, 'n_reach_top1'])}).")
    if (results / "lens_kl.csv").is_file():
        text.append(_tuned_answer(results, cfg))
    return " ".join(text)


def _tuned_answer(results: Path, cfg: Config) -> str:
    """How the tuned lens changes the picture: held-out KL by layer (paired CIs) and first-entry layers
    over the same prompts and layers."""
    kl = read_csv(results, "lens_kl")
    diff = kl[kl.lens == "tuned_minus_logit"].set_index("layer")
    lower, n = int((diff.kl_hi < 0).sum()), len(diff)
    mid = int(diff.index[len(diff) // 2])
    at = kl[kl.layer == mid].set_index("lens")
    text = [f"A tuned lens (one affine translator per layer read, trained on {int(kl.train_tokens.iloc[0]):,} tokens) "
            f"has lower held-out KL than the logit lens at {lower} of {n} layers read (95\\% document-bootstrap "
            f"interval of the paired difference below 0; {int(kl.tokens.iloc[0]):,} tokens of {int(kl.docs.iloc[0])} "
            f"documents); at layer {mid}, {fmt(at.loc['tuned', 'kl'])} nats [{fmt(at.loc['tuned', 'kl_lo'])}, "
            f"{fmt(at.loc['tuned', 'kl_hi'])}] against {fmt(at.loc['logit', 'kl'])} "
            f"[{fmt(at.loc['logit', 'kl_lo'])}, {fmt(at.loc['logit', 'kl_hi'])}]."]
    tuned = read_csv(results, "tuned_first_entry").set_index("prompt_id")
    plain = milestones(read_csv(results, "lens_by_layer").pipe(lambda t: t[t.layer.isin(
        read_csv(results, "tuned_lens_by_layer").layer.unique())]), kl_nats=cfg.kl_nats).set_index("prompt_id")
    both = plain.first_topk_layer.notna() & tuned.first_topk_layer.reindex(plain.index).notna()
    if both.any():
        a, b = plain.first_topk_layer[both], tuned.first_topk_layer.reindex(plain.index)[both]
        earlier, later = int((b < a).sum()), int((b > a).sum())
        text.append(f"Over the {int(both.sum())} prompts whose answer enters the top-{cfg.top_k} under both lenses "
                    f"(same layers read), it enters at {_layer_name(b.median())} on median through the tuned lens "
                    f"and at {_layer_name(a.median())} through the logit lens (earlier for {earlier} prompts, later "
                    f"for {later}): {'the logit lens delays' if b.median() < a.median() else 'the logit lens does not delay'} "
                    f"the measured formation of predictions here.")
    return " ".join(text)


STUDY = Study(name=NAME, title="Where next-token predictions form (logit lens)", config=Config, run=run,
              figures=figures, tables=tables, answer=answer, presets={"micro": Config(prompts=8, tuned_steps=10, tuned_every=2, tuned_positions=64, kl_tokens=512)}, order=10)
