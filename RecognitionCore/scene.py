"""Writers that put results into the MRML scene: segmentations, markups, tables, subject hierarchy placement.

Rules every writer follows:

* Outputs are built in memory and added to the scene at the end (markups, whose measurements need the scene, are
  filled right after); if anything fails part-way, whatever the writer added is removed again (``NewNodes``), so the
  scene's nodes are as before the call.
* The user's input nodes are only read, never modified.
* Coordinates come in LPS millimetres (the core's ITK convention) and are converted to Slicer's RAS here, in one
  place (``lps_to_ras``). Arrays are in (k, j, i) order on the reference volume's voxel grid.
* Standard terminology (SNOMED CT codes, as in Slicer's terminology lists and DICOM CIDs 4031/7155/7159/12114) and
  Slicer's recommended display colours are attached to the structures our modules make (``STRUCTURES``), so that
  DICOM SEG export and Slicer's terminology UI show what each segment is.

Works inside the Slicer app and headless (``headless.create_app()``): only ``slicer.mrmlScene`` and slicer-core
classes are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import InputError, RecognitionError
from .preprocessing import three_numbers
from .volumes import lps_to_ras

# Node reference role from each output node to the input volume it was computed from (provenance).
INPUT_VOLUME_REFERENCE_ROLE = "referenceVolume"
# Segmentation node attribute: JSON list of the names of requested segments whose label was absent from the labelmap.
ABSENT_SEGMENTS_ATTRIBUTE = "RecognitionCore.AbsentSegments"

SLICER_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_SEGMENTATION_CONTEXT = "Segmentation category and type - DICOM master list"
DICOM_ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"


# --------------------------------------------------------------------------------------------------------------------
# Transaction: remove everything a block added to the scene if the block raises
# --------------------------------------------------------------------------------------------------------------------

class NewNodes:
    """Tracks what a block adds to the scene; if the block raises (any exception, ``Cancelled`` included), removes it.

    Use it around a whole run of a logic so a failed or cancelled run leaves no half-made results::

        with NewNodes(slicer.mrmlScene) as new:
            segmentation = add_segmentation_from_labelmap(...)
            progress.report(0.9, "Writing findings")      # may raise Cancelled: the segmentation is removed again
            table = add_table(...)
        new.nodes   # after success: the nodes the block added, in the order they were added

    On error it removes the nodes added inside the block (display and storage nodes included) and the subject
    hierarchy items created inside it (folders), and puts pre-existing subject hierarchy items back under their
    original parents. The exception is then re-raised unchanged. Blocks nest (each writer opens its own). It compares
    the scene before and after, so everything added meanwhile is removed, also by other code: use it on the thread
    that owns the scene, around work that does not wait for user interaction.
    """

    def __init__(self, scene=None):
        self.scene = _scene_or_default(scene)
        self._node_ids_before: set = set()
        self._item_parents_before: Dict[int, int] = {}

    def __enter__(self) -> "NewNodes":
        self._node_ids_before = set(_node_ids(self.scene))
        self._item_parents_before = _item_parents(self.scene)
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is not None:
            self.discard()
        return False

    @property
    def nodes(self) -> list:
        """The nodes added since the block was entered that are still in the scene, in the order they were added."""
        return [self.scene.GetNodeByID(node_id) for node_id in _node_ids(self.scene)
                if node_id not in self._node_ids_before]

    def discard(self) -> None:
        """Undo the block's additions: restore moved items, remove new nodes (newest first), then new items."""
        hierarchy = _existing_subject_hierarchy(self.scene)
        if hierarchy is not None:
            parents_now = _item_parents(self.scene)
            for item, parent in self._item_parents_before.items():
                if item in parents_now and parents_now[item] != parent:
                    hierarchy.SetItemParent(item, parent)
        for node in reversed(self.nodes):
            if self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        hierarchy = _existing_subject_hierarchy(self.scene)
        if hierarchy is not None:
            new_items = [item for item in _item_parents(self.scene) if item not in self._item_parents_before]
            for item in reversed(new_items):
                hierarchy.RemoveItem(item, False, False)


def _node_ids(scene) -> List[str]:
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def _existing_subject_hierarchy(scene):
    """The scene's subject hierarchy node, without creating one (creating it would itself change the scene)."""
    return scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")


def _item_parents(scene) -> Dict[int, int]:
    """{item: parent item} for every subject hierarchy item below the scene item, in creation order."""
    hierarchy = _existing_subject_hierarchy(scene)
    if hierarchy is None:
        return {}
    items = vtk.vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), items, True)
    item_ids = sorted(items.GetId(index) for index in range(items.GetNumberOfIds()))
    return {item: hierarchy.GetItemParent(item) for item in item_ids}


def _scene_or_default(scene):
    scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RecognitionError("No MRML scene: run inside Slicer or create one with headless.create_app().")
    return scene


def _scene_of(node, what: str):
    if node is None:
        raise InputError(f"No {what} was given.")
    scene = node.GetScene()
    if scene is None:
        raise InputError(f"The {what} '{node.GetName()}' is not in a scene.")
    return scene


# --------------------------------------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------------------------------------

def _points_array(points, what: str) -> np.ndarray:
    array = np.asarray(points, dtype=float)
    if array.size == 0:
        return np.zeros((0, 3))
    if array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"{what} must be a list of (x, y, z) points; got an array of shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} contains NaN or infinite coordinates.")
    return array


