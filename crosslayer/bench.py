"""Benchmarks that print numbers (ratios against a baseline measured in the same run).

``crosslayer bench harvest``:
1. Build the corpus windows for the largest token count.
2. Baseline: a plain forward pass of the model over the first count's windows, same dtype,
   same batch size, same stop layer (``stop_at_layer``; no unembedding, no hooks).
3. For every token count, run the full harvest (hooks, exclusions, 16-bit casts, checksums, disk
   writes) in a fresh subprocess into a temporary folder, timing the harvest call itself and reading
   the child's peak RSS from ``getrusage``.
4. Print tokens/s of both, their ratio (target >= 0.90) and peak RSS per count (target: flat).

``crosslayer bench crosscoder``: :func:`bench_crosscoder` (training step vs encoder GEMM with a profile of
the step, sparse vs dense decoding, and a one-layer table against sae-lens and EleutherAI sparsify).
``crosslayer bench reader``: :func:`bench_reader`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

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

OPTIONAL_PEERS = ("sparsify",)
"""Peers whose package is an optional extra (``pip install crosslayer[bench]``): a failure to import or run
one is recorded as its row's ``error`` instead of stopping the benchmark."""


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fvu(reconstruct, x_ND: torch.Tensor) -> float:
    """:func:`crosslayer.evals.fvu` of ``reconstruct`` ([N, d] -> [N, d]) on the rows ``x_ND``."""
    from crosslayer.evals import fvu

    with torch.no_grad():
        return float(fvu(x_ND[:, None], reconstruct(x_ND)[:, None])[0])


def _bench_train_config(steps: int, batch_size: int, lr: float = 3e-4):
    """``steps`` steps of ``batch_size``, no checkpoints, Gao et al.'s 10M-token dead window."""
    from crosslayer.training import TrainConfig

    return TrainConfig(tokens=steps * batch_size, batch_size=batch_size, lr=lr, checkpoint_every=10**9,
                       dead_after_tokens=10_000_000)


def _trainer_step(cfg, batches: list[torch.Tensor], *, dead_frac: float = 0.0):
    """A function running the trainer's next optimiser step on the next of ``batches`` (a fresh crosscoder,
    no folder): :func:`crosslayer.training._train_step`, i.e. bias calibration at step 0, loss, backward,
    gradient clipping, Adam and the dead-latent counters, exactly as :func:`train_crosscoder` runs it. With
    ``dead_frac``, that share of the latents counts as dead at every step (AuxK active, as early in a run)."""
    from crosslayer.crosscoder import Crosscoder
    from crosslayer.training import _Run, _train_step

    # no log rows (the run never reaches its last step or a log_every multiple): the step alone is timed
    train_cfg = replace(_bench_train_config(len(batches) + 1, batches[0].shape[0]), log_every=10**9)
    no_ckpt = Path(os.devnull)  # not a file: nothing is resumed, nothing written
    run = _Run.start(Crosscoder(cfg, seed=train_cfg.seed), train_cfg, no_ckpt, {}, "cpu")
    stream, n_dead = iter(batches), round(dead_frac * cfg.n_features)

    def step():
        run.since_fired_F[:n_dead] = train_cfg.dead_after  # dead again, whether or not they fired last step
        _train_step(run, train_cfg, next(stream), no_ckpt, None)

    return step


