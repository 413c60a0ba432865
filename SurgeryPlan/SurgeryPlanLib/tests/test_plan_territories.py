"""Vascular territories against a closed-form Y-shaped vessel in a box organ (isotropic, and anisotropic with the x
axis flipped) and against the abdominal phantom's portal vein in its liver."""

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RecognitionCore.errors import Cancelled, InputError
from RecognitionCore.phantoms import ABDOMEN_LABELS, make_abdomen_ct
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises
from SurgeryPlanLib.territories import feeding_territories, vascular_territories, vessel_tree

# The Y: a trunk entering the organ's y = 0 face, forking 6 mm inside into two branches mirrored in x = 0.
ENTRY, FORK, TIPS = (0.0, -8.0, 0.0), (0.0, 6.0, 0.0), ((20.0, 30.0, 6.0), (-20.0, 30.0, 6.0))
TRUNK_RADIUS, BRANCH_RADIUS = 3.0, 2.2
ORGAN_LOW, ORGAN_HIGH = (-29.9, 0.0, -16.0), (29.9, 40.0, 16.0)  # bounds off the voxel centres: a symmetric organ
GRIDS = [((1.0, 1.0, 1.0), False), ((0.8, 0.8, 2.0), True)]  # (spacing, x axis flipped)


def _grid(spacing_xyz, flip_x):
    """An empty uint8 image whose voxel centres are symmetric about x = 0 (never on it), and the LPS coordinates of
    every voxel centre, shaped (z, y, x, 3)."""
    size = [int(round(extent / s)) // 2 * 2 for extent, s in zip((72.0, 58.0, 44.0), spacing_xyz)]
    direction = np.diag([-1.0 if flip_x else 1.0, 1.0, 1.0])
    origin = np.array([0.0, 17.0, 0.0]) - direction @ ((np.array(size) - 1) / 2.0 * np.array(spacing_xyz))
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    k, j, i = np.indices(size[::-1])
    points = origin + (np.stack([i, j, k], axis=-1) * np.array(spacing_xyz)) @ direction.T
    return image, points


def _mask(reference, values):
    image = sitk.GetImageFromArray(values.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def _capsule(points, start, end, radius):
    start, end = np.asarray(start), np.asarray(end)
    along = np.clip(((points - start) @ (end - start)) / ((end - start) @ (end - start)), 0.0, 1.0)
    return np.linalg.norm(points - (start + along[..., None] * (end - start)), axis=-1) <= radius


def _y_phantom(spacing_xyz, flip_x):
    """(reference image, voxel LPS points, organ values, vessel values); the vessel is carved out of the organ, as
    label maps store it."""
    reference, points = _grid(spacing_xyz, flip_x)
    vessel = _capsule(points, ENTRY, FORK, TRUNK_RADIUS)
    for tip in TIPS:
        vessel |= _capsule(points, FORK, tip, BRANCH_RADIUS)
    box = np.all((points >= ORGAN_LOW) & (points <= ORGAN_HIGH), axis=-1)
    return reference, points, box & ~vessel, vessel


def _count(image):
    return int((sitk.GetArrayViewFromImage(image) != 0).sum())


def test_y_vessel_splits_the_organ_at_its_symmetry_plane():
    branch_length = float(np.linalg.norm(np.subtract(TIPS[0], FORK)))
    trunk_length = float(np.linalg.norm(np.subtract(FORK, ENTRY)))
    for spacing, flip_x in GRIDS:
        reference, points, organ_values, vessel_values = _y_phantom(spacing, flip_x)
        organ, vessel = _mask(reference, organ_values), _mask(reference, vessel_values)
        result = vascular_territories(organ, vessel, generation=1)
        diagonal = math.sqrt(sum(s * s for s in spacing))
        case = f"spacing {spacing}, x flipped {flip_x}"

        trunk, *branches = result.tree.branches
        assert (trunk.generation, len(branches), trunk.child_ids) == (0, 2, (2, 3)), case
        assert abs(trunk.length_mm - trunk_length) <= diagonal, (case, trunk.length_mm)
        for branch in branches:
            assert (branch.generation, branch.parent_id) == (1, 1), case
            assert abs(branch.length_mm - branch_length) <= diagonal, (case, branch.length_mm)
            assert abs(branch.mean_radius_mm - BRANCH_RADIUS) <= max(spacing), (case, branch.mean_radius_mm)
        assert abs(trunk.mean_radius_mm - TRUNK_RADIUS) <= max(spacing), (case, trunk.mean_radius_mm)
        root = np.array(result.tree.root_lps_mm)
        assert abs(root[0]) < diagonal and abs(root[2]) < diagonal, (case, root)  # on the trunk's axis ...
        assert ENTRY[1] - diagonal <= root[1] < ORGAN_LOW[1], (case, root)  # ... at its end, before the entry face

        labels = sitk.GetArrayFromImage(result.labels)
        assert result.labels.GetPixelID() == sitk.sitkUInt8 and np.array_equal(labels > 0, organ_values), case
        assert len(result.territories) == 2, case
        wrong = 0
        for territory in result.territories:
            assert territory.branch_ids == [territory.supplying_branch_id], case
            side = np.sign(result.tree.branch(territory.supplying_branch_id).end_lps_mm[0])
            wrong += int(((labels == territory.id) & (np.sign(points[..., 0]) == -side)).sum())
        assert wrong < 0.01 * organ_values.sum(), (case, wrong)
        volumes = [territory.volume_ml for territory in result.territories]
        voxel_ml = float(np.prod(spacing)) / 1000.0
        assert abs(volumes[0] - volumes[1]) <= 0.02 * np.mean(volumes), (case, volumes)
        assert math.isclose(sum(volumes), organ_values.sum() * voxel_ml, rel_tol=1e-12), (case, volumes)


def test_tree_hangs_from_a_given_root():
    reference, _, organ_values, vessel_values = _y_phantom(*GRIDS[1])
    tree = vessel_tree(_mask(reference, vessel_values), _mask(reference, organ_values), root_lps_mm=TIPS[0])
    assert np.linalg.norm(np.subtract(tree.root_lps_mm, TIPS[0])) < 3.0, tree.root_lps_mm
    first, *others = tree.branches
    assert (first.generation, len(others)) == (0, 2)
    ends = sorted(np.round(branch.end_lps_mm[1]) for branch in others)  # the trunk's entry and the other tip
    assert ends[0] < 0 < ends[1], ends
    # Without an organ the root is the thickest end: the trunk's (on the isotropic grid, where it is the thickest).
    reference, _, _, vessel_values = _y_phantom(*GRIDS[0])
    free = vessel_tree(_mask(reference, vessel_values))
    assert free.root_lps_mm[1] < 0 and free.branches[0].child_ids == (2, 3), free.root_lps_mm


def test_feeding_territories_of_tumours():
    reference, points, organ_values, vessel_values = _y_phantom(*GRIDS[0])
    one_side = np.linalg.norm(points - (14.0, 14.0, -6.0), axis=-1) <= 4.0
    across = np.linalg.norm(points - (1.5, 34.0, -8.0), axis=-1) <= 4.0  # more of it on the +x side
    organ = _mask(reference, organ_values & ~one_side)  # the first tumour carved out of the organ, the second not
    result = vascular_territories(organ, _mask(reference, vessel_values), generation=1)
    labels = sitk.GetArrayFromImage(result.labels)
    plus_x, minus_x = sorted(result.territories,
                             key=lambda territory: -result.tree.branch(territory.supplying_branch_id).end_lps_mm[0])

    ids, resection = feeding_territories(result, _mask(reference, one_side))
    assert ids == [plus_x.id], ids
    expected = (labels == plus_x.id) | one_side
    assert resection.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(resection) > 0, expected)

    ids, resection = feeding_territories(result, _mask(reference, across))
    assert ids == [plus_x.id, minus_x.id], ids  # most tumour voxels first
    assert _count(resection) == int((organ_values & ~one_side).sum())


def test_portal_territories_cover_the_phantom_liver():
    phantom = make_abdomen_ct((128, 128, 80), (2.7, 2.7, 3.0), seed=0, tumours=0)
    label_of = {name: value for value, name in ABDOMEN_LABELS.items()}
    liver = sitk.Cast(phantom.labels == label_of["liver"], sitk.sitkUInt8)
    portal_vein = sitk.Cast(phantom.labels == label_of["portal_vein"], sitk.sitkUInt8)
    result = vascular_territories(liver, portal_vein, generation=2)
    labels = sitk.GetArrayFromImage(result.labels)
    liver_values = sitk.GetArrayViewFromImage(liver) > 0
    assert len(result.territories) >= 3, len(result.territories)
    assert np.array_equal(labels > 0, liver_values)
    voxel_ml = float(np.prod(liver.GetSpacing())) / 1000.0
    assert math.isclose(sum(t.volume_ml for t in result.territories), liver_values.sum() * voxel_ml, rel_tol=1e-12)
    for territory in result.territories:
        parts, _ = ndimage.label(labels == territory.id, np.ones((3, 3, 3)))
        sizes = np.bincount(parts.ravel())[1:]
        assert sizes.max() >= 0.95 * sizes.sum(), (territory.id, sizes)  # one piece, or nearly (measured: 100 %)
    root_index = liver.TransformPhysicalPointToIndex(result.tree.root_lps_mm)
    assert liver.GetPixel(root_index) == 0  # the portal vein enters from outside the liver


def test_progress_reports_and_cancel():
    reference, _, organ_values, vessel_values = _y_phantom(*GRIDS[0])
    organ, vessel = _mask(reference, organ_values), _mask(reference, vessel_values)
    fractions = []
    vascular_territories(organ, vessel, generation=1, progress=Progress(lambda f, message: fractions.append(f)))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 4, fractions
    token = CancelToken()
    token.cancel()
    assert_raises(Cancelled, vascular_territories, organ, vessel, progress=Progress(cancel_token=token))


def test_bad_input_is_reported():
    reference, points, organ_values, vessel_values = _y_phantom(*GRIDS[0])
    organ, vessel = _mask(reference, organ_values), _mask(reference, vessel_values)
    empty = _mask(reference, np.zeros_like(organ_values))
    assert_raises(InputError, vascular_territories, empty, vessel, match="organ mask is empty")
    assert_raises(InputError, vascular_territories, organ, empty, match="vessel mask is empty")
    flat = sitk.GetImageFromArray(np.ones((8, 8), dtype=np.uint8))
    assert_raises(InputError, vessel_tree, flat, match="must be 3D")
    shifted = _mask(reference, vessel_values)
    shifted.SetOrigin(np.add(reference.GetOrigin(), 5.0).tolist())
    assert_raises(InputError, vascular_territories, organ, shifted, match="not on the image grid")
    apart = _mask(reference, _capsule(points, (0.0, -11.0, -8.0), (0.0, -11.0, 8.0), 2.0))
    assert_raises(InputError, vascular_territories, organ, apart, match="does not touch the organ")
    straight = _mask(reference, _capsule(points, ENTRY, (0.0, 30.0, 0.0), 2.5))
    assert_raises(InputError, vascular_territories, organ, straight, match="the vessel does not branch")
    assert len(vascular_territories(organ, straight, generation=0).territories) == 1
    assert_raises(InputError, vascular_territories, organ, vessel, generation=-1, match="generation")
    assert_raises(InputError, vessel_tree, vessel, root_lps_mm=(1.0, 2.0), match="root_lps_mm")
    result = vascular_territories(organ, vessel, generation=1)
    outside = _mask(reference, np.linalg.norm(points - (0.0, 44.0, 0.0), axis=-1) <= 2.5)
    assert_raises(InputError, feeding_territories, result, outside, match="outside the organ")
    assert_raises(InputError, feeding_territories, result, empty, match="tumour mask is empty")
