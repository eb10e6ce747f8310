"""What the side-by-side benchmarks share: the engine process, the machine, the report."""

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.report import plot_results, summarize
from deployments.launcher import Launcher, embedded_env, free_port, launcher_command

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@contextmanager
def engine_process(flags: list[str], timeout_s: float = 300) -> Iterator[str]:
    """Run `python -m engine FLAGS` on a free local port; yield its base URL."""
    flags = [*flags, "--hostname", "127.0.0.1", "--port", str(free_port())]
    launcher = Launcher(launcher_command("embedded", flags), env=embedded_env())
    launcher.start()
    try:
        launcher.wait_until_healthy(timeout_s=timeout_s)
        yield launcher.url
    finally:
        launcher.stop()


def machine() -> dict:
    """Where and when a result was taken."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "num_cpus": os.cpu_count(),
        "commit": commit or None,
    }


def write_report(
    name: str,
    command: str,
    sides: dict[str, tuple],
    extra: dict,
    ratios: Callable[[dict], dict[str, float]],
    results_dir: Path = RESULTS_DIR,
) -> dict:
    """Summarize each side's (results, wall_s), compute `ratios(summaries)`, write
    results/NAME.json and NAME.png; return the report."""
    summaries = {side: summarize(results, wall) for side, (results, wall) in sides.items()}
    report = {"name": name, "command": command, "machine": machine(), **extra,
              "ratios": {k: round(v, 4) for k, v in ratios(summaries).items()},
              "summaries": summaries}  # fmt: skip
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot_results({side: results for side, (results, _) in sides.items()},
                 results_dir / f"{name}.png")  # fmt: skip
    print(json.dumps({"ratios": report["ratios"], "summaries": summaries}, indent=1))
    return report
