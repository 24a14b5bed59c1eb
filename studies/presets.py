"""Presets: the shared sizes of a reproduction plus every study's own settings.

A preset is :class:`Sizes` (model, layers, token budgets, dictionary widths and training settings
shared by every step) and, for each registered study, that study's frozen config for the preset
(declared in the study's own module, see :class:`studies.base.Study`). Adding a preset adds one
entry to :data:`SIZES`; a study whose settings should differ at that preset lists it in its
``presets`` mapping, the others use their config's defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from crosslayer.errors import CrosslayerError


@dataclass(frozen=True)
class Sizes:
    """The sizes every step shares (recorded in ``<out>/preset.json``)."""

    model: str
    layers: str
    """Layers harvested (``all``, ``8-15``, ...)."""
    train_tokens: int
    heldout_tokens: int
    score_tokens: int
    """Held-out tokens of the ``score`` step (equal budget per source label)."""
    sae_width: int
    """Latents per layer of the per-layer SAEs (the baseline)."""
    sae_k: int
    """Active latents per token of each layer's SAE."""
    eval_tokens: int
    """Held-out rows of the reconstruction metrics."""
    eval_windows: int
    """Held-out windows of the downstream metrics (spread over the store; >= 20,000 predictions at demo)."""
    cc_k: int = 32
    """TopK of the main crosscoder. Its width is ``sae_width * n_layers`` (matched total dictionary size)."""
    dict_tokens: int = 65_536
    """Training tokens of every dictionary of the run, per-layer SAEs and crosscoders alike."""
    dict_batch: int = 512
    """Rows per optimiser step of every dictionary."""
    lr_decay_frac: float = 0.2
    """Share of every dictionary's steps over which the learning rate decays linearly to 0 (``TrainConfig.lr_decay_frac``:
    0.2 = the last 20 %, 1.0 = a straight line from the peak to 0 over the whole run)."""
    aux_frac: float = 1.0
    """Share of each batch's rows that carry the AuxK loss of dead latents (every TopK dictionary of the run;
    :func:`crosslayer.crosscoder.aux_row_count`): below 1 the AuxK decode and backward shrink in proportion."""
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    """Candidate peak learning rates; each approach (per-layer SAEs, crosscoders) gets the one with the best
    held-out FVU after ``sweep_tokens`` (``results/lr_sweep.csv``). One value: no sweep."""
    sweep_tokens: int = 16_384
    """Training tokens of each learning-rate sweep run."""
    seeds: int = 1
    """Seeds of the main per-layer SAEs and crosscoder (the headline comparison)."""
    sae_trainer: str = "crosslayer"
    """Trainer of the per-layer SAEs: ``crosslayer`` (the crosscoders' trainer, :mod:`crosslayer.sae_stack`)
    or ``sae-lens`` (its ``SAETrainer``, the reference implementation; not like for like)."""
    relu_crosscoder: bool = False
    """Also train a ReLU crosscoder with the L1-of-norms penalty (Anthropic's recipe)."""
    relu_coef: float = 2.0
    """Its sparsity coefficient lambda: between the values that gave an L0 far above and far below the TopK
    crosscoders' k on a short run of the demo store (normalised inputs, L1 of the decoder norms)."""
    model_dtype: str = "auto"
    """Compute dtype of the model (auto: bfloat16 only where it is fast)."""
    seq_len: int = 128
    """Tokens per harvested window."""
    batch_size: int = 8
    """Windows per forward pass (harvest, scoring)."""

    def __post_init__(self):
        if self.sae_trainer not in ("crosslayer", "sae-lens"):
            raise CrosslayerError(f"unknown SAE trainer {self.sae_trainer!r}; use crosslayer or sae-lens")
        if not self.lr_grid or self.seeds < 1:
            raise CrosslayerError("a preset needs at least one learning rate and one seed")


SIZES: dict[str, Sizes] = {
    "micro": Sizes(model="tiny-4l-64d", layers="all", train_tokens=4_096, heldout_tokens=1_024, score_tokens=1_024,
                   sae_width=32, sae_k=8, eval_tokens=1_024, eval_windows=4, cc_k=8, dict_tokens=8_192,
                   dict_batch=128, lr_grid=(1e-3, 3e-3), sweep_tokens=2_048, seq_len=64),
    "demo": Sizes(model="smollm2-135m", layers="8-15", train_tokens=64_000, heldout_tokens=90_112, score_tokens=8_192,
                  sae_width=512, sae_k=32, eval_tokens=32_768, eval_windows=176, cc_k=32, dict_tokens=65_536,
                  dict_batch=512),
    "standard": Sizes(model="smollm2-135m", layers="3,11,19,27", train_tokens=500_000, heldout_tokens=200_000,
                      score_tokens=65_536, sae_width=2304, sae_k=32, eval_tokens=65_536, eval_windows=176, cc_k=32,
                      dict_tokens=1_048_576, dict_batch=1024, lr_decay_frac=1.0, aux_frac=0.25, sweep_tokens=131_072,
                      seeds=2, relu_crosscoder=True),
    "paper": Sizes(model="smollm2-135m", layers="all", train_tokens=1_000_000, heldout_tokens=65_536,
                   score_tokens=65_536, sae_width=2304, sae_k=32, eval_tokens=65_536, eval_windows=176, cc_k=64,
                   dict_tokens=4_000_000, dict_batch=4096, sweep_tokens=500_000, seeds=3, relu_crosscoder=True),
}
"""The presets' shared sizes, by preset name."""


@dataclass(frozen=True)
class Preset:
    """A named reproduction: shared sizes plus each study's config."""

    name: str
    sizes: Sizes
    studies: Mapping[str, Any] = field(default_factory=dict)
    """study name -> that study's frozen config at this preset."""

    def config(self, study: str):
        """The config of ``study`` at this preset."""
        if study not in self.studies:
            raise CrosslayerError(f"preset {self.name!r} has no config for study {study!r}")
        return self.studies[study]

    def record(self) -> dict:
        """What ``<out>/preset.json`` holds (JSON types only)."""
        return {"preset": self.name, **asdict(self.sizes),
                "studies": {name: asdict(cfg) for name, cfg in self.studies.items()}}


def preset_names() -> list[str]:
    return list(SIZES)


def get_preset(name: str) -> Preset:
    """The preset ``name``: its sizes and every registered study's config for it."""
    from studies import all_studies

    if name not in SIZES:
        raise CrosslayerError(f"unknown preset {name!r}; use one of {', '.join(SIZES)}")
    return Preset(name, SIZES[name], {s.name: s.config_for(name) for s in all_studies()})
