"""Runs one launcher (`python -m engine` or `text-generation-launcher`) as a child process.

The child gets its own process group, so `stop()` reaches the shard processes it forks too,
and (on Linux) a parent-death signal, so it does not outlive a replica killed without a
chance to clean up. Its output goes to a log file and a ring buffer of recent lines that
error messages quote. Nothing here knows about Ray.
"""

import collections
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Literal

import httpx

EngineKind = Literal["embedded", "tgi"]

# Where the `engine` package lives when running from a checkout (the repository root).
PROJECT_ROOT = Path(__file__).resolve().parents[1]

_PR_SET_PDEATHSIG = 1


class LauncherError(RuntimeError):
    """The launcher exited, or did not get healthy in time; the message quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (another process may still take it before the child binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launcher_command(engine: EngineKind, flags: Sequence[str]) -> list[str]:
    """The command line of either launcher; both take the same TGI flags. The real one is
    found on the launcher environment's PATH. Secrets (HF_TOKEN) never go here: the
    launcher reads them from its environment, and this command line is logged."""
    if engine == "embedded":
        return [sys.executable, "-m", "engine", *flags]
    return ["text-generation-launcher", *flags]


def embedded_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the project root on PYTHONPATH, for `-m engine`."""
    env = dict(os.environ if base is None else base)
    paths = [str(PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _parent_death_signal():
    """A preexec_fn asking Linux to SIGTERM the child when the spawning thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


class Launcher:
    """One child process serving TGI's HTTP API on `host:port`.

    `command` is the full command line without `--hostname/--port`, which are appended.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        num_log_lines: int = 200,
        echo: IO[str] | None = None,
    ):
        self.command = list(command)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.env = dict(env) if env is not None else None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="ray-tgi-launcher-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._recent_lines: collections.deque[str] = collections.deque(maxlen=num_log_lines)
        self._echo = echo
        self._process: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def argv(self) -> list[str]:
        return [*self.command, "--hostname", self.host, "--port", str(self.port)]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """None while running (or never started), else the exit status."""
        return self._process.poll() if self._process else None

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("launcher already started")
        try:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: stop() reaches its shards
                preexec_fn=_parent_death_signal(),
            )
        except FileNotFoundError:
            path = (self.env if self.env is not None else os.environ).get("PATH", "")
            raise LauncherError(
                f"{self.command[0]} is not on PATH ({path}); `engine: tgi` needs TGI's "
                "launcher installed, as in deploy/Dockerfile's image"
            ) from None
        self._pump = threading.Thread(target=self._pump_output, name="launcher-log", daemon=True)
        self._pump.start()

    def _pump_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for raw in self._process.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                self._recent_lines.append(line)
                log.write(line + "\n")
                log.flush()
                if self._echo is not None:
                    print(line, file=self._echo, flush=True)

    def tail(self, num_lines: int = 30) -> str:
        """The last `num_lines` lines the child printed."""
        return "\n".join(list(self._recent_lines)[-num_lines:])

    def _error(self, what: str) -> LauncherError:
        return LauncherError(
            f"{what}\ncommand: {' '.join(self.argv)}\nlog: {self.log_path}\n"
            f"--- last log lines ---\n{self.tail()}"
        )

    def raise_if_exited(self) -> None:
        code = self.returncode
        if code is not None:
            if self._pump is not None:
                self._pump.join(timeout=2)  # let the last lines reach the buffer
            raise self._error(f"launcher exited with status {code}")

    def wait_until_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Poll GET /health until it answers 200; raise LauncherError if the child exits
        first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                self.raise_if_exited()
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() >= deadline:
                    raise self._error(f"launcher not healthy after {timeout_s:.0f} s")
                time.sleep(poll_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `grace_s`. Idempotent."""
        process = self._process
        if process is None:
            return
        pgid = process.pid  # start_new_session: the child leads its own group
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(pgid):
                break
            time.sleep(0.05)
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        if self._pump is not None:
            self._pump.join(timeout=2)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
