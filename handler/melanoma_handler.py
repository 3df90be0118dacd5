"""TorchServe adapter: request rows -> pipeline -> one JSON response per request.

All scoring logic lives in handler/pipeline.py; this file only speaks TorchServe: it reads the
archive, unpacks request bodies, and maps bad input to a 4xx for that request alone.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.explain import Explainer, explain_images, load_explainer
from handler.pipeline import (
    InputError,
    load_archive,
    load_tensor,
    precision_of,
    precision_warning,
    release_memory,
    result,
)

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
        if self.metadata.get("demo"):
            logger.warning("serving the untrained DEMO model: its scores mean nothing")
        warning = precision_warning(precision_of(self.metadata))
        if warning:
            logger.warning(warning)
        logger.info(
            "melanoma model %s (%s, %s, sha256 %s) ready: %d threads, %d TTA views, threshold %.4f",
            self.metadata.get("version"), self.metadata.get("checkpoint_form"), precision_of(self.metadata),
            str(self.metadata.get("weights_sha256"))[:12], archive.threads, self.cfg.tta_views,
            self.cfg.threshold,
        )
        self.explainer: Explainer | None = None  # explain.pt is loaded on the first explanation only
        self._inline = False
        self.initialized = True

    def handle(self, data: list[Mapping[str, Any]], context: Any) -> list[Any]:
        # KServe's v1 envelope (service_envelope=kserve) hands us the "instances" of ONE request, each
        # {"data": "<base64>"}: answer dicts, which it wraps in {"predictions": [...]}, with any error
        # inline, since one HTTP status cannot speak for several instances.
        self._inline = any(isinstance(row.get("data"), str) for row in data if isinstance(row, Mapping))
        responses: list[Any] = [""] * len(data)
        index, tensors, payloads = [], [], []
        for i, row in enumerate(data):
            try:
                if not isinstance(row, Mapping):
                    raise InputError(f"each request must be an object, got {type(row).__name__}: {HOW_TO_SEND}")
                payload = request_bytes(row)
                tensors.append(load_tensor(payload, self.cfg))
                payloads.append(payload)
                index.append(i)
            except InputError as e:
                responses[i] = self._reply(context, i, {"error": str(e), "code": e.status}, e.status)
        logger.info("batch of %d: %d scored, %d rejected", len(data), len(index), len(data) - len(index))
        if tensors:
            try:
                probabilities = self.scorer.predict(tensors)
            except Exception:  # a model failure fails only the requests that reached the model
                logger.exception("forward pass failed")
                body = {"error": "the model failed on this batch; see the server log", "code": 500}
                for i in index:
                    responses[i] = self._reply(context, i, body, 500)
                return responses
            # Inline (KServe envelope): every instance belongs to request 0 and shares its headers.
            explain = [j for j, i in enumerate(index) if is_explanation(context, 0 if self._inline else i)]
            for j, (i, p) in enumerate(zip(index, probabilities, strict=True)):
                if j not in explain:
                    responses[i] = self._reply(context, i, result(p, self.cfg, self.metadata), 200)
            if explain:
                self._explain(context, data, responses, [index[j] for j in explain], [payloads[j] for j in explain],
                              [probabilities[j] for j in explain], [tensors[j] for j in explain])
        return responses

    def _explain(self, context: Any, data: list[Mapping[str, Any]], responses: list[str], index: list[int],
                 payloads: list[bytes], probabilities: list[float], tensors: list[torch.Tensor]) -> None:
        """Grad-CAM for the requests sent to /explanations; the probability is the one just computed."""
        try:
            if self.explainer is None:
                self.explainer = load_explainer(self._archive)
            bodies = explain_images(self.explainer, payloads, probabilities, self.metadata,
                                    [wants_overlay(data[i], request_headers(context, 0 if self._inline else i))
                                     for i in index], tensors)
        except InputError as e:
            for i in index:
                responses[i] = self._reply(context, i, {"error": str(e), "code": e.status}, e.status)
            return
        except Exception:
            logger.exception("explanation failed")
            for i in index:
                body = {"error": "the explanation failed; see the server log", "code": 500}
                responses[i] = self._reply(context, i, body, 500)
            return
        for i, body in zip(index, bodies, strict=True):
            responses[i] = self._reply(context, i, body, 200)
        release_memory()  # autograd buffers of the backward pass: give them back (t2.micro)

    def _reply(self, context: Any, idx: int, body: dict[str, Any], status: int) -> Any:
        if self._inline:
            return body
        context.set_response_content_type(idx, JSON)
        if status != 200:
            context.set_response_status(status, PHRASES.get(status, "Error"), idx)
        return json.dumps(body)
