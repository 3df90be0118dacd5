"""One request row of TorchServe, read once: its image bytes (however it was sent), whether it asked for an
explanation and an overlay, or why it cannot be scored. No TorchServe import: rows are plain mappings and the
context is only asked for headers, so this runs (and is tested) without a server."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from handler.pipeline import InputError, Score, sniff_format

TRUE = ("1", "true", "yes")
HOW_TO_SEND = (
    "send the image as the request body (curl -T img.jpg), as a multipart field "
    "'data' or 'file', or as JSON {\"image\": \"<base64>\"}"
)


# JSON bodies are parsed here, not by TorchServe's worker (melanoma_handler sets TS_DECODE_INPUT_REQUEST=false):
# parsed whole, a 26 MiB body of empty objects, [{},{},...], grew ~22x (570 MiB) in the worker. What grows is the
# number of values, not the bytes (a base64 image parses to one string of its own size), so the structure is
# bounded: our bodies have a handful of values ({"image": "<base64>", "overlay": true}; KServe v1 a few per
# instance), and a body with more '{', '[', ',' or ':' than this is refused before parsing.
MAX_JSON_PUNCTUATION = 256
# KServe v1 instances per request (service_envelope=kserve): each is decoded and scored, and each decode may
# cost up to ~2 s of CPU at the pixel limits, so 8 keep one request within the archive's 60 s responseTimeout.
MAX_INSTANCES = 8


def parse_json(raw: bytes | bytearray) -> Any:
    """A JSON body, parsed only if its structure is small (413 otherwise; 400 if it does not parse)."""
    punctuation = sum(raw.count(c) for c in (b"{", b"[", b",", b":"))
    if punctuation > MAX_JSON_PUNCTUATION:
        raise InputError(f"JSON body with {punctuation} objects, arrays or values: the limit is "
                         f"{MAX_JSON_PUNCTUATION}; {HOW_TO_SEND}", 413)
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError("the body looks like JSON but does not parse; " + HOW_TO_SEND) from None


@dataclass
class Refused:
    """A whole request the envelope could not unpack (over a limit, or not a KServe v1 body): answered with its
    status, never scored."""

    error: InputError


def envelope_instances(body: Any) -> list[Any]:
    """The instances of a KServe v1 body ({"instances": [...]}), within the limits; a request that is over them
    or malformed becomes one Refused row."""
    try:
        if isinstance(body, (bytes, bytearray)):
            body = parse_json(body)
        instances = body.get("instances") if isinstance(body, Mapping) else None
        if not isinstance(instances, list) or not instances:
            raise InputError('a KServe v1 request is {"instances": [{"data": "<base64 image>"}, ...]}')
        if len(instances) > MAX_INSTANCES:
            raise InputError(f"{len(instances)} instances in one request: the limit is {MAX_INSTANCES}; "
                             "send the rest in further requests", 413)
    except InputError as e:
        return [Refused(e)]
    return instances


def with_json_parsed(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The row with a JSON body parsed (within parse_json's limits), once: the image and the overlay flag are both
    read from it. TorchServe's worker leaves JSON unparsed (TS_DECODE_INPUT_REQUEST=false: see parse_json)."""
    for key in ("data", "file", "body"):
        value = row.get(key)
        if value is not None:
            if isinstance(value, (bytes, bytearray)) and bytes(value[:64]).lstrip()[:1] in (b"{", b"["):
                return {**row, key: parse_json(value)}
            return row
    return row


def request_bytes(row: Mapping[str, Any]) -> bytes:
    """The image bytes of one request, whatever way it was sent."""
    for key in ("data", "file", "body"):
        if row.get(key) is not None:
            value = row[key]
            break
    else:
        names = ", ".join(sorted(str(k) for k in row)) or "none"
        raise InputError(f"no image in the request (fields: {names}): {HOW_TO_SEND}")
    if isinstance(value, (bytes, bytearray)) and bytes(value[:64]).lstrip()[:1] in (b"{", b"["):
        value = parse_json(value)  # a JSON body (TorchServe's worker leaves it unparsed: see parse_json)
        if not isinstance(value, Mapping):
            raise InputError(f"a JSON body must be an object, {{\"image\": \"<base64>\"}}: {HOW_TO_SEND}")
    if isinstance(value, Mapping):
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
        if key == "body" and sniff_format(bytes(value[:16])) is None and value.isascii():
            # a text/plain request body holding a base64 image, which TorchServe's worker now passes undecoded
            # (a multipart field, as before, is read as image bytes whatever it holds)
            image = base64_image(bytes(value).decode("ascii"))
            if image is not None:
                return image
        return bytes(value)
    if isinstance(value, str):
        image = base64_image(value)
        if image is not None:  # KServe v1 {"instances": [{"data": "<base64>"}]}, or a text field holding one
            return image
        raise InputError(f"the body is text, not an image: {HOW_TO_SEND}", 415)
    raise InputError(f"unsupported body of type {type(value).__name__}: {HOW_TO_SEND}", 415)


def base64_image(text: str) -> bytes | None:
    """The decoded bytes if `text` is base64 (or a data URL) of something that starts like an image."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if sniff_format(raw[:16]) is not None else None


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
    resized: np.ndarray | None = None  # the model's input as uint8 RGB, for the input checks
    size: tuple[int, int] = (0, 0)  # the photo's (width, height) as sent
    explain: bool = False
    overlay: bool = False
    error: InputError | None = None
    score: Score | None = None  # set by the forward pass
    checks: dict[str, Any] | None = None  # handler/checks.py run_checks, set with the score
    body: dict[str, Any] = field(default_factory=dict)
    status: int = 200
    inline: bool = False  # an instance of TorchServe's KServe envelope: answered as a dict, errors inline
    whole: bool = False  # the envelope refused the whole request (envelope_instances): answered with its status


def parse_request(row: Any, context: Any, slot: int, inline: bool = False) -> Request:
    """The request record of one row; a row that cannot be read carries its InputError instead."""
    req = Request(slot, inline=inline)
    try:
        if isinstance(row, Refused):
            req.whole = True
            raise row.error
        if not isinstance(row, Mapping):
            raise InputError(f"each request must be an object, got {type(row).__name__}: {HOW_TO_SEND}")
        row = with_json_parsed(row)
        req.payload = request_bytes(row)
        req.explain = is_explanation(context, slot)
        req.overlay = req.explain and wants_overlay(row, request_headers(context, slot))
    except InputError as e:
        req.error = e
    return req
