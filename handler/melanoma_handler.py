"""TorchServe adapter: request rows -> pipeline -> one JSON response per request.

All scoring logic lives in handler/pipeline.py and the request records in handler/request.py; this file only
speaks TorchServe. It must define exactly one class (TorchServe loads the one class a handler module
defines; tests/unit/test_handler_inputs.py checks it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# TorchServe's worker parses an application/json body whole (and decodes text/*) before any handler code runs:
# a 26 MiB body of empty objects grew to ~570 MiB there. Off, bodies reach us as bytes, and handler/request.py
# parses JSON only when its structure is small. Read by the worker for every request, so set at import (the
# worker imports this module when it loads the model, before its first request).
os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
# TorchServe's base_handler imports openvino.torch (OpenVINO's torch.compile backend) whenever OpenVINO is
# installed: +130 MiB and ~3 s in every worker, TorchScript archives included, for a backend this handler never
# uses (--runtime openvino archives run OpenVINO's own runtime, +17 MiB). A None entry makes that import fail,
# and base_handler carries on (it logs "OpenVINO is not enabled", meaning that torch.compile backend).
sys.modules.setdefault("openvino.torch", None)  # type: ignore[arg-type]
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402
from ts.torch_handler.request_envelope.base import BaseEnvelope  # noqa: E402
from ts.torch_handler.request_envelope.kserve import KServeEnvelope  # noqa: E402

from handler import pipeline  # noqa: E402
from handler.archive import load_archive, precision_warning, release_memory, result  # noqa: E402
from handler.explain import Explainer, explain_images, load_explainer  # noqa: E402
from handler.pipeline import InputError, Score  # noqa: E402
from handler.request import Request, envelope_instances, parse_request  # noqa: E402

logger = logging.getLogger(__name__)

JSON = "application/json"
PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error",
           501: "Not Implemented"}
def called_by_envelope(depth: int = 8) -> bool:
    """True when TorchServe's request envelope (service_envelope=kserve) is among our callers: the rows are
    then the "instances" of ONE request, answered as dicts it wraps in {"predictions": [...]}. Asked of the
    call stack, never guessed from the rows: a multipart text field named `data` looks just like an instance."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), BaseEnvelope):
            return True
        frame = frame.f_back
    return False


def _kserve_instances(self: KServeEnvelope, data: list[Any]) -> list[Any]:
    """KServeEnvelope.parse_input, bounded: TorchServe's own json.loads-es the whole body and takes any number
    of instances; this one parses within handler/request.py's limits and refuses a request over them whole."""
    self._data_list = [row.get("data") or row.get("body") for row in data]
    self._inputs = envelope_instances(self._data_list[0])
    return self._inputs


# service_envelope=kserve (deploy/kserve/config): the envelope TorchServe wraps around this handler.
KServeEnvelope.parse_input = _kserve_instances  # type: ignore[method-assign]


METRICS = [  # name, unit, extra dimension, type name (ts.metrics.metric_type_enum.MetricTypes)
    ("MelanomaStageSeconds", "s", ["Stage"], "HISTOGRAM"),
    ("MelanomaRequests", "count", ["Status"], "COUNTER"),
    ("MelanomaProbability", "", [], "HISTOGRAM"),
    ("MelanomaTTAViews", "count", [], "GAUGE"),
]


def register_metrics(context: Any) -> dict[str, Any]:
    """The handler's own metrics, labelled ModelName and ModelVersion; TorchServe serves them in Prometheus
    format on the (loopback) metrics address (config.properties: metrics_mode, model_metrics_auto_detect)."""
    cache = getattr(context, "metrics", None)
    if cache is None:  # a context without metrics: record nothing
        return {}
    from ts.metrics.metric_type_enum import MetricTypes

    return {name: cache.add_metric_to_cache(name, unit, ["ModelName", "ModelVersion", *dims], MetricTypes[kind])
            for name, unit, dims, kind in METRICS}


