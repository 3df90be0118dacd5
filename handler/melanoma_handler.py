"""TorchServe adapter: request rows -> pipeline -> one JSON response per request.

All scoring logic lives in handler/pipeline.py; this file only speaks TorchServe: it reads the
archive, unpacks request bodies, and maps bad input to a 4xx for that request alone.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.torch_handler.request_envelope.base import BaseEnvelope

from handler.archive import load_archive, precision_warning, release_memory, result
from handler.explain import Explainer, explain_images, load_explainer
from handler.pipeline import InputError, load_tensor

logger = logging.getLogger(__name__)

JSON = "application/json"
PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error",
           501: "Not Implemented"}
TRUE = ("1", "true", "yes")
HOW_TO_SEND = (
    "send the image as the request body (curl -T img.jpg), as a multipart field "
    "'data' or 'file', or as JSON {\"image\": \"<base64>\"}"
)


def request_bytes(row: Mapping[str, Any]) -> bytes:
    """The image bytes of one request, whatever way it was sent."""
    for key in ("data", "file", "body"):
        if row.get(key) is not None:
            value = row[key]
            break
    else:
        names = ", ".join(sorted(str(k) for k in row)) or "none"
        raise InputError(f"no image in the request (fields: {names}): {HOW_TO_SEND}")
    if isinstance(value, Mapping):  # TorchServe already parsed an application/json body
        image = value.get("image")
        if not isinstance(image, str) or not image:
            raise InputError("JSON body needs an \"image\" field holding the base64-encoded image")
        if image.startswith("data:") and "," in image:  # data URL from a browser
            image = image.split(",", 1)[1]
        try:
            return base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("the JSON \"image\" field is not valid base64") from None
    if isinstance(value, (bytes, bytearray)):
        if bytes(value[:64]).lstrip()[:1] in (b"{", b"["):  # JSON TorchServe could not parse
            raise InputError("the body looks like JSON but does not parse; " + HOW_TO_SEND)
        return bytes(value)
    if isinstance(value, str):
        image = base64_image(value)
        if image is not None:  # KServe v1 {"instances": [{"data": "<base64>"}]}, or a text field holding one
            return image
        raise InputError(f"the body is text, not an image: {HOW_TO_SEND}", 415)
    raise InputError(f"unsupported body of type {type(value).__name__}: {HOW_TO_SEND}", 415)


IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def base64_image(text: str) -> bytes | None:
    """The decoded bytes if `text` is base64 (or a data URL) of something that starts like an image."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw.startswith(IMAGE_MAGIC) else None


def wants_overlay(row: Mapping[str, Any], headers: Mapping[str, Any]) -> bool:
    """A PNG overlay was asked for: multipart field `overlay=true`, "overlay": true in a JSON body, or an
    `X-Overlay: true` header. (TorchServe 0.12 drops URL query parameters before the handler.)"""
    value = row.get("overlay")
    body = next((row[k] for k in ("data", "file", "body") if row.get(k) is not None), None)
    if value is None and isinstance(body, Mapping):
        value = body.get("overlay")
    if value is None:
        value = next((v for k, v in headers.items() if str(k).lower() == "x-overlay"), None)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode(errors="replace")
    return value is True or str(value).strip().lower() in TRUE


def request_headers(context: Any, idx: int) -> Mapping[str, Any]:
    """The X-Overlay header, however it was capitalised (0.12's context has no working get-all)."""
    try:
        for name in ("X-Overlay", "x-overlay", "X-OVERLAY"):
            if (value := context.get_request_header(idx, name)) is not None:
                return {"x-overlay": value}
    except (AttributeError, IndexError, KeyError):
        pass
    return {}


def is_explanation(context: Any, idx: int) -> bool:
    """TorchServe marks each request to /explanations/<model> with the header explain=True."""
    try:
        return str(context.get_request_header(idx, "explain")) == "True"
    except (AttributeError, IndexError, KeyError):
        return False


@dataclass
class Request:
    """One request row, parsed once: its image (or why it has none) and what it asked for."""

    slot: int  # TorchServe's index for this request's headers, status and content type
    payload: bytes = b""
    tensor: torch.Tensor | None = None
    explain: bool = False
    overlay: bool = False
    error: InputError | None = None
    probability: float = float("nan")
    body: dict[str, Any] = field(default_factory=dict)
    status: int = 200


