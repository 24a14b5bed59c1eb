"""The steering study: clamp invariants and a planted ground-truth feature, the micro run, figures from CSVs."""

import numpy as np
import pandas as pd
import pytest
import torch

from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
from crosslayer.errors import CrosslayerError
from studies.pipeline import run_study
from studies import steering as study

TOKEN = " fraud"


def last_layer_crosscoder(model, store, n_features=24, seed=0):
    """A ReLU crosscoder on the model's last layer (the only layer whose logit effect is exact)."""
    last = model.cfg.n_layers - 1
    i = store.layers.index(last)
    cc = Crosscoder(CrosscoderConfig(layers=(last,), d_model=store.width, n_features=n_features, activation="relu"),
                    hooks=[store.hooks[i]], norm_factors=store.norm_factors[[i]], seed=seed)
    with torch.no_grad():
        cc.b_enc.fill_(0.2)
    return cc


@pytest.fixture(scope="module")
def planted(tiny_model, tiny_store):
    """Feature 5 writes the direction that raises TOKEN's logit most and fires on every position with a
    constant value (zero encoder column, bias 0.7); feature 6 never fires."""
    cc = last_layer_crosscoder(tiny_model, tiny_store)
    token_id = study.concept_ids(tiny_model.tokenizer, (TOKEN,))[TOKEN]
    u_D = tiny_model.W_U[:, token_id].detach() / tiny_model.ln_final.w.detach()  # (d * w) @ W_U peaks at TOKEN
    with torch.no_grad():
        cc.W_dec[5, 0] = u_D / u_D.norm() * cc.norm_factors[0]
        cc.W_enc[:, :, 5] = 0
        cc.b_enc[5] = 0.7
        cc.W_enc[:, :, 6] = 0
        cc.b_enc[6] = -1.0
    return cc, {TOKEN: token_id}


PROMPTS = ("the cat sat on a mat while", "rivers flow to the sea and")


def test_clamping_to_the_clean_value_changes_nothing(tiny_model, planted):
    cc, ids = planted
    effects, tops = study.clamp_effects(tiny_model, cc, 5, {1.0: 0.7}, PROMPTS, ids)
    assert np.allclose(effects.clean_activation, 0.7, atol=1e-5)  # the planted feature's constant value
    np.testing.assert_allclose(effects.ratio, 1.0, atol=1e-4)
    np.testing.assert_allclose(effects.p_steered, effects.p_clean, rtol=1e-4)
    assert (effects.kl < 1e-6).all() and np.allclose(effects.vocab_ratio, 1.0, atol=1e-4)
    # a feature that never fires is unchanged by ablation too
    effects, _ = study.clamp_effects(tiny_model, cc, 6, {0.0: 0.0}, PROMPTS, ids)
    assert (effects.clean_activation == 0).all() and np.allclose(effects.ratio, 1.0, atol=1e-4)
    assert set(tops.direction) == {"up", "down"} and len(tops) == 2 * len(PROMPTS) * 5  # clamp_effects default top=5


def test_clamping_up_a_last_layer_feature_raises_its_token(tiny_model, planted):
    cc, ids = planted
    values = {m: 0.7 * m for m in (0.0, 1.0, 4.0, 16.0, 64.0)}
    effects, tops = study.clamp_effects(tiny_model, cc, 5, values, PROMPTS, ids)
    for _, part in effects.groupby("prompt_id"):
        p = part.sort_values("multiple").set_index("multiple").p_steered
        assert p.loc[1.0] == pytest.approx(part.p_clean.iloc[0], rel=1e-4)
        assert p.is_monotonic_increasing and p.loc[64.0] > 10 * p.loc[1.0]  # ground truth: p(TOKEN) rises
        assert p.loc[0.0] < p.loc[1.0]  # and ablating the (positively firing) feature lowers it
    big = tops[(tops.multiple == 64.0) & (tops.direction == "up") & (tops["rank"] == 1)]
    assert (big.token == TOKEN).all()
    np.testing.assert_allclose(effects.ratio, effects.p_steered / effects.p_clean, rtol=1e-3)
    assert (effects.kl >= 0).all() and effects[effects.multiple == 64.0].kl.min() > 0.1


