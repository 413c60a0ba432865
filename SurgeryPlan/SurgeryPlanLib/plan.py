"""One resection plan on plain masks: the tumour reports, one resection proposal (margin, plane or vascular
territory), the volumetry and the warnings a surgeon must see. SurgeryPlan's Logic turns it into scene nodes; the
command line and the benchmark call it directly.

All masks are uint8 SimpleITK images on one CT grid (LPS). Several tumours are resected together: the proposal is made
for their union, each gets its own report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from RecognitionCore.errors import InputError
from RecognitionCore.preprocessing import check_same_grid, three_numbers
from RecognitionCore.progress import as_progress
from SurgeryPlanLib.geometry import (DEFAULT_FLR_WARNING_PERCENT, OrganPlaneCutter, _boundary_zyx, _index_zyx_to_lps,
                                     _mask_array, _organ_region, _to_mask_image, _unit_normal, _voxel_volume_ml,
                                     margin_resection, organ_with_inner_vessels, proposed_plane, tumour_report,
                                     volumetry, volumetry_from_volumes)

METHODS = ("margin", "plane", "territory")
DEFAULT_MARGIN_MM = 10.0
DEFAULT_TERRITORY_GENERATION = 2


@dataclass
class PlaneCut:
    """A plane resection: the plane with its normal turned to the tumour's side, the resected organ voxels (bool, in
    the cutter's box), how far the tumour clears the plane and the volumetry."""

    point_lps_mm: Tuple[float, float, float]
    normal_lps: Tuple[float, float, float]
    resected_in_box: np.ndarray
    clearance_mm: float  # smallest distance of a tumour voxel centre to the plane, negative when the plane cuts it
    volumetry: dict


class PlaneResection:
    """Cuts one organ with a tumour by planes fast enough to follow a dragged plane: the organ box, the tumour's
    boundary points and the volumes are computed once, each ``cut`` is one pass over the organ box."""

    def __init__(self, organ: sitk.Image, tumour: sitk.Image,
                 flr_warning_percent: float = DEFAULT_FLR_WARNING_PERCENT):
        tumour_values, organ_values = _organ_region(tumour, organ)
        self.cutter = OrganPlaneCutter(_to_mask_image(organ_values, organ))
        self.tumour = tumour
        self._tumour_points_lps = _index_zyx_to_lps(organ, _boundary_zyx(tumour_values))
        self._voxel_ml = _voxel_volume_ml(organ)
        self._total_ml = float(organ_values.sum()) * self._voxel_ml
        self._tumour_ml = float(tumour_values.sum()) * self._voxel_ml
        self.flr_warning_percent = flr_warning_percent

    def cut(self, point_lps_mm: Sequence[float], normal_lps: Sequence[float]) -> PlaneCut:
        """Resect the side of the plane that holds (most of) the tumour, whichever way the normal points."""
        point = three_numbers(point_lps_mm, "plane point")
        normal = _unit_normal(normal_lps)
        heights = (self._tumour_points_lps - point) @ normal
        if np.median(heights) < 0:
            normal, heights = -normal, -heights
        resected = self.cutter.resected_in_box(point, normal)
        resected_ml = float(np.count_nonzero(resected)) * self._voxel_ml
        if resected_ml == 0 or resected_ml >= self._total_ml:
            raise InputError(f"the plane through {np.round(point, 1).tolist()} mm (LPS) does not cut the organ")
        return PlaneCut(tuple(float(v) for v in point), tuple(float(v) for v in normal), resected,
                        round(float(heights.min()), 6),
                        volumetry_from_volumes(self._total_ml, self._tumour_ml, resected_ml, self.flr_warning_percent))


