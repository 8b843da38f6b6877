"""The baseline a fine-tune must beat: logistic regression on a pretrained backbone's pooled features.

    python bench/linear_probe.py                          # stanford5, efficientnet-lite0, ImageNet, 224 px
    python bench/linear_probe.py --size 160 --backbone efficientnet-lite0

Each photo of the dataset's train/ and labelled test/ folders is squashed to a square (the kit's
plain view), passed through the kit's own model build up to its global pooling, and
scikit-learn's LogisticRegression is fitted on the training features (C chosen by 5-fold
cross-validation on them alone). Prints the test accuracy and the wall time. bench/real_cars.py
runs the same probe as its baseline row.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STANFORD5 = ROOT.parent / "shared" / "real-cars" / "stanford5"


def labelled_photos(folder: Path) -> tuple[list[Path], list[str]]:
    """Every image of folder/<class>/*, and its class."""
    from kit.layout import is_image

    paths = sorted(p for p in folder.glob("*/*") if p.is_file() and is_image(p))
    return paths, [p.parent.name for p in paths]


def pooled_features(paths: list[Path], backbone: str, size: int, weights: str) -> np.ndarray:
    import keras

    from kit.augment import apply, plain_transform
    from kit.backbones import build_model
    from kit.dataset import load_resized

    model = build_model(backbone, size, 2, weights)
    features = keras.Model(model.input, model.get_layer("pool").output)
    plain = plain_transform(size)
    images = np.stack([apply(plain, load_resized(p, size), 0) for p in paths])
    return features.predict(images, batch_size=32, verbose=0)


def linear_probe(data: Path, backbone: str = "efficientnet-lite0", size: int = 224,
                 weights: str = "imagenet") -> dict:
    """Test accuracy of a logistic regression on pooled features; the seconds it took, features included."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.time()
    train, train_labels = labelled_photos(data / "train")
    test, test_labels = labelled_photos(data / "test")
    x_train, x_test = (pooled_features(p, backbone, size, weights) for p in (train, test))
    probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, max_iter=3000))
    probe.fit(x_train, train_labels)
    return {"test": float(probe.score(x_test, test_labels)), "seconds": time.time() - started,
            "train": len(train), "images": len(test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=STANFORD5)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    result = linear_probe(args.data, args.backbone, args.size)
    print(f"{args.data.name}, {args.backbone} (ImageNet) at {args.size} px, {result['train']} training photos; "
          f"{platform.machine()}, {os.cpu_count()} CPU cores")
    print(f"linear probe test accuracy {result['test']:.4f} on {result['images']} photos, {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
