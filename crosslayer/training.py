"""Training a crosscoder from an iterator of ``[batch, layer, d_model]`` batches (or from an activation
store), with exact resume.

Method (Lindsey et al. 2024 and the Anthropic Jan 2025 update for the schedule; Gao et al. 2024
for dead latents; research-notes §3):
1. Build the crosscoder (seeded init) and, at step 0, calibrate its biases on the first batch
   (:meth:`Crosscoder.calibrate_`); that batch is also the first training batch.
2. Each step: lr = lr_max * warm-up ramp (``lr_warm_up_steps``) * linear decay to 0 over the last
   ``lr_decay_steps``; lambda ramps linearly from 0 over ``sparsity_warm_up_steps`` (default: the
   first 5 % of the run for ReLU, the whole run for JumpReLU, ``sparsity_warm_up_frac``). Loss
   (:meth:`Crosscoder.loss`), backward, gradient-norm clipping, Adam. No decoder renormalisation
   is needed: every penalty and TopK score is weighted by the decoder norms, so rescaling a
   decoder row cannot buy lower loss.
3. Dead latents: tokens since each latent last fired; a latent silent for ``dead_after_tokens``
   is dead (feeds AuxK). BatchTopK updates a running threshold after each step; at the end the
   inference threshold is calibrated with the final weights on the stream's next 4096 rows (held
   out from training), so that inference L0 matches training's k (``meta["batchtopk"]`` reports both
   L0s and the running estimate's).
4. A non-finite loss stops the run before the optimiser step with a CrosslayerError; the last
   good checkpoint is left untouched.
5. The run claims ``out_dir`` first (:func:`crosslayer.io.claim_folder`: ``cfg.json`` holds the plan,
   i.e. architecture and training config, with status "training"); a folder of another plan is
   refused, a finished one (status "complete", same plan) is loaded instead of trained.
   Every ``checkpoint_every`` steps ``out_dir/checkpoint.pt`` is written atomically: weights,
   Adam state, step, dead-latent counters, RNG state, and the data position (= batches consumed).
   A rerun with the same arguments resumes from it; ``make_batches(start_step)`` (or skipping
   that many batches of a re-created iterator) restores the data stream, so on CPU the resumed run
   ends with bit-identical weights. At the end the crosscoder is saved to ``out_dir`` (``cfg.json``
   overwritten with status complete, the training config, the log) and the checkpoint removed.
6. The log's ``fvu`` is :func:`crosslayer.evals.fvu` of the batch, averaged over layers;
   ``sparsity_coef`` is the step's lambda.
7. Several processes (``mesh``, :mod:`crosslayer.distributed`): each data rank trains on its part of every
   global batch, gradients are averaged, firing statistics and BatchTopK's selection reduced, TopK crosscoders
   optionally sharded along the features; checkpoints hold the full state (rank 0 writes), so a run resumes on
   any number of ranks with the same weights as one process, to float tolerance.
8. Transcoders (:class:`~crosslayer.clt.CLTConfig`) map input rows to other target rows: their batches are
   ``(input_BLD, target_BLD)`` pairs, token-aligned (:func:`crosslayer.transcoder_data.pair_batches`), the
   held-out set a pair too, and the loss and FVU are against the target. Everything else is as above.
9. Decoder-norm profiles over training (dictionaries whose latents write several layers; not per-layer SAE
   stacks): at each of :attr:`TrainConfig.profile_steps` (step 0 after calibration, then :data:`PROFILE_POINTS`
   steps evenly spaced over the run, the last one the final step) the per-feature per-layer decoder norms
   (:meth:`Dictionary.decoder_norms`, gathered across a latent group) are kept as float16. They travel in the
   checkpoint like the curve, so a resumed run keeps those taken before its checkpoint and retakes, bit-identical,
   those taken after it; the finished run writes them to ``out_dir/profile_snapshots.npz``
   (:func:`read_profile_snapshots`). A tidy CSV would need one row per (snapshot, feature, layer), millions at the
   paper preset; the array takes 2 bytes per (feature, layer): 74 kB per snapshot at the standard preset, 4 MB at
   the paper preset's 30 layers, far below the checkpoint's weights; one norm over the decoder costs less than a step.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from crosslayer import distributed
from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.dictionary import CFG_FILENAME, Dictionary, load_dictionary, store_provenance
from crosslayer.errors import CrosslayerError
from crosslayer.evals import fvu
from crosslayer.io import atomic_path, claim_folder, release_folder, write_csv

CHECKPOINT = "checkpoint.pt"
DEFAULT_SPARSITY_COEF = {"relu": 5.0, "standard": 5.0, "jumprelu": 1.0}
"""Default sparsity coefficient by activation: the L1 coefficient of ReLU (crosscoder ``relu``, sae-lens
``standard``) and the L0 / tanh coefficient of JumpReLU. TopK and BatchTopK take none."""
DEFAULT_SPARSITY_WARM_UP_FRAC = {"relu": 0.05, "jumprelu": 1.0}
"""Default share of the run over which lambda ramps linearly from 0, by activation: each follows the recipe
whose loss it uses. ReLU with the L1-of-norms penalty: the first 5 % of steps (Anthropic, Circuits
Updates April 2024, the recipe of the crosscoders paper); JumpReLU with the tanh penalty and the
pre-activation loss: the whole run (Anthropic, Circuits Updates January 2025: lambda_S ramps
linearly from 0 over all of training)."""


CURVE_POINTS = 10
"""Rows of a run's training curve when ``log_every`` is not given (plus the last step)."""
CONVERGED_REL_GAIN = 0.02
"""A dictionary has converged when its held-out FVU fell by less than this share over the last quarter of
its tokens (:func:`convergence`)."""

