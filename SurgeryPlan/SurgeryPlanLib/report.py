"""One-page resection-plan report: a 3D snapshot of the plan's surfaces and its numbers, as an A4 PNG or PDF.

Qt-free and MRML-free: matplotlib's object API on the Agg canvas (never pyplot's global state), so it runs headless,
from the command line and inside Slicer alike.

The snapshot is two orthographic views of the surfaces, in RAS millimetres at one common scale:

- **anterior** (Slicer's "A" view): seen from the front, the patient's right on the image's left, superior up;
- **superior** (Slicer's "S" view): seen from the head, the patient's right on the image's left, posterior up.
  For a liver surgeon this is the complement of the anterior view: it shows the antero-posterior depth of the tumour
  (segments 5/8 against 6/7, 4 against 2/3) and the hepatic veins converging on the inferior vena cava, which a
  right-lateral view (superior-inferior again) would not.

The views are rasterised here (a small z-buffer renderer in numpy, no OpenGL): opaque surfaces share one depth
buffer, a semi-transparent surface adds its front and back layers, and each pixel blends its layers far to near, so
a semi-transparent organ shows the tumour and vessels inside it without seams between triangles. Points are shaded
by the angle between their normal and the view direction (two-sided, light from the viewer).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from RecognitionCore.errors import InputError

DEFAULT_FOOTER = "For planning review by a qualified clinician; not a medical device."
DEFAULT_MAX_TRIANGLES_PER_MESH = 25000

A4_PORTRAIT_INCHES = (210.0 / 25.4, 297.0 / 25.4)
MARGIN_X = 0.06
# Page layout in figure fractions (left, bottom, width, height), top to bottom.
VIEW_RECTS = {"anterior": (MARGIN_X, 0.635, 0.425, 0.27), "superior": (1.0 - MARGIN_X - 0.425, 0.635, 0.425, 0.27)}
LEGEND_TOP_Y = 0.628
CONTENT_BOTTOM_Y = 0.045
WARNING_COLOUR = (0.80, 0.0, 0.0)
FOOTER_COLOUR = (0.45, 0.45, 0.45)

# (name, caption, direction of projection, view up) in RAS, as vtkMRMLCameraNode::RotateTo sets Slicer's 3D view.
_VIEWS = (
    ("anterior", "Anterior view (from the front)", (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
    ("superior", "Superior view (from the head)", (0.0, 0.0, -1.0), (0.0, -1.0, 0.0)),
)
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of the RAS x, y, z axes
_AMBIENT = 0.35
_SUPPORTED_SUFFIXES = (".png", ".pdf")
_TABLE_FONT_SIZES = (9.0, 8.0, 7.0, 6.0)
_LINE_SPACING = 1.45  # line height as a multiple of the font size
_COLUMN_GAP = 0.03
_SUPERSAMPLING = 2  # rendered at this many pixels per output pixel along each axis, then averaged (antialiasing)
_MAX_CANDIDATE_PIXELS = 2_000_000  # pixel tests per vectorised rasterisation step (bounds memory)
_EDGE_TOLERANCE = 1e-9  # a pixel centre on a shared edge belongs to both triangles: no cracks


@dataclass(eq=False)  # arrays have no single truth value to compare
class SurfaceMesh:
    """A closed triangle surface in RAS millimetres with its display colour (r, g, b in 0..1) and opacity (0..1)."""

    name: str
    points_ras_mm: np.ndarray
    triangles: np.ndarray
    color_rgb: Tuple[float, float, float]
    opacity: float


@dataclass
class ReportSection:
    """A titled table of (label, formatted value) rows, e.g. ("Closest distance to portal vein", "4.2 mm")."""

    heading: str
    rows: List[Tuple[str, str]]


# ---------------------------------------------------------------------------------------------------------------------
# Input checks


def _checked_mesh(mesh: SurfaceMesh) -> Tuple[np.ndarray, np.ndarray]:
    """(points float (N, 3), triangles int (M, 3)) of ``mesh``, or InputError naming the mesh and the problem."""
    name = mesh.name
    try:
        points = np.asarray(mesh.points_ras_mm, dtype=float)
    except (TypeError, ValueError) as error:
        raise InputError(f"Mesh '{name}': points_ras_mm is not a numeric array ({error})") from None
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 3:
        raise InputError(f"Mesh '{name}': points_ras_mm must be (N >= 3, 3), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise InputError(f"Mesh '{name}': {int((~np.isfinite(points)).any(axis=1).sum())} points are not finite")
    triangles = np.asarray(mesh.triangles)
    if triangles.ndim != 2 or triangles.shape[1] != 3 or len(triangles) == 0:
        raise InputError(f"Mesh '{name}': triangles must be (M >= 1, 3), got shape {triangles.shape}")
    if not np.issubdtype(triangles.dtype, np.integer):
        raise InputError(f"Mesh '{name}': triangles must hold integer point indices, got {triangles.dtype}")
    if triangles.min() < 0 or triangles.max() >= len(points):
        raise InputError(f"Mesh '{name}': triangle indices must be in 0..{len(points) - 1}, "
                         f"got {int(triangles.min())}..{int(triangles.max())}")
    colour = np.asarray(mesh.color_rgb, dtype=float).ravel()
    if colour.shape != (3,) or not np.isfinite(colour).all() or colour.min() < 0 or colour.max() > 1:
        raise InputError(f"Mesh '{name}': color_rgb must be three numbers in 0..1, got {mesh.color_rgb}")
    if not (isinstance(mesh.opacity, (int, float, np.number)) and 0.0 <= float(mesh.opacity) <= 1.0):
        raise InputError(f"Mesh '{name}': opacity must be in 0..1, got {mesh.opacity}")
    return points, triangles.astype(np.int64, copy=False)


def _checked_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in _SUPPORTED_SUFFIXES:
        raise InputError(f"The report is written as .png or .pdf; got '{path.suffix or '(no suffix)'}' in {path.name}")
    return path


def _checked_sections(sections: Sequence[ReportSection]) -> List[ReportSection]:
    checked = []
    for section in sections:
        rows = []
        for row in section.rows:
            if len(row) != 2:
                raise InputError(f"Section '{section.heading}': each row must be (label, value), got {row!r}")
            rows.append((str(row[0]), str(row[1])))
        checked.append(ReportSection(str(section.heading), rows))
    return checked


# ---------------------------------------------------------------------------------------------------------------------
# Geometry


def reduced_triangles(points: np.ndarray, triangles: np.ndarray, max_triangles: int
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """At most ``max_triangles`` triangles of the surface, reduced evenly over it by vertex clustering.

    Points are merged per cell of a uniform grid (to their mean) and triangles that collapse or repeat are dropped,
    so the coarser surface has no holes (unlike dropping every n-th triangle) and keeps its shape to within
    a cell. The cell is sized from the surface area for about 0.8 ``max_triangles`` and grown until the count fits.
    """
    if len(triangles) <= max_triangles:
        return points, triangles
    corners = points[triangles]
    area_mm2 = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]),
                                    axis=1).sum()
    cell_mm = math.sqrt(2.0 * max(area_mm2, 1e-12) / (0.8 * max_triangles))
    while True:
        cells = np.floor((points - points.min(axis=0)) / cell_mm).astype(np.int64)
        _, cluster, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
        cluster = cluster.ravel()
        merged = np.zeros((len(counts), 3))
        np.add.at(merged, cluster, points)
        merged /= counts[:, None]
        kept = cluster[triangles]
        kept = kept[(kept[:, 0] != kept[:, 1]) & (kept[:, 1] != kept[:, 2]) & (kept[:, 0] != kept[:, 2])]
        _, first = np.unique(np.sort(kept, axis=1), axis=0, return_index=True)
        kept = kept[np.sort(first)]
        if 0 < len(kept) <= max_triangles:
            return merged, kept
        if len(kept) == 0:  # a surface smaller than one cell: keep evenly spaced original triangles instead
            return points, triangles[np.linspace(0, len(triangles) - 1, max_triangles).astype(np.int64)]
        cell_mm *= 1.15


def _view_basis(direction_of_projection, view_up) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(screen right, screen up, towards the viewer) unit vectors in RAS for a camera as VTK defines it."""
    forward = np.asarray(direction_of_projection, dtype=float)
    up = np.asarray(view_up, dtype=float)
    return np.cross(forward, up), up, -forward


