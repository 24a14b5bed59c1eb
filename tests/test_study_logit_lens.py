"""The logit-lens study: parity with crosslayer.lens, milestones, the micro run, skipped answers, figures."""

import numpy as np
import pandas as pd
import pytest

from crosslayer import CrosslayerError
from crosslayer.lens import logit_lens
from studies import logit_lens as study
from studies.pipeline import RunContext, run_study
from studies.presets import get_preset

CFG = study.Config()


def test_answer_lens_matches_crosslayer_lens(tiny_model):
    prompts = ["the cat sat on a mat while", "rivers flow to", "one two three four five six seven"]
    answers = [" the", " sea", " eight"]
    ids = [int(tiny_model.to_tokens(a, prepend_bos=False)[0, 0]) for a in answers]
    got = study.answer_lens(tiny_model, prompts, ids, top_k=CFG.top_k)  # one padded batch
    assert sorted(got.layer.unique()) == [-1, *range(tiny_model.cfg.n_layers)]
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        ref = logit_lens(tiny_model, prompt, target=answer, top_k=CFG.top_k)
        ref = ref[ref.position == ref.position.max()].sort_values("layer")
        mine = got[got.prompt == i].sort_values("layer")
        np.testing.assert_array_equal(mine.layer, ref.layer)
        np.testing.assert_allclose(mine.kl_to_final, ref.kl_final, atol=1e-4)
        np.testing.assert_allclose(mine.entropy, ref.entropy, atol=1e-4)
        np.testing.assert_allclose(mine.answer_prob, ref.target_prob, rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal(mine.answer_rank, ref.target_rank)
        np.testing.assert_allclose(mine.top1_prob, ref.top1_prob, rtol=1e-4)
        assert mine.kl_to_final.iloc[-1] == pytest.approx(0.0, abs=1e-5)  # the last layer is the model's output


def _by_layer(ranks: dict[int, list[int]], kls: dict[int, list[float]]) -> pd.DataFrame:
    rows = []
    for pid, rank in ranks.items():
        for layer, (r, kl) in enumerate(zip(rank, kls[pid]), start=-1):
            rows.append({"prompt_id": pid, "category": "a" if pid < 2 else "b", "answer": " x", "layer": layer,
                         "kl_to_final": kl, "entropy": 1.0, "answer_rank": r, "answer_prob": 1.0 / r,
                         "answer_in_topk": r <= CFG.top_k, "answer_top1": r == 1, "top1_token": " y",
                         "top1_prob": 0.5})
    return pd.DataFrame(rows)


def test_milestones_on_known_trajectories():
    # layers -1..3; prompt 0 enters the top-5 at 1 and is top-1 from 2; prompt 1 dips into the top-5 at -1,
    # leaves, and never becomes top-1; prompt 2 never enters the top-5
    table = _by_layer({0: [900, 40, 4, 1, 1], 1: [3, 50, 80, 7, 2], 2: [900, 800, 700, 600, 500]},
                      {0: [9.0, 3.0, 0.5, 0.2, 0.0], 1: [0.5, 2.0, 0.9, 1.5, 0.0], 2: [0.1, 0.1, 0.1, 0.1, 0.0]})
    got = study.milestones(table, kl_nats=1.0).set_index("prompt_id")
    assert got.loc[0, "first_topk_layer"] == 1 and got.loc[0, "first_top1_layer"] == 2
    assert got.loc[1, "first_topk_layer"] == -1 and np.isnan(got.loc[1, "first_top1_layer"])
    assert np.isnan(got.loc[2, "first_topk_layer"])
    # KL settles after the last layer with KL >= 1 nat; below it everywhere: the embedding
    assert got.kl_settle_layer.tolist() == [1, 3, -1]
    assert got.final_rank.tolist() == [1, 2, 500]


@pytest.mark.slow
def test_logit_lens_study_micro(micro_ctx):
    info = run_study("logit_lens", micro_ctx)
    results = micro_ctx.results("logit_lens")
    n_layers = micro_ctx.model.cfg.n_layers
    vocab = micro_ctx.model.cfg.d_vocab
    by_layer = pd.read_csv(results / "lens_by_layer.csv")
    first = pd.read_csv(results / "first_entry.csv")
    assert list(by_layer.columns) == study.BY_LAYER_COLUMNS and list(first.columns) == study.FIRST_COLUMNS
    n = micro_ctx.preset.config("logit_lens").prompts - len(pd.read_csv(results / "skipped.csv"))
    assert info["prompts"] == n == len(first) and len(by_layer) == n * (n_layers + 1)
    assert set(by_layer.layer) == set(range(-1, n_layers))
    assert (by_layer.kl_to_final >= 0).all() and by_layer.answer_prob.between(0, 1).all()
    assert by_layer.answer_rank.between(1, vocab).all() and by_layer.top1_prob.between(0, 1).all()
    assert (by_layer[by_layer.layer == n_layers - 1].kl_to_final < 1e-4).all()
    assert (by_layer.answer_top1 == (by_layer.answer_rank == 1)).all()
    assert (first.final_correct == (first.final_rank == 1)).all()
    for col in ("first_topk_layer", "first_top1_layer", "kl_settle_layer"):
        assert first[col].dropna().between(-1, n_layers - 1).all()
    both = first.dropna(subset=["first_topk_layer", "first_top1_layer"])
    assert (both.first_topk_layer <= both.first_top1_layer).all()  # top-1 implies top-k
    summary = pd.read_csv(results / "summary.csv")
    assert summary.category.iloc[-1] == "all" and summary.n_prompts.iloc[-1] == n
    tables = micro_ctx.paper / "tables"
    for name in ("logit_lens.tex", "logit_lens_answer.tex", "logit_lens_figures.tex"):
        assert (tables / name).stat().st_size > 0
    assert f"Over {n} known-answer prompts" in (tables / "logit_lens_answer.tex").read_text()  # count from the CSV


def test_multi_token_answers_are_skipped(tiny_model, tmp_path):
    """Every prompt of the shipped set is read; exactly those whose answer is several tokens are skipped."""
    every = study.load_prompts(sum(1 for line in study.PROMPTS.read_text().splitlines() if line.strip()))
    multi = {pid for pid, a in zip(every.prompt_id, every.answer)
             if len(tiny_model.to_tokens(a, prepend_bos=False)[0]) > 1}
    ctx = RunContext(get_preset("micro"), tmp_path, model=tiny_model, progress=False)
    info = study.run(ctx, study.Config(prompts=len(every)))
    results = ctx.results(study.NAME)
    skipped = pd.read_csv(results / "skipped.csv", keep_default_na=False)
    assert set(skipped.prompt_id) == multi and info["skipped"] == len(multi) >= 1
    assert info["prompts"] + info["skipped"] == len(every)
    assert (skipped.n_answer_tokens > 1).all()
    first = pd.read_csv(results / "first_entry.csv")
    assert not set(first.prompt_id) & multi
    assert f"{len(multi)} more skipped" in study.answer(results, study.Config())


def test_load_prompts_checks_the_count():
    assert len(study.load_prompts(3)) == 3
    with pytest.raises(CrosslayerError, match="prompts=10000"):
        study.load_prompts(10_000)


def test_figures_tables_and_answer_from_csvs(tmp_path):
    results, paper = tmp_path / "results", tmp_path / "paper"
    results.mkdir()
    ranks = {0: [900, 40, 4, 1, 1], 1: [3, 50, 80, 7, 2], 2: [900, 800, 700, 600, 500], 3: [500, 30, 2, 1, 1]}
    kls = {p: [9.0, 3.0, 0.5, 0.2, 0.0] for p in ranks}
    by_layer = _by_layer(ranks, kls)
    by_layer.loc[by_layer.prompt_id == 3, "category"] = "c_d"  # an underscore to escape
    by_layer[study.BY_LAYER_COLUMNS].to_csv(results / "lens_by_layer.csv", index=False)
    first = study.milestones(by_layer, kl_nats=CFG.kl_nats).merge(by_layer.drop_duplicates("prompt_id")[["prompt_id", "category"]])
    first = first.assign(prompt="p", answer=" x", final_top1_token=" x", final_correct=first.final_rank == 1)
    first[study.FIRST_COLUMNS].to_csv(results / "first_entry.csv", index=False)
    study.summarize(first).to_csv(results / "summary.csv", index=False)
    pd.DataFrame([{"prompt_id": 9, "category": "a", "prompt": "q", "answer": " long word", "n_answer_tokens": 2}]
                 ).to_csv(results / "skipped.csv", index=False)
    figs = study.figures(results, paper, CFG)
    assert [p.name for p, _ in figs] == ["logit_lens_kl.png", "logit_lens_rank.png", "logit_lens_first_entry.png"]
    assert all(p.stat().st_size > 1000 for p, _ in figs)
    assert "3 of 4 prompts ever do" in figs[2][1]
    (table,) = study.tables(results, paper, CFG)
    tex = table.read_text()
    assert table.name == "logit_lens.tex" and "c\\_d" in tex and "\\label{tab:logit_lens}" in tex
    text = study.answer(results, CFG)
    assert "1 more skipped" in text and "top-5 at layer" in text and "c\\_d" in text
    assert "_" not in text.replace("\\_", "")


def test_milestone_medians_use_the_same_prompts():
    """A prompt that enters the top-k but never becomes top-1 must not pull the top-k median earlier than the
    top-1 median's prompts (the arithmetic category once showed top-1 at 24 before top-5 at 25)."""
    first = pd.DataFrame({"category": ["a", "a", "a"], "final_correct": [True, False, False],
                          "final_rank": [1, 9, 30], "first_topk_layer": [5.0, 1.0, np.nan],
                          "first_top1_layer": [10.0, np.nan, np.nan], "kl_settle_layer": [10, 12, 12]})
    row = study.summarize(first).set_index("category").loc["all"]
    assert row.n_reach_topk == 2 and row.n_reach_top1 == 1
    assert row.median_first_topk == 5.0 and row.median_first_top1 == 10.0  # both over the one prompt reaching top-1
    assert row.median_first_topk <= row.median_first_top1
