"""The per-layer SAE baseline: one sae-lens SAE per layer, behind the Dictionary interface.

Method (research-notes §2; Gao et al. 2024 for TopK, Bussmann et al. 2024 for BatchTopK,
Rajamanoharan et al. 2024 / Gemma Scope 2 for JumpReLU, Towards Monosemanticity 2023 for ReLU+L1):
1. For each layer l of the activation store, in order, build a sae-lens training SAE
   (``arch``: ``topk`` | ``batchtopk`` | ``jumprelu`` | ``standard``) with ``d_in = width`` and
   ``d_sae = width`` features, seeded with ``seed + layer``. ``normalize_activations`` is
   ``"none"``: the store already serves each layer normalised to mean norm sqrt(d)
   (``raw * norm_factor_l``), so the SAE lives in normalised units.
2. Train it with sae-lens's ``SAETrainer`` on an endless, seeded, token-shuffled iterator of
   ``[batch, d]`` rows of that layer (``ActivationStore.iter_batches``), for ``tokens`` tokens,
   Adam at ``lr`` with linear warm-up and a linear decay to 0 over the last ``lr_decay_steps``
   steps. No wandb, no network.
3. Save the inference SAE (``TrainingSAE.save_inference_model``: BatchTopK becomes JumpReLU, TopK's
   decoder-norm rescaling is folded) to ``out_dir/<hook_name>/`` under a temporary name and rename
   it into place, with a ``crosslayer_train.json`` sidecar of training statistics. Each folder loads
   with ``sae_lens.SAE.load_from_disk(out_dir/<hook_name>)``; its metadata carries
   ``norm_scaling_factor`` (call ``sae.fold_activation_norm_scaling_factor(f)`` to use it on raw
   activations).
4. Resume: a layer whose folder is complete is skipped on a rerun of the same command, so a killed
   run redoes at most the layer it was training. ``out_dir/cfg.json`` (kind ``per_layer_saes``:
   layers, hooks, norm factors, store provenance, training config, per-layer statistics) is
   written first with status ``training`` and finalised with status ``complete``.

:class:`PerLayerSAEs` concatenates the L SAEs' features: feature block l (``widths[l]``
contiguous features) belongs to layer l, so ``decoder_norms()`` is block-diagonal and the total L0
is the sum of the per-layer L0s.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from crosslayer.dictionary import CFG_FILENAME, Dictionary, read_cfg, register_dictionary, store_provenance
from crosslayer.errors import CrosslayerError
from crosslayer.io import write_json
from crosslayer.training import default_dead_after

ARCHS = ("topk", "batchtopk", "jumprelu", "standard")
TRAIN_STATS = "crosslayer_train.json"
_DEFAULT_SPARSITY = {"standard": 5.0, "jumprelu": 1.0}


@register_dictionary("per_layer_saes")
class PerLayerSAEs(Dictionary):
    """L sae-lens SAEs, one per layer, as one Dictionary with ``F = sum(widths)`` features."""

    def __init__(self, saes: list, *, layers: list[int], hooks: list[str], norm_factors, meta: dict | None = None):
        if not saes or len({s.cfg.d_in for s in saes}) != 1:
            raise CrosslayerError("PerLayerSAEs needs at least one SAE, all with the same d_in")
        super().__init__(layers=layers, hooks=hooks, norm_factors=norm_factors, d_model=saes[0].cfg.d_in)
        if len(saes) != len(self.layers):
            raise CrosslayerError(f"{len(saes)} SAEs for {len(self.layers)} layers; give one SAE per layer")
        self.saes = nn.ModuleList(saes)
        self.widths = [int(s.cfg.d_sae) for s in saes]
        self.meta = dict(meta or {})

    layerwise = True

    @property
    def n_features(self) -> int:
        return sum(self.widths)

    def reconstruct_layer(self, acts_ND: Tensor, index: int, *, normalized: bool = True) -> Tensor:
        factor = self.norm_factors[index].to(acts_ND)
        x_ND = acts_ND if normalized else acts_ND * factor
        recon_ND = self.saes[index](x_ND)
        return recon_ND if normalized else recon_ND / factor

    def feature_layer(self) -> Tensor:
        """``[F]`` index (into ``layers``) of the layer each feature belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_layers), torch.tensor(self.widths))

    def encode_normalized(self, acts_BLD: Tensor) -> Tensor:
        return torch.cat([sae.encode(acts_BLD[:, i]) for i, sae in enumerate(self.saes)], dim=1)

    def decode_normalized(self, feats_BF: Tensor) -> Tensor:
        blocks = feats_BF.split(self.widths, dim=1)
        return torch.stack([sae.decode(f_BW) for sae, f_BW in zip(self.saes, blocks)], dim=1)

    @torch.no_grad()
    def decoder_norms(self) -> Tensor:
        """``[F, L]``: each feature's effective decoder norm at its own layer, 0 elsewhere."""
        norms = []
        for sae in self.saes:
            n = sae.W_dec.float().norm(dim=-1)
            norms.append(torch.ones_like(n) if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else n)
        out_FL = torch.zeros(self.n_features, self.n_layers, device=norms[0].device)
        out_FL[torch.arange(self.n_features), self.feature_layer().to(out_FL.device)] = torch.cat(norms)
        return out_FL

    def write_cfg(self, path: str | Path, status: str = "complete") -> None:
        saes = [{"layer": l, "hook": h, "architecture": s.cfg.architecture(), "d_sae": w}
                for l, h, s, w in zip(self.layers, self.hooks, self.saes, self.widths)]
        write_json({**self.base_cfg(), "status": status, "saes": saes, **self.meta}, Path(path) / CFG_FILENAME)

    def save(self, path: str | Path) -> None:
        """One sae-lens folder per hook (``SAE.load_from_disk`` reads it) plus ``cfg.json``."""
        for hook, sae in zip(self.hooks, self.saes):
            sae.save_model(Path(path) / hook)
        self.write_cfg(path)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> "PerLayerSAEs":
        from sae_lens import SAE

        cfg = read_cfg(path)
        if cfg["kind"] != "per_layer_saes":
            raise CrosslayerError(f"{path} holds a {cfg['kind']!r}, not per-layer SAEs; use load_dictionary")
        if cfg.get("status") != "complete":
            raise CrosslayerError(f"{path} holds unfinished SAE training; rerun the same training command to finish it")
        saes = []
        for hook in cfg["hooks"]:
            try:
                saes.append(SAE.load_from_disk(Path(path) / hook, device=device))
            except (OSError, ValueError, KeyError) as err:
                raise CrosslayerError(f"SAE {Path(path) / hook} cannot be loaded ({err}); train it again") from None
        known = {"format", "kind", "package_version", "layers", "hooks", "d_model", "n_features",
                 "norm_factors", "status", "saes"}
        meta = {k: v for k, v in cfg.items() if k not in known}
        return cls(saes, layers=cfg["layers"], hooks=cfg["hooks"], norm_factors=cfg["norm_factors"],
                   meta=meta).to(device)


