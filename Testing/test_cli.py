"""The command line's main job on a phantom and on real CTs, batch behaviour, and its errors for bad input."""

import json

import numpy as np
import SimpleITK as sitk
import slicer

from RecognitionCore import cli, io
from RecognitionCore.errors import InputError
from RecognitionCore.headless import create_app
from RecognitionCore.phantoms import make_chest_ct
from RecognitionCore.testing import assert_raises

SMALL_PHANTOM = ["--phantom-size", "96", "96", "48", "--phantom-spacing", "3.5", "3.5", "6.0"]


def reload_scene(path):
    app = create_app()
    io.load_scene(path, app.scene)
    return app.scene


def test_prepare_on_the_default_phantom_writes_a_scene_slicer_opens(tmp_path):
    status = cli.main(["prepare", "--output", str(tmp_path), "--quiet", *SMALL_PHANTOM])
    assert status == 0
    summary = json.loads((tmp_path / "chest_phantom_0.json").read_text())
    assert (tmp_path / "chest_phantom_0.png").stat().st_size > 10_000
    scene = reload_scene(tmp_path / "chest_phantom_0.mrb")
    names = {scene.GetNthNode(index).GetName() for index in range(scene.GetNumberOfNodes())}
    for expected in ("Chest phantom 0", "Chest phantom 0 preprocessed", "Chest phantom 0 body and lungs",
                     "Ground truth (phantom)", "Ground-truth nodules", "Chest phantom 0 volumes"):
        assert expected in names, expected
    segmentation = scene.GetFirstNodeByName("Chest phantom 0 body and lungs").GetSegmentation()
    assert {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())} == \
        {"Body", cli.ENCLOSED_AIR}
    nodules = scene.GetFirstNodeByName("Ground-truth nodules")
    assert nodules.GetNumberOfControlPoints() == 3
    # the preprocessed volume is at 1.5 mm and lies inside the input's physical extent
    prepared = scene.GetFirstNodeByName("Chest phantom 0 preprocessed")
    np.testing.assert_allclose(prepared.GetSpacing(), (1.5, 1.5, 1.5))
    assert summary["prepared_spacing_mm"] == [1.5, 1.5, 1.5]
    # the coarse lung volume agrees with the phantom's own lung labels (vessels are left out of the coarse mask)
    phantom = make_chest_ct(size_ijk=(96, 96, 48), spacing_mm=(3.5, 3.5, 6.0), seed=0)
    truth = sitk.GetArrayViewFromImage(phantom.labels)
    lung_ml = np.isin(truth, [2, 3]).sum() * np.prod(phantom.labels.GetSpacing()) / 1000
    assert 0.75 * lung_ml < summary["lung_volume_ml"] < 1.1 * lung_ml, (summary["lung_volume_ml"], lung_ml)
    # outputs are grouped in one folder beside the input, and reference it
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = shn.GetItemParent(shn.GetItemByDataNode(prepared))
    assert shn.GetItemName(folder) == "MedicalImageRecognition"
    assert prepared.GetNodeReference("referenceVolume").GetName() == "Chest phantom 0"


def test_batch_goes_on_after_a_bad_case_and_reports_it(tmp_path, shared_data):
    good = tmp_path / "small.nrrd"
    phantom = make_chest_ct(size_ijk=(64, 64, 32), spacing_mm=(5.0, 5.0, 8.0), seed=1)
    sitk.WriteImage(phantom.image, str(good))
    single_slice = shared_data / "single_slice" / "lidc_slice.dcm"
    status = cli.main(["prepare", "--quiet", "--output", str(tmp_path / "out"), "--input", str(single_slice),
                       "--input", str(tmp_path / "missing.nrrd"), "--input", str(good)])
    assert status == 1
    assert (tmp_path / "out" / "small.mrb").is_file()
    assert not (tmp_path / "out" / "lidc_slice.mrb").exists() and not (tmp_path / "out" / "missing.mrb").exists()


def test_bad_inputs_are_named_in_the_errors(tmp_path, shared_data):
    loaders = {"2D slice": cli._file_loader(shared_data / "single_slice" / "lidc_slice.dcm"),
               "not found": cli._file_loader(tmp_path / "missing.nrrd")}
    assert_raises(InputError, cli.prepare_case, loaders["2D slice"], "slice", tmp_path, 1.5, "none", match="2D")
    assert_raises(InputError, cli.prepare_case, loaders["not found"], "missing", tmp_path, 1.5, "none",
                  match="not found")
    assert list(tmp_path.iterdir()) == []


def test_prepare_on_the_real_lidc_ct(tmp_path, shared_data):
    result = cli.prepare_case(cli._file_loader(shared_data / "lidc" / "LIDC-IDRI-0003.nrrd"), "lidc3",
                              tmp_path, 2.0, "none")
    assert result.size == (512, 512, 140)
    assert 3000 < result.lung_volume_ml < 9000 and 15000 < result.body_volume_ml < 45000
    scene = reload_scene(tmp_path / "lidc3.mrb")
    assert scene.GetFirstNodeByName("LIDC-IDRI-0003 body and lungs") is not None


def test_phantom_and_models_commands(tmp_path):
    assert cli.main(["phantom", "--kind", "abdomen", "--output", str(tmp_path), "--size", "64", "64", "32",
                     "--spacing", "6", "6", "8"]) == 0
    assert (tmp_path / "abdomen_phantom_0.nrrd").is_file() and (tmp_path / "annotations.csv").is_file()
    assert cli.main(["models"]) == 0
