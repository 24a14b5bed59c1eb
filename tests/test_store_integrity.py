"""Corrupted stores are refused by every reader with one line naming the shard and the fix, and a rerun
of the harvest command rewrites only the bad shards."""

import shutil

import numpy as np
import pytest

from crosslayer.cli import main
from crosslayer.errors import CrosslayerError
from crosslayer.store import ActivationStore

from conftest import make_toy_corpus, random_saes

HARVEST = dict(batch_size=8, shard_mb=0.05, progress=False)  # 32 windows in shards of 6


def _flip(path, offset, mask):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _acts(store, i=1):
    return store.path / "shards" / store.shards[i]["acts_file"]


# each case corrupts a copy of the store and returns what the error must name
CASES = {
    "acts_low_bit": lambda s: (_flip(_acts(s), -2, 0x01), _acts(s).name)[1],  # low bit of the last value
    "acts_high_bit": lambda s: (_flip(_acts(s), 200, 0x80), _acts(s).name)[1],  # sign bit early in the data
    "rows_byte": lambda s: (_flip(s.path / "shards" / s.shards[0]["rows_file"], -3, 0x10), s.shards[0]["rows_file"])[1],
    "sidecar_missing": lambda s: ((s.path / "shards" / "shard-00001.json").unlink(), "shard-00001.json")[1],
    "manifest_invalid": lambda s: ((s.path / "manifest.json").write_text('{"format": 1, "shards": ['),
                                   "manifest.json")[1],
}


def _windows(model, corpus):
    from crosslayer.corpus import load_corpus, make_windows

    return make_windows(load_corpus(corpus), model.tokenizer, seq_len=32, n_tokens=1000)


@pytest.fixture(scope="module")
def tiny_store(tiny_model, tmp_path_factory):
    """A store of the tiny model in several shards (the shared fixture has one)."""
    from crosslayer.harvest import harvest

    root = tmp_path_factory.mktemp("integrity")
    corpus = make_toy_corpus(root / "toy.jsonl", n_docs=60)
    store = harvest(tiny_model, _windows(tiny_model, corpus), out_dir=root / "store", **HARVEST)
    assert len(store.shards) >= 3
    return store


@pytest.fixture
def copy(tiny_store, tmp_path):
    shutil.copytree(tiny_store.path, tmp_path / "store")
    return ActivationStore(tmp_path / "store")


