"""``crosslayer <verb>``: the command-line interface.

Every verb is a thin layer over a library function. User errors print ``error: <one line>`` and
exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crosslayer.errors import CrosslayerError

VERBS = {}


def verb(name: str, help: str):
    def register(fn):
        VERBS[name] = (fn, help)
        return fn
    return register


def parse_count(text: str) -> int:
    """``"200k"`` -> 200000, ``"2M"`` -> 2000000, ``"5000"`` -> 5000."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 5000, 200k, 2M)") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


# ----------------------------------------------------------------------------- verbs

@verb("models", "list the models that can be loaded here")
def cmd_models(args):
    from crosslayer.models import available_models

    for row in available_models():
        print(f"{'yes' if row['available'] else 'no ':4} {row['name']:40} {row['note']}")


def _add_inspect(p):
    p.add_argument("--model", default="smollm2-135m", help="model name (see `crosslayer models`)")
    p.add_argument("--corpus", default="builtin", help="'builtin', a text file/folder, a .jsonl, or hf:NAME")
    p.add_argument("--tokens", type=parse_count, default=parse_count("8k"), help="held-out tokens to score")
    p.add_argument("--seq-len", type=int, default=128, help="window length in tokens")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bfloat16 where fast) | float32 | bfloat16")
    p.add_argument("--out", default=None, help="optional folder for the CSV tables")


@verb("inspect", "load a model, score held-out text per source label, print per-layer residual norms")
def cmd_inspect(args):
    import time
    from pathlib import Path

    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.models import load_model
    from crosslayer.scoring import greedy, score

    corpus = load_corpus(args.corpus)
    start = time.time()
    model = load_model(args.model, dtype=args.dtype)
    print(f"loaded {args.model} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{str(model.cfg.dtype).removeprefix('torch.')}) "
          f"in {time.time() - start:.1f}s")
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        print(f"greedy: {prompt!r} -> {greedy(model, prompt)!r}")
    windows = make_windows(corpus, model.tokenizer, split="heldout",
                           seq_len=args.seq_len, n_tokens=args.tokens, seed=0)
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
    p.add_argument("--model", default="smollm2-135m", help="model name (see `crosslayer models`)")
    p.add_argument("--layers", default="all", help="all | 5 | 0-5 | 0,4,8 | 10-")
    p.add_argument("--hook", default="resid_post",
                   help="resid_post | resid_pre | resid_mid | attn_out | mlp_out | mlp_post")
    p.add_argument("--tokens", type=parse_count, default=parse_count("200k"),
                   help="token positions to run (rounded up to whole windows; excluded rows are not stored)")
    p.add_argument("--split", default="train", help="train | heldout")
    p.add_argument("--corpus", default="builtin", help="'builtin', a text file/folder, a .jsonl, or hf:NAME")
    p.add_argument("--seq-len", type=int, default=128, help="window length in tokens")
    p.add_argument("--seed", type=int, default=0, help="document-order seed")
    p.add_argument("--out", required=True, help="store folder (created; a rerun resumes it)")
    p.add_argument("--dtype", default="bfloat16", help="store dtype: bfloat16 | float16")
    p.add_argument("--model-dtype", default="auto", help="auto (bfloat16 where fast) | float32 | bfloat16")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="drop rows whose norm exceeds this x the layer median (0 keeps them)")


@verb("harvest", "run a model over the corpus once and store every chosen layer's activations")
def cmd_harvest(args):
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.harvest import harvest, hook_names, parse_layers
    from crosslayer.models import load_model

    corpus = load_corpus(args.corpus)
    model = load_model(args.model, dtype=args.model_dtype)
    hook_names(model, args.hook, parse_layers(args.layers, model.cfg.n_layers))  # fail fast
    windows = make_windows(corpus, model.tokenizer, split=args.split, seq_len=args.seq_len,
                           n_tokens=args.tokens, seed=args.seed)
    store = harvest(model, windows, out_dir=args.out, hook=args.hook, layers=args.layers,
                    dtype=args.dtype, batch_size=args.batch_size,
                    outlier_factor=args.outlier_factor or None)
    m = store.manifest
    print(f"{store}\nexcluded: {m['excluded']}; disk {store.disk_bytes() / 2**20:.0f} MB "
          f"({store.disk_bytes() / max(1, store.n_rows) / 1024:.1f} KB per stored token)")


