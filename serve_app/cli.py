"""`ray-tgi` command line: download weights, run the app, chat with it, benchmark it."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import httpx

from serve_app.chat_client import DEFAULT_URL, ChatError, stream_chat

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


def chat(args: argparse.Namespace) -> int:
    """Print the answer to the terminal as it streams in."""
    pieces = stream_chat(
        args.url, args.prompt, args.model, args.max_tokens, args.temperature, args.api_key
    )
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:  # leaving the stream closes it: the server stops generating
        print(file=sys.stderr)
        return 130
    except ChatError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"\nerror: {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print()
    return 0


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

    p = commands.add_parser("chat", help="stream an answer from a running app")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the app's address (default {DEFAULT_URL})")
    p.add_argument("--model", default=None, help="a served model's name (default: the first)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens to generate (default: the rest of the context)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--api-key", default=None, help="bearer token, for apps run with api_key")
    p.set_defaults(run=chat)

    commands.add_parser("bench", help="load generator: ray-tgi bench --help")

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
