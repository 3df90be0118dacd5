"""Load a melanoma ResNeSt from any checkpoint form users have, safely.

Forms: PyTorch Lightning .ckpt (state_dict under one attribute prefix, hparams or hyper_parameters
possibly holding an argparse.Namespace), a bare state_dict, a training-loop dict
({"model_state_dict": ...}), DataParallel `module.` prefixes, a TorchScript file, and (only with
trust) a whole pickled module. Everything loads with torch.load(weights_only=True) and a short
allow-list of harmless types; anything else needs an explicit trust flag.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from handler.pipeline import IMAGE_SIZE, PREPROCESSING, PipelineConfig

ARCHITECTURE = "resnest50_fast_4s1x64d"
FEATURES = 2048  # input width of the ResNeSt-50 head
HEADS = {1: "sigmoid", 2: "softmax"}  # outputs -> how the malignancy probability is read
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "model_state")


class CheckpointError(Exception):
    """A checkpoint that cannot be served; the message is one actionable line."""


def build_model(num_outputs: int = 1) -> nn.Module:
    from resnest.torch import resnest50_fast_4s1x64d  # lazy: only the build needs resnest

    return resnest50_fast_4s1x64d(pretrained=False, num_classes=num_outputs)


class AttributeDict(dict):
    """Stand-in for Lightning's AttributeDict (a plain dict subclass) so hparams load without Lightning."""


