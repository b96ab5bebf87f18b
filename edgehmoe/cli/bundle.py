"""Bundle sub-commands of ``edgehmoe``: export, predict, bundle subset/verify/show, extend.

::

    edgehmoe export  --model-dir DIR | --run runs/NAME  --out BUNDLE [--no-flat] [--overwrite]
                     [--fused path,tree | --no-fused] [--quantize int8 --calibration-data SPEC]
    edgehmoe predict --bundle B IMAGE_OR_NPZ... [--beam K | --threshold TAU] [--json]
    edgehmoe bundle subset --bundle B --keep NODE... --out B2
    edgehmoe bundle verify --bundle B
    edgehmoe bundle show   --bundle B [--json]
    edgehmoe extend  --model-dir OLD --hierarchy NEW.csv --dataset SPEC --out NEW [--epochs N]

``edgehmoe evaluate --bundle B`` is wired by :mod:`edgehmoe.cli.main` through
:func:`evaluate_bundle`. ``predict``, ``bundle`` and ``evaluate --bundle`` import numpy and
onnxruntime only (Pillow for images), so they run on a device without torch; ``export`` and
``extend`` need the training extra. Run standalone as ``python -m edgehmoe.cli.bundle``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from edgehmoe.cli.common import (
    add_dataset_args,
    add_debug_arg,
    configure_logging,
    load_data,
    run_main,
)
from edgehmoe.errors import UsageError

__all__ = ["register", "evaluate_bundle", "load_images", "main", "get_args_parser"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


# ---------------------------------------------------------------------- inputs
def _as_rgb_batch(a: np.ndarray, where: str) -> np.ndarray:
    """``(N,H,W,3)``, ``(H,W,3)``, ``(N,H,W)`` / ``(N,H,W,1)`` grayscale or ``(N,3,H,W)`` uint8 → NHWC RGB."""
    if a.dtype != np.uint8:
        raise UsageError(f"{where}: images must be uint8 (0..255); got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 3:
        a = a[None]
    elif a.ndim == 3:
        a = a[..., None]
    if a.ndim == 4 and a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.ndim == 4 and a.shape[-1] != 3 and a.shape[1] == 3:
        a = a.transpose(0, 2, 3, 1)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise UsageError(f"{where}: expected images of shape (N, H, W, 3); got {a.shape}")
    return np.ascontiguousarray(a)


def _load_npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        key = "x" if "x" in keys else "images" if "images" in keys else None
        if key is None:
            cands = [k for k in keys if z[k].dtype == np.uint8 and z[k].ndim in (3, 4)]
            if len(cands) != 1:
                raise UsageError(f"{path}: cannot tell which array holds the images (arrays: {', '.join(keys)}); name it 'x'")
            key = cands[0]
        return _as_rgb_batch(np.asarray(z[key]), f"{path}[{key}]")


def load_images(paths: list[str | Path], size: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Images from PNG/JPEG files (resized to ``size`` × ``size`` with Pillow) and ``.npz``/``.npy``
    arrays (used as they are). Returns ``(x uint8 NHWC, one label per image)``."""
    xs, labels = [], []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
        suffix = p.suffix.lower()
        if suffix == ".npz":
            a = _load_npz(p)
            xs.append(a)
            labels += [f"{p}[{i}]" for i in range(len(a))] if len(a) > 1 else [str(p)]
        elif suffix == ".npy":
            a = _as_rgb_batch(np.load(p, allow_pickle=False), str(p))
            xs.append(a)
            labels += [f"{p}[{i}]" for i in range(len(a))] if len(a) > 1 else [str(p)]
        else:
            try:
                from PIL import Image, UnidentifiedImageError
            except ImportError:
                raise ImportError("reading images needs Pillow: pip install pillow (or 'edgehmoe[edge]')") from None
            try:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    if size is not None and im.size != (size, size):
                        logger.info("%s: resizing %dx%d to %dx%d", p, im.size[0], im.size[1], size, size)
                        im = im.resize((size, size), Image.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.uint8)[None])
            except UnidentifiedImageError:
                raise UsageError(
                    f"{p} is not an image Pillow can read (suffix {suffix!r}); give PNG/JPEG files or .npz arrays"
                ) from None
            labels.append(str(p))
    if not xs:
        raise UsageError("no input images given")
    shapes = {a.shape[1:] for a in xs}
    if len(shapes) > 1:
        raise UsageError(f"input images have different sizes {sorted(shapes)}; the bundle needs one size")
    return np.concatenate(xs), labels


