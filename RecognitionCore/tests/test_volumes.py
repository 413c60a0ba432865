"""Geometry: every conversion, both directions, checked in physical space on oblique and left-handed grids."""

import numpy as np
import SimpleITK as sitk
import slicer
import torch
import vtk

from RecognitionCore import io, volumes
from RecognitionCore.errors import InputError
from RecognitionCore.testing import assert_raises


def _rotation(axis, degrees):
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    rotation = np.eye(3)
    rotation[i, i] = rotation[j, j] = c
    rotation[i, j], rotation[j, i] = -s, s
    return rotation


OBLIQUE = _rotation(2, 20) @ _rotation(0, -12)            # det +1
LEFT_HANDED = _rotation(1, 15) @ np.diag([1.0, 1.0, -1.0])  # det -1


def make_image(direction, size=(24, 20, 14), spacing_mm=(0.7, 0.8, 2.5), origin_lps_mm=(-100.0, 50.0, 30.0),
               dtype=np.int16):
    """An image whose voxel values encode their index, so any axis flip or swap shows."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    array = (i * 1 + j * 37 + k * 1013 - 1000).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_mm)
    image.SetOrigin(origin_lps_mm)
    image.SetDirection(np.asarray(direction, float).flatten().tolist())
    return image


def sample_through_node(volume_node, image, count=300, seed=0):
    """Values of ``image`` at random voxels and the node's values at the same physical (RAS) positions."""
    rng = np.random.default_rng(seed)
    node_array = slicer.util.arrayFromVolume(volume_node)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    ras_to_ijk = slicer.util.arrayFromVTKMatrix(ras_to_ijk)
    image_array = sitk.GetArrayViewFromImage(image)
    expected, found = [], []
    for _ in range(count):
        index = [int(rng.integers(0, n)) for n in image.GetSize()]
        point_ras = volumes.lps_to_ras(image.TransformIndexToPhysicalPoint(index))
        ijk = np.rint(ras_to_ijk @ np.append(point_ras, 1.0))[:3].astype(int)
        expected.append(image_array[index[2], index[1], index[0]])
        found.append(node_array[ijk[2], ijk[1], ijk[0]])
    return np.array(expected), np.array(found)


def assert_same_image(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def assert_same_physical_image(expected: sitk.Image, found: sitk.Image):
    """The same values at the same places, whatever the index order (Slicer's writers flip K of left-handed grids)."""
    resampled = sitk.Resample(found, expected, sitk.Transform(), sitk.sitkNearestNeighbor, -32768)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(resampled), sitk.GetArrayViewFromImage(expected))
    np.testing.assert_allclose(sorted(found.GetSpacing()), sorted(expected.GetSpacing()), atol=1e-6)


def test_sitk_node_sitk_round_trip_is_exact(app):
    for direction in (np.eye(3), OBLIQUE, LEFT_HANDED):
        image = make_image(direction)
        node = volumes.sitk_to_volume_node(image, "vol", scene=app.scene)
        assert node.GetScene() is app.scene
        back = volumes.volume_node_to_sitk(node)
        assert_same_image(image, back)
        assert back.GetPixelID() == image.GetPixelID()


def test_node_values_sit_at_the_same_physical_place(app):
    for direction in (OBLIQUE, LEFT_HANDED):
        image = make_image(direction)
        node = volumes.sitk_to_volume_node(image, "vol", scene=app.scene)
        expected, found = sample_through_node(node, image)
        np.testing.assert_array_equal(expected, found)
        # RAS of the node's voxel (0,0,0) is the LPS origin with x and y negated
        np.testing.assert_allclose(volumes.ijk_to_ras_matrix(node)[:3, 3], volumes.lps_to_ras(image.GetOrigin()))


