"""The per-layer SAE baseline: one sae-lens SAE per layer, behind the Dictionary interface.

Method (research-notes §2; Gao et al. 2024 for TopK, Bussmann et al. 2024 for BatchTopK,
Rajamanoharan et al. 2024 / Gemma Scope 2 for JumpReLU, Towards Monosemanticity 2023 for ReLU+L1):
1. For each layer l of the activation store, in order, build a sae-lens training SAE
   (``arch``: ``topk`` | ``batchtopk`` | ``jumprelu`` | ``standard``) with ``d_in = width`` and
   ``d_sae = width`` features, seeded with ``seed + layer``. ``normalize_activations`` is
   ``"none"``: the store already serves each layer normalised to mean norm sqrt(d)
   (``raw * norm_factor_l``), so the SAE trains in normalised units (step 3 folds them away).
2. Train it with sae-lens's ``SAETrainer`` (config: :func:`sae_lens_trainer_config`) on an endless,
   seeded, token-shuffled iterator of ``[batch, d]`` rows of that layer
   (``ActivationStore.iter_batches``), for ``tokens`` tokens, Adam at ``lr`` with linear warm-up and
   a linear decay to 0 over the last ``lr_decay_steps`` steps. The loop is :func:`fit`, which calls
   the trainer's public step seams exactly as ``SAETrainer.fit`` does without wandb, activation
   scaling or checkpoints, under our own progress bar. No wandb, no network.
3. Save it in RAW units with :func:`export_sae_lens` (via :func:`normalized_inference_weights`, sae-lens's
   own inference conversion: BatchTopK becomes JumpReLU, TopK's decoder-norm rescaling is folded) to
   ``out_dir/<hook_name>/``, written under a temporary name and renamed into place, then add
   ``sparsity.safetensors`` and the ``crosslayer_train.json`` sidecar of training statistics (written
   last: a folder without it is trained again). The store's factor ``f`` and the decoder norms are
   folded into the weights, so ``sae_lens.SAE.load_from_disk(out_dir/<hook_name>)`` takes the model's
   raw activations as they are (``normalize_activations`` is ``"none"``; do NOT call
   ``fold_activation_norm_scaling_factor``: ``f`` is recorded in the metadata as
   ``crosslayer_folded_norm_factor``, already folded).
4. Resume: ``out_dir`` is claimed with :func:`crosslayer.io.claim_folder` (``cfg.json`` with status
   ``training``: kind, units, layers, hooks, norm factors, store provenance, training config); a layer whose
   folder is complete is skipped on a rerun of the same command, so a killed run redoes at most the
   layer it was training. At the end ``cfg.json`` is rewritten with status ``complete`` and the
   per-layer statistics.

:class:`PerLayerSAEs` concatenates the L SAEs' features: feature block l (``widths[l]``
contiguous features) belongs to layer l, reads and writes only that layer (``writes_FL`` is one-hot
per feature), so ``decoder_norms()`` is block-diagonal and the total L0 is the sum of the per-layer L0s.
Each sae-lens SAE takes RAW activations (step 3); :class:`PerLayerSAEs` divides normalised inputs by the
layer's factor before calling it and multiplies its reconstructions back. A set's ``cfg.json`` records
``"units": "raw"``; sets saved before that (folders expecting normalised inputs) are refused by
:meth:`PerLayerSAEs.load` with the advice to retrain.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from crosslayer.dictionary import (CFG_FILENAME, Dictionary, meta_from_cfg, read_saved_cfg, register_dictionary,
                                   store_provenance)
from crosslayer.errors import CrosslayerError
from crosslayer.io import atomic_path, claim_folder, current_umask, release_folder, write_json
from crosslayer.training import DEFAULT_SPARSITY_COEF, default_dead_after

ARCHS = ("topk", "batchtopk", "jumprelu", "standard")
TRAIN_STATS = "crosslayer_train.json"
UNITS = "raw"
"""Format marker of a saved set (``cfg.json["units"]``): its sae-lens folders take raw activations."""
EXPORT_ARCHS = ("topk", "jumprelu", "standard")
"""The sae-lens inference architectures :func:`export_sae_lens` writes."""


@register_dictionary("per_layer_saes")
class PerLayerSAEs(Dictionary):
    """L sae-lens SAEs, one per layer, as one Dictionary with ``F = sum(widths)`` features.

    Each SAE takes its layer's RAW activations (``saes[i].encode(raw)``, ``saes[i].decode(feats)`` in raw
    units): normalised inputs are divided by the layer's factor first and reconstructions multiplied
    back, so ``encode(acts * f, normalized=True)`` equals ``encode(acts, normalized=False)`` (up to
    rounding)."""

    def __init__(self, saes: list, *, layers: list[int], hooks: list[str], norm_factors, meta: dict | None = None):
        if not saes or len({s.cfg.d_in for s in saes}) != 1:
            raise CrosslayerError("PerLayerSAEs needs at least one SAE, all with the same d_in")
        super().__init__(layers=layers, hooks=hooks, norm_factors=norm_factors, d_model=saes[0].cfg.d_in, meta=meta)
        if len(saes) != len(self.layers):
            raise CrosslayerError(f"{len(saes)} SAEs for {len(self.layers)} layers; give one SAE per layer")
        self.saes = nn.ModuleList(saes)
        self.widths = [int(s.cfg.d_sae) for s in saes]

    layerwise = True

    @property
    def n_features(self) -> int:
        return sum(self.widths)

    def reconstruct_layer(self, acts_ND: Tensor, index: int, *, normalized: bool = True) -> Tensor:
        factor = self.norm_factors[index].to(acts_ND)
        recon_ND = self.saes[index](acts_ND / factor if normalized else acts_ND)
        return recon_ND * factor if normalized else recon_ND

    def feature_layer(self) -> Tensor:
        """``[F]`` index (into ``layers``) of the layer each feature belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_layers), torch.tensor(self.widths))

    def writes_FL(self) -> Tensor:
        """One-hot ``[F, L]``: a feature writes its own layer only."""
        return torch.nn.functional.one_hot(self.feature_layer(), self.n_layers).bool()

    def reads_FL(self) -> Tensor:
        """One-hot ``[F, L]``: a feature reads its own layer only."""
        return self.writes_FL()

    def encode(self, acts_BLD: Tensor, *, normalized: bool = True) -> Tensor:
        """Feature activations; raw inputs go to the SAEs as they are (no round trip through ``f``)."""
        self.check_acts(acts_BLD)
        return self.encode_raw(self.denormalize(acts_BLD) if normalized else acts_BLD)

    def decode(self, feats_BF: Tensor, *, normalized: bool = True) -> Tensor:
        """Reconstruction, normalised (default) or raw as the SAEs give it with ``normalized=False``."""
        self.check_feats(feats_BF)
        recon_BLD = self.decode_raw(feats_BF)
        return self.normalize(recon_BLD) if normalized else recon_BLD

    def encode_raw(self, raw_BLD: Tensor) -> Tensor:
        """Raw activations ``[B, L, d]`` -> features: each SAE's ``encode`` on its layer."""
        return torch.cat([sae.encode(raw_BLD[:, i]) for i, sae in enumerate(self.saes)], dim=1)

    def decode_raw(self, feats_BF: Tensor) -> Tensor:
        """Features -> raw reconstruction ``[B, L, d]``: each SAE's ``decode`` of its block."""
        blocks = feats_BF.split(self.widths, dim=1)
        return torch.stack([sae.decode(f_BW) for sae, f_BW in zip(self.saes, blocks)], dim=1)

    def encode_normalized(self, acts_BLD: Tensor) -> Tensor:
        return self.encode_raw(self.denormalize(acts_BLD))

    def decode_normalized(self, feats_BF: Tensor) -> Tensor:
        return self.normalize(self.decode_raw(feats_BF))

    @torch.no_grad()
    def _raw_rows(self, index: int) -> Tensor:
        """``[W, d]`` float32: what one unit of each feature of SAE ``index`` adds to its raw reconstruction
        (``W_dec``, or its unit rows where sae-lens's ``rescale_acts_by_decoder_norm`` is set)."""
        sae = self.saes[index]
        rows = sae.W_dec.detach().float()
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return rows

    @torch.no_grad()
    def decoder_vectors_normalized(self, index: int) -> Tensor:
        """The SAE of ``layers[index]`` fills its own block (its raw decoder rows times the layer's factor),
        other rows are zero."""
        W_FD = torch.zeros(self.n_features, self.d_model)
        start = sum(self.widths[:index])
        W_FD[start:start + self.widths[index]] = self._raw_rows(index).cpu() * float(self.norm_factors[index])
        return W_FD

    @torch.no_grad()
    def decoder_norms(self) -> Tensor:
        """``[F, L]``: each feature's decoder norm at its own layer in normalised units, 0 elsewhere (1 for
        folders written by :func:`export_sae_lens`, which folds the norms into the feature values)."""
        norms = [self._raw_rows(i).norm(dim=-1) * self.norm_factors[i].to(self.saes[i].W_dec.device)
                 for i in range(self.n_layers)]
        out_FL = torch.zeros(self.n_features, self.n_layers, device=norms[0].device)
        out_FL[torch.arange(self.n_features), self.feature_layer().to(out_FL.device)] = torch.cat(norms)
        return out_FL

    def write_cfg(self, path: str | Path, **fields) -> None:
        """``cfg.json`` of the finished set (the SAE folders are written by :meth:`save` or training), with
        the format marker ``"units": "raw"``."""
        saes = [{"layer": l, "hook": h, "architecture": s.cfg.architecture(), "d_sae": w}
                for l, h, s, w in zip(self.layers, self.hooks, self.saes, self.widths)]
        super().write_cfg(path, units=UNITS, saes=saes, **fields)

    def save(self, path: str | Path) -> None:
        """One sae-lens folder per hook (``SAE.load_from_disk`` reads it; it takes raw activations) plus
        ``cfg.json``."""
        for hook, sae in zip(self.hooks, self.saes):
            sae.save_model(Path(path) / hook)
        self.write_cfg(path)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> "PerLayerSAEs":
        from sae_lens import SAE

        cfg = read_saved_cfg(path, "per_layer_saes")
        if cfg.get("units") != UNITS:
            raise CrosslayerError(f"{path} holds per-layer SAEs saved by an older crosslayer (their folders expect "
                                  "normalised inputs); train them again")
        saes = []
        for hook in cfg["hooks"]:
            try:
                saes.append(SAE.load_from_disk(Path(path) / hook, device=device))
            except (OSError, ValueError, KeyError) as err:
                raise CrosslayerError(f"SAE {Path(path) / hook} cannot be loaded ({err}); train it again") from None
        return cls(saes, layers=cfg["layers"], hooks=cfg["hooks"], norm_factors=cfg["norm_factors"],
                   meta=meta_from_cfg(cfg, ("saes", "units"))).to(device)


