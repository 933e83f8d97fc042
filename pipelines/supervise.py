"""The local engine runs a pass in a child process that the command's process watches, so a
file that kills the process preparing it (a decoder's segfault or abort, the kernel's OOM
killer) costs that file one row, not the whole command.

Before a thread prepares a row it writes the row's key into its slot of a `Journal` (shared
memory: one slot per thread, one for the batch a model is processing), and clears it after:
two small memory writes a row, so the normal path keeps its speed. When the child dies by a
signal, the parent reads the journal, takes the keys in it as suspects and starts the pass
again (finished parts are written, so it resumes). The new child prepares each suspect
alone, in a throwaway process (`Prober`): one whose process dies (by SIGKILL: twice)
becomes a `worker_died` row naming its file. A suspect of a model's
batch is processed in a batch of its own; one that dies that way twice is recorded the same.
The rest of the run goes on at full speed.
"""
from __future__ import annotations

import ctypes
import gc
import itertools
import mmap
import multiprocessing
import os
import pickle
import signal
import struct
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

from curate.pipelines.rows import prepare_row
from curate.pipelines.stage import Stage

SLOT = 16 << 10  # bytes a thread's key may take (a long tar member's name)
MODEL_SLOT = 1 << 20  # the keys of the batch a model is processing
MAX_FRUITLESS_DEATHS = 3  # deaths in a row with nothing new written and no suspect found: give up
DETERMINISTIC = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


