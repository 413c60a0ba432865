"""Training datasets: case lists for detection (LUNA16 layout) and segmentation (image + labelmap pairs), a split by
patient, a reusable JSON description, checked loading, synthetic datasets from the phantoms, and the arrays that
training transforms and networks receive.

Layouts read:

- Detection, as LUNA16: images named by series UID (``<seriesuid>.mhd/.mha/.nrrd/.nii.gz``, in ``images_dir`` or any
  folder below it, or a DICOM folder named by, or holding, that series) and an ``annotations.csv`` with rows
  ``seriesuid,coordX,coordY,coordZ,diameter_mm`` in world LPS mm (``approx_max_extent_mm`` is accepted for the
  diameter). Images without annotation rows are negative cases and are kept.
- Segmentation, two naming conventions: ``<case>.<ext>`` beside ``<case>_seg.<ext>`` or ``<case>.seg.nrrd`` (a
  Slicer segmentation) in one folder, or ``images/<case>.<ext>`` with ``labels/<case>.<ext>`` (also the Medical
  Segmentation Decathlon's ``imagesTr``/``labelsTr``). An explicit list of (image, labelmap) pairs works too.

Network arrays follow ``predict``'s convention: channel first, (I, J, K) axes of the image reoriented to RAS. Box
coordinates are continuous voxel indices of that array with voxel centres at integers (what MONAI's
``AffineBoxToImageCoordinated`` gives), in MONAI's "xyzxyz" mode ``[i0, j0, k0, i1, j1, k1]``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, RecognitionError
from .phantoms import make_abdomen_ct, make_chest_ct, write_luna16_csv
from .predict import NETWORK_ORIENTATION, to_network_array
from .preprocessing import preprocess_for_model, resample_to_reference
from .progress import Progress, as_progress

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
Nodule = Tuple[Tuple[float, float, float], float]  # (center_lps_mm (x, y, z), diameter_mm)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"
LABEL_SUFFIX = "_seg"
DIAMETER_COLUMNS = ("diameter_mm", "approx_max_extent_mm")
DATASET_FORMAT_VERSION = 1
GRID_TOLERANCE = 1e-3  # relative tolerance of spacing/origin (in voxels) and absolute of direction cosines


@dataclass(frozen=True)
class DetectionCase:
    """One CT with its nodules (world LPS mm); no nodules makes it a negative case."""

    case_id: str
    patient_id: str
    image_path: str
    nodules: Tuple[Nodule, ...] = ()

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "patient_id": self.patient_id, "image": self.image_path,
                "nodules": [{"center_lps_mm": list(center), "diameter_mm": diameter}
                            for center, diameter in self.nodules]}

    @classmethod
    def from_dict(cls, data: dict) -> "DetectionCase":
        nodules = tuple((tuple(float(v) for v in nodule["center_lps_mm"]), float(nodule["diameter_mm"]))
                        for nodule in data.get("nodules", ()))
        return cls(str(data["case_id"]), str(data["patient_id"]), str(data["image"]), nodules)


@dataclass(frozen=True)
class SegmentationCase:
    """One CT with its labelmap; ``label_names`` names the values as stored in that labelmap (0 is background)."""

    case_id: str
    patient_id: str
    image_path: str
    label_path: str
    label_names: Dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "patient_id": self.patient_id, "image": self.image_path,
                "label": self.label_path, "label_names": {str(k): v for k, v in sorted(self.label_names.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentationCase":
        names = {int(k): str(v) for k, v in data.get("label_names", {}).items()}
        return cls(str(data["case_id"]), str(data["patient_id"]), str(data["image"]), str(data["label"]), names)


Case = Union[DetectionCase, SegmentationCase]


# ---------------------------------------------------------------------------------------------------------------------
# Case lists


def luna16_cases(images_dir: PathLike, annotations_csv: PathLike,
                 image_paths: Optional[Mapping[str, PathLike]] = None,
                 patient_ids: Optional[Mapping[str, str]] = None,
                 keep_unannotated: bool = True) -> List[DetectionCase]:
    """Detection cases of a LUNA16-layout folder, one per image found, sorted by series UID.

    ``image_paths`` maps series UIDs to images named otherwise (relative to ``images_dir`` or absolute), e.g. a file
    named by patient. Patient ids come from a ``patient_id`` column, else ``patient_ids``, else the series UID.
    Annotated series without an image are left out with a warning (an annotations file often covers more subsets
    than one folder holds); ``keep_unannotated`` keeps images without rows as negative cases.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"Image folder not found: {images_dir}")
    nodules_by_series, patient_column = read_annotations(annotations_csv)
    patients = {**patient_column, **dict(patient_ids or {})}
    mapped = {uid: _resolve(images_dir, path) for uid, path in (image_paths or {}).items()}
    for uid, path in mapped.items():
        if not path.exists():
            raise InputError(f"The image given for series {uid} does not exist: {path}")
    found = _images_by_series(images_dir, set(nodules_by_series) - set(mapped),
                              {path.resolve() for path in mapped.values()})
    found.update(mapped)
    missing = sorted(set(nodules_by_series) - set(found))
    if missing:
        unannotated = sorted(str(path.name) for uid, path in found.items() if uid not in nodules_by_series)
        hint = (f"; images without annotations (named otherwise? pass image_paths): {unannotated[:3]}"
                if unannotated else "")
        logger.warning(f"{len(missing)} annotated series have no image in {images_dir} and are left out "
                       f"(e.g. {missing[0]}){hint}")
    cases = [DetectionCase(uid, str(patients.get(uid, uid)), str(path), tuple(nodules_by_series.get(uid, ())))
             for uid, path in sorted(found.items())
             if keep_unannotated or uid in nodules_by_series]
    if not cases:
        raise InputError(f"No images found in {images_dir} (expected <seriesuid>{{{','.join(IMAGE_SUFFIXES)}}} "
                         f"or DICOM folders)")
    return cases