# ----------------------------------------------------------------------------- export

def save_sae_stack(stack, path: str | Path) -> None:
    """Save a trained :class:`crosslayer.sae_stack.SAEStack` as a per-layer SAE set: one raw-unit sae-lens
    TopK folder per hook (:func:`export_sae_lens`; a folder left by an interrupted save is replaced) and the
    set's ``cfg.json`` with the stack's meta (training plan, curve verdict). Loads as :class:`PerLayerSAEs`."""
    from sae_lens import SAE

    path = Path(path)
    saes = []
    for index, (hook, factor) in enumerate(zip(stack.hooks, stack.norm_factors.tolist())):
        w = stack.per_layer_weights(index)
        if (path / hook).exists():
            shutil.rmtree(path / hook)
        export_sae_lens(path / hook, W_enc_DF=w["W_enc"], b_enc_F=w["b_enc"], W_dec_FD=w["W_dec"], b_dec_D=w["b_dec"],
                        norm_factor=factor, hook_name=hook, arch="topk", k=stack.cfg.k, model_name=stack.model_name)
        saes.append(SAE.load_from_disk(path / hook))
    PerLayerSAEs(saes, layers=stack.layers, hooks=stack.hooks, norm_factors=stack.norm_factors,
                 meta=stack.meta).write_cfg(path)


