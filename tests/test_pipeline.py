"""The reproduction machinery: the layering (library below the experiments), the study registry, typed
presets and contexts, and the pipeline at the micro preset (every step runs, writes its results and
the paper's generated files, and a rerun skips finished steps)."""

import ast
import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import studies
from crosslayer.cli import build_parser, main
from crosslayer.corpus import load_corpus
from crosslayer.errors import CrosslayerError
from crosslayer.store import ActivationStore
from studies.pipeline import RunContext, reproduce, step_names, study
from studies.presets import SIZES, get_preset

LIBRARY = Path(__file__).resolve().parents[1] / "crosslayer"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_experiments():
    files = sorted(LIBRARY.glob("*.py"))
    assert len(files) > 10
    offenders = {p.name: sorted(m for m in _imported_modules(p) if m.split(".")[0] == "studies") for p in files}
    assert not {k: v for k, v in offenders.items() if v}


def test_every_preset_has_a_typed_frozen_config_for_every_study():
    names = studies.study_names()
    assert names[0] == "logit_lens" and len(names) == len(set(names)) >= 6
    for preset in SIZES:
        p = get_preset(preset)
        assert set(p.studies) == set(names)
        for name, cfg in p.studies.items():
            assert isinstance(cfg, studies.get_study(name).config)
            with pytest.raises(Exception):
                cfg.__setattr__("anything", 1)  # frozen
        json.dumps(p.record())  # the record is plain JSON
    assert get_preset("micro").config("logit_lens").prompts < get_preset("demo").config("logit_lens").prompts


TOY_STUDY = '''
from dataclasses import dataclass

from crosslayer.io import write_csv
from studies.base import Study


@dataclass(frozen=True)
class Config:
    n: int = 3


def run(ctx, cfg):
    import pandas as pd

    write_csv(pd.DataFrame({"i": range(cfg.n)}), ctx.results("toy_study") / "numbers.csv")
    return {"n": cfg.n}


def figures(results, figures_dir, cfg):
    return []


def tables(results, tables_dir, cfg):
    return []


def answer(results, cfg):
    import pandas as pd

    return f"{len(pd.read_csv(results / 'numbers.csv'))} numbers (n={cfg.n})."


STUDY = Study(name="toy_study", title="Toy", config=Config, run=run, figures=figures, tables=tables,
              answer=answer, presets={"micro": Config(n=5)}, order=999)
'''


def test_adding_a_study_is_adding_one_file(tmp_path, monkeypatch):
    """A module that defines STUDY, found on the package path, becomes a study, a step, a preset config and a
    CLI choice, with nothing else edited."""
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "toy_study.py").write_text(textwrap.dedent(TOY_STUDY))
    monkeypatch.setattr(studies, "__path__", [*studies.__path__, str(extra)])
    studies._registry.cache_clear()
    try:
        assert studies.study_names()[-1] == "toy_study"
        assert "study-toy_study" in step_names() and get_preset("micro").config("toy_study").n == 5
        parser = build_parser()
        assert parser.parse_args(["study", "toy_study", "--preset", "micro"]).name == "toy_study"
        out = study("toy_study", "micro", out=tmp_path / "run", paper=tmp_path / "paper", progress=False)
        assert len(pd.read_csv(out / "results" / "toy_study" / "numbers.csv")) == 5
        assert (tmp_path / "paper" / "tables" / "toy_study_answer.tex").read_text() == "5 numbers (n=5).\n"
        assert json.loads((out / "results" / "toy_study" / "config.json").read_text()) == {"n": 5}
    finally:
        studies._registry.cache_clear()


def test_a_run_context_is_built_directly(tmp_path, tiny_model):
    ctx = RunContext(get_preset("micro"), tmp_path, model=tiny_model, progress=False)
    assert ctx.model is tiny_model and ctx.sizes.sae_k == SIZES["micro"].sae_k
    assert ctx.results("x") == tmp_path / "results" / "x" and ctx.results("x").is_dir()
    with pytest.raises(CrosslayerError, match="harvest-train"):
        ctx.store("train")


