"""What `predict` writes per image: NAME_ids.png (trainIds, mode L, 255 = ignore), NAME_color.png
(Cityscapes colours) and NAME_overlay.png (photo and colours blended 50/50, a legend of the classes
present in a strip below)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features

from cityseg.palette import IGNORE_INDEX, Palette, colorize

OUTPUT_KINDS = ("ids", "color", "overlay")


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled scalable font needs FreeType; builds without it only have the tiny bitmap font.
    return ImageFont.load_default(size=size) if features.check("freetype2") else ImageFont.load_default()


def legend_strip(width: int, class_ids: Sequence[int], palette: Palette) -> Image.Image | None:
    """A dark strip `width` wide listing the classes: colour square + name, wrapped into rows."""
    if not class_ids:
        return None
    fs = max(10, min(28, width // 48))  # font size follows the photo width
    pad, font = max(3, fs // 2), _font(fs)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[list[tuple[int, int]]] = [[]]  # per row: (class id, x)
    x = pad
    for c in class_ids:
        entry = fs + pad // 2 + math.ceil(measure.textlength(palette.names[c], font=font)) + pad
        if x + entry > width and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((c, x))
        x += entry
    row_h = fs + pad
    strip = Image.new("RGB", (width, pad + row_h * len(rows)), (32, 32, 32))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y = pad + r * row_h
        for c, x in row:
            color = tuple(int(v) for v in palette.colors[c])
            draw.rectangle([x, y, x + fs - 1, y + fs - 1], fill=color, outline=(255, 255, 255))
            draw.text((x + fs + pad // 2, y + fs / 2), palette.names[c], fill=(255, 255, 255), font=font,
                      anchor="lm")
    return strip


def overlay_image(photo: np.ndarray, color: np.ndarray, ids: np.ndarray, palette: Palette) -> Image.Image:
    """Photo and colour mask blended 50/50, with the legend of the predicted classes below."""
    blend = ((photo.astype(np.uint16) + color.astype(np.uint16) + 1) // 2).astype(np.uint8)
    present = [int(c) for c in np.unique(ids) if c != IGNORE_INDEX and c < palette.num_classes]
    top = Image.fromarray(blend)
    strip = legend_strip(top.width, present, palette)
    if strip is None:
        return top
    out = Image.new("RGB", (top.width, top.height + strip.height))
    out.paste(top, (0, 0))
    out.paste(strip, (0, top.height))
    return out


def write_outputs(out_dir: Path, name: str, photo: np.ndarray, ids: np.ndarray, palette: Palette) -> dict[str, Path]:
    """NAME_ids.png, NAME_color.png, NAME_overlay.png in out_dir; returns their paths by kind."""
    color = colorize(torch.from_numpy(ids), palette).numpy()
    paths = {kind: out_dir / f"{name}_{kind}.png" for kind in OUTPUT_KINDS}
    Image.fromarray(ids.astype(np.uint8)).save(paths["ids"])  # 2-D uint8 -> mode L
    Image.fromarray(color).save(paths["color"])
    overlay_image(photo, color, ids, palette).save(paths["overlay"])
    return paths
