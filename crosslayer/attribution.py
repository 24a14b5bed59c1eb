"""Attribution graphs of one prompt through a cross-layer transcoder's local replacement model.

Method (Ameisen et al., "Circuit Tracing: Revealing Computational Graphs in Language Models",
Transformer Circuits 2025, §2-§3; research-notes §9):
1. Clean run of the prompt: cache every block's ``hook_resid_mid`` and ``hook_mlp_out``, the
   normalisation denominators (``ln1`` / ``ln2`` / ``ln_final`` ``hook_scale``), the attention patterns and
   the embedding (``blocks.0.hook_resid_pre``).
2. Nodes: the transcoder's active features (layer, position, index; activation a_s > 0) encoded from the
   clean resid_mid; one error node per (model layer, position) with e = mlp_out - CLT reconstruction
   (raw units; a layer the transcoder does not cover is all error); one token node per position (its
   embedding); the top output logits (most probable tokens until ``logit_prob`` cumulative probability,
   at most ``max_logits``), each the demeaned logit u . final_norm(resid) with u = W_U[:, tok] - mean_v W_U[:, v].
3. Local replacement model: the model run from the embedding with the attention patterns and the
   normalisation denominators frozen to the clean run's and every MLP output replaced by a leaf tensor
   m_l = sum of the features' decoder contributions + e_l (+ b_dec) = the clean MLP output. Given the frozen
   parts, every resid_mid and the final residual are linear in (embedding, m_0, ..., m_{L-1}); the prompt's
   logits are reproduced exactly (:func:`replacement_logits`).
4. Edges (direct effects): for a target t (a feature's pre-activation, the linear part
   factor_l x^l . W_enc[:, i], or a logit), one backward pass through the frozen model gives g = dt/d(embedding)
   and g_l = dt/dm_l. The edge from a feature s (layer j, position p) is a_s sum_{l' >= j} g_{l'}[p] . W_dec^{j -> l'}[s];
   from an error node g_l[p] . e_l[p]; from a token g[p] . embedding[p]. Targets are batched: B copies of the
   prompt run together and copy b's output is target b, so one backward gives B rows. Sources reach a target
   only through the residual stream and attention (never through another feature: features are nodes).
5. Pruning (as circuit-tracer's ``prune_graph``): A = |adjacency| row-normalised; influence of every node on the
   logits I = w (A + A^2 + ...) with w the logit probabilities; keep the nodes carrying ``node_threshold`` of the
   total influence (tokens and logits always), then score edges by A' I' on the pruned graph (I' = w + the pruned
   influence) and keep those carrying ``edge_threshold``; features left without outgoing or incoming edges and
   errors without outgoing edges are dropped until nothing changes.
6. Output: :func:`graph_json` writes the node/link JSON that circuit-tracer's ``create_graph_files`` writes and
   its viewer and Neuronpedia read (``metadata``, ``qParams``, ``nodes``, ``links``; node ids ``{layer}_{feature}_{pos}``,
   ``0_{layer}_{pos}`` for errors, ``E_{token}_{pos}``, ``{n_layers + 1}_{token}_{pos}`` for logits); :func:`plot_graph`
   draws the pruned graph (positions x layers) with matplotlib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from crosslayer.dictionary import Dictionary, check_compatible
from crosslayer.errors import CrosslayerError


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of :func:`attribute`."""

    max_logits: int = 10
    """Most output logits traced."""
    logit_prob: float = 0.95
    """Trace the most probable tokens until their cumulative probability reaches this."""
    node_threshold: float = 0.8
    """Keep the nodes carrying this share of the influence on the logits (the paper's 0.8)."""
    edge_threshold: float = 0.98
    """Keep the edges carrying this share of the influence (the paper's 0.98)."""
    batch_size: int = 32
    """Targets per backward pass (copies of the prompt run together)."""
    skip_position0: bool = True
    """No feature nodes at position 0 (its MLP outputs are all error): activation stores never keep position 0
    (the attention sink, crosslayer.harvest), so a transcoder never saw its outlier activations (circuit-tracer
    likewise zeroes the BOS position)."""

    def __post_init__(self):
        if self.max_logits < 1 or not 0 < self.logit_prob <= 1 or self.batch_size < 1:
            raise CrosslayerError("need max_logits >= 1, 0 < logit_prob <= 1 and batch_size >= 1")
        for name in ("node_threshold", "edge_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise CrosslayerError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Graph:
    """An attribution graph: nodes ordered features, errors (model layer-major), tokens, logits."""

    prompt: str
    tokens: Tensor
    """Prompt token ids ``[T]``."""
    token_strs: list[str]
    features: Tensor
    """``[n_f, 3]`` int64: model layer, position, feature index within its layer's group."""
    activations: Tensor
    """``[n_f]`` feature activations (normalised units)."""
    n_layers: int
    """Model layers (one error node per layer and position)."""
    logit_tokens: Tensor
    """``[n_logits]`` token ids of the traced logits, most probable first."""
    logit_probs: Tensor
    adjacency: Tensor
    """``[N, N]`` direct effects, row = target, column = source."""
    meta: dict = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + pos

    def logit_index(self, i: int) -> int:
        return self.n_nodes - len(self.logit_tokens) + i

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        hit = ((self.features == torch.tensor([layer, pos, feature])).all(1)).nonzero()
        if not len(hit):
            raise CrosslayerError(f"feature {feature} of layer {layer} is not active at position {pos}")
        return int(hit[0, 0])

    def describe(self, index: int) -> str:
        """A node's name: ``L3/F17@5``, ``err L3@5``, ``tok 'Paris'@5``, ``logit ' Paris'``."""
        if index < self.n_features:
            layer, pos, feat = self.features[index].tolist()
            return f"L{layer}/F{feat}@{pos}"
        i = index - self.n_features
        if i < self.n_layers * self.n_pos:
            return f"err L{i // self.n_pos}@{i % self.n_pos}"
        i -= self.n_layers * self.n_pos
        if i < self.n_pos:
            return f"tok {self.token_strs[i]!r}@{i}"
        return f"logit {self.meta.get('logit_strs', [''] * len(self.logit_tokens))[i - self.n_pos]!r}"


# ----------------------------------------------------------------------------- the local replacement model

class _Clean:
    """What the frozen model takes from the clean run (method step 1)."""

    def __init__(self, model, tokens_T: Tensor):
        n = model.cfg.n_layers
        names = {"blocks.0.hook_resid_pre", "ln_final.hook_scale"}
        for l in range(n):
            names |= {f"blocks.{l}.{h}" for h in ("hook_resid_mid", "hook_mlp_out", "ln1.hook_scale",
                                                    "ln2.hook_scale", "attn.hook_pattern")}
        missing = sorted(h for h in names if h not in model.hook_dict)
        if missing:
            raise CrosslayerError(f"model {model.cfg.model_name} has no hook {missing[0]}; attribution needs a "
                                  "TransformerLens model with LayerNorm/RMSNorm and attention-pattern hooks")
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens_T[None], names_filter=lambda h: h in names)
        self.logits_V = logits[0, -1].float()
        self.cache = {h: cache[h].float() for h in names}
        self.embed_TD = self.cache["blocks.0.hook_resid_pre"][0]
        self.resid_mid_LTD = torch.stack([self.cache[f"blocks.{l}.hook_resid_mid"][0] for l in range(n)])
        self.mlp_out_LTD = torch.stack([self.cache[f"blocks.{l}.hook_mlp_out"][0] for l in range(n)])

    def frozen_hooks(self, B: int) -> list:
        """Hooks that replace the denominators and patterns by the clean run's (``B`` copies)."""
        def freeze(act, hook):
            return self.cache[hook.name].to(act.dtype).expand(B, *act.shape[1:])

        return [(h, freeze) for h in self.cache if h.endswith("hook_scale") or h.endswith("hook_pattern")]


