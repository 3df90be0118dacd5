"""The browser page: upload lesion photos, see each score (and heatmap) from the TorchServe endpoint.

    scripts/app.sh                                 # sets up the optional packages, then:
    .venv/bin/streamlit run client/app.py [-- --url https://host:8443 --cacert ca.pem ...]

A thin client of the API, never a second copy of the model: every number on the page is the endpoint's
answer. The inference key is read here, on the server side (TS_TOKEN or key_file.json, as
client/predict.py does), and is never sent to the browser. Whatever text the endpoint sends is shown as text,
never as HTML or markdown. The page serves loopback only unless started with --allow-remote (then put it behind
a login: docs/SECURITY.md, "The web page"). NOT A DIAGNOSTIC DEVICE.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import math
import re
import sys
from typing import Any

import streamlit as st
from PIL import Image, ImageOps

from client.tsclient import ClientError, add_server_args, client_from_args, is_loopback

DISCLAIMER = ("**Not a diagnostic device.** A score is not a diagnosis: anyone worried about a skin lesion "
              "should see a dermatologist.")
PREVIEW_SIDE = 512


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="streamlit run client/app.py --", description=__doc__)
    add_server_args(ap)
    ap.add_argument("--allow-remote", action="store_true",
                    help="serve the page on an address other than loopback (it scores with the server-side key for "
                         "whoever reaches it: put it behind HTTPS and a login)")
    args = ap.parse_args(sys.argv[1:])
    args.retries = min(args.retries, 1)  # a page should answer quickly; the user can press Retry
    return args


@st.cache_resource
def client() -> Any:
    return client_from_args(parse_args())


@st.cache_data(max_entries=64, show_spinner=False)
def score(digest: str, data: bytes, explain: bool) -> dict[str, Any]:
    """Cached per image bytes; a failure raises and is not cached, so the next run asks again."""
    del digest  # part of the cache key only
    return client().predict_bytes(data, explain=explain)


def preview(data: bytes) -> Image.Image | None:
    try:
        im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        return im.convert("RGB")
    except Exception:  # the endpoint says what is wrong with the file; the preview just stays empty
        return None


# Markdown's (and Streamlit's: $ for LaTeX, : for emoji and colours) punctuation, escaped with a backslash.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$&])")


def text(value: object) -> str:
    """Anything the endpoint sent, for markdown: shown as its characters, never as HTML, a link or an image."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(value).split()))


def number(value: object) -> float:
    """A probability or threshold from the endpoint, as a float (so that formatting it can only give digits)."""
    x = float(value)  # type: ignore[arg-type]
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {value!r}")
    return x


def calibration_line(res: dict) -> str:
    cal = res.get("calibration") or {}
    if cal.get("method") != "temperature":
        return "**Calibration:** none (the raw TTA score)  \n"
    return (f"**Calibration:** temperature {number(cal['temperature']):g} on the validation set "
            f"(raw TTA score {number(res['raw_score']):.6f})  \n")


def show_result(name: str, data: bytes, explain: bool) -> None:
    st.subheader(name)
    try:
        res = score(hashlib.sha256(data).hexdigest(), data, explain)
    except ClientError as e:
        status = f"HTTP {e.status}: " if e.status and not str(e).startswith("HTTP") else ""
        st.error(f"The endpoint could not score this file. {status}{text(e)}")
        if e.status is None:  # down or unreachable: say so, and let the person try again
            st.info("The scoring server did not answer. It will be used again as soon as it is back: "
                    "press Retry.")
            st.button("Retry", key=f"retry-{name}")
        return
    if res.get("warning"):
        st.error(text(res["warning"]))
    for warning in (res.get("checks") or {}).get("warnings", []):  # input checks: above the score, never hidden
        st.warning(f"Input check: {text(warning)}")
    photo, heat = st.columns(2)
    image = preview(data)
    if image is not None:
        photo.image(image, caption="uploaded photo", use_container_width=True)
    explanation = res.get("explanation") or {}
    if explanation.get("overlay_png"):
        method = {"layer-cam": "LayerCAM", "grad-cam": "Grad-CAM"}.get(explanation.get("method"), "Heatmap")
        caption = (f"{method}: no region raised the malignancy score" if explanation.get("no_positive_evidence")
                   else f"{method}: where the model found evidence for 'malignant'")
        heat.image(base64.b64decode(explanation["overlay_png"]), use_container_width=True, caption=caption)
    try:
        p, threshold = number(res["probability"]), number(res["threshold"])
        details = (f"**Label:** {text(res['label'])} (threshold {threshold:g}, "
                   f"{text((res.get('operating_point') or {}).get('chosen_for', 'fixed threshold'))})  \n"
                   f"{calibration_line(res)}"
                   f"**TTA views:** {text(res['tta_views'])}  \n")
    except (KeyError, TypeError, ValueError) as e:
        st.error(f"The endpoint's answer is not a score: {text(e)}")
        return
    model = res.get("model") or {}
    # The one HTML on the page: ours, around a number formatted here (the browser test finds it by its class).
    st.markdown(f"**Probability of melanoma:** <span class='probability'>{p:.6f}</span> ({100 * p:.1f} %)",
                unsafe_allow_html=True)
    st.markdown(details + f"**Model:** {text(model.get('name', ''))} {text(model.get('version', ''))}"
                f"{' (DEMO, untrained)' if model.get('demo') is True else ''}")


def bind_refusal(address: str | None, allow_remote: bool) -> str | None:
    """Why the page must not serve, if it listens beyond loopback without --allow-remote: it scores with the
    server-side key for anyone who reaches it (an open scoring proxy). Streamlit's unset address is every one."""
    if allow_remote or is_loopback(address):
        return None
    return (f"This page listens on {address or 'every address'} (server.address) and holds the inference key: "
            "it refuses to score. Serve it on 127.0.0.1 (scripts/app.sh does), or pass --allow-remote after '--' "
            "once it is behind HTTPS and a login (docs/SECURITY.md, \"The web page\").")


def main() -> None:
    st.set_page_config(page_title="Melanoma classifier", page_icon="🔬", layout="centered")
    st.title("Melanoma classifier")
    st.warning(DISCLAIMER)
    try:
        args = parse_args()
    except SystemExit:
        st.error("Bad options after '--': see streamlit run client/app.py -- --help")
        return
    refusal = bind_refusal(st.get_option("server.address"), args.allow_remote)
    if refusal:
        st.error(refusal)
        return
    try:
        client()
    except ClientError as e:
        st.error(f"Client set-up failed: {text(e)}")
        return
    explain = st.toggle("Show heatmap (LayerCAM)", value=True,
                        help="Asks /explanations: slower (about twice a prediction), same probability")
    files = st.file_uploader("Lesion photos (JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC; camera photos included)",
                             accept_multiple_files=True)
    for f in files or []:
        show_result(f.name, f.getvalue(), explain)


if __name__ == "__main__":  # streamlit runs the page as __main__; importing it (the tests) renders nothing
    main()
