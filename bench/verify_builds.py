"""Acceptance measurement for the export bound: faithful checkpoints build every time.

    .venv/bin/python bench/verify_builds.py TRAINED.ckpt [--builds 10]     # ~25 s a build on 2 cores

Builds (build_mar, --no-explain, in this process) each checkpoint --builds times and counts refusals:
the demo; TRAINED.ckpt (e.g. the trained fixture: python -m train on python -m train.synthetic's task);
and seeded variants of the architecture (testkit.variants.seeded_variant: BatchNorm statistics set, head
scaled so that logits on the photos reach +-30; seeds 1 and 2), written as Lightning checkpoints. Prints,
per checkpoint, the photo logit range, how far the eager model differs from itself (a batch against one
image at a time: a checkpoint cannot be held tighter than that), refusals, and the worst |dlogit|.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

from exporter import build_mar, export
from handler.pipeline import IMAGE_SIZE
from testkit.variants import as_lightning, seeded_variant


def photo_logit_range(path: Path | None) -> tuple[float, float, float]:
    """(min, max) logit on the verification photos, and |eager on the batch - eager one at a time|."""
    from exporter.checkpoint import load_checkpoint

    ckpt = export.demo_checkpoint() if path is None else load_checkpoint(path)
    eager = export.MalignancyLogit(ckpt.module, ckpt.outputs).eval()
    photos = export.verification_images(IMAGE_SIZE)
    with torch.inference_mode():
        logits = eager(photos)
        single = torch.cat([eager(p[None]) for p in photos])
    return float(logits.min()), float(logits.max()), float((logits - single).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trained", help="a trained checkpoint (the trained fixture's best.ckpt)")
    ap.add_argument("--builds", type=int, default=10)
    ap.add_argument("--skip", nargs="*", default=[], choices=["demo", "trained", "seeded"],
                    help="leave these checkpoints out (e.g. to finish an interrupted measurement)")
    args = ap.parse_args(argv)
    worst: list[float] = []
    real_verify = export.verify

    def recording_verify(*a: object, **kw: object) -> float:
        w = real_verify(*a, **kw)  # type: ignore[arg-type]
        worst.append(w)
        return w

    export.verify = recording_verify  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        cases: dict[str, Path | None] = {"demo": None, "trained": Path(args.trained)}
        for seed in (1, 2):
            if "seeded" not in args.skip:
                torch.save(as_lightning(seeded_variant(seed, 30.0)), tmp / f"seed{seed}.ckpt")
                cases[f"seeded {seed}, logits to +-30"] = tmp / f"seed{seed}.ckpt"
        for name in ("demo", "trained"):
            if name in args.skip:
                del cases[name]
        print(f"RTOL {export.RTOL}; {args.builds} builds each (build_mar --no-explain --force)")
        for name, path in cases.items():
            lo, hi, self_diff = photo_logit_range(path)
            worst.clear()
            refused = 0
            for _ in range(args.builds):
                argv_b = [*([str(path)] if path else []), "--no-explain", "--force", "--output-dir", str(tmp)]
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = build_mar.main(argv_b)
                if rc != 0:
                    refused += 1
                    print(f"  refused: {err.getvalue().strip().splitlines()[-1]}")
            print(f"{name}: photo logits {lo:+.1f}..{hi:+.1f} (eager batch vs single {self_diff:.1e}); "
                  f"refused {refused}/{args.builds}; "
                  f"worst |dlogit| {max(worst, default=float('nan')):.2e} "
                  f"(identical every build: {len(set(worst)) <= 1})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
