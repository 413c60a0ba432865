"""Evaluate OrganSegment's methods: Dice and 95% Hausdorff distance (mm) per organ and method, with the shared
evaluation functions (``RecognitionCore.evaluation.segmentation_table``), printed as a table and written as CSV.

    .venv/bin/python dev/evaluate_organ_segmentation.py [--synthetic 10] [--lungs-only] [--shared DIR] [--output DIR]

Three sets, each method called as the module's Logic calls it (OrganSegmentLib, RecognitionCore.anatomy and
RecognitionCore.predict on plain images, then the Logic's default post-processing: largest component and filled
holes for organs), with fixed seeds:

- the TotalSegmentator example CT (3 mm, abdomen with the lung bases). Its reference labels were made by a model
  (TotalSegmentator "fast"), so this is a plausibility check, not ground truth. Classical lungs (left = lobes 10-11,
  right = lobes 12-14 of labels_total.csv, both = 10-14), the deep model (liver, spleen, kidneys), region growing of
  the liver from 3 and 5 automatic seeds and grow from seeds from automatic scribbles (both made from the reference
  liver, as a user would place them). TotalSegmentator's 1.5 mm model labelled slices 82-111 of the same CT
  (example_seg.nii.gz of example_ct_sm.nii.gz, same label table), which hold all of the lung bases: the classical
  lungs are also scored against it, and against the voxels where the two references agree; the two references'
  own agreement is the ceiling of any Dice against one of them;
- the dcmqi 3-slice CT (DICOM; liver, spine and heart drawn semi-automatically in 3D Slicer). The references are
  resampled onto the CT grid by nearest neighbour (their grid matches the CT's up to rounding of the origin). Liver
  and heart by region growing from 5 automatic seeds; the spine by classical bones (which needs 8 slices or more:
  the row says so) and by the threshold method at the same bone threshold, compared inside the spine label's
  bounding box only (the ribs and the rest of the skeleton are bone too, but not in the reference);
- N synthetic abdomen phantoms on the organ model's training grid (128 x 128 x 96 voxels of 3.1 mm, seeds 8000+,
  never seen in training: those used seeds 1000+): the deep model (liver, spleen, kidneys), region growing of the
  liver from 3 seeds and grow from seeds. The liver reference is the phantom's liver label: its tumours, which
  mostly reach the liver's surface, are not liver (as for training the model), and seeds placed in it stay in the
  parenchyma. The liver label also leaves out the portal and hepatic veins, as channels whose walls are surfaces
  deep inside the organ: every method fills them, so the liver's 95% Hausdorff distance (~20-25 mm) measures those
  channels more than the organ's outline (seed 8000, deep model: no wrong voxel is more than 10 mm from the
  reference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "OrganSegment")]
from OrganSegmentLib import interactive, postprocess  # noqa: E402
from RecognitionCore import anatomy, evaluation  # noqa: E402
from RecognitionCore.errors import InputError, RecognitionError  # noqa: E402
from RecognitionCore.io import read_image  # noqa: E402
from RecognitionCore.models import Catalogue, load_network, resolve_card  # noqa: E402
from RecognitionCore.phantoms import ABDOMEN_LABELS, make_abdomen_ct  # noqa: E402
from RecognitionCore.predict import predict_labels  # noqa: E402
from RecognitionCore.preprocessing import resample_to_reference  # noqa: E402

MODEL_ID = "mir_abdomen_organs_unet"
SYNTHETIC_GRID = dict(size_ijk=(128, 128, 96), spacing_mm=(3.1, 3.1, 3.1))  # the organ model's training grid
SYNTHETIC_FIRST_SEED = 8000
SEED = 0  # automatic seed points
# labels_total.csv of TotalSegmentator
TOTALSEGMENTATOR_LUNGS = {"lung_left": (10, 11), "lung_right": (12, 13, 14), "both lungs": (10, 11, 12, 13, 14)}
TOTALSEGMENTATOR_ORGANS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}
TOTALSEGMENTATOR_LIVER = 5
FAST_REFERENCE = "example_seg_fast_force_split.nii.gz"  # TotalSegmentator --fast (3 mm) on example_ct.nii.gz
FINE_REFERENCE = "example_seg.nii.gz"  # TotalSegmentator (1.5 mm) on FINE_REFERENCE_CT, same label table
FINE_REFERENCE_CT = "example_ct_sm.nii.gz"  # a slab of example_ct.nii.gz
DCMQI_LABELS = {"liver": 1, "spine": 2, "heart": 3}
BOTH_LUNGS_GOAL_DICE = 0.97
COLUMNS = ("dataset", "structure", "method", "dice", "hd95_mm", "volume_truth_ml", "volume_pred_ml", "seconds",
           "note")


def score(dataset: str, structure: str, method: str, image: sitk.Image, truth, prediction, seconds: float,
          note: str = "") -> dict:
    """One table row: the shared segmentation_table on a pair of masks on the grid of ``image``."""
    row = evaluation.segmentation_table(np.asarray(truth, dtype=np.uint8), np.asarray(prediction, dtype=np.uint8),
                                        {1: structure}, spacing_mm=image.GetSpacing())[0]
    return {"dataset": dataset, "structure": structure, "method": method, "dice": row["dice"],
            "hd95_mm": row["hd95_mm"], "volume_truth_ml": row["volume_truth_ml"],
            "volume_pred_ml": row["volume_pred_ml"], "seconds": round(seconds, 1), "note": note}


def failed(dataset: str, structure: str, method: str, error: Exception) -> dict:
    return {"dataset": dataset, "structure": structure, "method": method, "note": f"failed: {error}"}


def mask_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def cleaned(mask: sitk.Image) -> np.ndarray:
    """The Logic's default post-processing of an organ: largest component, holes filled."""
    return sitk.GetArrayFromImage(postprocess.postprocess_labels(sitk.Cast(mask != 0, sitk.sitkUInt8))) != 0


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def region_growing_rows(dataset, structure, image, truth: np.ndarray, seed_counts) -> list:
    rows = []
    for count in seed_counts:
        method = f"region growing, {count} seeds"
        try:
            seeds = interactive.seeds_from_reference(mask_image(truth, image), count, seed=SEED)
            mask, seconds = timed(interactive.region_grow, image, seeds)
            rows.append(score(dataset, structure, method, image, truth, cleaned(mask), seconds))
        except RecognitionError as error:
            rows.append(failed(dataset, structure, method, error))
    return rows


