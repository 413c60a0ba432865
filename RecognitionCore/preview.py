"""PNG previews of a CT with overlays (axial, coronal, sagittal), for the command line's reports and the README.

Slices are shown as a radiologist expects: axial seen from the feet (patient's right on the image's left, anterior
up), coronal and sagittal with the head up, each with its physical aspect ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

# (hu_min, hu_max) display ranges
DISPLAY_WINDOWS_HU = {"lung": (-1350.0, 150.0), "soft_tissue": (-160.0, 240.0), "bone": (-450.0, 1050.0)}


def _reoriented(image: sitk.Image) -> sitk.Image:
    """The image on its closest LPS-aligned grid (axis permutations and flips only, no interpolation)."""
    return sitk.DICOMOrient(image, "LPS")


def _slices(array_kji: np.ndarray, index_ijk: Sequence[int]):
    i, j, k = index_ijk
    axial = array_kji[k]                      # rows: posterior downwards (j), columns: towards patient left (i)
    coronal = array_kji[::-1, j, :]           # rows: head at the top, columns: towards patient left
    sagittal = array_kji[::-1, :, i]          # rows: head at the top, columns: anterior to posterior
    return axial, coronal, sagittal


def save_preview_png(image: sitk.Image, path, overlays: Optional[dict] = None,
                     points_lps_mm: Optional[Sequence[Sequence[float]]] = None, center_lps_mm=None,
                     window_hu=DISPLAY_WINDOWS_HU["lung"], title: str = "") -> Path:
    """Write a 3-view PNG. ``overlays``: {name: (mask sitk.Image on the same physical space, (r, g, b) in 0..1)}.

    Views pass through ``center_lps_mm`` (default: the first point, else the image centre); points within half a
    slice of a view are drawn as circles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oriented = _reoriented(image)
    array = sitk.GetArrayViewFromImage(oriented).astype(np.float32)
    spacing = np.array(oriented.GetSpacing())
    size = np.array(oriented.GetSize())
    if center_lps_mm is None:
        center_lps_mm = points_lps_mm[0] if points_lps_mm is not None and len(points_lps_mm) else \
            oriented.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist())
    center_index = np.clip(np.rint(oriented.TransformPhysicalPointToContinuousIndex(
        [float(v) for v in center_lps_mm])).astype(int), 0, size - 1)
    views = _slices(array, center_index)
    in_plane_axes = [(0, 1), (0, 2), (1, 2)]      # (column axis, row axis) of each view, as i/j/k
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.4), facecolor="black")
    for view_index, (axis, view) in enumerate(zip(axes, views)):
        column_axis, row_axis = in_plane_axes[view_index]
        columns_mm = (np.arange(view.shape[1]) + 0.5) * spacing[column_axis]
        rows_mm = (np.arange(view.shape[0]) + 0.5) * spacing[row_axis]
        axis.imshow(view, cmap="gray", vmin=window_hu[0], vmax=window_hu[1], interpolation="bilinear",
                    extent=(0, view.shape[1] * spacing[column_axis], view.shape[0] * spacing[row_axis], 0))
        for mask, color in (overlays or {}).values():
            mask_view = _slices(sitk.GetArrayFromImage(_reoriented(mask)) > 0, center_index)[view_index]
            if mask_view.any():
                axis.contour(columns_mm, rows_mm, mask_view.astype(np.float32), levels=[0.5], colors=[color],
                             linewidths=1.2)
        across_axis = 3 - column_axis - row_axis
        for point in points_lps_mm if points_lps_mm is not None else []:
            index = np.array(oriented.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))
            if abs(index[across_axis] - center_index[across_axis]) * spacing[across_axis] > 5.0:
                continue
            row = index[row_axis] if view_index == 0 else size[2] - 1 - index[2]  # coronal/sagittal: head up
            axis.add_patch(plt.Circle(((index[column_axis] + 0.5) * spacing[column_axis],
                                       (row + 0.5) * spacing[row_axis]), 12.0, fill=False, color="yellow", lw=1.5))
        axis.set_title(("Axial", "Coronal", "Sagittal")[view_index], color="white")
        axis.axis("off")
    if overlays:
        handles = [plt.Line2D([0], [0], color=color, lw=2, label=name) for name, (_, color) in overlays.items()]
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), facecolor="black", labelcolor="white",
                      frameon=False)
    if title:
        figure.suptitle(title, color="white")
    figure.tight_layout(rect=(0, 0.05, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90, facecolor="black")
    plt.close(figure)
    return path