def _axis_letter(direction: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(direction)))
    return _AXIS_LETTERS[axis][int(direction[axis] > 0)]


def _vertex_shades(points: np.ndarray, triangles: np.ndarray, towards_viewer: np.ndarray) -> np.ndarray:
    """Brightness per point (Gouraud): ambient plus diffuse light from the viewer on the area-weighted normal."""
    corners = points[triangles]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.zeros_like(points)
    for corner in range(3):
        np.add.at(normals, triangles[:, corner], face_normals)
    lengths = np.linalg.norm(normals, axis=1)
    facing = np.abs(normals @ towards_viewer) / np.where(lengths > 0, lengths, 1.0)
    return _AMBIENT + (1.0 - _AMBIENT) * facing


def _fragments(corners_px: np.ndarray, corner_depths: np.ndarray, corner_values: np.ndarray, width: int, height: int):
    """Rasterise triangles: (pixel index, depth, value (F, C)) at every pixel centre inside a triangle.

    ``corners_px`` (T, 3, 2) are (column, row) pixel coordinates; depth and values are interpolated barycentrically.
    Triangles are grouped by the power-of-two size of their pixel box, so each group is one vectorised test.
    """
    low = np.maximum(np.ceil(corners_px.min(axis=1) - 0.5), 0).astype(np.int64)
    high = np.minimum(np.floor(corners_px.max(axis=1) - 0.5), [width - 1, height - 1]).astype(np.int64)
    first, edge_b, edge_c = corners_px[:, 0], corners_px[:, 1] - corners_px[:, 0], corners_px[:, 2] - corners_px[:, 0]
    doubled_area = edge_b[:, 0] * edge_c[:, 1] - edge_b[:, 1] * edge_c[:, 0]
    drawn = ((high >= low).all(axis=1)) & (np.abs(doubled_area) > 1e-12)
    box_powers = np.ceil(np.log2(np.maximum(high - low + 1, 1))).astype(np.int64)  # (T, 2): columns, rows
    size_class = box_powers[:, 0] * 64 + box_powers[:, 1]
    pixels, depths, values = [], [], []
    for size in np.unique(size_class[drawn]):
        box_width, box_height = 1 << int(size // 64), 1 << int(size % 64)
        offset_row, offset_column = np.divmod(np.arange(box_width * box_height), box_width)
        members = np.flatnonzero(drawn & (size_class == size))
        per_chunk = max(1, _MAX_CANDIDATE_PIXELS // (box_width * box_height))
        for start in range(0, len(members), per_chunk):
            t = members[start:start + per_chunk]
            column = low[t, 0, None] + offset_column
            row = low[t, 1, None] + offset_row
            dx = column + 0.5 - first[t, 0, None]
            dy = row + 0.5 - first[t, 1, None]
            weight_b = (dx * edge_c[t, 1, None] - dy * edge_c[t, 0, None]) / doubled_area[t, None]
            weight_c = (edge_b[t, 0, None] * dy - edge_b[t, 1, None] * dx) / doubled_area[t, None]
            weight_a = 1.0 - weight_b - weight_c
            inside = ((column <= high[t, 0, None]) & (row <= high[t, 1, None]) & (weight_a >= -_EDGE_TOLERANCE)
                      & (weight_b >= -_EDGE_TOLERANCE) & (weight_c >= -_EDGE_TOLERANCE))
            which, candidate = np.nonzero(inside)
            weights = np.stack([weight_a[which, candidate], weight_b[which, candidate],
                                weight_c[which, candidate]], axis=1)
            triangle = t[which]
            pixels.append(row[which, candidate] * width + column[which, candidate])
            depths.append(np.einsum("fk,fk->f", weights, corner_depths[triangle]))
            values.append(np.einsum("fk,fkc->fc", weights, corner_values[triangle]))
    if not pixels:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, corner_values.shape[2]))
    return np.concatenate(pixels), np.concatenate(depths), np.concatenate(values)


