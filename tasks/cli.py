"""The `headstart` command: one subcommand per stage, called by `dvc.yaml`, plus a few tools.

Every stage subcommand loads `params.yaml` through the same validated models the Prefect flow
uses and calls the stage module's `run(params, layout)`; there is no other implementation.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import yaml

from headstart.layout import Layout
from headstart.params import SOURCE_STAGE, STAGES, TOOLS, ParamsError, load_params


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


MAX_TIMEOUT_S = 86_400.0


def seconds(text: str) -> float:
    """A positive, finite number of seconds up to a day (`inf` would overflow the transfer's deadline)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most {MAX_TIMEOUT_S:g}, got {text!r}")
    return value


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
    _common(commands.add_parser(SOURCE_STAGE, help="record the source's fingerprint (download depends on it)"))
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
    predict.add_argument("--model", default="champion",
                         help="champion (default: models/champion, the promoted model), a registry version (v3, "
                              "headstart-classifier@v3), or the path of any exported format")
    predict.add_argument("--root", default=".", help="project root holding models/ (default: .)")
    predict.add_argument("--runtime", choices=("auto", "tensorflow", "openvino", "onnxruntime"), default="auto",
                         help="runs a .keras/SavedModel export: openvino/onnxruntime use the export folder's "
                         "model.xml/model.onnx; auto: model.xml where OpenVINO is installed, else TensorFlow")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")
    predict.add_argument("--max-bytes", type=int, default=20 * 2**20, help="largest URL download (default: 20 MiB)")
    predict.add_argument("--timeout", type=seconds, default=30.0, help="seconds allowed per URL (default: 30)")
    predict.add_argument("--explain", metavar="DIR", default=None,
                         help="write a Grad-CAM overlay PNG per image into DIR (needs the .keras model)")
    predict.add_argument("--explain-layer", metavar="LAYER", default=None,
                         help="backbone layer to explain (default: the last conv block)")

    registry = commands.add_parser("registry", help="list the promoted model versions, or roll back to one")
    actions = registry.add_subparsers(dest="action", required=True)
    for action, text in (("list", "every version, the champion marked *"),
                         ("rollback", "serve an earlier version again (moves the champion pointer)")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("--root", default=".", help="project root holding models/ (default: .)")
        if action == "rollback":
            sub.add_argument("version", help="v2, headstart-classifier@v2 or headstart-classifier@v2.0.0")
            sub.add_argument("--reason", default="", help="recorded in models/registry/registry.json")
    return parser


def _registry(args: argparse.Namespace) -> int:
    from headstart.registry import describe, rollback

    layout = Layout(Path(args.root))
    if args.action == "rollback":
        version = rollback(layout, args.version, args.reason)
        print(f"headstart registry: {version} is the champion, served from {layout.champion_dir}. Record it with "
              "`dvc commit promote` and a git commit.")
    print(describe(layout))
    return 0


# printed by TensorFlow's C++ on import whatever TF_CPP_MIN_LOG_LEVEL says (they come before absl's logging
# is initialised); they read as trouble and say nothing a user acts on
TF_IMPORT_BANNERS = ("All log messages before absl::InitializeLog() is called are written to STDERR",
                     "oneDNN custom operations are on")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ stderr captured, passing on every line except TF_IMPORT_BANNERS."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(b in line for b in TF_IMPORT_BANNERS)))


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
    if not args.verbose and args.command not in ("backbones", "predict", "registry"):  # these may run without TF
        import_tensorflow_quietly()
    try:
        if args.command in (SOURCE_STAGE, *STAGES, *TOOLS):
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
        if args.command == "registry":
            return _registry(args)
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
