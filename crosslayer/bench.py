"""Benchmarks that print numbers (ratios against a baseline measured in the same run).

``crosslayer bench harvest``:
1. Build the corpus windows for the largest token count.
2. Baseline: a plain forward pass of the model over the first count's windows, same dtype,
   same batch size, same stop layer (``stop_at_layer``; no unembedding, no hooks).
3. For every token count, run the full harvest (hooks, exclusions, 16-bit casts, checksums, disk
   writes) in a fresh subprocess into a temporary folder, timing the harvest call itself and reading
   the child's peak RSS from ``getrusage``.
4. Print tokens/s of both, their ratio (target >= 0.90) and peak RSS per count (target: flat).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

_CHILD = """
import json, sys, time, resource
from crosslayer.corpus import load_corpus, make_windows
from crosslayer.harvest import harvest
from crosslayer.models import load_model
a = json.loads(sys.argv[1])
model = load_model(a["model"], dtype=a["model_dtype"])
windows = make_windows(load_corpus(a["corpus"]), model.tokenizer, split="train", seq_len=a["seq_len"],
                       n_tokens=a["tokens"], seed=0)
start = time.perf_counter()
store = harvest(model, windows, out_dir=a["out"], layers=a["layers"], batch_size=a["batch_size"],
                progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"tokens": windows.n_tokens, "seconds": seconds, "rows": store.n_rows,
                  "disk_bytes": store.disk_bytes(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@torch.no_grad()
def forward_tokens_per_second(model, tokens: torch.Tensor, *, batch_size: int, stop_at_layer: int) -> float:
    model(tokens[:batch_size], stop_at_layer=stop_at_layer, return_type=None)  # warm-up
    start = time.perf_counter()
    for i in range(0, tokens.shape[0], batch_size):
        model(tokens[i:i + batch_size], stop_at_layer=stop_at_layer, return_type=None)
    return tokens.numel() / (time.perf_counter() - start)


def bench_harvest(*, model_name: str = "smollm2-135m", counts: tuple[int, ...] = (50_000, 200_000),
                  layers: str = "all", model_dtype: str = "auto", batch_size: int = 8,
                  seq_len: int = 128, corpus: str = "builtin") -> list[dict]:
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.harvest import parse_layers
    from crosslayer.models import load_model

    model = load_model(model_name, dtype=model_dtype)
    stop = max(parse_layers(layers, model.cfg.n_layers)) + 1
    windows = make_windows(load_corpus(corpus), model.tokenizer, split="train", seq_len=seq_len,
                           n_tokens=min(counts), seed=0)
    forward_tps = forward_tokens_per_second(model, windows.tokens, batch_size=batch_size, stop_at_layer=stop)
    dtype_name = str(model.cfg.dtype).removeprefix("torch.")
    del model
    print(f"plain forward ({model_name}, {dtype_name}, stop_at_layer={stop}, batch {batch_size}x{seq_len}): "
          f"{forward_tps:,.0f} tok/s over {windows.n_tokens:,} tokens", flush=True)
    results = []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="crosslayer-bench-") as tmp:
            args = {"model": model_name, "model_dtype": model_dtype, "corpus": corpus, "seq_len": seq_len,
                    "tokens": count, "out": f"{tmp}/store", "layers": layers, "batch_size": batch_size}
            proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-2000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
        tps = child["tokens"] / child["seconds"]
        row = {"tokens": child["tokens"], "harvest_tok_s": tps, "forward_tok_s": forward_tps,
               "ratio": tps / forward_tps, "peak_rss_mb": child["peak_rss_mb"],
               "disk_kb_per_row": child["disk_bytes"] / child["rows"] / 1024}
        results.append(row)
        print(f"harvest {row['tokens']:>9,} tokens: {tps:,.0f} tok/s, ratio to plain forward "
              f"{row['ratio']:.2f} (target >= 0.90), peak RSS {row['peak_rss_mb']:,.0f} MB, "
              f"{row['disk_kb_per_row']:.1f} KB on disk per stored token", flush=True)
    if len(results) > 1:
        growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
        print(f"peak RSS {results[-1]['tokens']:,} vs {results[0]['tokens']:,} tokens: x{growth:.2f} (target ~1.0)")
    return results
