"""Evaluation shared by the modules, training and the command line: nodule detection (FROC, CPM, precision/recall/F1
under the LUNA16 rules) and segmentation (Dice, 95% Hausdorff distance, volumes per label), with tables and plots.

Detection follows LUNA16's ``noduleCADEvaluationLUNA16.py``:

- a detection hits a nodule when its centre lies strictly within the nodule's radius (``diameter_mm / 2``; a negative
  diameter counts as 10 mm, as LUNA16 does for some of its excluded findings);
- each nodule counts once, with the best probability among the detections that hit it; the other hits on the same
  nodule are neither true nor false positives; a detection hitting two nodules counts for both;
- detections hitting only "irrelevant findings" (``excluded``, LUNA16's ``annotations_excluded.csv``) are ignored;
- every other detection is a false positive; scans without nodules count in the number of scans;
- the FROC curve joins the operating points of every probability threshold (a detection is kept when its probability
  is >= the threshold) by straight lines, from (0, 0); beyond its last point the sensitivity stays at its last value.

The sensitivity at a rate of false positives per scan is read off that curve exactly (at a vertical step on the rate
itself: the top of the step, the sensitivity reached with that many false positives). LUNA16 reads it off a grid of
10001 rates between 1/8 and 8 instead; the two agree except at a step that falls exactly on one of the seven rates.
The CPM is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan. ``precision_recall_f1`` uses
the same counting, so its numbers are a point of the FROC curve: precision = detected nodules / (detected nodules +
false positives), recall = detected nodules / nodules.

Segmentation: masks and labelmaps are numpy arrays in SimpleITK order (z, y, x) or SimpleITK images; ``spacing_mm``
is always in SimpleITK order (x, y, z) as ``image.GetSpacing()`` gives it. Surfaces are the mask voxels with a
6-connected background neighbour (outside the array is background); the 95% Hausdorff distance is the larger of the
two directed 95th percentiles of the distances between the two surfaces (as MONAI), in mm, exact on anisotropic voxels.
Empty masks: two empty masks agree (Dice 1.0, HD95 0.0); one empty against one not gives Dice 0.0 and HD95 ``inf``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError

LUNA16_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
LUNA16_NEGATIVE_DIAMETER_MM = 10.0  # LUNA16 gives excluded findings without a size this diameter
COORDINATE_COLUMNS = ("coordX", "coordY", "coordZ")
DIAMETER_COLUMNS = ("diameter_mm", "approx_max_extent_mm")  # the first present is used (the LIDC file has the second)
DETECTION_COLUMNS = ("seriesuid",) + COORDINATE_COLUMNS + ("probability",)
GRID_TOLERANCE_MM = 1e-4
LEARNING_CURVE_SKIPPED = ("epoch", "lr", "learning_rate", "seconds", "time", "samples")

ArrayOrImage = Union[np.ndarray, sitk.Image]


# ----------------------------------------------------------------------------------------------------------------
# Detection: data


@dataclass(frozen=True)
class Annotation:
    """A nodule (or an irrelevant finding) in world LPS mm, as one row of LUNA16's annotations.csv."""

    seriesuid: str
    center_lps_mm: Tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class Detection:
    """A detector's mark: a centre in world LPS mm with its probability (any score where higher means surer)."""

    seriesuid: str
    center_lps_mm: Tuple[float, float, float]
    probability: float


def as_annotations(items: Iterable) -> List[Annotation]:
    """Annotations from ``Annotation`` objects or LUNA16 rows (dicts with seriesuid, coordX/Y/Z, diameter_mm)."""
    return [item if isinstance(item, Annotation) else
            Annotation(str(item["seriesuid"]), _center_of_row(item), float(item[_diameter_key(item)]))
            for item in items]


def as_detections(items: Iterable) -> List[Detection]:
    """Detections from ``Detection`` objects or LUNA16 rows (dicts with seriesuid, coordX/Y/Z, probability)."""
    detections = [item if isinstance(item, Detection) else
                  Detection(str(item["seriesuid"]), _center_of_row(item), float(item["probability"]))
                  for item in items]
    for detection in detections:
        if not math.isfinite(detection.probability):
            raise InputError(f"Detection on {detection.seriesuid} has probability {detection.probability}: "
                             "probabilities must be finite numbers.")
    return detections


def _center_of_row(row: Mapping) -> Tuple[float, float, float]:
    return tuple(float(row[column]) for column in COORDINATE_COLUMNS)


def _diameter_key(row: Mapping) -> str:
    for key in DIAMETER_COLUMNS:
        if key in row:
            return key
    raise InputError(f"Annotation row has no diameter (one of {list(DIAMETER_COLUMNS)}): {dict(row)}")


