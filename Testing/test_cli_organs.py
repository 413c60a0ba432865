"""`cli organs`: OrganSegment from the command line on the default (abdominal phantom) input with the shipped model,
and in a batch with a bad case; the scene it writes reloads with the segmentation, and the labelmap, its label names
and the statistics agree."""

import csv

import numpy as np
import SimpleITK as sitk
import vtk

from RecognitionCore import cli, io
from RecognitionCore.headless import create_app
from RecognitionCore.phantoms import make_abdomen_ct

PHANTOM = ["--phantom-size", "96", "96", "64", "--phantom-spacing", "4.0", "4.0", "4.5", "--phantom-seed", "4"]


def test_organs_on_the_default_phantom_writes_scene_csvs_labels_and_png(tmp_path):
    assert cli.main(["organs", "--quiet", "--output", str(tmp_path), "--device", "cpu", *PHANTOM]) == 0
    name = "abdomen_phantom_4"
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(tmp_path / f"{name}_organs.csv")))
    assert [row["organ"] for row in rows] == ["Liver", "Spleen", "Right kidney", "Left kidney"]
    names = {int(row["value"]): row["name"] for row in csv.DictReader(open(tmp_path / f"{name}_labels.csv"))}
    assert names == {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
    labels = sitk.ReadImage(str(tmp_path / f"{name}_labels.nii.gz"))
    truth = make_abdomen_ct((96, 96, 64), (4.0, 4.0, 4.5), seed=4).labels
    predicted, expected = sitk.GetArrayViewFromImage(labels) == 1, sitk.GetArrayViewFromImage(truth) == 2
    dice = 2 * np.count_nonzero(predicted & expected) / (np.count_nonzero(predicted) + np.count_nonzero(expected))
    assert dice > 0.85, dice
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000
    assert abs(float(rows[0]["volume_ml"]) - np.count_nonzero(predicted) * voxel_ml) < 0.01
    surfaces = sorted((tmp_path / f"{name}_stl").iterdir())
    assert [path.name.rsplit("_", 1)[-1] for path in surfaces] == ["Left kidney.stl", "Liver.stl", "Right kidney.stl",
                                                                    "Spleen.stl"], surfaces
    reader = vtk.vtkSTLReader()
    reader.SetFileName(str(surfaces[1]))
    mass = vtk.vtkMassProperties()
    mass.SetInputConnection(reader.GetOutputPort())
    mass.Update()
    surface_ml = mass.GetVolume() / 1000.0
    assert abs(surface_ml / float(rows[0]["volume_ml"]) - 1.0) < 0.05, (surface_ml, rows[0]["volume_ml"])
    app = create_app()
    io.load_scene(tmp_path / f"{name}.mrb", app.scene)
    segmentation = app.scene.GetFirstNodeByName("Abdomen phantom 4 organs")
    assert segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() == 4
    assert app.scene.GetFirstNodeByName("Ground truth (phantom)") is not None


def test_organs_batch_goes_on_after_a_bad_case(tmp_path):
    good = tmp_path / "small.nrrd"
    sitk.WriteImage(make_abdomen_ct((64, 64, 32), (5.0, 5.0, 8.0), seed=2).image, str(good))
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image([32, 32, 8], sitk.sitkInt16), str(flat))
    status = cli.main(["organs", "--quiet", "--output", str(tmp_path / "out"), "--method", "classical",
                       "--structures", "body", "bones", "--surfaces", "obj",
                       "--input", str(flat), "--input", str(good)])
    assert status == 1
    assert (tmp_path / "out" / "small.mrb").is_file() and not (tmp_path / "out" / "flat.mrb").exists()
    rows = list(csv.DictReader(open(tmp_path / "out" / "small_organs.csv")))
    assert [row["organ"] for row in rows] == ["Body", "Bone"]
    objects = list((tmp_path / "out" / "small_obj").glob("*.obj"))
    assert len(objects) == 1 and "SPACE=LPS" in objects[0].read_text()[:2000]
    assert objects[0].read_text().count("\nusemtl ") >= 2  # one material per structure
