"""The Dictionary interface: one set of calls for per-layer SAEs and crosscoders.

Every eval, analysis, intervention and study is written once against :class:`Dictionary`
(design.md, "The Dictionary interface is the hinge"). A dictionary reads ``L`` layers of width
``d`` and has ``F`` features:

- ``encode(acts_BLD) -> feats_BF`` and ``decode(feats_BF) -> acts_BLD``; ``forward`` returns both
  as a :class:`DictionaryOutput`; ``reconstruct`` returns only the reconstruction.
- ``writes_FL()`` / ``reads_FL() -> bool [F, L]``: which of the dictionary's layers each feature
  writes / reads (a per-layer SAE feature: exactly its own layer; a crosscoder: its variant's
  masks). L0 accounting uses ``writes_FL`` (research-notes §4: ``l0_tuple`` counts the (feature,
  layer) pairs a firing feature writes).
- ``decoder_vectors(layer, normalized=True) -> [F, d]``: every feature's decoder vector at model
  layer ``layer`` (zero rows for features that do not write it), detached float32 on the CPU;
  ``normalized=False`` gives raw model units.
- ``decoder_norms() -> [F, L]``: the norm of feature i's decoder vector at layer l.
- ``layers`` (model layer indices), ``hooks`` (TransformerLens hook names, one per layer),
  ``n_features``, ``d_model`` (width), ``norm_factors``, ``meta`` (provenance: the store, its model
  and weights, the training config; ``model_name`` reads the model from it).
- ``save(dir)`` writes ``dir/cfg.json`` (with a ``"kind"``, ``"status": "complete"`` and ``meta``)
  plus weights; ``Class.load(dir)`` reads it back (refusing unfinished training);
  :func:`load_dictionary` dispatches on ``"kind"``.
- :func:`check_compatible` ``(dictionary, store_or_model)``: the one check that a dictionary can
  read an activation store or be spliced into a model.
- Transcoders (:mod:`crosslayer.clt`) read one hook kind and write another (resid_mid -> mlp_out):
  ``hooks`` / ``norm_factors`` are what they read, ``target_hooks`` / ``target_norm_factors`` what
  ``decode`` approximates (``is_transcoder``); for every other kind the two are the same.

Units convention (research-notes §2):
1. Dictionaries are trained on, and compute in, NORMALISED units: ``normalised = raw * factor_l``
   with the per-layer factors of the activation store they were trained on (each layer scaled to
   mean norm sqrt(d)). The factors are saved with the dictionary (``norm_factors``, ``[L]``).
2. ``encode(acts, normalized=True)`` (the default) takes normalised activations, as served by
   ``ActivationStore.iter_batches(normalized=True)``. With ``normalized=False`` it takes the
   model's RAW activations and multiplies them by the factors first.
3. ``decode(feats, normalized=True)`` returns normalised activations; with ``normalized=False``
   it divides by the factors, giving activations in the model's own units that can be spliced
   back into the model. ``forward`` / ``reconstruct`` take the flag for both ends.

Implementing a new kind: subclass :class:`Dictionary`, call ``super().__init__(layers=..., hooks=...,
norm_factors=..., d_model=..., meta=...)``, implement ``encode_normalized``, ``decode_normalized``,
``n_features``, ``writes_FL``, ``reads_FL``, ``decoder_vectors_normalized``, ``decoder_norms``,
``save`` (via :meth:`Dictionary.write_cfg`) and ``load`` (via :func:`read_saved_cfg` and
:func:`meta_from_cfg`), and decorate the class with ``@register_dictionary("<kind>")`` (the module
is imported on demand if listed in ``KIND_MODULES``). No code outside the dictionary modules asks
which kind a dictionary is.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

import crosslayer
from crosslayer.errors import CrosslayerError
from crosslayer.hooks import hook_name
from crosslayer.io import write_json

CFG_FILENAME = "cfg.json"
FORMAT_VERSION = 1
BASE_KEYS = frozenset({"format", "kind", "package_version", "layers", "hooks", "d_model", "n_features",
                       "norm_factors", "status"})
"""``cfg.json`` keys every kind writes (:meth:`Dictionary.write_cfg`); the others are the ``meta``."""

_REGISTRY: dict[str, type["Dictionary"]] = {}
KIND_MODULES: dict[str, str] = {"per_layer_saes": "crosslayer.saes", "crosscoder": "crosslayer.crosscoder",
                                "clt": "crosslayer.clt"}
"""kind -> module that defines (and registers) it; imported by :func:`load_dictionary` on demand."""


class DictionaryOutput(NamedTuple):
    """What :meth:`Dictionary.forward` returns."""

    feats_BF: Tensor
    """Feature activations ``[batch, n_features]`` (0 = not firing)."""
    recon_BLD: Tensor
    """Reconstruction ``[batch, n_layers, d_model]``, in the units asked for."""


def register_dictionary(kind: str):
    """Class decorator: make ``kind`` (the ``"kind"`` in ``cfg.json``) load as this class."""

    def wrap(cls: type[Dictionary]) -> type[Dictionary]:
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return wrap


class Dictionary(nn.Module, ABC):
    """A sparse dictionary over ``L`` layers of the residual stream (see the module docstring)."""

    kind: str = "abstract"

    def __init__(self, *, layers: list[int], hooks: list[str] | None, norm_factors: Tensor | list[float] | None,
                 d_model: int, meta: dict | None = None, target_hooks: list[str] | None = None,
                 target_norm_factors: Tensor | list[float] | None = None):
        """``hooks`` None: the ``resid_post`` hooks of ``layers``; ``norm_factors`` None: 1 at every layer.
        ``target_hooks`` / ``target_norm_factors`` (transcoders, which write other hooks than they read): the
        hooks the reconstruction approximates and their factors; None: the same as ``hooks`` / ``norm_factors``."""
        super().__init__()
        self.meta = dict(meta or {})
        """Provenance saved in ``cfg.json``: ``store`` (model, weights_id, split, ...), ``training``, ..."""
        hooks = hooks if hooks is not None else [hook_name("resid_post", l) for l in layers]
        norm_factors = norm_factors if norm_factors is not None else [1.0] * len(layers)
        factors = torch.as_tensor(norm_factors, dtype=torch.float32).reshape(-1)
        if not (len(layers) == len(hooks) == factors.numel()):
            raise CrosslayerError(f"dictionary has {len(layers)} layers, {len(hooks)} hooks and "
                                  f"{factors.numel()} norm factors; give one of each per layer")
        if not torch.isfinite(factors).all() or (factors <= 0).any():
            raise CrosslayerError(f"norm factors must be positive and finite, got {factors.tolist()}")
        self.layers = [int(l) for l in layers]
        self.hooks = list(hooks)
        self.d_model = int(d_model)
        self.register_buffer("norm_factors", factors, persistent=False)
        self.target_hooks = list(target_hooks) if target_hooks is not None else list(self.hooks)
        targets = factors.clone() if target_norm_factors is None else \
            torch.as_tensor(target_norm_factors, dtype=torch.float32).reshape(-1)
        if len(self.target_hooks) != len(layers) or targets.numel() != len(layers) or (targets <= 0).any():
            raise CrosslayerError(f"a transcoder needs one target hook and one positive target norm factor per layer "
                                  f"({len(layers)}), got {len(self.target_hooks)} and {targets.tolist()}")
        self.register_buffer("target_norm_factors", targets, persistent=False)

    # ---------------------------------------------------------------- what a kind implements
    @property
    @abstractmethod
    def n_features(self) -> int:
        """F, the number of features."""

    @abstractmethod
    def encode_normalized(self, acts_BLD: Float[Tensor, "batch layer d_model"]) -> Float[Tensor, "batch feat"]:
        """Normalised activations -> feature activations."""

    @abstractmethod
    def decode_normalized(self, feats_BF: Float[Tensor, "batch feat"]) -> Float[Tensor, "batch layer d_model"]:
        """Feature activations -> normalised reconstruction."""

    @abstractmethod
    def writes_FL(self) -> Bool[Tensor, "feat layer"]:
        """``[F, L]`` bool on the CPU: the layers (of ``layers``) each feature writes."""

    @abstractmethod
    def reads_FL(self) -> Bool[Tensor, "feat layer"]:
        """``[F, L]`` bool on the CPU: the layers (of ``layers``) each feature reads."""

    @abstractmethod
    def decoder_vectors_normalized(self, index: int) -> Float[Tensor, "feat d_model"]:
        """Every feature's decoder vector at ``layers[index]`` ``[F, d]`` in normalised units (zero rows
        for features that do not write it); :meth:`decoder_vectors` is the public call."""

    @abstractmethod
    def decoder_norms(self) -> Float[Tensor, "feat layer"]:
        """Norm of each feature's decoder vector at each layer ``[F, L]`` (normalised units)."""

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write ``path/cfg.json`` (with ``"kind"``) and the weights."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> "Dictionary":
        """Read what :meth:`save` wrote."""

    # ---------------------------------------------------------------- shared behaviour
    layerwise: bool = False
    """True when each layer's reconstruction depends on that layer's input alone (per-layer SAEs);
    such dictionaries also implement :meth:`reconstruct_layer`."""

    def reconstruct_layer(self, acts_ND: Tensor, index: int, *, normalized: bool = True) -> Tensor:
        """Reconstruct layer ``layers[index]`` from that layer's activations alone (layerwise kinds)."""
        raise NotImplementedError(f"{type(self).__name__} reads all layers at once; it has no per-layer reconstruction")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def model_name(self) -> str | None:
        """The model of the store the dictionary was trained on (``meta["store"]["model"]``), if recorded."""
        return self.meta.get("store", {}).get("model")

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` in ``layers``, or a one-line CrosslayerError."""
        if layer not in self.layers:
            raise CrosslayerError(f"layer {layer} is not one of the dictionary's layers {self.layers}; "
                                  "choose one of those")
        return self.layers.index(layer)

    @torch.no_grad()
    def decoder_vectors(self, layer: int, *, normalized: bool = True) -> Float[Tensor, "feat d_model"]:
        """Every feature's decoder vector at model layer ``layer`` ``[F, d]``, detached float32 on the CPU;
        rows of features that do not write that layer are zero. ``normalized=False``: raw model units
        (divided by that layer's norm factor)."""
        index = self.layer_index(layer)
        W_FD = self.decoder_vectors_normalized(index).detach().float().cpu()
        return W_FD if normalized else W_FD / float(self.target_norm_factors[index])

    def normalize(self, acts_BLD: Tensor) -> Tensor:
        """Raw model activations -> normalised units (``raw * factor_l``)."""
        return acts_BLD * self.norm_factors.to(acts_BLD)[:, None]

    def denormalize(self, acts_BLD: Tensor) -> Tensor:
        """Normalised reconstruction -> raw model activations (``normalised / factor_l``, with the target hooks'
        factors: for everything but transcoders the same as the input's)."""
        return acts_BLD / self.target_norm_factors.to(acts_BLD)[:, None]

    @property
    def is_transcoder(self) -> bool:
        """True when the dictionary writes other hooks than it reads (a transcoder: resid_mid -> mlp_out)."""
        return self.target_hooks != self.hooks

    def check_acts(self, acts_BLD: Tensor) -> None:
        if acts_BLD.ndim != 3 or tuple(acts_BLD.shape[1:]) != (self.n_layers, self.d_model):
            raise CrosslayerError(f"{type(self).__name__} reads [batch, {self.n_layers}, {self.d_model}] "
                                  f"(layers {self.layers}), got {list(acts_BLD.shape)}; select the "
                                  "dictionary's layers from the store (layers=dictionary.layers)")

    def check_feats(self, feats_BF: Tensor) -> None:
        if feats_BF.ndim != 2 or feats_BF.shape[1] != self.n_features:
            raise CrosslayerError(f"{type(self).__name__} decodes [batch, {self.n_features}], "
                                  f"got {list(feats_BF.shape)}")

    def encode(self, acts_BLD: Float[Tensor, "batch layer d_model"], *,
               normalized: bool = True) -> Float[Tensor, "batch feat"]:
        """Feature activations of ``acts_BLD`` (normalised units, or raw with ``normalized=False``)."""
        self.check_acts(acts_BLD)
        return self.encode_normalized(acts_BLD if normalized else self.normalize(acts_BLD))

    def decode(self, feats_BF: Float[Tensor, "batch feat"], *,
               normalized: bool = True) -> Float[Tensor, "batch layer d_model"]:
        """Reconstruction from features, normalised (default) or raw with ``normalized=False``."""
        self.check_feats(feats_BF)
        recon_BLD = self.decode_normalized(feats_BF)
        return recon_BLD if normalized else self.denormalize(recon_BLD)

    def forward(self, acts_BLD: Float[Tensor, "batch layer d_model"], *,
                normalized: bool = True) -> DictionaryOutput:
        """Encode then decode; input and reconstruction in the same units."""
        feats_BF = self.encode(acts_BLD, normalized=normalized)
        return DictionaryOutput(feats_BF, self.decode(feats_BF, normalized=normalized))

    def reconstruct(self, acts_BLD: Tensor, *, normalized: bool = True) -> Tensor:
        """``decode(encode(acts))`` in the units of ``acts``."""
        return self.forward(acts_BLD, normalized=normalized).recon_BLD

    def write_cfg(self, path: str | Path, **fields) -> None:
        """Write ``path/cfg.json`` of a finished dictionary: the fields every kind writes, status
        ``complete``, the kind's own ``fields``, then ``meta``."""
        base = {"format": FORMAT_VERSION, "kind": self.kind, "package_version": crosslayer.__version__,
                "layers": self.layers, "hooks": self.hooks, "d_model": self.d_model,
                "n_features": self.n_features, "norm_factors": self.norm_factors.tolist(), "status": "complete"}
        meta = {k: v for k, v in self.meta.items() if k not in BASE_KEYS and k not in fields}
        write_json({**base, **fields, **meta}, Path(path) / CFG_FILENAME)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers[0]}..{self.layers[-1]} ({self.n_layers}), "
                f"d_model={self.d_model}, n_features={self.n_features})")


WRITE_FRACTION = 0.1
"""Default share of a feature's largest layer decoder norm above which it counts as writing a layer."""


def written_pairs(decoder_norms_FL: Tensor, writes_FL: Tensor, fraction: float = WRITE_FRACTION) -> Tensor:
    """``[F, L]`` bool: the (feature, layer) pairs where the feature writes the layer with a decoder norm > 0 and
    >= ``fraction`` x its largest layer norm. The one rule behind L0 per (feature, layer) in
    :mod:`crosslayer.evals` and the layers an intervention edits in :mod:`crosslayer.interventions`."""
    norms_FL = decoder_norms_FL.detach().float().cpu()
    peak_F1 = norms_FL.max(dim=1, keepdim=True).values
    return writes_FL.bool().cpu() & (norms_FL > 0) & (norms_FL >= fraction * peak_F1)


def store_provenance(store) -> dict:
    """What a dictionary records about the activation store it was trained on."""
    m = store.manifest
    return {"path": str(store.path), "model": m["model"], "weights_id": m["weights_id"],
            "split": m["split"], "corpus_id": m["corpus_id"], "hook_kind": m["hook_kind"],
            "seq_len": m["seq_len"], "n_rows": store.n_rows, "exclusion_policy": m["exclusion_policy"]}


def check_compatible(dictionary: Dictionary, target) -> None:
    """Raise a one-line CrosslayerError unless ``dictionary`` fits ``target``: an activation store (anything
    with a ``manifest``) it can read, or a TransformerLens model (``hook_dict``, ``cfg``) it can be spliced into."""
    if hasattr(target, "manifest"):
        _check_store(dictionary, target)
    elif hasattr(target, "hook_dict") and hasattr(target, "cfg"):
        _check_model(dictionary, target)
    else:
        raise CrosslayerError(f"cannot check a dictionary against a {type(target).__name__}; pass an activation "
                              "store or a TransformerLens model")


def _check_store(dictionary: Dictionary, store) -> None:
    missing = [l for l in dictionary.layers if l not in store.layers]
    if missing:
        raise CrosslayerError(f"dictionary reads layers {dictionary.layers} but store {store.path} lacks {missing} "
                              f"(it has {store.layers}); use a store harvested at those layers")
    hooks = [store.hooks[store.layers.index(l)] for l in dictionary.layers]
    if hooks != dictionary.hooks:
        raise CrosslayerError(f"dictionary hooks {dictionary.hooks[0]}.. differ from store hooks {hooks[0]}..; "
                              "use a store harvested at the same hook kind")
    if store.width != dictionary.d_model:
        raise CrosslayerError(f"dictionary width {dictionary.d_model} != store width {store.width}; "
                              "use a store of the same model")
    made_on = dictionary.meta.get("store", {})
    for key in ("model", "weights_id"):
        if key in made_on and made_on[key] != store.manifest.get(key):
            raise CrosslayerError(f"dictionary was trained on {key} {made_on[key]!r}, store {store.path} holds "
                                  f"{store.manifest.get(key)!r}; use a store of the same model")


def _check_model(dictionary: Dictionary, model) -> None:
    name = model.cfg.model_name
    fix = "load the model the dictionary was trained on"
    if model.cfg.d_model != dictionary.d_model:
        raise CrosslayerError(f"model {name} has d_model {model.cfg.d_model}, the dictionary "
                              f"{dictionary.d_model}; {fix}")
    if max(dictionary.layers) >= model.cfg.n_layers:
        raise CrosslayerError(f"dictionary reads layer {max(dictionary.layers)}, model {name} has only "
                              f"{model.cfg.n_layers} layers; {fix}")
    missing = [h for h in dictionary.hooks if h not in model.hook_dict]
    if missing:
        raise CrosslayerError(f"model {name} has no hook {missing[0]}; {fix}")
    wid, made_on = getattr(model, "crosslayer_weights_id", None), dictionary.meta.get("store", {}).get("weights_id")
    if wid is not None and made_on is not None and wid != made_on:
        raise CrosslayerError(f"model weights {wid} differ from those the dictionary was trained on ({made_on}); {fix}")


def read_cfg(path: str | Path) -> dict:
    """``path/cfg.json`` of a saved dictionary, with a clear error if it is not one."""
    cfg_path = Path(path) / CFG_FILENAME
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CrosslayerError(f"{path} is not a saved dictionary (no {CFG_FILENAME}); train one or "
                              "check the path") from None
    except (OSError, ValueError) as err:
        raise CrosslayerError(f"{cfg_path} cannot be read ({err}); train the dictionary again") from None
    if "kind" not in cfg:
        raise CrosslayerError(f"{cfg_path} has no \"kind\"; it is not a crosslayer dictionary (a bare "
                              "sae-lens SAE folder? pass its parent folder)")
    return cfg


def read_saved_cfg(path: str | Path, kind: str) -> dict:
    """``path/cfg.json`` of a finished dictionary of ``kind``: refuses another kind and unfinished training."""
    cfg = read_cfg(path)
    if cfg["kind"] != kind:
        raise CrosslayerError(f"{path} holds a {cfg['kind']!r}, not a {kind!r}; use load_dictionary")
    if cfg.get("status") != "complete":
        raise CrosslayerError(f"{path} holds unfinished {kind} training (status {cfg.get('status')!r}); rerun the "
                              "same training command to finish it")
    return cfg


def meta_from_cfg(cfg: dict, kind_keys: tuple[str, ...] = ()) -> dict:
    """The ``meta`` of a saved dictionary: the ``cfg.json`` keys that are neither base nor ``kind_keys``."""
    return {k: v for k, v in cfg.items() if k not in BASE_KEYS and k not in kind_keys}


def load_dictionary(path: str | Path, *, device: str = "cpu") -> Dictionary:
    """Load any saved dictionary: reads ``cfg.json``'s ``"kind"`` and calls that class's ``load``."""
    kind = read_cfg(path)["kind"]
    if kind not in _REGISTRY and kind in KIND_MODULES:
        importlib.import_module(KIND_MODULES[kind])
    if kind not in _REGISTRY:
        raise CrosslayerError(f"{path} holds a dictionary of unknown kind {kind!r} (known: "
                              f"{', '.join(sorted(set(_REGISTRY) | set(KIND_MODULES)))}); upgrade crosslayer")
    return _REGISTRY[kind].load(path, device=device)
