"""``crosslayer reproduce --preset NAME``: the end-to-end job, resumable step by step.

Method:
1. A preset fixes the model, layers, token counts and sizes (``PRESETS``).
2. Steps run in order into ``<out>/`` (default ``runs/<preset>``). A step that finished writes
   ``<out>/done/<step>.json`` (atomically, with its wall time); a rerun skips it. Steps that are
   long (the harvests) are themselves resumable, so a kill at any moment loses little work.
3. Steps: ``score`` (held-out loss per source label and per-layer residual norms of the model, as
   CSV), ``harvest-train`` and ``harvest-heldout`` (activation stores of every chosen layer, see
   :mod:`crosslayer.harvest`), ``train-saes`` (one sae-lens TopK SAE per layer, see
   :mod:`crosslayer.saes`), ``eval-saes`` (FVU, L0, dead fraction, CE recovered and KL on the
   held-out store), ``train-crosscoder`` / ``eval-crosscoder`` (the acausal TopK crosscoder of
   matched total size, :mod:`crosslayer.training`), ``study-<name>`` for each study of
   :mod:`studies` (``Context`` trains further dictionaries on first use, under ``<out>/dicts``),
   and ``paper`` (``paper/tables/setup.tex``: the preset's sizes and every step's wall time).
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
    """Sizes of one reproduction (every field is recorded in ``<out>/preset.json``)."""

    model: str
    layers: str
    train_tokens: int
    heldout_tokens: int
    score_tokens: int
    sae_width: int
    """Latents per layer of the per-layer SAEs (the baseline)."""
    sae_k: int
    sae_tokens: int
    sae_batch: int
    sae_lr: float
    eval_tokens: int
    eval_windows: int
    cc_k: int = 32
    """TopK of the main crosscoder. Its width is ``sae_width * n_layers`` (matched total dictionary size)."""
    cc_tokens: int = 65_536
    cc_batch: int = 1024
    cc_lr: float = 1e-3
    sweep_sae_k: tuple = (8, 16, 32)
    """Per-layer k of the SAE sparsity sweep (reconstruction study)."""
    sweep_cc_k: tuple = (16, 32, 64)
    """k of the crosscoder sparsity sweep (reconstruction study), at matched total dictionary size."""
    split_widths: tuple = (256, 512, 1024, 2048)
    """SAE widths (one SAE at the middle stored layer) of the feature-splitting study (doubling)."""
    split_k: int = 16
    """k of those SAEs."""
    split_cc_widths: tuple = (512, 1024, 2048, 4096)
    """Crosscoder widths of the feature-splitting study (doubling; k = ``cc_k``; the largest may be the main one)."""
    lens_prompts: int = 64
    """Prompts of data/prompts.jsonl used by the logit-lens study."""
    poly_tokens: int = 8_192
    """Held-out tokens on which the polysemanticity study labels units."""
    synthetic_tokens: int = 30_000
    seq_len: int = 128
    batch_size: int = 8
    model_dtype: str = "auto"


PRESETS = {
    "micro": Preset(model="tiny-4l-64d", layers="all", train_tokens=4_096, heldout_tokens=1_024,
                    score_tokens=1_024, sae_width=32, sae_k=8, sae_tokens=8_192, sae_batch=128, sae_lr=3e-3,
                    eval_tokens=1_024, eval_windows=4, cc_k=8, cc_tokens=8_192, cc_batch=128, cc_lr=3e-3,
                    sweep_sae_k=(2, 4), sweep_cc_k=(4, 8), split_widths=(16, 32, 64, 128), split_k=4,
                    split_cc_widths=(16, 32, 64, 128),
                    lens_prompts=8, poly_tokens=1_024, synthetic_tokens=4_000, seq_len=64),
    "demo": Preset(model="smollm2-135m", layers="8-15", train_tokens=64_000, heldout_tokens=8_192,
                   score_tokens=8_192, sae_width=512, sae_k=32, sae_tokens=61_440, sae_batch=256, sae_lr=3e-3,
                   eval_tokens=8_192, eval_windows=4, cc_k=32, cc_tokens=65_536, cc_batch=512, cc_lr=1e-3,
                   sweep_sae_k=(8, 16, 32), sweep_cc_k=(16, 32, 64), split_widths=(256, 512, 1024, 2048),
                   split_k=16, split_cc_widths=(512, 1024, 2048, 4096), lens_prompts=64, poly_tokens=8_192, synthetic_tokens=30_000),
    "paper": Preset(model="smollm2-135m", layers="all", train_tokens=1_000_000, heldout_tokens=65_536,
                    score_tokens=65_536, sae_width=1152, sae_k=32, sae_tokens=2_000_000, sae_batch=4096,
                    sae_lr=4e-4, eval_tokens=65_536, eval_windows=64, cc_k=64, cc_tokens=2_000_000, cc_batch=4096,
                    cc_lr=3e-4, sweep_sae_k=(8, 16, 32, 64), sweep_cc_k=(32, 64, 128, 256),
                    split_widths=(576, 1152, 2304, 4608), split_k=32,
                    split_cc_widths=(4320, 8640, 17280, 34560), lens_prompts=64, poly_tokens=65_536,
                    synthetic_tokens=200_000),
}


class Context:
    """What the steps and studies share: the preset, the folders, and lazily loaded model, corpus,
    stores and dictionaries. Dictionaries are trained on first use (resumably) and cached on disk,
    so studies that need the same dictionary share it."""

    def __init__(self, preset: Preset, out: Path, corpus: str, *, preset_name: str = "custom",
                 paper: str | Path = "paper", progress: bool = True):
        self.preset, self.out, self.corpus_spec, self.preset_name = preset, Path(out), corpus, preset_name
        self.paper, self.progress = Path(paper), progress
        self._model = self._corpus = None
        self._stores: dict = {}

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

    # -- folders
    def results(self, study: str | None = None) -> Path:
        """``<out>/results`` or ``<out>/results/<study>`` (created)."""
        path = self.out / "results" / study if study else self.out / "results"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def figures(self) -> Path:
        (self.paper / "figures").mkdir(parents=True, exist_ok=True)
        return self.paper / "figures"

    @property
    def tables(self) -> Path:
        (self.paper / "tables").mkdir(parents=True, exist_ok=True)
        return self.paper / "tables"

    # -- data
    def store(self, split: str):
        """The activation store of ``split`` ("train" or "heldout"); run the harvest step first."""
        from crosslayer.store import ActivationStore

        if split not in self._stores:
            path = self.out / "stores" / split
            if not (path / "manifest.json").is_file():
                raise CrosslayerError(f"no {split} store in {path}; run `crosslayer reproduce --preset "
                                      f"{self.preset_name} --only harvest-{split}` first")
            self._stores[split] = ActivationStore(path)
        return self._stores[split]

    @property
    def n_layers(self) -> int:
        return self.store("train").n_layers

    @property
    def cc_width(self) -> int:
        """Crosscoder width matched to the per-layer SAEs' total number of latents."""
        return self.preset.sae_width * self.n_layers

    def saes(self, name: str = "saes", *, width: int | None = None, k: int | None = None,
             layers: list[int] | None = None):
        """Per-layer sae-lens TopK SAEs at ``<out>/dicts/<name>`` (trained if missing, resumably)."""
        from crosslayer.saes import train_per_layer_saes

        p = self.preset
        return train_per_layer_saes(self.store("train"), out_dir=self.out / "dicts" / name,
                                    width=width or p.sae_width, k=k or p.sae_k, tokens=p.sae_tokens,
                                    batch_size=p.sae_batch, lr=p.sae_lr, layers=layers, progress=self.progress)

    def crosscoder(self, name: str = "crosscoder", *, width: int | None = None, k: int | None = None,
                   variant: str = "acausal"):
        """A TopK crosscoder over every stored layer at ``<out>/dicts/<name>`` (trained if missing, resumably)."""
        from crosslayer.training import train_crosscoder_from_store

        p = self.preset
        return train_crosscoder_from_store(self.store("train"), out_dir=self.out / "dicts" / name,
                                           width=width or self.cc_width, k=k or p.cc_k, variant=variant,
                                           tokens=p.cc_tokens, batch_size=p.cc_batch, lr=p.cc_lr,
                                           checkpoint_every=50, progress=self.progress)


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

        ctx._stores.pop(split, None)
        n_tokens = ctx.preset.train_tokens if split == "train" else ctx.preset.heldout_tokens
        store = harvest(ctx.model, ctx.windows(split, n_tokens), out_dir=ctx.out / "stores" / split,
                        layers=ctx.preset.layers, batch_size=ctx.preset.batch_size)
        print(store)
        return {"rows": store.n_rows, "excluded": store.manifest["excluded"]}

    return step


