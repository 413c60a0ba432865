"""The one-page plan report on triangulated ellipsoids at known RAS positions: page size, orientation of the views,
see-through organ, warnings in red, PDF output and bad input."""

import matplotlib.image
import numpy as np
import vtk
from vtk.util import numpy_support

from RecognitionCore.errors import InputError
from RecognitionCore.testing import assert_raises
from SurgeryPlanLib.report import (A4_PORTRAIT_INCHES, VIEW_RECTS, ReportSection, SurfaceMesh, reduced_triangles,
                                   render_plan_report)

DPI = 60  # small pages keep the file fast; the layout is in page fractions
ORGAN_COLOUR = (0.87, 0.51, 0.40)
TUMOUR_COLOUR = (0.10, 0.80, 0.10)  # green: nothing else on the page is green
SECTIONS = [ReportSection("Tumour", [("Longest diameter", "24.0 mm"), ("Volume", "7.2 mL")]),
            ReportSection("Volumetry", [("Future liver remnant", "1 111 mL (72.9 %)")])]


def _ellipsoid(name, centre_ras_mm, radii_mm, colour, opacity, step_mm=4.0):
    """A closed triangulated ellipsoid (a scaled VTK sphere with about ``step_mm`` edges), in RAS mm."""
    centre, radii = np.asarray(centre_ras_mm, float), np.asarray(radii_mm, float)
    sphere = vtk.vtkSphereSource()
    resolution = max(12, int(np.ceil(np.pi * radii.max() / step_mm)))
    sphere.SetThetaResolution(2 * resolution)
    sphere.SetPhiResolution(resolution)
    sphere.Update()
    surface = sphere.GetOutput()
    points = numpy_support.vtk_to_numpy(surface.GetPoints().GetData()).astype(float) * 2.0 * radii + centre
    triangles = numpy_support.vtk_to_numpy(surface.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return SurfaceMesh(name, points, triangles.astype(np.int64), colour, opacity)


def _scene(tumour_centre_ras_mm, organ_opacity=0.3):
    """Organ (0, 0, 0) 160 x 120 x 100 mm holding a 24 mm tumour at ``tumour_centre_ras_mm`` and a vessel."""
    return [_ellipsoid("Liver", (0, 0, 0), (80, 60, 50), ORGAN_COLOUR, organ_opacity, step_mm=6.0),
            _ellipsoid("Tumour", tumour_centre_ras_mm, (12, 12, 12), TUMOUR_COLOUR, 1.0, step_mm=3.0),
            _ellipsoid("Portal vein", (-40, 0, -10), (6, 6, 30), (0.2, 0.3, 0.9), 1.0, step_mm=3.0)]


def _view_pixels(png_path, view):
    """RGB (rows, columns, 3) of one view's box on the page (row 0 at the top)."""
    page = matplotlib.image.imread(str(png_path))[..., :3]
    left, bottom, width, height = VIEW_RECTS[view]
    rows, columns = page.shape[:2]
    return page[int(round((1 - bottom - height) * rows)):int(round((1 - bottom) * rows)),
                int(round(left * columns)):int(round((left + width) * columns))]


def _tumour_pixels(rgb):
    """(row, column) of the pixels where the green tumour shows (through the organ or not)."""
    greenness = rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2])
    return np.argwhere(greenness > 0.2)


def _red_pixel_count(png_path):
    page = matplotlib.image.imread(str(png_path))[..., :3]
    return int(((page[..., 0] > 0.6) & (page[..., 1] < 0.25) & (page[..., 2] < 0.25)).sum())


def test_png_is_an_a4_portrait_page_at_the_dpi(tmp_path):
    path = render_plan_report(tmp_path / "plan.png", "Plan", _scene((45, 20, 20)), SECTIONS, dpi=DPI)
    assert path == tmp_path / "plan.png" and path.is_file()
    rows, columns = matplotlib.image.imread(str(path)).shape[:2]
    assert abs(columns - A4_PORTRAIT_INCHES[0] * DPI) <= 1 and abs(rows - A4_PORTRAIT_INCHES[1] * DPI) <= 1
    assert abs(rows / columns - 297.0 / 210.0) < 0.01


def test_views_show_the_patients_right_on_the_left_superior_up_and_posterior_up_from_above(tmp_path):
    """A tumour right, anterior and superior lands left-high in the anterior view and left-low in the superior view
    (Slicer's "A" and "S" views); its mirror image lands on the other sides."""
    sides = {}
    for name, centre in [("right_anterior_superior", (45, 20, 20)), ("left_posterior_inferior", (-45, -20, -20))]:
        path = render_plan_report(tmp_path / f"{name}.png", name, _scene(centre), SECTIONS, dpi=DPI)
        for view in VIEW_RECTS:
            rgb = _view_pixels(path, view)
            tumour = _tumour_pixels(rgb)
            assert len(tumour) > 20, f"tumour not visible in the {view} view ({len(tumour)} pixels)"
            sides[name, view] = tumour.mean(axis=0) / rgb.shape[:2]  # (row, column) as fractions of the view
    assert sides["right_anterior_superior", "anterior"][1] < 0.45  # patient's right on the image's left
    assert sides["right_anterior_superior", "anterior"][0] < 0.45  # superior up
    assert sides["left_posterior_inferior", "anterior"][1] > 0.55
    assert sides["left_posterior_inferior", "anterior"][0] > 0.55
    assert sides["right_anterior_superior", "superior"][1] < 0.45  # patient's right on the image's left
    assert sides["right_anterior_superior", "superior"][0] > 0.55  # posterior up, so anterior low
    assert sides["left_posterior_inferior", "superior"][1] > 0.55
    assert sides["left_posterior_inferior", "superior"][0] < 0.45


