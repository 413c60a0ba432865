"""Candidate features on synthetic patches with known answers (spheres, vessels, ground glass, empty masks); the JSON
random forest against scikit-learn's own evaluation; a forest that tells nodules from vessels; bad models and input;
the training script's phantom sets kept apart."""

import importlib.util
import json
import math
import unittest
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from NoduleDetectLib.classifier import FORMAT_VERSION, ForestModel, forest_from_sklearn, roc_auc, train_forest
from NoduleDetectLib.features import FEATURE_NAMES, FEATURE_UNITS, candidate_features, crofton_surface_area_mm2
from RecognitionCore.errors import InputError, ModelError
from RecognitionCore.testing import assert_raises

LUNG_HU = -850.0
SPACINGS = ((1.0, 1.0, 1.0), (0.7, 0.7, 1.25), (0.7, 0.7, 2.5))  # (x, y, z) mm


def _offsets_mm(shape, spacing):
    """(z, y, x) offsets in mm of every voxel centre from the patch centre."""
    centre = (np.asarray(shape) - 1) / 2.0
    return [(np.arange(n) - c)[tuple(slice(None) if a == axis else None for a in range(3))] * step
            for axis, (n, c, step) in enumerate(zip(shape, centre, spacing[::-1]))]


def _shape_for(extent_mm, spacing):
    return tuple(int(math.ceil(extent_mm / step)) for step in spacing[::-1])


