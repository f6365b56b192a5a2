"""dnnlib: EasyDict, construction by name, cached open_url against a local HTTP server, atomic writes, temporaries, disk errors."""

import errno
import http.server
import os
import threading

import pytest

import dnnlib
from dnnlib import util


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict = {}

    def do_GET(self):
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        if self.path == '/good.bin':
            body = b'0123456789' * 100
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == '/broken.bin':
            # Promise 1000 bytes, send 10, hang up: a truncated download.
            self.send_response(200)
            self.send_header('Content-Length', '1000')
            self.end_headers()
            self.wfile.write(b'x' * 10)
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.hits = {}
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


def test_easydict_attributes():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    with pytest.raises(AttributeError):
        _ = d.missing


def test_construct_class_by_name():
    obj = util.construct_class_by_name(class_name='collections.OrderedDict', x=1)
    assert type(obj).__name__ == 'OrderedDict' and obj['x'] == 1
    with pytest.raises(dnnlib.UserError):
        util.construct_class_by_name(class_name='collections.NoSuchThing')


def test_open_url_caches_and_does_not_redownload(server, tmp_path):
    url = server + '/good.bin'
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'0123456789' * 100
    assert _Handler.hits['/good.bin'] == 1
    path = util.open_url(url, cache_dir=str(tmp_path), verbose=False, return_filename=True)
    assert open(path, 'rb').read() == b'0123456789' * 100
    assert _Handler.hits['/good.bin'] == 1, 'cache hit must not download again'


def test_open_url_broken_download_leaves_no_cache(server, tmp_path):
    with pytest.raises(dnnlib.UserError):
        util.open_url(server + '/broken.bin', cache_dir=str(tmp_path), verbose=False, num_attempts=2)
    assert _Handler.hits['/broken.bin'] == 2, 'should retry'
    assert os.listdir(tmp_path) == [], 'a failed download must leave nothing in the cache'


def test_open_url_local_path_and_file_url(tmp_path):
    p = tmp_path / 'a b.txt'
    p.write_bytes(b'hello')
    assert util.open_url(str(p)).read() == b'hello'
    assert util.open_url('file://' + str(p).replace(' ', '%20')).read() == b'hello'
    with pytest.raises(dnnlib.UserError, match='No such file'):
        util.open_url(str(tmp_path / 'missing'))


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    assert util.make_cache_dir_path('downloads') == os.path.join(str(tmp_path), 'downloads')


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / 'f.txt'
    with util.atomic_write(str(p), 'w') as f:
        f.write('first')
    with pytest.raises(RuntimeError):
        with util.atomic_write(str(p), 'w') as f:
            f.write('second')
            raise RuntimeError('killed')
    assert p.read_text() == 'first'
    assert sorted(os.listdir(tmp_path)) == ['f.txt']


def test_parse_int_list():
    assert util.parse_int_list('0-3,7') == [0, 1, 2, 3, 7]
    with pytest.raises(dnnlib.UserError):
        util.parse_int_list('3-1')

#----------------------------------------------------------------------------
# Temporaries of killed writers, replacing folders, full disks, permissions.

KILLED_WRITER = '''
import os, signal, sys
from dnnlib import util
with util.atomic_write(sys.argv[1]) as f:
    f.write(b'half')
    os.kill(os.getpid(), signal.SIGKILL)
'''

LIVE_WRITER = '''
import sys
from dnnlib import util
with util.atomic_write(sys.argv[1]) as f:
    print('ready', flush=True)
    sys.stdin.readline()
'''


def _python(code: str, *args: str, **kwargs):
    import subprocess
    import sys
    from tests.conftest import ROOT
    return subprocess.Popen([sys.executable, '-c', code, *args], cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, **kwargs)