def grow_from_seeds_row(dataset, structure, image, truth: np.ndarray) -> dict:
    method = "grow from seeds"
    try:
        scribbles = interactive.scribbles_from_reference(mask_image(truth, image))
        result, seconds = timed(interactive.grow_from_seeds, image, scribbles)
        organ = sitk.GetArrayFromImage(postprocess.postprocess_labels(result.labels, only=[1])) == 1
        return score(dataset, structure, method, image, truth, organ, seconds, "automatic scribbles on 3 planes")
    except RecognitionError as error:
        return failed(dataset, structure, method, error)


def deep_rows(dataset, image, truth_by_name: dict, card, network) -> list:
    predicted, seconds = timed(predict_labels, image, card, network, device="cpu")
    model_values = {name: int(value) for value, name in card.labels.items()}
    predicted = postprocess.postprocess_labels(sitk.Cast(predicted, sitk.sitkUInt8), only=list(model_values.values()))
    array = sitk.GetArrayFromImage(predicted)
    return [score(dataset, name, "deep", image, truth, array == model_values[name], seconds)
            for name, truth in truth_by_name.items()]


def slab_in(image: sitk.Image, part: sitk.Image) -> slice:
    """The slices of ``image`` that ``part`` copies voxel for voxel. Found by the voxel values: example_ct_sm's
    header keeps the full CT's origin, so its physical position is wrong."""
    if (part.GetSize()[:2] != image.GetSize()[:2] or part.GetSpacing() != image.GetSpacing()
            or part.GetDirection() != image.GetDirection()):
        raise InputError(f"{FINE_REFERENCE_CT} does not share the CT's rows, columns, spacing and direction")
    array, part_array = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(part)
    count = len(part_array)
    for start in range(len(array) - count + 1):
        if np.array_equal(array[start:start + count], part_array):
            return slice(start, start + count)
    raise InputError(f"{FINE_REFERENCE_CT} is not a slab of the CT's slices")


