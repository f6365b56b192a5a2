"""FID: feature detectors, float64 feature statistics reduced over ranks, the Frechet distance, reference files."""

import builtins
import io
import os
import pickle
import sys
import types
import uuid
import warnings
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import scipy.linalg
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed, perf, pickle_compat
from training import inception
from training.checkpoint import error_summary

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
DETECTORS = ('inception', 'dinov2', 'pixels')  # built in and code-free; 'inception-pkl' (EDM's pickle) runs code

#----------------------------------------------------------------------------
# Detectors: __call__(uint8 NCHW images on the detector's device) -> features [N, feature_dim].

class Detector:
    """A feature extractor with a name (stored in reference files) and a fixed feature_dim."""

    def __init__(self, name: str, feature_dim: int, device: torch.device):
        self.name, self.feature_dim, self.device = name, int(feature_dim), torch.device(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PickleDetector(Detector):
    """A pickled network called as net(images, return_features=True), like EDM's Inception-v3 pickle."""

    def __init__(self, name: str, net: Any, device: torch.device, image_shape: Sequence[int] | None = None):
        self.net = net.to(device) if hasattr(net, 'to') else net
        if hasattr(self.net, 'eval'):
            self.net.eval()
        feature_dim = getattr(net, 'feature_dim', None)
        if feature_dim is None:
            if name == 'inception':
                feature_dim = 2048  # EDM's pickle: Inception-v3 pool features
            else:
                # Probe once; this also rejects pickles that are not detectors with a clear message.
                c, h, w = image_shape or (3, 64, 64)
                try:
                    feature_dim = self(torch.zeros([1, c, h, w], dtype=torch.uint8, device=device)).shape[1]
                except Exception as e:
                    raise UserError(f'Detector {name} failed on a test batch (expected net(uint8 NCHW, return_features=True) '
                                    f'-> [N, D]): {type(e).__name__}: {e}')
        super().__init__(name, feature_dim, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])  # grey images as RGB, as EDM does
        return self.net(images, return_features=True).reshape(images.shape[0], -1)


class InceptionDetector(Detector):
    """training.inception's code-free Inception-v3 (2048-d pool features; grey images repeated to RGB)."""

    def __init__(self, net: inception.InceptionV3, device: torch.device):
        self.net = net.to(device).eval()
        super().__init__('inception', inception.FEATURE_DIM, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class PixelsDetector(Detector):
    """Raw pixels in [-1, 1] as features (dim C*H*W): a small-scale stand-in when no Inception weights exist.

    Its 'FID' is a Frechet distance in pixel space: comparable only with itself, never with published FIDs.
    """

    def __init__(self, image_shape: Sequence[int], device: torch.device):
        super().__init__('pixels', int(np.prod(image_shape)), device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(images.shape[0], -1).to(torch.float32) / 127.5 - 1


class DINOv2Detector(Detector):
    """DINOv2 ViT-L/14 features (1024-d) of images resized to 224x224 and ImageNet-normalised (FD_DINOv2)."""

    def __init__(self, device: torch.device):
        torch.hub.set_dir(dnnlib.util.make_cache_dir_path('torch_hub'))
        try:
            self.model = torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14', trust_repo=True, verbose=False,
                                        skip_validation=True)
        except Exception as e:
            raise UserError(f'Cannot load DINOv2 through torch.hub (the first use needs internet access to GitHub and '
                            f'dl.fbaipublicfiles.com; later uses read the cache in {torch.hub.get_dir()}): '
                            f'{type(e).__name__}: {e}')
        self.model.to(device).eval().requires_grad_(False)
        super().__init__('dinov2', 1024, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])
        x = torch.nn.functional.interpolate(images.to(torch.float32), size=(224, 224), mode='bicubic', antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).reshape(1, 3, 1, 1)
        return self.model((x / 255 - mean) / std)

