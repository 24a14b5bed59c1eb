"""Time the trainer's TopK crosscoder step at one batch size (a slice of ``crosslayer bench crosscoder`` (a)).

Used in session 9 to compare two checkouts of the trainer at the standard preset's batch size (A/B, alternating
runs on the quiet machine): ``PYTHONPATH=<checkout> python experiments/step_time.py STORE 1024``. Prints the
median step time (no dead latents; then 10 % of the latents dead with AuxK on a quarter of the rows), the dense
encoder-forward GEMM of the same shape and their ratios.
"""

import sys
from dataclasses import replace

import torch

import crosslayer
from crosslayer.bench import _median_seconds, _trainer_step
from crosslayer.crosscoder import CrosscoderConfig
from crosslayer.store import ActivationStore


def main(store_path: str, batch_size: int, width: int = 9216, k: int = 32) -> None:
    store = ActivationStore(store_path)
    stream = store.iter_batches(batch_size, seed=0, epochs=None, buffer_rows=batch_size * 4)
    batches = [next(stream) for _ in range(12)]
    cfg = CrosscoderConfig(layers=tuple(store.layers), d_model=store.width, n_features=width, activation="topk", k=k)
    plain = _median_seconds(_trainer_step(cfg, batches), 10)
    auxk = _median_seconds(_trainer_step(replace(cfg, aux_frac=0.25), batches, dead_frac=0.1), 10)
    x_BI = batches[0].reshape(batch_size, -1)
    W_IF = torch.randn(x_BI.shape[1], width)
    gemm = _median_seconds(lambda: x_BI @ W_IF, 10)
    print(f"{crosslayer.__file__}: batch {batch_size}, step {plain * 1e3:.0f} ms, with 10 % dead and AuxK on a "
          f"quarter of the rows {auxk * 1e3:.0f} ms, encoder GEMM {gemm * 1e3:.0f} ms; step / GEMM "
          f"{plain / gemm:.2f} and {auxk / gemm:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