# ---------------------------------------------------------------------- evaluation
def evaluate_bundle(
    bundle: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    *,
    model: str = "hmoe",
    beam: int = 1,
    threshold: float | None = None,
    threads: int = 1,
    batch_size: int = 1024,
    class_names: list[str] | None = None,
) -> dict:
    """Metrics of a bundle's chain (``hmoe``) or flat model on uint8 images ``x`` with dataset
    class ids ``y``: the same dict as :func:`edgehmoe.model.inference.evaluate_models`.

    For a subset bundle, ``y`` are the original dataset class ids; examples of classes outside
    the bundle are left out and counted in ``excluded_examples``. ``class_names`` (the
    dataset's, in class-id order), when given, must match the bundle's classes.
    """
    from edgehmoe.core.evaluation import evaluate_decoded, resolve_model
    from edgehmoe.core.routing import check_decode
    from edgehmoe.edge.runtime import BundlePredictor, FlatPredictor

    # A bundle always holds the chain; a missing flat model is reported by FlatPredictor.
    model = resolve_model(model, source="bundle")
    check_decode(beam, threshold)
    pred_obj = (BundlePredictor(bundle, max_sessions=0, threads=threads) if model == "hmoe"
                else FlatPredictor(bundle, threads=threads))
    if class_names is not None:
        ids = pred_obj.class_ids.tolist()
        if max(ids) >= len(class_names) or [class_names[i] for i in ids] != pred_obj.class_names:
            raise UsageError(
                "the bundle's classes do not match the dataset's class names; evaluate on the dataset "
                "(and tree) the model was trained with"
            )
    y = np.asarray(y, dtype=np.int64)
    if len(y) != len(x):
        raise UsageError(f"{len(x)} images but {len(y)} labels")
    # Map dataset class ids to the bundle's class ids (identity for a full bundle).
    lookup = np.full(max(int(pred_obj.class_ids.max()), int(y.max()) if len(y) else 0) + 1, -1, dtype=np.int64)
    lookup[pred_obj.class_ids] = np.arange(len(pred_obj.class_ids))
    yb = lookup[y] if len(y) else y
    keep = yb >= 0
    excluded = int((~keep).sum())
    if excluded:
        logger.info("left out %d examples whose classes are not in the bundle", excluded)
        x, yb = x[keep], yb[keep]
    if model == "hmoe":
        # Fused graphs run the greedy descent; beam search leaves it, so it runs expert by expert.
        def probs(xb):
            return pred_obj.expert_probs(xb, fused=beam == 1)
    else:
        probs = pred_obj.predict_proba
    out = evaluate_decoded(pred_obj.tree, x, yb, model, probs, beam=beam, threshold=threshold, batch_size=batch_size)
    out["bundle"] = str(bundle)
    if excluded:
        out["excluded_examples"] = excluded
    return out


# ---------------------------------------------------------------------- commands
def _fused_kinds(text: str, off: bool) -> tuple[str, ...]:
    from edgehmoe.edge.manifest import FUSED_KINDS

    if off:
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in FUSED_KINDS]
    if bad:
        raise UsageError(f"--fused takes a comma-separated list of {', '.join(FUSED_KINDS)}; got {bad}")
    return kinds