#----------------------------------------------------------------------------
# Loading detector pickles. Unlike networks (training.checkpoint, code-free), a detector pickle is
# unpickled with code execution, as in EDM: it is only ever a file or URL the user named.

def _persistent_module_shim(name: str, globals=None, locals=None, fromlist=(), level=0):
    """__import__ for code embedded in EDM pickles: torch_utils is torch_utils.pickle_compat's stand-in package
    (an identity persistence.persistent_class, EDM's misc extras, ops.conv2d_gradfix and ops.bias_act)."""
    if level != 0 or name.split('.')[0] != 'torch_utils':
        return builtins.__import__(name, globals, locals, fromlist, level)
    return pickle_compat.import_torch_utils(name, fromlist)


def _run_persistent_obj(meta: dict) -> Any:
    """EDM's persistent-object format (version 6): run the embedded module source, rebuild the object."""
    if meta.get('type') != 'class' or meta.get('version') != 6:
        raise UserError(f'Unsupported persistent object in detector pickle (type {meta.get("type")!r}, '
                        f'version {meta.get("version")!r})')
    module = types.ModuleType(f'_detector_module_{uuid.uuid4().hex}')
    module.__dict__['__builtins__'] = {**builtins.__dict__, '__import__': _persistent_module_shim}
    sys.modules[module.__name__] = module
    exec(meta['module_src'], module.__dict__)  # noqa: S102 - the user chose to trust this file
    cls = module.__dict__[meta['class_name']]
    obj = cls.__new__(cls)
    if callable(getattr(obj, '__setstate__', None)):
        obj.__setstate__(meta['state'])
    else:
        obj.__dict__.update(meta['state'])
    return obj


class _DetectorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return _run_persistent_obj
        return super().find_class(module, name)


def _load_detector_file(path_or_url: str, device: torch.device) -> Any:
    with dnnlib.util.open_url(path_or_url, verbose=distributed.is_main()) as f:
        data = f.read()
    try:
        if data[:2] == b'PK':  # a TorchScript archive (e.g. StyleGAN2-ADA's inception-2015-12-05.pt)
            return torch.jit.load(io.BytesIO(data), map_location=device)
        return _DetectorUnpickler(io.BytesIO(data)).load()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f'Cannot load detector {path_or_url}: not a readable detector pickle or TorchScript file '
                        f'({error_summary(e)})')


def load_detector(name_or_path: str, device: torch.device | str = 'cpu',
                  image_shape: Sequence[int] | None = None) -> Detector:
    """'inception' (training.inception with pytorch-fid's weights, downloaded once into the dnnlib cache; no code
    runs), 'inception-pkl' (EDM's Inception-v3 pickle), 'dinov2', 'pixels' (needs image_shape [C, H, W]), an
    Inception state dict (.pth, e.g. from fid.py convert-inception), or a detector pickle / TorchScript file or URL.

    Pickles run code from the file: load only files you trust.
    """
    device = torch.device(device)
    if name_or_path == 'pixels':
        if image_shape is None:
            raise UserError("The 'pixels' detector needs the image shape")
        return PixelsDetector(image_shape, device)
    if name_or_path == 'dinov2':
        return DINOv2Detector(device)
    if name_or_path == 'inception':
        return InceptionDetector(inception.load_inception(inception.FID_WEIGHTS_URL, device), device)
    if name_or_path == 'inception-pkl':  # the same features as 'inception', computed by the pickle's own code
        return PickleDetector('inception', _load_detector_file(INCEPTION_URL, device), device)
    if not dnnlib.util.is_url(name_or_path, allow_file_urls=True) and not os.path.isfile(name_or_path):
        raise UserError(f'No detector {name_or_path!r}: use {", ".join(DETECTORS)}, inception-pkl, an Inception .pth '
                        f'or a detector pickle path/URL')
    name = os.path.basename(name_or_path.rstrip('/'))
    if name.endswith('.pth'):
        return InceptionDetector(inception.load_inception(name_or_path, device), device)
    return PickleDetector(name, _load_detector_file(name_or_path, device), device, image_shape)

