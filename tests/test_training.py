"""Crosscoder training (crosslayer.training): schedules, learning, exact resume after a simulated
kill, NaN handling, finished-run reuse, and training from an activation store.
"""

import json
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.dictionary import load_dictionary
from crosslayer.errors import CrosslayerError
from crosslayer.training import CHECKPOINT, PROFILE_SNAPSHOTS, TrainConfig, read_profile_snapshots, train_crosscoder

L, D, F = 3, 8, 32


def data(n=2048, seed=0):
    from crosslayer.synthetic import make_synthetic

    return make_synthetic(L, D, 24, n, seed=seed)[0]


def make_batches(acts, bs=64, nan_at=None, kill_at=None):
    """``make_batches(start_step)``: a deterministic endless stream, optionally poisoned or killed."""

    def make(start):
        step = start
        while True:
            if kill_at is not None and step == kill_at:
                raise KeyboardInterrupt  # the process is killed while fetching this batch
            g = torch.Generator().manual_seed(step)
            batch = acts[torch.randint(0, acts.shape[0], (bs,), generator=g)]
            if nan_at is not None and step == nan_at:
                batch = batch.clone()
                batch[0, 0, 0] = float("nan")
            yield batch
            step += 1

    return make


def model_cfg(activation="topk", **kw):
    return CrosscoderConfig(layers=tuple(range(L)), d_model=D, n_features=F, activation=activation, k=4, **kw)


def test_schedules():
    cfg = TrainConfig(tokens=100 * 64, batch_size=64, lr=1.0, lr_warm_up_steps=10, lr_decay_steps=20,
                      sparsity_coef=2.0, sparsity_warm_up_steps=50)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == 1.0 and cfg.lr_at(50) == 1.0
    assert cfg.lr_at(90) == pytest.approx(0.5) and cfg.lr_at(99) == pytest.approx(0.05)
    # the decay's share of the run: 20 % by default, a straight line to 0 over the whole run at 1.0
    assert TrainConfig(tokens=100 * 64, batch_size=64, lr=1.0).lr_at(79) == 1.0
    assert TrainConfig(tokens=100 * 64, batch_size=64, lr=1.0).lr_at(90) == pytest.approx(0.5)
    line = TrainConfig(tokens=100 * 64, batch_size=64, lr=1.0, lr_decay_frac=1.0)
    assert [line.lr_at(s) for s in (0, 50, 99)] == pytest.approx([1.0, 0.5, 0.01])
    with pytest.raises(CrosslayerError, match="lr_decay_frac"):
        TrainConfig(tokens=640, batch_size=64, lr_decay_frac=1.5)
    assert cfg.sparsity_at(24, "relu") == pytest.approx(1.0) and cfg.sparsity_at(80, "relu") == 2.0
    assert cfg.steps == 100 and TrainConfig(tokens=64 * 100 + 63, batch_size=64).steps == 100
    assert TrainConfig(tokens=640, batch_size=64).sparsity_at(5, "relu") == 5.0  # default lambda, no warm-up
    # the dead-latent window: the value given, else a tenth of the budget (at least a batch, at most 10M)
    assert TrainConfig(tokens=640, batch_size=64, dead_after_tokens=7).dead_after == 7
    assert TrainConfig(tokens=6400, batch_size=64).dead_after == 640
    assert TrainConfig(tokens=320, batch_size=64).dead_after == 64
    assert TrainConfig(tokens=10**9).dead_after == 10_000_000
    for bad in ({"tokens": 63, "batch_size": 64}, {"tokens": 64, "batch_size": 0}, {"tokens": 64, "lr": 0.0},
                {"tokens": 64, "lr": float("nan")}, {"tokens": 64, "lr": float("inf")},
                {"tokens": 64, "dead_after_tokens": 0}):
        with pytest.raises(CrosslayerError):
            TrainConfig(**({"batch_size": 64} | bad))