def read_annotations(annotations_csv: PathLike) -> Tuple[Dict[str, List[Nodule]], Dict[str, str]]:
    """Nodules by series UID from a LUNA16 ``annotations.csv``, and patient ids when it has a ``patient_id`` column.

    The diameter is read from ``diameter_mm`` or, failing that, ``approx_max_extent_mm`` (logged)."""
    path = Path(annotations_csv)
    if not path.is_file():
        raise InputError(f"Annotations file not found: {path}")
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        columns = set(reader.fieldnames or ())
        diameter_column = next((name for name in DIAMETER_COLUMNS if name in columns), None)
        missing = {"seriesuid", "coordX", "coordY", "coordZ"} - columns
        if missing or diameter_column is None:
            raise InputError(f"{path.name} is not a LUNA16 annotations file: missing columns "
                             f"{sorted(missing) + ([] if diameter_column else [' or '.join(DIAMETER_COLUMNS)])}")
        logger.info(f"{path.name}: nodule diameters from column '{diameter_column}'")
        nodules: Dict[str, List[Nodule]] = {}
        patients: Dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            try:
                center = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
                diameter = float(row[diameter_column])
            except (TypeError, ValueError):
                raise InputError(f"{path.name} line {line}: coordinates and diameter must be numbers") from None
            if not all(np.isfinite(center)) or not diameter > 0:
                raise InputError(f"{path.name} line {line}: needs finite coordinates and a positive diameter "
                                 f"(got {center}, {diameter})")
            nodules.setdefault(row["seriesuid"], []).append((center, diameter))
            if row.get("patient_id"):
                patients[row["seriesuid"]] = row["patient_id"]
    return nodules, patients


def _resolve(folder: Path, path: PathLike) -> Path:
    path = Path(path)
    return path if path.is_absolute() else folder / path


