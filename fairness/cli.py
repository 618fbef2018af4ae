"""``equifed-audit``: the causal fairness audit of any model's predictions, as an HTML report plus JSON.

    equifed-audit --predictions preds.csv --graph synthetic --out audit/ [--site-column site] [--run-dir runs/x]
                  [--model final_model.pt --images SITE_DIR [--reference-model before.pt]]
                  [--fit-correction correction.json]

With ``--model`` and ``--images`` the report also shows image evidence (the share of attribution in a region, e.g.
a scanner's burnt-in marker, by Grad-CAM or, with ``--attribution occlusion``, by occlusion at pixel resolution;
with the parameter-randomisation check and a deletion curve) on the site's images selected by ``--image-filter``,
before/after when ``--reference-model`` is given.

With ``--fit-correction`` it also fits the post-processing correction for a model that cannot be retrained (a logit
shift per level of the social mediator, read from the image's metadata at inference) and reports the impermissible
effect after it.

The CSV needs one column per observed node of the graph spec (a shipped name such as ``synthetic`` or a TOML path).
Exits 2 with a one-line message on bad input (missing file or column, invalid graph, unusable data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from core_models.model_card import load_state_dict_file
from fairness.graph import GraphError, load_graph_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="equifed-audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--predictions", required=True, help="CSV with the score, label, sensitive and mediator columns")
    p.add_argument("--graph", required=True, help="graph spec: a TOML path or a shipped name (e.g. synthetic)")
    p.add_argument("--out", required=True, help="folder for fairness_audit.html and fairness_audit.json")
    p.add_argument("--columns", default="", help="remap node=column pairs, comma-separated (e.g. A=sex,Yhat=prob)")
    p.add_argument("--site-column", default=None, help="per-site effects (forest plot) by this column")
    p.add_argument("--run-dir", default=None, help="a federated run folder: epsilon per site and shift summary")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--specificity", type=float, default=0.8, help="operating point of the group metrics")
    p.add_argument("--no-dowhy", action="store_true", help="skip DoWhy's refuters and independence tests")
    p.add_argument("--no-placebo", action="store_true", help="skip the permuted-A placebo")
    p.add_argument("--fit-correction", default=None, metavar="JSON",
                   help="also fit the post-processing correction (a logit shift per level of the social mediator "
                        "within cells of the covariates that zeroes its effect; "
                        "fairness.mitigation.ScoreShiftCorrection) on these predictions, write it here and report "
                        "the impermissible effect after it")
    g = p.add_argument_group("image evidence (Grad-CAM or occlusion)")
    g.add_argument("--model", default=None, help="model weights (final_model.pt or a round checkpoint)")
    g.add_argument("--reference-model", default=None, help="weights to compare with (e.g. before mitigation)")
    g.add_argument("--images", default=None, help="a site folder (manifest.csv + images) to explain")
    g.add_argument("--image-filter", default="scanner_legacy=1", help="manifest rows to explain: column=value")
    g.add_argument("--region", default="0,0,0.1,0.1",
                   help="the region of interest as fractions y0,x0,y1,x1 (default: the synthetic marker corner)")
    g.add_argument("--arch", default=None, help="network of the weights (cnn | resnet); default: the model card's, else cnn")
    g.add_argument("--image-size", type=int, default=None,
                   help="size the images are scaled to; default: the model's training size from its card "
                        "(final_model.json beside final_model.pt)")
    g.add_argument("--max-images", type=int, default=200)
    g.add_argument("--attribution", default="gradcam",
                   help="comma-separated methods: gradcam and hirescam (at the network's default layer: SmallCNN's "
                        "last block, a ResNet's second stage) and occlusion at pixel resolution (slower: ~850 forward "
                        "passes per 32 px image; use with --max-images 64 or --occlusion-stride)")
    g.add_argument("--occlusion-stride", type=int, default=1, help="occlusion windows every this many pixels")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"equifed-audit: error: {msg}", file=sys.stderr)
        return 2

    if args.n_boot < 10:
        return fail(f"--n-boot must be at least 10, got {args.n_boot}")
    if not 0 < args.alpha < 1 or not 0 < args.specificity < 1:
        return fail("--alpha and --specificity must lie strictly between 0 and 1")
    path = Path(args.predictions)
    if not path.is_file():
        return fail(f"predictions file not found: {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        return fail(f"cannot read {path} as CSV: {err}")
    if frame.empty:
        return fail(f"{path} has no rows")
    try:
        for weights in (args.model, args.reference_model):  # refused before minutes of bootstrap, not after
            if weights:
                load_state_dict_file(weights)
        spec = load_graph_spec(args.graph)
        if args.columns:
            pairs = [kv.split("=", 1) for kv in args.columns.split(",") if kv.strip()]
            if any(len(kv) != 2 for kv in pairs):
                return fail(f"--columns must be node=column pairs, got {args.columns!r}")
            spec = spec.with_columns({k.strip(): v.strip() for k, v in pairs})
        from fairness.audit import run_audit
        from fairness.report import run_context, write_report

        audit = run_audit(frame, spec, n_boot=args.n_boot, seed=args.seed, alpha=args.alpha,
                          specificity=args.specificity, placebo=not args.no_placebo, dowhy=not args.no_dowhy,
                          site_column=args.site_column)
        context = run_context(args.run_dir) if args.run_dir else None
        if args.run_dir and not Path(args.run_dir).is_dir():
            return fail(f"run folder not found: {args.run_dir}")
        if args.model or args.images:
            if not (args.model and args.images):
                return fail("image evidence needs both --model and --images")
            context = {**(context or {}), "image_evidence": image_evidence_from_files(args)}
        if args.fit_correction:
            correction = fit_correction(frame, spec, Path(args.fit_correction), n_boot=args.n_boot, seed=args.seed)
            context = {**(context or {}), "correction": correction}
        paths = write_report(audit, args.out, context=context)
    except (GraphError, ValueError, FileNotFoundError) as err:  # GraphError: spec, column and estimation errors
        return fail(str(err))
    print(audit.verdict["text"])
    if args.fit_correction:
        c = context["correction"]
        print(f"correction: logit shift {c['delta']} by {c['mediator_column']}; impermissible effect on the score "
              f"{c['before']['estimate']:+.4f} -> {c['after']['estimate']:+.4f} "
              f"(95% CI {c['after']['ci_low']:+.4f} to {c['after']['ci_high']:+.4f}); written to {args.fit_correction}")
    print(f"report: {paths['html']}\njson:   {paths['json']}")
    return 0


def fit_correction(frame: pd.DataFrame, spec, path: Path, n_boot: int = 200, seed: int = 0) -> dict:
    """Fit :class:`fairness.mitigation.ScoreShiftCorrection` for the spec's one observed social mediator (levels
    coded 0..k, S = 0 the reference level) within cells of the spec's covariates (numeric columns) on labelled
    predictions, write it as JSON to ``path`` (what a site applies at inference, S read from the image's metadata,
    the covariates from ``covariate_columns``; ``ScoreShiftCorrection.from_dict`` reads it back) and return it with
    the audit's impermissible effect on the score before and after (its robust estimator and interval)."""
    import json

    import numpy as np

    from fairness.mitigation import ScoreShiftCorrection
    from fairness.pse import estimate_effects

    social = [n for n in spec.mediators() if spec.nodes[n].kind == "social"]
    if len(social) != 1 or spec.outcome is None:
        raise ValueError("--fit-correction needs exactly one observed social mediator and an observed label; "
                         f"the graph has social mediators {social} and label {spec.outcome}")
    a_col, s_col, d_col, y_col = (spec.column(n) for n in (spec.sensitive, social[0], spec.outcome, spec.prediction))
    s = frame[s_col].to_numpy()
    if not np.all(np.isin(s, np.arange(int(np.max(s)) + 1))) or not (s == 0).any():
        raise ValueError(f"--fit-correction needs {s_col!r} coded 0..k with 0 present (the reference level)")
    c_cols = [spec.column(n) for n in spec.covariates]
    not_numeric = [col for col in c_cols if not pd.api.types.is_numeric_dtype(frame[col])]
    if not_numeric:
        raise ValueError(f"--fit-correction fits within cells of the covariates and needs them numeric: code "
                         f"{', '.join(map(repr, not_numeric))} as numbers")
    c = frame[c_cols].to_numpy(float) if c_cols else None
    a = (frame[a_col] != spec.nodes[spec.sensitive].reference).to_numpy().astype(int)
    corr = ScoreShiftCorrection().fit(frame[y_col].to_numpy(float), a, s, frame[d_col].to_numpy(), c=c)
    corrected = frame.assign(**{y_col: corr.transform(frame[y_col].to_numpy(float), s, c=c)})

    def effect(f: pd.DataFrame) -> dict:
        row = estimate_effects(f, spec, n_boot=n_boot, seed=seed).get("impermissible", "score")
        return {k: float(row[k]) for k in ("estimate", "ci_low", "ci_high")}

    out = {"mediator": social[0], "mediator_column": s_col, "covariate_columns": c_cols, **corr.to_dict(),
           "before": effect(frame), "after": effect(corrected), "n": int(len(frame))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def load_weights(path: str | Path, arch: str | None = None, num_classes: int | None = None,
                 in_channels: int | None = None):
    """The network in `path`, built as its model card says (or as `arch`/`num_classes`/`in_channels` say, where
    given; without a card, 1 grey channel unless the weights' first convolution takes 3); of a detector file (its
    card says so), the detector's classifier, which is what scores and explanations use. Raises ValueError naming
    the file when the weights do not fit that network."""
    from core_models.model_card import model_dims, read_card
    from core_models.model_factory import ModelSpec

    state = load_state_dict_file(path)
    card = read_card(path) or {}
    arch = arch or card.get("model", "cnn")
    spec = ModelSpec(model=arch, num_classes=num_classes or card.get("num_classes", 2),
                     in_channels=in_channels or card.get("in_channels") or _stem_channels(state),
                     image_size=card["image_size"] if card.get("detector") else card.get("image_size", 64),
                     detection=bool(card.get("detector")),  # a detector's anchors need its own size
                     dims=model_dims(path, state, card))
    model = spec.network()
    holder = spec.build(model)
    try:
        holder.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"model file {path} does not fit the network {arch!r}"
                         f"{' (its model card)' if card and arch == card.get('model') else ''}: "
                         f"{str(err).splitlines()[0]}") from None
    return model.eval()