def _frozen_run(model, clean: _Clean, embed_BTD: Tensor, mlp_LBTD: list[Tensor], stop_at_layer: int | None):
    """Run the local replacement model (method step 3) from ``embed_BTD`` with MLP outputs ``mlp_LBTD``;
    returns ``(resid_mid per layer reached, final normalised residual or None)``."""
    B, mids = embed_BTD.shape[0], {}

    def mlp(act, hook):
        return mlp_LBTD[int(hook.name.split(".")[1])]

    def grab(act, hook):
        mids[int(hook.name.split(".")[1])] = act
        return act

    n = model.cfg.n_layers
    hooks = clean.frozen_hooks(B) + [(f"blocks.{l}.hook_mlp_out", mlp) for l in range(n)]
    hooks += [(f"blocks.{l}.hook_resid_mid", grab) for l in range(n)]
    stop = n if stop_at_layer is None else stop_at_layer
    with model.hooks(fwd_hooks=hooks):
        resid = model(embed_BTD, start_at_layer=0, stop_at_layer=stop)
        final = model.ln_final(resid) if stop_at_layer is None else None
    return mids, final


class _Nodes:
    """Feature, error and token nodes of a prompt (method step 2), in raw model units."""

    def __init__(self, model, dictionary: Dictionary, clean: _Clean, skip_position0: bool = True):
        d, W = dictionary, dictionary.cfg.width
        x_TLD = clean.resid_mid_LTD[d.layers].transpose(0, 1).to(d.norm_factors)
        with torch.no_grad():
            feats_TF = d.encode(x_TLD, normalized=False)
            if skip_position0:
                feats_TF[0] = 0
            recon_TLD = d.decode(feats_TF, normalized=False)
        act_TLW = feats_TF.reshape(-1, d.n_layers, W)
        pos, group, idx = (act_TLW > 0).nonzero(as_tuple=True)
        order = torch.argsort(group * act_TLW.shape[0] * W + pos * W + idx)  # by layer, position, feature
        self.pos, self.group, self.idx = pos[order].cpu(), group[order].cpu(), idx[order].cpu()
        self.act = act_TLW[self.pos, self.group, self.idx].float().cpu()
        self.layer = torch.tensor(d.layers)[self.group] if len(self.group) else self.group
        n = model.cfg.n_layers
        recon_LTD = torch.zeros_like(clean.mlp_out_LTD)
        recon_LTD[d.layers] = recon_TLD.transpose(0, 1).float().to(recon_LTD)
        self.recon_LTD = recon_LTD
        self.error_LTD = clean.mlp_out_LTD - recon_LTD
        self.n_layers = n
        # every feature's raw decoder rows at the layers it writes: [n_f, L_dict, d] (zero where it writes nothing)
        dec = torch.stack([d.decoder_vectors(l, normalized=False) for l in d.layers], 1)  # [F, L_dict, d]
        self.dec_NLD = dec[self.group * W + self.idx] * self.act[:, None, None]
        self.dict_layers = list(d.layers)
        enc = d.W_enc.detach().float().cpu() * d.norm_factors.cpu()[:, None, None]  # raw-unit encoders [L, d, W]
        self.enc_ND = enc[self.group, :, self.idx]