# --------------------------------------------------------------------------------------------------------------------
# Terminology and structures
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Code:
    """One coded concept (DICOM code triple)."""
    value: str
    meaning: str
    scheme: str = "SCT"


@dataclass(frozen=True)
class Terminology:
    """What a segment is, as Slicer stores it: category, type (+ modifier) and optional anatomic region."""
    category: Code
    type: Code
    type_modifier: Optional[Code] = None
    region: Optional[Code] = None
    context: str = SLICER_ANATOMY_CONTEXT

    def serialized(self) -> str:
        """Slicer's serialized terminology entry (the segment tag ``TerminologyEntry``), made by Slicer itself."""
        empty = Code("", "", "")
        modifier = self.type_modifier or empty
        region = self.region or empty
        return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
            self.context,
            self.category.value, self.category.scheme, self.category.meaning,
            self.type.value, self.type.scheme, self.type.meaning,
            modifier.value, modifier.scheme, modifier.meaning,
            DICOM_ANATOMY_CONTEXT, region.value, region.scheme, region.meaning,
            "", "", "")


@dataclass(frozen=True)
class Structure:
    """A structure our modules segment: display name, Slicer's recommended colour (0-255) and terminology if known."""
    name: str
    color_rgb255: Tuple[int, int, int]
    terminology: Optional[Terminology] = None


_ANATOMICAL_STRUCTURE = Code("123037004", "Anatomical Structure")
_TISSUE = Code("85756007", "Tissue")
_ALTERED_STRUCTURE = Code("49755003", "Morphologically Altered Structure")
_LEFT = Code("7771000", "Left")
_RIGHT = Code("24028007", "Right")
_LUNG = Code("39607008", "Lung")


def _anatomy(value: str, meaning: str, modifier: Optional[Code] = None) -> Terminology:
    """An anatomical structure from Slicer's General Anatomy list."""
    return Terminology(_ANATOMICAL_STRUCTURE, Code(value, meaning), modifier)


def _dicom(category: Code, value: str, meaning: str, region: Optional[Code] = None) -> Terminology:
    """A type from the DICOM master list (codes not in Slicer's General Anatomy list)."""
    return Terminology(category, Code(value, meaning), region=region, context=DICOM_SEGMENTATION_CONTEXT)


# Codes and colours from Slicer's SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json (colours there equal
# GenericAnatomyColors). ``_dicom`` codes are from DICOM CID 4031 (entire body, spine), 7155 (bronchus, blood vessel),
# 7159 (nodule, neoplasm) and 12114 (portal vein, hepatic vein, inferior vena cava); their colours are ours.
# Structures without a code we could confirm carry only a name and a colour.
STRUCTURES: Dict[str, Structure] = {
    "body": Structure("Body", (177, 122, 101), _dicom(_ANATOMICAL_STRUCTURE, "38266002", "Entire body")),
    "lung": Structure("Lungs", (197, 165, 145), _anatomy("39607008", "Lung")),
    "lung_left": Structure("Left lung", (197, 165, 145), _anatomy("39607008", "Lung", _LEFT)),
    "lung_right": Structure("Right lung", (197, 165, 145), _anatomy("39607008", "Lung", _RIGHT)),
    "airway": Structure("Airway", (182, 228, 255)),
    "trachea": Structure("Trachea", (182, 228, 255), _anatomy("44567001", "Trachea")),
    "bronchus": Structure("Bronchus", (182, 228, 255), _dicom(_ANATOMICAL_STRUCTURE, "955009", "Bronchus")),
    "bone": Structure("Bone", (241, 214, 145), Terminology(_TISSUE, Code("272673000", "Bone"))),
    "rib": Structure("Ribs", (253, 232, 158), _anatomy("113197003", "Rib")),
    "spine": Structure("Spine", (226, 202, 134), _dicom(_ANATOMICAL_STRUCTURE, "421060004", "Spine")),
    "vertebra": Structure("Vertebra", (226, 202, 134)),
    "heart": Structure("Heart", (206, 110, 84), _anatomy("80891009", "Heart")),
    "liver": Structure("Liver", (221, 130, 101), _anatomy("10200004", "Liver")),
    "spleen": Structure("Spleen", (157, 108, 162), _anatomy("78961009", "Spleen")),
    "kidney_left": Structure("Left kidney", (185, 102, 83), _anatomy("64033007", "Kidney", _LEFT)),
    "kidney_right": Structure("Right kidney", (185, 102, 83), _anatomy("64033007", "Kidney", _RIGHT)),
    "aorta": Structure("Aorta", (224, 97, 76), _anatomy("15825003", "Aorta")),
    "inferior_vena_cava": Structure("Inferior vena cava", (0, 101, 160),
                                    _dicom(_ANATOMICAL_STRUCTURE, "64131007", "Inferior vena cava")),
    "portal_vein": Structure("Portal vein", (0, 151, 206), _dicom(_ANATOMICAL_STRUCTURE, "32764006", "Portal vein")),
    "hepatic_vein": Structure("Hepatic veins", (110, 190, 230),
                              _dicom(_ANATOMICAL_STRUCTURE, "8993003", "Hepatic vein")),
    "artery": Structure("Artery", (216, 101, 79), Terminology(_TISSUE, Code("51114001", "Artery"))),
    "vein": Structure("Vein", (0, 151, 206), Terminology(_TISSUE, Code("29092000", "Vein"))),
    "vessel": Structure("Vessels", (216, 101, 79), _dicom(_TISSUE, "59820001", "Blood vessel")),
    "nodule": Structure("Nodule", (230, 160, 40), _dicom(_ALTERED_STRUCTURE, "27925004", "Nodule")),
    "lung_nodule": Structure("Lung nodule", (230, 160, 40),
                             _dicom(_ALTERED_STRUCTURE, "27925004", "Nodule", region=_LUNG)),
    "tumor": Structure("Tumor", (255, 90, 90), _dicom(_ALTERED_STRUCTURE, "108369006", "Neoplasm")),
    "mass": Structure("Mass", (144, 238, 144), Terminology(_ALTERED_STRUCTURE, Code("4147007", "Mass"))),
    "fat": Structure("Fat", (230, 220, 70), Terminology(_TISSUE, Code("248300009", "Body fat"))),
    "muscle": Structure("Muscle", (192, 104, 88), Terminology(_TISSUE, Code("71616004", "Muscle"))),
    "soft_tissue": Structure("Soft tissue", (128, 174, 128)),
    "resection": Structure("Resection", (250, 120, 40)),
    "remnant": Structure("Remnant", (120, 200, 120)),
}

