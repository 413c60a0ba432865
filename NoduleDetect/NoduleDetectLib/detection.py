"""NoduleDetect's pipeline on plain images: lungs -> candidates (classical and/or deep) -> one mask and measurement
per nodule -> merged, scored findings. No MRML here: the module's Logic writes the result into the scene and the
command line into files.

Classical path: multi-scale Hessian dot candidates in the lungs (``candidates.py``) with a low threshold, so that
faint and small nodules are among them; two small 3D CNNs score every one from the CT around it (their mean; on the
GPU when present; ``patch_classifier.py``) and the most nodule-like are kept (segmenting every candidate would cost
~0.1 s each); each of those is segmented (``nodules.py``) and described by hand-made features (``features.py``) that
a random forest turns into a nodule probability (``classifier.py``, shipped as JSON); the confidence is the product
of the networks' and the forest's probabilities. The peaks of a dense nodule centre map (``nodule_map.py``) are
candidates too, for the small nodules beside a vessel or on the pleura that give the blob filter no peak of their
own; their confidence is the map's score times the CNNs' probability. Deep path: a detection model of the catalogue
(the MONAI model zoo's ``lung_nodule_ct_detection`` bundle or a model trained with this project) run only inside the
lung bounding box; each box is segmented by the same region growing. Both: findings closer than their radius are
merged, keeping the higher confidence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RecognitionCore.anatomy import LungSegmentation, close_with_ball, segment_lungs
from RecognitionCore.errors import InputError, ModelError
from RecognitionCore.preprocessing import ball_mask, bounding_box, crop, validate_ct
from RecognitionCore.progress import Progress, as_progress

from .candidates import Candidate, find_candidates
from .classifier import ForestModel
from .features import candidate_features
from .nodule_map import NoduleMap
from .nodules import NoduleMeasurement, axial_pixel_mm, image_around, measure_nodule, segment_nodule
from .patch_classifier import PatchEnsemble, candidate_patches

METHODS = ("classical", "deep", "both")
MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
# the candidate CNNs, averaged: trained on nodules of every size, and with many 3-8 mm nodules more
DEFAULT_PATCH_CLASSIFIERS = (MODELS_DIR / "nodule_candidate_cnn.pt", MODELS_DIR / "nodule_candidate_cnn_small.pt")
DEFAULT_CLASSIFIER = MODELS_DIR / "nodule_candidate_forest.json"
DEFAULT_CENTRE_MAP = MODELS_DIR / "nodule_centre_map.pt"
# faint small ground glass scores under 12 (a 3.5 mm ball 130 HU above the lung about 10): the filter's own default
# (20) misses it
CANDIDATE_MIN_BLOB_SCORE = 8.0
MAX_SEGMENTED_CANDIDATES = 200
MAP_MIN_CONFIDENCE = 0.1  # map candidates less confident are not segmented (~0.07 s each)
MAX_MAP_PEAKS = 200  # the CNNs score a peak in ~4 ms
MAP_EXTENT_FACTOR = 1.25  # a map candidate's mask reaches at most 1.25 of the map's diameter across
# The model zoo bundle when the user has it (python -m monai.bundle download --name lung_nodule_ct_detection), else
# the extension's own synthetic detector.
DEFAULT_DETECTORS = ("lung_nodule_ct_detection", "mir_lung_nodule_retinanet")
MAX_SEARCH_DIAMETER_MM = 40.0   # Lung-RADS calls > 30 mm a mass; LIDC readers outline some up to ~35 mm
FEATURE_MARGIN_MM = 5.0         # context around a candidate's mask for the shell and texture features
LUNG_BOX_MARGIN_MM = 10.0
MERGE_MIN_RADIUS_MM = 3.0
MERGE_MIN_MASK_OVERLAP = 0.3
EXTENT_MIN_CONFIDENCE = 0.25  # a classical candidate that both the CNN and the forest give 0.5
MIN_DIAMETER_TOLERANCE_PIXELS = 1.0  # the minimum diameter holds to within what the pixel grid can tell
CONFIDENCE_DECIMALS = 4  # findings CSV and LUNA16 rows alike: a threshold keeps the same findings in both
PLEURAL_CLOSING_RADIUS_MM = 15.0  # juxta-pleural nodules up to 30 mm wide join the searched lungs
PLEURAL_CLOSING_BLOCK_MM = 1.5


@dataclass
class DetectedNodule:
    """One finding: where, how sure, how big, and its mask (a crop of the input grid, see ``segment_nodule``)."""

    center_lps_mm: Tuple[float, float, float]
    confidence: float
    methods: Tuple[str, ...]
    measurement: NoduleMeasurement
    mask: sitk.Image
    lung_side: str  # "right", "left" or "" when the nodule lies outside both lung masks

    @property
    def diameter_mm(self) -> float:
        return self.measurement.longest_axial_diameter_mm

    def box_lps_mm(self) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
        """(centre, size) of the axis-aligned box around the mask, in LPS mm."""
        corners = _mask_corners_lps(self.mask)
        low, high = corners.min(axis=0), corners.max(axis=0)
        return tuple((low + high) / 2), tuple(high - low)


@dataclass
class NoduleDetectionResult:
    """All findings above ``min_confidence``, strongest first, with the lungs they were searched in."""

    nodules: List[DetectedNodule]
    lungs: LungSegmentation
    method: str
    min_confidence: float
    candidate_count: int
    seconds: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


@dataclass
class ScoredCandidate:
    """A candidate with its mask and confidence, before merging (also the classifier's training rows)."""

    center_lps_mm: Tuple[float, float, float]
    diameter_mm: float
    confidence: float
    method: str
    mask: sitk.Image
    features: Optional[np.ndarray] = None


def lung_mask(lungs: LungSegmentation) -> sitk.Image:
    """Both lungs as one uint8 mask, where nodules are searched: the lungs plus their juxta-pleural bumps.

    The lung segmentation follows the pleura by its HU threshold, so a solid nodule on the chest wall is a dent in
    it, not inside it, and the blob filter would never see it. Each lung closed by a ball of
    ``PLEURAL_CLOSING_RADIUS_MM`` fills such dents up to twice that width. The smooth costal pleura gains nothing;
    the hilum and the grooves of the heart and aorta gain a rim of vessels and fat, which the classifier rejects.
    """
    spacing_zyx = np.array(lungs.right.GetSpacing()[::-1])
    sides = [sitk.GetArrayViewFromImage(side) != 0 for side in (lungs.right, lungs.left)]
    searched = sides[0] | sides[1]
    for side in sides:
        if side.any():
            box, bumps = _pleural_bumps(side, spacing_zyx)
            searched[box] |= bumps
    mask = sitk.GetImageFromArray(searched.view(np.uint8))
    mask.CopyInformation(lungs.right)
    return mask


def _pleural_bumps(side: np.ndarray, spacing_zyx: np.ndarray) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """(box, mask in it) of what closing one lung (a non-empty (z, y, x) mask) by a ball of
    ``PLEURAL_CLOSING_RADIUS_MM`` adds to it; the closing stays within the lung's bounding box.

    The closing runs on blocks of about ``PLEURAL_CLOSING_BLOCK_MM`` (a block is lung when at least half of its voxels
    are), which keeps it to a fraction of a second. Blocks next to an added one in the same slice are added too, so
    that a small nodule in a block that is mostly lung is not left out.
    """
    factors = np.maximum(np.rint(PLEURAL_CLOSING_BLOCK_MM / spacing_zyx), 1).astype(int)
    first, last = np.array([np.flatnonzero(side.any(axis=other))[[0, -1]]
                            for other in ((1, 2), (0, 2), (0, 1))]).T
    low = first // factors * factors  # whole blocks, so that they repeat back onto the voxels
    box = tuple(slice(a, b + 1) for a, b in zip(low, last))
    blocks = _block_fraction(side[box], factors) >= 0.5
    closed = close_with_ball(blocks, factors * spacing_zyx, PLEURAL_CLOSING_RADIUS_MM)
    added = ndimage.binary_dilation(closed & ~blocks, np.ones((1, 3, 3), bool)) & closed
    for axis, factor in enumerate(factors):
        added = np.repeat(added, factor, axis=axis)
    return box, added[tuple(slice(0, b - a + 1) for a, b in zip(low, last))]


def _block_fraction(mask: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """The fraction of each ``factors`` block that is set (the array padded with unset voxels to whole blocks)."""
    padding = [(0, (-n) % f) for n, f in zip(mask.shape, factors)]
    padded = np.pad(mask, padding).astype(np.float32)
    shape = [v for n, f in zip(padded.shape, factors) for v in (n // f, f)]
    return padded.reshape(shape).mean(axis=(1, 3, 5))


@dataclass
class CandidateClassifier:
    """The trained models of the classical path: ``network`` (the candidate CNNs) on the CT around every blob
    candidate, ``forest`` on the features of each segmented one (``features.FEATURE_NAMES``), and ``centre_map``, the
    dense network whose peaks are candidates of their own, scored by it."""

    network: PatchEnsemble
    forest: ForestModel
    centre_map: NoduleMap

    @classmethod
    def load(cls, network_paths=DEFAULT_PATCH_CLASSIFIERS, forest_path=DEFAULT_CLASSIFIER,
             centre_map_path=DEFAULT_CENTRE_MAP) -> "CandidateClassifier":
        return cls(PatchEnsemble.load(network_paths), ForestModel.from_json(forest_path),
                   NoduleMap.load(centre_map_path))


def detect_nodules(image: sitk.Image, method: str = "classical", min_confidence: float = 0.5,
                   min_diameter_mm: float = 3.0, device: str = "auto", detector_id: Optional[str] = None,
                   manifest_dirs: Sequence = (), classifier: Optional[CandidateClassifier] = None,
                   progress: Optional[Progress] = None) -> NoduleDetectionResult:
    """Lung nodules of a chest CT in HU (any grid and orientation).

    ``method``: "classical" (the shipped models), "deep" (a detection model of the catalogue: ``detector_id``,
    default the first of ``DEFAULT_DETECTORS`` that is available; ``manifest_dirs``: folders of user catalogue
    manifests, e.g. a model trained with ``cli train detection``) or "both". Findings below ``min_confidence``
    (0..1) or with a longest axial diameter below ``min_diameter_mm`` by more than the pixels can tell
    (``smallest_reported_diameter_mm``) are left out; ``min_confidence=0`` keeps every candidate (for FROC curves).
    """
    progress = as_progress(progress)
    if method not in METHODS:
        raise InputError(f"Unknown detection method {method!r}; choose one of {', '.join(METHODS)}.")
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise InputError(f"The confidence threshold must be within 0..1; got {min_confidence}.")
    if not 0.0 < float(min_diameter_mm) <= 30.0:
        raise InputError(f"The minimum nodule diameter must be within 0..30 mm; got {min_diameter_mm} mm.")
    seconds: Dict[str, float] = {}
    started = time.perf_counter()
    report = validate_ct(image)
    if classifier is None and method != "deep":
        classifier = CandidateClassifier.load()
    if method != "classical":  # before any work: a missing or corrupt model is reported at once
        card, network = load_detector(detector_id, manifest_dirs)
    progress.report(0.0, "Segmenting the lungs")
    lungs = segment_lungs(image, progress.sub(0.0, 0.2))
    lungs_mask = lung_mask(lungs)
    seconds["lungs"] = time.perf_counter() - started
    scored: List[ScoredCandidate] = []
    candidate_count = 0
    if method in ("classical", "both"):
        started = time.perf_counter()
        classical = classical_candidates(image, lungs_mask, classifier, min_diameter_mm, device,
                                         progress.sub(0.2, 0.6 if method == "both" else 0.9))
        candidate_count += len(classical)
        scored += classical
        seconds["classical"] = time.perf_counter() - started
    if method in ("deep", "both"):
        started = time.perf_counter()
        deep = deep_candidates(image, lungs_mask, card, network, device,
                               progress.sub(0.6 if method == "both" else 0.2, 0.9))
        candidate_count += len(deep)
        scored += deep
        seconds["deep"] = time.perf_counter() - started
    progress.report(0.9, "Measuring the nodules")
    started = time.perf_counter()
    nodules = [_measured(image, lungs, found, methods) for found, methods in merge_candidates(scored)
               if found.confidence >= min_confidence]
    smallest_mm = smallest_reported_diameter_mm(image, min_diameter_mm)
    nodules = [nodule for nodule in nodules if nodule.diameter_mm >= smallest_mm]
    seconds["measurements"] = time.perf_counter() - started
    progress.report(1.0, f"{len(nodules)} nodules found")
    return NoduleDetectionResult(nodules, lungs, method, float(min_confidence), candidate_count, seconds,
                                 list(report.warnings) + list(lungs.warnings))


def smallest_reported_diameter_mm(image: sitk.Image, min_diameter_mm: float) -> float:
    """The longest axial diameter a finding needs under a minimum of ``min_diameter_mm``: that minimum less
    MIN_DIAMETER_TOLERANCE_PIXELS axial pixels of ``image``. A Feret diameter on the pixel grid is exact to about a
    pixel: a 3.0 mm nodule covering 2 x 2 pixels of 1.1 mm measures 2.1 mm, and must not be dropped for it."""
    return float(min_diameter_mm) - MIN_DIAMETER_TOLERANCE_PIXELS * axial_pixel_mm(image)


def classical_candidates(image: sitk.Image, lungs_mask: sitk.Image, classifier: CandidateClassifier,
                         min_diameter_mm: float = 3.0, device: str = "cpu",
                         progress: Optional[Progress] = None) -> List[ScoredCandidate]:
    """Blob candidates in the lungs, each scored by the network (on ``device``); the ``MAX_SEGMENTED_CANDIDATES`` most
    nodule-like are segmented, described by their features and scored by the forest. Confidence: the product of the
    two probabilities (a finding needs both). Then the peaks of the centre map (``map_candidates``)."""
    progress = as_progress(progress)
    candidates = blob_candidates(image, lungs_mask, min_diameter_mm, progress.sub(0.0, 0.3))
    kept, network_probability = rank_by_network(image, candidates, classifier.network, device,
                                                progress.sub(0.3, 0.4))
    scored = describe_candidates(image, lungs_mask, [candidates[i] for i in kept], progress.sub(0.4, 0.85))
    if scored:
        forest_probability = classifier.forest.predict_proba(np.stack([row.features for row in scored]))
        for row, network_p, forest_p in zip(scored, network_probability[kept], forest_probability):
            row.confidence = float(network_p * forest_p)
    scored += map_candidates(image, lungs_mask, classifier, scored, device, progress.sub(0.85, 1.0))
    progress.report(1.0, f"{len(scored)} candidates scored")
    return scored


def map_candidates(image: sitk.Image, lungs_mask: sitk.Image, classifier: CandidateClassifier,
                   scored: Sequence[ScoredCandidate] = (), device: str = "cpu",
                   progress: Optional[Progress] = None) -> List[ScoredCandidate]:
    """The centre map's peaks (at most ``MAX_MAP_PEAKS``) whose confidence, the map's score times the candidate CNNs'
    probability at the peak (as for a blob candidate, a finding needs two models), is at least
    ``MAP_MIN_CONFIDENCE``; each is segmented by region growing from the diameter the map gives there, and the mask
    kept within ``MAP_EXTENT_FACTOR`` times that diameter of the peak. A peak that ``merge_candidates`` folds into a
    candidate of ``scored`` that is at least as confident is not segmented.

    Why the mask's limit: the map puts its peak within about a millimetre of a nodule's centre and its diameter within
    about 10% (synthetic checks), where the region growing from a small nodule beside a vessel takes in a piece of the
    vessel, moving the finding's centre out of the nodule. Why the CNNs: on real CT the map, trained on phantoms
    only, scores small spots where no reader marked a nodule 0.50-0.63 (nine on the two LIDC scans), most of which the
    CNNs score under 0.2."""
    progress = as_progress(progress)
    peaks = classifier.centre_map.peaks(image, lungs_mask, MAP_MIN_CONFIDENCE, MAX_MAP_PEAKS, device,
                                        progress.sub(0.0, 0.6))
    if not peaks:
        return []
    network_probability = classifier.network.predict_proba(
        candidate_patches(image, [peak.center_lps_mm for peak in peaks]), progress.sub(0.6, 0.7), device)
    found = []
    for number, (peak, network_p) in enumerate(zip(peaks, network_probability)):
        confidence = float(peak.score * network_p)
        if confidence < MAP_MIN_CONFIDENCE or any(
                row.confidence >= confidence and _folded_into(peak.center_lps_mm, peak.diameter_mm, row)
                for row in scored):
            continue
        progress.report(0.7 + 0.3 * number / len(peaks), f"Segmenting map peak {number + 1} of {len(peaks)}")
        mask = segment_nodule(image, peak.center_lps_mm, _hint_mm(peak.diameter_mm), lungs_mask)
        mask = _within_ball(mask, peak.center_lps_mm, MAP_EXTENT_FACTOR * peak.diameter_mm)
        found.append(ScoredCandidate(peak.center_lps_mm, peak.diameter_mm, confidence, "classical", mask))
    return found


def rank_by_network(image: sitk.Image, candidates: Sequence[Candidate], network: PatchEnsemble,
                    device: str = "cpu", progress: Optional[Progress] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(indices of the ``MAX_SEGMENTED_CANDIDATES`` candidates the networks score highest, best first; their mean
    probability of every candidate): the candidates the pipeline segments, and the forest is trained on."""
    probability = network.predict_proba(candidate_patches(image, [c.center_lps_mm for c in candidates]), progress,
                                        device)
    return np.argsort(-probability, kind="stable")[:MAX_SEGMENTED_CANDIDATES], probability


def blob_candidates(image: sitk.Image, lungs_mask: sitk.Image, min_diameter_mm: float = 3.0,
                    progress: Optional[Progress] = None) -> List[Candidate]:
    """The blob filter with the pipeline's settings (the classifiers are trained on exactly these candidates)."""
    return find_candidates(image, lungs_mask, min_diameter_mm=min_diameter_mm, max_diameter_mm=MAX_SEARCH_DIAMETER_MM,
                           progress=progress, min_blob_score=CANDIDATE_MIN_BLOB_SCORE)


def describe_candidates(image: sitk.Image, lungs_mask: sitk.Image, candidates: Sequence[Candidate],
                        progress: Optional[Progress] = None) -> List[ScoredCandidate]:
    """Each candidate segmented and described by its features (unscored: confidence 0)."""
    progress = as_progress(progress)
    scored = []
    for number, candidate in enumerate(candidates):
        if number % 10 == 0:
            progress.report(number / max(1, len(candidates)), f"Describing candidate {number + 1} of {len(candidates)}")
        mask = segment_nodule(image, candidate.center_lps_mm, _hint_mm(candidate.diameter_mm), lungs_mask)
        scored.append(ScoredCandidate(candidate.center_lps_mm, candidate.diameter_mm, 0.0, "classical", mask,
                                      _features(image, mask, candidate)))
    return scored


# Deep boxes segmented per scan, strongest first (region growing costs ~0.1 s a box, up to 0.7 s a large one). On
# LIDC-IDRI-0001/0003 and synthetic chests their findings reach past 8 false positives per scan, where the FROC ends,
# and the FROC and CPM are those of all boxes (dev/evaluate_nodule_detection.py --method deep).
_MAX_SEGMENTED_BOXES = 32


def deep_candidates(image: sitk.Image, lungs_mask: sitk.Image, card, network, device: str = "auto",
                    progress: Optional[Progress] = None) -> List[ScoredCandidate]:
    """Boxes of a detection model (``load_detector``) in the lungs, each segmented by region growing.

    The network runs on the lung bounding box, and there only on the windows that hold lung. Boxes are taken
    strongest first, at most ``_MAX_SEGMENTED_BOXES``. A box whose centre lies within the radius or mask of a stronger
    box that ``merge_candidates`` keeps is merged into a finding whatever its own mask, so it is not segmented."""
    from RecognitionCore.predict import predict_nodules

    progress = as_progress(progress)
    box = bounding_box(lungs_mask, LUNG_BOX_MARGIN_MM)
    detections = predict_nodules(crop(image, box), card, network, device=device, progress=progress.sub(0.0, 0.8),
                                 roi_mask=crop(lungs_mask, box))
    lungs = sitk.GetArrayViewFromImage(lungs_mask)
    scored: List[ScoredCandidate] = []
    findings: List[ScoredCandidate] = []  # those merge_candidates keeps (boxes come strongest first, as it takes them)
    for center, diameter, score in detections:
        if len(scored) == _MAX_SEGMENTED_BOXES:
            break
        index = lungs_mask.TransformPhysicalPointToIndex(center)
        if not lungs[index[::-1]]:
            continue  # the window reaches outside the lungs; a finding there is not a lung nodule
        if any(_folded_into(center, diameter, finding) for finding in findings):
            continue
        progress.report(0.8 + 0.2 * len(scored) / _MAX_SEGMENTED_BOXES, f"Segmenting box {len(scored) + 1}")
        mask = segment_nodule(image, center, _hint_mm(diameter), lungs_mask)
        candidate = ScoredCandidate(tuple(center), float(diameter), float(score), "deep", mask)
        scored.append(candidate)
        if sitk.GetArrayViewFromImage(mask).any() and not any(_same_finding(candidate, f) for f in findings):
            findings.append(candidate)
    progress.report(1.0, f"{len(scored)} boxes in the lungs")
    return scored


def _within_ball(mask: sitk.Image, center_lps_mm, diameter_mm: float) -> sitk.Image:
    """The mask without its voxels (centres) further than ``diameter_mm`` / 2 from ``center_lps_mm``."""
    try:
        return sitk.And(mask, ball_mask(mask, center_lps_mm, diameter_mm))
    except InputError:  # no voxel centre of the mask's grid lies within the ball: none is kept
        return mask * 0


def _folded_into(center_lps_mm, diameter_mm: float, finding: ScoredCandidate) -> bool:
    """Whether ``merge_candidates`` merges a box at ``center_lps_mm`` into a stronger ``finding`` whatever the box's
    own mask: its centre lies within their larger radius or inside the finding's mask."""
    radius = max(diameter_mm, finding.diameter_mm, 2 * MERGE_MIN_RADIUS_MM) / 2
    return (np.linalg.norm(np.subtract(center_lps_mm, finding.center_lps_mm)) < radius
            or _inside_mask(finding.mask, center_lps_mm))


def load_detector(detector_id: Optional[str] = None, manifest_dirs: Sequence = ()):
    """(card, network) of the detection model to use: ``detector_id``, or the first of ``DEFAULT_DETECTORS`` that
    is installed. A clear error when none is."""
    from RecognitionCore.models import Catalogue, load_network, resolve_card

    catalogue = Catalogue.with_user_manifests(manifest_dirs)
    available = catalogue.ids("detection")
    if detector_id and detector_id not in available:
        raise ModelError(f"No detection model '{detector_id}' in the catalogue; available: "
                         f"{', '.join(available) or 'none'}.")
    errors = []
    for model_id in [detector_id] if detector_id else [m for m in DEFAULT_DETECTORS if m in available]:
        try:
            card = resolve_card(catalogue.get(model_id))
            return card, load_network(card, device="cpu", offline=detector_id is None)
        except ModelError as error:
            errors.append(str(error))
    raise ModelError("No nodule detection model is available for the deep method. " + " ".join(errors) +
                     " Use the classical method, or download the MONAI model zoo's lung_nodule_ct_detection bundle "
                     "(python -m monai.bundle download --name lung_nodule_ct_detection).")


def merge_candidates(scored: Sequence[ScoredCandidate]) -> List[Tuple[ScoredCandidate, Tuple[str, ...]]]:
    """Non-maximum suppression across methods: from the most confident down, a candidate is merged into a kept one
    when either centre lies within the other's radius or inside the other's mask, or when their masks share at least
    ``MERGE_MIN_MASK_OVERLAP`` of the smaller one (several blob scales and boxes fall on one large or lobulated
    nodule); returns (kept, methods).

    The finding keeps the highest confidence, and the largest mask (with its centre and size) among its candidates
    of at least ``EXTENT_MIN_CONFIDENCE``: candidates on one mass segment parts of it, and the report must measure
    the whole mass, not its most confident part. Below that confidence a larger mask is more likely a leak. A mask
    that grows so can come to cover findings kept before it grew (the ground-glass rim of a part-solid mass, seeded
    beside its solid part): the findings are merged again, the same way, until no two are one.
    """
    findings = [(candidate, {candidate.method}) for candidate in sorted(scored, key=lambda row: -row.confidence)
                if sitk.GetArrayViewFromImage(candidate.mask).any()]  # an empty mask: nothing brighter than the lung
    grew = True
    while grew:
        findings, grew = _merged_once(findings)
    return [(candidate, tuple(sorted(methods))) for candidate, methods in findings]


def _merged_once(ranked: Sequence[Tuple[ScoredCandidate, set]]) -> Tuple[List[Tuple[ScoredCandidate, set]], bool]:
    """One pass of ``merge_candidates`` over (candidate, methods), most confident first; and whether a finding took a
    larger mask (without one, every pair of findings was compared with its final masks, and the merge is done)."""
    kept: List[Tuple[ScoredCandidate, set]] = []
    grew = False
    for candidate, methods in ranked:
        for number, (other, other_methods) in enumerate(kept):
            if _same_finding(candidate, other):
                other_methods |= methods
                if candidate.confidence >= EXTENT_MIN_CONFIDENCE and _voxels(candidate.mask) > _voxels(other.mask):
                    kept[number] = (replace(candidate, confidence=other.confidence), other_methods)
                    grew = True
                break
        else:
            kept.append((candidate, set(methods)))
    return kept, grew


def _voxels(mask: sitk.Image) -> int:
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))


def _same_finding(first: ScoredCandidate, second: ScoredCandidate) -> bool:
    return (_folded_into(first.center_lps_mm, first.diameter_mm, second)
            or _inside_mask(first.mask, second.center_lps_mm)
            or _mask_overlap(first.mask, second.mask) >= MERGE_MIN_MASK_OVERLAP)


def _mask_overlap(first: sitk.Image, second: sitk.Image) -> float:
    """Shared voxels as a fraction of the smaller mask; both are crops of the same input grid."""
    offset = np.array(first.TransformPhysicalPointToIndex(second.GetOrigin()))  # i, j, k
    low = np.maximum(offset, 0)
    high = np.minimum(offset + np.array(second.GetSize()), first.GetSize())
    if np.any(high <= low):
        return 0.0
    a = sitk.GetArrayViewFromImage(first)[low[2]:high[2], low[1]:high[1], low[0]:high[0]] != 0
    b = sitk.GetArrayViewFromImage(second)[low[2] - offset[2]:high[2] - offset[2],
                                           low[1] - offset[1]:high[1] - offset[1],
                                           low[0] - offset[0]:high[0] - offset[0]] != 0
    smaller = min(_voxels(first), _voxels(second))
    return float(np.count_nonzero(a & b)) / max(smaller, 1)


def _inside_mask(mask: sitk.Image, point_lps_mm) -> bool:
    index = np.rint(mask.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps_mm])).astype(int)
    if np.any(index < 0) or np.any(index >= mask.GetSize()):
        return False
    return bool(mask[[int(v) for v in index]])


def _hint_mm(diameter_mm: float) -> float:
    return float(np.clip(diameter_mm, 2.0, MAX_SEARCH_DIAMETER_MM))


def _features(image: sitk.Image, mask: sitk.Image, candidate: Candidate) -> np.ndarray:
    around, mask_around, _ = image_around(image, mask, FEATURE_MARGIN_MM)
    return candidate_features(around.astype(np.float32), mask_around, image.GetSpacing(),
                              blob_score=candidate.blob_score, scale_mm=candidate.scale_mm)


def _measured(image: sitk.Image, lungs: LungSegmentation, found: ScoredCandidate, methods: Tuple[str, ...]
              ) -> DetectedNodule:
    measurement = measure_nodule(image, found.mask)
    return DetectedNodule(measurement.center_lps_mm, found.confidence, methods, measurement, found.mask,
                          _lung_side(lungs, found.mask))


def _lung_side(lungs: LungSegmentation, mask: sitk.Image) -> str:
    """The lung holding most of the nodule's voxels."""
    counts = {}
    for side, lung in (("right", lungs.right), ("left", lungs.left)):
        start = lung.TransformPhysicalPointToIndex(mask.GetOrigin())
        region = sitk.RegionOfInterest(lung, mask.GetSize(), start)
        counts[side] = int(np.count_nonzero(sitk.GetArrayViewFromImage(region)[sitk.GetArrayViewFromImage(mask) != 0]))
    side = max(counts, key=counts.get)
    return side if counts[side] else ""


def _mask_corners_lps(mask: sitk.Image) -> np.ndarray:
    """The 8 corners (voxel edges) of the mask's non-zero extent, in LPS mm."""
    nonzero = np.argwhere(sitk.GetArrayViewFromImage(mask) != 0)[:, ::-1]  # i, j, k
    low, high = nonzero.min(axis=0) - 0.5, nonzero.max(axis=0) + 0.5
    corners = [(x, y, z) for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
    return np.array([mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in corner]) for corner in corners])


