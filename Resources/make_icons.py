"""Draw the extension and module icons (128x128 RGBA PNG, flat style) so they can be regenerated, not hand-edited.

Usage: ``python Resources/make_icons.py`` from the repository root (needs Pillow). Shapes are drawn at 4x size and
downsampled, which gives smooth edges without any font or external artwork.
"""

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
SCALE = 4  # supersampling factor
REPO = Path(__file__).resolve().parent.parent

TILE = (38, 70, 112)
TILE_LIGHT = (58, 96, 146)
LUNG = (236, 170, 170)
AIRWAY = (210, 140, 145)
NODULE = (255, 206, 64)
LIVER = (221, 130, 101)
LIVER_REMNANT = (180, 96, 74)
KIDNEY = (185, 102, 83)
SPLEEN = (157, 108, 162)
PLANE = (120, 200, 255)
WHITE = (255, 255, 255)


def smooth_closed_curve(points, samples=12):
    """Catmull-Rom spline through closed control points, so organs get round outlines from a few points."""
    curve = []
    count = len(points)
    for index in range(count):
        p0, p1, p2, p3 = (points[(index + offset) % count] for offset in (-1, 0, 1, 2))
        for step in range(samples):
            t = step / samples
            curve.append(tuple(
                0.5 * (2 * b + (c - a) * t + (2 * a - 5 * b + 4 * c - d) * t * t + (3 * b - a - 3 * c + d) * t ** 3)
                for a, b, c, d in zip(p0, p1, p2, p3)))
    return curve


def scaled(points):
    return [(x * SCALE, y * SCALE) for x, y in points]


def box(x0, y0, x1, y1):
    return [x0 * SCALE, y0 * SCALE, x1 * SCALE, y1 * SCALE]


def new_tile():
    """A rounded square in the extension colour: the common background of every icon."""
    image = Image.new("RGBA", (SIZE * SCALE, SIZE * SCALE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle(box(4, 4, 124, 124), radius=22 * SCALE, fill=TILE)
    return image, draw


def organ(draw, points, fill):
    draw.polygon(scaled(smooth_closed_curve(points)), fill=fill)


def liver_outline(dx=0.0, dy=0.0):
    """The liver seen from the front (patient's right on the image left): big right lobe tapering to the left."""
    return [(x + dx, y + dy) for x, y in
            [(16, 52), (28, 34), (58, 28), (92, 30), (112, 40), (106, 52), (84, 64), (58, 80), (36, 90), (20, 80)]]


def draw_lungs(draw):
    draw.rounded_rectangle(box(60, 16, 68, 52), radius=4 * SCALE, fill=AIRWAY)
    draw.line(scaled([(50, 62), (64, 48), (78, 62)]), fill=AIRWAY, width=6 * SCALE, joint="curve")
    organ(draw, [(56, 40), (44, 26), (28, 36), (20, 70), (18, 100), (34, 108), (54, 100), (58, 70)], LUNG)
    organ(draw, [(72, 40), (84, 26), (100, 36), (108, 70), (110, 100), (94, 108), (74, 100), (70, 70)], LUNG)


def draw_nodule_mark(draw, center, radius):
    """A solid nodule with a detection ring around it."""
    x, y = center
    draw.ellipse(box(x - radius, y - radius, x + radius, y + radius), fill=NODULE)
    ring = radius + 7
    draw.ellipse(box(x - ring, y - ring, x + ring, y + ring), outline=WHITE, width=3 * SCALE)


def nodule_detect():
    image, draw = new_tile()
    draw_lungs(draw)
    draw_nodule_mark(draw, (90, 76), 7)
    return image


def organ_segment():
    image, draw = new_tile()
    organ(draw, liver_outline(dy=-6), LIVER)
    organ(draw, [(96, 56), (110, 60), (112, 74), (100, 80), (90, 70)], SPLEEN)
    kidney = [(34, 80), (44, 80), (50, 88), (45, 97), (50, 106), (44, 114), (34, 114), (26, 97)]
    organ(draw, kidney, KIDNEY)
    organ(draw, [(SIZE - x, y) for x, y in reversed(kidney)], KIDNEY)
    return image


def surgery_plan():
    """The liver split by a resection plane: the resected part lighter, the remnant darker."""
    image, draw = new_tile()
    liver = Image.new("RGBA", image.size, (0, 0, 0, 0))
    organ(ImageDraw.Draw(liver), liver_outline(dy=8), LIVER)
    remnant_mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(remnant_mask).polygon(scaled([(0, 0), (74, 0), (50, 128), (0, 128)]), fill=255)
    remnant = Image.new("RGBA", image.size, LIVER_REMNANT)
    liver.paste(remnant, mask=Image.composite(liver.getchannel("A"), remnant_mask, remnant_mask))
    image.alpha_composite(liver)
    plane = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(plane).polygon(scaled([(66, 14), (88, 20), (66, 118), (44, 112)]), fill=PLANE + (110,))
    image.alpha_composite(plane)
    draw.line(scaled([(77, 17), (55, 115)]), fill=WHITE, width=3 * SCALE)
    return image


def extension_icon():
    """An axial CT slice: body outline, both lungs and a detected nodule, the extension's first use case."""
    image, draw = new_tile()
    draw.ellipse(box(12, 26, 116, 106), fill=TILE_LIGHT)
    draw.ellipse(box(22, 36, 60, 90), fill=LUNG)
    draw.ellipse(box(68, 36, 106, 90), fill=LUNG)
    draw.ellipse(box(56, 86, 72, 102), fill=WHITE)  # vertebra
    draw_nodule_mark(draw, (86, 56), 6)
    return image


ICONS = {
    "Resources/Icons/MedicalImageRecognition.png": extension_icon,
    "NoduleDetect/Resources/Icons/NoduleDetect.png": nodule_detect,
    "OrganSegment/Resources/Icons/OrganSegment.png": organ_segment,
    "SurgeryPlan/Resources/Icons/SurgeryPlan.png": surgery_plan,
}


def main():
    for relative_path, draw_icon in ICONS.items():
        path = REPO / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_icon().resize((SIZE, SIZE), Image.LANCZOS).save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main()