_STRUCTURE_ALIASES = {
    "lungs": "lung", "left_lung": "lung_left", "right_lung": "lung_right", "airways": "airway",
    "bones": "bone", "ribs": "rib", "vertebrae": "vertebra", "left_kidney": "kidney_left",
    "right_kidney": "kidney_right", "ivc": "inferior_vena_cava", "hepatic_veins": "hepatic_vein",
    "vessels": "vessel", "blood_vessel": "vessel", "nodules": "nodule", "tumour": "tumor", "neoplasm": "tumor",
    "resection_volume": "resection", "liver_remnant": "remnant",
    "portal_vein_and_splenic_vein": "portal_vein",  # TotalSegmentator's label
}

# Colours for segments that name no known structure, in label order.
_FALLBACK_COLORS_RGB255 = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
                           (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0)]


def structure(key_or_name: str) -> Optional[Structure]:
    """The known structure for a key or common name ('liver', 'Left lung', 'IVC', ...), or None."""
    key = key_or_name.strip().lower().replace(" ", "_").replace("-", "_")
    key = _STRUCTURE_ALIASES.get(key, key)
    return STRUCTURES.get(key)


@dataclass(frozen=True)
class SegmentSpec:
    """Name, colour (RGB 0-1; None: the structure's or a default) and terminology of one segment."""
    name: str
    color_rgb: Optional[Tuple[float, float, float]] = None
    terminology: Optional[Terminology] = None

    @classmethod
    def for_structure(cls, key: str, name: Optional[str] = None,
                      color_rgb: Optional[Tuple[float, float, float]] = None) -> "SegmentSpec":
        """A segment of a known structure, optionally renamed ('Nodule 3') or recoloured."""
        known = structure(key)
        if known is None:
            raise InputError(f"Unknown structure {key!r}; known: {', '.join(sorted(STRUCTURES))}.")
        color = color_rgb if color_rgb is not None else tuple(c / 255.0 for c in known.color_rgb255)
        return cls(name or known.name, color, known.terminology)


def segment_spec(value: Union[SegmentSpec, str], fallback_index: int = 0) -> SegmentSpec:
    """A full spec from a spec or a string: a known structure's name/key gets its name, colour and terminology."""
    if isinstance(value, SegmentSpec):
        spec = value
    elif isinstance(value, str) and value.strip():
        spec = SegmentSpec.for_structure(value) if structure(value) is not None else SegmentSpec(value.strip())
    else:
        raise InputError(f"A segment must be described by a SegmentSpec or a non-empty name; got {value!r}.")
    if spec.color_rgb is None:
        fallback = _FALLBACK_COLORS_RGB255[fallback_index % len(_FALLBACK_COLORS_RGB255)]
        spec = SegmentSpec(spec.name, tuple(c / 255.0 for c in fallback), spec.terminology)
    color = np.asarray(spec.color_rgb, dtype=float)
    if color.shape != (3,) or np.any(color < 0) or np.any(color > 1):
        raise InputError(f"The colour of segment '{spec.name}' must be three values in 0..1; got {spec.color_rgb!r}.")
    return spec


def _new_segment(spec: SegmentSpec, label_value: int, labelmap):
    segment = slicer.vtkSegment()
    segment.SetName(spec.name)
    segment.SetColor(*[float(c) for c in spec.color_rgb])
    segment.SetLabelValue(int(label_value))
    if spec.terminology is not None:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), spec.terminology.serialized())
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
    return segment


# --------------------------------------------------------------------------------------------------------------------
# Segmentations
# --------------------------------------------------------------------------------------------------------------------

def _ijk_to_ras_matrix(volume_node) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


def _grid_shape_kji(volume_node) -> Tuple[int, int, int]:
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise InputError("The reference volume has no image data.")
    i, j, k = image.GetDimensions()
    return k, j, i


