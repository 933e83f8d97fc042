"""Claims on work: which run does which unit of a stage's work, so that two runs of one stage
on one dataset (two terminals, or two machines sharing the dataset directory over NFS) never
do an image twice, and a run that was killed never blocks the next.

A run is an *owner*: a record `claims/owners/<id>/owner` naming its host, process and
command, touched every HEARTBEAT seconds while the run lives. A claim on a unit of work is a
lease, `claims/<table>/<model>/<unit>.<generation>`, holding the owner's id. It is made the
way that is safe on NFS: the owner writes the lease in its own folder, then link(2)s it to
the lease's name, which fails if the name exists (a lost reply shows in the link count); the
owner's folder is then also the list of its leases. Only O_EXCL-style creates and renames
are relied on, never file locks.

The highest generation of a unit is its lease. A lease whose owner is gone (its record
missing or not touched for STALE seconds, or, on the same machine, its process no longer
running) is taken over by making the next generation, which only one claimant can make.
Ages are measured on the file system's own clock (the mtime of a file just touched), so
clocks that differ between NFS clients do not matter. A finished owner removes its leases
(while its record still says it is alive), then its record.

`Claims` is all the rest of curate sees: `claim(unit)`, `holder(unit)`. Another kind of
storage (an object store with conditional writes) implements the same few calls.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawValue
from pathlib import Path

HEARTBEAT = 10.0  # seconds between an owner's touches of its record
STALE = 120.0  # a record untouched this long (file system clock) is a dead run's


class ClaimError(OSError):
    """The claims folder could not be written (a full disk, a read-only dataset)."""


@functools.cache
def this_machine() -> str:
    """What tells two machines apart, for process checks: the boot id and the PID namespace
    (two containers on one host have different ones). CURATE_MACHINE overrides it."""
    if os.environ.get("CURATE_MACHINE"):
        return os.environ["CURATE_MACHINE"]
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


class Owner:
    """This run, as other runs see it: its record, touched on a thread from start() to stop(),
    in the process that runs the command; the id (and `Claims` made with it) may be handed
    to child processes and Ray tasks, which claim on its behalf."""

    def __init__(self, root: Path):
        self.folder_root = Path(root) / "claims" / "owners"
        self.id = f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._last_beat = RawValue("d", 0.0)  # time.time() of the last touch, shared with forked children
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def folder(self) -> Path:
        return self.folder_root / self.id

    def start(self) -> None:
        record = {"host": socket.gethostname(), "machine": this_machine(), "pid": os.getpid(),
                  "command": command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            self.folder.mkdir(parents=True)
            (self.folder / "owner").write_text(json.dumps(record))
        except OSError as e:
            raise ClaimError(e.errno, f"cannot record this run in {self.folder_root}: {e.strerror}") from None
        self._last_beat.value = time.time()
        self._thread = threading.Thread(target=self._beat, name="curate-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.folder / "owner")
                self._last_beat.value = time.time()
            except OSError:
                pass  # not touched: after STALE seconds others may take its leases over (see fresh())

    def fresh(self) -> bool:
        """Whether no other run can have taken this run's leases over yet: the record was
        touched well within STALE seconds (a process paused for minutes may have lost them).
        Forked children of the owner's process see its touches too."""
        return time.time() - self._last_beat.value < STALE / 2

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        release(self.folder)


def command_line() -> str:
    """This process's command as people typed it (`curate hash DS`, not `.../__main__.py hash DS`)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py" and Path(sys.argv[0]).parent.name == "curate":
        program = "curate"
    return " ".join([program, *sys.argv[1:]])[:300]


def release(folder: Path) -> None:
    """Remove an owner's leases, then its record: the record last, so the leases never look
    dead while they still exist."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    used = set()
    for entry in entries:
        if "~" not in entry.name:  # the record and the clock
            continue
        lease = _lease_path(folder, entry.name)
        try:
            if os.stat(lease).st_ino == entry.inode():  # ours, not a later generation's
                os.unlink(lease)
        except OSError:
            pass
        _unlink(entry.path)
        used.add(lease.parent)
    _unlink(folder / "owner")
    _unlink(folder / "clock")
    # Folders left empty go too (a claim made meanwhile makes its folder again), so a dataset
    # that no run works on holds no trace of claims.
    claims = folder.parent.parent
    for empty in [folder, *used, *{f.parent for f in used}, folder.parent, claims]:
        try:
            empty.rmdir()
        except OSError:
            pass


