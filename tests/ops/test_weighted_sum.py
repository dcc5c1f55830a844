"""``ema_weighted_sum_``: ``out[i] += w * inputs[i]`` against float64, on every backend that
runs here (foreach, the C++ CPU kernels, Triton through its interpreter; CUDA and Triton
on a GPU when there is one), plus its checks and its registration as a custom op."""
from __future__ import annotations

import itertools

import pytest
import torch

from ema_fused import available_backends, ema_weighted_sum_
from ema_fused.backends import extension as _extension
from ema_fused.backends import foreach as _foreach

from helpers.numerics import assert_rounded_close, rand, requires_gpu, seeded

OUT_DTYPES = (torch.float32, torch.float64)
IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PAIRS = list(itertools.product(OUT_DTYPES, IN_DTYPES))
IDS = [f"{o}-{i}".replace("torch.", "") for o, i in PAIRS]
# tile edges: Triton's BLOCK 2048, CUDA's kTile 4096, the CPU kernels' 65536-element chunks
SMALL = (0, 1, 7, 2047, 2048, 2049, 4097)
LARGE = SMALL + (65535, 65537, 278011)


def _usable(name: str, device: str = "cpu") -> str:
    if name in ("cpu", "cuda") and not _extension.load(build=True):
        pytest.fail(f"the extension neither loads nor builds here: {_extension.error()}")
    usable, why = available_backends(device)[name]
    if not usable:
        if name == "triton" and device == "cpu":
            pytest.skip(why)  # Triton not installed: nothing of ours to test
        pytest.fail(f"backend {name!r} cannot run on {device}: {why}")
    return name


@pytest.fixture(params=["foreach", "cpu", "triton"])
def backend(request) -> str:
    return _usable(request.param)


def sizes_for(backend: str):
    return SMALL if backend == "triton" else LARGE  # the interpreter is slow


def check(out, inputs, weight, backend, device="cpu"):
    """Run the op and compare with ``out + weight * input`` computed in float64."""
    exact = [o.double() + weight * x.double() for o, x in zip(out, inputs)]
    mags = [o.double().abs() + abs(weight) * x.double().abs() for o, x in zip(out, inputs)]
    ema_weighted_sum_(out, inputs, weight, backend=backend)
    for o, x, e, m in zip(out, inputs, exact, mags):
        compute = torch.promote_types(torch.promote_types(o.dtype, x.dtype), torch.float32)
        assert_rounded_close(o, e.to(device), m.to(device), compute)


@pytest.mark.parametrize("od,xd", PAIRS, ids=IDS)
def test_every_dtype_pair_and_size_against_float64(backend, od, xd):
    gen = seeded("pair", backend, od, xd)
    sizes = sizes_for(backend)
    check([rand(n, od, gen) for n in sizes], [rand(n, xd, gen) for n in sizes], 0.3, backend)


@pytest.mark.parametrize("weight", [-0.37, -2.5, 1.0, 3.0, 1e-3])
def test_any_finite_weight_negative_ones_too(backend, weight):
    gen = seeded("w", backend, weight)
    sizes = sizes_for(backend)
    dts = [IN_DTYPES[i % 3] for i in range(len(sizes))]
    check([rand(n, torch.float32, gen) for n in sizes],
          [rand(n, d, gen) for n, d in zip(sizes, dts)], weight, backend)


@pytest.mark.parametrize("count", [1, 7, 111, 500])
def test_many_tensors_in_one_call(backend, count):
    gen = seeded("count", backend, count)
    sizes = [int(n) for n in torch.randint(0, 300, (count,), generator=gen)]
    dts = [PAIRS[i % len(PAIRS)] for i in range(count)]
    check([rand(n, od, gen) for n, (od, _) in zip(sizes, dts)],
          [rand(n, xd, gen) for n, (_, xd) in zip(sizes, dts)], -0.61, backend)


