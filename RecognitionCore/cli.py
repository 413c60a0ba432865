"""Command line: the same logic as the Slicer modules, for batch work on files and DICOM folders.

    python -m RecognitionCore.cli prepare [--input CT ...] [--output DIR]   # check + preprocess; .mrb, PNG, JSON
    python -m RecognitionCore.cli nodules [--input CT ...] [--output DIR]   # NoduleDetect: .mrb, CSVs, PNG
    python -m RecognitionCore.cli organs [--input CT ...] [--output DIR]    # OrganSegment: .mrb, CSVs, labels, PNG
    python -m RecognitionCore.cli surgery [--input CT --segmentation SEG ...] [--output DIR]  # SurgeryPlan: .mrb,
                                                                             # CSV, STL, one-page report
    python -m RecognitionCore.cli phantom --kind chest --output DIR          # a generated CT with its ground truth
    python -m RecognitionCore.cli models                                     # the model catalogue
    python -m RecognitionCore.cli evaluate detection|segmentation|curves ... # FROC/CPM, Dice/HD95, learning curves
    python -m RecognitionCore.cli train segmentation|detection ...           # train or fine-tune; a new model card

Without ``--input``, ``prepare`` and ``nodules`` run on a generated chest phantom, ``organs`` and ``surgery`` on an
abdominal one (with its liver, tumour and vessel truth as the segmentation), so it works with no data and no network.
Each case is written to its own files; a failing case is reported and the others go on (exit status 1 if any failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from .errors import RecognitionError

# The coarse lung mask is the air enclosed by the body: lungs on a chest CT, but bowel gas on an abdominal one, so it is
# named for what it is and carries no lung terminology (the clinical lung segmentation is NoduleDetect's).
ENCLOSED_AIR = "Enclosed air (coarse lungs)"
OVERLAY_COLORS_RGB = {"Body": (0.3, 0.85, 0.3), ENCLOSED_AIR: (0.2, 0.6, 1.0)}
DEFAULT_PHANTOM_SIZE_IJK = (256, 256, 128)
DEFAULT_PHANTOM_SPACING_MM = (1.4, 1.4, 2.5)
# The grid the shipped organ model was trained on (about 3 mm voxels).
DEFAULT_ABDOMEN_PHANTOM_SIZE_IJK = (128, 128, 96)
DEFAULT_ABDOMEN_PHANTOM_SPACING_MM = (3.1, 3.1, 3.1)


@dataclass
class PreparedCase:
    """What ``prepare_case`` made: output files and the numbers a user checks."""

    name: str
    files: dict = field(default_factory=dict)
    size: tuple = ()
    spacing_mm: tuple = ()
    prepared_size: tuple = ()
    prepared_spacing_mm: tuple = ()
    body_volume_ml: float = 0.0
    lung_volume_ml: float = 0.0
    warnings: List[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def _mask_volume_ml(mask) -> float:
    import numpy as np
    import SimpleITK as sitk

    return float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * float(np.prod(mask.GetSpacing())) / 1000.0


def prepare_case(load_input: Callable, name: str, output_dir: Path, spacing_mm: Optional[float],
                 denoise_method: str, progress=None) -> PreparedCase:
    """Load one CT into a fresh scene, check it, preprocess it, add the results as new nodes, save everything.

    ``load_input(scene) -> (volume_node, extra)`` puts the input into the scene; ``extra`` may hold a phantom's
    truth. The input node is never modified; the scene, the PNG preview and the JSON summary go to ``output_dir``.
    """
    import numpy as np
    import SimpleITK as sitk

    from . import io, preprocessing, preview, scene
    from .headless import create_app
    from .progress import as_progress
    from .volumes import sitk_to_volume_node, volume_node_to_sitk

    progress = as_progress(progress)
    result = PreparedCase(name=name)
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[step] = round(now - clock, 3)
        clock = now

    app = create_app()
    progress.report(0.0, f"{name}: loading")
    input_node, phantom = load_input(app.scene)
    image = volume_node_to_sitk(input_node)
    lap("load")

    progress.report(0.15, f"{name}: checking the CT")
    report = preprocessing.validate_ct(image)
    result.size, result.spacing_mm, result.warnings = tuple(report.size), tuple(report.spacing_mm), list(report.warnings)

    progress.report(0.25, f"{name}: body and lungs")
    body = preprocessing.body_mask(image)
    lungs = preprocessing.lung_mask_coarse(image, body)
    result.body_volume_ml, result.lung_volume_ml = _mask_volume_ml(body), _mask_volume_ml(lungs)
    lap("body_and_lungs")

    progress.report(0.5, f"{name}: cropping, resampling, denoising")
    prepared = preprocessing.crop(preprocessing.replace_padding(image), preprocessing.bounding_box(body, 5.0))
    if spacing_mm:
        prepared = preprocessing.resample_to_spacing(prepared, (spacing_mm,) * 3)
    if denoise_method != "none":
        prepared = preprocessing.denoise(prepared, denoise_method)
    result.prepared_size, result.prepared_spacing_mm = prepared.GetSize(), prepared.GetSpacing()
    lap("crop_resample_denoise")

    progress.report(0.75, f"{name}: adding results to the scene")
    with scene.NewNodes(app.scene):
        outputs = [sitk_to_volume_node(prepared, f"{input_node.GetName()} preprocessed", scene=app.scene)]
        labelmap = sitk.GetArrayFromImage(body).astype(np.uint8)
        labelmap[sitk.GetArrayViewFromImage(lungs) > 0] = 2
        segments = {1: "body", 2: scene.SegmentSpec(ENCLOSED_AIR, OVERLAY_COLORS_RGB[ENCLOSED_AIR])}
        outputs.append(scene.add_segmentation_from_labelmap(labelmap, input_node, segments,
                                                            f"{input_node.GetName()} body and lungs"))
        if phantom is not None:
            outputs += _add_phantom_truth(scene, phantom, input_node)
        steps = [{"Step": step, "Seconds": seconds} for step, seconds in result.seconds.items()]
        outputs.append(scene.add_table(steps, f"{input_node.GetName()} preprocessing", units={"Seconds": "s"}))
        outputs.append(scene.add_table(
            [{"Measure": "Body volume", "Value": round(result.body_volume_ml, 1), "Unit": "mL"},
             {"Measure": ENCLOSED_AIR, "Value": round(result.lung_volume_ml, 1), "Unit": "mL"}],
            f"{input_node.GetName()} volumes"))
        scene.place_under_study(outputs, input_node, folder_name="MedicalImageRecognition")

    progress.report(0.85, f"{name}: saving")
    output_dir.mkdir(parents=True, exist_ok=True)
    result.files["scene"] = str(io.save_scene(app.scene, output_dir / f"{name}.mrb"))
    points = [nodule.center_lps_mm for nodule in phantom.nodules] if phantom is not None else None
    overlays = {"Body": (body, OVERLAY_COLORS_RGB["Body"]), ENCLOSED_AIR: (lungs, OVERLAY_COLORS_RGB[ENCLOSED_AIR])}
    result.files["preview"] = str(preview.save_preview_png(
        image, output_dir / f"{name}.png", overlays=overlays, points_lps_mm=points,
        title=f"{name}: {' x '.join(map(str, result.size))} voxels"))
    lap("save")
    summary_path = output_dir / f"{name}.json"
    result.files["summary"] = str(summary_path)
    summary_path.write_text(json.dumps(result.__dict__, indent=2, default=_json_default))
    app.scene.Clear(1)
    progress.report(1.0, f"{name}: done")
    return result


def _json_default(value):
    return [float(v) for v in value] if hasattr(value, "__iter__") else str(value)


def _add_phantom_truth(scene, phantom, input_node) -> list:
    """The phantom's ground truth as a segmentation and a point list of its nodules."""
    import SimpleITK as sitk

    truth = scene.add_segmentation_from_labelmap(sitk.GetArrayFromImage(phantom.labels), input_node,
                                                 dict(phantom.label_names), "Ground truth (phantom)")
    nodes = [truth]
    if phantom.nodules:
        nodes.append(scene.add_point_list(
            [nodule.center_lps_mm for nodule in phantom.nodules], "Ground-truth nodules",
            labels=[f"T{nodule.id}" for nodule in phantom.nodules],
            descriptions=[f"{nodule.diameter_mm:.1f} mm {nodule.type}, {nodule.location}" for nodule in phantom.nodules]))
    return nodes