def _sphere(shape, spacing, diameter_mm, centre_mm=(0.0, 0.0, 0.0)):
    z, y, x = _offsets_mm(shape, spacing)
    return (z - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (x - centre_mm[2]) ** 2 <= (diameter_mm / 2.0) ** 2


def _cylinder(shape, spacing, radius_mm, direction_zyx, half_length_mm=np.inf):
    z, y, x = _offsets_mm(shape, spacing)
    axis = np.asarray(direction_zyx, dtype=float) / np.linalg.norm(direction_zyx)
    along = z * axis[0] + y * axis[1] + x * axis[2]
    across_squared = z * z + y * y + x * x - along * along
    return (across_squared <= radius_mm ** 2) & (np.abs(along) <= half_length_mm)


def _patch(mask, inside_hu, rng=None, noise_hu=0.0):
    patch = np.where(mask, inside_hu, LUNG_HU)
    if rng is not None:
        patch = ndimage.gaussian_filter(patch, 0.7) + rng.normal(0.0, noise_hu, mask.shape)
    return patch.astype(np.float32)


def _named(values):
    return dict(zip(FEATURE_NAMES, values.tolist()))


def _require_sklearn():
    if importlib.util.find_spec("sklearn") is None:
        raise unittest.SkipTest("scikit-learn is not installed (needed to train, not to use, the classifier)")


def test_sphere_size_and_shape():
    for spacing in SPACINGS:
        for diameter_mm in (8.0, 12.0, 20.0):
            shape = _shape_for(diameter_mm + 10.0, spacing)
            mask = _sphere(shape, spacing, diameter_mm)
            features = _named(candidate_features(_patch(mask, 20.0), mask, spacing, blob_score=3.5, scale_mm=4.0))
            case = f"{diameter_mm} mm sphere at {spacing} mm"
            assert abs(features["equivalent_diameter_mm"] - diameter_mm) <= max(spacing), case
            assert abs(features["volume_mm3"] / (math.pi * diameter_mm ** 3 / 6.0) - 1.0) < 0.1, case
            assert abs(features["surface_area_mm2"] / (math.pi * diameter_mm ** 2) - 1.0) < 0.08, case
            assert 0.92 < features["sphericity"] < 1.08, (case, features["sphericity"])
            assert abs(features["major_axis_mm"] - diameter_mm) <= max(spacing), case
            assert features["elongation"] > 0.85 and features["flatness"] > 0.75, case
            assert features["border_fraction"] == 0.0 and features["solid_fraction"] == 1.0, case
            assert abs(features["mean_hu"] - 20.0) < 1e-3 and abs(features["shell_mean_hu"] - LUNG_HU) < 1e-3, case
            assert features["hessian_bright_blob_fraction"] > 0.9, case
            assert (features["blob_score"], features["scale_mm"]) == (3.5, 4.0)


def test_sphere_is_rounder_than_vessel_of_same_volume():
    spacing = (0.7, 0.7, 1.25)
    shape = _shape_for(36.0, spacing)
    sphere = _sphere(shape, spacing, 10.0)
    radius_mm = 2.5
    half_length_mm = (math.pi * 10.0 ** 3 / 6.0) / (math.pi * radius_mm ** 2) / 2.0  # same volume as the sphere
    for direction in ((1.0, 0.0, 0.0), (0.0, 0.3, 1.0), (1.0, 1.0, 1.0)):
        vessel = _cylinder(shape, spacing, radius_mm, direction, half_length_mm)
        round_, long_ = (_named(candidate_features(_patch(mask, 30.0), mask, spacing)) for mask in (sphere, vessel))
        assert abs(long_["volume_mm3"] / round_["volume_mm3"] - 1.0) < 0.15, direction
        assert round_["sphericity"] > long_["sphericity"] + 0.25, (direction, round_["sphericity"], long_["sphericity"])
        assert long_["elongation"] < 0.3 < round_["elongation"], direction
        assert long_["major_axis_mm"] > 2.5 * round_["major_axis_mm"], direction
        assert long_["hessian_blobness"] < 0.2 < 0.5 < round_["hessian_blobness"], direction
        assert long_["hessian_bright_blob_fraction"] < round_["hessian_bright_blob_fraction"], direction
    crossing = _cylinder(shape, spacing, radius_mm, (0.2, 1.0, 0.3))  # a vessel that leaves the patch
    assert _named(candidate_features(_patch(crossing, 30.0), crossing, spacing))["border_fraction"] > 0.02


def test_ground_glass_is_fainter_than_solid():
    spacing = (0.7, 0.7, 1.25)
    mask = _sphere(_shape_for(20.0, spacing), spacing, 10.0)
    rng = np.random.default_rng(4)
    solid = _named(candidate_features(_patch(mask, 30.0, rng, 25.0), mask, spacing))
    ground_glass = _named(candidate_features(_patch(mask, -600.0, rng, 25.0), mask, spacing))
    assert ground_glass["mean_hu"] < solid["mean_hu"] - 400.0
    assert ground_glass["solid_fraction"] < 0.1 < 0.7 < solid["solid_fraction"]  # blurred edges are partly solid
    assert ground_glass["contrast_hu"] < solid["contrast_hu"]
    assert ground_glass["edge_gradient_hu_per_mm"] < solid["edge_gradient_hu_per_mm"]
    assert abs(ground_glass["equivalent_diameter_mm"] - solid["equivalent_diameter_mm"]) < 1e-6
    assert solid["entropy_bits"] > 0.0 and solid["local_std_hu"] > 0.0


def test_features_are_finite_for_degenerate_input():
    spacing = (0.8, 0.8, 2.0)
    shape = (6, 12, 12)
    noisy = np.random.default_rng(1).normal(-700.0, 200.0, shape).astype(np.float32)
    cases = {
        "empty mask": (noisy, np.zeros(shape, bool)),
        "constant patch": (np.full(shape, -1000.0, np.float32), _sphere(shape, spacing, 6.0)),
        "mask fills the patch": (noisy, np.ones(shape, bool)),
        "one voxel": (np.zeros((1, 1, 1), np.float32), np.ones((1, 1, 1), bool)),
        "flat slab mask": (noisy, np.pad(np.ones((1, 4, 4), bool), ((2, 3), (4, 4), (4, 4)))),
    }
    for name, (patch, mask) in cases.items():
        features = candidate_features(patch, mask, spacing)
        assert features.dtype == np.float32 and features.shape == (len(FEATURE_NAMES),), name
        assert np.all(np.isfinite(features)), (name, _named(features))
    empty = _named(candidate_features(noisy, np.zeros(shape, bool), spacing))
    assert empty["volume_mm3"] == 0.0 and empty["sphericity"] == 0.0 and empty["contrast_hu"] == 0.0
    assert set(FEATURE_UNITS) == set(FEATURE_NAMES) and len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)