@torch.no_grad()
def export_sae_lens(path: str | Path, *, W_enc_DF: Tensor, b_enc_F: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor,
                    norm_factor: float, hook_name: str, arch: str = "topk", k: int | None = None,
                    threshold_F: Tensor | None = None, model_name: str | None = None,
                    extra_metadata: dict | None = None) -> Path:
    """Write an SAE given in NORMALISED units as a sae-lens inference folder ``path`` that takes RAW activations.

    The SAE given (``x = raw * f``, ``f = norm_factor``): ``pre = x @ W_enc_DF + b_enc_F``, ``feats = act(pre)``,
    ``recon = feats @ W_dec_FD + b_dec_D``, with ``act`` per ``arch``: ``topk``: the ``k`` features of largest
    score ``relu(pre_i) * n_i`` (``n_i = ||W_dec_FD[i]||``, the crosscoder convention) keep ``relu(pre_i)``;
    ``jumprelu``: ``relu(pre_i)`` where ``pre_i > threshold_F[i]``; ``standard``: ``relu(pre)``.

    Written (``n_i`` clamped at 1e-8): ``W_enc[:, i] = W_enc_DF[:, i] * f * n_i``, ``b_enc_i = b_enc_F[i] * n_i``,
    ``W_dec[i] = W_dec_FD[i] / (n_i * f)``, ``b_dec = b_dec_D / f``, ``threshold_i = threshold_F[i] * n_i``;
    ``apply_b_dec_to_input`` false, ``normalize_activations`` ``"none"``, no ``rescale_acts_by_decoder_norm``.
    Then the folder's pre-activation on ``raw`` is ``n_i * pre_i``, so with ``sae = SAE.load_from_disk(path)``:
    ``sae.encode(raw)`` fires the same features, with values ``feats_i * n_i`` (every decoder row has norm 1
    in normalised units, ``1 / f`` in raw units), and ``sae.decode(sae.encode(raw)) == recon / f``. Use it on
    raw activations as it is: do NOT call ``fold_activation_norm_scaling_factor``; ``f`` is kept in the
    metadata as ``crosslayer_folded_norm_factor`` for provenance only. ``path`` must not exist or be an empty
    folder; it is written under a temporary name and renamed into place.
    """
    from sae_lens.saes.sae import SAEMetadata

    W_enc, b_enc, W_dec, b_dec = (t.detach().double().cpu() for t in (W_enc_DF, b_enc_F, W_dec_FD, b_dec_D))
    cfg_cls = _check_export(W_enc, b_enc, W_dec, b_dec, arch, k, threshold_F, norm_factor)
    f, n_F = float(norm_factor), W_dec.norm(dim=-1).clamp_min(1e-8)  # folded in float64, written as float32
    state = {"W_enc": W_enc * f * n_F, "b_enc": b_enc * n_F, "W_dec": W_dec / (n_F[:, None] * f), "b_dec": b_dec / f}
    if arch == "jumprelu":
        state["threshold"] = threshold_F.detach().double().cpu() * n_F
    metadata = {"model_name": model_name, "hook_name": hook_name, **(extra_metadata or {}), "crosslayer_units": UNITS,
                "crosslayer_folded_norm_factor": f,
                "crosslayer_note": "takes raw activations: the norm factor is folded into the weights (do not fold "
                                   "it again); feature value = normalised-unit value x its decoder norm"}
    cfg = cfg_cls(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], apply_b_dec_to_input=False, normalize_activations="none",
                  metadata=SAEMetadata(**metadata), **({"k": int(k)} if arch == "topk" else {}))
    _write_sae_folder(Path(path), {name: t.float().contiguous() for name, t in state.items()}, cfg.to_dict())
    return Path(path)


