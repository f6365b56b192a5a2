"""Tests for training/checkpoint.py and torch_utils/persistence.py: round trips, EDM pickles, bad files."""

import os
import pickle

import pytest
import torch

import dnnlib
from torch_utils import persistence
from training import augment, checkpoint, loss, networks

#----------------------------------------------------------------------------

def _tiny_net(seed=0):
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type='SongUNet', model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], embedding_type='fourier',
                              encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], augment_dim=9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial outputs despite zero-initialised layers
    return net


def _outputs(net):
    torch.manual_seed(123)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 0.5, 20.0])
    return net.eval()(x, sigma, torch.eye(2)[[0, 1, 0]], augment_labels=torch.randn(3, 9))


def _assert_one_line_user_error(excinfo):
    assert '\n' not in excinfo.value.message

#----------------------------------------------------------------------------

def test_snapshot_round_trip_is_bit_exact(tmp_path):
    net = _tiny_net()
    path = str(tmp_path / 'network-snapshot-000001.pt')
    checkpoint.save_network(path, net, augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.12),
                            dataset_kwargs=dict(path='data.zip'), kimg=1.5, meta=dict(seed=3))
    loaded = checkpoint.load_network(path)
    assert type(loaded) is networks.EDMPrecond and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(_outputs(loaded), _outputs(net))
    assert [p for p in os.listdir(tmp_path)] == ['network-snapshot-000001.pt']  # atomic write left no temporary
    info = checkpoint.load_snapshot_info(f'file://{path}')
    assert (info.kind, info.kimg, info.dataset_kwargs, info.meta) == ('snapshot', 1.5, dict(path='data.zip'), dict(seed=3))
    assert info.augment_kwargs['p'] == 0.12 and info.init_kwargs == net.init_kwargs


def test_training_state_round_trip_and_its_ema(tmp_path):
    net, ema = _tiny_net(0), _tiny_net(1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    _outputs(net.train()).square().mean().backward()
    optimizer.step()
    path = str(tmp_path / 'training-state-000002.pt')
    rng = {'world_size': 1, 'ranks': [{'cpu': torch.get_rng_state(), 'cuda': None}]}
    checkpoint.save_training_state(path, net=net, ema=ema, optimizer=optimizer, cur_nimg=2048, cur_tick=3, rng=rng,
                                   options=dict(dataset_kwargs=dict(path='d'), augment_kwargs=None))
    state = checkpoint.load_training_state(path)
    assert (state['cur_nimg'], state['cur_tick'], state['class_name']) == (2048, 3, 'training.networks.EDMPrecond')
    assert torch.equal(state['rng']['ranks'][0]['cpu'], rng['ranks'][0]['cpu'])
    restored = torch.optim.Adam(_tiny_net().parameters(), lr=1e-3)
    restored.load_state_dict(state['optimizer'])
    assert torch.equal(restored.state_dict()['state'][0]['exp_avg'], optimizer.state_dict()['state'][0]['exp_avg'])
    assert torch.equal(_outputs(checkpoint.load_network(path)), _outputs(ema))  # the EMA, not the raw weights
    assert checkpoint.load_snapshot_info(path).kimg == 2.048


def test_rebuild_from_class_name_and_init_kwargs():
    net = _tiny_net()
    twin = dnnlib.util.construct_class_by_name(class_name=checkpoint.network_class_name(net), **net.init_kwargs)
    twin.load_state_dict(net.state_dict())
    assert torch.equal(_outputs(twin), _outputs(net))

#----------------------------------------------------------------------------
# EDM pickles: written here the way EDM's torch_utils.persistence (format 6) writes them.

class EDMStylePickler(pickle.Pickler):
    """Pickles our objects as EDM persistent objects; their module source would fail if anyone ran it."""

    def reducer_override(self, obj):
        if type(obj).__module__.startswith('training.'):
            state = {k: v for k, v in vars(obj).items() if k != 'init_kwargs'}
            state.update(_init_args=(), _init_kwargs=dict(getattr(obj, 'init_kwargs', {})))
            meta = dict(type='class', version=6, module_src='raise RuntimeError("module source was executed")',
                        class_name=type(obj).__name__, state=state)
            return persistence._reconstruct_persistent_obj, (meta,)
        return NotImplemented


def _write_edm_pickle(path, net):
    data = dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=augment.AugmentPipe(p=0.12, xflip=1e8, scale=1),
                dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='cifar10.zip'))
    with open(path, 'wb') as f:
        EDMStylePickler(f, protocol=4).dump(data)


