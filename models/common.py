"""What every model adapter shares: the adapter interface, finding weights, naming them.

An adapter is a model family's plain code, and no stage: settings in `__init__` (it
pickles to Ray workers), weights in `load(device, dtype)`, `preprocess(image)` on CPU
workers (uint8 pixels of the size it says it needs), and `forward(batch)`, which runs the
model on a batch and gives its output columns. The stages in `curate.pipelines` wrap
adapters; the adapters know nothing of stages, tables or runs.

Weights are named by a local directory or a hub id (`org/name`, or `org/name@REVISION` for a
branch, tag or commit). A hub id is pinned, when an adapter is made, to the commit its
revision points at (`org/name@<40 hex digits>`): that is the name its rows carry, so weights
updated on the hub are new work, never counted as done, and every worker loads the same
commit. Its files come into huggingface_hub's cache (downloaded there when a network
exists), only those its family needs (`Family.files`: one weights file, safetensors where
the repo has them, not every format the repo carries); the adapter then reads the local
directory, so published weights and the tiny zoo go through the same loader.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from curate.models.families import family

HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")  # org/name[@REVISION]
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelError(ValueError):
    """A model that cannot be found or loaded, said so that the user can fix it."""


def model_dir(spec: str, needs: tuple[str, ...] = (), files: tuple = ()) -> Path:
    """The local directory holding `spec`'s files: the directory itself, or the hub snapshot of
    the files its family needs (`files`, see hub_snapshot)."""
    path = Path(spec).expanduser()
    hub = hub_repo(spec)
    if path.is_dir():
        folder = path
    elif hub:
        folder = _hub_error(spec, hub_snapshot, hub[0], hub_commit(*hub), files)
    else:
        raise ModelError(f"{spec!r} is neither a directory nor a hub id (org/name)")
    missing = [name for name in needs if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{spec} ({folder}) lacks {', '.join(missing)}; is it the right kind of model?")
    check_files(str(folder))
    return folder


def hub_repo(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when spec names a hub repo; None for a path that exists."""
    match = HUB_ID.match(spec)
    return None if not match or Path(spec).expanduser().exists() else (match[1], match[2])


def pin(spec: str) -> str:
    """A hub id pinned to the commit its revision (default: main) points at now,
    `org/name@COMMIT`; a directory (or anything else) as given."""
    hub = hub_repo(spec)
    return spec if hub is None else f"{hub[0]}@{hub_commit(*hub)}"


def hub_commit(repo: str, revision: str | None = None) -> str:
    """The commit a revision of a hub repo points at: asked of the hub, or offline
    (HF_HUB_OFFLINE=1) read from the local cache's refs, as huggingface_hub itself does."""
    if revision and COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    spec = repo + (f"@{revision}" if revision else "")
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "refs" / (
        revision or "main")
    if constants.HF_HUB_OFFLINE:
        if not ref.is_file():
            raise ModelError(f"cannot get {spec!r} from the hub (offline: HF_HUB_OFFLINE is set and it is not in the "
                             "cache); give a local directory with the model's files instead")
        return ref.read_text().strip()
    commit = _hub_error(spec, lambda: HfApi().model_info(repo, revision=revision).sha)
    # Remember it in the cache's refs, as huggingface_hub's own downloads do, so an offline run
    # knows which commit this revision was.
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(f".{ref.name}.{os.getpid()}")
    temporary.write_text(commit)
    temporary.replace(ref)
    return commit


@functools.lru_cache(maxsize=32)  # a pinned commit's files never change
def hub_snapshot(repo: str, commit: str, files: tuple) -> Path:
    """The cache folder of a hub commit, holding the files its family needs. `files` lists file
    names; a tuple among them is alternatives, of which the first the repo has is fetched
    (`("model.safetensors", "pytorch_model.bin")`: never both); a name the repo lacks is skipped
    (the adapter says what it needed). Offline, the cached files stand for the repo's."""
    from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    if constants.HF_HUB_OFFLINE:
        def present(name):
            return isinstance(try_to_load_from_cache(repo, name, revision=commit), str)
    else:
        listing = {s.rfilename for s in HfApi().model_info(repo, revision=commit).siblings}

        def present(name):
            return name in listing
    for entry in files:
        name = next((n for n in (entry if isinstance(entry, tuple) else (entry,)) if present(n)), None)
        if name is not None:
            hf_hub_download(repo, name, revision=commit)
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / commit


def _hub_error(spec: str, call, *args):
    """call(*args), with a failure to reach the hub or find the repo said as a ModelError."""
    try:
        return call(*args)
    except ModelError:
        raise
    except Exception as e:  # offline without a cached copy, unknown repo, no network
        raise ModelError(f"cannot get {spec!r} from the hub ({type(e).__name__}: {e}); "
                         "give a local directory with the model's files instead") from None


