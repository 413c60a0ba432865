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
from .inference import SlidingWindowRunner, window_slices
from .preprocessing import check_same_grid, preprocess_for_model, resample_to_reference, restore_to_input
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


DETECTION_OVERLAP = 0.25  # MONAI's RetinaNet inference default (lung_nodule_ct_detection's inference.json too)
# Windows per forward pass. On the CPU PyTorch runs a single window's small 3D convolutions with its slow reference
# kernel (oneDNN only from a batch of 2 on): 3-4x the time per window. On a GPU a batch fills the device better.
DETECTION_WINDOWS_PER_PASS = 4


def predict_nodules(image: sitk.Image, card, network, device="auto", progress: Optional[Progress] = None,
                    roi_mask: Optional[sitk.Image] = None,
                    windows_per_pass: int = DETECTION_WINDOWS_PER_PASS) -> list:
    """Nodule candidates of a detection ``card``'s ``network`` on a CT: [(center_lps_mm, diameter_mm, score)],
    best first. Boxes come back in the network array's voxels and are mapped to LPS through the same reoriented grid
    the network saw; the diameter is the box's mean extent in mm.

    The windows, their overlap and their blending (a plain average) are those of MONAI's ``SlidingWindowInferer`` in
    its ``RetinaNetDetector``, and the boxes are decoded and selected by the detector's own box coder and selector
    (score threshold, top k per level, NMS): without ``roi_mask`` the result is that of :func:`predict_nodules_monai`
    (to float rounding: a batch of windows runs other convolution kernels).
    The work differs: ``windows_per_pass`` windows per forward pass, progress and cancel between passes, anchors
    decoded only where they score above the threshold, and with ``roi_mask`` (a mask on the grid of ``image``, e.g.
    the lungs) only the windows that hold some of it are run. On every voxel of the mask the network's outputs are
    then those of the whole-image run (a skipped window holds none); no box is anchored where no window ran.
    """
    import torch

    from .device import choose_device

    progress = as_progress(progress)
    if int(windows_per_pass) < 1:
        raise InputError(f"At least one window per pass is needed; got {windows_per_pass}.")
    prepared, oriented, array = _detector_input(image, card, progress.sub(0.0, 0.15))
    region = None
    if roi_mask is not None:
        check_same_grid(image, roi_mask, "ROI mask")
        region = to_network_array(_mask_on_grid(roi_mask, prepared))
        if not region.any():
            progress.report(1.0, "No region to search")
            return []
    device = choose_device(device) if isinstance(device, str) else device
    network = network.to(device).eval()
    with torch.no_grad():
        images, image_sizes = _detector_images(network, array, device)
        roi_size = tuple(card.roi_size or array.shape)
        cls_maps, box_maps, covered = _windowed_head_outputs(network, images, image_sizes[0], roi_size,
                                                             int(windows_per_pass), region, progress.sub(0.15, 0.95))
        boxes, scores = _select_boxes(network, images, image_sizes[0], cls_maps, box_maps, covered)
    nodules = _nodules_in_lps(boxes, scores, oriented)
    progress.report(1.0, f"{len(nodules)} candidates")
    return nodules


def predict_nodules_monai(image: sitk.Image, card, network, device="auto",
                          progress: Optional[Progress] = None) -> list:
    """The reference for :func:`predict_nodules`: the same candidates from plain MONAI, i.e. ``RetinaNetDetector``
    with its ``SlidingWindowInferer`` (one window per pass, MONAI's default) over the whole image, no progress."""
    import torch

    from .device import choose_device

    progress = as_progress(progress)
    prepared, oriented, array = _detector_input(image, card, progress.sub(0.0, 0.15))
    device = choose_device(device) if isinstance(device, str) else device
    network = network.to(device).eval()
    roi_size = card.roi_size or array.shape
    network.set_sliding_window(roi_size, overlap=DETECTION_OVERLAP, sw_batch_size=1, device=device)
    use_inferer = any(n > r for n, r in zip(array.shape, roi_size))
    progress.report(0.2, "Detecting nodules")
    result = network([torch.as_tensor(array[None], device=device)], use_inferer=use_inferer, masks=False)[0]
    nodules = _nodules_in_lps(result["boxes"], result["scores"], oriented)
    progress.report(1.0, f"{len(nodules)} candidates")
    return nodules


