"""Evaluate NoduleDetect with the project's own commands: `cli nodules` writes LUNA16 detections, `cli evaluate
detection` prints the FROC table (sensitivity at 1/8..8 FP/scan, CPM, precision/recall/F1) and writes the FROC PNG.

    .venv/bin/python dev/evaluate_nodule_detection.py [--synthetic 50] [--shared ../shared/data] [--output out/eval]

Two sets: a synthetic one of generated chest phantoms (3-30 mm nodules: solid, part-solid and ground-glass;
isolated, juxta-pleural and juxta-vascular; vessel trees) in LUNA16 layout, and the real LIDC-IDRI cases of
../shared/data/lidc (reader clusters of nodules >= 3 mm; the goal counts those with >= 3 readers). As in LUNA16, a
detection on what the readers marked but the evaluated set leaves out (a cluster with fewer readers, a nodule under
3 mm) counts neither as a hit nor as a false positive. Measurements are checked too: the synthetic findings against
the phantoms' truth (size, type, Lung-RADS size band), the LIDC findings' type against the readers' texture ratings.
"""

from __future__ import annotations

import argparse
import csv
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "NoduleDetect")]
from RecognitionCore import cli, datasets  # noqa: E402
from NoduleDetectLib.nodules import lung_rads_size_category  # noqa: E402

SYNTHETIC_GRID = dict(size_ijk=(320, 320, 120), spacing_mm=(1.1, 1.1, 2.5))
SYNTHETIC_FIRST_SEED = 7000  # the classifier trains on seeds 5000+ and 6000+ (dev/train_nodule_classifier.py)
NODULES_PER_CASE = 6
DEFAULT_CONFIDENCE = 0.5  # the module's default threshold: measurements are judged on the findings a reader sees
SIZE_BANDS_MM = ((3, 5), (5, 8), (8, 12), (12, 30))
LIDC_0001_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def first_synthetic_case(grid=None):
    """The first synthetic evaluation phantom (for benchmarks and checks), on ``grid`` (size_ijk, spacing_mm) or the
    evaluation's own."""
    from RecognitionCore.phantoms import make_chest_ct

    return make_chest_ct(seed=SYNTHETIC_FIRST_SEED, nodules=NODULES_PER_CASE, **(grid or SYNTHETIC_GRID))


def detect(inputs, output: Path, extra=()) -> Path:
    """`cli nodules` on the inputs, keeping every candidate (the FROC needs them); returns detections.csv."""
    if cli.main(["nodules", "--quiet", "--min-confidence", "0", "--output", str(output),
                 *[argument for path in inputs for argument in ("--input", str(path))], *extra]):
        print(f"{output}: some cases failed (see above)")
    return output / "detections.csv"


def evaluate(annotations: Path, detections: Path, output: Path, title: str, excluded: Optional[Path] = None) -> int:
    return cli.main(["evaluate", "detection", "--annotations", str(annotations), "--detections", str(detections),
                     "--title", title, "--output", str(output), "--threshold", "0.5",
                     *(["--excluded", str(excluded)] if excluded else [])])


def lidc_reference(shared: Path, output: Path, min_readers: int) -> Tuple[Path, Path]:
    """(annotations, excluded) in the LUNA16 layout with diameter_mm: the LIDC reader clusters with at least
    ``min_readers`` readers, and LUNA16's irrelevant findings for them: the clusters with fewer (their extent as
    diameter) and every read of a nodule under 3 mm (diameter -1, as in LUNA16's annotations_excluded.csv; such a
    point counts with the evaluation's fixed radius)."""
    output.mkdir(parents=True, exist_ok=True)
    annotations = output / f"annotations_{min_readers}_readers.csv"
    excluded = output / f"excluded_{min_readers}_readers.csv"
    with open(shared / "lidc" / "annotations.csv") as clusters, open(shared / "lidc" / "reads.csv") as reads, \
            open(annotations, "w", newline="") as nodules_file, open(excluded, "w", newline="") as excluded_file:
        nodules, irrelevant = csv.writer(nodules_file), csv.writer(excluded_file)
        for writer in (nodules, irrelevant):
            writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for row in csv.DictReader(clusters):
            writer = nodules if int(row["n_readers"]) >= min_readers else irrelevant
            writer.writerow([row["seriesuid"], row["coordX"], row["coordY"], row["coordZ"],
                             row["approx_max_extent_mm"]])
        for row in csv.DictReader(reads):
            if row["ge3mm"] != "True":
                irrelevant.writerow([row["seriesuid"], row["wx"], row["wy"], row["wz"], -1])
    return annotations, excluded


