"""The on-disk activation store: token-aligned ``[token, layer, width]`` rows in 16-bit shards.

Layout of a store folder (format 1)::

    manifest.json              provenance, hooks, dtype, rows, shard checksums, norm factors, exclusions
    windows.npy                int32 [n_windows, seq_len]  token ids of every harvested window
    windows_doc.npy            int32 [n_windows, seq_len]  document index (-1 = separator)
    windows_label.npy          int16 [n_windows, seq_len]  source-label index (-1 = separator)
    docs.json                  document keys and label names (the indices above point here)
    shards/shard-00000.acts.npy   [rows, n_layers, width]  uint16 (bfloat16 bits) or float16
    shards/shard-00000.rows.npy   int64 [rows]  flat index window * seq_len + position of each row
    shards/shard-00000.json       sidecar: rows, checksums, per-layer norm sums, exclusion counts

Only kept rows are stored (attention-sink positions, separators and norm outliers are excluded
at harvest time); ``windows*.npy`` keep every token so any row's context can be rebuilt.

Integrity: opening a store refuses it when a shard's sidecar is missing (an incomplete store), and
the first time a process maps a shard (:meth:`ActivationStore._shard_arrays`) the shard's files are
hashed and checked against the checksums of the manifest and the sidecar, so corrupted data is never
used silently. Readers check XXH3-128 (non-cryptographic, ~10x faster than SHA-256 here; enough to
catch flipped bits and truncation); ``crosslayer verify`` and the harvest's resume check SHA-256;
stores written before XXH3 sums existed are checked by SHA-256 everywhere. Cost: each shard is read
once per process, measured by ``crosslayer bench reader``. ``windows.npy`` is checked against the
manifest's ``windows_sha256`` when first read (``windows_doc.npy`` and ``windows_label.npy`` have no
checksum). A shard that fails is refused with one line naming it and the fix: rerun the harvest
command, which recomputes only the bad shards.

Readers memory-map the shards. :meth:`ActivationStore.iter_batches` gives a seeded, exact
token-level shuffle with bounded RAM: each epoch draws a permutation of all rows and serves it in
blocks of ``buffer_rows`` rows; a block's rows are gathered from the memory maps in sorted order
(near-sequential reads) and then emitted in permuted order, so every row appears once per epoch
and memory is ``buffer_rows`` rows whatever the store's size.

Normalisation (research-notes §2): factor_l = sqrt(width) / mean_t ||x_t^l||, so normalised rows
have mean norm sqrt(width) at every layer; ``normalized=True`` applies it, raw units otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from crosslayer.errors import CrosslayerError
from crosslayer.io import sha256_file, xxh3_file

FORMAT_VERSION = 1
REPAIR = "rerun the harvest command, which rewrites only the bad shards"
"""The fix every integrity error names."""
_VERIFIED: set[tuple] = set()
"""(path, size, mtime, sha256) of shard files already hashed in this process."""
HASHES = {"sha256": ("SHA-256", sha256_file), "xxh3": ("XXH3", xxh3_file)}
"""Checksum name -> (label, file hasher). Every shard has both; readers check the fast one."""
SHARD_KEYS = ("acts_file", "rows_file", "acts_sha256", "rows_sha256", "acts_xxh3", "rows_xxh3", "rows")
"""A shard's entry in the manifest."""
STORE_DTYPES = {"bfloat16": np.uint16, "float16": np.float16}


