"""Evaluate NoduleDetect with the project's own commands: `cli nodules` writes LUNA16 detections, `cli evaluate
detection` prints the FROC table (sensitivity at 1/8..8 FP/scan, CPM, precision/recall/F1) and writes the FROC PNG.

    .venv/bin/python dev/evaluate_nodule_detection.py [--synthetic 50] [--shared ../shared/data] [--output out/eval]

Two sets: a synthetic one of generated chest phantoms (3-30 mm nodules: solid, part-solid and ground-glass;
isolated, juxta-pleural and juxta-vascular; vessel trees) in LUNA16 layout, and the real LIDC-IDRI cases of
../shared/data/lidc (reader clusters of nodules >= 3 mm; the goal counts those with >= 3 readers).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from RecognitionCore import cli, datasets  # noqa: E402

SYNTHETIC_GRID = dict(size_ijk=(320, 320, 120), spacing_mm=(1.1, 1.1, 2.5))
SYNTHETIC_FIRST_SEED = 7000  # the classifier trains on seeds 5000+ (dev/train_nodule_classifier.py)
NODULES_PER_CASE = 6
LIDC_0001_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def detect(inputs, output: Path, extra=()) -> Path:
    """`cli nodules` on the inputs, keeping every candidate (the FROC needs them); returns detections.csv."""
    if cli.main(["nodules", "--quiet", "--min-confidence", "0", "--output", str(output),
                 *[argument for path in inputs for argument in ("--input", str(path))], *extra]):
        print(f"{output}: some cases failed (see above)")
    return output / "detections.csv"


def evaluate(annotations: Path, detections: Path, output: Path, title: str) -> int:
    return cli.main(["evaluate", "detection", "--annotations", str(annotations), "--detections", str(detections),
                     "--title", title, "--output", str(output), "--threshold", "0.5"])


def lidc_annotations(shared: Path, output: Path, min_readers: int) -> Path:
    """The LIDC reader clusters with at least ``min_readers`` readers, in the LUNA16 layout with diameter_mm."""
    path = output / f"annotations_{min_readers}_readers.csv"
    output.mkdir(parents=True, exist_ok=True)
    with open(shared / "lidc" / "annotations.csv") as source, open(path, "w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for row in csv.DictReader(source):
            if int(row["n_readers"]) >= min_readers:
                writer.writerow([row["seriesuid"], row["coordX"], row["coordY"], row["coordZ"],
                                 row["approx_max_extent_mm"]])
    return path


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
            evaluate(lidc_annotations(shared, output / f"lidc-{readers}-readers", readers), detections,
                     output / f"lidc-{readers}-readers", f"LIDC-IDRI-0001/0003, >= {readers} readers")
    if args.synthetic:
        folder = output / "synthetic-data"
        cases = datasets.write_synthetic_detection_dataset(folder, args.synthetic, seed=SYNTHETIC_FIRST_SEED,
                                                           nodules_per_case=NODULES_PER_CASE, **SYNTHETIC_GRID)
        evaluate(folder / "annotations.csv", detect([case.image_path for case in cases], output / "synthetic", extra),
                 output / "synthetic", f"{args.synthetic} synthetic chest CTs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
