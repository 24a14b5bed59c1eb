"""Data- and latent-parallel training (crosslayer.distributed) on 2 CPU processes (gloo): parity with one process.

Each slow test spawns 2 processes (torch.multiprocessing, ~5 s of imports each); the workers assert, and a
failed assertion fails the test with the worker's traceback.
"""

import shutil
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.dictionary import load_dictionary
from crosslayer.distributed import Mesh, ShardedCrosscoder, clip_grad_norm_, init_mesh
from crosslayer.sae_stack import SAEStackConfig
from crosslayer.training import CHECKPOINT, TrainConfig, read_profile_snapshots, train_crosscoder

L, D, F, B = 3, 8, 32, 64
TOL = dict(atol=2e-5, rtol=1e-4)


def data(n=2048):
    from crosslayer.synthetic import make_synthetic

    return make_synthetic(L, D, 24, n, seed=0)[0]


def make_batches(kill_at=None):
    """``make(start_step)``: global batches of B rows, seeded by step; raises KeyboardInterrupt at ``kill_at``."""
    acts = data()

    def make(start):
        step = start
        while True:
            if step == kill_at:
                raise KeyboardInterrupt  # the job is killed while fetching this batch
            yield acts[torch.randint(0, acts.shape[0], (B,), generator=torch.Generator().manual_seed(step))]
            step += 1

    return make


def crosscoder_cfg(activation="topk", **kw):
    return CrosscoderConfig(layers=tuple(range(L)), d_model=D, n_features=F, activation=activation, k=4, **kw)


