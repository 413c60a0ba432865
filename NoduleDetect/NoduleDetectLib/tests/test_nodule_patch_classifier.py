"""The candidate CNNs: patches sit on their centre in LPS whatever the grid; each shipped network tells a nodule from
a vessel, and the ensemble gives their mean; training learns balls from tubes and the file round-trips; bad files (of
the CNNs and of the centre map, which load alike) and input are refused."""

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from NoduleDetectLib.classifier import roc_auc
from NoduleDetectLib.detection import DEFAULT_CENTRE_MAP, DEFAULT_PATCH_CLASSIFIERS
from NoduleDetectLib.nodule_map import NoduleMap
from NoduleDetectLib.patch_classifier import (HU_RANGE, PATCH_MM, PatchClassifier, PatchEnsemble, candidate_patches,
                                              train_patch_network)
from RecognitionCore.errors import InputError, ModelError
from RecognitionCore.testing import assert_raises

from .phantom_cases import FLIP_X, chest_phantom

LUNG_HU = -850.0


def _unit(hu):
    return (hu - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])


def test_patches_sit_on_the_nodule_in_both_grid_orientations():
    for direction in (None, FLIP_X):
        phantom = chest_phantom(direction)
        nodule = max(phantom.nodules, key=lambda n: n.diameter_mm if n.location == "isolated" else 0)  # 15 mm solid
        patch = candidate_patches(phantom.image, [nodule.center_lps_mm]).astype(np.float32)[0]
        assert patch.shape == (PATCH_MM,) * 3
        centre = patch[PATCH_MM // 2 - 2:PATCH_MM // 2 + 2, PATCH_MM // 2 - 2:PATCH_MM // 2 + 2,
                       PATCH_MM // 2 - 2:PATCH_MM // 2 + 2]
        assert centre.min() > _unit(-200.0), (direction, centre.min())  # solid tissue at the centre
        assert patch[:, :, 0].mean() < _unit(-600.0)  # lung beyond its 7.5 mm radius, to the patient's right (-x)
        assert patch[:, :, -1].mean() < _unit(-600.0)


def test_patches_beyond_the_image_are_air():
    image = sitk.Image(20, 20, 10, sitk.sitkInt16) + 40  # soft tissue everywhere
    image.SetSpacing((1.0, 1.0, 2.0))
    corner = image.TransformIndexToPhysicalPoint((0, 0, 0))
    patch = candidate_patches(image, [corner]).astype(np.float32)[0]
    assert patch[0, 0, 0] == 0.0  # air (-1000 HU and below maps to 0)
    assert abs(patch[-1, -1, -1] - _unit(40.0)) < 1e-3
    assert candidate_patches(image, []).shape == (0,) + (PATCH_MM,) * 3


def _ball_and_tube_patches(count, rng):
    """Noisy 1 mm patches of solid balls (3-10 mm) and of tubes (2-6 mm wide) through the centre, half each."""
    grid = np.indices((PATCH_MM,) * 3).astype(np.float32) - (PATCH_MM - 1) / 2
    patches, labels = [], []
    for n in range(count):
        is_ball = n % 2 == 0
        if is_ball:
            inside = np.sum(grid ** 2, axis=0) <= (rng.uniform(3.0, 10.0) / 2) ** 2
        else:
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            along = np.tensordot(axis, grid, axes=1)
            inside = np.sum(grid ** 2, axis=0) - along ** 2 <= (rng.uniform(2.0, 6.0) / 2) ** 2
        hu = ndimage.gaussian_filter(np.where(inside, 30.0, LUNG_HU), 0.8) + rng.normal(0, 15.0, inside.shape)
        patches.append(np.clip(_unit(hu), 0, 1).astype(np.float16))
        labels.append(is_ball)
    return np.stack(patches), np.array(labels)


def test_shipped_networks_score_nodules_above_vessels_and_the_ensemble_averages_them():
    patches, is_ball = _ball_and_tube_patches(40, np.random.default_rng(1))
    ensemble = PatchEnsemble.load(DEFAULT_PATCH_CLASSIFIERS)
    members = [member.predict_proba(patches) for member in ensemble.members]
    assert len(members) == 2 and "3-8 mm" in ensemble.members[1].metadata["description"]
    for network, probability in zip(ensemble.members, members):
        assert probability.shape == (40,) and np.all((probability >= 0) & (probability <= 1))
        assert np.median(probability[is_ball]) > 0.5 > np.median(probability[~is_ball]), probability
        assert "phantoms" in network.metadata["description"]
    assert not np.allclose(members[0], members[1], atol=0.01)  # two different networks
    probability = ensemble.predict_proba(patches)
    assert np.allclose(probability, (members[0] + members[1]) / 2, atol=1e-12)
    # "auto": a working GPU (TF32 convolutions: within 1e-3, bench/gpu_check.py), else the CPU
    assert np.allclose(ensemble.predict_proba(patches, device="auto"), probability, atol=0.01)
    assert_raises(InputError, PatchEnsemble, [], match="at least one network")


def test_training_learns_balls_from_tubes_and_the_file_round_trips_and_repeats(tmp_path):
    rng = np.random.default_rng(0)
    patches, labels = _ball_and_tube_patches(160, rng)
    network = train_patch_network(patches[:120], labels[:120], iterations=120, batch_size=16, positive_share=0.5,
                                  description="balls and tubes")
    held_out = network.predict_proba(patches[120:])
    assert roc_auc(held_out, labels[120:]) >= 0.95, held_out
    loaded = PatchClassifier.load(network.save(tmp_path / "cnn.pt"))
    assert np.allclose(loaded.predict_proba(patches[120:]), held_out, atol=1e-6)
    assert loaded.metadata["description"] == "balls and tubes" and loaded.metadata["training"]["n_positive"] == 60
    # the same training writes the same bytes: the shipped files can be checked against a rerun of the script
    again = train_patch_network(patches[:120], labels[:120], iterations=120, batch_size=16, positive_share=0.5,
                                description="balls and tubes")
    (tmp_path / "again").mkdir()
    assert again.save(tmp_path / "again" / "cnn.pt").read_bytes() == (tmp_path / "cnn.pt").read_bytes()


def test_bad_network_files_and_input_are_refused(tmp_path):
    """Both network kinds load through ``load_weights_file``: the candidate CNNs and the nodule centre map."""
    import torch

    for load, shipped_path, kind in ((PatchClassifier.load, DEFAULT_PATCH_CLASSIFIERS[0], "nodule candidate network"),
                                     (NoduleMap.load, DEFAULT_CENTRE_MAP, "nodule map network")):
        assert_raises(ModelError, load, tmp_path / "absent.pt", match="missing")
        damaged = tmp_path / "damaged.pt"
        damaged.write_bytes(b"not a torch file")
        assert_raises(ModelError, load, damaged, match="damaged")
        foreign = tmp_path / "foreign.pt"
        torch.save({"state_dict": {}}, foreign)
        assert_raises(ModelError, load, foreign, match=f"not a {kind}")
        shipped = torch.load(shipped_path, weights_only=True)
        shipped["state_dict"] = {name: value[..., :1] if value.dim() else value
                                 for name, value in shipped["state_dict"].items()}
        torn = tmp_path / "torn.pt"
        torch.save(shipped, torn)
        assert_raises(ModelError, load, torn, match="do not fit")

    network = PatchClassifier.load(DEFAULT_PATCH_CLASSIFIERS[0])
    assert_raises(InputError, network.predict_proba, np.zeros((2, 10, 10, 10)), match="candidate patches must be")
    assert_raises(InputError, network.predict_proba, np.zeros((2,) + (PATCH_MM,) * 3), device="cuda:63",
                  match="'cuda:63' was requested")
    patches, labels = _ball_and_tube_patches(4, np.random.default_rng(2))
    assert_raises(InputError, train_patch_network, patches, np.zeros(4), match="both classes")