def test_features_reject_bad_input():
    patch = np.zeros((4, 5, 6), np.float32)
    mask = np.zeros((4, 5, 6), bool)
    with_nan = patch.copy()
    with_nan[1, 1, 1] = np.nan
    assert_raises(InputError, candidate_features, patch, mask[:, :, :5], (1, 1, 1), match="shape")
    assert_raises(InputError, candidate_features, patch[0], mask[0], (1, 1, 1), match="3D")
    assert_raises(InputError, candidate_features, with_nan, mask, (1, 1, 1), match="NaN")
    assert_raises(InputError, candidate_features, patch, mask, (1, 0, 1), match="spacing")
    assert_raises(InputError, candidate_features, patch, mask, (1, 1, 1), blob_score=float("nan"), match="blob_score")


def test_crofton_area_of_a_box_is_close_to_exact():
    spacing = (0.5, 0.5, 1.0)
    box = np.zeros((14, 30, 30), bool)
    box[2:12, 5:25, 5:25] = True  # 10 x 10 x 10 mm cube
    # axis-aligned faces are the 13-direction estimate's worst case (about -13 %); a ball's error is a few %
    assert abs(crofton_surface_area_mm2(box, spacing) / 600.0 - 1.0) < 0.15


def test_hand_made_forest_json():
    names = ("a", "b")
    stump = {"feature": [0, -1, -1], "threshold": [0.5, 0, 0], "left": [1, -1, -1], "right": [2, -1, -1],
             "value": [0, 0.2, 0.9]}
    deeper = {"feature": [1, -1, 0, -1, -1], "threshold": [10, 0, -1, 0, 0], "left": [1, -1, 3, -1, -1],
              "right": [2, -1, 4, -1, -1], "value": [0, 0.0, 0, 0.5, 1.0]}
    document = {"format": "mir-random-forest", "format_version": FORMAT_VERSION, "feature_names": list(names),
                "metadata": {"description": "by hand"}, "trees": [stump, deeper]}
    model = ForestModel.from_json(document, feature_names=names)
    rows = np.array([[0.5, 10.0], [0.6, 10.0], [-2.0, 11.0], [0.0, 11.0]])
    expected = [(0.2 + 0.0) / 2, (0.9 + 0.0) / 2, (0.2 + 0.5) / 2, (0.2 + 1.0) / 2]
    assert np.allclose(model.predict_proba(rows), expected, atol=1e-15)
    assert model.predict_proba(rows[1]).shape == (1,) and model.n_trees == 2
    assert model.metadata["description"] == "by hand" and model.feature_names == names