def step_train_saes(ctx: Context) -> dict:
    stats = ctx.saes().meta["layer_stats"]
    return {"tokens_per_s_mean": sum(s["tokens_per_s"] for s in stats) / len(stats)}


def step_train_crosscoder(ctx: Context) -> dict:
    cc = ctx.crosscoder()
    return {"n_features": cc.n_features, "k": cc.cfg.k}


def _eval_step(name: str):
    def step(ctx: Context) -> dict:
        from crosslayer.dictionary import load_dictionary
        from crosslayer.evals import evaluate

        table = evaluate(load_dictionary(ctx.out / "dicts" / name), ctx.store("heldout"), model=ctx.model,
                         n_tokens=ctx.preset.eval_tokens, n_windows=ctx.preset.eval_windows,
                         out=ctx.results() / f"eval_{name}.csv", progress=ctx.progress)
        cols = [c for c in ("layer", "fvu", "l0", "dead_frac", "ce_recovered", "kl") if c in table.columns]
        print(table[cols].to_string(index=False, float_format="%.3f"))
        overall = table[table.layer.astype(str) == "all"].iloc[0]
        return {"fvu_all": float(overall["fvu"]), "l0_all": float(overall["l0"])}

    return step


def _study_step(name: str):
    def step(ctx: Context) -> dict:
        from studies import run_study

        return run_study(name, ctx)

    return step