#----------------------------------------------------------------------------
# Feature statistics.

class FeatureStats:
    """Running float64 sums of features and their outer products; reduce over ranks before reading."""

    def __init__(self, feature_dim: int, device: torch.device | str = 'cpu'):
        self.feature_dim = int(feature_dim)
        self.num = 0
        self.sum = torch.zeros([feature_dim], dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros([feature_dim, feature_dim], dtype=torch.float64, device=device)

    def append(self, features: torch.Tensor) -> None:
        features = features.to(self.sum.device, torch.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise UserError(f'Detector returned features of shape {list(features.shape)}, expected [N, {self.feature_dim}]')
        self.num += features.shape[0]
        self.sum += features.sum(0)
        self.sum_outer += features.T @ features

    def all_reduce(self) -> 'FeatureStats':
        """Sums over all ranks (a collective: every rank must call it)."""
        out = FeatureStats(self.feature_dim, self.sum.device)
        out.num = int(distributed.all_reduce_sum(torch.tensor([self.num], dtype=torch.float64)).item())
        out.sum = distributed.all_reduce_sum(self.sum)
        out.sum_outer = distributed.all_reduce_sum(self.sum_outer)
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (float64 numpy), as EDM computes them."""
        if self.num < 2:
            raise UserError(f'Need at least 2 images for feature statistics, got {self.num}')
        mu = self.sum / self.num
        sigma = (self.sum_outer - torch.outer(mu, mu) * self.num) / (self.num - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


@torch.no_grad()
def compute_feature_stats(images: Iterable[torch.Tensor], detector: Detector) -> FeatureStats:
    """Feature statistics of uint8 NCHW batches from this rank, summed over all ranks (collective)."""
    stats = FeatureStats(detector.feature_dim, detector.device)
    for batch in images:
        batch = torch.as_tensor(batch)
        if batch.dtype != torch.uint8:
            raise TypeError(f'compute_feature_stats expects uint8 images, got {batch.dtype}')
        if batch.shape[0]:
            stats.append(detector(batch.to(detector.device)))
    return stats.all_reduce()


def dataset_batches(dataset: torch.utils.data.Dataset, batch_size: int = 64, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """This rank's shard of a dataset as uint8 NCHW batches; float images ([-1, 1] units) are rounded as EDM's sampler output."""
    from training.images import to_uint8
    shard = distributed.shard(len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    for images, _labels in loader:
        yield images if images.dtype == torch.uint8 else to_uint8(images)


def open_images(path: str, num: int | None = None, seed: int = 0) -> torch.utils.data.Dataset:
    """A folder/zip of PNGs or an array dataset: all its images, or `num` of them drawn with `seed` (fewer is an error)."""
    from training.dataset import open_dataset
    if not os.path.exists(path):
        raise UserError(f'No such file or directory: {path}')
    dataset = open_dataset(path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise UserError(f'{path} holds {len(dataset)} images, fewer than the {num} requested: give --num={len(dataset)} '
                        f'or less, or more images')
    if len(dataset) < 2:
        raise UserError(f'{path} holds {len(dataset)} image(s); statistics need at least 2')
    return dataset


def network_feature_stats(net: torch.nn.Module, seeds: Sequence[int], detector: Detector, batch_size: int = 64,
                          device: torch.device | str | None = None, sampler_kwargs: dict | None = None,
                          class_idx: int | None = None) -> FeatureStats:
    """Statistics of images generated in memory for `seeds`, sharded over ranks (collective)."""
    from training.generation import generate_images
    batches = (images for _seeds, images in generate_images(net, seeds, batch_size=batch_size, device=device,
                                                            sampler_kwargs=sampler_kwargs, class_idx=class_idx))
    return compute_feature_stats(batches, detector)

#----------------------------------------------------------------------------
# The Frechet distance and reference statistics.

def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """scipy.linalg.sqrtm, returning the reasons it is unreliable instead of scipy's own warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        root = scipy.linalg.sqrtm(a)
    problems = [' '.join(str(w.message).split()) for w in caught]
    if not np.isfinite(root).all():
        return root, problems + ['non-finite entries']
    if np.iscomplexobj(root):
        imag = np.abs(root.imag).max()
        if imag > 1e-3 * max(np.abs(root.real).max(), 1e-300):
            problems.append(f'imaginary part up to {imag:.3g}')
        root = root.real
    rel_error = np.linalg.norm(root @ root - a) / max(np.linalg.norm(a), 1e-300)
    if rel_error > 1e-3:
        problems.append(f'relative error {rel_error:.3g}')
    return root, problems


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)); warns (RuntimeWarning) when the square root is unreliable."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f'Statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}')
    covmean, problems = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular covariances: the usual remedy is a small ridge on both diagonals.
        ridge = np.eye(sigma1.shape[0]) * 1e-6
        covmean, more = _sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
        problems += ['retried with 1e-6 added to the diagonals'] + more
    if problems:
        warnings.warn(f'FID is numerically unreliable: sqrtm(S1 S2) reported {"; ".join(problems)}. Usually the '
                      f'covariances are singular because there are fewer images than feature dimensions '
                      f'({sigma1.shape[0]}).', RuntimeWarning, stacklevel=2)
    fid = np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(fid)