def read_annotations_csv(path) -> List[Annotation]:
    """Read a LUNA16 annotations.csv (or annotations_excluded.csv): seriesuid, coordX/Y/Z in mm, diameter_mm.

    The LIDC file of ../shared/data names the diameter ``approx_max_extent_mm``; it is accepted as the diameter.
    """
    rows, columns = _read_csv_rows(path)
    diameter = next((name for name in DIAMETER_COLUMNS if name in columns), DIAMETER_COLUMNS[0])
    _require_columns(path, columns, ("seriesuid",) + COORDINATE_COLUMNS + (diameter,))
    return [Annotation(row["seriesuid"], tuple(_number(path, line, row, c) for c in COORDINATE_COLUMNS),
                       _number(path, line, row, diameter)) for line, row in rows]


def read_detections_csv(path) -> List[Detection]:
    """Read detections in LUNA16's submission layout: seriesuid, coordX, coordY, coordZ (mm), probability."""
    rows, columns = _read_csv_rows(path)
    _require_columns(path, columns, DETECTION_COLUMNS)
    return as_detections(
        Detection(row["seriesuid"], tuple(_number(path, line, row, c) for c in COORDINATE_COLUMNS),
                  _number(path, line, row, "probability")) for line, row in rows)


def write_detections_csv(detections: Iterable, path) -> Path:
    """Write detections in LUNA16's submission layout; floats are written exactly (``repr``)."""
    path = Path(path)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(DETECTION_COLUMNS)
        for detection in as_detections(detections):
            writer.writerow([detection.seriesuid, *(repr(float(v)) for v in detection.center_lps_mm),
                             repr(float(detection.probability))])
    return path