def _check_on_grid(array: np.ndarray, reference_volume_node, what: str) -> None:
    expected = _grid_shape_kji(reference_volume_node)
    if array.shape != expected:
        raise InputError(f"The {what} has shape {array.shape} (k, j, i), but the reference volume "
                         f"'{reference_volume_node.GetName()}' has {expected}; it must be on the same voxel grid.")


def _vtk_scalar_type(max_value: int) -> int:
    if max_value <= 255:
        return vtk.VTK_UNSIGNED_CHAR
    if max_value <= 65535:
        return vtk.VTK_UNSIGNED_SHORT
    return vtk.VTK_INT


def _nonzero_range(array_kji: np.ndarray, axis: int) -> Tuple[int, int]:
    other_axes = tuple(a for a in range(3) if a != axis)
    indices = np.flatnonzero(array_kji.any(axis=other_axes))
    return int(indices[0]), int(indices[-1])


def _oriented_image(array_kji: np.ndarray, ijk_to_ras: vtk.vtkMatrix4x4):
    """The array's non-zero bounding box as a vtkOrientedImageData on the grid (extent = voxel indices)."""
    (k0, k1), (j0, j1), (i0, i1) = [_nonzero_range(array_kji, axis) for axis in range(3)]
    box = np.ascontiguousarray(array_kji[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1])
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.SetImageToWorldMatrix(ijk_to_ras)
    image.AllocateScalars(_vtk_scalar_type(int(box.max())), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = box.ravel()
    return image


def _integer_labels(labelmap_kji, what: str) -> np.ndarray:
    array = np.asarray(labelmap_kji)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"The {what} must hold integer labels; got dtype {array.dtype}.")
    if array.size and array.min() < 0:
        raise InputError(f"The {what} has negative labels (min {array.min()}); labels must be >= 0.")
    if array.size and array.max() > np.iinfo(np.int32).max:
        raise InputError(f"The {what} has labels above {np.iinfo(np.int32).max} (max {array.max()}).")
    return array


def _present_labels(labels: np.ndarray) -> set:
    """The non-zero labels in the array (a lookup table where labels are small: faster than np.unique)."""
    top = int(labels.max()) if labels.size else 0
    if top > 65535:
        return set(np.unique(labels).tolist()) - {0}
    seen = np.zeros(top + 1, bool)
    seen[labels.ravel()] = True
    return set(np.flatnonzero(seen).tolist()) - {0}


def add_segmentation_from_labelmap(labelmap_kji: np.ndarray, reference_volume_node,
                                   segments: Mapping[int, Union[SegmentSpec, str]], name: str,
                                   show_3d: bool = False):
    """A new segmentation node with one segment per label of ``segments`` present in the labelmap.

    ``labelmap_kji`` holds integer labels on the reference volume's voxel grid (0 = background). Segments share one
    labelmap (labels must not overlap; add overlapping ones with ``add_segment_from_mask``) and keep their label value
    (``segment.GetLabelValue()``). Labels of ``segments`` absent from the labelmap get no segment; their names are
    recorded in the node attribute ``ABSENT_SEGMENTS_ATTRIBUTE`` (read with ``absent_segment_names``). A label in the
    labelmap that ``segments`` does not describe is an error. The reference geometry is the volume's (needed for DICOM
    SEG export) and the node sits under the volume's parent transform. ``show_3d`` also makes closed surfaces.
    """
    scene = _scene_of(reference_volume_node, "reference volume")
    labels = _integer_labels(labelmap_kji, "labelmap")
    _check_on_grid(labels, reference_volume_node, "labelmap")
    specs = _segment_specs(segments)
    present = _present_labels(labels)
    undescribed = sorted(present - set(specs))
    if undescribed:
        raise InputError(f"The labelmap has labels {undescribed} that no segment describes "
                         f"(described: {sorted(specs)}).")

    segmentation_node = slicer.vtkMRMLSegmentationNode()
    segmentation_node.SetName(name)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    if present:
        shared_labelmap = _oriented_image(labels, _ijk_to_ras_matrix(reference_volume_node))
        segmentation = segmentation_node.GetSegmentation()
        for label in sorted(present):
            if not segmentation.AddSegment(_new_segment(specs[label], label, shared_labelmap), ""):
                raise RecognitionError(f"Could not add segment '{specs[label].name}' to '{name}'.")
    absent = [specs[label].name for label in sorted(set(specs) - present)]
    segmentation_node.SetAttribute(ABSENT_SEGMENTS_ATTRIBUTE, json.dumps(absent))
    if show_3d and present:
        segmentation_node.CreateClosedSurfaceRepresentation()

    with NewNodes(scene):
        scene.AddNode(segmentation_node)
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    return segmentation_node


def _segment_specs(segments: Mapping[int, Union[SegmentSpec, str]]) -> Dict[int, SegmentSpec]:
    if not isinstance(segments, Mapping) or not segments:
        raise InputError("segments must be a non-empty mapping {label: SegmentSpec or name}.")
    specs = {}
    for index, (label, value) in enumerate(sorted(segments.items())):
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 1:
            raise InputError(f"Segment labels must be integers >= 1; got {label!r}.")
        specs[int(label)] = segment_spec(value, fallback_index=index)
    return specs