def _phantom_loader(seed: int, size_ijk, spacing_mm, kind: str = "chest"):
    def load(scene):
        from . import phantoms
        from .volumes import sitk_to_volume_node

        make = phantoms.make_chest_ct if kind == "chest" else phantoms.make_abdomen_ct
        phantom = make(size_ijk=tuple(size_ijk), spacing_mm=tuple(spacing_mm), seed=seed)
        return sitk_to_volume_node(phantom.image, f"{kind.capitalize()} phantom {seed}", scene=scene), phantom
    return load


def _file_loader(path: Path):
    def load(scene):
        from .io import load_volume

        return load_volume(path, scene), None
    return load


def _print_progress(fraction: float, message: str) -> None:
    print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)


def run_batch(args, kind: str, run_case: Callable, cases: Optional[list] = None) -> int:
    """``run_case(loader, name, progress) -> (lines, files)`` on each case (``cases``: (name, loader) pairs, default
    the ``--input``s of ``args``, else a generated phantom of ``kind``), printing what it made; a failing case is
    reported and the others go on (exit status 1 if any failed)."""
    from .progress import Progress

    failures = 0
    for name, loader in cases if cases is not None else _cases(args, kind):
        try:
            lines, files = run_case(loader, name, Progress(None if args.quiet else _print_progress))
        except RecognitionError as error:
            failures += 1
            print(f"{name}: FAILED: {error}", file=sys.stderr)
            continue
        for line in lines:
            print(f"{name}: {line}")
        for file_kind, path in files.items():
            print(f"{name}: {file_kind}: {path}")
    return 1 if failures else 0


