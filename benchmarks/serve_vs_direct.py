"""Side by side (b): through Ray Serve (proxy → ingress → TGIServer) vs straight to the engine.

One `serve run serve_config.yaml` (the user's app, as a subprocess; --model-id and --num-gpus
serve another model, or on a GPU, from a copy of it); both sides hit the same
engine process: through http://127.0.0.1:8000 (or, with --direct-ingress, the ingress
replica's own port: no proxy hop), or directly on the port its TGIServer replica started it
on. Blocks of requests alternate between the sides (at concurrency 1, --c1-block requests:
one by default), so drift (thermal, caches, neighbours) falls on both. Two measurements:
  - TTFT p50 added by Serve at concurrency 1 (short prompts and outputs);
  - output tok/s kept through Serve at concurrency 32.
Writes results/serve_vs_direct_c1.json and _c32.json (+ .png).

    python -m benchmarks.serve_vs_direct
"""

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import yaml

from benchmarks.common import RESULTS_DIR, write_report
from benchmarks.host_latency import cpu_wakeup_latency_held
from benchmarks.loadgen import Target, load_tokenizer, run_load
from benchmarks.workload import BenchRequest, LengthDist, make_requests
from engine.weights import DEFAULT_MODEL_ID

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_URL = "http://127.0.0.1:8000"


def app_config(args: argparse.Namespace, out_dir: Path) -> Path:
    """serve_config.yaml, or a copy of it in out_dir with the model, GPUs, launcher args
    and other settings of the command line."""
    default = REPO_ROOT / "serve_config.yaml"
    if not (args.model_id or args.num_gpus or args.launcher_arg or args.set):
        return default
    config = yaml.safe_load(default.read_text())
    app_args = config["applications"][0]["args"]
    model = app_args["models"][0]
    model["model_id"] = args.model_id or model["model_id"]
    model["resources"]["num_gpus"] = args.num_gpus
    for name_value in args.launcher_arg:
        set_dotted(model["launcher_args"], *name_value.split("=", 1))
    for path_value in args.set:
        set_dotted(app_args, *path_value.split("=", 1))
    path = out_dir / "serve_vs_direct_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def set_dotted(config: dict, path: str, value: str) -> None:
    """config[a][b]... = value (YAML), for path "a.b..."; list indices are numbers."""
    *parents, last = path.split(".")
    for key in parents:
        config = config[int(key)] if isinstance(config, list) else config.setdefault(key, {})
    config[last] = yaml.safe_load(value)


def add_app_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `app_config`."""
    p.add_argument("--model-id", help="serve this model instead of serve_config.yaml's")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs for the replica (default 0)")
    p.add_argument("--launcher-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="set one of the model's launcher_args (repeatable)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="set any of the app's args by dotted path, e.g. ingress.num_replicas=2 "
                   "or models.0.deployment.stream_messages_per_s=0 (repeatable)")  # fmt: skip
    p.add_argument("--direct-ingress", action="store_true",
                   help="run Serve with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and send the Serve "
                   "side to the ingress replica's own port: no proxy hop")  # fmt: skip
    p.add_argument("--cpu-wakeup-latency-us", type=int, metavar="US",
                   help="hold the host's CPU wake-up latency at US or less while the app "
                   "runs (/dev/cpu_dma_latency; root): benchmarks/host_latency.py")  # fmt: skip


@contextmanager
def running_app(args: argparse.Namespace) -> Iterator[subprocess.Popen]:
    """`serve run` of `app_config(args)` (direct ingress or not), with the host's CPU
    wake-up latency held as asked while it runs; stopped (SIGINT, as a user would) on exit."""
    with (
        cpu_wakeup_latency_held(args.cpu_wakeup_latency_us),
        tempfile.TemporaryDirectory() as config_dir,  # not beside the reports
    ):
        serve_run = start_serve_run(app_config(args, Path(config_dir)), args.direct_ingress)
        try:
            yield serve_run
        finally:
            serve_run.send_signal(signal.SIGINT)
            try:
                serve_run.wait(timeout=120)
            except subprocess.TimeoutExpired:
                serve_run.kill()


def start_serve_run(config: Path, direct_ingress: bool = False) -> subprocess.Popen:
    # `python -m` rather than the `serve` script: wherever Ray is importable, this runs.
    env = {**os.environ, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"} if direct_ingress else None
    return subprocess.Popen(
        [sys.executable, "-m", "ray.serve.scripts", "run", str(config)], cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env,
    )  # fmt: skip


def serve_url(serve_run: subprocess.Popen, direct_ingress: bool) -> str:
    """Where the Serve side's requests go: the proxy, or with direct ingress the port the
    ingress replica serves HTTP on itself (the one of its listening ports that answers)."""
    if not direct_ingress:
        return SERVE_URL
    for proc in psutil.Process(serve_run.pid).children(recursive=True):
        if "ServeReplica:ray-tgi:Ingress" not in " ".join(proc.cmdline()):
            continue
        for conn in proc.net_connections(kind="tcp"):
            if conn.status != psutil.CONN_LISTEN:
                continue
            url = f"http://127.0.0.1:{conn.laddr.port}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                continue
    raise RuntimeError("no ingress replica serves HTTP itself: is direct ingress on?")


def wait_for_engine(serve_run: subprocess.Popen, timeout_s: float = 300) -> str:
    """Wait until the app answers; return the engine's direct URL (from its --port flag)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serve_run.poll() is not None:
            raise RuntimeError(f"serve run exited with {serve_run.returncode}")
        try:
            if httpx.get(f"{SERVE_URL}/health", timeout=5).status_code == 200:
                for proc in psutil.Process(serve_run.pid).children(recursive=True):
                    cmdline = " ".join(proc.cmdline())
                    if " -m engine " in cmdline:
                        port = re.search(r"--port (\d+)", cmdline).group(1)
                        return f"http://127.0.0.1:{port}"
        except (httpx.HTTPError, psutil.Error):
            pass
        time.sleep(1)
    raise TimeoutError("the app did not get healthy")


