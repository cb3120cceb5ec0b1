"""How long loading a device's own data takes and how much memory it holds, per layout.

    python benchmarks/local_data_load.py            # writes benchmarks/results/local_data_load.json

Writes N Fashion-MNIST-sized (28 x 28 grey) images in each layout ``common.data.local`` reads
(class folders of PNGs, one ``.npz``, an idx pair) into a temporary folder, then loads each in a
fresh process (imports done first) and records the wall time of ``load_images`` and the peak
resident memory it added (VmHWM after minus VmRSS before), beside the images' own bytes
(N x 784). The claim checked: loading is linear in N and holds the images about once.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import harness
import numpy as np
from PIL import Image

SIZE = 28
COLUMNS = [
    ("layout", "layout", "s"),
    ("images", "images", ",d"),
    ("seconds", "load s", ".3f"),
    ("ms-per-image", "ms an image", ".3f"),
    ("peak-growth-mb", "peak memory added MB", ".1f"),
    ("image-mb", "images' bytes MB", ".1f"),
]

MEASURE = """
import json, sys, time
sys.path.insert(0, {root!r})
from common.data.local import load_images

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

before = kib("VmRSS")
start = time.perf_counter()
data = load_images({path!r}, 1, 28, 10)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "images": len(data.images),
                   "peak-growth-mb": (kib("VmHWM") - before) / 1024}}))
"""


def write_layouts(folder: Path, count: int, seed: int = 0) -> dict[str, Path]:
    """The same ``count`` random images as class folders, an ``.npz`` and an idx pair."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, SIZE, SIZE), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    pngs = folder / "pngs"
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        (pngs / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(pngs / str(label) / f"{index}.png")
    npz = folder / "data.npz"
    np.savez(npz, images=images, labels=labels)
    idx = folder / "idx"
    idx.mkdir()
    header = np.array([0x803, count, SIZE, SIZE], dtype=">u4").tobytes()
    (idx / "train-images-idx3-ubyte").write_bytes(header + images.tobytes())
    label_header = np.array([0x801, count], dtype=">u4").tobytes()
    with gzip.open(idx / "train-labels-idx1-ubyte.gz", "wb") as file:
        file.write(label_header + labels.tobytes())
    return {"png class folders": pngs, "npz": npz, "idx": idx}


def measure(path: Path) -> dict:
    """``load_images`` of ``path`` in a fresh process: seconds, images, peak memory added."""
    code = MEASURE.format(root=str(harness.ROOT), path=str(path))
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="2000,8000", help="image counts, comma-separated")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    if len(set(counts)) < 2:
        parser.error("--counts needs two different image counts (the memory slope is between them)")
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory() as scratch:
            for layout, path in write_layouts(Path(scratch), count).items():
                result = measure(path)
                rows.append(
                    {
                        "layout": layout,
                        **result,
                        "ms-per-image": 1000 * result["seconds"] / count,
                        "image-mb": count * SIZE * SIZE / 2**20,
                    }
                )
                print(f"{layout:18} {count:6} images: {result}", flush=True)
    span = f"{counts[0]:,} to {counts[-1]:,} images"
    harness.write_result(
        "local_data_load",
        "python benchmarks/local_data_load.py",
        [
            harness.headline(
                f"{layout}: peak memory added per image byte, {span}",
                memory_slope(rows, layout),
            )
            for layout in dict.fromkeys(row["layout"] for row in rows)
        ],
        COLUMNS,
        rows,
    )


def memory_slope(rows: list[dict], layout: str) -> float:
    """Peak memory added between the smallest and largest count, over their images' bytes: 1.0
    holds the images once (the fixed cost of the loader cancels out)."""
    of_layout = [row for row in rows if row["layout"] == layout]
    first, last = of_layout[0], of_layout[-1]
    return (last["peak-growth-mb"] - first["peak-growth-mb"]) / (
        last["image-mb"] - first["image-mb"]
    )


if __name__ == "__main__":
    main()
