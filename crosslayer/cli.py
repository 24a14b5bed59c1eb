"""``crosslayer <verb>``: the command-line interface.

Every verb is a thin layer over a library function, registered once with :func:`verb` (its name,
help and argument adder together). Packages built on the library add verbs through the
``crosslayer.plugins`` entry point: each such module is imported before parsing and registers its
verbs with :func:`verb` (the experiments' ``reproduce``, ``study`` and ``figures`` arrive this way;
the library never imports them). Option defaults come from the library's config dataclasses.
User errors print ``error: <one line>`` and exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Callable, NamedTuple

from crosslayer.errors import CrosslayerError

PLUGIN_GROUP = "crosslayer.plugins"


class Verb(NamedTuple):
    run: Callable
    help: str
    add_args: Callable | None


VERBS: dict[str, Verb] = {}


def verb(name: str, help: str, args: Callable | None = None):
    """Register the decorated function as ``crosslayer NAME``; ``args(parser)`` adds its options."""
    def register(fn):
        VERBS[name] = Verb(fn, help, args)
        return fn
    return register


def default(config: type, name: str):
    """The default of field ``name`` of dataclass ``config`` (the one source of option defaults)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.default
    raise KeyError(f"{config.__name__} has no field {name}")


def parse_count(text: str) -> int:
    """``"200k"`` -> 200000, ``"2M"`` -> 2000000, ``"5000"`` -> 5000."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 5000, 200k, 2M)") from None
    if not value == value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite count (examples: 5000, 200k, 2M)")
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def _number(text: str, kind: type, *, zero_ok: bool):
    """``text`` as a finite ``kind`` that is > 0 (or >= 0 with ``zero_ok``); else an argparse error."""
    want = f"{'a non-negative' if zero_ok else 'a positive'} {'whole number' if kind is int else 'number'}"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"{text!r} must be {want}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: a whole number >= 1."""
    return _number(text, int, zero_ok=False)