ARCHS = {"topk": crosscoder_cfg(), "batchtopk": crosscoder_cfg("batchtopk"),
         "weakly_causal": crosscoder_cfg(variant="weakly_causal"), "relu": crosscoder_cfg("relu"),
         "sae_stack": SAEStackConfig(layers=tuple(range(L)), d_model=D, width=F // L + 1, k=2)}
TRAIN = TrainConfig(tokens=12 * B, batch_size=B, lr=3e-3, checkpoint_every=5, log_every=4, dead_after_tokens=2 * B,
                    sparsity_coef=0.1)


def spawn(task, tmp_path, *args, nprocs=2):
    """Run ``task(rank, *args)`` on ``nprocs`` gloo ranks."""
    init = tmp_path / f"pg-{uuid.uuid4().hex}"
    mp.spawn(_worker, args=(nprocs, str(init), task, args), nprocs=nprocs)


def _worker(rank, world, init, task, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        task(rank, *args)
    finally:
        dist.destroy_process_group()


def _train(rank, jobs):
    """Train each ``(out, arch, latent, kill_at)`` of ``jobs`` on the mesh of this job (the kill is expected)."""
    for out, arch, latent, kill_at in jobs:
        try:
            train_crosscoder(TRAIN, arch, make_batches(kill_at), out_dir=out, progress=False,
                             mesh=init_mesh("cpu", latent))
        except KeyboardInterrupt:
            assert kill_at is not None


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], **TOL, msg=key)


def single(tmp_path, name, arch):
    return train_crosscoder(TRAIN, arch, make_batches(), out_dir=tmp_path / f"single-{name}", progress=False)


@pytest.mark.slow
def test_data_parallel_over_two_ranks_equals_one_process(tmp_path):
    """Global batch B over 2 ranks (B / 2 rows each) == batch B in one process after 12 steps, with AuxK on
    (dead latents after 2 batches: the firing statistics are reduced) and BatchTopK's selection and thresholds."""
    jobs = [(tmp_path / f"dp-{name}", arch, 1, None) for name, arch in ARCHS.items()]
    spawn(_train, tmp_path, jobs)
    for name, arch in ARCHS.items():
        one, two = single(tmp_path, name, arch), load_dictionary(tmp_path / f"dp-{name}")
        assert_same_weights(one, two)
        assert one.meta["dead_frac_final"] == two.meta["dead_frac_final"], name
        if name == "batchtopk":
            torch.testing.assert_close(one.threshold, two.threshold, **TOL)
        assert_same_log(tmp_path / f"single-{name}", tmp_path / f"dp-{name}")


def assert_same_snapshots(a, b):
    """The decoder-norm snapshots agree (latent parallel: each rank's features gathered), up to float16 rounding."""
    one, two = read_profile_snapshots(a), read_profile_snapshots(b)
    assert one.step_S.tolist() == two.step_S.tolist() and one.tokens_S.tolist() == two.tokens_S.tolist()
    np.testing.assert_allclose(one.norms_SFL.astype(np.float32), two.norms_SFL.astype(np.float32), rtol=2e-3, atol=1e-6)


def assert_same_log(a, b):
    """The training curves agree in every column that is a mean over rows or a global statistic (not the batch
    FVU, whose denominator is each rank's own batch variance)."""
    import pandas as pd

    one, two = pd.read_csv(a / "train_log.csv"), pd.read_csv(b / "train_log.csv")
    assert list(one.columns) == list(two.columns) and len(one) == len(two) == 3
    for column in ("step", "tokens", "loss", "mse", "aux", "sparsity", "l0", "dead_frac", "lr"):
        np.testing.assert_allclose(one[column], two[column], rtol=1e-4, atol=1e-6, err_msg=column)


def _sharded_parity(rank, variant):
    torch.manual_seed(0)
    acts = data(256)
    aux = {"k_aux": 6, "aux_frac": 0.5 if variant == "weakly_causal" else 1.0}  # AuxK on every row / on half
    full = Crosscoder(crosscoder_cfg(variant=variant, **aux), seed=1)
    full.calibrate_(acts)
    sharded = ShardedCrosscoder(Crosscoder(crosscoder_cfg(variant=variant, **aux), seed=1), init_mesh("cpu", 2))
    sharded.calibrate_(acts)
    lo, hi = sharded.lo, sharded.hi
    torch.testing.assert_close(sharded.b_enc, full.b_enc[lo:hi], **TOL)
    torch.testing.assert_close(sharded.b_dec, full.b_dec, **TOL)
    dead_F = torch.rand(F, generator=torch.Generator().manual_seed(3)) < 0.4
    ref = full.loss(acts, dead_F=dead_F)
    got = sharded.loss(acts, dead_F=dead_F[lo:hi])
    assert float(ref.losses["aux"]) > 0
    for key in ("mse", "aux"):
        torch.testing.assert_close(got.losses[key], ref.losses[key], **TOL)
    torch.testing.assert_close(got.loss, ref.loss, **TOL)
    torch.testing.assert_close(got.recon_BLD, ref.recon_BLD, **TOL)
    assert torch.equal(got.fired_F, ref.fired_F[lo:hi]) and got.l0 == pytest.approx(ref.l0)
    ref.loss.backward()
    got.loss.backward()
    clip_grad_norm_(sharded, 0.05, sharded.mesh)
    torch.nn.utils.clip_grad_norm_(full.parameters(), 0.05)
    for name, p in sharded.named_parameters():
        torch.testing.assert_close(p.grad, sharded.local(name, getattr(full, name).grad), **TOL, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["acausal", "weakly_causal"])
def test_latent_sharded_forward_loss_and_gradients_equal_unsharded(tmp_path, variant):
    """Features split over 2 ranks: calibration, reconstruction, MSE and AuxK loss (on every row; on half the rows
    for the weakly causal case), firing, L0 and every (clipped) gradient equal the unsharded crosscoder's (the slice
    of it)."""
    spawn(_sharded_parity, tmp_path, variant)


@pytest.mark.slow
def test_latent_parallel_training_equals_one_process(tmp_path):
    """2 latent ranks (each half the features) train the same TopK crosscoders as one process."""
    names = ("topk", "weakly_causal")
    spawn(_train, tmp_path, [(tmp_path / f"lp-{n}", ARCHS[n], 2, None) for n in names])
    for name in names:
        assert_same_weights(single(tmp_path, name, ARCHS[name]), load_dictionary(tmp_path / f"lp-{name}"))
        assert_same_log(tmp_path / f"single-{name}", tmp_path / f"lp-{name}")
        assert_same_snapshots(tmp_path / f"single-{name}", tmp_path / f"lp-{name}")


@pytest.mark.slow
def test_two_by_two_mesh_trains_what_one_process_trains(tmp_path):
    """4 ranks as 2 data x 2 latent (each rank: half the rows of every batch, half the features)."""
    spawn(_train, tmp_path, [(tmp_path / "mesh", ARCHS["topk"], 2, None)], nprocs=4)
    assert_same_weights(single(tmp_path, "topk", ARCHS["topk"]), load_dictionary(tmp_path / "mesh"))
    assert_same_log(tmp_path / "single-topk", tmp_path / "mesh")


@pytest.mark.slow
def test_killed_two_rank_runs_resume_on_one_or_two_ranks(tmp_path):
    """A 2-rank run (data parallel, and latent parallel) killed at step 7 (checkpoint at 5) resumes with 1 rank
    and with 2 and ends with the weights of an uninterrupted single-process run."""
    arch = ARCHS["topk"]
    spawn(_train, tmp_path, [(tmp_path / "dp", arch, 1, 7), (tmp_path / "lp", arch, 2, 7)])
    for name in ("dp", "lp"):
        assert torch.load(tmp_path / name / CHECKPOINT, weights_only=False)["step"] == 5
        shutil.copytree(tmp_path / name, tmp_path / f"{name}-on-1")
    spawn(_train, tmp_path, [(tmp_path / "dp", arch, 1, None), (tmp_path / "lp", arch, 2, None)])
    reference = single(tmp_path, "topk", arch)
    for name in ("dp", "lp"):
        resumed_on_1 = train_crosscoder(TRAIN, arch, make_batches(), out_dir=tmp_path / f"{name}-on-1", progress=False)
        resumed_on_2 = load_dictionary(tmp_path / name)
        assert resumed_on_1.meta["resumed_from_step"] == resumed_on_2.meta["resumed_from_step"] == 5
        assert_same_weights(reference, resumed_on_1)
        assert_same_weights(reference, resumed_on_2)
        assert_same_snapshots(tmp_path / "single-topk", tmp_path / f"{name}-on-1")  # none lost or taken twice
        assert_same_snapshots(tmp_path / "single-topk", tmp_path / name)


def test_store_parts_are_disjoint_and_make_the_whole_batch(tiny_store):
    """``iter_batches(part=(i, 2))``: the two parts of every batch are its two halves (so disjoint, and both
    seeded like the single-process stream); the in-memory store serves the same batches."""
    from crosslayer.store import InMemoryStore

    kw = dict(layers=[0, 1], seed=3, epochs=2, buffer_rows=96)
    whole = list(tiny_store.iter_batches(64, **kw))
    halves = [list(tiny_store.iter_batches(64, part=(i, 2), **kw)) for i in range(2)]
    assert len(whole) == len(halves[0]) == len(halves[1]) > 2
    for w, a, b in zip(whole, *halves):
        assert torch.equal(torch.cat([a, b]), w)
    memory = InMemoryStore(tiny_store, layers=[0, 1])
    for w, m in zip(whole, memory.iter_batches(64, **kw)):
        assert torch.equal(w, m)
    for a, m in zip(halves[1], memory.iter_batches(64, part=(1, 2), **kw)):
        assert torch.equal(a, m)


def test_mesh_errors_are_one_line(tmp_path):
    from crosslayer.distributed import batch_part
    from crosslayer.errors import CrosslayerError

    with pytest.raises(CrosslayerError, match="not divisible by the 3 data-parallel ranks"):
        batch_part(64, type("M", (), {"data_size": 3, "data_rank": 0})())
    assert init_mesh("cpu", 1) is None  # one process: no process group at all
    assert not dist.is_initialized()
    fake = Mesh(rank=0, world=2, latent_size=2, data_group=None, latent_group=None, device="cpu")
    with pytest.raises(CrosslayerError, match="latent parallelism shards TopK crosscoders"):
        ShardedCrosscoder(Crosscoder(crosscoder_cfg("relu")), fake)
    with pytest.raises(CrosslayerError, match="--width 31 is not divisible by --latent-parallel 2"):
        ShardedCrosscoder(Crosscoder(CrosscoderConfig(layers=(0,), d_model=D, n_features=31, k=4)), fake)


@pytest.mark.slow
def test_cli_nproc_2_under_torchrun_trains_what_one_process_trains(tiny_store, tmp_path, monkeypatch):
    """``crosslayer train-crosscoder --nproc 2`` relaunches itself as ``torchrun --nproc_per_node 2 -m crosslayer
    train-crosscoder ...`` (each rank reads its half of every store batch) and saves the one-process crosscoder."""
    from pathlib import Path

    from crosslayer.cli import main

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # the ranks import this checkout
    common = ["train-crosscoder", "--store", str(tiny_store.path), "--width", "32", "--k", "4", "--tokens", "640",
              "--batch-size", "64", "--checkpoint-every", "4"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    assert_same_weights(load_dictionary(tmp_path / "one"), load_dictionary(tmp_path / "two"))
    assert main([*common, "--out", str(tmp_path / "odd"), "--nproc", "2", "--batch-size", "63"]) == 2


def test_cli_refuses_layouts_it_cannot_run(tiny_store, tmp_path, capsys):
    """One-line errors, exit 2, nothing created: latent sharding without the processes, a batch the ranks cannot
    share, the sae-lens trainer on several processes."""
    from crosslayer.cli import main

    store = ["--store", str(tiny_store.path), "--out", str(tmp_path / "out"), "--tokens", "640"]
    cases = {("train-crosscoder", "--width", "32", "--batch-size", "64", "--latent-parallel", "2"): "launch several with --nproc",
             ("train-crosscoder", "--width", "32", "--nproc", "2", "--batch-size", "63"): "not divisible",
             ("train-saes", "--width", "8", "--batch-size", "64", "--trainer", "sae-lens", "--nproc", "2"): "runs in one process"}
    for argv, message in cases.items():
        assert main([*argv, *store]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
