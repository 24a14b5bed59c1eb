"""``crosslayer reproduce --preset NAME``: the end-to-end job, resumable step by step.

Method:
1. A preset (:mod:`studies.presets`) fixes the model, layers, token counts and sizes, and each
   study's settings; all of it is recorded in ``<out>/preset.json`` (a different preset in the same
   folder is refused, :func:`crosslayer.io.claim_folder`).
2. Steps run in order into ``<out>/`` (default ``runs/<preset>``). A step that finished writes
   ``<out>/done/<step>.json`` (atomically, with its wall time); a rerun skips it. Long steps (the
   harvests, the training runs) are themselves resumable, so a kill at any moment loses little work.
3. Steps: ``score`` (held-out loss per source label and per-layer residual norms of the model, as
   CSV), ``harvest-train`` and ``harvest-heldout`` (activation stores of every chosen layer, see
   :mod:`crosslayer.harvest`), ``train-saes`` (one sae-lens TopK SAE per layer, see
   :mod:`crosslayer.saes`), ``eval-saes`` (FVU, L0, dead fraction, CE recovered and KL on the
   held-out store), ``train-crosscoder`` / ``eval-crosscoder`` (the acausal TopK crosscoder of
   matched total size, :mod:`crosslayer.training`), ``site`` (the feature browser of those two,
   :mod:`crosslayer.browse`, in ``<out>/site/``), ``study-<name>`` for each registered study
   (:class:`RunContext` trains further dictionaries on first use, under ``<out>/dicts``), and
   ``paper`` (``paper/tables/setup.tex``: the preset's sizes and every step's wall time).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

from crosslayer.errors import CrosslayerError
from crosslayer.io import claim_folder, release_folder, write_csv, write_json, write_text

from studies import all_studies, get_study
from studies.base import CONFIG_FILE
from studies.presets import Preset, get_preset


class RunContext:
    """What the steps and studies share (implements :class:`studies.base.StudyContext`): the
    preset, the folders, and lazily loaded model, corpus, stores and dictionaries. Dictionaries are
    trained on first use (resumably) and cached on disk, so studies that need the same one share it.
    ``model`` may be given (tests pass a loaded model instead of the preset's)."""

    def __init__(self, preset: Preset, out: str | Path, *, corpus: str = "builtin", paper: str | Path = "paper",
                 progress: bool = True, model=None, device: str = "cpu"):
        self.preset, self.out, self.corpus_spec = preset, Path(out), corpus
        self.device = device
        """Where the model and the dictionaries run and train (cpu | cuda; bf16 autocast for training on CUDA)."""
        self.preset_name, self.paper, self.progress = preset.name, Path(paper), progress
        self._model, self._corpus, self._stores = model, None, {}
        self.zero_cache: dict = {}
        """Dictionary-independent downstream runs (clean, mean and zero ablations), shared by evaluations."""
        self.used: dict[str, bool | None] = {}
        """Dictionaries trained or loaded through this context -> converged (None: no curve to judge by)."""

    @property
    def sizes(self):
        return self.preset.sizes

    @property
    def model(self):
        if self._model is None:
            from crosslayer.models import load_model

            self._model = load_model(self.sizes.model, dtype=self.sizes.model_dtype, device=self.device)
        return self._model

    @property
    def corpus(self):
        if self._corpus is None:
            from crosslayer.corpus import load_corpus

            self._corpus = load_corpus(self.corpus_spec)
        return self._corpus

    def windows(self, split: str, n_tokens: int):
        from crosslayer.corpus import make_windows

        return make_windows(self.corpus, self.model.tokenizer, split=split, seq_len=self.sizes.seq_len,
                            n_tokens=n_tokens, seed=0)

    # -- folders
    def results(self, study: str | None = None) -> Path:
        """``<out>/results`` or ``<out>/results/<study>`` (created)."""
        path = self.out / "results" / study if study else self.out / "results"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def dicts(self) -> Path:
        return self.out / "dicts"

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

    def forget_store(self, split: str) -> None:
        self._stores.pop(split, None)

    @property
    def n_layers(self) -> int:
        return self.store("train").n_layers

    @property
    def cc_width(self) -> int:
        """Crosscoder width matched to the per-layer SAEs' total number of latents."""
        return self.sizes.sae_width * self.n_layers

    def _train(self, arch, name: str, *, approach: str, seed: int, sparsity_coef: float | None = None,
               tokens: int | None = None, lr: float | None = None):
        """Train (or load) dictionary ``<out>/dicts/<name>`` with the run's one trainer and budget, at ``lr`` or
        the approach's learning rate (:meth:`lr`). A run that diverges (:class:`TrainingDiverged`) is recorded
        in ``results/lr_diverged.csv``, its folder removed, and the approach's next learning rate is used."""
        import shutil

        from crosslayer.training import TrainConfig, TrainingDiverged, curve_verdict, train_crosscoder_from_store

        s = self.sizes
        while True:
            rate = lr if lr is not None else self._claimed_lr(name) or self.lr(approach)
            n_tokens = tokens or s.dict_tokens
            cfg = TrainConfig(tokens=n_tokens, batch_size=s.dict_batch, lr=rate, seed=seed, lr_decay_frac=s.lr_decay_frac,
                              sparsity_coef=sparsity_coef, checkpoint_every=max(50, n_tokens // s.dict_batch // 10),
                              bf16=self.device.startswith("cuda"),
                              diverge_factor=None if sparsity_coef else TrainConfig.diverge_factor)
            try:
                trained = train_crosscoder_from_store(self.store("train"), arch, cfg, out_dir=self.dicts / name,
                                                      heldout_store=self.store("heldout"), progress=self.progress,
                                                      device=self.device)
            except TrainingDiverged as err:
                if lr is not None:
                    raise
                print(f"[{name}] {err}; retrying with the next learning rate", flush=True)
                _append_row(self.results() / LR_DIVERGED, {"approach": approach, "lr": rate, "dictionary": name,
                                                             "error": str(err)})
                shutil.rmtree(self.dicts / name)
                continue
            self.used[name] = (curve_verdict(self.dicts / name) or {}).get("converged")
            return trained

    def _claimed_lr(self, name: str) -> float | None:
        """The learning rate ``<out>/dicts/<name>`` was claimed (or finished) with: a folder keeps its rate even
        if a later run of the approach diverged at it."""
        path = self.dicts / name / "cfg.json"
        return json.loads(path.read_text()).get("training", {}).get("lr") if path.is_file() else None

    def saes(self, name: str = "saes", *, width: int | None = None, k: int | None = None,
             layers: list[int] | None = None, seed: int = 0):
        """Per-layer TopK SAEs at ``<out>/dicts/<name>`` (trained if missing, resumably): by the crosscoders'
        trainer (an SAE stack, :mod:`crosslayer.sae_stack`) or, with the preset's ``sae_trainer="sae-lens"``,
        by sae-lens's ``SAETrainer``; same token budget, batch and schedule either way."""
        from crosslayer.sae_stack import SAEStackConfig

        s, store = self.sizes, self.store("train")
        width, k = width or s.sae_width, k or s.sae_k
        if s.sae_trainer == "sae-lens":
            from crosslayer.saes import SAETrainConfig, train_per_layer_saes

            cfg = SAETrainConfig(width=width, k=k, tokens=s.dict_tokens, batch_size=s.dict_batch,
                                 lr=self.lr("saes"), seed=seed)
            self.used[name] = None
            return train_per_layer_saes(store, cfg, out_dir=self.dicts / name, layers=layers, progress=self.progress)
        arch = SAEStackConfig(layers=tuple(store.select(layers).layers), d_model=store.width, width=width, k=k,
                              aux_frac=s.aux_frac)
        return self._train(arch, name, approach="saes", seed=seed)

    def crosscoder(self, name: str = "crosscoder", *, width: int | None = None, k: int | None = None,
                   variant: str = "acausal", activation: str = "topk", seed: int = 0):
        """A crosscoder over every stored layer at ``<out>/dicts/<name>`` (trained if missing, resumably);
        ReLU crosscoders use the L1-of-norms penalty with the preset's ``relu_coef``."""
        from crosslayer.crosscoder import CrosscoderConfig

        s, store = self.sizes, self.store("train")
        arch = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=width or self.cc_width,
                                variant=variant, activation=activation, k=k or s.cc_k, aux_frac=s.aux_frac)
        coef = s.relu_coef if activation == "relu" else None
        return self._train(arch, name, approach="crosscoders", seed=seed, sparsity_coef=coef)

    def lr(self, approach: str) -> float:
        """The peak learning rate of ``approach`` ("saes" or "crosscoders"): the preset's only candidate, or the
        sweep's best by held-out FVU (``results/lr_sweep.csv``, run on first use) that no full run of the approach
        has diverged at (``results/lr_diverged.csv``)."""
        import pandas as pd

        grid = [float(v) for v in self.sizes.lr_grid]
        if len(grid) > 1:
            sweep = lr_sweep(self)
            grid = sweep[sweep.approach == approach].sort_values("heldout_fvu").lr.tolist()  # NaN (diverged) last
        path = self.results() / LR_DIVERGED
        bad = set(pd.read_csv(path).query("approach == @approach").lr) if path.is_file() else set()
        left = [rate for rate in grid if rate not in bad]
        if not left:
            raise CrosslayerError(f"every learning rate of the preset diverged for {approach} ({path}); add lower "
                                  "values to the preset's lr_grid")
        return left[0]

    def evaluation(self, name: str, *, folder: Path | None = None, downstream: bool = True):
        """The evaluation table of dictionary ``<out>/dicts/<name>`` on the held-out store
        (:func:`crosslayer.evals.evaluate`; with ``downstream`` the per-layer splices through the model),
        cached as ``<folder or results>/eval_<name>.csv`` and recomputed when the cache lacks a column."""
        import pandas as pd

        from crosslayer.dictionary import load_dictionary
        from crosslayer.evals import evaluate

        path = (folder or self.results()) / f"eval_{name}.csv"
        wanted = {"splice", "l0_frac"} | ({"ce_recovered_lo"} if downstream else set())
        if path.is_file():
            table = pd.read_csv(path)
            if wanted <= set(table.columns):
                return table
        return evaluate(load_dictionary(self.dicts / name, device=self.device), self.store("heldout"),
                        model=self.model if downstream else None, n_tokens=self.sizes.eval_tokens,
                        n_windows=self.sizes.eval_windows, zero_cache=self.zero_cache, out=path,
                        progress=self.progress)


# ----------------------------------------------------------------------------- learning-rate sweep

LR_DIVERGED = "lr_diverged.csv"
"""``results/lr_diverged.csv``: (approach, lr, dictionary, error) of every full run that diverged."""


def _append_row(path: Path, row: dict) -> None:
    """Append ``row`` to the CSV at ``path`` (written whole, atomically)."""
    import pandas as pd

    table = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    write_csv(pd.concat([table, pd.DataFrame([row])], ignore_index=True), path)


def lr_sweep(ctx: RunContext):
    """``results/lr_sweep.csv``: for each approach (the main per-layer SAEs, the main crosscoder) and each
    candidate of the preset's ``lr_grid``, a run of ``sweep_tokens`` (same trainer, batch and seed 0) and its
    held-out FVU at the end; ``chosen`` marks each approach's lowest. Computed once, then read back."""
    import pandas as pd

    from crosslayer.crosscoder import CrosscoderConfig
    from crosslayer.sae_stack import SAEStackConfig
    from crosslayer.training import TrainingDiverged

    path = ctx.results() / "lr_sweep.csv"
    if path.is_file():
        return pd.read_csv(path)
    s, store = ctx.sizes, ctx.store("train")
    archs = {"saes": SAEStackConfig(layers=tuple(store.layers), d_model=store.width, width=s.sae_width, k=s.sae_k,
                                    aux_frac=s.aux_frac),
             "crosscoders": CrosscoderConfig(layers=tuple(store.layers), d_model=store.width,
                                             n_features=ctx.cc_width, k=s.cc_k, aux_frac=s.aux_frac)}
    rows = []
    for approach, arch in archs.items():
        for lr in s.lr_grid:
            try:
                fvu = ctx._train(arch, f"sweep/{approach}_lr{lr:g}", approach=approach, lr=lr, seed=0,
                                 tokens=s.sweep_tokens).meta["convergence"]["final_fvu"]
            except TrainingDiverged:
                fvu = float("nan")  # never chosen
            rows.append({"approach": approach, "lr": lr, "tokens": s.sweep_tokens, "heldout_fvu": fvu})
    table = pd.DataFrame(rows)
    table["chosen"] = table.index.isin(table.groupby("approach").heldout_fvu.idxmin())  # the first on ties
    write_csv(table, path)
    return table


# ----------------------------------------------------------------------------- steps

def step_score(ctx: RunContext) -> dict:
    """Held-out loss with an equal token budget per source label, and residual norms."""
    from crosslayer.corpus import TokenWindows, make_windows
    from crosslayer.scoring import score

    s, labels = ctx.sizes, ctx.corpus.label_names
    per_label = max(s.seq_len, s.score_tokens // len(labels))
    windows = TokenWindows.concat([
        make_windows(ctx.corpus, ctx.model.tokenizer, split="heldout", labels=[label], seq_len=s.seq_len,
                     n_tokens=per_label, seed=0) for label in labels])
    losses, norms = score(ctx.model, windows, batch_size=s.batch_size)
    write_csv(losses, ctx.results() / "heldout_loss.csv")
    write_csv(norms, ctx.results() / "residual_norms.csv")
    print(losses.to_string(index=False, float_format="%.3f"))
    return {"ce_loss_all": float(losses.loc[losses.label == "all", "ce_loss"].iloc[0])}


def _harvest_step(split: str):
    def step(ctx: RunContext) -> dict:
        from crosslayer.harvest import harvest

        ctx.forget_store(split)
        s = ctx.sizes
        n_tokens = s.train_tokens if split == "train" else s.heldout_tokens
        store = harvest(ctx.model, ctx.windows(split, n_tokens), out_dir=ctx.out / "stores" / split,
                        layers=s.layers, batch_size=s.batch_size)
        print(store)
        return {"rows": store.n_rows, "excluded": store.manifest["excluded"]}

    return step


def seed_name(base: str, seed: int) -> str:
    """Name of the main dictionary ``base`` ("saes", "crosscoder") trained with ``seed`` (seed 0: ``base``)."""
    return base if seed == 0 else f"{base}_seed{seed}"


def step_sweep_lr(ctx: RunContext) -> dict:
    if len(ctx.sizes.lr_grid) == 1:
        return {"lr": ctx.sizes.lr_grid[0]}
    table = lr_sweep(ctx)
    return {a: float(table[(table.approach == a) & table.chosen].lr.iloc[0]) for a in ("saes", "crosscoders")}


def _train_step(base: str):
    def step(ctx: RunContext) -> dict:
        train = ctx.saes if base == "saes" else ctx.crosscoder
        trained = [train(seed_name(base, seed), seed=seed) for seed in range(ctx.sizes.seeds)]
        return {"n_features": trained[0].n_features, "seeds": len(trained),
                "converged": [ctx.used.get(seed_name(base, seed)) for seed in range(ctx.sizes.seeds)]}

    return step


def _eval_step(base: str):
    def step(ctx: RunContext) -> dict:
        from crosslayer.evals import summary_lines

        info = {}
        for seed in range(ctx.sizes.seeds):
            table = ctx.evaluation(seed_name(base, seed))
            print(f"{seed_name(base, seed)}:\n" + "\n".join(summary_lines(table)))
            overall = table[table.scope == "all"].iloc[0]
            info[f"seed{seed}"] = {"fvu_all": float(overall["fvu"]), "l0_tuple": float(overall["l0_tuple"]),
                                   "ce_recovered_layers": [round(float(v), 4)
                                                           for v in table[table.scope == "layer"].ce_recovered]}
        return info

    return step


def step_site(ctx: RunContext) -> dict:
    """The feature browser of the main crosscoder and per-layer SAEs on the held-out store (``<out>/site/``)."""
    from crosslayer.browse import build_site

    out = build_site([ctx.dicts / seed_name("crosscoder", 0), ctx.dicts / seed_name("saes", 0)], ctx.store("heldout"),
                     ctx.out / "site", model=ctx.model, progress=ctx.progress)
    return {"site": str(out / "index.html")}


def _study_step(name: str):
    return lambda ctx: run_study(name, ctx)


def _sweep_table(ctx: RunContext):
    """``results/lr_sweep.csv`` with what the full runs made of it: ``full_run`` "diverged" for a rate a full run of
    the approach diverged at (``lr_diverged.csv``), ``used`` for the rate the approach's dictionaries were trained
    with (:meth:`RunContext.lr`: the best rate that did not diverge); None without a sweep."""
    import pandas as pd

    path = ctx.results() / "lr_sweep.csv"
    if not path.is_file():
        return None
    sweep = pd.read_csv(path)
    div = ctx.results() / LR_DIVERGED
    bad = set(zip(*(pd.read_csv(div)[c] for c in ("approach", "lr")))) if div.is_file() else set()
    sweep["full_run"] = ["diverged" if (a, r) in bad else "" for a, r in zip(sweep.approach, sweep.lr)]
    used = {a: ctx.lr(a) for a in sweep.approach.unique()}
    sweep["used"] = [bool(r == used[a]) for a, r in zip(sweep.approach, sweep.lr)]
    return sweep


def step_paper(ctx: RunContext) -> dict:
    """The setup macros of the paper (preset sizes, model, wall times of every step)."""
    return {"files": [str(p) for p in write_setup_tables(ctx)]}


def steps() -> list[tuple[str, object]]:
    """``[(name, step function)]`` of a reproduction, in order."""
    base = [("score", step_score), ("harvest-train", _harvest_step("train")),
            ("harvest-heldout", _harvest_step("heldout")), ("sweep-lr", step_sweep_lr),
            ("train-saes", _train_step("saes")), ("eval-saes", _eval_step("saes")),
            ("train-crosscoder", _train_step("crosscoder")), ("eval-crosscoder", _eval_step("crosscoder")),
            ("site", step_site)]
    return base + [(f"study-{s.name}", _study_step(s.name)) for s in all_studies()] + [("paper", step_paper)]


def step_names() -> list[str]:
    return [name for name, _ in steps()]


def needed_steps(study) -> list[str]:
    """The steps study ``study`` needs finished before it runs."""
    need = ["harvest-train", "harvest-heldout"] if study.stores or study.dictionaries else []
    return need + (["sweep-lr"] if study.dictionaries else []) + [f"train-{d}" for d in study.dictionaries]


# ----------------------------------------------------------------------------- running

def reproduce(preset: str = "demo", *, out: str | Path | None = None, corpus: str = "builtin",
              only: list[str] | None = None, paper: str | Path = "paper", redo: list[str] | None = None,
              progress: bool = True, device: str = "cpu") -> Path:
    """Run every step of ``preset`` that has not finished yet (or only those in ``only``); return the
    output folder. Steps in ``redo`` run again even if finished. Figures and LaTeX tables go to
    ``<paper>/figures`` and ``<paper>/tables``."""
    chosen = get_preset(preset)
    names = step_names()
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise CrosslayerError(f"unknown step(s) {unknown}; steps are {', '.join(names)}")
    out = Path(out or Path("runs") / preset)
    from crosslayer.corpus import load_corpus

    documents = load_corpus(corpus)  # a bad corpus fails before preset.json is written
    # the corpus's content fingerprint too: a folder whose stores came from other text (an edited builtin corpus)
    # is refused instead of mixing its stores with windows of the new text
    claim_folder(out, {**chosen.record(), "corpus": corpus, "corpus_id": documents.corpus_id}, record="preset.json",
                 what="reproduction")
    ctx = RunContext(chosen, out, corpus=corpus, paper=paper, progress=progress, device=device)
    ctx._corpus = documents
    total = time.time()
    with stops_as_interrupts():
        for name, step in steps():
            if only and name not in only:
                continue
            _run_step(ctx, name, step, redo=name in (redo or []))
    release_folder(out)
    print(f"reproduce --preset {preset}: {time.time() - total:.0f}s in this run; results in {out}", flush=True)
    return out


@contextlib.contextmanager
def stops_as_interrupts():
    """While inside: SIGTERM (``kill``, a scheduler's stop) and SIGINT (also where a background job inherited it
    ignored) raise KeyboardInterrupt in the main thread, so that :func:`_run_step` records the stopped attempt's time
    and the command exits 130 like Ctrl-C. The previous handlers come back on exit; off the main thread, nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _run_step(ctx: RunContext, name: str, step, *, redo: bool) -> None:
    """Run ``step`` unless its marker ``done/<name>.json`` exists. The marker's ``seconds`` is the step's whole wall
    time: an attempt stopped by an error, Ctrl-C or SIGTERM (:func:`stops_as_interrupts`) adds its time to
    ``done/<name>.partial.json`` (SIGKILL leaves no time to), and the attempt that finishes adds it to its own
    (``earlier_attempts_seconds``)."""
    marker, partial = ctx.out / "done" / f"{name}.json", ctx.out / "done" / f"{name}.partial.json"
    if marker.is_file() and not redo:
        print(f"[{name}] done already ({marker})")
        return
    print(f"[{name}] running", flush=True)
    earlier = json.loads(partial.read_text())["seconds"] if partial.is_file() else 0.0
    start = time.time()
    try:
        info = step(ctx)
    except BaseException:
        write_json({"step": name, "seconds": round(earlier + time.time() - start, 1)}, partial)
        raise
    write_json({"step": name, "seconds": round(earlier + time.time() - start, 1), "earlier_attempts_seconds": earlier,
                **(info or {})}, marker)
    partial.unlink(missing_ok=True)
    print(f"[{name}] finished in {time.time() - start:.0f}s (earlier attempts {earlier:.0f}s)", flush=True)


def study(name: str, preset: str = "demo", *, out: str | Path | None = None, corpus: str = "builtin",
          paper: str | Path = "paper", progress: bool = True, device: str = "cpu") -> Path:
    """Run one study (again), first running whatever steps it needs that have not finished."""
    needs = needed_steps(get_study(name))
    return reproduce(preset, out=out, corpus=corpus, only=needs + [f"study-{name}"], paper=paper,
                     redo=[f"study-{name}"], progress=progress, device=device)


def run_study(name: str, ctx: RunContext) -> dict:
    """Run study ``name`` in ``ctx`` with the preset's config; write its CSVs, config, figures, tables, answer."""
    st = get_study(name)
    cfg = ctx.preset.config(name)
    start = time.time()
    results = ctx.results(name)
    write_json(st.config_record(cfg), results / CONFIG_FILE)
    ctx.used = {}
    info = st.run(ctx, cfg) or {}
    write_json({name: ok for name, ok in ctx.used.items() if not name.startswith("sweep/")},
               results / USED_DICTIONARIES)
    rendered = render(name, results, ctx.paper)
    summary = {"study": name, "preset": ctx.preset_name, "seconds": round(time.time() - start, 1), **info}
    write_json(summary, results / "summary.json")
    print(f"[study {name}] " + json.dumps(info, default=str)[:400], flush=True)
    return {**info, **rendered}


# ----------------------------------------------------------------------------- rendering

def figure_environments(name: str, figures: list) -> str:
    """LaTeX figure environments for ``[(path, caption), ...]`` (paths relative to the paper folder)."""
    parts = []
    for i, (path, caption) in enumerate(figures):
        rel = f"figures/{Path(path).name}"
        parts.append("\\begin{figure}[tbp]\n\\centering\n"
                     f"\\includegraphics[width=\\linewidth,height=0.42\\textheight,keepaspectratio]{{{rel}}}\n"
                     f"\\caption{{{caption}}}\n\\label{{fig:{name}:{i}}}\n\\end{{figure}}\n")
    return "\n".join(parts) if parts else "% no figures\n"


USED_DICTIONARIES = "dictionaries.json"
"""A study's results file: every dictionary it used -> converged (True, False, or None: no curve)."""


def convergence_note(results: Path) -> str:
    """The sentence a study's answer ends with when it used dictionaries that did not converge (or whose
    convergence is unknown); empty when all converged."""
    from crosslayer.training import CONVERGED_REL_GAIN
    from studies.common import latex_escape

    path = results / USED_DICTIONARIES
    used = json.loads(path.read_text()) if path.is_file() else {}
    unconverged = sorted(n for n, ok in used.items() if ok is False)
    unknown = sorted(n for n, ok in used.items() if ok is None)
    parts = []
    if unconverged:
        parts.append(f"Not converged (held-out FVU still moved by {100 * CONVERGED_REL_GAIN:g}\\% or more over the last "
                     f"quarter of training): "
                     f"{latex_escape(', '.join(unconverged))}.")
    if unknown:
        parts.append(f"Convergence not measured (no held-out curve): {latex_escape(', '.join(unknown))}.")
    return (" " + " ".join(parts)) if parts else ""


def render(name: str, results: Path, paper: Path) -> dict:
    """Figures, tables and the answer of study ``name`` from its CSVs (and saved config) in ``results``."""
    st = get_study(name)
    cfg = st.load_config(results)
    paper = Path(paper)
    (paper / "figures").mkdir(parents=True, exist_ok=True)
    (paper / "tables").mkdir(parents=True, exist_ok=True)
    figs = st.figures(results, paper / "figures", cfg)
    tables = st.tables(results, paper / "tables", cfg)
    write_text(st.answer(results, cfg).rstrip() + convergence_note(results) + "\n",
               paper / "tables" / f"{name}_answer.tex")
    write_text(figure_environments(name, figs), paper / "tables" / f"{name}_figures.tex")
    return {"figures": [str(p) for p, _ in figs], "tables": [str(p) for p in tables]}


def _layer_list(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}--{layers[-1]}" if contiguous else ", ".join(map(str, layers))


def dictionary_table(ctx: RunContext):
    """``results/dictionaries.csv``: every trained dictionary of the run (not the sweep's runs) with its
    training (lr, tokens, seed), the last curve row's L0 and dead fraction, and the convergence verdict
    (:func:`crosslayer.training.curve_verdict`; empty for sae-lens-trained SAEs, which have no curve); and
    ``results/curves.csv``: every such dictionary's training curve (its ``train_log.csv`` rows)."""
    import pandas as pd

    from crosslayer.training import curve_verdict

    rows, curves = [], []
    for cfg_path in sorted(ctx.dicts.glob("*/cfg.json")):
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("status") != "complete":
            continue
        name, train = cfg_path.parent.name, cfg.get("training", {})
        conv = curve_verdict(cfg_path.parent) or {}  # the current rule, from the saved curve
        log_path = cfg_path.parent / "train_log.csv"
        log = pd.read_csv(log_path).assign(dictionary=name) if log_path.is_file() else None
        last = log.iloc[-1] if log is not None else {}
        curves += [] if log is None else [log]
        rows.append({"dictionary": name, "kind": cfg["kind"], "n_features": cfg["n_features"],
                     "lr": train.get("lr"), "tokens": train.get("tokens"), "seed": train.get("seed"),
                     "heldout_fvu": conv.get("final_fvu"), "rel_gain_last_quarter": conv.get("rel_gain_last_quarter"),
                     "l0": last.get("l0"), "dead_frac": last.get("dead_frac"), "converged": conv.get("converged")})
    table = pd.DataFrame(rows)
    write_csv(table, ctx.results() / "dictionaries.csv")
    if curves:
        write_csv(pd.concat(curves, ignore_index=True), ctx.results() / CURVES)
    return table


CURVES = "curves.csv"
"""The run's training curves (``results/curves.csv``), drawn by :func:`curves_figure`."""


def curves_figure(results: Path, figures_dir: Path) -> Path | None:
    """``training_curves.png`` from ``results/curves.csv``: held-out FVU against training tokens, one line
    per dictionary (None when the run has no curves)."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from studies.common import save_figure, theme

    path = Path(results) / CURVES
    if not path.is_file():
        return None
    curves = pd.read_csv(path).dropna(subset=["heldout_fvu"])
    if curves.empty:
        return None
    theme()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    sns.lineplot(data=curves, x="tokens", y="heldout_fvu", hue="dictionary", marker="o", markersize=3, ax=ax)
    ax.set(xlabel="training tokens", ylabel="held-out FVU", yscale="log")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), fontsize=7)
    return save_figure(fig, Path(figures_dir) / "training_curves.png")


def _tabular(table, columns: dict[str, str]) -> str:
    """A booktabs tabular of ``table``'s ``columns`` (name -> header), numbers to 3 significant digits."""
    from studies.common import latex_escape

    def cell(v):
        if isinstance(v, float):
            return "--" if v != v else f"{v:.3g}"
        return latex_escape(str(v))

    head = " & ".join(columns.values())
    body = "\n".join(" & ".join(cell(r[c]) for c in columns) + " \\\\" for _, r in table.iterrows())
    return (f"\\begin{{tabular}}{{l{'r' * (len(columns) - 1)}}}\\toprule {head} \\\\ \\midrule\n"
            f"{body}\n\\bottomrule\\end{{tabular}}")


def write_setup_tables(ctx: RunContext) -> list[Path]:
    """``tables/setup.tex``: macros with the preset's sizes, the wall time of every finished step, every
    dictionary with its convergence, and the learning-rate sweep."""
    import pandas as pd

    from studies.common import latex_escape

    s = ctx.sizes
    steps_s = {m.stem: json.loads(m.read_text()).get("seconds", float("nan"))
               for m in sorted((ctx.out / "done").glob("*.json"))}
    store = ctx.store("train")
    macros = {
        "presetname": ctx.preset_name, "modelname": s.model, "nlayers": store.n_layers,
        "layerlist": _layer_list(store.layers), "dmodel": store.width, "traintokens": f"{store.n_rows:,}",
        "heldouttokens": f"{ctx.store('heldout').n_rows:,}", "saewidth": s.sae_width, "saek": s.sae_k,
        "dicttokens": f"{s.dict_tokens:,}", "dictbatch": s.dict_batch, "seeds": s.seeds, "saetrainer": s.sae_trainer,
        "ccwidth": ctx.cc_width, "cck": s.cc_k, "evaltokens": f"{s.eval_tokens:,}", "evalwindows": s.eval_windows,
        "seqlen": s.seq_len, "totalminutes": f"{sum(v for v in steps_s.values() if v == v) / 60:.1f}",
    }
    lines = ["% generated by `crosslayer reproduce` (step paper); do not edit"]
    lines += [f"\\newcommand{{\\cl{key}}}{{{latex_escape(str(value))}}}" for key, value in macros.items()]
    times = pd.DataFrame({"step": [k for k in steps_s if k != "paper"],
                          "seconds": [float(v) for k, v in steps_s.items() if k != "paper"]})
    lines.append("\\newcommand{\\clsteptimes}{" + _tabular(times, {"step": "step", "seconds": "seconds"}) + "}")
    dicts = dictionary_table(ctx)
    if len(dicts):
        cols = {"dictionary": "dictionary", "n_features": "latents", "lr": "lr", "seed": "seed",
                "heldout_fvu": "held-out FVU", "l0": "L0", "dead_frac": "dead", "rel_gain_last_quarter": "last-quarter gain",
                "converged": "converged"}
        lines.append("\\newcommand{\\cldictionaries}{" + _tabular(dicts, cols) + "}")
    sweep = _sweep_table(ctx)
    if sweep is not None:
        cols = {"approach": "approach", "lr": "lr", "tokens": "tokens", "heldout_fvu": "held-out FVU", "chosen": "best",
                "full_run": "full run", "used": "used"}
        lines.append("\\newcommand{\\cllrsweep}{" + _tabular(sweep, cols) + "}")
    if curves_figure(ctx.results(), ctx.paper / "figures") is not None:
        lines.append("\\newcommand{\\clcurves}{\\includegraphics[width=\\linewidth]{figures/training_curves.png}}")
    (ctx.paper / "tables").mkdir(parents=True, exist_ok=True)
    path = ctx.paper / "tables" / "setup.tex"
    write_text("\n".join(lines) + "\n", path)
    return [path]