def test_forest_json_round_trip_equals_sklearn(tmp_path):
    _require_sklearn()
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    n_features = len(FEATURE_NAMES)
    features = rng.normal(size=(400, n_features)) * rng.uniform(1e-3, 1e3, n_features)
    features[:, 5] = np.round(features[:, 5])  # ties
    labels = (features[:, 0] / features[:, 0].std() + features[:, 3] / features[:, 3].std()
              + rng.normal(size=400) > 0.5).astype(int)
    forest = RandomForestClassifier(n_estimators=100, max_depth=8, min_samples_leaf=2, random_state=0)
    forest.fit(features, labels)
    path = forest_from_sklearn(forest, FEATURE_NAMES, {"description": "round trip"}).to_json(tmp_path / "f.json")
    model = ForestModel.from_json(path)
    assert path.stat().st_size < 1_000_000 and model.n_trees == 100
    assert model.metadata == {"description": "round trip"}
    # rows exactly on every split threshold, and one float32 step above it: the decisions that could differ
    splits = [(tree.tree_.feature[node], tree.tree_.threshold[node]) for tree in forest.estimators_
              for node in np.flatnonzero(tree.tree_.children_left >= 0)]
    on_threshold = features[rng.integers(0, 400, len(splits))]
    above_threshold = on_threshold.copy()
    for row, (feature, threshold) in enumerate(splits):
        on_threshold[row, feature] = threshold
        above_threshold[row, feature] = np.nextafter(np.float32(threshold), np.float32(np.inf))
    for rows in (features, rng.normal(size=(2000, n_features)) * 300.0, on_threshold, above_threshold):
        ours = model.predict_proba(rows)
        theirs = forest.predict_proba(rows)[:, 1]
        assert np.max(np.abs(ours - theirs)) <= 1e-12 and np.array_equal(ours, theirs)


def _sphere_or_vessel_patch(is_nodule, rng, spacing=(0.8, 0.8, 1.5)):
    """A candidate patch in lung: a nodule (sphere) or a vessel through the patch, blurred and noisy; its mask is
    the component above -500 HU at the centre, as a simple segmentation would give."""
    shape = _shape_for(26.0, spacing)
    if is_nodule:
        mask = _sphere(shape, spacing, rng.uniform(5.0, 13.0), rng.uniform(-1.0, 1.0, 3))
        inside_hu = rng.uniform(-100.0, 60.0)
    else:
        mask = _cylinder(shape, spacing, rng.uniform(1.0, 3.0), rng.normal(size=3))
        inside_hu = rng.uniform(0.0, 80.0)
    patch = _patch(mask, inside_hu, rng, noise_hu=30.0)
    components, _ = ndimage.label(patch > -500.0)
    centre_label = np.bincount(components[mask].ravel()).argmax() if mask.any() else 0
    segmented = components == centre_label if centre_label else np.zeros(shape, bool)
    return candidate_features(patch, segmented, spacing, blob_score=rng.uniform(0.0, 1.0))