@pytest.mark.slow
def test_micro_reproduce_runs_everything_and_skips_finished_steps(micro_ctx, capsys, tmp_path):
    out, paper = micro_ctx.out, micro_ctx.paper
    reproduce("micro", out=out, paper=paper, progress=False)
    names = studies.study_names()
    assert sorted(p.stem for p in (out / "done").glob("*.json")) == sorted(step_names())
    loss = pd.read_csv(out / "results" / "heldout_loss.csv")
    assert list(loss.columns) == ["label", "tokens", "ce_loss"] and (loss.ce_loss > 0).all()
    assert set(loss.label) == set(load_corpus("builtin").label_names) | {"all"}  # every label scored
    norms = pd.read_csv(out / "results" / "residual_norms.csv")
    n_layers = micro_ctx.model.cfg.n_layers
    assert set(norms.layer) == set(range(n_layers))
    train, held = ActivationStore(out / "stores" / "train"), ActivationStore(out / "stores" / "heldout")
    assert train.manifest["split"] == "train" and held.manifest["split"] == "heldout"
    assert train.n_layers == n_layers and train.n_rows > 0.7 * micro_ctx.sizes.train_tokens
    for name in ("saes", "crosscoder"):
        table = pd.read_csv(out / "results" / f"eval_{name}.csv")
        per_layer, overall = table[table.scope == "layer"], table[table.scope == "all"]
        assert per_layer.layer.tolist() == train.layers and len(overall) == 1 and overall.layer.isna().all()
        assert (per_layer.fvu < 1.0).all() and (per_layer.l0 <= micro_ctx.sizes.sae_k + 1e-6).all()
        assert table[table.splice != "none"].ce_recovered.notna().all() and table[table.splice == "none"].ce_recovered.isna().all()
    # the feature browser of the main dictionaries
    site = json.loads((out / "site" / "site.json").read_text())
    assert sorted(site["dictionaries"]) == ["crosscoder", "saes"] and (out / "site" / "feature.html").is_file()
    # the paper's generated files: every study's table, answer and figure list, and the setup macros
    tables = paper / "tables"
    for name in names:
        for suffix in ("", "_answer", "_figures"):
            assert (tables / f"{name}{suffix}.tex").stat().st_size > 0, (name, suffix)
        summary = json.loads((out / "results" / name / "summary.json").read_text())
        assert summary["study"] == name and summary["preset"] == "micro"
        saved = json.loads((out / "results" / name / "config.json").read_text())
        assert saved == json.loads(json.dumps(get_preset("micro").record()["studies"][name]))
    setup = (tables / "setup.tex").read_text()
    assert "\\newcommand{\\clpresetname}{micro}" in setup and "\\clsteptimes" in setup
    # one trainer, one budget: the lr sweep chose one rate per approach from the preset's grid, the main
    # dictionaries were trained at it, and every dictionary is listed with its convergence verdict
    sweep = pd.read_csv(out / "results" / "lr_sweep.csv")
    assert set(sweep.approach) == {"saes", "crosscoders"} and sweep.groupby("approach").chosen.sum().eq(1).all()
    assert set(sweep.lr) == set(micro_ctx.sizes.lr_grid)
    dicts = pd.read_csv(out / "results" / "dictionaries.csv").set_index("dictionary")
    chosen = sweep[sweep.chosen].set_index("approach").lr
    assert dicts.loc["saes", "lr"] == chosen["saes"] and dicts.loc["crosscoder", "lr"] == chosen["crosscoders"]
    assert dicts.loc["saes", "tokens"] == dicts.loc["crosscoder", "tokens"] == micro_ctx.sizes.dict_tokens
    assert dicts.heldout_fvu.notna().all() and dicts.converged.notna().all()
    assert "\\cldictionaries" in setup and "\\cllrsweep" in setup and "\\clcurves" in setup
    curves = pd.read_csv(out / "results" / "curves.csv")
    assert set(curves.dictionary) == set(dicts.index) and curves.heldout_fvu.notna().any()
    assert (paper / "figures" / "training_curves.png").stat().st_size > 1000
    for name in names:  # a study that used an unconverged dictionary names it in its answer
        used = json.loads((out / "results" / name / "dictionaries.json").read_text())
        answer = (tables / f"{name}_answer.tex").read_text()
        unconverged = [d for d, converged in used.items() if converged is False]
        assert ("Not converged" in answer) == bool(unconverged), name
        assert all(d.replace("_", "\\_") in answer for d in unconverged)
    figures = list((paper / "figures").glob("*.png"))
    assert len(figures) >= len(names)
    capsys.readouterr()
    reproduce("micro", out=out, paper=paper, progress=False)
    assert capsys.readouterr().out.count("done already") == len(step_names())
    # `crosslayer figures` redraws every study's figures, tables and answers from the CSVs alone
    redrawn = tmp_path / "redrawn"
    assert main(["figures", "--results", str(out / "results"), "--paper", str(redrawn)]) == 0
    for name in names:
        answer = (redrawn / "tables" / f"{name}_answer.tex").read_text()
        assert answer == (tables / f"{name}_answer.tex").read_text(), name
    assert sorted(p.name for p in (redrawn / "figures").glob("*.png")) == sorted(p.name for p in figures)
    assert main(["figures", "astrology", "--results", str(out / "results")]) == 2