def test_edm_pickle_loads_into_our_class_without_running_code(tmp_path):
    net = _tiny_net()
    path = str(tmp_path / 'edm-cifar10-32x32-uncond-vp.pkl')
    _write_edm_pickle(path, net)
    loaded = checkpoint.load_network(path)
    assert type(loaded) is networks.EDMPrecond
    assert torch.equal(_outputs(loaded), _outputs(net))
    info = checkpoint.load_snapshot_info(path)
    assert info.kind == 'edm-pickle' and info.dataset_kwargs['path'] == 'cifar10.zip'
    assert info.augment_kwargs == dict(class_name='training.augment.AugmentPipe', p=0.12, xflip=1e8, scale=1)
    with open(path, 'rb') as f:  # plain pickle.load gives inert records, never executed source
        assert isinstance(pickle.load(f)['ema'], persistence.PersistentRecord)


def test_pickle_with_other_globals_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())
    path = str(tmp_path / 'evil.pkl')
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=Evil()), f)
    with pytest.raises(dnnlib.UserError, match='it needs posix.getcwd, which no EDM network pickle uses; nothing in it was run') as excinfo:
        checkpoint.load_network(path)
    _assert_one_line_user_error(excinfo)


def test_wrong_kinds_and_truncated_files_are_user_errors(tmp_path):
    net = _tiny_net()
    good_pt, good_pkl = str(tmp_path / 'net.pt'), str(tmp_path / 'net.pkl')
    checkpoint.save_network(good_pt, net)
    _write_edm_pickle(good_pkl, net)
    bad = {
        'text.pt': b'hello, not a network\n',
        'dict.pt': None,
        'list.pkl': pickle.dumps([1, 2, 3]),
        'truncated.pt': open(good_pt, 'rb').read()[:5000],
        'truncated.pkl': open(good_pkl, 'rb').read()[:5000],
        'empty.pt': b'',
    }
    for name, data in bad.items():
        path = str(tmp_path / name)
        if data is None:
            torch.save({'weights': torch.zeros(3)}, path)
        else:
            with open(path, 'wb') as f:
                f.write(data)
        with pytest.raises(dnnlib.UserError) as excinfo:
            checkpoint.load_network(path)
        _assert_one_line_user_error(excinfo)
    with pytest.raises(dnnlib.UserError, match='not a training state'):
        checkpoint.load_training_state(good_pt)
    with pytest.raises(dnnlib.UserError, match='No such file'):
        checkpoint.load_network(str(tmp_path / 'missing.pt'))


def test_check_network_matches():
    net = _tiny_net()
    checkpoint.check_network_matches(net, 8, 3)
    with pytest.raises(dnnlib.UserError, match='8x8 images with 3 channels; the data has 32x32 with 3'):
        checkpoint.check_network_matches(net, 32, 3)

#----------------------------------------------------------------------------
# Files that are not what they claim, and networks too large to build.

def snapshot_dict(init_kwargs, state_dict=None, **changes):
    data = dict(format=checkpoint.SNAPSHOT_FORMAT, version=checkpoint.VERSION, class_name='training.networks.EDMPrecond',
                init_kwargs=init_kwargs, state_dict={} if state_dict is None else state_dict, augment_kwargs=None,
                dataset_kwargs=None, kimg=0.0, meta={})
    data.update(changes)
    return data


TINY = dict(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8, channel_mult=[1, 1], num_blocks=1,
            attn_resolutions=[], dropout=0)


@pytest.mark.parametrize('class_name, model_type', [('EDMPrecond', 'SongUNet'), ('VPPrecond', 'SongUNet'),
                                                    ('VEPrecond', 'DhariwalUNet'), ('iDDPMPrecond', 'DhariwalUNet')])
def test_network_size_is_what_building_allocates(class_name, model_type):
    kwargs = dict(TINY, model_type=model_type)
    if model_type == 'DhariwalUNet':
        del kwargs['dropout']
    net = getattr(networks, class_name)(**kwargs)
    tensors = [*net.parameters(), *net.buffers()]
    assert checkpoint.network_size(class_name, kwargs) == (sum(p.numel() for p in net.parameters()),
                                                           sum(t.numel() * t.element_size() for t in tensors))


def test_network_size_of_the_paper_network():
    kwargs = dict(img_resolution=32, img_channels=3, model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                  decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, augment_dim=9,
                  channel_mult=[2, 2, 2])
    assert checkpoint.network_size('training.networks.EDMPrecond', kwargs)[0] == 55_733_891  # EDM's CIFAR-10 DDPM++