def test_repeated_sums_accumulate_like_the_reference(backend):
    """Seven calls, as averaging seven checkpoints does: within seven roundings of fp32."""
    gen = seeded("repeat", backend)
    out = [torch.zeros(3001), torch.zeros(5, 7)]
    exact = [o.double() for o in out]
    mags = [o.double() for o in out]
    for k in range(7):
        inputs = [rand(3001, torch.bfloat16, gen), rand((5, 7), torch.float16, gen)]
        w = (-1) ** k * (k + 1) / 10
        ema_weighted_sum_(out, inputs, w, backend=backend)
        exact = [e + w * x.double() for e, x in zip(exact, inputs)]
        mags = [m + abs(w) * x.double().abs() for m, x in zip(mags, inputs)]
    for o, e, m in zip(out, exact, mags):  # each addition rounds once (twice without an FMA)
        assert bool(((o.double() - e).abs() <= 2 * 7 * 2 ** -24 * m).all())


def test_weight_zero_changes_and_reads_nothing(backend):
    out = [torch.randn(n) for n in (1, 2049, 4097)]
    before = [o.clone() for o in out]
    inputs = [torch.full((n,), float("inf"), dtype=torch.bfloat16) for n in (1, 2049, 4097)]
    ema_weighted_sum_(out, inputs, 0.0, backend=backend)
    assert all(torch.equal(o, b) for o, b in zip(out, before))
    ema_weighted_sum_(out, inputs, 0.5, backend=backend)  # and a nonzero weight does add
    assert all(bool(torch.isinf(o).all()) for o in out)


def _underflowing_weights_add_nothing(name: str, device: str) -> None:
    """Weights that round to 0 in float32 (the math of a float32 out) are weight 0: no
    ``0 * Inf = NaN`` from an infinite input; the smallest that does not round to 0 adds."""
    out = [torch.randn(n, device=device) for n in (1, 2049, 4097)]
    before = [o.clone() for o in out]
    inputs = [torch.full((n,), float("inf"), dtype=torch.bfloat16, device=device)
              for n in (1, 2049, 4097)]
    for w in (1e-46, -1e-50, 2.0 ** -150):  # 2^-150: the tie, rounds to even (0)
        ema_weighted_sum_(out, inputs, w, backend=name)
        assert all(torch.equal(o, b) for o, b in zip(out, before)), w
    ema_weighted_sum_(out, inputs, 2.0 ** -149, backend=name)  # fp32's smallest subnormal
    assert all(bool(torch.isinf(o).all()) for o in out)


def test_a_weight_that_underflows_float32_adds_nothing_triton():
    _underflowing_weights_add_nothing(_usable("triton"), "cpu")


@pytest.mark.parametrize("name", ["cpu", "foreach"])
def test_a_weight_that_underflows_float32_adds_nothing(name):
    _underflowing_weights_add_nothing(_usable(name), "cpu")


def test_a_float64_out_keeps_a_weight_that_underflows_float32():
    """float64 math: 1e-46 is no zero there; 1e-46 * 1e40 lands in the out."""
    out = [torch.zeros(3, dtype=torch.float64)]
    ema_weighted_sum_(out, [torch.full((3,), 1e40, dtype=torch.float64)], 1e-46,
                      backend="foreach")
    torch.testing.assert_close(out[0], torch.full((3,), 1e-6, dtype=torch.float64))


def test_the_same_tensor_as_out_and_input_is_scaled(backend):
    gen = seeded("self", backend)
    t = rand(4099, torch.float32, gen)
    exact = t.double() * (1 - 0.25)
    ema_weighted_sum_([t], [t], -0.25, backend=backend)
    assert_rounded_close(t, exact, exact.abs(), torch.float32)


def test_non_contiguous_and_misaligned_pairs_go_to_foreach_in_the_same_call(backend, monkeypatch):
    gen = seeded("views", backend)
    out = [rand((9, 8), torch.float32, gen).t(), rand(2050, torch.float32, gen),
           rand(2051, torch.float32, gen)[1:], rand(600, torch.float64, gen)]
    inputs = [rand((8, 9), torch.bfloat16, gen), rand((2050, 2), torch.float16, gen)[:, 0],
              rand(2052, torch.bfloat16, gen)[2:], rand(600, torch.float32, gen)]
    routed = []
    real = _foreach.weighted_sum_unchecked
    monkeypatch.setattr(_foreach, "weighted_sum_unchecked",
                        lambda o, i, w: (routed.extend(o), real(o, i, w)))
    check(out, inputs, -1.5, backend)
    if backend != "foreach":  # the kernels take the contiguous float32 pair only
        assert [id(t) for t in routed] == [id(out[0]), id(out[1]), id(out[3])]