def test_reproduce_rejects_bad_input(tmp_path):
    with pytest.raises(CrosslayerError, match="unknown preset"):
        reproduce("huge", out=tmp_path)
    with pytest.raises(CrosslayerError, match="unknown step"):
        reproduce("micro", out=tmp_path, only=["train-everything"])
    with pytest.raises(CrosslayerError, match="unknown study"):
        study("astrology", "micro", out=tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "preset.json").write_text(json.dumps({"preset": "micro", "layers": "0"}))
    with pytest.raises(CrosslayerError, match="different reproduction"):
        reproduce("micro", out=tmp_path / "other")
    record = {**get_preset("micro").record(), "corpus": "builtin", "corpus_id": "corpus.jsonl.xz:sha256:older"}
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "preset.json").write_text(json.dumps(record))  # the same preset over another corpus text
    with pytest.raises(CrosslayerError, match="different reproduction \\(corpus_id: 'corpus.jsonl.xz:sha256:older'"):
        reproduce("micro", out=tmp_path / "older")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(CrosslayerError, match="not a reproduction folder"):
        reproduce("micro", out=tmp_path / "full")
    (tmp_path / "a_file").write_text("x")
    assert main(["reproduce", "--preset", "micro", "--out", str(tmp_path / "a_file")]) == 2


@pytest.mark.slow
def test_a_diverged_run_is_recorded_and_retrained_at_the_next_learning_rate(micro_ctx, monkeypatch):
    """RunContext._train: when the full run at the sweep's best lr diverges, the folder is removed, the lr is
    recorded in results/lr_diverged.csv, and the next lr of the sweep's ranking trains the dictionary (and
    every later dictionary of that approach)."""
    import crosslayer.training as training
    from crosslayer.training import TrainingDiverged

    real, seen = training.train_crosscoder_from_store, []
    best = micro_ctx.lr("crosscoders")

    def flaky(store, arch, cfg, *, out_dir, **kw):
        seen.append(cfg.lr)
        if cfg.lr == best:
            out_dir.mkdir(parents=True, exist_ok=True)
            raise TrainingDiverged(f"held-out FVU rose at lr {cfg.lr:g}")
        return real(store, arch, cfg, out_dir=out_dir, **kw)

    monkeypatch.setattr(training, "train_crosscoder_from_store", flaky)
    cc = micro_ctx.crosscoder("crosscoder_diverge_test", width=16)
    diverged = pd.read_csv(micro_ctx.results() / "lr_diverged.csv")
    assert seen[0] == best and seen[1] != best and cc.meta["training"]["lr"] == seen[1]
    assert list(diverged.lr) == [best] and list(diverged.dictionary) == ["crosscoder_diverge_test"]
    assert micro_ctx.lr("crosscoders") == seen[1]
    (micro_ctx.results() / "lr_diverged.csv").unlink()  # leave the shared micro run as it was


