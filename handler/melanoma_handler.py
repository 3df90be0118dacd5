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

from handler.pipeline import (
    InputError,
    load_archive,
    load_tensor,
    release_memory,
    result,
)

logger = logging.getLogger(__name__)

JSON = "application/json"
PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error"}
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
        raise InputError(f"the body is text, not an image: {HOW_TO_SEND}", 415)
    raise InputError(f"unsupported body of type {type(value).__name__}: {HOW_TO_SEND}", 415)


class MelanomaHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        self.context = context
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass
        archive = load_archive(context.system_properties["model_dir"],
                               model_file=context.manifest["model"]["serializedFile"])
        self.cfg, self.metadata, self.scorer = archive.cfg, archive.metadata, archive.scorer
        self.scorer.warm_up()
        release_memory()
        if self.metadata.get("demo"):
            logger.warning("serving the untrained DEMO model: its scores mean nothing")
        logger.info(
            "melanoma model %s (%s, sha256 %s) ready: %d threads, %d TTA views, threshold %.4f",
            self.metadata.get("version"), self.metadata.get("checkpoint_form"),
            str(self.metadata.get("weights_sha256"))[:12], archive.threads, self.cfg.tta_views,
            self.cfg.threshold,
        )
        self.initialized = True

    def handle(self, data: list[Mapping[str, Any]], context: Any) -> list[str]:
        responses: list[str] = [""] * len(data)
        index, tensors = [], []
        for i, row in enumerate(data):
            try:
                payload = request_bytes(row)
                tensors.append(load_tensor(payload, self.cfg))
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
            for i, p in zip(index, probabilities, strict=True):
                responses[i] = self._reply(context, i, result(p, self.cfg, self.metadata), 200)
        return responses

    @staticmethod
    def _reply(context: Any, idx: int, body: dict[str, Any], status: int) -> str:
        context.set_response_content_type(idx, JSON)
        if status != 200:
            context.set_response_status(status, PHRASES.get(status, "Error"), idx)
        return json.dumps(body)