def replacement_logits(model, dictionary: Dictionary, tokens_T: Tensor, *,
                       skip_position0: bool = True) -> tuple[Tensor, Tensor]:
    """``(replacement, clean)`` last-position logits: the local replacement model (features + error nodes,
    frozen attention and normalisation) vs the real model; equal up to float rounding (method step 3)."""
    clean = _Clean(model, tokens_T)
    nodes = _Nodes(model, dictionary, clean, skip_position0)
    mlp = [(nodes.recon_LTD[l] + nodes.error_LTD[l])[None] for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, final = _frozen_run(model, clean, clean.embed_TD[None], mlp, None)
        logits = model.unembed(final)[0, -1]
    return logits.float(), clean.logits_V


def _rows(model, clean: _Clean, nodes: _Nodes, targets: list[tuple[int, int, Tensor]]) -> Tensor:
    """Direct effects on a batch of targets (method step 4): ``targets`` are (model layer or -1 for the
    output, position, raw-unit direction); returns ``[B, n_f + L T + T]`` (features, errors, tokens)."""
    B, n = len(targets), model.cfg.n_layers
    embed = clean.embed_TD.expand(B, -1, -1).clone().requires_grad_(True)
    mlp = [clean.mlp_out_LTD[l].expand(B, -1, -1).clone().requires_grad_(True) for l in range(n)]
    output = any(layer < 0 for layer, _, _ in targets)
    stop = None if output else max(layer for layer, _, _ in targets) + 1
    mids, final = _frozen_run(model, clean, embed, mlp, stop)
    total = 0.0
    for b, (layer, pos, vec) in enumerate(targets):
        site = final if layer < 0 else mids[layer]
        total = total + site[b, pos] @ vec
    reached = mlp if output else mlp[:stop]
    grads = torch.autograd.grad(total, [embed, *reached], allow_unused=True)
    g_emb = grads[0]
    g_LBTD = torch.stack([g if g is not None else torch.zeros_like(embed) for g in grads[1:]]
                         + [torch.zeros_like(embed)] * (n - len(reached)))
    # features: a_s sum over the layers it writes of g_l[pos] . dec, as one GEMM [B T, L d] x [L d, n_f], then
    # each feature's own position (gathering g per feature first would copy [L, B, n_f, d])
    dl, T = nodes.dict_layers, g_emb.shape[1]
    g_BTX = g_LBTD[dl].permute(1, 2, 0, 3).reshape(B * T, -1)
    per_pos = (g_BTX @ nodes.dec_NLD.reshape(len(nodes.pos), -1).T).reshape(B, T, -1)  # [B, T, n_f]
    feat = per_pos.gather(1, nodes.pos.to(per_pos.device)[None, None].expand(B, 1, -1))[:, 0]
    err = torch.einsum("lbtd,ltd->blt", g_LBTD, nodes.error_LTD).reshape(B, -1)
    tok = torch.einsum("btd,td->bt", g_emb, clean.embed_TD)
    return torch.cat([feat, err, tok], 1).detach()


@torch.no_grad()
def _logit_targets(model, clean: _Clean, cfg: AttributionConfig) -> tuple[Tensor, Tensor, Tensor]:
    """``(token ids, probabilities, demeaned unembedding directions [n, d])`` of the traced logits."""
    probs = clean.logits_V.softmax(-1)
    top_p, top_i = probs.sort(descending=True)
    n = int((top_p.cumsum(0) < cfg.logit_prob).sum()) + 1
    n = min(n, cfg.max_logits)
    W_U = model.W_U.detach().float()
    dirs = W_U[:, top_i[:n]].T - W_U.mean(1)[None]
    return top_i[:n], top_p[:n], dirs


def attribute(model, dictionary: Dictionary, prompt: str | Tensor, *, cfg: AttributionConfig = AttributionConfig(),
              progress: bool = False) -> Graph:
    """The attribution graph of ``prompt`` (a string, tokenised without a BOS, or token ids) through
    ``dictionary`` (a transcoder reading resid_mid and writing mlp_out): method steps 1-4, unpruned."""
    from tqdm.auto import tqdm

    if not getattr(dictionary, "is_transcoder", False) or not dictionary.hooks[0].endswith("hook_resid_mid"):
        raise CrosslayerError(f"attribution needs a transcoder (resid_mid -> mlp_out); got a {dictionary.kind}; "
                              "train one with `crosslayer train-clt`")
    check_compatible(dictionary, model)
    if model.cfg.dtype != torch.float32:
        raise CrosslayerError(f"attribution needs the model in float32, got {model.cfg.dtype}; load it with "
                              "dtype='float32' (--model-dtype float32)")
    tokens = model.to_tokens(prompt, prepend_bos=False)[0] if isinstance(prompt, str) else prompt.reshape(-1)
    tokens = tokens.to(next(model.parameters()).device)
    if tokens.numel() < 1:
        raise CrosslayerError("the prompt has no tokens")
    clean = _Clean(model, tokens)
    nodes = _Nodes(model, dictionary, clean, cfg.skip_position0)
    logit_ids, logit_p, logit_dirs = _logit_targets(model, clean, cfg)
    T, n = tokens.numel(), model.cfg.n_layers
    targets = [(int(nodes.layer[i]), int(nodes.pos[i]), nodes.enc_ND[i]) for i in range(len(nodes.act))]
    targets += [(-1, T - 1, logit_dirs[i]) for i in range(len(logit_ids))]
    n_src = len(nodes.act) + n * T + T
    N = n_src + len(logit_ids)
    adjacency = torch.zeros(N, N)
    target_rows = list(range(len(nodes.act))) + list(range(n_src, N))
    for start in tqdm(range(0, len(targets), cfg.batch_size), desc="attribute", unit="batch", disable=not progress):
        chunk = targets[start:start + cfg.batch_size]
        adjacency[target_rows[start:start + len(chunk)], :n_src] = _rows(model, clean, nodes, chunk).cpu()
    tok_strs = [model.tokenizer.decode([t]) for t in tokens.tolist()] if model.tokenizer else [str(t) for t in tokens.tolist()]
    logit_strs = [model.tokenizer.decode([t]) for t in logit_ids.tolist()] if model.tokenizer else \
        [str(t) for t in logit_ids.tolist()]
    features = torch.stack([nodes.layer, nodes.pos, nodes.idx], 1) if len(nodes.act) else torch.zeros(0, 3, dtype=torch.long)
    meta = {"model": getattr(model, "crosslayer_name", model.cfg.model_name), "logit_strs": logit_strs,
            "dictionary_layers": list(dictionary.layers), "dictionary_kind": dictionary.kind,
            "error_norm_share": float(nodes.error_LTD.norm() / clean.mlp_out_LTD.norm().clamp_min(1e-12))}
    return Graph(prompt if isinstance(prompt, str) else "".join(tok_strs), tokens.cpu(), tok_strs, features.long(),
                 nodes.act, n, logit_ids.cpu(), logit_p.cpu(), adjacency, meta)


# ----------------------------------------------------------------------------- pruning

def _normalized(A: Tensor) -> Tensor:
    A = A.abs()
    return A / A.sum(1, keepdim=True).clamp_min(1e-10)


def influence(A: Tensor, weights: Tensor, max_iter: int = 10_000) -> Tensor:
    """weights (A + A^2 + ...) for a nilpotent (acyclic) A, by repeated products."""
    current = weights @ A
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A
        total += current
    raise CrosslayerError("influence did not converge: the graph has a cycle")


def _threshold(scores: Tensor, share: float) -> Tensor:
    """The score above which the largest scores carry ``share`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    cum = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return ordered[min(int(torch.searchsorted(cum, torch.tensor(share))), len(ordered) - 1)]


@dataclass
class Pruned:
    """What :func:`prune` keeps."""

    node_mask: Tensor
    edge_mask: Tensor
    """``[N, N]`` (target, source)."""
    node_influence: Tensor
    cumulative: Tensor
    """Each node's cumulative influence share when nodes are sorted by influence (circuit-tracer's ``influence``)."""


def prune(graph: Graph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Method step 5."""
    A, n_f = graph.adjacency, graph.n_features
    n_logit, n_tok = len(graph.logit_tokens), graph.n_pos
    w = torch.zeros(graph.n_nodes)
    w[-n_logit:] = graph.logit_probs
    node_inf = influence(_normalized(A), w)
    keep = node_inf >= _threshold(node_inf, node_threshold)
    keep[-n_logit - n_tok:] = True
    pruned = A * keep[:, None] * keep[None]
    An = _normalized(pruned)
    edge_scores = An * (influence(An, w) + w)[:, None]
    edges = edge_scores >= _threshold(edge_scores, edge_threshold)
    edges &= pruned != 0
    inner = slice(0, graph.n_nodes - n_logit - n_tok)
    while True:
        before = keep.clone()
        edges &= keep[:, None] & keep[None]
        keep[inner] &= edges[:, inner].any(0)
        keep[:n_f] &= edges[:n_f].any(1)
        if torch.equal(before, keep):
            break
    order = node_inf.sort(descending=True)
    cumulative = torch.zeros_like(node_inf)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum().clamp_min(1e-30)
    return Pruned(keep, edges, node_inf, cumulative)