class Journal:
    """What each thread of the pass process is working on, readable after the process died."""

    def __init__(self, threads: int):
        self.slots = threads + 1  # the decode threads and the thread that runs the pass
        self.memory = mmap.mmap(-1, MODEL_SLOT + self.slots * SLOT)  # anonymous and shared: fork keeps it
        self._local = threading.local()
        self._next = itertools.count()

    def hold(self, key: str) -> None:
        """This thread now prepares the row `key`."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = next(self._next) % self.slots
        self._write(MODEL_SLOT + slot * SLOT, SLOT, [key])

    def free(self) -> None:
        struct.pack_into("<I", self.memory, MODEL_SLOT + self._local.slot * SLOT, 0)

    def model(self, keys: list) -> None:
        """A model is about to process the batch `keys` ([]: done with it)."""
        self._write(0, MODEL_SLOT, keys)

    def _write(self, offset: int, size: int, keys: list) -> None:
        data = "\0".join(map(str, keys)).encode("utf-8", "surrogateescape")[:size - 4]
        struct.pack_into("<I", self.memory, offset, 0)  # the length last: a reader never sees half a key
        self.memory[offset + 4:offset + 4 + len(data)] = data
        struct.pack_into("<I", self.memory, offset, len(data))

    def read(self) -> tuple[set[str], list[str]]:
        """(keys the threads were preparing, the keys of the model's batch)."""
        def at(offset):
            (n,) = struct.unpack_from("<I", self.memory, offset)
            text = self.memory[offset + 4:offset + 4 + n].decode("utf-8", "surrogateescape")
            return text.split("\0") if n else []

        held = {k for slot in range(self.slots) for k in at(MODEL_SLOT + slot * SLOT)}
        return held, at(0)

    def clear(self) -> None:
        for offset in [0] + [MODEL_SLOT + s * SLOT for s in range(self.slots)]:
            struct.pack_into("<I", self.memory, offset, 0)


@dataclass
class Suspects:
    """What the deaths of pass processes so far say about keys; kept by the parent, handed to
    each new child."""

    prepare: set = field(default_factory=set)  # to prepare alone, in a probe
    alone: set = field(default_factory=set)  # to process in a model batch of their own
    alone_deaths: dict = field(default_factory=dict)  # key -> deaths while alone in a model batch
    dead: dict = field(default_factory=dict)  # key -> why: recorded as worker_died without more tries

    def died(self, journal: Journal, why: str) -> bool:
        """Take in what the journal held when a child died; whether anything new came of it."""
        preparing, batch = journal.read()
        before = self._size()
        self.prepare |= preparing - set(self.dead)
        if len(batch) == 1 and batch[0] in self.alone:
            self.alone_deaths[batch[0]] = self.alone_deaths.get(batch[0], 0) + 1
            if self.alone_deaths[batch[0]] >= 2:
                self.dead[batch[0]] = f"the process died ({why}) while a model processed this image alone, twice"
        self.alone |= set(batch) - set(self.dead)
        return self._size() != before

    def _size(self) -> tuple:
        return len(self.prepare), len(self.alone), sum(self.alone_deaths.values()), len(self.dead)


class Died(Exception):
    """A probe's process died: the row kills whatever prepares it."""


class Prober:
    """Prepares suspect rows alone, each in a process of its own. It is a copy of the pass
    process made before that starts threads or loads models (so forking it is safe and
    imports nothing), which forks a probe per row; one whose probe dies gets Died (a SIGKILL,
    which may have come from outside, must happen twice)."""

    def __init__(self, stages: list[Stage]):
        self.connection, theirs = multiprocessing.Pipe()
        self.lock = threading.Lock()  # decode threads ask one at a time
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:  # never back into the pass's code, whatever happens here
                self.connection.close()
                _die_with_parent()
                code = _serve(theirs, stages)
            finally:
                os._exit(code)
        theirs.close()

    def probe(self, row: dict) -> list[dict | None]:
        row = {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row.items()}
        with self.lock:
            self.connection.send(row)
            died, result = self.connection.recv()
        if died:
            raise Died(result)
        return result


def _serve(connection, stages: list[Stage]) -> int:
    """The prober's loop: a probe per row asked for; (died, result or why) back."""
    while True:
        try:
            row = connection.recv()
        except EOFError:
            return 0
        for attempt in range(2):
            receive, send = multiprocessing.Pipe(duplex=False)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    receive.close()
                    _die_with_parent()
                    result: list = []
                    thread = threading.Thread(target=lambda: result.append(prepare_row(stages, row)))
                    thread.start()  # a thread of its own, as the pass (see _child)
                    thread.join()
                    send.send(result[0])
                    code = 0
                finally:
                    os._exit(code)
            send.close()
            try:
                answer = (False, receive.recv())
            except EOFError:  # it died before it could answer
                answer = None
            receive.close()
            status = os.waitpid(pid, 0)[1]
            if answer is not None:
                break
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            answer = (True, f"the process preparing it died: {describe_exit(code)}")
            if code >= 0 or -code in DETERMINISTIC:
                break  # a crash of its own: no second try (a SIGKILL may have come from outside: one more)
        connection.send(answer)


def _die_with_parent() -> None:
    """This process dies with the one that made it (a kill -9 of the command leaves nothing behind)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"{signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class Relay:
    """A child's side of the Tally: each call goes to the parent as a message. The pass calls
    it for every batch: where a Ctrl-C is raised in the pass (see _child)."""

    def __init__(self, connection):
        self.connection = connection
        self.interrupted = threading.Event()

    def __getattr__(self, name: str) -> Callable:
        def call(*args):
            if self.interrupted.is_set():
                self.interrupted.clear()
                raise KeyboardInterrupt
            self.connection.send((name, args))

        return call


class PassTraceback(Exception):
    """The traceback of an exception in the pass process, attached to it as its cause."""

    def __str__(self) -> str:
        return self.args[0]


def supervise(run_pass: Callable[[Relay, Suspects], None], tally, journal: Journal) -> None:
    """run_pass(relay, suspects) in a forked child; what it tells the relay reaches `tally`.
    An exception in it is raised here; a death by a signal starts it again with what the
    journal says (see the module's docstring)."""
    suspects = Suspects()
    fruitless = 0
    while True:
        journal.clear()
        receive, send = multiprocessing.Pipe(duplex=False)
        written = tally.rows_written
        # What the command has imported (torch and the models' libraries: hundreds of thousands of
        # objects) is frozen, as the pass freezes what it loads (rows.setup_stages): this process's
        # collector would rescan it all while it waits for the pass and again at exit (about a
        # second of CPU in `curate score`), and the child's would write to the pages they share.
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the child: run the pass; never return into the caller's code, whatever happens
            code = 1
            try:
                receive.close()
                code = _child(run_pass, send, suspects)
            finally:
                os._exit(code)
        send.close()
        try:
            error = _listen(receive, tally)
            status = os.waitpid(pid, 0)[1]
        except KeyboardInterrupt:  # the child got the Ctrl-C too: let it write what it has
            try:
                os.waitpid(pid, 0)
            except KeyboardInterrupt:
                os.kill(pid, signal.SIGKILL)
            raise
        finally:
            receive.close()
        if error is not None:
            raise error
        if os.WIFEXITED(status):
            if os.WEXITSTATUS(status) == 0:
                return
            raise RuntimeError(f"the pass process ended with status {os.WEXITSTATUS(status)} and said nothing")
        why = describe_exit(-os.WTERMSIG(status))
        learnt = suspects.died(journal, why)
        tally.restarted(why)
        fruitless = 0 if learnt or tally.rows_written > written else fruitless + 1
        if fruitless >= MAX_FRUITLESS_DEATHS:
            raise RuntimeError(f"the pass process died {fruitless} times ({why}) without getting further; "
                               "run the command again to go on from where it stopped")


def _child(run_pass, send, suspects: Suspects) -> int:
    """The pass process. It dies with the command (a kill -9 of it must not leave a pass
    behind), and runs the pass on a thread of its own: OpenMP's threads (torch's) do not
    survive a fork, and the thread that forked would wait for them forever had the command
    used them before; a new thread makes new ones. A Ctrl-C reaches this (main) thread, which
    has the pass stop at its next batch, writing what it finished."""
    code = 0
    relay = Relay(send)
    failure: list = []

    def work():
        try:
            run_pass(relay, suspects)
        except BaseException as e:
            failure.append((e, traceback.format_exc()))

    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, lambda *_: relay.interrupted.set())
        thread = threading.Thread(target=work, name="curate-pass")
        thread.start()
        thread.join()
        if failure:  # everything goes to the parent, which raises it
            code = 1
            error, text = failure[0]
            try:
                pickle.loads(pickle.dumps(error))  # not every exception comes back from a pickle
            except Exception:
                error = RuntimeError(f"{type(error).__name__}: {error}")
            send.send_bytes(b"E" + pickle.dumps((error, text)))
    finally:
        send.close()
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _listen(receive, tally) -> BaseException | None:
    """Apply the child's messages to the tally until it ends; its exception, if it sent one."""
    while True:
        try:
            message = receive.recv_bytes()
        except EOFError:
            return None
        if message[:1] == b"E":
            error, text = pickle.loads(message[1:])
            error.__cause__ = PassTraceback(text)
            return error
        name, args = pickle.loads(message)
        getattr(tally, name)(*args)