def read_seriesuids(path) -> List[str]:
    """The scans of an evaluation, one seriesuid a line (LUNA16's seriesuids.csv; a ``seriesuid`` header is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Series list not found: {path}")
    lines = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and line != "seriesuid"]


def _read_csv_rows(path):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"CSV file not found: {path}")
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        rows = [(line, row) for line, row in enumerate(reader, start=2)]
        return rows, tuple(reader.fieldnames or ())


def _require_columns(path, columns, required) -> None:
    missing = [column for column in required if column not in columns]
    if missing:
        raise InputError(f"{Path(path).name}: missing columns {missing} (has {list(columns)}).")


def _number(path, line: int, row: Mapping, column: str) -> float:
    try:
        value = float(row[column])
    except (TypeError, ValueError):
        raise InputError(f"{Path(path).name} line {line}: {column} is {row[column]!r}, not a number.") from None
    if math.isnan(value):
        raise InputError(f"{Path(path).name} line {line}: {column} is not a number (nan).")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Detection: matching and FROC


@dataclass
class DetectionMatch:
    """The outcome of matching detections to nodules, enough for every detection metric at every threshold.

    ``nodule_probability``: per nodule, the best probability among its hits (``-inf`` when missed);
    ``false_positive_probability``: the probabilities of the false positives; ``*_scan``: their scan indices into
    ``seriesuids``; ``ignored``: detections on irrelevant findings only; ``duplicates``: hits beyond the first on a
    nodule (over all thresholds).
    """

    seriesuids: Tuple[str, ...]
    nodule_probability: np.ndarray
    nodule_scan: np.ndarray
    false_positive_probability: np.ndarray
    false_positive_scan: np.ndarray
    ignored: int
    duplicates: int

    @property
    def scans(self) -> int:
        return len(self.seriesuids)

    @property
    def nodules(self) -> int:
        return len(self.nodule_probability)


def match_detections(detections: Iterable, annotations: Iterable, seriesuids: Optional[Sequence[str]] = None,
                     excluded: Iterable = ()) -> DetectionMatch:
    """Match detections to nodules by LUNA16's rules (see the module docstring).

    ``seriesuids``: the scans evaluated (LUNA16's seriesuids.csv); detections and annotations on other scans are left
    out. Default: every scan named by an annotation or a detection, which misses scans with neither: pass the list
    when the evaluation has scans without nodules.
    """
    detections, annotations, excluded = as_detections(detections), as_annotations(annotations), as_annotations(excluded)
    if seriesuids is None:
        seriesuids = sorted({item.seriesuid for item in [*annotations, *detections]})
    seriesuids = tuple(dict.fromkeys(str(uid) for uid in seriesuids))
    if not seriesuids:
        raise InputError("No scans to evaluate: no seriesuids, annotations or detections.")
    scan_index = {uid: index for index, uid in enumerate(seriesuids)}
    by_scan = {uid: ([], [], []) for uid in seriesuids}
    for position, items in enumerate((detections, annotations, excluded)):
        for item in items:
            if item.seriesuid in by_scan:
                by_scan[item.seriesuid][position].append(item)

    nodule_probability, nodule_scan, fp_probability, fp_scan = [], [], [], []
    ignored = duplicates = 0
    for uid, (scan_detections, scan_nodules, scan_excluded) in by_scan.items():
        centers = np.array([d.center_lps_mm for d in scan_detections], dtype=float).reshape(-1, 3)
        probabilities = np.array([d.probability for d in scan_detections], dtype=float)
        hits = _hits(centers, scan_nodules)              # (detections, nodules)
        irrelevant = _hits(centers, scan_excluded).any(axis=1)
        best = np.where(hits, probabilities[:, None], -np.inf).max(axis=0, initial=-np.inf)
        nodule_probability += best.tolist()
        nodule_scan += [scan_index[uid]] * len(scan_nodules)
        is_hit = hits.any(axis=1)
        duplicates += int(np.maximum(hits.sum(axis=0) - 1, 0).sum())
        ignored += int(np.count_nonzero(irrelevant & ~is_hit))
        false_positive = ~is_hit & ~irrelevant
        fp_probability += probabilities[false_positive].tolist()
        fp_scan += [scan_index[uid]] * int(np.count_nonzero(false_positive))
    return DetectionMatch(seriesuids, np.array(nodule_probability, dtype=float), np.array(nodule_scan, dtype=int),
                          np.array(fp_probability, dtype=float), np.array(fp_scan, dtype=int), ignored, duplicates)


def _hits(centers: np.ndarray, annotations: Sequence[Annotation]) -> np.ndarray:
    """(detections, annotations) booleans: the detection's centre lies strictly within the annotation's radius."""
    if not annotations:
        return np.zeros((len(centers), 0), dtype=bool)
    nodule_centers = np.array([a.center_lps_mm for a in annotations], dtype=float)
    diameters = np.array([a.diameter_mm for a in annotations], dtype=float)
    radii = np.where(diameters < 0, LUNA16_NEGATIVE_DIAMETER_MM, diameters) / 2.0
    squared = ((centers[:, None, :] - nodule_centers[None, :, :]) ** 2).sum(axis=2)
    return squared < radii[None, :] ** 2


@dataclass
class FrocConfidence:
    """Bootstrap confidence intervals (scans resampled with replacement, as LUNA16) at ``fps_per_scan``."""

    fps_per_scan: np.ndarray
    sensitivity_low: np.ndarray
    sensitivity_high: np.ndarray
    cpm_low: float
    cpm_high: float
    samples: int
    confidence: float


@dataclass
class FrocCurve:
    """FROC operating points from (0, 0), one per probability threshold, with sensitivity non-decreasing."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray   # the threshold of each point; +inf for the (0, 0) start
    match: DetectionMatch
    confidence: Optional[FrocConfidence] = None


def froc(detections: Iterable, annotations: Iterable, seriesuids: Optional[Sequence[str]] = None,
         excluded: Iterable = (), bootstrap: int = 0, confidence: float = 0.95, seed: int = 0) -> FrocCurve:
    """The FROC curve of detections against nodules over all thresholds (LUNA16 rules; see ``match_detections``).

    ``bootstrap``: number of scan resamplings for confidence intervals of the sensitivities at LUNA16's seven rates
    and of the CPM (LUNA16 uses 1000; 0: none).
    """
    return froc_from_match(match_detections(detections, annotations, seriesuids, excluded), bootstrap, confidence,
                           seed)


def froc_from_match(match: DetectionMatch, bootstrap: int = 0, confidence: float = 0.95, seed: int = 0) -> FrocCurve:
    """The FROC curve of an existing match (training matches once per validation and reads several metrics)."""
    if match.nodules == 0:
        raise InputError(f"No annotated nodules in the {match.scans} scan(s) evaluated: sensitivity is undefined.")
    ranked = _rank(match)
    fps, sensitivity = _curve_points(ranked, np.ones(match.scans))
    curve = FrocCurve(fps, sensitivity, np.concatenate(([np.inf], ranked.probabilities[ranked.group_ends])), match)
    if bootstrap:
        curve.confidence = _bootstrap(ranked, match, int(bootstrap), confidence, seed)
    return curve


class _Ranked(NamedTuple):
    """Detected nodules and false positives by falling probability; ``group_ends``: the last index of each tie."""

    probabilities: np.ndarray
    scans: np.ndarray
    is_nodule: np.ndarray
    group_ends: np.ndarray
    nodules_per_scan: np.ndarray


def _rank(match: DetectionMatch) -> _Ranked:
    detected = np.isfinite(match.nodule_probability)
    probabilities = np.concatenate((match.nodule_probability[detected], match.false_positive_probability))
    scans = np.concatenate((match.nodule_scan[detected], match.false_positive_scan))
    is_nodule = np.concatenate((np.ones(int(detected.sum()), bool), np.zeros(len(match.false_positive_probability),
                                                                               bool)))
    order = np.argsort(-probabilities, kind="stable")
    probabilities, scans, is_nodule = probabilities[order], scans[order], is_nodule[order]
    group_ends = np.flatnonzero(np.diff(probabilities, append=-np.inf) != 0)
    return _Ranked(probabilities, scans, is_nodule, group_ends, np.bincount(match.nodule_scan, minlength=match.scans))


def _curve_points(ranked: _Ranked, scan_weights: np.ndarray):
    """FROC points when each scan counts ``scan_weights`` times (all ones, or a bootstrap resampling)."""
    weights = scan_weights[ranked.scans]
    true_positives = np.cumsum(weights * ranked.is_nodule)[ranked.group_ends]
    false_positives = np.cumsum(weights * ~ranked.is_nodule)[ranked.group_ends]
    nodules = float(np.dot(scan_weights, ranked.nodules_per_scan))
    fps = np.concatenate(([0.0], false_positives / scan_weights.sum()))
    sensitivity = np.concatenate(([0.0], true_positives / nodules)) if nodules else np.full(len(fps), np.nan)
    return fps, sensitivity


def _bootstrap(ranked: _Ranked, match: DetectionMatch, samples: int, confidence: float, seed: int) -> FrocConfidence:
    if samples < 2 or not 0.0 < confidence < 1.0:
        raise InputError(f"Bootstrap needs >= 2 samples and 0 < confidence < 1 (got {samples}, {confidence}).")
    rng = np.random.default_rng(seed)
    fp_rates = np.array(LUNA16_FP_RATES)
    sensitivities = np.empty((samples, len(fp_rates)))
    for sample in range(samples):
        scan_weights = np.bincount(rng.integers(0, match.scans, match.scans), minlength=match.scans).astype(float)
        sensitivities[sample] = _interpolate(*_curve_points(ranked, scan_weights), fp_rates)
    cpms = sensitivities.mean(axis=1)
    tail = 50.0 * (1.0 - confidence)
    low, high = np.nanpercentile(sensitivities, [tail, 100.0 - tail], axis=0)
    cpm_low, cpm_high = np.nanpercentile(cpms, [tail, 100.0 - tail])
    return FrocConfidence(fp_rates, low, high, float(cpm_low), float(cpm_high), samples, confidence)


def _interpolate(fps: np.ndarray, sensitivity: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Linear interpolation on a curve whose x repeats at vertical steps: at a step, the top of the step."""
    after = np.searchsorted(fps, rates, side="right")          # first point right of each rate
    before = after - 1                                          # last point at or left of it: the top of a step
    beyond = after >= len(fps)
    after = np.minimum(after, len(fps) - 1)
    span = np.where(beyond, 1.0, fps[after] - fps[before])
    fraction = np.where(beyond, 0.0, (rates - fps[before]) / span)
    return sensitivity[before] + fraction * (sensitivity[after] - sensitivity[before])


def sensitivity_at_fps(curve: FrocCurve, fps: Sequence[float] = LUNA16_FP_RATES) -> np.ndarray:
    """Sensitivities at rates of false positives per scan, read off the curve as explained in the module docstring."""
    rates = np.asarray(fps, dtype=float)
    if rates.size == 0 or np.any(~np.isfinite(rates)) or np.any(rates < 0):
        raise InputError(f"False-positive rates must be finite and >= 0, got {list(rates)}.")
    return _interpolate(curve.fps_per_scan, curve.sensitivity, rates)


def cpm(curve: FrocCurve, fps: Sequence[float] = LUNA16_FP_RATES) -> float:
    """Competition performance metric: the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan."""
    return float(np.mean(sensitivity_at_fps(curve, fps)))


@dataclass
class DetectionCounts:
    """Counts and scores at one probability threshold (a detection is kept when its probability >= threshold)."""

    threshold: float
    true_positives: int    # nodules hit by a kept detection
    false_positives: int   # kept detections that hit no nodule and no irrelevant finding
    false_negatives: int   # nodules not hit by any kept detection
    precision: float       # nan when nothing is kept
    recall: float
    f1: float              # nan with no nodules and nothing kept


def precision_recall_f1(detections: Iterable, annotations: Iterable, threshold: float,
                        seriesuids: Optional[Sequence[str]] = None, excluded: Iterable = ()) -> DetectionCounts:
    """Precision, recall and F1 at one threshold, counted as the FROC counts (the module docstring says how)."""
    return counts_at_threshold(match_detections(detections, annotations, seriesuids, excluded), threshold)


def counts_at_threshold(match: DetectionMatch, threshold: float) -> DetectionCounts:
    """``precision_recall_f1`` of an existing match."""
    if not math.isfinite(threshold):
        raise InputError(f"Threshold must be a finite number, got {threshold}.")
    true_positives = int(np.count_nonzero(match.nodule_probability >= threshold))
    false_positives = int(np.count_nonzero(match.false_positive_probability >= threshold))
    kept = true_positives + false_positives
    precision = true_positives / kept if kept else math.nan
    recall = true_positives / match.nodules if match.nodules else math.nan
    counted = 2 * true_positives + false_positives + (match.nodules - true_positives)
    f1 = 2 * true_positives / counted if counted else math.nan   # the harmonic mean of the two, 0 when nothing is kept
    return DetectionCounts(float(threshold), true_positives, false_positives, match.nodules - true_positives,
                           precision, recall, f1)


def froc_rows(curve: FrocCurve, fps: Sequence[float] = LUNA16_FP_RATES) -> List[dict]:
    """One row per false-positive rate (with the bootstrap interval when there is one), then the CPM."""
    sensitivities = sensitivity_at_fps(curve, fps)
    bounds = curve.confidence if curve.confidence is not None and \
        np.array_equal(curve.confidence.fps_per_scan, np.asarray(fps, dtype=float)) else None
    rows = []
    for index, (rate, sensitivity) in enumerate(zip(fps, sensitivities)):
        row = {"fps_per_scan": _rate_name(rate), "sensitivity": float(sensitivity)}
        if bounds is not None:
            row["ci_low"], row["ci_high"] = float(bounds.sensitivity_low[index]), float(bounds.sensitivity_high[index])
        rows.append(row)
    row = {"fps_per_scan": "CPM", "sensitivity": float(np.mean(sensitivities))}
    if bounds is not None:
        row["ci_low"], row["ci_high"] = bounds.cpm_low, bounds.cpm_high
    return rows + [row]


def _rate_name(rate: float) -> str:
    return f"1/{round(1 / rate)}" if 0 < rate < 1 and abs(1 / rate - round(1 / rate)) < 1e-9 else f"{rate:g}"


# ----------------------------------------------------------------------------------------------------------------
# Segmentation


def require_same_grid(truth: sitk.Image, prediction: sitk.Image, names: Tuple[str, str] = ("truth", "prediction"),
                      tolerance_mm: float = GRID_TOLERANCE_MM) -> None:
    """Raise ``InputError`` naming both grids unless the two images share size, spacing, origin and direction."""
    same = (truth.GetSize() == prediction.GetSize()
            and np.allclose(truth.GetSpacing(), prediction.GetSpacing(), atol=tolerance_mm, rtol=0)
            and np.allclose(truth.GetOrigin(), prediction.GetOrigin(), atol=tolerance_mm, rtol=0)
            and np.allclose(truth.GetDirection(), prediction.GetDirection(), atol=1e-6, rtol=0))
    if not same:
        raise InputError(f"The {names[1]} is not on the {names[0]}'s grid: {names[0]} {_grid_text(truth)}; "
                         f"{names[1]} {_grid_text(prediction)}. Resample it onto the {names[0]} grid first.")


def _grid_text(image: sitk.Image) -> str:
    def numbers(values):
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
    return (f"size {image.GetSize()}, spacing {numbers(image.GetSpacing())} mm, origin {numbers(image.GetOrigin())} "
            f"mm, direction {numbers(image.GetDirection())}")


def _as_array(value: ArrayOrImage) -> np.ndarray:
    return sitk.GetArrayViewFromImage(value) if isinstance(value, sitk.Image) else np.asarray(value)


def _pair(truth: ArrayOrImage, prediction: ArrayOrImage) -> Tuple[np.ndarray, np.ndarray]:
    if isinstance(truth, sitk.Image) and isinstance(prediction, sitk.Image):
        require_same_grid(truth, prediction)
    truth_array, prediction_array = _as_array(truth), _as_array(prediction)
    if truth_array.shape != prediction_array.shape:
        raise InputError(f"Truth and prediction differ in shape: {truth_array.shape} and {prediction_array.shape}.")
    return truth_array, prediction_array


def _spacing_zyx(spacing_mm: Optional[Sequence[float]], *images: ArrayOrImage) -> np.ndarray:
    """The spacing in array order (z, y, x), from ``spacing_mm`` (x, y, z) or else from the images."""
    image = next((image for image in images if isinstance(image, sitk.Image)), None)
    if spacing_mm is None:
        if image is None:
            raise InputError("spacing_mm is needed for numpy arrays (in SimpleITK order x, y, z).")
        spacing_mm = image.GetSpacing()
    elif image is not None and not np.allclose(spacing_mm, image.GetSpacing(), atol=GRID_TOLERANCE_MM, rtol=0):
        raise InputError(f"spacing_mm {tuple(spacing_mm)} differs from the image's spacing {image.GetSpacing()}.")
    spacing = np.asarray(spacing_mm, dtype=float)
    dimension = _as_array(images[0]).ndim
    if spacing.shape != (dimension,) or np.any(~np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"spacing_mm must be {dimension} positive numbers (x, y, z), got {list(spacing_mm)}.")
    return spacing[::-1].copy()


def dice(truth: ArrayOrImage, prediction: ArrayOrImage) -> float:
    """Dice overlap of two masks (non-zero is inside) on the same grid; two empty masks agree (1.0)."""
    truth_array, prediction_array = _pair(truth, prediction)
    truth_mask, prediction_mask = truth_array != 0, prediction_array != 0
    total = int(np.count_nonzero(truth_mask)) + int(np.count_nonzero(prediction_mask))
    return 2.0 * np.count_nonzero(truth_mask & prediction_mask) / total if total else 1.0


def _label_values(array: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array.astype(np.int64, copy=False)
    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        raise InputError(f"The {name} labelmap has non-integer values (e.g. {array[rounded != array].flat[0]}).")
    return rounded.astype(np.int64)


def _label_counts(truth: np.ndarray, prediction: np.ndarray, labels: Sequence[int]):
    """Voxel counts of each label in truth, prediction and both, in one pass over the arrays."""
    truth, prediction = _label_values(truth, "truth"), _label_values(prediction, "prediction")
    lowest = min(int(truth.min(initial=0)), int(prediction.min(initial=0)), min(labels, default=0))
    highest = max(int(truth.max(initial=0)), int(prediction.max(initial=0)), max(labels, default=0))
    length = highest - lowest + 1
    truth_counts = np.bincount((truth - lowest).ravel(), minlength=length)
    prediction_counts = np.bincount((prediction - lowest).ravel(), minlength=length)
    both_counts = np.bincount((truth[truth == prediction] - lowest).ravel(), minlength=length)
    index = np.asarray(labels, dtype=np.int64) - lowest
    return truth_counts[index], prediction_counts[index], both_counts[index]


def dice_per_label(truth_labels: ArrayOrImage, predicted_labels: ArrayOrImage,
                   labels: Sequence[int]) -> Dict[int, float]:
    """Dice of each label value of two labelmaps on the same grid (a label absent from both: 1.0)."""
    labels = [int(label) for label in labels]
    truth_counts, prediction_counts, both_counts = _label_counts(*_pair(truth_labels, predicted_labels), labels)
    total = truth_counts + prediction_counts
    return {label: (2.0 * both / sum_ if sum_ else 1.0)
            for label, both, sum_ in zip(labels, both_counts.tolist(), total.tolist())}


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff95_mm(truth: ArrayOrImage, prediction: ArrayOrImage, spacing_mm: Optional[Sequence[float]] = None,
                   percentile: float = 95.0) -> float:
    """Symmetric 95% Hausdorff distance between two masks' surfaces in mm (0.0 both empty, inf one empty).

    ``spacing_mm`` in SimpleITK order (x, y, z); taken from the images when they are SimpleITK images.
    """
    spacing = _spacing_zyx(spacing_mm, truth, prediction)
    truth_mask, prediction_mask = (array != 0 for array in _pair(truth, prediction))
    truth_any, prediction_any = truth_mask.any(), prediction_mask.any()
    if not (truth_any and prediction_any):
        return 0.0 if truth_any == prediction_any else math.inf
    # Both surfaces lie in the union's bounding box: the distances computed there, padded by one background voxel, are
    # those of the whole grid, for a fraction of the work.
    box = ndimage.find_objects((truth_mask | prediction_mask).astype(np.uint8))[0]
    truth_surface = _surface(np.pad(truth_mask[box], 1))
    prediction_surface = _surface(np.pad(prediction_mask[box], 1))
    to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing)[truth_surface]
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[prediction_surface]
    return float(max(np.percentile(to_prediction, percentile), np.percentile(to_truth, percentile)))


def segmentation_table(truth: ArrayOrImage, prediction: ArrayOrImage, label_names: Mapping[int, str],
                       spacing_mm: Optional[Sequence[float]] = None) -> List[dict]:
    """Per label: {label, name, dice, hd95_mm, volume_truth_ml, volume_pred_ml}, labelmaps on the same grid."""
    truth_array, prediction_array = _pair(truth, prediction)
    spacing = _spacing_zyx(spacing_mm, truth, prediction)
    labels = [int(label) for label in label_names]
    if not labels:
        raise InputError("No labels to evaluate (label_names is empty).")
    truth_values, prediction_values = _label_values(truth_array, "truth"), _label_values(prediction_array, "prediction")
    truth_counts, prediction_counts, both_counts = _label_counts(truth_values, prediction_values, labels)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    boxes = _label_boxes(truth_values, prediction_values)
    rows = []
    for label, truth_count, prediction_count, both in zip(labels, truth_counts, prediction_counts, both_counts):
        total = int(truth_count) + int(prediction_count)
        box = boxes[label - 1] if 0 < label <= len(boxes) and boxes[label - 1] else Ellipsis
        hd95 = hausdorff95_mm(truth_values[box] == label, prediction_values[box] == label, spacing[::-1]) \
            if total else 0.0
        rows.append({"label": label, "name": str(label_names[label]),
                     "dice": 2.0 * int(both) / total if total else 1.0, "hd95_mm": hd95,
                     "volume_truth_ml": int(truth_count) * voxel_ml,
                     "volume_pred_ml": int(prediction_count) * voxel_ml})
    return rows


def _label_boxes(truth: np.ndarray, prediction: np.ndarray) -> list:
    """For label k > 0, at [k - 1], the bounding box of its voxels in either labelmap (None if absent from both).

    The surface distances of a label only need its box (see ``hausdorff95_mm``): cropping first saves most of the work
    on labelmaps with many small structures.
    """
    found = [ndimage.find_objects(np.where(array > 0, array, 0)) for array in (truth, prediction)]
    length = max(len(found[0]), len(found[1]))
    boxes = []
    for index in range(length):
        pair = [items[index] for items in found if index < len(items) and items[index] is not None]
        boxes.append(tuple(slice(min(box[axis].start for box in pair), max(box[axis].stop for box in pair))
                           for axis in range(truth.ndim)) if pair else None)
    return boxes


def read_label_names(path) -> Dict[int, str]:
    """Label names from a CSV of ``value,name`` rows (a header such as ``value,name`` or ``label,name`` is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Label file not found: {path}")
    names = {}
    with open(path, newline="") as stream:
        for line, row in enumerate(csv.reader(stream), start=1):
            if not row or not "".join(row).strip():
                continue
            try:
                value = int(row[0])
            except ValueError:
                if line == 1:
                    continue
                raise InputError(f"{path.name} line {line}: label value {row[0]!r} is not an integer.") from None
            names[value] = row[1].strip() if len(row) > 1 else str(value)
    if not names:
        raise InputError(f"{path.name} names no labels (expected rows of value,name).")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Tables and plots


def format_table(rows: Sequence[Mapping], columns: Optional[Sequence[str]] = None, digits: int = 3) -> str:
    """A plain-text table with aligned columns (numbers right-aligned, floats with ``digits`` decimals)."""
    columns = list(columns) if columns is not None else list(dict.fromkeys(key for row in rows for key in row))

    def text(value) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
        return "" if value is None else str(value)

    cells = [[text(row.get(column)) for column in columns] for row in rows]
    numeric = [all(isinstance(row.get(column), (int, float)) for row in rows if row.get(column) is not None)
               for column in columns]
    widths = [max([len(column)] + [len(line[index]) for line in cells]) for index, column in enumerate(columns)]

    def line(values) -> str:
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * width for width in widths])] + [line(values) for values in cells])


