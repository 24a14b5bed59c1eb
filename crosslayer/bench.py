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


# ----------------------------------------------------------------------------- crosscoder benchmark

def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 4096, repeats: int = 3) -> float:
    """Measured GEMM throughput of this machine (n x n x n, best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _fvu(dictionary_fn, x_ND: torch.Tensor) -> float:
    from crosslayer.evals import fvu

    with torch.no_grad():
        return float(fvu(x_ND[:, None], dictionary_fn(x_ND)[:, None])[0])


def _bench_train_config(steps: int, batch_size: int, lr: float = 3e-4):
    """``steps`` steps of ``batch_size``, no checkpoints, Gao et al.'s 10M-token dead window."""
    from crosslayer.training import TrainConfig

    return TrainConfig(tokens=steps * batch_size, batch_size=batch_size, lr=lr, checkpoint_every=10**9,
                       dead_after_tokens=10_000_000)


def _bench_training(store, cfg, batches: list, *, batch_size: int, peak: float) -> tuple[float, float]:
    """(a) all-layer crosscoder training: (tokens/s, fraction of the matmul peak)."""
    import tempfile

    from crosslayer.training import train_crosscoder

    steps = len(batches) - 1
    with tempfile.TemporaryDirectory() as tmp:
        train_crosscoder(_bench_train_config(1, batch_size), cfg, iter(batches[:1]), out_dir=f"{tmp}/warm",
                         progress=False)
        start = time.perf_counter()
        train_crosscoder(_bench_train_config(steps, batch_size), cfg, iter(batches[1:]), out_dir=f"{tmp}/run",
                         progress=False)
        seconds = time.perf_counter() - start
    L, d, width, k = store.n_layers, store.width, cfg.n_features, cfg.k
    tok_s = steps * batch_size / seconds
    dense_flops = 4 * batch_size * L * d * width  # encoder forward + weight gradient, per step
    achieved = dense_flops * steps / seconds / 1e9
    print(f"(a) crosscoder training, {L} layers x {d}, F={width}, k={k}, batch {batch_size}: {tok_s:,.0f} tok/s; "
          f"dense parts {achieved:,.0f} GFLOP/s = {achieved / peak:.2f} of peak (target >= 0.5; counts only the "
          f"4*B*L*d*F encoder FLOPs against the whole step time)", flush=True)
    return tok_s, achieved / peak


@torch.no_grad()
def _bench_decode(cfg, batch: torch.Tensor) -> float:
    """(b) sparse vs dense TopK decoding of one batch: the speed-up."""
    from crosslayer.crosscoder import Crosscoder

    cc = Crosscoder(cfg)
    feats = cc.encode_normalized(batch)
    vals, idx = feats.topk(cfg.k, dim=-1)
    timings = {}
    for name, fn in (("dense", lambda: cc.decode_normalized(feats)), ("sparse", lambda: cc.decode_sparse(vals, idx))):
        fn()
        start = time.perf_counter()
        for _ in range(3):
            out = fn()
        timings[name] = (time.perf_counter() - start) / 3
        assert out.shape == batch.shape
    print(f"(b) TopK decode of {batch.shape[0]} tokens: dense {timings['dense'] * 1e3:.0f} ms, sparse "
          f"{timings['sparse'] * 1e3:.0f} ms, speed-up x{timings['dense'] / timings['sparse']:.1f}", flush=True)
    return timings["dense"] / timings["sparse"]