def absent_segment_names(segmentation_node) -> List[str]:
    """Names of the requested segments that ``add_segmentation_from_labelmap`` skipped because they were empty."""
    return json.loads(segmentation_node.GetAttribute(ABSENT_SEGMENTS_ATTRIBUTE) or "[]")


def add_segment_from_mask(segmentation_node, mask_kji: np.ndarray, reference_volume_node,
                          spec: Union[SegmentSpec, str]) -> str:
    """Add one segment from a binary mask on the reference grid (e.g. one nodule); returns the new segment's ID.

    The segment gets its own labelmap layer, so it may overlap existing segments. If the segmentation has closed
    surfaces, the new segment gets one too.
    """
    mask = _integer_labels(mask_kji, "mask")
    _check_on_grid(mask, reference_volume_node, "mask")
    if mask.size and mask.max() > 1:
        raise InputError(f"The mask must be binary (0/1 or bool); it has values up to {mask.max()}.")
    segmentation = segmentation_node.GetSegmentation()
    resolved = segment_spec(spec, fallback_index=segmentation.GetNumberOfSegments())
    if not mask.any():
        raise InputError(f"The mask for segment '{resolved.name}' is empty.")
    labelmap = _oriented_image(mask.astype(np.uint8), _ijk_to_ras_matrix(reference_volume_node))
    segment = _new_segment(resolved, 1, labelmap)
    if not segmentation.AddSegment(segment, ""):
        raise RecognitionError(f"Could not add segment '{resolved.name}' to '{segmentation_node.GetName()}'.")
    return segmentation.GetSegmentIdBySegment(segment)


def segment_mask(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """The segment as a uint8 0/1 array (k, j, i) on the reference volume's voxel grid.

    Reads the segment's own label value in its (possibly shared, possibly cropped) labelmap, so the result does not
    depend on label renumbering. The segmentation and the volume must share their parent transform.
    """
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"The segmentation '{segmentation_node.GetName()}' has no segment with ID {segment_id!r}.")
    if segmentation_node.GetTransformNodeID() != reference_volume_node.GetTransformNodeID():
        raise InputError(f"The segmentation '{segmentation_node.GetName()}' and the volume "
                         f"'{reference_volume_node.GetName()}' are under different transforms.")
    shape = _grid_shape_kji(reference_volume_node)
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, labelmap, False):
        raise RecognitionError(f"Could not read the labelmap of segment '{segment.GetName()}'.")
    if labelmap.IsEmpty() or labelmap.GetPointData().GetScalars() is None:
        return np.zeros(shape, np.uint8)
    reference_grid = slicer.vtkOrientedImageData()
    reference_grid.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    reference_grid.SetImageToWorldMatrix(_ijk_to_ras_matrix(reference_volume_node))
    on_grid = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference_grid, on_grid, False, False)
    values = numpy_support.vtk_to_numpy(on_grid.GetPointData().GetScalars()).reshape(shape)
    return (values == segment.GetLabelValue()).astype(np.uint8)


def replace_segment_mask(segmentation_node, segment_id: str, mask_kji: np.ndarray, reference_volume_node) -> None:
    """Replace one segment's voxels by a binary mask on the reference grid (e.g. the resected part after the
    resection plane moved); other segments, even those sharing its labelmap layer, keep theirs."""
    mask = _integer_labels(mask_kji, "mask")
    _check_on_grid(mask, reference_volume_node, "mask")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"The segmentation '{segmentation_node.GetName()}' has no segment with ID {segment_id!r}.")
    if not mask.any():
        raise InputError(f"The new mask for segment '{segment.GetName()}' is empty.")
    labelmap = _oriented_image(mask.astype(np.uint8, copy=False), _ijk_to_ras_matrix(reference_volume_node))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RecognitionError(f"Could not update segment '{segment.GetName()}'.")