def _calibration_images(args, model_dir: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """``--calibration-size`` images (class-balanced, seeded) of ``--calibration-data``'s
    training split, after checking that its classes are the model's."""
    from edgehmoe.core.checkpoint import read_model_dir
    from edgehmoe.data import load_dataset, parse_spec

    if not args.calibration_data:
        raise UsageError("--quantize int8 needs --calibration-data SPEC: training images of the model's dataset "
                         "(e.g. cifar100:PATH/train.npz)")
    if args.calibration_size < 1:
        raise UsageError(f"--calibration-size must be >= 1, got {args.calibration_size}")
    parse_spec(args.calibration_data)  # cheap checks before loading any image
    tree = read_model_dir(model_dir).hierarchy
    per_class = -(-args.calibration_size // tree.num_classes)
    ds = load_dataset(args.calibration_data, args.calibration_split, seed=args.seed, limit_per_class=per_class)
    if list(ds.class_names) != tree.class_names():
        raise UsageError(f"--calibration-data {args.calibration_data} does not have the model's classes; give "
                         "training images of the dataset the model was trained on")
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.permutation(len(ds.x))[: args.calibration_size])
    source = {"dataset": args.calibration_data, "split": args.calibration_split, "seed": args.seed}
    return ds.x[idx], ds.y[idx], source


def cmd_export(args) -> int:
    from edgehmoe.export.bundle import export_bundle

    src = args.model_dir or args.run
    if bool(args.model_dir) == bool(args.run):
        raise UsageError("give exactly one of --model-dir DIR or --run runs/NAME")
    if args.sign_key and not Path(args.sign_key).is_file():  # before the (slow) export
        raise UsageError(f"--sign-key {args.sign_key} does not exist; make a key pair with `edgehmoe bundle keygen`")
    fused = _fused_kinds(args.fused, args.no_fused)
    calibration, source = None, None
    if args.quantize:
        x_cal, y_cal, source = _calibration_images(args, src)
        calibration = (x_cal, y_cal)
    elif args.calibration_data:
        raise UsageError("--calibration-data is only used with --quantize int8")
    path = export_bundle(
        src, args.out, include_flat=not args.no_flat, opset=args.opset, check_parity=not args.no_parity,
        atol=args.atol, overwrite=args.overwrite, fused=fused, quantize=args.quantize, calibration=calibration,
        calibration_size=args.calibration_size, calibration_source=source, seed=args.seed,
    )
    if args.sign_key:
        from edgehmoe.edge.integrity import sign_manifest

        logger.info("signed %s", sign_manifest(Path(path).parent, args.sign_key))
    m = json.loads(Path(path).read_text())
    parity = m.get("parity", {})
    summary = {
        "bundle": str(Path(path).parent),
        "experts": len(m["experts"]),
        "flat": bool(m.get("flat")),
        "bytes": sum(e["bytes"] for e in m["experts"].values()) + (m["flat"]["bytes"] if m.get("flat") else 0),
        "parity_max_abs_diff": parity.get("worst"),
        "precision": m.get("precision", "float32"),
        "fused": sorted(((m.get("fused") or {}).get("graphs") or {})),
        "fused_bytes": sum(g["bytes"] for g in ((m.get("fused") or {}).get("graphs") or {}).values()),
    }
    if m.get("quantization"):
        nets = m["quantization"]["networks"]
        summary["int8_min_argmax_agreement"] = min(v["argmax_agreement"] for v in nets.values())
    print(json.dumps(summary) if args.json else
          f"wrote {summary['bundle']}: {summary['experts']} experts{' + flat' if summary['flat'] else ''}, "
          f"{summary['bytes']} bytes ({summary['precision']}"
          + (f"; fused {'+'.join(summary['fused'])} graphs {summary['fused_bytes']} bytes" if summary["fused"] else "")
          + f"); parity max |torch - onnxruntime| = {summary['parity_max_abs_diff']}"
          + (f"; int8 argmax agreement with float32 >= {summary['int8_min_argmax_agreement']:.3f}"
             if "int8_min_argmax_agreement" in summary else ""))
    return 0


def cmd_predict(args) -> int:
    from edgehmoe.core.routing import check_decode
    from edgehmoe.edge.runtime import BundlePredictor, FlatPredictor

    check_decode(args.beam, args.threshold)  # before opening the bundle or reading any image
    _use_verify_key(args)
    if args.model == "flat":
        pred = FlatPredictor(args.bundle, threads=args.threads)
    else:
        pred = BundlePredictor(args.bundle, max_sessions=args.max_sessions, threads=args.threads, fused=args.fused)
    x, labels = load_images(args.inputs, pred.input_size)
    results = []
    for i in range(0, len(x), args.batch_size):
        xb = x[i : i + args.batch_size]
        if args.model == "flat":
            nodes, probs = pred.predict(xb, threshold=args.threshold)
            for n, p in zip(nodes.tolist(), probs.tolist()):
                d = pred.describe_node(n)
                d["probability"] = p
                d["path"] = [{"node": a, "name": pred.tree.names[a]} for a in pred.tree.path(n)]
                results.append(d)
        else:
            results += pred.explain(xb, beam=args.beam, threshold=args.threshold)
    for label, r in zip(labels, results):
        r["input"] = label
        if r.get("class_id") is not None and "class_name" not in r:
            r["class_name"] = pred.class_names[int(pred.tree.leaf_class[r["node"]])]
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            kind = f"class {r['class_id']}" if r["class_id"] is not None else "internal node"
            path = " > ".join(
                f"{s['name']} ({s['probability']:.2f})" if "probability" in s else s["name"] for s in r["path"]
            )
            print(f"{r['input']}: {r['name']} [{kind}] p={r['probability']:.3f}  path: {path}")
    return 0


def cmd_bundle_subset(args) -> int:
    from edgehmoe.export.bundle import bundle_summary, subset_bundle

    path = subset_bundle(args.bundle, args.keep, args.out, overwrite=args.overwrite)
    s = bundle_summary(Path(path).parent)
    print(json.dumps(s) if args.json else
          f"wrote {s['bundle']}: root {s['root']!r}, {s['experts']} experts ({s['expert_bytes']} bytes), "
          f"{s['classes']} classes")
    return 0


def cmd_bundle_verify(args) -> int:
    from edgehmoe.edge.integrity import bundle_verify_key
    from edgehmoe.edge.manifest import verify_bundle

    key = bundle_verify_key(args.verify_key)
    m = verify_bundle(args.bundle, verify_key=key)
    n = len(m["experts"]) + (1 if m.get("flat") else 0)
    print(f"{args.bundle}: all {n} files match their sha256" + (f"; manifest signed by {key}" if key else ""))
    return 0


def cmd_bundle_keygen(args) -> int:
    from edgehmoe.edge.integrity import generate_keypair

    key, pub = generate_keypair(args.out)
    print(f"wrote {key} (private: keep it where bundles are exported, sign with `edgehmoe export --sign-key "
          f"{key}`) and {pub} (copy it to the devices: `edgehmoe predict --verify-key {pub.name}` or "
          "EDGEHMOE_BUNDLE_PUBKEY)")
    return 0


def add_verify_key_arg(parser) -> None:
    """``--verify-key PUB`` (for every command that loads a bundle)."""
    parser.add_argument("--verify-key", metavar="PUB", default=None,
                        help="public key (edgehmoe bundle keygen); the bundle's manifest must be signed by it "
                             "(default: $EDGEHMOE_BUNDLE_PUBKEY, else no signature check)")


def _use_verify_key(args) -> None:
    """Make ``--verify-key`` the key every bundle load of this process verifies against
    (:func:`edgehmoe.edge.integrity.bundle_verify_key` reads the environment variable)."""
    from edgehmoe.edge.integrity import BUNDLE_PUBKEY_ENV

    key = getattr(args, "verify_key", None)
    if key:
        if not Path(key).is_file():
            raise UsageError(f"--verify-key {key} does not exist; copy the public key made by `edgehmoe bundle keygen`")
        os.environ[BUNDLE_PUBKEY_ENV] = str(key)


def cmd_bundle_show(args) -> int:
    from edgehmoe.core.hierarchy import Hierarchy
    from edgehmoe.edge.manifest import read_manifest

    m = read_manifest(args.bundle)
    tree = Hierarchy.from_dict(m["hierarchy"])
    if args.json:
        print(json.dumps(m))
        return 0
    print(tree.describe(args.max_lines))
    print(json.dumps({
        "experts": len(m["experts"]),
        "expert_bytes": sum(e["bytes"] for e in m["experts"].values()),
        "flat_bytes": m["flat"]["bytes"] if m.get("flat") else None,
        "input": m["input"]["image_shape"],
        "classes": tree.num_classes,
        **({"subset_of": m["source"]["subset_of"], "keep": m["source"]["keep"]} if "subset_of" in m.get("source", {}) else {}),
    }))
    return 0


def _check_before_loading_data(args, *, bundle: str | None = None, model_dir: str | None = None) -> None:
    """Cheap checks first: a bad dataset spec or a missing or unreadable model must not wait
    for the data to be loaded (or generated)."""
    from edgehmoe.data import parse_spec

    parse_spec(args.dataset)
    if bundle is not None:
        from edgehmoe.edge.integrity import bundle_verify_key
        from edgehmoe.edge.manifest import read_manifest

        _use_verify_key(args)
        read_manifest(bundle, verify_key=bundle_verify_key())
    if model_dir is not None:
        from edgehmoe.core.checkpoint import read_model_dir

        read_model_dir(model_dir)


def cmd_extend(args) -> int:
    import torch

    from edgehmoe.model.extend import extend_model
    from edgehmoe.model.training import TrainConfig

    torch.set_num_threads(args.threads)
    _check_before_loading_data(args, model_dir=args.model_dir)
    ds = load_data(args)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="onecycle", seed=args.seed)
    report = extend_model(
        args.model_dir, ds.hierarchy, ds.x, ds.y, args.out, cfg, overwrite=args.force,
        retrain_ancestors=args.retrain_ancestors, width=args.expert_width, dataset=args.dataset,
    )
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


