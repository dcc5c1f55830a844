"""``average_checkpoints`` against a float64 reference, its name matching and checks, and
its memory: the output plus one source, measured as peak RSS (which counts the
memory-mapped source pages the averaging touches)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ema_fused
from ema_fused import average_checkpoints
from ema_fused.averaging import engine as _engine

from helpers.averaging import assert_close_to, reference
from helpers.numerics import rand, seeded
from helpers.paths import ROOT

SHAPES = {"embed.weight": (37, 11), "block.0.fc.weight": (4097,), "block.0.fc.bias": (7,),
          "head.weight": (1,), "norm.weight": (0,)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_state(gen, j: int, dtype=None, prefix: str = "") -> dict:
    """A model-like state dict: floats (dtype per tensor, or ``dtype``), an int64 counter and
    a bool mask that differ per source."""
    sd = {prefix + name: rand(shape, dtype or DTYPES[(i + j) % 3], gen)
          for i, (name, shape) in enumerate(SHAPES.items())}
    sd[prefix + "bn.num_batches_tracked"] = torch.tensor(100 * (j + 1))
    sd[prefix + "mask"] = torch.rand(5, generator=gen) > 0.5
    return sd


def save(tmp_path, name: str, obj) -> str:
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
def test_against_float64_paths_and_dicts_mixed(tmp_path, k, weighted):
    gen = seeded("avg", k, weighted)
    states = [make_state(gen, j) for j in range(k)]
    weights = [float(w) for w in torch.rand(k, generator=gen) + 0.1] if weighted else None
    total = sum(weights) if weighted else k
    coeffs = [w / total for w in weights] if weighted else [1 / k] * k
    # even sources as files, odd ones as dicts
    sources = [save(tmp_path, f"{j}.pt", s) if j % 2 == 0 else s for j, s in enumerate(states)]
    result = average_checkpoints(sources, weights)
    assert list(result) == list(states[0])  # the first source's names, in its order
    assert_close_to(result, reference(states, coeffs), states, coeffs)
    assert torch.equal(result["bn.num_batches_tracked"], states[-1]["bn.num_batches_tracked"])
    assert torch.equal(result["mask"], states[-1]["mask"]) and result["mask"].dtype == torch.bool


def test_weights_are_normalised_and_may_be_negative():
    gen = seeded("norm")
    states = [make_state(gen, j, torch.float32) for j in range(3)]
    a = average_checkpoints(states, [1, 1, 2])
    b = average_checkpoints(states, [0.25, 0.25, 0.5])
    assert all(torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-7) for n in a)
    extrapolated = average_checkpoints(states[:2], [2, -1])  # 2 * B - A, normalised by 1
    assert_close_to(extrapolated, reference(states[:2], [2.0, -1.0]), states[:2], [2.0, -1.0])


def test_bf16_checkpoints_summed_in_fp32_beat_a_naive_bf16_sum():
    gen = seeded("bf16")
    k = 7
    states = [{"w": rand(20011, torch.bfloat16, gen) + 3} for _ in range(k)]
    exact = sum(s["w"].double() for s in states) / k
    ours = average_checkpoints(states)["w"]
    naive = states[0]["w"] / k
    for s in states[1:]:
        naive = naive + s["w"] / k  # the usual loop, in the checkpoints' dtype
    ours_err = float((ours.double() - exact).abs().max())
    naive_err = float((naive.double() - exact).abs().max())
    assert ours_err <= 2 * k * 2 ** -24 * float(exact.abs().max())
    assert ours_err * 1000 < naive_err, (ours_err, naive_err)


def test_nested_keys_a_dotted_path_a_literal_dotted_key_and_a_callable(tmp_path):
    gen = seeded("keys")
    states = [make_state(gen, j) for j in range(2)]
    exact = reference(states, [0.5, 0.5])
    wrapped = [save(tmp_path, f"{j}.pt", {"state": {"ema": s}, "epoch": j, "model": {}})
               for j, s in enumerate(states)]
    assert_close_to(average_checkpoints(wrapped, key="state.ema"), exact, states, [0.5, 0.5])
    assert_close_to(average_checkpoints(wrapped, key=lambda ckpt: ckpt["state"]["ema"]),
                    exact, states, [0.5, 0.5])
    literal = [{"a.b": s, "a": {"b": {}}} for s in states]  # the whole key wins over the path
    assert_close_to(average_checkpoints(literal, key="a.b"), exact, states, [0.5, 0.5])
    with pytest.raises(KeyError, match=r"source 0 \('.*0\.pt'\) has no 'state.shadows' "
                                       r"\(no 'shadows' in: 'ema'\)"):
        average_checkpoints(wrapped, key="state.shadows")
    with pytest.raises(TypeError, match=r"entry 'state' is a dict, not a tensor \(pick the "
                                        "state dict inside the checkpoint with key=\\)"):
        average_checkpoints(wrapped)


def test_wrapper_prefixes_are_matched_and_dropped_from_the_names():
    gen = seeded("prefix")
    plain = [make_state(gen, j) for j in range(3)]
    prefixed = [{p + n: t for n, t in s.items()} for p, s in
                zip(("module.", "_orig_mod.", "module._orig_mod."), plain)]
    result = average_checkpoints(prefixed)
    assert list(result) == list(plain[0])
    assert_close_to(result, reference(plain, [1 / 3] * 3), plain, [1 / 3] * 3)
    twice = {"module.x": torch.ones(2), "x": torch.ones(2)}
    with pytest.raises(ValueError, match="keys 'module.x' and 'x' name the same tensor"):
        average_checkpoints([twice, twice])


def test_strict_lists_every_missing_and_unexpected_name_before_averaging(tmp_path, monkeypatch):
    gen = seeded("strict")
    base = make_state(gen, 0)
    one = {n: t for n, t in make_state(gen, 1).items() if n not in ("embed.weight", "mask")}
    one["extra.a"] = torch.ones(3)
    two = make_state(gen, 2, prefix="module.")
    del two["module.head.weight"]
    two["module.extra.b"], two["module.extra.c"] = torch.ones(1), torch.ones(2)
    calls = []
    monkeypatch.setattr(_engine, "ema_weighted_sum_", lambda *a: calls.append(a))
    with pytest.raises(KeyError) as info:
        average_checkpoints([base, save(tmp_path, "one.pt", one), two])
    text = info.value.args[0]
    assert "source 1 ('" in text and "one.pt')" in text and "source 2 (a dict)" in text
    for name in ("'embed.weight'", "'mask'", "'extra.a'", "'head.weight'",
                 "'module.extra.b'", "'module.extra.c'"):
        assert name in text, (name, text)
    assert calls == []  # nothing was averaged
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="6 tensors not in every source are left out"):
        loose = average_checkpoints([base, one, two], strict=False)
    kept = [n for n in base if n not in ("embed.weight", "mask", "head.weight")]
    assert list(loose) == kept
    states = [base, one, {n[len("module."):]: t for n, t in two.items()}]
    exact = {n: e for n, e in reference([{n: s[n] for n in kept} for s in states],
                                        [1 / 3] * 3).items()}
    assert_close_to(loose, exact, states, [1 / 3] * 3)


def test_shape_and_kind_mismatches_name_the_tensor_and_both_sources(tmp_path):
    gen = seeded("mismatch")
    a, b, c = (make_state(gen, j) for j in range(3))
    b["embed.weight"] = torch.zeros(11, 37)
    c["block.0.fc.bias"] = torch.zeros(7, dtype=torch.int32)
    path = save(tmp_path, "c.pt", c)
    with pytest.raises(ValueError) as info:
        average_checkpoints([a, b, path])
    text = str(info.value)
    assert "'embed.weight': shape (37, 11) in source 0 (a dict) but (11, 37) in source 1" in text
    assert "'block.0.fc.bias': torch.float16 in source 0 (a dict) but torch.int32 in " \
           "source 2 ('" in text


def test_argument_checks():
    sd = {"w": torch.ones(3)}
    cases = [
        (lambda: average_checkpoints([sd, sd], [1.0]), ValueError, "1 weights for 2 sources"),
        (lambda: average_checkpoints([sd, sd], [1.0, -1.0]), ValueError, "sum to zero"),
        (lambda: average_checkpoints([sd, sd], [1.0, float("nan")]), ValueError,
         r"weights\[1\] must be a finite real number"),
        (lambda: average_checkpoints([]), ValueError, "no sources"),
        (lambda: average_checkpoints("a.pt"), TypeError, "got a single str; pass \\[it\\]"),
        (lambda: average_checkpoints(sd), TypeError, "got a single dict"),
        (lambda: average_checkpoints([sd, 3]), TypeError, r"sources\[1\] is a int"),
        (lambda: average_checkpoints([sd], dtype=torch.bfloat16), TypeError,
         "dtype must be torch.float32 or torch.float64"),
        (lambda: average_checkpoints([sd], key=3), TypeError, "key must be None, a string"),
        (lambda: average_checkpoints([{"w": torch.ones(2, dtype=torch.complex64)}]), TypeError,
         "tensor 'w' is complex"),
        (lambda: average_checkpoints([sd, "/nonexistent/x.pt"]), FileNotFoundError,
         r"source 1 \('/nonexistent/x.pt'\) cannot be loaded"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_float64_output_float8_inputs_and_a_legacy_file(tmp_path):
    gen = seeded("f64")
    x = rand(301, torch.float64, gen)
    y = rand(301, torch.float32, gen).to(torch.float8_e4m3fn)
    z = rand(301, torch.float16, gen)
    legacy = str(tmp_path / "legacy.pt")
    torch.save({"w": z}, legacy, _use_new_zipfile_serialization=False)  # cannot be mapped
    result = average_checkpoints([{"w": x}, {"w": y}, legacy], [0.5, 0.25, 0.25],
                                 dtype=torch.float64)
    exact = 0.5 * x + 0.25 * y.double() + 0.25 * z.double()
    assert result["w"].dtype == torch.float64
    assert torch.allclose(result["w"], exact, rtol=1e-15, atol=0)


def test_a_file_that_weights_only_refuses_names_the_source(tmp_path):
    path = save(tmp_path, "pickled.pt", {"w": torch.ones(2), "obj": ema_fused.ModelChangedError})
    with pytest.raises(Exception, match=r"source 0 \('.*pickled.pt'\) cannot be loaded with "
                                        r"torch.load\(weights_only=True\)"):
        average_checkpoints([path])


def test_the_output_owns_its_memory():
    gen = seeded("own")
    states = [make_state(gen, j, torch.float32) for j in range(2)]
    result = average_checkpoints(states)
    result["bn.num_batches_tracked"] += 1
    result["embed.weight"] += 1
    assert int(states[1]["bn.num_batches_tracked"]) == 200
    assert float((states[0]["embed.weight"] - states[1]["embed.weight"]).abs().max()) > 0


MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, sys, torch, ema_fused
    paths, how = sys.argv[1:-1], sys.argv[-1]
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    ema_fused.average_checkpoints([{"w": torch.ones(3)}] * 2)  # imports and backend choice
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    base = status("VmRSS:")
    if how == "ours":
        out = ema_fused.average_checkpoints(paths)
    else:  # the usual loop: every checkpoint loaded, then summed
        states = [torch.load(p, mmap=True, weights_only=True) for p in paths]
        out = {n: sum(s[n].float() for s in states) / len(states) for n in states[0]}
    print(json.dumps({"peak": status("VmHWM:") - base}))
""")


