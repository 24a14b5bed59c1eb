"""The harvester and the activation store: parity with run_with_cache, metadata, normalisation,
shuffling, kill-and-resume, corruption, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crosslayer import CrosslayerError
from crosslayer.corpus import load_corpus, make_windows
from crosslayer.harvest import harvest, parse_layers
from crosslayer.store import ActivationStore

from conftest import make_toy_corpus


@pytest.fixture(scope="module")
def windows(tiny_model, tmp_path_factory):
    path = make_toy_corpus(tmp_path_factory.mktemp("corpus") / "toy.jsonl", n_docs=300)
    return make_windows(load_corpus(path), tiny_model.tokenizer, seq_len=32, n_tokens=3000, seed=0)


@pytest.fixture(scope="module")
def store(tiny_model, windows, tmp_path_factory):
    return harvest(tiny_model, windows, out_dir=tmp_path_factory.mktemp("h") / "store", batch_size=4,
                   shard_mb=0.05, progress=False)


def _reference(model, windows, hook_names, meta):
    _, cache = model.run_with_cache(windows.tokens)
    return torch.stack([cache[name][meta["window"], meta["position"]] for name in hook_names], dim=1)


def test_store_equals_run_with_cache(tiny_model, windows, store):
    meta = store.meta()
    ref = _reference(tiny_model, windows, store.hooks, meta)
    got = store.get(np.arange(store.n_rows))
    assert len(store.shards) > 3 and got.shape == (store.n_rows, 2, 64)
    assert torch.equal(got, ref.to(torch.bfloat16).float())


def test_other_hook_kinds_and_layer_subsets(tiny_model, windows, tmp_path):
    sub = windows.subset(slice(0, 20))
    for hook, width in (("mlp_post", tiny_model.cfg.d_mlp), ("attn_out", 64), ("resid_pre", 64)):
        st = harvest(tiny_model, sub, out_dir=tmp_path / hook, hook=hook, layers="1", dtype="float16",
                     progress=False)
        assert st.width == width and st.layers == [1] and st.get([0]).shape == (1, 1, width)
        ref = _reference(tiny_model, sub, st.hooks, st.meta())
        assert torch.equal(st.get(np.arange(st.n_rows)), ref.to(torch.float16).float())


def test_metadata_alignment_and_exclusions(windows, store):
    meta = store.meta()
    assert np.array_equal(meta["token_id"], windows.tokens.numpy()[meta["window"], meta["position"]])
    assert np.array_equal(meta["doc_id"], windows.doc_ids.numpy()[meta["window"], meta["position"]])
    assert (meta["position"] > 0).all() and not np.isin(meta["token_id"], [0, 1, 2]).any()
    ex = store.manifest["excluded"]
    assert ex["position0"] == len(windows)
    n_special = int(np.isin(windows.tokens[:, 1:].numpy(), [0, 1, 2]).sum())
    assert ex["special"] == n_special
    assert store.n_rows + sum(ex.values()) == windows.n_tokens
    ctx = store.context(10, before=5, after=2)
    assert ctx["token_ids"][ctx["focus"]] == meta["token_id"][10]
    assert store.label_names[meta["label"][10]] == ctx["label"]


def test_outlier_policy_drops_extreme_rows(tiny_model, windows, tmp_path):
    sub = windows.subset(slice(0, 24))
    kept = harvest(tiny_model, sub, out_dir=tmp_path / "keep", outlier_factor=None, progress=False)
    dropped = harvest(tiny_model, sub, out_dir=tmp_path / "drop", outlier_factor=1.3, progress=False)
    norms = kept.get(np.arange(kept.n_rows)).norm(dim=-1)
    assert dropped.manifest["excluded"]["outliers"] > 0
    assert dropped.n_rows + dropped.manifest["excluded"]["outliers"] == kept.n_rows
    assert norms.max() > dropped.get(np.arange(dropped.n_rows)).norm(dim=-1).max()


def test_normalisation_factors(store):
    raw = store.get(np.arange(store.n_rows))
    normed = store.get(np.arange(store.n_rows), normalized=True)
    mean_norm = normed.norm(dim=-1).mean(dim=0)
    assert torch.allclose(mean_norm, torch.full_like(mean_norm, 64 ** 0.5), rtol=1e-3)
    assert torch.allclose(normed, raw * store.norm_factors[None, :, None])
    assert torch.allclose(store.get([3], layers=[1], normalized=True)[0, 0], normed[3, 1])


def test_shuffle_is_deterministic_and_covers_every_row_once(store):
    def rows_of(batches):
        return torch.cat(list(batches))

    all_rows = store.get(np.arange(store.n_rows), normalized=True)
    a = rows_of(store.iter_batches(7, seed=1, buffer_rows=50, drop_last=False))
    b = rows_of(store.iter_batches(7, seed=1, buffer_rows=50, drop_last=False))
    c = rows_of(store.iter_batches(7, seed=2, buffer_rows=50, drop_last=False))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == all_rows.shape
    key = lambda t: t[:, 0, 0] * 1e3 + t[:, 1, 1]  # noqa: E731 - a per-row fingerprint
    assert torch.equal(torch.sort(key(a)).values, torch.sort(key(all_rows)).values)
    two = list(store.iter_batches(16, seed=1, epochs=2))
    assert len(two) == 2 * (store.n_rows // 16)
    assert not torch.equal(two[0], two[len(two) // 2])
    sub = next(store.iter_batches(5, layers=[1]))
    assert sub.shape == (5, 1, 64)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from crosslayer.corpus import load_corpus, make_windows
from crosslayer.harvest import harvest
from crosslayer.models import load_model
from conftest import make_toy_corpus
m = load_model("tiny-4l-128d")
path = make_toy_corpus({corpus!r}, n_docs=400)
w = make_windows(load_corpus(path), m.tokenizer, seq_len=64, n_tokens=24000, seed=0)
harvest(m, w, out_dir={out!r}, batch_size=2, shard_mb=0.1, progress=False)
"""