def test_candidates_rank_the_planted_feature_first_by_logit_effect(tiny_model, tiny_store, planted):
    cc, ids = planted
    table = study.candidates(tiny_model, cc, tiny_store, ids, name="cc")
    assert list(table.columns) == study.CANDIDATE_COLUMNS and table.chosen.sum() == 1
    row = table.set_index("feature").loc[5]
    assert row.concept_rank == 1 and row.logit_z == table.logit_z.max() and row.source in ("logit", "both")
    assert row.density == pytest.approx(1.0) and not row.eligible  # fires everywhere: too dense to choose
    assert table.density.between(0, 1).all() and (table.scale >= 0).all()
    chosen = table[table.chosen].iloc[0]
    assert chosen.scale > 0 and (chosen.eligible or not table.eligible.any())


def test_prompt_sets_are_disjoint_from_each_other_and_from_the_selection_sentences():
    table = study.prompt_table()
    assert list(table.prompt_id) == list(range(len(study.PROMPTS))) and set(table.split) == {"dev", "eval"}
    assert set(table.context) == {"concept", "neutral"} and table.prompt.is_unique
    dev, ev = (set(table.prompt[table.split == s]) for s in ("dev", "eval"))
    assert len(dev) >= 3 and len(ev) >= 16 and (table[table.split == "eval"].context == "neutral").sum() >= 3
    selection = set(study.CONCEPT_TEXTS) | set(study.CONTROL_TEXTS)
    for a, b in ((dev, ev), (dev, selection), (ev, selection)):
        # no shared text, and no prompt is the start of another set's text (or the other way round)
        assert not any(x.startswith(y) or y.startswith(x) for x in a for y in b)


def test_config_refuses_a_clamp_down_outside_the_grid():
    with pytest.raises(CrosslayerError, match="negative entry"):
        study.Config(down=-2.0)
    with pytest.raises(CrosslayerError, match="negative entry"):
        study.Config(multiples=(0.0, 1.0), down=0.0)
    with pytest.raises(CrosslayerError, match="positive entry"):
        study.Config(multiples=(-1.0, 0.0))


def test_bootstrap_mean_over_prompts_on_a_planted_case():
    rng = np.random.default_rng(1)
    x_P = rng.normal(2.0, 1.0, size=400)
    values_PM = np.column_stack([x_P, x_P + 5.0, np.full(400, 0.3)])
    est, lo, hi = study.bootstrap_mean(values_PM, n_boot=2000, seed=0)
    np.testing.assert_allclose(est, [x_P.mean(), x_P.mean() + 5.0, 0.3])
    assert lo[0] < 2.0 < hi[0]  # covers the planted mean
    half = 1.96 * x_P.std(ddof=1) / np.sqrt(400)  # the normal-theory half width
    assert (hi[0] - lo[0]) / 2 == pytest.approx(half, rel=0.1)
    np.testing.assert_allclose([lo[1], hi[1]], [lo[0] + 5.0, hi[0] + 5.0])  # the same draws for every column
    np.testing.assert_allclose([lo[2], hi[2]], 0.3)  # a constant has no spread
    again = study.bootstrap_mean(values_PM, n_boot=2000, seed=0)
    np.testing.assert_array_equal(again[1], lo)  # seeded


