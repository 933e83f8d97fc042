"""A hostile corpus: every kind of file a scraped image folder throws at ingest.

`build_corpus(root)` writes it and returns what each entry must become: the expected
status and error code per source name (relative to root; tar members as
`evil.tar::member`). `references` holds, for the mode-conversion files, the RGB pixels
an independent numpy computation says they must decode to.
"""
from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 24, 40  # small, non-square, so a missed rotation changes the shape


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def with_png_chunk(png: bytes, chunk: bytes) -> bytes:
    """Insert a chunk right after IHDR (signature 8 bytes + IHDR chunk 25 bytes)."""
    return png[:33] + chunk + png[33:]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    """An asymmetric RGB picture: gradients, so JPEG stays close and orientation shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([x / w * 255, y / h * 255, rng.uniform(60, 200) + 0 * x], -1)
    arr[: h // 3, : w // 4] = (250, 20, 20)  # a red corner marks top-left
    return arr.astype(np.uint8)


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """What an EXIF orientation means, written out in numpy: stored pixels -> upright."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }[orientation](arr)


def exif_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    g = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.stack([g, g, g], -1)


def mode_cases(rng: np.random.Generator) -> dict[str, tuple[bytes, str, np.ndarray]]:
    """file name -> (bytes, Pillow mode it must report, the RGB pixels it must decode to)."""
    cases = {}
    g16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    cases["gray16.png"] = (encode(Image.fromarray(g16), "PNG"), "I;16", grey_rgb(g16 / 257.0))

    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    rgb = np.stack([(255 - v) * (255 - k) / 255 for v in (c, m, y)], -1)
    cases["cmyk.tif"] = (encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), "CMYK", np.rint(rgb).astype(np.uint8))

    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (H, W), dtype=np.uint8)
    p = Image.fromarray(index, "L").convert("P")
    p.putpalette(palette.flatten().tolist())
    expect = palette[index].copy()
    expect[index == 0] = 255  # index 0 is transparent: white shows through
    cases["palette_trns.png"] = (encode(p, "PNG", transparency=0), "P", expect)

    la = rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    lum, a = la[..., 0].astype(np.float64), la[..., 1].astype(np.float64) / 255
    cases["la.png"] = (encode(Image.fromarray(la, "LA"), "PNG"), "LA", grey_rgb(lum * a + 255 * (1 - a)))

    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    cases["rgba_alpha0.png"] = (encode(Image.fromarray(rgba, "RGBA"), "PNG"), "RGBA", np.full((H, W, 3), 255, np.uint8))

    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expect = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    cases["rgba_half.png"] = (encode(Image.fromarray(rgba, "RGBA"), "PNG"), "RGBA", expect)

    bits = rng.random((H, W)) > 0.5
    cases["bilevel.png"] = (encode(Image.fromarray(bits), "PNG"), "1", grey_rgb(bits * 255.0))

    f = rng.random((H, W), dtype=np.float32)
    cases["float.tif"] = (encode(Image.fromarray(f, "F"), "TIFF"), "F", grey_rgb(f * 255.0))
    return cases


def build_corpus(root: Path) -> tuple[dict[str, tuple[str, str | None]], dict[str, tuple[str, np.ndarray]]]:
    """Write the corpus under root. Returns (expected status/code per name, pixel references)."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, tuple[str, str | None]] = {}

    def put(name: str, data: bytes, status: str = "ok", code: str | None = None):
        (root / name).write_bytes(data)
        expected[name] = (status, code)

    base = photo()
    jpg = encode(Image.fromarray(base), "JPEG", quality=90)
    png = encode(Image.fromarray(base), "PNG")

    put("empty.jpg", b"", "error", "empty")
    put("text.jpg", b"this is a text file, not a picture\n", "error", "unidentified")
    put("page.png", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "error", "unidentified")
    put("truncated.jpg", jpg[: len(jpg) // 2], "error", "truncated")
    put("truncated.png", png[: len(png) // 2], "error", "truncated")
    dht = jpg.index(b"\xff\xc4")  # a flipped bit in the Huffman table breaks every code after it
    put("bitflip_table.jpg", jpg[: dht + 5] + bytes([jpg[dht + 5] ^ 0x10]) + jpg[dht + 6:], "error", "truncated")
    # JPEG has no checksum: a flipped bit inside the scan decodes to slightly wrong pixels.
    scan = jpg.index(b"\xff\xda") + 40
    put("bitflip_scan.jpg", jpg[:scan] + bytes([jpg[scan] ^ 0x01]) + jpg[scan + 1:])
    put("bomb.png", png_header_only(100_000, 100_000), "error", "decompression_bomb")
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"x" * (64 << 20), 9))
    put("text_bomb.png", with_png_chunk(png, ztxt), "error", "decompression_bomb")
    put("zero_width.png", png_header_only(0, 16), "error", "zero_size")
    put("big_text.png", with_png_chunk(png, png_chunk(b"tEXt", b"Comment\x00" + b"y" * (4 << 20))))
    put("trailing_garbage.jpg", jpg + os.urandom(3000))
    put("png_named.jpg", png)
    put("cmyk.jpg", encode(Image.fromarray(base).convert("CMYK"), "JPEG", quality=95))
    frames = [Image.fromarray(photo(s)) for s in range(3)]
    put("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50))
    put("animated.webp", encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50))
    for orientation in range(1, 9):
        put(f"orient{orientation}.jpg", exif_jpeg(base, orientation))
    references = {}
    for name, (data, mode, pixels) in mode_cases(rng).items():
        put(name, data)
        references[name] = (mode, pixels)

    # names and file types
    put("it's \"quoted\"; DROP TABLE images; --.jpg", jpg)
    non_utf8 = os.fsencode(root) + b"/caf\xe9_\xff.jpg"
    with open(non_utf8, "wb") as f:
        f.write(encode(Image.fromarray(photo(3)), "JPEG"))
    expected["caf\\xe9_\\xff.jpg"] = ("ok", None)
    (root / "folder.jpg").mkdir()
    expected["folder.jpg"] = ("error", "not_regular_file")
    os.mkfifo(root / "pipe.jpg")
    expected["pipe.jpg"] = ("error", "not_regular_file")
    os.symlink("loop.jpg", root / "loop.jpg")
    expected["loop.jpg"] = ("error", "unreadable")
    os.symlink("does-not-exist.png", root / "dangling.png")
    expected["dangling.png"] = ("error", "unreadable")
    put("no_extension", png)  # found by sniffing the first bytes
    (root / "notes.txt").write_text("not an image and not named like one: no row")

    # a tar whose members try to escape, next to an ordinary one
    with tarfile.open(root / "evil.tar", "w") as tar:
        for name, data in [("inner.jpg", jpg), ("../escape_curate_test.jpg", jpg),
                           ("/abs_escape_curate_test.jpg", jpg), ("sub/../../up_curate_test.png", png)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        tar.addfile(tarfile.TarInfo("caption.txt"), io.BytesIO(b""))
    expected["evil.tar::inner.jpg"] = ("ok", None)
    for name in ("../escape_curate_test.jpg", "/abs_escape_curate_test.jpg", "sub/../../up_curate_test.png"):
        expected[f"evil.tar::{name}"] = ("error", "unsafe_path")
    expected["evil.tar::link.jpg"] = ("error", "not_regular_file")
    return expected, references