# ----------------------------------------------------------------------------- training

@dataclass(frozen=True)
class SAETrainConfig:
    """Optimisation and architecture of a per-layer SAE run (saved in ``cfg.json["training"]``)."""

    width: int
    """Features per layer (d_sae)."""
    tokens: int
    """Training tokens per layer."""
    arch: str = "topk"
    """topk | batchtopk | jumprelu | standard."""
    k: int | None = 32
    """Active features per token (topk; batch mean for batchtopk; target L0 for jumprelu)."""
    sparsity_coefficient: float | None = None
    """L1 coefficient (standard, default 5) or L0 coefficient (jumprelu, default 1)."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 3e-4
    """Adam learning rate."""
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


def _training_sae(cfg: SAETrainConfig, *, d_in: int, metadata: dict):
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    common = {"d_in": d_in, "d_sae": cfg.width, "normalize_activations": "none",
              "metadata": SAEMetadata(**metadata)}
    coef = cfg.sparsity_coefficient if cfg.sparsity_coefficient is not None else _DEFAULT_SPARSITY.get(cfg.arch)
    if cfg.arch == "topk":
        return sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(k=cfg.k, **common))
    if cfg.arch == "batchtopk":
        return sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(k=cfg.k, **common))
    if cfg.arch == "jumprelu":
        return sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic", target_l0=float(cfg.k), l0_coefficient=coef, **common))
    return sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(l1_coefficient=coef, **common))


@contextmanager
def _quiet_trainer(quiet: bool):
    """Silence sae-lens's own progress bar while ``quiet`` (it takes no option for that)."""
    import functools

    import sae_lens.training.sae_trainer as trainer_module

    original = trainer_module.tqdm
    if quiet:
        trainer_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        trainer_module.tqdm = original


def _layer_done(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("cfg.json", "sae_weights.safetensors", TRAIN_STATS))


@torch.no_grad()
def _sample_fvu(sae, store, layer: int, n: int = 8192) -> float:
    """FVU of ``sae`` on up to ``n`` store rows of ``layer`` (normalised units): a training sanity number."""
    gen = torch.Generator().manual_seed(12345)
    idx = torch.randperm(store.n_rows, generator=gen)[:n].numpy()
    x_ND = store.get(idx, layers=[layer], normalized=True)[:, 0].to(sae.W_dec)
    err = (sae(x_ND) - x_ND).pow(2).sum()
    return float(err / (x_ND - x_ND.mean(0)).pow(2).sum())


