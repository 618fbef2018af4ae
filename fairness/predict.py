"""``equifed-predict``: score a site's images with a model and write the table ``equifed-audit`` reads.

    equifed-predict --model final_model.pt --data SITE_DIR --out preds.csv [--columns group,age,scanner_legacy]

One row per usable image: patient_id, image_path, the manifest's metadata columns (all, or those named by
``--columns``), label, and score (P(class 1); for more classes score_0..score_K-1). The network, classes, image
size and channels (grey or RGB) come from the model card beside the weights (`final_model.json`), or from ``--arch``,
``--num-classes`` and ``--image-size`` (the channels then from the weights' first convolution). Images the loader rejects are listed with their reason in `<out>.rejected.csv`.
Exits 2 with a one-line message on bad input (missing model or folder, a column the manifest lacks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core_models.data import ManifestError, load_site, write_rejected
from core_models.model_card import read_card
from core_models.data.volumes import VolumeSettings
from core_models.networks import input_channels, input_dims
from core_models.training import make_loader, predict_proba
from fairness.cli import load_weights

KEY_COLUMNS = ("patient_id", "image_path", "label")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="equifed-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model weights (final_model.pt, best_model.pt or a checkpoint)")
    p.add_argument("--data", required=True, help="a site folder (manifest.csv + images)")
    p.add_argument("--out", required=True, help="the predictions CSV to write")
    p.add_argument("--columns", default="", help="manifest columns to copy, comma-separated (default: all)")
    p.add_argument("--arch", default=None, help="network (cnn | resnet); default: the model card's")
    p.add_argument("--num-classes", type=int, default=None, help="default: the model card's")
    p.add_argument("--image-size", type=int, default=None, help="default: the model card's (its training size)")
    p.add_argument("--volume-window", default=None,
                   help="a volume model's CT window (run config volume-window); default: the model card's")
    p.add_argument("--volume-spacing", type=float, default=None,
                   help="a volume model's resampling spacing in mm (run config volume-spacing); default: the card's")
    return p


def predictions(model_path: str | Path, data: str | Path, columns: list[str] | None = None, arch: str | None = None,
                num_classes: int | None = None, image_size: int | None = None, volume_window: str | None = None,
                volume_spacing: float | None = None):
    """(the predictions table, the site's rejections). Raises ValueError with the reason on bad input."""
    card = read_card(model_path) or {}
    num_classes = num_classes or card.get("num_classes", 2)
    image_size = image_size or card.get("image_size")
    if image_size is None:
        raise ValueError(f"no model card beside {model_path}: give --image-size (the size the model trained at)")
    model = load_weights(model_path, arch, num_classes)
    volume = None
    if input_dims(model) == 3:  # read the studies as the run did (its card), unless told otherwise
        spacing = card.get("volume_spacing", 0.0) if volume_spacing is None else volume_spacing
        volume = VolumeSettings.from_window(volume_window or card.get("volume_window", "none"),
                                            spacing=spacing or None)
    site = load_site(Path(data), image_size=image_size, num_classes=num_classes, channels=input_channels(model),
                     volume=volume)
    frame = site.frame.reset_index(drop=True)
    extra = [c for c in frame.columns if c not in KEY_COLUMNS] if columns is None else columns
    missing = [c for c in extra if c not in frame.columns]
    if missing:
        raise ValueError(f"the manifest of {data} has no column(s) {missing}; it has {sorted(frame.columns)}")
    probs = predict_proba(model, make_loader(site.images, site.labels, 256))
    table = frame[["patient_id", "image_path", *extra]].copy()
    table["label"] = site.labels
    if num_classes == 2:
        table["score"] = probs[:, 1]
    else:
        for k in range(num_classes):
            table[f"score_{k}"] = probs[:, k]
    return table, site.rejected


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] or None
    try:
        table, rejected = predictions(args.model, args.data, columns, args.arch, args.num_classes, args.image_size,
                                      args.volume_window, args.volume_spacing)
    except (ValueError, ManifestError, FileNotFoundError) as err:
        print(f"equifed-predict: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    if rejected:
        write_rejected(rejected, out.with_suffix(".rejected.csv"))
    print(f"equifed-predict: {len(table)} image(s) scored -> {out}"
          + (f"; {len(rejected)} rejected (see {out.with_suffix('.rejected.csv')})" if rejected else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
