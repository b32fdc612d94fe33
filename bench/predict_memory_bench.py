"""Peak memory of `headstart predict` on large photos, with and without decoding toward the model size.

Makes camera-sized JPEGs (24 and 35 MP) from the real darknet and scikit-image photos in a temp
folder, then runs `headstart.predict.predict_inputs` over the folder in a fresh process per mode and
prints each process's peak RSS (VmHWM) side by side. "full size" is predict before decoding
toward the model's input: the whole picture decoded and stacked, and cast to float32 inside the
model. Without --model, the default run's architecture (MobileNetV2 at 96 px, random weights:
memory does not depend on their values) is exported to the temp folder the way `headstart export`
writes it.

    PYTHONPATH=. .venv/bin/python bench/predict_memory_bench.py [--images 6] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZES = ((6000, 4000), (7200, 4800))  # 24 MP, 34.6 MP: the two shapes predict batches separately
SOURCES = sorted(Path("/usr/share/darknet/data").glob("*.jpg"))


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM: unlike getrusage, not inherited over exec)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def make_photos(folder: Path, count: int) -> None:
    import skimage.data
    from PIL import Image

    skimage_dir = Path(skimage.data.__file__).parent
    sources = SOURCES + [skimage_dir / name for name in ("chelsea.png", "coffee.png", "astronaut.png")]
    for i in range(count):
        source = sources[i % len(sources)]
        with Image.open(source) as photo:
            photo.convert("RGB").resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC).save(
                folder / f"{i:02d}_{source.stem}.jpg", quality=90)


def stand_in_model(folder: Path) -> Path:
    """The default run's exported model (MobileNetV2, 96 px, 10 classes), random weights, and labels.txt."""
    from headstart.backbones.loading import load_backbone
    from headstart.model import build_classifier, build_head
    from headstart.params import TrainHeadParams
    from headstart.serving import serving_model

    backbone = load_backbone("mobilenet_v2_tv", "none", 96, folder / "backbone")
    classifier = build_classifier(backbone, build_head(backbone.feature_dim, 10, TrainHeadParams()))
    target = folder / "model.keras"
    serving_model(classifier, 96, backbone.spec.interpolation).save(target)
    (folder / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(10)))
    return target


def child(model: Path, photos: Path, image_size: int) -> None:
    """One measured run: predict every photo in the folder; prints peak RSS and wall time as JSON."""
    from headstart.predict import predict_inputs
    from headstart.serving import load_predictor

    predictor = load_predictor(model)
    predictor.image_size = image_size or None
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        failures = predict_inputs(predictor, [str(photos)], 1, "csv", sink, sys.stderr)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mib": peak_rss_mib(), "seconds": seconds, "failures": failures}))


def measure(model: Path, photos: Path, image_size: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(model), str(photos), str(image_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--model", type=Path, help="an exported model (default: a stand-in built here)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PHOTOS", "IMAGE_SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return

    from headstart.serving import read_input_size

    with tempfile.TemporaryDirectory(prefix="predict-memory-") as scratch:
        photos = Path(scratch) / "photos"
        photos.mkdir()
        make_photos(photos, args.images)
        model = args.model or stand_in_model(Path(scratch))
        image_size = read_input_size(model) or 96
        megabytes = sum(p.stat().st_size for p in photos.iterdir()) / 2**20
        sizes = " and ".join(f"{w}x{h}" for w, h in SIZES)
        print(f"{args.images} JPEGs of {sizes} ({megabytes:.0f} MiB on disk), model {model.name} at "
              f"{image_size} px, {os.cpu_count()} CPU cores\n")
        full = measure(model, photos, 0)
        hinted = measure(model, photos, image_size)
    assert full["failures"] == hinted["failures"] == 0, (full, hinted)
    print("| decoding | peak RSS | wall time |")
    print("|---|---|---|")
    print(f"| full size (before) | {full['peak_mib']:,.0f} MiB | {full['seconds']:.1f} s |")
    print(f"| toward {image_size} px (draft + reduce) | {hinted['peak_mib']:,.0f} MiB "
          f"| {hinted['seconds']:.1f} s |")
    print(f"| ratio | {full['peak_mib'] / hinted['peak_mib']:.1f}x less | "
          f"{full['seconds'] / hinted['seconds']:.1f}x faster |")


if __name__ == "__main__":
    main()
