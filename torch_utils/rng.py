"""Random numbers keyed by sample, never by rank, batch or world size.

`BatchRandom` is a counter-based generator: every value is a pure function of (seed, global row,
position in that row's stream), computed with Philox4x32-10 (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011; cuRAND's and torch's CUDA generator) in vectorised torch
ops on the tensors' own device. A rank therefore computes only its own rows (cost proportional to
them, nothing of the size of the global batch, no host-to-device copy), and the bits depend
neither on the split of the batch nor on the device or the number of threads:
- Philox runs on int64 tensors holding 32-bit words; every product is a 32-bit word times a 16-bit
  half of a multiplier (< 2^48), so nothing overflows and every device computes the same integers.
- Floats are made from those integers with IEEE-754 basic operations only (+, -, *, /, sqrt, each
  one torch op, so no fused multiply-add), which every CPU and CUDA device rounds identically. Box-
  Muller's log, sin and cos are therefore short polynomials of our own: torch computes those
  functions with different code per device (SLEEF per CPU instruction set, CUDA's libdevice), whose
  last bits need not agree, and a CPU test could then not pin what a GPU run draws.
Per-row torch.Generator objects were the alternative; they cost one kernel launch per row and per
draw, and their bits differ between CPU and CUDA.
"""

import functools
import math
from typing import Sequence

import numpy as np
import torch

#----------------------------------------------------------------------------

def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative integer keys, e.g. (seed, iteration, index)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class StackedRandomGenerator:
    """One torch.Generator per sample; row i of every draw depends only on seeds[i]."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=g, device=self.device, **kwargs) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout)

    def rand(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.rand(size[1:], generator=g, device=self.device, **kwargs) for g in self.generators])

    def randint(self, *args, size: Sequence[int], **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, device=self.device, **kwargs) for g in self.generators])

#----------------------------------------------------------------------------
# Philox4x32-10 on int64 tensors holding 32-bit words.

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers of lanes 0 and 2
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments per round (golden ratio, sqrt(3) - 1)
_MASK32 = 0xFFFFFFFF


@functools.lru_cache(maxsize=None)
def _multipliers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 16-bit halves of the two multipliers, shape [2, 1, 1], made once per device."""
    halves = [[m & 0xFFFF for m in _PHILOX_M], [m >> 16 for m in _PHILOX_M]]
    lo, hi = torch.tensor(halves, dtype=torch.int64).reshape(2, 2, 1, 1).to(device)
    return lo, hi