def _profile_ops(fn, top: int = 8) -> tuple[list[dict], float, float]:
    """One call of ``fn`` under torch.profiler: the ``top`` ops by self CPU time (``ms``, ``share`` of all
    ops' self time), all ops' self time (ms) and the call's wall time under the profiler (ms); the gap
    between the last two is Python and other time outside any recorded op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall_ms = (time.perf_counter() - start) * 1e3
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total_us}
            for e in events[:top]]
    return rows, total_us / 1e3, wall_ms


def _bench_step(cfg, batches: list[torch.Tensor]) -> dict:
    """(a) The trainer's full TopK step vs the dense encoder-forward GEMM ``[B, L d] x [L d, F]`` (float32)
    of the same shape, medians in the same run; then one more step under the profiler.
    ``batches``: a warm-up, the timed steps and the profiled one."""
    step = _trainer_step(cfg, batches)
    step_s = _median_seconds(step, len(batches) - 2)  # the warm-up is step 0 (bias calibration)
    breakdown, ops_ms, profiled_ms = _profile_ops(step)
    x_BI = batches[0].reshape(batches[0].shape[0], -1)
    W_IF = torch.randn(x_BI.shape[1], cfg.n_features)
    gemm_s = _median_seconds(lambda: x_BI @ W_IF, len(batches) - 2)
    B, I, F = x_BI.shape[0], x_BI.shape[1], cfg.n_features
    print(f"(a) crosscoder training step, {cfg.n_layers} layers x {cfg.d_model}, F={F}, k={cfg.k}, batch {B}: "
          f"{step_s * 1e3:,.0f} ms ({B / step_s:,.0f} tok/s); encoder GEMM [{B}, {I}] x [{I}, {F}] float32: "
          f"{gemm_s * 1e3:,.0f} ms ({2 * B * I * F / gemm_s / 1e9:,.0f} GFLOP/s)", flush=True)
    print(f"training step / encoder GEMM = {step_s / gemm_s:.2f} (target <= 1.4)")
    print(f"    one more step under torch.profiler ({profiled_ms:,.0f} ms wall, {ops_ms:,.0f} ms in ops), "
          f"top ops by self CPU time (share of the ops' time):")
    for row in breakdown:
        print(f"    {row['op'][:56]:<56} {row['ms']:>9,.1f} ms {row['share']:>6.1%}")
    auxk = {}
    for frac in (1.0, 0.25):  # a quarter of the latents dead: AuxK on every row, then on a quarter of them
        auxk[frac] = _median_seconds(_trainer_step(replace(cfg, aux_frac=frac), batches, dead_frac=0.25),
                                     len(batches) - 2)
    print(f"    with 25 % of the latents dead (AuxK active, k_aux = {cfg.k_aux or cfg.d_model // 2}): step / encoder "
          f"GEMM = {auxk[1.0] / gemm_s:.2f} with AuxK on every row, {auxk[0.25] / gemm_s:.2f} on a quarter of "
          f"them (aux_frac 0.25)")
    return {"step_s": step_s, "gemm_s": gemm_s, "step_gemm_ratio": step_s / gemm_s, "tok_s": B / step_s,
            "breakdown": breakdown, "profiled_ops_ms": ops_ms, "profiled_wall_ms": profiled_ms,
            "auxk_step_gemm_ratio": {frac: t / gemm_s for frac, t in auxk.items()}}


@torch.no_grad()
def _bench_decode(cfg, batch: torch.Tensor) -> float:
    """(b) sparse vs dense TopK decoding of one batch: the speed-up."""
    from crosslayer.crosscoder import Crosscoder

    cc = Crosscoder(cfg)
    feats = cc.encode_normalized(batch)
    vals, idx = feats.topk(cfg.k, dim=-1)
    timings = {}
    for name, fn in (("dense", lambda: cc.decode_normalized(feats)), ("sparse", lambda: cc.decode_sparse(vals, idx))):
        timings[name] = _median_seconds(fn, 3)
    print(f"(b) TopK decode of {batch.shape[0]} tokens: dense {timings['dense'] * 1e3:.0f} ms, sparse "
          f"{timings['sparse'] * 1e3:.0f} ms, speed-up x{timings['dense'] / timings['sparse']:.1f}", flush=True)
    return timings["dense"] / timings["sparse"]


# One-layer peers: each ``_peer_*`` builds its trainer on ``batches`` ([B, 1, d], one layer) and returns
# ``fit()``, which trains one step per batch and returns the trained reconstruction [N, d] -> [N, d]; only
# ``fit()`` is timed (imports and construction are not).

def _peer_ours(batches: list[torch.Tensor], *, width: int, k: int, lr: float, out_dir: str):
    """crosslayer's trainer, :func:`train_crosscoder` with a 1-layer TopK crosscoder (exactly a TopK SAE)."""
    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.training import train_crosscoder

    B, _, d = batches[0].shape
    cfg = CrosscoderConfig(layers=(0,), d_model=d, n_features=width, activation="topk", k=k)

    def fit():
        cc = train_crosscoder(_bench_train_config(len(batches), B, lr=lr), cfg, iter(batches), out_dir=out_dir,
                              progress=False)
        return lambda x_ND: cc.reconstruct(x_ND[:, None])[:, 0]
    return fit


