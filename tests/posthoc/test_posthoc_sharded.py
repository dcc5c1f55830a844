"""PostHocEMA on an FSDP2 model (2 gloo ranks started by the test): shard-local profiles,
snapshots through DCP, synthesis on the same ranks and from the folder in one process,
all against a single-process PostHocEMA on the same 20-step trajectory; a snapshot cut
off mid-write is skipped with a warning naming it.

The profiles agree bit for bit (EMA's update is elementwise), so the fp16 snapshots do
too, and every synthesis runs the same additions per element in the same order: the
results are compared bit for bit as well, a stronger check than the fp16-snapshot
rounding the synthesis itself carries.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from unittest import mock

import pytest
import torch

from helpers.dist_utils import full, make_model, spawn, step_models
from helpers.numerics import requires_gpu
from ema_fused import PostHocEMA

SIGMAS = (0.05, 0.10)
STEPS, EVERY = 20, 5


def _sharded_model(device: str = "cpu") -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    model = copy.deepcopy(make_model()).to(device)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def _train(models, phemas, steps) -> None:
    for step in steps:
        step_models(models, step)
        for p in phemas:
            p.update(step)


def _assert_equal(ours: dict, ref: dict, what: str) -> None:
    assert list(ours) == list(ref), what
    for name, t in ref.items():
        got = full(ours[name]).cpu()
        assert got.dtype == t.dtype and torch.equal(got, t), (what, name, (got - t).abs().max())


def _worker(rank: int, world_size: int, root: str, device: str = "cpu") -> None:
    from torch.distributed.tensor import DTensor
    folder = os.path.join(root, "sharded")
    model, plain_model = _sharded_model(device), copy.deepcopy(make_model()).to(device)
    phema = PostHocEMA(model, SIGMAS, snapshot_every=EVERY, snapshot_dir=folder)
    in_memory = PostHocEMA(model, SIGMAS, snapshot_every=EVERY)
    plain = PostHocEMA(plain_model, SIGMAS, snapshot_every=EVERY)
    _train([model, plain_model], [phema, in_memory, plain], range(1, STEPS + 1))
    assert phema.snapshot_steps == plain.snapshot_steps == (5, 10, 15, 20)
    for k in range(len(SIGMAS)):  # every profile, bit for bit
        _assert_equal(phema.named_shadows(k), plain.named_shadows(k), f"profile {k}")
    ref = plain.synthesize(0.13)
    for who in (phema, in_memory):
        ours = who.synthesize(0.13)
        assert isinstance(ours["0.weight"], DTensor)  # laid out like the model, unsharded never
        assert ours["0.weight"].placements == model[0].weight.placements
        assert ours["0.weight"].to_local().device == model[0].weight.to_local().device
        _assert_equal(ours, ref, "synthesize")
    _assert_equal(phema.synthesize(0.07, step=10), plain.synthesize(0.07, step=10), "step=10")
    phema.synthesize_to(model, 0.13)  # fills the sharded model's own shards
    _assert_equal(dict(model.state_dict()), {n: ref[n].to(t.dtype) for n, t in
                                             plain_model.state_dict().items()}, "synthesize_to")
    resumed = PostHocEMA(model, SIGMAS, snapshot_every=EVERY, snapshot_dir=folder)
    resumed.load_state_dict(phema.state_dict())  # the folders are found again
    _assert_equal(resumed.synthesize(0.13), ref, "resumed")
    # a snapshot cut off while DCP writes it: the metadata (written last) never lands
    _train([model], [phema], [STEPS + 1])
    from torch.distributed.checkpoint import FileSystemWriter
    with mock.patch.object(FileSystemWriter, "finish", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            phema.snapshot()
    assert phema.snapshot_steps == (5, 10, 15, 20)
    if rank == 0:
        torch.save(ref, os.path.join(root, "ref.pt"))


def test_fsdp2_posthoc_matches_one_process_and_reads_back_in_one_process(tmp_path):
    spawn(_worker, 2, str(tmp_path), timeout=180)
    _check_in_one_process(tmp_path)


@pytest.mark.gpu
@requires_gpu()
def test_fsdp2_posthoc_on_a_one_rank_cuda_mesh(tmp_path):
    """The same on the GPU: FSDP2 over a 1-rank NCCL mesh, shadows and the synthesized
    shards on the GPU, snapshots read back in this process."""
    spawn(_worker, 1, str(tmp_path), "cuda", timeout=300, pg_backend="nccl")
    _check_in_one_process(tmp_path)


def _check_in_one_process(tmp_path) -> None:
    folder = tmp_path / "sharded"
    names = sorted(os.listdir(folder))
    assert names == [".phema-0000000021.tmp"] + [f"phema-{s:010d}" for s in (5, 10, 15, 20)]
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    with pytest.warns(UserWarning, match=r"snapshot '.*\.phema-0000000021\.tmp' \(step 21\) "
                                         "was cut off while being written"):
        ours = PostHocEMA.synthesize_from(folder, 0.13)
    _assert_equal(ours, ref, "synthesize_from in one process")
    if importlib.util.find_spec("safetensors") is not None:  # the README's export
        from safetensors.torch import load_file
        out = tmp_path / "ema-0.13.safetensors"
        with pytest.warns(UserWarning, match="cut off"):
            assert PostHocEMA.synthesize_from(folder, 0.13, out=out) is None
        _assert_equal(load_file(out), ref, "safetensors file")
    # a folder that lost its DCP metadata is skipped too
    os.remove(folder / "phema-0000000020" / ".metadata")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        earlier = PostHocEMA.synthesize_from(folder, 0.13)
    assert [str(w.message).split("'")[1].rsplit("/", 1)[1] for w in caught] == [
        ".phema-0000000021.tmp", "phema-0000000020"]
    assert not torch.equal(earlier["0.weight"], ref["0.weight"])  # the step-15 fit
