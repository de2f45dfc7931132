"""Write a folder of demo images, one subfolder per class, to try the examples offline.

    python examples/make_demo_images.py demo-images                    # 9 classes x 4 PNGs, 64x64
    python examples/make_demo_images.py demo-images --per-class 10 --varied-sizes --format jpg
    python examples/make_demo_images.py today --classes "a red circle,a green square,a blue triangle"

The images are coloured shapes ("a red circle", ... "a blue triangle"), the classes the
embedded demo CLIP knows (`mlflow run . --env-manager local -P model=demo ...`). Each file's
true class is the name of its folder: demo-images/a red circle/0001.png, ...
"""

from __future__ import annotations

import argparse

from mlflow_clip.demo_data import DEMO_CLASSES, write_image_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the images (created if missing)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same images")
    parser.add_argument("--format", default="png", choices=["png", "jpg", "webp", "bmp"])
    parser.add_argument("--varied-sizes", action="store_true", help="random sizes from 48 to 640 px a side")
    parser.add_argument(
        "--classes",
        default="",
        help="comma-separated demo classes to draw (default: all nine); the same seed draws the same images",
    )
    args = parser.parse_args(argv)

    size = None if args.varied_sizes else (64, 64)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] or list(DEMO_CLASSES)
    try:
        root = write_image_folder(args.folder, args.per_class, args.seed, size=size, fmt=args.format, classes=classes)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Wrote {args.per_class * len(classes)} images in {len(classes)} class folders under {root}")


if __name__ == "__main__":
    main()