def _peer_sae_lens(batches: list[torch.Tensor], *, width: int, k: int, lr: float, out_dir: str):
    """sae-lens's ``SAETrainer`` on a ``TopKTrainingSAE`` (:func:`crosslayer.saes.fit`, its ``fit()`` loop)."""
    from sae_lens import SAETrainer

    from crosslayer.saes import SAETrainConfig, fit, sae_lens_trainer_config, training_sae

    B, _, d = batches[0].shape
    cfg = SAETrainConfig(width=width, tokens=len(batches) * B, k=k, batch_size=B, lr=lr,
                         dead_after_tokens=10**6 * B)
    torch.manual_seed(0)
    trainer = SAETrainer(cfg=sae_lens_trainer_config(cfg), sae=training_sae(cfg, d_in=d),
                         data_provider=(b[:, 0] for b in batches))
    return lambda: fit(trainer, progress=False)


def _peer_sparsify(batches: list[torch.Tensor], *, width: int, k: int, lr: float, out_dir: str):
    """EleutherAI sparsify's ``SparseCoder`` under its ``Trainer``'s default optimiser: ``ScheduleFreeWrapper``
    (momentum 0.95) around its ``SignSGD``; one :func:`_sparsify_step` per batch, then the wrapper's
    ``eval()`` (the averaged weights its checkpoints save). lr: the benchmark's (its own default would be
    5e-3 / sqrt(width / 2**14)). ``torch.set_float32_matmul_precision("high")`` of its ``fit()`` is left out:
    it is process-wide and only changes CUDA matmuls."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)  # as its Trainer does before building each coder
    sae = SparseCoder(batches[0].shape[-1], SparseCoderConfig(num_latents=width, k=k), "cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    since_fired_F = torch.zeros(width, dtype=torch.long)

    def fit():
        for step, x_B1D in enumerate(batches):
            _sparsify_step(sae, opt, x_B1D[:, 0], since_fired_F, first=step == 0)
        opt.eval()
        return lambda x_ND: sae(x_ND).sae_out
    return fit


def _sparsify_step(sae, opt, x_BD: torch.Tensor, since_fired_F: torch.Tensor, *, first: bool,
                   auxk_alpha: float = 0.0, dead_after: int = 10_000_000) -> None:
    """One step of sparsify 1.3's ``Trainer.fit`` (``loss_fn="fvu"``, autoencoding, one device, no gradient
    accumulation), its forward hook and optimiser step in order: b_dec = batch mean at step 0; decoder rows
    renormalised; ``SparseCoder.forward`` (``fused_encoder``'s index_add backward, sparse decode) with the
    batch's total variance; loss fvu + auxk_alpha * auxk + multi_topk_fvu / 8 (its defaults: auxk_alpha 0,
    so no dead mask; no multi-TopK); backward; ``remove_gradient_parallel_to_decoder_directions``; optimiser
    step and zero_grad; the tokens-since-fired counters."""
    if first:  # "Ensure the preactivations are centered at initialization"
        sae.b_dec.data = x_BD.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    dead_mask = since_fired_F > dead_after if auxk_alpha > 0 else None
    total_variance = (x_BD - x_BD.mean(0)).pow(2).sum()
    out = sae(x=x_BD, y=x_BD, dead_mask=dead_mask, total_variance=total_variance)
    (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        since_fired_F += x_BD.shape[0]
        since_fired_F[out.latent_indices.flatten()] = 0


PEERS = {"ours": ("ours (crosslayer train_crosscoder)", _peer_ours),
         "sae_lens": ("sae-lens SAETrainer", _peer_sae_lens),
         "sparsify": ("sparsify SparseCoder", _peer_sparsify)}
"""name -> (label, builder) of the one-layer peer table, ours first."""


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _run_peer(name: str, batches: list[torch.Tensor], held_ND: torch.Tensor, **kwargs) -> dict:
    """``{"tok_s", "fvu"}`` of one peer (held-out FVU), or ``{"error"}`` for an optional peer that fails."""
    try:
        fit = PEERS[name][1](batches, **kwargs)
        start = time.perf_counter()
        reconstruct = fit()
        seconds = time.perf_counter() - start
        return {"tok_s": len(batches) * batches[0].shape[0] / seconds, "fvu": _fvu(reconstruct, held_ND)}
    except Exception as err:  # noqa: BLE001 - an optional extra may fail in any way on this machine
        if name not in OPTIONAL_PEERS:
            raise
        return {"error": _one_line(err)}


def _bench_peers(store, layer: int, *, width: int, k: int, batch_size: int, steps: int, lr: float = 3e-3) -> dict:
    """(c) One layer, the same ``steps`` batches, width, k and lr for every peer of :data:`PEERS`: tokens/s
    and held-out FVU (4 more batches of the same stream, never trained on); prints the table and the
    ours / peer speed ratios. Returns ``{name: row}``."""
    stream = store.iter_batches(batch_size, layers=[layer], seed=1, epochs=None, buffer_rows=batch_size * 8)
    batches = [next(stream) for _ in range(steps)]
    held_ND = torch.cat([next(stream) for _ in range(4)])[:, 0]
    with tempfile.TemporaryDirectory(prefix="crosslayer-bench-") as tmp:
        rows = {name: _run_peer(name, batches, held_ND, width=width, k=k, lr=lr, out_dir=f"{tmp}/{name}")
                for name in PEERS}
    print(f"(c) one layer ({layer}), F={width}, k={k}, lr {lr:g}, {steps} steps of {batch_size} (same batches), "
          f"FVU on {held_ND.shape[0]:,} held-out rows:")
    print(f"    {'trainer':<36} {'tok/s':>10} {'FVU':>7} {'ours/peer':>10}")
    for name, row in rows.items():
        if "error" in row:
            print(f"    {name}: not run ({row['error']})")
            continue
        row["ours_over_peer"] = rows["ours"]["tok_s"] / row["tok_s"]
        print(f"    {PEERS[name][0]:<36} {row['tok_s']:>10,.0f} {row['fvu']:>7.3f} {row['ours_over_peer']:>10.2f}")
    return rows


def bench_crosscoder(store_path: str, *, width: int = 4096, k: int = 32, batch_size: int = 4096,
                     steps: int = 5, peer_width: int = 2304, peer_steps: int = 40, layer: int | None = None) -> dict:
    """Crosscoder training speed on the store's layers, from one run:
    (a) the trainer's full TopK step vs the dense encoder GEMM of the same shape (ratio, target <= 1.4),
    median of ``steps`` timed steps after a warm-up, and a torch.profiler breakdown of one more step;
    (b) sparse vs dense TopK decoding; (c) one layer (default: the middle one), ``peer_steps`` steps of the
    same batches: our trainer vs sae-lens's ``SAETrainer`` vs EleutherAI sparsify (optional extra), tokens/s
    and held-out FVU. Returns ``{"step": ..., "step_gemm_ratio", "breakdown", "decode_speedup", "peers"}``."""
    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.store import ActivationStore

    store = ActivationStore(store_path)
    stream = store.iter_batches(batch_size, seed=0, epochs=None, buffer_rows=batch_size * 4)
    batches = [next(stream) for _ in range(steps + 2)]
    cfg = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=width, activation="topk", k=k)
    step = _bench_step(cfg, batches)
    speedup = _bench_decode(cfg, batches[0])
    layer = store.layers[len(store.layers) // 2] if layer is None else layer
    peers = _bench_peers(store, layer, width=peer_width, k=k, batch_size=batch_size, steps=peer_steps)
    return {"step": step, "step_gemm_ratio": step["step_gemm_ratio"], "breakdown": step["breakdown"],
            "decode_speedup": speedup, "peers": peers}


# ----------------------------------------------------------------------------- store reader benchmark

_READER_CHILD = """
import json, resource, sys, time
import crosslayer.store as st
from crosslayer.store import ActivationStore
a = json.loads(sys.argv[1])
hashing = [0.0]
if not a["verify"]:  # the baseline: the same reads without the first-map checksum of each shard
    st._hash_matches = lambda *args: True
else:  # time spent checksumming, measured inside the epoch (immune to run-to-run variance)
    real = st._hash_matches
    def timed(*args):
        t = time.perf_counter()
        ok = real(*args)
        hashing[0] += time.perf_counter() - t
        return ok
    st._hash_matches = timed
store = ActivationStore(a["store"])
start, n = time.perf_counter(), 0
for batch in store.iter_batches(a["batch_size"], buffer_rows=a["buffer_rows"], seed=0):
    n += batch.shape[0]
print(json.dumps({"rows": n, "seconds": time.perf_counter() - start, "hash_seconds": hashing[0],
                  "store_gb": store.disk_bytes() / 2**30,
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
              f"{row['rows_per_s'] / base:.2f}; checksums took {row['hash_seconds']:.2f} s of the "
              f"{row['seconds']:.2f} s epoch, {100 * row['hash_seconds'] / row['seconds']:.1f} %), "
              f"peak RSS {row['peak_rss_mb']:,.0f} MB", flush=True)
    return results
