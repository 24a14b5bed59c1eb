"""The shared activation harvester: one forward pass over token windows -> an ActivationStore.

Method:
1. Validate everything first (hook kind, layers, widths, the ``out`` folder, token counts), so bad
   input fails before anything is written.
2. Split the windows into shards of ``windows_per_shard`` windows (sized to ~``shard_mb`` MB).
   Each shard is computed in batches: the model runs with hooks on the chosen layers and stops
   after the last needed block (``stop_at_layer``), so the unembedding is never computed.
3. Exclusion policy (offline-model.md, "attention sinks"): position 0 of every window and special
   tokens (``<|endoftext|>`` etc.) are never stored. Rows whose norm at any layer exceeds
   ``outlier_factor`` x that layer's median norm (median over the batch's ordinary tokens) are
   dropped too (``outlier_factor=None`` keeps them). Counts of each exclusion go in the manifest.
4. Each shard is written under temporary names and renamed when complete, then a sidecar JSON with
   its row count, checksums and per-layer norm sums is renamed into place; a shard counts as done
   only once its sidecar exists. Writes happen on a background thread while the next shard runs.
5. A rerun of the same harvest skips finished shards whose files still match their sidecar's
   SHA-256s and recomputes the others (missing, unreadable sidecar, corrupted files), so a run killed at
   any moment (kill -9) resumes and ends with a store identical to an uninterrupted one, and a rerun
   over a finished store that fails its checks rewrites only the bad shards. The manifest is finalised with
   the per-layer normalisation factors (sqrt(width) / mean norm).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import crosslayer
from crosslayer.corpus import TokenWindows
from crosslayer.errors import CrosslayerError
from crosslayer.hooks import HOOK_KINDS, hook_name  # noqa: F401 (harvest.HOOK_KINDS stays importable)
from crosslayer.io import atomic_path, claim_folder, release_folder, sha256_file, write_json, xxh3_file
from crosslayer.store import FORMAT_VERSION, SHARD_KEYS, ActivationStore, from_torch16, mean_norm_factor


def parse_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """``"all"``, ``"3"``, ``"0-5"``, ``"0,4,8"``, ``"10-"`` or ``"0-5,12"`` -> sorted layer list."""
    if isinstance(spec, (list, tuple)):
        layers = [int(x) for x in spec]
    elif str(spec).strip() == "all":
        layers = list(range(n_layers))
    else:
        layers = []
        try:
            for part in str(spec).split(","):
                lo, dash, hi = part.strip().partition("-")
                if dash:
                    layers.extend(range(int(lo), (int(hi) if hi else n_layers - 1) + 1))
                else:
                    layers.append(int(lo))
        except ValueError:
            raise CrosslayerError(f"cannot parse layers {spec!r}; use all, 5, 0-5, 0,4,8 or 10-") from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise CrosslayerError(f"layer(s) {bad or spec} out of range: the model has layers 0..{n_layers - 1}")
    repeated = sorted({l for l in layers if layers.count(l) > 1})
    if repeated:
        raise CrosslayerError(f"layer {repeated[0]} is repeated in layers {spec!r}; name each layer once")
    return sorted(layers)


def check_seq_len(model, seq_len: int) -> None:
    """Refuse windows longer than the model's context (``model.cfg.n_ctx``)."""
    if seq_len > model.cfg.n_ctx:
        raise CrosslayerError(f"--seq-len {seq_len} is longer than the context of model {model.cfg.model_name} "
                              f"({model.cfg.n_ctx} tokens); use --seq-len {model.cfg.n_ctx} or less")


def hook_names(model, kind: str, layers: list[int]) -> tuple[list[str], int]:
    """TransformerLens hook names for ``kind`` at ``layers`` and their common width."""
    names = [hook_name(kind, l) for l in layers]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise CrosslayerError(f"model {model.cfg.model_name} has no hook {missing[0]}")
    width = model.cfg.d_mlp if kind == "mlp_post" else model.cfg.d_model
    return names, int(width)