def save_ref(path: str, stats: FeatureStats, detector: Detector) -> None:
    """Write reference statistics: mu, sigma, detector name, feature_dim, num_images (atomic .npz)."""
    mu, sigma = stats.mean_cov()
    with dnnlib.util.atomic_write(path) as f:
        np.savez(f, mu=mu, sigma=sigma, detector=np.array(detector.name), feature_dim=np.array(detector.feature_dim),
                 num_images=np.array(stats.num))


def load_ref(path_or_url: str, expected_dim: int | None = None, detector: str | None = None) -> dict[str, Any]:
    """Read reference statistics (.npz path or URL) as {'mu', 'sigma', 'detector' (or None)}; check their shape.

    EDM's published files hold only mu and sigma (Inception, 2048-d); ours also name their detector,
    which must then match `detector`.
    """
    fix = 'give a .npz from fid.py ref or EDM\'s published one'
    with dnnlib.util.open_url(path_or_url, verbose=distributed.is_main()) as f:
        raw = f.read()
    if not raw.startswith(b'PK'):  # .npz files are zip archives
        pickled = ' (it is a Python pickle; it was not loaded)' if raw.startswith(b'\x80') else ''
        raise UserError(f'{path_or_url} is not a .npz file of reference statistics{pickled}: {fix}')
    try:
        data = dict(np.load(io.BytesIO(raw), allow_pickle=False))
    except ValueError as e:
        if 'allow_pickle' not in str(e):
            raise UserError(f'Cannot read reference statistics {path_or_url}: {error_summary(e)}')
        raise UserError(f'{path_or_url} holds pickled Python objects, so it is not reference statistics (a .npz of '
                        f'arrays); it was not loaded: {fix}')
    except Exception as e:
        raise UserError(f'Cannot read reference statistics {path_or_url}: {error_summary(e)}')
    if 'mu' not in data or 'sigma' not in data:
        raise UserError(f'{path_or_url} is not a reference statistics file: it needs arrays mu and sigma')
    mu, sigma = data['mu'].astype(np.float64), data['sigma'].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(f'{path_or_url}: mu has shape {list(mu.shape)} and sigma {list(sigma.shape)}; expected [D] and [D, D]')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f'{path_or_url} holds non-finite statistics')
    ref = dict(mu=mu, sigma=sigma, detector=str(data['detector']) if 'detector' in data else None, path=path_or_url)
    check_ref(ref, expected_dim, detector)
    return ref