def _numpy_safe_globals() -> list[Any]:
    out: list[Any] = [np.dtype]
    core = getattr(np, "_core", None) or np.core
    out.append((core.multiarray.scalar, "numpy.core.multiarray.scalar"))
    out.append((core.multiarray.scalar, "numpy._core.multiarray.scalar"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                out.append(getattr(dtypes, name))
    return out


# Harmless types that real Lightning checkpoints carry in hparams/callbacks: containers and
# values, no behaviour. Paths become PurePosixPath so nothing touches the filesystem.
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    (AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (AttributeDict, "lightning.pytorch.utilities.parsing.AttributeDict"),
    (AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
    (AttributeDict, "lightning_fabric.utilities.data.AttributeDict"),
    (pathlib.PurePosixPath, "pathlib.PosixPath"),
    (pathlib.PurePosixPath, "pathlib._local.PosixPath"),
    (pathlib.PurePosixPath, "pathlib.PurePosixPath"),
    (pathlib.PureWindowsPath, "pathlib.WindowsPath"),
    (pathlib.PureWindowsPath, "pathlib.PureWindowsPath"),
    *_numpy_safe_globals(),
]


@dataclass
class LoadedCheckpoint:
    """An eager fp32 module in eval mode that maps N x 3 x S x S to N x `outputs` logits."""

    module: nn.Module
    outputs: int
    form: str
    sha256: str
    notes: list[str] = field(default_factory=list)
    # The pipeline config the network was trained with (hyper_parameters["pipeline"], written by train/), or None
    # for a checkpoint that records none: pipeline_config() builds the archive's from it.
    pipeline: dict[str, Any] | None = None

    @property
    def head(self) -> str:
        return HEADS[self.outputs]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A container-independent digest of weights: names, dtypes, shapes and bytes in key order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, trust: bool = False) -> LoadedCheckpoint:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file; pass the path of your .ckpt/.pt/.pth checkpoint")
    if not p.is_file():
        raise CheckpointError(f"{p}: not a file; pass the checkpoint file itself")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read it ({e.strerror}); check its permissions") from None
    if not head:
        raise CheckpointError(f"{p}: the file is empty; re-copy the checkpoint")
    sha = file_sha256(p)

    if _is_torchscript(p):
        return _from_torchscript(p, sha)

    obj = _torch_load(p, trust)
    notes: list[str] = []
    if isinstance(obj, nn.Module):
        form, sd = "pickled module", obj.state_dict()
    else:
        form, sd = _find_state_dict(p, obj)
    pipeline = _recorded_pipeline(p, obj)  # before the model is built: a record that cannot be used fails fast
    module, outputs, more = _model_from_state_dict(p, sd)
    notes += more
    if "module." in _prefix_of(sd):
        form += " (DataParallel)"
    return LoadedCheckpoint(module, outputs, form, sha, notes, pipeline)


def _recorded_pipeline(p: Path, obj: Any) -> dict[str, Any] | None:
    """hyper_parameters["pipeline"] (hparams in 2020-era Lightning), checked now: a record this version cannot
    read (a field it does not know, a value out of range) is refused rather than half applied."""
    hp = obj.get("hyper_parameters", obj.get("hparams")) if isinstance(obj, Mapping) else None
    record = hp.get("pipeline") if isinstance(hp, Mapping) else getattr(hp, "pipeline", None)
    if record is None:
        return None
    try:
        if not isinstance(record, Mapping):
            raise ValueError(f"a {type(record).__name__}, not a mapping")
        PipelineConfig.from_mapping(record)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: its recorded pipeline config cannot be used ({e}); rebuild it with the version "
                              "of this project that trained it") from None
    return dict(record)


def pipeline_config(ckpt: LoadedCheckpoint | None, explicit: Mapping[str, Any],
                    serving: Mapping[str, Any]) -> tuple[PipelineConfig, str | None]:
    """The archive's pipeline: the preprocessing the checkpoint records (PREPROCESSING fields), or today's
    defaults where it records none, with `explicit` preprocessing options (build_mar.sh --image-size, ...) over
    the defaults only; `serving` (TTA views, threshold) is the build's own choice. Returns the config and a
    notice for the user (None when there is nothing to say). CheckpointError, one line, when an explicit option
    contradicts the record: serving a network at another size or resize than it was trained at is wrong
    silently, so it is never done on request."""
    record = ckpt.pipeline if ckpt is not None else None
    explicit = {k: v for k, v in explicit.items() if v is not None}
    unknown = set(explicit) - set(PREPROCESSING)
    if unknown:
        raise ValueError(f"not preprocessing fields: {', '.join(sorted(unknown))}")
    notice = None
    if record is None:
        base = PipelineConfig(**explicit).preprocessing()
        if ckpt is not None and ckpt.form != "demo":
            shown = ", ".join(f"{k} {base[k]}" for k in ("image_size", "interpolation", "area_for_downscale"))
            given = "the options given and " if explicit else ""
            notice = (f"this checkpoint records no pipeline config: built with {given}today's defaults ({shown}); "
                      "a network trained otherwise would be served wrong")
    else:
        recorded = PipelineConfig.from_mapping(record).preprocessing()
        clash = {k: v for k, v in PipelineConfig(**explicit).preprocessing().items()
                 if k in explicit and v != recorded[k]}
        if clash:
            k = sorted(clash)[0]
            raise CheckpointError(f"--{k.replace('_', '-')} {clash[k]} contradicts the checkpoint, trained with "
                                  f"{k} {recorded[k]} (its recorded pipeline): leave the option out, the archive is "
                                  "built from the record")
        base = recorded
        notice = "pipeline from the checkpoint's record: " + ", ".join(
            f"{k} {recorded[k]}" for k in ("image_size", "interpolation", "area_for_downscale"))
    try:
        return PipelineConfig(**{**base, **serving}), notice
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _is_torchscript(p: Path) -> bool:
    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _torch_load(p: Path, trust: bool) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(p, e)
        if unsafe is None:
            raise CheckpointError(f"{p}: not a PyTorch checkpoint ({_first_line(e)})") from None
        if not trust:
            raise CheckpointError(
                f"{p}: loading it would run code from the pickle (it references {', '.join(unsafe)}); "
                "re-run with --trust-checkpoint only if you trust where the file came from"
            ) from None
    except Exception as e:
        raise CheckpointError(f"{p}: not a PyTorch checkpoint ({_first_line(e)})") from None
    warnings.warn(
        f"--trust-checkpoint: unpickling {p} with weights_only=False; this can execute arbitrary code",
        stacklevel=2,
    )
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{p}: cannot load it even trusted ({_first_line(e)})") from None


def _unsafe_globals(p: Path, e: Exception) -> list[str] | None:
    """Names of the globals that weights_only refused, or None when the file is no pickle at all."""
    msg = str(e)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(p)
    except Exception:  # legacy (non-zip) files: fall back to the unpickler's message
        names = []
    if not names:
        names = re.findall(r"(?:Unsupported global: GLOBAL|Unsupported operand \d+ for|GLOBAL) ([\w.]+)", msg)
    if names:
        return sorted(set(names))[:5]
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_state_dict(p: Path, obj: Any) -> tuple[str, Mapping[str, torch.Tensor]]:
    if _is_tensor_map(obj):
        return "state_dict", obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and _is_tensor_map(obj[key]):
                lightning = "pytorch-lightning_version" in obj or "hyper_parameters" in obj or "hparams" in obj
                lightning |= "optimizer_states" in obj or "global_step" in obj
                return ("Lightning checkpoint" if lightning else f"training dict ['{key}']"), obj[key]
        keys = ", ".join(map(str, list(obj)[:6]))
        raise CheckpointError(
            f"{p}: not a model checkpoint: a dict with keys [{keys}] and no state_dict of tensors"
        )
    raise CheckpointError(f"{p}: not a model checkpoint: it holds a {type(obj).__name__}, not weights")


def _prefix_of(sd: Mapping[str, torch.Tensor]) -> str:
    """The attribute prefix (e.g. 'model.', 'module.', 'net.module.') that most keys share with the
    architecture, found by matching key suffixes rather than guessing names."""
    arch = _arch_keys()
    counts: dict[str, int] = {}
    for k in sd:
        parts = k.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in arch or _fc_alias(".".join(parts[i:])):
                pre = ".".join(parts[:i]) + ("." if i else "")
                counts[pre] = counts.get(pre, 0) + 1
                break
    if not counts:
        return ""
    return max(counts, key=lambda pre: (counts[pre], -len(pre)))


_ARCH_KEYS: frozenset[str] | None = None


def _arch_keys() -> frozenset[str]:
    global _ARCH_KEYS
    if _ARCH_KEYS is None:
        _ARCH_KEYS = frozenset(build_model(1).state_dict())
    return _ARCH_KEYS


_FC_SEQ = re.compile(r"^fc\.(\d+)\.(weight|bias)$")


def _fc_alias(key: str) -> bool:
    return _FC_SEQ.match(key) is not None


def _model_from_state_dict(p: Path, full: Mapping[str, torch.Tensor]) -> tuple[nn.Module, int, list[str]]:
    notes: list[str] = []
    prefix = _prefix_of(full)
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    ignored = [k for k in full if not k.startswith(prefix)]
    if prefix:
        notes.append(f"weights found under the prefix '{prefix}'")
    if ignored:
        notes.append(f"ignored {len(ignored)} key(s) outside '{prefix}': {', '.join(ignored[:3])}")

    # A head written as nn.Sequential(Dropout, Linear) stores fc.<i>.*: accept exactly one Linear.
    seq = sorted({m.group(1) for k in sd if (m := _FC_SEQ.match(k))})
    if "fc.weight" not in sd and len(seq) == 1:
        i = seq[0]
        sd["fc.weight"] = sd.pop(f"fc.{i}.weight")
        if f"fc.{i}.bias" in sd:
            sd["fc.bias"] = sd.pop(f"fc.{i}.bias")
        notes.append(f"head stored as nn.Sequential: read fc.{i} as the final Linear")

    arch = _arch_keys()
    optional = {k for k in arch if k.endswith("num_batches_tracked")}  # absent before torch 0.4.1
    missing = sorted(arch - set(sd) - optional)
    unexpected = sorted(set(sd) - arch)
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: not a {ARCHITECTURE} checkpoint: {len(missing)} missing key(s)"
            f"{' (' + ', '.join(missing[:3]) + ')' if missing else ''} and {len(unexpected)} unexpected "
            f"key(s){' (' + ', '.join(unexpected[:3]) + ')' if unexpected else ''}; "
            f"the product serves resnest.torch.{ARCHITECTURE} only"
        )

    w = sd["fc.weight"]
    if w.ndim != 2 or w.shape[1] != FEATURES or w.shape[0] not in HEADS:
        raise CheckpointError(
            f"{p}: head fc.weight has shape {tuple(w.shape)}; expected (1, {FEATURES}) for a sigmoid "
            f"logit or (2, {FEATURES}) for softmax with index 1 = malignant"
        )
    outputs = int(w.shape[0])
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{p}: weight {k} holds {bad} NaN/Inf value(s); the training run diverged")

    model = build_model(outputs)
    ref = model.state_dict()
    mismatched = [k for k in sd if k in ref and tuple(sd[k].shape) != tuple(ref[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f"{p}: not a {ARCHITECTURE} checkpoint: {len(mismatched)} tensor(s) of the wrong shape, e.g. "
            f"{k} is {tuple(sd[k].shape)} but the architecture needs {tuple(ref[k].shape)}"
        )
    floats = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(floats, strict=False)  # only the optional counters may be absent
    return model.eval(), outputs, notes


def _from_torchscript(p: Path, sha: str) -> LoadedCheckpoint:
    try:
        scripted = torch.jit.load(str(p), map_location="cpu").eval()
    except Exception as e:
        raise CheckpointError(f"{p}: a TorchScript file that does not load ({_first_line(e)})") from None
    notes = []
    sd = {k: v for k, v in scripted.state_dict().items()}
    try:
        module, outputs, notes = _model_from_state_dict(p, sd)  # re-export from the eager architecture
        return LoadedCheckpoint(module, outputs, "TorchScript (weights re-exported)", sha, notes)
    except CheckpointError:
        pass
    # Frozen or foreign scripts carry no usable state_dict: serve the script itself after a shape check.
    x = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    try:
        with torch.inference_mode():
            y = scripted(x)
    except Exception as e:
        raise CheckpointError(f"{p}: TorchScript model fails on a 2x3x{IMAGE_SIZE}x{IMAGE_SIZE} input "
                              f"({_first_line(e)})") from None
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 2 or y.shape[1] not in HEADS:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CheckpointError(
            f"{p}: TorchScript model returns {shape} for 2 images; expected (2, 1) logits or (2, 2) softmax logits"
        )
    notes.append("TorchScript without matching weights names: served as the script computes it")
    return LoadedCheckpoint(scripted, int(y.shape[1]), "TorchScript", sha, notes)