@pytest.mark.slow
def test_reproduce_twice_gives_identical_csvs(tmp_path):
    """Determinism: two micro reproductions from scratch write the same CSVs, byte for byte (no CSV
    holds a wall-clock column; step times live in ``done/*.json`` and the paper's setup macros)."""
    runs = [reproduce("micro", out=tmp_path / name, paper=tmp_path / f"paper_{name}", progress=False)
            for name in ("a", "b")]
    csvs = [sorted(p.relative_to(run) for p in run.rglob("*.csv")) for run in runs]
    assert csvs[0] == csvs[1] and len(csvs[0]) > 20
    differ = [str(p) for p in csvs[0] if (runs[0] / p).read_bytes() != (runs[1] / p).read_bytes()]
    assert not differ, differ


def test_a_step_time_counts_every_attempt(tmp_path):
    """_run_step: an attempt stopped by Ctrl-C (or an error) leaves its wall time in done/<step>.partial.json; the
    attempt that finishes records the sum, says how much came from earlier attempts, and removes the partial file."""
    import time as time_mod
    from types import SimpleNamespace

    from studies.pipeline import _run_step

    ctx, calls = SimpleNamespace(out=tmp_path), []

    def step(_ctx):
        calls.append(1)
        time_mod.sleep(0.2)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return {"value": 1}

    with pytest.raises(KeyboardInterrupt):
        _run_step(ctx, "slow", step, redo=False)
    first = json.loads((tmp_path / "done" / "slow.partial.json").read_text())["seconds"]
    assert first >= 0.2 and not (tmp_path / "done" / "slow.json").exists()
    _run_step(ctx, "slow", step, redo=False)
    done = json.loads((tmp_path / "done" / "slow.json").read_text())
    assert done["earlier_attempts_seconds"] == first and done["seconds"] >= first + 0.2 and done["value"] == 1
    assert not (tmp_path / "done" / "slow.partial.json").exists()
    _run_step(ctx, "slow", step, redo=False)  # finished: skipped
    assert len(calls) == 2


_SLOW_STEP = """
import sys, time
from types import SimpleNamespace
from pathlib import Path
from studies.pipeline import _run_step, stops_as_interrupts
def step(_ctx):
    print("started", flush=True)
    time.sleep(60)
with stops_as_interrupts():
    _run_step(SimpleNamespace(out=Path(sys.argv[1])), "slow", step, redo=False)
"""


@pytest.mark.parametrize("sig,ignored_at_start", [("SIGTERM", False), ("SIGINT", True)])
def test_a_killed_reproduction_records_the_stopped_attempt(tmp_path, sig, ignored_at_start):
    """SIGTERM, and SIGINT even where a background job inherited it ignored, stop a step like Ctrl-C: the process
    exits through KeyboardInterrupt and done/<step>.partial.json holds the attempt's time (a real child process)."""
    import signal
    import subprocess
    import sys
    import time as time_mod

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    child = subprocess.Popen([sys.executable, "-c", _SLOW_STEP, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
                             preexec_fn=ignore_sigint if ignored_at_start else None)
    assert [child.stdout.readline().strip() for _ in range(2)] == ["[slow] running", "started"]
    time_mod.sleep(0.3)
    child.send_signal(getattr(signal, sig))
    _, err = child.communicate(timeout=30)
    assert child.returncode != 0 and "KeyboardInterrupt" in err and f"stopped by {sig}" in err
    partial = json.loads((tmp_path / "done" / "slow.partial.json").read_text())
    assert 0.3 <= partial["seconds"] < 30 and not (tmp_path / "done" / "slow.json").exists()