@pytest.mark.slow
def test_steering_study_micro(micro_ctx):
    info = run_study("steering", micro_ctx)
    cfg = micro_ctx.preset.config("steering")
    results = micro_ctx.results("steering")
    cands = pd.read_csv(results / "candidates.csv")
    effects = pd.read_csv(results / "effects.csv", keep_default_na=False)
    gens = pd.read_csv(results / "generations.csv")
    per = pd.read_csv(results / "prompts.csv", keep_default_na=False)
    stats = pd.read_csv(results / "stats.csv")
    assert list(cands.columns) == study.CANDIDATE_COLUMNS and list(effects.columns) == study.EFFECT_COLUMNS
    assert list(per.columns) == study.PROMPT_COLUMNS and list(stats.columns) == study.STAT_COLUMNS
    assert cands.groupby("dictionary").chosen.sum().to_dict() == {"SAE": 1, "crosscoder": 1}
    table = study.prompt_table().set_index("prompt_id")
    assert (effects.split == effects.prompt_id.map(table.split)).all()
    assert (effects.prompt == effects.prompt_id.map(table.prompt)).all()
    assert not set(effects.prompt) & (set(study.CONCEPT_TEXTS) | set(study.CONTROL_TEXTS))
    choice = study.choose_multiples(effects[effects.split == "dev"], cfg.down).set_index("dictionary")
    for name, part in effects.groupby("dictionary"):
        chosen = cands[(cands.dictionary == name) & cands.chosen].iloc[0]
        assert (part.feature == chosen.feature).all() and chosen.scale > 0 and (part["at"] == cfg.at).all()
        assert sorted(part.multiple.unique()) == sorted(cfg.multiples)
        np.testing.assert_allclose(part.value, part.multiple * chosen.scale, rtol=1e-5)
        assert info[f"{name}_up_multiple"] == choice.loc[name, "up"] > 0  # chosen on dev prompts only
        mine = per[per.dictionary == name].set_index("direction")
        assert (mine.loc["up", "multiple"] == choice.loc[name, "up"]).all()
        assert (mine.loc["down", "multiple"] == cfg.down).all()
    assert effects.p_clean.between(0, 1).all() and effects.p_steered.between(0, 1).all()
    assert (effects.kl >= 0).all() and (effects.ratio > 0).all() and (effects.vocab_ratio > 0).all()
    np.testing.assert_allclose(effects.ratio, effects.p_steered / effects.p_clean, rtol=1e-3)
    assert set(effects.token) <= set(study.CONCEPT_TOKENS) and effects.prompt_id.nunique() == len(study.PROMPTS)
    # every (dictionary, prompt) sees the same clean distribution
    assert effects.groupby(["prompt_id", "token"]).p_clean.nunique().max() == 1
    # reported effects come from evaluation prompts only
    n_eval = int((table.split == "eval").sum())
    assert set(per.prompt_id) == set(table.index[table.split == "eval"]) and len(per) == 2 * 2 * n_eval
    assert (per.key_token == effects.token.iloc[0]).all()
    np.testing.assert_allclose(per.lift, per.concept_ratio / per.vocab_ratio, rtol=1e-6)
    main = stats[stats.prompts == "all"]
    assert len(main) == 4 and (main.n_prompts == n_eval).all()
    assert (main.concept_ratio_lo <= main.concept_ratio + 1e-9).all()
    assert (main.concept_ratio <= main.concept_ratio_hi + 1e-9).all()
    g = cfg.gen_prompts
    assert list(gens.dictionary) == ["clean"] * g + ["SAE"] * 2 * g + ["crosscoder"] * 2 * g and gens.text.notna().all()
    assert list(gens.direction) == ["clean"] * g + (["up"] * g + ["down"] * g) * 2
    assert set(gens.prompt_id) == set(table.index[table.split == "eval"][:g])
    tops = pd.read_csv(results / "top_tokens.csv", keep_default_na=False)
    assert set(tops.direction) == {"up", "down"}
    tables = micro_ctx.paper / "tables"
    for name in ("steering.tex", "steering_prompts.tex", "steering_generations.tex", "steering_answer.tex",
                 "steering_figures.tex"):
        assert (tables / name).stat().st_size > 0
    answer = (tables / "steering_answer.tex").read_text()
    for name in ("SAE", "crosscoder"):  # the answer names the features chosen in the CSV
        chosen = cands[(cands.dictionary == name) & cands.chosen].iloc[0]
        assert f"{name} feature {int(chosen.feature)} (layer {int(chosen.layer)}" in answer
        says = "reproduces." if info[f"{name}_reproduces"] else "does not reproduce:"
        assert f"With this feature the seed's result {says}" in answer.split(f"{name} feature")[1]


DEV = ("dev one", "dev two")
EVAL = (("concept", "eval a 50% deal & $5"), ("concept", "eval b_c"), ("concept", "eval c"), ("concept", "eval d"),
        ("neutral", "eval e"), ("neutral", "eval f"))


def _ratio(name, split, m, pid):
    """Planted p steered / p clean. SAE: on dev it grows with the multiple (best: 8), on eval it would pick 0.25
    (50x) but gives 3x at 8 and 0.5x at -1. Crosscoder: 0.5 ** m for m > 0 everywhere (best dev multiple: 0.25), 0.5x
    at -1. A small per-prompt factor gives the intervals a width."""
    noise = np.exp(0.05 * (pid % 3 - 1))
    if m < 0:
        return 0.5 * noise
    if m == 0:
        return 1.0
    if name == "crosscoder":
        return 0.5 ** m * noise
    return (1.0 + m if split == "dev" else 50.0 if m == 0.25 else 3.0) * noise


