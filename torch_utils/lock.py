"""Run directory locks: one process (one torchrun job) at a time writes a run directory.

The lock is the file RUN_DIR/run.lock, created with O_CREAT | O_EXCL (atomic on local file systems
and on NFS v3 and later, unlike flock), holding JSON that names its holder: host, pid, start time,
command. A thread of the holder touches it every HEARTBEAT_SEC seconds. Another process that finds
it is refused with one line naming the holder, unless the lock is stale:
- same machine (host name, boot id and pid namespace all equal) and the holder's pid is gone (or
  is another process now: its start time differs): taken over at once;
- another machine, e.g. a shared file system: its pid cannot be checked, so the lock is taken
  over only after FOREIGN_STALE_SEC without a heartbeat, or at once with break_lock=True
  (`--break-lock`; the user asserts that the holder is gone).
A takeover happens under a second O_EXCL file (run.lock.takeover), so two processes that both
find a stale lock cannot both take it. Under torchrun only rank 0 touches the files; every rank
gets the outcome, so all fail with the same line.
"""

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

import psutil

from dnnlib.util import UserError
from torch_utils import distributed

LOCK_NAME = 'run.lock'
HEARTBEAT_SEC = 60
FOREIGN_STALE_SEC = 3600                # a lock from another machine: taken over after 1 h without a heartbeat
_TAKEOVER_STALE_SEC = 60                # a takeover guard left by a process killed in mid-takeover

#----------------------------------------------------------------------------
# Who holds a lock, and whether it is still alive.

def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def machine() -> dict:
    """What identifies this machine and pid namespace: pids compare only where all three are equal."""
    try:
        pid_ns = os.readlink('/proc/self/ns/pid')
    except OSError:
        pid_ns = None
    return dict(host=socket.gethostname(), boot_id=_read_first_line('/proc/sys/kernel/random/boot_id'), pid_ns=pid_ns)


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _this_process() -> dict:
    return dict(machine(), pid=os.getpid(), process_start=_process_start(os.getpid()),
                started=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                command=shlex.join([sys.executable, *sys.argv])[:500], token=uuid.uuid4().hex)


def _read_lock(path: str) -> dict | None:
    """The holder's record; {} when the file is unreadable or half written; None when there is no lock."""
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _age(path: str) -> float | None:
    """Seconds since the last heartbeat (the file's modification time); None if the file is gone."""
    try:
        return max(time.time() - os.stat(path).st_mtime, 0.0)
    except FileNotFoundError:
        return None


def _holder_alive(info: dict) -> bool | None:
    """True/False for a holder on this machine; None where that cannot be known (another machine, unreadable)."""
    if not info or any(info.get(k) != v for k, v in machine().items()):
        return None
    try:
        proc = psutil.Process(int(info['pid']))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        start = info.get('process_start')
        return start is None or abs(proc.create_time() - float(start)) < 1.0  # else the pid was reused
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False
    except psutil.Error:
        return True  # it exists, we may not inspect it


def describe(info: dict, age: float | None) -> str:
    """One line about the holder: pid, host, start time, command, last heartbeat."""
    if not info:
        return 'an unknown process (the lock file is empty or unreadable)'
    beat = '' if age is None else f', last heartbeat {_format_age(age)} ago'
    command = ' '.join(str(info.get('command', '?')).split())  # one line, whatever the arguments held
    return f'pid {info.get("pid")} on host {info.get("host")}, started {info.get("started")}{beat}, command: {command}'


def _format_age(seconds: float) -> str:
    s = int(seconds)
    return f'{s}s' if s < 120 else f'{s // 60} min' if s < 7200 else f'{s // 3600} h {s // 60 % 60} min'

#----------------------------------------------------------------------------