def tagged(requests: list[BenchRequest], tag: str) -> list[BenchRequest]:
    """The requests with `tag` and their index in front of each prompt: the engine's prefix
    cache would otherwise hand the side that runs second the KV of the first side's prompts."""
    return [replace(r, prompt=f"{tag}{i}: {r.prompt}") for i, r in enumerate(requests)]


def alternate(targets: dict, requests, concurrency: int, num_rounds: int, tag: str) -> dict:
    """Each round sends one block of requests to each side in turn; merge per side. Each
    side's prompts carry their own tag (see `tagged`), so no prompt reaches the engine twice."""
    sides = {name: ([], 0.0) for name in targets}
    own = {name: tagged(requests, f"{tag}{name[0]}") for name in targets}
    block = len(requests) // num_rounds
    for r in range(num_rounds):
        for name, target in targets.items():
            chunk = own[name][r * block : (r + 1) * block]
            results, wall = asyncio.run(run_load(target, chunk, concurrency, progress=False))
            offset = sides[name][1]  # one clock per side: blocks laid end to end
            for result in results:
                result.start += offset
                result.token_times = [t + offset for t in result.token_times]
                result.end += offset
            sides[name] = (sides[name][0] + results, sides[name][1] + wall)
    return sides


def paired_ttft_added_ms(sides: dict) -> dict[str, float]:
    """Percentiles of serve's TTFT minus direct's for the same request index: at
    concurrency 1 the two of a pair have prompts of one length, sent back to back, so
    their difference is Serve's cost without the spread of prompt lengths and drift."""
    pairs = zip(sides["direct"][0], sides["serve"][0], strict=True)
    added = sorted(
        (s.token_times[0] - s.start - (d.token_times[0] - d.start)) * 1000
        for d, s in pairs
        if d.token_times and s.token_times
    )
    return {f"p{q}": round(added[min(len(added) - 1, len(added) * q // 100)], 2)
            for q in (10, 50, 90)}  # fmt: skip


def serve_costs(summaries: dict) -> dict[str, float]:
    serve, direct = summaries["serve"], summaries["direct"]
    return {
        "ttft_p50_added_ms": serve["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"],
        "output_tok_s_kept": serve["output_tok_s"] / direct["output_tok_s"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests-c1", type=int, default=64)
    p.add_argument("--num-requests-c32", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="turns of each side at 32 streams")
    p.add_argument("--c1-block", type=int, default=1, metavar="N",
                   help="at concurrency 1, requests per side per turn (default 1: the sides "
                   "take turns request by request)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    add_app_arguments(p)
    p.add_argument("--concurrency", type=int, nargs="+", choices=(1, 32), default=[1, 32])
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    # `alternate` splits a side's requests into equal turns: a remainder would go unsent.
    if args.c1_block < 1 or args.num_requests_c1 % args.c1_block:
        p.error("--c1-block must divide --num-requests-c1")
    if args.rounds < 1 or args.num_requests_c32 % args.rounds:
        p.error("--rounds must divide --num-requests-c32")
    command = "python -m benchmarks.serve_vs_direct " + " ".join(argv or sys.argv[1:])

    tokenizer = load_tokenizer(args.model_id or DEFAULT_MODEL_ID)
    with running_app(args) as serve_run:
        direct_url = wait_for_engine(serve_run)
        targets = {"direct": Target(direct_url, "tgi"),
                   "serve": Target(serve_url(serve_run, args.direct_ingress), "tgi")}  # fmt: skip
        for concurrency, num_requests, input_len, output_len in (
            (1, args.num_requests_c1, "uniform:32:128", "fixed:16"),
            (32, args.num_requests_c32, "chat:96:512", "fixed:64"),
        ):
            if concurrency not in args.concurrency:
                continue
            requests = make_requests(tokenizer, num_requests, LengthDist.parse(input_len),
                                     LengthDist.parse(output_len), args.seed)  # fmt: skip
            alternate(targets, requests[:8], concurrency, 1, "w")  # warm-up, not reported
            # One at a time, the sides take turns in short blocks: pairs a few hundred ms
            # apart see the same machine, where long blocks drift apart on a noisy one.
            # Turns of one request leave Serve's processes idle through the other side's
            # request before each of theirs; a client at concurrency 1 sends its next
            # request as soon as its last one ends (--c1-block).
            rounds = num_requests // args.c1_block if concurrency == 1 else args.rounds
            sides = alternate(targets, requests, concurrency, rounds, f"c{concurrency}")
            workload = {"concurrency": concurrency, "num_requests": num_requests,
                        "input_len": input_len, "output_len": output_len, "seed": args.seed,
                        "rounds": rounds, "model_id": args.model_id or DEFAULT_MODEL_ID,
                        "num_gpus": args.num_gpus,
                        "launcher_args": args.launcher_arg, "set": args.set,
                        "direct_ingress": args.direct_ingress,
                        "cpu_wakeup_latency_us": args.cpu_wakeup_latency_us}  # fmt: skip
            extra = {"workload": workload}
            if concurrency == 1:
                extra["ttft_added_ms_paired"] = paired_ttft_added_ms(sides)
            write_report(
                f"serve_vs_direct_c{concurrency}", command, sides, extra,
                ratios=serve_costs, results_dir=args.results_dir,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
