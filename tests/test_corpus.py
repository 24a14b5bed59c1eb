"""Corpus windows: shapes, metadata alignment, determinism, splits, bad input."""

import json
import lzma
import subprocess
import sys

import pytest
import torch

from crosslayer import CrosslayerError
from crosslayer.corpus import SEPARATOR_ID, builtin_corpus_path, label_token_counts, load_corpus, make_windows
from crosslayer.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_windows_shapes_and_metadata_alignment(toy_corpus_path, tok):
    corpus = load_corpus(toy_corpus_path)
    win = make_windows(corpus, tok, split="train", seq_len=32, n_tokens=500, seed=3)
    assert win.tokens.shape == (16, 32) == win.doc_ids.shape == win.labels.shape == win.positions.shape
    assert torch.equal(win.positions[0], torch.arange(32, dtype=torch.int32))
    sep = win.tokens == SEPARATOR_ID
    assert torch.equal(sep, win.doc_ids == -1) and torch.equal(sep, win.labels == -1)
    # every document's tokens, read back from the windows, are exactly its tokenization
    flat_tok, flat_doc = win.tokens.flatten(), win.doc_ids.flatten()
    by_key = {d.key: d for d in corpus.documents}
    for doc_idx in flat_doc.unique().tolist():
        if doc_idx < 0:
            continue
        doc = by_key[win.doc_keys[doc_idx]]
        assert doc.split == "train"
        got = flat_tok[flat_doc == doc_idx].tolist()
        want = tok(doc.text, add_special_tokens=False)["input_ids"]
        is_first = doc_idx == flat_doc[flat_doc >= 0][0].item()
        is_last = doc_idx == flat_doc[flat_doc >= 0][-1].item()
        if is_last:
            assert want[:len(got)] == got
        elif not is_first:
            assert got == want
        label = win.labels.flatten()[flat_doc == doc_idx].unique().tolist()
        assert [win.label_names[i] for i in label] == [doc.label]


def test_windows_are_deterministic_for_a_seed(toy_corpus_path, tok):
    corpus = load_corpus(toy_corpus_path)
    a = make_windows(corpus, tok, seq_len=16, n_tokens=300, seed=1)
    b = make_windows(corpus, tok, seq_len=16, n_tokens=300, seed=1)
    c = make_windows(corpus, tok, seq_len=16, n_tokens=300, seed=2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_ids, b.doc_ids)
    assert not torch.equal(a.tokens, c.tokens)


def test_splits_do_not_share_documents(toy_corpus_path, tok):
    corpus = load_corpus(toy_corpus_path)
    train = make_windows(corpus, tok, split="train", seq_len=16, seed=0)
    held = make_windows(corpus, tok, split="heldout", seq_len=16, seed=0)
    train_keys = {train.doc_keys[i] for i in train.doc_ids.unique().tolist() if i >= 0}
    held_keys = {held.doc_keys[i] for i in held.doc_ids.unique().tolist() if i >= 0}
    assert train_keys and held_keys and not (train_keys & held_keys)


def test_text_folder_gets_labels_from_subfolders_and_hash_split(tmp_path, tok):
    for label in ("poems", "recipes"):
        (tmp_path / label).mkdir()
        for i in range(30):
            (tmp_path / label / f"{i}.txt").write_text(f"{label} number {i}: " + "words and more words " * 10)
    corpus = load_corpus(tmp_path)
    assert corpus.label_names == ["poems", "recipes"]
    splits = {d.key: d.split for d in corpus.documents}
    assert set(splits.values()) == {"train", "heldout"}
    assert splits == {d.key: d.split for d in load_corpus(tmp_path).documents}  # fixed split
    win = make_windows(corpus, tok, seq_len=8, n_tokens=64)
    assert set(label_token_counts(win)) == {"poems", "recipes"}


def test_bad_input(tmp_path, tok):
    with pytest.raises(CrosslayerError, match="does not exist"):
        load_corpus(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(CrosslayerError, match="contains no text"):
        load_corpus(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nottext": 1}\n')
    with pytest.raises(CrosslayerError, match="bad.jsonl:1"):
        load_corpus(bad)
    small = tmp_path / "small.txt"
    small.write_text("just a few words here")
    with pytest.raises(CrosslayerError, match="fewer than"):
        make_windows(load_corpus(small), tok, split=None, seq_len=8, n_tokens=10_000)
    with pytest.raises(CrosslayerError, match="unknown split"):
        make_windows(load_corpus(small), tok, split="test")


@pytest.mark.slow
def test_cli_missing_corpus_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crosslayer.cli", "inspect", "--model", "tiny-2l-64d",
                           "--corpus", str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2 and "error: corpus file" in proc.stderr


@pytest.mark.skipif(not builtin_corpus_path().exists(), reason="shipped corpus not built")
def test_shipped_corpus_has_every_label_in_both_splits_and_no_leaks():
    """Expectations come from the file itself (read here without crosslayer), not from literals."""
    with lzma.open(builtin_corpus_path(), "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    corpus = load_corpus("builtin")
    assert len(corpus.documents) == sum(1 for r in records if r["text"].strip())
    labels = {r["label"] for r in records}
    assert set(corpus.label_names) == labels and len(labels) >= 2
    train = {d.key for d in corpus.documents if d.split == "train"}
    held = {d.key for d in corpus.documents if d.split == "heldout"}
    assert train and held and not (train & held)
    for label in labels:
        assert {d.split for d in corpus.documents if d.label == label} == {"train", "heldout"}


@pytest.mark.skipif(not builtin_corpus_path().exists(), reason="shipped corpus not built")
def test_shipped_corpus_has_the_steering_concept_in_its_training_split(tok):
    """The steering study's concept words occur in the training text of the concept label (data/README.md)."""
    from studies.steering import concept_ids

    corpus = load_corpus("builtin").select("train", ["concept_fraud"])
    counts = dict.fromkeys(concept_ids(tok).values(), 0)
    for doc in corpus.documents:
        for token in tok(doc.text, add_special_tokens=False)["input_ids"]:
            if token in counts:
                counts[token] += 1
    core = concept_ids(tok, (" scam", " fraud", " suspicious", " fake", " stolen"))
    assert len(core) == 5 and all(counts[i] > 0 for i in core.values()), counts
