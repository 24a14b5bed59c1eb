"""Attribution graphs: the local replacement model is exact, edges equal finite differences in the frozen
linear model (computed here with independent hooks), a planted two-feature circuit is the top path, and the JSON
has circuit-tracer's viewer keys."""

import json

import pytest
import torch

from crosslayer.attribution import AttributionConfig, attribute, graph_json, plot_graph, prune, replacement_logits, top_path
from crosslayer.clt import CLTConfig, CrossLayerTranscoder
from crosslayer.errors import CrosslayerError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def random_clt(tiny_model):
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(layers=(0, 1), d_model=64, width=32, k=4), norm_factors=[1.5, 0.7],
                               target_norm_factors=[2.0, 0.5])
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return clt


@pytest.mark.parametrize("skip0", [True, False])
def test_replacement_model_reproduces_the_logits(tiny_model, random_clt, skip0):
    toks = tiny_model.to_tokens(PROMPT, prepend_bos=False)[0]
    repl, clean = replacement_logits(tiny_model, random_clt, toks, skip_position0=skip0)
    full = tiny_model(toks[None])[0, -1]
    assert torch.allclose(clean, full, atol=1e-5)
    assert torch.allclose(repl, clean, atol=1e-4)


def _frozen_fd(model, toks, layer_t, pos_t, vec_t, layers_s, pos_s, delta_LD):
    """Change of <resid_mid[layer_t][pos_t], vec_t> (layer_t = -1: final normalised residual) when ``delta_LD[i]``
    is added to mlp_out of layer ``layers_s[i]`` at ``pos_s``, with attention patterns, norm scales and every MLP
    output frozen to the clean run (a direct effect: no path through another MLP): an independent implementation
    of the frozen model with plain hooks."""
    _, cache = model.run_with_cache(toks[None])
    frozen = [n for n in cache if n.endswith("hook_scale") or n.endswith("hook_pattern")]

    def run(add):
        hooks = [(n, lambda a, hook: cache[hook.name]) for n in frozen]
        bumps = dict(zip(layers_s, delta_LD))
        for l in range(model.cfg.n_layers):
            def bump(a, hook, l=l):
                a = cache[hook.name].clone()
                if l in bumps:
                    a[0, pos_s] += add * bumps[l]
                return a
            hooks.append((f"blocks.{l}.hook_mlp_out", bump))
        out = {}
        site = "ln_final.hook_normalized" if layer_t < 0 else f"blocks.{layer_t}.hook_resid_mid"
        hooks.append((site, lambda a, hook: out.setdefault("x", a)))
        model.run_with_hooks(toks[None], fwd_hooks=hooks)
        x = out["x"][0, pos_t]
        return x * model.ln_final.w if layer_t < 0 else x

    with torch.no_grad():
        return float((run(1.0) - run(0.0)) @ vec_t)


def test_edges_equal_finite_differences_in_the_frozen_model(tiny_model, random_clt):
    g = attribute(tiny_model, random_clt, PROMPT)
    toks = g.tokens
    W = random_clt.cfg.width
    dec = torch.stack([random_clt.decoder_vectors(l, normalized=False) for l in (0, 1)], 1)  # [F, 2, d]
    layer0 = (g.features[:, 0] == 0).nonzero()[:, 0]
    layer1 = (g.features[:, 0] == 1).nonzero()[:, 0]
    assert len(layer0) and len(layer1)
    checked = 0
    for s in layer0[:6].tolist():
        _, pos_s, feat_s = g.features[s].tolist()
        delta = dec[feat_s] * g.activations[s]  # the feature's whole write, mlp_out of layers 0 and 1
        # target: a layer-1 feature at a position >= the source's
        for t in layer1.tolist():
            _, pos_t, feat_t = g.features[t].tolist()
            if pos_t < pos_s:
                continue
            enc = random_clt.W_enc[1, :, feat_t].detach() * random_clt.norm_factors[1]
            want = _frozen_fd(tiny_model, toks, 1, pos_t, enc, [0, 1], pos_s, delta)
            assert g.adjacency[t, s] == pytest.approx(want, rel=1e-3, abs=1e-4)
            checked += 1
            break
        # target: the top logit (demeaned), through both written layers
        u = tiny_model.W_U[:, g.logit_tokens[0]].detach() - tiny_model.W_U.detach().mean(1)
        want = _frozen_fd(tiny_model, toks, -1, g.n_pos - 1, u, [0, 1], pos_s, delta)
        assert g.adjacency[g.logit_index(0), s] == pytest.approx(want, rel=1e-3, abs=1e-4)
    assert checked
    # error and token nodes: the same identity with their own vectors
    err = g.error_index(1, 2)
    e = tiny_model.run_with_cache(toks[None])[1]["blocks.1.hook_mlp_out"][0, 2] - \
        random_clt.reconstruct(torch.stack([tiny_model.run_with_cache(toks[None])[1][f"blocks.{l}.hook_resid_mid"][0, 2]
                                            for l in (0, 1)])[None], normalized=False)[0, 1]
    u = tiny_model.W_U[:, g.logit_tokens[0]].detach() - tiny_model.W_U.detach().mean(1)
    want = _frozen_fd(tiny_model, toks, -1, g.n_pos - 1, u, [1], 2, e.detach()[None])
    assert g.adjacency[g.logit_index(0), err] == pytest.approx(want, rel=1e-3, abs=1e-4)
    # sources never feed targets at earlier positions or earlier layers
    for t in layer0.tolist():
        assert (g.adjacency[t, layer1] == 0).all()
        assert (g.adjacency[t, :g.n_features][g.features[:, 1] > g.features[t, 1]] == 0).all()