def run_prepare(args) -> int:
    def run_case(loader, name, progress):
        result = prepare_case(loader, name, Path(args.output), args.spacing_mm, args.denoise, progress)
        summary = (f"{' x '.join(map(str, result.size))} voxels at "
                   f"{' x '.join(f'{s:.2f}' for s in result.spacing_mm)} mm -> prepared "
                   f"{' x '.join(map(str, result.prepared_size))}; body {result.body_volume_ml:.0f} mL, "
                   f"lungs {result.lung_volume_ml:.0f} mL; "
                   + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
        return [summary] + [f"warning: {warning}" for warning in result.warnings], result.files
    return run_batch(args, "chest", run_case)


def module_logic(module_name: str):
    """A module's Logic class (e.g. ``NoduleDetectLogic``), imported as Slicer imports the module file: its folder
    on sys.path. The command line runs exactly the code the module's panel runs."""
    import importlib

    folder = str(Path(__file__).resolve().parents[1] / module_name)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return getattr(importlib.import_module(module_name), f"{module_name}Logic")


def series_uid(volume_node, default: str) -> str:
    """The DICOM series instance UID of a loaded volume (LUNA16's ``seriesuid``), else ``default``."""
    hierarchy = volume_node.GetScene().GetSubjectHierarchyNode()
    return hierarchy.GetItemUID(hierarchy.GetItemByDataNode(volume_node), "DICOM") or default


def detect_nodules_case(load_input: Callable, name: str, output_dir: Path, args, progress=None) -> dict:
    """NoduleDetect on one CT in a fresh scene: ``<name>.mrb``, ``<name>_nodules.csv``, ``<name>.png`` (the
    strongest nodule with the lungs and nodule outlines); returns the files and the LUNA16 rows."""
    import numpy as np
    import SimpleITK as sitk

    from . import io, preview, scene
    from .headless import create_app
    from .volumes import volume_node_to_sitk

    detection = module_lib("NoduleDetect", "detection")
    app = create_app()
    input_node, phantom = load_input(app.scene)
    outputs = module_logic("NoduleDetect")().process(input_node, args.method, args.min_confidence,
                                                     args.min_diameter_mm, args.device, progress, args.detector,
                                                     args.manifest_dir or ())
    if phantom is not None:
        with scene.NewNodes(app.scene):
            scene.place_under_study(_add_phantom_truth(scene, phantom, input_node), input_node, "Ground truth")
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"scene": io.save_scene(app.scene, output_dir / f"{name}.mrb"),
             "findings": scene.write_table_csv(outputs.table, output_dir / f"{name}_nodules.csv")}
    image = volume_node_to_sitk(input_node)
    nodules = outputs.result.nodules
    overlays = {"Lungs": (sitk.Or(outputs.result.lungs.right, outputs.result.lungs.left), (0.2, 0.6, 1.0))}
    if nodules:
        union = sitk.GetImageFromArray(np.logical_or.reduce(
            [detection.mask_on_grid(nodule.mask, image) for nodule in nodules]).astype(np.uint8))
        union.CopyInformation(image)
        overlays["Nodules"] = (union, (1.0, 0.6, 0.1))
    title = f"{name}: {len(nodules)} nodule(s)" + (f"; N1 {nodules[0].diameter_mm:.1f} mm "
                                                     f"{nodules[0].measurement.type}, confidence "
                                                     f"{nodules[0].confidence:.2f}" if nodules else "")
    files["preview"] = preview.save_preview_png(image, output_dir / f"{name}.png", overlays=overlays,
                                                points_lps_mm=[n.center_lps_mm for n in nodules] or None,
                                                title=title)
    rows = detection.luna16_rows(outputs.result, series_uid(input_node, name))
    summary = outputs.summary
    app.scene.Clear(1)
    return {"files": files, "luna16_rows": rows, "summary": summary}


def module_lib(module_name: str, lib_module: str):
    """A module of ``<ModuleName>Lib`` (e.g. NoduleDetectLib.detection), imported as the module file imports it."""
    import importlib

    module_logic(module_name)  # puts the module folder on sys.path
    return importlib.import_module(f"{module_name}Lib.{lib_module}")


def _cases(args, kind: str) -> list:
    """(name, loader) for each ``--input``, else for one generated phantom of ``kind``."""
    from .io import default_node_name

    if args.input:
        return [(default_node_name(path), _file_loader(Path(path))) for path in args.input]
    return [(f"{kind}_phantom_{args.phantom_seed}",
             _phantom_loader(args.phantom_seed, args.phantom_size, args.phantom_spacing, kind))]


def run_nodules(args) -> int:
    import csv

    output = Path(args.output)
    luna16 = []

    def run_case(loader, name, progress):
        case = detect_nodules_case(loader, name, output, args, progress)
        luna16.extend(case["luna16_rows"])
        return [case["summary"]], case["files"]
    status = run_batch(args, "chest", run_case)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "detections.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, ["seriesuid", "coordX", "coordY", "coordZ", "probability"])
        writer.writeheader()
        writer.writerows(luna16)
    print(f"LUNA16 detections: {output / 'detections.csv'} ({len(luna16)} rows)")
    return status


def segment_organs_case(load_input: Callable, name: str, output_dir: Path, args, progress=None) -> dict:
    """OrganSegment on one CT in a fresh scene: ``<name>.mrb``, ``<name>_organs.csv`` (statistics, RAS),
    ``<name>_labels.nii.gz`` with its label CSV, ``<name>_stl/`` (or ``_obj/``: the organs' surfaces), ``<name>.png``
    (the organs' outlines); on a phantom also the Dice of each organ the phantom's truth names."""
    import numpy as np
    import SimpleITK as sitk

    from . import evaluation, io, preview, scene
    from .headless import create_app
    from .volumes import volume_node_to_sitk

    app = create_app()
    input_node, phantom = load_input(app.scene)
    outputs = module_logic("OrganSegment")().process(
        input_node, args.method, args.structures, modelId=args.model, manifestDirs=args.manifest_dir or (),
        largestComponent=not args.keep_all_components, fillHoles=not args.keep_holes, smoothingMm=args.smoothing_mm,
        device=args.device, progress=progress)
    statistics = module_lib("OrganSegment", "statistics")
    dice = {}
    if phantom is not None:
        with scene.NewNodes(app.scene):
            scene.place_under_study(_add_phantom_truth(scene, phantom, input_node), input_node, "Ground truth")
        truth = sitk.GetArrayViewFromImage(phantom.labels)
        truth_on_output_values = np.zeros(truth.shape, dtype=np.uint8)
        compared = {}
        for value, label_name in outputs.label_names.items():
            truth_value = next((v for v, n in phantom.label_names.items() if n == label_name), None)
            if truth_value is not None:
                truth_on_output_values[truth == truth_value] = value
                compared[value] = label_name
        scores = evaluation.dice_per_label(truth_on_output_values, sitk.GetArrayViewFromImage(outputs.labels), compared)
        dice = {compared[value]: score for value, score in scores.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"scene": io.save_scene(app.scene, output_dir / f"{name}.mrb"),
             "statistics": scene.write_table_csv(outputs.table, output_dir / f"{name}_organs.csv")}
    files["labels"], files["label_names"] = statistics.write_labelmap_with_csv(
        outputs.labels, outputs.label_names, output_dir / f"{name}_labels.nii.gz")
    if args.surfaces != "none":
        files["surfaces"] = output_dir / f"{name}_{args.surfaces}"
        module_logic("OrganSegment").exportSurfaces(outputs.segmentation, files["surfaces"], args.surfaces.upper())
    image = volume_node_to_sitk(input_node)
    overlays = {}
    for index, (value, label_name) in enumerate(sorted(outputs.label_names.items())):
        spec = scene.segment_spec(label_name, fallback_index=index)
        overlays[spec.name] = (sitk.Cast(outputs.labels == value, sitk.sitkUInt8), spec.color_rgb)
    title = f"{name}: " + ", ".join(f"{row['name']} {row['volume_ml']:.0f} mL" for row in outputs.statistics
                                    if row["voxel_count"])
    files["preview"] = preview.save_preview_png(image, output_dir / f"{name}.png", overlays=overlays,
                                                window_hu=preview.DISPLAY_WINDOWS_HU["soft_tissue"], title=title)
    summary = outputs.summary + "".join(f"\nDice {label_name} vs the phantom: {value:.3f}"
                                        for label_name, value in dice.items())
    app.scene.Clear(1)
    return {"files": files, "dice": dice, "summary": summary}