def to_torch16(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A uint16 (bfloat16 bits) or float16 numpy array -> torch tensor of that 16-bit dtype."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def from_torch16(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast to the store dtype and return the numpy array to write."""
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
    return tensor.to(torch.float16).contiguous().numpy()


def _manifest_field(key: str, cast, doc: str) -> property:
    """A read-only property of :class:`ActivationStore` that returns ``cast(manifest[key])``."""
    return property(lambda self: cast(self.manifest[key]), doc=doc)


class LayerSelection(NamedTuple):
    """A subset of a store's layers (what :meth:`ActivationStore.select` returns)."""

    layers: list[int]
    """Model layer indices, ascending."""
    index: list[int]
    """Their positions in the store's layer axis."""
    hooks: list[str]
    """Their hook names."""
    norm_factors: list[float]
    """Their normalisation factors."""


class ActivationStore:
    """Read access to a finished store folder (see the module docstring for the format)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise CrosslayerError(f"{self.path} is not an activation store (no manifest.json); "
                                  "create one with `crosslayer harvest --out DIR`")
        self.manifest = _read_manifest(manifest_path)
        if self.manifest.get("format") != FORMAT_VERSION:
            raise CrosslayerError(f"{self.path} has store format {self.manifest.get('format')}, this "
                                  f"crosslayer reads format {FORMAT_VERSION}; harvest it again")
        if self.manifest.get("status") != "complete":
            raise CrosslayerError(f"{self.path} is an unfinished harvest; run the same `crosslayer "
                                  "harvest` command again to finish it")
        self.shards = self.manifest["shards"]
        for shard in self.shards:
            if not self._sidecar_path(shard).is_file():
                raise CrosslayerError(f"store {self.path} is incomplete: sidecar shards/{self._sidecar_path(shard).name} "
                                      f"is missing; {REPAIR}")
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self._acts: dict[int, np.ndarray] = {}
        self._rows: dict[int, np.ndarray] = {}
        self._windows = None
        self._means: dict[tuple[int, ...], torch.Tensor] = {}

    # ------------------------------------------------------------------ properties
    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    layers = _manifest_field("layers", list, "Model layer indices stored, ascending.")
    hooks = _manifest_field("hooks", list, "Hook name of each stored layer.")
    width = _manifest_field("width", int, "Width of each stored row at each layer.")
    dtype = _manifest_field("dtype", str, "Storage dtype: bfloat16 | float16.")
    seq_len = _manifest_field("seq_len", int, "Tokens per harvested window.")

    @property
    def n_layers(self) -> int:
        return len(self.manifest["layers"])

    @property
    def norm_factors(self) -> torch.Tensor:
        """Per-layer factors [n_layers] that scale raw rows to mean norm sqrt(width)."""
        return torch.tensor(self.manifest["norm_factors"], dtype=torch.float32)

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({str(self.path)!r}, model={m['model']!r}, split={m['split']!r}, "
                f"rows={self.n_rows:,}, layers={self.n_layers}, width={self.width}, dtype={self.dtype})")

    def disk_bytes(self) -> int:
        """Bytes the store takes on disk."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    # ------------------------------------------------------------------ checks
    def verify(self) -> None:
        """Recompute every shard's SHA-256s and the windows'; raise naming the first file that does not match."""
        for i in range(len(self.shards)):
            self._check_shard(i, algorithm="sha256")
        self._window_arrays()

    def _sidecar_path(self, shard: dict) -> Path:
        return self.path / "shards" / shard["acts_file"].replace(".acts.npy", ".json")

    def _check_shard(self, i: int, algorithm: str | None = None) -> None:
        """Shard ``i``'s files exist and match the checksums of the manifest and of its sidecar: XXH3
        where the store has them (every reader, on first map), else (older stores, ``verify``) SHA-256."""
        shard, sidecar = self.shards[i], self._sidecar_path(self.shards[i])
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            raise CrosslayerError(f"store {self.path} is incomplete: sidecar shards/{sidecar.name} is missing or "
                                  f"unreadable; {REPAIR}") from None
        algorithm = algorithm or ("xxh3" if "acts_xxh3" in shard else "sha256")
        for key in ("acts", "rows"):
            path, field = self.path / "shards" / shard[f"{key}_file"], f"{key}_{algorithm}"
            if not path.is_file():
                raise CrosslayerError(f"shard file {path} is missing; {REPAIR}")
            if info.get(field) != shard[field]:
                raise CrosslayerError(f"shard {path.name} is inconsistent (sidecar {sidecar.name} and manifest.json "
                                      f"disagree on its checksum) in {self.path}; {REPAIR}")
            if not _hash_matches(path, shard[field], algorithm):
                raise CrosslayerError(f"shard {path.name} is corrupted ({HASHES[algorithm][0]} mismatch) in "
                                      f"{self.path}; {REPAIR}")

    # ------------------------------------------------------------------ raw access
    def _shard_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._acts:
            self._check_shard(i)
            shard = self.shards[i]
            acts_path = self.path / "shards" / shard["acts_file"]
            rows_path = self.path / "shards" / shard["rows_file"]
            try:
                acts = np.load(acts_path, mmap_mode="r")
                rows = np.load(rows_path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise CrosslayerError(f"shard {acts_path.name} cannot be read ({err}); {REPAIR}") from None
            if acts.shape != (shard["rows"], self.n_layers, self.width) or rows.shape != (shard["rows"],):
                raise CrosslayerError(f"shard {acts_path.name} is corrupted (shape {acts.shape}, expected "
                                      f"{(shard['rows'], self.n_layers, self.width)}); {REPAIR}")
            self._acts[i], self._rows[i] = acts, rows
        return self._acts[i], self._rows[i]

    def select(self, layers: str | list[int] | None = None) -> LayerSelection:
        """The store's layers named by ``layers`` (None: all; a list of model layers; or a spec such as
        ``"0-5"``, ``"all"``, ``"10-"``), with their positions, hooks and factors; the one place a
        subset of a store's layers is chosen. A layer the store lacks is a one-line error."""
        if layers is None:
            chosen = self.layers
        elif isinstance(layers, str):
            from crosslayer.harvest import parse_layers

            chosen = parse_layers(layers, int(self.manifest.get("n_model_layers", max(self.layers) + 1)))
        else:
            chosen = [int(l) for l in layers]
        missing = [l for l in chosen if l not in self.layers]
        if missing or not chosen:
            raise CrosslayerError(f"layers {missing or chosen} are not in store {self.path} (it has {self.layers}); "
                                  "choose among those or harvest them")
        index = [self.layers.index(l) for l in chosen]
        factors = self.manifest["norm_factors"]
        return LayerSelection(chosen, index, [self.hooks[i] for i in index], [float(factors[i]) for i in index])

    def _layer_index(self, layers: list[int] | None) -> np.ndarray | None:
        return None if layers is None else np.array(self.select(layers).index)

    def get(self, index, *, layers: list[int] | None = None, normalized: bool = False,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``index`` (any order; ints or a 1-D array) as ``[n, n_layers, width]``."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.n_rows):
            raise CrosslayerError(f"row index out of range 0..{self.n_rows - 1}")
        layer_idx = self._layer_index(layers)
        n_l = self.n_layers if layer_idx is None else len(layer_idx)
        out = torch.empty(index.size, n_l, self.width, dtype=dtype)
        order = np.argsort(index, kind="stable")  # read each shard in ascending row order
        sorted_idx = index[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        for shard in np.unique(shard_of):
            acts, _ = self._shard_arrays(int(shard))
            sel = shard_of == shard
            local = sorted_idx[sel] - self.offsets[shard]
            block = acts[local] if layer_idx is None else acts[local[:, None], layer_idx[None, :]]
            out[torch.from_numpy(order[sel])] = to_torch16(block, self.dtype).to(dtype)
            _drop_mapped_pages(acts)
        if normalized:
            factors = self.norm_factors if layer_idx is None else self.norm_factors[layer_idx]
            out.mul_(factors.to(dtype)[None, :, None])
        return out

    def iter_batches(self, batch_size: int, *, layers: list[int] | None = None, normalized: bool = True,
                     shuffle: bool = True, seed: int = 0, epochs: int | None = 1,
                     buffer_rows: int = 8192, drop_last: bool = True,
                     dtype: torch.dtype = torch.float32,
                     part: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """Yield ``[batch_size, n_layers, width]`` batches; see the module docstring for the shuffle.

        ``epochs=None`` repeats forever (each epoch a fresh permutation from ``seed + epoch``).
        RAM use is about ``buffer_rows`` rows, independent of the store's size. ``part=(i, n)`` (data
        parallel): only rows [i B / n, (i + 1) B / n) of every batch are read and yielded (B divisible by n), so
        the n parts of a batch are disjoint and together the single-process batch.
        """
        if batch_size < 1:
            raise CrosslayerError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and self.n_rows < batch_size:
            raise CrosslayerError(f"store {self.path} has {self.n_rows} rows, fewer than one batch of {batch_size}")
        if part is not None and not drop_last:
            raise CrosslayerError("part needs drop_last (every rank takes the same number of batches)")
        orders = self.batch_orders(batch_size, shuffle=shuffle, seed=seed, epochs=epochs, part=part)
        batch_size //= 1 if part is None else part[1]
        block = max(batch_size, (buffer_rows // batch_size) * batch_size)
        for perm in orders:
            carry = None
            for start in range(0, len(perm), block):
                rows = self.get(perm[start:start + block], layers=layers, normalized=normalized, dtype=dtype)
                if carry is not None:
                    rows = torch.cat([carry, rows])
                    carry = None
                n_full = rows.shape[0] // batch_size
                for b in range(n_full):
                    yield rows[b * batch_size:(b + 1) * batch_size]
                if rows.shape[0] > n_full * batch_size:
                    carry = rows[n_full * batch_size:]
            if carry is not None and not drop_last:
                yield carry

    def batch_orders(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epochs: int | None = 1,
                     part: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """Each epoch's row order (the one shuffle of :meth:`iter_batches`): a seeded permutation of every row;
        with ``part=(i, n)`` only rows [i B / n, (i + 1) B / n) of each whole batch of B, in order."""
        if part is not None and (batch_size % part[1] or not 0 <= part[0] < part[1]):
            raise CrosslayerError(f"part {part}: the batch size {batch_size} must be divisible by {part[1]}")
        epoch = 0
        while epochs is None or epoch < epochs:
            if shuffle:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                perm = torch.randperm(self.n_rows, generator=gen).numpy()
            else:
                perm = np.arange(self.n_rows)
            if part is not None:
                b = batch_size // part[1]
                whole = perm[:self.n_rows // batch_size * batch_size].reshape(-1, batch_size)
                perm = whole[:, part[0] * b:(part[0] + 1) * b].reshape(-1)
            yield perm
            epoch += 1

    # ------------------------------------------------------------------ metadata and context
    def _window_arrays(self):
        if self._windows is None:
            try:
                windows = {name: np.load(self.path / f"{name}.npy", mmap_mode="r")
                           for name in ("windows", "windows_doc", "windows_label")}
                self._docs = json.loads((self.path / "docs.json").read_text())
            except (OSError, ValueError) as err:
                raise CrosslayerError(f"the windows of store {self.path} cannot be read ({type(err).__name__}); "
                                      f"{REPAIR}") from None
            self._check_windows(windows["windows"])
            self._windows = windows
        return self._windows

    def _check_windows(self, tokens: np.ndarray) -> None:
        """windows.npy matches the manifest's ``windows_sha256`` (of the tokens as int64)."""
        expected = self.manifest.get("windows_sha256")
        digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()
        if expected is not None and digest != expected:
            raise CrosslayerError(f"windows.npy of store {self.path} is corrupted (SHA-256 mismatch); {REPAIR}")

    @property
    def label_names(self) -> list[str]:
        self._window_arrays()
        return list(self._docs["label_names"])

    @property
    def doc_keys(self) -> list[str]:
        self._window_arrays()
        return list(self._docs["doc_keys"])

    def flat_index(self, index) -> np.ndarray:
        """``window * seq_len + position`` of rows ``index``."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty_like(index)
        for shard in np.unique(shard_of):
            _, rows = self._shard_arrays(int(shard))
            mask = shard_of == shard
            out[mask] = rows[index[mask] - self.offsets[shard]]
        return out

    def row_of_flat(self, flat) -> np.ndarray:
        """Inverse of :meth:`flat_index`: the row stored for each ``window * seq_len + position``, -1 where
        that position was not stored (excluded at harvest)."""
        if getattr(self, "_row_of_flat", None) is None:
            flat_all = self.flat_index(np.arange(self.n_rows))
            inverse = np.full(int(flat_all.max()) + 1 if len(flat_all) else 0, -1, dtype=np.int64)
            inverse[flat_all] = np.arange(self.n_rows)
            self._row_of_flat = inverse
        flat = np.asarray(flat, dtype=np.int64)
        inside = (flat >= 0) & (flat < len(self._row_of_flat))
        return np.where(inside, self._row_of_flat[np.clip(flat, 0, max(len(self._row_of_flat) - 1, 0))], -1)

    def meta(self, index=None) -> dict[str, np.ndarray]:
        """Per-row metadata: token_id, doc_id, label (index), window, position. All rows if ``index`` is None."""
        if index is None:
            flat = np.concatenate([self._shard_arrays(i)[1] for i in range(len(self.shards))]) \
                if self.shards else np.zeros(0, np.int64)
        else:
            flat = self.flat_index(index)
        win = self._window_arrays()
        window, position = flat // self.seq_len, flat % self.seq_len
        return {"token_id": win["windows"].reshape(-1)[flat].astype(np.int64),
                "doc_id": win["windows_doc"].reshape(-1)[flat].astype(np.int64),
                "label": win["windows_label"].reshape(-1)[flat].astype(np.int64),
                "window": window, "position": position}

    def context(self, row: int, *, before: int = 24, after: int = 8) -> dict:
        """The tokens around row ``row`` within its window: ids, the row's offset in them, metadata."""
        flat = int(self.flat_index([row])[0])
        window, position = divmod(flat, self.seq_len)
        tokens = self._window_arrays()["windows"][window]
        lo, hi = max(0, position - before), min(self.seq_len, position + after + 1)
        return {"token_ids": tokens[lo:hi].astype(np.int64).tolist(), "focus": position - lo,
                "window": window, "position": position,
                "doc_key": self.doc_keys[int(self._windows["windows_doc"][window, position])],
                "label": self.label_names[int(self._windows["windows_label"][window, position])]}

    def window_tokens(self) -> torch.Tensor:
        """All harvested windows' token ids ``[n_windows, seq_len]`` (for re-running the model)."""
        return torch.from_numpy(np.asarray(self._window_arrays()["windows"], dtype=np.int64))

    def window_docs(self) -> torch.Tensor:
        """All harvested windows' document indices ``[n_windows, seq_len]`` int64 (-1 = separator)."""
        return torch.from_numpy(np.asarray(self._window_arrays()["windows_doc"], dtype=np.int64))

    def mean(self, layers: list[int] | None = None, *, batch_rows: int = 8192) -> torch.Tensor:
        """Mean raw activation per layer ``[n_layers, width]`` float32 over every stored row (positions excluded
        at harvest are not stored, so not counted), from float64 sums read in row order; memoised per selection."""
        chosen = tuple(self.select(layers).layers)
        if chosen not in self._means:
            if self.n_rows == 0:
                raise CrosslayerError(f"store {self.path} has no rows; harvest some before taking its mean")
            total = torch.zeros(len(chosen), self.width, dtype=torch.float64)
            for start in range(0, self.n_rows, batch_rows):
                rows = np.arange(start, min(start + batch_rows, self.n_rows))
                total += self.get(rows, layers=list(chosen)).double().sum(0)
            self._means[chosen] = (total / self.n_rows).float()
        return self._means[chosen].clone()


class InMemoryStore(ActivationStore):
    """An :class:`ActivationStore` whose rows of ``layers`` are read once into ``device`` memory (16-bit, as on
    disk) and served from there: :meth:`iter_batches` gives the same batches as the store's, without the disk
    round trip (a large GPU holds the paper preset's 34 GB training store). Everything else reads the folder."""

    def __init__(self, store: ActivationStore, *, layers: list[int], device: str = "cpu", chunk_rows: int = 65536):
        self.__dict__.update(store.__dict__)
        self.resident_layers = self.select(layers).layers
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float16
        self.acts_NLD = torch.empty(self.n_rows, len(self.resident_layers), self.width, dtype=dtype, device=device)
        for start in range(0, self.n_rows, chunk_rows):
            rows = np.arange(start, min(start + chunk_rows, self.n_rows))
            self.acts_NLD[start:start + len(rows)] = self.get(rows, layers=self.resident_layers, dtype=dtype).to(device)

    def iter_batches(self, batch_size: int, *, layers: list[int] | None = None, normalized: bool = True,
                     shuffle: bool = True, seed: int = 0, epochs: int | None = 1, drop_last: bool = True,
                     dtype: torch.dtype = torch.float32, part: tuple[int, int] | None = None,
                     buffer_rows: int | None = None) -> Iterator[torch.Tensor]:
        """As :meth:`ActivationStore.iter_batches` (same order, values and dtype), on the resident device; only
        the resident layers (``drop_last`` only; ``buffer_rows`` is unused: every row is resident)."""
        if list(layers or self.layers) != self.resident_layers or not drop_last:
            raise CrosslayerError(f"this in-memory store holds layers {self.resident_layers} and serves whole batches")
        factors = self.select(self.resident_layers).norm_factors
        scale = torch.tensor(factors, dtype=dtype, device=self.acts_NLD.device)[None, :, None]
        local = batch_size // (1 if part is None else part[1])
        for perm in self.batch_orders(batch_size, shuffle=shuffle, seed=seed, epochs=epochs, part=part):
            index = torch.from_numpy(perm).to(self.acts_NLD.device)
            for start in range(0, len(perm) - local + 1, local):
                rows = self.acts_NLD[index[start:start + local]].to(dtype)
                yield rows * scale if normalized else rows


def _read_manifest(path: Path) -> dict:
    """``manifest.json`` as a dict; unreadable or invalid JSON is a one-line error."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CrosslayerError(f"{path} cannot be read ({type(err).__name__}); rerun the harvest command "
                              "into a new folder, or restore the file") from None
    if not isinstance(manifest, dict):
        raise CrosslayerError(f"{path} is not a store manifest (not a JSON object); rerun the harvest command "
                              "into a new folder, or restore the file")
    return manifest


def _hash_matches(path: Path, expected: str, algorithm: str = "sha256") -> bool:
    """Whether ``path`` hashes to ``expected``; a file unchanged since it last matched in this process
    (same size and mtime) is not hashed again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if key in _VERIFIED:
        return True
    if HASHES[algorithm][1](path) != expected:
        return False
    _VERIFIED.add(key)
    return True


def _drop_mapped_pages(array: np.ndarray) -> None:
    """Unmap the pages a memory-mapped shard read touched, so they stay in the OS page cache but do
    not count in this process's RSS (which would otherwise grow to the store's size over an epoch)."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)


def mean_norm_factor(norm_sums: np.ndarray, counts: int, width: int) -> list[float]:
    """Normalisation factors sqrt(width) / mean norm, per layer."""
    means = norm_sums / max(counts, 1)
    return [math.sqrt(width) / m if m > 0 else 1.0 for m in means.tolist()]