def lidc_reader_textures(shared: Path) -> Dict[Tuple[str, int, str], int]:
    """(patient, reader, nodule ID) -> that reader's texture rating of the nodule in the LIDC XML (1 non-solid or
    ground glass, 3 part solid, 5 solid); readers are numbered in the order of their reading sessions, as in
    reads.csv."""
    textures = {}
    for path in sorted((shared / "lidc").glob("LIDC-IDRI-*.xml")):
        root = ElementTree.parse(path).getroot()
        namespace = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        for reader, session in enumerate(root.iter(f"{namespace}readingSession")):
            for nodule in session.iter(f"{namespace}unblindedReadNodule"):
                texture = nodule.find(f"{namespace}characteristics/{namespace}texture")
                if texture is not None and texture.text:
                    textures[(path.stem, reader, nodule.find(f"{namespace}noduleID").text.strip())] = int(texture.text)
    return textures


def lidc_types(shared: Path, findings: Path) -> None:
    """Prints each LIDC reader cluster beside its most confident finding at ``DEFAULT_CONFIDENCE`` within its
    radius: the readers' texture ratings (each read of a nodule >= 3 mm counts for the nearest cluster of its series)
    against the finding's type, mean axial diameter, solid part and Lung-RADS size band: real CT's check of the type."""
    textures = lidc_reader_textures(shared)
    with open(shared / "lidc" / "annotations.csv") as file:
        clusters = list(csv.DictReader(file))
    with open(shared / "lidc" / "reads.csv") as file:
        reads = [row for row in csv.DictReader(file) if row["ge3mm"] == "True"]
    patients = {read["seriesuid"]: read["patient"] for read in reads}
    centers = [np.array([float(row[axis]) for axis in ("coordX", "coordY", "coordZ")]) for row in clusters]
    ratings = [[] for _ in clusters]
    for read in reads:
        center = np.array([float(read[axis]) for axis in ("wx", "wy", "wz")])
        nearest = min((index for index, row in enumerate(clusters) if row["seriesuid"] == read["seriesuid"]),
                      key=lambda index: np.linalg.norm(centers[index] - center))
        ratings[nearest].append(textures[(read["patient"], int(read["reader"]), read["nodule_id"])])
    print(f"LIDC reader clusters: the readers' texture (1 ground glass, 3 part solid, 5 solid) and the finding at "
          f"confidence >= {DEFAULT_CONFIDENCE}:")
    for cluster, center, rated in zip(clusters, centers, ratings):
        patient = patients[cluster["seriesuid"]]
        case = next(path for path in (findings / f"{cluster['seriesuid']}_nodules.csv",
                                      findings / f"{patient}_nodules.csv") if path.is_file())
        finding = _most_confident_within(_shown_findings(case), center, float(cluster["approx_max_extent_mm"]) / 2)
        found = "no finding" if finding is None else (
            f"{finding['type']}, {finding['mean_axial_diameter_mm']} mm (solid part "
            f"{finding['solid_mean_axial_diameter_mm']} mm), band {finding['lung_rads_size_band']}, confidence "
            f"{finding['confidence']}")
        print(f"  {patient}, {float(cluster['approx_max_extent_mm']):.0f} mm, {cluster['n_readers']} readers, "
              f"texture {sorted(rated)}: {found}")


