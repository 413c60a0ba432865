"""The chest phantom the candidate and measurement tests share, and its lung mask with what lies inside the lungs."""

import functools

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RecognitionCore.phantoms import NoduleSpec, make_chest_ct

# solid 4, 8 and 15 mm, a 12 mm ground-glass nodule, a juxta-pleural and a juxta-vascular one
PHANTOM_NODULES = (NoduleSpec(4.0), NoduleSpec(8.0), NoduleSpec(15.0), NoduleSpec(12.0, "ground-glass"),
                   NoduleSpec(10.0, "solid", "juxta-pleural"), NoduleSpec(9.0, "solid", "juxta-vascular"))
VOXEL_MM = (1.0, 1.0, 2.5)
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@functools.lru_cache(maxsize=2)
def chest_phantom(direction=None):
    return make_chest_ct((192, 192, 80), VOXEL_MM, seed=1, nodules=list(PHANTOM_NODULES), direction=direction)


def phantom_lung_mask(phantom):
    """The phantom's lungs with what lies inside them (nodules; vessels and airways enclosed within a slice)."""
    labels = sitk.GetArrayViewFromImage(phantom.labels)
    lungs = np.isin(labels, (2, 3, 9))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    lungs |= ndimage.binary_fill_holes(lungs, structure=in_plane) & np.isin(labels, (4, 5))
    mask = sitk.GetImageFromArray(lungs.astype(np.uint8))
    mask.CopyInformation(phantom.image)
    return mask
