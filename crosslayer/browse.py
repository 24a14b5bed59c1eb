"""The feature browser: a static site of every feature of one or more dictionaries (``crosslayer browse``).

Built from the same streaming analysis as ``crosslayer features`` (:mod:`crosslayer.features`), written
against the :class:`~crosslayer.dictionary.Dictionary` interface only:

1. Per dictionary, one pass over the held-out store (:func:`~crosslayer.features.stream_feature_stats`, all
   features at once): density, max, top-k rows, log10 histogram, a uniform firing sample; then the top and
   quantile examples (:func:`~crosslayer.features.pick_examples`) with every context token's activation
   (:func:`~crosslayer.features.example_contexts`, each context row encoded once), the decoder-norm profile
   (:func:`~crosslayer.features.decoder_profile`), and the logit effects at every layer a feature writes
   (:func:`~crosslayer.features.logit_effect_arrays`; the write rule of :func:`~crosslayer.dictionary.written_pairs`).
2. Cross-links (:mod:`crosslayer.matching`) between dictionaries with the same hook at a shared layer: a
   multi-layer feature's best single-layer latents at each layer it writes, a latent's best multi-layer features
   (those that absorb it), and a single-layer dictionary's chains (Hungarian matches of adjacent layers).
3. The site: HTML, CSS and plain JavaScript (``crosslayer/site/``, no CDN, no build step) and data as JavaScript
   files that call ``window.__chunk(key, data)`` (a ``<script>`` tag loads them, so the site works from
   ``file://`` where ``fetch`` of local files is blocked): per dictionary a small ``meta``, the index in chunks of
   :data:`INDEX_CHUNK` rows, and feature details in chunks of :data:`FEATURE_CHUNK` features loaded on demand.
   Plus ``export/<dictionary>/`` in the batch JSON shape of SAEDashboard's Neuronpedia runner.
4. The whole site is written to a temporary folder next to ``out`` and renamed onto it at the end, so a failed
   build leaves nothing half-written (an older site at ``out`` is replaced only then).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from crosslayer.dictionary import Dictionary, check_compatible, written_pairs
from crosslayer.errors import CrosslayerError
from crosslayer.features import (HIST_BINS, HIST_LOG10_RANGE, decoder_profile, example_contexts, logit_effect_arrays,
                                 pick_examples, stream_feature_stats)
from crosslayer.matching import is_single_layer, layer_blocks, match_adjacent, top_matches

ASSETS = Path(__file__).with_name("site")
SITE_RECORD = "site.json"
"""The file that marks a folder as a crosslayer site (and records what it was built from)."""
INDEX_CHUNK = 2048
FEATURE_CHUNK = 32
DENSE = 0.1
"""A feature firing on more than this fraction of held-out rows is marked dense (as ``evals.evaluate``)."""
KEEP_MAX = 50_000_000
"""Firing activations kept from the streaming pass (~12 bytes each) so that example contexts need no second
encoding pass; beyond it the context rows are encoded again."""
LINK_TAU = 0.5
"""Decoder cosine above which a match counts (a chain link; the default tau of the superposition study)."""


# ----------------------------------------------------------------------------- analysis of one dictionary

def token_table(tokenizer, n_vocab: int) -> np.ndarray:
    """Every token id's own text (decoded alone), as a numpy object array."""
    n = min(n_vocab, len(tokenizer))
    table = np.empty(n_vocab, dtype=object)
    table[:n] = tokenizer.batch_decode([[i] for i in range(n)])
    table[n:] = ""
    return table


def _rounded(a: np.ndarray, digits: int = 3) -> list:
    """``a`` rounded, NaN as None (JSON null), as nested lists."""
    a = np.asarray(a, dtype=np.float64)
    out = np.round(a, digits).astype(object)
    out[np.isnan(a)] = None
    return out.tolist()


