"""Attribution: cross-layer vs per-layer transcoders as replacement models, and the circuits a CLT traces.

Question
    Replacing every MLP of the model by a transcoder, how much of the next-token loss does a cross-layer
    transcoder (CLT) recover compared with per-layer transcoders (PLT) at the same L0, and what does the
    attribution graph of a prompt through the CLT look like (Ameisen et al., "Circuit Tracing", 2025)?

Method
    - A store pair (resid_mid, mlp_out) of every model layer over the run's corpus, train and held-out split
      (:func:`crosslayer.transcoder_data.harvest_pair`; ``train_tokens`` / ``heldout_tokens``).
    - For each k of ``ks``: a CLT and PLTs with ``width`` features per layer and k active per layer and token
      (so both read the same number of features: matched L0), the run's trainer at ``lr`` for ``epochs`` passes.
    - :func:`crosslayer.transcoder_evals.evaluate_transcoder` on the held-out pair: MLP-output FVU per layer, L0 per
      layer and per (feature, layer written), the replacement model's CE recovered against mean ablation of every MLP
      output with 95 % document-bootstrap intervals (``compare.csv``, ``layers.csv``); the run with the clean error
      terms is checked to reproduce the model (``exact_kl``).
    - The CLT at the largest k traces ``prompts`` (:func:`crosslayer.attribution.attribute`, pruned at 0.8 / 0.98):
      ``graph_<i>.json`` in circuit-tracer's viewer format and ``attribution.csv`` (top path, kept nodes, error share).

Answer
    Generated from the CSVs (``answer``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from crosslayer.io import write_csv

from studies.base import Study
from studies.common import fmt, latex_escape, latex_table, read_csv, save_figure, theme

NAME = "attribution"


@dataclass(frozen=True)
class Config:
    """Settings of the attribution study (defaults: the demo preset)."""

    width: int = 128
    """Transcoder features per layer."""
    ks: tuple[int, ...] = (4, 16)
    """Active features per layer and token; one CLT and one PLT each. (Measured here on SmolLM2, all 30
    layers, width 128, batch 512: a CLT step 3.0 s, a PLT step 0.5 s; the demo's two k at one epoch of
    ~24k tokens are ~8 minutes of training.)"""
    train_tokens: int = 24_000
    """Tokens of the study's own training store pair (all layers, resid_mid and mlp_out)."""
    heldout_tokens: int = 6_000
    """Tokens of its held-out pair."""
    epochs: int = 1
    """Passes over the training pair."""
    lr: float = 2e-3
    """Peak learning rate of every transcoder."""
    batch_size: int = 512
    """Rows per optimiser step."""
    eval_windows: int = 24
    """Held-out windows of the replacement-model CE."""
    prompts: tuple[str, ...] = ("The capital of France is", "The opposite of hot is", "1, 2, 3, 4,")
    """Prompts traced through the CLT at the largest k."""


def _pairs(ctx, cfg: Config) -> dict:
    from crosslayer.transcoder_data import harvest_pair

    root = ctx.dicts / "transcoders"
    return {split: harvest_pair(ctx.model, ctx.windows(split, tokens), out_dir=root / f"pair_{split}",
                                batch_size=ctx.sizes.batch_size, progress=ctx.progress)
            for split, tokens in (("train", cfg.train_tokens), ("heldout", cfg.heldout_tokens))}


def _float32(ctx):
    """The run's model in float32 (attribution's linearised model needs it; a preset may compute in bfloat16)."""
    import torch

    from crosslayer.models import load_model

    return ctx.model if ctx.model.cfg.dtype == torch.float32 else load_model(ctx.sizes.model, dtype="float32")


