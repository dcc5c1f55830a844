"""The edges every backend must get exactly right, on every backend that runs here: the
ends of the update's weight, bit-exact swaps, and pairs that share memory (refused
before anything is written).  On the CPU: ``foreach``, the C++ ``cpu`` kernels and
``triton`` through its interpreter; on a GPU (marked ``gpu``) also ``cuda``, compiled
``triton`` and ``foreach`` on CUDA tensors.  The CUDA kernels' tile code is checked for
the same on the CPU in test_cuda_emulation.py."""
from __future__ import annotations

import itertools

import pytest
import torch

from ema_fused import available_backends, ema_copy_, ema_swap_, ema_update_
from ema_fused.backends import extension

from helpers.numerics import rand, seeded

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = list(itertools.product(KERNEL_DTYPES, KERNEL_DTYPES))
IDS = [f"{a}-{b}".replace("torch.", "") for a, b in PAIRS]
N = 2 * 2048 + 5  # two full Triton tiles and a tail; one CUDA-sized tile and a tail


def _cases() -> list:
    extension.load(build=False)
    cases = [pytest.param(("cpu", name), id=f"cpu-{name}") for name in ("foreach", "cpu", "triton")
             if available_backends("cpu")[name][0]]
    if torch.cuda.is_available():  # every GPU backend must run there: a failure, not a skip
        cases += [pytest.param(("cuda", name), id=f"cuda-{name}", marks=pytest.mark.gpu)
                  for name in ("cuda", "triton", "foreach")]
    return cases


# The Triton interpreter computes both sides of tl.where with numpy, which warns on the
# Inf/NaN inputs these tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(params=_cases())
def case(request):
    return request.param