class RunLock:
    """The lock on one run directory, held by this process from acquire() to release()."""

    def __init__(self, run_dir: str, break_lock: bool = False):
        self.run_dir, self.break_lock = run_dir, break_lock
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.info: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Create the run directory if needed and take the lock, or raise the one-line UserError."""
        self._stop.clear()
        created = self._make_dir()
        try:
            if not self._create():
                self._take_over_or_refuse()
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(self.run_dir)  # a refused run leaves nothing behind
            raise
        self._thread = threading.Thread(target=self._heartbeat, name=f'lock heartbeat {self.path}', daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours (a takeover may have replaced it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.info is not None and self._is_ours():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.info = None

    def _make_dir(self) -> bool:
        if os.path.isdir(self.run_dir):
            return False
        try:
            os.makedirs(self.run_dir)
            return True
        except FileExistsError:
            if os.path.isdir(self.run_dir):
                return False  # made by another process just now
            raise UserError(f'Cannot create output directory {self.run_dir}: a file of that name is in the way; remove it or pick another directory')
        except OSError as e:
            raise UserError(f'Cannot create output directory {self.run_dir}: {e.strerror or e}; pick a writable directory')

    def _create(self) -> bool:
        """Create the lock file with our record; False if one exists."""
        info = _this_process()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise UserError(f'Output directory {self.run_dir} is not writable: {e.strerror or e}; pick a writable directory')
        with os.fdopen(fd, 'w') as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        self.info = info
        return True

    def _take_over_or_refuse(self) -> None:
        """The lock exists: take it over if its holder is surely gone, else refuse in one line."""
        info = _read_lock(self.path)
        if info is None:  # released in the meantime
            if self._create():
                return
            info = _read_lock(self.path) or {}
        age = _age(self.path)
        alive, why = _holder_alive(info), 'that process is gone'
        if alive is None and (self.break_lock or (age is not None and age > FOREIGN_STALE_SEC)):
            alive, why = False, 'told to (--break-lock)' if self.break_lock else f'no heartbeat for {_format_age(age)}'
        if alive is not False:
            where = ('' if alive else '; it cannot be checked from here (another machine?): if that process is gone, rerun '
                     f'with --break-lock, or it is taken over {FOREIGN_STALE_SEC // 3600} h after its last heartbeat')
            raise UserError(f'{self.run_dir} is in use by another process: {describe(info, age)}{where}; '
                            'wait for it to finish or use another output directory')
        with self._takeover_guard(info, age):
            current = _read_lock(self.path)
            if current is not None and current != info:
                raise UserError(f'{self.run_dir} was just locked by another process ({describe(current, None)}); '
                                'wait for it or use another output directory')
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            if not self._create():
                raise UserError(f'{self.run_dir} was just locked by another process; wait for it or use another output directory')
        print(f'Took over the lock of {self.run_dir} from {describe(info, age)} ({why})', flush=True)

    @contextlib.contextmanager
    def _takeover_guard(self, info: dict, age: float | None) -> Iterator[None]:
        """Only one process at a time replaces a stale lock."""
        guard = self.path + '.takeover'
        for attempt in range(2):
            try:
                os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                if attempt == 0 and (_age(guard) or 0) > _TAKEOVER_STALE_SEC:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(guard)  # left by a process killed in mid-takeover
                    continue
                raise UserError(f'{self.run_dir}: another process is taking over the stale lock of {describe(info, age)}; '
                                'wait for it or use another output directory')
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(guard)

    def _is_ours(self) -> bool:
        current = _read_lock(self.path)
        return bool(current) and current.get('token') == self.info['token']

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SEC):
            if not self._is_ours():
                print(f'Warning: the lock {self.path} is no longer this process\'s (taken over by '
                      f'{describe(_read_lock(self.path) or {}, _age(self.path))}); stop this run', file=sys.stderr, flush=True)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

#----------------------------------------------------------------------------

@contextlib.contextmanager
def run_lock(run_dir: str, break_lock: bool = False) -> Iterator[None]:
    """Hold the lock of run_dir (created if needed) for the block; collective under torchrun.

    Rank 0 takes the lock; the other ranks learn the outcome, so every rank raises the same one-line
    UserError when it is refused. The lock is released when the block ends, by return or exception.
    """
    lock = RunLock(run_dir, break_lock) if distributed.is_main() else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as e:
            error = e.format_message()
        except Exception as e:  # told to every rank, so none waits forever for rank 0
            error = f'Cannot lock {run_dir}: {type(e).__name__}: {e}'
    error = distributed.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
