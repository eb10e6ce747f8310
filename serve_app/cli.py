"""`ray-tgi` command line: download weights, run the app."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def download(args: argparse.Namespace) -> int:
    """Fetch (and convert, for GGUF sources) a model into the local cache, like TGI's
    `download-weights`. The engine does the work in its own process: this package stays
    free of torch."""
    command = [sys.executable, "-m", "engine", "download-weights", args.model_id]
    if args.revision:
        command.append(args.revision)
    return subprocess.run(command).returncode


def serve(args: argparse.Namespace) -> int:
    serve_bin = Path(sys.executable).with_name("serve")
    os.execv(serve_bin, [str(serve_bin), "run", args.config])


def bench(argv: list[str]) -> int:
    from benchmarks.loadgen import main as loadgen_main  # the client side only: no torch

    return loadgen_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # all its flags belong to the load generator's own parser
        return bench(argv[1:])

    parser = argparse.ArgumentParser(prog="ray-tgi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("download", help="download/convert a model's weights")
    p.add_argument("model_id", nargs="?", default=DEFAULT_MODEL_ID,
                   help="Hub id, local directory or .gguf file")  # fmt: skip
    p.add_argument("--revision", default=None)
    p.set_defaults(run=download)

    p = commands.add_parser("serve", help="run the app (serve run CONFIG)")
    p.add_argument("config", nargs="?", default="serve_config.yaml")
    p.set_defaults(run=serve)

    commands.add_parser("bench", help="load generator: ray-tgi bench --help")

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
