"""Aspect-ratio buckets: the sets, the choice of bucket, and the resize-and-crop geometry.

A bucket is a (width, height) the model trains at. An image goes to the bucket of nearest
aspect ratio among those it covers after scaling down (never up, unless allowed): it is
scaled by the smallest factor that makes it cover the bucket in both dimensions, then
cropped to it. Ratios are compared exactly (integer fractions), by how much of the image
the crop would cut away, so a tie is a real tie and is broken by a documented rule.

Sets, as `--set` takes them:
- `sdxl`: the SDXL paper's list (appendix I), multiples of 64 near 1024x1024.
- `sd15`: `rule:step=64,min_area=200000,max_area=262144,min_ratio=0.25,max_ratio=4`.
- `bigasp-v1`, `bigasp-v2`: bigASP's own lists (BIGASP_RATIOS): every pair of multiples of 64
  from 512 to 2048 whose area lies in [946176, 1048576] and width/height in [0.5, 3] (v1's
  code: 26 buckets; its post says it used the SDXL paper's) or [0.333, 3] (v2: 31 buckets).
- `rule:step=S,min_area=A,max_area=B,min_ratio=R,max_ratio=Q`: for every side that is a
  multiple of S, the longest multiple of S with width*height <= max_area, and its mirror; kept if
  its area >= min_area and width/height lies in [min_ratio, max_ratio] (kohya's sd-scripts'
  make_bucket_resolutions' way: one bucket per side, where bigASP keeps every pair in the band).
- a path to a text file: one `WIDTHxHEIGHT` per line, `#` comments.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

# SDXL paper, appendix I, as (height, width): the paper's own column order.
SDXL_HEIGHT_WIDTH = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
]
RULE_DEFAULTS = {"step": 64, "min_area": 838_861, "max_area": 1024 * 1024, "min_ratio": 0.25, "max_ratio": 4.0}
SD15_RULE = "rule:step=64,min_area=200000,max_area=262144,min_ratio=0.25,max_ratio=4"
# fpgaminer/bigasp-training: encode-vaes.py at tag bigasp-v1, encode-vaes-buckets.py at bigasp-v2
# (AR_BUCKETS): sides range(512, 2049, 64), 946176 <= w*h <= 1024*1024, min_ratio <= w/h <= 3.0.
BIGASP_RATIOS = {"bigasp-v1": 0.5, "bigasp-v2": 0.333}
SET_HELP = ("sdxl, sd15, bigasp-v1, bigasp-v2, rule:step=64,min_area=..,max_area=..,min_ratio=..,max_ratio=.. "
            "or a file of WIDTHxHEIGHT lines")


class BucketSetError(ValueError):
    """A --set that names no bucket set, or a malformed one."""


@dataclass(frozen=True)
class BucketSet:
    name: str  # goes into the `model` column: the same name means the same buckets
    buckets: tuple[tuple[int, int], ...]  # (width, height)


def parse_bucket_set(spec: str) -> BucketSet:
    if spec == "sdxl":
        return BucketSet("sdxl", tuple((w, h) for h, w in SDXL_HEIGHT_WIDTH))
    if spec == "sd15":
        return BucketSet("sd15", rule_buckets(**_rule_args(SD15_RULE)))
    if spec in BIGASP_RATIOS:
        sides = range(512, 2049, 64)
        pairs = [(w, h) for w in sides for h in sides
                 if 946176 <= w * h <= 1024 * 1024 and BIGASP_RATIOS[spec] <= w / h <= 3.0]
        return BucketSet(spec, tuple(sorted(pairs, key=lambda b: b[0] / b[1])))
    if spec.startswith("rule:") or spec == "rule":
        args = _rule_args(spec)
        name = "rule:" + ",".join(f"{k}={_number(args[k])}" for k in RULE_DEFAULTS)
        return BucketSet(name, rule_buckets(**args))
    path = Path(spec)
    if path.is_file():
        buckets = _read_bucket_file(path)
        digest = hashlib.sha256(repr(buckets).encode()).hexdigest()[:12]
        return BucketSet(f"file:{path.name}:{digest}", buckets)
    raise BucketSetError(f"unknown bucket set {spec!r}: give {SET_HELP}")


def _rule_args(spec: str) -> dict:
    args = dict(RULE_DEFAULTS)
    body = spec.partition(":")[2]
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in RULE_DEFAULTS:
            raise BucketSetError(f"unknown rule key {key!r} in {spec!r}: known keys are {', '.join(RULE_DEFAULTS)}")
        try:
            args[key] = float(value)
        except ValueError:
            raise BucketSetError(f"rule key {key} wants a number, got {value!r}") from None
    return args


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def rule_buckets(step: float, min_area: float, max_area: float, min_ratio: float, max_ratio: float) -> tuple:
    step = int(step)
    if step < 8 or step % 8:
        raise BucketSetError(f"rule step must be a multiple of 8 (the VAE's factor), got {step}")
    buckets = set()
    for side in range(step, int(math.sqrt(max_area * max_ratio)) + 1, step):
        other = int(max_area // side) // step * step  # the longest side that keeps the area
        buckets |= {(side, other), (other, side)}
    buckets = [(w, h) for w, h in buckets if w * h >= min_area and min_ratio <= w / h <= max_ratio]
    if not buckets:
        raise BucketSetError("the rule gives no buckets: widen the area or ratio range")
    buckets.sort(key=lambda b: b[0] / b[1])
    return tuple(buckets)


def _read_bucket_file(path: Path) -> tuple:
    buckets = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        try:
            width, height = (int(v) for v in line.lower().split("x"))
        except ValueError:
            raise BucketSetError(f"{path}:{number}: expected WIDTHxHEIGHT like 1024x1024, got {line!r}") from None
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise BucketSetError(f"{path}:{number}: {width}x{height} must be positive multiples of 8")
        buckets.append((width, height))
    if not buckets:
        raise BucketSetError(f"{path} lists no buckets")
    return tuple(dict.fromkeys(buckets))


# ---- choosing ------------------------------------------------------------------------
def choose_bucket(width: int, height: int, buckets, allow_upscale: bool = False) -> tuple[int, int] | None:
    """The bucket for a width x height image, or None when it covers none of them.

    Distance is max(r/rb, rb/r) for image ratio r and bucket ratio rb: the factor by which
    the crop shortens one side. Ties go to the larger bucket (more pixels kept), then to
    the squarer one, then to the earlier in the list.
    """
    ratio = Fraction(width, height)
    best, best_rank = None, None
    for order, (bw, bh) in enumerate(buckets):
        if not allow_upscale and (bw > width or bh > height):
            continue
        bucket_ratio = Fraction(bw, bh)
        distance = max(ratio / bucket_ratio, bucket_ratio / ratio)
        squareness = max(bucket_ratio, 1 / bucket_ratio)
        rank = (distance, -bw * bh, squareness, order)
        if best_rank is None or rank < best_rank:
            best, best_rank = (bw, bh), rank
    return best


def too_small_reason(width: int, height: int, bucket_set: BucketSet) -> str:
    smallest_w = min(w for w, _ in bucket_set.buckets)
    smallest_h = min(h for _, h in bucket_set.buckets)
    return (f"{width}x{height} covers no bucket of {bucket_set.name} without upscaling "
            f"(the narrowest is {smallest_w} wide, the shortest {smallest_h} high); "
            "use a smaller bucket set or --allow-upscale")


# ---- geometry ------------------------------------------------------------------------
@dataclass(frozen=True)
class Crop:
    """Resize the whole image to resized_*, then cut target_* at (crop_left, crop_top)."""

    resized_width: int
    resized_height: int
    crop_left: int
    crop_top: int
    target_width: int
    target_height: int

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The crop as (left, top, right, bottom) in the original image's pixels."""
        sx, sy = width / self.resized_width, height / self.resized_height
        return (self.crop_left * sx, self.crop_top * sy,
                (self.crop_left + self.target_width) * sx, (self.crop_top + self.target_height) * sy)


def resized_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest scaled size of the image that covers the bucket in both dimensions."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return max(bw, round(width * scale)), max(bh, round(height * scale))


def plan_crop(width: int, height: int, bucket: tuple[int, int], mode: str, seed: int) -> Crop:
    """Where to crop: `center`, or `random` from a per-image seed (resume and engines agree)."""
    import numpy as np

    rw, rh = resized_size(width, height, bucket)
    bw, bh = bucket
    if mode == "center":
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        rng = np.random.default_rng(seed)
        left, top = int(rng.integers(0, rw - bw + 1)), int(rng.integers(0, rh - bh + 1))
    return Crop(rw, rh, left, top, bw, bh)