def _images_by_series(images_dir: Path, wanted: set, excluded: set) -> Dict[str, Path]:
    """Image files and DICOM folders below ``images_dir`` by series UID: the name first; unmatched folders are
    scanned for their DICOM series only while some annotated series has no image."""
    found: Dict[str, Path] = {}
    folders = []
    for directory, subdirectories, files in os.walk(images_dir):
        subdirectories.sort()
        for name in sorted(files):
            path = Path(directory) / name
            stem = _image_stem(name)
            if stem is not None and path.resolve() not in excluded and not name.endswith(SEGMENTATION_SUFFIX):
                found.setdefault(stem, path)
        if Path(directory) != images_dir and files and not any(_image_stem(name) for name in files):
            folders.append(Path(directory))
    dicom_named = [folder for folder in folders if folder.name in wanted and folder.name not in found]
    found.update({folder.name: folder for folder in dicom_named})
    for folder in folders:
        if not (wanted - set(found)):
            break
        if folder in dicom_named:
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            found.setdefault(uid, folder)
    return found


def _image_stem(name: str) -> Optional[str]:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def segmentation_cases(source: Union[PathLike, Sequence[Tuple[PathLike, PathLike]]],
                       label_names: Optional[Mapping[int, str]] = None,
                       patient_ids: Optional[Mapping[str, str]] = None) -> List[SegmentationCase]:
    """Segmentation cases of a folder (the module docstring's conventions) or of (image, labelmap) pairs.

    ``label_names`` names the labelmap values; a Slicer ``.seg.nrrd`` names its own (``Segment<N>_Name`` and
    ``_LabelValue``). Case ids are the image names without suffix; patient ids from ``patient_ids``, else the case id.
    """
    pairs = _pairs_in_folder(Path(source)) if isinstance(source, (str, Path)) else [
        (Path(image), Path(label)) for image, label in source]
    if not pairs:
        raise InputError(f"No image + labelmap pairs found in {source} (expected <case>.nii.gz with "
                         f"<case>_seg.nii.gz or <case>.seg.nrrd, or images/<case>.nii.gz with labels/<case>.nii.gz)")
    cases = []
    for image, label in pairs:
        case_id = _image_stem(image.name) or image.name
        names = read_segment_names(label) if label.name.endswith(SEGMENTATION_SUFFIX) else dict(label_names or {})
        cases.append(SegmentationCase(case_id, str((patient_ids or {}).get(case_id, case_id)), str(image),
                                      str(label), {int(k): str(v) for k, v in names.items()}))
    duplicates = sorted(case_id for case_id, number in Counter(case.case_id for case in cases).items() if number > 1)
    if duplicates:
        raise InputError(f"Several images share the case id(s) {duplicates}")
    return cases


def _pairs_in_folder(folder: Path) -> List[Tuple[Path, Path]]:
    if not folder.is_dir():
        raise InputError(f"Dataset folder not found: {folder}")
    for images_name, labels_name in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (folder / images_name).is_dir() and (folder / labels_name).is_dir():
            labels = {_image_stem(path.name): path for path in (folder / labels_name).iterdir()
                      if _image_stem(path.name) is not None}
            return [(image, labels[_image_stem(image.name)]) for image in sorted((folder / images_name).iterdir())
                    if _image_stem(image.name) in labels]
    files = {path.name: path for path in folder.iterdir() if path.is_file()}
    labels = {}
    for name, path in files.items():
        if name.endswith(SEGMENTATION_SUFFIX):
            labels[name[: -len(SEGMENTATION_SUFFIX)]] = path
        elif (_image_stem(name) or "").endswith(LABEL_SUFFIX):
            labels[_image_stem(name)[: -len(LABEL_SUFFIX)]] = path
    return [(path, labels[_image_stem(name)]) for name, path in sorted(files.items())
            if path not in labels.values() and _image_stem(name) in labels]


def read_segment_names(path: PathLike) -> Dict[int, str]:
    """{label value: segment name} from a Slicer ``.seg.nrrd`` header (segments of every layer)."""
    return {value: name for value, name, _ in _segments(_header(Path(path)), Path(path))}


def _header(path: Path) -> Dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"Cannot read {path.name}: {str(error).strip().splitlines()[-1]}") from None
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