def test_empty_lists_and_empty_tensors(backend):
    ema_weighted_sum_([], [], 0.5, backend=backend)
    out = [torch.zeros(0), torch.zeros(3, 0)]
    ema_weighted_sum_(out, [torch.zeros(0, dtype=torch.bfloat16), torch.zeros(3, 0)], 0.5,
                      backend=backend)
    assert out[0].shape == (0,) and out[1].shape == (3, 0)


BAD = [
    (lambda: ([torch.zeros(3), torch.zeros(4)], [torch.ones(3), torch.ones(5)], 0.5),
     ValueError, r"out\[1\] \(shape \(4,\).*inputs\[1\] \(shape \(5,\).*differ in shape"),
    (lambda: ([torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)], [torch.ones(3)] * 2, 0.5),
     TypeError, r"out\[1\] has dtype torch.bfloat16; a weighted sum accumulates into float32"),
    (lambda: ([torch.zeros(3), torch.zeros(3, dtype=torch.int64)], [torch.ones(3)] * 2, 0.5),
     TypeError, r"out\[1\] has dtype torch.int64"),
    (lambda: ([torch.zeros(3)], [torch.ones(3), torch.ones(3)], 0.5),
     ValueError, "out has 1 tensors but inputs has 2"),
    (lambda: ([torch.zeros(3), torch.zeros(2)], [torch.ones(3), [1.0, 2.0]], 0.5),
     TypeError, r"inputs\[1\] is a list, not a tensor"),
    (lambda: ([torch.zeros(3)], [torch.ones(3)], float("nan")), ValueError, "must be finite"),
    (lambda: ([torch.zeros(3)], [torch.ones(3)], float("-inf")), ValueError, "must be finite"),
    (lambda: ([torch.zeros(3)], [torch.ones(3)], 1e39), ValueError, r"overflows float32.*out\[0\]"),
    (lambda: ([torch.zeros(3)], [torch.ones(3)], torch.tensor(0.5)), TypeError, "Python number"),
    (lambda: ([torch.zeros(3)], [torch.ones(3)], True), TypeError, "real number"),
    (lambda: ([torch.zeros(3), torch.zeros(3).expand(2, 3)], [torch.ones(3), torch.ones(2, 3)],
              0.5), ValueError, r"out\[1\].*share memory"),
    (lambda: ([torch.zeros(3), torch.zeros(3, requires_grad=True)], [torch.ones(3)] * 2, 0.5),
     RuntimeError, r"out\[1\] requires grad"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_is_refused_naming_the_index_before_anything_is_written(backend, case):
    make, error, message = BAD[case]
    out, inputs, weight = make()
    before = [o.detach().clone() for o in out]
    with pytest.raises(error, match=message):
        ema_weighted_sum_(out, inputs, weight, backend=backend)
    assert all(torch.equal(o.detach(), b) for o, b in zip(out, before))


def test_pairs_that_share_memory_are_refused_before_anything_is_written(backend):
    buf = torch.zeros(3000)
    first, src = torch.zeros(100), [torch.ones(1000), torch.ones(100), torch.ones(1000)]
    with pytest.raises(ValueError, match=r"out\[0\] and out\[2\] overlap in memory"):
        ema_weighted_sum_([buf[:1000], first, buf[500:1500]], src, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] and inputs\[1\] overlap.*one is written"):
        ema_weighted_sum_([buf[:1000], first], [torch.ones(1000), buf[10:110]], 0.5,
                          backend=backend)
    assert not buf.any() and not first.any()
    shared = torch.ones(1000)  # one input read by two pairs is fine
    ema_weighted_sum_([buf[:1000], buf[1000:2000]], [shared, shared], 0.5, backend=backend)
    assert bool((buf[:2000] == 0.5).all()) and not buf[2000:].any()


def test_the_triton_backend_makes_one_launch_for_every_dtype_mix(monkeypatch):
    _usable("triton")
    from ema_fused.triton_kernels import sum_kernels
    launches = []
    real = sum_kernels.run
    monkeypatch.setattr(sum_kernels, "run",
                        lambda k, *a, **kw: (launches.append(k), real(k, *a, **kw)))
    gen = seeded("launch")
    check([rand(n, torch.float32, gen) for n in (5, 2049, 0, 77)],
          [rand(n, d, gen) for n, d in zip((5, 2049, 0, 77), IN_DTYPES[:3] * 2)], 0.7, "triton")
    assert launches == [sum_kernels.weighted_sum_kernel]


def test_the_kernel_op_is_registered_and_passes_opcheck():
    _usable("cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ema_fused::kernel_weighted_sum_", "CPU")
    if _extension.has_kernels("CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            "ema_fused::kernel_weighted_sum_", "CUDA")
    gen = seeded("kernel opcheck")
    out = [rand(37, torch.float32, gen), rand(38, torch.float32, gen)]
    inputs = [rand(37, torch.bfloat16, gen), rand(38, torch.float16, gen)]
    torch.library.opcheck(torch.ops.ema_fused.kernel_weighted_sum_.default, (out, inputs, -0.5))
    with pytest.raises(RuntimeError, match=r"out\[1\] has dtype BFloat16"):
        torch.ops.ema_fused.kernel_weighted_sum_(
            [out[0], torch.zeros(3, dtype=torch.bfloat16)], [inputs[0], torch.ones(3)], 0.5)


def _samples():
    gen = torch.Generator().manual_seed(14)
    yield [rand((3, 5), torch.float32, gen), rand(7, torch.float64, gen)], \
        [rand((3, 5), torch.bfloat16, gen), rand(7, torch.float32, gen)]
    yield [rand(11, torch.float32, gen)], [rand(11, torch.float16, gen)]
    yield [rand(0, torch.float32, gen), rand(1, torch.float32, gen)], \
        [rand(0, torch.float16, gen), rand(1, torch.float64, gen)]
    yield [], []


@pytest.mark.parametrize("backend_name", ["auto", "foreach"])
@pytest.mark.parametrize("case", range(4))
def test_opcheck(case, backend_name):
    out, inputs = list(_samples())[case]
    torch.library.opcheck(torch.ops.ema_fused.weighted_sum_.default,
                          (out, inputs, -0.75, backend_name))


def test_schema_marks_out_as_mutated():
    schema = str(torch.ops.ema_fused.weighted_sum_.default._schema)
    assert "!)[] out" in schema and "!)[] inputs" not in schema, schema


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    gen = seeded("compile")
    out = [rand(13, torch.float32, gen), rand((4, 6), torch.float32, gen)]
    inputs = [rand(13, torch.bfloat16, gen), rand((4, 6), torch.float32, gen)]
    expected = [o.clone() for o in out]
    ema_weighted_sum_(expected, inputs, -0.125)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def add(out, inputs):
        ema_weighted_sum_(out, inputs, -0.125)

    add(out, inputs)
    assert all(torch.equal(o, e) for o, e in zip(out, expected))


@pytest.mark.gpu
@requires_gpu()
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("od,xd", PAIRS, ids=IDS)
def test_gpu_backends_against_float64(name, od, xd):
    _usable(name, "cuda")
    gen = seeded("gpu", name, od, xd)
    sizes = LARGE + ((1 << 22) + 3,)
    check([rand(n, od, gen, "cuda") for n in sizes], [rand(n, xd, gen, "cuda") for n in sizes],
          -0.3, name, "cuda")


@pytest.mark.gpu
@requires_gpu()
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_a_weight_that_underflows_float32_adds_nothing(name):
    _underflowing_weights_add_nothing(_usable(name, "cuda"), "cuda")