def test_a_network_larger_than_memory_is_refused_with_its_size(tmp_path, monkeypatch):
    huge = str(tmp_path / 'huge.pt')
    torch.save(snapshot_dict(dict(TINY, model_channels=100_000)), huge)
    with pytest.raises(dnnlib.UserError, match=r'huge\.pt describes a network \(EDMPrecond\) of [\d,]+ parameters '
                                               r'\([\d,.]+ GiB\), more than the [\d,.]+ GiB of memory available on cpu') as excinfo:
        checkpoint.load_network(huge)
    _assert_one_line_user_error(excinfo)
    params = int(excinfo.value.message.split(' of ')[1].split(' parameters')[0].replace(',', ''))
    assert params > 100_000 ** 2  # at least one 100,000 x 100,000 weight matrix
    # At the limit: a real network's bytes, with one byte less (or more) available.
    net_path = str(tmp_path / 'net.pt')
    net = networks.EDMPrecond(**TINY)
    checkpoint.save_network(net_path, net)
    size = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    monkeypatch.setattr(checkpoint, 'available_memory', lambda device: size - 1)
    with pytest.raises(dnnlib.UserError, match='more than the 0.0 GiB of memory available on cpu'):
        checkpoint.load_network(net_path)
    monkeypatch.setattr(checkpoint, 'available_memory', lambda device: size)
    assert isinstance(checkpoint.load_network(net_path), networks.EDMPrecond)
    # The device the network goes to counts too (refused before anything is moved there).
    monkeypatch.setattr(checkpoint, 'available_memory', lambda device: size if torch.device(device).type == 'cpu' else size - 1)
    with pytest.raises(dnnlib.UserError, match='available on cuda:1'):
        checkpoint.load_network(net_path, device='cuda:1')


def test_a_network_of_too_many_modules_is_refused_while_counting(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, 'MAX_MODULES', 40)
    path = str(tmp_path / 'deep.pt')
    torch.save(snapshot_dict(dict(TINY, num_blocks=1000)), path)
    registered = []
    hook = torch.nn.modules.module.register_module_module_registration_hook(lambda *args: registered.append(1))
    try:
        with pytest.raises(dnnlib.UserError, match=r'deep\.pt describes a network \(EDMPrecond\) of more than 40 modules') as excinfo:
            checkpoint.load_network(path)
    finally:
        hook.remove()
    _assert_one_line_user_error(excinfo)
    assert len(registered) <= 41  # stopped at the first module too many, not after the 1000 blocks' thousands


class WritesMarker:
    """Pickles as a call of open(marker, 'w'): loading it with code execution creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_files_that_are_not_ours_get_one_line_each_and_never_run(tmp_path):
    marker = tmp_path / 'MARKER'
    net = _tiny_net()
    good = str(tmp_path / 'good.pt')
    checkpoint.save_network(good, net)
    code_pt, code_pkl = tmp_path / 'code.pt', tmp_path / 'code.pkl'
    torch.save(snapshot_dict(net.init_kwargs, hook=WritesMarker(marker)), code_pt)
    code_pkl.write_bytes(pickle.dumps(dict(ema=WritesMarker(marker))))
    pickle.loads(code_pkl.read_bytes())['ema'].close()  # the hostile files are real: unrestricted loading runs them
    assert marker.exists()
    marker.unlink()
    (tmp_path / 'truncated.pt').write_bytes(open(good, 'rb').read()[:3000])
    (tmp_path / 'other.pkl').write_bytes(pickle.dumps({'weights': [1, 2]}))
    state = {k: v[:1] for k, v in net.state_dict().items()}
    torch.save(snapshot_dict(net.init_kwargs, state), tmp_path / 'shapes.pt')
    torch.save(snapshot_dict(net.init_kwargs, class_name=None), tmp_path / 'noclass.pt')
    torch.save(snapshot_dict(dict(net.init_kwargs, model_channels='wide')), tmp_path / 'badargs.pt')
    expected = {
        'code.pt': 'code.pt holds Python objects beyond tensors (io.open), so it is not one of our snapshots; it was '
                   'not run (network files are read weights-only). Give a network-snapshot-*.pt',
        'code.pkl': 'code.pkl is a pickle but not an EDM network pickle: it needs io.open, which no EDM network '
                    'pickle uses; nothing in it was run. Give an EDM network .pkl',
        'truncated.pt': 'truncated.pt is truncated or corrupt (RuntimeError: PytorchStreamReader failed reading zip archive: '
                        'failed finding central directory): copy or download it again',
        'other.pkl': 'other.pkl is a pickle but not an EDM network pickle (it holds no "ema" network): give an EDM network pickle',
        'shapes.pt': 'shapes.pt: weights do not fit EDMPrecond (Error(s) in loading state_dict for EDMPrecond: size mismatch',
        'noclass.pt': "noclass.pt claims to be a snapshot but its 'class_name' is missing or malformed: the file is corrupt",
        'badargs.pt': 'Cannot build EDMPrecond from the arguments in',
    }
    for name, message in expected.items():
        with pytest.raises(dnnlib.UserError) as excinfo:
            checkpoint.load_network(str(tmp_path / name))
        _assert_one_line_user_error(excinfo)
        assert message in excinfo.value.message and len(excinfo.value.message) < 400, (name, excinfo.value.message)
    assert not marker.exists()

#----------------------------------------------------------------------------
