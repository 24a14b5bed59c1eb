import copy

import pytest
import torch

from crosslayer.errors import CrosslayerError
from crosslayer.lens import COLUMNS, TARGET_COLUMNS, decode_layer, format_lens, logit_lens, plot_lens

PROMPTS = ["The capital of France is", "One two three four five six"]


def _model_logp(model, text):
    tokens = model.to_tokens(text, prepend_bos=False)
    with torch.no_grad():
        return torch.log_softmax(model(tokens).float(), dim=-1)[0]


def test_final_layer_equals_model_logprobs(tiny_model):
    text = PROMPTS[0]
    tokens = tiny_model.to_tokens(text, prepend_bos=False)
    last = f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits, cache = tiny_model.run_with_cache(tokens, names_filter=last)
        lens_logp = decode_layer(tiny_model, cache[last])
    expected = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(lens_logp, expected, atol=1e-5, rtol=0)

    # the table's last-layer rows carry the same numbers
    model_logp = _model_logp(tiny_model, text)
    table = logit_lens(tiny_model, text, target=" Paris", top_k=5)
    final = table[table["layer"] == tiny_model.cfg.n_layers - 1].sort_values("position")
    top_p, _ = model_logp.exp().topk(5, dim=-1)
    torch.testing.assert_close(torch.tensor(final["topk_probs"].tolist()), top_p, atol=1e-5, rtol=0)
    entropy = -(model_logp.exp() * model_logp).sum(-1)
    torch.testing.assert_close(torch.tensor(final["entropy"].to_numpy()), entropy, atol=1e-5, rtol=0)
    target_id = tiny_model.to_tokens(" Paris", prepend_bos=False)[0, 0]
    torch.testing.assert_close(torch.tensor(final["target_prob"].to_numpy()), model_logp[:, target_id].exp(),
                               atol=1e-6, rtol=1e-5)
    assert (final["top1_token"] == final["final_top1_token"]).all()


def test_table_columns_and_shape(tiny_model):
    table = logit_lens(tiny_model, PROMPTS, top_k=3)
    assert list(table.columns) == COLUMNS
    lengths = [tiny_model.to_tokens(p, prepend_bos=False).shape[1] for p in PROMPTS]
    n_read = tiny_model.cfg.n_layers + 1  # embedding + every block
    assert len(table) == n_read * sum(lengths)
    assert sorted(table["layer"].unique()) == [-1, *range(tiny_model.cfg.n_layers)]
    assert table["topk_tokens"].map(len).eq(3).all() and table["topk_probs"].map(len).eq(3).all()
    assert (table["top1_token"] == table["topk_tokens"].str[0]).all()
    assert table["topk_probs"].map(lambda p: p == sorted(p, reverse=True)).all()
    first = table[(table["prompt"] == 0) & (table["layer"] == 0)]
    assert first["token"].tolist() == tiny_model.to_str_tokens(PROMPTS[0], prepend_bos=False)

    with_target = logit_lens(tiny_model, PROMPTS[0], target=" Paris", layers=[0, 1])
    assert list(with_target.columns) == COLUMNS + TARGET_COLUMNS
    assert set(with_target["layer"]) == {0, 1}


def test_batch_equals_single_prompts(tiny_model):
    """Right padding in a batch never changes a prompt's numbers (causal attention)."""
    batch = logit_lens(tiny_model, PROMPTS, target=" the")
    for i, text in enumerate(PROMPTS):
        single = logit_lens(tiny_model, text, target=" the")
        part = batch[batch["prompt"] == i].drop(columns="prompt").reset_index(drop=True)
        single = single.drop(columns="prompt")
        assert (part[["layer", "position", "token", "top1_token", "target_rank"]]
                == single[["layer", "position", "token", "top1_token", "target_rank"]]).all().all()
        assert (part["entropy"] - single["entropy"]).abs().max() < 1e-4


