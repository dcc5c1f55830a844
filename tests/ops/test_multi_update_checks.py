"""ema_multi_update_'s checks (errors name profile k and index i, nothing is written),
its registration (opcheck, torch.compile) and the C++ kernel op's own checks."""
from __future__ import annotations

import os

import pytest
import torch

from ema_fused import ema_multi_update_, ema_update_
from ema_fused.backends import extension as _extension

from helpers.numerics import rand, seeded

BACKENDS = ["foreach", "cpu", "triton"]


@pytest.fixture(scope="module")
def ext():
    if not _extension.load(build=True):
        pytest.fail(f"the extension neither loads nor builds here: {_extension.error()}")
    return torch.ops.ema_fused


def _inputs(k=3, n=3, size=50):
    gen = seeded("inputs", k, n, size)
    params = [rand(size + i, torch.bfloat16, gen) for i in range(n)]
    shadows = [[rand(size + i, torch.float32, gen) for i in range(n)] for _ in range(k)]
    return shadows, params


def _refused(shadows, params, weights, error, match, backend):
    before = [[s.clone() for s in profile] for profile in shadows]
    with pytest.raises(error, match=match):
        ema_multi_update_(shadows, params, weights, backend=backend)
    for profile, old in zip(shadows, before):
        assert all(torch.equal(s, o) for s, o in zip(profile, old)), "written before refusal"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_pairs_and_weights_name_profile_and_index(ext, backend):
    shadows, params = _inputs()
    shadows[2][1] = torch.zeros(7)
    _refused(shadows, params, [0.5] * 3, ValueError,
             r"shadows\[2\]\[1\] \(shape \(7,\).*params\[1\].*differ in shape", backend)
    shadows, params = _inputs()
    shadows[1][2] = shadows[1][2].long()
    _refused(shadows, params, [0.5] * 3, TypeError, r"shadows\[1\]\[2\] has dtype torch.int64",
             backend)
    shadows, params = _inputs()
    _refused(shadows, params, [0.5, 1.5, 0.1], ValueError, r"weights\[1\] must be in \[0.0, 1.0\]",
             backend)
    _refused(shadows, params, [0.5, float("nan"), 0.1], ValueError, r"weights\[1\]", backend)
    _refused(shadows, params, [0.5, torch.tensor(0.2), 0.1], TypeError, r"weights\[1\]", backend)
    _refused(shadows, params, [0.5, 0.1], ValueError, r"3 profiles of shadows but 2 weights",
             backend)
    shadows[1] = shadows[1][:2]
    _refused(shadows, params, [0.5] * 3, ValueError, r"shadows\[1\] has 2 tensors but params has 3",
             backend)
    shadows, params = _inputs()
    shadows[0][2].requires_grad_(True)
    _refused(shadows, params, [0.5] * 3, RuntimeError, r"shadows\[0\]\[2\] requires grad", backend)


