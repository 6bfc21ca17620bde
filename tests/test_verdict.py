"""The verdict of ``mvld-train all``: a loss anywhere is reported, with a plain likely cause."""

from mvld.train.verdict import (
    TrainingEvidence,
    build_verdict,
    imputation_table,
    likely_cause,
    losses,
    report_markdown,
    still_improving,
)

IMPUTER = "dpmpp_2m_sde:20"


def _row(method: str, missing: int, psnr: float, coherence: float | None) -> dict:
    return {
        "method": method,
        "kind": "x",
        "group": f"{missing} missing (pooled)",
        "missing_views": missing,
        "psnr": psnr,
        "ssim": 0.5,
        "coherence": coherence,
    }


def _rows(
    ours: dict[int, tuple[float, float | None]],
    baseline_psnr: float = 20.0,
    baseline_coherence: float | None = 0.5,
) -> list[dict]:
    rows = [_row(IMPUTER, m, p, c) for m, (p, c) in ours.items()]
    for name in ("mean_latent", "nearest_neighbour", "ridge_regressor"):
        rows += [_row(name, m, baseline_psnr, baseline_coherence) for m in ours]
    rows.append(
        {
            "method": IMPUTER,
            "group": "all patterns (pooled)",
            "missing_views": None,
            "psnr": 0.0,
            "ssim": 0.0,
            "coherence": 0.0,
        }
    )  # ignored: mixed counts
    return rows


def _good_evidence(**changes) -> TrainingEvidence:
    values = dict(
        reconstruction_psnr=30.0,
        reconstruction_ssim=0.9,
        ae_val_psnr=[20.0, 29.9, 30.0],
        score_val_loss=[0.8, 0.5, 0.499],
        train_frame_sets=5000,
        labelled=True,
    )
    return TrainingEvidence(**(values | changes))


def test_an_imputer_better_everywhere_wins() -> None:
    verdict = build_verdict(_rows({1: (22.0, 0.9), 2: (21.0, 0.8)}), IMPUTER, _good_evidence())
    assert verdict["imputer_wins"] and verdict["losses"] == []
    assert verdict["best_psnr"] == {"1": IMPUTER, "2": IMPUTER}
    assert "beats every baseline" in verdict["sentence"]


def test_losing_on_one_count_and_one_metric_is_a_loss() -> None:
    rows = _rows({1: (22.0, 0.9), 2: (21.0, 0.4)})  # coherence with 2 missing below 0.5
    verdict = build_verdict(rows, IMPUTER, _good_evidence())
    assert not verdict["imputer_wins"]
    assert {(x["missing"], x["metric"]) for x in verdict["losses"]} == {(2, "coherence")}
    assert len(verdict["losses"]) == 3  # against each of the three baselines


def test_a_broken_imputer_loses_to_every_baseline_and_says_why() -> None:
    evidence = _good_evidence(score_val_loss=[1.0, 0.9, 0.7])  # still falling
    verdict = build_verdict(_rows({1: (9.0, 0.1), 2: (8.0, 0.1)}), IMPUTER, evidence)
    assert not verdict["imputer_wins"]
    assert len(verdict["losses"]) == 2 * 3 * 2  # counts x baselines x metrics
    sentence = verdict["sentence"]
    assert "loses to" in sentence and "12 of 12 comparisons lost" in sentence
    assert "score network is under-trained" in sentence and "PSNR 8.00 vs 20.00 dB" in sentence
    assert verdict["best_psnr"] == {"1": "mean_latent", "2": "mean_latent"}  # first of a tie
    report = report_markdown(verdict)
    assert "| 2 | ridge_regressor | 20.00 |" in report and "**Verdict:** The diffusion" in report
    assert "Best PSNR on this data: 1 missing: mean_latent" in report


def test_without_labels_only_psnr_is_compared_and_the_report_says_so() -> None:
    rows = _rows({1: (22.0, None), 2: (21.0, None)}, baseline_coherence=None)
    verdict = build_verdict(rows, IMPUTER, _good_evidence(labelled=False))
    assert verdict["imputer_wins"] and "on PSNR for" in verdict["sentence"]
    assert "no labels" in report_markdown(verdict)


def test_ties_are_not_losses() -> None:
    table = imputation_table(_rows({1: (20.0, 0.5)}), IMPUTER)
    assert losses(table, IMPUTER) == []


def test_causes_are_named_upstream_first() -> None:
    assert "autoencoder" in likely_cause(_good_evidence(reconstruction_psnr=18.0))[0]
    assert "still rising" in likely_cause(_good_evidence(ae_val_psnr=[20.0, 28.0, 29.0]))[0]
    assert "score network" in likely_cause(_good_evidence(score_val_loss=[0.9, 0.6]))[0]
    cause, advice = likely_cause(_good_evidence(train_frame_sets=300))
    assert "too little data" in cause and "record more" in advice
    assert "converged" in likely_cause(_good_evidence())[0]


def test_still_improving_needs_two_points_and_a_real_change() -> None:
    assert not still_improving([30.0], 0.2)
    assert not still_improving([30.0, 30.1], 0.2)
    assert still_improving([30.0, 30.5], 0.2)
    assert still_improving([1.0, 0.9], 0.01, relative=True, lower_is_better=True)
    assert not still_improving([1.0, 0.999], 0.01, relative=True, lower_is_better=True)