def run_organs(args) -> int:
    def run_case(loader, name, progress):
        case = segment_organs_case(loader, name, Path(args.output), args, progress)
        return [case["summary"]], case["files"]
    return run_batch(args, "abdomen", run_case)


def _label_names(args) -> dict:
    """{label value: name} from ``--label-names`` (a value,name CSV such as TotalSegmentator's) and ``--label``."""
    import csv

    names = {}
    if args.label_names:
        with open(args.label_names, newline="") as stream:
            for row in csv.reader(stream):
                if len(row) >= 2 and row[0].strip().isdigit():
                    names[int(row[0])] = row[1].strip()
    names.update(dict(_label_argument(text) for text in args.label or ()))
    return names


def _segment_name(text: str) -> str:
    """The segment name a role argument means: 'liver' -> 'Liver', other names as given."""
    from . import scene

    return scene.segment_spec(text).name


def _segmentation_from_labelmap(path: Path, volume_node, label_names: dict, wanted: list):
    """A segmentation node with the ``wanted`` structures of a labelmap file (resampled onto the CT's grid when it is
    on another one)."""
    import numpy as np
    import SimpleITK as sitk

    from . import scene
    from .io import read_image
    from .preprocessing import resample_to_reference
    from .volumes import volume_node_to_sitk

    # nearest-neighbour resampling is the identity on the CT's own grid
    labelmap = resample_to_reference(read_image(path), volume_node_to_sitk(volume_node), "nearest", default_value=0)
    values = sitk.GetArrayFromImage(labelmap)
    by_name = {_segment_name(name): value for value, name in label_names.items()}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise RecognitionError(f"{path.name}: no label named {', '.join(missing)} (give --label-names or --label "
                               f"VALUE=NAME)")
    kept = np.zeros(values.shape, np.uint8)
    for index, name in enumerate(wanted):
        kept[values == by_name[name]] = index + 1
    return scene.add_segmentation_from_labelmap(kept, volume_node, {index + 1: name for index, name in
                                                                    enumerate(wanted)}, f"{path.name} segments")


def _surgery_loader(ct_path: Optional[Path], segmentation_path: Optional[Path], args):
    """Loads (CT node, segmentation node, phantom or None): files, or the abdominal phantom and its truth."""
    def load(scene_):
        from . import scene
        from .headless import module_logic as slicer_module_logic

        wanted = _surgery_roles(args)[0]
        if ct_path is None:
            import numpy as np
            import SimpleITK as sitk

            volume_node, phantom = _phantom_loader(args.phantom_seed, args.phantom_size, args.phantom_spacing,
                                                   "abdomen")(scene_)
            names = {value: _segment_name(name) for value, name in phantom.label_names.items()}
            values = sitk.GetArrayFromImage(phantom.labels)
            kept = {value: name for value, name in names.items() if name in wanted and name != "Tumor"}
            segmentation = scene.add_segmentation_from_labelmap(
                np.where(np.isin(values, list(kept)), values, 0).astype(np.uint8), volume_node, kept,
                "Phantom segments")
            lesions = sitk.GetArrayViewFromImage(phantom.lesion_labels)
            for tumour in phantom.tumours:  # one segment per tumour, as a radiologist would draw them
                scene.add_segment_from_mask(segmentation, (lesions == tumour.id).astype(np.uint8), volume_node,
                                            scene.SegmentSpec.for_structure("tumor", f"Tumour {tumour.id}"))
            return volume_node, segmentation, phantom
        volume_node = _file_loader(ct_path)(scene_)[0]
        if segmentation_path.name.endswith(".seg.nrrd"):
            segmentation = slicer_module_logic("Segmentations").LoadSegmentationFromFile(str(segmentation_path),
                                                                                         False, "")
            if segmentation is None:
                raise RecognitionError(f"could not read the segmentation {segmentation_path}")
        else:
            segmentation = _segmentation_from_labelmap(segmentation_path, volume_node, _label_names(args), wanted)
        return volume_node, segmentation, None
    return load


def _surgery_roles(args):
    """(every wanted segment name, organ, tumours, vessels) from the role arguments."""
    organ = _segment_name(args.organ)
    tumours = [_segment_name(name) for name in args.tumour or ([] if args.place_tumour else ["tumour"])]
    vessels = [_segment_name(name) for name in (args.vessel if args.vessel is not None
                                                else ["portal_vein", "hepatic_vein"])]
    return [organ, *tumours, *vessels], organ, tumours, vessels