def _add_bench(p):
    p.add_argument("what", choices=["harvest", "crosscoder", "reader"], help="which benchmark")
    p.add_argument("--stores", default="runs/demo/stores/train,runs/demo/stores/heldout",
                   help="comma-separated stores for the reader benchmark")
    p.add_argument("--buffer-rows", type=int, default=2048, help="reader buffer for the reader benchmark")
    p.add_argument("--store", default="runs/demo/stores/train", help="store for the crosscoder benchmark")
    p.add_argument("--width", type=int, default=4096, help="crosscoder features for the crosscoder benchmark")
    p.add_argument("--k", type=int, default=32, help="TopK k for the crosscoder benchmark")
    p.add_argument("--model", default="smollm2-135m", help="model name")
    p.add_argument("--tokens", default="50k,200k", help="comma-separated token counts")
    p.add_argument("--layers", default="all", help="layers to harvest")
    p.add_argument("--model-dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (harvest, default 8) / tokens per step (crosscoder, default 1024)")


@verb("bench", "print speed and memory benchmarks (ratios against a baseline from the same run)")
def cmd_bench(args):
    from crosslayer.bench import bench_crosscoder, bench_harvest, bench_reader

    if args.what == "reader":
        bench_reader(args.stores.split(","), buffer_rows=args.buffer_rows)
        return
    if args.what == "crosscoder":
        bench_crosscoder(args.store, width=args.width, k=args.k, batch_size=args.batch_size or 1024)
        return
    counts = tuple(parse_count(c) for c in args.tokens.split(","))
    bench_harvest(model_name=args.model, counts=counts, layers=args.layers, model_dtype=args.model_dtype,
                  batch_size=args.batch_size or 8)


def _add_training_common(p, *, out_help: str, width_help: str):
    p.add_argument("--store", required=True, help="activation store folder (crosslayer harvest)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--width", type=int, required=True, help=width_help)
    p.add_argument("--k", type=int, default=32, help="active features per token (topk/batchtopk; jumprelu target L0)")
    p.add_argument("--tokens", type=parse_count, default=None, help="training tokens (default: the store's rows)")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument("--layers", default=None, help="subset of the store's layers (default: all)")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed")


def _add_train_saes(p):
    from crosslayer.saes import ARCHS

    _add_training_common(p, out_help="output folder (one sae-lens folder per hook); a rerun resumes",
                         width_help="features per layer")
    p.add_argument("--arch", default="topk", choices=ARCHS, help="SAE architecture")
    p.add_argument("--sparsity-coefficient", type=float, default=None, help="L1 (standard) / L0 (jumprelu) coefficient")


@verb("train-saes", "train one sae-lens SAE per layer of an activation store (the baseline)")
def cmd_train_saes(args):
    from crosslayer.harvest import parse_layers
    from crosslayer.saes import train_per_layer_saes
    from crosslayer.store import ActivationStore

    store = ActivationStore(args.store)
    layers = None if args.layers is None else [
        l for l in parse_layers(args.layers, store.manifest["n_model_layers"])]
    saes = train_per_layer_saes(store, out_dir=args.out, width=args.width, k=args.k, arch=args.arch,
                                tokens=args.tokens or store.n_rows, batch_size=args.batch_size, lr=args.lr,
                                layers=layers, sparsity_coefficient=args.sparsity_coefficient, seed=args.seed)
    for row in saes.meta["layer_stats"]:
        print(f"layer {row['layer']:>2}: {row['tokens_per_s']:,.0f} tok/s, sample FVU {row['train_sample_fvu']:.3f}, "
              f"dead {row['dead_features']}")
    print(f"saved {saes.n_features:,} features over {saes.n_layers} layers to {args.out}")