def _planted_model_and_clt(tiny_model):
    """A copy of the tiny model whose MLPs are zero except one gated neuron per layer: neuron A (layer 0) reads the
    embedding direction r of the last token and writes u; neuron B (layer 1) reads u and writes the unembedding
    direction of a target token. The CLT has the matching features A (layer 0) and B (layer 1) plus noise features."""
    import copy

    model = copy.deepcopy(tiny_model)
    toks = model.to_tokens(PROMPT, prepend_bos=False)[0]
    target = 1234
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in model.blocks:
            for name in ("W_in", "W_gate", "W_out"):
                getattr(b.mlp, name).zero_()
            b.mlp.b_in.zero_() if hasattr(b.mlp, "b_in") else None
            b.mlp.b_out.zero_()
        _, cache = model.run_with_cache(toks[None])
        x0 = cache["blocks.0.ln2.hook_normalized"][0, -1]
        r = x0 / x0.norm()
        u = torch.randn(64, generator=gen)
        u /= u.norm()
        b0, b1 = model.blocks[0].mlp, model.blocks[1].mlp
        b0.W_in[:, 0] = r * 3 / model.blocks[0].ln2.w
        b0.W_gate[:, 0] = r * 3 / model.blocks[0].ln2.w
        b0.W_out[0] = u * 20
        _, cache = model.run_with_cache(toks[None])
        x1 = cache["blocks.1.ln2.hook_normalized"][0, -1]
        v = x1 / x1.norm()
        w_target = model.W_U[:, target] - model.W_U.mean(1)
        b1.W_in[:, 0] = v * 3 / model.blocks[1].ln2.w
        b1.W_gate[:, 0] = v * 3 / model.blocks[1].ln2.w
        b1.W_out[0] = w_target / w_target.norm() * 60
        _, cache = model.run_with_cache(toks[None])
    clt = CrossLayerTranscoder(CLTConfig(layers=(0, 1), d_model=64, width=8, k=2))
    with torch.no_grad():
        clt.W_enc.zero_()
        clt.b_enc.fill_(-1.0)
        clt.b_dec.zero_()
        for w in clt.W_dec:
            w.copy_(0.01 * torch.randn(w.shape, generator=gen))
        clt.W_enc[:, :, 1:] = 0.05 * torch.randn(2, 64, 7, generator=gen)  # noise features that fire weakly
        clt.b_enc[:, 1:] = 0.0
        rm0 = cache["blocks.0.hook_resid_mid"][0, -1]
        rm1 = cache["blocks.1.hook_resid_mid"][0, -1]
        clt.W_enc[0, :, 0] = rm0 / rm0.norm() ** 2 * 2  # fires ~1 at the last position
        clt.W_enc[1, :, 0] = rm1 / rm1.norm() ** 2 * 2
        out0, out1 = cache["blocks.0.hook_mlp_out"][0, -1], cache["blocks.1.hook_mlp_out"][0, -1]
        clt.W_dec[0][0] = out0  # decoders are stored per target layer: W_dec[m] rows = groups 0..m
        clt.W_dec[1][0] = 0  # A writes only layer 0
        clt.W_dec[1][clt.cfg.width] = out1  # B (group 1, feature 0) writes layer 1
    return model, clt, toks, target