def _run_child(out, corpus, kill_after_shards=None):
    code = CHILD.format(tests=str(Path(__file__).parent), corpus=str(corpus), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    if kill_after_shards is None:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
        return True
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list((Path(out) / "shards").glob("*.json"))) >= kill_after_shards:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_harvest_resumes_to_an_identical_store(tmp_path):
    corpus = tmp_path / "toy.jsonl"
    _run_child(tmp_path / "clean", corpus)
    killed = _run_child(tmp_path / "resumed", corpus, kill_after_shards=3)
    assert killed, "the harvest finished before it could be killed"
    with pytest.raises(CrosslayerError, match="unfinished harvest"):
        ActivationStore(tmp_path / "resumed")
    _run_child(tmp_path / "resumed", corpus)
    clean, resumed = ActivationStore(tmp_path / "clean"), ActivationStore(tmp_path / "resumed")
    strip = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert strip(clean.manifest) == strip(resumed.manifest)
    assert len(clean.shards) > 5
    for name in sorted(os.listdir(tmp_path / "clean" / "shards")):
        assert (tmp_path / "clean" / "shards" / name).read_bytes() == \
            (tmp_path / "resumed" / "shards" / name).read_bytes(), name
    assert not list((tmp_path / "resumed").rglob("*.tmp"))


def test_corrupted_shard_is_reported_by_name(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    victim = copy / "shards" / store.shards[2]["acts_file"]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CrosslayerError, match=f"shard {victim.name} is corrupted"):
        ActivationStore(copy).verify()
    victim.write_bytes(bytes(data[:200]))
    with pytest.raises(CrosslayerError, match=victim.name):
        ActivationStore(copy).get(np.arange(ActivationStore(copy).n_rows))


