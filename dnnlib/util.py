"""General utilities: EasyDict, class construction by name, cached URL opening, atomic writes and disk errors, progress."""

import contextlib
import errno
import hashlib
import importlib
import io
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
from typing import Any, Callable, Iterator

import click
import requests

#----------------------------------------------------------------------------

class EasyDict(dict):
    """Dict whose items are also attributes: d.x == d['x']."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


class UserError(click.ClickException):
    """A mistake in the user's input. Raised anywhere; click CLIs print 'Error: <message>' and exit 1."""

#----------------------------------------------------------------------------
# Construction by name.

def get_obj_by_name(name: str) -> Any:
    """Return the object at a dotted path, e.g. 'training.networks.EDMPrecond'."""
    module_name, _, attr = name.rpartition('.')
    if not module_name:
        raise UserError(f'Not a dotted object name: {name!r}')
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f'Cannot import module {module_name!r} for {name!r}: {e}')
    obj = module
    for part in attr.split('.'):
        if not hasattr(obj, part):
            raise UserError(f'{module_name!r} has no attribute {attr!r}')
        obj = getattr(obj, part)
    return obj


def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    """Construct an object from its class's dotted name and constructor arguments."""
    cls = get_obj_by_name(class_name)
    if not callable(cls):
        raise UserError(f'{class_name!r} is not callable')
    return cls(*args, **kwargs)

#----------------------------------------------------------------------------
# Atomic file output: temporaries beside the target, named by host and process, so that a rerun can tell
# the leftovers of a killed writer ('.NAME.HOST-PID.XXXX.tmp', PID gone) from those of a live one.

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_scanned_dirs: set[tuple[int, str]] = set()


def current_umask() -> int:
    """This process's umask (read by setting and restoring it)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _host_id() -> str:
    """This host's name, made safe for file names, with the pid namespace where one can be read (containers
    that share a host name but not process ids must not take each other's live processes for dead)."""
    host = re.sub(r'[^A-Za-z0-9_]+', '_', socket.gethostname()) or 'host'
    with contextlib.suppress(OSError):
        host += '_' + re.sub(r'\D', '', os.readlink('/proc/self/ns/pid'))
    return host


def temp_prefix(path: str) -> str:
    """The name prefix of this process's temporaries for `path`: '.NAME.HOST-PID.'."""
    return f'.{os.path.basename(os.path.abspath(path))}.{_host_id()}-{os.getpid()}.'


