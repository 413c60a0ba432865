"""Run a catalogue segmentation model on a CT: the model's preprocessing, sliding-window inference, and the labels
back on the input's voxel grid.

Networks see volumes as MONAI does: channel first, axes (I, J, K) of an image reoriented to RAS (``LoadImage`` +
``Orientation("RAS")``), so that the MONAI model zoo's bundles and our own models share one convention. The
reorientation only permutes and flips axes; the way back is a nearest-neighbour resampling in physical space onto
the input grid, so any input direction (oblique, left-handed) is handled by the same path.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk

from .errors import InputError, ModelError
from .inference import SlidingWindowRunner
from .preprocessing import preprocess_for_model, restore_to_input
from .progress import Progress, as_progress

NETWORK_ORIENTATION = "RAS"  # the axis directions of the (I, J, K) array a network receives


def to_network_array(image: sitk.Image) -> np.ndarray:
    """The (I, J, K) array of ``image`` reoriented to RAS, as MONAI's LoadImage + Orientation("RAS") give."""
    oriented = sitk.DICOMOrient(image, NETWORK_ORIENTATION)
    return sitk.GetArrayFromImage(oriented).transpose(2, 1, 0)


def from_network_array(array_ijk: np.ndarray, network_input: sitk.Image) -> sitk.Image:
    """The inverse of ``to_network_array``: an (I, J, K) array placed on the RAS-reoriented grid of ``network_input``."""
    oriented = sitk.DICOMOrient(network_input, NETWORK_ORIENTATION)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    image.CopyInformation(oriented)
    return image


def predict_labels(image: sitk.Image, card, network, device="auto", sw_batch_size: int = 2, overlap: float = 0.25,
                   progress: Optional[Progress] = None) -> sitk.Image:
    """Labels of a segmentation ``card``'s ``network`` on the grid of ``image`` (values = the card's label keys).

    ``image`` is a CT in HU (LPS geometry); the card gives spacing, intensity normalisation and ROI size.
    """
    progress = as_progress(progress)
    if card.task != "segmentation":
        raise ModelError(f"Model '{card.id}' is a {card.task} model; a segmentation model is needed here.")
    if card.roi_size is None or card.intensity is None:
        raise ModelError(f"Model '{card.id}' does not state its ROI size and intensity normalisation.")
    if image.GetDimension() != 3:
        raise InputError(f"A 3D CT is needed; this image is {image.GetDimension()}D.")
    prepared, inverse = preprocess_for_model(image, card.spacing_mm, card.intensity, progress.sub(0.0, 0.15))
    runner = SlidingWindowRunner(network, roi_size=card.roi_size, sw_batch_size=sw_batch_size, overlap=overlap,
                                 device=device)
    labels_ijk = runner(to_network_array(prepared), output="labels", progress=progress.sub(0.15, 0.9))
    progress.report(0.9, "Resampling the labels onto the input grid")
    labels = restore_to_input(from_network_array(labels_ijk, prepared), inverse, interpolator="nearest")
    progress.report(1.0, "Labels ready")
    return labels


def predict_nodules(image: sitk.Image, card, network, device="auto", progress: Optional[Progress] = None) -> list:
    """Nodule candidates of a detection ``card``'s ``network`` on a CT: [(center_lps_mm, diameter_mm, score)],
    best first. Boxes come back in the network array's voxels and are mapped to LPS through the same reoriented grid
    the network saw; the diameter is the box's mean extent in mm."""
    import torch

    from .device import choose_device

    progress = as_progress(progress)
    if card.task != "detection":
        raise ModelError(f"Model '{card.id}' is a {card.task} model; a detection model is needed here.")
    prepared, _ = preprocess_for_model(image, card.spacing_mm, card.intensity, progress.sub(0.0, 0.15))
    oriented = sitk.DICOMOrient(prepared, NETWORK_ORIENTATION)
    array = to_network_array(prepared)
    device = choose_device(device) if isinstance(device, str) else device
    network = network.to(device).eval()
    roi_size = card.roi_size or array.shape
    network.set_sliding_window(roi_size, overlap=0.25, sw_batch_size=1, device=device)
    use_inferer = any(n > r for n, r in zip(array.shape, roi_size))
    progress.report(0.2, "Detecting nodules")
    result = network([torch.as_tensor(array[None], device=device)], use_inferer=use_inferer, masks=False)[0]
    boxes = result["boxes"].detach().cpu().numpy().reshape(-1, 2, 3)
    spacing = np.array(oriented.GetSpacing())
    nodules = []
    for box, score in zip(boxes, result["scores"].detach().cpu().numpy()):
        center = oriented.TransformContinuousIndexToPhysicalPoint([float(v) for v in box.mean(axis=0)])
        nodules.append((tuple(center), float(np.mean((box[1] - box[0]) * spacing)), float(score)))
    progress.report(1.0, f"{len(nodules)} candidates")
    return sorted(nodules, key=lambda nodule: -nodule[2])
