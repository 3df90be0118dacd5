"""The page shows what the endpoint sends as text (issue #40): an answer whose strings carry HTML, markdown images
and links, Streamlit's colour and LaTeX syntax renders none of it, and the page refuses to score when it listens
beyond loopback unless told --allow-remote (it holds the inference key: an open scoring proxy otherwise). Run with
Streamlit's AppTest (no browser, no server): the endpoint is a stub."""

from __future__ import annotations

import subprocess

import pytest

pytest.importorskip("streamlit", reason="the page's packages: scripts/setup.sh --app")
from streamlit.testing.v1 import AppTest  # noqa: E402

from client.app import bind_refusal, text  # noqa: E402
from testkit.harness import ROOT  # noqa: E402

MARKUP = {
    "warning": "<img src=x onerror=alert(1)>DEMO",
    "label": "<b>malignant</b>",
    "chosen_for": "![pixel](http://127.0.0.1:9/track.png)",
    "version": "[click](javascript:alert(1))",
    "name": ":red[melanoma] $x^2$",
    "check": "<script>alert(2)</script> too dark",
}

PAGE = f"""
from client import app

result = {{
    "probability": 0.25, "raw_score": 0.25, "label": {MARKUP["label"]!r}, "threshold": 0.5,
    "operating_point": {{"threshold": 0.5, "chosen_for": {MARKUP["chosen_for"]!r}}},
    "calibration": {{"method": "none"}}, "tta_views": 8, "warning": {MARKUP["warning"]!r},
    "model": {{"name": {MARKUP["name"]!r}, "version": {MARKUP["version"]!r}, "demo": True}},
    "checks": {{"warnings": [{MARKUP["check"]!r}]}},
}}
app.score = lambda digest, data, explain: result
app.show_result("lesion.jpg", b"not decoded by the stub", False)
"""


def test_endpoint_markup_is_shown_as_text() -> None:
    at = AppTest.from_string(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    shown = [*at.markdown, *at.error, *at.warning]
    values = [e.value for e in shown]
    for name, raw in MARKUP.items():
        assert any(text(raw) in v for v in values), f"{name} not shown (escaped): {values}"
        assert not any(raw in v for v in values), f"{name} shown raw: {values}"
    html = [e.value for e in at.markdown if e.proto.allow_html]
    assert html == ["**Probability of melanoma:** <span class='probability'>0.250000</span> (25.0 %)"], html


def test_a_non_number_probability_is_refused_not_rendered() -> None:
    page = PAGE.replace('"probability": 0.25', '"probability": "<b>0.9</b>"')
    at = AppTest.from_string(page, default_timeout=60).run()
    assert not at.exception and not any(e.proto.allow_html for e in at.markdown)
    assert any("not a score" in e.value for e in at.error)


@pytest.mark.parametrize("address,allowed,refused", [
    ("127.0.0.1", False, False), ("localhost", False, False), ("::1", False, False),
    ("0.0.0.0", False, True), ("", False, True), (None, False, True), ("10.0.0.5", False, True),
    ("0.0.0.0", True, False),
])
def test_the_page_refuses_to_score_beyond_loopback(address: str | None, allowed: bool, refused: bool) -> None:
    assert (bind_refusal(address, allowed) is not None) == refused


def test_app_sh_refuses_a_network_address_before_installing_anything() -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "app.sh")], env={"APP_ADDRESS": "0.0.0.0", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr and "setup" not in proc.stderr
