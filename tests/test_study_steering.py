"""The steering study: clamp invariants and a planted ground-truth feature, the micro run, figures from CSVs."""

import numpy as np
import pandas as pd
import pytest
import torch

from crosslayer.crosscoder import Crosscoder, CrosscoderConfig
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


@pytest.mark.slow
def test_steering_study_micro(micro_ctx):
    info = run_study("steering", micro_ctx)
    cfg = micro_ctx.preset.config("steering")
    results = micro_ctx.results("steering")
    cands = pd.read_csv(results / "candidates.csv")
    effects = pd.read_csv(results / "effects.csv")
    gens = pd.read_csv(results / "generations.csv")
    assert list(cands.columns) == study.CANDIDATE_COLUMNS and list(effects.columns) == study.EFFECT_COLUMNS
    assert cands.groupby("dictionary").chosen.sum().to_dict() == {"SAE": 1, "crosscoder": 1}
    for name, part in effects.groupby("dictionary"):
        chosen = cands[(cands.dictionary == name) & cands.chosen].iloc[0]
        assert (part.feature == chosen.feature).all() and chosen.scale > 0
        assert sorted(part.multiple.unique()) == sorted(cfg.multiples)
        np.testing.assert_allclose(part.value, part.multiple * chosen.scale, rtol=1e-5)
        assert info[f"{name}_feature"] == chosen.feature
    assert effects.p_clean.between(0, 1).all() and effects.p_steered.between(0, 1).all()
    assert (effects.kl >= 0).all() and (effects.ratio > 0).all() and (effects.vocab_ratio > 0).all()
    np.testing.assert_allclose(effects.ratio, effects.p_steered / effects.p_clean, rtol=1e-3)
    assert set(effects.token) <= set(study.CONCEPT_TOKENS) and effects.prompt_id.nunique() == len(study.STEER_PROMPTS)
    # every (dictionary, prompt) sees the same clean distribution
    assert effects.groupby(["prompt_id", "token"]).p_clean.nunique().max() == 1
    assert list(gens.dictionary) == ["clean"] * cfg.gen_prompts + ["SAE"] * cfg.gen_prompts + \
        ["crosscoder"] * cfg.gen_prompts and gens.text.notna().all()
    tops = pd.read_csv(results / "top_tokens.csv", keep_default_na=False)
    assert set(tops.direction) == {"up", "down"}
    tables = micro_ctx.paper / "tables"
    for name in ("steering.tex", "steering_generations.tex", "steering_answer.tex", "steering_figures.tex"):
        assert (tables / name).stat().st_size > 0
    answer = (tables / "steering_answer.tex").read_text()
    for name in ("SAE", "crosscoder"):  # the answer names the features chosen in the CSV
        chosen = cands[(cands.dictionary == name) & cands.chosen].iloc[0]
        assert f"{name} feature {int(chosen.feature)} (layer {int(chosen.layer)}" in answer


def _fixture_csvs(results):
    rows = []
    for name, feature, scale, gain in (("SAE", 7, 2.0, 3.0), ("crosscoder", 11, 10.0, 0.5)):
        for m in study.Config().multiples:
            for pid, prompt in enumerate(("a 50% deal & $5", "b_c")):
                for token, p0 in ((" scam", 0.01), (" fake", 0.002)):
                    ratio = gain ** m if m > 0 else 0.5 if m < 0 else 1.0
                    rows.append({"dictionary": name, "feature": feature, "multiple": m, "value": m * scale,
                                 "prompt_id": pid, "prompt": prompt, "clean_activation": 0.0, "token": token,
                                 "p_clean": p0, "p_steered": min(1.0, p0 * ratio), "ratio": min(1.0, p0 * ratio) / p0,
                                 "vocab_ratio": 1.0, "kl": 0.1 * abs(m)})
    pd.DataFrame(rows).to_csv(results / "effects.csv", index=False)
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
    pd.DataFrame([{"dictionary": d, "feature": f, "multiple": m, "value": 1.0, "prompt_id": 0,
                   "prompt": "The 100% {odd} prompt", "text": "money & $ \u4e2d_#"}
                  for d, f, m in (("clean", -1, float("nan")), ("SAE", 7, 8.0), ("crosscoder", 11, 0.25))]
                 ).to_csv(results / "generations.csv", index=False)


def test_figures_tables_and_answer_from_csvs(tmp_path):
    results, paper = tmp_path / "results", tmp_path / "paper"
    results.mkdir()
    _fixture_csvs(results)
    head = study.headline(pd.read_csv(results / "effects.csv")).set_index("dictionary")
    assert head.loc["SAE", "best_multiple"] == 8.0 and head.loc["crosscoder", "best_multiple"] == 0.25
    assert head.loc["SAE", "concept_ratio_abl"] == pytest.approx(1.0)
    figs = study.figures(results, paper, study.Config())
    assert [p.name for p, _ in figs] == ["steering_concept_prob.png", "steering_concept_ratio.png", "steering_kl.png"]
    assert all(p.stat().st_size > 1000 for p, _ in figs)
    main, gens = study.tables(results, paper, study.Config())
    assert main.name == "steering.tex"
    tex = main.read_text() + gens.read_text()
    assert "\\_x" in tex and "100\\%" in tex and "money \\& \\$ ?\\_\\#" in tex
    text = study.answer(results, study.Config())
    assert "SAE feature 7" in text and "crosscoder feature 11" in text and "It passes the steering criterion" in text
    # the crosscoder's gain 0.5 < 1: even its best positive clamp lowers the concept
    assert "It fails the steering criterion" in text
    assert "3 times in the training store" in text
    # per-prompt concept mass, direction read from the numbers (the SAE's gain 3 raises it, the crosscoder's 0.5 lowers it)
    sae_text, cc_text = text.split("crosscoder feature 11")
    assert "it rises on 2 of 2 prompts" in sae_text and "(falls)" not in sae_text
    assert "it rises on 0 of 2 prompts" in cc_text and cc_text.count("(falls)") == 2
    mass = study.concept_mass(pd.read_csv(results / "effects.csv"), "crosscoder", 0.25)
    np.testing.assert_allclose(mass.p_clean, 0.012) and np.testing.assert_allclose(mass.p_steered, 0.012 * 0.5 ** 0.25)
