"""The handler's request unpacking, without a server: every way a body arrives from TorchServe."""

from __future__ import annotations

import base64

import pytest

from handler.melanoma_handler import request_bytes
from handler.pipeline import InputError

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