def test_entropy_and_kl_equal_a_direct_computation(tiny_model):
    table = logit_lens(tiny_model, PROMPTS[1])
    last = tiny_model.cfg.n_layers - 1
    assert table.loc[table["layer"] == last, "kl_final"].abs().max() < 1e-5
    tokens = tiny_model.to_tokens(PROMPTS[1], prepend_bos=False)
    with torch.no_grad():
        logits, cache = tiny_model.run_with_cache(tokens)
    final = torch.log_softmax(logits.float(), dim=-1)[0]
    for layer, hook in ((-1, "blocks.0.hook_resid_pre"), (0, "blocks.0.hook_resid_post")):
        logp = torch.log_softmax(tiny_model.unembed(tiny_model.ln_final(cache[hook])).float(), dim=-1)[0]
        rows = table[table["layer"] == layer].sort_values("position")
        kl = (final.exp() * (final - logp)).sum(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(torch.tensor(rows["kl_final"].to_numpy()), kl, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(rows["entropy"].to_numpy()), entropy, atol=1e-4, rtol=1e-4)
        assert kl.min() > 1e-3  # a random model's early layers disagree with its output


def test_target_rank_consistent_with_sorting(tiny_model):
    text = PROMPTS[0]
    target_id = int(tiny_model.to_tokens(" France", prepend_bos=False)[0, 0])
    table = logit_lens(tiny_model, text, target=" France", top_k=10)
    final = table[table["layer"] == tiny_model.cfg.n_layers - 1].sort_values("position")
    order = _model_logp(tiny_model, text).argsort(dim=-1, descending=True)
    expected = (order == target_id).nonzero()[:, 1] + 1
    assert final["target_rank"].tolist() == expected.tolist()
    # rank 1 exactly where the target is the top-1; rank <= k exactly where it is in the top-k
    assert ((table["target_rank"] == 1) == (table["top1_token"] == " France")).all()
    assert ((table["target_rank"] <= 10) == table["topk_tokens"].map(lambda t: " France" in t)).all()


def test_first_layer_in_topk_constructed(tiny_model):
    # a model whose blocks write nothing: every layer reads the embedding, so the final top-1 is in
    # the top-k from the embedding on, and every layer agrees with the final one
    silent = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for block in silent.blocks:
            block.attn.W_O.zero_()
            block.mlp.W_out.zero_()
    table = logit_lens(silent, PROMPTS[0], top_k=1)
    assert (table["first_layer_in_topk"] == -1).all()
    assert table["kl_final"].abs().max() < 1e-5

    # silence block 0 only: the embedding and layer 0 read the same stream, so layer 0 is never first
    half = copy.deepcopy(tiny_model)
    with torch.no_grad():
        half.blocks[0].attn.W_O.zero_()
        half.blocks[0].mlp.W_out.zero_()
    table = logit_lens(half, PROMPTS, top_k=1)
    assert set(table["first_layer_in_topk"]) <= {-1, 1}
    assert (table["first_layer_in_topk"] == 1).any()  # a random model's prediction moves at block 1


def test_first_layer_in_topk_matches_brute_force(tiny_model):
    table = logit_lens(tiny_model, PROMPTS, top_k=200, layers=[-1, 0, 1])
    for (_, _), rows in table.groupby(["prompt", "position"]):
        rows = rows.sort_values("layer")
        final = rows["final_top1_token"].iloc[0]
        hits = [layer for layer, top in zip(rows["layer"], rows["topk_tokens"]) if final in top]
        assert rows["first_layer_in_topk"].nunique() == 1
        assert rows["first_layer_in_topk"].iloc[0] == hits[0]
    # reading only the embedding with top-1: -1 exactly where the embedding already predicts the final
    # top-1, missing (not an error) everywhere else
    early = logit_lens(tiny_model, PROMPTS, top_k=1, layers=[-1])
    agrees = early["top1_token"] == early["final_top1_token"]
    assert early["first_layer_in_topk"].isna().equals(~agrees)
    assert (early.loc[agrees, "first_layer_in_topk"] == -1).all()


def test_format_lens(tiny_model):
    table = logit_lens(tiny_model, PROMPTS[0], target=" Paris")
    text = format_lens(table)
    lines = text.splitlines()
    assert "input token ' is'" in lines[0] and "' Paris'" in lines[0]
    assert "rank" in lines[1] and "KL" in lines[1]
    assert lines[2].split()[0] == "embed"
    assert sum(1 for line in lines[2:] if line.split()[0].isdigit()) == tiny_model.cfg.n_layers
    assert "first enters the top-5" in lines[-1]
    assert "rank" not in format_lens(logit_lens(tiny_model, PROMPTS[0]), position=0).splitlines()[1]
    with pytest.raises(CrosslayerError):
        format_lens(table, position=99)


def test_plot_written_from_table(tiny_model, tmp_path):
    table = logit_lens(tiny_model, PROMPTS, top_k=3)
    out = plot_lens(table, tmp_path / "figs" / "lens.png", prompt=1)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["lens.png"]  # no temp file left behind


@pytest.mark.parametrize("kwargs", [
    {"prompts": ""}, {"prompts": "   "}, {"prompts": []}, {"prompts": ["fine", ""]},
    {"prompts": "hello", "target": ""},
    {"prompts": "hello", "layers": [2]}, {"prompts": "hello", "layers": [-2]}, {"prompts": "hello", "layers": []},
    {"prompts": "hello", "top_k": 0},
])
def test_bad_input(tiny_model, kwargs):
    with pytest.raises(CrosslayerError):
        logit_lens(tiny_model, **kwargs)


@pytest.mark.slow
def test_smollm2_capital_of_france(smollm2, tmp_path):
    table = logit_lens(smollm2, "The capital of France is", target=" Paris")
    last = table[table["position"] == table["position"].max()].sort_values("layer")
    final = last.iloc[-1]
    assert final["top1_token"] == " Paris" and final["target_rank"] == 1
    n = smollm2.cfg.n_layers
    early = last[last["layer"] < n // 3]["target_rank"]
    late = last[last["layer"] >= 2 * n // 3]["target_rank"]
    assert late.median() < early.median()
    assert last["target_rank"].iloc[-3:].max() < early.min()  # the last layers beat every early one
    assert last["first_layer_in_topk"].iloc[0] >= n // 3  # the answer appears late, not in the embedding
    assert plot_lens(table, tmp_path / "lens.png").stat().st_size > 0