def test_bad_input(tiny_model, windows, store, tmp_path):
    sub = windows.subset(slice(0, 4))
    with pytest.raises(CrosslayerError, match="unknown hook kind"):
        harvest(tiny_model, sub, out_dir=tmp_path / "a", hook="resid_everywhere")
    with pytest.raises(CrosslayerError, match="out of range"):
        harvest(tiny_model, sub, out_dir=tmp_path / "a", layers="0-7")
    assert not (tmp_path / "a").exists()
    before = (store.path / "manifest.json").read_bytes()
    with pytest.raises(CrosslayerError, match=r"holds a different activation store \(n_windows: "):
        harvest(tiny_model, sub, out_dir=store.path, progress=False)
    assert (store.path / "manifest.json").read_bytes() == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(CrosslayerError, match="no manifest.json"):
        harvest(tiny_model, sub, out_dir=tmp_path / "junk")
    assert [p.name for p in (tmp_path / "junk").iterdir()] == ["x.txt"]
    with pytest.raises(CrosslayerError, match="cannot parse layers"):
        parse_layers("a-b", 4)
    assert parse_layers("0-2,5,7-", 9) == [0, 1, 2, 5, 7, 8]


def test_nan_activations_leave_no_store(windows, tmp_path):
    from crosslayer.models import load_model

    broken = load_model("tiny-2l-64d")
    with torch.no_grad():
        broken.blocks[0].mlp.W_out[0, 0] = float("nan")
    with pytest.raises(CrosslayerError, match="NaN/inf activations"):
        harvest(broken, windows.subset(slice(0, 8)), out_dir=tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan").exists()


@pytest.mark.slow
def test_cli_harvest_bad_layer_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crosslayer.cli", "harvest", "--model", "tiny-2l-64d",
                           "--layers", "9", "--tokens", "1k", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "out of range" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_several_hook_kinds_in_one_pass_equal_separate_harvests(tiny_model, windows, tmp_path):
    """``harvest_stores``: one forward pass per batch for every store (counted), each store equal in its rows
    and activations to a separate harvest of its hook kind, and a shard deleted from one store is recomputed
    on rerun (for both) to the same data."""
    from crosslayer.harvest import harvest_stores

    outs = {"resid_mid": tmp_path / "mid", "mlp_out": tmp_path / "mlp"}
    kwargs = dict(batch_size=8, shard_mb=0.05, outlier_factor=None, progress=False)
    calls, real = [], tiny_model.run_with_hooks
    tiny_model.run_with_hooks = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        stores = harvest_stores(tiny_model, windows, outs, **kwargs)
    finally:
        tiny_model.run_with_hooks = real
    per = stores["resid_mid"].manifest["windows_per_shard"]  # batches never straddle shards
    batches = sum(-(-min(per, len(windows) - lo) // 8) for lo in range(0, len(windows), per))
    assert len(calls) == batches  # one pass per batch of windows, not one per store
    assert len(stores["resid_mid"].shards) >= 2
    for kind, store in stores.items():
        alone = harvest(tiny_model, windows, out_dir=tmp_path / f"alone_{kind}", hook=kind, **kwargs)
        rows = np.arange(store.n_rows)
        assert store.n_rows == alone.n_rows and np.array_equal(store.flat_index(rows), alone.flat_index(rows))
        assert torch.equal(store.get(rows, normalized=False), alone.get(rows, normalized=False))
        assert torch.equal(torch.as_tensor(store.norm_factors), torch.as_tensor(alone.norm_factors))
    (outs["mlp_out"] / "shards" / stores["mlp_out"].shards[1]["acts_file"]).unlink()
    again = harvest_stores(tiny_model, windows, outs, **kwargs)
    for kind, store in again.items():
        store.verify()
        rows = np.arange(store.n_rows)
        assert torch.equal(store.get(rows, normalized=False), stores[kind].get(rows, normalized=False))