def _segments(header: Mapping[str, str], path: Path) -> List[Tuple[int, str, int]]:
    """(label value, name, layer) of each segment of a Slicer segmentation header."""
    segments = []
    index = 0
    while f"Segment{index}_Name" in header:
        try:
            value = int(header.get(f"Segment{index}_LabelValue", index + 1))
            layer = int(header.get(f"Segment{index}_Layer", 0))
        except ValueError:
            raise InputError(f"{path.name}: Segment{index} has a non-integer label value or layer") from None
        segments.append((value, header[f"Segment{index}_Name"], layer))
        index += 1
    if not segments:
        raise InputError(f"{path.name} has no Segment<N>_Name fields: not a Slicer segmentation")
    return segments


# ---------------------------------------------------------------------------------------------------------------------
# Split and JSON description


def split_by_patient(cases: Sequence[Case], validation_fraction: float = 0.2,
                     seed: int = 0) -> Tuple[List[Case], List[Case]]:
    """(train, validation) with every patient's cases on one side; the same seed gives the same split.

    ``validation_fraction`` of the patients (rounded, at least one, never all) go to validation; case order kept.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise InputError(f"validation_fraction must be between 0 and 1 (got {validation_fraction})")
    patients = sorted({case.patient_id for case in cases})
    if len(patients) < 2:
        raise InputError(f"A train/validation split by patient needs cases of at least 2 patients; "
                         f"got {len(cases)} case(s) of {len(patients)} patient(s)")
    random.Random(seed).shuffle(patients)
    count = min(len(patients) - 1, max(1, round(validation_fraction * len(patients))))
    validation_patients = set(patients[:count])
    return ([case for case in cases if case.patient_id not in validation_patients],
            [case for case in cases if case.patient_id in validation_patients])


def write_dataset_json(path: PathLike, train: Sequence[Case], validation: Sequence[Case],
                       description: Optional[dict] = None) -> Path:
    """A reusable dataset description in the spirit of the Decathlon's dataset.json.

    ``description`` (name, source, licence, split seed...) is written as given; task, label names, counts and the
    cases are added. Paths under the JSON file's folder are written relative to it, others absolute.
    """
    path = Path(path)
    cases = [*train, *validation]
    if not cases:
        raise InputError("A dataset description needs at least one case")
    kinds = {type(case) for case in cases}
    if len(kinds) > 1:
        raise InputError("Detection and segmentation cases cannot share one dataset description")
    task = "detection" if kinds == {DetectionCase} else "segmentation"
    folder = path.parent.resolve()
    labels: Dict[int, str] = {0: "background"}
    if task == "segmentation":
        for case in cases:
            labels.update(case.label_names)
    else:
        labels[1] = "nodule"
    document = {**(description or {}), "format_version": DATASET_FORMAT_VERSION, "task": task,
                "labels": {str(k): v for k, v in sorted(labels.items())},
                "numTraining": len(train), "numValidation": len(validation),
                "numPatients": len({case.patient_id for case in cases}),
                "training": [_relative_case(case, folder) for case in train],
                "validation": [_relative_case(case, folder) for case in validation]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def read_dataset_json(path: PathLike) -> Tuple[List[Case], List[Case], dict]:
    """(train, validation, description) of a ``write_dataset_json`` file, with absolute paths."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot read the dataset description {path}: {error}") from None
    task = document.get("task")
    if task not in ("detection", "segmentation") or "training" not in document:
        raise InputError(f"{path.name} is not a dataset description (needs 'task' detection or segmentation and "
                         f"'training'); got task {task!r}")
    case_type = DetectionCase if task == "detection" else SegmentationCase
    folder = path.parent.resolve()
    try:
        train, validation = ([case_type.from_dict(_absolute_paths(entry, folder)) for entry in document.get(key, [])]
                             for key in ("training", "validation"))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path.name}: malformed case entry ({type(error).__name__}: {error})") from None
    description = {k: v for k, v in document.items() if k not in ("training", "validation")}
    return train, validation, description


def _relative_case(case: Case, folder: Path) -> dict:
    data = case.to_dict()
    for key in ("image", "label"):
        if key in data:
            target = Path(data[key]).resolve()
            data[key] = target.relative_to(folder).as_posix() if target.is_relative_to(folder) else str(target)
    return data


