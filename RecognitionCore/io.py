"""Reading images (NRRD, NIfTI, MetaImage, DICOM series) into volume nodes, and saving nodes and scenes (.mrb).

Everything is read with SimpleITK (ITK's readers, GDCM for DICOM) and enters the scene through
``volumes.sitk_to_volume_node``, so files and DICOM folders follow the same exact geometry path. DICOM patient and
study identity is kept on the image (as metadata) and becomes the Patient/Study items of the subject hierarchy, so
results can be grouped under the input's study as in Slicer's DICOM module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import SimpleITK as sitk
import slicer
import vtk

from .errors import InputError
from .scene import place_node
from .volumes import sitk_to_volume_node

# DICOM tags kept with an image read from a series (SimpleITK metadata keys).
DICOM_TAGS = {
    "patient_name": "0010|0010",
    "patient_id": "0010|0020",
    "study_instance_uid": "0020|000d",
    "study_description": "0008|1030",
    "study_date": "0008|0020",
    "series_instance_uid": "0020|000e",
    "series_description": "0008|103e",
    "modality": "0008|0060",
}

VOLUME_FILE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")


def read_image(path) -> sitk.Image:
    """Read a volume file or a DICOM folder (its largest series) as a SimpleITK image in LPS; DICOM tags kept."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Input not found: {path}")
    if path.is_dir():
        return _read_dicom_folder(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"Cannot read {path.name} as an image (supported: NRRD, NIfTI, MetaImage, DICOM): "
                         f"{_first_line(error)}") from None


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(f"No DICOM series found in folder {folder}.")
    files_by_series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series_ids}
    files = max(files_by_series.values(), key=len)  # the main CT series, not a scout or a dose report
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"Cannot read the DICOM series in {folder}: {_first_line(error)}") from None
    for key in DICOM_TAGS.values():
        if reader.HasMetaDataKey(0, key):
            image.SetMetaData(key, reader.GetMetaData(0, key).strip())
    return _as_int16_when_lossless(image)


def _as_int16_when_lossless(image: sitk.Image) -> sitk.Image:
    """GDCM gives 32-bit voxels after the rescale slope/intercept; CT in HU fits 16 bits: half the memory."""
    if image.GetPixelID() not in (sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkUInt16):
        return image
    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(image)
    if statistics.GetMinimum() < -32768 or statistics.GetMaximum() > 32767:
        return image
    converted = sitk.Cast(image, sitk.sitkInt16)
    for key in image.GetMetaDataKeys():
        converted.SetMetaData(key, image.GetMetaData(key))
    return converted


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def dicom_info(image: sitk.Image) -> dict:
    """The DICOM identity kept on an image by ``read_image`` ({} for non-DICOM files)."""
    return {name: image.GetMetaData(key) for name, key in DICOM_TAGS.items() if image.HasMetaDataKey(key)}


def default_node_name(path) -> str:
    path = Path(path)
    name = path.name
    for suffix in sorted(VOLUME_FILE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(path, scene=None, name: Optional[str] = None):
    """Read ``path`` (file or DICOM folder) into a new scalar volume node in ``scene`` (default: slicer.mrmlScene).

    DICOM input is placed under Patient/Study items of the subject hierarchy built from its tags.
    """
    scene = scene or slicer.mrmlScene
    image = read_image(path)
    info = dicom_info(image)
    volume_node = sitk_to_volume_node(image, name or info.get("series_description") or default_node_name(path),
                                      scene=scene)
    if info:
        _place_under_dicom_study(scene, volume_node, info)
    return volume_node


def _place_under_dicom_study(scene, volume_node, info: dict) -> None:
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient_uid = info.get("patient_id", "")
    study_uid = info.get("study_instance_uid", "")
    patient = _find_child_with_uid(shn, shn.GetSceneItemID(), patient_uid) if patient_uid else 0
    if not patient:
        patient = shn.CreateSubjectItem(shn.GetSceneItemID(), info.get("patient_name") or patient_uid or "Patient")
        shn.SetItemUID(patient, "DICOM", patient_uid)
    study = _find_child_with_uid(shn, patient, study_uid) if study_uid else 0
    if not study:
        study = shn.CreateStudyItem(patient, info.get("study_description") or info.get("study_date") or "Study")
        shn.SetItemUID(study, "DICOM", study_uid)
    series = place_node(shn, volume_node, study)
    if info.get("series_instance_uid"):
        shn.SetItemUID(series, "DICOM", info["series_instance_uid"])


def _find_child_with_uid(shn, parent_item: int, uid: str) -> int:
    children = vtk.vtkIdList()
    shn.GetItemChildren(parent_item, children)
    for index in range(children.GetNumberOfIds()):
        child = children.GetId(index)
        if shn.GetItemUID(child, "DICOM") == uid:
            return child
    return 0


def save_node(node, path, use_compression: bool = True) -> Path:
    """Write a volume, segmentation, markups, table or model node to ``path`` with its default storage node."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage_node = node.GetStorageNode()
    if storage_node is None:
        storage_node = node.CreateDefaultStorageNode()
        node.GetScene().AddNode(storage_node)
        node.SetAndObserveStorageNodeID(storage_node.GetID())
    storage_node.SetFileName(str(path))
    if storage_node.IsA("vtkMRMLStorageNode") and hasattr(storage_node, "SetUseCompression"):
        storage_node.SetUseCompression(int(use_compression))
    if not storage_node.WriteData(node):
        raise InputError(f"Could not write '{node.GetName()}' to {path} (is the folder writable and the format "
                         "supported for this node type?)")
    return path


def save_scene(scene, path) -> Path:
    """Save the whole scene with its data as a Medical Reality Bundle (.mrb) that Slicer opens."""
    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise InputError(f"Scene files are saved as .mrb; got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    messages = slicer.vtkMRMLMessageCollection()
    if not scene.WriteToMRB(str(path), None, messages) or not path.is_file():
        raise InputError(f"Could not save the scene to {path}: {messages.GetAllMessagesAsString()}")
    return path


def load_scene(path, scene=None) -> None:
    """Add the contents of a .mrb file to ``scene`` (default: slicer.mrmlScene)."""
    scene = scene or slicer.mrmlScene
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Scene file not found: {path}")
    messages = slicer.vtkMRMLMessageCollection()
    if not scene.ReadFromMRB(str(path), False, messages):
        raise InputError(f"Could not read the scene {path.name}: {messages.GetAllMessagesAsString()}")


def is_volume_path(path) -> bool:
    """True for a supported volume file or a folder (a DICOM series is looked for inside)."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(VOLUME_FILE_SUFFIXES) or os.path.isfile(path)