def _bench_one_layer(store, layer: int, *, width: int, k: int, batch_size: int, steps: int) -> dict:
    """(c) one layer, same batches: our crosscoder trainer vs sae-lens's SAETrainer -> {name: (tok/s, FVU)}."""
    import tempfile

    from sae_lens import SAETrainer

    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.saes import SAETrainConfig, fit, sae_lens_trainer_config, training_sae
    from crosslayer.training import train_crosscoder

    one = store.iter_batches(batch_size, layers=[layer], seed=1, epochs=None, buffer_rows=batch_size * 8)
    train_b = [next(one) for _ in range(steps)]
    held = torch.cat([next(one) for _ in range(4)])[:, 0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg1 = CrosscoderConfig(layers=(layer,), d_model=store.width, n_features=width, activation="topk", k=k)
        start = time.perf_counter()
        ours = train_crosscoder(_bench_train_config(steps, batch_size, lr=3e-3), cfg1, iter(train_b),
                                out_dir=f"{tmp}/ours", progress=False)
        results["ours"] = (steps * batch_size / (time.perf_counter() - start),
                           _fvu(lambda x: ours.reconstruct(x[:, None])[:, 0], held))
    sae_cfg = SAETrainConfig(width=width, tokens=steps * batch_size, k=k, batch_size=batch_size, lr=3e-3,
                             dead_after_tokens=10**6 * batch_size)
    torch.manual_seed(0)
    sae = training_sae(sae_cfg, d_in=store.width)
    trainer = SAETrainer(cfg=sae_lens_trainer_config(sae_cfg), sae=sae, data_provider=(b[:, 0] for b in train_b))
    start = time.perf_counter()
    fit(trainer, progress=False)
    results["sae_lens"] = (steps * batch_size / (time.perf_counter() - start), _fvu(sae, held))
    return results


def bench_crosscoder(store_path: str, *, width: int = 4096, k: int = 32, batch_size: int = 1024,
                     steps: int = 8, sae_width: int = 2304, sae_steps: int = 40, layer: int | None = None) -> dict:
    """(a) all-layer crosscoder training speed vs matmul peak, (b) sparse vs dense TopK decode,
    (c) our trainer on one layer vs sae-lens's SAETrainer on the same batches."""
    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.store import ActivationStore

    store = ActivationStore(store_path)
    peak = matmul_peak_gflops()
    print(f"matmul peak (float32, 4096^3 GEMM): {peak:,.0f} GFLOP/s", flush=True)
    stream = store.iter_batches(batch_size, seed=0, epochs=None, buffer_rows=batch_size * 4)
    batches = [next(stream) for _ in range(steps + 1)]
    cfg = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=width, activation="topk", k=k)
    tok_s, frac_peak = _bench_training(store, cfg, batches, batch_size=batch_size, peak=peak)
    speedup = _bench_decode(cfg, batches[0])
    layer = store.layers[len(store.layers) // 2] if layer is None else layer
    results = _bench_one_layer(store, layer, width=sae_width, k=k, batch_size=batch_size, steps=sae_steps)
    ratio = results["ours"][0] / results["sae_lens"][0]
    print(f"(c) one layer ({layer}), F={sae_width}, k={k}, {sae_steps} steps of {batch_size}: ours "
          f"{results['ours'][0]:,.0f} tok/s, FVU {results['ours'][1]:.3f}; sae-lens SAETrainer "
          f"{results['sae_lens'][0]:,.0f} tok/s, FVU {results['sae_lens'][1]:.3f}; speed ratio x{ratio:.2f} "
          f"(target >= 1.5)", flush=True)
    return {"peak_gflops": peak, "tok_s": tok_s, "frac_peak": frac_peak, "decode_speedup": speedup,
            "one_layer": results, "ratio": ratio}


# ----------------------------------------------------------------------------- store reader benchmark

_READER_CHILD = """
import json, resource, sys, time
import crosslayer.store as st
from crosslayer.store import ActivationStore
a = json.loads(sys.argv[1])
if not a["verify"]:  # the baseline: the same reads without the first-map checksum of each shard
    st._hash_matches = lambda path, expected: True
store = ActivationStore(a["store"])
start, n = time.perf_counter(), 0
for batch in store.iter_batches(a["batch_size"], buffer_rows=a["buffer_rows"], seed=0):
    n += batch.shape[0]
print(json.dumps({"rows": n, "seconds": time.perf_counter() - start, "store_gb": store.disk_bytes() / 2**30,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _reader_child(path: str, *, buffer_rows: int, batch_size: int, verify: bool) -> dict:
    args = {"store": path, "buffer_rows": buffer_rows, "batch_size": batch_size, "verify": verify}
    proc = subprocess.run([sys.executable, "-c", _READER_CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"store": path, "verify": verify}


def bench_reader(store_paths: list[str], *, buffer_rows: int = 2048, batch_size: int = 1024) -> list[dict]:
    """One shuffled epoch over each store in a fresh process: rows/s and peak RSS (target: RSS set by
    ``buffer_rows``, not by the store's size), and the cost of the checksum every reader verifies the first
    time it maps a shard: epochs without it (before and after, page cache warm) vs with it, same run
    (target: >= 0.90 of the rows/s without)."""
    results = []
    for path in store_paths:
        runs = [_reader_child(path, buffer_rows=buffer_rows, batch_size=batch_size, verify=v)
                for v in (False, True, False)]
        base = sum(r["rows"] / r["seconds"] for r in runs[::2]) / 2
        row = runs[1] | {"rows_per_s": runs[1]["rows"] / runs[1]["seconds"], "unverified_rows_per_s": base}
        results.append(row)
        print(f"shuffled epoch over {path} ({row['store_gb']:.2f} GB, {row['rows']:,} rows), buffer {buffer_rows} "
              f"rows: {row['rows_per_s']:,.0f} rows/s with shard checksums, {base:,.0f} without (ratio "
              f"{row['rows_per_s'] / base:.2f}), peak RSS {row['peak_rss_mb']:,.0f} MB", flush=True)
    return results
