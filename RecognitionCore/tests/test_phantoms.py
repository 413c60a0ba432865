"""Synthetic CT phantoms: determinism, HU per tissue, geometry, lesion truth, anatomy across spacings, bad input."""

import functools
import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RecognitionCore.errors import Cancelled, InputError
from RecognitionCore.phantoms import (ABDOMEN_LABELS, CHEST_LABELS, NODULE_LOCATIONS, NODULE_TYPES, NoduleSpec,
                                      TumourSpec, make_abdomen_ct, make_chest_ct, read_luna16_csv, write_luna16_csv)
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises

SMALL = {"size_ijk": (96, 96, 48), "spacing_mm": (4.0, 4.0, 8.0)}  # 384 mm field of view: adult anatomy
LABEL = {name: value for value, name in CHEST_LABELS.items()}
ABDOMEN = {name: value for value, name in ABDOMEN_LABELS.items()}


@functools.lru_cache(maxsize=None)
def _small_chest(seed=0, nodules=3):
    return make_chest_ct(seed=seed, nodules=nodules, **SMALL)


def _arrays(phantom):
    return (sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(phantom.labels),
            sitk.GetArrayFromImage(phantom.lesion_labels))


def _volume_ml(mask, image):
    return float(mask.sum()) * float(np.prod(image.GetSpacing())) / 1000.0


def test_same_seed_gives_identical_volumes_and_another_seed_differs():
    tiny = {"size_ijk": (48, 48, 24), "spacing_mm": (8.0, 8.0, 16.0), "nodules": 3}
    first, again, other = make_chest_ct(seed=0, **tiny), make_chest_ct(seed=0, **tiny), make_chest_ct(seed=1, **tiny)
    for a, b in zip(_arrays(first), _arrays(again)):
        assert np.array_equal(a, b)
    assert [n.center_lps_mm for n in first.nodules] == [n.center_lps_mm for n in again.nodules]
    image, labels, _ = _arrays(other)
    assert not np.array_equal(image, _arrays(first)[0])
    assert not np.array_equal(labels, _arrays(first)[1])


def test_chest_hu_per_tissue():
    image, labels, lesions = _arrays(_small_chest())
    assert image.dtype == np.int16 and labels.dtype == np.uint8 and lesions.dtype == np.uint16
    lungs = np.isin(labels, [LABEL["lung_right"], LABEL["lung_left"]])
    busy = ndimage.binary_dilation(np.isin(labels, [LABEL["vessel"], LABEL["airway"], LABEL["nodule"]]), iterations=1)
    parenchyma = ndimage.binary_erosion(lungs, iterations=1) & ~busy
    assert parenchyma.sum() > 1000
    assert abs(image[parenchyma].mean() + 850) < 80, image[parenchyma].mean()
    assert np.median(image[labels == LABEL["bone"]]) > 300
    assert -150 < np.median(image[labels == LABEL["body"]]) < 100
    assert abs(np.median(image[labels == LABEL["heart"]]) - 40) < 30
    assert image[:, :4, :].mean() < -900  # air in front of the patient
    table = image[labels == LABEL["table"]]
    assert table.max() > 200 and table.min() < 0  # carbon shell round a foam core


def test_geometry_is_kept_and_nodule_centres_map_into_their_labels():
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    phantom = make_chest_ct((80, 72, 40), (4.5, 5.0, 9.0), seed=2, nodules=3, origin_mm=(10.0, -20.0, -300.0),
                            direction=direction, noise_sigma_hu=0)
    for image in (phantom.image, phantom.labels, phantom.lesion_labels):
        assert image.GetSize() == (80, 72, 40)
        assert np.allclose(image.GetSpacing(), (4.5, 5.0, 9.0))
        assert np.allclose(image.GetOrigin(), (10.0, -20.0, -300.0))
        assert np.allclose(image.GetDirection(), direction)
    lesions = sitk.GetArrayFromImage(phantom.lesion_labels)
    for nodule in phantom.nodules:
        i, j, k = phantom.image.TransformPhysicalPointToIndex(nodule.center_lps_mm)
        assert lesions[k, j, i] == nodule.id
    assert sitk.GetArrayFromImage(phantom.image).std() > 100  # no noise, still a structured image


