"""Static int8 quantisation of the served network: torchao's PT2E flow with the x86 Inductor quantiser,
calibrated on the user's own images; exporter/export.py compiles the result with AOTInductor (freezing on,
without which Inductor does not fuse the int8 patterns and the model silently stays fp32).

Two things this network needs that the quantiser does not do by itself:
- resnest's blocks call one nn.ReLU module several times. The partitioner groups nodes by the module that
  made them (nn_module_stack) when a node has no `source_fn_stack`, merges those calls into one partition and
  fails with "Input partition has more than one output node". Each ReLU call gets its own entry.
- 7-bit activations rather than the default 8 (see quantize()).

Every convolution and linear layer is quantised. Keeping some in fp32 was measured on the trained fixture
(docs/PRECISION.md, 8-bit activations) and did not buy agreement worth its time: the stem and head, the
split-attention fc1/fc2, the downsampling convolutions, even all of layer3 or layer4 left the worst |dp| at
0.044-0.050 (0.046-0.051 with none kept). KEEP_FP32 is where a layer would be named if one ever earns it.
Empirical bias correction and more calibration images (96) were measured too and agreed worse; which images
calibrate moves the worst |dp| more than either (docs/PRECISION.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import metadata

import torch
from torch import nn

QUANTIZER = ("torchao PT2E, X86InductorQuantizer (static; per-channel int8 weights; 7-bit activations, "
             "histogram-calibrated)")
CALIBRATION_VIEWS = 8  # each calibration image in all 8 dihedral views: whatever --tta-views serves is among them


KEEP_FP32: tuple[str, ...] = ()  # qualified names in the served module (e.g. "model.layer3")


def keep_fp32(module: nn.Module) -> list[str]:
    """The submodules left in fp32 that this module has."""
    names = {name for name, _ in module.named_modules()}
    return [n for n in KEEP_FP32 if n in names]


def _one_partition_per_relu(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default):
            node.meta["source_fn_stack"] = [(node.name, nn.ReLU)]


def quantize(module: nn.Module, calibration: Sequence[torch.Tensor], image_size: int) -> tuple[nn.Module, dict]:
    """`module` (N x 3 x S x S -> N x (1 + D), fp32, eval) quantised to int8, observers calibrated on
    `calibration` (preprocessed 3 x S x S tensors) in their TTA views. Returns the converted graph module
    (still to be compiled) and what was done, for the archive's metadata.

    Activations use 7 bits (the quantiser's reduce_range), on every CPU. Without VNNI (a t2.micro's AVX2)
    oneDNN multiplies uint8 x int8 pairs into saturating int16 sums: with 8 bits the trained fixture's pooled
    layer3 features came out up to 0.4 off there, beyond the export check (torchao advises 7 bits for such
    CPUs). With VNNI 7 bits also agreed better, measured on 320 held-out images: max |dp| 0.024 against
    0.040 with 8 bits (mean 0.0009 against 0.0013); the histogram observer clips less with fewer levels."""
    # torchao logs at import that its CUDA kernels cannot load on a CPU-only torch: true and irrelevant here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # torch 2.13 warns, once per import, that torchao registers an Enum as a pytree constant ("... will be an
    # error in a future release"): a deprecation aimed at torchao's authors, and a second line (with the word
    # "error") beside a build's one-line refusal. Hushed for the import only; torch.utils._pytree logs as before.
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    finally:
        pytree_log.setLevel(level)

    from handler.pipeline import tta_views

    kept = keep_fp32(module)
    config = xiq.get_default_x86_inductor_quantization_config(reduce_range=True)
    quantizer = xiq.X86InductorQuantizer().set_global(config)
    for name in kept:
        quantizer.set_module_name_qconfig(name, None)
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        gm = torch.export.export(module, (example,), dynamic_shapes=({0: batch},)).module()
        _one_partition_per_relu(gm)
        prepared = prepare_pt2e(gm, quantizer)
        for i in range(0, len(calibration), 8):
            prepared(tta_views(torch.stack(list(calibration[i:i + 8])), CALIBRATION_VIEWS))
        converted = convert_pt2e(prepared)
    # How many images calibrated it is the agreement's `calibrated_on` (exporter/precision.py): not repeated here.
    info = {"quantizer": QUANTIZER, "torchao": metadata.version("torchao"), "kept_fp32": kept, "activation_bits": 7}
    return converted, info