def _shown_findings(path: Path) -> List[dict]:
    """The findings of a ``<case>_nodules.csv`` at ``DEFAULT_CONFIDENCE`` or more."""
    with open(path) as file:
        return [row for row in csv.DictReader(file) if float(row["confidence"]) >= DEFAULT_CONFIDENCE]


def _most_confident_within(findings: List[dict], center_lps_mm: np.ndarray, radius_mm: float) -> Optional[dict]:
    """The most confident of ``findings`` (rows of a findings CSV, centres in RAS) within ``radius_mm`` of
    ``center_lps_mm``; None when none is."""
    within = [row for row in findings
              if np.linalg.norm(np.array([-float(row["center_r_mm"]), -float(row["center_a_mm"]),
                                          float(row["center_s_mm"])]) - center_lps_mm) <= radius_mm]
    return max(within, key=lambda row: float(row["confidence"]), default=None)


def synthetic_measurements(truth: Path, findings: Path) -> Path:
    """Each synthetic nodule (``<case>_lesions.csv`` in ``truth``) found at ``DEFAULT_CONFIDENCE`` (its most confident
    finding within its radius, from ``<case>_nodules.csv`` in ``findings``) against its truth: mean axial diameter
    (Lung-RADS's size), volume, type, the solid part's diameter and the Lung-RADS size band these give. Writes
    measurements.csv beside the findings and prints a summary per size band."""
    rows = []
    for lesions in sorted(truth.glob("*_lesions.csv")):
        uid = lesions.name[:-len("_lesions.csv")]
        shown = _shown_findings(findings / f"{uid}_nodules.csv")
        with open(lesions) as file:
            nodules = [row for row in csv.DictReader(file) if row["kind"] == "nodule"]
        for nodule in nodules:
            center = np.array([float(nodule[axis]) for axis in ("coordX", "coordY", "coordZ")])
            diameter_mm = float(nodule["diameter_mm"])
            finding = _most_confident_within(shown, center, diameter_mm / 2)
            if finding is None:
                continue
            solid_diameter_mm = float(nodule["solid_diameter_mm"])
            rows.append({"seriesuid": uid, "nodule": finding["nodule"], "diameter_mm": diameter_mm,
                         "type": nodule["type"], "location": nodule["location"], "solid_diameter_mm": solid_diameter_mm,
                         "volume_mm3": round(float(nodule["volume_ml"]) * 1000.0, 1),
                         "measured_mean_axial_diameter_mm": float(finding["mean_axial_diameter_mm"]),
                         "measured_volume_mm3": float(finding["volume_mm3"]), "measured_type": finding["type"],
                         "measured_solid_mean_axial_diameter_mm": float(finding["solid_mean_axial_diameter_mm"]),
                         "lung_rads_band": lung_rads_size_category(nodule["type"], diameter_mm, solid_diameter_mm),
                         "measured_lung_rads_band": finding["lung_rads_size_band"]})
    path = findings / "measurements.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["seriesuid"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"Measurements of the synthetic nodules found at confidence >= {DEFAULT_CONFIDENCE} ({path}):")
    print(f"{'size band':<12} {'found':>6} {'mean axial diameter error mm':>30} {'volume error %':>16} "
          f"{'type right':>11} {'Lung-RADS band right':>21}")
    for low, high in SIZE_BANDS_MM:
        band = [row for row in rows if low <= row["diameter_mm"] < high or (high == SIZE_BANDS_MM[-1][1]
                                                                          and row["diameter_mm"] == high)]
        if not band:
            continue
        diameter_error = np.array([row["measured_mean_axial_diameter_mm"] - row["diameter_mm"] for row in band])
        volume_error = np.array([100.0 * (row["measured_volume_mm3"] / row["volume_mm3"] - 1.0) for row in band])
        right = sum(row["measured_type"] == row["type"] for row in band)
        band_right = sum(row["measured_lung_rads_band"] == row["lung_rads_band"] for row in band)
        print(f"{f'{low}-{high} mm':<12} {len(band):>6} {_median_and_range(diameter_error):>30} "
              f"{_median_and_range(volume_error, '.0f'):>16} {right:>5} of {len(band):<3} "
              f"{band_right:>13} of {len(band):<3}")
    part_solid = [row for row in rows if row["type"] == row["measured_type"] == "part-solid"]
    if part_solid:
        solid_error = np.array([row["measured_solid_mean_axial_diameter_mm"] - row["solid_diameter_mm"]
                                for row in part_solid])
        print(f"solid part of the {len(part_solid)} part-solid nodules typed part-solid: mean axial diameter error "
              f"{_median_and_range(solid_error)} mm")
    for name, truth_key, measured_key in (("type", "type", "measured_type"),
                                          ("Lung-RADS size band", "lung_rads_band", "measured_lung_rads_band")):
        confusion = Counter((row[truth_key], row[measured_key]) for row in rows)
        print(f"{name} (truth -> measured): " + ", ".join(
            f"{truth} -> {measured}: {number}" for (truth, measured), number in sorted(confusion.items())))
    return path


