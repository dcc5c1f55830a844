"""``average_checkpoints`` over DCP checkpoint directories, safetensors files, torch.save files
and state dicts, returned or streamed (``out=``: a safetensors file, a DCP directory), and
``like=`` on 2 gloo ranks started by the test.

The DCP checkpoints are saved by an FSDP2 model on 2 ranks (each rank writes its own
chunks), averaged in this one process (DCP reshards) and on the 2 ranks with ``like=``
(each reads only its shards, with no collective), and compared with a float64 average
of the full tensors.  Every output path makes the same additions per element in the
same order, so the outputs are compared with each other bit for bit.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

from ema_fused import average_checkpoints

from helpers.averaging import assert_close_to, reference
from helpers.dist_utils import dcp_module, full, make_model, new_values, spawn, step_models
from helpers.numerics import rand, seeded

STEPS = (1, 2, 3)



def _full_states() -> list[dict]:
    """The full tensors each checkpoint holds (the trajectory's values at each step)."""
    plain = make_model()
    return [new_values(plain, step) for step in STEPS]


def _save_and_average(rank: int, world_size: int, root: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    dcp = dcp_module()
    model = copy.deepcopy(make_model())
    for i in (0, 2):
        fully_shard(model[i])
    fully_shard(model)
    paths = [os.path.join(root, f"ckpt{j}") for j in range(len(STEPS))]
    for path, step in zip(paths, STEPS):
        step_models([model], step)
        dcp.save({"model": model.state_dict(), "step": step}, checkpoint_id=path)
    like = model.state_dict()
    with CommDebugMode() as comm:
        ours = average_checkpoints(paths, key="model", like=like)
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    with CommDebugMode() as seen:  # the count sees a collective when there is one
        torch.distributed.all_reduce(torch.ones(1))
    assert seen.get_total_counts() == 1
    assert isinstance(ours["0.weight"], DTensor)
    assert ours["0.weight"].placements == like["0.weight"].placements
    assert ours["0.weight"].to_local().shape == like["0.weight"].to_local().shape
    states = _full_states()
    assert_close_to({n: full(t) for n, t in ours.items()}, reference(states, [1 / 3] * 3),
                    states, [1 / 3] * 3)
    assert int(ours["seen"]) == STEPS[-1]  # integers: the last source's
    # another layout than the saved one (columns, not rows): DCP hands over the parts of
    # the saved row chunks that fall in each rank's columns (strided boxes)
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = like["0.weight"].device_mesh
    cols = {n: distribute_tensor(torch.zeros(t.shape), mesh, [Shard(1)], src_data_rank=None)
            if t.dim() == 2 else t for n, t in like.items()}
    by_cols = average_checkpoints(paths, key="model", like=cols)
    assert by_cols["0.weight"].placements == (Shard(1),)
    assert_close_to({n: full(t) for n, t in by_cols.items()}, reference(states, [1 / 3] * 3),
                    states, [1 / 3] * 3)
    wrapped = {f"module.{n}": t for n, t in like.items()}  # a DDP-style state dict's names
    assert average_checkpoints(paths, key="model", like=wrapped,
                               out=os.path.join(root, "avg_like")) is None


def test_dcp_checkpoints_of_two_ranks_averaged_in_one_process_and_with_like(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file
    spawn(_save_and_average, 2, str(tmp_path), timeout=180)
    states, coeffs = _full_states(), [1 / 3] * 3
    paths = [tmp_path / f"ckpt{j}" for j in range(3)]
    returned = average_checkpoints(paths, key="model")
    assert sorted(returned) == sorted(states[0])  # in the order DCP's metadata lists them
    assert_close_to(returned, reference(states, coeffs), states, coeffs)
    assert returned["seen"].dtype == torch.int64 and int(returned["seen"]) == 3
    assert average_checkpoints(paths, key="model", out=tmp_path / "avg.safetensors") is None
    average_checkpoints(paths, key="model", out=tmp_path / "avg_dir")
    for other in (load_file(tmp_path / "avg.safetensors"),
                  average_checkpoints([tmp_path / "avg_dir"]),
                  average_checkpoints([tmp_path / "avg_like"])):  # written by the 2 ranks
        assert sorted(other) == sorted(returned)
        for name, t in returned.items():
            assert other[name].dtype == t.dtype and torch.equal(other[name], t), name


def _state(gen, j: int) -> dict:
    return {"embed.weight": rand((37, 11), torch.bfloat16, gen),
            "fc.weight": rand((4097,), torch.float16, gen), "fc.bias": rand(7, torch.float32, gen),
            "norm.weight": rand(0, torch.float32, gen),
            "head.weight": rand((1,), torch.float32, gen),
            "bn.num_batches_tracked": torch.tensor(100 * (j + 1)),
            "mask": torch.rand(5, generator=gen) > 0.5}


def _mixed_sources(tmp_path, states: list[dict]) -> list:
    from safetensors.torch import save_file
    dcp_module().save({"model": states[0], "epoch": 0}, checkpoint_id=str(tmp_path / "d0"), no_dist=True)
    save_file({f"model.{n}": t for n, t in states[1].items()}, tmp_path / "s1.safetensors")
    torch.save({"model": {f"module.{n}": t for n, t in states[2].items()}}, tmp_path / "t2.pt")
    return [tmp_path / "d0", str(tmp_path / "s1.safetensors"), tmp_path / "t2.pt",
            {"model": states[3]}]


def test_mixed_sources_returned_and_streamed(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    gen = seeded("mixed")
    states = [_state(gen, j) for j in range(4)]
    sources = _mixed_sources(tmp_path, states)
    weights = [1.0, 2.0, 3.0, -1.0]
    coeffs = [w / 5 for w in weights]
    result = average_checkpoints(sources, weights, key="model")
    assert list(result) == list(states[0])
    assert_close_to(result, reference(states, coeffs), states, coeffs)
    for name in ("bn.num_batches_tracked", "mask"):
        assert result[name].dtype == states[3][name].dtype
        assert torch.equal(result[name], states[3][name])
    out = tmp_path / "avg.safetensors"
    average_checkpoints(sources, weights, key="model", out=out)
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(result)
        for name in result:
            assert torch.equal(f.get_tensor(name), result[name]), name
    average_checkpoints(sources, weights, key="model", out=tmp_path / "avg_dir")
    back = average_checkpoints([tmp_path / "avg_dir"])
    assert all(torch.equal(back[n], t) for n, t in result.items())


def test_strict_lists_every_name_of_every_source_before_writing(tmp_path):
    pytest.importorskip("safetensors")
    gen = seeded("strict-files")
    states = [_state(gen, j) for j in range(4)]
    del states[1]["fc.bias"]
    states[2]["extra.a"] = torch.ones(2)
    del states[3]["mask"]
    states[3]["extra.b"] = torch.ones(3)
    sources = _mixed_sources(tmp_path, states)
    for out in (tmp_path / "never.safetensors", tmp_path / "never_dir"):
        with pytest.raises(KeyError) as info:
            average_checkpoints(sources, key="model", out=out)
        text = info.value.args[0]
        assert "s1.safetensors'): missing 'fc.bias'" in text, text
        assert "t2.pt'): unexpected 'module.extra.a'" in text, text
        assert "source 3 (a dict): missing 'mask'; unexpected 'extra.b'" in text, text
        assert not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == ["d0", "s1.safetensors", "t2.pt"]


def test_errors_name_the_source_and_the_problem(tmp_path):
    dcp = dcp_module()
    dcp.save({"model": {"w": torch.ones(3)}, "step": 1}, checkpoint_id=str(tmp_path / "c"),
             no_dist=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    c, sd = tmp_path / "c", {"w": torch.ones(3)}
    cases = [
        (lambda: average_checkpoints([c]), TypeError,
         r"source 0 \('.*c'\): entry 'step' is a non-tensor value \(saved as bytes\), not a "
         r"tensor \(pick the state dict inside the checkpoint with key=\)"),
        (lambda: average_checkpoints([c], key="ema"), KeyError,
         r"has no 'ema' \(top-level names: 'model', 'step'\)"),
        (lambda: average_checkpoints([c], key=lambda ckpt: ckpt["model"]), TypeError,
         "name the state dict with a dotted string"),
        (lambda: average_checkpoints([c, tmp_path / "empty"], key="model"), FileNotFoundError,
         r"source 1 \('.*empty'\) is a directory without a DCP checkpoint's .metadata"),
        (lambda: average_checkpoints([sd], out=tmp_path / "busy"), FileExistsError,
         "is a directory that is not empty"),
        (lambda: average_checkpoints([sd], out=3), TypeError, "out must be a path"),
        (lambda: average_checkpoints([sd], like=sd, out=tmp_path / "a.safetensors"), ValueError,
         "like= writes each rank's shards through DCP: out must be a directory"),
        (lambda: average_checkpoints([sd], like={"v": torch.ones(3), "w": torch.ones(2)}),
         ValueError, r"like= does not hold the tensors the sources do: unexpected 'v'; "
                     r"shapes differ: 'w': \(2,\) in like, \(3,\) in the sources"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert sorted(os.listdir(tmp_path)) == ["busy", "c", "empty"]  # nothing written


MEMORY_SCRIPT = r"""
import gc, json, os, sys, warnings, torch, ema_fused
import torch.distributed.checkpoint as dcp
warnings.filterwarnings("ignore", message=".*assuming the intent is to")
root, k = sys.argv[1], 5
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
gen = torch.Generator().manual_seed(0)
shapes = {"embed": (8192, 1024), "head": (8192, 1024), **{f"l{i}": (1024, 1024) for i in range(6)}}
dirs, files = [], []
for j in range(k):
    sd = {n: torch.randn(s, generator=gen).bfloat16() for n, s in shapes.items()}
    dirs.append(os.path.join(root, f"d{j}")); files.append(os.path.join(root, f"t{j}.pt"))
    dcp.save(sd, checkpoint_id=dirs[-1], no_dist=True)
    torch.save(sd, files[-1])
del sd
tiny = os.path.join(root, "tiny")
dcp.save({"w": torch.ones(3)}, checkpoint_id=tiny, no_dist=True)
ema_fused.average_checkpoints([tiny, tiny], out=os.path.join(root, "w.safetensors"))  # imports
peaks = {}
for how, sources in (("dcp", dirs), ("torch", files), ("dcp_dir", dirs), ("naive", files)):
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from here
    base = status("VmRSS:")
    if how == "naive":  # the usual loop: every checkpoint loaded, then summed
        states = [torch.load(p, mmap=True, weights_only=True) for p in sources]
        avg = {n: sum(s[n].float() for s in states) / k for n in states[0]}
        del states, avg
    else:
        out = os.path.join(root, how + ("" if how == "dcp_dir" else ".safetensors"))
        ema_fused.average_checkpoints(sources, out=out)
    peaks[how] = status("VmHWM:") - base
print(json.dumps(peaks))
"""


def test_streaming_five_sources_keeps_peak_memory_within_two_output_tensors(tmp_path):
    """Peak RSS (which counts mapped file pages as they are touched) while averaging 5
    sources of 44 MiB (bf16) into a safetensors file: within twice the largest output
    tensor (32 MiB in fp32), for DCP directories and torch.save files; into a DCP
    directory, within three times."""
    import json
    import subprocess
    import sys
    from helpers.paths import ROOT
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    pytest.importorskip("safetensors")
    # a fixed mmap threshold: glibc maps every large block and unmaps it when freed, so
    # memory freed by one run is not reused unseen by the next (its dynamic threshold
    # would keep blocks up to 32 MiB in the heap)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    largest, source = 8192 * 1024 * 4, 22 * 2 ** 20 * 2
    assert peaks["naive"] >= 5 * source, peaks  # the measurement sees the sources
    for how in ("dcp", "torch"):
        assert peaks[how] <= 2 * largest, {n: p / 2 ** 20 for n, p in peaks.items()}
    # into a DCP directory, one output tensor more: DCP's writer still holds the tensor
    # it wrote last (its loop variable) while it asks for the next one
    assert peaks["dcp_dir"] <= 3 * largest, {n: p / 2 ** 20 for n, p in peaks.items()}
