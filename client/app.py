"""The browser page: upload lesion photos, see each score (and heatmap) from the TorchServe endpoint.

    scripts/app.sh                                 # sets up the optional packages, then:
    .venv/bin/streamlit run client/app.py [-- --url https://host:8443 --cacert ca.pem ...]

A thin client of the API, never a second copy of the model: every number on the page is the endpoint's
answer. The inference key is read here, on the server side (TS_TOKEN or key_file.json, as
client/predict.py does), and is never sent to the browser. NOT A DIAGNOSTIC DEVICE.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
from typing import Any

import streamlit as st
from PIL import Image, ImageOps

from client.tsclient import ClientError, add_server_args, client_from_args

DISCLAIMER = ("**Not a diagnostic device.** A score is not a diagnosis: anyone worried about a skin lesion "
              "should see a dermatologist.")
PREVIEW_SIDE = 512


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="streamlit run client/app.py --", description=__doc__)
    add_server_args(ap)
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


def calibration_line(res: dict) -> str:
    cal = res.get("calibration") or {}
    if cal.get("method") != "temperature":
        return "**Calibration:** none (the raw TTA score)  \n"
    return (f"**Calibration:** temperature {cal['temperature']:g} on the validation set "
            f"(raw TTA score {res['raw_score']:.6f})  \n")


def show_result(name: str, data: bytes, explain: bool) -> None:
    st.subheader(name)
    try:
        res = score(hashlib.sha256(data).hexdigest(), data, explain)
    except ClientError as e:
        status = f"HTTP {e.status}: " if e.status and not str(e).startswith("HTTP") else ""
        st.error(f"The endpoint could not score this file. {status}{e}")
        if e.status is None:  # down or unreachable: say so, and let the person try again
            st.info("The scoring server did not answer. It will be used again as soon as it is back: "
                    "press Retry.")
            st.button("Retry", key=f"retry-{name}")
        return
    if res.get("warning"):
        st.error(res["warning"])
    for warning in (res.get("checks") or {}).get("warnings", []):  # input checks: above the score, never hidden
        st.warning(f"Input check: {warning}")
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
    p, model = res["probability"], res.get("model", {})
    st.markdown(
        f"**Probability of melanoma:** <span class='probability'>{p:.6f}</span> ({100 * p:.1f} %)  \n"
        f"**Label:** {res['label']} (threshold {res['threshold']:g}, "
        f"{(res.get('operating_point') or {}).get('chosen_for', 'fixed threshold')})  \n"
        f"{calibration_line(res)}"
        f"**TTA views:** {res['tta_views']}  \n"
        f"**Model:** {model.get('name', '')} {model.get('version', '')}"
        f"{' (DEMO, untrained)' if model.get('demo') else ''}",
        unsafe_allow_html=True,
    )


def main() -> None:
    st.set_page_config(page_title="Melanoma classifier", page_icon="🔬", layout="centered")
    st.title("Melanoma classifier")
    st.warning(DISCLAIMER)
    try:
        client()
    except ClientError as e:
        st.error(f"Client set-up failed: {e}")
        return
    explain = st.toggle("Show heatmap (LayerCAM)", value=True,
                        help="Asks /explanations: slower (about twice a prediction), same probability")
    files = st.file_uploader("Lesion photos (JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC; camera photos included)",
                             accept_multiple_files=True)
    for f in files or []:
        show_result(f.name, f.getvalue(), explain)


main()
