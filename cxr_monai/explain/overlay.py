"""Heat-map overlays a person reads: the film with the Grad-CAM map blended in, text and a colour bar
burned into the same pixel grid (the DICOM Secondary Capture and the gRPC reply). A film too small for
legible text on it gets, in the PNG ``cxr-monai explain`` writes, its text in a caption strip below the
film instead (the film's own pixels, the map and the colour bar are the same in both).

Colours come from matplotlib colormaps; text and the colour bar are drawn with Pillow. Neither library
offers "draw a labelled colour bar into an existing array of the image's own size", hence this module.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Colormap of the heat map (0 = blue, 1 = red).
COLORMAP = "jet"
#: Opacity of the heat map where it is 1; it fades linearly to 0 where the map is 0, so the film
#: stays readable outside the hot regions.
MAX_ALPHA = 0.5


def to_display_gray(pixels: np.ndarray) -> np.ndarray:
    """Float (rows, cols), bright = dense -> uint8 (rows, cols) by min-max scaling (flat -> zeros)."""
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def blend(pixels: np.ndarray, heatmap: np.ndarray, max_alpha: float = MAX_ALPHA) -> np.ndarray:
    """Film (rows, cols) + heat map in [0, 1] (rows, cols) -> RGB uint8 (rows, cols, 3).

    The map's colour is mixed in with opacity ``max_alpha * heat``.
    """
    if pixels.shape != heatmap.shape:
        raise ValueError(f"film {pixels.shape} and heat map {heatmap.shape} differ in shape")
    gray = to_display_gray(pixels).astype(np.float32)[..., None].repeat(3, axis=2)
    heat = np.clip(heatmap, 0.0, 1.0).astype(np.float32)
    colour = matplotlib.colormaps[COLORMAP](heat)[..., :3].astype(np.float32) * 255.0
    alpha = (max_alpha * heat)[..., None]
    return np.round(gray * (1.0 - alpha) + colour * alpha).astype(np.uint8)


#: Smallest text drawn, pixels (font size): below it the default font's words run together.
MIN_TEXT_PX = 14
#: Text size as a fraction of the film's shorter side (1/45: about 66 px on a 3000 px film).
TEXT_FRACTION = 1 / 45
#: Narrowest colour bar, pixels; otherwise 1/40 of the width.
MIN_BAR_PX = 12
#: Films whose shorter side is under this many pixels get their text in a caption strip below the film
#: (:func:`render_captioned`): at the smallest legible size, text drawn on them would hide the lungs.
CAPTION_STRIP_BELOW_PX = round(MIN_TEXT_PX / TEXT_FRACTION)
#: Strip background (RGB).
STRIP_COLOUR = (0, 0, 0)


def text_px(rows: int, cols: int) -> int:
    """Font size in pixels for a film of ``rows`` x ``cols``: grows with the film, never under
    :data:`MIN_TEXT_PX`."""
    return max(MIN_TEXT_PX, round(min(rows, cols) * TEXT_FRACTION))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(lines: Sequence[str], width_px: int, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> str:
    """``lines`` word-wrapped to ``width_px`` as ``font`` draws them (Pillow measures text but does not
    wrap it); a word wider than the line stands alone."""
    out: list[str] = []
    for line in lines:
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) > width_px:
                out.append(current)
                candidate = word
            current = candidate
        out.append(current)
    return "\n".join(out)


def annotate(rgb: np.ndarray, lines: Sequence[str], colour_bar: bool = True) -> np.ndarray:
    """Draw ``lines`` (top left, on a dark box) and a labelled 0-1 colour bar (right edge) into
    a copy of ``rgb`` (rows, cols, 3) uint8; the size does not change. Long lines are wrapped; text and
    bar scale with the film (:func:`text_px`, :data:`MIN_BAR_PX`)."""
    rows, cols = rgb.shape[:2]
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image, "RGBA")
    size = text_px(rows, cols)
    font = _font(size)
    margin = max(2, size // 2)
    bar_width = max(MIN_BAR_PX, cols // 40) if colour_bar else 0
    if colour_bar:
        _draw_colour_bar(draw, rows, cols, bar_width, margin, font)
    if lines:
        wrapped = _wrap(lines, cols - bar_width - 4 * margin, font)
        box = draw.multiline_textbbox((margin, margin), wrapped, font=font, spacing=size // 4)
        pad = size // 4
        draw.rectangle((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad), fill=(0, 0, 0, 170))
        draw.multiline_text((margin, margin), wrapped, fill=(255, 255, 255), font=font, spacing=size // 4)
    return np.asarray(image, dtype=np.uint8)


def with_caption(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Like :func:`annotate`, but a film under :data:`CAPTION_STRIP_BELOW_PX` keeps only the colour bar
    and gets ``lines`` in a strip below it: (rows + strip, cols, 3) uint8, rows 0..rows-1 the film."""
    rows, cols = rgb.shape[:2]
    if min(rows, cols) >= CAPTION_STRIP_BELOW_PX or not lines:
        return annotate(rgb, lines)
    film = annotate(rgb, [])
    size = text_px(rows, cols)
    margin = max(2, size // 2)
    font = _font(size)
    wrapped = _wrap(lines, cols - 2 * margin, font)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = measure.multiline_textbbox((margin, margin), wrapped, font=font, spacing=size // 4)
    strip = Image.new("RGB", (cols, round(box[3]) + margin), STRIP_COLOUR)
    ImageDraw.Draw(strip).multiline_text(
        (margin, margin), wrapped, fill=(255, 255, 255), font=font, spacing=size // 4
    )
    return np.concatenate([film, np.asarray(strip, dtype=np.uint8)], axis=0)


def _draw_colour_bar(
    draw: ImageDraw.ImageDraw,
    rows: int,
    cols: int,
    width: int,
    margin: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """Vertical bar at the right edge, 1.0 at the top, middle half of the height, labelled 0 / 0.5 / 1."""
    top, bottom = rows // 4, rows - rows // 4
    left = cols - margin - width
    height = max(1, bottom - top)
    ramp = matplotlib.colormaps[COLORMAP](np.linspace(1.0, 0.0, height))[:, :3]
    for i, colour in enumerate(ramp):
        rgb = tuple(round(float(c) * 255) for c in colour)
        draw.line((left, top + i, left + width - 1, top + i), fill=rgb)
    draw.rectangle((left - 1, top - 1, left + width, bottom), outline=(255, 255, 255))
    for value, y in ((1.0, top), (0.5, (top + bottom) // 2), (0.0, bottom)):
        label = f"{value:g}"
        box = draw.textbbox((0, 0), label, font=font)
        x = left - margin - (box[2] - box[0])
        draw.text(
            (x, y - (box[3] - box[1]) // 2),
            label,
            fill=(255, 255, 255),
            font=font,
            stroke_width=1,
            stroke_fill=(0, 0, 0),
        )


def render_overlay(pixels: np.ndarray, heatmap: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """The full picture: blend, then text and colour bar. RGB uint8 (rows, cols, 3): the source's own
    grid, as a DICOM Secondary Capture and the gRPC reply need it."""
    return annotate(blend(pixels, heatmap), lines)


def render_captioned(pixels: np.ndarray, heatmap: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """The picture for a PNG a person opens: as :func:`render_overlay`, but a small film gets its text in
    a strip below (:func:`with_caption`). RGB uint8 (rows [+ strip], cols, 3)."""
    return with_caption(blend(pixels, heatmap), lines)


def png_bytes(rgb: np.ndarray) -> bytes:
    """RGB uint8 (rows, cols, 3) encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
