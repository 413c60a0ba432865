"""Reading files and DICOM series into nodes, saving nodes and .mrb scenes, and the errors for bad files."""

import numpy as np
import SimpleITK as sitk
import slicer

from RecognitionCore import io, volumes
from RecognitionCore.errors import InputError
from RecognitionCore.testing import assert_raises
from RecognitionCore.tests.test_volumes import LEFT_HANDED, assert_same_image, assert_same_physical_image, make_image


def test_each_file_format_loads_exactly(app, tmp_path):
    image = make_image(LEFT_HANDED)
    for suffix in (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd"):
        path = tmp_path / f"ct{suffix}"
        sitk.WriteImage(image, str(path))
        node = io.load_volume(path, app.scene)
        assert node.GetName() == "ct"
        assert_same_image(image, volumes.volume_node_to_sitk(node))


def test_lidc_dicom_series_loads_in_hounsfield_units_under_its_study(app, shared_data):
    node = io.load_volume(shared_data / "lidc" / "LIDC-IDRI-0001", app.scene)
    image = volumes.volume_node_to_sitk(node)
    assert image.GetSize() == (512, 512, 133)
    np.testing.assert_allclose(image.GetSpacing(), (0.703125, 0.703125, 2.5), atol=1e-4)
    assert image.GetPixelID() == sitk.sitkInt16  # HU fit 16 bits: half the memory of GDCM's 32-bit output
    array = sitk.GetArrayViewFromImage(image)
    assert array.min() == -2048  # the scanner's padding, after the rescale intercept of -1024
    body = array[array > -500]
    assert -200 < np.median(body) < 200  # soft tissue in HU, so the rescale was applied
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    study = shn.GetItemParent(shn.GetItemByDataNode(node))
    assert shn.GetItemLevel(study) == "Study"
    assert shn.GetItemUID(study, "DICOM") == "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
    assert shn.GetItemName(shn.GetItemParent(study)) == "LIDC-IDRI-0001"
    # the series UID is the LUNA16 seriesuid of the annotations
    assert shn.GetItemUID(shn.GetItemByDataNode(node), "DICOM") in (shared_data / "lidc" / "annotations.csv").read_text()


def test_second_series_of_the_same_study_joins_it(app, shared_data):
    first = io.load_volume(shared_data / "lidc" / "LIDC-IDRI-0001", app.scene, name="first")
    second = io.load_volume(shared_data / "lidc" / "LIDC-IDRI-0001", app.scene, name="second")
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    assert shn.GetItemParent(shn.GetItemByDataNode(first)) == shn.GetItemParent(shn.GetItemByDataNode(second))


def test_nrrd_and_nifti_real_cases(app, shared_data):
    lidc3 = io.load_volume(shared_data / "lidc" / "LIDC-IDRI-0003.nrrd", app.scene)
    assert lidc3.GetImageData().GetDimensions() == (512, 512, 140)
    total = io.load_volume(shared_data / "totalsegmentator" / "example_ct.nii.gz", app.scene)
    assert total.GetName() == "example_ct"
    np.testing.assert_allclose(total.GetSpacing(), (3.0, 3.0, 3.0), atol=1e-3)


def test_single_dicom_slice_reads_as_one_slice(shared_data):
    image = io.read_image(shared_data / "single_slice" / "lidc_slice.dcm")
    assert image.GetSize()[2] == 1  # validate_ct rejects it as 2D


def test_bad_paths_give_clear_errors(app, tmp_path):
    nodes_before = app.scene.GetNumberOfNodes()
    assert_raises(InputError, io.load_volume, tmp_path / "missing.nrrd", app.scene, match="not found")
    text_file = tmp_path / "notes.nrrd"
    text_file.write_text("this is not an image")
    assert_raises(InputError, io.load_volume, text_file, app.scene, match="Cannot read notes.nrrd")
    assert_raises(InputError, io.load_volume, tmp_path, app.scene, match="No DICOM series")
    assert app.scene.GetNumberOfNodes() == nodes_before


def test_save_node_and_scene_round_trip(app, tmp_path):
    from RecognitionCore.headless import create_app

    image = make_image(LEFT_HANDED)
    node = volumes.sitk_to_volume_node(image, "ct", scene=app.scene)
    saved = io.save_node(node, tmp_path / "out" / "ct.nrrd")
    assert_same_physical_image(image, sitk.ReadImage(str(saved)))  # Slicer's writer flips K of left-handed grids
    table = app.scene.AddNewNodeByClass("vtkMRMLTableNode", "Results")
    table.AddColumn().SetName("Volume [mL]")
    table.AddEmptyRow()
    table.SetCellText(0, 0, "12.5")
    mrb = io.save_scene(app.scene, tmp_path / "scene.mrb")
    other = create_app()
    io.load_scene(mrb, other.scene)
    loaded = other.scene.GetFirstNodeByName("ct")
    assert_same_physical_image(image, volumes.volume_node_to_sitk(loaded))
    assert other.scene.GetFirstNodeByName("Results").GetCellText(0, 0) == "12.5"
    assert_raises(InputError, io.save_scene, app.scene, tmp_path / "scene.zip", match=".mrb")
    assert_raises(InputError, io.load_scene, tmp_path / "none.mrb", other.scene, match="not found")
