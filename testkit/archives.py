"""Archive variants for the tests without rebuilding: a copy of a built .mar with its model-config.yaml (batch
settings, the handler's pipeline section), its name, its metadata.json or its members changed. What differs
between such variants is only what build_mar.py writes into those files; how build_mar.py writes them is
tested in-process (tests/integration/test_build_mar.py). A build costs ~1 minute here (export, verification,
the explainer); a variant costs the copy."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import yaml

# The batching tests' model: a store's archive again with batchSize 4 and a maxBatchDelay long enough that four
# concurrent requests always meet in one batch (a batch leaves as soon as it is full, so this delay is only ever
# waited out by a test that sends fewer). Every other test uses the shipped settings (batchSize 1, 5 ms), as
# users serve them.
BATCHED = "melanoma-batched"
BATCHED_CONFIG = {"batchSize": 4, "maxBatchDelay": 10000}


def variant(archive: Path, dest: Path, *, name: str | None = None, config: dict[str, Any] | None = None,
            handler: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
            drop: tuple[str, ...] = ()) -> Path:
    """A copy of `archive` at `dest` (a folder: the file is NAME.mar): `name` in its manifest, `config` merged
    into model-config.yaml's top level and `handler` into its handler section, `metadata` merged into
    metadata.json (top-level keys replaced), `drop` left out. Stored without compression (it is only copied)."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as src:
        manifest = json.loads(src.read("MAR-INF/MANIFEST.json"))
        name = name or manifest["model"]["modelName"]
        target = dest / f"{name}.mar"
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as out:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info)
                if info.filename == "MAR-INF/MANIFEST.json":
                    manifest["model"]["modelName"] = name
                    data = json.dumps(manifest, indent=2).encode()
                elif info.filename == manifest["model"].get("configFile", "model-config.yaml") and (config or handler):
                    cfg = yaml.safe_load(data)
                    cfg.update(config or {})
                    cfg["handler"] = {**cfg.get("handler", {}), **(handler or {})}
                    data = yaml.safe_dump(cfg, sort_keys=False).encode()
                elif info.filename == "metadata.json" and metadata:
                    data = (json.dumps({**json.loads(data), **metadata}, indent=2) + "\n").encode()
                out.writestr(info.filename, data)
    os.replace(partial, target)
    return target