def test_slicer_reader_and_our_reader_agree_physically(app, tmp_path):
    """Slicer's own reader flips K of left-handed files; both must still put every value at the same place."""
    for label, direction in (("oblique", OBLIQUE), ("lefthanded", LEFT_HANDED)):
        image = make_image(direction)
        for suffix in (".nrrd", ".nii.gz", ".mha"):
            path = tmp_path / f"{label}{suffix}"
            sitk.WriteImage(image, str(path))
            slicer_node = app.Volumes.AddArchetypeVolume(str(path), f"{label}_slicer", 0, vtk.vtkStringArray())
            assert slicer_node is not None, path
            expected, found = sample_through_node(slicer_node, image)
            np.testing.assert_array_equal(expected, found)
            ours = io.load_volume(path, app.scene)
            expected, found = sample_through_node(ours, image)
            np.testing.assert_array_equal(expected, found)
            # Slicer's node converted back: the same physical image, resampled onto the file's grid without change
            assert_same_physical_image(image, volumes.volume_node_to_sitk(slicer_node))


def test_metatensor_round_trip_and_monai_loader_affine(tmp_path):
    from monai.transforms import LoadImage

    for direction in (OBLIQUE, LEFT_HANDED):
        image = make_image(direction, dtype=np.float32)
        tensor = volumes.sitk_to_metatensor(image)
        assert tuple(tensor.shape) == (1, *image.GetSize())
        assert tensor[0, 3, 2, 1].item() == sitk.GetArrayViewFromImage(image)[1, 2, 3]
        assert_same_image(image, volumes.metatensor_to_sitk(tensor))
        path = tmp_path / "image.nii.gz"
        sitk.WriteImage(image, str(path))
        loaded = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(str(path))
        np.testing.assert_allclose(np.asarray(loaded.affine), np.asarray(tensor.affine), atol=1e-4)
        np.testing.assert_array_equal(np.asarray(loaded), tensor.numpy())


def test_node_to_metatensor_matches_ijk_to_ras(app):
    image = make_image(OBLIQUE)
    node = volumes.sitk_to_volume_node(image, "vol", scene=app.scene)
    tensor = volumes.volume_node_to_metatensor(node)
    np.testing.assert_allclose(np.asarray(tensor.affine), volumes.ijk_to_ras_matrix(node), atol=1e-9)
    assert tensor.dtype == torch.float32


def test_array_to_sitk_keeps_reference_grid_and_checks_shape():
    reference = make_image(LEFT_HANDED)
    mask = (sitk.GetArrayFromImage(reference) > 0).astype(np.uint8)
    image = volumes.array_to_sitk(mask, reference)
    assert image.GetDirection() == reference.GetDirection() and image.GetOrigin() == reference.GetOrigin()
    assert_raises(InputError, volumes.array_to_sitk, mask[:-1], reference, match="does not match")


def test_points_lps_ras():
    points = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])
    np.testing.assert_array_equal(volumes.lps_to_ras(points), [[-1, -2, 3], [4, -5, -6]])
    np.testing.assert_array_equal(volumes.ras_to_lps(volumes.lps_to_ras(points)), points)


def test_conversion_leaves_the_input_node_untouched(app):
    node = volumes.sitk_to_volume_node(make_image(OBLIQUE), "vol", scene=app.scene)
    before_array = slicer.util.arrayFromVolume(node).copy()
    before_matrix = volumes.ijk_to_ras_matrix(node)
    before_mtime = node.GetMTime()
    image = volumes.volume_node_to_sitk(node)
    sitk.GetArrayViewFromImage(image)  # touch the copy
    volumes.volume_node_to_metatensor(node).mul_(0)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before_array)
    np.testing.assert_array_equal(volumes.ijk_to_ras_matrix(node), before_matrix)
    assert node.GetMTime() == before_mtime


def test_bad_nodes_and_images_are_named(app):
    empty = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    assert_raises(InputError, volumes.volume_node_to_sitk, empty, match="'Empty' holds no image")
    assert_raises(InputError, volumes.sitk_to_volume_node, sitk.Image(8, 8, sitk.sitkInt16), match="3D")