# ---------------------------------------------------------------------------------------------------------------------
# Report: what the table, the CSV and the LUNA16 file say about each finding

FINDING_COLUMNS = ("nodule", "confidence", "method", "lung", "type", "longest_axial_diameter_mm",
                   "mean_axial_diameter_mm", "longest_diameter_3d_mm", "volume_mm3", "mean_hu", "solid_fraction",
                   "solid_mean_axial_diameter_mm", "lung_rads_size_band", "center_r_mm", "center_a_mm", "center_s_mm")
FINDING_UNITS = {"confidence": "", "longest_axial_diameter_mm": "mm", "mean_axial_diameter_mm": "mm",
                 "longest_diameter_3d_mm": "mm", "volume_mm3": "mm3", "mean_hu": "HU", "solid_fraction": "",
                 "solid_mean_axial_diameter_mm": "mm", "center_r_mm": "mm", "center_a_mm": "mm", "center_s_mm": "mm"}


def nodule_label(number: int) -> str:
    return f"N{number + 1}"


def finding_rows(result: NoduleDetectionResult) -> List[dict]:
    """One row per nodule (strongest first) for the results table and the CSV. Centres in RAS, as Slicer shows them.
    The solid part's mean axial diameter is the size that sets a part-solid nodule's Lung-RADS band. The confidence
    has CONFIDENCE_DECIMALS, like the LUNA16 rows (0.4997 is not 0.5)."""
    rows = []
    for number, nodule in enumerate(result.nodules):
        m = nodule.measurement
        x, y, z = nodule.center_lps_mm
        rows.append({"nodule": nodule_label(number), "confidence": round(nodule.confidence, CONFIDENCE_DECIMALS),
                     "method": "+".join(nodule.methods), "lung": nodule.lung_side, "type": m.type,
                     "longest_axial_diameter_mm": round(m.longest_axial_diameter_mm, 1),
                     "mean_axial_diameter_mm": round(m.mean_axial_diameter_mm, 1),
                     "longest_diameter_3d_mm": round(m.longest_diameter_3d_mm, 1),
                     "volume_mm3": round(m.volume_mm3, 1), "mean_hu": round(m.mean_hu, 0),
                     "solid_fraction": round(m.solid_fraction, 2),
                     "solid_mean_axial_diameter_mm": round(m.solid_mean_axial_diameter_mm, 1),
                     "lung_rads_size_band": m.lung_rads_size_category,
                     "center_r_mm": round(-x, 1), "center_a_mm": round(-y, 1), "center_s_mm": round(z, 1)})
    return rows


