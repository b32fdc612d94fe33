"""The `headstart` command: one subcommand per stage, called by `dvc.yaml`, plus a few tools.

Every stage subcommand loads `params.yaml` through the same validated models the Prefect flow
uses and calls the stage module's `run(params, layout)`; there is no other implementation.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from headstart.layout import Layout
from headstart.params import STAGES, TOOLS, ParamsError, load_params


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, YAML-typed value), as `--set` takes it (also used by the bench scripts)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (e.g. train_head.epochs=5), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        example = f"--set '{key.strip()}=\"...\"'"
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: the value is not valid YAML ({problem}); quote it, e.g. {example}"
        ) from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default=None, help="parameter file, which must exist (default: params.yaml, if present)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], type=parse_override, metavar="KEY=VALUE",
        help="override one parameter, e.g. --set finetune.epochs=1 (repeatable)",
    )
    parser.add_argument("--root", default=".", help="project root holding data/ and models/ (default: .)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headstart", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        _common(commands.add_parser(stage, help=f"run the {stage} stage"))
    _common(commands.add_parser("lr_find", help="learning-rate range test for finetune (plot + suggestion in reports/)"))

    commands.add_parser("backbones", help="list the backbones and their defaults")
    inspect = commands.add_parser("inspect", help="print a backbone's layers and fine-tuning cut points")
    inspect.add_argument("--backbone", required=True)
    inspect.add_argument("--weights", default="none", help="weights to load (default: none, shape only)")
    inspect.add_argument("--image-size", type=int, default=None)

    predict = commands.add_parser("predict", help="classify images, folders or URLs with an exported model")
    predict.add_argument("inputs", nargs="+", metavar="PATH|DIR|URL")
    predict.add_argument("--model", default="models/export/model.keras", help="any exported format")
    predict.add_argument("--runtime", choices=("auto", "tensorflow", "openvino", "onnxruntime"), default="auto",
                         help="runs a .keras/SavedModel export: openvino/onnxruntime use the export folder's "
                         "model.xml/model.onnx; auto: model.xml where OpenVINO is installed, else TensorFlow")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")
    predict.add_argument("--max-bytes", type=int, default=20 * 2**20, help="largest URL download (default: 20 MiB)")
    predict.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per URL (default: 30)")
    predict.add_argument("--explain", metavar="DIR", default=None,
                         help="write a Grad-CAM overlay PNG per image into DIR (needs the .keras model)")
    predict.add_argument("--explain-layer", metavar="LAYER", default=None,
                         help="backbone layer to explain (default: the last conv block)")
    return parser


def _run_stage(stage: str, args: argparse.Namespace) -> None:
    # only the default may be absent (all defaults): a named file that is missing is a typo, not a request
    if args.params is not None and not Path(args.params).is_file():
        raise ParamsError(f"--params {args.params}: no such file. Name an existing file, or leave --params "
                          "out to use params.yaml (all defaults where it is absent).")
    params = load_params(args.params or "params.yaml", dict(args.overrides))
    module = importlib.import_module(f"tasks.{stage}")
    module.run(params, Layout(Path(args.root)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command in STAGES + TOOLS:
            _run_stage(args.command, args)
            return 0
        if args.command == "backbones":
            from headstart.backbones.describe import describe_registry

            print(describe_registry())
            return 0
        if args.command == "inspect":
            from headstart.backbones.describe import inspect_backbone

            print(inspect_backbone(args.backbone, weights=args.weights, image_size=args.image_size))
            return 0
        if args.command == "predict":
            from headstart.predict import main as predict_main

            return predict_main(args)
    except (ParamsError, FileNotFoundError, ValueError) as exc:
        return _fail(args, str(exc))
    except OSError as exc:
        return _fail(args, _os_error_message(exc))
    except Exception as exc:  # noqa: BLE001 (a damaged input no check names: one line, details behind -v)
        summary = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
        return _fail(args, f"{type(exc).__name__}: {summary}. {_damaged_input_advice(args)}")
    return 1


def _fail(args: argparse.Namespace, message: str) -> int:
    """Print the one-line error; the traceback only with -v."""
    if args.verbose:
        traceback.print_exc()
    print(f"headstart {args.command}: error: {message}", file=sys.stderr)
    return 2


def _os_error_message(exc: OSError) -> str:
    """`file: reason. what to do` for the disk and permission errors a stage meets while writing."""
    where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name)
    reason = f"{where}: {exc.strerror}" if where and exc.strerror else str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{reason}. Free disk space (or raise the file size limit, `ulimit -f`) and rerun."
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{reason}. Make that folder writable for this user, or pass --root a writable project folder."
    return f"{reason}. Rerun with -v for the traceback."


def _damaged_input_advice(args: argparse.Namespace) -> str:
    if args.command == "predict":
        return (f"If {args.model} was edited or damaged, or not written by `headstart export`, export it "
                "again. Rerun with -v for the traceback.")
    return ("If a file this stage reads (e.g. a .keras model) was edited or damaged, `dvc repro` rebuilds it "
            "with the stage that writes it. Rerun with -v for the traceback.")


if __name__ == "__main__":
    sys.exit(main())