def step_paper(ctx: Context) -> dict:
    """The setup macros of the paper (preset sizes, model, wall times of every step)."""
    from studies import write_setup_tables

    return {"files": [str(p) for p in write_setup_tables(ctx)]}


STUDIES = ["logit_lens", "reconstruction", "polysemanticity", "feature_splitting", "cross_layer_superposition",
           "steering"]
STEPS = [("score", step_score), ("harvest-train", _harvest_step("train")),
         ("harvest-heldout", _harvest_step("heldout")), ("train-saes", step_train_saes),
         ("eval-saes", _eval_step("saes")), ("train-crosscoder", step_train_crosscoder),
         ("eval-crosscoder", _eval_step("crosscoder"))] + \
        [(f"study-{name}", _study_step(name)) for name in STUDIES] + [("paper", step_paper)]
STEP_NAMES = [name for name, _ in STEPS]


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise CrosslayerError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")


def reproduce(preset: str = "demo", *, out: str | Path | None = None, corpus: str = "builtin",
              only: list[str] | None = None, paper: str | Path = "paper", redo: list[str] | None = None,
              progress: bool = True) -> Path:
    """Run every step of ``preset`` that has not finished yet (or only those in ``only``); return the
    output folder. Steps in ``redo`` run again even if finished. Figures and LaTeX tables go to
    ``<paper>/figures`` and ``<paper>/tables``."""
    _check_preset(preset)
    unknown = sorted(set(only or []) - set(STEP_NAMES))
    if unknown:
        raise CrosslayerError(f"unknown step(s) {unknown}; steps are {', '.join(STEP_NAMES)}")
    out = Path(out or Path("runs") / preset)
    cfg_path = out / "preset.json"
    wanted = json.loads(json.dumps({"preset": preset, **asdict(PRESETS[preset]), "corpus": corpus}))
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != wanted:
        raise CrosslayerError(f"{out} holds a reproduction with other settings; use another --out or delete it")
    write_json(wanted, cfg_path)
    ctx = Context(PRESETS[preset], out, corpus, preset_name=preset, paper=paper, progress=progress)
    total = time.time()
    for name, step in STEPS:
        marker = out / "done" / f"{name}.json"
        if only and name not in only:
            continue
        if marker.is_file() and name not in (redo or []):
            print(f"[{name}] done already ({marker})")
            continue
        print(f"[{name}] running", flush=True)
        start = time.time()
        info = step(ctx)
        write_json({"step": name, "seconds": round(time.time() - start, 1), **(info or {})}, marker)
        print(f"[{name}] finished in {time.time() - start:.0f}s", flush=True)
    print(f"reproduce --preset {preset}: {time.time() - total:.0f}s in this run; results in {out}", flush=True)
    return out


def study(name: str, preset: str = "demo", *, out: str | Path | None = None, corpus: str = "builtin",
          paper: str | Path = "paper", progress: bool = True) -> Path:
    """Run one study (again), first running whatever steps it needs that have not finished."""
    from studies import load_study

    _check_preset(preset)
    module = load_study(name)
    needs = list(getattr(module, "NEEDS", ()))
    return reproduce(preset, out=out, corpus=corpus, only=needs + [f"study-{name}"], paper=paper,
                     redo=[f"study-{name}"], progress=progress)