def segment_surface_mesh(segmentation_node, segment_id: str, max_triangles: int = 20000
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """The segment's closed surface (as shown in 3D) as (points RAS mm (N, 3), triangles (M, 3)), decimated to about
    ``max_triangles`` so that a report or preview can draw it quickly."""
    if not segmentation_node.CreateClosedSurfaceRepresentation():
        raise RecognitionError(f"Could not make the 3D surfaces of '{segmentation_node.GetName()}'.")
    surface = segmentation_node.GetClosedSurfaceInternalRepresentation(segment_id)
    if surface is None or surface.GetNumberOfPolys() == 0:
        raise InputError(f"Segment {segment_id!r} of '{segmentation_node.GetName()}' has no surface.")
    triangles = vtk.vtkTriangleFilter()
    triangles.SetInputData(surface)
    triangles.Update()
    mesh = triangles.GetOutput()
    if mesh.GetNumberOfPolys() > max_triangles:
        decimate = vtk.vtkQuadricDecimation()
        decimate.SetInputData(mesh)
        decimate.SetTargetReduction(1.0 - max_triangles / mesh.GetNumberOfPolys())
        decimate.Update()
        mesh = decimate.GetOutput()
    points = numpy_support.vtk_to_numpy(mesh.GetPoints().GetData()).astype(float)
    cells = numpy_support.vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return points, cells.astype(np.int64)


def export_segment_surfaces(segmentation_node, directory, file_format: str = "STL") -> List[Path]:
    """Write each segment's closed surface to ``directory`` (STL: one file per segment; OBJ: one file with
    materials), in LPS as Slicer writes them for 3D printing and other software; returns the files written."""
    file_format = file_format.upper()
    if file_format not in ("STL", "OBJ"):
        raise InputError(f"Surfaces are exported as STL or OBJ; got {file_format!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        raise InputError(f"The segmentation '{segmentation_node.GetName()}' has no segments to export.")
    before = {path: path.stat().st_mtime_ns for path in directory.iterdir()}
    logic = slicer.modules.segmentations.logic()
    if not logic.ExportSegmentsClosedSurfaceRepresentationToFiles(str(directory), segmentation_node, None,
                                                                  file_format, True, 1.0, False):
        raise RecognitionError(f"Could not export the surfaces of '{segmentation_node.GetName()}' to {directory}.")
    return sorted(path for path in directory.iterdir() if before.get(path) != path.stat().st_mtime_ns)


# --------------------------------------------------------------------------------------------------------------------
# Markups (input in LPS mm; stored in RAS)
# --------------------------------------------------------------------------------------------------------------------

def _add_markups_node(scene, class_name: str, name: str, locked: bool):
    """A new markups node in the scene with its display node; callers fill it inside a ``NewNodes`` block.

    Markups are added before they are filled because line measurements need the scene (they log errors otherwise).
    """
    node = scene.AddNewNodeByClass(class_name, name)
    node.CreateDefaultDisplayNodes()
    node.SetLocked(bool(locked))
    return node


def _texts(values: Optional[Sequence[str]], count: int, default, what: str) -> List[str]:
    if values is None:
        return [default(index) for index in range(count)]
    values = [str(value) for value in values]
    if len(values) != count:
        raise InputError(f"{len(values)} {what} were given for {count} points.")
    return values


def add_point_list(points_lps_mm, name: str, labels: Optional[Sequence[str]] = None,
                   descriptions: Optional[Sequence[str]] = None, locked: bool = True, scene=None):
    """A point list (fiducials) from points in LPS mm, with a label and a description per point."""
    scene = _scene_or_default(scene)
    points_ras = lps_to_ras(_points_array(points_lps_mm, "points_lps_mm"))
    point_labels = _texts(labels, len(points_ras), lambda index: str(index + 1), "labels")
    point_descriptions = _texts(descriptions, len(points_ras), lambda index: "", "descriptions")
    with NewNodes(scene):
        node = _add_markups_node(scene, "vtkMRMLMarkupsFiducialNode", name, locked)
        was_modifying = node.StartModify()  # one update for all points
        for point, label, description in zip(points_ras, point_labels, point_descriptions):
            index = node.AddControlPoint(vtk.vtkVector3d(*point), label)
            node.SetNthControlPointDescription(index, description)
        node.EndModify(was_modifying)
    return node


def add_roi(center_lps_mm, size_mm, name: str, description: str = "", locked: bool = True, scene=None):
    """An axis-aligned box (ROI) from its centre in LPS mm and its edge lengths along x, y, z in mm.

    The description goes on the ROI's control point (markups overwrite the node description with measurements).
    """
    scene = _scene_or_default(scene)
    center_ras = lps_to_ras(three_numbers(center_lps_mm, "center_lps_mm"))
    size = three_numbers(size_mm, "size_mm")
    if np.any(size <= 0):
        raise InputError(f"size_mm must be positive; got {size.tolist()}.")
    with NewNodes(scene):
        node = _add_markups_node(scene, "vtkMRMLMarkupsROINode", name, locked)
        node.SetCenter(*center_ras)
        node.SetSize(*size)
        node.SetNthControlPointDescription(0, description)
    return node


def add_line(start_lps_mm, end_lps_mm, name: str, description: str = "", locked: bool = True, scene=None):
    """A line (e.g. a measured diameter) between two points in LPS mm; its length is shown by Slicer."""
    scene = _scene_or_default(scene)
    start_ras = lps_to_ras(three_numbers(start_lps_mm, "start_lps_mm"))
    end_ras = lps_to_ras(three_numbers(end_lps_mm, "end_lps_mm"))
    with NewNodes(scene):
        node = _add_markups_node(scene, "vtkMRMLMarkupsLineNode", name, locked)
        for point in (start_ras, end_ras):
            index = node.AddControlPoint(vtk.vtkVector3d(*point))
            node.SetNthControlPointDescription(index, description)
    return node


def add_curve(points_lps_mm, name: str, description: str = "", locked: bool = True, scene=None):
    """An open curve through points in LPS mm (e.g. a vessel branch's centreline); its length is shown by Slicer."""
    scene = _scene_or_default(scene)
    points_ras = lps_to_ras(_points_array(points_lps_mm, "points_lps_mm"))
    if len(points_ras) < 2:
        raise InputError(f"A curve needs at least two points; got {len(points_ras)}.")
    with NewNodes(scene):
        node = _add_markups_node(scene, "vtkMRMLMarkupsCurveNode", name, locked)
        was_modifying = node.StartModify()
        for point in points_ras:
            node.AddControlPoint(vtk.vtkVector3d(*point))
        node.EndModify(was_modifying)
        node.SetDescription(description)
    return node


def add_plane(origin_lps_mm, normal_lps, name: str, description: str = "", locked: bool = True, scene=None):
    """A plane (e.g. a resection cut) through a point in LPS mm with a normal direction in LPS (any length)."""
    scene = _scene_or_default(scene)
    origin_ras = lps_to_ras(three_numbers(origin_lps_mm, "origin_lps_mm"))
    normal = three_numbers(normal_lps, "normal_lps")
    length = float(np.linalg.norm(normal))
    if length == 0.0:
        raise InputError("normal_lps must not be the zero vector.")
    normal_ras = lps_to_ras(normal / length)
    with NewNodes(scene):
        node = _add_markups_node(scene, "vtkMRMLMarkupsPlaneNode", name, locked)
        node.SetOrigin(*origin_ras)
        node.SetNormal(*normal_ras)
        node.SetNthControlPointDescription(0, description)
    return node


@dataclass(frozen=True)
class Finding:
    """One finding to show: a labelled point, optionally a box around it and a measured diameter (all LPS mm)."""
    label: str
    center_lps_mm: Sequence[float]
    description: str = ""
    box_size_mm: Optional[Sequence[float]] = None
    diameter_endpoints_lps_mm: Optional[Tuple[Sequence[float], Sequence[float]]] = None


@dataclass
class FindingNodes:
    """What ``add_findings`` made: a subject hierarchy folder holding one point list and a box/line per finding."""
    folder_item_id: int
    points: object
    rois: list = field(default_factory=list)
    lines: list = field(default_factory=list)

    @property
    def nodes(self) -> list:
        return [self.points, *self.rois, *self.lines]


def add_findings(findings: Sequence[Finding], name: str, parent_item_id: Optional[int] = None,
                 scene=None) -> FindingNodes:
    """One point list of all findings plus a box and a diameter line per finding that has them, in one folder.

    The folder is named ``name`` and placed under ``parent_item_id`` (a subject hierarchy item; default: the scene).
    Move it with ``place_under_study([result.folder_item_id], ...)``.
    """
    scene = _scene_or_default(scene)
    findings = list(findings)
    for finding in findings:
        if not isinstance(finding, Finding):
            raise InputError(f"Findings must be Finding objects; got {type(finding).__name__}.")
    with NewNodes(scene):
        hierarchy = scene.GetSubjectHierarchyNode()
        folder = hierarchy.CreateFolderItem(parent_item_id or hierarchy.GetSceneItemID(), name)
        result = FindingNodes(folder, add_point_list([f.center_lps_mm for f in findings], name,
                                                     labels=[f.label for f in findings],
                                                     descriptions=[f.description for f in findings], scene=scene))
        for finding in findings:
            if finding.box_size_mm is not None:
                result.rois.append(add_roi(finding.center_lps_mm, finding.box_size_mm, f"{finding.label} box",
                                           finding.description, scene=scene))
            if finding.diameter_endpoints_lps_mm is not None:
                start, end = finding.diameter_endpoints_lps_mm
                result.lines.append(add_line(start, end, f"{finding.label} diameter", finding.description,
                                             scene=scene))
        for node in result.nodes:
            place_node(hierarchy, node, folder)
    return result


# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------

def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _column_array(name: str, values: list):
    """A typed VTK column: int if all values are integers (int32 range), double if all are numbers or missing
    (missing -> NaN), else string (missing -> '')."""
    present = [value for value in values if value is not None]
    int32 = np.iinfo(np.int32)
    if present and len(present) == len(values) and all(_is_integer(v) and int32.min <= v <= int32.max
                                                       for v in present):
        array, convert = vtk.vtkIntArray(), int
    elif present and all(_is_number(v) for v in present):
        array, convert = vtk.vtkDoubleArray(), float
        values = [np.nan if value is None else value for value in values]
    else:
        array, convert = vtk.vtkStringArray(), str
        values = ["" if value is None else value for value in values]
    array.SetName(name)
    array.SetNumberOfValues(len(values))
    for index, value in enumerate(values):
        array.SetValue(index, convert(value))
    return array


def _columns_from(data) -> Dict[str, list]:
    if isinstance(data, Mapping):
        columns = {str(name): list(values) for name, values in data.items()}
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise InputError(f"Table columns have different lengths: "
                             f"{ {name: len(values) for name, values in columns.items()} }.")
        return columns
    rows = list(data)
    for row in rows:
        if not isinstance(row, Mapping):
            raise InputError(f"Table rows must be dicts {{column: value}}; got {type(row).__name__}.")
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {str(name): [row.get(name) for row in rows] for name in names}


def add_table(data: Union[Sequence[Mapping[str, object]], Mapping[str, Sequence]], name: str,
              units: Optional[Mapping[str, str]] = None, descriptions: Optional[Mapping[str, str]] = None,
              scene=None):
    """A table node from rows (list of dicts) or columns ({name: values}), with typed columns, units and descriptions.

    Column types: int, double or string, from the values (see ``_column_array``). ``units`` and ``descriptions`` map
    column names to a unit label ('mL', 'mm', 'HU') and a sentence; they are saved in the table's schema file.
    """
    scene = _scene_or_default(scene)
    columns = _columns_from(data)
    for what, mapping in (("units", units or {}), ("descriptions", descriptions or {})):
        unknown = sorted(set(mapping) - set(columns))
        if unknown:
            raise InputError(f"{what} name columns that the table does not have: {unknown}.")
    table_node = slicer.vtkMRMLTableNode()
    table_node.SetName(name)
    for column_name, values in columns.items():
        table_node.AddColumn(_column_array(column_name, values))
    for column_name, unit in (units or {}).items():
        table_node.SetColumnUnitLabel(column_name, unit)
    for column_name, description in (descriptions or {}).items():
        table_node.SetColumnDescription(column_name, description)
    with NewNodes(scene):
        scene.AddNode(table_node)
    return table_node


def write_table_csv(table_node, path) -> Path:
    """Write the table as CSV (or TSV for a .tsv path) plus Slicer's schema file (types, units) beside it."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".tsv"):
        raise InputError(f"A table file must end in .csv or .tsv; got {path.name!r}.")
    if not path.parent.is_dir():
        raise InputError(f"The folder {str(path.parent)!r} does not exist.")
    storage_node = slicer.vtkMRMLTableStorageNode()
    storage_node.SetFileName(str(path))
    if not storage_node.WriteData(table_node):
        raise RecognitionError(f"Could not write the table '{table_node.GetName()}' to {str(path)!r}.")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Subject hierarchy and provenance
# --------------------------------------------------------------------------------------------------------------------

def study_item(hierarchy, volume_node) -> Optional[int]:
    """The subject hierarchy study item the volume belongs to (e.g. loaded from DICOM), or None."""
    study_level = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    item = hierarchy.GetItemByDataNode(volume_node)
    scene_item = hierarchy.GetSceneItemID()
    while item and item != scene_item:
        if hierarchy.GetItemLevel(item) == study_level:
            return item
        item = hierarchy.GetItemParent(item)
    return None


def place_node(hierarchy, node, parent_item: int) -> int:
    """Put ``node``'s subject hierarchy item under ``parent_item``, creating the item when there is none (headless,
    no plugin creates items for new nodes); returns the item."""
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        return hierarchy.CreateItem(parent_item, node)
    hierarchy.SetItemParent(item, parent_item)
    return item


def _data_nodes_under(hierarchy, item: int) -> list:
    items = vtk.vtkIdList()
    hierarchy.GetItemChildren(item, items, True)
    nodes = [hierarchy.GetItemDataNode(item)] + [hierarchy.GetItemDataNode(items.GetId(index))
                                                 for index in range(items.GetNumberOfIds())]
    return [node for node in nodes if node is not None]


def place_under_study(nodes_or_items: Sequence, input_volume_node, folder_name: Optional[str] = None) -> int:
    """Put outputs where the user looks for them and record what they were computed from; returns the parent item.

    The parent is the input volume's study (when it came from DICOM), else the input's own parent (a folder or the
    scene); with ``folder_name`` a new folder of that name is made there and used instead. Entries are output nodes
    or subject hierarchy item IDs (e.g. ``add_findings(...).folder_item_id``). Every output data node gets a
    ``INPUT_VOLUME_REFERENCE_ROLE`` reference to the input and is put under the input's parent transform (outputs are
    computed in the input's coordinates). The input volume itself is not changed.
    """
    scene = _scene_of(input_volume_node, "input volume")
    _check_outputs(scene, nodes_or_items, input_volume_node)
    with NewNodes(scene):
        hierarchy = scene.GetSubjectHierarchyNode()
        parent = study_item(hierarchy, input_volume_node)
        if parent is None:
            input_item = hierarchy.GetItemByDataNode(input_volume_node)
            parent = hierarchy.GetItemParent(input_item) if input_item else hierarchy.GetSceneItemID()
        if folder_name:
            parent = hierarchy.CreateFolderItem(parent, folder_name)
        for entry in nodes_or_items:
            if isinstance(entry, (int, np.integer)):
                item = int(entry)
                hierarchy.SetItemParent(item, parent)
            else:
                item = place_node(hierarchy, entry, parent)
            for node in _data_nodes_under(hierarchy, item):
                _record_provenance(node, input_volume_node)
    return parent


def _check_outputs(scene, nodes_or_items: Sequence, input_volume_node) -> None:
    """Reject bad entries before anything is changed (changes to existing outputs are not undone by ``NewNodes``)."""
    items = _item_parents(scene)
    for entry in nodes_or_items:
        if isinstance(entry, (int, np.integer)):
            if int(entry) not in items:
                raise InputError(f"There is no subject hierarchy item {int(entry)}.")
            hierarchy = _existing_subject_hierarchy(scene)
            if any(node is input_volume_node for node in _data_nodes_under(hierarchy, int(entry))):
                raise InputError(f"Subject hierarchy item {int(entry)} holds the input volume; it is not an output.")
        elif entry is input_volume_node:
            raise InputError("The input volume cannot be placed as its own output.")
        elif not hasattr(entry, "GetScene") or entry.GetScene() is not scene:
            raise InputError(f"Output {entry!r} is not a node in the input volume's scene.")


def _record_provenance(output_node, input_volume_node) -> None:
    output_node.SetNodeReferenceID(INPUT_VOLUME_REFERENCE_ROLE, input_volume_node.GetID())
    if output_node.IsA("vtkMRMLTransformableNode"):
        output_node.SetAndObserveTransformNodeID(input_volume_node.GetTransformNodeID())
