"""Built-in benchmark models, generated from shapes so that nothing is downloaded.

An EMA update only sees a list of tensors, so a model here is its tensor shapes,
named as in the real model's ``state_dict()``.  Every tensor is an ``nn.Parameter``
(no buffers): each provider then averages exactly the same tensors, whatever its
buffer policy (torch_ema and AveragedModel skip buffers, timm averages them).

* ``llama-125m``, ``llama-200m``, ``llama-1.1b``, ``llama-7b``: LLaMA layout (embedding,
  per layer RMSNorm + q/k/v/o + gate/up/down, final norm, untied lm_head).  1.1B has
  TinyLlama's shapes (grouped-query k/v), 7B LLaMA-2-7B's; 125M uses GPT-3-small
  widths (768 hidden, 12 layers) with a 32k vocabulary, 134M parameters in all;
  200M has 1024 hidden, 2816 intermediate, 10 layers: 194M parameters in 93 tensors
  (the quick suite's LLaMA, small enough for a CPU run).
* ``mix500``: 505 tensors, most of them small: a ViT-S/16 at depth 24 with
  LayerScale plus ResNet-50's convolutions and BatchNorm affine parameters.
* ``llama-tiny``, ``mix500-tiny``: the same layouts at toy widths (the tiny mix
  keeps all 505 tensors) for CI smoke runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model as ``(state_dict name, shape)`` pairs."""

    name: str
    description: str
    shapes: tuple[tuple[str, Shape], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def largest(self) -> int:
        """Elements in the largest tensor (bounds per-tensor temporaries)."""
        return max(math.prod(s) for _, s in self.shapes)


def llama(name: str, vocab: int, hidden: int, inter: int, layers: int,
          kv_dim: int | None = None) -> ModelSpec:
    """LLaMA layout; ``kv_dim`` < ``hidden`` gives grouped-query k/v projections."""
    kv = kv_dim or hidden
    shapes: list[tuple[str, Shape]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    desc = (f"LLaMA layout: vocab {vocab}, hidden {hidden}, intermediate {inter}, "
            f"{layers} layers" + (f", k/v dim {kv}" if kv != hidden else ""))
    return ModelSpec(name, desc, tuple(shapes))


def _vit(dim: int, depth: int, classes: int) -> Iterator[tuple[str, Shape]]:
    yield from [("vit.patch_embed.proj.weight", (dim, 3, 16, 16)),
                ("vit.patch_embed.proj.bias", (dim,)),
                ("vit.cls_token", (1, 1, dim)), ("vit.pos_embed", (1, 197, dim))]
    for i in range(depth):
        p = f"vit.blocks.{i}."
        yield from [(p + "norm1.weight", (dim,)), (p + "norm1.bias", (dim,)),
                    (p + "attn.qkv.weight", (3 * dim, dim)), (p + "attn.qkv.bias", (3 * dim,)),
                    (p + "attn.proj.weight", (dim, dim)), (p + "attn.proj.bias", (dim,)),
                    (p + "ls1.gamma", (dim,)),
                    (p + "norm2.weight", (dim,)), (p + "norm2.bias", (dim,)),
                    (p + "mlp.fc1.weight", (4 * dim, dim)), (p + "mlp.fc1.bias", (4 * dim,)),
                    (p + "mlp.fc2.weight", (dim, 4 * dim)), (p + "mlp.fc2.bias", (dim,)),
                    (p + "ls2.gamma", (dim,))]
    yield from [("vit.norm.weight", (dim,)), ("vit.norm.bias", (dim,)),
                ("vit.head.weight", (classes, dim)), ("vit.head.bias", (classes,))]


def _resnet50(base: int, classes: int) -> Iterator[tuple[str, Shape]]:
    def conv_bn(prefix, conv, out_c, in_c, k, bn):
        yield (f"{prefix}{conv}.weight", (out_c, in_c, k, k))
        yield (f"{prefix}{bn}.weight", (out_c,))
        yield (f"{prefix}{bn}.bias", (out_c,))

    yield from conv_bn("resnet.", "conv1", base, 3, 7, "bn1")
    in_c = base
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        width = base * 2 ** (stage - 1)
        for b in range(blocks):
            p = f"resnet.layer{stage}.{b}."
            yield from conv_bn(p, "conv1", width, in_c, 1, "bn1")
            yield from conv_bn(p, "conv2", width, width, 3, "bn2")
            yield from conv_bn(p, "conv3", 4 * width, width, 1, "bn3")
            if b == 0:
                yield from conv_bn(p, "downsample.0", 4 * width, in_c, 1, "downsample.1")
            in_c = 4 * width
    yield from [("resnet.fc.weight", (classes, in_c)), ("resnet.fc.bias", (classes,))]


def mix(name: str, vit_dim: int, resnet_base: int, classes: int) -> ModelSpec:
    """Many small tensors: ViT-S/16 (depth 24, LayerScale) + ResNet-50 affine/conv weights."""
    shapes = tuple(_vit(vit_dim, 24, classes)) + tuple(_resnet50(resnet_base, classes))
    desc = (f"ViT (dim {vit_dim}, depth 24, LayerScale) + ResNet-50 (base width "
            f"{resnet_base}), {classes} classes: norms, biases, convs")
    return ModelSpec(name, desc, shapes)


SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    llama("llama-125m", 32000, 768, 2048, 12),
    llama("llama-200m", 32000, 1024, 2816, 10),
    llama("llama-1.1b", 32000, 2048, 5632, 22, kv_dim=256),
    llama("llama-7b", 32000, 4096, 11008, 32),
    mix("mix500", 384, 64, 1000),
    llama("llama-tiny", 512, 64, 176, 2),
    mix("mix500-tiny", 48, 8, 10),
)}
QUICK = ("llama-200m", "mix500")
FULL = ("llama-200m", "llama-1.1b", "llama-7b", "mix500")
TINY = ("llama-tiny", "mix500-tiny")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(spec: ModelSpec, dtype: torch.dtype, device: torch.device | str,
          seed: int = 0) -> nn.Module:
    """An ``nn.Module`` tree whose ``state_dict()`` names are ``spec``'s, filled on ``device``.

    The values are drawn on the device itself (a 7B model is never staged in host
    memory); the same ``seed`` gives the same tensors.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    root = nn.Module()
    for name, shape in spec.shapes:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        mod.register_parameter(leaf, nn.Parameter(t))
    return root