def check_ref(ref: dict[str, Any], expected_dim: int | None = None, detector: str | None = None) -> None:
    """Raise UserError unless the reference has `expected_dim` features from `detector` (when it names one)."""
    if expected_dim is not None and ref['mu'].size != expected_dim:
        raise UserError(f'{ref["path"]} holds {ref["mu"].size}-d statistics, but detector {detector or ""} gives '
                        f'{expected_dim}-d features: use the detector the reference was made with')
    if detector is not None and ref['detector'] is not None and ref['detector'] != detector:
        raise UserError(f'{ref["path"]} was computed with detector {ref["detector"]!r}, not {detector!r}')


def detector_for_ref(detector: str | None, ref: dict[str, Any]) -> str:
    """The detector asked for, else the reference's built-in one, else 'inception'.

    A reference is data: its detector field never selects a file or URL, whose loading could run code.
    """
    if detector is not None:
        return detector
    named = ref['detector']
    if named is not None and named not in DETECTORS:
        raise UserError(f'{ref["path"]} names detector {named!r}, which is not built in ({", ".join(DETECTORS)}); '
                        f'a reference never loads one: pass --detector={named} explicitly if you trust that file')
    return named or 'inception'


def fid_from_stats(stats: FeatureStats, ref: dict[str, Any]) -> float:
    """FID of reduced statistics against a reference; computed on rank 0, returned on every rank (collective)."""
    fid = None
    if distributed.is_main():
        mu, sigma = stats.mean_cov()
        fid = frechet_distance(mu, sigma, ref['mu'], ref['sigma'])
    return distributed.broadcast_object(fid)

#----------------------------------------------------------------------------
# What the fid.py commands do.

def make_ref(data_path: str, dest: str, detector: str = 'inception', batch_size: int = 64,
             device: torch.device | str = 'cpu', num_workers: int = 0) -> FeatureStats:
    """Reference statistics of every image of a dataset, saved to `dest` by rank 0 (collective)."""
    dataset = open_images(data_path)
    det = load_detector(detector, device, image_shape=dataset.image_shape)
    stats = compute_feature_stats(dataset_batches(dataset, batch_size, num_workers), det)
    if distributed.is_main():
        save_ref(dest, stats, det)
    return stats


def calc_fid(image_path: str, ref_path: str, detector: str | None = None, num: int | None = None, seed: int = 0,
             batch_size: int = 64, device: torch.device | str = 'cpu', num_workers: int = 0) -> float:
    """FID of `num` images of a folder/zip/array dataset (all if None) against a reference (collective).

    detector=None uses the built-in one the reference names, else Inception (detector_for_ref). Everything
    is checked before any features are computed.
    """
    ref = load_ref(ref_path, detector=detector if detector in DETECTORS else None)
    dataset = open_images(image_path, num=num, seed=seed)
    det = load_detector(detector_for_ref(detector, ref), device, image_shape=dataset.image_shape)
    check_ref(ref, det.feature_dim, det.name)
    stats = compute_feature_stats(dataset_batches(dataset, batch_size, num_workers), det)
    return fid_from_stats(stats, ref)


def calc_network_fids(net: torch.nn.Module, ref_path: str, num: int = 50000, repeats: int = 3, seed: int = 0,
                      detector: str | None = None, batch_size: int = 64, device: torch.device | str = 'cpu',
                      sampler_kwargs: dict | None = None, class_idx: int | None = None, precision: str = 'fp32',
                      channels_last: bool = False, compile: bool = False) -> list[float]:
    """FIDs of `repeats` disjoint seed sets [seed + r*num, seed + (r+1)*num), generated in memory (collective).

    precision, channels_last and compile apply to the network (perf.prepare_for_inference); the detector stays fp32.
    """
    from training.generation import check_class
    check_class(net, class_idx)
    net = perf.prepare_for_inference(net, precision=precision, channels_last=channels_last, compile=compile)
    ref = load_ref(ref_path, detector=detector if detector in DETECTORS else None)
    det = load_detector(detector_for_ref(detector, ref), device,
                        image_shape=[net.img_channels, net.img_resolution, net.img_resolution])
    check_ref(ref, det.feature_dim, det.name)
    fids = []
    for r in range(repeats):
        seeds = range(seed + r * num, seed + (r + 1) * num)
        stats = network_feature_stats(net, seeds, det, batch_size=batch_size, device=device,
                                      sampler_kwargs=sampler_kwargs, class_idx=class_idx)
        fids.append(fid_from_stats(stats, ref))
        distributed.print0(f'seeds {seeds.start}-{seeds.stop - 1}: FID {fids[-1]:g}')
    return fids