def nonnegative_int(text: str) -> int:
    """argparse ``type=``: a whole number >= 0."""
    return _number(text, int, zero_ok=True)


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0 (not nan, not inf)."""
    return _number(text, float, zero_ok=False)


def nonnegative_float(text: str) -> float:
    """argparse ``type=``: a finite number >= 0."""
    return _number(text, float, zero_ok=True)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line ``error: ...`` (exit status 2), like every other
    user error; the subcommand parsers inherit it."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        self.exit(2)


# ----------------------------------------------------------------------------- verbs

SHARED_OPTIONS = {
    "model": ("--model", dict(default="smollm2-135m", help="model name (see `crosslayer models`)")),
    "model_dtype": ("--model-dtype", dict(default="auto", help="model dtype: auto (bfloat16 where fast) | float32 | "
                                                                 "bfloat16")),
    "corpus": ("--corpus", dict(default="builtin", help="'builtin', a text file/folder, a .jsonl, or hf:NAME")),
    "seq_len": ("--seq-len", dict(type=positive_int, default=128, help="window length in tokens")),
    "dictionary": ("--dictionary", dict(required=True, help="dictionary folder (per-layer SAEs, crosscoder or "
                                                            "transcoder)")),
    "store": ("--store", dict(required=True, help="activation store of the same model and hooks (a transcoder: its "
                                                  "store pair)")),
    "device": ("--device", dict(default="cpu", help="cpu | cuda: where the model and the dictionary run")),
}
"""Options that several verbs take, each defined once."""


def shared(p, *names: str) -> None:
    """Add the :data:`SHARED_OPTIONS` ``names`` to parser ``p``."""
    for name in names:
        flag, kwargs = SHARED_OPTIONS[name]
        p.add_argument(flag, **kwargs)


@verb("models", "list the models that can be loaded here")
def cmd_models(args):
    from crosslayer.models import available_models

    for row in available_models():
        print(f"{'yes' if row['available'] else 'no ':4} {row['name']:40} {row['note']}")


def _add_inspect(p):
    shared(p, "model", "corpus", "seq_len", "model_dtype")
    p.add_argument("--tokens", type=parse_count, default=parse_count("8k"), help="held-out tokens to score")
    p.add_argument("--out", default=None, help="optional folder for the CSV tables")


@verb("inspect", "load a model, score held-out text per source label, print per-layer residual norms", _add_inspect)
def cmd_inspect(args):
    import time
    from pathlib import Path

    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.models import load_model
    from crosslayer.scoring import greedy, score

    corpus = load_corpus(args.corpus)
    start = time.time()
    model = load_model(args.model, dtype=args.model_dtype)
    print(f"loaded {args.model} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{str(model.cfg.dtype).removeprefix('torch.')}) in {time.time() - start:.1f}s")
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        print(f"greedy: {prompt!r} -> {greedy(model, prompt)!r}")
    windows = make_windows(corpus, model.tokenizer, split="heldout", seq_len=args.seq_len, n_tokens=args.tokens,
                           seed=0)
    losses, norms = score(model, windows)
    print("\nnext-token cross-entropy on held-out text, by source label (nats):")
    print(losses.to_string(index=False, float_format="%.3f"))
    print("\nresidual-stream norm after each block (position 0 is the attention sink):")
    wide = norms.pivot(index="layer", columns="where", values=["median_norm", "max_norm"])
    print(wide.to_string(float_format="%.0f"))
    if args.out:
        from crosslayer.io import write_csv

        out = Path(args.out)
        write_csv(losses, out / "heldout_loss.csv")
        write_csv(norms, out / "residual_norms.csv")
        print(f"\nwrote {out}/heldout_loss.csv and residual_norms.csv")


def _add_harvest(p):
    shared(p, "model", "corpus", "seq_len", "model_dtype")
    p.add_argument("--layers", default="all", help="all | 5 | 0-5 | 0,4,8 | 10-")
    p.add_argument("--hook", default="resid_post",
                   help="resid_post | resid_pre | resid_mid | attn_out | mlp_out | mlp_post; resid_mid,mlp_out: a "
                        "transcoder pair (OUT/resid_mid and OUT/mlp_out, row-aligned, no outlier rule)")
    p.add_argument("--tokens", type=parse_count, default=parse_count("200k"),
                   help="token positions to run (rounded up to whole windows; excluded rows are not stored)")
    p.add_argument("--split", default="train", help="train | heldout")
    p.add_argument("--seed", type=int, default=0, help="document-order seed")
    p.add_argument("--out", required=True, help="store folder (created; a rerun resumes it)")
    p.add_argument("--store-dtype", default="bfloat16", help="store dtype: bfloat16 | float16")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument("--outlier-factor", type=nonnegative_float, default=10.0,
                   help="drop rows whose norm exceeds this x the layer median (0 keeps them)")
    shared(p, "device")


@verb("harvest", "run a model over the corpus once and store every chosen layer's activations", _add_harvest)
def cmd_harvest(args):
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.harvest import check_seq_len, harvest, hook_names, parse_layers
    from crosslayer.models import load_model

    from crosslayer.transcoder_data import INPUT_KIND, TARGET_KIND, harvest_pair

    pair = args.hook == f"{INPUT_KIND},{TARGET_KIND}"
    corpus = load_corpus(args.corpus)
    model = load_model(args.model, dtype=args.model_dtype, device=args.device)
    for kind in ((INPUT_KIND, TARGET_KIND) if pair else (args.hook,)):
        hook_names(model, kind, parse_layers(args.layers, model.cfg.n_layers))  # fail fast
    check_seq_len(model, args.seq_len)
    windows = make_windows(corpus, model.tokenizer, split=args.split, seq_len=args.seq_len,
                           n_tokens=args.tokens, seed=args.seed)
    if pair:
        stores = harvest_pair(model, windows, out_dir=args.out, layers=args.layers, dtype=args.store_dtype,
                              batch_size=args.batch_size)
        print(f"transcoder pair {args.out}: {stores.inputs}\n{stores.targets}")
        return
    store = harvest(model, windows, out_dir=args.out, hook=args.hook, layers=args.layers,
                    dtype=args.store_dtype, batch_size=args.batch_size,
                    outlier_factor=args.outlier_factor or None)
    print(f"{store}\nexcluded: {store.manifest['excluded']}; disk {store.disk_bytes() / 2**20:.0f} MB "
          f"({store.disk_bytes() / max(1, store.n_rows) / 1024:.1f} KB per stored token)")


def _add_verify(p):
    p.add_argument("dir", help="activation store folder")


@verb("verify", "check an activation store: manifest, every shard's sidecar and SHA-256", _add_verify)
def cmd_verify(args):
    from crosslayer.store import ActivationStore

    store = ActivationStore(args.dir)
    store.verify()
    print(f"OK: {store.path}: {len(store.shards)} shards, {store.n_rows:,} rows, every checksum matches")


def _add_bench(p):
    p.add_argument("what", choices=["harvest", "crosscoder", "reader"], help="which benchmark")
    p.add_argument("--stores", default="runs/demo/stores/train,runs/demo/stores/heldout",
                   help="comma-separated stores for the reader benchmark")
    p.add_argument("--buffer-rows", type=positive_int, default=2048, help="reader buffer for the reader benchmark")
    p.add_argument("--store", default="runs/demo/stores/train", help="store for the crosscoder benchmark")
    p.add_argument("--width", type=positive_int, default=4096, help="crosscoder features for the crosscoder benchmark")
    p.add_argument("--k", type=positive_int, default=32, help="TopK k for the crosscoder benchmark")
    shared(p, "model", "model_dtype")
    p.add_argument("--tokens", default="50k,200k", help="comma-separated token counts")
    p.add_argument("--layers", default="all", help="layers to harvest")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="windows per forward pass (harvest, default 8) / tokens per step (crosscoder, default 4096)")


@verb("bench", "print speed and memory benchmarks (ratios against a baseline from the same run)", _add_bench)
def cmd_bench(args):
    from crosslayer.bench import bench_crosscoder, bench_harvest, bench_reader

    if args.what == "reader":
        bench_reader(args.stores.split(","), buffer_rows=args.buffer_rows)
        return
    if args.what == "crosscoder":
        bench_crosscoder(args.store, width=args.width, k=args.k, batch_size=args.batch_size or 4096)
        return
    counts = tuple(parse_count(c) for c in args.tokens.split(","))
    bench_harvest(model_name=args.model, counts=counts, layers=args.layers, model_dtype=args.model_dtype,
                  batch_size=args.batch_size or 8)


def _add_training_common(p, train_cfg: type, arch_cfg: type, *, out_help: str, width_help: str):
    from crosslayer.training import TrainConfig

    p.add_argument("--store", required=True, help="activation store folder (crosslayer harvest)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--width", type=positive_int, required=True, help=width_help)
    p.add_argument("--k", type=positive_int, default=default(arch_cfg, "k"),
                   help="active features per token (topk/batchtopk; jumprelu target L0)")
    p.add_argument("--tokens", type=parse_count, default=None, help="training tokens (default: the store's rows)")
    p.add_argument("--batch-size", type=positive_int, default=default(train_cfg, "batch_size"), help="tokens per step")
    p.add_argument("--lr", type=positive_float, default=default(train_cfg, "lr"), help="Adam learning rate")
    p.add_argument("--layers", default=None, help="subset of the store's layers, e.g. 0-5 (default: all)")
    p.add_argument("--seed", type=int, default=default(train_cfg, "seed"), help="init and data-order seed")
    p.add_argument("--sparsity-coef", type=nonnegative_float, default=None,
                   help="L1 (relu/standard) or L0/tanh (jumprelu) sparsity coefficient (default by activation)")
    p.add_argument("--heldout", default=None,
                   help="held-out store (same model and layers): its FVU goes into the curve and the convergence verdict")
    p.add_argument("--lr-decay-frac", type=positive_float, default=default(TrainConfig, "lr_decay_frac"),
                   help="share of the steps over which the learning rate decays linearly to 0 (1 = the whole run)")
    p.add_argument("--aux-frac", type=positive_float, default=1.0,
                   help="share of each batch's rows that carry the AuxK loss of dead latents (topk; in (0, 1])")
    p.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: each rank its local GPU)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast only with AVX512-BF16 or a GPU)")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="data-parallel processes on this machine: relaunches itself under torchrun (gloo on CPU, "
                        "nccl on CUDA); for several machines run torchrun yourself (README, Scaling out)")
    p.add_argument("--in-memory", action="store_true",
                   help="load the store's selected layers into --device memory once and train from there "
                        "(a large GPU: no disk round trip)")


def _add_train_saes(p):
    from crosslayer.saes import ARCHS, SAETrainConfig

    _add_training_common(p, SAETrainConfig, SAETrainConfig,
                         out_help="output folder (one sae-lens folder per hook); a rerun resumes",
                         width_help="features per layer")
    p.add_argument("--arch", default=default(SAETrainConfig, "arch"), choices=ARCHS, help="SAE architecture")
    p.add_argument("--trainer", default="crosslayer", choices=("crosslayer", "sae-lens"),
                   help="crosslayer: the crosscoders' trainer, all layers in one batched module (topk only); "
                        "sae-lens: its SAETrainer, layer by layer (the reference implementation)")


@verb("train-saes", "train one TopK SAE per layer of an activation store (the baseline), saved as sae-lens folders",
      _add_train_saes)
def cmd_train_saes(args):
    from crosslayer.store import ActivationStore
    from crosslayer.training import TrainConfig

    if args.trainer == "sae-lens" and (args.in_memory or args.nproc > 1 or "WORLD_SIZE" in os.environ):
        raise CrosslayerError("--trainer sae-lens runs in one process from the store on disk; drop --nproc and "
                              "--in-memory, or use --trainer crosslayer")
    if args.trainer == "sae-lens" and args.aux_frac != 1.0:
        raise CrosslayerError("--aux-frac is an option of the crosslayer trainer; drop it or use --trainer crosslayer")
    if args.trainer == "sae-lens" and args.lr_decay_frac != default(TrainConfig, "lr_decay_frac"):
        raise CrosslayerError("--lr-decay-frac is an option of the crosslayer trainer; drop it or use --trainer "
                              "crosslayer")
    if _relaunched(args):
        return
    store = ActivationStore(args.store)
    layers = store.select(args.layers).layers
    if args.trainer == "crosslayer":
        _train_sae_stack(args, store, layers)
        return
    from crosslayer.saes import SAETrainConfig, train_per_layer_saes

    cfg = SAETrainConfig(width=args.width, tokens=args.tokens or store.n_rows, arch=args.arch, k=args.k,
                         sparsity_coefficient=args.sparsity_coef, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed)
    saes = train_per_layer_saes(store, cfg, out_dir=args.out, layers=layers, device=args.device)
    for row in saes.meta["layer_stats"]:
        print(f"layer {row['layer']:>2}: {row['tokens_per_s']:,.0f} tok/s, sample FVU {row['train_sample_fvu']:.3f}, "
              f"dead {row['dead_features']}")
    print(f"saved {saes.n_features:,} features over {saes.n_layers} layers to {args.out}")


def _train_sae_stack(args, store, layers: list[int]) -> None:
    from crosslayer.sae_stack import SAEStackConfig
    from crosslayer.training import TrainConfig, train_crosscoder_from_store

    if args.arch != "topk":
        raise CrosslayerError(f"the crosslayer trainer trains topk SAEs; use --trainer sae-lens for --arch {args.arch}")
    arch = SAEStackConfig(layers=tuple(layers), d_model=store.width, width=args.width, k=args.k,
                          aux_frac=args.aux_frac)
    cfg = TrainConfig(tokens=args.tokens or store.n_rows, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      bf16=args.bf16, lr_decay_frac=args.lr_decay_frac)
    saes = _train(store, arch, cfg, args, latent=1)
    if saes is None:
        return
    verdict = saes.meta.get("convergence", {})
    print(f"saved {saes.n_features:,} features over {saes.n_layers} layers to {args.out} (held-out FVU "
          f"{verdict.get('final_fvu', float('nan')):.3f}, converged: {verdict.get('converged')})")


def _add_train_crosscoder(p):
    from crosslayer.crosscoder import ACTIVATIONS, SPARSITIES, VARIANTS, CrosscoderConfig
    from crosslayer.training import TrainConfig

    _add_training_common(p, TrainConfig, CrosscoderConfig, out_help="output folder; a rerun resumes from its checkpoint",
                         width_help="number of features F")
    for name, choices, text in (("variant", VARIANTS, "which layers a feature reads/writes"),
                                ("activation", ACTIVATIONS, "activation function"),
                                ("sparsity", SPARSITIES, "how per-layer decoder norms combine (penalty, TopK score)")):
        p.add_argument(f"--{name}", default=default(CrosscoderConfig, name), choices=choices, help=text)
    p.add_argument("--window", type=positive_int, default=default(CrosscoderConfig, "window"),
                   help="layers per feature for --variant window")
    p.add_argument("--checkpoint-every", type=positive_int, default=default(TrainConfig, "checkpoint_every"),
                   help="steps between checkpoints")
    p.add_argument("--latent-parallel", type=positive_int, default=1,
                   help="ranks that share one crosscoder's features (topk; divides the processes and --width)")


@verb("train-crosscoder", "train a sparse crosscoder that reads and writes every layer of a store",
      _add_train_crosscoder)
def cmd_train_crosscoder(args):
    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.store import ActivationStore
    from crosslayer.training import TrainConfig, train_crosscoder_from_store

    if _relaunched(args):
        return
    store = ActivationStore(args.store)
    arch = CrosscoderConfig(layers=tuple(store.select(args.layers).layers), d_model=store.width,
                            n_features=args.width, variant=args.variant, window=args.window,
                            activation=args.activation, k=args.k, sparsity=args.sparsity, aux_frac=args.aux_frac)
    cfg = TrainConfig(tokens=args.tokens or store.n_rows, batch_size=args.batch_size, lr=args.lr,
                      sparsity_coef=args.sparsity_coef, checkpoint_every=args.checkpoint_every, bf16=args.bf16,
                      seed=args.seed, lr_decay_frac=args.lr_decay_frac)
    cc = _train(store, arch, cfg, args, latent=args.latent_parallel)
    if cc is not None:
        print(f"saved {cc} to {args.out}")


def _relaunched(args) -> bool:
    """``--nproc N`` outside torchrun: run this same command under ``torchrun --nproc_per_node N`` and wait for it
    (True: done here). Under torchrun, or with N = 1, False (train in this process)."""
    if args.nproc == 1 or "WORLD_SIZE" in os.environ:
        return False
    latent = getattr(args, "latent_parallel", 1)
    if args.nproc % latent:
        raise CrosslayerError(f"--nproc {args.nproc} is not a multiple of --latent-parallel {latent}")
    if args.batch_size % (args.nproc // latent):
        raise CrosslayerError(f"--batch-size {args.batch_size} is not divisible by the {args.nproc // latent} "
                              "data-parallel ranks, which share each batch equally; choose a multiple")
    import subprocess

    argv = [a for i, a in enumerate(args.argv) if a != "--nproc" and (i == 0 or args.argv[i - 1] != "--nproc")
            and not a.startswith("--nproc=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "crosslayer", *argv]
    code = subprocess.call(command)
    if code:
        raise CrosslayerError(f"the {args.nproc} training processes failed (exit status {code}; their messages are "
                              "above); fix the cause and run the same command again to resume")
    return True


def _train(store, arch, cfg, args, *, latent: int):
    """Train ``arch`` on ``store`` in this process, as one rank of a torchrun job when there is one; returns the
    dictionary on rank 0 (None on the other ranks, which print nothing)."""
    from crosslayer.distributed import init_mesh
    from crosslayer.training import train_crosscoder_from_store

    mesh = init_mesh(args.device, latent)
    device = mesh.device if mesh is not None else args.device
    if args.in_memory:
        from crosslayer.store import InMemoryStore

        store = InMemoryStore(store, layers=list(arch.layers), device=device)
    dictionary = train_crosscoder_from_store(store, arch, cfg, out_dir=args.out, heldout_store=args.heldout,
                                             device=device, mesh=mesh, progress=mesh is None or mesh.writer)
    return dictionary if mesh is None or mesh.writer else None


def _add_eval(p):
    from crosslayer.dictionary import WRITE_FRACTION

    shared(p, "dictionary", "store", "model_dtype")
    p.add_argument("--tokens", type=parse_count, default=parse_count("50k"), help="rows for reconstruction metrics")
    p.add_argument("--windows", type=nonnegative_int, default=32, help="windows for the downstream CE/KL evaluation (0: skip)")
    p.add_argument("--l0-frac", type=positive_float, default=WRITE_FRACTION,
                   help="a (feature, layer) pair counts in L0 when its decoder norm is >= this x the feature's largest")
    p.add_argument("--boot", type=positive_int, default=1000, help="bootstrap resamples (over documents) for the 95%% intervals")
    p.add_argument("--out", default=None, help="CSV path for the table")
    shared(p, "device")


@verb("eval", "evaluate a dictionary: FVU, MSE, L0, dead/dense, CE loss recovered and KL when spliced", _add_eval)
def cmd_eval(args):
    from crosslayer.dictionary import load_dictionary
    from crosslayer.evals import evaluate, summary_lines
    from crosslayer.models import load_model
    from crosslayer.store import ActivationStore

    dictionary = load_dictionary(args.dictionary, device=args.device)
    if dictionary.is_transcoder:
        _eval_transcoder(args, dictionary)
        return
    store = ActivationStore(args.store)
    model = load_model(store.manifest["model"], dtype=args.model_dtype, device=args.device) if args.windows else None
    table = evaluate(dictionary, store, model=model, n_tokens=args.tokens, n_windows=args.windows or 1,
                     l0_frac=args.l0_frac, n_boot=args.boot, out=args.out, progress=True)
    print("\n".join(summary_lines(table)))


def _eval_transcoder(args, clt) -> None:
    from crosslayer.models import load_model
    from crosslayer.transcoder_data import open_pair
    from crosslayer.transcoder_evals import evaluate_transcoder

    pair = open_pair(args.store)
    model = load_model(pair.inputs.manifest["model"], dtype=args.model_dtype, device=args.device) if args.windows else None
    table = evaluate_transcoder(clt, pair, model=model, n_tokens=args.tokens, n_windows=args.windows or 1,
                                l0_frac=args.l0_frac, n_boot=args.boot, out=args.out)
    cols = [c for c in ("scope", "layer", "splice", "fvu", "l0_read", "l0", "l0_tuple", "ce_clean", "ce_spliced",
                        "ce_spliced_lo", "ce_spliced_hi", "ce_recovered", "kl") if c in table]
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    print("l0_read: features of the layer's group active per token; l0: active (feature, layer written) pairs; "
          "replacement: every MLP output replaced by the transcoder's; replacement_error: plus the clean error terms "
          "(reproduces the model)")


def _add_train_clt(p):
    from crosslayer.clt import ACTIVATIONS, CLTConfig
    from crosslayer.training import TrainConfig

    p.add_argument("--store", required=True, help="transcoder store pair (crosslayer harvest --hook resid_mid,mlp_out)")
    p.add_argument("--out", required=True, help="output folder; a rerun resumes from its checkpoint")
    p.add_argument("--width", type=positive_int, required=True, help="features per layer")
    p.add_argument("--k", type=positive_int, default=default(CLTConfig, "k"), help="active features per token and layer (topk)")
    p.add_argument("--activation", default=default(CLTConfig, "activation"), choices=ACTIVATIONS, help="activation")
    p.add_argument("--per-layer", action="store_true", help="per-layer transcoders (PLT, the baseline): each feature "
                                                            "writes only its own layer's MLP output")
    p.add_argument("--tokens", type=parse_count, default=None, help="training tokens (default: the store's rows)")
    p.add_argument("--batch-size", type=positive_int, default=default(TrainConfig, "batch_size"), help="tokens per step")
    p.add_argument("--lr", type=positive_float, default=default(TrainConfig, "lr"), help="Adam learning rate")
    p.add_argument("--layers", default=None, help="contiguous subset of the store's layers, e.g. 0-5 (default: all)")
    p.add_argument("--seed", type=int, default=default(TrainConfig, "seed"), help="init and data-order seed")
    p.add_argument("--sparsity-coef", type=nonnegative_float, default=None, help="JumpReLU tanh sparsity coefficient")
    p.add_argument("--heldout", default=None, help="held-out store pair: its MLP-output FVU goes into the curve")
    p.add_argument("--device", default="cpu", help="cpu | cuda")


@verb("train-clt", "train a cross-layer transcoder (resid_mid -> mlp_out of this and later layers) or, with "
                   "--per-layer, per-layer transcoders", _add_train_clt)
def cmd_train_clt(args):
    from crosslayer.clt import CLTConfig
    from crosslayer.training import TrainConfig
    from crosslayer.transcoder_data import open_pair, train_transcoder_from_pair

    pair = open_pair(args.store)
    arch = CLTConfig(layers=tuple(pair.inputs.select(args.layers).layers), d_model=pair.inputs.width, width=args.width,
                     k=args.k, activation=args.activation, cross_layer=not args.per_layer)
    cfg = TrainConfig(tokens=args.tokens or pair.inputs.n_rows, batch_size=args.batch_size, lr=args.lr,
                      sparsity_coef=args.sparsity_coef, seed=args.seed)
    clt = train_transcoder_from_pair(pair, arch, cfg, out_dir=args.out, heldout_pair_path=args.heldout,
                                     device=args.device)
    print(f"saved {clt} to {args.out} (held-out FVU {clt.meta['convergence']['final_fvu']:.3f})")


def _add_attribute(p):
    from crosslayer.attribution import AttributionConfig

    p.add_argument("prompt", help="the prompt to trace (tokenised without a BOS)")
    p.add_argument("--dictionary", required=True, help="transcoder folder (crosslayer train-clt)")
    p.add_argument("--out", default=None, help="graph JSON path (circuit-tracer viewer format); a PNG goes next to it")
    for name in ("node_threshold", "edge_threshold"):
        p.add_argument(f"--{name.replace('_', '-')}", type=nonnegative_float, default=default(AttributionConfig, name),
                       help=f"keep the {name.split('_')[0]}s carrying this share of the influence on the logits")
    p.add_argument("--max-logits", type=positive_int, default=default(AttributionConfig, "max_logits"),
                   help="most output logits traced")
    p.add_argument("--batch-size", type=positive_int, default=default(AttributionConfig, "batch_size"),
                   help="targets per backward pass")
    shared(p, "model_dtype")


@verb("attribute", "trace a prompt through a cross-layer transcoder: attribution graph JSON + picture", _add_attribute)
def cmd_attribute(args):
    from pathlib import Path

    from crosslayer.attribution import AttributionConfig, attribute, plot_graph, prune, summary, write_graph
    from crosslayer.dictionary import load_dictionary
    from crosslayer.models import load_model

    cfg = AttributionConfig(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                            max_logits=args.max_logits, batch_size=args.batch_size)
    clt = load_dictionary(args.dictionary)
    if clt.model_name is None:
        raise CrosslayerError(f"{args.dictionary} records no model; train it with `crosslayer train-clt`")
    model = load_model(clt.model_name, dtype="float32" if args.model_dtype == "auto" else args.model_dtype)
    graph = attribute(model, clt, args.prompt, cfg=cfg, progress=True)
    pruned = prune(graph, node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
    for key, value in summary(graph, pruned).items():
        print(f"{key}: {value}")
    if args.out:
        write_graph(graph, args.out, cfg=cfg)
        plot_graph(graph, pruned, Path(args.out).with_suffix(".png"))
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def _add_features(p):
    shared(p, "dictionary", "store", "model_dtype")
    p.add_argument("--feature", type=nonnegative_int, default=None, help="feature index (0..F-1) for the dashboard")
    p.add_argument("--search", default=None, help="instead: list features whose logit effect most raises this token")
    p.add_argument("--examples", type=positive_int, default=10, help="top-activating examples to show")
    p.add_argument("--top", type=positive_int, default=10, help="features listed by --search")
    p.add_argument("--logits", type=positive_int, default=8, help="tokens pushed up / down to show per layer")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="rows encoded per batch while streaming")
    shared(p, "device")


@verb("features", "text dashboard of one feature: density, top/quantile examples, logit effects, decoder profile",
      _add_features)
def cmd_features(args):
    from crosslayer.dictionary import load_dictionary
    from crosslayer.features import dashboard, find_features_for_token
    from crosslayer.models import load_model
    from crosslayer.store import ActivationStore

    if (args.feature is None) == (args.search is None):
        raise CrosslayerError("give exactly one of --feature N and --search TOKEN")
    store = ActivationStore(args.store)
    dictionary = load_dictionary(args.dictionary, device=args.device)
    model = load_model(store.manifest["model"], dtype=args.model_dtype, device=args.device)
    if args.search is not None:
        table = find_features_for_token(dictionary, model, args.search, top=args.top)
        print(table.to_string(index=False, float_format="%.3f"))
        return
    print(dashboard(dictionary, store, model, args.feature, k=args.examples, n_logits=args.logits,
                    batch_size=args.batch_size))


def _add_browse(p):
    p.add_argument("--dictionary", action="append", default=[],
                   help="dictionary folder (repeatable: crosscoders, per-layer SAEs, ... side by side)")
    p.add_argument("--store", default=None, help="held-out activation store of the same model and hooks")
    p.add_argument("--out", required=True, help="site folder (written whole at the end; an older site there is replaced)")
    p.add_argument("--examples", type=positive_int, default=10, help="top-activating examples per feature")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="rows encoded per batch while streaming")
    p.add_argument("--serve", action="store_true", help="serve the site with live steering (after building it, if "
                                                         "--dictionary is given)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind with --serve (default: localhost only)")
    p.add_argument("--port", type=nonnegative_int, default=8000, help="port for --serve")
    shared(p, "model_dtype")


@verb("browse", "write a static feature-browser site of dictionaries (--serve: serve it with live steering)", _add_browse)
def cmd_browse(args):
    from pathlib import Path

    if not args.dictionary and not args.serve:
        raise CrosslayerError("give --dictionary DIR (and --store) to build a site, or --serve to serve the one at --out")
    if args.dictionary:
        from crosslayer.browse import build_site
        from crosslayer.store import ActivationStore

        if args.store is None:
            raise CrosslayerError("--store is required with --dictionary: the held-out activation store to read "
                                  "examples and statistics from")
        build_site(args.dictionary, ActivationStore(args.store), args.out, examples=args.examples,
                   batch_size=args.batch_size)
    if args.serve:
        from crosslayer.serve import make_server, steerer_for_site

        server = make_server(args.out, steerer_for_site(args.out, model_dtype=args.model_dtype), host=args.host,
                             port=args.port)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {args.host}, reachable beyond this machine", file=sys.stderr)
        host, port = server.server_address[:2]
        print(f"serving {Path(args.out)} with live steering at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()


def _add_lens(p):
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts: one table each)")
    p.add_argument("--target", default=None, help="token whose rank and probability to follow, e.g. ' Paris'")
    shared(p, "model", "model_dtype")
    p.add_argument("--top-k", type=positive_int, default=5, help="top tokens kept per layer and position")
    p.add_argument("--position", type=int, default=-1, help="position printed (default: the last token)")
    p.add_argument("--plot", default=None, help="save a layer x position heatmap (PNG/PDF/SVG) of the first prompt")
    shared(p, "device")
    p.add_argument("--out", default=None, help="optional CSV path for the full table")
    p.add_argument("--tuned", default=None, help="a tuned lens folder (`crosslayer train-lens`): decode through "
                                                 "its translators instead of the plain logit lens")


@verb("lens", "logit lens (or --tuned: tuned lens): decode every layer's residual through the final norm and "
      "unembedding", _add_lens)
def cmd_lens(args):
    from crosslayer.lens import format_lens, logit_lens, plot_lens
    from crosslayer.models import load_model

    tuned = None
    if args.tuned:
        from crosslayer.tuned_lens import TunedLens

        tuned = TunedLens.load(args.tuned).to(args.device)
    model = load_model(args.model, dtype=args.model_dtype, device=args.device)
    table = logit_lens(model, args.prompt, target=args.target, top_k=args.top_k, tuned=tuned)
    for i, prompt in enumerate(args.prompt):
        print(f"{'' if i == 0 else chr(10)}prompt {i}: {prompt!r}")
        print(format_lens(table, args.position, prompt=i))
    if args.plot:
        print(f"heatmap: {plot_lens(table, args.plot)}")
    if args.out:
        from crosslayer.io import write_csv

        write_csv(table, args.out)
        print(f"table: {args.out}")


def _add_train_lens(p):
    from crosslayer.tuned_lens import TunedLensConfig

    shared(p, "model", "corpus", "seq_len", "model_dtype")
    d = TunedLensConfig()
    p.add_argument("--out", required=True, help="folder for the tuned lens (translators and cfg)")
    p.add_argument("--layers", default=None, help="layers to translate, e.g. -1,0-28 (default: the embedding and "
                                                  "every layer but the last)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="optimiser steps")
    p.add_argument("--batch-windows", type=positive_int, default=d.batch_windows, help="windows per step")
    p.add_argument("--positions", type=positive_int, default=d.positions, help="tokens decoded per step")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the windows and sampled positions")
    p.add_argument("--heldout-tokens", type=parse_count, default=parse_count("4k"),
                   help="held-out tokens on which KL by layer is reported for both lenses (0: none)")


@verb("train-lens", "train a tuned lens (an affine translator per layer, Belrose et al. 2023) on the corpus",
      _add_train_lens)
def cmd_train_lens(args):
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.harvest import check_seq_len
    from crosslayer.models import load_model
    from crosslayer.tuned_lens import TunedLensConfig, lens_kl_by_layer, train_tuned_lens

    corpus = load_corpus(args.corpus)
    model = load_model(args.model, dtype=args.model_dtype)
    check_seq_len(model, args.seq_len)
    layers = None if args.layers is None else _lens_layers(args.layers, model.cfg.n_layers)
    cfg = TunedLensConfig(steps=args.steps, batch_windows=args.batch_windows, positions=args.positions,
                          lr=args.lr, seed=args.seed)
    windows = make_windows(corpus, model.tokenizer, split="train", seq_len=args.seq_len,
                           n_tokens=cfg.steps * cfg.batch_windows * args.seq_len, seed=args.seed)
    lens = train_tuned_lens(model, windows, layers=layers, cfg=cfg)
    out = lens.save(args.out)
    print(f"tuned lens for layers {lens.layers}: {out} (train KL {lens.meta['train_kl_first_last'][0]:.3f} -> "
          f"{lens.meta['train_kl_first_last'][1]:.3f} nats)")
    if args.heldout_tokens:
        held = make_windows(corpus, model.tokenizer, split="heldout", seq_len=args.seq_len,
                            n_tokens=args.heldout_tokens, seed=args.seed)
        table = lens_kl_by_layer(model, held, lens)
        from crosslayer.io import write_csv

        write_csv(table, out / "heldout_kl.csv")
        wide = table[table.lens != "tuned_minus_logit"].pivot(index="layer", columns="lens", values="kl")
        print(f"held-out KL(final || layer), nats, {table.tokens.iloc[0]:,} tokens of {table.docs.iloc[0]} "
              f"documents (CIs in {out / 'heldout_kl.csv'}):\n{wide.round(3).to_string()}")


def _lens_layers(text: str, n_layers: int) -> list[int]:
    """``-1,0-5`` -> [-1, 0, ..., 5]: the layer syntax of ``--layers`` plus -1 for the embedding."""
    from crosslayer.harvest import parse_layers

    parts = [p for p in text.split(",") if p.strip()]
    embed = [-1] if "-1" in [p.strip() for p in parts] else []
    rest = ",".join(p for p in parts if p.strip() != "-1")
    return embed + (parse_layers(rest, n_layers) if rest else [])


def _add_generation(g):
    g.add_argument("--tokens", type=nonnegative_int, default=20, help="tokens generated (0: no generation)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, shared by the clean and steered runs")
    g.add_argument("--temperature", type=nonnegative_float, default=1.0, help="sampling temperature (0: greedy)")


def _add_steer(p):
    from crosslayer.interventions import AT, DEFAULT_AT, MODES

    p.add_argument("prompt", help="prompt text")
    shared(p, "dictionary", "model_dtype")
    p.add_argument("--feature", type=nonnegative_int, required=True, action="append", help="feature index (repeatable)")
    p.add_argument("--value", type=float, default=0.0, help="clamp/add value or scale factor")
    p.add_argument("--mode", default="clamp", choices=MODES, help="how to edit the feature(s)")
    p.add_argument("--at", default=DEFAULT_AT, choices=AT,
                   help="which layers a multi-layer feature is edited at: each (every layer it writes, pinned to "
                        "clean + its change) | first | peak (one layer; the model carries it on)")
    p.add_argument("--model", default=None, help="model (default: the one the dictionary was trained on)")
    p.add_argument("--top", type=positive_int, default=10, help="tokens shown rising / falling")
    shared(p, "device")
    _add_generation(p.add_argument_group("generation (clean and steered, same seed)"))


@verb("steer", "clamp / scale / ablate features and show how the next-token distribution and generation move",
      _add_steer)
def cmd_steer(args):
    from crosslayer.dictionary import load_dictionary
    from crosslayer.interventions import Edit, generate, steer
    from crosslayer.models import load_model

    dictionary = load_dictionary(args.dictionary, device=args.device)
    name = args.model or dictionary.model_name
    if name is None:
        raise CrosslayerError("the dictionary does not record its model; pass --model")
    model = load_model(name, dtype=args.model_dtype, device=args.device)
    n_prompt = len(model.tokenizer(args.prompt, add_special_tokens=False)["input_ids"])  # to_tokens truncates
    if n_prompt + args.tokens > model.cfg.n_ctx:
        raise CrosslayerError(f"the prompt ({n_prompt} tokens) plus --tokens {args.tokens} exceeds the context of "
                              f"{name} ({model.cfg.n_ctx} tokens); shorten the prompt or lower --tokens")
    edits = [Edit(f, args.mode, args.value) for f in args.feature]
    table, summary = steer(model, dictionary, args.prompt, edits, top=args.top, at=args.at)
    acts = ", ".join(f"{f}: {a:.3g}" for f, a in summary["clean_activation"].items())
    layers = "; ".join(f"{f}: {ls}" for f, ls in summary["layers"].items())
    print(f"prompt {args.prompt!r}; {args.mode} {args.feature} value {args.value} at {summary['at']} (layers "
          f"{layers}); clean activation at the last token {acts}; KL(clean || steered) = {summary['kl']:.4f}")
    print(table.to_string(index=False, float_format="%.4f"))
    if args.tokens:
        runs = {"clean": [], "steered": edits}
        text = {k: generate(model, dictionary, args.prompt, e, at=args.at, max_new_tokens=args.tokens, seed=args.seed,
                            temperature=args.temperature) for k, e in runs.items()}
        print(f"\nclean:   {args.prompt}{text['clean']}\nsteered: {args.prompt}{text['steered']}")


# ----------------------------------------------------------------------------- entry point

def load_plugins() -> None:
    """Import every module registered under the ``crosslayer.plugins`` entry point (they add verbs)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()


def build_parser() -> argparse.ArgumentParser:
    load_plugins()
    parser = _Parser(
        prog="crosslayer",
        description="Per-layer SAEs vs sparse crosscoders on the residual stream of every layer.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, v in VERBS.items():
        p = sub.add_parser(name, help=v.help, description=v.help)
        if v.add_args is not None:
            v.add_args(p)
        p.set_defaults(func=v.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error, already printed as one line (2)
        return stop.code if isinstance(stop.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc relaunches under torchrun
    try:
        args.func(args)
    except CrosslayerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished steps are kept and the command can be run again to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # run as `python -m crosslayer.cli`: use the importable module, where plugins register
    from crosslayer.cli import main as cli_main

    sys.exit(cli_main())
