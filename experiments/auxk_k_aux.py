"""AuxK's k_aux on the synthetic ground truth: dead fraction and held-out FVU of TopK crosscoders.

Issue 12 asks whether k_aux = d_model // 2 (Gao et al.'s d/2, chosen for one layer of width d) is
right for a crosscoder whose encoder reads L * d numbers. This trains tiny acausal TopK crosscoders
on :func:`crosslayer.synthetic.make_synthetic` data for each k_aux and seed and prints, per run and
as means over seeds: ``dead_train`` (latents silent for the trainer's dead window at the end, the
set AuxK trains), ``dead_heldout`` (latents that never fire on the held-out rows) and ``fvu``
(held-out FVU, mean over layers, :func:`crosslayer.evals.fvu`).

    python experiments/auxk_k_aux.py --out experiments/results/auxk_k_aux_G64_F256.csv     # ~3 min here
    python experiments/auxk_k_aux.py --truth 256 --features 512 \
        --out experiments/results/auxk_k_aux_G256_F512.csv                                  # AuxK matters for FVU
    python experiments/auxk_k_aux.py --layers 4 --seeds 0 --steps 300                        # a quick look

The committed CSVs are these two runs; ``tests/test_crosscoder.py::test_auxk_measurement_supports_the_default``
checks the :mod:`crosslayer.crosscoder` docstring's statements against them (k_aux from d/4 to L d gives
the same held-out FVU within seed noise, larger k_aux leaves more latents dead, so the default stays
d_model // 2), and ``test_auxk_default_k_aux_not_worse`` reruns a cheap version (slow marker).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's crosslayer, not an installed one

from crosslayer.crosscoder import CrosscoderConfig
from crosslayer.evals import fvu
from crosslayer.synthetic import make_synthetic
from crosslayer.training import TrainConfig, train_crosscoder


def _stream(acts, batch_size: int, seed: int):
    """``make_batches(start_step)``: seeded random batches (resumable)."""
    def make(start):
        step = start
        while True:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            yield acts[torch.randint(0, acts.shape[0], (batch_size,), generator=gen)]
            step += 1
    return make


def run_one(*, n_layers: int, k_aux: int | None, seed: int, aux_coef: float = 1 / 32, d_model: int = 32,
            n_truth: int = 64, n_features: int = 256, k: int = 4, steps: int = 1500, batch_size: int = 256,
            n_tokens: int = 40_000, n_heldout: int = 40_000) -> dict:
    """Train one TopK crosscoder on synthetic data (data and init seeded by ``seed``); its metrics."""
    acts, _ = make_synthetic(n_layers, d_model, n_truth, n_tokens + n_heldout, seed=seed)
    train, heldout = acts[:n_tokens], acts[n_tokens:]
    arch = CrosscoderConfig(layers=tuple(range(n_layers)), d_model=d_model, n_features=n_features, k=k, k_aux=k_aux,
                            aux_coef=aux_coef)
    cfg = TrainConfig(tokens=steps * batch_size, batch_size=batch_size, lr=3e-3, seed=seed, log_every=steps)
    with tempfile.TemporaryDirectory() as tmp:
        cc = train_crosscoder(cfg, arch, _stream(train, batch_size, seed), out_dir=f"{tmp}/cc", progress=False)
    with torch.no_grad():
        out = cc(heldout)
    return {"layers": n_layers, "k_aux": (k_aux or d_model // 2) if aux_coef else 0, "seed": seed,
            "dead_train": cc.meta["dead_frac_final"],
            "dead_heldout": float((out.feats_BF != 0).sum(0).eq(0).float().mean()),
            "fvu": float(fvu(heldout, out.recon_BLD).mean())}


def sweep(layer_counts=(4, 6), seeds=(0, 1, 2), d_model: int = 32, **kw):
    """Every k_aux in {d/4, d/2, L d/4, L d/2, L d} and no AuxK (k_aux 0 in the table) for each L and
    seed: a DataFrame."""
    import pandas as pd

    rows = []
    for L in layer_counts:
        for k_aux in sorted({d_model // 4, d_model // 2, L * d_model // 4, L * d_model // 2, L * d_model}):
            for seed in seeds:
                rows.append(run_one(n_layers=L, k_aux=k_aux, seed=seed, d_model=d_model, **kw))
                print(rows[-1], flush=True)
        for seed in seeds:
            rows.append(run_one(n_layers=L, k_aux=None, aux_coef=0.0, seed=seed, d_model=d_model, **kw))
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="4,6", help="comma-separated layer counts L")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--features", type=int, default=256, help="crosscoder width F")
    p.add_argument("--truth", type=int, default=64, help="ground-truth features G")
    p.add_argument("--k", type=int, default=4, help="TopK k")
    p.add_argument("--out", default=None, help="CSV of every run (layers, k_aux, seed, dead_train, dead_heldout, fvu)")
    args = p.parse_args()
    torch.set_num_threads(1)
    table = sweep(tuple(int(x) for x in args.layers.split(",")), tuple(int(x) for x in args.seeds.split(",")),
                  steps=args.steps, n_features=args.features, n_truth=args.truth, k=args.k)
    if args.out:
        from crosslayer.io import write_csv

        write_csv(table.assign(truth=args.truth, features=args.features, steps=args.steps, k=args.k), args.out)
    summary = table.groupby(["layers", "k_aux"])[["dead_train", "dead_heldout", "fvu"]].agg(["mean", "std"])
    print(summary.round(4).to_string())


if __name__ == "__main__":
    main()