def _sphere_or_vessel_set(n_per_class, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat([1, 0], n_per_class)
    return np.stack([_sphere_or_vessel_patch(bool(label), rng) for label in labels]), labels


def test_forest_tells_nodules_from_vessels(tmp_path):
    _require_sklearn()
    train_features, train_labels = _sphere_or_vessel_set(40, seed=10)
    test_features, test_labels = _sphere_or_vessel_set(25, seed=11)
    model = train_forest(train_features, train_labels, FEATURE_NAMES, n_trees=50, max_depth=6, seed=0,
                         description="spheres vs vessels")
    model = ForestModel.from_json(model.to_json(tmp_path / "nodule_forest.json"))
    probability = model.predict_proba(test_features)
    accuracy = float(np.mean((probability > 0.5) == test_labels))
    assert accuracy >= 0.9, accuracy
    assert roc_auc(probability, test_labels) >= 0.95
    assert model.metadata["training"]["n_samples"] == 80 and model.metadata["description"] == "spheres vs vessels"
    assert model.metadata["metrics"]["oob_auc"] > 0.9


def test_roc_auc_known_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert math.isnan(roc_auc([0.2, 0.3], [1, 1]))


def test_bad_models_are_refused(tmp_path):
    good = {"format": "mir-random-forest", "format_version": FORMAT_VERSION, "feature_names": list(FEATURE_NAMES),
            "metadata": {}, "trees": [{"feature": [-1], "threshold": [0], "left": [-1], "right": [-1],
                                       "value": [0.3]}]}
    assert ForestModel.from_json(good).predict_proba(np.zeros((3, len(FEATURE_NAMES)))).tolist() == [0.3] * 3
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "mir-random-forest", "trees": [', encoding="utf-8")
    assert_raises(ModelError, ForestModel.from_json, tmp_path / "missing.json", match="not found")
    assert_raises(ModelError, ForestModel.from_json, corrupt, match="not valid JSON")
    assert_raises(ModelError, ForestModel.from_json, [1, 2], match="format")
    assert_raises(ModelError, ForestModel.from_json, dict(good, format_version=FORMAT_VERSION + 1), match="version")
    renamed = dict(good, feature_names=["diameter"] + list(FEATURE_NAMES[1:]))
    error = assert_raises(ModelError, ForestModel.from_json, renamed, match="other features")
    assert "equivalent_diameter_mm" in str(error) and "diameter" in str(error)
    cyclic = {"feature": [0, 0], "threshold": [1, 1], "left": [1, 0], "right": [1, 0], "value": [0, 0]}
    for name, tree in (("ragged", dict(good["trees"][0], value=[0.1, 0.2])), ("cycle", cyclic),
                       ("missing key", {"feature": [-1]}), ("probability 2", dict(good["trees"][0], value=[2.0]))):
        assert_raises(ModelError, ForestModel.from_json, dict(good, trees=[tree]), match="tree 0")
    assert_raises(ModelError, ForestModel.from_json, dict(good, trees=[]), match="no trees")


def test_bad_features_and_labels_are_refused():
    model = ForestModel.from_json({"format": "mir-random-forest", "format_version": FORMAT_VERSION,
                                   "feature_names": ["a", "b"], "trees": [
                                       {"feature": [-1], "threshold": [0], "left": [-1], "right": [-1],
                                        "value": [1.0]}]}, feature_names=None)
    assert_raises(InputError, model.predict_proba, np.array([[0.0, np.nan]]), match="NaN")
    assert_raises(InputError, model.predict_proba, np.zeros((2, 3)), match="2 columns")
    assert_raises(InputError, train_forest, np.zeros((4, 2)), [1, 1, 1, 1], ("a", "b"), match="nodules and non")
    assert_raises(InputError, train_forest, np.zeros((4, 2)), [0, 1, 2, 1], ("a", "b"), match="labels")
    assert_raises(InputError, train_forest, np.zeros((4, 2)), [0, 1], ("a", "b"), match="labels")
    assert json.loads(json.dumps(model.to_dict()))["trees"][0]["value"] == [1.0]


def test_training_script_keeps_its_phantoms_apart(monkeypatch):
    """Each of the script's phantom sets (CNNs, forest, small-nodule CNN, small-nodule forest, evaluation) has its own
    seeds: a count that would run into the next set is refused before any phantom is made."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "dev"))
    import train_nodule_classifier as script

    def no_phantom(*args):
        raise AssertionError("a phantom was made")

    monkeypatch.setattr(script, "phantom_candidates", no_phantom)
    assert (script.NETWORK_FIRST_SEED < script.FOREST_FIRST_SEED < script.SMALL_NODULE_FIRST_SEED
            < script.SMALL_NODULE_FOREST_FIRST_SEED < script.SYNTHETIC_FIRST_SEED)
    for option, next_seed, first_seed in (
            ("--network-cases", script.FOREST_FIRST_SEED, script.NETWORK_FIRST_SEED),
            ("--cases", script.SMALL_NODULE_FIRST_SEED, script.FOREST_FIRST_SEED),
            ("--small-nodule-cases", script.SMALL_NODULE_FOREST_FIRST_SEED, script.SMALL_NODULE_FIRST_SEED),
            ("--small-nodule-forest-cases", script.SYNTHETIC_FIRST_SEED, script.SMALL_NODULE_FOREST_FIRST_SEED)):
        with pytest.raises(SystemExit) as refused:
            script.main([option, str(next_seed - first_seed + 1), "--output-dir", "/nonexistent"])
        assert refused.value.code == 2, option
