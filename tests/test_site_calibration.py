"""Site calibration: the fits recover known shifts, cross-fitting never scores a film with its own fit,
acceptance verdicts follow the intervals, and profiles are bound to their model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import BundleError, DatasetError
from cxr_monai.site.acceptance import AcceptanceError, judge, parse_criteria
from cxr_monai.site.calibration import (
    LogitCalibration,
    fit_em_priors,
    fit_logit_bias,
    fit_temperature_scaling,
    fit_vector_scaling,
    with_operating_point,
)
from cxr_monai.site.crossfit import cross_fitted, site_figures
from cxr_monai.site.profile import (
    SiteNotCalibratedError,
    SiteProfile,
    SiteProfiles,
    check_site_name,
    read_profile,
    write_profile,
)

COVID, NORMAL, PNEUMONIA = range(3)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def shifted_site(n: int, shift: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Films whose true posterior is softmax(2.5 z) but whose model output is softmax(2.5 z - ``shift``):
    adding ``shift`` back is the calibration."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(0, 1, (n, 3))
    z[np.arange(n), y] += 2.5
    return softmax(2.5 * z - shift), y


def test_the_bias_fit_recovers_a_known_shift_of_the_logits():
    shift = np.array([2.0, -2.5, 0.5])
    p, y = shifted_site(4000, shift)
    fitted = fit_logit_bias(p, y)
    # softmax is unchanged by a constant: compare the centred biases
    np.testing.assert_allclose(fitted.bias - fitted.bias.mean(), shift - shift.mean(), atol=0.15)
    np.testing.assert_array_equal(fitted.scale, np.ones(3))


def test_vector_scaling_recovers_a_known_scale_and_shift():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 4000)
    z = rng.normal(0, 1, (4000, 3))
    z[np.arange(4000), y] += 2.5
    p = softmax(1.25 * z)  # an over-smoothed model: the true posterior is softmax(2.5 z), scale 2
    fitted = fit_vector_scaling(p, y)
    np.testing.assert_allclose(fitted.scale, [2.0, 2.0, 2.0], atol=0.25)
    assert np.ptp(fitted.bias) < 0.3


def test_temperature_scaling_recovers_a_shared_scale_and_a_shift():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 4000)
    z = rng.normal(0, 1, (4000, 3))
    z[np.arange(4000), y] += 2.5
    shift = np.array([1.0, 0.0, -1.0])
    p = softmax(1.25 * z - shift)  # the true posterior is softmax(2.5 z): scale 2, bias 2 * shift
    fitted = fit_temperature_scaling(p, y)
    np.testing.assert_allclose(fitted.scale, [2.0, 2.0, 2.0], atol=0.2)
    assert fitted.scale[0] == fitted.scale[1] == fitted.scale[2]
    np.testing.assert_allclose(fitted.bias - fitted.bias.mean(), 2 * shift, atol=0.3)


def test_with_few_films_the_prior_keeps_the_bias_finite_and_it_still_moves_the_right_way():
    shift = np.array([-3.0, 3.0, 0.0])  # the model over-calls COVID-19, under-calls Normal
    p, y = shifted_site(400, shift, seed=2)
    pick = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(3)])
    fitted = fit_logit_bias(p[pick], y[pick])
    assert np.all(np.isfinite(fitted.bias)) and np.abs(fitted.bias).max() < 10
    assert fitted.bias[NORMAL] > fitted.bias[COVID]
    before = np.mean(p[y == NORMAL].argmax(axis=1) == NORMAL)
    after = np.mean(fitted.apply(p[y == NORMAL]).argmax(axis=1) == NORMAL)
    assert after > before + 0.2


def test_em_recovers_the_site_s_class_shares_without_labels():
    rng = np.random.default_rng(3)
    train_priors = np.array([1 / 3, 1 / 3, 1 / 3])
    site_priors = np.array([0.1, 0.7, 0.2])
    y = rng.choice(3, size=6000, p=site_priors)
    z = rng.normal(0, 1, (6000, 3))
    z[np.arange(6000), y] += 1.5
    p = softmax(1.5 * z)  # the exact posterior under equal priors
    fitted = fit_em_priors(p, train_priors)
    recovered = train_priors * np.exp(fitted.bias)
    np.testing.assert_allclose(recovered / recovered.sum(), site_priors, atol=0.03)


def test_the_operating_point_is_the_smallest_shift_that_reaches_the_recall():
    p, y = shifted_site(600, np.array([0.0, 3.0, 0.0]), seed=4)  # Normal under-called
    base = LogitCalibration.identity(3)
    moved = with_operating_point(base, p, y, NORMAL, 0.9)
    assert np.mean(p[y == NORMAL].argmax(axis=1) == NORMAL) < 0.9
    assert moved.bias[NORMAL] > 0
    recall = np.mean(moved.apply(p[y == NORMAL]).argmax(axis=1) == NORMAL)
    assert recall >= 0.9
    lesser = LogitCalibration("x", moved.scale, moved.bias - np.array([0.0, 1e-3, 0.0]))
    assert np.mean(lesser.apply(p[y == NORMAL]).argmax(axis=1) == NORMAL) < 0.9
    assert moved.bias[COVID] == moved.bias[PNEUMONIA] == 0.0


def test_no_film_is_scored_by_a_calibration_fitted_on_itself():
    """Each film carries a marker in its probabilities; the fit sets a huge bias on COVID-19 whenever the
    film being scored is among the films it was fitted on. No scored film may show that bias."""
    rng = np.random.default_rng(5)
    n = 30
    p = softmax(rng.normal(0, 1, (n, 3)))
    y = np.arange(n) % 3
    patients = [f"p{i // 2}" for i in range(n)]  # two films per patient
    fitted_on: list[set[float]] = []

    def marking_fit(probabilities: np.ndarray, labels: np.ndarray) -> LogitCalibration:
        seen = {round(float(v), 12) for v in probabilities[:, 0]}
        fitted_on.append(seen)
        return MarkerCalibration(seen)

    class MarkerCalibration(LogitCalibration):
        def __init__(self, seen: set[float]) -> None:
            super().__init__("marker", np.ones(3), np.zeros(3))
            object.__setattr__(self, "seen", seen)

        def apply(self, probabilities: np.ndarray) -> np.ndarray:
            out = np.array(probabilities, dtype=np.float64)
            for row in out:
                if round(float(row[0]), 12) in self.seen:  # type: ignore[attr-defined]
                    row[:] = [1.0, 0.0, 0.0]  # the tell-tale of a film scored by its own fit
            return out

    result = cross_fitted(p, y, patients, marking_fit)
    leaked = [i for i in range(n) if np.allclose(result.probabilities[i], [1.0, 0.0, 0.0])]
    assert leaked == []
    assert result.scheme == "leave-one-patient-out"
    assert len(fitted_on) == n // 2  # one fit per patient
    # and a patient's two films were both held out of the same fit
    for i in range(0, n, 2):
        assert result.folds[i] == result.folds[i + 1]


def test_site_figures_give_patient_cluster_intervals_and_called_shares():
    p, y = shifted_site(120, np.zeros(3), seed=6)
    figures = site_figures(y, p, [f"p{i // 3}" for i in range(120)], n_boot=200)
    assert figures["bootstrap"]["unit"] == "patient"
    acc = figures["accuracy"]
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert sum(figures["called"].values()) == pytest.approx(1.0)


def test_acceptance_verdicts_follow_the_intervals():
    figures = {
        "accuracy": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9},
        "expected_calibration_error": {"value": 0.05, "ci_low": 0.02, "ci_high": 0.08},
        "per_class": {
            "Normal": {"recall": {"value": 0.85, "ci_low": 0.81, "ci_high": 0.9}},
            "COVID-19": {"recall": {"value": 0.5, "ci_low": 0.3, "ci_high": 0.7}},
            "Pneumonia": {"recall": {"value": None, "ci_low": None, "ci_high": None}},
        },
    }
    result = judge(parse_criteria("Normal:recall>=0.8, ece<=0.1"), figures)
    assert result["verdict"] == "pass"
    result = judge(parse_criteria("Normal:recall>=0.8,COVID-19:recall>=0.9"), figures)
    assert [c["verdict"] for c in result["criteria"]] == ["pass", "fail"]
    assert result["verdict"] == "fail"
    result = judge(parse_criteria("accuracy>=0.75,Pneumonia:recall>=0.5"), figures)
    assert [c["verdict"] for c in result["criteria"]] == ["undecided", "undecided"]
    assert result["verdict"] == "undecided"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("Normal:recal>=0.8", "unknown per-class figure"),
        ("Flu:recall>=0.8", "unknown class"),
        ("recall>=0.8", "not an overall figure"),
        ("Normal:recall=0.8", "expected [CLASS:]FIGURE"),
        ("Normal:recall>=high", "no number"),
        (" , ", "no acceptance criterion"),
    ],
)
def test_bad_acceptance_criteria_are_named(text, fragment):
    with pytest.raises(AcceptanceError, match=fragment.replace("[", r"\[")):
        parse_criteria(text)


def _profile(site: str = "st-elsewhere", digest: str = "a" * 64) -> SiteProfile:
    return SiteProfile(
        site,
        {"name": "m", "version": "1", "digest": digest},
        LogitCalibration("bias", np.ones(3), np.array([-1.0, 2.0, 0.0])),
        {"created": "2026-12-02T00:00:00+00:00", "films": {"total": 10}},
    )


def test_a_profile_is_written_read_back_and_bound_to_its_model(tmp_path):
    path = write_profile(tmp_path, _profile())
    assert path == tmp_path / "st-elsewhere.json"
    back = read_profile(path, "a" * 64)
    np.testing.assert_array_equal(back.calibration.bias, [-1.0, 2.0, 0.0])
    assert back.report["films"]["total"] == 10
    with pytest.raises(BundleError, match="fitted for another model"):
        read_profile(path, "b" * 64)
    with pytest.raises(BundleError, match="fitted for another model"):
        SiteProfiles.load(tmp_path, "b" * 64)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],
        lambda text: text.replace('"bias": [', '"bias": ["x", '),
        lambda text: text.replace('"scale": [\n      1.0', '"scale": [\n      -1.0'),
        lambda text: json.dumps({"format": "something else"}),
    ],
)
def test_a_damaged_profile_is_one_clear_error(tmp_path, damage):
    path = write_profile(tmp_path, _profile())
    path.write_text(damage(path.read_text()))
    with pytest.raises(BundleError, match=r"st-elsewhere\.json"):
        read_profile(path, "a" * 64)


def test_a_profile_renamed_to_another_site_is_refused(tmp_path):
    path = write_profile(tmp_path, _profile())
    path.rename(tmp_path / "other.json")
    with pytest.raises(BundleError, match="holds site"):
        read_profile(tmp_path / "other.json")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "-x", "a b", "x" * 65, "c:\\x"])
def test_site_names_with_path_characters_are_refused(name):
    with pytest.raises(DatasetError, match="not allowed"):
        check_site_name(name)


def test_run_time_resolution_applies_flags_or_refuses(tmp_path):
    write_profile(tmp_path, _profile())
    profiles = SiteProfiles.load(tmp_path, "a" * 64)
    calibrated = profiles.resolve("st-elsewhere")
    assert calibrated.calibrated
    moved = calibrated.apply(np.array([0.6, 0.2, 0.2]))
    assert CLASS_NAMES[int(np.argmax(moved))] == "Normal"
    unknown = profiles.resolve("nowhere")
    assert not unknown.calibrated and "NOT calibrated" in unknown.message()
    np.testing.assert_array_equal(unknown.apply(np.array([0.6, 0.2, 0.2])), [0.6, 0.2, 0.2])
    assert "site unknown" in profiles.resolve(None).message()
    strict = SiteProfiles.load(tmp_path, "a" * 64, unknown_site="refuse")
    assert strict.resolve("st-elsewhere").calibrated
    with pytest.raises(SiteNotCalibratedError, match="no calibration profile"):
        strict.resolve("nowhere")
