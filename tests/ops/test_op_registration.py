"""The ops are real torch.library custom ops: opcheck passes, torch.compile keeps them."""
from __future__ import annotations

import pytest
import torch

import ema_fused  # noqa: F401  (registers the ops)
from ema_fused import ema_update_

from helpers.numerics import rand


def _samples():
    gen = torch.Generator().manual_seed(0)
    yield [rand((3, 5), torch.float32, gen), rand(7, torch.bfloat16, gen)], \
        [rand((3, 5), torch.bfloat16, gen), rand(7, torch.float32, gen)]
    yield [rand(11, torch.float16, gen)], [rand(11, torch.float16, gen)]
    yield [rand(0, torch.float32, gen), rand(1, torch.float32, gen)], \
        [rand(0, torch.float16, gen), rand(1, torch.float64, gen)]
    yield [], []


@pytest.mark.parametrize("case", range(4))
def test_opcheck_update(case):
    shadows, params = list(_samples())[case]
    torch.library.opcheck(torch.ops.ema_fused.update_.default, (shadows, params, 0.3, "auto"))


@pytest.mark.parametrize("case", range(4))
def test_opcheck_copy(case):
    src, dst = list(_samples())[case]
    torch.library.opcheck(torch.ops.ema_fused.copy_.default, (dst, src, 1.5, "foreach"))


def test_op_schema_marks_the_first_list_as_mutated():
    schema = str(torch.ops.ema_fused.update_.default._schema)
    assert "Tensor(a0!)[] shadows" in schema or "Tensor(a!)[] shadows" in schema, schema
    schema = str(torch.ops.ema_fused.copy_.default._schema)
    assert "!)[] dst" in schema, schema


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    shadows = [rand(13, torch.float32, gen), rand((4, 6), torch.float32, gen)]
    params = [rand(13, torch.bfloat16, gen), rand((4, 6), torch.float32, gen)]
    expected = [s.clone() for s in shadows]
    ema_update_(expected, params, 0.125)

    @torch.compile(fullgraph=True, backend=backend)
    def step(shadows, params):
        ema_update_(shadows, params, 0.125)

    step(shadows, params)
    for s, e in zip(shadows, expected):
        assert torch.equal(s, e)


@pytest.mark.parametrize("case", range(4))
def test_opcheck_update_graph_safe(case):
    shadows, params = list(_samples())[case]
    torch.library.opcheck(torch.ops.ema_fused.update_graph_safe_.default,
                          (shadows, params, torch.tensor([0.3]), "auto"))


def test_compile_fullgraph_with_a_device_weight():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    shadows = [rand(13, torch.float32, gen)]
    params = [rand(13, torch.bfloat16, gen)]
    expected = [s.clone() for s in shadows]
    ema_update_(expected, params, torch.tensor([0.25]))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(shadows, params, w):
        ema_update_(shadows, params, w)

    step(shadows, params, torch.tensor([0.25]))
    assert torch.equal(shadows[0], expected[0])
