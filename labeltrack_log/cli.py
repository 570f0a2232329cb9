"""The ``labeltrack-log`` command: ``render`` figures from a file sink's output, ``replay`` an MLflow spool."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

__all__ = ["main"]


def _render(args: argparse.Namespace) -> int:
    from .figures import render_files

    written = render_files(args.path, args.output, bound=args.bound, name=args.name, mode=args.mode)
    for path in written:
        print(path)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .sinks.mlflow import replay_spool

    delivered = replay_spool(args.spool, tracking_uri=args.tracking_uri)
    print(f"replayed {delivered} batch(es) from {args.spool}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``labeltrack-log`` command."""
    parser = argparse.ArgumentParser(prog="labeltrack-log", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="re-render band figures from a CSV or JSONL sink file")
    render.add_argument("path", help="file written by CSVSink or JSONLSink")
    render.add_argument("-o", "--output", required=True, help="directory for the PNG files")
    render.add_argument("--bound", choices=["std", "range", "quantile", "ci"], default="std")
    render.add_argument("--name", default=None, help="tracked name (default: every name in the file)")
    render.add_argument("--mode", default=None, help="mode (default: every mode in the file)")
    render.set_defaults(func=_render)

    replay = sub.add_parser("replay", help="deliver the batches an MLflowSink spooled while its server was down")
    replay.add_argument("spool", help="spool file named in the MLflowSink warning")
    replay.add_argument("--tracking-uri", default=None, help="override the tracking URI recorded in the spool")
    replay.set_defaults(func=_replay)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, ModuleNotFoundError) as err:
        print(f"labeltrack-log {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
