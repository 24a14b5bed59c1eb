"""The GPU check's measurements: a short paper-preset slice on one device, with throughput ratios.

Run by ``scripts/gpu_check.sh`` (which first makes the venv and runs the tests); by hand:
    python scripts/gpu_check.py --device cuda --out /tmp/gpu-check
    python scripts/gpu_check.py --device cpu --model tiny-2l-64d --tokens 2k --width 64 --k 4 --batch-size 64 --steps 3
Steps, each timed:
1. plain forward (stop after the last harvested layer, no hooks) vs harvest of the same windows, all layers;
2. the dense GEMM peak of the device (4096^3; bfloat16 on CUDA, float32 on CPU) vs the crosscoder training step
   on the harvested store (``--in-memory``: rows in device memory), as achieved encoder-GEMM FLOP/s of a step;
3. training steps in one CPU process with one thread, on a narrower crosscoder (``--cpu-width``: a full-width step
   takes minutes there), for the GPU / 1 CPU process ratio of latent-tokens per second (tokens/s x width; a step's
   cost is proportional to the width).
Prints one line per measurement and writes them to ``<out>/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    """Wait for the device's queued work (timings on CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_tflops(device: str, n: int = 4096, repeats: int = 10) -> float:
    """Dense n^3 matmul throughput (TFLOP/s): bfloat16 on CUDA, float32 on CPU."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def harvest_slice(args, out: Path) -> tuple[dict, object]:
    from crosslayer.bench import forward_tokens_per_second
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.harvest import harvest
    from crosslayer.models import load_model

    model = load_model(args.model, dtype="auto", device=args.device)
    windows = make_windows(load_corpus("builtin"), model.tokenizer, split="train", seq_len=128, n_tokens=args.tokens,
                           seed=0)
    forward = forward_tokens_per_second(model, windows.tokens, batch_size=args.harvest_batch,
                                        stop_at_layer=model.cfg.n_layers)
    shutil.rmtree(out / "store", ignore_errors=True)  # a rerun times a fresh harvest, not a resumed one
    sync(args.device)
    start = time.perf_counter()
    store = harvest(model, windows, out_dir=out / "store", layers="all", batch_size=args.harvest_batch, progress=False)
    sync(args.device)
    seconds = time.perf_counter() - start
    rows = {"model": args.model, "model_dtype": str(model.cfg.dtype), "tokens": windows.n_tokens,
            "forward_tok_s": forward, "harvest_tok_s": windows.n_tokens / seconds,
            "harvest_vs_forward": windows.n_tokens / seconds / forward, "store_gb": store.disk_bytes() / 1e9}
    return rows, store


def train_slice(store, args, out: Path, *, device: str, steps: int, width: int, in_memory: bool) -> dict:
    """``steps`` steps of a ``width``-latent crosscoder over every layer of ``store``, timed by the trainer (its
    loop: the first step's calibration included, start-up and save not)."""
    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.store import InMemoryStore
    from crosslayer.training import TrainConfig, train_crosscoder_from_store

    arch = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=width, k=args.k)
    source = InMemoryStore(store, layers=store.layers, device=device) if in_memory else store
    cfg = TrainConfig(tokens=steps * args.batch_size, batch_size=args.batch_size, lr=1e-4, seed=0,
                      bf16=device.startswith("cuda"), checkpoint_every=10**9)
    folder = out / f"cc-{device}-{width}"
    shutil.rmtree(folder, ignore_errors=True)  # train, never load a finished run
    trained = train_crosscoder_from_store(source, arch, cfg, out_dir=folder, device=device, progress=False)
    tok_s = trained.meta["tokens_per_s_last_session"]
    step_s = args.batch_size / tok_s
    flops = 2 * args.batch_size * len(store.layers) * store.width * width  # the encoder GEMM of one step
    return {"device": device, "steps": steps, "batch_size": args.batch_size, "width": width, "k": args.k,
            "in_memory": in_memory, "step_s": step_s, "tok_s": tok_s, "latent_tok_s": tok_s * width,
            "encoder_gemm_tflops_achieved": flops / step_s / 1e12}


def main(argv=None) -> dict:
    from crosslayer.cli import parse_count

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda | cpu (the CPU fallback: same steps, no GPU)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=parse_count, default=parse_count("300k"), help="harvested tokens (all layers)")
    p.add_argument("--harvest-batch", type=int, default=32, help="windows per forward pass")
    p.add_argument("--width", type=int, default=34_560, help="crosscoder features (the paper preset's split width)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=100, help="timed training steps on the device")
    p.add_argument("--cpu-steps", type=int, default=2, help="timed training steps in 1 CPU process (0: skip)")
    p.add_argument("--cpu-width", type=int, default=2304, help="crosscoder features of the 1-CPU-process steps")
    p.add_argument("--out", default="gpu-check")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU here; use --device cpu for the CPU fallback")
    report = {"device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__}
    start = time.perf_counter()
    report["harvest"], store = harvest_slice(args, out)
    print(f"harvest {report['harvest']['tokens']:,} tokens x {store.n_layers} layers: "
          f"{report['harvest']['harvest_tok_s']:,.0f} tok/s; plain forward {report['harvest']['forward_tok_s']:,.0f} "
          f"tok/s; harvest / forward = {report['harvest']['harvest_vs_forward']:.2f}", flush=True)
    report["gemm_peak_tflops"] = gemm_tflops(args.device)
    report["train"] = train_slice(store, args, out, device=args.device, steps=args.steps, width=args.width,
                                  in_memory=True)
    step = report["train"]
    print(f"crosscoder {args.width:,} x {store.n_layers * store.width:,} inputs, k {args.k}, batch {args.batch_size} on "
          f"{args.device}: {step['step_s'] * 1e3:.1f} ms/step, {step['tok_s']:,.0f} tok/s; encoder GEMM "
          f"{step['encoder_gemm_tflops_achieved']:.2f} TFLOP/s vs peak {report['gemm_peak_tflops']:.2f} "
          f"= {step['encoder_gemm_tflops_achieved'] / report['gemm_peak_tflops']:.2f}", flush=True)
    if args.cpu_steps:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            report["train_cpu_1_process"] = train_slice(store, args, out, device="cpu", steps=args.cpu_steps,
                                                        width=args.cpu_width, in_memory=False)
        finally:
            torch.set_num_threads(threads)
        cpu = report["train_cpu_1_process"]
        print(f"1 CPU process (1 thread), {args.cpu_width:,} latents: {cpu['step_s']:.2f} s/step; {args.device} / 1 CPU "
              f"process = {step['latent_tok_s'] / cpu['latent_tok_s']:.1f}x in latent-tokens/s", flush=True)
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu check: {report['seconds']:.0f} s; {out / 'gpu_check.json'}")
    return report


if __name__ == "__main__":
    main()