def _depth_layer(fragments, pixel_count: int, nearest: bool):
    """(depth, colour) per pixel of the nearest (or farthest) fragment; depth -inf where there is none."""
    pixels, depths, values = fragments
    best = np.full(pixel_count, -np.inf if nearest else np.inf)
    (np.maximum if nearest else np.minimum).at(best, pixels, depths)
    winners = depths == best[pixels]
    colour = np.zeros((pixel_count, values.shape[1]))
    colour[pixels[winners]] = values[winners]
    best[~np.isfinite(best)] = -np.inf
    return best, colour


def _render_view(meshes, basis, centre_mm, half_span_mm, width: int, height: int) -> np.ndarray:
    """RGB image (height, width, 3) of the surfaces on white, ``centre_mm`` at the middle, ``half_span_mm`` (x, y).

    All opaque surfaces share one z-buffer; a semi-transparent surface adds its nearest and its farthest layer
    (front and back of a closed surface). Per pixel the layers are blended far to near, so the tumour and vessels
    show through the organ without seams between triangles. Rendered at twice the resolution, then averaged.
    """
    right, up, towards_viewer = basis
    scale = _SUPERSAMPLING
    full_width, full_height = width * scale, height * scale
    mm_per_pixel = 2.0 * half_span_mm[0] / full_width
    pixel_count = full_width * full_height
    opaque, layers = [], []
    for mesh, points, triangles in meshes:
        shaded = np.outer(_vertex_shades(points, triangles, towards_viewer), mesh.color_rgb)
        columns = (points @ right - (centre_mm[0] - half_span_mm[0])) / mm_per_pixel
        rows = ((centre_mm[1] + half_span_mm[1]) - points @ up) / mm_per_pixel
        corners_px = np.stack([columns, rows], axis=1)[triangles]
        fragments = _fragments(corners_px, (points @ towards_viewer)[triangles], shaded[triangles],
                               full_width, full_height)
        if mesh.opacity >= 1.0:
            opaque.append(fragments)
            continue
        near_depth, near_colour = _depth_layer(fragments, pixel_count, nearest=True)
        far_depth, far_colour = _depth_layer(fragments, pixel_count, nearest=False)
        far_depth[far_depth >= near_depth] = -np.inf  # one layer only (silhouette, open surface): draw it once
        for depth, colour in ((near_depth, near_colour), (far_depth, far_colour)):
            layers.append((depth, colour, np.where(np.isfinite(depth), float(mesh.opacity), 0.0)))
    if opaque:
        merged = tuple(np.concatenate(parts) for parts in zip(*opaque))
        depth, colour = _depth_layer(merged, pixel_count, nearest=True)
        layers.append((depth, colour, np.isfinite(depth).astype(float)))

    depth_stack = np.stack([layer[0] for layer in layers])
    image = np.ones((pixel_count, 3))
    covered = np.flatnonzero(np.isfinite(depth_stack).any(axis=0))
    order = np.argsort(depth_stack[:, covered], axis=0)  # far (smallest depth) first
    for rank in range(len(layers)):
        for index, (_, colour, alpha) in enumerate(layers):
            here = covered[order[rank] == index]
            image[here] = image[here] * (1.0 - alpha[here, None]) + colour[here] * alpha[here, None]
    image = image.reshape(height, scale, width, scale, 3).mean(axis=(1, 3))
    return np.clip(image, 0.0, 1.0)


