"""The `headstart` command: one subcommand per stage, called by `dvc.yaml`, plus a few tools.

Every stage subcommand loads `params.yaml` through the same validated models the Prefect flow
uses and calls the stage module's `run(params, layout)`; there is no other implementation.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.layout import Layout
from tasks.params import STAGES, ParamsError, load_params


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, YAML-typed value), as `--set` takes it (also used by the bench scripts)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (e.g. train_head.epochs=5), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
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

    commands.add_parser("backbones", help="list the backbones and their defaults")
    inspect = commands.add_parser("inspect", help="print a backbone's layers and fine-tuning cut points")
    inspect.add_argument("--backbone", required=True)
    inspect.add_argument("--weights", default="none", help="weights to load (default: none, shape only)")
    inspect.add_argument("--image-size", type=int, default=None)

    predict = commands.add_parser("predict", help="classify images, folders or URLs with an exported model")
    predict.add_argument("inputs", nargs="+", metavar="PATH|DIR|URL")
    predict.add_argument("--model", default="models/export/model.keras", help="any exported format")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")
    predict.add_argument("--max-bytes", type=int, default=20 * 2**20, help="largest URL download (default: 20 MiB)")
    predict.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per URL (default: 30)")
    return parser


def _run_stage(stage: str, args: argparse.Namespace) -> None:
    params = load_params(args.params, dict(args.overrides))
    module = importlib.import_module(f"tasks.{stage}")
    module.run(params, Layout(Path(args.root)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command in STAGES:
            _run_stage(args.command, args)
            return 0
        if args.command == "backbones":
            from tasks.backbones import describe_registry

            print(describe_registry())
            return 0
        if args.command == "inspect":
            from tasks.backbones import inspect_backbone

            print(inspect_backbone(args.backbone, weights=args.weights, image_size=args.image_size))
            return 0
        if args.command == "predict":
            from tasks.predict import main as predict_main

            return predict_main(args)
    except (ParamsError, FileNotFoundError, ValueError) as exc:
        print(f"headstart {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
