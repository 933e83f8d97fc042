"""The one safe image decoder every stage uses.

Files are read only if they are regular files under a size cap (a FIFO or a directory
named x.jpg never blocks). Decoding turns every failure into an `ImageError` with a code
from `curate.schema.ERROR_CODES`: decompression bombs are errors, not warnings;
truncated data is an error, not a grey bottom half. Pixels come back as 8-bit RGB with
EXIF orientation applied, transparency composited on white, and, for JPEG, draft
decoding to the smallest scale that still satisfies the consumer's size request.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import signal
import stat
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_PIXELS = 178_956_970  # Pillow's own bomb threshold (2x its warning level)
# For tests of crash recovery: with CURATE_TEST_CRASH set (segv, abort or kill), a file whose
# bytes end with this marker crashes the decoding process for real, as a faulty C decoder or
# the OOM killer would. Unset (always, outside tests), nothing is looked at.
CRASH_MARKER = b"curate-test-crash"
# For tests that kill a run mid-work: with CURATE_TEST_DECODE_DELAY=S, every read of an image
# waits S seconds first, so the work lasts long enough to be interrupted on a fast machine.

# EXIF orientation tag value -> the transpose that shows the image upright.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

DRAFT_MODES = ("RGB", "L", "CMYK", "YCbCr")  # JPEG modes the decoder can scale while decoding
# The pixel modes to_rgb converts itself (any other goes through Pillow's convert, which may refuse)
CONVERTED_MODES = {"P", "PA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F", "RGBA", "LA", "RGBa", "La", "RGB", "L", "1",
                   "CMYK", "YCbCr", "LAB", "HSV", "RGB;16"}

# Never decode partially: a truncated file is an error.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own pixel cap (checked before any pixel is decoded) decides what is a bomb, and
# Pillow raises DecompressionBombError past the same count. Its warnings (bomb
# "suspicion", corrupt EXIF, ...) say nothing we act on, and would flood the terminal
# of a million-image ingest. Filters are set once here: catch_warnings() per call is
# not thread-safe and decoding runs on threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", module=r"PIL\.")
# `resize` hands torch Pillow's read-only pixels, which it only reads.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class ImageError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Header:
    """What an image file says about itself, read without decoding its pixels."""

    width: int  # full size after EXIF orientation
    height: int
    format: str
    mode: str  # the file's own pixel mode
    animated: bool
    orientation: int  # the EXIF orientation tag (1: stored upright)


@dataclass
class Decoded:
    image: Image.Image  # RGB, oriented, possibly draft-reduced
    width: int  # full size after EXIF orientation
    height: int
    format: str
    mode: str  # the file's own pixel mode
    animated: bool
    rgb: np.ndarray | None = None  # `image` as uint8 HWC when shrink made it as an array

    def pixels(self) -> np.ndarray:
        """The image as uint8 HWC RGB. Copying pixels out of Pillow holds the GIL (~0.5 ms at
        960x720, next to ~50 ms of decoding that mostly does not), which the decode threads
        then queue for; after shrink each stage reads the array it made instead."""
        return self.rgb if self.rgb is not None else np.asarray(self.image)


def decode_threads() -> int:
    """Threads to decode on locally: one per CPU this process may use. A GPU machine needs
    them all to feed its models (a 12 MP photo is about 50 ms of CPU to decode and prepare
    for them), and decoding and `resize` release the GIL."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(cpus))