def test_atomic_write_removes_what_killed_writers_left(tmp_path):
    import subprocess
    target = tmp_path / 'out' / 'state.pt'
    killed = _python(KILLED_WRITER, str(target))
    assert killed.wait(60) == -9
    left = os.listdir(tmp_path / 'out')
    assert len(left) == 1 and left[0].startswith('.state.pt.') and left[0].endswith('.tmp')  # what a kill leaves
    live = _python(LIVE_WRITER, str(tmp_path / 'out' / 'other.bin'), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline() == b'ready\n'
        with util.atomic_write(str(tmp_path / 'out' / 'state.pt')) as f:
            f.write(b'whole')
        names = sorted(os.listdir(tmp_path / 'out'))
        # The killed writer's temporary is gone, the live writer's is kept.
        assert len(names) == 2 and names[1] == 'state.pt' and names[0].startswith('.other.bin.'), names
    finally:
        live.communicate(b'\n', timeout=60)
    assert live.returncode == 0 and sorted(os.listdir(tmp_path / 'out')) == ['other.bin', 'state.pt']
    assert (tmp_path / 'out' / 'state.pt').read_bytes() == b'whole'


def test_atomic_replace_dir_replaces_files_and_folders_and_leaves_nothing(tmp_path, monkeypatch):
    def folder(name, text):
        os.makedirs(tmp_path / name)
        (tmp_path / name / 'a.txt').write_text(text)
        return str(tmp_path / name)
    dest = str(tmp_path / 'dest.zip')
    with open(dest, 'w') as f:
        f.write('a zip once')
    util.atomic_replace_dir(folder('t1', 'one'), dest)  # a folder onto a file
    assert (tmp_path / 'dest.zip' / 'a.txt').read_text() == 'one'
    util.atomic_replace_dir(folder('t2', 'two'), dest)  # a folder onto a folder
    assert (tmp_path / 'dest.zip' / 'a.txt').read_text() == 'two'
    (tmp_path / 't3').write_text('three')
    util.atomic_replace_dir(str(tmp_path / 't3'), dest)  # a file onto a folder
    assert (tmp_path / 'dest.zip').read_text() == 'three'
    assert sorted(os.listdir(tmp_path)) == ['dest.zip']
    # The second rename fails: the old one is put back, nothing else remains.
    real = os.rename
    calls = []

    def failing(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise OSError(errno.EXDEV, 'simulated')
        real(a, b)
    monkeypatch.setattr(os, 'rename', failing)
    with pytest.raises(OSError):
        util.atomic_replace_dir(folder('t4', 'four'), dest)
    monkeypatch.undo()
    assert (tmp_path / 'dest.zip').read_text() == 'three' and sorted(os.listdir(tmp_path)) == ['dest.zip', 't4']


KILLED_BETWEEN_RENAMES = '''
import os, signal, sys
from dnnlib import util
real, calls = os.rename, []
def rename(a, b):
    calls.append(a)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.rename = rename
util.atomic_replace_dir(sys.argv[1], sys.argv[2])
'''


def test_a_kill_between_the_renames_is_repaired(tmp_path):
    os.makedirs(tmp_path / 'dest')
    (tmp_path / 'dest' / 'a.txt').write_text('old')
    os.makedirs(tmp_path / 'new')
    assert _python(KILLED_BETWEEN_RENAMES, str(tmp_path / 'new'), str(tmp_path / 'dest')).wait(60) == -9
    assert not os.path.exists(tmp_path / 'dest')  # the old one is only under its temporary name now
    tmp = util.make_temp_dir(str(tmp_path / 'dest'))  # the next writer of dest restores it
    assert (tmp_path / 'dest' / 'a.txt').read_text() == 'old'
    assert sorted(os.listdir(tmp_path)) == sorted(['dest', 'new', os.path.basename(tmp)])


def test_preallocate_reserves_the_blocks(tmp_path, monkeypatch):
    path = str(tmp_path / 'f.bin')
    for fallocate in (True, False):
        with open(path, 'wb') as f:
            f.write(b'HEADER')
            f.truncate(6 + (1 << 20))
        assert os.stat(path).st_blocks * 512 < 1 << 20  # sparse: a memory map would fault on a full disk
        if not fallocate:
            monkeypatch.delattr(os, 'posix_fallocate', raising=False)
        with open(path, 'r+b') as f:
            util.preallocate(f, 6, 1 << 20, chunk=1000)
        assert os.stat(path).st_blocks * 512 >= 1 << 20 and os.path.getsize(path) == 6 + (1 << 20)
        with open(path, 'rb') as f:
            assert f.read(6) == b'HEADER' and f.read() == bytes(1 << 20)


def test_disk_errors_are_one_line(tmp_path, monkeypatch):
    dest = str(tmp_path / 'data' / 'out')

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'posix_fallocate', full, raising=False)
    with pytest.raises(dnnlib.UserError) as e:
        with util.disk_errors(dest, 3_500_000), open(tmp_path / 'x', 'wb') as f:
            util.preallocate(f, 0, 10)
    assert str(e.value).startswith(f'Cannot write {dest}: No space left on device (it needs about 3.5 MB, ')
    assert 'free there' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(dnnlib.UserError, match='Read-only file system.*writable place'):
        with util.disk_errors(dest, lambda: 10):
            raise OSError(errno.EROFS, 'ro')
    with pytest.raises(FileNotFoundError):  # not a disk problem: our bug or another one, left as it is
        with util.disk_errors(dest):
            raise FileNotFoundError(errno.ENOENT, 'gone')


@pytest.mark.parametrize('umask,file_mode', [(0o022, 0o644), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, file_mode):
    saved = os.umask(umask)
    try:
        with util.atomic_write(str(tmp_path / 'a.json'), 'w') as f:
            f.write('{}')
        with util.tee_output(str(tmp_path / 'log.txt')):
            print('logged')
        tmp = util.make_temp_dir(str(tmp_path / 'dir'))
    finally:
        os.umask(saved)
    assert os.stat(tmp_path / 'a.json').st_mode & 0o777 == file_mode
    assert os.stat(tmp_path / 'log.txt').st_mode & 0o777 == file_mode
    assert os.stat(tmp).st_mode & 0o777 == file_mode | 0o111


def test_stale_temporaries_are_never_guessed_off_posix(tmp_path, monkeypatch):
    killed = _python(KILLED_WRITER, str(tmp_path / 'a.bin'))
    assert killed.wait(60) == -9
    kills = []
    monkeypatch.setattr(os, 'kill', lambda *args: kills.append(args))  # on Windows it would terminate the process
    with monkeypatch.context() as m:
        m.setattr(os, 'name', 'nt')
        removed = util.remove_stale_temps(str(tmp_path))
    assert kills == [] and removed == [] and len(os.listdir(tmp_path)) == 1
    monkeypatch.undo()
    assert len(util.remove_stale_temps(str(tmp_path))) == 1 and os.listdir(tmp_path) == []


# dnnlib/cli.py: finite floats, seed lists, writable destinations.

import contextlib
import subprocess

import click
from click.testing import CliRunner

from dnnlib import cli


@contextlib.contextmanager
def read_only_dir(path):
    """`path` made a directory nobody can create files in: chmod 555, and for root (whom chmod does not stop) the
    immutable attribute; skips the test where neither works."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)
    immutable = False
    try:
        if _can_write(path) and os.geteuid() == 0:
            immutable = subprocess.run(['chattr', '+i', str(path)], capture_output=True).returncode == 0
        if _can_write(path):
            pytest.skip('cannot make a read-only directory here')
        yield str(path)
    finally:
        if immutable:
            subprocess.run(['chattr', '-i', str(path)], check=True)
        os.chmod(path, 0o755)


def _can_write(path):
    probe = os.path.join(path, '.probe')
    try:
        open(probe, 'w').close()
    except OSError:
        return False
    os.remove(probe)
    return True


def _float_command():
    @click.command()
    @click.option('--x', type=cli.finite_float(min=0, min_open=True))
    @click.option('--y', type=cli.finite_float(min=0, allow_inf=True))
    def command(x, y):
        click.echo(f'{x} {y}')
    return command


@pytest.mark.parametrize('args, error', [
    (['--x=nan'], "'--x': nan is not a number; give a finite number x>0"),
    (['--x=NaN'], "'--x': nan is not a number"),
    (['--x=inf'], "'--x': inf is not finite"),
    (['--x=1e400'], "'--x': inf is not finite"),   # overflows to inf
    (['--x=0'], "'--x': 0.0 is not in the range x>0"),
    (['--y=nan'], "'--y': nan is not a number; give a finite number x>=0 or inf"),
    (['--y=-inf'], "'--y': -inf is not in the range x>=0"),
])
def test_finite_float_refuses_nan_and_inf(args, error):
    result = CliRunner().invoke(_float_command(), args)
    assert result.exit_code == 2 and error in result.output, result.output


def test_finite_float_accepts_numbers_and_allowed_inf():
    result = CliRunner().invoke(_float_command(), ['--x=0.25', '--y=inf'])
    assert result.exit_code == 0 and result.output == '0.25 inf\n', result.output


def _float_options(group):
    @click.command()
    @group
    def command(**kwargs):
        pass
    return command, [p for p in command.params if isinstance(p.type, click.types.FloatParamType)]


@pytest.mark.parametrize('group', [cli.train_options, cli.sampler_options], ids=['train_options', 'sampler_options'])
def test_every_float_flag_of_the_shared_groups_refuses_nan(group):
    command, floats = _float_options(group)
    names = {p.opts[0] for p in floats}
    expected = {'train_options': {'--lr', '--lr-rampup', '--ema', '--dropout', '--augment', '--ls', '--tick'},
                'sampler_options': {'--sigma_min', '--sigma_max', '--rho', '--S_churn', '--S_min', '--S_max', '--S_noise'}}
    assert names == expected[group.__name__]
    for p in floats:
        for value in ['nan', 'inf'] if p.opts[0] != '--S_max' else ['nan']:
            result = CliRunner().invoke(command, [f'{p.opts[0]}={value}'])
            assert result.exit_code == 2 and f"'{p.opts[0]}': {value} is not" in result.output, (p.opts, result.output)
    assert CliRunner().invoke(command, ['--S_max=inf'] if group is cli.sampler_options else []).exit_code == 0


def test_parse_seeds_counts_before_building(monkeypatch):
    assert cli.parse_seeds('3, 0-2,1000') == [3, 0, 1, 2, 1000]
    with pytest.raises(dnnlib.UserError, match=r'--seeds=0-999999999 asks for 1,000,000,000 images, more than 10,000,000'):
        cli.parse_seeds('0-999999999')  # instantly: no list of a billion ints is built first
    monkeypatch.setattr(cli, 'MAX_SEEDS', 10)
    assert cli.parse_seeds('0-9') == list(range(10))
    with pytest.raises(dnnlib.UserError, match='asks for 11 images'):
        cli.parse_seeds('0-4,5-9,100', flag='--seeds')
    for text, match in [('', '--seeds is empty: give seeds such as 0-63'), (' ', '--seeds is empty'),
                        ('5-3', "--seeds=5-3: Bad range '5-3'"), ('1,x', '--seeds=1,x: Bad integer list')]:
        with pytest.raises(dnnlib.UserError, match=match):
            cli.parse_seeds(text)


def test_int_list_refuses_huge_ranges_before_building():
    assert cli.int_list('1,2-4') == [1, 2, 3, 4] and cli.int_list('none') == [] and cli.int_list([2, 2]) == [2, 2]
    assert len(cli.int_list('1-1000')) == 1000

    @click.command()
    @click.option('--cres', type=cli.int_list)
    def command(cres):
        click.echo(cres)
    for value, error in [('1-999999999', "'--cres': 1-999999999 asks for 999,999,999 numbers; give at most 1,000"),
                         ('2,x', "'--cres': Bad integer list '2,x'")]:
        result = CliRunner().invoke(command, [f'--cres={value}'])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit) and error in result.output, result.output


def test_writable_destinations(tmp_path):
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'dir').mkdir()
    cli.check_writable_dir(str(tmp_path / 'new' / 'deeper'), '--outdir')
    cli.check_writable_file(str(tmp_path / 'new' / 'ref.npz'), '--dest')
    cli.check_writable_file(str(tmp_path / 'file'), '--dest')  # replaced atomically
    for check in cli.check_writable_dir, cli.check_writable_file:
        with pytest.raises(dnnlib.UserError, match='--outdir is empty; give a'):
            check('', '--outdir')  # would be the working directory
    cases = [
        (cli.check_writable_dir, 'file', '--outdir=FILE is a file, not a directory'),
        (cli.check_writable_dir, 'file/sub', '--outdir=FILE/sub cannot be written (FILE is not a writable directory)'),
        (cli.check_writable_file, 'dir', '--outdir=DIR is a directory, not a file; give another --outdir'),
        (cli.check_writable_file, 'file/x.npz', '--outdir=FILE/x.npz cannot be written (FILE is not a writable directory)'),
    ]
    for check, name, message in cases:
        with pytest.raises(dnnlib.UserError) as excinfo:
            check(str(tmp_path / name), '--outdir')
        assert excinfo.value.message.startswith(message.replace('FILE', str(tmp_path / 'file')).replace('DIR', str(tmp_path / 'dir')))
    with read_only_dir(tmp_path / 'ro') as ro:
        with pytest.raises(dnnlib.UserError, match='is not a writable directory'):
            cli.check_writable_dir(os.path.join(ro, 'out'), '--outdir')
        with pytest.raises(dnnlib.UserError, match='is not a writable directory'):
            cli.check_writable_dir(ro, '--outdir')
        with pytest.raises(dnnlib.UserError, match=r'--dest=.*ref\.npz cannot be written'):
            cli.check_writable_file(os.path.join(ro, 'ref.npz'), '--dest')
        assert os.listdir(ro) == []
    assert sorted(os.listdir(tmp_path)) == ['dir', 'file', 'ro']  # the checks leave nothing behind
