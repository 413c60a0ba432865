"""Foundation benchmark on the real LIDC-IDRI-0001 chest CT (133 DICOM slices, 512 x 512): load time, preprocessing
time per step, peak RSS, and sliding-window throughput of a MONAI 3D UNet, our runner vs plain MONAI, in one run.

    python bench/foundation.py [--ct PATH] [--device auto|cpu|cuda] [--repeats N]

Prints a table; the goals live here, not in timed tests.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from RecognitionCore import io, preprocessing  # noqa: E402
from RecognitionCore.headless import create_app  # noqa: E402
from RecognitionCore.testing import shared_data_dir  # noqa: E402
from RecognitionCore.volumes import volume_node_to_sitk  # noqa: E402
from sliding_window import format_table, measure_throughput  # noqa: E402

MODEL_SPACING_MM = (1.5, 1.5, 1.5)
LUNG_WINDOW = {"type": "window", "hu_min": -1024, "hu_max": 400}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(rows: list, step: str, function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    rows.append((step, time.perf_counter() - start))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", help="CT file or DICOM folder (default: ../shared/data/lidc/LIDC-IDRI-0001)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    ct_path = Path(args.ct) if args.ct else shared_data_dir() / "lidc" / "LIDC-IDRI-0001"

    rows: list = []
    imports_rss = peak_rss_mb()  # torch, MONAI, VTK and slicer-core are loaded by now
    app = create_app()
    node = timed(rows, "load DICOM series into a volume node", io.load_volume, ct_path, app.scene)
    image = timed(rows, "volume node -> SimpleITK", volume_node_to_sitk, node)
    load_rss = peak_rss_mb()
    timed(rows, "validate_ct", preprocessing.validate_ct, image)
    body = timed(rows, "body_mask", preprocessing.body_mask, image)
    lungs = timed(rows, "lung_mask_coarse", preprocessing.lung_mask_coarse, image, body)
    box = timed(rows, "bounding_box (lungs, 10 mm margin)", preprocessing.bounding_box, lungs, 10.0)
    cropped = timed(rows, "crop", preprocessing.crop, image, box)
    timed(rows, "denoise (gaussian 1 mm, cropped)", preprocessing.denoise, cropped, "gaussian")
    timed(rows, "denoise (median 3x3x3, cropped)", preprocessing.denoise, cropped, "median")
    prepared, _ = timed(rows, "preprocess_for_model (1.5 mm, window)", preprocessing.preprocess_for_model,
                        cropped, MODEL_SPACING_MM, LUNG_WINDOW)
    preprocessing_rss = peak_rss_mb()

    size = " x ".join(map(str, image.GetSize()))
    print(f"CT: {ct_path} ({size} voxels, {' x '.join(f'{s:.3f}' for s in image.GetSpacing())} mm)")
    print(f"{'step':45s} {'seconds':>8s}")
    for step, seconds in rows:
        print(f"{step:45s} {seconds:8.2f}")
    loading = sum(seconds for step, seconds in rows[:2])
    print(f"{'total: loading':45s} {loading:8.2f}")
    print(f"{'total: preprocessing':45s} {sum(seconds for _, seconds in rows[2:]):8.2f}")
    print(f"peak RSS after the imports {imports_rss:.0f} MB, after loading {load_rss:.0f} MB, after preprocessing "
          f"{preprocessing_rss:.0f} MB")

    volume = sitk.GetArrayFromImage(prepared).astype(np.float32)
    print(f"\nSliding window on the preprocessed lung box ({' x '.join(map(str, prepared.GetSize()))} voxels at "
          f"{MODEL_SPACING_MM[0]} mm):")
    del app, node, image, body, lungs, cropped
    result = measure_throughput(volume, device=args.device, repeats=args.repeats)
    print(format_table(result))
    print(f"peak RSS of the whole run {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