def _stem_channels(state: dict) -> int:
    """The image channels of a state dict's network from its first convolution weight: 3 when it takes 3 (a
    ScatterNet's: 3 x 81 scattering maps), else 1."""
    first = next((v for v in state.values() if getattr(v, "dim", lambda: 0)() >= 4), None)  # 2-D or 3-D
    return 3 if first is not None and first.shape[1] in (3, 3 * 81) else 1


def region_mask(text: str, size: int):
    """Boolean (size, size) mask of a box given as fractions "y0,x0,y1,x1"."""
    import numpy as np

    try:
        y0, x0, y1, x1 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--region must be four fractions y0,x0,y1,x1, got {text!r}") from None
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise ValueError(f"--region must satisfy 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1, got {text!r}")
    mask = np.zeros((size, size), bool)
    mask[int(y0 * size):max(int(y0 * size) + 1, round(y1 * size)),
         int(x0 * size):max(int(x0 * size) + 1, round(x1 * size))] = True
    return mask


def image_evidence_from_files(args) -> dict:
    """Attribution evidence for ``--model`` (and ``--reference-model``) on the ``--images`` rows ``--image-filter``."""
    from core_models.data import load_site
    from fairness.attribution import ATTRIBUTION_METHODS, image_evidence

    from core_models.model_card import read_card

    methods = [m.strip() for m in args.attribution.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ATTRIBUTION_METHODS))
    if unknown or not methods:
        raise ValueError(f"--attribution {args.attribution!r}: choose from {', '.join(ATTRIBUTION_METHODS)}")
    model = load_weights(args.model, args.arch)  # a refused file is named before anything else is read
    if args.image_size is None:
        card = read_card(args.model)
        if card is None:
            raise ValueError(f"no model card beside {args.model}: give --image-size (the size the model trained at)")
        args.image_size = card["image_size"]
    from core_models.networks import input_channels

    data = load_site(Path(args.images), image_size=args.image_size, channels=input_channels(model))
    column, _, value = args.image_filter.partition("=")
    if column not in data.frame:
        raise ValueError(f"--image-filter column {column!r} is not in {args.images}/manifest.csv")
    keep = (data.frame[column].astype(str) == value).to_numpy()
    if not keep.any():
        raise ValueError(f"no image of {args.images} has {column} == {value}")
    x = data.images[keep][: args.max_images]
    reference = load_weights(args.reference_model, args.arch) if args.reference_model else None
    mask = region_mask(args.region, args.image_size)
    evidence = {method: image_evidence(model, x, mask, reference_model=reference, method=method,
                                       n_draws=3 if method == "occlusion" else 10,
                                       occlusion_stride=args.occlusion_stride)
                for method in methods}
    return evidence[methods[0]] if len(methods) == 1 else evidence


if __name__ == "__main__":
    raise SystemExit(main())
