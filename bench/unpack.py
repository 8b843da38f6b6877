"""How long a new Colab session takes to unpack the competition onto its local disk (`kit.download`).

    python bench/unpack.py [--photos ../shared/competition/test_upload_sample] [--scale 1.0]

Builds an archive shaped and sized like the real one (train.csv, sample-submission.csv, and train.zip
and test.zip holding 15,561 + 6,675 JPEGs, deflated as Kaggle's are), from real photos repeated under
the real Ids, then times the kit's own unpack + verify into a fresh folder, and prints a table.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd

from kit.config import Workdir
from kit.download import download

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "competition"


def build_archive(target: Path, photos: list[bytes], scale: float) -> tuple[int, int]:
    train = pd.read_csv(SHARED / "train.csv", dtype={"Id": str})
    test = pd.read_csv(SHARED / "sample-submission.csv", dtype={"Id": str})
    train, test = train.iloc[: int(len(train) * scale)], test.iloc[: int(len(test) * scale)]

    def inner(names: list[str]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for k, name in enumerate(names):
                z.writestr(name, photos[k % len(photos)])
        return buffer.getvalue()

    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as z:
        z.writestr("train.csv", train.to_csv(index=False))
        z.writestr("sample-submission.csv", test.to_csv(index=False))
        z.writestr("train.zip", inner([f"train/{c}/{i}" for i, c in zip(train.Id, train.Category)]))
        z.writestr("test.zip", inner([f"test_upload/{i}" for i in test.Id]))
    return len(train), len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=SHARED / "test_upload_sample")
    parser.add_argument("--scale", type=float, default=1.0, help="share of the real image count (1.0: 22,236)")
    args = parser.parse_args()
    photos = [p.read_bytes() for p in sorted(args.photos.glob("*.jpg"))]
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "sf-dl-car-classification.zip"
        started = time.perf_counter()
        n_train, n_test = build_archive(archive, photos, args.scale)
        built = time.perf_counter() - started
        started = time.perf_counter()
        download(Workdir(Path(tmp) / "work"), zip_path=archive)
        unpacked = time.perf_counter() - started
        size = archive.stat().st_size / 2**30
        shutil.rmtree(Path(tmp) / "work")
    images = n_train + n_test
    print(f"\n| images | archive GiB | build s | unpack + verify s | images/s |\n|---|---|---|---|---|\n"
          f"| {images} | {size:.2f} | {built:.1f} | {unpacked:.1f} | {images / unpacked:.0f} |")


if __name__ == "__main__":
    main()