def lung_rows(folder: Path, image: sitk.Image, reference: np.ndarray) -> list:
    """The classical lungs against the fast reference and, on the slab it covers, the 1.5 mm reference."""
    dataset = "TotalSegmentator example"
    masks, seconds = timed(anatomy.segment_trunk_anatomy, image, ["lung_right", "lung_left"])
    lungs = {name: cleaned(masks[name]) for name in ("lung_left", "lung_right")}
    lungs["both lungs"] = lungs["lung_left"] | lungs["lung_right"]
    rows = [score(dataset, name, "classical", image, np.isin(reference, lobes), lungs[name], seconds,
                  f"fast reference, lobes {','.join(map(str, lobes))}")
            for name, lobes in TOTALSEGMENTATOR_LUNGS.items()]
    if not (folder / FINE_REFERENCE).is_file() or not (folder / FINE_REFERENCE_CT).is_file():
        return rows
    slab = slab_in(image, sitk.ReadImage(str(folder / FINE_REFERENCE_CT)))
    fine = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / FINE_REFERENCE)))
    where = f"slices {slab.start}-{slab.stop - 1}"
    for name, lobes in TOTALSEGMENTATOR_LUNGS.items():
        fast_lung, fine_lung, ours = np.isin(reference[slab], lobes), np.isin(fine, lobes), lungs[name][slab]
        # Dice on the agreement set: voxels the two references label alike (both lung or both not); the others count
        # neither as reference nor as prediction.
        agree = fast_lung == fine_lung
        rows += [score(dataset, name, "classical vs 1.5 mm reference", image, fine_lung, ours, seconds, where),
                 score(dataset, name, "fast vs 1.5 mm reference (ceiling)", image, fast_lung, fine_lung, 0.0, where),
                 score(dataset, name, "classical where references agree", image, fast_lung & agree, ours & agree,
                       seconds, f"{where}, {np.count_nonzero(~agree)} disputed voxels left out")]
    return rows


def totalsegmentator(folder: Path, card, network) -> list:
    dataset = "TotalSegmentator example"
    image = read_image(folder / "example_ct.nii.gz")
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / FAST_REFERENCE)))
    rows = lung_rows(folder, image, reference)
    if network is None:
        return rows
    rows += deep_rows(dataset, image, {name: reference == value for name, value in TOTALSEGMENTATOR_ORGANS.items()},
                      card, network)
    liver = reference == TOTALSEGMENTATOR_LIVER
    rows += region_growing_rows(dataset, "liver", image, liver, (3, 5))
    rows.append(grow_from_seeds_row(dataset, "liver", image, liver))
    return rows


def dcmqi(folder: Path) -> list:
    dataset = "dcmqi 3-slice CT"
    image = read_image(folder / "ct")
    reference = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.int16)
    for name in ("liver_spine_seg.nrrd", "heart_seg.nrrd"):
        labels = resample_to_reference(sitk.ReadImage(str(folder / name)), image, "nearest", default_value=0)
        array = sitk.GetArrayFromImage(labels)
        reference[array != 0] = array[array != 0]
    rows = []
    for name in ("liver", "heart"):
        rows += region_growing_rows(dataset, name, image, reference == DCMQI_LABELS[name], (5,))
    spine = reference == DCMQI_LABELS["spine"]
    box = postprocess.bounding_box_slices(spine)
    note = "bone inside the spine label's bounding box"
    try:
        masks, seconds = timed(anatomy.segment_trunk_anatomy, image, ["bones"])
        rows.append(score(dataset, "spine", "classical bones", image, spine, within(masks["bones"], box), seconds,
                          note))
    except RecognitionError as error:
        rows.append(failed(dataset, "spine", "classical bones", error))
    # The threshold method has no minimum number of slices: the bone threshold of the classical method.
    method = f"threshold {anatomy.BONE_THRESHOLD_HU:g}..3000 HU"
    bone, seconds = timed(interactive.threshold_segment, image, anatomy.BONE_THRESHOLD_HU, 3000.0)
    rows.append(score(dataset, "spine", method, image, spine, within(bone, box), seconds, note))
    return rows