def plan_surgery_case(load_input: Callable, name: str, output_dir: Path, args, progress=None) -> dict:
    """SurgeryPlan on one CT and its segmentation in a fresh scene: ``<name>.mrb``, ``<name>_plan.csv`` (every
    number), ``<name>_report.png`` (3D views, numbers, warnings) and ``<name>_stl/`` (one STL per part)."""
    import SimpleITK as sitk

    from . import io, scene
    from .headless import create_app
    from .preprocessing import ball_mask
    from .volumes import volume_node_to_sitk

    app = create_app()
    volume_node, segmentation, phantom = load_input(app.scene)
    _, organ, tumours, vessels = _surgery_roles(args)
    if phantom is not None and args.tumour is None:
        tumours = [f"Tumour {tumour.id}" for tumour in phantom.tumours]
    for index, sphere in enumerate(args.place_tumour or ()):
        tumour_name = f"Placed tumour {index + 1}"
        ball = ball_mask(volume_node_to_sitk(volume_node), sphere[:3], sphere[3])
        scene.add_segment_from_mask(segmentation, sitk.GetArrayViewFromImage(ball), volume_node,
                                    scene.SegmentSpec.for_structure("tumor", tumour_name))
        tumours = tumours + [tumour_name]
    segments = segmentation.GetSegmentation()

    def segment_id(segment_name):
        found = segments.GetSegmentIdBySegmentName(segment_name)
        if not found:
            available = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
            raise RecognitionError(f"no segment named {segment_name!r}; the segmentation has {', '.join(available)}")
        return found
    present_vessels = [vessel for vessel in vessels
                       if args.vessel is not None or segments.GetSegmentIdBySegmentName(vessel)]
    outputs = module_logic("SurgeryPlan")().process(
        volume_node, segmentation, segment_id(organ), [segment_id(tumour) for tumour in tumours],
        [segment_id(vessel) for vessel in present_vessels], method=args.method, marginMm=args.margin_mm,
        territoryGeneration=args.generation, flrWarningPercent=args.flr_warning_percent, progress=progress)
    output_dir.mkdir(parents=True, exist_ok=True)
    logic = module_logic("SurgeryPlan")()
    files = {"table": scene.write_table_csv(outputs.table, output_dir / f"{name}_plan.csv"),
             "report": logic.saveReport(outputs, output_dir / f"{name}_report.png")}
    files["stl"] = output_dir / f"{name}_stl"
    stl_files = logic.exportSurfaces(outputs.segmentation, files["stl"])
    files["scene"] = io.save_scene(app.scene, output_dir / f"{name}.mrb")
    summary = outputs.summary + f"\n{len(stl_files)} STL files"
    if phantom is not None:
        summary += "".join(f"\nTruth of tumour {truth.id}: {truth.mask_volume_ml:.2f} mL (mask), "
                           f"{truth.diameter_mm:.1f} mm diameter" for truth in phantom.tumours)
    app.scene.Clear(1)
    return {"files": files, "summary": summary, "plan": outputs.plan}


def run_surgery(args) -> int:
    if args.segmentation and len(args.segmentation) != len(args.input or ()):
        raise RecognitionError("give one --segmentation per --input (in the same order)")
    if args.input and not args.segmentation:
        raise RecognitionError("--input needs --segmentation: the organ, tumour and vessel segments of that CT")
    from .io import default_node_name

    cases = ([(default_node_name(path), _surgery_loader(Path(path), Path(segmentation), args))
              for path, segmentation in zip(args.input, args.segmentation)] if args.input else
             [(f"abdomen_phantom_{args.phantom_seed}", _surgery_loader(None, None, args))])

    def run_case(loader, name, progress):
        case = plan_surgery_case(loader, name, Path(args.output), args, progress)
        return case["summary"].split("\n"), case["files"]
    return run_batch(args, "abdomen", run_case, cases)


def run_phantom(args) -> int:
    from . import phantoms

    make = phantoms.make_chest_ct if args.kind == "chest" else phantoms.make_abdomen_ct
    phantom = make(size_ijk=tuple(args.size), spacing_mm=tuple(args.spacing), seed=args.seed)
    for kind, path in phantom.save(Path(args.output), seriesuid=f"{args.kind}_phantom_{args.seed}").items():
        print(f"{kind}: {path}")
    return 0


def run_models(args) -> int:
    from .models import Catalogue

    catalogue = Catalogue.with_user_manifests(args.manifest_dir or [])
    for model_id in catalogue.ids():
        card = catalogue.get(model_id)
        kind = "MONAI bundle" if card.is_bundle else "weights"
        print(f"{model_id}\t{card.task}\t{kind}\t{card.title}")
    return 0


def run_evaluate(args) -> int:
    """Print the evaluation tables of detections (FROC) or a segmentation (per label), or plot a training log."""
    from . import evaluation

    output = Path(args.output)
    if args.kind == "detection":
        return _evaluate_detection(args, evaluation, output)
    if args.kind == "segmentation":
        return _evaluate_segmentation(args, evaluation, output)
    rows = evaluation.read_training_log(args.log)
    print(evaluation.format_table(rows))
    print(f"learning curves: {evaluation.plot_learning_curves(rows, output / 'learning_curves.png', args.title)}")
    return 0