def test_sparsity_ramp_schedules():
    """lambda's linear ramp: by default over the first 5 % of steps for ReLU (Anthropic, April 2024) and
    over the whole run for JumpReLU (Anthropic, January 2025); ``sparsity_warm_up_frac`` picks either for
    any activation, ``sparsity_warm_up_steps`` overrides both."""
    base = {"tokens": 200 * 64, "batch_size": 64, "sparsity_coef": 2.0}
    default = TrainConfig(**base)
    assert default.sparsity_warm_up("relu") == 10 and default.sparsity_warm_up("jumprelu") == 200
    assert default.sparsity_at(4, "relu") == pytest.approx(1.0) and default.sparsity_at(9, "relu") == 2.0
    assert default.sparsity_at(99, "jumprelu") == pytest.approx(1.0) and default.sparsity_at(199, "jumprelu") == 2.0
    whole = TrainConfig(**base, sparsity_warm_up_frac=1.0)  # Anthropic's schedule for ReLU too
    assert [whole.sparsity_at(s, "relu") for s in (0, 49, 199)] == pytest.approx([0.01, 0.5, 2.0])
    early = TrainConfig(**base, sparsity_warm_up_frac=0.05)  # the 5 % ramp for JumpReLU too
    assert early.sparsity_at(4, "jumprelu") == pytest.approx(1.0) and early.sparsity_at(10, "jumprelu") == 2.0
    assert TrainConfig(**base, sparsity_warm_up_frac=0.0).sparsity_at(0, "jumprelu") == 2.0
    steps = TrainConfig(**base, sparsity_warm_up_frac=1.0, sparsity_warm_up_steps=20)
    assert steps.sparsity_warm_up("relu") == 20 and steps.sparsity_at(9, "relu") == pytest.approx(1.0)
    assert TrainConfig(**base).sparsity_at(0, "topk") == 2.0  # unused by TopK (no lambda)
    for bad in (-0.1, 1.5):
        with pytest.raises(CrosslayerError, match="sparsity_warm_up_frac"):
            TrainConfig(**base, sparsity_warm_up_frac=bad)


@pytest.mark.parametrize("frac", [None, 0.05])
def test_jumprelu_training_logs_the_ramp(tmp_path, frac):
    """The log's lambda follows the chosen schedule during a JumpReLU run."""
    cfg = TrainConfig(tokens=40 * 64, batch_size=64, lr=3e-3, log_every=10, sparsity_coef=0.1,
                      sparsity_warm_up_frac=frac)
    train_crosscoder(cfg, model_cfg("jumprelu"), make_batches(data(512)), out_dir=tmp_path / "cc", progress=False)
    import pandas as pd

    logged = pd.read_csv(tmp_path / "cc" / "train_log.csv").sparsity_coef.tolist()
    assert logged == pytest.approx([0.025, 0.05, 0.075, 0.1] if frac is None else [0.1] * 4)


@pytest.mark.parametrize("steps", [30, 300])
def test_batchtopk_inference_l0_matches_training(tmp_path, steps):
    """BatchTopK: the inference threshold is calibrated at the end of training, so inference L0 on
    held-out rows is within 10 % of k (training's mean L0) after short and longer runs; the meta
    reports both L0s on the calibration rows and what the running EMA estimate would have given
    (the old estimate, an EMA from 0, gave 6.8 at k = 4 after 100 steps: crosslayer.crosscoder's docstring)."""
    acts = data(8192 + 4096, seed=1)
    k, bs = 4, 256
    cfg = TrainConfig(tokens=steps * bs, batch_size=bs, lr=3e-3, log_every=steps)
    cc = train_crosscoder(cfg, model_cfg("batchtopk"), make_batches(acts[:8192], bs=bs), out_dir=tmp_path / "cc",
                          progress=False)
    with torch.no_grad():
        heldout_l0 = float((cc.encode(acts[8192:]) != 0).sum(1).float().mean())
    meta = load_dictionary(tmp_path / "cc").meta["batchtopk"]
    print(f"steps {steps}: held-out inference L0 {heldout_l0:.3f}, k {k}, meta {meta}")
    assert abs(heldout_l0 - k) <= 0.1 * k
    assert meta["k"] == k and meta["rows"] == 4096 and meta["heldout"]
    assert meta["train_l0"] == pytest.approx(k, abs=0.05)
    assert meta["inference_l0"] == pytest.approx(meta["train_l0"], abs=1.5 / bs)  # exact up to ties
    assert meta["threshold"] == pytest.approx(float(cc.threshold)) and meta["threshold_ema"] > 0


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_training_reduces_loss_and_writes_artifacts(tmp_path, activation):
    acts = data()
    cfg = TrainConfig(tokens=120 * 64, batch_size=64, lr=3e-3, log_every=20, dead_after_tokens=640,
                      sparsity_coef=0.1)
    cc = train_crosscoder(cfg, model_cfg(activation), make_batches(acts), out_dir=tmp_path / "cc", progress=False)
    import pandas as pd

    log = pd.read_csv(tmp_path / "cc" / "train_log.csv")
    assert list(log.step) == list(range(20, 121, 20))
    assert log.fvu.iloc[-1] < 0.5 * log.fvu.iloc[0] or log.fvu.iloc[-1] < 0.2
    assert set(log.columns) >= {"loss", "mse", "sparsity", "aux", "fvu", "l0", "dead_frac", "lr"}
    assert not (tmp_path / "cc" / CHECKPOINT).exists()
    back = load_dictionary(tmp_path / "cc")
    assert json.loads((tmp_path / "cc" / "cfg.json").read_text())["status"] == "complete"
    assert back.meta["steps"] == 120
    assert back.meta["training"]["tokens"] == 120 * 64
    assert torch.equal(back.W_dec, cc.W_dec)
    if activation == "batchtopk":
        assert float(back.threshold) > 0
    _check_profile_snapshots(tmp_path / "cc", back, cfg)
    # a rerun of a finished run loads it; a different run in the same folder is refused
    again = train_crosscoder(cfg, model_cfg(activation), make_batches(acts), out_dir=tmp_path / "cc", progress=False)
    assert torch.equal(again.W_enc, cc.W_enc)
    with pytest.raises(CrosslayerError, match="holds a different dictionary training \\(training\\.tokens: "):
        train_crosscoder(TrainConfig(tokens=7 * 64, batch_size=64), model_cfg(activation), make_batches(acts),
                         out_dir=tmp_path / "cc", progress=False)