def parse_request(row: Any, context: Any, slot: int) -> Request:
    """The request record of one row; a row that cannot be read carries its InputError instead."""
    req = Request(slot)
    try:
        if not isinstance(row, Mapping):
            raise InputError(f"each request must be an object, got {type(row).__name__}: {HOW_TO_SEND}")
        req.payload = request_bytes(row)
        req.explain = is_explanation(context, slot)
        req.overlay = req.explain and wants_overlay(row, request_headers(context, slot))
    except InputError as e:
        req.error = e
    return req


def called_by_envelope() -> bool:
    """True when TorchServe's request envelope (service_envelope=kserve) called handle(): its rows are then
    the "instances" of ONE request, answered as dicts it wraps in {"predictions": [...]}. Asked of the
    caller, never guessed from the rows: a multipart text field named `data` looks just like an instance."""
    return isinstance(sys._getframe(2).f_locals.get("self"), BaseEnvelope)


class MelanomaHandler(BaseHandler):
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
            "melanoma model %s (%s, %s, sha256 %s) ready: %d threads, %d TTA views, threshold %.4f",
            self.metadata.version, self.metadata.checkpoint_form, self.metadata.precision_name,
            self.metadata.weights_sha256[:12], archive.threads, self.cfg.tta_views,
            self.cfg.threshold,
        )
        # The archive's own copy must run, never a checkout's handler/ that happens to be importable.
        logger.info("handler code: %s", Path(__file__).resolve().parent)
        self.explainer: Explainer | None = None  # explain.pt is loaded on the first explanation only
        self.stage_ms: dict[str, float] = {}  # the last batch's preprocess / inference / postprocess times
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        inline = called_by_envelope()
        # Enveloped, every instance belongs to request 0 and shares its headers.
        requests = [parse_request(row, context, 0 if inline else i) for i, row in enumerate(data)]
        t0 = time.perf_counter()
        live = self.preprocess(requests)
        t1 = time.perf_counter()
        self.inference(live)
        t2 = time.perf_counter()
        self.postprocess(live)
        t3 = time.perf_counter()
        self.stage_ms = {"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1), "postprocess": 1e3 * (t3 - t2)}
        logger.info("batch of %d: %d scored, %d rejected", len(data), len(live), len(data) - len(live))
        return [self._reply(context, r, inline) for r in requests]

    def preprocess(self, requests: list[Request]) -> list[Request]:  # type: ignore[override]
        """Decode and preprocess each request; the ones that fail carry their error and go no further."""
        for r in requests:
            if r.error is None:
                try:
                    r.tensor = load_tensor(r.payload, self.cfg)
                except InputError as e:
                    r.error = e
            if r.error is not None:
                r.body, r.status = {"error": str(r.error), "code": r.error.status}, r.error.status
        return [r for r in requests if r.error is None]

    def inference(self, requests: list[Request]) -> None:  # type: ignore[override]
        """TTA probabilities for the batch; a model failure fails only the requests that reached the model."""
        if not requests:
            return
        try:
            probabilities = self.scorer.predict([r.tensor for r in requests])
        except Exception:
            logger.exception("forward pass failed")
            self._fail(requests, {"error": "the model failed on this batch; see the server log", "code": 500})
            return
        for r, p in zip(requests, probabilities, strict=True):
            r.probability = p

    def postprocess(self, requests: list[Request]) -> None:  # type: ignore[override]
        """The JSON answer of each scored request; Grad-CAM for those sent to /explanations."""
        for r in requests:
            if r.status == 200 and not r.explain:
                r.body = result(r.probability, self.cfg, self.metadata)
        explain = [r for r in requests if r.status == 200 and r.explain]
        if explain:
            self._explain(explain)

    def _explain(self, requests: list[Request]) -> None:
        """Grad-CAM for the requests sent to /explanations; the probability is the one just computed."""
        try:
            if self.explainer is None:
                self.explainer = load_explainer(self._archive)
            bodies = explain_images(self.explainer, [r.payload for r in requests], [r.probability for r in requests],
                                    self.metadata, [r.overlay for r in requests],
                                    [r.tensor for r in requests])  # type: ignore[misc]
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

    @staticmethod
    def _fail(requests: list[Request], body: dict[str, Any]) -> None:
        for r in requests:
            r.body, r.status = body, body["code"]

    @staticmethod
    def _reply(context: Any, r: Request, inline: bool) -> Any:
        if inline:  # one HTTP status cannot speak for several instances: errors stay in the body
            return r.body
        context.set_response_content_type(r.slot, JSON)
        if r.status != 200:
            context.set_response_status(r.status, PHRASES.get(r.status, "Error"), r.slot)
        return json.dumps(r.body)
