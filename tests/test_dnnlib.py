"""dnnlib: EasyDict, construction by name, cached open_url against a local HTTP server, atomic writes."""

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
