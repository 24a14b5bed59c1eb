"""``crosslayer reproduce --preset NAME``: the end-to-end job, resumable step by step.

Method:
1. A preset fixes the model, layers, token counts and sizes (``PRESETS``).
2. Steps run in order into ``<out>/`` (default ``runs/<preset>``). A step that finished writes
   ``<out>/done/<step>.json`` (atomically, with its wall time); a rerun skips it. Steps that are
   long (the harvests) are themselves resumable, so a kill at any moment loses little work.
3. Current steps: ``score`` (held-out loss per source label and per-layer residual norms of the
   model, as CSV), ``harvest-train`` and ``harvest-heldout`` (activation stores of every chosen
   layer, see :mod:`crosslayer.harvest`), ``train-saes`` (one sae-lens TopK SAE per layer, see
   :mod:`crosslayer.saes`) and ``eval-saes`` (FVU, L0, dead fraction, CE recovered and KL on the
   held-out store, ``results/eval_saes.csv``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from crosslayer.errors import CrosslayerError
from crosslayer.io import write_csv, write_json


@dataclass(frozen=True)
class Preset:
    """Sizes of one reproduction."""

    model: str
    layers: str
    train_tokens: int
    heldout_tokens: int
    score_tokens: int
    sae_width: int
    sae_k: int
    sae_tokens: int
    sae_batch: int
    sae_lr: float
    eval_tokens: int
    eval_windows: int
    seq_len: int = 128
    batch_size: int = 8
    model_dtype: str = "auto"


PRESETS = {
    "micro": Preset(model="tiny-4l-64d", layers="all", train_tokens=4_096, heldout_tokens=1_024,
                    score_tokens=1_024, sae_width=128, sae_k=8, sae_tokens=16_384, sae_batch=128, sae_lr=3e-3,
                    eval_tokens=1_024, eval_windows=4, seq_len=64),
    "demo": Preset(model="smollm2-135m", layers="all", train_tokens=64_000, heldout_tokens=8_192,
                   score_tokens=8_192, sae_width=2304, sae_k=32, sae_tokens=61_440, sae_batch=256, sae_lr=3e-3,
                   eval_tokens=8_192, eval_windows=4),
    "paper": Preset(model="smollm2-135m", layers="all", train_tokens=1_000_000, heldout_tokens=65_536,
                    score_tokens=65_536, sae_width=4608, sae_k=32, sae_tokens=983_040, sae_batch=4096, sae_lr=4e-4,
                    eval_tokens=65_536, eval_windows=64),
}


class Context:
    """What the steps share: the preset, the output folder, and lazily loaded model and corpus."""

    def __init__(self, preset: Preset, out: Path, corpus: str):
        self.preset, self.out, self.corpus_spec = preset, out, corpus
        self._model = self._corpus = None

    @property
    def model(self):
        if self._model is None:
            from crosslayer.models import load_model

            self._model = load_model(self.preset.model, dtype=self.preset.model_dtype)
        return self._model

    @property
    def corpus(self):
        if self._corpus is None:
            from crosslayer.corpus import load_corpus

            self._corpus = load_corpus(self.corpus_spec)
        return self._corpus

    def windows(self, split: str, n_tokens: int):
        from crosslayer.corpus import make_windows

        return make_windows(self.corpus, self.model.tokenizer, split=split, seq_len=self.preset.seq_len,
                            n_tokens=n_tokens, seed=0)


def step_score(ctx: Context) -> dict:
    """Held-out loss with an equal token budget per source label, and residual norms."""
    from crosslayer.corpus import TokenWindows, make_windows
    from crosslayer.scoring import score

    labels = ctx.corpus.label_names
    per_label = max(ctx.preset.seq_len, ctx.preset.score_tokens // len(labels))
    windows = TokenWindows.concat([
        make_windows(ctx.corpus, ctx.model.tokenizer, split="heldout", labels=[label],
                     seq_len=ctx.preset.seq_len, n_tokens=per_label, seed=0) for label in labels])
    losses, norms = score(ctx.model, windows, batch_size=ctx.preset.batch_size)
    write_csv(losses, ctx.out / "results" / "heldout_loss.csv")
    write_csv(norms, ctx.out / "results" / "residual_norms.csv")
    print(losses.to_string(index=False, float_format="%.3f"))
    return {"ce_loss_all": float(losses.loc[losses.label == "all", "ce_loss"].iloc[0])}


def _harvest_step(split: str):
    def step(ctx: Context) -> dict:
        from crosslayer.harvest import harvest

        n_tokens = ctx.preset.train_tokens if split == "train" else ctx.preset.heldout_tokens
        store = harvest(ctx.model, ctx.windows(split, n_tokens), out_dir=ctx.out / "stores" / split,
                        layers=ctx.preset.layers, batch_size=ctx.preset.batch_size)
        print(store)
        return {"rows": store.n_rows, "excluded": store.manifest["excluded"]}

    return step


def step_train_saes(ctx: Context) -> dict:
    from crosslayer.saes import train_per_layer_saes
    from crosslayer.store import ActivationStore

    p = ctx.preset
    saes = train_per_layer_saes(ActivationStore(ctx.out / "stores" / "train"), out_dir=ctx.out / "dicts" / "saes",
                                width=p.sae_width, k=p.sae_k, tokens=p.sae_tokens, batch_size=p.sae_batch,
                                lr=p.sae_lr)
    stats = saes.meta["layer_stats"]
    return {"tokens_per_s_mean": sum(s["tokens_per_s"] for s in stats) / len(stats)}


def step_eval_saes(ctx: Context) -> dict:
    from crosslayer.dictionary import load_dictionary
    from crosslayer.evals import evaluate
    from crosslayer.store import ActivationStore

    table = evaluate(load_dictionary(ctx.out / "dicts" / "saes"), ActivationStore(ctx.out / "stores" / "heldout"),
                     model=ctx.model, n_tokens=ctx.preset.eval_tokens, n_windows=ctx.preset.eval_windows,
                     out=ctx.out / "results" / "eval_saes.csv", progress=True)
    cols = [c for c in ("layer", "fvu", "l0", "dead_frac", "ce_recovered", "kl") if c in table.columns]
    print(table[cols].to_string(index=False, float_format="%.3f"))
    overall = table[table.layer.astype(str) == "all"].iloc[0]
    return {"fvu_all": float(overall["fvu"]), "l0_all": float(overall["l0"])}


STEPS = [("score", step_score), ("harvest-train", _harvest_step("train")),
         ("harvest-heldout", _harvest_step("heldout")), ("train-saes", step_train_saes),
         ("eval-saes", step_eval_saes)]


def reproduce(preset: str = "demo", *, out: str | Path | None = None, corpus: str = "builtin",
              only: list[str] | None = None) -> Path:
    """Run every step of ``preset`` that has not finished yet; return the output folder."""
    if preset not in PRESETS:
        raise CrosslayerError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    names = [name for name, _ in STEPS]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise CrosslayerError(f"unknown step(s) {unknown}; steps are {', '.join(names)}")
    out = Path(out or Path("runs") / preset)
    cfg_path = out / "preset.json"
    wanted = {"preset": preset, **asdict(PRESETS[preset]), "corpus": corpus}
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != wanted:
        raise CrosslayerError(f"{out} holds a reproduction with other settings; use another --out or delete it")
    write_json(wanted, cfg_path)
    ctx = Context(PRESETS[preset], out, corpus)
    for name, step in STEPS:
        marker = out / "done" / f"{name}.json"
        if (only and name not in only) or marker.is_file():
            if marker.is_file():
                print(f"[{name}] done already ({marker})")
            continue
        print(f"[{name}] running", flush=True)
        start = time.time()
        info = step(ctx)
        write_json({"step": name, "seconds": round(time.time() - start, 1), **(info or {})}, marker)
        print(f"[{name}] finished in {time.time() - start:.0f}s", flush=True)
    return out
