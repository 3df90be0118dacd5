#!/usr/bin/env python3
"""Score lesion photos with the melanoma endpoint.

    python client/predict.py image.jpg [more images or folders] [--json | --csv] [--explain]

Prints one line per image: path, probability, label. Exits 1 if any image failed.
NOT A DIAGNOSTIC DEVICE: a score is no diagnosis; see a dermatologist about any worrying lesion.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from client.tsclient import (
    AuthError,
    ClientError,
    OfflineScorer,
    add_server_args,
    client_from_args,
    iter_images,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Score lesion photos with the melanoma TorchServe endpoint.")
    ap.add_argument("images", nargs="+", help="image files or folders of images")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per line (the full response)")
    out.add_argument("--csv", action="store_true", help="CSV: path,probability,label,threshold,error")
    add_server_args(ap)
    ap.add_argument("--explain", action="store_true",
                    help="also ask for a Grad-CAM heatmap and write it over the photo to <image>.heatmap.png")
    ap.add_argument("--offline", metavar="ARCHIVE",
                    help="score in-process with this .mar through the same pipeline, no server")
    return ap.parse_args(argv)


def heatmap_path(image: Path) -> Path:
    return image.with_name(f"{image.stem}.heatmap.png")


def save_heatmap(image: Path, res: dict[str, Any]) -> None:
    """Write the overlay PNG beside the image; keep the printed result small (no float grid, no base64)."""
    explanation = res.get("explanation") or {}
    png = explanation.pop("overlay_png", None)
    if png is None:
        raise ClientError("the server's explanation has no overlay image")
    out = heatmap_path(image)
    try:
        out.write_bytes(base64.b64decode(png))
    except OSError as e:
        raise ClientError(f"cannot write {out}: {e.strerror}") from None
    explanation.pop("heatmap", None)
    explanation["heatmap_png"] = str(out)


def flags(res: dict[str, Any]) -> str:
    """"  [check: blur, out_of_distribution]" for the input checks that flagged this image (--json has them all)."""
    checks = res.get("checks") or {}
    names = [k for k, v in checks.items() if isinstance(v, dict) and v.get("flagged")]
    return f"  [check: {', '.join(names)}]" if names else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = list(iter_images(args.images))
    if not paths:
        print("predict: error: no image files found in the given paths", file=sys.stderr)
        return 2
    if args.offline:
        try:
            scorer: Any = OfflineScorer.from_path(args.offline)
        except ClientError as e:
            print(f"predict: error: {e}", file=sys.stderr)
            return 2
        workers = 1  # one process-wide model: more threads would only contend for the same cores
    else:
        try:
            scorer = client_from_args(args)
        except ClientError as e:
            print(f"predict: error: {e}", file=sys.stderr)
            return 2
        workers = max(1, args.workers)

    def score(path: Path) -> tuple[Path, dict[str, Any] | None, str | None]:
        try:
            res = scorer.predict_file(path, explain=args.explain)
            if args.explain:
                save_heatmap(path, res)
            return path, res, None
        except AuthError:
            raise
        except ClientError as e:
            return path, None, str(e)

    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(["path", "probability", "label", "threshold", "error"])
    failed = 0
    warned = False
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for path, res, err in pool.map(score, paths):  # map keeps the input order
            failed += err is not None
            if res and res.get("warning") and not warned:
                print(f"WARNING: {res['warning']}", file=sys.stderr)
                warned = True
            if args.json:
                print(json.dumps({"path": str(path), **(res or {"error": err})}), flush=True)
            elif writer:
                row = [path, f"{res['probability']:.6f}", res["label"], res["threshold"], ""] if res else \
                    [path, "", "", "", err]
                writer.writerow(row)
            elif res:
                demo = "  [DEMO MODEL: untrained, meaningless]" if res.get("model", {}).get("demo") else ""
                heat = f"\theatmap: {res['explanation']['heatmap_png']}" if "explanation" in res else ""
                print(f"{path}\t{res['probability']:.4f}\t{res['label']}{heat}{flags(res)}{demo}", flush=True)
            else:
                print(f"{path}\tERROR\t{err}", flush=True)
    except AuthError as e:  # every other image would fail the same way: stop with one line
        print(f"predict: error: {e}", file=sys.stderr)
        return 1
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if failed:
        print(f"predict: {failed} of {len(paths)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def cli() -> None:
    """Console-script entry point (pip install .)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