def _absolute_paths(entry: dict, folder: Path) -> dict:
    return {**entry, **{key: str(_resolve(folder, entry[key])) for key in ("image", "label") if key in entry}}


# ---------------------------------------------------------------------------------------------------------------------
# Loading and checking


def read_case_image(path: PathLike) -> sitk.Image:
    """A volume file or DICOM folder as a SimpleITK image; InputError naming the file when unreadable."""
    path = Path(path)
    if path.is_dir():
        from .io import read_image  # here, so that files are read without MRML

        return read_image(path)
    if not path.exists():
        raise InputError(f"File not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"Cannot read {path.name}: {str(error).strip().splitlines()[-1]}") from None


def read_labelmap(path: PathLike, reference: Optional[sitk.Image] = None) -> Tuple[sitk.Image, Dict[int, str]]:
    """A labelmap file, or a Slicer ``.seg.nrrd`` merged into one labelmap, with its segment names ({} otherwise).

    Layers of a multi-layer segmentation (overlapping segments) are merged; a voxel in several segments raises
    InputError. Slicer crops segmentations to their extent: given ``reference``, such a labelmap is placed back onto
    the reference grid (same spacing and axes needed).
    """
    path = Path(path)
    image = read_case_image(path)
    if not path.name.endswith(SEGMENTATION_SUFFIX):
        return image, {}
    segments = _segments({key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}, path)
    array = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        overlap = np.count_nonzero(array, axis=-1) > 1
        if overlap.any():
            raise InputError(f"{path.name}: {int(overlap.sum())} voxels belong to several segments (layers "
                             f"overlap); one label per voxel is needed for training")
        merged = sitk.GetImageFromArray(array.sum(axis=-1, dtype=np.int32).astype(array.dtype))
        merged.CopyInformation(image)
        image = merged
    if reference is not None and _grid_differences(image, reference):
        image = _onto_reference(image, reference, path)
    return image, {value: name for value, name, _ in segments}


def _onto_reference(labels: sitk.Image, reference: sitk.Image, path: Path) -> sitk.Image:
    same_axes = (np.allclose(labels.GetSpacing(), reference.GetSpacing(), rtol=GRID_TOLERANCE)
                 and np.allclose(labels.GetDirection(), reference.GetDirection(), atol=GRID_TOLERANCE))
    shift = np.array(reference.TransformPhysicalPointToContinuousIndex(labels.GetOrigin()))
    if not same_axes or not np.allclose(shift, np.round(shift), atol=GRID_TOLERANCE):
        raise InputError(f"{path.name} does not lie on its image's voxel grid: "
                         f"{'; '.join(_grid_differences(labels, reference))}")
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def load_segmentation_case(case: SegmentationCase,
                           allowed_labels: Union[Mapping[int, str], Iterable[int]]) -> Tuple[sitk.Image, sitk.Image]:
    """(image, labels as UInt8) of a case, checked: readable, 3D, same grid, values within ``allowed_labels``.

    When ``allowed_labels`` maps values to names and the case names its values otherwise (a ``.seg.nrrd``), values
    are matched by name (case-insensitive) and renumbered to ``allowed_labels``' values.
    """
    image = read_case_image(case.image_path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"Case {case.case_id}: a 3D scalar image is needed; {Path(case.image_path).name} is "
                         f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)")
    labels, file_names = read_labelmap(case.label_path, reference=image)
    differences = _grid_differences(image, labels)
    if differences:
        raise InputError(f"Case {case.case_id}: image {Path(case.image_path).name} and labelmap "
                         f"{Path(case.label_path).name} are on different grids: {'; '.join(differences)}")
    array = sitk.GetArrayFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise InputError(f"Case {case.case_id}: labelmap {Path(case.label_path).name} has non-integer values")
        array = array.astype(np.int64)
    array = _renumbered(array, {**case.label_names, **file_names}, allowed_labels, case)
    present = set(np.unique(array).tolist()) - {0}
    outside = sorted(present - (set(allowed_labels) - {0}))
    if outside:
        raise InputError(f"Case {case.case_id}: labelmap {Path(case.label_path).name} has values {outside} outside "
                         f"the label set {sorted(set(allowed_labels) | {0})}")
    if present and max(present) > 255:
        raise InputError(f"Case {case.case_id}: label values above 255 are not supported (got {max(present)})")
    result = sitk.GetImageFromArray(array.astype(np.uint8))
    result.CopyInformation(image)
    return image, result


def _renumbered(array: np.ndarray, case_names: Mapping[int, str], allowed: Union[Mapping[int, str], Iterable[int]],
                case: SegmentationCase) -> np.ndarray:
    """Named values present in ``array`` renumbered by name onto ``allowed`` (a name outside it raises)."""
    if not isinstance(allowed, Mapping) or not case_names:
        return array
    value_by_name = {name.lower(): value for value, name in allowed.items()}
    present = sorted(set(np.unique(array).tolist()) - {0})
    unknown = [f"{case_names[value]} ({value})" for value in present
               if value in case_names and case_names[value].lower() not in value_by_name]
    if unknown:
        raise InputError(f"Case {case.case_id}: labels {unknown} of {Path(case.label_path).name} are not in the label "
                         f"set {sorted(allowed.values())}")
    mapping = {value: value_by_name[case_names[value].lower()] for value in present if value in case_names}
    if all(source == target for source, target in mapping.items()):
        return array
    lookup = np.arange(max(present) + 1)
    for source, target in mapping.items():
        lookup[source] = target
    return lookup[array]


def _grid_differences(image: sitk.Image, other: sitk.Image) -> List[str]:
    """What differs between two voxel grids, naming both values ([] when the same within ``GRID_TOLERANCE``)."""
    differences = []
    if image.GetSize() != other.GetSize():
        differences.append(f"size {image.GetSize()} vs {other.GetSize()}")
    if not np.allclose(image.GetSpacing(), other.GetSpacing(), rtol=GRID_TOLERANCE):
        differences.append(f"spacing {_rounded(image.GetSpacing())} vs {_rounded(other.GetSpacing())} mm")
    if not np.allclose(image.GetOrigin(), other.GetOrigin(), atol=GRID_TOLERANCE * min(image.GetSpacing())):
        differences.append(f"origin {_rounded(image.GetOrigin())} vs {_rounded(other.GetOrigin())} mm")
    if not np.allclose(image.GetDirection(), other.GetDirection(), atol=GRID_TOLERANCE):
        differences.append(f"direction {_rounded(image.GetDirection())} vs {_rounded(other.GetDirection())}")
    return differences


def _rounded(values: Sequence[float]) -> Tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def load_detection_case(case: DetectionCase) -> Tuple[sitk.Image, Tuple[Nodule, ...]]:
    """(image, nodules) of a case, checked: readable, 3D, every nodule centre inside the image."""
    image = read_case_image(case.image_path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"Case {case.case_id}: a 3D scalar image is needed; {Path(case.image_path).name} is "
                         f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)")
    size = np.array(image.GetSize())
    for center, diameter in case.nodules:
        index = np.array(image.TransformPhysicalPointToContinuousIndex(center))
        if np.any(index < -0.5) or np.any(index > size - 0.5):
            raise InputError(f"Case {case.case_id}: the nodule at {_rounded(center)} mm (diameter {diameter} mm) lies "
                             f"outside the image (voxel index {_rounded(index)}, size {tuple(size)})")
    return image, case.nodules


def iter_valid(cases: Iterable[Case], loader: Callable[[Case], tuple],
               warn: Callable[[str], None] = logger.warning, progress: Optional[Progress] = None,
               skipped: Optional[List[Tuple[str, str]]] = None) -> Iterator[Tuple[Case, tuple]]:
    """(case, loader(case)) for every case that loads; a corrupt or invalid case is skipped with a warning naming it
    and the reason (also appended to ``skipped`` as (case_id, reason)), so one bad case does not end a training run.
    """
    progress = as_progress(progress)
    cases = list(cases)
    for number, case in enumerate(cases):
        progress.report(number / max(1, len(cases)), f"Loading case {case.case_id}")
        try:
            loaded = loader(case)
        except (RecognitionError, OSError, RuntimeError, ValueError) as error:
            warn(f"Skipping case {case.case_id}: {error}")
            if skipped is not None:
                skipped.append((case.case_id, str(error)))
            continue
        yield case, loaded
    progress.report(1.0, "Cases loaded")


@dataclass(frozen=True)
class DatasetSummary:
    """What ``check_dataset`` found: counts, positives, and the cases skipped with their reasons."""

    task: str
    case_count: int
    valid_case_ids: Tuple[str, ...]
    patient_count: int
    positive_case_count: int
    nodule_count: int  # detection: nodules of the valid cases
    label_voxel_counts: Dict[int, int]  # segmentation: voxels per non-zero label over the valid cases
    skipped: Tuple[Tuple[str, str], ...]  # (case_id, reason)


def check_dataset(cases: Sequence[Case], allowed_labels: Union[None, Mapping[int, str], Iterable[int]] = None,
                  warn: Callable[[str], None] = logger.warning,
                  progress: Optional[Progress] = None) -> DatasetSummary:
    """Load every case (skipping invalid ones with a warning) and count positives; InputError when no case is valid
    or none has a positive (no nodule at all, no non-zero label at all): such a dataset cannot train a model."""
    cases = list(cases)
    if not cases:
        raise InputError("The dataset has no cases")
    task = "detection" if isinstance(cases[0], DetectionCase) else "segmentation"
    if task == "segmentation" and allowed_labels is None:
        raise InputError("Checking a segmentation dataset needs the allowed label set")
    skipped: List[Tuple[str, str]] = []
    loader = load_detection_case if task == "detection" else (
        lambda case: load_segmentation_case(case, allowed_labels))
    valid, positives, nodules, voxels = [], 0, 0, {}
    for case, loaded in iter_valid(cases, loader, warn, progress, skipped):
        valid.append(case)
        if task == "detection":
            nodules += len(loaded[1])
            positives += bool(loaded[1])
        else:
            values, counts = np.unique(sitk.GetArrayViewFromImage(loaded[1]), return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist()):
                if value:
                    voxels[value] = voxels.get(value, 0) + count
            positives += bool(len(values) > 1 or values[0] != 0)
    if not valid:
        raise InputError(f"None of the {len(cases)} cases could be loaded (first problem: case {skipped[0][0]}: "
                         f"{skipped[0][1]})")
    if positives == 0:
        what = "no nodule in any case" if task == "detection" else "no non-zero label in any case"
        raise InputError(f"The dataset has no positives ({what} of {len(valid)} valid cases): a model cannot learn "
                         f"from it")
    return DatasetSummary(task, len(cases), tuple(case.case_id for case in valid),
                          len({case.patient_id for case in valid}), positives, nodules, voxels, tuple(skipped))


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic datasets


def write_synthetic_detection_dataset(folder: PathLike, count: int, seed: int = 0,
                                      size_ijk: Sequence[int] = (64, 64, 32),
                                      spacing_mm: Sequence[float] = (5.6, 4.0, 10.0),
                                      nodules_per_case: int = 2,
                                      progress: Optional[Progress] = None) -> List[DetectionCase]:
    """Chest phantoms in LUNA16 layout (``synthetic_<seed>.nrrd`` + ``annotations.csv``, and each phantom's full
    nodule truth in ``synthetic_<seed>_lesions.csv``: type, location, volume); case i uses seed + i."""
    progress = as_progress(progress)
    folder = _new_folder(folder, count)
    rows = []
    for number in range(count):
        progress.report(number / count, f"Generating chest case {number + 1} of {count}")
        phantom = make_chest_ct(size_ijk, spacing_mm, seed=seed + number, nodules=nodules_per_case)
        uid = f"synthetic_{seed + number:05d}"
        sitk.WriteImage(phantom.image, str(folder / f"{uid}.nrrd"), True)
        phantom.write_lesion_truth(folder / f"{uid}_lesions.csv")
        rows += phantom.luna16_rows(uid)
    write_luna16_csv(rows, folder / "annotations.csv")
    progress.report(1.0, "Synthetic detection dataset written")
    return luna16_cases(folder, folder / "annotations.csv")


def write_synthetic_segmentation_dataset(folder: PathLike, count: int, seed: int = 0, kind: str = "abdomen",
                                         size_ijk: Sequence[int] = (64, 64, 32),
                                         spacing_mm: Optional[Sequence[float]] = None,
                                         progress: Optional[Progress] = None) -> List[SegmentationCase]:
    """Phantom images with their organ labels (``<case>.nrrd`` + ``<case>_seg.nrrd``); case i uses seed + i.

    ``spacing_mm`` None fits a whole trunk into ``size_ijk``."""
    makers = {"abdomen": (make_abdomen_ct, (5.6, 4.0, 9.0)), "chest": (make_chest_ct, (5.6, 4.0, 10.0))}
    if kind not in makers:
        raise InputError(f"Unknown phantom kind {kind!r} (expected one of {sorted(makers)})")
    make, default_spacing = makers[kind]
    progress = as_progress(progress)
    folder = _new_folder(folder, count)
    label_names: Dict[int, str] = {}
    for number in range(count):
        progress.report(number / count, f"Generating {kind} case {number + 1} of {count}")
        phantom = make(size_ijk, spacing_mm or default_spacing, seed=seed + number)
        case_id = f"{kind}_{seed + number:05d}"
        sitk.WriteImage(phantom.image, str(folder / f"{case_id}.nrrd"), True)
        sitk.WriteImage(phantom.labels, str(folder / f"{case_id}{LABEL_SUFFIX}.nrrd"), True)
        label_names = phantom.label_names
    progress.report(1.0, "Synthetic segmentation dataset written")
    return segmentation_cases(folder, label_names)


def _new_folder(folder: PathLike, count: int) -> Path:
    if count < 1:
        raise InputError(f"count must be >= 1 (got {count})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Network arrays


def prepare_segmentation_pair(image: sitk.Image, labels: sitk.Image, spacing_mm: Optional[Sequence[float]],
                              intensity: dict) -> Dict[str, np.ndarray]:
    """{"image": (1, I, J, K) float32, "label": (1, I, J, K) uint8} on the model's grid in the network convention:
    the card's preprocessing for the image, nearest-neighbour resampling of the labels onto the same grid."""
    prepared, _ = preprocess_for_model(image, spacing_mm, intensity)
    labels_on_grid = resample_to_reference(labels, prepared, "nearest", 0)
    return {"image": to_network_array(prepared)[None].astype(np.float32),
            "label": to_network_array(sitk.Cast(labels_on_grid, sitk.sitkUInt8))[None]}


def prepare_detection_case(image: sitk.Image, nodules: Sequence[Nodule], spacing_mm: Optional[Sequence[float]],
                           intensity: dict) -> Dict[str, np.ndarray]:
    """{"image": (1, I, J, K) float32, "boxes": (N, 6) float32, "labels": (N,) int64} in the network convention.

    A nodule's box is centred on its LPS centre mapped exactly to a continuous index of the network array (voxel
    centres at integers) and spans its diameter along each axis, in MONAI's "xyzxyz" mode."""
    prepared, _ = preprocess_for_model(image, spacing_mm, intensity)
    return {"image": to_network_array(prepared)[None].astype(np.float32),
            "boxes": nodule_boxes(prepared, nodules), "labels": np.zeros(len(nodules), dtype=np.int64)}  # class 0


def nodule_boxes(image: sitk.Image, nodules: Sequence[Nodule]) -> np.ndarray:
    """(N, 6) float32 boxes [i0, j0, k0, i1, j1, k1] of ``nodules`` in the network array of ``image``."""
    oriented = sitk.DICOMOrient(image, NETWORK_ORIENTATION)
    spacing = np.array(oriented.GetSpacing())
    boxes = np.zeros((len(nodules), 6), dtype=np.float32)
    for row, (center, diameter) in enumerate(nodules):
        index = np.array(oriented.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in center)))
        half = 0.5 * float(diameter) / spacing
        boxes[row] = np.concatenate([index - half, index + half])
    return boxes