def _nice_length_mm(target_mm: float) -> float:
    """The largest of 1, 2, 5 x 10^k mm not above ``target_mm`` (a readable scale-bar length)."""
    exponent = 10.0 ** math.floor(math.log10(max(target_mm, 1e-6)))
    return max(step * exponent for step in (1.0, 2.0, 5.0) if step * exponent <= target_mm)


# ---------------------------------------------------------------------------------------------------------------------
# Drawing


def _draw_views(figure, meshes, page_inches):
    """Both views at one common scale (mm per inch), each centred on the surfaces' projection."""
    all_points = np.concatenate([points for _, points, _ in meshes])
    projections = []
    mm_per_inch = 0.0
    for name, caption, direction, view_up in _VIEWS:
        right, up, towards_viewer = _view_basis(direction, view_up)
        screen = np.stack([all_points @ right, all_points @ up], axis=-1)
        low, high = screen.min(axis=0), screen.max(axis=0)
        rect = VIEW_RECTS[name]
        box_inches = np.array([rect[2] * page_inches[0], rect[3] * page_inches[1]])
        mm_per_inch = max(mm_per_inch, float(np.max((high - low) / box_inches)))
        projections.append((name, caption, (right, up, towards_viewer), (low + high) / 2.0, box_inches))
    mm_per_inch = max(mm_per_inch * 1.2, 1e-3)  # a margin for the orientation letters and the scale bar

    for name, caption, basis, centre, box_inches in projections:
        axes = figure.add_axes(VIEW_RECTS[name])
        half_span = box_inches * mm_per_inch / 2.0
        width, height = (int(round(v)) for v in box_inches * figure.dpi)
        image = _render_view(meshes, basis, centre, half_span, width, height)
        axes.imshow(image, extent=(centre[0] - half_span[0], centre[0] + half_span[0],
                                   centre[1] - half_span[1], centre[1] + half_span[1]),
                    origin="upper", interpolation="none")
        axes.set_xlim(centre[0] - half_span[0], centre[0] + half_span[0])
        axes.set_ylim(centre[1] - half_span[1], centre[1] + half_span[1])
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_color((0.8, 0.8, 0.8))
        axes.set_title(caption, fontsize=9, color=(0.2, 0.2, 0.2), pad=4)
        _draw_orientation_letters(axes, basis[0], basis[1])
        _draw_scale_bar(axes, centre, half_span)