def transcoder_comparison(ctx, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CLT vs PLT at each k of ``cfg.ks`` (``compare.csv``, ``layers.csv`` of this study's results): trained once per
    run folder (the dictionaries resume) and shared with the reconstruction study, which reports the same table."""
    from crosslayer.clt import CLTConfig
    from crosslayer.transcoder_evals import evaluate_transcoder

    results = ctx.results(NAME)
    cached = _cached(results, cfg)
    if cached is not None:
        return cached
    pairs = _pairs(ctx, cfg)
    train = _train_config(cfg, pairs)
    layers = tuple(pairs["train"].inputs.layers)
    compare, per_layer = [], []
    for k in cfg.ks:
        for approach, cross in (("CLT", True), ("PLT", False)):
            arch = CLTConfig(layers=layers, d_model=ctx.model.cfg.d_model, width=cfg.width, k=k, cross_layer=cross)
            clt = _transcoder(ctx, cfg, approach, k, arch, pairs, train)
            table = evaluate_transcoder(clt, pairs["heldout"], model=ctx.model, n_tokens=ctx.sizes.eval_tokens,
                                        n_windows=cfg.eval_windows)
            repl = table[table.splice == "replacement"].iloc[0]
            exact = table[table.splice == "replacement_error"].iloc[0]
            compare.append({"approach": approach, "k": k, "width": cfg.width, "n_layers": len(layers),
                            "train_tokens": train.tokens, **{c: repl[c] for c in COMPARE_VALUES}, "exact_kl": exact["kl"],
                            **_verdict(ctx.dicts / "transcoders" / f"{approach.lower()}_k{k}")})
            per_layer.append(table[table.scope == "layer"][["layer", "fvu", "l0_read", "l0"]].assign(approach=approach, k=k))
    compare, per_layer = pd.DataFrame(compare), pd.concat(per_layer, ignore_index=True)
    write_csv(per_layer, results / "layers.csv")
    write_csv(compare, results / "compare.csv")  # written last: its presence marks the pair complete
    return compare, per_layer


def _cached(results: Path, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The comparison already computed in ``results`` for exactly these settings (else None)."""
    if not ((results / "compare.csv").is_file() and (results / "layers.csv").is_file()):
        return None
    compare = pd.read_csv(results / "compare.csv")
    same = (set(zip(compare.approach, compare.k)) == {(a, k) for k in cfg.ks for a in ("CLT", "PLT")}
            and set(compare.width) == {cfg.width} and "converged" in compare)
    return (compare, pd.read_csv(results / "layers.csv")) if same else None


def _train_config(cfg: Config, pairs: dict):
    """``epochs`` passes over the training pair, in whole batches."""
    from crosslayer.training import TrainConfig

    rows = pairs["train"].inputs.n_rows
    return TrainConfig(tokens=max(cfg.batch_size, cfg.epochs * rows // cfg.batch_size * cfg.batch_size),
                       batch_size=cfg.batch_size, lr=cfg.lr)


def _verdict(folder: Path) -> dict:
    """The transcoder's final held-out FVU and convergence verdict by the current rule (from its saved curve)."""
    from crosslayer.training import curve_verdict

    verdict = curve_verdict(folder) or {}
    return {"heldout_fvu_curve": verdict.get("final_fvu"), "converged": verdict.get("converged")}


def _transcoder(ctx, cfg: Config, approach: str, k: int, arch, pairs, train):
    """The trained (or resumed) transcoder ``<dicts>/transcoders/<approach>_k<k>``."""
    from crosslayer.transcoder_data import train_transcoder_from_pair

    return train_transcoder_from_pair(pairs["train"], arch, train, heldout_pair_path=pairs["heldout"],
                                      out_dir=ctx.dicts / "transcoders" / f"{approach.lower()}_k{k}",
                                      progress=ctx.progress)


def run(ctx, cfg: Config) -> dict:
    from crosslayer.attribution import AttributionConfig, attribute, prune, summary, write_graph
    from crosslayer.clt import CLTConfig

    compare, _ = transcoder_comparison(ctx, cfg)
    results = ctx.results(NAME)
    pairs, k = _pairs(ctx, cfg), max(cfg.ks)
    arch = CLTConfig(layers=tuple(pairs["train"].inputs.layers), d_model=ctx.model.cfg.d_model, width=cfg.width, k=k,
                     cross_layer=True)
    main = _transcoder(ctx, cfg, "CLT", k, arch, pairs, _train_config(cfg, pairs))
    acfg, traced, model = AttributionConfig(), [], _float32(ctx)
    for i, prompt in enumerate(cfg.prompts):
        graph = attribute(model, main, prompt, cfg=acfg)
        write_graph(graph, results / f"graph_{i}.json", cfg=acfg)
        traced.append({"graph": i, **summary(graph, prune(graph, node_threshold=acfg.node_threshold,
                                                           edge_threshold=acfg.edge_threshold))})
    write_csv(pd.DataFrame(traced), results / "attribution.csv")
    best = compare.set_index(["approach", "k"])
    return {"k": k, "clt_ce_recovered": float(best.loc[("CLT", k), "ce_recovered"]),
            "plt_ce_recovered": float(best.loc[("PLT", k), "ce_recovered"]),
            "top_path": traced[0]["top_path"] if traced else ""}


COMPARE_VALUES = ("fvu", "l0_read", "l0_tuple", "ce_clean", "ce_mean", "ce_spliced", "ce_spliced_lo", "ce_spliced_hi",
                  "ce_recovered", "ce_recovered_lo", "ce_recovered_hi", "kl", "kl_lo", "kl_hi", "n_predictions", "n_docs")
"""Columns of ``compare.csv`` taken from the replacement run's row of :func:`evaluate_transcoder`."""


def clt_plt_figure(compare: pd.DataFrame, path: Path) -> tuple[Path, str]:
    """CE recovered (with intervals) and MLP-output FVU against L0 for CLTs and PLTs (drawn by the reconstruction
    study from its copy of ``compare.csv``)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    for approach, part in compare.groupby("approach"):
        part = part.sort_values("l0_read")
        axes[0].errorbar(part.l0_read, part.ce_recovered, yerr=[part.ce_recovered - part.ce_recovered_lo,
                                                                part.ce_recovered_hi - part.ce_recovered],
                         marker="o", capsize=3, label=approach)
        axes[1].plot(part.l0_read, part.fvu, marker="o", label=approach)
    axes[0].set(xscale="log", xlabel="L0 (features read per token)", ylabel="replacement CE recovered")
    axes[1].set(xscale="log", xlabel="L0 (features read per token)", ylabel="MLP-output FVU (mean over layers)")
    axes[0].legend()
    return (save_figure(fig, path),
            f"Cross-layer vs per-layer transcoders ({int(compare.width.iloc[0])} features per layer, "
            f"{int(compare.n_layers.iloc[0])} layers, {int(compare.train_tokens.iloc[0]):,} training tokens): CE loss "
            f"recovered when every MLP output is replaced (mean ablation = 0, 95\\% bootstrap interval over documents) "
            f"and MLP-output FVU, against L0.")


def clt_plt_table(compare: pd.DataFrame, path: Path) -> Path:
    compare = compare.assign(recovered=[f"{fmt(x)} [{fmt(lo)}, {fmt(hi)}]" for x, lo, hi in
                                        zip(compare.ce_recovered, compare.ce_recovered_lo, compare.ce_recovered_hi)])
    return latex_table(compare, path, label="tab:clt-vs-plt",
                       caption="Cross-layer (CLT) vs per-layer (PLT) transcoders replacing every MLP: L0 (features read "
                               "per token; (feature, layer written) pairs), MLP-output FVU, the replacement model's CE "
                               "and CE recovered against mean ablation (95\\% bootstrap interval over documents).",
                       columns={"approach": "approach", "k": "k/layer", "l0_read": "L0", "l0_tuple": "L0 pairs",
                                "fvu": "FVU", "ce_clean": "CE clean", "ce_spliced": "CE replaced",
                                "recovered": "CE recovered"}, raw_columns=("recovered",))


def clt_plt_text(compare: pd.DataFrame) -> str:
    """The CLT-vs-PLT comparison at the largest k, with whether the intervals separate and the convergence caveat."""
    best = compare.set_index(["approach", "k"])
    k = int(max(best.index.get_level_values("k")))
    clt, plt_ = best.loc[("CLT", k)], best.loc[("PLT", k)]
    if clt.ce_recovered_lo > plt_.ce_recovered_hi:
        verdict = "the CLT recovers more (the intervals do not overlap)"
    elif plt_.ce_recovered_lo > clt.ce_recovered_hi:
        verdict = "the PLTs recover more (the intervals do not overlap)"
    else:
        verdict = "the intervals overlap: no difference is shown"
    text = (f"Replacing every MLP output at {k} active features per layer (L0 {fmt(clt.l0_read)} vs {fmt(plt_.l0_read)}), "
            f"the CLT recovers {fmt(clt.ce_recovered)} [{fmt(clt.ce_recovered_lo)}, {fmt(clt.ce_recovered_hi)}] of the "
            f"CE loss and the PLTs {fmt(plt_.ce_recovered)} [{fmt(plt_.ce_recovered_lo)}, {fmt(plt_.ce_recovered_hi)}]: "
            f"{verdict} (MLP-output FVU {fmt(clt.fvu)} vs {fmt(plt_.fvu)}).")
    if "converged" in compare and not compare.converged.astype(bool).all():
        text += (f" {int((~compare.converged.astype(bool)).sum())} of the {len(compare)} transcoders did not converge "
                 f"by the 2\\% rule ({int(compare.train_tokens.iloc[0]):,} training tokens), so this compares "
                 f"unconverged transcoders.")
    return text


def figures(results: Path, figures_dir: Path, cfg: Config) -> list[tuple[Path, str]]:
    from crosslayer.attribution import plot_graph_json

    theme()
    paths = []
    traced = read_csv(results, "attribution")
    for _, row in traced.iterrows():
        data = json.loads((Path(results) / f"graph_{int(row.graph)}.json").read_text())
        path = figures_dir / f"attribution_graph_{int(row.graph)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_graph_json(data, path)
        paths.append((path, f"Attribution graph of {latex_escape(repr(row.prompt))} through the CLT (pruned to 80\\% "
                            f"of node and 98\\% of edge influence); top path: {latex_escape(row.top_path)}."))
    return paths


def tables(results: Path, tables_dir: Path, cfg: Config) -> list[Path]:
    traced = read_csv(results, "attribution").assign(prompt=lambda d: d.prompt.map(latex_escape),
                                                     top_feature_path=lambda d: d.top_feature_path.map(latex_escape))
    path = latex_table(traced, tables_dir / f"{NAME}.tex", label="tab:attribution",
                       caption="Prompts traced through the CLT at the largest k: the top logit, the active and kept "
                               "(pruned at 80\\% node influence) features, the error nodes' share and the strongest "
                               "path through features.",
                       columns={"prompt": "prompt", "top_prob": "p(top)", "n_active_features": "active",
                                "n_kept_features": "kept", "error_norm_share": "error share",
                                "top_feature_path": "top path through features"},
                       raw_columns=("prompt", "top_feature_path"))
    return [path]


def answer(results: Path, cfg: Config) -> str:
    text = clt_plt_text(read_csv(results, "compare"))
    traced = read_csv(results, "attribution")
    if len(traced):
        row = traced.iloc[0]
        text += (f" Traced through the CLT, {latex_escape(repr(row.prompt))} keeps {int(row.n_kept_features)} of "
                 f"{int(row.n_active_features)} active features; its strongest path is {latex_escape(row.top_path)}, "
                 f"and through features only {latex_escape(row.top_feature_path)}.")
    return text


STUDY = Study(name=NAME, title="Cross-layer transcoders and attribution graphs", config=Config, run=run,
              figures=figures, tables=tables, answer=answer,
              presets={"micro": Config(width=16, ks=(2, 4), train_tokens=2_048, heldout_tokens=1_024, epochs=1,
                                       batch_size=128, eval_windows=4, prompts=("The capital of France is",)),
                       "standard": Config(width=128, ks=(4, 16), train_tokens=48_000, heldout_tokens=12_000,
                                          eval_windows=64)},
              order=90)