def _add_train_crosscoder(p):
    from crosslayer.crosscoder import ACTIVATIONS, SPARSITIES, VARIANTS

    _add_training_common(p, out_help="output folder; a rerun resumes from its checkpoint",
                         width_help="number of features F")
    p.add_argument("--variant", default="acausal", choices=VARIANTS, help="which layers a feature reads/writes")
    p.add_argument("--window", type=int, default=2, help="layers per feature for --variant window")
    p.add_argument("--activation", default="topk", choices=ACTIVATIONS, help="activation function")
    p.add_argument("--sparsity", default="l1_norms", choices=SPARSITIES, help="decoder-norm penalty (relu/jumprelu)")
    p.add_argument("--sparsity-coef", type=float, default=None, help="sparsity coefficient (relu/jumprelu)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast only with AVX512-BF16 or a GPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")


@verb("train-crosscoder", "train a sparse crosscoder that reads and writes every layer of a store")
def cmd_train_crosscoder(args):
    from crosslayer.harvest import parse_layers
    from crosslayer.store import ActivationStore
    from crosslayer.training import train_crosscoder_from_store

    store = ActivationStore(args.store)
    layers = None if args.layers is None else parse_layers(args.layers, store.manifest["n_model_layers"])
    cc = train_crosscoder_from_store(
        store, out_dir=args.out, width=args.width, k=args.k, variant=args.variant, activation=args.activation,
        tokens=args.tokens or store.n_rows, batch_size=args.batch_size, lr=args.lr, sparsity=args.sparsity,
        sparsity_coef=args.sparsity_coef, window=args.window, layers=layers,
        checkpoint_every=args.checkpoint_every, bf16=args.bf16, seed=args.seed, device=args.device)
    print(f"saved {cc} to {args.out}")


def _add_eval(p):
    p.add_argument("--dictionary", required=True, help="dictionary folder (per-layer SAEs or crosscoder)")
    p.add_argument("--store", required=True, help="held-out activation store of the same model and hooks")
    p.add_argument("--tokens", type=parse_count, default=parse_count("50k"), help="rows for reconstruction metrics")
    p.add_argument("--windows", type=int, default=32, help="windows for the downstream CE/KL evaluation (0: skip)")
    p.add_argument("--model-dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--out", default=None, help="CSV path for the table")


@verb("eval", "evaluate a dictionary: FVU, MSE, L0, dead/dense, CE loss recovered and KL when spliced")
def cmd_eval(args):
    import pandas as pd

    from crosslayer.dictionary import load_dictionary
    from crosslayer.evals import evaluate
    from crosslayer.models import load_model
    from crosslayer.store import ActivationStore

    store = ActivationStore(args.store)
    dictionary = load_dictionary(args.dictionary)
    model = load_model(store.manifest["model"], dtype=args.model_dtype) if args.windows else None
    table = evaluate(dictionary, store, model=model, n_tokens=args.tokens, n_windows=args.windows or 1,
                     out=args.out, progress=True)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False, float_format="%.4g"))


def _add_features(p):
    p.add_argument("--dictionary", required=True, help="dictionary folder (per-layer SAEs or crosscoder)")
    p.add_argument("--store", required=True, help="activation store of the same model and hooks")
    p.add_argument("--feature", type=int, default=None, help="feature index (0..F-1) for the dashboard")
    p.add_argument("--search", default=None, help="instead: list features whose logit effect most raises this token")
    p.add_argument("--k", type=int, default=10, help="top-activating examples to show")
    p.add_argument("--logits", type=int, default=8, help="tokens pushed up / down to show per layer")
    p.add_argument("--batch-size", type=int, default=1024, help="rows encoded per batch while streaming")
    p.add_argument("--model-dtype", default="auto", help="auto | float32 | bfloat16")


