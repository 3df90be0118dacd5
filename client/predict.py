#!/usr/bin/env python3
"""Score lesion photos with the melanoma endpoint.

    python client/predict.py image.jpg [more images or folders] [--json | --csv]

Prints one line per image: path, probability, label. Exits 1 if any image failed.
NOT A DIAGNOSTIC DEVICE: a score is no diagnosis; see a dermatologist about any worrying lesion.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tsclient import (  # noqa: E402
    DEFAULT_URL,
    AuthError,
    Client,
    ClientError,
    OfflineScorer,
    default_management_url,
    find_key_file,
    iter_images,
    resolve_token,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Score lesion photos with the melanoma TorchServe endpoint.")
    ap.add_argument("images", nargs="+", help="image files or folders of images")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per line (the full response)")
    out.add_argument("--csv", action="store_true", help="CSV: path,probability,label,threshold,error")
    ap.add_argument("--url", default=DEFAULT_URL, help=f"inference address (default {DEFAULT_URL})")
    ap.add_argument("--model", default="melanoma", help="model name (default melanoma)")
    ap.add_argument("--token", help="inference key (default: $TS_TOKEN, else key_file.json)")
    ap.add_argument("--key-file", help="TorchServe's key_file.json (default: ./key_file.json, then the repo's)")
    ap.add_argument("--management-url",
                    help="management address, to rotate an expired key with the API key from the key file "
                    "(default: port 8081 on the same host when --url is loopback http)")
    ap.add_argument("--cacert", help="CA bundle to verify an https:// server (for a private CA)")
    ap.add_argument("--insecure-http", action="store_true",
                    help="allow sending the key over plain http:// to a non-loopback host")
    ap.add_argument("--workers", type=int, default=4, help="images in flight at once (default 4)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    ap.add_argument("--retries", type=int, default=4, help="retries on 503 and connection errors (default 4)")
    ap.add_argument("--offline", metavar="ARCHIVE",
                    help="score in-process with this .mar through the same pipeline, no server")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = list(iter_images(args.images))
    if not paths:
        print("predict: error: no image files found in the given paths", file=sys.stderr)
        return 2
    if args.offline:
        scorer: Any = OfflineScorer.from_path(args.offline)
        workers = 1  # one process-wide model: more threads would only contend for the same cores
    else:
        token = resolve_token(args.token, args.key_file)
        # Renewal reads the key file: the one named, or the one the key came from.
        from_file = args.key_file or not (args.token or os.environ.get("TS_TOKEN"))
        try:
            scorer = Client(args.url, args.model, token, args.timeout, args.retries,
                            key_file=find_key_file(args.key_file) if from_file else None,
                            management_url=args.management_url or default_management_url(args.url),
                            cacert=args.cacert, insecure_http=args.insecure_http)
        except ClientError as e:
            print(f"predict: error: {e}", file=sys.stderr)
            return 2
        workers = max(1, args.workers)

    def score(path: Path) -> tuple[Path, dict[str, Any] | None, str | None]:
        try:
            return path, scorer.predict_file(path), None
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
                print(f"{path}\t{res['probability']:.4f}\t{res['label']}{demo}", flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