def _peak(paths, how: str) -> int:
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *paths, how], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]


def test_peak_memory_of_seven_sources_is_the_output_plus_one_source(tmp_path):
    """Peak RSS counts the file-backed pages of mapped sources as they are touched, so it
    sees what mmap loading costs (the naive loop's peak is checked to show it)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    gen = seeded("memory")
    size = 24 << 20  # bytes per source: six fp32 tensors of 1M elements
    paths = [save(tmp_path, f"{j}.pt", {f"t{i}": rand(1 << 20, torch.float32, gen)
                                         for i in range(6)}) for j in range(7)]
    ours = _peak(paths, "ours")
    naive = _peak(paths, "naive")
    assert naive >= 7 * size  # the measurement sees the mapped checkpoints
    assert ours <= 2 * size + (16 << 20), (ours / 2**20, naive / 2**20)  # output + one source


def test_a_legacy_file_with_float8_names_the_source(tmp_path):
    """torch cannot read float8 tensors back from its legacy (non-zip) format: the error
    names the source and the fix, not torch's raw AttributeError (issue 20, item 8)."""
    legacy = str(tmp_path / "legacy8.pt")
    torch.save({"w": torch.ones(3).to(torch.float8_e4m3fn)}, legacy,
               _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match=r"source 1 \('.*legacy8.pt'\).*legacy \(non-zip\) "
                                           r"format.*float8.*re-save"):
        average_checkpoints([{"w": torch.ones(3).to(torch.float8_e4m3fn)}, legacy])