def test_shadows_must_be_a_list_of_lists():
    shadows, params = _inputs(k=1)
    with pytest.raises(TypeError, match=r"sequence of K sequences"):
        ema_multi_update_(shadows[0][0], params, [0.5])
    with pytest.raises(TypeError, match=r"shadows\[0\] must be a sequence of tensors"):
        ema_multi_update_(shadows[0], params, [0.5])
    with pytest.raises(TypeError, match=r"params\[1\] is a str"):
        ema_multi_update_([[]], [params[0], "x"], [0.5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shadows_sharing_memory_are_refused_before_anything_is_written(ext, backend):
    """A shadow of one profile inside another's, a shadow that is (or overlaps) a param,
    one shadow given twice: one pass would race, so each is refused, naming both."""
    shadows, params = _inputs()
    buf = torch.zeros(200)
    shadows[0][0], shadows[2][0] = buf[:50], buf[40:90]
    _refused(shadows, params, [0.5] * 3, ValueError,
             r"shadows\[0\]\[0\] and shadows\[2\]\[0\] overlap in memory.*both are written", backend)
    shadows, params = _inputs()
    params[1] = params[1].float()
    shadows[1][1] = params[1]  # the single update lets this through; one pass cannot
    _refused(shadows, params, [0.5] * 3, ValueError,
             r"shadows\[1\]\[1\] and params\[1\] overlap in memory.*one is written", backend)
    shadows, params = _inputs()
    buf = torch.zeros(100)
    shadows[0][1], shadows[2][2] = buf[:51], buf[48:100]  # of different params
    _refused(shadows, params, [0.5] * 3, ValueError, r"shadows\[0\]\[1\] and shadows\[2\]\[2\]",
             backend)


def test_cpu_kernel_op_checks_itself(ext):
    """The kernel op, called directly, checks what the Python layer checks, naming the
    profile and index (flat, profile-major lists)."""
    shadows, params = _inputs(k=2)
    flat = [s for profile in shadows for s in profile]
    with pytest.raises(RuntimeError, match=r"5 shadows for 3 params and 2 weights; expected 6"):
        ext.kernel_multi_update_(flat[:5], params, [0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"weights\[1\] must be in \[0, 1\]"):
        ext.kernel_multi_update_(flat, params, [0.5, -0.1])
    bad = flat[:4] + [torch.zeros(3)] + flat[5:]
    with pytest.raises(RuntimeError, match=r"profile 1: tensors\[1\] have shapes \[3\] and \[51\]"):
        ext.kernel_multi_update_(bad, params, [0.5, 0.5])
    aliased = flat[:3] + [flat[0]] + flat[4:]
    before = [s.clone() for s in flat]
    with pytest.raises(ValueError, match=r"shadows\[0\]\[0\] and shadows\[1\]\[0\] overlap"):
        ext.kernel_multi_update_(aliased, params, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"shadows\[1\]\[2\] and params\[2\] overlap"):
        ext.kernel_multi_update_(flat[:5] + [params[2]], params, [0.5, 0.0])
    assert all(torch.equal(s, b) for s, b in zip(flat, before))


def _samples():
    gen = torch.Generator().manual_seed(0)
    yield ([rand((3, 5), torch.float32, gen), rand(7, torch.bfloat16, gen),
            rand((3, 5), torch.float16, gen), rand(7, torch.float32, gen)],
           [rand((3, 5), torch.bfloat16, gen), rand(7, torch.float32, gen)], [0.3, 0.8])
    yield [rand(11, torch.float64, gen)], [rand(11, torch.float16, gen)], [1.0]
    yield [], [], []


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("backend", ["auto", "foreach"])
def test_opcheck_multi_update(case, backend):
    shadows, params, weights = list(_samples())[case]
    torch.library.opcheck(torch.ops.ema_fused.multi_update_.default,
                          (shadows, params, weights, backend))


def test_opcheck_kernel_op(ext):
    shadows, params, weights = next(_samples())
    torch.library.opcheck(ext.kernel_multi_update_, (shadows, params, weights))


def test_schema_marks_the_shadows_as_mutated(ext):
    for op in (torch.ops.ema_fused.multi_update_.default, ext.kernel_multi_update_.default):
        assert "!)[] shadows" in str(op._schema), op._schema


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_separate_updates(compiler):
    torch._dynamo.reset()
    gen = seeded("compile", compiler)
    params = [rand(13, torch.bfloat16, gen), rand((4, 6), torch.float32, gen)]
    shadows = [[rand(13, torch.float32, gen), rand((4, 6), torch.float32, gen)] for _ in range(2)]
    expected = [[s.clone() for s in profile] for profile in shadows]
    for profile, w in zip(expected, (0.125, 0.75)):
        ema_update_(profile, params, w)

    @torch.compile(fullgraph=True, backend=compiler)
    def step(shadows, params):
        ema_multi_update_(shadows, params, [0.125, 0.75])

    step(shadows, params)
    for profile, want in zip(shadows, expected):
        assert all(torch.equal(s, e) for s, e in zip(profile, want))


def test_the_kernel_op_has_cpu_and_cuda_kernels(ext):
    """The CUDA kernel compiles wherever nvcc and a CUDA torch are (CI): a build that has
    the single update's CUDA kernels has the multi-shadow one too."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ema_fused::kernel_multi_update_", "CPU")
    possible, why = _extension.cuda_build_possible()
    if not possible:
        if os.environ.get("EMA_FUSED_REQUIRE_CUDA_KERNELS") == "1":
            pytest.fail(f"EMA_FUSED_REQUIRE_CUDA_KERNELS=1 but no CUDA build can be made: {why}")
        pytest.skip(f"no CUDA build can be made here: {why}")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ema_fused::kernel_multi_update_", "CUDA")
