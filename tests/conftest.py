import json
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    from crosslayer.models import load_model

    return load_model("tiny-2l-64d")


@pytest.fixture(scope="session")
def smollm2():
    from crosslayer.models import load_model

    return load_model("smollm2-135m", dtype="float32")


WORDS = ("the cat sat on a mat while rivers flow to the sea and every number counts "
         "from one to nine as the quiet town sleeps under stars").split()


def make_toy_corpus(path, n_docs=40, seed=0):
    """A small labelled JSONL corpus with a fixed split: three labels, both splits present."""
    rng = random.Random(seed)
    labels = ["prose", "code", "numbers"]
    with open(path, "w") as fh:
        for i in range(n_docs):
            label = labels[i % 3]
            if label == "code":
                text = "\n".join(f"def f{j}(x):\n    return x + {rng.randint(0, 99)}" for j in range(rng.randint(2, 6)))
            elif label == "numbers":
                text = " ".join(str(rng.randint(0, 9999)) for _ in range(rng.randint(20, 60)))
            else:
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 90))) + "."
            split = "heldout" if i % 5 == 0 else "train"
            fh.write(json.dumps({"id": i, "doc": f"doc{i}", "label": label, "split": split,
                                 "source": "toy", "lang": "en", "text": text}) + "\n")
    return path


@pytest.fixture
def toy_corpus_path(tmp_path):
    return make_toy_corpus(tmp_path / "toy.jsonl")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model):
    """A small all-layer store of the tiny model over the toy corpus (shared by several test files)."""
    from crosslayer.corpus import load_corpus, make_windows
    from crosslayer.harvest import harvest

    root = tmp_path_factory.mktemp("tiny_store")
    windows = make_windows(load_corpus(make_toy_corpus(root / "toy.jsonl", n_docs=120)), tiny_model.tokenizer,
                           seq_len=32, n_tokens=4000)
    return harvest(tiny_model, windows, out_dir=root / "store", batch_size=8, shard_mb=1, progress=False)


def random_saes(store=None, *, width=96, k=6, widths=None, d=16, factors=(0.5, 2.0, 1.5), archs=("topk",),
                scale=None):
    """PerLayerSAEs of untrained sae-lens inference SAEs: the one test helper for both uses.

    With ``store``: one SAE per store layer (its hooks, width and norm factors; meta records the
    store's model). Without: layers 0..n-1 of width ``d`` with ``factors``. ``widths``: features per
    layer (default ``width`` at every layer); ``archs`` (topk | jumprelu | standard) cycle over the
    layers. ``scale=None``: sae-lens's init with b_enc ~ N(0, 0.5^2) so features fire often; a float:
    every parameter ~ N(0, scale^2) and JumpReLU thresholds ~ U(0, 0.2).
    """
    import sae_lens as sl

    from crosslayer.hooks import hook_name
    from crosslayer.saes import PerLayerSAEs

    makers = {"topk": lambda w: sl.TopKSAE(sl.TopKSAEConfig(d_in=d, d_sae=w, k=k)),
              "jumprelu": lambda w: sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=d, d_sae=w)),
              "standard": lambda w: sl.StandardSAE(sl.StandardSAEConfig(d_in=d, d_sae=w))}
    if store is not None:
        layers, hooks, factors, d = store.layers, store.hooks, store.norm_factors, store.width
        meta = {"store": {"model": store.manifest["model"]}}
    else:
        layers = list(range(len(widths)))
        hooks, factors, meta = [hook_name("resid_post", l) for l in layers], list(factors[:len(layers)]), {}
    saes = []
    for i, w in enumerate(widths or [width] * len(layers)):
        sae = makers[archs[i % len(archs)]](w)
        with torch.no_grad():
            if scale is None:
                sae.b_enc.copy_(torch.randn(w) * 0.5)
            else:
                for p in sae.parameters():
                    p.copy_(torch.randn_like(p) * scale)
                if hasattr(sae, "threshold"):
                    sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.2)
        saes.append(sae)
    return PerLayerSAEs(saes, layers=layers, hooks=hooks, norm_factors=factors, meta=meta)


@pytest.fixture(scope="session")
def micro_ctx(tmp_path_factory):
    """A micro reproduction (tiny model, builtin corpus) with stores, SAEs and crosscoder trained, but
    no study run yet: the RunContext the studies receive. Its paper folder is a temporary one."""
    from studies.pipeline import RunContext, reproduce, step_names
    from studies.presets import get_preset

    root = tmp_path_factory.mktemp("micro")
    base = [s for s in step_names() if not s.startswith("study-") and s != "paper"]
    out = reproduce("micro", out=root / "run", paper=root / "paper", only=base, progress=False)
    return RunContext(get_preset("micro"), out, paper=root / "paper", progress=False)
