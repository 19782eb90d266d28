"""The `casebase` command line.

One parser per command, keyed by the names in DESIGN.md. Each command's work
lives in `retrieval.commands.<module>.run(args) -> int`, imported only when
that command runs, so `casebase --help` stays fast and one broken command
cannot break the others.

Errors meant for users (`CasebaseError`) print as one line and exit 2; any
other exception is reported as an internal error in one line (exit 1) with the
traceback only when CASEBASE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from retrieval.errors import CasebaseError


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_phantom(sub) -> None:
    p = sub.add_parser(
        "phantom", help="write a synthetic chest-radiograph-like data set (DICOM + masks)"
    )
    p.add_argument("out_dir")
    p.add_argument(
        "--n", type=int, default=None, help="number of cases (default 600; 300 with --dim 3)"
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels (default 128; with --dim 3 the in-plane side, default 64)",
    )
    p.add_argument(
        "--dim",
        type=int,
        choices=[2, 3],
        default=2,
        help="3: volumes (--modality ct: chest CT, the default; mr: head MR), see --depth, --format",
    )
    p.add_argument("--depth", type=int, default=32, help="--dim 3: slices per volume (default 32)")
    p.add_argument(
        "--format",
        default="npy",
        help="--dim 3: npy (default), nifti, dicom, a comma list or all; the first one is "
        "manifest.csv, the others manifest_<format>.csv",
    )
    p.add_argument(
        "--normals",
        action="store_true",
        help="--dim 3: add a class 'normal' of volumes without a lesion (about as many as "
        "each lesion class)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--confounder",
        choices=["none", "site-marker", "ruler", "scanner"],
        default="none",
        help="site-marker: burned-in site letter tied to the label in train/val; "
        "ruler (photo only): a ruler tied to one class in train/val; scanner: the "
        "acquisition device (x-ray scanner, photo device) tied to the label in train/val",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.9,
        help="P(confounder tied to the label) in the train and val splits",
    )
    p.add_argument(
        "--modality",
        choices=["xray", "photo", "ct", "mr"],
        default=None,
        help="xray (2-D default): grayscale DICOM chest films; photo: RGB dermoscopy-like PNGs; "
        "ct (3-D default): chest CT volumes; mr: head MR volumes",
    )
    p.add_argument(
        "--concept-images",
        choices=["marker", "ruler", "device", "control", "plain"],
        default=None,
        metavar="KIND",
        help="instead of a data set, write --n (default 60) example images of one concept for "
        "`casebase concepts --concept NAME=OUT_DIR`: marker (the site letter --site burned in), "
        "ruler (photo), device (all taken with --vendor), control (drawn like the data set "
        "made with the same --confounder / --strength), plain (the marker / ruler cases "
        "without it)",
    )
    p.add_argument("--site", default="A", help="--concept-images marker: the site letter")
    p.add_argument(
        "--vendor",
        default=None,
        help="--concept-images device: the device (photo) or scanner (x-ray) name",
    )
    p.set_defaults(_module="phantom")


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate", help="check a manifest; report every problem with row and column"
    )
    p.add_argument("manifest")
    p.add_argument("--json", action="store_true")
    p.set_defaults(_module="validate")


def _add_ingest_dicom(sub) -> None:
    p = sub.add_parser("ingest-dicom", help="walk a DICOM folder tree and write a manifest")
    p.add_argument("dicom_dir")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--label-from",
        default=None,
        help="required: where the label comes from: a DICOM keyword (e.g. SeriesDescription, "
        "BodyPartExamined), csv:PATH (columns file,label), or 'folder' (the parent folder's "
        "name; refused when a folder name looks like a patient's name, an MRN or a date)",
    )
    p.add_argument(
        "--strict", action="store_true", help="fail the run on the first unreadable file"
    )
    p.set_defaults(_module="ingest_dicom")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the embedding + classifier model on a manifest")
    p.add_argument("manifest")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--epochs", type=int, default=None, help="maximum epochs (default: sized to the data)"
    )
    p.add_argument(
        "--backbone",
        default="auto",
        help="auto (default: cnn3d when the manifest's images are volumes, else compact) | "
        "compact | resnet18 | cnn3d | slices (2.5D: the compact 2-D backbone on every slice, "
        "pooled over the slices by saliency)",
    )
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="cnn3d: slices of the network input (default: the volumes' median depth rounded "
        "down to a multiple of 8, at most 32); the in-plane side is --image-size (default: the "
        "median side rounded down to a multiple of 8, at most 64)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="network input side in pixels (default: 128, or the images' size if smaller)",
    )
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="compact backbone width (default 16; 32 = 4x compute)",
    )
    p.add_argument(
        "--loss",
        choices=["supcon", "multisimilarity", "triplet"],
        default=None,
        help="supervised metric loss (default supcon, with the two-view instance term)",
    )
    p.add_argument(
        "--instance-weight",
        type=float,
        default=None,
        help="weight of the two-view NT-Xent term (default 0.5; 0 = one view, no term)",
    )
    p.add_argument(
        "--peak-weight",
        type=float,
        default=None,
        help="weight of the training-only peak-pooled cross-entropy that teaches the backbone "
        "to find small lesions (default 1 for volumes, 0 for 2-D images; the model is unchanged)",
    )
    p.add_argument(
        "--peak-pool",
        choices=["features", "logits", "both"],
        default=None,
        help="what the peak term pools: each channel's top cells (features, the default), "
        "each class's top cells of its per-cell logit map (logits) or both (one term each)",
    )
    p.add_argument(
        "--extent-weight",
        type=float,
        default=None,
        help="weight of the lesion-extent code in the embedding, learnt from the manifest's "
        "lesion masks so that neighbours agree in lesion size (default 0.5 when at least half "
        "the training cases have a mask, 2-D images only; 0 = no extent head)",
    )
    p.add_argument(
        "--zero-init-residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start each residual block as the identity (its last batch norm's scale at 0); "
        "off by default. On 3-D CT phantoms Grad-CAM then found the lesion two to four times "
        "as often, but one run in six did not learn",
    )
    p.add_argument(
        "--aug-scale",
        type=float,
        default=None,
        help="zoom jitter of the augmented views, +- this fraction (default 0.1; 0 = none)",
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    p.set_defaults(_module="train")


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="build or inspect an index bundle")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed every case and write an index bundle")
    b.add_argument("model_dir")
    b.add_argument("manifest")
    b.add_argument("--out", required=True)
    b.add_argument("--weighting", choices=["saliency", "uniform"], default="saliency")
    b.add_argument("--factory", default="auto", help="auto | any FAISS index-factory string")
    b.add_argument(
        "--splits", default="train,val", help="splits the index holds (default train,val)"
    )
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--engine", choices=["local", "ray"], default="local")
    b.add_argument("--address", default=None, help="Ray cluster address (with --engine ray)")
    b.add_argument("--strict", action="store_true")
    b.add_argument(
        "--coverage",
        type=float,
        default=0.9,
        help="target coverage of the conformal prediction sets (default 0.9; a query can ask another)",
    )
    b.add_argument(
        "--conformal", choices=["aps", "raps"], default="aps", help="set score (default aps)"
    )
    b.add_argument(
        "--mondrian",
        default=None,
        metavar="ATTR",
        help="calibrate the sets per value of a manifest column (e.g. site): coverage per group",
    )
    b.set_defaults(_module="index_build")
    i = isub.add_parser("info", help="verify a bundle and print its summary")
    i.add_argument("index_dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(_module="index_info")


def _add_query(sub) -> None:
    p = sub.add_parser("query", help="find the labelled cases most like an image, and why")
    p.add_argument("index_dir")
    p.add_argument("image", help="path to an image file, or a dicomweb:// URL")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--explain", type=_csv_list, default=[], help="methods, e.g. gradcam,similarity")
    p.add_argument("--json", action="store_true")
    p.add_argument("--save-maps", default=None, metavar="DIR")
    p.add_argument(
        "--dicom-sr",
        default=None,
        metavar="OUT.dcm",
        help="DICOM query: write the answer as a DICOM Structured Report (and each --explain "
        "map as a Parametric Map beside it, OUT_map1.dcm, ...)",
    )
    p.add_argument(
        "--stow",
        default=None,
        metavar="URL",
        help="store the --dicom-sr objects over DICOMweb (STOW-RS) at this base URL "
        "(credentials from CASEBASE_DICOMWEB_TOKEN or CASEBASE_DICOMWEB_USERNAME/PASSWORD)",
    )
    p.add_argument("--exclude-patient", default=None)
    p.add_argument("--filter", action="append", default=[], metavar="ATTR=VALUE")
    p.add_argument(
        "--region",
        default=None,
        metavar="X0,Y0,X1,Y1",
        help="search with this box of the query image (original pixels): cases ranked by how "
        "well a region of theirs matches it",
    )
    p.add_argument(
        "--like",
        action="append",
        default=[],
        metavar="ID,...",
        help="case ids marked good: the search moves toward them (Rocchio)",
    )
    p.add_argument(
        "--unlike",
        action="append",
        default=[],
        metavar="ID,...",
        help="case ids marked bad: the search moves away, and they never come back",
    )
    p.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="NAME=WEIGHT",
        help="move the query along a stored concept (casebase concepts --store), e.g. ruler=-1",
    )
    p.add_argument(
        "--coverage",
        type=float,
        default=None,
        help="prediction-set coverage (default: the index's)",
    )
    p.add_argument(
        "--group",
        default=None,
        help="the query's value of the index's --mondrian attribute (e.g. its site)",
    )
    _add_reference_class(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(_module="query")


def _add_reference_class(p) -> None:
    p.add_argument(
        "--reference-class",
        default="auto",
        metavar="CLASS",
        help="explain each class as its score minus this (lesion-free) class's: auto (a class "
        "named normal / no finding / healthy, if any), a class name, or none",
    )


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="retrieval quality on a split (neighbours of the same patient excluded)"
    )
    p.add_argument("index_dir")
    p.add_argument("manifest")
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--coverage",
        type=float,
        default=None,
        help="prediction-set coverage (default: the index's)",
    )
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="write the reliability diagram to this PNG"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(_module="evaluate")


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit", help="is retrieval matching on the lesion or on site/scanner/patient?"
    )
    p.add_argument("index_dir")
    p.add_argument("manifest")
    p.add_argument("--split", default="test")
    p.add_argument("--attributes", type=_csv_list, default=None)
    p.add_argument("--out", default=None, metavar="REPORT.html")
    p.add_argument("--json", action="store_true")
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="artefact concept to test with TCAV (folder or COLUMN:VALUE; repeatable)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(_module="audit")


def _add_explain_eval(sub) -> None:
    p = sub.add_parser("explain-eval", help="measured trust of every explanation method")
    p.add_argument("index_dir")
    p.add_argument("manifest")
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true")
    p.add_argument("--methods", type=_csv_list, default=None)
    p.add_argument("--max-cases", type=int, default=40)
    p.add_argument(
        "--no-store", action="store_true", help="do not write the results into the bundle"
    )
    p.add_argument(
        "--sanity-cases", type=int, default=4, help="cases in the randomisation sanity check"
    )
    p.add_argument(
        "--sanity-seeds", type=int, default=3, help="re-initialisations per block (>= 1)"
    )
    p.add_argument(
        "--data-randomization",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also retrain on permuted labels for EPOCHS epochs (Adebayo et al.'s data test)",
    )
    p.add_argument(
        "--subclass",
        default=None,
        metavar="COLUMN",
        help="manifest column for the identical-subclass test of the neighbours (Hanawa et al.)",
    )
    _add_reference_class(p)
    p.add_argument("--plot", default=None, metavar="PNG", help="write the sanity curves here")
    p.set_defaults(_module="explain_eval")


def _add_ingest_dicomweb(sub) -> None:
    p = sub.add_parser("ingest-dicomweb", help="ingest instances from a DICOMweb server (PACS)")
    p.add_argument("url")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--study",
        action="append",
        default=[],
        metavar="UID",
        help="only this StudyInstanceUID (repeatable; default: every study)",
    )
    p.add_argument(
        "--label-from",
        default=None,
        help="a DICOM keyword (default StudyDescription) or csv:PATH with columns "
        "label and sop_instance_uid / series_instance_uid / study_instance_uid",
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="where retrieved instances are kept (default: dicomweb-cache/ beside --out)",
    )
    p.add_argument("--username", default=None)
    p.add_argument("--password-env", default=None, help="environment variable holding the password")
    p.add_argument("--token-env", default=None, help="environment variable holding a bearer token")
    p.add_argument("--strict", action="store_true")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)"
    )
    p.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    p.set_defaults(_module="ingest_dicomweb")


def _add_manifest(sub) -> None:
    p = sub.add_parser("manifest", help="convert a public data set's metadata into a manifest")
    msub = p.add_subparsers(dest="manifest_command", required=True)
    for name in (
        "from-ham10000",
        "from-isic",
        "from-chexpert",
        "from-nih-cxr14",
        "from-rsna-pneumonia",
    ):
        m = msub.add_parser(name)
        m.add_argument("metadata")
        m.add_argument("--images", required=True)
        m.add_argument("--out", required=True)
        m.add_argument("--seed", type=int, default=0)
        m.add_argument(
            "--extra",
            action="append",
            default=[],
            metavar="FILE",
            help="companion metadata (ISIC 2019 metadata CSV, RSNA detailed class info, "
            "NIH train_val_list.txt / test_list.txt); found beside METADATA when omitted",
        )
        m.add_argument("--val-fraction", type=float, default=0.15)
        m.add_argument("--test-fraction", type=float, default=0.15)
        m.add_argument(
            "--ignore-official-split",
            action="store_true",
            help="split every patient by seed even where the data set defines a test set",
        )
        m.add_argument(
            "--label-policy",
            choices=["single", "priority"],
            default="single",
            help="multi-label sources (CheXpert, NIH): single = keep images with exactly one "
            "finding (or none: 'No Finding'); priority = the first finding in a fixed order",
        )
        m.add_argument(
            "--uncertain",
            choices=["ignore", "positive", "negative"],
            default="ignore",
            help="CheXpert uncertain (-1) labels (U-Ignore / U-Ones / U-Zeros)",
        )
        m.add_argument(
            "--label-field",
            default=None,
            help="ISIC 2020: benign_malignant (default) | diagnosis; "
            "RSNA: class (default when the class file is found) | target",
        )
        m.add_argument(
            "--masks",
            default=None,
            metavar="DIR",
            help="RSNA: where box masks are written (default: masks/ beside --out)",
        )
        m.add_argument("--strict", action="store_true", help="fail when any image is missing")
        m.set_defaults(_module="manifest_convert", source=name[len("from-") :])


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="phantom → train → index → explain-eval → app, on an embedded default"
    )
    p.add_argument("--out", default="casebase-demo")
    p.add_argument("--no-app", action="store_true")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(_module="demo")


def _add_concepts(sub) -> None:
    p = sub.add_parser(
        "concepts", help="TCAV concept tests of the classifier and of retrieval similarity"
    )
    p.add_argument("index_dir")
    p.add_argument(
        "--concept",
        action="append",
        required=True,
        metavar="NAME=SPEC",
        help="SPEC: a folder of example images, or COLUMN:VALUE of the manifest (repeatable)",
    )
    p.add_argument(
        "--manifest",
        default=None,
        help="random counterexamples and class inputs "
        "come from its images (default: the index's cases)",
    )
    p.add_argument(
        "--layer",
        action="append",
        default=None,
        metavar="NAME",
        help="backbone block(s) to test, e.g. backbone.features.4 (default: several)",
    )
    p.add_argument("--random-runs", type=int, default=20)
    p.add_argument("--max-images", type=int, default=50, help="concept images per set (default 50)")
    p.add_argument("--per-class", type=int, default=50, help="class inputs per class (default 50)")
    p.add_argument(
        "--split",
        default=None,
        help="split of the class inputs (default: test when there is one, else all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--store",
        action="store_true",
        help="keep the concepts' directions in the bundle (for query --concept)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, metavar="REPORT.html")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(_module="concepts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casebase", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_phantom,
        _add_validate,
        _add_ingest_dicom,
        _add_train,
        _add_index,
        _add_query,
        _add_eval,
        _add_audit,
        _add_explain_eval,
        _add_ingest_dicomweb,
        _add_manifest,
        _add_demo,
        _add_concepts,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        module = importlib.import_module(f"retrieval.commands.{args._module}")
        return int(module.run(args) or 0)
    except CasebaseError as err:
        print(f"casebase {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"casebase {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("CASEBASE_DEBUG"):
            raise
        print(
            f"casebase {args.command}: internal error: {type(err).__name__}: {err} "
            "(set CASEBASE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