@verb("features", "text dashboard of one feature: density, top/quantile examples, logit effects, decoder profile")
def cmd_features(args):
    from crosslayer.dictionary import load_dictionary
    from crosslayer.features import dashboard
    from crosslayer.models import load_model
    from crosslayer.store import ActivationStore

    if (args.feature is None) == (args.search is None):
        raise CrosslayerError("give exactly one of --feature N and --search TOKEN")
    store = ActivationStore(args.store)
    dictionary = load_dictionary(args.dictionary)
    model = load_model(store.manifest["model"], dtype=args.model_dtype)
    if args.search is not None:
        from crosslayer.features import find_features_for_token

        table = find_features_for_token(dictionary, model, args.search, top=args.k)
        print(table.to_string(index=False, float_format="%.3f"))
        return
    print(dashboard(dictionary, store, model, args.feature, k=args.k, n_logits=args.logits,
                    batch_size=args.batch_size))


def _add_lens(p):
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts: one table each)")
    p.add_argument("--target", default=None, help="token whose rank and probability to follow, e.g. ' Paris'")
    p.add_argument("--model", default="smollm2-135m", help="model name (see `crosslayer models`)")
    p.add_argument("--top-k", type=int, default=5, help="top tokens kept per layer and position")
    p.add_argument("--position", type=int, default=-1, help="position printed (default: the last token)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto | float32 | bfloat16")
    p.add_argument("--plot", default=None, help="save a layer x position heatmap (PNG/PDF/SVG) of the first prompt")
    p.add_argument("--out", default=None, help="optional CSV path for the full table")


@verb("lens", "logit lens: decode every layer's residual through the final norm and unembedding")
def cmd_lens(args):
    from crosslayer.lens import format_lens, logit_lens, plot_lens
    from crosslayer.models import load_model

    model = load_model(args.model, dtype=args.dtype)
    table = logit_lens(model, args.prompt, target=args.target, top_k=args.top_k)
    for i, prompt in enumerate(args.prompt):
        print(f"{'' if i == 0 else chr(10)}prompt {i}: {prompt!r}")
        print(format_lens(table, args.position, prompt=i))
    if args.plot:
        print(f"heatmap: {plot_lens(table, args.plot)}")
    if args.out:
        from crosslayer.io import write_csv

        write_csv(table, args.out)
        print(f"table: {args.out}")


def _add_steer(p):
    from crosslayer.interventions import MODES

    p.add_argument("prompt", help="prompt text")
    p.add_argument("--dictionary", required=True, help="dictionary folder (per-layer SAEs or crosscoder)")
    p.add_argument("--feature", type=int, required=True, action="append", help="feature index (repeatable)")
    p.add_argument("--value", type=float, default=0.0, help="clamp/add value or scale factor")
    p.add_argument("--mode", default="clamp", choices=MODES, help="how to edit the feature(s)")
    p.add_argument("--model", default=None, help="model (default: the one the dictionary was trained on)")
    p.add_argument("--top", type=int, default=10, help="tokens shown rising / falling")
    p.add_argument("--tokens", type=int, default=20, help="tokens generated (0: no generation)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, shared by the clean and steered runs")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--model-dtype", default="auto", help="auto | float32 | bfloat16")


@verb("steer", "clamp / scale / ablate features and show how the next-token distribution and generation move")
def cmd_steer(args):
    from crosslayer.dictionary import load_dictionary
    from crosslayer.interventions import Edit, generate, steer
    from crosslayer.models import load_model

    dictionary = load_dictionary(args.dictionary)
    name = args.model or getattr(dictionary, "meta", {}).get("store", {}).get("model")
    if name is None:
        raise CrosslayerError("the dictionary does not record its model; pass --model")
    model = load_model(name, dtype=args.model_dtype)
    edits = [Edit(f, args.mode, args.value) for f in args.feature]
    table, summary = steer(model, dictionary, args.prompt, edits, top=args.top)
    acts = ", ".join(f"{f}: {a:.3g}" for f, a in summary["clean_activation"].items())
    print(f"prompt {args.prompt!r}; {args.mode} {args.feature} value {args.value}; clean activation at the "
          f"last token {acts}; KL(clean || steered) = {summary['kl']:.4f}")
    print(table.to_string(index=False, float_format="%.4f"))
    if args.tokens:
        clean = generate(model, dictionary, args.prompt, [], max_new_tokens=args.tokens, seed=args.seed,
                         temperature=args.temperature)
        steered = generate(model, dictionary, args.prompt, edits, max_new_tokens=args.tokens, seed=args.seed,
                           temperature=args.temperature)
        print(f"\nclean:   {args.prompt}{clean}\nsteered: {args.prompt}{steered}")


