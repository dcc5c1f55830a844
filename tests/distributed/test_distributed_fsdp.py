"""FSDP2 models on 2 gloo ranks: the shard-local EMA equals a single-process EMA.

Each rank runs the same trajectory on a plain copy of the model and on its FSDP2
shards.  After every update each shadow's ``full_tensor()`` must equal the plain EMA's
shadow bit for bit (the update is elementwise: sharding must not change one bit) and a
float64 reference within fp32 rounding; every EMA path runs under ``CommDebugMode``
and must make no collective.  One spawned run per backend.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers.numerics import requires_gpu
from helpers.dist_utils import full, make_model, spawn, step_models
from ema_fused import schedules

CONFIGS = [  # (model dtype, EMA keywords): swap path, store path + bias, buffers/exclude,
    (torch.float32, dict(decay=0.9)),  # the graph-safe (capturable) update
    (torch.bfloat16, dict(decay=0.8, bias_correction=True, buffers="copy")),
    (torch.float32, dict(decay=0.7, buffers="ignore", exclude=["2.*"])),
    (torch.bfloat16, dict(decay=0.75, schedule=schedules.constant(0.75), capturable=True)),
]


def _shard(model: torch.nn.Module, mixed: bool) -> torch.nn.Module:
    """A sharded deep copy: every Linear is an FSDP2 unit; ``mixed`` leaves the
    LayerNorm's params plain (no root unit), else the root shards them too."""
    from torch.distributed.fsdp import fully_shard
    sharded = copy.deepcopy(model)
    fully_shard(sharded[0])
    fully_shard(sharded[2])
    if not mixed:
        fully_shard(sharded)
    return sharded


def _assert_same_shadows(sharded_ema, plain_ema, ref, values) -> None:
    """Bit for bit the plain EMA's shadows; averaged ones (fp32) near the float64
    reference, copied ones equal to the model's current values (those two on the CPU)."""
    plain = dict(plain_ema.named_shadows())
    expected = ref.read()
    for name, shadow in sharded_ema.named_shadows():
        got = full(shadow)
        assert got.dtype == plain[name].dtype and torch.equal(got, plain[name]), name
        if name in expected:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double().cpu() * sharded_ema._read_scale(),
                                       expected[name], rtol=2e-6, atol=2e-6)
        else:
            assert torch.equal(got.cpu(), values[name]), name


def _check_layout(sharded_ema, model) -> None:
    """Each shadow is laid out like its tensor, with a local shard of the same size."""
    from torch.distributed.tensor import DTensor
    params = model.state_dict(keep_vars=True)
    for name, shadow in sharded_ema.named_shadows():
        t = params[name]
        assert isinstance(shadow, DTensor) == isinstance(t, DTensor), name
        if isinstance(t, DTensor):
            assert shadow.device_mesh == t.device_mesh and shadow.placements == t.placements
            assert shadow.shape == t.shape and shadow.to_local().shape == t.to_local().shape


def _run_config(rank: int, backend: str, dtype, kwargs: dict, mixed: bool,
                device: str) -> None:
    from torch.distributed.tensor.debug import CommDebugMode
    from ema_fused import EMA
    from helpers.ema_reference import Reference
    from helpers.numerics import rand, seeded
    plain = make_model(dtype).to(device)
    sharded = _shard(plain, mixed)
    ema_s = EMA(sharded, backend=backend, **kwargs)
    ema_p = EMA(plain, backend=backend, **kwargs)
    names = dict(ema_p.named_shadows())
    averaged = {n for n, p in plain.named_parameters() if n in names}
    if kwargs.get("buffers", "ema") == "ema":
        averaged |= {n for n, b in plain.named_buffers() if n in names and b.is_floating_point()}
    ref = Reference({n: t for n, t in plain.state_dict().items() if n in averaged},
                    lambda n: kwargs["decay"], bias=kwargs.get("bias_correction", False))
    _check_layout(ema_s, sharded)
    x = rand((5, 7), dtype, seeded("x", rank), device=device)
    for step in range(1, 5):
        values = step_models([plain, sharded], step)
        with CommDebugMode() as comm:
            ema_s.update()
            ema_s.store()
            ema_s.copy_to()
            ema_s.restore()
            with ema_s.average_parameters():
                pass
            weights = ema_s.averaged_weights()
            state = ema_s.state_dict()
            ema_s.load_state_dict(state)
        assert comm.get_total_counts() == 0, comm.get_comm_counts()
        ema_p.update()
        ref.update({n: v for n, v in values.items() if n in averaged})
        _assert_same_shadows(ema_s, ema_p, ref, values)
        assert set(weights) == set(names)
    assert ema_s.backend == backend
    before = {n: full(t).clone() for n, t in sharded.state_dict().items()}
    with ema_s.average_parameters(), ema_p.average_parameters():
        inside = sharded.state_dict()
        for n, t in plain.state_dict().items():  # the EMA weights are in the sharded model
            assert torch.equal(full(inside[n]), t), n
        torch.testing.assert_close(sharded(x), plain(x))
    for n, t in sharded.state_dict().items():  # and restored exactly
        assert torch.equal(full(t), before[n]), n
    if torch.distributed.get_world_size() > 1:
        with CommDebugMode() as comm:  # the counter does see the collectives
            full(dict(ema_s.named_shadows())["0.weight"])
        assert comm.get_total_counts() > 0


def _fsdp_worker(rank: int, world_size: int, backend: str, device: str = "cpu") -> None:
    for dtype, kwargs in CONFIGS:
        for mixed in (False, True):
            _run_config(rank, backend, dtype, kwargs, mixed, device)


@pytest.mark.parametrize("backend", ["cpu", "foreach", "triton"])
def test_fsdp2_matches_plain_ema_without_collectives(backend):
    from ema_fused import available_backends
    usable, why = available_backends("cpu")[backend]
    if not usable:
        pytest.skip(f"backend {backend!r} cannot run here: {why}")
    spawn(_fsdp_worker, 2, backend)


@pytest.mark.gpu
@requires_gpu()
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fsdp2_on_one_gpu_with_the_gpu_backends(backend):
    """One rank (NCCL, a 1-GPU mesh): the GPU backends on FSDP2 local shards."""
    spawn(_fsdp_worker, 1, backend, "cuda", pg_backend="nccl")