@dataclass
class ResectionPlan:
    """Everything one plan computed; masks are on the organ's grid."""

    method: str
    margin_mm: float
    organ: sitk.Image       # the organ with the tumours and the vessels running inside it
    tumours: Dict[str, sitk.Image]
    vessels: Dict[str, sitk.Image]
    tumour_reports: Dict[str, dict]  # geometry.tumour_report per tumour
    resected: sitk.Image
    remnant: sitk.Image
    volumetry: dict         # geometry.volumetry_from_volumes
    plane: Optional[PlaneCut] = None
    plane_resection: Optional["PlaneResection"] = None  # kept to re-cut fast when the plane moves
    territories: Optional[object] = None  # territories.Territories (territory method)
    resected_territory_ids: List[int] = field(default_factory=list)

    @property
    def warnings(self) -> List[str]:
        """What the surgeon must see: vessels within the margin, a plane too close to the tumour, a small remnant."""
        found = risk_warnings(self.tumour_reports)
        if self.plane is not None:
            found += plane_warnings(self.plane, self.margin_mm)
        return found + remnant_warnings(self.volumetry)

    def move_plane(self, point_lps_mm: Sequence[float], normal_lps: Sequence[float]) -> None:
        """Re-cut a plane plan (the surgeon moved the plane): resected and remnant parts, clearance and volumetry."""
        if self.plane_resection is None:
            raise InputError(f"a {self.method} resection has no plane to move")
        cut = self.plane_resection.cut(point_lps_mm, normal_lps)
        cutter = self.plane_resection.cutter
        self.plane = cut
        self.resected = cutter.to_full(cut.resected_in_box)
        self.remnant = cutter.to_full(np.greater(cutter.organ_in_box, cut.resected_in_box))
        self.volumetry = cut.volumetry


def union_of(masks: Mapping[str, sitk.Image], what: str) -> sitk.Image:
    """The union of named masks on one grid (InputError when there are none, one is empty or off the grid)."""
    if not masks:
        raise InputError(f"no {what} segment is given")
    names = list(masks)
    reference = masks[names[0]]
    values = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=bool)
    for name in names:
        check_same_grid(reference, masks[name], f"{name} mask")
        values |= _mask_array(masks[name], name)
    return _to_mask_image(values, reference)


def risk_warnings(reports: Mapping[str, dict]) -> List[str]:
    """One line per vessel running within the margin of a tumour."""
    return [f"{tumour}: {vessel} at {entry['distance_mm']:.1f} mm, within the {report['margin_mm']:g} mm margin"
            for tumour, report in reports.items() for vessel, entry in report["vessels"].items()
            if entry["at_risk"]]


def plane_warnings(cut: PlaneCut, margin_mm: float) -> List[str]:
    if cut.clearance_mm < 0:
        return [f"the plane cuts through the tumour ({-cut.clearance_mm:.1f} mm of it lies on the remnant side)"]
    if cut.clearance_mm < margin_mm:
        return [f"the plane clears the tumour by only {cut.clearance_mm:.1f} mm (margin {margin_mm:g} mm)"]
    return []


def remnant_warnings(volumes: dict) -> List[str]:
    if not volumes["flr_warning"]:
        return []
    return [f"the future remnant is {volumes['flr_percent']:.1f} % of the functional organ volume, below "
            f"{volumes['flr_warning_percent']:g} %"]


def plan_resection(organ: sitk.Image, tumours: Mapping[str, sitk.Image],
                   vessels: Optional[Mapping[str, sitk.Image]] = None, method: str = "margin",
                   margin_mm: float = DEFAULT_MARGIN_MM,
                   plane: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                   territory_vessel: Optional[str] = None,
                   territory_generation: int = DEFAULT_TERRITORY_GENERATION,
                   flr_warning_percent: float = DEFAULT_FLR_WARNING_PERCENT, progress=None) -> ResectionPlan:
    """Report each tumour and propose one resection of them all by ``method``:

    - ``margin``: the tumours grown by ``margin_mm``, clipped to the organ;
    - ``plane``: the organ side of ``plane`` = (point LPS mm, normal) that holds the tumours; without a plane, the
      proposed one that just clears the margin (``geometry.proposed_plane``);
    - ``territory``: the vascular territories (``territories.vascular_territories``) of ``territory_vessel`` (a key
      of ``vessels``; default the first whose name contains "portal", else the first) at ``territory_generation``
      that hold tumour voxels.

    The organ is taken with the tumours and the vessel voxels running inside it
    (``geometry.organ_with_inner_vessels``): segmentations carve vessels out, but they are resected with the tissue.
    """
    progress = as_progress(progress)
    vessels = dict(vessels or {})
    if method not in METHODS:
        raise InputError(f"unknown resection method {method!r}; expected one of {', '.join(METHODS)}")
    if not margin_mm > 0:
        raise InputError(f"the safety margin must be > 0 mm (got {margin_mm})")
    tumour_union = union_of(tumours, "tumour")
    for name, vessel in vessels.items():
        check_same_grid(organ, vessel, f"{name} mask")
    _, organ_values = _organ_region(tumour_union, organ)
    whole_organ = organ_with_inner_vessels(_to_mask_image(organ_values, organ), list(vessels.values()))
    organ_values = sitk.GetArrayFromImage(whole_organ) != 0
    progress.report(0.0, "Measuring the tumours and their vessel distances")
    reports = {}
    for index, (name, tumour) in enumerate(tumours.items()):
        reports[name] = tumour_report(tumour, whole_organ, vessels, margin_mm)
        progress.report(0.4 * (index + 1) / len(tumours), f"Measured {name}")
    plan = ResectionPlan(method, float(margin_mm), whole_organ, dict(tumours), vessels, reports, None, None,
                         None)
    progress.report(0.4, f"Proposing the {method} resection")
    if method == "plane":
        plan.plane_resection = PlaneResection(whole_organ, tumour_union, flr_warning_percent)
        plan.move_plane(*(plane or proposed_plane(tumour_union, whole_organ, margin_mm)))
    else:
        if method == "margin":
            resected = margin_resection(tumour_union, whole_organ, margin_mm)
        else:
            resected = _territory_resection(plan, tumour_union, vessels, territory_vessel, territory_generation,
                                            progress.sub(0.4, 0.9))
        plan.resected = resected
        plan.remnant = _to_mask_image(organ_values & (sitk.GetArrayViewFromImage(resected) == 0), organ)
        plan.volumetry = volumetry(whole_organ, tumour_union, resected, flr_warning_percent)
    progress.report(1.0, "Resection plan ready")
    return plan


