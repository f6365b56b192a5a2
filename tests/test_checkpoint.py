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
    with pytest.raises(dnnlib.UserError, match='refusing to load posix.getcwd') as excinfo:
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
