"""``crosslayer bench crosscoder`` on tiny shapes: it runs, returns the step/GEMM ratio, the profiler
breakdown and the peer rows, and prints the ratio line (no speed is asserted)."""

import pytest


@pytest.fixture(scope="module")
def bench_out(tiny_store):
    import io
    from contextlib import redirect_stdout

    from crosslayer.bench import bench_crosscoder

    printed = io.StringIO()
    with redirect_stdout(printed):
        result = bench_crosscoder(str(tiny_store.path), width=64, k=4, batch_size=64, steps=2, peer_width=64,
                                  peer_steps=3)
    return result, printed.getvalue()


def test_step_gemm_ratio_and_breakdown(bench_out):
    result, printed = bench_out
    assert result["step_gemm_ratio"] > 0 and result["step"]["step_s"] > 0 and result["step"]["gemm_s"] > 0
    assert f"training step / encoder GEMM = {result['step_gemm_ratio']:.2f} (target <= 1.4)" in printed
    breakdown = result["breakdown"]
    assert 1 <= len(breakdown) <= 8 and all(row["ms"] >= 0 and 0 <= row["share"] <= 1 for row in breakdown)
    assert [row["ms"] for row in breakdown] == sorted((row["ms"] for row in breakdown), reverse=True)
    assert breakdown[0]["op"] in printed
    auxk = result["step"]["auxk_step_gemm_ratio"]  # AuxK active on every row / on a quarter of the rows
    assert set(auxk) == {1.0, 0.25} and all(v > 0 for v in auxk.values())
    assert f"{auxk[1.0]:.2f} with AuxK on every row, {auxk[0.25]:.2f} on a quarter" in printed


def test_peer_rows(bench_out):
    result, printed = bench_out
    peers = result["peers"]
    assert list(peers) == ["ours", "sae_lens", "sparsify"]
    for name in ("ours", "sae_lens"):
        assert peers[name]["tok_s"] > 0 and 0 <= peers[name]["fvu"] < 2
    assert peers["ours"]["ours_over_peer"] == 1.0
    sparsify = peers["sparsify"]
    if "error" in sparsify:  # the optional extra is missing or cannot run here: recorded, the table goes on
        assert f"sparsify: not run ({sparsify['error']})" in printed and "\n" not in sparsify["error"]
    else:
        assert sparsify["tok_s"] > 0 and 0 <= sparsify["fvu"] < 2
        assert sparsify["ours_over_peer"] == pytest.approx(peers["ours"]["tok_s"] / sparsify["tok_s"])


def test_an_optional_peer_that_fails_is_recorded(monkeypatch, tiny_store):
    import crosslayer.bench as bench

    def broken(*args, **kwargs):
        raise ImportError("No module named 'sparsify'\nsecond line")

    monkeypatch.setitem(bench.PEERS, "sparsify", ("sparsify SparseCoder", broken))
    batch = next(tiny_store.iter_batches(16, layers=[tiny_store.layers[0]]))
    row = bench._run_peer("sparsify", [batch], batch[:, 0], width=8, k=2, lr=3e-3, out_dir="unused")
    assert row == {"error": "ImportError: No module named 'sparsify'"}
    monkeypatch.setitem(bench.PEERS, "ours", ("ours", broken))
    with pytest.raises(ImportError):
        bench._run_peer("ours", [batch], batch[:, 0], width=8, k=2, lr=3e-3, out_dir="unused")