PROFILE_POINTS = 10
"""Decoder-norm snapshots of a run after step 0 (:attr:`TrainConfig.profile_steps`; module docstring, step 9)."""
PROFILE_SNAPSHOTS = "profile_snapshots.npz"
"""File of a finished run's decoder-norm snapshots (:func:`read_profile_snapshots`)."""

CALIBRATION_ROWS = 4096
"""BatchTopK: rows (whole batches, at least one) drawn from the stream after training to calibrate the
inference threshold. On the tests' small synthetic set, the threshold of one 256-row batch varied by
18 % (s.d.) between batches; the noise falls as 1 / sqrt(rows)."""


class TrainingDiverged(CrosslayerError):
    """The held-out FVU rose above ``TrainConfig.diverge_factor`` times its best: the run stopped (its last
    checkpoint is kept); retrain with a lower learning rate."""


def default_dead_after(tokens: int, batch_size: int) -> int:
    """Dead-latent window for a run of ``tokens``: Gao et al.'s 10M tokens, but at most a tenth of
    the run (and at least one batch), so that short runs also switch AuxK on for silent latents."""
    return int(min(10_000_000, max(batch_size, tokens // 10)))


@dataclass(frozen=True)
class TrainConfig:
    """Budget and optimisation of a crosscoder run (saved in ``cfg.json["training"]``); the one
    source of crosscoder-training defaults."""

    tokens: int
    """Training tokens; the run takes ``tokens // batch_size`` optimiser steps."""
    batch_size: int = 4096
    """Rows per optimiser step."""
    lr: float = 1e-3
    """Peak Adam learning rate (the reproduction's studies sweep it per approach)."""
    lr_warm_up_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_decay_steps: int | None = None
    """Linear decay to 0 over the last steps; None = the last ``lr_decay_frac`` of the run."""
    lr_decay_frac: float = 0.2
    """Share of the steps the linear decay to 0 takes when ``lr_decay_steps`` is None: 0.2 = the last 20 %
    (Anthropic's schedule), 1.0 = a straight line from the peak to 0 over the whole run (after warm-up)."""
    sparsity_coef: float | None = None
    """lambda for ReLU (default 5) and JumpReLU (default 1); unused by TopK / BatchTopK."""
    sparsity_warm_up_steps: int | None = None
    """Linear ramp of lambda from 0 over this many steps; None = ``sparsity_warm_up_frac`` of the run."""
    sparsity_warm_up_frac: float | None = None
    """Used when ``sparsity_warm_up_steps`` is None: lambda ramps linearly from 0 over this fraction of the
    steps; 1.0 = over the whole run (Anthropic's January 2025 schedule), 0 = no ramp. None = by activation
    (:data:`DEFAULT_SPARSITY_WARM_UP_FRAC`: ReLU 0.05, JumpReLU 1.0)."""
    grad_clip: float = 1.0
    """Maximum global gradient norm (0 = no clipping)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    dead_after_tokens: int | None = None
    """A latent silent for this many tokens is dead (Gao et al.); None = :func:`default_dead_after`."""
    checkpoint_every: int = 1000
    """Steps between atomic checkpoints."""
    log_every: int | None = None
    """Steps between rows of the training curve (``train_log.csv``; held-out FVU too when a held-out set is
    given) and progress-bar updates; None = :data:`CURVE_POINTS` rows over the run."""
    bf16: bool = False
    """bfloat16 autocast for the forward pass (slow on CPUs without AVX512-BF16)."""
    seed: int = 0
    """Seeds the crosscoder init and the order of a store's rows."""
    diverge_factor: float | None = 1.5
    """Stop with :class:`TrainingDiverged` when a curve row's held-out FVU exceeds this multiple of the lowest
    held-out FVU so far (runs with a held-out set only; None: never). A learning rate that looked best on a
    short sweep run can blow up later (the standard preset's first crosscoder did, the AuxK term of its dead latents
    growing: ``paper/standard-results/lr_diverged.csv``)."""

    def __post_init__(self):
        if not self.tokens >= self.batch_size >= 1:
            raise CrosslayerError(f"need tokens >= batch_size >= 1, got tokens={self.tokens}, "
                                  f"batch_size={self.batch_size}; raise tokens or lower batch_size")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CrosslayerError(f"lr must be finite and > 0, got {self.lr}")
        if self.checkpoint_every < 1 or self.log_interval < 1 or self.dead_after < 1:
            raise CrosslayerError("checkpoint_every, log_every and dead_after_tokens must be >= 1")
        if self.grad_clip < 0 or (self.sparsity_coef is not None and self.sparsity_coef < 0):
            raise CrosslayerError("grad_clip and sparsity_coef must be >= 0")
        if self.diverge_factor is not None and not self.diverge_factor > 1:
            raise CrosslayerError(f"diverge_factor must be > 1 or None, got {self.diverge_factor}")
        if not 0 <= self.lr_decay_frac <= 1:
            raise CrosslayerError(f"lr_decay_frac must be in [0, 1], got {self.lr_decay_frac}")
        if self.sparsity_warm_up_frac is not None and not 0 <= self.sparsity_warm_up_frac <= 1:
            raise CrosslayerError(f"sparsity_warm_up_frac must be in [0, 1], got {self.sparsity_warm_up_frac}")

    @property
    def steps(self) -> int:
        """Optimiser steps: ``tokens // batch_size``."""
        return self.tokens // self.batch_size

    @property
    def log_interval(self) -> int:
        """``log_every`` resolved: the value given, else the run split into :data:`CURVE_POINTS` rows."""
        return self.log_every if self.log_every is not None else max(1, self.steps // CURVE_POINTS)

    @property
    def dead_after(self) -> int:
        """``dead_after_tokens`` resolved: the value given, else :func:`default_dead_after` of the budget."""
        given = self.dead_after_tokens
        return given if given is not None else default_dead_after(self.tokens, self.batch_size)

    @property
    def profile_steps(self) -> list[int]:
        """Steps after which the decoder norms are kept (module docstring, step 9): 0 (after calibration) and
        :data:`PROFILE_POINTS` evenly spaced steps ending at the last (fewer when the run is shorter)."""
        return sorted({0} | {i * self.steps // PROFILE_POINTS for i in range(1, PROFILE_POINTS + 1)})

    def lr_at(self, step: int) -> float:
        decay = self.lr_decay_steps if self.lr_decay_steps is not None else int(self.steps * self.lr_decay_frac)
        warm = min(1.0, (step + 1) / self.lr_warm_up_steps) if self.lr_warm_up_steps else 1.0
        left = self.steps - step
        return self.lr * warm * (min(1.0, left / decay) if decay else 1.0)

    def sparsity_warm_up(self, activation: str) -> int:
        """Steps of the linear lambda ramp: ``sparsity_warm_up_steps``, else ``sparsity_warm_up_frac``
        (default by activation) of the run."""
        if self.sparsity_warm_up_steps is not None:
            return self.sparsity_warm_up_steps
        frac = self.sparsity_warm_up_frac
        frac = DEFAULT_SPARSITY_WARM_UP_FRAC.get(activation, 0.0) if frac is None else frac
        return int(frac * self.steps)  # floor: 0.05 gives steps // 20 as before

    def sparsity_at(self, step: int, activation: str) -> float:
        coef = self.sparsity_coef if self.sparsity_coef is not None else DEFAULT_SPARSITY_COEF.get(activation, 0.0)
        warm = self.sparsity_warm_up(activation)
        return coef * (min(1.0, (step + 1) / warm) if warm else 1.0)


def _architecture(model_cfg) -> tuple[str, type]:
    """The plan key and the trainable class of an architecture config (crosscoder or per-layer SAE stack)."""
    from crosslayer.clt import CLTConfig, CrossLayerTranscoder
    from crosslayer.sae_stack import SAEStack, SAEStackConfig

    if isinstance(model_cfg, SAEStackConfig):
        return "sae_stack", SAEStack
    if isinstance(model_cfg, CLTConfig):
        return "clt", CrossLayerTranscoder
    if isinstance(model_cfg, CrosscoderConfig):
        return "crosscoder", Crosscoder
    raise CrosslayerError(f"cannot train a {type(model_cfg).__name__}; give a CrosscoderConfig, SAEStackConfig or "
                          "CLTConfig")


NOT_IN_PLAN = ("diverge_factor",)
"""TrainConfig fields that cannot change a finished run's weights (a run either finishes or stops), left out of
the plan a folder is claimed with, so that changing them does not orphan finished or resumable runs."""


ADDED_AT_DEFAULT = {"aux_frac": 1.0}
"""Architecture fields added after folders were written, with the value every older folder trained with: a record
without the field counts as having it (such a folder still resumes and is reused when finished)."""
TRAINING_ADDED_AT_DEFAULT = {"lr_decay_frac": 0.2}
"""The same for :class:`TrainConfig` fields (the plan's ``training`` part)."""


def _added_defaults(plan: dict) -> dict:
    """Per part of a plan, the fields added after folders were written (:data:`ADDED_AT_DEFAULT`)."""
    return {next(iter(plan)): ADDED_AT_DEFAULT, "training": TRAINING_ADDED_AT_DEFAULT}


def _with_added_defaults(plan: dict) -> dict:
    """A recorded plan with :data:`ADDED_AT_DEFAULT` filled into its architecture part (the first key) and
    :data:`TRAINING_ADDED_AT_DEFAULT` into its training part."""
    return {**plan, **{part: {**added, **plan.get(part, {})} for part, added in _added_defaults(plan).items()}}


def _plan(cfg: TrainConfig, model_cfg) -> dict:
    training = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_PLAN}
    return {_architecture(model_cfg)[0]: json.loads(json.dumps(asdict(model_cfg))),
            "training": json.loads(json.dumps(training))}


def convergence(log, *, rel_gain: float = CONVERGED_REL_GAIN) -> dict:
    """Whether a run converged, from its curve (``train_log.csv`` rows with ``tokens`` and ``heldout_fvu``):
    the held-out FVU at the end vs at three quarters of the run's tokens (interpolated linearly between the
    curve's rows around it, so the comparison spans exactly the last quarter); converged when it moved by less
    than ``rel_gain`` of the earlier value (a rise counts as movement); None when the curve has no row at or
    before three quarters. Without held-out rows every field but ``converged`` (None) is NaN."""
    import numpy as np
    import pandas as pd

    curve = pd.DataFrame(log)
    nan = float("nan")
    if "heldout_fvu" not in curve or curve.heldout_fvu.isna().all():
        return {"final_fvu": nan, "fvu_three_quarters": nan, "rel_gain_last_quarter": nan, "converged": None}
    curve = curve.dropna(subset=["heldout_fvu"]).sort_values("tokens")
    final, quarter = float(curve.heldout_fvu.iloc[-1]), 0.75 * float(curve.tokens.iloc[-1])
    at = float(np.interp(quarter, curve.tokens.to_numpy(float), curve.heldout_fvu.to_numpy(float)))
    gain = (at - final) / at if at > 0 else 0.0
    judged = len(curve) > 1 and float(curve.tokens.iloc[0]) <= quarter  # a curve that starts later gives no verdict
    return {"final_fvu": final, "fvu_three_quarters": at, "rel_gain_last_quarter": gain,
            "converged": bool(abs(gain) < rel_gain) if judged else None}


def curve_verdict(folder: str | Path) -> dict | None:
    """:func:`convergence` of the training curve saved in ``folder`` (``train_log.csv``), by the current rule (a
    verdict recorded in ``cfg.json`` may predate it); None when the folder has no curve."""
    import pandas as pd

    path = Path(folder) / "train_log.csv"
    return convergence(pd.read_csv(path)) if path.is_file() else None


@dataclass
class _Run:
    """The state of a training run that a checkpoint holds (besides the RNG)."""

    model: Dictionary
    optim: torch.optim.Optimizer
    since_fired_F: Tensor
    step: int = 0
    log: list = field(default_factory=list)
    heldout: Tensor | tuple[Tensor, Tensor] | None = None
    """Normalised held-out rows (a transcoder: an (input, target) pair) for the curve's held-out FVU (not
    checkpointed: given again on resume)."""
    last_good: int = 0
    """Step of the last checkpoint written or resumed from."""
    n_tokens: int = 0
    """Tokens trained on in this session."""
    mesh: distributed.Mesh | None = None
    """This process's place among several (None: one process)."""
    snapshots: list = field(default_factory=list)
    """Decoder-norm snapshots taken so far: ``{"step", "tokens", "norms_FL"}`` (float16, CPU; module docstring,
    step 9)."""
    profiles: bool = False
    """Whether this run takes them (latents that write several layers)."""

    @classmethod
    def start(cls, model: Dictionary, cfg: TrainConfig, ckpt_path: Path, plan: dict, device: str,
              mesh: distributed.Mesh | None = None) -> "_Run":
        """Fresh state for ``model``, or the state of ``ckpt_path`` if a checkpoint of this plan is there."""
        # fused: one kernel over all parameters (12x faster than the per-tensor loop on a 2-core CPU)
        optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, fused=True)
        run = cls(model, optim, torch.zeros(model.n_features, dtype=torch.int64, device=device), mesh=mesh)
        if ckpt_path.is_file():
            # on the CPU: a rank of a latent group keeps only its slice on the device
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if _with_added_defaults(ckpt["plan"]) != plan:
                raise CrosslayerError(f"{ckpt_path} is from a different run; use the same arguments or another out_dir")
            _feature_major_encoder(ckpt, model)
            run.since_fired_F = distributed.load_full_state(model, optim, ckpt["model"], ckpt["optim"],
                                                            ckpt["since_fired"].to(device))
            torch.set_rng_state(ckpt["rng"])
            run.step, run.log = ckpt["step"], ckpt["log"]
            run.snapshots = ckpt.get("snapshots", [])  # checkpoints written before step 9 existed hold none
            run.last_good = run.step
        return run

    def checkpoint(self, path: Path, plan: dict) -> None:
        """Write the full state (gathered from every rank; rank 0 writes)."""
        model, optim, since_fired = distributed.full_state(self.model, self.optim, self.since_fired_F, self.mesh)
        if self.mesh is None or self.mesh.writer:
            with atomic_path(path) as tmp:
                torch.save({"model": model, "optim": optim, "plan": plan, "rng": torch.get_rng_state(),
                            "step": self.step, "log": self.log, "since_fired": since_fired,
                            "snapshots": self.snapshots}, tmp)
        self.last_good = self.step


def _feature_major_encoder(ckpt: dict, model) -> None:
    """A checkpoint written before the encoder parameter became feature-major (issue 13) brought to today's layout,
    in place: its ``W_enc`` ([..., d, F], as saved folders still hold it) and that parameter's Adam moments permuted
    into ``model.enc_param`` (a permutation: no value changes)."""
    name = model.enc_param
    if "W_enc" not in ckpt["model"]:
        return
    ckpt["model"][name] = ckpt["model"].pop("W_enc").permute(model.enc_from_saved)
    moments = ckpt["optim"]["state"].get([n for n, _ in model.named_parameters()].index(name), {})
    for key, value in moments.items():
        if key != "step":
            moments[key] = value.permute(model.enc_from_saved).contiguous()


def train_crosscoder(cfg: TrainConfig, model_cfg, batches: Iterable[Tensor] | Callable[[int], Iterator[Tensor]], *,
                     out_dir: str | Path, hooks: list[str] | None = None, norm_factors=None, meta: dict | None = None,
                     heldout: Tensor | tuple[Tensor, Tensor] | None = None, device: str = "cpu", progress: bool = True,
                     mesh: distributed.Mesh | None = None, sharded_batches: bool = False,
                     target_hooks: list[str] | None = None, target_norm_factors=None) -> Dictionary:
    """Train a crosscoder (``CrosscoderConfig``) or a stack of per-layer TopK SAEs (``SAEStackConfig``, the
    same trainer in every setting) on ``[batch, L, d]`` normalised batches into ``out_dir`` (module
    docstring); returns the saved dictionary (a stack loads as ``PerLayerSAEs``).

    ``batches`` is an iterable, or ``make_batches(start_step)`` returning the stream from that step;
    its batches should hold ``cfg.batch_size`` rows (``cfg.steps`` of them are used; BatchTopK calibrates
    its inference threshold on :data:`CALIBRATION_ROWS` more rows if the stream has them). ``heldout``
    (normalised ``[N, L, d]`` rows never trained on) adds held-out FVU to every curve row and the
    convergence verdict (:func:`convergence`) to the saved ``cfg.json``. A rerun with the same arguments
    resumes from ``out_dir/checkpoint.pt``; a finished ``out_dir`` is loaded and returned.

    ``mesh`` (:func:`crosslayer.distributed.init_mesh`): train as one rank of several; ``batches`` are then the
    global batches, of which this rank takes its part, or with ``sharded_batches`` already only its part.
    A transcoder (``CLTConfig``) takes ``(input, target)`` batches and held-out pair, and ``target_hooks`` /
    ``target_norm_factors`` (module docstring, step 8).
    """
    out, plan, (kind, cls) = Path(out_dir), _plan(cfg, model_cfg), _architecture(model_cfg)
    claimed = _claim(out, plan, mesh)
    if claimed is not None and claimed.get("status") == "complete":
        release_folder(out)
        return load_dictionary(out, device=device)
    distributed.batch_part(cfg.batch_size, mesh)  # a batch the data ranks cannot share fails before training
    targets = {} if target_hooks is None else {"target_hooks": target_hooks, "target_norm_factors": target_norm_factors}
    model = cls(model_cfg, hooks=hooks, norm_factors=norm_factors, meta=meta, seed=cfg.seed, **targets)
    model = distributed.prepare(model, mesh).to(device)
    ckpt_path = out / CHECKPOINT
    run = _Run.start(model, cfg, ckpt_path, plan, device, mesh)
    run.profiles = kind != "sae_stack" and len(model_cfg.layers) > 1
    run.heldout = None if heldout is None else _to(heldout, device)
    stream = iter(batches(run.step) if callable(batches) else itertools.islice(batches, run.step, None))
    if not sharded_batches and mesh is not None:
        stream = (_each(lambda t: distributed.rows_of(t, mesh), x) for x in stream)
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"{kind} {model_cfg.activation}",
               unit="step", disable=not progress or not (mesh is None or mesh.writer))
    start_time, start_step = time.perf_counter(), run.step
    try:
        while run.step < cfg.steps:
            x_BLD = _next_batch(stream, run.step, cfg.steps, device)
            _train_step(run, cfg, x_BLD, ckpt_path, bar)
            bar.update(1)
            if run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
                run.checkpoint(ckpt_path, plan)
    finally:
        bar.close()
    if model_cfg.activation == "batchtopk":
        model.meta["batchtopk"] = _calibrate_batchtopk(model, stream, x_BLD, device, mesh)
    run.model, run.since_fired_F = _whole(run, lambda: cls(model_cfg, hooks=hooks, norm_factors=norm_factors,
                                                           meta=meta, seed=cfg.seed))
    if mesh is None or mesh.writer:
        _save(run, cfg, plan, out, seconds=time.perf_counter() - start_time, start_step=start_step)
        release_folder(out)  # (a failed run keeps its lock until the process exits)
    distributed.barrier(mesh)
    return load_dictionary(out, device=device)


def _claim(out: Path, plan: dict, mesh: distributed.Mesh | None) -> dict | None:
    """:func:`claim_folder` for a training run; with several ranks, rank 0 claims (and holds the folder's lock) and
    the others read the record it found or wrote."""
    def claim():
        return claim_folder(out, plan, record=CFG_FILENAME, what="dictionary training", extra={"status": "training"},
                            defaults=_added_defaults(plan))  # as _with_added_defaults, for cfg.json

    if mesh is None:
        return claim()
    claimed = claim() if mesh.writer else None
    distributed.barrier(mesh)
    return claimed if mesh.writer else json.loads((out / CFG_FILENAME).read_text())  # rank 0 holds the lock


def _whole(run: _Run, rebuild: Callable[[], Dictionary]) -> tuple[Dictionary, Tensor]:
    """The trained dictionary and its since-fired counters, whole: the module itself, or (latent parallel) a
    dictionary rebuilt with the gathered weights (collective; on every rank)."""
    if not isinstance(run.model, distributed.ShardedCrosscoder):
        return run.model, run.since_fired_F
    state, _, since_fired_F = distributed.full_state(run.model, None, run.since_fired_F, run.mesh)
    whole = rebuild()
    whole.load_state_dict(state)
    return whole, since_fired_F


@torch.no_grad()
def _calibrate_batchtopk(model: Crosscoder, stream: Iterator[Tensor], last_BLD: Tensor, device: str,
                         mesh: distributed.Mesh | None = None) -> dict:
    """Replace BatchTopK's running threshold by one calibrated with the final weights
    (:meth:`Crosscoder.calibrate_threshold_`) on the stream's next batches (at least
    :data:`CALIBRATION_ROWS` rows), which training never saw. If the stream has ended, the last training
    batch is used instead: after a short run the last step's update lowers the scores of the batch it
    was computed on, so that batch gives a threshold that is too low elsewhere. Returns, on the
    calibration rows: mean L0 of training's batch selection, of inference with the new threshold
    (= k up to ties) and with the running EMA it replaces."""
    parts = list(itertools.islice(stream, max(1, -(-CALIBRATION_ROWS // distributed.global_rows(last_BLD, mesh)))))
    heldout = bool(parts)
    x_BLD = torch.cat([p.to(device=device, dtype=torch.float32) for p in parts]) if heldout else last_BLD

    def l0(feats_BF: Tensor) -> float:
        return float((feats_BF != 0).sum(1).float().mean())

    ema = {"threshold_ema": float(model.threshold), "inference_l0_ema": l0(model.encode_normalized(x_BLD))}
    model.calibrate_threshold_(x_BLD)
    return {"k": model.cfg.k, "rows": x_BLD.shape[0], "heldout": heldout,
            "train_l0": l0(model.loss(x_BLD).feats_BF), "inference_l0": l0(model.encode_normalized(x_BLD)),
            "threshold": float(model.threshold), **ema}


def _to(batch, device: str):
    """A batch (a tensor, or a transcoder's (input, target) pair) as float32 on ``device``."""
    if isinstance(batch, (tuple, list)):
        return tuple(t.to(device=device, dtype=torch.float32) for t in batch)
    return batch.to(device=device, dtype=torch.float32)


def _each(fn, batch):
    """``fn`` of a batch tensor, or of each tensor of an (input, target) pair."""
    return tuple(fn(t) for t in batch) if isinstance(batch, (tuple, list)) else fn(batch)


def _split(batch) -> tuple[Tensor, Tensor | None]:
    """``(input, target)`` of a batch; target None where the dictionary reconstructs its input."""
    return (batch[0], batch[1]) if isinstance(batch, tuple) else (batch, None)


def _loss(model: Dictionary, batch, **kwargs):
    """``model.loss`` of a batch: against its target when it has one (transcoders)."""
    x_BLD, y_BLD = _split(batch)
    return model.loss(x_BLD, **kwargs) if y_BLD is None else model.loss(x_BLD, target_BLD=y_BLD, **kwargs)


def _next_batch(stream: Iterator[Tensor], step: int, steps: int, device: str):
    try:
        return _to(next(stream), device)
    except StopIteration:
        raise CrosslayerError(f"the batch iterator ran out after {step} of {steps} steps; pass an endless "
                              "iterator (epochs=None) or fewer tokens") from None


def _train_step(run: _Run, cfg: TrainConfig, batch, ckpt_path: Path, bar) -> None:
    """One optimiser step on ``batch`` (calibrating the biases first at step 0); logs every ``log_every``."""
    model, activation = run.model, run.model.cfg.activation
    x_BLD, y_BLD = _split(batch)
    model.check_acts(x_BLD)
    if run.step == 0:
        targets = () if y_BLD is None else (distributed.gather_rows(y_BLD, run.mesh),)
        model.calibrate_(distributed.gather_rows(x_BLD, run.mesh), *targets)  # on the whole global batch
        _snapshot_profile(run, cfg, tokens=0)
    for group in run.optim.param_groups:
        group["lr"] = cfg.lr_at(run.step)
    dead_F = run.since_fired_F >= cfg.dead_after
    with torch.autocast(device_type=x_BLD.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        res = _loss(model, batch, sparsity_coef=cfg.sparsity_at(run.step, activation), dead_F=dead_F)
    loss = distributed.mean_over_data(res.loss.detach(), run.mesh)  # every rank stops, or none
    if not torch.isfinite(loss):
        kept = f"the last good checkpoint (step {run.last_good}) is kept in {ckpt_path}" if ckpt_path.is_file() \
            else "no checkpoint was written yet"
        raise TrainingDiverged(f"training loss became {float(loss)} at step {run.step}; {kept}; "
                              "check the data for non-finite values or lower lr")
    run.optim.zero_grad(set_to_none=True)
    res.loss.backward()
    distributed.reduce_grads_(model, run.mesh)
    if cfg.grad_clip:
        distributed.clip_grad_norm_(model, cfg.grad_clip, run.mesh)
    run.optim.step()
    rows = distributed.global_rows(x_BLD, run.mesh)
    run.since_fired_F = torch.where(distributed.fired_anywhere(res.fired_F, run.mesh), 0, run.since_fired_F + rows)
    if activation == "batchtopk":
        model.update_threshold_(res.feats_BF)
    run.step += 1
    run.n_tokens += rows
    _snapshot_profile(run, cfg, tokens=run.step * rows)
    if run.step % cfg.log_interval == 0 or run.step == cfg.steps:
        row = _log_row(run, cfg, res, x_BLD if y_BLD is None else y_BLD, dead_F)
        run.log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3g}", fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}",
                        dead=f"{row['dead_frac']:.2f}")
        if run.heldout is not None:
            _check_divergence(run.log, cfg)


@torch.no_grad()
def _snapshot_profile(run: _Run, cfg: TrainConfig, *, tokens: int) -> None:
    """Keep the decoder norms ``[F, L]`` of the dictionary as it stands after ``run.step`` steps when the run takes
    profiles and that step is one of ``cfg.profile_steps`` (module docstring, step 9)."""
    if not run.profiles or run.step not in cfg.profile_steps:
        return
    model = run.model
    if isinstance(model, distributed.ShardedCrosscoder):  # this rank's features: gather the latent group's
        norms_FL = distributed.all_gather(model.W_dec_masked().detach().norm(dim=-1), run.mesh.latent_group)
    else:
        norms_FL = model.decoder_norms()
    run.snapshots.append({"step": run.step, "tokens": tokens, "norms_FL": norms_FL.to("cpu", torch.float16)})


def _write_profile_snapshots(snapshots: list[dict], layers: list[int], path: Path) -> None:
    """Write the snapshots to ``path`` (npz, atomically): ``step`` and ``tokens`` [S], ``layers`` [L], ``norms``
    [S, F, L] float16."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a name
        np.savez(fh, step=np.array([s["step"] for s in snapshots], dtype=np.int64),
                 tokens=np.array([s["tokens"] for s in snapshots], dtype=np.int64), layers=np.asarray(layers),
                 norms=torch.stack([s["norms_FL"] for s in snapshots]).numpy())


class ProfileSnapshots(NamedTuple):
    """A finished run's decoder-norm snapshots (:func:`read_profile_snapshots`)."""

    step_S: np.ndarray
    tokens_S: np.ndarray
    layers: list[int]
    norms_SFL: np.ndarray
    """Per-feature per-layer decoder norms (normalised units, float16) after each step."""


def read_profile_snapshots(folder: str | Path) -> ProfileSnapshots:
    """The decoder-norm snapshots a training run wrote into ``folder`` (module docstring, step 9)."""
    path = Path(folder) / PROFILE_SNAPSHOTS
    if not path.is_file():
        raise CrosslayerError(f"no {PROFILE_SNAPSHOTS} in {folder}: not a finished multi-layer dictionary, or trained "
                              "before training kept decoder-norm snapshots; retrain it (delete the folder) to get them")
    with np.load(path) as z:
        return ProfileSnapshots(z["step"], z["tokens"], z["layers"].tolist(), z["norms"])


def _log_row(run: _Run, cfg: TrainConfig, res, target_BLD: Tensor, dead_F: Tensor) -> dict:
    """A row of the training curve after the step just taken (``target_BLD``: what the step reconstructed);
    batch statistics are means over the data ranks (the batch ``fvu`` a mean of the ranks' own)."""
    activation, names = run.model.cfg.activation, ["loss", *res.losses, "fvu", "l0"]
    values = [res.loss.detach(), *res.losses.values(), fvu(target_BLD, res.recon_BLD).mean(), torch.tensor(res.l0)]
    means = distributed.mean_over_data(torch.stack([v.float().to(target_BLD.device) for v in values]), run.mesh)
    return {"step": run.step, "tokens": run.step * distributed.global_rows(target_BLD, run.mesh),
            **dict(zip(names, means.tolist())), "heldout_fvu": _heldout_fvu(run.model, run.heldout),
            "dead_frac": distributed.dead_fraction(dead_F, run.model, run.mesh), "lr": cfg.lr_at(run.step - 1),
            "sparsity_coef": cfg.sparsity_at(run.step - 1, activation)}


def _check_divergence(log: list[dict], cfg: TrainConfig) -> None:
    """Raise :class:`TrainingDiverged` when the last held-out FVU is not finite or exceeds ``diverge_factor`` x
    the best so far (call it only for runs with a held-out set)."""
    held = [r["heldout_fvu"] for r in log]
    if cfg.diverge_factor is None or (math.isfinite(held[-1]) and held[-1] <= cfg.diverge_factor * min(held)):
        return
    raise TrainingDiverged(f"held-out FVU rose from {min(held):.3f} to {held[-1]:.3f} by step {log[-1]['step']} at "
                           f"lr {cfg.lr:g}; lower the learning rate")


@torch.no_grad()
def _heldout_fvu(model: Dictionary, heldout, chunk: int = 4096) -> float:
    """FVU (:func:`crosslayer.evals.fvu`, mean over layers) of the model's reconstruction of the held-out rows
    (of their targets, for a transcoder's (input, target) pair)."""
    if heldout is None:
        return float("nan")
    x_NLD, y_NLD = _split(heldout)
    target_NLD = x_NLD if y_NLD is None else y_NLD
    parts = zip(x_NLD.split(chunk), target_NLD.split(chunk))
    recon = torch.cat([_loss(model, x if y_NLD is None else (x, y)).recon_BLD for x, y in parts])
    return float(fvu(target_NLD, recon).mean())


def _save(run: _Run, cfg: TrainConfig, plan: dict, out: Path, *, seconds: float, start_step: int) -> None:
    """Write the curve and the finished dictionary (``cfg.json`` status complete, with the convergence
    verdict); drop the checkpoint."""
    run.model.meta.update({**plan, "status": "complete", "steps": cfg.steps, "convergence": convergence(run.log),
                           "dead_frac_final": float((run.since_fired_F >= cfg.dead_after).float().mean()),
                           "tokens_per_s_last_session": round(run.n_tokens / max(seconds, 1e-9), 1),
                           "resumed_from_step": start_step or None})
    if run.log:
        import pandas as pd

        write_csv(pd.DataFrame(run.log), out / "train_log.csv")
    if run.snapshots:
        _write_profile_snapshots(run.snapshots, list(run.model.layers), out / PROFILE_SNAPSHOTS)
    run.model.save(out)
    (out / CHECKPOINT).unlink(missing_ok=True)


HELDOUT_ROWS = 4096
"""Held-out rows behind a training curve's held-out FVU (a fixed, seeded sample of the held-out store)."""


def heldout_sample(store, layers: list[int], norm_factors, *, rows: int = HELDOUT_ROWS, seed: int = 12345) -> Tensor:
    """``rows`` rows of ``layers`` drawn without replacement from ``store`` (seeded), scaled by the training
    store's ``norm_factors`` (the dictionary's units): the held-out set of a training curve."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(store.n_rows, generator=gen)[:rows].sort().values.numpy()
    raw = store.get(idx, layers=layers, normalized=False)
    return raw * torch.as_tensor(norm_factors, dtype=torch.float32)[:, None]


def train_crosscoder_from_store(store, model_cfg, cfg: TrainConfig, *, out_dir: str | Path, heldout_store=None,
                                device: str = "cpu", progress: bool = True,
                                mesh: distributed.Mesh | None = None) -> Dictionary:
    """Train a crosscoder or per-layer SAE stack over ``model_cfg.layers`` of ``store`` (an ActivationStore or
    its folder) on its normalised rows: an endless, token-shuffled stream of ``cfg.batch_size`` rows seeded
    by ``cfg.seed``. ``heldout_store`` (same model and layers, other documents) gives the curve's held-out FVU
    on :data:`HELDOUT_ROWS` of its rows. With ``mesh``, each data rank reads only its part of every batch."""
    from crosslayer.store import ActivationStore

    def opened(s):
        return s if isinstance(s, ActivationStore) else ActivationStore(s)

    store = opened(store)
    chosen = store.select(list(model_cfg.layers))
    if model_cfg.d_model != store.width:
        raise CrosslayerError(f"d_model {model_cfg.d_model} != store width {store.width} ({store.path}); "
                              "set d_model to the store's width")
    store.verify()  # a corrupted store fails before out_dir is created (shards are hashed once per process)
    heldout = None
    if heldout_store is not None:
        held = opened(heldout_store)
        held.select(list(model_cfg.layers))
        held.verify()
        heldout = heldout_sample(held, list(model_cfg.layers), chosen.norm_factors)
    buffer = max(2 * cfg.batch_size, 8192)

    part = None if mesh is None else (mesh.data_rank, mesh.data_size)

    def make_batches(start_step: int) -> Iterator[Tensor]:
        stream = store.iter_batches(cfg.batch_size, layers=chosen.layers, normalized=True, seed=cfg.seed,
                                    epochs=None, buffer_rows=buffer, part=part)
        return itertools.islice(stream, start_step, None)

    provenance = {key: value for key, value in store_provenance(store).items() if key != "path"}
    return train_crosscoder(cfg, model_cfg, make_batches, out_dir=out_dir, hooks=chosen.hooks,
                            norm_factors=chosen.norm_factors, heldout=heldout,
                            meta={"store": provenance, "store_path": str(store.path)}, device=device, progress=progress,
                            mesh=mesh, sharded_batches=True)