def write_rows_csv(rows: Sequence[Mapping], path, columns: Optional[Sequence[str]] = None) -> Path:
    """Write rows (dicts) as CSV with a header; floats exactly (``repr``)."""
    path = Path(path)
    columns = list(columns) if columns is not None else list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([repr(value) if isinstance(value, float) else value
                             for value in (row.get(column, "") for column in columns)])
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_froc(curve: FrocCurve, path, title: str = "FROC") -> Path:
    """Write the FROC curve as a PNG, x in false positives per scan on a log scale from 1/8 to 8 (as LUNA16), with the
    seven operating points marked (and their bootstrap intervals, if any) and the CPM in the legend."""
    plt = _pyplot()
    rates = np.array(LUNA16_FP_RATES)
    dense = np.geomspace(rates[0], rates[-1], 400)
    points = sensitivity_at_fps(curve, rates)
    figure, axis = plt.subplots(figsize=(7, 5))
    axis.plot(dense, sensitivity_at_fps(curve, dense), color="tab:blue", lw=2,
              label=f"CPM {points.mean():.3f} ({curve.match.nodules} nodules, {curve.match.scans} scans)")
    if curve.confidence is not None and np.array_equal(curve.confidence.fps_per_scan, rates):
        bounds = curve.confidence
        axis.errorbar(rates, points, yerr=[points - bounds.sensitivity_low, bounds.sensitivity_high - points],
                      fmt="none", ecolor="tab:blue", capsize=3,
                      label=f"{bounds.confidence:.0%} CI (bootstrap), CPM {bounds.cpm_low:.3f}-{bounds.cpm_high:.3f}")
    axis.plot(rates, points, "o", color="tab:orange", label="sensitivity at 1/8 ... 8 FP/scan")
    axis.set_xscale("log", base=2)
    axis.set_xticks(rates, [_rate_name(rate) for rate in rates])
    axis.set_xlim(rates[0], rates[-1])
    axis.set_ylim(0, 1.02)
    axis.set_yticks(np.linspace(0, 1, 11))
    axis.set_xlabel("Average number of false positives per scan")
    axis.set_ylabel("Sensitivity")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.4)
    axis.legend(loc="lower right")
    return _save(figure, path)


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(str(path), dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    return path


def read_training_log(path) -> List[dict]:
    """Per-epoch rows from a training log: CSV with a header, or JSON (a list of rows, or {"epochs": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Training log not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{path.name} is not valid JSON: {error}") from None
        rows = content.get("epochs") if isinstance(content, dict) else content
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise InputError(f"{path.name}: expected a list of per-epoch objects (or {{\"epochs\": [...]}}).")
        return rows
    with open(path, newline="") as stream:
        return [{key: _csv_value(value) for key, value in row.items()} for row in csv.DictReader(stream)]


def _csv_value(text):
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return text


def _curve_columns(rows: Sequence[Mapping], metrics: Optional[Sequence[str]]) -> Tuple[List[str], List[str]]:
    numeric = [key for key in dict.fromkeys(key for row in rows for key in row)
               if any(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool) for row in rows)]
    losses = [key for key in numeric if "loss" in key.lower()]
    if metrics is None:
        metrics = [key for key in numeric if key not in losses
                   and not any(part in key.lower() for part in LEARNING_CURVE_SKIPPED)]
    return losses, list(metrics)


def plot_learning_curves(log_rows: Union[Sequence[Mapping], str, Path], path, title: str = "Training",
                         metrics: Optional[Sequence[str]] = None) -> Path:
    """Write the losses (left axis) and validation metrics (right axis) per epoch as a PNG.

    ``log_rows``: per-epoch dicts {epoch, train_loss, val_metric, ...}, or the path of such a log (CSV or JSON).
    Columns with "loss" in their name are losses; ``metrics`` defaults to the other numeric columns except the epoch,
    learning rate and timings.
    """
    rows = read_training_log(log_rows) if isinstance(log_rows, (str, Path)) else list(log_rows)
    if not rows:
        raise InputError("The training log has no epochs to plot.")
    losses, metrics = _curve_columns(rows, metrics)
    if not losses and not metrics:
        raise InputError(f"The training log has no numeric loss or metric columns (columns: {list(rows[0])}).")
    plt = _pyplot()
    figure, loss_axis = plt.subplots(figsize=(7, 4.5))
    epochs = [row.get("epoch", index + 1) for index, row in enumerate(rows)]
    lines = []
    for key in losses:
        lines += loss_axis.plot(*_series(epochs, rows, key), "-", label=key)
    loss_axis.set_xlabel("Epoch")
    loss_axis.set_ylabel("Loss")
    if metrics:
        metric_axis = loss_axis.twinx()
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"][len(losses):]
        for index, key in enumerate(metrics):
            lines += metric_axis.plot(*_series(epochs, rows, key), "o--", ms=3, label=key,
                                      color=colors[index % len(colors)])
        metric_axis.set_ylabel("Metric")
    # below the axes: rising metrics and falling losses leave no corner free for it
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.14),
                     ncol=min(len(lines), 4), frameon=False)
    loss_axis.set_title(title)
    loss_axis.grid(True, alpha=0.4)
    return _save(figure, path)


def _series(epochs: Sequence, rows: Sequence[Mapping], key: str):
    """The epochs where ``key`` has a number, and those numbers (validation may run every few epochs only)."""
    pairs = [(epoch, row[key]) for epoch, row in zip(epochs, rows)
             if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
    return [epoch for epoch, _ in pairs], [float(value) for _, value in pairs]