def test_planted_two_feature_circuit_is_the_top_path(tiny_model):
    model, clt, toks, target = _planted_model_and_clt(tiny_model)
    g = attribute(model, clt, toks)
    assert int(g.logit_tokens[0]) == target
    pruned = prune(g)
    path = top_path(g, pruned)
    T = g.n_pos
    a, b = g.feature_index(0, T - 1, 0), g.feature_index(1, T - 1, 0)
    assert path[-3:-1] == [a, b], [g.describe(i) for i in path]
    assert g.token_index(0) <= path[0] < g.token_index(0) + T  # it starts at a token
    assert pruned.node_mask[a] and pruned.node_mask[b] and pruned.edge_mask[b, a]


def test_json_has_the_viewer_keys_and_plot(tiny_model, random_clt, tmp_path):
    from crosslayer.attribution import write_graph

    g = attribute(tiny_model, random_clt, PROMPT, cfg=AttributionConfig(batch_size=7))
    again = attribute(tiny_model, random_clt, PROMPT, cfg=AttributionConfig(batch_size=64))
    assert torch.allclose(g.adjacency, again.adjacency, atol=1e-5)  # batching targets changes nothing
    data = write_graph(g, tmp_path / "g.json")
    loaded = json.loads((tmp_path / "g.json").read_text())
    assert loaded == json.loads(json.dumps(data))
    assert set(loaded) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version"} <= set(loaded["metadata"])
    assert set(loaded["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    node_keys = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
                 "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}
    ids = set()
    for node in loaded["nodes"]:
        assert set(node) == node_keys
        ids.add(node["node_id"])
    kinds = {n["feature_type"] for n in loaded["nodes"]}
    assert {"embedding", "logit"} <= kinds
    assert sum(n["is_target_logit"] for n in loaded["nodes"]) == 1
    for link in loaded["links"]:
        assert set(link) == {"source", "target", "weight"} and link["source"] in ids and link["target"] in ids
    plot_graph(g, prune(g), tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_attribute_refuses_a_crosscoder(tiny_model):
    from crosslayer.crosscoder import Crosscoder, CrosscoderConfig

    cc = Crosscoder(CrosscoderConfig(layers=(0, 1), d_model=64, n_features=16, k=2))
    with pytest.raises(CrosslayerError, match="transcoder"):
        attribute(tiny_model, cc, PROMPT)


def test_clamping_clt_features_reuses_interventions(tiny_model, random_clt):
    """crosslayer.interventions on a transcoder: the delta lands on the MLP outputs the feature writes (at layer 0,
    with nothing edited upstream, mlp_out moves by exactly decode(f') - decode(f)); on the planted model, ablating
    feature B (the circuit's last feature) removes most of the target token's probability."""
    from crosslayer.interventions import Edit, edit_hooks, plan_edits, steer

    toks = tiny_model.to_tokens(PROMPT, prepend_bos=False)
    edits = [Edit(feature=3, mode="clamp", value=4.0)]  # a layer-0 feature: writes mlp_out of layers 0 and 1
    plan = plan_edits(tiny_model, random_clt, toks, edits, at="each")
    assert plan.place_EL[0].tolist() == [True, True]
    _, clean = tiny_model.run_with_cache(toks)
    with tiny_model.hooks(fwd_hooks=edit_hooks(random_clt, plan)):
        _, edited = tiny_model.run_with_cache(toks)
    moved = edited["blocks.0.hook_mlp_out"] - clean["blocks.0.hook_mlp_out"]
    assert torch.allclose(moved[0, 1:], plan.delta_BTLD[0, 1:, 0], atol=1e-5)
    assert moved[0, 1:].abs().max() > 1e-3
    model, clt, _, target = _planted_model_and_clt(tiny_model)
    b = 1 * clt.cfg.width + 0  # feature B: group 1, index 0
    table, info = steer(model, clt, PROMPT, [Edit(feature=b, mode="ablate")])
    down = table[table.direction == "down"].iloc[0]
    assert int(down.token_id) == target and down.p_steered < 0.5 * down.p_clean


def test_feature_path_skips_error_nodes(tiny_model, random_clt):
    g = attribute(tiny_model, random_clt, PROMPT)
    path = top_path(g, features_only=True)
    assert all(not (g.n_features <= i < g.token_index(0)) for i in path)
    assert g.token_index(0) <= path[0] < g.token_index(0) + g.n_pos or len(path) == 1
