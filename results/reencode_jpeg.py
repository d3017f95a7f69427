"""Copy an ImageFolder dataset with exactly one more generation of JPEG loss (data dose-response experiment).

    python results/reencode_jpeg.py cifar10-jpeg cifar10-jpeg-shift4

Each image is padded by --shift edge-replicated pixels on the top and left, JPEG-encoded in memory, decoded,
cropped back and saved losslessly as PNG under the same relative path. The shift is needed because re-encoding
a JPEG at the same quality on the same 8x8 block grid is nearly lossless (RMSE ~0.7 grey levels) and would test
nothing; moving the grid makes the new quantisation hit different frequencies (RMSE ~6 on CIFAR-10 q75).

At the end it prints, and writes to DST/reencode.json, the image count and the RMSE (0..255) between source and
written pixels, plus the RMSE an unshifted re-encode would have given, for contrast.
Pillow + numpy + stdlib only.
"""
import argparse
import io
import json
import math
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
# Pillow's integer codes for the JPEG `subsampling` option
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="ImageFolder root to read (walked recursively)")
    p.add_argument("dst", help="new root to write; must not exist or be empty")
    p.add_argument("--shift", type=int, default=4,
                   help="pixels of edge padding on top/left before encoding, cropped after decoding (0 = no shift)")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality (default 75, as our CIFAR-10 copy)")
    p.add_argument("--subsampling", choices=sorted(SUBSAMPLING), default="4:2:0", help="chroma subsampling")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    args = p.parse_args(argv)
    if args.shift < 0:
        p.error("--shift must be >= 0")
    if not 1 <= args.quality <= 100:
        p.error("--quality must be in 1..100")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def fail(msg):
    """Bad input: one line on stderr and exit code 2, never a traceback."""
    print(f"reencode_jpeg: {msg}", file=sys.stderr)
    sys.exit(2)


def check_paths(src, dst):
    if not os.path.isdir(src):
        fail(f"source folder not found: {src}")
    if os.path.exists(dst) and not os.path.isdir(dst):
        fail(f"destination exists and is not a folder: {dst}")
    if os.path.isdir(dst) and os.listdir(dst):
        fail(f"destination is not empty, refusing to write into it: {dst}")
    # DST inside SRC would make a later run on SRC pick up our PNGs as extra images
    if os.path.commonpath([os.path.realpath(src), os.path.realpath(dst)]) == os.path.realpath(src):
        fail(f"destination must not lie inside the source: {dst}")


def find_images(src):
    """Relative paths of all image files under src, sorted so runs are reproducible."""
    rels = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                rels.append(os.path.relpath(os.path.join(root, name), src))
    return rels


def png_path(rel):
    return os.path.splitext(rel)[0] + ".png"


def jpeg_roundtrip(rgb, shift, quality, subsampling):
    """Encode+decode once as JPEG, with the block grid moved by `shift` pixels down and right."""
    padded = np.pad(rgb, ((shift, 0), (shift, 0), (0, 0)), mode="edge")
    buf = io.BytesIO()
    Image.fromarray(padded).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    buf.seek(0)
    with Image.open(buf) as img:
        decoded = np.asarray(img.convert("RGB"))
    return decoded[shift:, shift:]


def sq_error(a, b):
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sum(diff * diff))


def process(job):
    """Re-encode one image; return (rel, values, SSE of written image, SSE of an unshifted re-encode, error)."""
    rel, src, dst, shift, quality, subsampling = job
    try:
        with Image.open(os.path.join(src, rel)) as img:
            rgb = np.asarray(img.convert("RGB"))
        out = jpeg_roundtrip(rgb, shift, quality, subsampling)
        # Same-grid re-encode is only measured, to show how little loss an unshifted generation adds
        same = out if shift == 0 else jpeg_roundtrip(rgb, 0, quality, subsampling)
        out_path = os.path.join(dst, png_path(rel))
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        # lossless: the JPEG round trip is the only extra loss
        Image.fromarray(out).save(out_path, format="PNG")
        return rel, rgb.size, sq_error(rgb, out), sq_error(rgb, same), None
    # an unreadable or corrupt file: report it, keep going
    except (OSError, ValueError) as e:
        return rel, 0, 0.0, 0.0, f"{type(e).__name__}: {e}"


def run_all(jobs, workers):
    if workers == 1:
        return [process(j) for j in jobs]
    with Pool(workers) as pool:
        return list(pool.imap_unordered(process, jobs, chunksize=256))


def main(argv=None):
    args = parse_args(argv)
    check_paths(args.src, args.dst)
    rels = find_images(args.src)
    if not rels:
        fail(f"no image files found under {args.src}")
    outs = [png_path(r) for r in rels]
    # a.jpg and a.png would both become a.png
    if len(set(outs)) != len(outs):
        fail("two source images map to the same .png name in the destination")

    os.makedirs(args.dst, exist_ok=True)
    sub = SUBSAMPLING[args.subsampling]
    jobs = [(r, args.src, args.dst, args.shift, args.quality, sub) for r in rels]
    t0 = time.time()
    results = run_all(jobs, args.workers)
    seconds = time.time() - t0

    errors = [(r[0], r[4]) for r in results if r[4]]
    done = [r for r in results if not r[4]]
    values = sum(r[1] for r in done)
    rmse_shift = math.sqrt(sum(r[2] for r in done) / values) if values else float("nan")
    rmse_same = math.sqrt(sum(r[3] for r in done) / values) if values else float("nan")

    report = {
        "images": len(done),
        "failed": len(errors),
        "rmse_written": rmse_shift,
        "rmse_unshifted_reencode": rmse_same,
        "seconds": round(seconds, 1),
        "options": {"src": os.path.abspath(args.src), "shift": args.shift, "quality": args.quality,
                    "subsampling": args.subsampling, "workers": args.workers},
    }
    with open(os.path.join(args.dst, "reencode.json"), "w") as f:
        json.dump(report, f, indent=2)

    for rel, err in errors:
        print(f"failed: {rel}: {err}", file=sys.stderr)
    print(f"images: {len(done)}  ({len(errors)} failed)  in {seconds:.1f}s")
    print(f"RMSE source -> written (shift {args.shift}): {rmse_shift:.3f} grey levels")
    print(f"RMSE source -> re-encode without shift: {rmse_same:.3f} grey levels")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