def rounded(t: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``t`` rounded once into ``dtype``, as the backend does: Triton's interpreter (the
    ``triton`` backend on a CPU) truncates fp32 -> bf16 whatever rounding is asked for;
    compiled Triton kernels round to nearest even (the GPU tests check that)."""
    if backend == "triton" and t.is_cpu and dtype == torch.bfloat16 and t.dtype != torch.bfloat16:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.to(dtype)


def _weight(value: float, as_tensor: bool, device: str):
    return torch.tensor([value], dtype=torch.float32, device=device) if as_tensor else value


@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_weight_one_gives_exactly_the_params(case, sd, pd, as_tensor):
    """Whatever the shadow held (1e8 against a param of 1 in fp32: x + w*(b - x) gives 0;
    Inf and NaN: they would stay NaN)."""
    dev, backend = case
    gen = seeded("one", backend, sd, pd)
    big = 1e4 if sd == torch.float16 else 1e8
    shadows = [torch.full((N,), big, dtype=sd, device=dev),
               torch.full((N,), float("inf"), dtype=sd, device=dev)]
    shadows[1][::3] = float("nan")
    params = [torch.ones(N, dtype=pd, device=dev), rand(N, pd, gen, dev)]
    ema_update_(shadows, params, _weight(1.0, as_tensor, dev), backend=backend)
    for s, p in zip(shadows, params):
        assert torch.equal(s, rounded(p, sd, backend))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_weight_zero_changes_nothing_even_for_infinite_params(case, as_tensor):
    dev, backend = case
    gen = seeded("zero", backend)
    shadows = [rand(N, sd, gen, dev) for sd in KERNEL_DTYPES]
    params = [torch.full((N,), v, dtype=torch.bfloat16, device=dev)
              for v in (float("inf"), float("-inf"), float("nan"))]
    before = [s.clone() for s in shadows]
    ema_update_(shadows, params, _weight(0.0, as_tensor, dev), backend=backend)
    assert all(torch.equal(s, b) for s, b in zip(shadows, before))


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, torch.int16), (torch.float16, torch.int16),
                                        (torch.float32, torch.int32)], ids=str)
def test_swap_moves_raw_bits(case, dtype, bits):
    """NaN payloads, signed zeros and infinities come back bit for bit."""
    dev, backend = case
    pattern = torch.tensor([0x7FC1, -1, 0x7F81, -32768, 0x7C01, 0x7F80, 0, 1], dtype=torch.int32)
    raw_a = pattern.repeat(N // 8 + 1)[:N].to(bits)
    if bits == torch.int32:
        raw_a = raw_a | (raw_a << 16)
    raw_b = torch.arange(N, dtype=torch.int32).to(bits)
    a, b = raw_a.to(dev, copy=True).view(dtype), raw_b.to(dev, copy=True).view(dtype)
    ema_swap_([a], [b], backend=backend)
    assert torch.equal(a.view(bits).cpu(), raw_b) and torch.equal(b.view(bits).cpu(), raw_a)


def test_a_destination_given_twice_is_refused(case):
    dev, backend = case
    s, other = torch.zeros(N, device=dev), torch.zeros(N, device=dev)
    with pytest.raises(ValueError, match=r"shadows\[0\] and shadows\[2\] overlap in memory, and "
                                         r"both are written"):
        ema_update_([s, other, s], [torch.ones(N, device=dev)] * 3, 0.5, backend=backend)
    assert not s.any() and not other.any()


@pytest.mark.parametrize("op", ["update", "copy", "swap"])
def test_views_of_one_buffer_that_overlap_are_refused_before_writing(case, op):
    dev, backend = case
    buf, keep, ones = (torch.zeros(3 * N, device=dev), torch.zeros(N, device=dev),
                       torch.ones(N, device=dev))
    first, second = buf[:N], buf[N - 7:2 * N - 7]
    names = {"update": ("shadows", "params"), "copy": ("dst", "src"), "swap": ("a", "b")}[op]
    call = {"update": lambda a, b: ema_update_(a, b, 0.5, backend=backend),
            "copy": lambda a, b: ema_copy_(a, b, 2.0, backend=backend),
            "swap": lambda a, b: ema_swap_(a, b, backend=backend)}[op]
    with pytest.raises(ValueError, match=rf"{names[0]}\[0\] and {names[0]}\[1\] overlap"):
        call([first, second], [ones, ones.clone()])
    # a destination that another pair reads (a swap writes that one too)
    with pytest.raises(ValueError, match=rf"{names[0]}\[0\] and {names[1]}\[1\] overlap in memory, "
                                         rf"and {'both are' if op == 'swap' else 'one is'} written"):
        call([first, keep], [ones, buf[5:N + 5]])
    with pytest.raises(ValueError, match=r"\[1\] partially overlap"):  # one pair's two sides
        call([keep, first], [ones, buf[3:N + 3]])
    assert not buf.any() and not keep.any()
    # adjacent views do not overlap; one source read by two pairs is fine
    call([buf[:N], buf[N:2 * N]], [ones, ones.clone()] if op == "swap" else [ones, ones])
    assert bool((buf[:2 * N] != 0).all()) and not buf[2 * N:].any()


def test_a_kernel_pair_overlapping_a_fallback_pair_is_refused_before_either_runs(case):
    """float64 pairs go to the foreach code in the same call; an overlap across the two
    groups is refused before the kernels write anything."""
    dev, backend = case
    buf = torch.zeros(64, device=dev)
    with pytest.raises(ValueError, match=r"shadows\[0\] and shadows\[1\] overlap"):
        ema_update_([buf[:16], buf.view(torch.float64)[4:12]],
                    [torch.ones(16, device=dev), torch.ones(8, dtype=torch.float64, device=dev)],
                    0.5, backend=backend)
    assert not buf.any()


def test_interleaved_strided_views_are_not_taken_for_an_overlap(case):
    """Columns of one matrix: their memory spans overlap, their elements do not.  Those
    views go to the foreach code, which tells the two apart exactly."""
    dev, backend = case
    m = torch.zeros(9, 8, device=dev)
    ema_update_([m[:, :3], m[:, 3:]], [torch.ones(9, 3, device=dev), torch.full((9, 5), 2.0, device=dev)],
                0.5, backend=backend)
    assert bool((m[:, :3] == 0.5).all()) and bool((m[:, 3:] == 1.0).all())
    with pytest.raises(ValueError, match=r"shadows\[0\] and shadows\[1\] overlap"):
        ema_update_([m[:, :4], m[:, 3:]], [torch.ones(9, 4, device=dev), torch.ones(9, 5, device=dev)],
                    0.5, backend=backend)
    assert bool((m[:, 3:] == 1.0).all())


@pytest.mark.parametrize("op", ["update", "swap"])
def test_overlap_refusals_and_disjoint_views_100_times(case, op):
    """Repeated (100 times on a GPU, where a race could show; 10 on the CPU): a refused
    call never writes, and adjacent views of one flat buffer (which one launch writes at
    once) always come out right."""
    dev, backend = case
    gen = seeded("repeat", backend, op)
    flat = rand(4 * N + 3, torch.float32, gen, dev)
    views = [flat[i * N:(i + 1) * N] for i in range(4)]
    srcs = [rand(N, torch.float32, gen, dev) for _ in range(4)]
    for _ in range(100 if dev == "cuda" else 10):
        start = flat.clone()
        with pytest.raises(ValueError, match="overlap"):
            if op == "update":
                ema_update_(views + [flat[3:N + 3]], srcs + [srcs[0]], 0.25, backend=backend)
            else:
                ema_swap_(views + [flat[3:N + 3]], srcs + [srcs[0].clone()], backend=backend)
        assert torch.equal(flat, start)
        before = [s.clone() for s in srcs]
        if op == "update":
            ema_update_(views, srcs, 0.25, backend=backend)
            expected = [start[i * N:(i + 1) * N].double() * 0.75 + srcs[i].double() * 0.25
                        for i in range(4)]
            for v, e in zip(views, expected):
                torch.testing.assert_close(v.double(), e, rtol=2e-7, atol=2e-7)
        else:
            ema_swap_(views, srcs, backend=backend)
            for i, v in enumerate(views):
                assert torch.equal(v, before[i]) and torch.equal(srcs[i], start[i * N:(i + 1) * N])
        assert torch.equal(flat[4 * N:], start[4 * N:])
