"""A small cross-layer transcoder vs per-layer transcoders on SmolLM2-135M (all 30 layers), and attribution
graphs of a few prompts through the CLT: the numbers and pictures of the README's CLT section.

Run (from the repository root; stores and dictionaries go to runs/clt_smollm2/, results to
experiments/results/clt_smollm2/):

    python experiments/clt_smollm2.py [--train-tokens 24k] [--width 128] [--k 8]

1. Harvest token-aligned resid_mid / mlp_out store pairs of every layer (train and held-out split,
   builtin corpus, 128-token windows): ``crosslayer.transcoder_data.harvest_pair``.
2. Train a CLT and PLTs with the same width per layer, k per layer, trainer, budget and learning rate
   (matched L0: both read k features per layer and token): ``train_transcoder_from_pair``.
3. Evaluate both on the held-out pair (``crosslayer.transcoder_evals.evaluate_transcoder``): MLP-output FVU
   per layer, L0 per layer and per (feature, layer written), replacement-model CE with and without the error
   terms, 95 % intervals over documents -> ``eval_clt.csv``, ``eval_plt.csv``, ``compare.csv``.
4. Trace the prompts through the CLT (``crosslayer.attribution``) -> ``graph_<i>.json`` (circuit-tracer viewer
   format), ``graph_<i>.png``, ``attribution.csv`` (top path, kept nodes, error share).
A rerun reuses the finished stores, dictionaries and evaluation CSVs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from crosslayer.attribution import AttributionConfig, attribute, plot_graph, prune, summary, write_graph
from crosslayer.cli import parse_count
from crosslayer.clt import CLTConfig
from crosslayer.corpus import load_corpus, make_windows
from crosslayer.models import load_model
from crosslayer.training import TrainConfig
from crosslayer.transcoder_data import harvest_pair, train_transcoder_from_pair
from crosslayer.transcoder_evals import evaluate_transcoder

PROMPTS = ("The capital of France is", "The opposite of hot is", "1, 2, 3, 4,")
RESULTS = Path("experiments/results/clt_smollm2")
RUNS = Path("runs/clt_smollm2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-tokens", type=parse_count, default=parse_count("24k"))
    ap.add_argument("--heldout-tokens", type=parse_count, default=parse_count("6k"))
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--windows", type=int, default=24)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    model = load_model("smollm2-135m", dtype="float32")
    corpus = load_corpus("builtin")
    pairs = {}
    for split, tokens in (("train", args.train_tokens), ("heldout", args.heldout_tokens)):
        windows = make_windows(corpus, model.tokenizer, split=split, seq_len=128, n_tokens=tokens, seed=0)
        pairs[split] = harvest_pair(model, windows, out_dir=RUNS / f"pair_{split}", batch_size=8)
    timings["harvest_s"] = time.perf_counter() - t0
    n_rows = pairs["train"].inputs.n_rows
    layers = tuple(pairs["train"].inputs.layers)
    cfg = TrainConfig(tokens=(args.epochs * n_rows) // 512 * 512, batch_size=512, lr=args.lr)
    tables, dicts = [], {}
    for name, cross in (("clt", True), ("plt", False)):
        t = time.perf_counter()
        arch = CLTConfig(layers=layers, d_model=model.cfg.d_model, width=args.width, k=args.k, cross_layer=cross)
        dicts[name] = train_transcoder_from_pair(pairs["train"], arch, cfg, out_dir=RUNS / name,
                                                 heldout_pair_path=pairs["heldout"])
        timings[f"train_{name}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if (RESULTS / f"eval_{name}.csv").is_file():  # a rerun skips finished evaluations
            table = pd.read_csv(RESULTS / f"eval_{name}.csv")
        else:
            table = evaluate_transcoder(dicts[name], pairs["heldout"], model=model, n_tokens=4096,
                                        n_windows=args.windows, out=RESULTS / f"eval_{name}.csv")
            timings[f"eval_{name}_s"] = time.perf_counter() - t
        tables.append(table.assign(name=name))
    both = pd.concat(tables)
    keep = ["name", "splice", "fvu", "l0_read", "l0_tuple", "n_features", "ce_clean", "ce_spliced", "ce_spliced_lo",
            "ce_spliced_hi", "ce_mean", "ce_recovered", "ce_recovered_lo", "ce_recovered_hi", "kl", "kl_lo", "kl_hi",
            "n_predictions", "n_docs"]
    compare = both[both.scope == "all"][keep].assign(train_tokens=cfg.tokens, train_rows=n_rows, width=args.width,
                                                    k=args.k, n_layers=len(layers))
    compare.to_csv(RESULTS / "compare.csv", index=False)
    rows = []
    acfg = AttributionConfig()
    for i, prompt in enumerate(PROMPTS):
        t = time.perf_counter()
        graph = attribute(model, dicts["clt"], prompt, cfg=acfg)
        pruned = prune(graph, node_threshold=acfg.node_threshold, edge_threshold=acfg.edge_threshold)
        write_graph(graph, RESULTS / f"graph_{i}.json", cfg=acfg)
        plot_graph(graph, pruned, RESULTS / f"graph_{i}.png")
        rows.append({**summary(graph, pruned), "seconds": time.perf_counter() - t})
    pd.DataFrame(rows).to_csv(RESULTS / "attribution.csv", index=False)
    timings["total_s"] = time.perf_counter() - t0
    (RESULTS / "timings.json").write_text(json.dumps({**timings, "torch_threads": torch.get_num_threads()}, indent=2))
    print(compare.to_string(index=False))
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