def analyse(dictionary: Dictionary, store, model, vocab: np.ndarray, *, k: int = 10, n_bands: int = 4,
            per_band: int = 2, sample: int = 64, before: int = 12, after: int = 4, n_logits: int = 6,
            batch_size: int = 1024) -> dict:
    """Everything the site shows about every feature of ``dictionary``, as arrays (module docstring, step 1)."""
    F = dictionary.n_features
    feats = list(range(F))
    s = stream_feature_stats(dictionary, store, feats, k=k, sample=sample, batch_size=batch_size, keep_max=KEEP_MAX)
    picks = pick_examples(s, n_bands, per_band, seed=0)
    ctx = example_contexts(dictionary, store, picks["pos"], picks["row"], before=before, after=after,
                           batch_size=batch_size, sparse=s.pop("sparse"), positions=picks["pos"])
    live = s["n_fire"] > 0
    where_FL = written_pairs(dictionary.decoder_norms(), dictionary.writes_FL()) & live[:, None]
    effects = logit_effect_arrays(dictionary, model, feats, where_FL, k=n_logits)
    prof = decoder_profile(dictionary)
    return {"stats": s, "picks": picks, "ctx": ctx, "live": live, "where_FL": where_FL, "effects": effects,
            "profile": prof, "vocab": vocab, "n_rows": s["n_rows"], "before": before, "label_names": store.label_names}


# ----------------------------------------------------------------------------- cross-links

def _hooks_at(dictionary: Dictionary) -> dict[int, str]:
    return dict(zip(dictionary.layers, dictionary.hooks))


def cross_links(dicts: dict[str, Dictionary], live: dict[str, torch.Tensor], *, k: int = 3) -> dict[str, dict]:
    """Per dictionary name: ``matches`` (multi-layer feature -> per layer, its best latents of each single-layer
    dictionary), ``absorbed`` (latent -> best multi-layer features) and ``chain`` (latent -> its matches at the
    neighbouring layers), each ``{feature: [...]}`` (module docstring, step 2)."""
    out = {name: {"matches": {}, "absorbed": {}, "chain": {}} for name in dicts}
    singles = {n: d for n, d in dicts.items() if is_single_layer(d)}
    for s_name, sae in singles.items():
        blocks, index = layer_blocks(sae)
        labels = feature_layer_labels(sae)
        _chains(out[s_name]["chain"], sae, blocks, index, live[s_name], labels)
        for m_name, multi in dicts.items():
            if m_name in singles:
                continue
            shared = [l for l in sae.layers if _hooks_at(multi).get(l) == _hooks_at(sae)[l]]
            if shared:
                _link_pair(out, m_name, multi, s_name, sae, shared, blocks, index, live, k, labels)
    return out


def _chains(chain: dict, sae: Dictionary, blocks, index, live_F: torch.Tensor, labels: list[str]) -> None:
    """``chain[f]``: latent f's Hungarian matches at the previous and next layer, with their cosines."""
    for i in range(sae.n_layers - 1):
        a, b = index[i], index[i + 1]
        match, cos = match_adjacent(blocks[i], blocks[i + 1], live_a=live_F[a], live_b=live_F[b])
        ok = np.flatnonzero(match >= 0)
        for src, dst, c in zip(a[ok].tolist(), b[match[ok]].tolist(), cos[ok].tolist()):
            chain.setdefault(src, []).append({"layer": sae.layers[i + 1], "f": dst, "lab": labels[dst], "cos": round(c, 3)})
            chain.setdefault(dst, []).append({"layer": sae.layers[i], "f": src, "lab": labels[src], "cos": round(c, 3)})


def _link_pair(out: dict, m_name: str, multi: Dictionary, s_name: str, sae: Dictionary, shared: list[int],
               blocks, index, live: dict, k: int, labels: list[str]) -> None:
    where_FL = written_pairs(multi.decoder_norms(), multi.writes_FL()) & live[m_name][:, None]
    for l in shared:
        i, j = multi.layer_index(l), sae.layer_index(l)
        W_FD = multi.decoder_vectors(l) * where_FL[:, i, None]
        B_WD = blocks[j] * live[s_name][index[j]][:, None]
        m = top_matches(W_FD, B_WD, k)
        fwd_idx = index[j][m["fwd_idx"]].tolist()
        for f in where_FL[:, i].nonzero().squeeze(1).tolist():
            items = [{"d": s_name, "f": g, "lab": labels[g], "cos": round(c, 3)}
                     for g, c in zip(fwd_idx[f], m["fwd_cos"][f].tolist()) if c > 0]
            out[m_name]["matches"].setdefault(f, []).append({"layer": l, "items": items})
        for w, g in enumerate(index[j].tolist()):
            items = [{"d": m_name, "f": f, "cos": round(c, 3)} for f, c in
                     zip(m["back_idx"][w].tolist(), m["back_cos"][w].tolist()) if c > 0]
            if items:
                out[s_name]["absorbed"].setdefault(g, []).extend(items)