@contextlib.contextmanager
def quick_gil_handoffs(seconds: float = 0.0005):
    """Decode threads give the GIL back at every decoder, resize and numpy call; taking it
    again waits until the thread holding it is asked to switch, by default after 5 ms, while
    the model loop's Python holds it. Decoding and preparing a 12 MP photo next to a thread
    that runs Python without pause: about 3x slower than alone at 5 ms, 1.4x at 0.5 ms
    (bench/score.py --workers)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a file's bytes, refusing anything that is not a regular file of sane size."""
    try:
        st = os.stat(path)  # follows symlinks; loops and dangling links raise
    except OSError as e:
        raise ImageError("unreadable", f"cannot stat: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not_regular_file", "not a regular file")
    if st.st_size > max_bytes:
        raise ImageError("too_large", f"{st.st_size} bytes is over the cap of {max_bytes}")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat, open must not hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageError("not_regular_file", "not a regular file")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError("unreadable", f"cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise ImageError("too_large", f"over the cap of {max_bytes} bytes")
    return data


def decode(data: bytes | memoryview, min_side: int | None = None, max_pixels: int = MAX_PIXELS,
           long_side: int | None = None) -> Decoded:
    """Decode image bytes (or any buffer of them, e.g. Arrow's: read in place, not copied) to RGB.

    min_side, long_side: the consumer needs the shorter / longer side to be at least this
    many pixels; JPEGs are then draft-decoded at the largest reduction that keeps both
    (neither given: full size).
    """
    return _guarded(data, lambda: _decode(data, min_side, long_side, max_pixels))


def verify(data: bytes | memoryview, max_pixels: int = MAX_PIXELS) -> Header:
    """Check that the bytes are a whole, well-formed image, making no pixels to throw away.

    What ingest records for every file. JPEGs are decoded at 1/8 scale: the decoder still
    reads every entropy-coded byte, so truncation and broken tables are caught, while the
    pixels it makes are 1/64 of the image. PNGs are checked against the CRC of every chunk
    (what a truncated or damaged file fails), without inflating the pixels. Other formats
    (GIF, WebP, TIFF, ...) are decoded once at full size. Nothing is converted to RGB, except
    a pixel mode that the decoder might not convert (`unsupported_mode`)."""
    return _guarded(data, lambda: _verify(data, max_pixels))


def probe(data: bytes | memoryview, max_pixels: int = MAX_PIXELS) -> Header:
    """An image's header (size after EXIF orientation, format, mode, animation), decoding no
    pixels: for the bytes of an image already verified (an exact duplicate)."""
    return _guarded(data, lambda: _open(data, max_pixels)[1])


def _guarded(data: bytes | memoryview, read):
    """read(), with every way a decoder fails on bad bytes turned into an ImageError."""
    if not len(data):
        raise ImageError("empty", "zero bytes")
    if os.environ.get("CURATE_TEST_CRASH"):
        crash_if_marked(data)
    if os.environ.get("CURATE_TEST_DECODE_DELAY"):
        time.sleep(float(os.environ["CURATE_TEST_DECODE_DELAY"]))
    try:
        return read()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        if declares_zero_size(bytes(memoryview(data)[:32])):  # Pillow refuses these at open; say why
            raise ImageError("zero_size", "the header declares a width or height of zero") from None
        raise ImageError("unidentified", "not an image format Pillow can read") from None
    except ValueError as e:
        if "too large" in str(e) or "Too much memory" in str(e):  # a zlib bomb in a PNG text chunk
            raise ImageError("decompression_bomb", f"metadata: {e}") from None
        raise ImageError("truncated", f"ValueError: {e}") from None
    except (OSError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error, ZeroDivisionError,
            TypeError, AttributeError, OverflowError) as e:
        # Every plugin has its own way of failing on damaged data; all of them mean the
        # bytes are not a complete, well-formed image.
        raise ImageError("truncated", f"{type(e).__name__}: {e}") from None
    except MemoryError:
        raise ImageError("decompression_bomb", "ran out of memory decoding") from None


def crash_if_marked(data) -> None:
    """The crash CURATE_TEST_CRASH asks for, if the bytes end with CRASH_MARKER."""
    if bytes(memoryview(data)[-len(CRASH_MARKER):]) != CRASH_MARKER:
        return
    how = os.environ["CURATE_TEST_CRASH"]
    if how == "segv":
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV, in C, where Python cannot catch it
    elif how == "abort":
        os.abort()
    elif how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def declares_zero_size(data: bytes) -> bool:
    """Whether a PNG, GIF or BMP header declares a zero width or height."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
    elif data.startswith(b"BM") and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
    else:
        return False
    return w == 0 or h == 0


class InPlace(io.RawIOBase):
    """A read-only file over a buffer that reads it in place (io.BytesIO would copy it whole)."""

    def __init__(self, data):
        self.view, self.pos = memoryview(data).cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        n = max(0, min(len(out), len(self.view) - self.pos))
        out[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, offset + (0, self.pos, len(self.view))[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos


def _open(data: bytes | memoryview, max_pixels: int) -> tuple[Image.Image, Header]:
    """Open the image and read its header; no pixel is decoded."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else io.BufferedReader(InPlace(data), 1 << 16))
    fmt = img.format or "unknown"
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("zero_size", f"declared size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("decompression_bomb", f"{w}x{h} is over the cap of {max_pixels} pixels")
    # is_animated looks for a second frame only; n_frames would walk every frame.
    animated = bool(getattr(img, "is_animated", False))
    if fmt == "PNG" and "exif" not in img.info and not _png_metadata_after_pixels(data):
        # Pillow reads a PNG's EXIF by decoding the whole image, in case an eXIf chunk follows the
        # pixel data; when no metadata chunk does, the chunks before them hold all there is.
        exif = Image.Image.getexif(img)
    else:
        exif = img.getexif()
    orientation = exif.get(0x0112, 1)
    full_w, full_h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return img, Header(full_w, full_h, fmt, img.mode, animated, orientation)


def _png_metadata_after_pixels(data: bytes | memoryview) -> bool:
    """Whether a PNG has a metadata chunk (eXIf, or text that may hold EXIF or XMP) after its
    pixel data: found by walking the chunk headers, not by inflating anything."""
    view, pos, pixels_seen = memoryview(data), 8, False
    while pos + 8 <= len(view):
        kind = bytes(view[pos + 4:pos + 8])
        if kind == b"IDAT":
            pixels_seen = True
        elif kind == b"IEND":
            return False
        elif pixels_seen and kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
            return True
        pos += 12 + int.from_bytes(view[pos:pos + 4], "big")
    return False


def _load(img: Image.Image, data: bytes | memoryview) -> None:
    # Hand the decoder the whole file in one call: it releases the GIL for each call, and in
    # 64 KB calls (Pillow's default) the decode threads wait on the GIL whenever Python runs
    # elsewhere (the models, their setup): 4x slower on 1.5 MP JPEGs.
    img.decodermaxblock = max(img.decodermaxblock, len(data))
    img.load()  # raises on truncation


def _verify(data: bytes | memoryview, max_pixels: int) -> Header:
    img, header = _open(data, max_pixels)
    if header.format == "JPEG" and img.mode in DRAFT_MODES:
        img.draft(img.mode, (1, 1))  # the smallest scale, 1/8
    if header.format == "PNG" and img.tile:  # (no tile: reading its EXIF decoded it already)
        img.verify()
    else:
        _load(img, data)
    if img.mode not in CONVERTED_MODES:
        to_rgb(img)  # a mode to_rgb knows converts; another might not (unsupported_mode)
    return header


def _decode(data: bytes | memoryview, min_side: int | None, long_side: int | None, max_pixels: int) -> Decoded:
    img, header = _open(data, max_pixels)
    scale = needed_scale(*img.size, min_side, long_side)
    if scale and header.format == "JPEG" and img.mode in DRAFT_MODES:
        # draft() picks the largest 1/2, 1/4, 1/8 reduction that stays >= the requested
        # size; ask for the box of the scale the request needs, keeping the aspect ratio.
        if scale < 1:
            img.draft(img.mode, (max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    _load(img, data)
    rgb = to_rgb(img)
    if header.orientation in ORIENTATION_TRANSPOSE:
        rgb = rgb.transpose(ORIENTATION_TRANSPOSE[header.orientation])
    return Decoded(rgb, header.width, header.height, header.format, header.mode, header.animated)


def needed_scale(w: int, h: int, min_side: int | None, long_side: int | None) -> float:
    """The smallest scale of a w x h image that meets both side requests (0: none made)."""
    return max((min_side or 0) / min(w, h), (long_side or 0) / max(w, h))


def shrink(decoded: Decoded, min_side: int | None, long_side: int | None) -> Decoded:
    """The decoded image resized down to the smallest size that meets both side requests:
    a box reduction by the largest whole factor, then bicubic for the rest. Much cheaper
    than bicubic all the way (like draft decoding), and the stages resize it again."""
    image = decoded.image
    scale = needed_scale(image.width, image.height, min_side, long_side)
    if not 0 < scale < 1:
        return decoded
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    factors = (image.width // size[0], image.height // size[1])
    if max(factors) > 1:
        image = image.reduce(factors)
    if image.size == size:
        return dataclasses.replace(decoded, image=image)
    pixels = resize(image, size)
    return dataclasses.replace(decoded, image=Image.fromarray(pixels), rgb=pixels)


def resize(image: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """8-bit RGB pixels resized to size (width, height) with Pillow's bicubic filter
    (antialiased when shrinking), as uint8 HWC.

    On x86 with AVX2 torch's uint8 kernel for that filter runs it vectorised: 2-8x faster
    than Pillow at the sizes models take (a 960 square to 448: 2 ms against 10), within a
    level of Pillow's pixels on photos (only rounding differs; more on noise that is shrunk
    one way and enlarged the other), on the calling thread, so decode workers stay parallel.
    Elsewhere (ARM, older x86) torch's generic kernel is slower than Pillow, which runs."""
    if not torch_resizes_fast():
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        return np.asarray(image if image.size == tuple(size) else image.resize(size, Image.Resampling.BICUBIC))
    import torch

    pixels = np.asarray(image)
    if pixels.shape[1::-1] == tuple(size):
        return pixels
    # A channels-last NCHW view of the pixels (no copy); the result comes back channels-last
    # too, so it is HWC pixels again without a copy.
    x = torch.from_numpy(pixels)[None].permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True)
    return out.permute(0, 2, 3, 1)[0].numpy()


@functools.cache
def torch_resizes_fast() -> bool:
    """Whether torch runs its vectorised uint8 resize kernel here (x86 with AVX2 or AVX-512)."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            lo, hi = (0.0, 1.0) if arr.size and arr.min() >= 0 and arr.max() <= 1 else (arr.min(), arr.max())
            arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        else:
            arr = arr / 257.0 if mode.startswith("I;16") or arr.max() > 255 else arr
        out = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    elif mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode == "RGB":
        out = img
    elif mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        out = img.convert("RGB")
    elif mode.startswith("I;16") or mode == "RGB;16":
        out = img.convert("RGB")
    else:
        try:
            out = img.convert("RGB")
        except ValueError as e:
            raise ImageError("unsupported_mode", f"mode {mode}: {e}") from None
    return out