def top_path(graph: Graph, pruned: Pruned | None = None, *, logit: int = 0, features_only: bool = False) -> list[int]:
    """Greedy strongest path into a logit: from logit ``logit`` repeatedly take the source with the largest
    |edge| (among kept edges if ``pruned`` is given) until a token node (or an error node, which has no inputs);
    ``features_only``: error nodes are never taken, so the path runs through features to a token. Node indices,
    source first."""
    A = graph.adjacency.abs() * (pruned.edge_mask if pruned is not None else 1)
    if features_only:
        A = A.clone()
        A[:, graph.n_features:graph.token_index(0)] = 0
    path = [graph.logit_index(logit)]
    first_token = graph.token_index(0)
    while path[-1] < first_token or path[-1] >= first_token + graph.n_pos:
        row = A[path[-1]]
        if not bool(row.any()) or len(path) > graph.n_nodes:
            break
        path.append(int(row.argmax()))
    return path[::-1]


# ----------------------------------------------------------------------------- output

def _node_json(graph: Graph, i: int, influence_i: float) -> dict:
    """One node of circuit-tracer's viewer format (its ``frontend.graph_models.Node`` fields)."""
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
            "influence": influence_i, "activation": None}
    if i < graph.n_features:
        layer, pos, feat = graph.features[i].tolist()
        return {**base, "node_id": f"{layer}_{feat}_{pos}", "feature": (layer + feat) * (layer + feat + 1) // 2 + feat,
                "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{feat}-0", "activation": float(graph.activations[i])}
    j = i - graph.n_features
    if j < graph.n_layers * graph.n_pos:
        layer, pos = divmod(j, graph.n_pos)
        return {**base, "node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0"}
    j -= graph.n_layers * graph.n_pos
    if j < graph.n_pos:
        tok = int(graph.tokens[j])
        return {**base, "node_id": f"E_{tok}_{j}", "feature": j, "layer": "E", "ctx_idx": j,
                "feature_type": "embedding", "jsNodeId": f"E_{tok}-{j}"}
    j -= graph.n_pos
    tok, p = int(graph.logit_tokens[j]), float(graph.logit_probs[j])
    layer, pos = str(graph.n_layers + 1), graph.n_pos - 1
    text = graph.meta.get("logit_strs", [str(tok)] * len(graph.logit_tokens))[j]
    return {**base, "node_id": f"{layer}_{tok}_{pos}", "feature": tok, "layer": layer, "ctx_idx": pos,
            "feature_type": "logit", "token_prob": p, "is_target_logit": j == 0, "jsNodeId": f"L_{tok}-{pos}",
            "clerp": f'Output "{text}" (p={p:.3f})', "influence": None}


