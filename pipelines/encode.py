"""`curate encode`: VAE latents of every image, cropped to its aspect bucket.

Per image (CPU workers): choose the bucket from the stored size, decode once at the
size the bucket needs (JPEG draft), Lanczos down to cover the bucket, crop (seeded
random or centre), keep uint8 pixels. Per batch (one bucket, one VAE): encode, draw the
latent from the VAE's distribution with per-image seeded noise, store float16 bytes.

Everything random (crop, noise, which VAE of a mixed list) comes from the seed and the
image_id alone, so a resumed run or the other engine writes the same rows. The VAE encodes
a batch of one bucket in one call, on every core on a CPU. Its rounding depends on the batch
size and, on a CPU, on the thread count (not on the other images of the batch), so a batch is
always `batch_size` images: a short one (the last of a bucket) is padded with black crops
whose outputs are dropped. With the same seed, batch size and device (on a CPU: the same
number of cores) a resumed run equals an uninterrupted one bit for bit.

With `flip` (`--flip`), each image also gets the latent of its mirrored crop: the crop of the
horizontally flipped resized image at the mirrored offset, so its crop conditioning
(`flip_crop_left`) says where that crop is in the flipped image. The trainer's flip_p picks
one of the two per sample and epoch.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image

from curate.buckets import BucketSet, choose_bucket, plan_crop, too_small_reason
from curate.images import ImageError, decode
from curate.models.common import model_name
from curate.models.families import model_value
from curate.models.vae import Vae
from curate.pipelines.stage import Resources, Stage


def image_seed(seed: int, image_id: str, purpose: str) -> int:
    """A 63-bit seed for one random choice about one image."""
    digest = hashlib.sha256(f"{seed}:{image_id}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EncodeStage(Stage):
    table = "latents"
    columns = ("image_id", "bytes", "width", "height")
    decode_min_side = None  # prepare decodes: each image at the size its own bucket needs
    batch_size = 8
    held_batches = 16  # crops wait longer to fill batches of their bucket: a short batch is padded

    def __init__(self, vaes: list[Vae], bucket_set: BucketSet, crop: str = "random", seed: int = 0,
                 keep_distribution: bool = False, allow_upscale: bool = False, device: str | None = None,
                 batch_size: int | None = None, flip: bool = False):
        self.vaes, self.bucket_set, self.crop, self.seed = list(vaes), bucket_set, crop, seed
        self.keep_distribution, self.allow_upscale, self.device = keep_distribution, allow_upscale, device
        self.batch_size = batch_size or self.batch_size
        self.flip = flip
        # The VAE is nearly all of the work: on a CPU it gets every core (decoding takes a tenth)
        self.resources = Resources(cpus=os.cpu_count() or 1, gpus=0 if device == "cpu" else 1)

    def model_key(self) -> str:
        return model_value("vae", "+".join(model_name(v.source) for v in self.vaes), {
            "dtype": "+".join(v.dtype or "auto" for v in self.vaes), "set": self.bucket_set.name, "crop": self.crop,
            "seed": self.seed, "upscale": self.allow_upscale, "distribution": self.keep_distribution,
            **({"flip": True} if self.flip else {})})

    # ---- CPU side ----------------------------------------------------------------
    def prepare(self, row):
        width, height, image_id = row["width"], row["height"], row["image_id"]
        bucket = choose_bucket(width, height, self.bucket_set.buckets, self.allow_upscale)
        if bucket is None:
            raise ImageError("too_small", too_small_reason(width, height, self.bucket_set))
        crop = plan_crop(width, height, bucket, self.crop, image_seed(self.seed, image_id, "crop"))
        decoded = decode(row["bytes"], min_side=min(crop.resized_width, crop.resized_height))
        if (decoded.width, decoded.height) != (width, height):
            raise ValueError(f"decodes as {decoded.width}x{decoded.height} but ingest saw {width}x{height}")
        return {"pixels": crop_pixels(decoded.image, crop), "bucket": bucket,
                "vae_index": image_seed(self.seed, image_id, "vae") % len(self.vaes),
                "original_height": height, "original_width": width,
                "resized_height": crop.resized_height, "resized_width": crop.resized_width,
                "crop_top": crop.crop_top, "crop_left": crop.crop_left,
                "target_height": bucket[1], "target_width": bucket[0]}

    def batch_key(self, prepared):
        return prepared["bucket"], prepared["vae_index"]

    # ---- model side --------------------------------------------------------------
    def setup(self) -> None:
        for vae in self.vaes:
            vae.load(self.device)
        channels = {vae.config.latent_channels for vae in self.vaes}
        if len(channels) > 1:
            raise ValueError(f"mixed VAEs must share latent channels, got {sorted(channels)}")

    def process(self, batch):
        vae = self.vaes[batch["vae_index"][0]]
        latent16, mean16, logvar16 = self.sample(vae, batch["pixels"], batch["image_id"], "noise")
        if self.flip:  # the mirrored crops: width is axis 2 of the NHWC pixels
            flip16 = self.sample(vae, np.ascontiguousarray(np.asarray(batch["pixels"])[:, :, ::-1]),
                                 batch["image_id"], "flip-noise")
        out = {"latent": [], "shape": [], "mean": [], "logvar": [], "_error": [], "_message": [],
               "flip_latent": [], "flip_mean": [], "flip_logvar": [], "flip_crop_left": []}
        for k in range(len(latent16)):
            finite = bool(np.isfinite(latent16[k]).all()) and (not self.flip or bool(np.isfinite(flip16[0][k]).all()))
            out["_error"].append(None if finite else "bad_output")
            out["_message"].append(None if finite else "the VAE gave NaN or Inf (fp16 overflow? "
                                                       "use @bf16 or the fp16-fix VAE)")
            out["latent"].append(latent16[k].tobytes() if finite else None)  # never store a broken latent
            out["shape"].append(list(latent16[k].shape))
            keep = self.keep_distribution and finite
            out["mean"].append(mean16[k].tobytes() if keep else None)
            out["logvar"].append(logvar16[k].tobytes() if keep else None)
            flipped = self.flip and finite
            out["flip_latent"].append(flip16[0][k].tobytes() if flipped else None)
            out["flip_mean"].append(flip16[1][k].tobytes() if flipped and keep else None)
            out["flip_logvar"].append(flip16[2][k].tobytes() if flipped and keep else None)
            out["flip_crop_left"].append(int(batch["resized_width"][k]) - int(batch["crop_left"][k])
                                         - int(batch["target_width"][k]) if flipped else None)
        names = ("original_height", "original_width", "resized_height", "resized_width",
                 "crop_top", "crop_left", "target_height", "target_width")
        out.update({name: [int(v) for v in batch[name]] for name in names})
        n = len(latent16)
        config = vae.config
        out["scaling_factor"] = [float(config.scaling_factor)] * n
        out["shift_factor"] = [config.get("shift_factor")] * n
        out["vae"] = [f"{model_name(vae.source)}@{vae.used_dtype}"] * n
        return out

    def sample(self, vae, pixels, image_ids, purpose: str):
        """float16 numpy (latent sample, mean, logvar) of a batch of crops; each image's noise from
        its own seed. The moments leave the device only when they are kept; a short batch is padded."""
        import torch

        n = len(pixels)
        if n < self.batch_size:  # always full batches: the VAE's rounding depends on the batch size
            pixels = np.concatenate([pixels, np.zeros((self.batch_size - n, *pixels.shape[1:]), np.uint8)])
        moments = vae.forward({"pixels": pixels})
        mean, logvar = moments["mean"][:n], moments["logvar"][:n]
        with torch.inference_mode():
            noise = torch.stack([seeded_noise(mean.shape[1:], image_seed(self.seed, i, purpose)) for i in image_ids])
            latent = mean.float() + torch.exp(0.5 * logvar.float()) * noise.to(mean.device)
        if not self.keep_distribution:
            return latent.half().cpu().numpy(), None, None
        return latent.half().cpu().numpy(), mean.half().cpu().numpy(), logvar.half().cpu().numpy()


def seeded_noise(shape, seed: int):
    """Standard normal noise for one image's latent sample, on CPU, from its own seed."""
    import torch

    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def crop_pixels(image: Image.Image, crop) -> np.ndarray:
    """Lanczos to the resized size, then the bucket-sized crop: uint8 height x width x 3."""
    if image.size != (crop.resized_width, crop.resized_height):
        image = image.resize((crop.resized_width, crop.resized_height), Image.Resampling.LANCZOS)
    box = (crop.crop_left, crop.crop_top, crop.crop_left + crop.target_width, crop.crop_top + crop.target_height)
    return np.asarray(image.crop(box), dtype=np.uint8)
