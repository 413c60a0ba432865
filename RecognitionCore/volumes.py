"""The one geometry path: volume node (RAS) <-> SimpleITK image (LPS) <-> numpy (k, j, i) <-> MONAI MetaTensor.

Slicer's scene is in RAS; ITK/SimpleITK and DICOM are in LPS; MONAI's MetaTensor carries a RAS affine over (i, j, k)
(the same convention as ``monai.transforms.LoadImage``). Every conversion between these lives here and is exact:
arrays are copied as they are (no resampling, no axis flips), only the index-to-physical matrix is re-expressed.
Left-handed (det < 0) and oblique directions are kept as they are.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from slicer import util

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def lps_to_ras(points_lps_mm) -> np.ndarray:
    """Points (N, 3) or (3,) from LPS to RAS (and back: the map is its own inverse)."""
    return np.asarray(points_lps_mm, dtype=float) * np.array([-1.0, -1.0, 1.0])


ras_to_lps = lps_to_ras


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as numpy."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return util.arrayFromVTKMatrix(matrix)


def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a SimpleITK image (LPS direction, spacing and origin)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    return matrix


def set_sitk_geometry_from_ijk_to_ras(image: sitk.Image, ijk_to_ras: np.ndarray) -> sitk.Image:
    """Give ``image`` the spacing, LPS direction and origin that ``ijk_to_ras`` describes (in place; returned)."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    spacing_mm = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    if np.any(spacing_mm <= 0):
        raise InputError(f"The volume's IJK-to-RAS matrix has a zero-length axis (spacing {spacing_mm.tolist()} mm).")
    image.SetSpacing(spacing_mm.tolist())
    image.SetDirection((LPS_TO_RAS @ (ijk_to_ras[:3, :3] / spacing_mm)).flatten().tolist())
    image.SetOrigin((LPS_TO_RAS @ ijk_to_ras[:3, 3]).tolist())
    return image


def volume_array(volume_node) -> np.ndarray:
    """A copy of the node's voxels in (k, j, i) order; raises InputError if the node holds no image."""
    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "None"
        raise InputError(f"Volume '{name}' holds no image data.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(f"Volume '{volume_node.GetName()}' has {image_data.GetNumberOfScalarComponents()} "
                         "components per voxel; a single-component (grayscale) CT is needed.")
    return util.arrayFromVolume(volume_node).copy()


def volume_node_to_sitk(volume_node) -> sitk.Image:
    """The node as a SimpleITK image in LPS with the same voxels (copied) and the same physical placement.

    A transform applied to the node in the scene (a parent transform) is not applied: the node's own grid is used.
    """
    image = sitk.GetImageFromArray(volume_array(volume_node))
    return set_sitk_geometry_from_ijk_to_ras(image, ijk_to_ras_matrix(volume_node))


def new_volume_node(name: str, node_class: str = "vtkMRMLScalarVolumeNode"):
    """A volume node that is not in any scene yet (outputs are built first, added to the scene at the end)."""
    volume_node = getattr(slicer, node_class)()
    volume_node.SetName(name)
    return volume_node


def update_volume_node_from_sitk(volume_node, image: sitk.Image):
    """Set the node's voxels (copied, dtype kept) and geometry from ``image``; returns the node."""
    if image.GetDimension() != 3:
        raise InputError(f"A volume node needs a 3D image; this image is {image.GetDimension()}D.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("A volume node needs a single-component (grayscale) image.")
    volume_node.SetIJKToRASMatrix(util.vtkMatrixFromArray(ijk_to_ras_from_sitk(image)))
    util.updateVolumeFromArray(volume_node, sitk.GetArrayFromImage(image))
    return volume_node


def sitk_to_volume_node(image: sitk.Image, name: str = "Volume", node_class: str = "vtkMRMLScalarVolumeNode",
                        scene=None):
    """A new volume node holding ``image``; added to ``scene`` (with display nodes) when a scene is given."""
    volume_node = update_volume_node_from_sitk(new_volume_node(name, node_class), image)
    if scene is not None:
        scene.AddNode(volume_node)
        volume_node.CreateDefaultDisplayNodes()
    return volume_node


def array_to_sitk(array_kji: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK image of ``array_kji`` on the grid of ``reference`` (shape must match)."""
    array_kji = np.asarray(array_kji)
    expected_shape = tuple(reversed(reference.GetSize()))
    if array_kji.shape != expected_shape:
        raise InputError(f"Array shape {array_kji.shape} does not match the reference grid {expected_shape} (k, j, i).")
    image = sitk.GetImageFromArray(array_kji)
    image.CopyInformation(reference)
    return image


def sitk_to_metatensor(image: sitk.Image, dtype=None):
    """A channel-first float32 MetaTensor (1, I, J, K) with the RAS affine over (i, j, k), as MONAI's LoadImage gives.

    torch and MONAI are imported here, not at the top, so that the rest of the geometry path works without them.
    """
    import torch
    from monai.data import MetaTensor

    array_ijk = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)
    tensor = torch.as_tensor(np.ascontiguousarray(array_ijk)).to(dtype or torch.float32)[None]
    return MetaTensor(tensor, affine=torch.as_tensor(ijk_to_ras_from_sitk(image), dtype=torch.float64))


def metatensor_to_sitk(tensor, channel: int = 0) -> sitk.Image:
    """The inverse of ``sitk_to_metatensor``: one channel of a (C, I, J, K) MetaTensor with a RAS affine."""
    array_ijk = tensor[channel].detach().cpu().numpy()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    return set_sitk_geometry_from_ijk_to_ras(image, np.asarray(tensor.affine, dtype=float))


def volume_node_to_metatensor(volume_node, dtype=None):
    return sitk_to_metatensor(volume_node_to_sitk(volume_node), dtype)


def physical_point_lps(image: sitk.Image, index_ijk) -> np.ndarray:
    """LPS position (mm) of a continuous voxel index (i, j, k)."""
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_ijk]))