def _add_reproduce(p):
    from crosslayer.pipeline import PRESETS

    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="sizes of the run")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>); a rerun resumes it")
    p.add_argument("--corpus", default="builtin", help="'builtin', a text file/folder, a .jsonl, or hf:NAME")
    p.add_argument("--paper", default="paper", help="folder whose figures/ and tables/ receive the output")
    if p.prog.split()[-1] == "reproduce":
        p.add_argument("--only", default=None, help="comma-separated steps to run (default: all)")
        p.add_argument("--redo", default=None, help="comma-separated finished steps to run again")


@verb("reproduce", "run the end-to-end job of a preset, resumably (finished steps are skipped)")
def cmd_reproduce(args):
    from crosslayer.pipeline import reproduce

    out = reproduce(args.preset, out=args.out, corpus=args.corpus, paper=args.paper,
                    only=args.only.split(",") if args.only else None,
                    redo=args.redo.split(",") if args.redo else None)
    print(f"done: {out}")


def _add_study(p):
    from studies import STUDY_NAMES

    p.add_argument("name", choices=STUDY_NAMES, help="the study to run")
    _add_reproduce(p)


@verb("study", "run one comparison study (and the steps it needs that have not finished)")
def cmd_study(args):
    from crosslayer.pipeline import study

    out = study(args.name, args.preset, out=args.out, corpus=args.corpus, paper=args.paper)
    print(f"done: {out / 'results' / args.name}")


def _add_figures(p):
    from studies import STUDY_NAMES

    p.add_argument("names", nargs="*", metavar="STUDY", help=f"studies (default: all): {', '.join(STUDY_NAMES)}")
    p.add_argument("--results", default="runs/demo/results", help="the run's results folder (holds <study>/*.csv)")
    p.add_argument("--paper", default="paper", help="folder whose figures/ and tables/ receive the output")


@verb("figures", "redraw the studies' figures, tables and answers from their CSVs (no model, no training)")
def cmd_figures(args):
    from studies import STUDY_NAMES, render

    unknown = [n for n in args.names if n not in STUDY_NAMES]
    if unknown:
        raise CrosslayerError(f"unknown study {unknown[0]!r}; use one of {', '.join(STUDY_NAMES)}")
    results = Path(args.results)
    for name in args.names or STUDY_NAMES:
        if not (results / name).is_dir():
            raise CrosslayerError(f"no results of study {name} in {results / name}; run `crosslayer study {name}` "
                                  "first or pass --results RUN/results")
        made = render(name, results / name, Path(args.paper))
        print(f"{name}: {len(made['figures'])} figures, {len(made['tables'])} tables, answer -> "
              f"{Path(args.paper) / 'tables' / (name + '_answer.tex')}")


# ----------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosslayer",
        description="Per-layer SAEs vs sparse crosscoders on the residual stream of every layer.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    adders = {"inspect": _add_inspect, "harvest": _add_harvest, "bench": _add_bench,
              "reproduce": _add_reproduce, "study": _add_study, "figures": _add_figures,
              "train-saes": _add_train_saes, "eval": _add_eval,
              "train-crosscoder": _add_train_crosscoder, "features": _add_features,
              "lens": _add_lens, "steer": _add_steer}
    for name, (fn, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        adders.get(name, lambda _: None)(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
