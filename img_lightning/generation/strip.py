"""A side-by-side strip of labelled images (base, IMG round 1, ...), to look at or paste into slides."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

GAP = 8  # pixels between images
LABEL_HEIGHT = 24


def side_by_side(images: Sequence[tuple[str, Image.Image]]) -> Image.Image:
    """``[(label, image), ...]`` left to right at the first image's height (others scaled to it,
    aspect kept), each under its label, on white."""
    if not images:
        raise ValueError("no images to put side by side")
    height = images[0][1].height
    lanczos = Image.Resampling.LANCZOS
    scaled = [(label, im.convert("RGB") if im.height == height else
               im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height), lanczos))
              for label, im in images]
    width = sum(im.width for _, im in scaled) + GAP * (len(scaled) - 1)
    strip = Image.new("RGB", (width, height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    x = 0
    for label, im in scaled:
        draw.text((x + 4, 4), label, fill="black", font=font)
        strip.paste(im, (x, LABEL_HEIGHT))
        x += im.width + GAP
    return strip