def finding_description(row: dict) -> str:
    """The one-line description a point's label carries in the views."""
    side = f", {row['lung']} lung" if row["lung"] else ""
    solid = f" (solid part {row['solid_mean_axial_diameter_mm']:.1f} mm)" if row["type"] == "part-solid" else ""
    return (f"{row['nodule']}: {row['longest_axial_diameter_mm']:.1f} mm {row['type']} nodule{solid}{side}, "
            f"confidence {row['confidence']:.2f}, Lung-RADS size band {row['lung_rads_size_band']} (size only, "
            "not a diagnosis)")


def luna16_rows(result: NoduleDetectionResult, seriesuid: str) -> List[dict]:
    """LUNA16 submission rows: seriesuid, coordX/Y/Z (LPS mm), probability."""
    return [{"seriesuid": seriesuid, "coordX": round(n.center_lps_mm[0], 2), "coordY": round(n.center_lps_mm[1], 2),
             "coordZ": round(n.center_lps_mm[2], 2), "probability": round(n.confidence, CONFIDENCE_DECIMALS)}
            for n in result.nodules]


def mask_on_grid(mask: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """A nodule's cropped mask pasted into a (k, j, i) bool array of the reference grid it was cropped from."""
    start = np.array(reference.TransformPhysicalPointToIndex(mask.GetOrigin()))[::-1]
    full = np.zeros(reference.GetSize()[::-1], dtype=bool)
    crop_array = sitk.GetArrayViewFromImage(mask) != 0
    full[tuple(slice(s, s + n) for s, n in zip(start, crop_array.shape))] = crop_array
    return full