#----------------------------------------------------------------------------
# Our Inception against EDM's pickle: what fid.py convert-inception and check-inception do.

@torch.no_grad()
def convert_inception_pickle(src: str, dest: str, device: torch.device | str = 'cpu') -> float:
    """EDM's Inception pickle -> an Inception state dict at `dest` (for load_detector), written only if both networks
    give the same features on random images; returns their largest difference relative to the largest feature.

    Runs the pickle's code: convert only a file you trust.
    """
    device = torch.device(device)
    pkl = PickleDetector('inception', _load_detector_file(src, device), device)
    if not callable(getattr(pkl.net, 'state_dict', None)):
        raise UserError(f'{src} does not hold a torch module')
    net = inception.InceptionV3()
    net.load_state_dict(inception.state_dict_from_edm(pkl.net.state_dict()))
    ours = InceptionDetector(net, device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, [2, 3, 64, 64], dtype=torch.uint8, generator=gen).to(device)
    expected, features = pkl(images), ours(images)
    if expected.shape != features.shape:
        raise UserError(f'{src} gives features of shape {list(expected.shape)}, not {list(features.shape)}')
    difference = ((features - expected).abs().max() / expected.abs().max()).item()
    if not difference <= 1e-3:
        raise UserError(f'The converted network differs from {src} by up to {difference:.3g} of the largest feature; '
                        f'{dest} not written')
    with dnnlib.util.atomic_write(dest) as f:
        torch.save(net.cpu().state_dict(), f)
    return difference


@torch.no_grad()
def compare_detectors(image_path: str, names: Sequence[str] = ('inception', 'inception-pkl'), num: int = 1000,
                      seed: int = 0, batch_size: int = 64, device: torch.device | str = 'cpu',
                      num_workers: int = 0) -> dict[str, Any]:
    """Two detectors on the same `num` images of a dataset (one process): the largest feature difference, the
    largest feature, and each detector's FID between the first and the second half of the images.

    Those FIDs add 1e-6 to both covariance diagonals: with fewer images than feature dimensions the covariances
    are singular, and the ridge keeps the two FIDs comparable with each other (not with FIDs of 50,000 images).
    """
    dataset = open_images(image_path, num=num, seed=seed)
    dets = [load_detector(name, device, image_shape=dataset.image_shape) for name in names]
    if dets[0].feature_dim != dets[1].feature_dim:
        raise UserError(f'Detectors {names[0]} and {names[1]} give {dets[0].feature_dim}-d and {dets[1].feature_dim}-d features')
    features = [[], []]
    for batch in dataset_batches(dataset, batch_size, num_workers):
        for out, det in zip(features, dets):
            out.append(det(batch.to(det.device)).to('cpu', torch.float64))
    features = [torch.cat(f) for f in features]
    half = len(dataset) // 2
    ridge = np.eye(dets[0].feature_dim) * 1e-6
    fids = []
    for f in features:
        halves = []
        for part in (f[:half], f[half:]):
            stats = FeatureStats(f.shape[1])
            stats.append(part)
            mu, sigma = stats.mean_cov()
            halves += [mu, sigma + ridge]
        fids.append(frechet_distance(*halves))
    return dict(num=len(dataset), max_diff=(features[0] - features[1]).abs().max().item(),
                max_feature=features[1].abs().max().item(), fids=fids)