def _check_export(W_enc, b_enc, W_dec, b_dec, arch, k, threshold_F, norm_factor):
    """The sae-lens config class of ``arch``, after one-line CrosslayerErrors for anything unusable."""
    import sae_lens as sl

    classes = {"topk": sl.TopKSAEConfig, "jumprelu": sl.JumpReLUSAEConfig, "standard": sl.StandardSAEConfig}
    if arch not in classes:
        raise CrosslayerError(f"cannot export a {arch!r} SAE to sae-lens; use one of {', '.join(EXPORT_ARCHS)}")
    D, F = W_enc.shape if W_enc.ndim == 2 else (-1, -1)
    if (tuple(b_enc.shape), tuple(W_dec.shape), tuple(b_dec.shape)) != ((F,), (F, D), (D,)) or F < 1:
        raise CrosslayerError(f"export needs W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d]; got "
                              f"{list(W_enc.shape)}, {list(b_enc.shape)}, {list(W_dec.shape)}, {list(b_dec.shape)}")
    if arch == "topk" and (k is None or not 0 < k <= F):
        raise CrosslayerError(f"a topk export needs 0 < k <= {F}, got k={k}")
    if arch == "jumprelu" and (threshold_F is None or tuple(threshold_F.shape) != (F,)):
        raise CrosslayerError(f"a jumprelu export needs threshold_F of shape [{F}]")
    if not (float(norm_factor) > 0 and math.isfinite(float(norm_factor))):
        raise CrosslayerError(f"norm_factor must be positive and finite, got {norm_factor}")
    return classes[arch]


