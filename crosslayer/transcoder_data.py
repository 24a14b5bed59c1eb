"""Token-aligned (input, target) activations for transcoders: a pair of activation stores.

A transcoder pair folder holds two ordinary :class:`~crosslayer.store.ActivationStore` folders,
``resid_mid/`` (what the features read) and ``mlp_out/`` (what they write), over the same windows and
layers. Alignment:
1. :func:`harvest_pair` harvests both hook kinds of the same windows in one forward pass
   (:func:`crosslayer.harvest.harvest_stores`), which decides every exclusion once per token for both
   stores, so row r of one store and row r of the other are the same token. The pair keeps the
   norm-outlier rule off (``outlier_factor=None``), as the transcoder studies were run.
2. :func:`open_pair` checks it: same model weights, windows, layers and the same stored position of every row.
3. :func:`pair_batches` zips the two stores' ``iter_batches`` with the same seed: the permutation depends
   only on the seed, the epoch and the row count, so each batch is ``(resid_mid rows, mlp_out rows)`` of the
   same tokens.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from crosslayer.errors import CrosslayerError
from crosslayer.store import ActivationStore

INPUT_KIND, TARGET_KIND = "resid_mid", "mlp_out"


class StorePair(NamedTuple):
    """A transcoder's training data: input (resid_mid) and target (mlp_out) stores, row-aligned."""

    inputs: ActivationStore
    targets: ActivationStore

    @property
    def path(self) -> Path:
        return self.inputs.path.parent


def harvest_pair(model, windows, *, out_dir: str | Path, layers: str | list[int] = "all", dtype: str = "bfloat16",
                 batch_size: int = 8, shard_mb: float = 128.0, progress: bool = True) -> StorePair:
    """Harvest ``resid_mid`` and ``mlp_out`` of ``layers`` over ``windows`` in one forward pass into
    ``out_dir/resid_mid`` and ``out_dir/mlp_out`` (module docstring, step 1); a rerun resumes both stores."""
    from crosslayer.harvest import harvest_stores

    out = Path(out_dir)
    harvest_stores(model, windows, {kind: out / kind for kind in (INPUT_KIND, TARGET_KIND)}, layers=layers,
                   dtype=dtype, batch_size=batch_size, shard_mb=shard_mb, outlier_factor=None, progress=progress)
    return open_pair(out)


def open_pair(path: str | Path) -> StorePair:
    """The two stores of a pair folder, checked to be row-aligned (module docstring, step 2)."""
    path = Path(path)
    if not (path / INPUT_KIND).is_dir() or not (path / TARGET_KIND).is_dir():
        raise CrosslayerError(f"{path} is not a transcoder store pair (it needs {INPUT_KIND}/ and {TARGET_KIND}/ "
                              "stores); create one with `crosslayer harvest --hook resid_mid,mlp_out --out DIR`")
    pair = StorePair(ActivationStore(path / INPUT_KIND), ActivationStore(path / TARGET_KIND))
    a, b = pair.inputs.manifest, pair.targets.manifest
    if (a["hook_kind"], b["hook_kind"]) != (INPUT_KIND, TARGET_KIND):
        raise CrosslayerError(f"{path}: expected {INPUT_KIND} and {TARGET_KIND} stores, got {a['hook_kind']} and "
                              f"{b['hook_kind']}; harvest the pair again")
    for key in ("weights_id", "windows_sha256", "layers", "width", "n_rows"):
        if a.get(key) != b.get(key):
            raise CrosslayerError(f"the stores of {path} differ in {key}; harvest the pair again with "
                                  "`crosslayer harvest --hook resid_mid,mlp_out`")
    rows = np.arange(pair.inputs.n_rows)
    if not np.array_equal(pair.inputs.flat_index(rows), pair.targets.flat_index(rows)):
        raise CrosslayerError(f"the stores of {path} keep different token positions (harvested with the outlier "
                              "rule?); harvest the pair again with `crosslayer harvest --hook resid_mid,mlp_out`")
    return pair


def pair_batches(pair: StorePair, batch_size: int, *, layers: list[int] | None = None, seed: int = 0,
                 epochs: int | None = None, buffer_rows: int = 8192) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_BLD, target_BLD)`` normalised batches of the same tokens (module docstring, step 3)."""
    kwargs = dict(layers=layers, normalized=True, seed=seed, epochs=epochs, buffer_rows=buffer_rows)
    return zip(pair.inputs.iter_batches(batch_size, **kwargs), pair.targets.iter_batches(batch_size, **kwargs))


def heldout_pair(pair: StorePair, layers: list[int], in_factors, out_factors, *, rows: int = 4096,
                 seed: int = 12345) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of ``rows`` aligned rows of a held-out pair, in the training pair's units."""
    from crosslayer.training import heldout_sample

    return (heldout_sample(pair.inputs, layers, in_factors, rows=rows, seed=seed),
            heldout_sample(pair.targets, layers, out_factors, rows=rows, seed=seed))


def train_transcoder_from_pair(pair: StorePair | str | Path, model_cfg, cfg, *, out_dir: str | Path,
                               heldout_pair_path: StorePair | str | Path | None = None, device: str = "cpu",
                               progress: bool = True):
    """Train a CLT or PLT (:class:`~crosslayer.clt.CLTConfig`) on a store pair with the crosscoder trainer
    (:func:`crosslayer.training.train_crosscoder`): an endless token-shuffled stream of aligned batches seeded
    by ``cfg.seed``; ``heldout_pair_path`` adds the held-out FVU of the MLP outputs to the curve."""
    from crosslayer.dictionary import store_provenance
    from crosslayer.training import HELDOUT_ROWS, train_crosscoder

    pair = pair if isinstance(pair, StorePair) else open_pair(pair)
    layers = list(model_cfg.layers)
    chosen_in, chosen_out = pair.inputs.select(layers), pair.targets.select(layers)
    if model_cfg.d_model != pair.inputs.width:
        raise CrosslayerError(f"d_model {model_cfg.d_model} != store width {pair.inputs.width}; use the store's width")
    pair.inputs.verify()
    pair.targets.verify()
    heldout = None
    if heldout_pair_path is not None:
        held = heldout_pair_path if isinstance(heldout_pair_path, StorePair) else open_pair(heldout_pair_path)
        heldout = heldout_pair(held, layers, chosen_in.norm_factors, chosen_out.norm_factors, rows=HELDOUT_ROWS)
    buffer = max(2 * cfg.batch_size, 8192)

    def make_batches(start_step: int):
        return itertools.islice(pair_batches(pair, cfg.batch_size, layers=layers, seed=cfg.seed, buffer_rows=buffer),
                                start_step, None)

    provenance = {k: v for k, v in store_provenance(pair.inputs).items() if k not in ("path", "hook_kind")}
    return train_crosscoder(cfg, model_cfg, make_batches, out_dir=out_dir, hooks=chosen_in.hooks,
                            norm_factors=chosen_in.norm_factors, target_hooks=chosen_out.hooks,
                            target_norm_factors=chosen_out.norm_factors, heldout=heldout, device=device,
                            progress=progress, meta={"store": provenance, "store_path": str(pair.path)})
