"""The experiments' verbs, ``crosslayer reproduce | study | figures``: registered with the library's
CLI through the ``crosslayer.plugins`` entry point (pyproject.toml), the one place where the
experiments reach the CLI."""

from __future__ import annotations

from pathlib import Path

from crosslayer.cli import verb
from crosslayer.errors import CrosslayerError

from studies import study_names
from studies.presets import preset_names


def _add_run_options(p, *, steps: bool):
    p.add_argument("--preset", default="demo", choices=preset_names(), help="sizes of the run")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>); a rerun resumes it")
    p.add_argument("--corpus", default="builtin", help="'builtin', a text file/folder, a .jsonl, or hf:NAME")
    p.add_argument("--paper", default="paper", help="folder whose figures/ and tables/ receive the output")
    p.add_argument("--device", default="cpu", help="cpu | cuda: where the model and the dictionaries run and train")
    if steps:
        p.add_argument("--only", default=None, help="comma-separated steps to run (default: all)")
        p.add_argument("--redo", default=None, help="comma-separated finished steps to run again")


@verb("reproduce", "run the end-to-end job of a preset, resumably (finished steps are skipped)",
      lambda p: _add_run_options(p, steps=True))
def cmd_reproduce(args):
    from studies.pipeline import reproduce

    out = reproduce(args.preset, out=args.out, corpus=args.corpus, paper=args.paper,
                    only=args.only.split(",") if args.only else None,
                    redo=args.redo.split(",") if args.redo else None, device=args.device)
    print(f"done: {out}")


def _add_study(p):
    p.add_argument("name", choices=study_names(), help="the study to run")
    _add_run_options(p, steps=False)


@verb("study", "run one comparison study (and the steps it needs that have not finished)", _add_study)
def cmd_study(args):
    from studies.pipeline import study

    out = study(args.name, args.preset, out=args.out, corpus=args.corpus, paper=args.paper, device=args.device)
    print(f"done: {out / 'results' / args.name}")


def _add_figures(p):
    p.add_argument("names", nargs="*", metavar="STUDY", help=f"studies (default: all): {', '.join(study_names())}")
    p.add_argument("--results", default="runs/demo/results", help="the run's results folder (holds <study>/*.csv)")
    p.add_argument("--paper", default="paper", help="folder whose figures/ and tables/ receive the output")


@verb("figures", "redraw the studies' figures, tables and answers from their CSVs (no model, no training)",
      _add_figures)
def cmd_figures(args):
    from studies import get_study
    from studies.pipeline import curves_figure, render

    for name in args.names:
        get_study(name)  # unknown names fail before anything is drawn
    results = Path(args.results)
    for name in args.names or study_names():
        if not (results / name).is_dir():
            raise CrosslayerError(f"no results of study {name} in {results / name}; run `crosslayer study {name}` "
                                  "first or pass --results RUN/results")
        made = render(name, results / name, Path(args.paper))
        print(f"{name}: {len(made['figures'])} figures, {len(made['tables'])} tables, answer -> "
              f"{Path(args.paper) / 'tables' / (name + '_answer.tex')}")
    if not args.names and (curve := curves_figure(results, Path(args.paper) / "figures")) is not None:
        print(f"training curves -> {curve}")