class MelanomaHandler(BaseHandler):
    """TorchServe's own loop (BaseHandler.handle: preprocess -> inference -> postprocess, timed into
    HandlerTime) over request records; each stage is a thin call into handler/pipeline.py."""

    def initialize(self, context: Any) -> None:
        self.context = context
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass
        archive = load_archive(context.system_properties["model_dir"],
                               model_file=context.manifest["model"]["serializedFile"])
        self._archive = archive
        self.cfg, self.metadata, self.scorer = archive.cfg, archive.metadata, archive.scorer
        self.scorer.warm_up()
        release_memory()
        if self.metadata.demo:
            logger.warning("serving the untrained DEMO model: its scores mean nothing")
        warning = precision_warning(self.metadata.precision_name)
        if warning:
            logger.warning(warning)
        logger.info(
            "melanoma model %s (%s, %s on %s, sha256 %s) ready: %d threads, %d TTA views, threshold %.4f",
            self.metadata.version, self.metadata.checkpoint_form, self.metadata.precision_name, self.metadata.runtime,
            self.metadata.weights_sha256[:12], archive.threads, self.cfg.tta_views,
            self.cfg.threshold,
        )
        # The archive's own copy must run, never a checkout's handler/ that happens to be importable.
        logger.info("handler code: %s", Path(__file__).resolve().parent)
        self.explainer: Explainer | None = None  # explain.pt is loaded on the first explanation only
        self._metrics = register_metrics(context)
        self._emit("MelanomaTTAViews", self.cfg.tta_views)
        self.initialized = True

    def describe_handle(self) -> dict[str, Any]:
        """GET <management>/models/melanoma/<version>?customized=true: what this worker serves, and its pid.
        The describe job travels through the model's job queue like a prediction, so its answer also proves
        that this worker finished every job it took before it (scripts/update_model.sh drains on that)."""
        model = result(Score(0.0, 0.0), self.cfg, self.metadata)["model"]
        return {**model, "tta_views": self.cfg.tta_views, "threshold": self.cfg.threshold, "worker_pid": os.getpid()}

    def preprocess(self, data: list[Any]) -> list[Request]:
        """Each row parsed once into a Request; decode and preprocess; failures carry their error."""
        inline = called_by_envelope()
        # Enveloped, every instance belongs to request 0 and shares its headers.
        requests = [parse_request(row, self.context, 0 if inline else i, inline) for i, row in enumerate(data)]
        decode = prep = 0.0
        decoded = 0
        for r in requests:
            if r.error is None:
                decoded += 1
                try:
                    t0 = time.perf_counter()
                    rgb, r.size = pipeline.decode(r.payload, self.cfg)
                    t1 = time.perf_counter()
                    r.resized = pipeline.resize(rgb, self.cfg)
                    r.tensor = pipeline.to_tensor(r.resized, self.cfg)
                    decode, prep = decode + t1 - t0, prep + time.perf_counter() - t1
                except InputError as e:
                    r.error = e
            if r.error is not None:
                self._fail([r], {"error": str(r.error), "code": r.error.status})
        if decoded:  # per batch that reached the stage
            self._emit("MelanomaStageSeconds", decode, "decode")
        if any(r.tensor is not None for r in requests):
            self._emit("MelanomaStageSeconds", prep, "preprocess")
        return requests

    def inference(self, requests: list[Request]) -> list[Request]:  # type: ignore[override]
        """TTA probabilities for the batch; a model failure fails only the requests that reached the model."""
        live = [r for r in requests if r.status == 200]
        if live:
            t0 = time.perf_counter()
            try:
                scores, features = self.scorer.score_and_features([r.tensor for r in live])  # type: ignore[misc]
            except Exception:
                logger.exception("forward pass failed")
                self._fail(live, {"error": "the model failed on this batch; see the server log", "code": 500})
            else:
                self._emit("MelanomaStageSeconds", time.perf_counter() - t0, "forward")
                t0 = time.perf_counter()
                for i, (r, score) in enumerate(zip(live, scores, strict=True)):
                    r.score = score
                    r.checks = self._archive.checks(*r.size, r.resized, None if features is None else features[i])
                self._emit("MelanomaStageSeconds", time.perf_counter() - t0, "checks")
        return requests

    def postprocess(self, requests: list[Request]) -> list[Any]:  # type: ignore[override]
        """The JSON answer of each request; a heatmap for those sent to /explanations."""
        for r in requests:
            if r.status == 200 and not r.explain:
                r.body = result(r.score, self.cfg, self.metadata, r.checks)  # type: ignore[arg-type]
        explain = [r for r in requests if r.status == 200 and r.explain]
        if explain:
            t0 = time.perf_counter()
            self._explain(explain)
            self._emit("MelanomaStageSeconds", time.perf_counter() - t0, "explanation")
        logger.info("batch of %d: %d scored, %d rejected", len(requests),
                    sum(r.status == 200 for r in requests), sum(r.status != 200 for r in requests))
        for r in requests:
            self._emit("MelanomaRequests", 1, str(r.status))
            if r.status == 200:
                self._emit("MelanomaProbability", r.score.probability)  # type: ignore[union-attr]
        return [self._reply(r) for r in requests]

    def explain_handle(self, data_preprocess: list[Request], raw_data: list[Any]) -> list[Any]:  # type: ignore[override]
        """BaseHandler sends the whole batch here when its first request is an explanation; batches mix both
        kinds, so each request is answered by its own kind."""
        return self.postprocess(self.inference(data_preprocess))

    def _explain(self, requests: list[Request]) -> None:
        """Heatmaps for the requests sent to /explanations; the probability is the one just computed."""
        try:
            if self.explainer is None:
                self.explainer = load_explainer(self._archive)
            bodies = explain_images(self.explainer, [r.payload for r in requests], [r.score for r in requests],
                                    self.metadata, [r.overlay for r in requests],
                                    [r.tensor for r in requests], [r.checks for r in requests])  # type: ignore[misc]
        except InputError as e:
            self._fail(requests, {"error": str(e), "code": e.status})
            return
        except Exception:
            logger.exception("explanation failed")
            self._fail(requests, {"error": "the explanation failed; see the server log", "code": 500})
            return
        for r, body in zip(requests, bodies, strict=True):
            r.body = body
        release_memory()  # autograd buffers of the backward pass: give them back (t2.micro)

    def _emit(self, metric: str, value: float, *dims: str) -> None:
        m = self._metrics.get(metric)
        if m is not None:
            m.add_or_update(value, [self.metadata.name, self.metadata.version, *dims])

    @staticmethod
    def _fail(requests: list[Request], body: dict[str, Any]) -> None:
        for r in requests:
            r.body, r.status = body, body["code"]

    def _reply(self, r: Request) -> Any:
        if r.inline and r.whole:  # the envelope refused the request itself: its status, its message
            self.context.set_response_status(r.status, PHRASES.get(r.status, "Error"), 0)
        if r.inline:  # one HTTP status cannot speak for several instances: errors stay in the body
            return r.body
        self.context.set_response_content_type(r.slot, JSON)
        if r.status != 200:
            self.context.set_response_status(r.status, PHRASES.get(r.status, "Error"), r.slot)
        return json.dumps(r.body)