def territory_vessel_name(vessels: Mapping[str, sitk.Image], requested: Optional[str]) -> str:
    """The vessel whose branches define the territories: the requested one, else the portal vein if named so."""
    if not vessels:
        raise InputError("the territory method needs a vessel segment (the portal vein for liver segments)")
    if requested is not None:
        if requested not in vessels:
            raise InputError(f"the territory vessel {requested!r} is not among the vessels: {', '.join(vessels)}")
        return requested
    return next((name for name in vessels if "portal" in name.lower()), next(iter(vessels)))


def _territory_resection(plan: ResectionPlan, tumour_union: sitk.Image, vessels, requested: Optional[str],
                         generation: int, progress) -> sitk.Image:
    from SurgeryPlanLib.territories import feeding_territories, vascular_territories

    name = territory_vessel_name(vessels, requested)
    plan.territories = vascular_territories(plan.organ, vessels[name], generation, progress=progress)
    plan.resected_territory_ids, resected = feeding_territories(plan.territories, tumour_union)
    return resected


def plan_rows(plan: ResectionPlan) -> List[dict]:
    """Every number of the plan as rows {section, measure, value, unit, flag}: the results table and the report
    show the same figures. ``flag`` says why a value needs attention (empty when it does not)."""
    rows = []

    def add(section, measure, value, unit, flag=""):
        rows.append({"section": section, "measure": measure, "value": round(float(value), 2), "unit": unit,
                     "flag": flag})

    for tumour, report in plan.tumour_reports.items():
        add(tumour, "volume", report["volume_ml"], "mL")
        add(tumour, "longest diameter", report["longest_diameter_mm"], "mm")
        add(tumour, "distance to the organ surface", report["organ_surface_distance_mm"], "mm")
        for vessel, entry in report["vessels"].items():
            add(tumour, f"distance to {vessel}", entry["distance_mm"], "mm",
                "within margin" if entry["at_risk"] else "")
    section = f"{plan.method.capitalize()} resection"
    add(section, "safety margin", plan.margin_mm, "mm")
    if plan.plane is not None:
        clearance = plan.plane.clearance_mm
        add(section, "tumour clearance to the plane", clearance, "mm",
            "cuts the tumour" if clearance < 0 else "below margin" if clearance < plan.margin_mm else "")
    if plan.territories is not None:
        for territory in plan.territories.territories:
            resected = territory.id in plan.resected_territory_ids
            add(section, f"territory {territory.id} volume", territory.volume_ml, "mL",
                "resected" if resected else "")
    volumes = plan.volumetry
    add("Volumetry", "organ (with tumours)", volumes["total_ml"], "mL")
    add("Volumetry", "tumours", volumes["tumour_ml"], "mL")
    add("Volumetry", "resected", volumes["resected_ml"], "mL")
    add("Volumetry", "remnant", volumes["remnant_ml"], "mL")
    add("Volumetry", "future remnant (of the functional volume)", volumes["flr_percent"], "%",
        f"below {volumes['flr_warning_percent']:g} %" if volumes["flr_warning"] else "")
    return rows
