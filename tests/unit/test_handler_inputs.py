"""The handler's request unpacking, without a server: every way a body arrives from TorchServe."""

from __future__ import annotations

import base64

import pytest

from handler.pipeline import InputError
from handler.request import request_bytes

JPEG = b"\xff\xd8\xff\xe0 fake jpeg bytes"


@pytest.mark.parametrize("row", [
    {"body": bytearray(JPEG)},
    {"data": JPEG},
    {"file": JPEG, "comment": b"left arm"},
    {"body": {"image": base64.b64encode(JPEG).decode()}},
    {"body": {"image": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()}},
    {"foo": "1", "body": JPEG},  # extra multipart fields are ignored
    {"data": base64.b64encode(JPEG).decode()},  # a KServe v1 instance
])
def test_ways_of_sending(row: dict) -> None:
    assert request_bytes(row) == JPEG


@pytest.mark.parametrize("row,status,words", [
    ({}, 400, "no image"),
    ({"photo": JPEG}, 400, "fields: photo"),
    ({"body": {"img": "x"}}, 400, '"image"'),
    ({"body": {"image": 12}}, 400, '"image"'),
    ({"body": {"image": "@@@"}}, 400, "base64"),
    ({"body": b'{"image": '}, 400, "looks like JSON"),
    ({"body": "plain text"}, 415, "text"),
    ({"data": base64.b64encode(b"plain text").decode()}, 415, "text"),  # base64, but not of an image
    ({"body": [1, 2]}, 415, "list"),
])
def test_bad_bodies(row: dict, status: int, words: str) -> None:
    with pytest.raises(InputError) as e:
        request_bytes(row)
    assert e.value.status == status and words in str(e.value)


def test_envelope_is_asked_of_the_caller_not_guessed_from_rows() -> None:
    """Rows look the same either way ({"data": "<base64>"} is also a multipart text field): only being
    called by TorchServe's envelope makes the answers inline."""
    from handler.melanoma_handler import BaseEnvelope, called_by_envelope  # TorchServe's, via the adapter

    def handle(data: list, context: object) -> list:
        return [called_by_envelope()]

    class Envelope(BaseEnvelope):
        def parse_input(self, data: list) -> list:
            return data

        def format_output(self, data: list) -> list:
            return data

    rows = [{"data": base64.b64encode(JPEG).decode()}]
    assert Envelope(handle).handle(rows, None) == [True]
    assert handle(rows, None) == [False]


def test_each_row_is_parsed_once_into_its_own_record() -> None:
    from handler.request import parse_request

    class Context:
        def get_request_header(self, idx: int, name: str) -> str | None:
            return {(1, "explain"): "True", (1, "X-Overlay"): "yes"}.get((idx, name))

    good, explained, bad = (parse_request(row, Context(), i) for i, row in
                            enumerate([{"body": JPEG}, {"data": JPEG}, {"photo": JPEG}]))
    assert (good.payload, good.explain, good.overlay, good.error) == (JPEG, False, False, None)
    assert (explained.slot, explained.explain, explained.overlay) == (1, True, True)
    assert bad.error is not None and bad.error.status == 400 and "fields: photo" in str(bad.error)


def test_every_allowed_format_is_known_by_its_first_bytes() -> None:
    """One list: the formats the pipeline decodes (ALLOWED_FORMATS) are the ones base64 text is recognised as
    (a base64 HEIC in a KServe instance was once answered 415, its magic bytes missing from a second list)."""
    from handler.pipeline import ALLOWED_FORMATS, SIGNATURES, sniff_format
    from testkit.imaging import variants

    assert set(SIGNATURES) | {"HEIF", "MPO"} == ALLOWED_FORMATS  # MPO is a JPEG by its bytes
    sent = variants(seed=2)
    for name, fmt in (("jpeg", "JPEG"), ("png", "PNG"), ("gif", "GIF"), ("webp", "WEBP"), ("bmp", "BMP"),
                      ("tiff", "TIFF"), ("heic", "HEIF"), ("exif6_heic", "HEIF")):
        assert sniff_format(sent[name][:16]) == fmt, name
        assert request_bytes({"data": base64.b64encode(sent[name]).decode()}) == sent[name], name  # KServe v1
    assert sniff_format(b"plain text, long enough") is None


def test_a_json_body_asks_for_its_overlay() -> None:
    """The worker hands JSON over unparsed (TS_DECODE_INPUT_REQUEST=false): {"image": ..., "overlay": true} as
    bytes still asks an explanation for its overlay (it once lost it: the flag was looked for in a dict)."""
    import json

    from handler.request import parse_request

    class Context:
        def get_request_header(self, idx: int, name: str) -> str | None:
            return "True" if name == "explain" else None

    body = json.dumps({"image": base64.b64encode(JPEG).decode(), "overlay": True}).encode()
    req = parse_request({"body": bytearray(body)}, Context(), 0)
    assert (req.payload, req.explain, req.overlay, req.error) == (JPEG, True, True, None)
    plain = parse_request({"body": bytearray(body.replace(b"true", b"false"))}, Context(), 0)
    assert (plain.payload, plain.overlay) == (JPEG, False)


def test_the_adapter_defines_exactly_one_class() -> None:
    """TorchServe's model loader refuses a handler module that defines more than one class (a dataclass
    beside the handler made every worker fail to load); this is its own rule, applied to our module."""
    import inspect

    import handler.melanoma_handler as adapter

    defined = [c.__name__ for _, c in inspect.getmembers(adapter, inspect.isclass) if c.__module__ == adapter.__name__]
    assert defined == ["MelanomaHandler"]


def test_workers_skip_openvinos_torch_compile_backend() -> None:
    """TorchServe's base_handler imports openvino.torch whenever OpenVINO is installed (+130 MiB and ~3 s per
    worker, for a torch.compile backend nothing here uses); the handler blocks that import before loading
    base_handler. Checked in a fresh interpreter, as a worker imports it."""
    import subprocess
    import sys

    code = ("import sys, handler.melanoma_handler as h; "
            "print(repr(sys.modules.get('openvino.torch', 'absent')), h.BaseHandler.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "BaseHandler"], proc.stdout