def cmd_evaluate(args) -> int:
    """Standalone ``evaluate --bundle`` (the main CLI has its own ``evaluate``)."""
    _check_before_loading_data(args, bundle=args.bundle)
    ds = load_data(args)
    m = evaluate_bundle(args.bundle, ds.x, ds.y, model=args.model, beam=args.beam, threshold=args.threshold,
                        threads=args.threads, class_names=list(ds.class_names))
    m.update(dataset=args.dataset, split=args.split)
    print(json.dumps(m) if args.json else json.dumps(m, indent=1))
    return 0


# ---------------------------------------------------------------------- parser
def register(subparsers) -> None:
    """Add ``export``, ``predict``, ``bundle`` and ``extend`` to an argparse subparsers object."""
    e = subparsers.add_parser("export", help="export a model directory to an ONNX bundle (checks parity)")
    e.add_argument("--model-dir", metavar="DIR", help="model directory (edgehmoe fit --out DIR)")
    e.add_argument("--run", metavar="runs/NAME", help="federated run directory (same layout as a model directory)")
    e.add_argument("--out", required=True, metavar="BUNDLE")
    e.add_argument("--no-flat", action="store_true", help="leave the flat baseline out")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--atol", type=float, default=1e-4, help="parity tolerance on logits (max abs, default 1e-4)")
    e.add_argument("--sign-key", metavar="KEY", default=None,
                   help="sign the manifest with this Ed25519 private key (edgehmoe bundle keygen): writes manifest.sig")
    e.add_argument("--no-parity", action="store_true", help="skip the torch vs onnxruntime parity check")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    e.add_argument("--fused", default="", metavar="KINDS",
                   help="fused graphs to add: path (one image), tree (a batch), e.g. path,tree (default: none)")
    e.add_argument("--no-fused", action="store_true", help="no fused graphs (the default; overrides --fused)")
    e.add_argument("--quantize", choices=["int8"], default=None,
                   help="static int8 quantization of every network (needs --calibration-data)")
    e.add_argument("--calibration-data", metavar="SPEC", help="training images to calibrate int8 on (a dataset spec)")
    e.add_argument("--calibration-size", type=int, default=1000, metavar="N",
                   help="calibration images (class-balanced sample; default 1000)")
    e.add_argument("--calibration-split", default="train", choices=["train", "val", "all"],
                   help="split of --calibration-data (default train: not the held-out val)")
    e.add_argument("--seed", type=int, default=0, help="seed of the calibration sample and of the checks")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)

    p = subparsers.add_parser("predict", help="predict with an ONNX bundle (onnxruntime only, no torch)")
    p.add_argument("--bundle", required=True, metavar="BUNDLE")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_NPZ",
                   help="PNG/JPEG files (resized to the bundle's input size) or .npz/.npy uint8 arrays")
    p.add_argument("--beam", type=int, default=1, help="beam width (default 1 = greedy)")
    p.add_argument("--threshold", type=float, default=None, metavar="TAU",
                   help="stop at an internal node when the path probability falls below TAU")
    p.add_argument("--model", choices=["hmoe", "flat"], default="hmoe")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--max-sessions", type=int, default=32, help="experts kept loaded at once (default 32; 0 = all)")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                   help="use the bundle's fused graphs (auto: when it has up-to-date ones; off: one session per expert)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true")
    add_verify_key_arg(p)
    p.set_defaults(func=cmd_predict)

    b = subparsers.add_parser("bundle", help="inspect, verify or cut down an ONNX bundle")
    bs = b.add_subparsers(dest="bcommand", required=True, metavar="ACTION")
    s = bs.add_parser("subset", help="keep only the sub-trees a device needs (no retraining)")
    s.add_argument("--bundle", required=True, metavar="BUNDLE")
    s.add_argument("--keep", required=True, nargs="+", metavar="NODE", help="node names (or indices) to keep")
    s.add_argument("--out", required=True, metavar="BUNDLE2")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bundle_subset)
    v = bs.add_parser("verify", help="check every file against its sha256 in the manifest")
    v.add_argument("--bundle", required=True, metavar="BUNDLE")
    add_verify_key_arg(v)
    kg = bs.add_parser("keygen", help="make an Ed25519 key pair to sign bundles (export --sign-key)")
    kg.add_argument("--out", required=True, metavar="DIR", help="folder for bundle-signing.key and .pub")
    kg.set_defaults(func=cmd_bundle_keygen)
    v.set_defaults(func=cmd_bundle_verify)
    sh = bs.add_parser("show", help="print the bundle's tree and sizes")
    sh.add_argument("--bundle", required=True, metavar="BUNDLE")
    sh.add_argument("--max-lines", type=int, default=60)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_bundle_show)

    x = subparsers.add_parser("extend", help="add classes or sub-trees; trains only the affected experts")
    x.add_argument("--model-dir", required=True, metavar="OLD")
    x.add_argument("--hierarchy", required=True, metavar="NEW.csv",
                   help="parent,child edge list of the new tree; its leaves are the dataset's class names")
    add_dataset_args(x, "train", hierarchy=False)
    x.add_argument("--out", required=True, metavar="NEW")
    x.add_argument("--epochs", type=float, default=10)
    x.add_argument("--batch-size", type=int, default=64)
    x.add_argument("--lr", type=float, default=0.05)
    x.add_argument("--expert-width", type=int, default=None, help="width of new experts (default: the width rule)")
    x.add_argument("--retrain-ancestors", action="store_true",
                   help="also retrain the ancestors of changed nodes (they never saw the new classes)")
    x.add_argument("--threads", type=int, default=2)
    x.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_extend)


def get_args_parser() -> argparse.ArgumentParser:
    """Standalone parser (``python -m edgehmoe.cli.bundle``): the bundle commands plus
    ``evaluate --bundle``."""
    parser = argparse.ArgumentParser(prog="edgehmoe-bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_debug_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    ev = sub.add_parser("evaluate", help="metrics of a bundle on a dataset")
    ev.add_argument("--bundle", required=True, metavar="BUNDLE")
    add_dataset_args(ev, "test")
    ev.add_argument("--model", choices=["hmoe", "flat"], default="hmoe")
    ev.add_argument("--beam", type=int, default=1)
    ev.add_argument("--threshold", type=float, default=None)
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--json", action="store_true")
    add_verify_key_arg(ev)
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(0 if args.verbose else -1, fmt="%(levelname)s %(name)s: %(message)s")
    return run_main("edgehmoe", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
