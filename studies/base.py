"""What a study is (:class:`Study`) and what it may use while it runs (:class:`StudyContext`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from crosslayer.errors import CrosslayerError

CONFIG_FILE = "config.json"
"""The config a study ran with, written next to its CSVs (rendering reads it back)."""


class StudyContext(Protocol):
    """What a study's ``run`` receives: the run's sizes and folders, and lazily built model, corpus,
    activation stores and dictionaries (trained on first use, cached on disk, shared between studies).
    :class:`studies.pipeline.RunContext` implements it; a test can build one directly."""

    preset_name: str
    progress: bool
    preset: "Preset"
    """:class:`studies.presets.Preset` of the run (every study's config: a study may reuse another's results)."""

    @property
    def sizes(self): ...
    """:class:`studies.presets.Sizes` of the run."""

    @property
    def model(self): ...

    @property
    def corpus(self): ...

    @property
    def dicts(self) -> Path: ...
    """Folder for dictionaries a study trains itself."""

    @property
    def n_layers(self) -> int: ...

    @property
    def cc_width(self) -> int: ...

    def store(self, split: str): ...

    def saes(self, name: str = "saes", *, width: int | None = None, k: int | None = None,
             layers: list[int] | None = None, seed: int = 0): ...

    def crosscoder(self, name: str = "crosscoder", *, width: int | None = None, k: int | None = None,
                   variant: str = "acausal", activation: str = "topk", seed: int = 0): ...

    def results(self, study: str) -> Path: ...

    def evaluation(self, name: str, *, folder: Path | None = None, downstream: bool = True): ...
    """The (cached) :func:`crosslayer.evals.evaluate` table of dictionary ``name`` on the held-out store."""


@dataclass(frozen=True)
class Study:
    """One comparison study, declared once in its own module as ``STUDY = Study(...)``.

    ``run(ctx, cfg) -> dict`` writes tidy CSVs into ``ctx.results(name)`` and returns a few headline
    numbers; ``figures(results, figures_dir, cfg) -> [(path, caption)]``, ``tables(results,
    tables_dir, cfg) -> [path]`` (the main one ``tables/<name>.tex``) and ``answer(results, cfg) ->
    str`` (LaTeX) read only the CSVs, so ``crosslayer figures`` redraws them without a model.
    """

    name: str
    title: str
    config: type
    """A frozen dataclass of the study's settings; its defaults are the demo preset's."""
    run: Callable[[StudyContext, Any], dict]
    figures: Callable[[Path, Path, Any], list]
    tables: Callable[[Path, Path, Any], list]
    answer: Callable[[Path, Any], str]
    presets: Mapping[str, Any] = field(default_factory=dict)
    """preset name -> config, for presets whose settings differ from the defaults."""
    dictionaries: tuple[str, ...] = ()
    """The run's main dictionaries the study reads: ``"saes"`` and/or ``"crosscoder"``."""
    stores: bool = False
    """Whether it reads the run's activation stores."""
    order: int = 100
    """Position among the studies of a reproduction (lower runs first)."""

    def config_for(self, preset: str):
        return self.presets.get(preset) or self.config()

    def load_config(self, results: Path):
        """The config saved with the results (defaults when the results predate saved configs)."""
        path = Path(results) / CONFIG_FILE
        if not path.is_file():
            return self.config()
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise CrosslayerError(f"{path} is not valid JSON; run the study again") from None
        names = {f.name for f in fields(self.config)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
        return self.config(**values)

    def config_record(self, cfg) -> dict:
        return asdict(cfg)