def _fixture_csvs(results, *, ratio=_ratio, vocab=lambda name, split, m, pid: 1.0):
    prompts = [("dev", "concept", p) for p in DEV] + [("eval", c, p) for c, p in EVAL]
    rows = []
    for name, feature, scale in (("SAE", 7, 2.0), ("crosscoder", 11, 10.0)):
        for m in study.Config().multiples:
            for pid, (split, context, prompt) in enumerate(prompts):
                r = ratio(name, split, m, pid)
                for token, p0 in ((" scam", 0.01), (" fake", 0.002)):
                    rows.append({"dictionary": name, "feature": feature, "at": "each", "multiple": m, "value": m * scale,
                                 "split": split, "context": context, "prompt_id": pid, "prompt": prompt,
                                 "clean_activation": 0.0, "token": token, "p_clean": p0, "p_steered": p0 * r,
                                 "ratio": r, "vocab_ratio": vocab(name, split, m, pid), "kl": 0.1 * abs(m)})
    effects = pd.DataFrame(rows)[study.EFFECT_COLUMNS]
    effects.to_csv(results / "effects.csv", index=False)
    study.write_summaries(effects, results, study.Config(n_boot=500))
    cands = []
    for name, feature, scale in (("SAE", 7, 2.0), ("crosscoder", 11, 10.0)):
        for f, chosen in ((feature, True), (feature + 1, False)):
            cands.append({"dictionary": name, "feature": f, "layer": 3, "source": "logit", "logit_effect": 1.0,
                          "logit_z": 2.0, "concept_rank": 12, "concept_act": 1.0, "control_act": 0.0,
                          "act_contrast": 1.0, "density": 0.01 if chosen else 0.5, "store_max": scale,
                          "scale": scale, "eligible": chosen, "score": 1.0, "chosen": chosen,
                          "top_logits": " scam| fake|_x", "top_examples": "%|&|\n"})
    pd.DataFrame(cands).to_csv(results / "candidates.csv", index=False)
    pd.DataFrame({"token": [" scam", " fake"], "token_id": [1, 2], "n_train": [0, 3], "n_heldout": [0, 0]}
                 ).to_csv(results / "concept_tokens.csv", index=False)
    pd.DataFrame([{"dictionary": d, "feature": f, "direction": r, "multiple": m, "value": 1.0, "prompt_id": 2,
                   "prompt": "The 100% {odd} prompt", "at": "each", "text": "money & $ \u4e2d_#"}
                  for d, f, r, m in (("clean", -1, "clean", float("nan")), ("SAE", 7, "up", 8.0),
                                     ("SAE", 7, "down", -1.0), ("crosscoder", 11, "up", 0.25))]
                 ).to_csv(results / "generations.csv", index=False)