def _median_and_range(values: np.ndarray, spec: str = ".1f") -> str:
    """Median with the 10th-90th percentile range, e.g. "+0.3 (-0.8..+1.2)"."""
    low, median, high = np.percentile(values, (10, 50, 90))
    return f"{median:+{spec}} ({low:+{spec}}..{high:+{spec}})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, default=50, help="number of generated chest CTs (0: skip)")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--output", default=str(REPO / "out" / "nodule-evaluation"))
    parser.add_argument("--method", default="classical", choices=("classical", "deep", "both"))
    args = parser.parse_args(argv)
    output, shared = Path(args.output), Path(args.shared)
    extra = ["--method", args.method]
    if (shared / "lidc" / "annotations.csv").is_file():
        # LIDC-IDRI-0003 is an NRRD named by patient: a symlink named by its series UID gives LUNA16's seriesuid.
        named = output / "lidc-inputs"
        named.mkdir(parents=True, exist_ok=True)
        uid_0003 = next(row["seriesuid"] for row in csv.DictReader(open(shared / "lidc" / "annotations.csv"))
                        if row["seriesuid"] != LIDC_0001_UID)
        link = named / f"{uid_0003}.nrrd"
        if not link.exists():
            link.symlink_to((shared / "lidc" / "LIDC-IDRI-0003.nrrd").resolve())
        detections = detect([shared / "lidc" / "LIDC-IDRI-0001", link], output / "lidc", extra)
        for readers in (3, 1):
            folder = output / f"lidc-{readers}-readers"
            annotations, excluded = lidc_reference(shared, folder, readers)
            evaluate(annotations, detections, folder, f"LIDC-IDRI-0001/0003, >= {readers} readers", excluded)
        lidc_types(shared, output / "lidc")
    else:
        print(f"No LIDC cases in {shared / 'lidc'} (no annotations.csv there): the LIDC evaluation is skipped. "
              "--shared names the folder that holds lidc/.", file=sys.stderr)
        if not args.synthetic:
            return 1
    if args.synthetic:
        folder = output / "synthetic-data"
        cases = datasets.write_synthetic_detection_dataset(folder, args.synthetic, seed=SYNTHETIC_FIRST_SEED,
                                                           nodules_per_case=NODULES_PER_CASE, **SYNTHETIC_GRID)
        evaluate(folder / "annotations.csv", detect([case.image_path for case in cases], output / "synthetic", extra),
                 output / "synthetic", f"{args.synthetic} synthetic chest CTs")
        synthetic_measurements(folder, output / "synthetic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