def _plan(model, windows: TokenWindows, *, hook, layers, names, width, dtype, batch_size,
          shard_mb, exclude_position0, outlier_factor, special_ids) -> dict:
    bytes_per_window = windows.seq_len * len(layers) * width * 2
    per_shard = max(1, int(shard_mb * 2**20) // bytes_per_window)
    if per_shard >= batch_size:
        per_shard -= per_shard % batch_size
    return {
        "format": FORMAT_VERSION,
        "model": getattr(model, "crosslayer_name", model.cfg.model_name),
        "weights_id": getattr(model, "crosslayer_weights_id", "unknown"),
        "model_dtype": str(model.cfg.dtype).removeprefix("torch."),
        "d_model": int(model.cfg.d_model),
        "n_model_layers": int(model.cfg.n_layers),
        "hook_kind": hook, "layers": layers, "hooks": names, "width": width, "dtype": dtype,
        "corpus_id": windows.corpus_id, "split": windows.split, "seed": windows.seed,
        "seq_len": windows.seq_len, "n_windows": len(windows),
        "windows_sha256": _tensor_sha(windows.tokens),
        "batch_size": batch_size, "windows_per_shard": per_shard,
        "exclusion_policy": {"position0": exclude_position0, "special_token_ids": special_ids,
                             "outlier_factor": outlier_factor,
                             "outlier_rule": "drop a row if its norm at any layer > outlier_factor x "
                                             "the layer's median norm over the batch's ordinary tokens"},
    }


def _tensor_sha(tensor: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def harvest(model, windows: TokenWindows, *, out_dir: str | Path, hook: str = "resid_post",
            layers: str | list[int] = "all", dtype: str = "bfloat16", batch_size: int = 8,
            shard_mb: float = 128.0, exclude_position0: bool = True, outlier_factor: float | None = 10.0,
            progress: bool = True) -> ActivationStore:
    """Run ``model`` over ``windows`` once and store the chosen hooks' activations in ``out_dir``."""
    return harvest_stores(model, windows, {hook: out_dir}, layers=layers, dtype=dtype, batch_size=batch_size,
                          shard_mb=shard_mb, exclude_position0=exclude_position0, outlier_factor=outlier_factor,
                          progress=progress)[hook]


def harvest_stores(model, windows: TokenWindows, outs: dict[str, str | Path], *, layers: str | list[int] = "all",
                   dtype: str = "bfloat16", batch_size: int = 8, shard_mb: float = 128.0,
                   exclude_position0: bool = True, outlier_factor: float | None = 10.0,
                   progress: bool = True) -> dict[str, ActivationStore]:
    """One pass of ``model`` over ``windows`` storing each hook kind of ``outs`` (kind -> folder) in its own
    store. The stores keep the same rows (the same tokens, row for row): the exclusion rules, the outlier
    rule included, are decided once per token over every hook read. Each store resumes and repairs as a
    single harvest does; a shard missing or bad in any store is recomputed for all."""
    if dtype not in ("bfloat16", "float16"):
        raise CrosslayerError(f"store dtype must be bfloat16 or float16, got {dtype!r}")
    if batch_size < 1:
        raise CrosslayerError(f"batch_size must be >= 1, got {batch_size}")
    if outlier_factor is not None and not outlier_factor > 0:
        raise CrosslayerError(f"outlier_factor must be > 0 (or None to keep outliers), got {outlier_factor}")
    check_seq_len(model, windows.seq_len)
    layer_list = parse_layers(layers, model.cfg.n_layers)
    special_ids = sorted(int(i) for i in (model.tokenizer.all_special_ids if model.tokenizer else []))
    plans, paths = {}, {kind: Path(out) for kind, out in outs.items()}
    for kind in outs:
        names, width = hook_names(model, kind, layer_list)
        plans[kind] = _plan(model, windows, hook=kind, layers=layer_list, names=names, width=width, dtype=dtype,
                            batch_size=batch_size, shard_mb=shard_mb, exclude_position0=exclude_position0,
                            outlier_factor=outlier_factor, special_ids=special_ids)
    if len({plan["width"] for plan in plans.values()}) > 1:
        raise CrosslayerError(f"hook kinds {sorted(outs)} have different widths; harvest them separately")
    claims = {kind: claim_folder(paths[kind], plans[kind], record="manifest.json", what="activation store",
                                 extra={"status": "harvesting", "package_version": crosslayer.__version__})
              for kind in outs}
    todo = sorted(set().union(*(_bad_shards(paths[k], plans[k]) for k in outs)))
    for kind, claimed in claims.items():
        if claimed is not None and claimed.get("status") == "complete" and todo:
            write_json({**plans[kind], "status": "harvesting", "package_version": crosslayer.__version__},
                       paths[kind] / "manifest.json")  # readers refuse the store until the repair finishes
    complete = not todo and all(c is not None and c.get("status") == "complete" for c in claims.values())
    try:
        for out in paths.values():
            _write_windows(out, windows)  # (restores only window files that were deleted or damaged)
        if todo:
            _run_shards(model, windows, paths, plans, todo, progress)
        stores = {kind: ActivationStore(paths[kind]) if complete else _finalise(paths[kind], plans[kind])
                  for kind in outs}
    except NonFiniteActivations:
        for out in paths.values():
            shutil.rmtree(out, ignore_errors=True)  # this harvest can never succeed: leave nothing behind
        raise
    except OSError as err:  # a full disk, a folder made read-only: finished shards are kept
        raise CrosslayerError(f"cannot write the store in {', '.join(map(str, paths.values()))} "
                              f"({err.strerror or err}); free space or fix the folder, then rerun the harvest "
                              "command to resume") from None
    for out in paths.values():
        release_folder(out)  # (a failed harvest keeps its locks until the process exits)
    return stores


class NonFiniteActivations(CrosslayerError):
    """The model produced NaN/inf activations."""


def _write_windows(out: Path, windows: TokenWindows) -> None:
    arrays = {"windows": windows.tokens.to(torch.int32), "windows_doc": windows.doc_ids.to(torch.int32),
              "windows_label": windows.labels.to(torch.int16)}
    for name, tensor in arrays.items():
        if not _same_array(out / f"{name}.npy", tensor.numpy()):
            with atomic_path(out / f"{name}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, tensor.numpy())
    docs = {"label_names": windows.label_names, "doc_keys": windows.doc_keys}
    try:
        same = json.loads((out / "docs.json").read_text()) == docs
    except (OSError, ValueError):
        same = False
    if not same:
        write_json(docs, out / "docs.json")


def _same_array(path: Path, array: np.ndarray) -> bool:
    """Whether ``path`` holds exactly ``array`` (False if missing or unreadable)."""
    try:
        saved = np.load(path)
    except (OSError, ValueError):
        return False
    return saved.dtype == array.dtype and np.array_equal(saved, array)


def _shard_done(out: Path, index: int, *, check: bool = True) -> dict | None:
    """Shard ``index``'s sidecar if the shard is finished: sidecar readable, both files present and (with
    ``check``) matching the sidecar's SHA-256s; None if it must be (re)computed."""
    sidecar = out / "shards" / f"shard-{index:05d}.json"
    try:
        info = json.loads(sidecar.read_text())
        files = [(out / "shards" / info[f"{k}_file"], info[f"{k}_sha256"]) for k in ("acts", "rows")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if all(path.is_file() and (not check or sha256_file(path) == sha) for path, sha in files):
        return info
    return None


def _n_shards(plan: dict) -> int:
    return -(-plan["n_windows"] // plan["windows_per_shard"])


def _bad_shards(out: Path, plan: dict) -> list[int]:
    """Indices of the shards of ``out`` that must be recomputed."""
    return [i for i in range(_n_shards(plan)) if _shard_done(out, i) is None]


def _run_shards(model, windows: TokenWindows, outs: dict[str, Path], plans: dict[str, dict], todo: list[int],
                progress: bool) -> None:
    """Compute the ``todo`` shards once, reading every store's hooks in one pass, and write each store's part."""
    kinds = list(outs)
    plan = {**plans[kinds[0]], "hooks": [n for k in kinds for n in plans[k]["hooks"]],
            "layers": [l for k in kinds for l in plans[k]["layers"]]}
    L = len(plans[kinds[0]]["layers"])
    for out in outs.values():
        (out / "shards").mkdir(exist_ok=True)  # (claim_folder swept the partial files of a killed run)
        for index in todo:  # a bad shard counts as unfinished until its new sidecar is written
            (out / "shards" / f"shard-{index:05d}.json").unlink(missing_ok=True)
    per_shard, n_windows = plan["windows_per_shard"], plan["n_windows"]
    done_tokens = (_n_shards(plan) - len(todo)) * per_shard * plan["seq_len"]
    bar = tqdm(total=n_windows * plan["seq_len"], initial=min(done_tokens, n_windows * plan["seq_len"]),
               unit="tok", unit_scale=True, desc="harvest", disable=not progress, smoothing=0.1)
    writer = ThreadPoolExecutor(max_workers=1)
    pending = []
    try:
        for index in todo:
            lo, hi = index * per_shard, min(n_windows, (index + 1) * per_shard)
            acts, rows, stats = _compute_shard(model, windows, lo, hi, plan, bar)
            while pending:  # bound memory: at most one shard waiting for the disk
                pending.pop(0).result()
            for i, kind in enumerate(kinds):
                part = slice(i * L, (i + 1) * L)
                pending.append(writer.submit(_write_shard, outs[kind], index, np.ascontiguousarray(acts[:, part]),
                                             rows, {**stats, "norm_sums": stats["norm_sums"][part]}, plan["dtype"]))
        for job in pending:
            job.result()
    finally:
        writer.shutdown(wait=True)
        bar.close()


@torch.no_grad()
def _compute_shard(model, windows: TokenWindows, lo: int, hi: int, plan: dict, bar):
    names, layers, width = plan["hooks"], plan["layers"], plan["width"]
    seq_len, batch_size = plan["seq_len"], plan["batch_size"]
    policy = plan["exclusion_policy"]
    special = torch.tensor(policy["special_token_ids"], dtype=torch.int64)
    stop_at = max(layers) + 1
    slot = {name: i for i, name in enumerate(names)}
    acts_parts, rows_parts = [], []
    stats = {"rows": 0, "tokens": 0, "excluded_position0": 0, "excluded_special": 0,
             "excluded_outliers": 0, "norm_sums": np.zeros(len(layers))}
    for start in range(lo, hi, batch_size):
        tokens = windows.tokens[start:min(hi, start + batch_size)]
        n_b = tokens.shape[0]
        buf = torch.empty(n_b, seq_len, len(layers), width, dtype=model.cfg.dtype, device=model.cfg.device)

        def grab(act, hook):
            buf[:, :, slot[hook.name]] = act

        model.run_with_hooks(tokens, fwd_hooks=[(n, grab) for n in names], stop_at_layer=stop_at,
                             return_type=None)
        rows_BT = buf.reshape(n_b * seq_len, len(layers), width).cpu()  # one copy per batch from a GPU
        norms = rows_BT.float().norm(dim=-1)  # [BT, L]
        if not torch.isfinite(norms).all():
            raise NonFiniteActivations(f"NaN/inf activations in windows {start}..{start + n_b - 1}; the model "
                                  "or its dtype is broken (try --model-dtype float32); nothing was stored")
        flat_tok = tokens.reshape(-1)
        pos = torch.arange(seq_len).repeat(n_b)
        is_pos0 = (pos == 0) if policy["position0"] else torch.zeros_like(pos, dtype=torch.bool)
        is_special = torch.isin(flat_tok, special) & ~is_pos0
        keep = ~is_pos0 & ~is_special
        stats["excluded_position0"] += int(is_pos0.sum())
        stats["excluded_special"] += int(is_special.sum())
        if policy["outlier_factor"] is not None and keep.any():
            median = norms[keep].median(dim=0).values  # [L]
            outlier = (norms > policy["outlier_factor"] * median).any(dim=1) & keep
            stats["excluded_outliers"] += int(outlier.sum())
            keep &= ~outlier
        idx = keep.nonzero()[:, 0]
        acts_parts.append(from_torch16(rows_BT[idx], plan["dtype"]))
        rows_parts.append((start * seq_len + idx).numpy())
        stats["norm_sums"] += norms[idx].double().sum(dim=0).numpy()
        stats["rows"] += int(idx.numel())
        stats["tokens"] += n_b * seq_len
        bar.update(n_b * seq_len)
    return np.concatenate(acts_parts), np.concatenate(rows_parts).astype(np.int64), stats


def _write_shard(out: Path, index: int, acts: np.ndarray, rows: np.ndarray, stats: dict, dtype: str) -> None:
    shard_dir = out / "shards"
    info = {"index": index, "acts_file": f"shard-{index:05d}.acts.npy",
            "rows_file": f"shard-{index:05d}.rows.npy"}
    for key, array in (("acts", acts), ("rows", rows)):
        with atomic_path(shard_dir / info[f"{key}_file"]) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
                fh.flush()
                os.fsync(fh.fileno())
        info[f"{key}_sha256"] = sha256_file(shard_dir / info[f"{key}_file"])
        info[f"{key}_xxh3"] = xxh3_file(shard_dir / info[f"{key}_file"])
    info.update({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()})
    write_json(info, shard_dir / f"shard-{index:05d}.json")


def _finalise(out: Path, plan: dict) -> ActivationStore:
    infos = [_shard_done(out, i, check=False) for i in range(_n_shards(plan))]
    if any(info is None for info in infos):
        raise CrosslayerError(f"harvest in {out} is missing shards; run the same command again")
    totals = {k: sum(info[k] for info in infos) for k in
              ("rows", "tokens", "excluded_position0", "excluded_special", "excluded_outliers")}
    if totals["rows"] == 0:
        raise CrosslayerError("every token was excluded; use longer windows or more tokens")
    norm_sums = np.sum([info["norm_sums"] for info in infos], axis=0)
    manifest = {
        **plan, "status": "complete", "package_version": crosslayer.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_rows": totals["rows"], "n_tokens_seen": totals["tokens"],
        "excluded": {k.removeprefix("excluded_"): v for k, v in totals.items() if k.startswith("excluded_")},
        "mean_norms": (norm_sums / totals["rows"]).tolist(),
        "norm_factors": mean_norm_factor(norm_sums, totals["rows"], plan["width"]),
        "shards": [{k: info[k] for k in SHARD_KEYS if k in info}
                   for info in infos],
    }
    write_json(manifest, out / "manifest.json")
    return ActivationStore(out)