def within(mask: sitk.Image, box) -> np.ndarray:
    """The mask inside ``box`` (array slices), empty elsewhere."""
    inside = np.zeros(sitk.GetArrayViewFromImage(mask).shape, dtype=bool)
    inside[box] = sitk.GetArrayViewFromImage(mask)[box] != 0
    return inside


def synthetic(count: int, card, network) -> list:
    rows = []
    for index in range(count):
        seed = SYNTHETIC_FIRST_SEED + index
        dataset = f"synthetic abdomen {seed}"
        phantom = make_abdomen_ct(seed=seed, **SYNTHETIC_GRID)
        image = phantom.image
        labels = sitk.GetArrayFromImage(phantom.labels)
        truth = {name: labels == value for value, name in ABDOMEN_LABELS.items() if name in card.labels.values()}
        rows += deep_rows(dataset, image, truth, card, network)
        liver = truth["liver"]
        rows += region_growing_rows(dataset, "liver", image, liver, (3,))
        rows.append(grow_from_seeds_row(dataset, "liver", image, liver))
    return rows


def synthetic_means(rows: list, count: int) -> list:
    """Mean (and worst Dice) per structure and method over the phantoms."""
    groups = {}
    for row in rows:
        if row["dataset"].startswith("synthetic") and "dice" in row:
            groups.setdefault((row["structure"], row["method"]), []).append(row)
    means = []
    for (structure, method), group in groups.items():
        failures = count - len(group)
        means.append({"dataset": f"synthetic abdomen, mean of {len(group)}", "structure": structure,
                      "method": method, **{key: float(np.mean([row[key] for row in group]))
                                           for key in ("dice", "hd95_mm", "volume_truth_ml", "volume_pred_ml")},
                      "seconds": round(float(np.mean([row["seconds"] for row in group])), 1),
                      "note": f"min Dice {min(row['dice'] for row in group):.3f}"
                              + (f"; {failures} failed" if failures else "")})
    return means


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, default=10, help="number of generated abdomen CTs (0: skip)")
    parser.add_argument("--lungs-only", action="store_true",
                        help="only the classical lungs of the TotalSegmentator example (no model, no other set)")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--output", default=str(REPO / "out" / "organ-evaluation"))
    args = parser.parse_args(argv)
    shared, output = Path(args.shared), Path(args.output)
    card = network = None
    if not args.lungs_only:
        card = resolve_card(Catalogue().get(MODEL_ID))
        network = load_network(card, device="cpu")
    rows = []
    if (shared / "totalsegmentator" / "example_ct.nii.gz").is_file():
        rows += totalsegmentator(shared / "totalsegmentator", card, network)
    if (shared / "dcmqi_ct3slice" / "ct").is_dir() and not args.lungs_only:
        rows += dcmqi(shared / "dcmqi_ct3slice")
    per_phantom = synthetic(args.synthetic, card, network) if args.synthetic and not args.lungs_only else []
    table = rows + synthetic_means(per_phantom, args.synthetic)
    print(evaluation.format_table(table, COLUMNS))
    both_lungs = {row["method"]: row["dice"] for row in rows if row["structure"] == "both lungs" and "dice" in row}
    if "classical" in both_lungs:
        verdict = "met" if both_lungs["classical"] >= BOTH_LUNGS_GOAL_DICE else "NOT met"
        ceiling = both_lungs.get("fast vs 1.5 mm reference (ceiling)")
        print(f"both lungs (classical) vs the union of the lobes: Dice {both_lungs['classical']:.3f}, goal >= "
              f"{BOTH_LUNGS_GOAL_DICE}: {verdict}"
              + (f"; ceiling (the fast and 1.5 mm references' own Dice) {ceiling:.3f}" if ceiling is not None else ""))
    output.mkdir(parents=True, exist_ok=True)
    path = evaluation.write_rows_csv(table + per_phantom, output / "organ_evaluation.csv", COLUMNS)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