@pytest.fixture
def results(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    _fixture_csvs(out)
    return out


def test_the_clamp_up_value_is_chosen_on_development_rows_only(results):
    effects = pd.read_csv(results / "effects.csv", keep_default_na=False)
    choice = study.choose_multiples(effects, -1.0).set_index("dictionary")
    assert choice.loc["SAE", "up"] == 8.0 and choice.loc["crosscoder", "up"] == 0.25
    assert (choice["down"] == -1.0).all() and choice.loc["SAE", "feature"] == 7
    # the evaluation rows alone would pick 0.25 for the SAE (50x); relabelled as dev they do
    as_dev = effects[effects.split == "eval"].assign(split="dev")
    assert study.choose_multiples(as_dev, -1.0).set_index("dictionary").loc["SAE", "up"] == 0.25
    # changing every evaluation row leaves the choice alone
    shuffled = effects.assign(ratio=np.where(effects.split == "eval", 1e-3, effects.ratio))
    pd.testing.assert_frame_equal(study.choose_multiples(shuffled, -1.0), choice.reset_index())
    per = pd.read_csv(results / "prompts.csv", keep_default_na=False)
    assert set(per.prompt) == {p for _, p in EVAL}  # reported rows: evaluation prompts only
    assert set(per.loc[per.dictionary == "SAE"].groupby("direction").multiple.unique().map(tuple)) == {(8.0,), (-1.0,)}
    sae_up = per[(per.dictionary == "SAE") & (per.direction == "up")]
    np.testing.assert_allclose(sae_up.p_key_clean, 0.01)
    np.testing.assert_allclose(sae_up.mass_clean, 0.012)
    np.testing.assert_allclose(sae_up.concept_ratio, sae_up.key_ratio, rtol=1e-9)
    stats = pd.read_csv(results / "stats.csv").set_index(["prompts", "dictionary", "direction"])
    assert set(stats.index.get_level_values("prompts")) == {"all", "concept", "neutral"}
    row = stats.loc[("all", "SAE", "up")]
    assert row.n_prompts == len(EVAL) and row.concept_ratio == pytest.approx(3.0, rel=0.02)
    assert row.concept_ratio_lo < row.concept_ratio < row.concept_ratio_hi and row.lift == pytest.approx(row.concept_ratio)
    assert stats.loc[("all", "crosscoder", "up"), "concept_ratio"] == pytest.approx(0.5 ** 0.25, rel=0.02)


def test_figures_tables_and_answer_from_csvs(results):
    paper = results.parent / "paper"
    figs = study.figures(results, paper, study.Config())
    assert [p.name for p, _ in figs] == ["steering_dev.png", "steering_eval.png", "steering_kl.png"]
    assert all(p.stat().st_size > 1000 for p, _ in figs)
    main, prompts, gens = study.tables(results, paper, study.Config())
    assert [main.name, prompts.name] == ["steering.tex", "steering_prompts.tex"]
    tex = main.read_text() + prompts.read_text() + gens.read_text()
    assert "\\_x" in tex and "100\\%" in tex and "money \\& \\$ ?\\_\\#" in tex and "50\\% deal \\& \\$5" in tex
    assert "SAE 7 down (-1$\\times$)" in tex
    text = study.answer(results, study.Config())
    sae_text, cc_text = text.split("crosscoder feature 11")
    assert "SAE feature 7" in sae_text and "3 times in the training store" in text
    assert "clamp-up value is 8$\\times$" in sae_text and "clamp-up value is 0.25$\\times$" in cc_text
    assert "With this feature the seed's result reproduces." in sae_text
    # the crosscoder's 0.5 ** m < 1: even its best positive clamp lowers the concept; its clamp-down works
    assert "does not reproduce: clamping up does not raise" in cc_text and "clamping down does not" not in cc_text
    assert "rises on 6 of 6 prompts" in sae_text and "rises on 0 of 6 prompts" in cc_text
    assert "reproduces on \\texttt{\\clmodelname} with the SAE feature, not with the crosscoder feature." in text


def test_the_verdict_follows_the_csvs(tmp_path):
    # a flattened distribution: on evaluation prompts the whole vocabulary rises 4x when clamped up (dev untouched)
    flat = tmp_path / "flat"
    flat.mkdir()
    _fixture_csvs(flat, vocab=lambda name, split, m, pid: 4.0 if split == "eval" and m > 0 else 1.0)
    v = study.verdict(pd.read_csv(flat / "stats.csv"))
    assert v.loc["SAE"].tolist() == [True, False, True, False]
    text = study.answer(flat, study.Config())
    assert "raises the concept tokens no more than the whole vocabulary" in text.split("crosscoder feature 11")[0]
    assert "does not reproduce on \\texttt{\\clmodelname} with any chosen feature." in text
    # a clamp-down that goes both ways across prompts: its interval spans 1
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    _fixture_csvs(noisy, ratio=lambda name, split, m, pid: (0.3 if pid % 2 else 2.0) if m < 0 else
                  _ratio(name, split, m, pid))
    stats = pd.read_csv(noisy / "stats.csv").set_index(["prompts", "dictionary", "direction"])
    assert stats.loc[("all", "SAE", "down"), "concept_ratio_lo"] < 1 < stats.loc[("all", "SAE", "down"),
                                                                                "concept_ratio_hi"]
    v = study.verdict(stats.reset_index())
    assert v.loc["SAE"].tolist() == [True, True, False, False]
    assert v.loc["crosscoder"].tolist() == [False, False, False, False]
    text = study.answer(noisy, study.Config())
    assert "does not reproduce: clamping down does not lower" in text.split("crosscoder feature 11")[0]