def graph_json(graph: Graph, pruned: Pruned | None = None, *, slug: str = "crosslayer-graph",
               scan: str | None = None) -> dict:
    """The pruned graph in the format of circuit-tracer's ``create_graph_files`` (method step 6)."""
    pruned = pruned or prune(graph)
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    nodes = {i: _node_json(graph, i, float(pruned.cumulative[i])) for i in kept}
    dst, src = (pruned.edge_mask & pruned.node_mask[:, None] & pruned.node_mask[None]).nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(dst.tolist(), src.tolist())]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan or graph.meta.get("model", "crosslayer"), "transcoder_list": [],
                "prompt_tokens": graph.token_strs, "prompt": graph.prompt,
                "node_threshold": None, "schema_version": 1}
    return {"metadata": metadata,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": used, "links": links}


def write_graph(graph: Graph, path: str | Path, *, cfg: AttributionConfig = AttributionConfig(),
                slug: str | None = None) -> dict:
    """Prune with ``cfg``'s thresholds and write :func:`graph_json` to ``path``; returns the JSON object."""
    from crosslayer.io import write_json

    path = Path(path)
    pruned = prune(graph, node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
    data = graph_json(graph, pruned, slug=slug or path.stem)
    data["metadata"]["node_threshold"] = cfg.node_threshold
    write_json(data, path)
    return data


def plot_graph(graph: Graph, pruned: Pruned, path: str | Path, *, max_nodes: int = 60) -> None:
    """:func:`plot_graph_json` of :func:`graph_json` (one drawing for graphs in memory and saved graphs)."""
    plot_graph_json(graph_json(graph, pruned), path, max_nodes=max_nodes)


def plot_graph_json(data: dict, path: str | Path, *, max_nodes: int = 60) -> None:
    """A static picture of a graph in the viewer format (:func:`graph_json`): x = token position, y = layer
    (embeddings at the bottom, logits on top); token and logit nodes and the ``max_nodes`` most influential
    others; edges blue (positive) / red (negative), width by |weight|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = data["nodes"]
    logit_layer = max((int(n["layer"]) for n in nodes if n["feature_type"] == "logit"), default=1)
    always = [n for n in nodes if n["feature_type"] in ("embedding", "logit")]
    inner = sorted((n for n in nodes if n["feature_type"] not in ("embedding", "logit")),
                   key=lambda n: n["influence"] if n["influence"] is not None else 1.0)[:max(0, max_nodes - len(always))]
    xy, slots = {}, {}
    for n in always + inner:
        y = 0 if n["layer"] == "E" else int(n["layer"]) + (0 if n["feature_type"] == "logit" else 1)
        k = slots.get((n["ctx_idx"], y), 0)
        slots[(n["ctx_idx"], y)] = k + 1
        xy[n["node_id"]] = (n["ctx_idx"] + 0.12 * k - 0.3, y)
    tokens = data["metadata"]["prompt_tokens"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tokens)), max(4.0, 0.3 * (logit_layer + 1))))
    links = [l for l in data["links"] if l["source"] in xy and l["target"] in xy]
    top = max((abs(l["weight"]) for l in links), default=1.0) or 1.0
    for l in links:
        ax.plot(*zip(xy[l["source"]], xy[l["target"]]), color="tab:blue" if l["weight"] > 0 else "tab:red",
                alpha=0.5, linewidth=0.3 + 2.5 * abs(l["weight"]) / top, zorder=1)
    style = {"cross layer transcoder": ("o", "tab:orange"), "mlp reconstruction error": ("s", "tab:gray"),
             "embedding": ("^", "tab:green"), "logit": ("D", "tab:purple")}
    for n in always + inner:
        marker, colour = style.get(n["feature_type"], ("o", "black"))
        x, y = xy[n["node_id"]]
        ax.scatter([x], [y], marker=marker, color=colour, s=36, zorder=2)
        if n["feature_type"] == "cross layer transcoder":
            ax.annotate(f"F{n['node_id'].split('_')[1]}", (x, y), fontsize=5, xytext=(2, 2), textcoords="offset points")
        elif n["is_target_logit"]:
            ax.annotate(n["clerp"].removeprefix("Output "), (x, y), fontsize=7, xytext=(-20, 6), textcoords="offset points")
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(logit_layer + 1), ["emb"] + [str(l) for l in range(logit_layer - 1)] + ["logit"], fontsize=6)
    ax.set_ylabel("layer")
    n_feat = sum(n["feature_type"] == "cross layer transcoder" for n in nodes)
    ax.set_title(f"{data['metadata']['prompt']!r}: {n_feat} features kept, {len(inner)} most influential "
                 f"non-token nodes shown", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def summary(graph: Graph, pruned: Pruned) -> dict:
    """Counts and the top path of a pruned graph (plain data for the CLI and studies)."""
    path = top_path(graph, pruned)
    return {"prompt": graph.prompt, "top_logit": graph.meta["logit_strs"][0], "top_prob": float(graph.logit_probs[0]),
            "n_active_features": graph.n_features, "n_kept_features": int(pruned.node_mask[:graph.n_features].sum()),
            "n_kept_errors": int(pruned.node_mask[graph.n_features:graph.token_index(0)].sum()),
            "n_edges": int(pruned.edge_mask.sum()), "error_norm_share": graph.meta.get("error_norm_share", math.nan),
            "top_path": " -> ".join(graph.describe(i) for i in path),
            "top_feature_path": " -> ".join(graph.describe(i) for i in top_path(graph, pruned, features_only=True))}