def test_tumour_shows_through_a_semi_transparent_organ_only(tmp_path):
    """The tumour lies wholly inside the organ: seen through it at 30 % opacity, hidden by it when opaque."""
    see_through = render_plan_report(tmp_path / "glass.png", "Plan", _scene((45, 20, 20)), SECTIONS, dpi=DPI)
    opaque = render_plan_report(tmp_path / "opaque.png", "Plan", _scene((45, 20, 20), organ_opacity=1.0), SECTIONS,
                                dpi=DPI)
    seen = _tumour_pixels(_view_pixels(see_through, "anterior"))
    assert len(seen) > 20
    assert len(_tumour_pixels(_view_pixels(opaque, "anterior"))) == 0
    tinted = _view_pixels(see_through, "anterior")[tuple(seen.T)]
    assert (tinted[:, 0] > 0.2).mean() > 0.5  # the organ's front layer adds its red to the tumour's green


def test_warnings_are_printed_in_red_only_when_given(tmp_path):
    meshes = _scene((45, 20, 20))
    quiet = render_plan_report(tmp_path / "quiet.png", "Plan", meshes, SECTIONS, dpi=DPI)
    warned = render_plan_report(tmp_path / "warned.png", "Plan", meshes, SECTIONS, dpi=DPI,
                                warnings=["Future liver remnant 24 % is below 30 %."])
    assert _red_pixel_count(quiet) == 0
    assert _red_pixel_count(warned) > 50


def test_pdf_by_suffix(tmp_path):
    path = render_plan_report(tmp_path / "sub" / "plan.PDF", "Plan", _scene((45, 20, 20)), SECTIONS, dpi=DPI)
    assert path.read_bytes()[:4] == b"%PDF"


def test_large_meshes_are_reduced_evenly_without_losing_their_shape():
    sphere = _ellipsoid("Ball", (10, -20, 30), (40, 40, 40), (1, 1, 1), 1.0, step_mm=2.0)
    points, triangles = reduced_triangles(sphere.points_ras_mm, sphere.triangles, 1000)
    assert len(sphere.triangles) > 10000 and 400 <= len(triangles) <= 1000
    used = points[np.unique(triangles)]
    radii = np.linalg.norm(used - (10, -20, 30), axis=1)
    assert np.abs(radii - 40).max() < 4.0

    corners = points[triangles]
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1).sum()
    assert abs(area / (4 * np.pi * 40 ** 2) - 1) < 0.1  # closed: no holes where triangles were dropped


def test_bad_input_raises_input_error(tmp_path):
    def mesh(**changes):
        fields = dict(name="Tumour", points_ras_mm=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float),
                      triangles=np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]), color_rgb=(1, 0, 0),
                      opacity=1.0)
        fields.update(changes)
        return [SurfaceMesh(**fields)]

    not_finite = mesh()[0].points_ras_mm.copy()
    not_finite[2, 1] = np.nan
    blocking_file = tmp_path / "a_file"
    blocking_file.write_text("not a folder")
    cases = [  # (path, meshes, expected in the message, whether the message names the mesh)
        (tmp_path / "plan.jpg", mesh(), ".jpg", False),
        (tmp_path / "plan", mesh(), "no suffix", False),
        (tmp_path / "plan.png", [], "nothing to draw", False),
        (tmp_path / "plan.png", mesh(points_ras_mm=np.zeros((4, 2))), "points_ras_mm must be", True),
        (tmp_path / "plan.png", mesh(triangles=np.array([[0, 1, 2, 3]])), "triangles must be", True),
        (tmp_path / "plan.png", mesh(triangles=np.array([[0, 1, 4]])), "indices must be in 0..3", True),
        (tmp_path / "plan.png", mesh(triangles=np.array([[0.0, 1.0, 2.0]])), "integer", True),
        (tmp_path / "plan.png", mesh(points_ras_mm=not_finite), "1 points are not finite", True),
        (tmp_path / "plan.png", mesh(opacity=1.5), "opacity must be in 0..1", True),
        (tmp_path / "plan.png", mesh(opacity=float("nan")), "opacity must be in 0..1", True),
        (tmp_path / "plan.png", mesh(color_rgb=(0, 0, 255)), "color_rgb", True),
        (blocking_file / "plan.png", mesh(), "cannot write the plan report", False),
    ]
    for path, meshes, message, names_mesh in cases:
        error = assert_raises(InputError, render_plan_report, path, "Plan", meshes, SECTIONS, dpi=DPI, match=message)
        assert "'Tumour'" in str(error) or not names_mesh, str(error)
    assert not (blocking_file / "plan.png").exists() and not (tmp_path / "plan.png").exists()