def _pid_alive(pid: int) -> bool:
    if os.name != 'posix':
        return True  # os.kill(pid, 0) would terminate it on Windows: never take a temporary for stale there
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_path(path: str) -> None:
    """Delete a file, link or directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_stale_temps(directory: str, name: str | None = None) -> list[str]:
    """Delete the temporaries that killed processes of this host left in `directory` (of `name` only, if given).

    Only names of this module's pattern whose process is gone count; a live writer's are kept. A replaced
    dataset that atomic_replace_dir had set aside ('.NAME.HOST-PID.old.tmp') goes back to NAME if NAME is
    missing, since then the kill came between the two renames. Returns the deleted paths.
    """
    pattern = re.compile(r'\.(?P<name>.+)\.' + re.escape(_host_id()) + r'-(?P<pid>\d+)\.(?P<tag>[a-z0-9_]+)\.tmp')
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = pattern.fullmatch(entry)
        if not m or (name is not None and m['name'] != name) or _pid_alive(int(m['pid'])):
            continue
        path, target = os.path.join(directory, entry), os.path.join(directory, m['name'])
        if m['tag'] == 'old' and not os.path.lexists(target):
            os.rename(path, target)
            continue
        remove_path(path)
        removed.append(path)
    return removed


def make_temp_dir(dest: str) -> str:
    """A fresh hidden directory beside `dest` ('.NAME.HOST-PID.XXXX.tmp', the permissions a plain mkdir
    gives); stale ones that killed writers left for `dest` are deleted first."""
    parent, name = os.path.split(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, name)
    tmp = tempfile.mkdtemp(dir=parent, prefix=temp_prefix(dest), suffix='.tmp')
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
    return tmp


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb') -> Iterator[Any]:
    """Open a temporary file beside `path`; rename it onto `path` only if the block completes.

    The file gets the permissions a plain open() would give (0666 & ~umask). The first write into a
    directory in a process deletes the temporaries that killed writers left there.
    """
    path = os.fspath(path)
    dirname = os.path.dirname(os.path.abspath(path))
    os.makedirs(dirname, exist_ok=True)
    if (os.getpid(), dirname) not in _scanned_dirs:  # once per directory: a folder of 50k PNGs is listed once
        remove_stale_temps(dirname)
        _scanned_dirs.add((os.getpid(), dirname))
    fd, tmp = tempfile.mkstemp(dir=dirname, prefix=temp_prefix(path), suffix='.tmp')
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private (0600); a plain open() would not
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_replace_dir(tmp_dir: str, dest_dir: str) -> None:
    """Move a completed temporary directory (or file) onto `dest_dir`, replacing a folder or file there.

    A file onto a file is one rename. Otherwise the old one is first renamed aside to
    '.NAME.HOST-PID.old.tmp' and deleted after the move (put back if the move fails); nothing named
    DEST.old-PID is ever left, and a kill between the renames is repaired by remove_stale_temps.
    """
    dest_dir = os.path.abspath(dest_dir)
    if not os.path.lexists(dest_dir) or not (os.path.isdir(tmp_dir) or os.path.isdir(dest_dir)):
        os.replace(tmp_dir, dest_dir)
        return
    old = os.path.join(os.path.dirname(dest_dir), temp_prefix(dest_dir) + 'old.tmp')
    remove_path(old)  # one this process could not delete earlier
    os.rename(dest_dir, old)
    try:
        os.rename(tmp_dir, dest_dir)
    except BaseException:
        os.rename(old, dest_dir)
        raise
    remove_path(old)


def preallocate(f: Any, offset: int, length: int, chunk: int = 1 << 24) -> None:
    """Reserve disk blocks for bytes [offset, offset + length) of the open file `f` (zeros where there is no
    posix_fallocate), so a full disk fails here with OSError instead of a SIGBUS at a memory map's first write."""
    if length <= 0:
        return
    if hasattr(os, 'posix_fallocate'):
        try:
            os.posix_fallocate(f.fileno(), offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    f.seek(offset)
    zeros = bytes(min(chunk, length))
    for start in range(0, length, chunk):
        f.write(zeros[:min(chunk, length - start)])
    f.flush()
    os.fsync(f.fileno())


def format_bytes(n: float) -> str:
    """Human-readable size: '512 B', '3.2 MB', '1.5 GB' (powers of 1000)."""
    if abs(n) < 1000:
        return f'{n:.0f} B'
    for unit in ('kB', 'MB', 'GB', 'TB'):
        n /= 1000
        if abs(n) < 1000 or unit == 'TB':
            break
    return f'{n:.1f} {unit}'


@contextlib.contextmanager
def disk_errors(dest: str, needed: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """Turn a full disk, a full quota, a read-only file system or a refused permission met while writing
    `dest` into one UserError line that names `dest`, the space it needs and the space free."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        size = needed() if callable(needed) else needed
        parent = os.path.dirname(os.path.abspath(dest))
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        try:
            free = f'{format_bytes(shutil.disk_usage(parent).free)} free there'
        except OSError:
            free = 'free space unknown'
        need = f'it needs about {format_bytes(size)}' if size else 'size unknown'
        fix = 'free some space or choose another place' if e.errno in (errno.ENOSPC, errno.EDQUOT) \
            else 'choose a writable place'
        raise UserError(f'Cannot write {dest}: {os.strerror(e.errno)} ({need}, {free}); {fix}') from None

#----------------------------------------------------------------------------
# URLs with a download cache.

def make_cache_dir_path(*paths: str) -> str:
    """Cache directory: $DNNLIB_CACHE_DIR, else $XDG_CACHE_HOME/dnnlib, else ~/.cache/dnnlib."""
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'dnnlib', *paths)


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True for http(s):// URLs, and for file:// URLs when allowed."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    scheme = urllib.parse.urlparse(obj).scheme
    return scheme in ('http', 'https') or (allow_file_urls and scheme == 'file')


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    return urllib.parse.unquote(parsed.netloc + parsed.path)


def open_url(url: str, cache_dir: str | None = None, num_attempts: int = 5, verbose: bool = True,
             return_filename: bool = False, cache: bool = True, timeout: float = 60.0) -> Any:
    """Open a local path, file:// URL or http(s):// URL as a binary file object (or return its path).

    Downloads are cached under `cache_dir` (default make_cache_dir_path('downloads')) keyed by the
    URL's hash; the cache file appears only once the download is complete.
    """
    if not is_url(url, allow_file_urls=True):
        path = os.path.expanduser(os.fspath(url))
        if not os.path.isfile(path):
            raise UserError(f'No such file: {path}')
        return path if return_filename else open(path, 'rb')
    if url.startswith('file://'):
        path = _file_url_to_path(url)
        if not os.path.isfile(path):
            raise UserError(f'No such file: {path} (from {url})')
        return path if return_filename else open(path, 'rb')
    assert num_attempts >= 1
    assert not (return_filename and not cache)

    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        hits = sorted(f for f in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else [])
                      if f.startswith(url_md5 + '_') and not f.endswith('.tmp') and not f.startswith('.'))
        if hits:
            path = os.path.join(cache_dir, hits[0])
            return path if return_filename else open(path, 'rb')

    data = None
    for attempt in range(num_attempts):
        if verbose:
            print(f'Downloading {url} ...', end='', file=sys.stderr, flush=True)
        try:
            with requests.get(url, timeout=timeout) as res:
                res.raise_for_status()
                data = res.content
                expected = res.headers.get('Content-Length')
                if expected is not None and int(expected) != len(data):
                    raise IOError(f'incomplete download: {len(data)} of {expected} bytes')
            if verbose:
                print(' done', file=sys.stderr)
            break
        except (requests.RequestException, IOError) as e:
            if verbose:
                print(' failed', file=sys.stderr)
            if attempt == num_attempts - 1:
                raise UserError(f'Could not download {url} after {num_attempts} attempts: {e}')
            time.sleep(min(2 ** attempt * 0.1, 5.0))

    if cache:
        name = re.sub(r'[^0-9a-zA-Z._-]+', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'file'
        path = os.path.join(cache_dir, f'{url_md5}_{name}')
        with atomic_write(path, 'wb') as f:
            f.write(data)
        if return_filename:
            return path
    return io.BytesIO(data)

#----------------------------------------------------------------------------
# Formatting and progress.

def format_time(seconds: float) -> str:
    """Human-readable duration: '42s', '3m 05s', '2h 07m', '1d 03h'."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h {(s // 60) % 60:02d}m'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h'


def parse_int_list(s: str | list | tuple) -> list[int]:
    """Parse '0-3,7,10-11' into [0, 1, 2, 3, 7, 10, 11]."""
    if isinstance(s, (list, tuple)):
        return [int(x) for x in s]
    out = []
    for part in str(s).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise UserError(f'Bad range {part!r}: end before start')
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r'\d+', part):
            out.append(int(part))
        else:
            raise UserError(f'Bad integer list {s!r}: expected e.g. 0-99,200')
    return out


class Progress:
    """Prints 'desc: done/total (pct) elapsed, ETA' at most every `interval` seconds."""

    def __init__(self, total: int, desc: str, interval: float = 10.0, enabled: bool = True,
                 printer: Callable[[str], None] | None = None):
        self.total, self.desc, self.interval, self.enabled = total, desc, interval, enabled
        self.printer = printer or (lambda line: print(line, flush=True))
        self.done = 0
        self.start = self.last = time.time()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            self.printer(self.line())

    def line(self) -> str:
        elapsed = time.time() - self.start
        pct = 100.0 * self.done / max(self.total, 1)
        eta = elapsed / self.done * (self.total - self.done) if self.done else float('nan')
        eta_s = format_time(eta) if eta == eta else '?'
        return f'{self.desc}: {self.done}/{self.total} ({pct:.0f}%) elapsed {format_time(elapsed)}, ETA {eta_s}'

#----------------------------------------------------------------------------
# Logging to a file as well as the terminal.

class _Tee:
    """A text stream that also appends everything written to it into an open log file."""

    def __init__(self, stream: Any, log: Any):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_output(path: str | None) -> Iterator[None]:
    """Inside the block, stdout and stderr are also appended to the file `path`; a no-op for None."""
    if path is None:
        yield
        return
    with open(path, 'a') as log:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
