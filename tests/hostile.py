"""A hostile corpus, generated: the files and names that broke nightly runs, made for real.

Every file is written by Pillow or byte by byte here, so nothing is downloaded and no third
party's test images are committed. `build_corpus` returns the folder and a `.txt` manifest
that lists every entry (by its exact bytes), including ones no folder walk would pick up.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import COLORS, noisy

NON_UTF8_NAME = b"bad\xff\xfe.png"


def tga_confusable_ico() -> bytes:
    """A valid ICO whose first bytes also parse as a TGA header, as Pillow's own pillow.ico:
    a process that imported the TGA plugin first used to open it as a 32x9472 TGA."""
    rng = np.random.default_rng(0)
    for levels in range(2, 64):
        pixels = rng.integers(0, levels, (256, 256, 4), dtype=np.uint8)
        pixels[..., 3] = 255
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGBA").save(buffer, format="ICO", sizes=[(32, 32), (256, 256)])
        data = buffer.getvalue()
        small, big = data[6:22], data[22:38]
        if int.from_bytes(big[8:12], "little") >> 16 == 1:  # TGA reads this byte as depth 1
            return data[:6] + big[:4] + b"\x01\x00" + big[6:] + small + data[38:]
    raise AssertionError("no ICO size found that parses as a TGA header")


def dds_unknown_pixel_flags() -> bytes:
    """A DDS whose pixel format Pillow does not implement (NotImplementedError)."""
    header = struct.pack("<4s7I44x", b"DDS ", 124, 0x1007, 8, 8, 0, 0, 0)
    pixel_format = struct.pack("<2I4s5I", 32, 0x8, b"\0\0\0\0", 0, 0, 0, 0, 0)
    caps = struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    return header + pixel_format + caps + bytes(256)


def placeable_wmf() -> bytes:
    """A placeable WMF header: Pillow recognises it but cannot render it off Windows."""
    words = struct.pack("<IHhhhhHI", 0x9AC6CDD7, 0, 0, 0, 100, 80, 1440, 0)
    checksum = 0
    for (word,) in struct.iter_unpack("<H", words):
        checksum ^= word
    body = struct.pack("<HHHIHIH", 1, 9, 0x300, 12, 0, 3, 0) + struct.pack("<IH", 3, 0)
    return words + struct.pack("<H", checksum) + body


def minimal_eps() -> bytes:
    """A valid EPS: Pillow renders EPS with Ghostscript only."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
        b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
    )


def corrupt_g4_tiff() -> bytes:
    """A CCITT G4 TIFF with damaged data: libtiff decodes it and complains on stderr."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    bits = Image.fromarray(rng.integers(0, 2, (64, 64), dtype=np.uint8) * 255).convert("1")
    bits.save(buffer, format="TIFF", compression="group4")
    data = bytearray(buffer.getvalue())
    for i in range(16, 200, 7):
        data[i] ^= 0xFF
    return bytes(data)


def oriented_tiff(path: Path, orientation: int) -> None:
    """A 50x30 (width x height) picture stored with an EXIF orientation tag."""
    Image.fromarray(np.full((30, 50), 255, np.uint8)).convert("1").save(
        path, compression="group4", tiffinfo={274: orientation}
    )


def oriented_jpeg(path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    noisy(COLORS["red"], (50, 30)).save(path, exif=exif, quality=95)


def build_corpus(root: Path) -> tuple[Path, Path, dict[bytes, str]]:
    """Write the corpus under root/corpus; return (folder, manifest, {path bytes: expectation}).

    The expectation is 'ok', 'error', or 'ok-or-error' (a valid EPS renders where Ghostscript
    is installed)."""
    folder = root / "corpus"
    folder.mkdir()
    expect: dict[bytes, str] = {}

    def put(name: bytes, data: bytes | None, outcome: str) -> bytes:
        path = os.fsencode(folder) + b"/" + name
        if data is not None:
            with open(path, "wb") as handle:
                handle.write(data)
        expect[path] = outcome
        return path

    def image(name: bytes, picture: Image.Image, outcome: str = "ok", **save: object) -> None:
        buffer = io.BytesIO()
        picture.save(buffer, format=save.pop("format", None) or _format(name), **save)
        put(name, buffer.getvalue(), outcome)

    image(NON_UTF8_NAME, noisy(COLORS["blue"], (40, 30)))
    image("naïve café.png".encode(), noisy(COLORS["green"], (40, 30)))
    image(b"line\nbreak.png", noisy(COLORS["red"], (40, 30)))
    image(b"thin_1x4000.png", Image.new("RGB", (1, 4000), (200, 10, 10)))
    image(b"thin_40000x1.png", Image.new("RGB", (40000, 1), (10, 10, 200)))
    image(b"palette_alpha.png", noisy(COLORS["red"], (30, 30)).convert("P"), transparency=0)
    image(b"sixteen_bit.png", Image.fromarray(np.full((20, 20), 40000, np.uint16)))
    image(b"cmyk.jpg", noisy(COLORS["green"], (30, 20)).convert("CMYK"))
    image(b"animated.gif", noisy(COLORS["blue"], (20, 20)), save_all=True,
          append_images=[noisy(COLORS["red"], (20, 20))])  # fmt: skip
    image(b"a_targa.tga", noisy(COLORS["red"], (10, 10)), format="TGA")
    put(b"b_icon.ico", tga_confusable_ico(), "ok")
    for orientation in (1, 5, 6, 8):
        oriented_tiff(folder / f"tiff_orientation_{orientation}.tif", orientation)
        expect[os.fsencode(folder / f"tiff_orientation_{orientation}.tif")] = "ok"
        oriented_jpeg(folder / f"jpeg_orientation_{orientation}.jpg", orientation)
        expect[os.fsencode(folder / f"jpeg_orientation_{orientation}.jpg")] = "ok"
    put(b"noisy_libtiff.tif", corrupt_g4_tiff(), "ok")
    put(b"unknown_pixels.dds", dds_unknown_pixel_flags(), "error")
    put(b"drawing.wmf", placeable_wmf(), "error")
    put(b"vector.eps", minimal_eps(), "ok-or-error")
    whole = io.BytesIO()
    noisy(COLORS["red"], (64, 64)).save(whole, format="PNG")
    put(b"truncated.png", whole.getvalue()[:200], "error")
    put(b"empty.jpg", b"", "error")
    put(b"random_bytes.jpg", np.random.default_rng(1).bytes(3000), "error")
    put(b"text.png", b"this is not an image\n", "error")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    put(b"bomb_20000x20000.png", bomb.getvalue(), "error")
    (folder / "folder.png").mkdir()
    expect[os.fsencode(folder / "folder.png")] = "error"
    os.symlink(folder / "nowhere.png", folder / "dangling.png")
    expect[os.fsencode(folder / "dangling.png")] = "error"
    os.mkfifo(folder / "pipe.png")
    expect[os.fsencode(folder / "pipe.png")] = "error"
    expect[b"/dev/zero"] = "error"
    manifest = root / "corpus.txt"
    manifest.write_bytes(b"".join(path + b"\n" for path in expect if b"\n" not in path))
    return folder, manifest, expect


def _format(name: bytes) -> str:
    extension = name.rsplit(b".", 1)[-1].decode().upper()
    return {"JPG": "JPEG", "TIF": "TIFF"}.get(extension, extension)