# ----------------------------------------------------------------------------- records

def feature_layer_labels(dictionary: Dictionary) -> list[str]:
    """A short label per feature: ``L<layer>:<index within the layer>`` for single-layer dictionaries, else ``""``."""
    if not is_single_layer(dictionary):
        return [""] * dictionary.n_features
    layer_F = dictionary.writes_FL().float().argmax(1)
    local = torch.zeros_like(layer_F)
    for i in range(dictionary.n_layers):
        sel = layer_F == i
        local[sel] = torch.arange(int(sel.sum()))
    return [f"L{dictionary.layers[i]}:{j}" for i, j in zip(layer_F.tolist(), local.tolist())]


def _examples(a: dict) -> tuple[list, np.ndarray]:
    """Every example as a JSON-ready dict, and each feature's first example (``bounds[f]:bounds[f+1]``)."""
    p, ctx, vocab = a["picks"], a["ctx"], a["vocab"]
    ids = ctx["token_ids"]
    tokens = np.where(ids >= 0, vocab[np.clip(ids, 0, None)], None).tolist()
    acts = _rounded(ctx["acts"])
    labels = np.asarray(a["label_names"], dtype=object)[ctx["label"]].tolist()
    before = a["before"]
    out = []
    for n in range(len(p["pos"])):
        keep = [j for j, t in enumerate(tokens[n]) if t is not None]
        out.append({"a": round(float(p["activation"][n]), 4), "k": int(p["kind"][n]), "b": int(p["band"][n]),
                    "t": [tokens[n][j] for j in keep], "v": [acts[n][j] for j in keep],
                    "f": before - sum(t is None for t in tokens[n][:before]), "l": labels[n]})
    bounds = np.searchsorted(p["pos"], np.arange(len(a["live"]) + 1))
    return out, bounds


def _logits(a: dict, f: int, layers: list[int]) -> list[dict]:
    e, vocab = a["effects"], a["vocab"]
    rows = []
    for i in a["where_FL"][f].nonzero().squeeze(1).tolist():
        rows.append({"layer": layers[i],
                     "up": [[vocab[t], round(v, 3)] for t, v in zip(e["up_ids"][f, i].tolist(), e["up_vals"][f, i].tolist())],
                     "down": [[vocab[t], round(v, 3)] for t, v in
                              zip(e["down_ids"][f, i].tolist(), e["down_vals"][f, i].tolist())]})
    return rows


def _visible(token: str) -> str:
    """A token for a one-line list: whitespace-only tokens made visible (␣ for a space, ↵ for a newline)."""
    return token.replace(" ", "␣").replace("\n", "↵") if not token.strip() else token


def feature_records(name: str, dictionary: Dictionary, a: dict, links: dict) -> tuple[list, list]:
    """(index rows, feature detail records) of every feature of ``dictionary`` from :func:`analyse`'s ``a``."""
    s, prof, layers = a["stats"], a["profile"], dictionary.layers
    n_rows = a["n_rows"]
    density = (s["n_fire"].double() / n_rows).tolist()
    top_vals = s["top_vals"][:, 0].masked_fill(s["top_rows"][:, 0] < 0, 0.0).tolist()
    r_FL = prof[[f"r_{l}" for l in layers]].to_numpy()
    peak, span = prof.peak_layer.tolist(), prof.span.tolist()
    hist = s["hist"].tolist()
    examples, bounds = _examples(a)
    labels = feature_layer_labels(dictionary)
    index, details = [], []
    for f in range(dictionary.n_features):
        exs = examples[bounds[f]:bounds[f + 1]]
        flag = 1 if not a["live"][f] else (2 if density[f] > DENSE else 0)
        logits = _logits(a, f, layers)
        out_tokens = " ".join(_visible(t) for t, _ in logits[-1]["up"][:3]) if logits else ""
        act_tokens = Counter(_visible(e["t"][e["f"]]) for e in exs if e["k"] == 0).most_common(3)
        top = next((e for e in exs if e["k"] == 0), None)
        snippet = "".join(top["t"][max(0, top["f"] - 8):top["f"] + 3]) if top else ""
        index.append([f, round(density[f], 6), round(top_vals[f], 4), int(peak[f]), int(span[f]), out_tokens,
                      " ".join(f"{t}×{c}" for t, c in act_tokens), snippet, flag, labels[f]])
        details.append({"id": f, "label": labels[f], "density": density[f], "n_fire": int(s["n_fire"][f]),
                        "max": top_vals[f], "peak": int(peak[f]), "span": int(span[f]),
                        "entropy": round(float(prof.entropy.iat[f]), 3), "drift": round(float(prof.drift_mean.iat[f]), 3),
                        "profile": [round(float(v), 4) for v in r_FL[f]], "hist": hist[f], "flag": flag,
                        "examples": exs, "logits": logits, "matches": links["matches"].get(f, []),
                        "absorbed": sorted(links["absorbed"].get(f, []), key=lambda m: -m["cos"])[:6],
                        "chain": links["chain"].get(f, [])})
    return index, details