def _train_layer(store, layer: int, hook: str, cfg: SAETrainConfig, device: str, progress: bool, folder: Path) -> dict:
    from safetensors.torch import save_file
    from sae_lens import SAE, SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    factor = float(store.norm_factors[store.layers.index(layer)])
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
        torch.manual_seed(cfg.seed + layer)
        sae = _training_sae(cfg, d_in=store.width, metadata={
            "model_name": store.manifest["model"], "hook_name": hook, "context_size": store.seq_len,
            "prepend_bos": False, "norm_scaling_factor": factor,
            "crosslayer_units": "normalised: feed raw activations * norm_scaling_factor"})
    batches = (b[:, 0] for b in store.iter_batches(cfg.batch_size, layers=[layer], normalized=True, seed=cfg.seed,
                                                   epochs=None, buffer_rows=max(2 * cfg.batch_size, 8192)))
    decay = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.steps // 5
    dead_after = cfg.dead_after_tokens or default_dead_after(cfg.tokens, cfg.batch_size)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=cfg.lr, lr_scheduler_name="constant", lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=decay, device=device, dead_feature_window=max(1, dead_after // cfg.batch_size),
        logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    start = time.perf_counter()
    with _quiet_trainer(not progress):
        trainer.fit()
    seconds = time.perf_counter() - start
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    sae.save_inference_model(tmp)
    save_file({"sparsity": trainer.log_feature_sparsity}, tmp / "sparsity.safetensors")
    fvu = _sample_fvu(SAE.load_from_disk(tmp, device=device), store, layer)
    stats = {"layer": layer, "hook": hook, "tokens": trainer.n_training_samples, "steps": trainer.n_training_steps,
             "seconds": round(seconds, 3), "tokens_per_s": round(trainer.n_training_samples / max(seconds, 1e-9), 1),
             "l0_last_window": sae.cfg.metadata.l0, "dead_features": sae.cfg.metadata.num_dead_features,
             "train_sample_fvu": fvu}
    write_json(stats, tmp / TRAIN_STATS)
    os.replace(tmp, folder)
    return stats


def train_per_layer_saes(store, *, out_dir: str | Path, width: int, tokens: int, k: int | None = 32,
                         arch: str = "topk", batch_size: int = 4096, lr: float = 3e-4,
                         sparsity_coefficient: float | None = None, lr_warm_up_steps: int = 0,
                         lr_decay_steps: int | None = None, dead_after_tokens: int | None = None,
                         seed: int = 0, layers: list[int] | None = None, device: str = "cpu",
                         progress: bool = True) -> PerLayerSAEs:
    """Train one sae-lens SAE per layer of ``store`` into ``out_dir`` (see the module docstring).

    Rerunning the same call resumes: layers already saved in ``out_dir`` are not trained again.
    """
    cfg = SAETrainConfig(width=width, tokens=tokens, arch=arch, k=k, sparsity_coefficient=sparsity_coefficient,
                         batch_size=batch_size, lr=lr, lr_warm_up_steps=lr_warm_up_steps,
                         lr_decay_steps=lr_decay_steps, dead_after_tokens=dead_after_tokens, seed=seed)
    layers = store.layers if layers is None else [int(l) for l in layers]
    missing = [l for l in layers if l not in store.layers]
    if missing:
        raise CrosslayerError(f"layers {missing} are not in store {store.path} (it has {store.layers})")
    if store.n_rows < batch_size:
        raise CrosslayerError(f"store {store.path} has {store.n_rows} rows, fewer than one batch of {batch_size}")
    hooks = [store.hooks[store.layers.index(l)] for l in layers]
    factors = [float(store.norm_factors[store.layers.index(l)]) for l in layers]
    provenance = {k_: v for k_, v in store_provenance(store).items() if k_ != "path"}
    plan = {"kind": "per_layer_saes", "layers": layers, "hooks": hooks, "norm_factors": factors,
            "store": provenance, "training": asdict(cfg)}
    out = Path(out_dir)
    cfg_path = out / CFG_FILENAME
    if cfg_path.is_file():
        existing = json.loads(cfg_path.read_text())
        diff = [key for key in plan if existing.get(key) != plan[key]]
        if diff:
            raise CrosslayerError(f"{out} holds a different SAE training ({diff[0]} differs); choose another "
                                  "out_dir or delete that folder")
    elif out.exists() and any(out.iterdir()):
        raise CrosslayerError(f"{out} exists and is not an SAE training folder; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    if not cfg_path.is_file():
        write_json({**plan, "status": "training", "store_path": str(store.path)}, cfg_path)
    stats = []
    bar = tqdm(list(zip(layers, hooks)), desc=f"per-layer {arch} SAEs", unit="layer", disable=not progress)
    for layer, hook in bar:
        folder = out / hook
        if _layer_done(folder):
            stats.append(json.loads((folder / TRAIN_STATS).read_text()))
            continue
        bar.set_postfix(layer=layer)
        stats.append(_train_layer(store, layer, hook, cfg, device, progress, folder))
    from sae_lens import SAE

    saes = [SAE.load_from_disk(out / hook, device=device) for hook in hooks]
    meta = {"store": provenance, "store_path": str(store.path), "training": asdict(cfg), "layer_stats": stats}
    result = PerLayerSAEs(saes, layers=layers, hooks=hooks, norm_factors=factors, meta=meta)
    if json.loads(cfg_path.read_text()).get("status") != "complete":
        result.write_cfg(out, status="complete")
    return result