def _lease_path(owner_folder: Path, name: str) -> Path:
    """The lease an owner's file stands for: its name is `<table>~<model>~<unit>.<generation>`."""
    table, model, lease = name.split("~", 2)
    return owner_folder.parent.parent / table / model / lease


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@dataclass(frozen=True)
class Claims:
    """Claims on the units of one stage's work (its table and `model`), for one owner.
    Plain data: it pickles to child processes and Ray tasks."""

    root: str
    table: str
    model: str
    owner: str  # the claiming run's id

    @property
    def folder(self) -> Path:
        return Path(self.root) / "claims" / self.table / hashlib.sha256(self.model.encode()).hexdigest()[:16]

    def claim(self, unit: str) -> str | None:
        """Claim a unit: None when this run holds it now (new, or already), else who does."""
        for generation in range(10_000):
            name = f"{unit}.{generation}"
            holder = None
            while holder is None:  # None: released between our try and our read; try again
                if self._create(name):
                    return None
                holder = self._read(self.folder / name)
            if holder == self.owner:
                return None
            if owner_alive(Path(self.root), holder, self.owner):
                return describe(Path(self.root), holder)
        raise ClaimError(errno.EMLINK, f"too many generations of the lease on {unit} in {self.folder}")

    def holder(self, unit: str) -> str | None:
        """Who holds a unit now, described for people (None: nobody, or this run)."""
        for generation in range(10_000):
            holder = self._read(self.folder / f"{unit}.{generation}")
            if holder is None:
                return None
            if holder != self.owner and owner_alive(Path(self.root), holder, self.owner):
                return describe(Path(self.root), holder)
        return None

    def _create(self, name: str) -> bool:
        """Make the lease `name` for this owner if it does not exist (link(2): atomic, NFS-safe)."""
        mine = Path(self.root) / "claims" / "owners" / self.owner / f"{self.table}~{self.folder.name}~{name}"
        try:
            mine.write_text(self.owner)
        except OSError as e:
            raise ClaimError(e.errno, f"cannot write a claim in {mine.parent}: {e.strerror}") from None
        for attempt in range(3):
            try:
                os.link(mine, self.folder / name)
            except FileExistsError:
                pass
            except FileNotFoundError:  # no folder yet (or another run's release just removed it)
                try:
                    self.folder.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ClaimError(e.errno, f"cannot write a claim in {self.folder}: {e.strerror}") from None
                continue
            except OSError as e:
                if e.errno not in (errno.EIO, errno.ETIMEDOUT):  # an NFS reply lost: the count below says
                    _unlink(mine)
                    raise ClaimError(e.errno, f"cannot write a claim in {self.folder}: {e.strerror}") from None
            break
        if os.stat(mine).st_nlink == 2:
            return True
        _unlink(mine)
        return False

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text() or None
        except FileNotFoundError:
            return None


def owner_alive(root: Path, owner: str, asking: str) -> bool:
    """Whether a run still holds its leases: its record exists and, on this machine, its
    process runs, or, elsewhere, it was touched within STALE seconds (as the run `asking`
    measures on the file system's clock)."""
    record = root / "claims" / "owners" / owner / "owner"
    try:
        with open(record, "rb") as f:  # opening revalidates NFS's cached attributes
            info = json.loads(f.read() or b"{}")
            touched = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # unreadable for now: assume it lives rather than take its work
    if info.get("machine") == this_machine():
        return pid_running(info.get("pid", -1))
    return fs_now(root, asking) - touched < STALE


def fs_now(root: Path, owner: str) -> float:
    """The file system's clock: the mtime of a file (in the owner's folder) touched just now."""
    probe = root / "claims" / "owners" / owner / "clock"
    try:
        probe.touch()
        with open(probe, "rb") as f:
            return os.fstat(f.fileno()).st_mtime
    except OSError:
        return time.time()


def describe(root: Path, owner: str) -> str:
    """An owner as people know it: host, process id and command."""
    try:
        info = json.loads((root / "claims" / "owners" / owner / "owner").read_text())
    except (OSError, ValueError):
        return owner
    return f"{info.get('host')} pid {info.get('pid')} ({info.get('command')}, since {info.get('started')})"


def pid_running(pid) -> bool:
    """Whether a process of this machine runs: not gone, and not a zombie (a killed command's
    child stays one until something reaps it, which in a container may be never)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux): signal 0 is all there is to ask
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
