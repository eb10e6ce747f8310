"""Side by side (c), CPU: the embedded engine vs llama.cpp's server on the same GGUF file.

llama-cpp-python's own server has no parallel slots (abetlen/llama-cpp-python#1329), so the
baseline is `llama-server`, llama.cpp's server, built with `--parallel N` slots and continuous
batching from the llama.cpp sources vendored in the llama-cpp-python sdist (LLAMA_CPP_PYTHON).
The setup step (`--setup-only` runs just it) downloads that sdist and builds the binary into
the ray-tgi cache once; it is not a project dependency.

Both servers get the same seeded raw-text prompts over OpenAI's /v1/completions (greedy,
streaming) at each concurrency, one after the other on the same cores. The engine runs the
GGUF de-quantized to fp32 unless launcher flags say otherwise (`--launcher-arg dtype=bfloat16`,
`--launcher-arg quantize=eetq`); llama.cpp runs it quantized (Q4_1).

    python -m benchmarks.vs_llamacpp --concurrency 1 8 16 [--launcher-arg NAME=VALUE ...]
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from pydantic import ValidationError

from benchmarks.common import RESULTS_DIR, engine_process, write_report
from benchmarks.loadgen import Target, load_tokenizer, run_load
from benchmarks.workload import LengthDist, make_requests
from deployments.launcher import free_port
from engine.weights import DEFAULT_MODEL_ID, PACKAGED_MODELS, cache_root, resolve_model_dir
from serve_app.config import LauncherArgs

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# Not GGML_NATIVE: on this CPU it turns on AMX, whose instructions the sandbox refuses
# (llama-server dies of SIGILL). AVX-512 with VNNI/BF16 is the fastest set that runs here.
CPU_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
             "-DGGML_F16C=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
             "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"]  # fmt: skip


def build_llama_server() -> Path:
    """llama.cpp's `llama-server`, built once from the llama-cpp-python sdist's sources."""
    root = cache_root() / "llama.cpp"
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    print(f"building llama-server from {LLAMA_CPP_PYTHON} (a few minutes)", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(root), LLAMA_CPP_PYTHON],
        check=True,
    )  # fmt: skip
    (sdist,) = root.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "src", filter="data")
    (source,) = (root / "src").glob("*/vendor/llama.cpp")
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(root / "build"), "-G", "Ninja",
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", *CPU_FLAGS,
         "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
        check=True,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-server"],
                   check=True)  # fmt: skip
    return binary


@contextmanager
def llama_server(binary: Path, gguf: Path, parallel: int, ctx_per_slot: int) -> Iterator[str]:
    port = free_port()
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot),
               "--threads", str(os.cpu_count()), "--cont-batching"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def launcher_flags(name_values: list[str]) -> list[str]:
    """The engine's flags for `--launcher-arg NAME=VALUE`s (VALUE in YAML), checked as the
    app's `launcher_args` are: `["dtype=bfloat16"]` -> `["--dtype", "bfloat16"]`."""
    args = {}
    for name_value in name_values:
        name, sep, value = name_value.partition("=")
        if not sep or not name:
            raise SystemExit(f"--launcher-arg takes NAME=VALUE, not {name_value!r}")
        args[name] = yaml.safe_load(value)
    try:
        return LauncherArgs(**args).to_argv("embedded")
    except ValidationError as exc:
        raise SystemExit(f"--launcher-arg: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--input-len", type=LengthDist.parse, default=LengthDist.parse("chat:96:512"))
    p.add_argument("--output-len", type=LengthDist.parse, default=LengthDist.parse("fixed:96"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="an engine launcher flag, e.g. dtype=bfloat16 (repeatable)")  # fmt: skip
    p.add_argument("--setup-only", action="store_true", help="build llama-server and stop")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    engine_flags = launcher_flags(args.launcher_arg)
    binary = build_llama_server()
    if args.setup_only:
        print(binary)
        return 0
    command = "python -m benchmarks.vs_llamacpp " + " ".join(argv or sys.argv[1:])

    model_dir = resolve_model_dir(DEFAULT_MODEL_ID)
    gguf = cache_root() / "wheels" / Path(PACKAGED_MODELS[DEFAULT_MODEL_ID].path_in_wheel).name
    tokenizer = load_tokenizer(str(model_dir))
    ctx_per_slot = args.input_len.b + args.output_len.a + 64
    for concurrency in args.concurrency:
        requests = make_requests(tokenizer, concurrency * args.requests_per_stream,
                                 args.input_len, args.output_len, args.seed)  # fmt: skip
        sides = {}
        with engine_process(["--model-id", str(model_dir), *engine_flags]) as url:
            target = Target(url, "openai", keepalive=False)  # both sides alike
            sides["engine"] = asyncio.run(run_load(target, requests, concurrency))
        with llama_server(binary, gguf, concurrency, ctx_per_slot) as url:
            target = Target(url, "openai", keepalive=False)
            sides["llama_cpp"] = asyncio.run(run_load(target, requests, concurrency))
        workload = {"concurrency": concurrency, "num_requests": len(requests),
                    "input_len": str(args.input_len), "output_len": str(args.output_len),
                    "seed": args.seed, "llama_cpp": LLAMA_CPP_PYTHON + " (vendored llama.cpp)",
                    "gguf": gguf.name, "engine_flags": engine_flags}  # fmt: skip
        write_report(
            f"vs_llamacpp_c{concurrency}", command, sides, {"workload": workload},
            ratios=lambda s: {"output_tok_s": s["engine"]["output_tok_s"]
                              / s["llama_cpp"]["output_tok_s"]},
            results_dir=args.results_dir,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