def test_solid_nodule_volume_matches_the_sphere_at_fine_spacing():
    specs = [NoduleSpec(10.0, "solid", "isolated"), NoduleSpec(6.0, "solid", "isolated")]
    phantom = make_chest_ct((160, 160, 128), (0.8, 0.8, 0.8), seed=3, nodules=specs)
    for nodule in phantom.nodules:
        assert abs(nodule.volume_ml - math.pi * nodule.diameter_mm ** 3 / 6000.0) < 1e-12
        assert abs(nodule.mask_volume_ml / nodule.volume_ml - 1.0) < 0.06, nodule
    lesions = sitk.GetArrayFromImage(phantom.lesion_labels)
    assert abs(_volume_ml(lesions == 1, phantom.image) - phantom.nodules[0].mask_volume_ml) < 1e-9


def test_solid_part_diameter_is_what_is_painted():
    specs = [NoduleSpec(10.0, "part-solid", "isolated"), NoduleSpec(6.0, "solid", "isolated")]
    phantom = make_chest_ct((160, 160, 128), (0.8, 0.8, 0.8), seed=3, nodules=specs)
    part_solid, solid = phantom.nodules
    assert solid.solid_diameter_mm == solid.diameter_mm
    assert 0.35 * part_solid.diameter_mm <= part_solid.solid_diameter_mm <= 0.6 * part_solid.diameter_mm
    image, _, lesions = _arrays(phantom)
    core = (lesions == part_solid.id) & (image > -250)  # halfway between the ground glass and the core
    core_ml = _volume_ml(core, phantom.image)
    assert abs(core_ml / (math.pi * part_solid.solid_diameter_mm ** 3 / 6000.0) - 1.0) < 0.25, core_ml


def test_nodules_touch_what_their_location_says():
    specs = [NoduleSpec(12.0, "solid", "juxta-pleural"), NoduleSpec(8.0, "solid", "juxta-vascular"),
             NoduleSpec(9.0, "solid", "isolated")]
    phantom = make_chest_ct((128, 128, 64), (2.5, 2.5, 4.0), seed=4, nodules=specs)
    _, labels, lesions = _arrays(phantom)
    lung_like = [LABEL["lung_right"], LABEL["lung_left"], LABEL["vessel"], LABEL["airway"], LABEL["nodule"]]
    for nodule in phantom.nodules:
        mask = lesions == nodule.id
        rim = ndimage.binary_dilation(mask) & ~mask  # face neighbours
        neighbours = set(np.unique(labels[rim]).tolist())
        if nodule.location == "juxta-pleural":
            assert neighbours - set(lung_like), neighbours
        elif nodule.location == "juxta-vascular":
            assert LABEL["vessel"] in neighbours and not neighbours - set(lung_like), neighbours
        else:
            assert not neighbours - set(lung_like), neighbours
        assert mask.sum() > 0


def test_every_type_and_location_appears_and_nodules_stay_apart():
    phantom = make_chest_ct((64, 64, 32), (6.0, 6.0, 12.0), seed=5, nodules=6)
    assert {n.type for n in phantom.nodules} == set(NODULE_TYPES)
    assert {n.location for n in phantom.nodules} == set(NODULE_LOCATIONS)
    for nodule in phantom.nodules:
        assert 3.0 <= nodule.diameter_mm <= 30.0
    centres = np.array([n.center_lps_mm for n in phantom.nodules])
    radii = np.array([n.diameter_mm / 2 for n in phantom.nodules])
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(centres)) * 1e9
    assert np.all(distance > radii[:, None] + radii[None])
    assert make_chest_ct((64, 64, 32), (6.0, 6.0, 12.0), seed=5, nodules=0).nodules == []


def test_anatomy_is_the_same_in_mm_at_another_spacing():
    coarse = _small_chest()
    fine = make_chest_ct((128, 128, 96), (3.0, 3.0, 4.0), seed=0, nodules=3)
    volumes = []
    for phantom in (coarse, fine):
        labels = sitk.GetArrayFromImage(phantom.labels)
        volumes.append([_volume_ml(labels == LABEL[name], phantom.image) for name in ("lung_right", "lung_left")])
    assert np.allclose(volumes[0], volumes[1], rtol=0.03), volumes
    assert 1000 < sum(volumes[1]) < 8000
    assert [n.center_lps_mm for n in coarse.nodules] == [n.center_lps_mm for n in fine.nodules]