def _one_line_error(capsys, name):
    """The one ``error:`` line of stderr (progress bars aside), naming ``name``."""
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and "error: " in err[0] and name in err[0], err
    return err[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_is_refused_by_every_reader(case, copy, tiny_store, tmp_path, capsys):
    dictionary = tmp_path / "dict"
    random_saes(tiny_store, width=32, k=4).save(dictionary)
    name = CASES[case](copy)
    with pytest.raises(CrosslayerError, match=name) as info:
        ActivationStore(copy.path).get(np.arange(copy.n_rows))
    assert "\n" not in str(info.value)
    with pytest.raises(CrosslayerError, match=name):
        list(ActivationStore(copy.path).iter_batches(64))
    capsys.readouterr()
    assert main(["verify", str(copy.path)]) == 2
    line = _one_line_error(capsys, name)
    if case != "manifest_invalid":
        assert "rerun the harvest command" in line
    assert main(["eval", "--dictionary", str(dictionary), "--store", str(copy.path), "--windows", "0",
                 "--tokens", "500", "--boot", "10"]) == 2
    _one_line_error(capsys, name)
    assert main(["features", "--dictionary", str(dictionary), "--store", str(copy.path), "--feature", "0",
                 "--examples", "2"]) == 2
    _one_line_error(capsys, name)


@pytest.mark.parametrize("verb", ["train-saes", "train-crosscoder"])
def test_training_on_a_corrupted_store_creates_nothing(verb, copy, tmp_path, capsys):
    name = CASES["acts_low_bit"](copy)
    capsys.readouterr()
    assert main([verb, "--store", str(copy.path), "--out", str(tmp_path / "out"), "--width", "16", "--k", "2",
                 "--batch-size", "64"]) == 2
    _one_line_error(capsys, name)
    assert not (tmp_path / "out").exists()


def test_intact_store_verifies_and_evaluates(copy, tiny_store, tmp_path, capsys):
    random_saes(tiny_store, width=32, k=4).save(tmp_path / "dict")
    assert main(["verify", str(copy.path)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    assert main(["eval", "--dictionary", str(tmp_path / "dict"), "--store", str(copy.path), "--windows", "0",
                 "--tokens", "500", "--boot", "10"]) == 0


@pytest.mark.parametrize("case", ["acts_low_bit", "rows_byte", "sidecar_missing"])
def test_harvest_rerun_rewrites_only_the_bad_shards(case, copy, tiny_store, tiny_model):
    from crosslayer.harvest import harvest

    CASES[case](copy)
    shards = sorted((copy.path / "shards").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    windows = _windows(tiny_model, tiny_store.path.parent / "toy.jsonl")
    repaired = harvest(tiny_model, windows, out_dir=copy.path, **HARVEST)
    repaired.verify()
    for name in sorted(p.name for p in (tiny_store.path / "shards").iterdir()):
        assert (copy.path / "shards" / name).read_bytes() == (tiny_store.path / "shards" / name).read_bytes()
    rewritten = {p.name for p in shards if p.stat().st_mtime_ns != before[p.name]}
    bad = {"rows_byte": "shard-00000", "acts_low_bit": "shard-00001", "sidecar_missing": "shard-00001"}[case]
    assert rewritten and all(n.startswith(bad) for n in rewritten), rewritten


def test_corrupted_windows_are_refused_and_repaired(copy, tiny_store, tiny_model, capsys):
    from crosslayer.harvest import harvest

    _flip(copy.path / "windows.npy", -1, 0x04)
    with pytest.raises(CrosslayerError, match="windows.npy .* is corrupted"):
        ActivationStore(copy.path).context(0)
    capsys.readouterr()
    assert main(["verify", str(copy.path)]) == 2
    _one_line_error(capsys, "windows.npy")
    windows = _windows(tiny_model, tiny_store.path.parent / "toy.jsonl")
    harvest(tiny_model, windows, out_dir=copy.path, **HARVEST)
    assert (copy.path / "windows.npy").read_bytes() == (tiny_store.path / "windows.npy").read_bytes()
    ActivationStore(copy.path).verify()


def test_a_full_disk_is_a_one_line_error_and_the_harvest_resumes(tiny_store, tiny_model, tmp_path, monkeypatch):
    import errno

    from crosslayer.harvest import harvest

    real_save, calls = np.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:  # the three window files and the first shard are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    windows = _windows(tiny_model, tiny_store.path.parent / "toy.jsonl")
    monkeypatch.setattr(np, "save", save)
    with pytest.raises(CrosslayerError, match="No space left on device.*rerun the harvest command") as info:
        harvest(tiny_model, windows, out_dir=tmp_path / "s", **HARVEST)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(np, "save", real_save)
    assert not list((tmp_path / "s").rglob("*.tmp"))
    harvest(tiny_model, windows, out_dir=tmp_path / "s", **HARVEST).verify()
    for name in sorted(p.name for p in (tiny_store.path / "shards").iterdir()):
        assert (tmp_path / "s" / "shards" / name).read_bytes() == (tiny_store.path / "shards" / name).read_bytes()



@pytest.mark.parametrize("algorithm", ["xxh3", "sha256"])
def test_readers_check_the_fast_checksum_and_older_stores_the_sha256(algorithm, copy):
    """Readers check XXH3 where the store has it; a store written before XXH3 sums existed (no ``*_xxh3``
    keys) is still checked, by SHA-256; ``verify`` always checks SHA-256."""
    import json

    from crosslayer import store as store_module

    if algorithm == "sha256":  # make the copy an older store
        manifest = json.loads((copy.path / "manifest.json").read_text())
        for shard in manifest["shards"]:
            shard.pop("acts_xxh3"), shard.pop("rows_xxh3")
        (copy.path / "manifest.json").write_text(json.dumps(manifest))
    seen = []
    real = store_module._hash_matches
    store_module._hash_matches = lambda path, expected, alg="sha256": seen.append(alg) or real(path, expected, alg)
    try:
        _flip(_acts(copy), -2, 0x01)
        store = ActivationStore(copy.path)
        store._shard_arrays(0)
        assert set(seen) == {algorithm}
        with pytest.raises(CrosslayerError, match=f"shard-00001.acts.npy is corrupted"):
            store._shard_arrays(1)
        seen.clear()
        with pytest.raises(CrosslayerError, match="SHA-256 mismatch"):
            ActivationStore(copy.path).verify()
        assert set(seen) == {"sha256"}
    finally:
        store_module._hash_matches = real