def _evaluate_detection(args, evaluation, output: Path) -> int:
    import numpy as np

    annotations = evaluation.read_annotations_csv(args.annotations)
    detections = evaluation.read_detections_csv(args.detections)
    excluded = evaluation.read_annotations_csv(args.excluded) if args.excluded else []
    seriesuids = evaluation.read_seriesuids(args.seriesuids) if args.seriesuids else None
    match = evaluation.match_detections(detections, annotations, seriesuids, excluded)
    curve = evaluation.froc_from_match(match, bootstrap=args.bootstrap)
    counts = evaluation.counts_at_threshold(match, args.threshold)
    print(f"{match.scans} scans, {match.nodules} nodules, {len(detections)} detections: "
          f"{len(match.false_positive_probability)} false positives, {match.ignored} on irrelevant findings, "
          f"{match.duplicates} repeated hits on a nodule")
    detected = int(np.isfinite(match.nodule_probability).sum())
    print(f"{detected} of {match.nodules} nodules have a detection at some threshold: no threshold or ranking of these "
          f"detections gets past sensitivity {detected / match.nodules:.3f}")
    rows = evaluation.froc_rows(curve)
    print(evaluation.format_table(rows))
    print(f"at threshold {counts.threshold:g}: precision {counts.precision:.3f}, recall {counts.recall:.3f}, "
          f"F1 {counts.f1:.3f} ({counts.true_positives} TP, {counts.false_positives} FP, "
          f"{counts.false_negatives} FN)")
    output.mkdir(parents=True, exist_ok=True)
    evaluation.write_rows_csv(rows, output / "froc.csv")
    metrics = {"scans": match.scans, "nodules": match.nodules, "nodules_detected": detected, "froc": rows,
               "cpm": rows[-1]["sensitivity"],
               "at_threshold": {key: None if isinstance(value, float) and value != value else value
                                for key, value in counts.__dict__.items()}}
    (output / "detection_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"FROC plot: {evaluation.plot_froc(curve, output / 'froc.png', args.title)}")
    print(f"metrics: {output / 'froc.csv'}, {output / 'detection_metrics.json'}")
    return 0


def _evaluate_segmentation(args, evaluation, output: Path) -> int:
    import numpy as np
    import SimpleITK as sitk

    from .io import read_image

    truth, prediction = read_image(args.truth), read_image(args.prediction)
    evaluation.require_same_grid(truth, prediction)
    if args.labels:
        label_names = evaluation.read_label_names(args.labels)
    else:
        values = np.union1d(np.unique(sitk.GetArrayViewFromImage(truth)),
                            np.unique(sitk.GetArrayViewFromImage(prediction)))
        label_names = {int(value): str(int(value)) for value in values if value != 0}
    rows = evaluation.segmentation_table(truth, prediction, label_names)
    print(evaluation.format_table(rows))
    present = [row["dice"] for row in rows if row["volume_truth_ml"] > 0]
    if present:
        print(f"mean Dice over the {len(present)} labels present in the truth: {float(np.mean(present)):.3f}")
    output.mkdir(parents=True, exist_ok=True)
    print(f"table: {evaluation.write_rows_csv(rows, output / 'segmentation.csv')}")
    return 0


def _training_cases(args):
    """(train, validation) from a dataset JSON, or from a folder (split by patient, the split written for reuse)."""
    from . import datasets

    if args.dataset:
        train, validation, _ = datasets.read_dataset_json(args.dataset)
        return train, validation
    if args.task == "detection":
        if not args.annotations:
            raise RecognitionError("Detection training needs --dataset, or --images with --annotations (LUNA16).")
        cases = datasets.luna16_cases(args.images, args.annotations)
    else:
        cases = datasets.segmentation_cases(args.images)
    train, validation = datasets.split_by_patient(cases, args.validation_fraction, seed=args.seed)
    # beside the checkpoints, not in the output folder itself: that folder is a catalogue folder (--manifest-dir)
    datasets.write_dataset_json(Path(args.output) / "training" / "dataset.json", train, validation,
                                {"task": args.task, "split_seed": args.seed})
    return train, validation


def _start_card(args):
    """The model to fine-tune: a catalogue id, or a MONAI bundle folder; None to train from scratch."""
    from .models import Catalogue, card_from_bundle

    if args.start_bundle:
        card = card_from_bundle(args.start_bundle)
        return dataclasses.replace(card, bundle={"name": Path(args.start_bundle).name, "dir": str(args.start_bundle)})
    if args.start:
        return Catalogue.with_user_manifests(args.manifest_dir or []).get(args.start)
    return None


def run_train(args) -> int:
    from . import models, networks, training
    from .progress import Progress

    start = _start_card(args)
    train, validation = _training_cases(args)
    config = training.TrainingConfig(max_epochs=args.epochs, iterations_per_epoch=args.iterations,
                                     batch_size=args.batch_size, learning_rate=args.learning_rate,
                                     freeze_stages=args.freeze_stages, unfreeze_at_epoch=args.unfreeze_at_epoch,
                                     patience_epochs=args.patience, seed=args.seed, device=args.device)
    spacing = tuple(args.spacing_mm) if args.spacing_mm else (start.spacing_mm if start else None)
    intensity = {"type": "window", "hu_min": args.window[0], "hu_max": args.window[1]} if args.window else \
        (start.intensity if start else None)
    roi_size = tuple(args.roi) if args.roi else (start.roi_size if start else None)
    if spacing is None or intensity is None or roi_size is None:
        raise RecognitionError("Give --spacing-mm, --window and --roi (or --start a model that states them).")
    progress = Progress(None if args.quiet else _print_progress)
    if args.task == "segmentation":
        labels = dict(_label_argument(item) for item in args.label) if args.label else (start.labels if start else {})
        if not labels:
            raise RecognitionError("Give the labels to learn, e.g. --label 1=liver --label 2=spleen.")
        task = training.SegmentationTask(labels, spacing, intensity, roi_size)
        architecture = start.architecture if start is not None and start.architecture else \
            networks.segmenter_architecture(args.network, out_channels=task.out_channels, size=args.size)
        network, result, reinitialised = training.train_segmenter(
            task, train, validation, args.output, config, start=start, architecture=architecture,
            resume=args.resume, progress=progress)
        fields = {"labels": {str(k): v for k, v in labels.items()}}
        metric_name = "mean Dice"
    else:
        task = training.DetectionTask(spacing, intensity, roi_size)
        architecture = start.architecture if start is not None and start.architecture else \
            networks.detector_architecture(args.size)
        network, result, reinitialised = training.train_detector(
            task, train, validation, args.output, config, start=start, architecture=architecture,
            resume=args.resume, progress=progress)
        fields = {"labels": {"0": "nodule"}}
        metric_name = "CPM"
    fields.update(id=args.model_id, title=args.title or args.model_id, task=args.task, spacing_mm=list(spacing),
                  intensity=intensity, roi_size=list(roi_size), licence=args.licence,
                  description=f"Trained with RecognitionCore.cli train on {len(train)} cases",
                  source=f"fine-tuned from {start.id}" if start else "trained from scratch")
    card = training.write_model(network, args.output, fields, architecture, result,
                                {"data": f"{len(train)} training / {len(validation)} validation cases",
                                 "start": start.id if start else None, "config": dataclasses.asdict(config),
                                 "reinitialised_weights": len(reinitialised)})
    print(f"validation {metric_name}: starting model {result.start_metric:.3f}, fine-tuned {result.best_metric:.3f} "
          f"(best epoch {result.best_epoch} of {result.epochs_run}{', stopped early' if result.stopped_early else ''})")
    print(f"model card: {Path(args.output) / (card.id + '.json')} (use --manifest-dir {args.output})")
    if args.export_bundle:
        print(f"MONAI bundle: {models.export_bundle(card, args.export_bundle)}")
    return 0


def _label_argument(text: str):
    value, _, name = text.partition("=")
    if not value.strip().isdigit() or not name.strip():
        raise RecognitionError(f"Labels are given as VALUE=NAME, e.g. 1=liver; got {text!r}.")
    return int(value), name.strip()


def _case_arguments(parser, phantom: str, size_ijk=DEFAULT_PHANTOM_SIZE_IJK,
                    spacing_mm=DEFAULT_PHANTOM_SPACING_MM) -> None:
    """The inputs of a per-case command (``run_batch``): CTs or a generated ``phantom``, output folder, quiet."""
    parser.add_argument("--input", action="append", help="CT file (NRRD, NIfTI, MetaImage) or DICOM folder; repeat "
                                                         f"for batch. Default: a generated {phantom} phantom")
    parser.add_argument("--output", default="out", help="output folder (default: out)")
    parser.add_argument("--phantom-seed", type=int, default=0)
    parser.add_argument("--phantom-size", type=int, nargs=3, default=size_ijk, metavar=("I", "J", "K"))
    parser.add_argument("--phantom-spacing", type=float, nargs=3, default=spacing_mm, metavar=("X", "Y", "Z"))
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m RecognitionCore.cli", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="check and preprocess CTs; write a .mrb scene, PNG and JSON each")
    _case_arguments(prepare, "chest")
    prepare.add_argument("--spacing-mm", type=float, default=1.5,
                         help="isotropic spacing of the preprocessed volume in mm (0: keep; default 1.5)")
    prepare.add_argument("--denoise", choices=("median", "gaussian", "curvature_anisotropic", "none"),
                         default="gaussian", help="denoising of the preprocessed volume (default: gaussian)")
    prepare.set_defaults(run=run_prepare)

    nodules = commands.add_parser("nodules", help="NoduleDetect: find lung nodules; write a .mrb scene, a findings "
                                                  "CSV and a PNG each, and LUNA16 detections.csv for all")
    _case_arguments(nodules, "chest")
    nodules.add_argument("--method", choices=("classical", "deep", "both"), default="classical")
    nodules.add_argument("--min-confidence", type=float, default=0.5, help="0..1 (default 0.5; 0 keeps every "
                                                                           "candidate, for FROC curves)")
    nodules.add_argument("--min-diameter-mm", type=float, default=3.0,
                         help="smallest longest axial diameter reported, to within a pixel (default 3; a 3 mm nodule "
                              "covering 2 x 2 pixels of 1.1 mm measures 2.1 mm)")
    nodules.add_argument("--detector", help="catalogue id of the detection model for --method deep/both")
    nodules.add_argument("--manifest-dir", action="append", help="folder with additional catalogue JSON files")
    nodules.add_argument("--device", default="auto")
    nodules.set_defaults(run=run_nodules)

    organs = commands.add_parser("organs", help="OrganSegment: segment organs; write a .mrb scene, a statistics CSV, "
                                                "a labelmap with its label CSV and a PNG each")
    _case_arguments(organs, "abdominal", DEFAULT_ABDOMEN_PHANTOM_SIZE_IJK, DEFAULT_ABDOMEN_PHANTOM_SPACING_MM)
    organs.add_argument("--method", choices=("classical", "deep"), default="deep",
                        help="deep: a catalogue segmentation model (default); classical: body, lungs, airways, bones, "
                             "fat and soft tissue from HU")
    organs.add_argument("--structures", nargs="+", help="a subset: the model's labels (deep) or trunk structures "
                                                        "(classical); default all")
    organs.add_argument("--model", help="catalogue id of the segmentation model for --method deep "
                                        "(default mir_abdomen_organs_unet)")
    organs.add_argument("--manifest-dir", action="append", help="folder with additional catalogue JSON files")
    organs.add_argument("--smoothing-mm", type=float, default=0.0, help="boundary smoothing per organ (default 0)")
    organs.add_argument("--keep-all-components", action="store_true", help="no largest-component step")
    organs.add_argument("--keep-holes", action="store_true", help="no hole filling")
    organs.add_argument("--surfaces", choices=("stl", "obj", "none"), default="stl",
                        help="3D surfaces of the organs: one STL per organ (default), one OBJ, or none")
    organs.add_argument("--device", default="auto")
    organs.set_defaults(run=run_organs)

    surgery = commands.add_parser("surgery", help="SurgeryPlan: plan a tumour resection; write a .mrb scene, the plan "
                                                  "table CSV, STL surfaces and a one-page report each")
    _case_arguments(surgery, "abdominal (with its liver, tumour and vessels)", DEFAULT_ABDOMEN_PHANTOM_SIZE_IJK,
                    DEFAULT_ABDOMEN_PHANTOM_SPACING_MM)
    surgery.add_argument("--segmentation", action="append",
                         help="for each --input: a Slicer .seg.nrrd or a labelmap (NIfTI, NRRD) with --label-names")
    surgery.add_argument("--label-names", help="CSV of value,name rows for a labelmap (e.g. TotalSegmentator's)")
    surgery.add_argument("--label", action="append", help="VALUE=NAME for a labelmap, e.g. 5=liver")
    surgery.add_argument("--organ", default="liver", help="the organ segment's name (default liver)")
    surgery.add_argument("--tumour", action="append", help="a tumour segment's name (repeat; default tumour)")
    surgery.add_argument("--vessel", action="append", help="a vessel segment's name (repeat; default portal_vein "
                                                           "and hepatic_vein where present)")
    surgery.add_argument("--place-tumour", action="append", type=float, nargs=4, metavar=("X", "Y", "Z", "D"),
                         help="add a spherical tumour of diameter D mm centred at X Y Z (LPS mm) to the segmentation "
                              "(e.g. to rehearse on real anatomy); it replaces the default tumour name")
    surgery.add_argument("--method", choices=("margin", "plane", "territory"), default="margin")
    surgery.add_argument("--margin-mm", type=float, default=10.0)
    surgery.add_argument("--generation", type=int, default=2, help="territory method: vessel branching generation")
    surgery.add_argument("--flr-warning-percent", type=float, default=30.0)
    surgery.set_defaults(run=run_surgery)

    phantom = commands.add_parser("phantom", help="write a generated CT with its ground truth (NRRD + CSV)")
    phantom.add_argument("--kind", choices=("chest", "abdomen"), default="chest")
    phantom.add_argument("--output", required=True)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--size", type=int, nargs=3, default=DEFAULT_PHANTOM_SIZE_IJK, metavar=("I", "J", "K"))
    phantom.add_argument("--spacing", type=float, nargs=3, default=DEFAULT_PHANTOM_SPACING_MM, metavar=("X", "Y", "Z"))
    phantom.set_defaults(run=run_phantom)

    models = commands.add_parser("models", help="list the model catalogue")
    models.add_argument("--manifest-dir", action="append", help="folder with additional catalogue JSON files")
    models.set_defaults(run=run_models)

    evaluate = commands.add_parser("evaluate", help="evaluate detections (FROC, CPM) or a segmentation (Dice, HD95), "
                                                    "or plot a training log")
    kinds = evaluate.add_subparsers(dest="kind", required=True)
    detection = kinds.add_parser("detection", help="FROC, CPM and precision/recall/F1 by LUNA16's rules")
    detection.add_argument("--annotations", required=True, help="LUNA16 annotations.csv (world mm, diameter_mm)")
    detection.add_argument("--detections", required=True, help="seriesuid,coordX,coordY,coordZ,probability CSV")
    detection.add_argument("--excluded", help="irrelevant findings (LUNA16 annotations_excluded.csv)")
    detection.add_argument("--seriesuids", help="scans evaluated, one a line (default: those named in the CSVs)")
    detection.add_argument("--threshold", type=float, default=0.5,
                           help="probability threshold for precision/recall/F1 (default 0.5)")
    detection.add_argument("--bootstrap", type=int, default=0,
                           help="scan resamplings for 95%% confidence intervals (LUNA16: 1000; default 0: none)")
    detection.add_argument("--title", default="FROC")
    segmentation = kinds.add_parser("segmentation", help="Dice, 95%% Hausdorff distance and volumes per label")
    segmentation.add_argument("--truth", required=True, help="reference labelmap (NRRD, NIfTI, MetaImage)")
    segmentation.add_argument("--prediction", required=True, help="labelmap on the same grid as the truth")
    segmentation.add_argument("--labels", help="CSV of value,name rows (default: the values present, unnamed)")
    curves = kinds.add_parser("curves", help="plot a training log's losses and metrics per epoch")
    curves.add_argument("--log", required=True, help="training log: CSV with a header, or JSON")
    curves.add_argument("--title", default="Training")
    for parser_of_kind in (detection, segmentation, curves):
        parser_of_kind.add_argument("--output", default="out", help="output folder (default: out)")
    evaluate.set_defaults(run=run_evaluate)

    train = commands.add_parser("train", help="train or fine-tune a segmenter or the nodule detector")
    train.add_argument("task", choices=("segmentation", "detection"))
    train.add_argument("--dataset", help="dataset JSON (as written by a previous run) with the train/validation split")
    train.add_argument("--images", help="folder of images (+ labelmaps for segmentation)")
    train.add_argument("--annotations", help="LUNA16 annotations.csv (detection)")
    train.add_argument("--validation-fraction", type=float, default=0.2)
    train.add_argument("--start", help="catalogue id of the model to fine-tune")
    train.add_argument("--start-bundle", help="MONAI bundle folder to fine-tune")
    train.add_argument("--manifest-dir", action="append", help="folder with additional catalogue JSON files")
    train.add_argument("--label", action="append", help="VALUE=NAME, e.g. 1=liver (segmentation)")
    train.add_argument("--spacing-mm", type=float, nargs=3, metavar=("X", "Y", "Z"))
    train.add_argument("--window", type=float, nargs=2, metavar=("HU_MIN", "HU_MAX"))
    train.add_argument("--roi", type=int, nargs=3, metavar=("I", "J", "K"), help="training patch in voxels")
    train.add_argument("--network", choices=("unet", "segresnet"), default="unet")
    train.add_argument("--size", default="small", help="preset size: tiny or small")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--freeze-stages", type=int, default=2, help="backbone stages kept frozen when fine-tuning")
    train.add_argument("--unfreeze-at-epoch", type=int)
    train.add_argument("--patience", type=int, default=8, help="epochs without improvement before stopping")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    train.add_argument("--model-id", default="my_model")
    train.add_argument("--title")
    train.add_argument("--licence", default="for research use at the training site")
    train.add_argument("--output", required=True)
    train.add_argument("--export-bundle", metavar="DIR", help="also write the new model as a MONAI bundle in DIR")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(run=run_train)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import vtk

    vtk.vtkObject.GlobalWarningDisplayOff()  # VTK's own log lines are not for the user; errors are raised as ours
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RecognitionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