def _draw_orientation_letters(axes, right, up):
    style = dict(transform=axes.transAxes, fontsize=11, fontweight="bold", color=(0.35, 0.35, 0.35),
                 bbox=dict(facecolor="white", alpha=0.6, edgecolor="none", pad=1.0))
    axes.text(0.02, 0.5, _axis_letter(-right), ha="left", va="center", **style)
    axes.text(0.98, 0.5, _axis_letter(right), ha="right", va="center", **style)
    axes.text(0.5, 0.98, _axis_letter(up), ha="center", va="top", **style)
    axes.text(0.5, 0.02, _axis_letter(-up), ha="center", va="bottom", **style)


def _draw_scale_bar(axes, centre, half_span):
    length_mm = _nice_length_mm(0.5 * half_span[0])
    x_end = centre[0] + half_span[0] * 0.9
    y = centre[1] - half_span[1] * 0.9
    axes.plot([x_end - length_mm, x_end], [y, y], color=(0.25, 0.25, 0.25), linewidth=2.0, solid_capstyle="butt")
    axes.text(x_end - length_mm / 2.0, y + half_span[1] * 0.03, f"{length_mm:g} mm", ha="center", va="bottom",
              fontsize=7, color=(0.25, 0.25, 0.25))


def _draw_legend(figure, meshes, renderer) -> float:
    """A colour key of the meshes below the views; returns the figure y of its bottom edge."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=tuple(mesh.color_rgb), edgecolor=(0.5, 0.5, 0.5), linewidth=0.5,
                     label=f"{mesh.name}" + ("" if mesh.opacity >= 1.0 else f" ({mesh.opacity:.0%} opaque)"))
               for mesh, _, _ in meshes]
    legend = figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, LEGEND_TOP_Y),
                           ncol=min(len(handles), 4), frameon=False, fontsize=8, handlelength=1.2,
                           columnspacing=1.5, borderaxespad=0.0)
    return float(figure.transFigure.inverted().transform(legend.get_window_extent(renderer))[0, 1])


def _line_height(font_size: float, page_height_inches: float) -> float:
    return font_size * _LINE_SPACING / 72.0 / page_height_inches


def _wrapped(text: str, max_width_px: float, font, renderer) -> List[str]:
    """``text`` broken at spaces into lines of at most ``max_width_px`` (a longer single word gets its own line)."""
    lines: List[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and renderer.get_text_width_height_descent(candidate, font, ismath=False)[0] <= max_width_px:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def _draw_warnings(figure, warnings: Sequence[str], top: float, page_inches, renderer) -> float:
    """Each warning in red after a warning sign, wrapped to the page width; returns the y below the last line."""
    from matplotlib.font_manager import FontProperties

    font = FontProperties(size=9.0, weight="bold")
    line = _line_height(font.get_size_in_points(), page_inches[1])
    max_width_px = (1.0 - 2 * MARGIN_X) * page_inches[0] * figure.dpi
    indent_px = renderer.get_text_width_height_descent("\u26a0 ", font, ismath=False)[0]
    indent = indent_px / (page_inches[0] * figure.dpi)
    y = top
    for warning in warnings:
        for index, text in enumerate(_wrapped(str(warning), max_width_px - indent_px, font, renderer)):
            if index == 0:
                figure.text(MARGIN_X, y, "\u26a0", ha="left", va="top", fontproperties=font, color=WARNING_COLOUR)
            figure.text(MARGIN_X + indent, y, text, ha="left", va="top", fontproperties=font, color=WARNING_COLOUR)
            y -= line
    return y - (line * 0.5 if warnings else 0.0)


def _split_columns(heights: Sequence[int]) -> int:
    """Number of sections (in order) for the left page column that best balances the two columns' heights."""
    total = sum(heights)
    best, best_height = 0, total
    running = 0
    for count, height in enumerate(heights, start=1):
        running += height
        if max(running, total - running) < best_height:
            best, best_height = count, max(running, total - running)
    return best