def _write_sae_folder(path: Path, state: dict, cfg: dict) -> None:
    """``sae_weights.safetensors`` and ``cfg.json`` in a temporary folder next to ``path``, renamed onto it."""
    from safetensors.torch import save_file
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise CrosslayerError(f"{path} exists; choose a new folder or delete that one")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_file(state, tmp / SAE_WEIGHTS_FILENAME)
        write_json(cfg, tmp / SAE_CFG_FILENAME)
        os.chmod(tmp, 0o777 & ~current_umask())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def normalized_inference_weights(sae) -> dict:
    """A sae-lens ``TrainingSAE`` (normalised units) as :func:`export_sae_lens` keyword arguments: ``W_enc_DF``,
    ``b_enc_F``, ``W_dec_FD``, ``b_dec_D``, ``arch``, ``k``, ``threshold_F``.

    Uses sae-lens's own inference conversion (``process_state_dict_for_saving_inference``: TopK's decoder-norm
    rescaling folded into unit decoder rows, so its TopK on ``pre`` is the export's TopK on ``relu(pre) * 1``;
    BatchTopK's score threshold becomes a JumpReLU one) and folds ``apply_b_dec_to_input`` into the encoder
    bias (``b_enc - b_dec @ W_enc``)."""
    state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    cfg = sae.cfg.get_inference_sae_cfg_dict()
    arch = cfg["architecture"]
    b_enc = state["b_enc"] - state["b_dec"] @ state["W_enc"] if cfg["apply_b_dec_to_input"] else state["b_enc"]
    return {"W_enc_DF": state["W_enc"], "b_enc_F": b_enc, "W_dec_FD": state["W_dec"], "b_dec_D": state["b_dec"],
            "arch": arch, "k": cfg.get("k") if arch == "topk" else None, "threshold_F": state.get("threshold")}


# ----------------------------------------------------------------------------- training