def test_abdomen_labels_are_all_present_with_adult_volumes():
    phantom = make_abdomen_ct((100, 100, 50), (4.0, 4.0, 6.0), seed=0, tumours=[TumourSpec(30.0), TumourSpec(12.0)],
                              patient_scale=1.0)
    image, labels, lesions = _arrays(phantom)
    volume = {name: _volume_ml(labels == value, phantom.image) for name, value in ABDOMEN.items()}
    assert all(volume[name] > 0 for name in ABDOMEN_LABELS.values()), volume
    liver_total = volume["liver"] + volume["portal_vein"] + volume["hepatic_vein"] + volume["tumour"]
    assert 1000 < liver_total < 2500, volume
    assert 80 < volume["spleen"] < 400 and 80 < volume["kidney_right"] < 300 and 80 < volume["kidney_left"] < 300
    assert np.median(image[labels == ABDOMEN["portal_vein"]]) > np.median(image[labels == ABDOMEN["liver"]])
    for tumour in phantom.tumours:
        assert np.median(image[lesions == tumour.id]) < np.median(image[labels == ABDOMEN["liver"]]) - 30
        assert abs(tumour.mask_volume_ml / tumour.volume_ml - 1.0) < 0.3
    assert len(phantom.luna16_rows("abdomen")) == 2


def test_luna16_rows_round_trip_and_save(tmp_path):
    phantom = _small_chest()
    rows = phantom.luna16_rows("1.2.3")
    assert [row["diameter_mm"] for row in rows] == [n.diameter_mm for n in phantom.nodules]
    assert read_luna16_csv(write_luna16_csv(rows, tmp_path / "a.csv")) == rows
    paths = phantom.save(tmp_path / "out", seriesuid="1.2.3")
    assert read_luna16_csv(paths["annotations"]) == rows
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(paths["image"]))), _arrays(phantom)[0])
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(paths["labels"]))), _arrays(phantom)[1])
    assert "1,body" in paths["label_names"].read_text().splitlines()
    assert len(paths["lesions"].read_text().splitlines()) == 1 + len(phantom.nodules)


def test_padding_outside_the_scan_circle():
    phantom = make_chest_ct((64, 64, 24), (6.0, 6.0, 14.0), seed=0, nodules=0, padding_hu=-2048)
    image, labels, _ = _arrays(phantom)
    assert np.all(image[:, 0, 0] == -2048) and np.all(labels[:, 0, 0] == 0)
    assert image[:, 32, 32].min() > -1100


def test_progress_reaches_the_end_and_cancel_stops():
    fractions = []
    make_chest_ct((48, 48, 24), (8.0, 8.0, 14.0), nodules=1, progress=Progress(lambda f, m: fractions.append(f)))
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    token = CancelToken()
    token.cancel()
    assert_raises(Cancelled, make_abdomen_ct, (48, 48, 24), (8.0, 8.0, 12.0), progress=Progress(None, token))


def test_bad_arguments_raise_input_error():
    cases = [
        (dict(size_ijk=(15, 64, 64)), "at least 16"),
        (dict(size_ijk=(513, 512, 100)), "above the limit"),
        (dict(size_ijk=(64, 64, 601)), "above the limit"),
        (dict(size_ijk=(64, 64)), "three integers"),
        (dict(spacing_mm=(1.0, 0.0, 1.0)), "positive"),
        (dict(spacing_mm=(1.0, -1.0, 1.0)), "positive"),
        (dict(nodules=[NoduleSpec(2.0)]), "3-30 mm"),
        (dict(nodules=[NoduleSpec(31.0)]), "3-30 mm"),
        (dict(nodules=[NoduleSpec(8.0, type="calcified")]), "type"),
        (dict(nodules=[NoduleSpec(8.0, location="hilar")]), "location"),
        (dict(nodules=[NoduleSpec(8.0, center_lps_mm=(0.0, 0.0, 0.0))]), "not inside a lung"),
        (dict(seed=-1), "seed"),
        (dict(size_ijk=(16, 16, 16), spacing_mm=(1.0, 1.0, 1.0)), "too small"),
        (dict(direction=(1, 0, 0, 0, 2, 0, 0, 0, 1)), "orthonormal"),
        (dict(noise_sigma_hu=-1.0), "noise_sigma_hu"),
    ]
    for kwargs, message in cases:
        arguments = {**SMALL, "nodules": 0, **kwargs}
        assert_raises(InputError, make_chest_ct, match=message, **arguments)
    assert_raises(InputError, make_abdomen_ct, (64, 64, 32), (6.0, 6.0, 9.0), tumours=[TumourSpec(45.0)],
                  match="5-40 mm")
    assert_raises(InputError, make_abdomen_ct, (64, 64, 32), (6.0, 6.0, 9.0), tumours=[TumourSpec(4.0)],
                  match="5-40 mm")
    assert_raises(InputError, read_luna16_csv, __file__, match="missing columns")