def _table_lines(section: ReportSection) -> int:
    return 1 + len(section.rows) + 1  # heading, rows, gap


def _fitted(text_artist, max_width_px: float, renderer) -> None:
    """Shorten the artist's text with an ellipsis until it is at most ``max_width_px`` wide."""
    text = text_artist.get_text()
    while len(text) > 1 and text_artist.get_window_extent(renderer).width > max_width_px:
        text = text[:-2].rstrip() + "\u2026"  # drops the ellipsis (if any) and one more character
        text_artist.set_text(text)


def _draw_tables(figure, sections: List[ReportSection], top: float, bottom: float, page_inches, renderer):
    """Sections as label/value tables in two page columns; the font shrinks to fit, overflowing rows are counted."""
    if not sections:
        return
    heights = [_table_lines(section) for section in sections]
    split = _split_columns(heights)
    columns = [sections[:split], sections[split:]]
    lines_needed = max(sum(_table_lines(section) for section in column) for column in columns)
    for font_size in _TABLE_FONT_SIZES:
        line = _line_height(font_size, page_inches[1])
        if lines_needed * line <= top - bottom:
            break
    lines_available = int((top - bottom) / line)
    column_width = (1.0 - 2 * MARGIN_X - _COLUMN_GAP) / 2.0
    for column_index, column in enumerate(columns):
        left = MARGIN_X + column_index * (column_width + _COLUMN_GAP)
        _draw_column(figure, column, left, column_width, top, line, lines_available, font_size, page_inches, renderer)


def _draw_column(figure, sections, left, width, top, line, lines_available, font_size, page_inches, renderer):
    from matplotlib.patches import Rectangle

    width_px = width * page_inches[0] * figure.dpi
    padding = 0.006
    y = top
    lines_left = lines_available
    for section_index, section in enumerate(sections):
        if lines_left < 2:
            hidden = sum(len(s.rows) for s in sections[section_index:])
            figure.text(left, y, f"({hidden} more rows not shown)", ha="left", va="top", fontsize=font_size,
                        style="italic", color=FOOTER_COLOUR)
            return
        figure.text(left, y, section.heading, ha="left", va="top", fontsize=font_size + 1, fontweight="bold")
        y -= line
        figure.add_artist(Rectangle((left, y + 0.15 * line), width, 0.0008, transform=figure.transFigure,
                                    facecolor=(0.3, 0.3, 0.3), edgecolor="none"))
        lines_left -= 1
        for row_index, (label, value) in enumerate(section.rows):
            if lines_left < 1 or (lines_left == 1 and row_index < len(section.rows) - 1):
                hidden = len(section.rows) - row_index + sum(len(s.rows) for s in sections[section_index + 1:])
                figure.text(left + padding, y, f"({hidden} more rows not shown)", ha="left", va="top",
                            fontsize=font_size, style="italic", color=FOOTER_COLOUR)
                return
            if row_index % 2 == 0:
                figure.add_artist(Rectangle((left, y - line + 0.15 * line), width, line, transform=figure.transFigure,
                                            facecolor=(0.94, 0.95, 0.97), edgecolor="none", zorder=-1))
            value_text = figure.text(left + width - padding, y - 0.12 * line, value, ha="right", va="top",
                                     fontsize=font_size)
            _fitted(value_text, 0.55 * width_px, renderer)
            label_text = figure.text(left + padding, y - 0.12 * line, label, ha="left", va="top", fontsize=font_size,
                                     color=(0.15, 0.15, 0.15))
            value_width_px = value_text.get_window_extent(renderer).width
            _fitted(label_text, width_px - value_width_px - 2 * padding * page_inches[0] * figure.dpi - 8, renderer)
            y -= line
            lines_left -= 1
        y -= line
        lines_left -= 1