@dataclass(frozen=True)
class SAETrainConfig:
    """Optimisation and architecture of a per-layer SAE run (saved in ``cfg.json["training"]``); its
    defaults are the library's and the CLI's."""

    width: int
    """Features per layer (d_sae)."""
    tokens: int
    """Training tokens per layer."""
    arch: str = "topk"
    """topk | batchtopk | jumprelu | standard."""
    k: int | None = 32
    """Active features per token (topk; batch mean for batchtopk; target L0 for jumprelu)."""
    sparsity_coefficient: float | None = None
    """L1 coefficient (standard) or L0 coefficient (jumprelu); None = ``training.DEFAULT_SPARSITY_COEF``."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 1e-3
    """Adam learning rate (the crosslayer trainer's default, :class:`crosslayer.training.TrainConfig`)."""
    lr_warm_up_steps: int = 0
    """Linear warm-up steps."""
    lr_decay_steps: int | None = None
    """Linear decay to 0 over the last steps; None = the last 20 %."""
    dead_after_tokens: int | None = None
    """A feature silent for this many tokens counts as dead for TopK's AuxK loss (Gao et al.);
    None = 10M tokens or a tenth of the run, whichever is smaller (``default_dead_after``)."""
    seed: int = 0
    """Seeds the SAE init (seed + layer) and the data order."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise CrosslayerError(f"unknown SAE architecture {self.arch!r}; use one of {', '.join(ARCHS)}")
        if self.width < 1 or self.tokens < self.batch_size or self.batch_size < 1:
            raise CrosslayerError(f"need width >= 1 and tokens ({self.tokens}) >= batch_size ({self.batch_size}) >= 1")
        if self.arch != "standard" and (self.k is None or not 0 < self.k <= self.width):
            raise CrosslayerError(f"{self.arch} SAEs need 0 < k <= width ({self.width}), got k={self.k}")
        if self.lr <= 0:
            raise CrosslayerError(f"lr must be positive, got {self.lr}")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


def training_sae(cfg: SAETrainConfig, *, d_in: int, metadata: dict | None = None):
    """A fresh sae-lens training SAE of ``cfg.arch`` (``normalize_activations="none"``), seeded by the caller."""
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    common = {"d_in": d_in, "d_sae": cfg.width, "normalize_activations": "none",
              "metadata": SAEMetadata(**(metadata or {}))}
    coef = cfg.sparsity_coefficient if cfg.sparsity_coefficient is not None else DEFAULT_SPARSITY_COEF.get(cfg.arch)
    if cfg.arch == "topk":
        return sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(k=cfg.k, **common))
    if cfg.arch == "batchtopk":
        return sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(k=cfg.k, **common))
    if cfg.arch == "jumprelu":
        return sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic", target_l0=float(cfg.k), l0_coefficient=coef, **common))
    return sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(l1_coefficient=coef, **common))


def sae_lens_trainer_config(cfg: SAETrainConfig, *, device: str = "cpu"):
    """sae-lens's ``SAETrainerConfig`` for ``cfg``: constant lr with warm-up and linear decay, dead-feature
    window from ``dead_after_tokens``, no wandb, no checkpoints."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    decay = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.steps // 5
    dead_after = cfg.dead_after_tokens or default_dead_after(cfg.tokens, cfg.batch_size)
    return SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=cfg.lr, lr_scheduler_name="constant", lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=decay, device=device, dead_feature_window=max(1, dead_after // cfg.batch_size),
        logger=LoggingConfig(log_to_wandb=False))


def fit(trainer, *, progress: bool = True, desc: str = "SAE"):
    """Train with an sae-lens ``SAETrainer`` exactly as its ``fit()`` does without wandb, activation
    scaling or checkpoints (same calls in the same order, so the same weights), under our own bar."""
    if (trainer.cfg.logger.log_to_wandb or trainer.cfg.n_checkpoints or trainer.cfg.save_final_checkpoint
            or trainer.sae.cfg.normalize_activations != "none"):
        raise CrosslayerError("fit() mirrors SAETrainer.fit only without wandb, checkpoints or activation "
                              "scaling; call trainer.fit() for those")
    trainer.sae.to(trainer.cfg.device)
    with tqdm(total=trainer.cfg.total_training_steps, initial=trainer.n_training_steps, desc=desc, unit="step",
              leave=False, disable=not progress) as bar:
        while trainer.n_training_samples < trainer.cfg.total_training_samples:
            trainer.maybe_reset_sparsity()
            trainer.step(next(trainer.data_provider))
            trainer.n_training_steps += 1
            bar.update(1)
    trainer.set_final_sae_metadata()
    return trainer.sae


def _layer_done(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("cfg.json", "sae_weights.safetensors", TRAIN_STATS))


@torch.no_grad()
def _sample_fvu(sae, store, layer: int, n: int = 8192) -> float:
    """FVU of a saved (raw-unit) ``sae`` on up to ``n`` raw store rows of ``layer``: a training sanity number."""
    from crosslayer.evals import fvu

    gen = torch.Generator().manual_seed(12345)
    idx = torch.randperm(store.n_rows, generator=gen)[:n].numpy()
    x_ND = store.get(idx, layers=[layer], normalized=False)[:, 0].to(sae.W_dec)
    return float(fvu(x_ND[:, None], sae(x_ND)[:, None])[0])


def _train_layer(store, layer: int, hook: str, factor: float, cfg: SAETrainConfig, device: str, progress: bool,
                 folder: Path) -> dict:
    from safetensors.torch import save_file
    from sae_lens import SAE, SAETrainer

    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
        torch.manual_seed(cfg.seed + layer)
        sae = training_sae(cfg, d_in=store.width, metadata={
            "model_name": store.manifest["model"], "hook_name": hook, "context_size": store.seq_len,
            "prepend_bos": False})
    batches = (b[:, 0] for b in store.iter_batches(cfg.batch_size, layers=[layer], normalized=True, seed=cfg.seed,
                                                   epochs=None, buffer_rows=max(2 * cfg.batch_size, 8192)))
    trainer = SAETrainer(cfg=sae_lens_trainer_config(cfg, device=device), sae=sae, data_provider=batches)
    start = time.perf_counter()
    fit(trainer, progress=progress, desc=f"layer {layer}")
    seconds = time.perf_counter() - start
    if folder.exists():  # left by a run killed before its TRAIN_STATS: train again
        shutil.rmtree(folder)
    metadata = {k: v for k, v in sae.cfg.get_inference_sae_cfg_dict()["metadata"].items()
                if k not in ("model_name", "hook_name")}
    export_sae_lens(folder, **normalized_inference_weights(sae), norm_factor=factor, hook_name=hook,
                    model_name=store.manifest["model"], extra_metadata=metadata)
    with atomic_path(folder / "sparsity.safetensors") as tmp:
        save_file({"sparsity": trainer.log_feature_sparsity.detach().cpu()}, tmp)
    stats = {"layer": layer, "hook": hook, "tokens": trainer.n_training_samples, "steps": trainer.n_training_steps,
             "seconds": round(seconds, 3), "tokens_per_s": round(trainer.n_training_samples / max(seconds, 1e-9), 1),
             "l0_last_window": sae.cfg.metadata.l0, "dead_features": sae.cfg.metadata.num_dead_features,
             "train_sample_fvu": _sample_fvu(SAE.load_from_disk(folder, device=device), store, layer)}
    write_json(stats, folder / TRAIN_STATS)  # last: marks the layer done
    return stats


def train_per_layer_saes(store, cfg: SAETrainConfig, *, out_dir: str | Path, layers: list[int] | str | None = None,
                         device: str = "cpu", progress: bool = True) -> PerLayerSAEs:
    """Train one sae-lens SAE per layer of ``store`` (all, or ``layers``) into ``out_dir`` (module docstring).

    Rerunning the same call resumes: layers already saved in ``out_dir`` are not trained again.
    """
    from sae_lens import SAE

    sel = store.select(layers)
    if store.n_rows < cfg.batch_size:
        raise CrosslayerError(f"store {store.path} has {store.n_rows} rows, fewer than one batch of {cfg.batch_size}")
    store.verify()  # a corrupted store fails before out_dir is created (shards are hashed once per process)
    factors = torch.tensor(sel.norm_factors, dtype=torch.float32).tolist()  # as the dictionary keeps them
    provenance = {k: v for k, v in store_provenance(store).items() if k != "path"}
    plan = {"kind": "per_layer_saes", "units": UNITS, "layers": sel.layers, "hooks": sel.hooks, "norm_factors": factors,
            "store": provenance, "training": asdict(cfg)}
    out = Path(out_dir)
    record = claim_folder(out, plan, record=CFG_FILENAME, what="per-layer SAE training",
                          extra={"status": "training", "store_path": str(store.path)})
    stats = []
    bar = tqdm(list(zip(sel.layers, sel.hooks, factors)), desc=f"per-layer {cfg.arch} SAEs", unit="layer",
               disable=not progress)
    for layer, hook, factor in bar:
        folder = out / hook
        if _layer_done(folder):
            stats.append(json.loads((folder / TRAIN_STATS).read_text()))
            continue
        bar.set_postfix(layer=layer)
        stats.append(_train_layer(store, layer, hook, factor, cfg, device, progress, folder))
    saes = [SAE.load_from_disk(out / hook, device=device) for hook in sel.hooks]
    meta = {"store": provenance, "store_path": str(store.path), "training": asdict(cfg), "layer_stats": stats}
    result = PerLayerSAEs(saes, layers=sel.layers, hooks=sel.hooks, norm_factors=factors, meta=meta)
    if (record or {}).get("status") != "complete":
        result.write_cfg(out)
    release_folder(out)
    return result