def _philox_lanes(a: torch.Tensor, b: torch.Tensor, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of counters (x0, x1, x2, x3) given as a = [x0, x2], b = [x1, x3] (dim 0; broadcastable).

    Lanes 0 and 2 are multiplied together, so each round is 14 ops whatever the size (kernel launches
    on a GPU). The product x * m (< 2^64) is assembled from x * m_lo and x * m_hi (< 2^48 each).
    """
    m_lo, m_hi = _multipliers(a.device)
    k0, k1 = key
    for _ in range(10):
        p = a * m_lo
        t = a * m_hi
        t += p >> 16
        p &= 0xFFFF
        p |= (t & 0xFFFF) << 16  # low word of x * m
        t >>= 16                 # high word
        a = t.flip(0) ^ b        # (hi(x2 m1) ^ x1, hi(x0 m0) ^ x3), then the key
        a[0] ^= k0
        a[1] ^= k1
        b = p.flip(0)            # (lo(x2 m1), lo(x0 m0))
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return a, b


def philox4x32(counter: Sequence[torch.Tensor | int], key: tuple[int, int], device: torch.device | str = 'cpu') -> torch.Tensor:
    """Philox4x32-10 of 4-word counters (each word a tensor or int, broadcast) under a 2-word key: [4, *shape] words."""
    words = torch.broadcast_tensors(*[torch.as_tensor(c, dtype=torch.int64, device=device) for c in counter])
    shape = words[0].shape
    a, b = (torch.stack(words[i::2]).reshape(2, 1, -1) for i in (0, 1))
    a, b = _philox_lanes(a, b, (key[0] & _MASK32, key[1] & _MASK32))
    return torch.stack([a[0], b[0], a[1], b[1]]).reshape(4, *shape)

#----------------------------------------------------------------------------
# Integers to floats with exactly rounded operations only (see the module docstring).

_LN2 = math.log(2)
# Series terms to the precision of each type on the reduced ranges below (first omitted term < 2^-28 resp. 2^-53).
_ATANH_TERMS = {torch.float32: 5, torch.float64: 10}  # ln m = 2 s sum_n s^2n / (2n+1), s = (m-1)/(m+1), |s| <= 0.172
_SIN_TERMS = {torch.float32: 5, torch.float64: 8}     # |theta| <= pi/4
# (stored mantissa bits, bit pattern of sqrt(1/2), integer type of the same width) per float type.
_FLOAT_LAYOUT = {torch.float32: (23, 0x3F3504F3, torch.int32), torch.float64: (52, 0x3FE6A09E667F3BCD, torch.int64)}


def _horner(z: torch.Tensor, coefs: list[float]) -> torch.Tensor:
    """sum_n coefs[n] z^n, one exactly rounded op at a time."""
    p = z * coefs[-1]
    for c in reversed(coefs[1:-1]):
        p += c
        p *= z
    p += coefs[0]
    return p


def _box_muller(k1: torch.Tensor, k2: torch.Tensor, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent standard normals from two uniform `bits`-bit integers, in `dtype` (float32 or float64).

    Radius sqrt(-2 ln u) with u = (k1 + 1) 2^-bits in (0, 1], so |z| <= sqrt(2 bits ln 2) (5.77 for
    float32, as torch's CPU randn); angle: the top 2 bits of k2 pick a quarter turn, the rest theta in [-pi/4, pi/4).
    """
    mant, sqrt_half_bits, itype = _FLOAT_LAYOUT[dtype]
    # ln(k1 + 1) = e ln 2 + ln m with m in [sqrt(1/2), sqrt(2)), read off the float's bits (exact).
    v = (k1 + 1).to(dtype).view(itype)
    e = (v - sqrt_half_bits) >> mant
    m = (v - (e << mant)).view(dtype)
    s = (m - 1) / (m + 1)
    two_ln_m = _horner(s * s, [4 / (2 * n + 1) for n in range(_ATANH_TERMS[dtype])])
    two_ln_m *= s
    r2 = (bits - e).to(dtype) * (2 * _LN2)
    r2 -= two_ln_m  # -2 ln u = 2 (bits - e) ln 2 - 2 ln m >= 0
    radius = r2.sqrt()

    quarter = 1 << (bits - 2)
    theta = ((k2 & (quarter - 1)) - quarter // 2).to(dtype) * (math.pi / (2 * quarter))
    sin = _horner(theta * theta, [(-1) ** n / math.factorial(2 * n + 1) for n in range(_SIN_TERMS[dtype])])
    sin *= theta
    cos = (1 - sin * sin).sqrt()  # cos >= sqrt(1/2) here: no cancellation
    # Turn by q quarters: (cos, sin)(q pi/2) = (cq, sq) in {(1, 0), (0, 1), (-1, 0), (0, -1)}; each sum
    # below has one zero term, so it is exact.
    q = k2 >> (bits - 2)
    odd = q & 1
    cq = ((1 - q) * (1 - odd)).to(dtype)
    sq = ((2 - q) * odd).to(dtype)
    cos *= radius
    sin *= radius
    return cos * cq - sin * sq, cos * sq + sin * cq

#----------------------------------------------------------------------------

class BatchRandom:
    """Draws for a global batch, returning this process's rows [start, stop) on `device`.

    Every rank (and every accumulation round) creates it with the same `seed` and its own row range;
    row i of every draw is the same whatever the range, the device or the world size. Row i's
    stream is Philox4x32-10 with key (seed mod 2^32, seed >> 32 mod 2^32) of counters (j, i, 0, 0),
    j = 0, 1, ...: blocks of four 32-bit words (lanes). Each call takes the next n whole blocks
    j0 .. j0+n-1 of every row, and its value v comes from block j0 + v % n: rand (24 bits or fewer)
    and randint use lane v // n, randn (float32) the cos (v // n = 0, 2) or sin (1, 3) part of Box-
    Muller on lanes (0, 1) resp. (2, 3); float64 rand and randn take consecutive word pairs instead.
    """

    _MIN_BLOCKS = 16  # one Philox pass covers at least this many blocks per row: a step's ~15 small draws (sigma, augmentation)

    def __init__(self, seed: int, global_batch: int, start: int, stop: int, device: torch.device | str = 'cpu'):
        assert 0 <= start <= stop <= global_batch < (1 << 32)
        seed = int(seed) % (1 << 64)
        self.key = (seed & _MASK32, seed >> 32)
        self.global_batch, self.start, self.stop = global_batch, start, stop
        self.device = torch.device(device)
        rows = torch.arange(start, stop, dtype=torch.int64, device=self.device)
        self._rows = torch.stack([rows, torch.zeros_like(rows)])[:, :, None]  # counter words (x1, x3) per row
        self._next = 0        # next unused block of every row's stream
        self._pass = None     # the last Philox pass: [first block, lanes (a, b), its float32 normals or None]

    def _take(self, n: int) -> tuple[list, slice]:
        """The Philox pass holding the next n blocks of every row, and their positions in it."""
        if self._pass is None or self._next + n > self._pass[0] + self._pass[1][0].shape[2]:
            count = max(n, self._MIN_BLOCKS)
            blocks = torch.zeros([2, 1, count], dtype=torch.int64, device=self.device)
            torch.arange(self._next, self._next + count, dtype=torch.int64, device=self.device, out=blocks[0, 0])
            self._pass = [self._next, _philox_lanes(blocks, self._rows, self.key), None]
        offset = self._next - self._pass[0]
        self._next += n
        return self._pass, slice(offset, offset + n)

    def _blocks(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next n blocks of every row as lanes (a, b) = ([x0, x2], [x1, x3]), each [2, rows, n]."""
        pass_, cols = self._take(n)
        return tuple(x[:, :, cols] for x in pass_[1])

    def _words(self, count: int) -> torch.Tensor:
        """The next `count` 32-bit words of every row (whole blocks taken), [rows, count]."""
        a, b = self._blocks(-(-count // 4))
        return torch.stack([a[0], b[0], a[1], b[1]], dim=1).flatten(1)[:, :count]

    def _uniform_ints(self, count: int, bits: int) -> torch.Tensor:
        """`count` uniform integers in [0, 2^bits) per row, from one word each (bits <= 32) or two (bits <= 64)."""
        if bits <= 32:
            return self._words(count) >> (32 - bits)
        hi_bits, lo_bits = bits - bits // 2, bits // 2
        w = self._words(2 * count)
        return ((w[:, 0::2] >> (32 - hi_bits)) << lo_bits) | (w[:, 1::2] >> (32 - lo_bits))

    @staticmethod
    def _shaped(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return x[:, :math.prod(shape)].reshape(x.shape[0], *shape).to(dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform on [0, 1) with the type's full significand: k 2^-24 for float32, k 2^-53 for float64."""
        bits = 1 - round(math.log2(torch.finfo(dtype).eps))  # 24, 53, 11 (float16), 8 (bfloat16)
        k = self._uniform_ints(math.prod(shape), bits)
        return self._shaped(k.to(torch.float64 if bits > 24 else torch.float32) * 2.0 ** -bits, shape, dtype)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal by Box-Muller: in float64 from 53-bit uniforms for float64, else in float32 from 24-bit ones."""
        pairs = -(-math.prod(shape) // 2)
        if dtype == torch.float64:
            k = self._uniform_ints(2 * pairs, 53)
            z0, z1 = _box_muller(k[:, 0::2], k[:, 1::2], 53, torch.float64)
            return self._shaped(torch.cat([z0, z1], dim=1), shape, dtype)
        pass_, cols = self._take(-(-pairs // 2))
        if pass_[2] is None:  # Box-Muller once per pass: the small draws of a step slice it
            a, b = pass_[1]
            pass_[2] = _box_muller(a >> 8, b >> 8, 24, torch.float32)
        z0, z1 = (z[:, :, cols] for z in pass_[2])
        return self._shaped(torch.stack([z0[0], z1[0], z0[1], z1[1]], dim=1).flatten(1), shape, dtype)

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """Integers in [low, high) as int64: low + (word * n) >> 32 with n = high - low <= 2^31.

        Each value gets floor(2^32 / n) or ceil(2^32 / n) of the 2^32 words, so its probability is
        within 2^-32 of 1/n (exactly 1/n when n is a power of two).
        """
        n = high - low
        assert 1 <= n <= (1 << 31)
        return self._shaped(low + ((self._words(math.prod(shape)) * n) >> 32), shape, torch.int64)

#----------------------------------------------------------------------------