def _detector_input(image: sitk.Image, card, progress: Progress):
    """The model's preprocessing: (prepared image, its RAS-reoriented grid, the network's (I, J, K) array)."""
    if card.task != "detection":
        raise ModelError(f"Model '{card.id}' is a {card.task} model; a detection model is needed here.")
    if image.GetDimension() != 3:
        raise InputError(f"A 3D CT is needed; this image is {image.GetDimension()}D.")
    prepared, _ = preprocess_for_model(image, card.spacing_mm, card.intensity, progress)
    return prepared, sitk.DICOMOrient(prepared, NETWORK_ORIENTATION), to_network_array(prepared)


def _mask_on_grid(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``mask`` on the grid of ``reference``: every reference voxel that a mask voxel reaches into (linear
    interpolation above zero), so that thin parts of the mask are not lost on a coarser grid."""
    return resample_to_reference(sitk.Cast(mask != 0, sitk.sitkFloat32), reference, "linear", default_value=0.0) > 0


def _detector_images(network, array: np.ndarray, device):
    """The (1, 1, I, J, K) tensor the detector runs on (zero-padded at the end to its ``size_divisible``) and the
    unpadded size, as ``RetinaNetDetector`` prepares its input."""
    import torch
    from monai.apps.detection.utils.detector_utils import preprocess_images

    return preprocess_images([torch.as_tensor(array[None], device=device)], 3, network.size_divisible)


def _windowed_head_outputs(network, images, image_size, roi_size, windows_per_pass: int,
                           region: Optional[np.ndarray], progress: Progress):
    """Classification and box-regression maps per FPN level of ``images`` (1, C, I, J, K), each the average of the
    windows that cover it, and per level a (1, 1, i, j, k) boolean map of where any window ran.

    As MONAI: an image no larger than the ROI (``image_size``, before padding) runs whole in one pass; otherwise it
    is zero-padded symmetrically up to the ROI where smaller, each window's outputs are added at its position scaled
    by the level's zoom, and the padding is cut off again. ``region`` (a boolean (I, J, K) array of the unpadded
    image) drops the windows that hold none of it.
    """
    import torch
    import torch.nn.functional as F

    shape = list(images.shape[2:])
    if all(n <= r for n, r in zip(image_size, roi_size)):
        roi_size = tuple(shape)
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(shape, roi_size)]
    padded = F.pad(images, [v for pad in reversed(pads) for v in pad])
    windows = window_slices(padded.shape[2:], roi_size, DETECTION_OVERLAP)
    skipped = ""
    if region is not None:
        grown = np.zeros(padded.shape[2:], dtype=bool)
        grown[tuple(slice(low, low + n) for (low, _), n in zip(pads, region.shape))] = region
        kept = [window for window in windows if grown[window].any()]
        skipped = f" ({len(windows) - len(kept)} outside the search region skipped)"
        windows = kept
    cls_key, box_key = network.cls_key, network.box_reg_key
    sums, counts, zooms = None, None, None
    for first in range(0, len(windows), windows_per_pass):
        progress.report(first / len(windows), f"Detecting nodules: window {first + 1} of {len(windows)}{skipped}")
        chunk = windows[first:first + windows_per_pass]
        outputs = network.head_outputs(torch.cat([padded[(slice(None), slice(None), *window)] for window in chunk]))
        maps = list(outputs[cls_key]) + list(outputs[box_key])
        if sums is None:
            zooms = [[m.shape[2 + axis] / roi_size[axis] for axis in range(3)] for m in maps]
            sizes = [[int(n * z) for n, z in zip(padded.shape[2:], zoom)] for zoom in zooms]
            sums = [torch.zeros([1, m.shape[1], *size], dtype=m.dtype, device=m.device) for m, size in zip(maps, sizes)]
            counts = [torch.zeros([1, 1, *size], dtype=m.dtype, device=m.device) for m, size in zip(maps, sizes)]
        for level_map, total, count, zoom in zip(maps, sums, counts, zooms):
            for index, window in enumerate(chunk):
                target = tuple(slice(int(s.start * z), int(s.stop * z)) for s, z in zip(window, zoom))
                total[(slice(None), slice(None), *target)] += level_map[index:index + 1]
                count[(slice(None), slice(None), *target)] += 1
    progress.report(1.0, f"{len(windows)} windows run")
    if sums is None:
        return [], [], []
    averaged, covered = [], []
    for total, count, zoom in zip(sums, counts, zooms):
        cut = (slice(None), slice(None), *[slice(int(round(low * z)), int(round((low + n) * z)))
                                           for (low, _), n, z in zip(pads, shape, zoom)])
        averaged.append((total / count.clamp(min=1))[cut])
        covered.append((count > 0)[cut])
    levels = len(averaged) // 2
    return averaged[:levels], averaged[levels:], covered[:levels]


def _select_boxes(network, images, image_size, cls_maps, box_maps, covered):
    """Boxes (N, 6) and scores (N,) from the averaged head maps: ``RetinaNetDetector.postprocess_detections``, with
    only the anchors that a window covered and that score above the selector's threshold decoded."""
    import torch

    detector = network.detector
    selector = detector.box_selector
    if not cls_maps:
        return torch.zeros((0, 6)), torch.zeros((0,))
    anchors = detector.anchor_generator(images, cls_maps)[0]
    per_location = detector.num_anchors_per_loc
    boxes_per_level, logits_per_level, offset = [], [], 0
    for cls_map, box_map, where in zip(cls_maps, box_maps, covered):
        count = cls_map.shape[2:].numel() * per_location
        logits = _anchor_rows(cls_map, per_location)
        regression = _anchor_rows(box_map, per_location)
        level_anchors = anchors[offset:offset + count]
        offset += count
        scores = torch.sigmoid(logits.float()) if selector.apply_sigmoid else logits
        ran = where.reshape(-1, 1).expand(-1, per_location).reshape(-1)  # locations first, anchors last, as the rows
        index = torch.nonzero(ran & (scores > selector.score_thresh).any(dim=1)).squeeze(1)
        logits_per_level.append(logits[index])
        boxes_per_level.append(detector.box_coder.decode_single(regression[index].float(), level_anchors[index])
                               .to(logits.dtype))
    boxes, scores, _ = selector.select_boxes_per_image(boxes_per_level, logits_per_level, image_size)
    return boxes, scores


def _anchor_rows(level_map, per_location: int):
    """A (1, A * K, i, j, k) head map as (i * j * k * A, K) rows, in ``RetinaNetDetector._reshape_maps`` order."""
    channels = level_map.shape[1] // per_location
    rows = level_map.reshape(1, per_location, channels, *level_map.shape[2:]).permute(0, 3, 4, 5, 1, 2)
    return rows.reshape(-1, channels)


def _nodules_in_lps(boxes, scores, oriented: sitk.Image) -> list:
    """[(center_lps_mm, diameter_mm, score)] of network-array boxes on the RAS-reoriented grid, best first."""
    boxes = boxes.detach().cpu().numpy().reshape(-1, 2, 3)
    spacing = np.array(oriented.GetSpacing())
    nodules = []
    for box, score in zip(boxes, scores.detach().cpu().numpy()):
        center = oriented.TransformContinuousIndexToPhysicalPoint([float(v) for v in box.mean(axis=0)])
        nodules.append((tuple(center), float(np.mean((box[1] - box[0]) * spacing)), float(score)))
    return sorted(nodules, key=lambda nodule: -nodule[2])