def _check_profile_snapshots(folder, back, cfg):
    """The decoder-norm snapshots: at the planned steps (0, then ten evenly spaced ending at the last), flat at step 0
    (every layer starts at the same norm), the last one the saved dictionary's norms, and its statistics those of
    decoder_profile (one implementation: crosslayer.features.profile_stats)."""
    from crosslayer.features import decoder_profile, profile_stats

    snaps = read_profile_snapshots(folder)
    assert cfg.profile_steps == [0] + [i * cfg.steps // 10 for i in range(1, 11)]
    assert snaps.step_S.tolist() == cfg.profile_steps and snaps.tokens_S.tolist() == [s * 64 for s in cfg.profile_steps]
    assert snaps.layers == back.layers and snaps.norms_SFL.shape == (11, F, L)
    _, _, _, span0, ent0 = profile_stats(snaps.norms_SFL[0])
    assert (span0 == L).all() and torch.allclose(ent0, torch.ones(F), atol=1e-4)
    torch.testing.assert_close(torch.as_tensor(snaps.norms_SFL[-1]).float(), back.decoder_norms(), rtol=1e-3, atol=1e-6)
    _, peak, _, span, ent = profile_stats(snaps.norms_SFL[-1])
    prof = decoder_profile(back)
    assert peak.tolist() == prof.peak_layer.tolist() and span.tolist() == prof.span.tolist()
    assert ent.numpy() == pytest.approx(prof.entropy.to_numpy(), abs=2e-3)


@pytest.mark.parametrize("activation,factory", [("topk", True), ("topk", False), ("batchtopk", True),
                                                ("relu", True), ("jumprelu", True)])
def test_resume_after_kill_gives_identical_weights(tmp_path, activation, factory):
    acts = data()
    cfg = TrainConfig(tokens=40 * 64, batch_size=64, lr=3e-3, lr_warm_up_steps=5, checkpoint_every=10, log_every=5,
                      dead_after_tokens=256, sparsity_coef=0.1)
    full = train_crosscoder(cfg, model_cfg(activation), make_batches(acts), out_dir=tmp_path / "full", progress=False)

    def source(kill_at=None):
        make = make_batches(acts, kill_at=kill_at)
        return make if factory else make(0)  # a plain iterable is re-created and skipped to the position

    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(cfg, model_cfg(activation), source(kill_at=27), out_dir=tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 20 and [s["step"] for s in ckpt["snapshots"]] == [0, 4, 8, 12, 16, 20]
    resumed = train_crosscoder(cfg, model_cfg(activation), source(), out_dir=tmp_path / "run", progress=False)
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.meta["resumed_from_step"] == 20
    # decoder-norm snapshots: those before the checkpoint kept, those after it (24, taken before the kill) retaken
    # once, all bit-identical to the uninterrupted run's
    snaps, whole = read_profile_snapshots(tmp_path / "run"), read_profile_snapshots(tmp_path / "full")
    assert snaps.step_S.tolist() == cfg.profile_steps == list(range(0, 41, 4))
    assert (snaps.norms_SFL == whole.norms_SFL).all() and (snaps.tokens_S == whole.tokens_S).all()


def test_checkpoint_from_before_the_feature_major_encoder_resumes_exactly(tmp_path):
    """A checkpoint whose encoder (and its Adam moments) is input-major ``W_enc`` [L, d, F], as written before
    issue 13, resumes to the same weights as an uninterrupted run."""
    acts = data()
    cfg = TrainConfig(tokens=30 * 64, batch_size=64, lr=3e-3, checkpoint_every=10, dead_after_tokens=256)
    full = train_crosscoder(cfg, model_cfg("topk"), make_batches(acts), out_dir=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(cfg, model_cfg("topk"), make_batches(acts, kill_at=15), out_dir=tmp_path / "run",
                         progress=False)
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    ckpt["model"] = {("W_enc" if k == "W_enc_FLD" else k): (v.permute(1, 2, 0) if k == "W_enc_FLD" else v)
                     for k, v in ckpt["model"].items()}
    moments = ckpt["optim"]["state"][0]  # W_enc_FLD is the first parameter
    moments.update({k: v.permute(1, 2, 0).contiguous() for k, v in moments.items() if k != "step"})
    torch.save(ckpt, tmp_path / "run" / CHECKPOINT)
    resumed = train_crosscoder(cfg, model_cfg("topk"), make_batches(acts), out_dir=tmp_path / "run", progress=False)
    assert resumed.meta["resumed_from_step"] == 10
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    acts = data()
    cfg = TrainConfig(tokens=30 * 64, batch_size=64, lr=3e-3, checkpoint_every=5)
    with pytest.raises(CrosslayerError, match=r"nan at step 7; the last good checkpoint \(step 5\)"):
        train_crosscoder(cfg, model_cfg(), make_batches(acts, nan_at=7), out_dir=tmp_path / "cc", progress=False)
    ckpt = torch.load(tmp_path / "cc" / CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert json.loads((tmp_path / "cc" / "cfg.json").read_text())["status"] == "training"
    with pytest.raises(CrosslayerError):
        load_dictionary(tmp_path / "cc")  # an unfinished run is not a dictionary
    with pytest.raises(CrosslayerError, match="no checkpoint was written yet"):
        train_crosscoder(cfg, model_cfg(), make_batches(acts, nan_at=2), out_dir=tmp_path / "cc2", progress=False)


def test_iterator_errors(tmp_path):
    acts = data(256)
    with pytest.raises(CrosslayerError, match="ran out after 2 of 5"):
        train_crosscoder(TrainConfig(tokens=5 * 64, batch_size=64), model_cfg(), iter([acts[:64], acts[64:128]]),
                         out_dir=tmp_path / "a", progress=False)
    with pytest.raises(CrosslayerError, match="reads"):
        train_crosscoder(TrainConfig(tokens=5 * 64, batch_size=64), model_cfg(), iter([acts[:64, :2]]),
                         out_dir=tmp_path / "b", progress=False)


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtype of every matrix multiply that actually runs (after autocast)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            self.seen.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_runs_the_matmuls_in_bfloat16(tmp_path):
    """bf16=True runs the forward matmuls in bfloat16 (the float32 run none), keeps float32 parameters,
    and lands near, but not exactly on, the float32 weights."""
    acts, runs = data(256), {}
    for bf16 in (False, True):
        with MatmulDtypes() as mode:
            runs[bf16] = train_crosscoder(TrainConfig(tokens=3 * 64, batch_size=64, lr=3e-3, bf16=bf16), model_cfg(),
                                          make_batches(acts), out_dir=tmp_path / str(bf16), progress=False)
        assert (torch.bfloat16 in mode.seen) == bf16
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in runs[True].parameters())
    assert not torch.equal(runs[True].W_dec, runs[False].W_dec)
    for name, value in runs[False].state_dict().items():
        torch.testing.assert_close(runs[True].state_dict()[name], value, atol=0.02, rtol=0)


def test_train_from_store(tmp_path, tiny_store):
    import numpy as np

    from crosslayer.evals import fvu
    from crosslayer.training import train_crosscoder_from_store

    store = tiny_store
    arch = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=64, k=4,
                            variant="weakly_causal")
    cc = train_crosscoder_from_store(store, arch, TrainConfig(tokens=64 * 40, batch_size=64, lr=3e-3),
                                     out_dir=tmp_path / "cc", progress=False)
    assert isinstance(cc, Crosscoder) and cc.layers == store.layers and cc.hooks == store.hooks
    assert cc.meta["store"]["model"] == store.manifest["model"]
    torch.testing.assert_close(cc.norm_factors, store.norm_factors.float())
    x = store.get(np.arange(store.n_rows), normalized=True)
    back = load_dictionary(tmp_path / "cc")
    assert float(fvu(x, back.reconstruct(x)).mean()) < 0.9 and (back.encode(x) != 0).sum(1).max() <= 4
    # one layer of the store: its hook and factor; a layer or width the store lacks is refused
    one = train_crosscoder_from_store(store, CrosscoderConfig(layers=(1,), d_model=store.width, n_features=16, k=2),
                                      TrainConfig(tokens=64 * 3, batch_size=64), out_dir=tmp_path / "one",
                                      progress=False)
    assert one.hooks == [store.hooks[1]] and torch.equal(one.norm_factors, store.norm_factors[1:].float())
    assert (tmp_path / "cc" / PROFILE_SNAPSHOTS).is_file() and not (tmp_path / "one" / PROFILE_SNAPSHOTS).exists()
    with pytest.raises(CrosslayerError, match="no profile_snapshots.npz in .*one: not a finished multi-layer"):
        read_profile_snapshots(tmp_path / "one")
    with pytest.raises(CrosslayerError, match="not in store"):
        train_crosscoder_from_store(store, CrosscoderConfig(layers=(0, 5), d_model=store.width, n_features=16, k=2),
                                    TrainConfig(tokens=64, batch_size=64), out_dir=tmp_path / "bad", progress=False)
    with pytest.raises(CrosslayerError, match="d_model 32 != store width 64"):
        train_crosscoder_from_store(store, CrosscoderConfig(layers=(0,), d_model=32, n_features=16, k=2),
                                    TrainConfig(tokens=64, batch_size=64), out_dir=tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_convergence_verdict_from_the_curve():
    """Converged when held-out FVU fell by < 2 % (relative) over the last quarter of the tokens; the reference is
    the curve at three quarters, interpolated between rows; no held-out rows: no verdict."""
    from crosslayer.training import convergence

    tokens = [100 * i for i in range(1, 21)]  # 2000 tokens; three quarters = 1500
    flat = [1.0 / i for i in range(1, 16)] + [0.0670, 0.0668, 0.0665, 0.0662, 0.0660]
    still = [1.0 / i for i in range(1, 21)]
    got = convergence([{"tokens": t, "heldout_fvu": v} for t, v in zip(tokens, flat)])
    assert got["fvu_three_quarters"] == pytest.approx(1 / 15) and got["converged"] is True
    assert got["rel_gain_last_quarter"] == pytest.approx((1 / 15 - 0.066) / (1 / 15))
    assert convergence([{"tokens": t, "heldout_fvu": v} for t, v in zip(tokens, still)])["converged"] is False
    assert convergence([{"tokens": t, "heldout_fvu": float("nan")} for t in tokens])["converged"] is None
    rising = [1.0 / i for i in range(1, 16)] + [0.07, 0.08, 0.09, 0.1, 0.2]
    assert convergence([{"tokens": t, "heldout_fvu": v} for t, v in zip(tokens, rising)])["converged"] is False
    assert convergence([{"tokens": 100, "heldout_fvu": 0.5}])["converged"] is None  # one row: no verdict
    # ten rows (the default curve): none at three quarters, so the reference is interpolated between 0.7 and 0.8
    # of the run, not the nearer row (which would measure the last fifth and pass this curve)
    coarse = [{"tokens": 100 * i, "heldout_fvu": v} for i, v in zip(range(1, 11), [1, .5, .4, .35, .3, .25, .22,
                                                                                    .208, .206, .204])]
    got = convergence(coarse)
    assert got["fvu_three_quarters"] == pytest.approx(0.214) and got["converged"] is False
    assert got["rel_gain_last_quarter"] == pytest.approx((0.214 - 0.204) / 0.214)
    assert convergence(coarse[8:])["converged"] is None  # its first row (900 tokens) is after three quarters (750)


def test_divergence_stops_a_run_whose_heldout_fvu_blows_up():
    """A curve row whose held-out FVU exceeds diverge_factor x the best so far, or is not finite, raises
    TrainingDiverged (a one-line CrosslayerError naming the lr); diverge_factor None never does (the trainer
    checks only runs with a held-out set)."""
    from crosslayer.training import TrainingDiverged, _check_divergence

    cfg = TrainConfig(tokens=640, batch_size=64, lr=3e-3, diverge_factor=1.5)
    rows = [{"step": 10 * i, "heldout_fvu": v} for i, v in enumerate([0.5, 0.3, 0.29, 0.4], start=1)]
    _check_divergence(rows, cfg)  # 0.40 < 1.5 x 0.29
    rows.append({"step": 50, "heldout_fvu": 0.63})
    with pytest.raises(TrainingDiverged, match="rose from 0.290 to 0.630 by step 50 at lr 0.003"):
        _check_divergence(rows, cfg)
    _check_divergence(rows, TrainConfig(tokens=640, batch_size=64, diverge_factor=None))
    with pytest.raises(TrainingDiverged):  # a non-finite held-out FVU is divergence too
        _check_divergence(rows + [{"step": 60, "heldout_fvu": float("nan")}], cfg)
    with pytest.raises(CrosslayerError, match="diverge_factor"):
        TrainConfig(tokens=640, batch_size=64, diverge_factor=0.5)


@pytest.mark.parametrize("verb", ["train-crosscoder", "train-saes"])
def test_the_same_command_twice_gives_identical_weights(verb, tmp_path, tiny_store):
    """Determinism: two runs of one CLI training command (store stream, init, AuxK, held-out curve)
    give bit-identical weights and the same curve."""
    from crosslayer.cli import main

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main([verb, "--store", str(tiny_store.path), "--out", str(out), "--width", "16", "--k", "2",
                     "--tokens", "2k", "--batch-size", "64", "--heldout", str(tiny_store.path)]) == 0
        runs.append(load_dictionary(out).state_dict())
    assert runs[0].keys() == runs[1].keys() and runs[0]
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    if verb == "train-crosscoder":
        curves = [(tmp_path / n / "train_log.csv").read_text().splitlines() for n in ("a", "b")]
        strip = [[",".join(c for i, c in enumerate(line.split(",")) if i not in _wall_clock_columns(rows[0]))
                  for line in rows] for rows in curves]
        assert strip[0] == strip[1]


def _wall_clock_columns(header: str) -> set[int]:
    return {i for i, name in enumerate(header.split(",")) if "second" in name or name.endswith("_s")}


def test_a_field_added_at_its_default_keeps_older_folders(tmp_path):
    """Fields added later (aux_frac of the architecture, lr_decay_frac of the training config) at their defaults: a
    folder trained before they existed (the same cfg.json without them) is reused as finished and loads; another
    value is a different run and is refused, naming the field."""
    acts, cfg = data(512), TrainConfig(tokens=4 * 64, batch_size=64, lr=1e-3)
    first = train_crosscoder(cfg, model_cfg(), make_batches(acts), out_dir=tmp_path / "cc", progress=False)
    record = json.loads((tmp_path / "cc" / "cfg.json").read_text())
    del record["crosscoder"]["aux_frac"], record["training"]["lr_decay_frac"]  # as written before the fields existed
    (tmp_path / "cc" / "cfg.json").write_text(json.dumps(record))
    again = train_crosscoder(cfg, model_cfg(aux_frac=1.0), make_batches(acts), out_dir=tmp_path / "cc", progress=False)
    assert torch.equal(first.W_enc, again.W_enc) and load_dictionary(tmp_path / "cc").cfg.aux_frac == 1.0
    with pytest.raises(CrosslayerError, match="aux_frac"):
        train_crosscoder(cfg, model_cfg(aux_frac=0.5), make_batches(acts), out_dir=tmp_path / "cc", progress=False)
    with pytest.raises(CrosslayerError, match="lr_decay_frac"):
        train_crosscoder(replace(cfg, lr_decay_frac=1.0), model_cfg(), make_batches(acts), out_dir=tmp_path / "cc",
                         progress=False)
