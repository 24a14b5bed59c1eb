"""The comparison studies and the reproduction machinery built on the :mod:`crosslayer` library.

Layering: ``crosslayer`` (the library) never imports this package; this package imports it.
The ``crosslayer`` CLI finds the verbs ``reproduce``, ``study`` and ``figures`` through the
package's one registration point, the ``crosslayer.plugins`` entry point (``studies.cli``).

- :mod:`studies.base`: :class:`~studies.base.Study` (what a study declares) and
  :class:`~studies.base.StudyContext` (what it may use while it runs).
- :mod:`studies.presets`: the shared sizes of each preset; with the studies' own configs they make a
  :class:`~studies.presets.Preset`.
- :mod:`studies.pipeline`: the run context, the resumable steps, ``reproduce`` and ``study``.
- One module per study, each ending with ``STUDY = Study(...)``: the registry below finds every
  module of this package that defines ``STUDY``, so adding a study is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from crosslayer.errors import CrosslayerError


@lru_cache(maxsize=1)
def _registry() -> dict:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        study = getattr(module, "STUDY", None)
        if study is not None:
            found.append(study)
    found.sort(key=lambda s: (s.order, s.name))
    return {s.name: s for s in found}


def all_studies() -> list:
    """Every registered :class:`~studies.base.Study`, in run order."""
    return list(_registry().values())


def study_names() -> list[str]:
    return list(_registry())


def get_study(name: str):
    """The registered study ``name``, or a one-line error listing the studies."""
    registry = _registry()
    if name not in registry:
        raise CrosslayerError(f"unknown study {name!r}; studies are {', '.join(registry)}")
    return registry[name]
