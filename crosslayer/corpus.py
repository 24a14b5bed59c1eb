"""Labelled documents -> fixed-length token windows with per-token metadata.

Method:
1. Read documents from the shipped corpus (``data/corpus.jsonl.xz``, see ``data/README.md``), a
   user's text files / folders, a JSONL file, or a Hugging Face dataset (``hf:NAME[:CONFIG]``,
   only where the hub is reachable). Every document keeps a source label, a language, a key and a
   split. Files without a split get one from a hash of the document key (10 % held out), so the
   split is by document and fixed.
2. Shuffle the documents of the requested split with a seeded generator, tokenize them (no BOS,
   no special tokens), and join them with the separator ``<|endoftext|>`` (id 0).
3. Cut the stream into windows of ``seq_len`` tokens, stopping once ``n_tokens`` tokens are
   covered. Every token carries: token id, document id (the index of its document, -1 for a
   separator), position in its window, and its source label (index into ``label_names``, -1 for
   a separator). The same inputs and seed always give the same windows.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import gzip
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crosslayer.errors import CrosslayerError

SEPARATOR_ID = 0  # <|endoftext|>
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Document:
    """One labelled document (for the shipped corpus: one chunk of a source file)."""

    text: str
    label: str
    key: str
    split: str
    source: str = "user"
    lang: str = "en"


@dataclass
class Corpus:
    """Documents plus an identifier of where they came from (recorded in activation stores)."""

    documents: list[Document]
    corpus_id: str
    name: str = ""

    def select(self, split: str | None = None, labels: list[str] | None = None) -> "Corpus":
        if split is not None and split not in SPLITS:
            raise CrosslayerError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        docs = [d for d in self.documents if (split is None or d.split == split)
                and (labels is None or d.label in labels)]
        if not docs:
            raise CrosslayerError(f"corpus {self.name!r} has no documents for split={split!r} labels={labels}")
        return Corpus(docs, self.corpus_id, self.name)

    @property
    def label_names(self) -> list[str]:
        return sorted({d.label for d in self.documents})


@dataclass
class TokenWindows:
    """``[n_windows, seq_len]`` token ids and aligned per-token metadata."""

    tokens: torch.Tensor          # int64 [N, T]
    doc_ids: torch.Tensor         # int32 [N, T]; index into ``doc_keys``; -1 for separators
    positions: torch.Tensor       # int32 [N, T]; position within the window
    labels: torch.Tensor          # int16 [N, T]; index into ``label_names``; -1 for separators
    label_names: list[str]
    doc_keys: list[str]
    corpus_id: str
    split: str
    seed: int
    extra: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def concat(parts: list["TokenWindows"]) -> "TokenWindows":
        """Stack windows of the same corpus, split and label set (document ids are re-based)."""
        first = parts[0]
        if any(p.label_names != first.label_names or p.seq_len != first.seq_len for p in parts):
            raise CrosslayerError("cannot concatenate windows with different labels or lengths")
        offsets = np.cumsum([0] + [len(p.doc_keys) for p in parts])
        doc_ids = [torch.where(p.doc_ids >= 0, p.doc_ids + int(o), p.doc_ids) for p, o in zip(parts, offsets)]
        return TokenWindows(torch.cat([p.tokens for p in parts]), torch.cat(doc_ids),
                            torch.cat([p.positions for p in parts]), torch.cat([p.labels for p in parts]),
                            first.label_names, [k for p in parts for k in p.doc_keys], first.corpus_id,
                            first.split, first.seed)

    def subset(self, index: slice) -> "TokenWindows":
        return TokenWindows(self.tokens[index], self.doc_ids[index], self.positions[index],
                            self.labels[index], self.label_names, self.doc_keys, self.corpus_id,
                            self.split, self.seed, self.extra)


# ----------------------------------------------------------------------------- reading documents

def builtin_corpus_path() -> Path:
    """The shipped corpus: ``$CROSSLAYER_DATA/corpus.jsonl.xz`` or ``<repo>/data/corpus.jsonl.xz``."""
    root = Path(os.environ.get("CROSSLAYER_DATA", Path(__file__).resolve().parents[1] / "data"))
    return root / "corpus.jsonl.xz"


def _hash_split(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") / 2**32
    return "heldout" if bucket < HELDOUT_FRACTION else "train"


def _open_text(path: Path):
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path, default_label: str) -> list[Document]:
    try:
        return _read_jsonl_lines(path, default_label)
    except (UnicodeDecodeError, EOFError, lzma.LZMAError, gzip.BadGzipFile) as err:
        raise CrosslayerError(f"{path} is not UTF-8 JSONL text ({type(err).__name__}); point --corpus at a "
                              ".jsonl[.xz|.gz] of UTF-8 text") from None


def _read_jsonl_lines(path: Path, default_label: str) -> list[Document]:
    docs = []
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CrosslayerError(f"{path}:{line_no}: not a JSON object with a 'text' field; "
                                      "each line must look like {\"text\": ..., \"label\": ...}") from None
            key = str(rec.get("doc", rec.get("id", f"{path.name}:{line_no}")))
            split = rec.get("split") or _hash_split(key)
            docs.append(Document(text=text, label=str(rec.get("label", default_label)), key=key,
                                 split=split, source=str(rec.get("source", path.name)),
                                 lang=str(rec.get("lang", "en"))))
    return docs


def _read_text_files(path: Path) -> list[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".py", ".rst")) \
        if path.is_dir() else [path]
    if not files:
        raise CrosslayerError(f"{path} holds no .txt/.md/.py/.rst files; point to a text file, a folder of them, "
                              "or a .jsonl")
    docs = []
    for file in files:
        label = file.parent.name if path.is_dir() and file.parent != path else "user"
        key = str(file.relative_to(path) if path.is_dir() else file.name)
        docs.append(Document(text=_read_text(file), label=label,
                             key=key, split=_hash_split(key), source=file.name))
    return docs


MAX_INVALID_UTF8 = 0.01
"""Largest share of characters that may be invalid UTF-8 in a text file of the corpus."""


def _read_text(file: Path) -> str:
    """The text of ``file``, refusing binary data: a NUL byte or more than :data:`MAX_INVALID_UTF8` of
    the characters invalid UTF-8 (a few invalid bytes are replaced); read as ``Path.read_text`` would."""
    data = file.read_bytes()
    text = data.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\0" in data or invalid > MAX_INVALID_UTF8 * max(len(text), 1):
        raise CrosslayerError(f"{file} is not text (NUL bytes or over {MAX_INVALID_UTF8:.0%} invalid UTF-8); "
                              "point --corpus at UTF-8 text files, a folder of them or a .jsonl")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode reading gives


def _read_hf(spec: str) -> list[Document]:
    from crosslayer.models import _hub_reachable

    name, _, config = spec.removeprefix("hf:").partition(":")
    if not _hub_reachable():
        raise CrosslayerError(f"dataset {name!r} cannot be downloaded here: the Hugging Face hub is not "
                              "reachable; use the shipped corpus ('builtin') or local files")
    import datasets

    ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    docs = []
    for i, rec in enumerate(ds):
        if i >= 200_000:
            break
        key = f"{name}:{i}"
        docs.append(Document(text=rec["text"], label=str(rec.get("label", name)), key=key,
                             split=_hash_split(key), source=name))
    return docs


def load_corpus(source: str | Path = "builtin") -> Corpus:
    """Read all documents of ``source``: ``"builtin"``, a path (.txt/.md folder or file, .jsonl[.xz|.gz]),
    or ``"hf:NAME[:CONFIG]"``."""
    spec = str(source)
    if spec.startswith("hf:"):
        docs, corpus_id = _read_hf(spec), spec
    else:
        path = builtin_corpus_path() if spec == "builtin" else Path(spec)
        if not path.exists():
            hint = "rebuild it with `python data/build_corpus.py`" if spec == "builtin" else \
                "pass an existing text file, folder, .jsonl, 'builtin' or hf:NAME"
            raise CrosslayerError(f"corpus file {path} does not exist; {hint}")
        if path.is_file() and ".jsonl" in path.name:
            docs = _read_jsonl(path, default_label=path.name.split(".")[0])
        else:
            docs = _read_text_files(path)
        corpus_id = _fingerprint(path)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CrosslayerError(f"corpus {spec!r} contains no text (all documents are empty)")
    return Corpus(docs, corpus_id, "builtin" if spec == "builtin" else spec)


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return f"{path.name}:sha256:{digest.hexdigest()[:16]}"


# ----------------------------------------------------------------------------- windows

def make_windows(corpus: Corpus, tokenizer, *, split: str = "train", seq_len: int = 128,
                 n_tokens: int | None = None, seed: int = 0, labels: list[str] | None = None,
                 batch_docs: int = 256) -> TokenWindows:
    """Tokenize the ``split`` documents in a seeded order into ``[N, seq_len]`` windows.

    ``n_tokens`` (rounded up to whole windows) caps the output; ``None`` uses the whole split.
    Raises if the split has fewer tokens than requested.
    """
    if seq_len < 2:
        raise CrosslayerError(f"seq_len must be >= 2, got {seq_len}")
    if n_tokens is not None and n_tokens < 1:
        raise CrosslayerError(f"n_tokens must be positive, got {n_tokens}")
    part = corpus.select(split, labels)
    label_names = corpus.label_names
    label_index = {name: i for i, name in enumerate(label_names)}
    order = list(range(len(part.documents)))
    random.Random(seed).shuffle(order)
    need = None if n_tokens is None else -(-n_tokens // seq_len) * seq_len

    ids_parts, doc_parts, lab_parts, have, keys = [], [], [], 0, []
    for start in range(0, len(order), batch_docs):
        batch = [part.documents[i] for i in order[start:start + batch_docs]]
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(batch, encoded):
            if not ids:
                continue
            doc_idx = len(keys)
            keys.append(doc.key)
            n = len(ids) + 1
            ids_parts.append(np.asarray(ids + [SEPARATOR_ID], dtype=np.int64))
            doc_parts.append(np.full(n, doc_idx, dtype=np.int32))
            lab_parts.append(np.full(n, label_index[doc.label], dtype=np.int16))
            doc_parts[-1][-1] = -1
            lab_parts[-1][-1] = -1
            have += n
        if need is not None and have >= need:
            break
    total = have if need is None else need
    n_windows = total // seq_len
    if (need is not None and have < need) or n_windows == 0:
        raise CrosslayerError(f"split {split!r} of corpus {corpus.name!r} has {have:,} tokens, fewer than "
                              f"the {max(need or 0, seq_len):,} requested; ask for fewer tokens or add text")
    cut = n_windows * seq_len
    shape = (n_windows, seq_len)
    tokens = torch.from_numpy(np.concatenate(ids_parts)[:cut].reshape(shape))
    doc_ids = torch.from_numpy(np.concatenate(doc_parts)[:cut].reshape(shape))
    lab = torch.from_numpy(np.concatenate(lab_parts)[:cut].reshape(shape))
    positions = torch.arange(seq_len, dtype=torch.int32).expand(shape).contiguous()
    return TokenWindows(tokens, doc_ids, positions, lab, label_names, keys, corpus.corpus_id, split, seed)


def label_token_counts(windows: TokenWindows) -> dict[str, int]:
    """Tokens per source label in ``windows`` (separators not counted)."""
    counts = torch.bincount(windows.labels[windows.labels >= 0].long(), minlength=len(windows.label_names))
    return {name: int(c) for name, c in zip(windows.label_names, counts)}
