"""The nodule centre map: its grid is LPS-aligned over the lungs whatever the input's orientation; the targets peak
at each centre; the shipped network puts a peak on every phantom nodule with about its diameter, in both
orientations, and finds a small nodule on the pleura that the blob filter gives no candidate; training runs within
its time limit and the file round-trips (bad files: test_nodule_patch_classifier)."""

import numpy as np
from pytest import approx

from NoduleDetectLib import detection
from NoduleDetectLib.detection import DEFAULT_CENTRE_MAP
from NoduleDetectLib.nodules import measure_nodule
from NoduleDetectLib.nodule_map import (MAP_SPACING_MM, NoduleMap, centre_targets, map_geometry, scaled_ct,
                                        train_nodule_map)
from RecognitionCore.anatomy import segment_lungs
from RecognitionCore.errors import InputError
from RecognitionCore.phantoms import make_chest_ct
from RecognitionCore.testing import assert_raises

from .phantom_cases import FLIP_X, chest_phantom, phantom_lung_mask


def test_the_grid_is_lps_aligned_over_the_lungs_in_both_orientations():
    geometries = []
    for direction in (None, FLIP_X):
        phantom = chest_phantom(direction)
        geometry = map_geometry(phantom.image, phantom_lung_mask(phantom))
        assert geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert geometry.spacing_mm == MAP_SPACING_MM
        assert [size % multiple for size, multiple in zip(geometry.size, (8, 8, 4))] == [0, 0, 0]
        low = np.array(geometry.origin_lps_mm)
        high = low + (np.array(geometry.size) - 1) * MAP_SPACING_MM
        for nodule in phantom.nodules:
            assert np.all((low < nodule.center_lps_mm) & (nodule.center_lps_mm < high)), nodule
        geometries.append(geometry)
    assert np.allclose(geometries[0].origin_lps_mm, geometries[1].origin_lps_mm, atol=1.0)
    assert geometries[0].size == geometries[1].size


def test_targets_peak_at_each_centre_and_carry_its_diameter():
    phantom = chest_phantom()
    geometry = map_geometry(phantom.image, phantom_lung_mask(phantom))
    heat, log_diameter = centre_targets(geometry, [(n.center_lps_mm, n.diameter_mm) for n in phantom.nodules])
    assert np.count_nonzero(heat == 1.0) == len(phantom.nodules)
    for nodule in phantom.nodules:
        index = np.rint((np.array(nodule.center_lps_mm) - geometry.origin_lps_mm) / MAP_SPACING_MM)[::-1].astype(int)
        assert heat[tuple(index)] == 1.0
        assert np.exp(log_diameter[tuple(index)]) == approx(nodule.diameter_mm, rel=1e-5)
        # two voxels away in x: the Gaussian of a sixth of the diameter (at least 1 mm) at that voxel's centre
        side = index + np.array([0, 0, 2])
        side_mm = np.array(geometry.origin_lps_mm) + side[::-1] * MAP_SPACING_MM
        sigma_mm = max(nodule.diameter_mm / 6, 1.0)
        expected = np.exp(-np.sum((side_mm - nodule.center_lps_mm) ** 2) / 2 / sigma_mm ** 2)
        assert heat[tuple(side)] == approx(expected, abs=1e-5)


def test_the_shipped_map_peaks_on_every_phantom_nodule_in_both_orientations():
    network = NoduleMap.load(DEFAULT_CENTRE_MAP)
    assert "phantoms" in network.metadata["description"]
    found = []
    for direction in (None, FLIP_X):
        phantom = chest_phantom(direction)
        peaks = network.peaks(phantom.image, phantom_lung_mask(phantom), 0.3, 50)
        centres = np.array([peak.center_lps_mm for peak in peaks])
        on_nodules = np.zeros(len(peaks), bool)
        for nodule in phantom.nodules:
            distance = np.linalg.norm(centres - nodule.center_lps_mm, axis=1)
            best = int(np.argmin(distance))
            assert distance[best] < nodule.diameter_mm / 2, (nodule, peaks[best])
            assert peaks[best].diameter_mm == approx(nodule.diameter_mm, rel=0.3), (nodule, peaks[best])
            on_nodules |= distance < nodule.diameter_mm / 2
        assert np.count_nonzero(~on_nodules) <= 2, [p for p, on in zip(peaks, on_nodules) if not on]
        found.append(sorted((round(p.score, 2), tuple(np.round(p.center_lps_mm))) for p in peaks if p.score > 0.5))
    assert len(found[0]) == len(found[1]) >= len(chest_phantom().nodules) - 1


def test_the_map_finds_a_small_juxta_pleural_nodule_the_blob_filter_misses():
    """Evaluation phantom 7045 (dev/evaluate_nodule_detection.py): its 4.5 mm part-solid nodule on the pleura has no
    blob candidate within its radius; the map's candidate lies on it, confident, with a mask of about its size."""
    phantom = make_chest_ct((320, 320, 120), (1.1, 1.1, 2.5), seed=7045, nodules=6)
    nodule = phantom.nodules[3]
    assert (nodule.diameter_mm, nodule.type, nodule.location) == (4.5, "part-solid", "juxta-pleural")
    lungs = detection.lung_mask(segment_lungs(phantom.image))

    def near(candidates):
        return [c for c in candidates
                if np.linalg.norm(np.subtract(c.center_lps_mm, nodule.center_lps_mm)) < nodule.diameter_mm / 2]

    assert not near(detection.blob_candidates(phantom.image, lungs))
    found = near(detection.map_candidates(phantom.image, lungs, detection.CandidateClassifier.load()))
    assert len(found) == 1 and found[0].confidence >= 0.5, found
    assert 3.0 <= measure_nodule(phantom.image, found[0].mask).longest_axial_diameter_mm <= 1.25 * 4.5 + 1.1


def test_training_keeps_to_its_time_limit_and_the_file_round_trips(tmp_path):
    phantom = chest_phantom()
    geometry = map_geometry(phantom.image, phantom_lung_mask(phantom))
    heat, log_diameter = centre_targets(geometry, [(n.center_lps_mm, n.diameter_mm) for n in phantom.nodules])
    centres = np.argwhere(heat == 1.0)
    case = (scaled_ct(phantom.image, geometry), heat, log_diameter, centres)
    network = train_nodule_map([case], iterations=1000, batch_size=1, device="cpu", max_seconds=1.0,
                               description="one phantom")
    assert network.metadata["training"]["iterations"] < 100  # cut after the timed steps (30)
    loaded = NoduleMap.load(network.save(tmp_path / "map.pt"))
    assert loaded.metadata["description"] == "one phantom"
    scaled = case[0][None, None, :32, :64, :64]
    import torch
    with torch.inference_mode():
        assert torch.allclose(loaded.network(torch.from_numpy(scaled.copy())),
                              network.network(torch.from_numpy(scaled.copy())))
    assert_raises(InputError, train_nodule_map, [(case[0], heat * 0, log_diameter, centres[:0])], 10,
                  match="with nodules")