@functools.lru_cache(maxsize=64)
def check_files(folder: str) -> None:
    """Fail now, in a line naming the file, on what would otherwise fail later with a raw
    traceback: a JSON file that does not parse (a broken config), a safetensors file shorter
    than its own header says (a download cut short)."""
    for file in sorted(Path(folder).rglob("*")):
        if file.name.startswith(".") or not file.is_file():
            continue
        if file.suffix == ".json":
            try:
                json.loads(file.read_bytes())
            except ValueError as e:
                raise ModelError(f"{file} is not valid JSON ({e}): fix it, or fetch the model again") from None
        elif file.suffix == ".safetensors":
            problem = safetensors_problem(file)
            if problem:
                raise ModelError(f"{file} {problem}: fetch the model again") from None


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's layout (None: nothing): an 8-byte header
    length, a JSON header, then the tensors' bytes, which must all be there."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            return f"is cut short ({size} bytes, not even its header)"
        try:
            header = json.loads(f.read(length))
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "has a damaged header (not a safetensors file?)"
    if 8 + length + end > size:
        return f"is cut short ({size} bytes of the {8 + length + end} its header lists)"
    return None


@functools.lru_cache(maxsize=64)  # model_key() is asked for every batch
def model_name(spec: str) -> str:
    """How a model is named in the `model` column: a hub id as is; a directory (or a file) by its
    name and a fingerprint of its files, so two different folders that share a name (two
    fine-tunes saved as `vae/`, say) never count as each other's work on resume."""
    path = Path(spec).expanduser()
    return f"{path.resolve().name}#{fingerprint(str(path.resolve()))}" if path.exists() else spec


FINGERPRINT_BYTES = 64 << 10


def fingerprint(folder: str) -> str:
    """8 hex digits from every file's name, size, head and tail (or one file's): cheap even for
    GBs of weights, and different for different weights (fine-tunes differ everywhere)."""
    digest, folder = hashlib.sha256(), Path(folder)
    files = [folder] if folder.is_file() else folder.rglob("*")
    folder = folder.parent if folder.is_file() else folder
    for file in sorted(p for p in files if p.is_file() and not p.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read())  # the tail (or the rest of a small file)
    return digest.hexdigest()[:8]


def normalised_nchw(pixels: np.ndarray, mean, std, device, dtype):
    """A batch of uint8 NHWC pixels (as CPU workers prepare them: 4x fewer bytes than
    floats) -> (x / 255 - mean) / std as contiguous NCHW on the model's device, in its dtype."""
    import torch

    pixels = np.require(pixels, requirements="W")  # a single image straight from PIL is read-only
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).contiguous().float()
    scale = torch.as_tensor(1 / (255 * np.asarray(std, np.float64)), dtype=torch.float32, device=x.device)
    shift = torch.as_tensor(np.asarray(mean, np.float64) / np.asarray(std, np.float64), dtype=torch.float32,
                            device=x.device)
    return x.mul_(scale[:, None, None]).sub_(shift[:, None, None]).to(dtype)


def embedding_columns(features: np.ndarray) -> dict:
    """An embedder's output columns: float16 rows (a 2-D array, stored without a Python object
    per number), and a `bad_output` error for a row that is not finite."""
    bad = ~np.isfinite(features).all(axis=1)
    embedding = features.astype(np.float16)
    return {"embedding": [None if b else f for f, b in zip(embedding, bad)] if bad.any() else embedding,
            "_error": ["bad_output" if b else None for b in bad],
            "_message": ["the embedding is not finite" if b else None for b in bad]}


class Adapter:
    """A model family's adapter (see the module's docstring). `family` names its declaration
    in curate.models.families; `decode_min_side` / `decode_long_side` say what preprocess
    needs from the decoder (shorter / longer side at least), None when it takes no image."""

    family: str = ""
    decode_min_side: int | None = None
    decode_long_side: int | None = None

    def __init__(self, weights: str | None = None, **settings):
        declared = family(self.family)
        if not (weights or declared.weights):
            raise ModelError(f"{self.family}: name the weights (a directory or a hub id); there is no default")
        self.weights = pin(weights or declared.weights)  # a hub id: the commit it points at now
        try:
            self.settings = declared.resolve(**settings)
        except ValueError as e:
            raise ModelError(str(e)) from None

    def model_dir(self, needs: tuple[str, ...] = ()) -> Path:
        """The local directory of this adapter's weights (for a hub id, the files its family needs)."""
        return model_dir(self.weights, needs, family(self.family).files)

    def model_value(self) -> str:
        """The `model` column of the rows this adapter's output makes."""
        return family(self.family).model_value(model_name(self.weights), self.settings)

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        raise NotImplementedError

    def preprocess(self, image) -> dict:
        raise NotImplementedError

    def forward(self, batch: dict) -> dict:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        """Settings only: what load() made (named with a leading `_`) stays in its process."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def device_or_error(device: str | None, dtype: str | None = None, gpu_dtype: str | None = None):
    """curate.devices.choose, with its refusal said as a ModelError."""
    from curate.devices import DeviceError, choose

    try:
        return choose(device, dtype, gpu_dtype)
    except DeviceError as e:
        raise ModelError(str(e)) from None
