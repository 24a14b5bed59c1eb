"""Training a crosscoder from an iterator of ``[batch, layer, d_model]`` batches, with exact resume.

Method (Lindsey et al. 2024 and the Anthropic Jan 2025 update for the schedule; Gao et al. 2024
for dead latents; research-notes §3):
1. Build the crosscoder (seeded init) and, at step 0, calibrate its biases on the first batch
   (:meth:`Crosscoder.calibrate_`); that batch is also the first training batch.
2. Each step: lr = lr_max * warm-up ramp (``lr_warm_up_steps``) * linear decay to 0 over the last
   ``lr_decay_steps``; lambda ramps linearly from 0 over ``sparsity_warm_up_steps``. Loss
   (:meth:`Crosscoder.loss`), backward, gradient-norm clipping, Adam. No decoder renormalisation
   is needed: every penalty and TopK score is weighted by the decoder norms, so rescaling a
   decoder row cannot buy lower loss.
3. Dead latents: tokens since each latent last fired; a latent silent for ``dead_after_tokens``
   is dead (feeds AuxK). BatchTopK updates its inference threshold after each step.
4. A non-finite loss stops the run before the optimiser step with a CrosslayerError; the last
   good checkpoint is left untouched.
5. Every ``checkpoint_every`` steps ``out_dir/checkpoint.pt`` is written atomically: weights,
   Adam state, step, dead-latent counters, RNG state, and the data position (= batches consumed).
   A rerun with the same arguments resumes from it; ``make_batches(start_step)`` (or skipping
   that many batches of a re-created iterator) restores the data stream, so on CPU the resumed run
   ends with bit-identical weights. At the end the crosscoder is saved to ``out_dir``
   (``cfg.json`` with status complete, the training config, the log) and the checkpoint removed.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.dictionary import CFG_FILENAME, read_cfg, store_provenance
from crosslayer.errors import CrosslayerError
from crosslayer.io import atomic_path, write_csv

CHECKPOINT = "checkpoint.pt"
DEFAULT_SPARSITY_COEF = {"relu": 5.0, "standard": 5.0, "jumprelu": 1.0}
"""Default sparsity coefficient by activation: the L1 coefficient of ReLU (crosscoder ``relu``, sae-lens
``standard``) and the L0 / tanh coefficient of JumpReLU. TopK and BatchTopK take none."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of a crosscoder run (saved in ``cfg.json["training"]``)."""

    steps: int
    """Optimiser steps (tokens = steps * batch size)."""
    lr: float = 3e-4
    """Peak Adam learning rate."""
    lr_warm_up_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_decay_steps: int | None = None
    """Linear decay to 0 over the last steps; None = the last 20 %."""
    sparsity_coef: float | None = None
    """lambda for ReLU (default 5) and JumpReLU (default 1); unused by TopK / BatchTopK."""
    sparsity_warm_up_steps: int | None = None
    """Linear ramp of lambda from 0; None = the first 5 % of steps."""
    grad_clip: float = 1.0
    """Maximum global gradient norm (0 = no clipping)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    dead_after_tokens: int = 10_000_000
    """A latent silent for this many tokens is dead (Gao et al.)."""
    checkpoint_every: int = 1000
    """Steps between atomic checkpoints."""
    log_every: int = 50
    """Steps between log rows (and progress-bar updates)."""
    bf16: bool = False
    """bfloat16 autocast for the forward pass (slow on CPUs without AVX512-BF16)."""
    seed: int = 0
    """Seeds the crosscoder init."""

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0:
            raise CrosslayerError(f"need steps >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.dead_after_tokens < 1:
            raise CrosslayerError("checkpoint_every, log_every and dead_after_tokens must be >= 1")
        if self.grad_clip < 0 or (self.sparsity_coef is not None and self.sparsity_coef < 0):
            raise CrosslayerError("grad_clip and sparsity_coef must be >= 0")

    def lr_at(self, step: int) -> float:
        decay = self.lr_decay_steps if self.lr_decay_steps is not None else self.steps // 5
        warm = min(1.0, (step + 1) / self.lr_warm_up_steps) if self.lr_warm_up_steps else 1.0
        left = self.steps - step
        return self.lr * warm * (min(1.0, left / decay) if decay else 1.0)

    def sparsity_at(self, step: int, activation: str) -> float:
        coef = self.sparsity_coef if self.sparsity_coef is not None else DEFAULT_SPARSITY_COEF.get(activation, 0.0)
        warm = self.sparsity_warm_up_steps if self.sparsity_warm_up_steps is not None else self.steps // 20
        return coef * (min(1.0, (step + 1) / warm) if warm else 1.0)


def default_dead_after(tokens: int, batch_size: int) -> int:
    """Dead-latent window for a run of ``tokens``: Gao et al.'s 10M tokens, but at most a tenth of
    the run (and at least one batch), so that short runs also switch AuxK on for silent latents."""
    return int(min(10_000_000, max(batch_size, tokens // 10)))


def _batch_fvu(x_BLD: Tensor, recon_BLD: Tensor) -> float:
    """Mean over layers of SSE_l / sum_d Var(x_d) on one batch."""
    x, r = x_BLD.float(), recon_BLD.detach().float()
    var_L = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    return float(((x - r).pow(2).sum(dim=(0, 2)) / var_L.clamp_min(1e-12)).mean())


def _plan(cfg: TrainConfig, model_cfg: CrosscoderConfig) -> dict:
    return {"crosscoder": json.loads(json.dumps(asdict(model_cfg))), "training": json.loads(json.dumps(asdict(cfg)))}


def _save_checkpoint(path: Path, model, optim, state: dict, plan: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "plan": plan,
                    "rng": torch.get_rng_state(), **state}, tmp)


def train_crosscoder(cfg: TrainConfig, model_cfg: CrosscoderConfig,
                     batches: Iterable[Tensor] | Callable[[int], Iterator[Tensor]], *, out_dir: str | Path,
                     hooks: list[str] | None = None, norm_factors=None, meta: dict | None = None,
                     device: str = "cpu", progress: bool = True) -> Crosscoder:
    """Train a crosscoder on ``[batch, L, d]`` normalised batches into ``out_dir`` (module docstring).

    ``batches`` is an iterable, or ``make_batches(start_step)`` returning the stream from that step.
    A rerun with the same arguments resumes from ``out_dir/checkpoint.pt``; a finished ``out_dir``
    is loaded and returned.
    """
    out = Path(out_dir)
    plan = _plan(cfg, model_cfg)
    if (out / CFG_FILENAME).is_file():
        done = read_cfg(out)
        if done.get("status") == "complete" and {k: done.get(k) for k in plan} == plan:
            return Crosscoder.load(out, device=device)
        raise CrosslayerError(f"{out} holds a different crosscoder; choose another out_dir or delete that folder")
    model = Crosscoder(model_cfg, hooks=hooks, norm_factors=norm_factors, meta=meta, seed=cfg.seed).to(device)
    # fused: one kernel over all parameters (12x faster than the per-tensor loop on a 2-core CPU)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, fused=True)
    since_fired_F = torch.zeros(model_cfg.n_features, dtype=torch.int64, device=device)
    step, log = 0, []
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["plan"] != plan:
            raise CrosslayerError(f"{ckpt_path} is from a different run; use the same arguments or another out_dir")
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
        step, log, since_fired_F = ckpt["step"], ckpt["log"], ckpt["since_fired"].to(device)
    stream = iter(batches(step) if callable(batches) else itertools.islice(batches, step, None))
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"crosscoder {model_cfg.activation}", unit="step",
               disable=not progress)
    start_time, start_step, last_good = time.perf_counter(), step, step
    n_tokens = 0
    while step < cfg.steps:
        try:
            x_BLD = next(stream).to(device=device, dtype=torch.float32)
        except StopIteration:
            raise CrosslayerError(f"the batch iterator ran out after {step} of {cfg.steps} steps; pass an endless "
                                  "iterator (epochs=None) or fewer steps") from None
        model.check_acts(x_BLD)
        if step == 0:
            model.calibrate_(x_BLD)
        for group in optim.param_groups:
            group["lr"] = cfg.lr_at(step)
        dead_F = since_fired_F >= cfg.dead_after_tokens
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            res = model.loss(x_BLD, sparsity_coef=cfg.sparsity_at(step, model_cfg.activation), dead_F=dead_F)
        if not torch.isfinite(res.loss):
            bar.close()
            kept = f"the last good checkpoint (step {last_good}) is kept in {ckpt_path}" if ckpt_path.is_file() \
                else "no checkpoint was written yet"
            raise CrosslayerError(f"training loss became {float(res.loss.detach())} at step {step}; {kept}; "
                                  "check the data for non-finite values or lower lr")
        optim.zero_grad(set_to_none=True)
        res.loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        fired_F = (res.feats_BF != 0).any(0)
        since_fired_F = torch.where(fired_F, 0, since_fired_F + x_BLD.shape[0])
        if model_cfg.activation == "batchtopk":
            model.update_threshold_(res.feats_BF)
        step += 1
        n_tokens += x_BLD.shape[0]
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "loss": float(res.loss.detach()), **{k: float(v) for k, v in res.losses.items()},
                   "fvu": _batch_fvu(x_BLD, res.recon_BLD), "l0": float((res.feats_BF != 0).sum(1).float().mean()),
                   "dead_frac": float(dead_F.float().mean()), "lr": cfg.lr_at(step - 1)}
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3g}", fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}",
                            dead=f"{row['dead_frac']:.2f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save_checkpoint(ckpt_path, model, optim, {"step": step, "log": log, "since_fired": since_fired_F}, plan)
            last_good = step
    bar.close()
    seconds = time.perf_counter() - start_time
    model.meta.update({**plan, "status": "complete", "steps": cfg.steps,
                       "dead_frac_final": float((since_fired_F >= cfg.dead_after_tokens).float().mean()),
                       "tokens_per_s_last_session": round(n_tokens / max(seconds, 1e-9), 1),
                       "resumed_from_step": start_step or None})
    if log:
        import pandas as pd

        write_csv(pd.DataFrame(log), out / "train_log.csv")
    model.save(out)
    ckpt_path.unlink(missing_ok=True)
    return model


def train_crosscoder_from_store(store, *, out_dir: str | Path, width: int, k: int = 32, variant: str = "acausal",
                                activation: str = "topk", tokens: int, batch_size: int = 4096, lr: float = 3e-4,
                                sparsity: str = "l1_norms", sparsity_coef: float | None = None, window: int = 2,
                                layers: list[int] | None = None, checkpoint_every: int = 1000, bf16: bool = False,
                                dead_after_tokens: int | None = None, seed: int = 0, device: str = "cpu",
                                progress: bool = True) -> Crosscoder:
    """Train a crosscoder on ``store``'s normalised rows (an endless, seeded, token-shuffled stream).

    ``dead_after_tokens`` None = :func:`default_dead_after` of the run's token budget.
    """
    from crosslayer.store import ActivationStore

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    layers = store.layers if layers is None else [int(l) for l in layers]
    missing = [l for l in layers if l not in store.layers]
    if missing:
        raise CrosslayerError(f"layers {missing} are not in store {store.path} (it has {store.layers})")
    if tokens < batch_size:
        raise CrosslayerError(f"tokens ({tokens}) must be >= batch_size ({batch_size})")
    idx = [store.layers.index(l) for l in layers]
    model_cfg = CrosscoderConfig(layers=tuple(layers), d_model=store.width, n_features=width, variant=variant,
                                 window=window, activation=activation, k=k, sparsity=sparsity)
    cfg = TrainConfig(steps=tokens // batch_size, lr=lr, sparsity_coef=sparsity_coef,
                      checkpoint_every=checkpoint_every, bf16=bf16, seed=seed,
                      dead_after_tokens=dead_after_tokens or default_dead_after(tokens, batch_size))
    buffer = max(2 * batch_size, 8192)

    def make_batches(start_step: int) -> Iterator[Tensor]:
        stream = store.iter_batches(batch_size, layers=layers, normalized=True, seed=seed, epochs=None,
                                    buffer_rows=buffer)
        return itertools.islice(stream, start_step, None)

    provenance = {k_: v for k_, v in store_provenance(store).items() if k_ != "path"}
    meta = {"store": provenance, "store_path": str(store.path)}
    return train_crosscoder(cfg, model_cfg, make_batches, out_dir=out_dir,
                            hooks=[store.hooks[i] for i in idx],
                            norm_factors=[float(store.norm_factors[i]) for i in idx], meta=meta, device=device,
                            progress=progress)