# ---------------------------------------------------------------------------------------------------------------------
# Public entry point


def render_plan_report(path, title: str, meshes: Sequence[SurfaceMesh], sections: Sequence[ReportSection],
                       warnings: Sequence[str] = (), footer: str = DEFAULT_FOOTER, dpi: int = 150,
                       max_triangles_per_mesh: int = DEFAULT_MAX_TRIANGLES_PER_MESH) -> Path:
    """Write the one-page A4 portrait plan report to ``path`` (.png or .pdf, by suffix) and return the path.

    Top to bottom: ``title`` and the date and time of generation; the anterior and superior 3D views of ``meshes``
    (see the module docstring) with orientation letters, a scale bar and a colour legend; ``warnings`` in red, each
    after a warning sign; ``sections`` as label/value tables in two columns (the font shrinks down to 6 pt to fit,
    beyond that the last rows are counted, not drawn); ``footer`` in small grey text.

    A mesh of more than ``max_triangles_per_mesh`` triangles is reduced evenly over its surface by vertex clustering
    (see ``reduced_triangles``) so that drawing stays within seconds; pass decimated meshes to keep full control.
    In a PDF the views are embedded as bitmaps at ``dpi`` and the text stays vector.
    """
    path = _checked_path(path)
    if not meshes:
        raise InputError("The plan report has nothing to draw: no surface meshes were given")
    if int(max_triangles_per_mesh) < 1:
        raise InputError(f"max_triangles_per_mesh must be >= 1, got {max_triangles_per_mesh}")
    if not (isinstance(dpi, (int, float)) and 30 <= dpi <= 1200):
        raise InputError(f"dpi must be between 30 and 1200, got {dpi}")
    checked = [(mesh, *reduced_triangles(*_checked_mesh(mesh), int(max_triangles_per_mesh))) for mesh in meshes]
    sections = _checked_sections(sections)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=A4_PORTRAIT_INCHES, dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    page_inches = A4_PORTRAIT_INCHES
    renderer = canvas.get_renderer()
    title_text = figure.text(MARGIN_X, 0.975, str(title), ha="left", va="top", fontsize=16, fontweight="bold")
    _fitted(title_text, (1.0 - 2 * MARGIN_X) * page_inches[0] * dpi, renderer)
    figure.text(MARGIN_X, 0.950, f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M}", ha="left", va="top",
                fontsize=9, color=FOOTER_COLOUR)
    _draw_views(figure, checked, page_inches)
    legend_bottom = _draw_legend(figure, checked, renderer)
    content_top = _draw_warnings(figure, warnings, legend_bottom - 0.015, page_inches, renderer)
    _draw_tables(figure, sections, content_top, CONTENT_BOTTOM_Y, page_inches, renderer)
    figure.text(0.5, 0.018, footer, ha="center", va="bottom", fontsize=7, color=FOOTER_COLOUR)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(str(path), dpi=dpi, facecolor="white", format=path.suffix.lower()[1:])
    except OSError as error:
        raise InputError(f"Cannot write the plan report to {path}: {error.strerror or error} "
                         "(is the folder writable?)") from None
    return path