# ----------------------------------------------------------------------------- writing

def _chunk_js(key: str, data) -> str:
    return f"window.__chunk({json.dumps(key)},{json.dumps(data, separators=(',', ':'), ensure_ascii=False)});\n"


def write_dictionary_data(root: Path, name: str, meta: dict, index: list, details: list) -> dict:
    """Write ``data/<name>/`` (meta, index chunks, feature chunks) under ``root``; return the meta written."""
    folder = root / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    n_index = max(1, math.ceil(len(index) / INDEX_CHUNK))
    for c in range(n_index):
        (folder / f"index-{c:03d}.js").write_text(
            _chunk_js(f"{name}/index-{c:03d}", index[c * INDEX_CHUNK:(c + 1) * INDEX_CHUNK]), encoding="utf-8")
    for c in range(math.ceil(len(details) / FEATURE_CHUNK)):
        part = {str(d["id"]): d for d in details[c * FEATURE_CHUNK:(c + 1) * FEATURE_CHUNK]}
        (folder / f"feat-{c:04d}.js").write_text(_chunk_js(f"{name}/feat-{c:04d}", part), encoding="utf-8")
    meta = {**meta, "name": name, "index_chunks": n_index, "index_chunk": INDEX_CHUNK, "feature_chunk": FEATURE_CHUNK}
    (folder / "meta.js").write_text(_chunk_js(f"{name}/meta", meta), encoding="utf-8")
    return meta


def export_neuronpedia(root: Path, name: str, dictionary: Dictionary, details: list, *, model_id: str,
                       dataset: str, n_prompts: int, seq_len: int, batch: int = 128) -> None:
    """``export/<name>/batch-N.json`` in the shape of SAEDashboard's Neuronpedia runner batches: one ``sae_set`` per
    layer for single-layer dictionaries (``feature_index`` within the layer); a multi-layer dictionary is exported
    at each feature's last written layer's logits, with ``layer`` its peak layer (the profile is not representable)."""
    folder = root / "export" / name
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = HIST_LOG10_RANGE
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    centres = [round(float(10 ** ((a + b) / 2)), 5) for a, b in zip(edges[:-1], edges[1:])]
    groups: dict[tuple, list] = {}
    for d in details:
        if d["flag"] == 1:
            continue
        layer, local = (int(d["label"][1:].split(":")[0]), int(d["label"].split(":")[1])) if d["label"] else (d["peak"], d["id"])
        last = d["logits"][-1] if d["logits"] else {"up": [], "down": []}
        acts = [{"bin_min": -1 if e["k"] == 0 else e["b"], "bin_max": -1 if e["k"] == 0 else e["b"],
                 "bin_contains": -1, "tokens": e["t"], "values": [v or 0.0 for v in e["v"]]} for e in d["examples"]]
        groups.setdefault((layer,), []).append({
            "feature_index": local, "neg_str": [t for t, _ in last["down"]], "neg_values": [v for _, v in last["down"]],
            "pos_str": [t for t, _ in last["up"]], "pos_values": [v for _, v in last["up"]],
            "frac_nonzero": d["density"], "freq_hist_data_bar_values": centres,
            "freq_hist_data_bar_heights": d["hist"], "logits_hist_data_bar_heights": [],
            "logits_hist_data_bar_values": [], "n_prompts_total": n_prompts, "n_tokens_in_prompt": seq_len,
            "dataset": dataset, "activations": acts, "decoder_weights_dist": d["profile"]})
    for (layer,), feats in sorted(groups.items()):
        for b in range(0, len(feats), batch):
            doc = {"model_id": model_id, "layer": layer, "sae_set": f"{name}-L{layer}", "features": feats[b:b + batch]}
            (folder / f"layer{layer}-batch-{b // batch:04d}.json").write_text(json.dumps(doc, separators=(",", ":")),
                                                                            encoding="utf-8")


# ----------------------------------------------------------------------------- the site

def site_name(path: Path, taken: set[str]) -> str:
    """A URL-safe, unique name for a dictionary folder."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(path).resolve().name).strip("-") or "dictionary"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def check_out(out: Path) -> None:
    """Refuse an ``out`` that is a file or a non-empty folder that is not a crosslayer site (before any work)."""
    if out.exists() and not out.is_dir():
        raise CrosslayerError(f"{out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / SITE_RECORD).is_file():
        raise CrosslayerError(f"{out} exists and is not a crosslayer site (no {SITE_RECORD}); choose an empty or new "
                              "folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise CrosslayerError(f"cannot write to {out} ({parent} is not writable); choose a writable folder")


def build_site(dictionary_paths: list, store, out, *, model=None, examples: int = 10, batch_size: int = 1024,
               progress: bool = True) -> Path:
    """Write the feature browser of ``dictionary_paths`` on held-out ``store`` to ``out`` (module docstring)."""
    from crosslayer.dictionary import load_dictionary

    out = Path(out)
    check_out(out)
    if not dictionary_paths:
        raise CrosslayerError("no dictionaries given; pass at least one --dictionary DIR")
    taken: set[str] = set()
    dicts = {site_name(p, taken): load_dictionary(p) for p in dictionary_paths}
    paths = {n: str(Path(p).resolve()) for n, p in zip(dicts, dictionary_paths)}
    for d in dicts.values():
        check_compatible(d, store)
    if model is None:
        from crosslayer.models import load_model

        model = load_model(store.manifest["model"], dtype="float32")
    vocab = token_table(model.tokenizer, model.cfg.d_vocab)
    start = time.time()
    analyses = {}
    for name, d in dicts.items():
        analyses[name] = analyse(d, store, model, vocab, k=examples, batch_size=batch_size)
        if progress:
            print(f"[browse] {name}: {d.n_features:,} features analysed ({time.time() - start:.0f}s)", flush=True)
    links = cross_links(dicts, {n: a["live"] for n, a in analyses.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(ASSETS, tmp)
        metas = []
        for name, d in dicts.items():
            index, details = feature_records(name, d, analyses[name], links[name])
            metas.append(write_dictionary_data(tmp, name, _meta(name, d, analyses[name], dicts), index, details))
            export_neuronpedia(tmp, name, d, details, model_id=store.manifest["model"],
                               dataset=store.manifest.get("corpus_id", ""), n_prompts=store.manifest.get("n_windows", 0),
                               seq_len=store.seq_len)
        site = {"dictionaries": metas, "store": str(store.path), "model": store.manifest["model"],
                "n_rows": store.n_rows, "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        (tmp / "data" / "site.js").write_text(_chunk_js("site", site), encoding="utf-8")
        (tmp / SITE_RECORD).write_text(json.dumps({"dictionaries": paths, "store": str(Path(store.path).resolve()),
                                                   "model": store.manifest["model"]}, indent=1))
        _swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[browse] wrote {out} in {time.time() - start:.0f}s; open {out / 'index.html'}", flush=True)
    return out


def _meta(name: str, d: Dictionary, a: dict, dicts: dict) -> dict:
    live = a["live"]
    density = a["stats"]["n_fire"].double() / a["n_rows"]
    others = [n for n, o in dicts.items() if n != name and is_single_layer(o) != is_single_layer(d)]
    return {"kind": d.kind, "n_features": d.n_features, "layers": d.layers, "hooks": d.hooks,
            "single_layer": is_single_layer(d), "n_live": int(live.sum()), "n_dead": int((~live).sum()),
            "n_dense": int((density > DENSE).sum()), "linked": others, "hist_range": list(HIST_LOG10_RANGE),
            "n_rows": a["n_rows"], "dense_threshold": DENSE, "link_tau": LINK_TAU}


def _swap(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out``; an older site there is moved aside first and removed after."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

