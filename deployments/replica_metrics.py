"""Every replica's engine metrics, gathered through `DeploymentHandle.broadcast`.

A handle call reaches one replica; `broadcast("engine_metrics")` reaches each running one
(TGIServer.engine_metrics: its replica id and its launcher's /metrics text). The ingress's
/metrics re-exposes them with `model` and `replica` labels, and /stats sums their queues.

Re-exposing works on the text, line by line, not through a parse and re-render:
prometheus-client's parser renames TGI's counters (`tgi_request_count` becomes
`tgi_request_count_total`), and dashboards built for TGI query its exact names. Families of
the same name from several replicas are merged under one HELP/TYPE header, as the text
format requires.
"""

from dataclasses import dataclass, field

from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

# A model's replicas get this long to answer; a stuck replica must not hang a scrape.
ENGINE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReplicaScrape:
    model: str
    replica_id: str
    text: str  # the engine's Prometheus text, as it wrote it


@dataclass
class ModelScrape:
    model: str
    replicas: list[ReplicaScrape] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one per replica that gave no metrics


async def scrape_model(
    model: str, server: DeploymentHandle, timeout_s: float = ENGINE_TIMEOUT_S
) -> ModelScrape:
    """The engine metrics of every running replica of `model` (none while it has none)."""
    scrape = ModelScrape(model)
    try:
        results = await server.broadcast("engine_metrics").results_async(
            timeout_s=timeout_s, return_exceptions=True
        )
    except DeploymentUnavailableError:  # no running replica: scaled to zero, or starting
        return scrape
    except TimeoutError:
        scrape.errors.append(f"the replicas did not answer within {timeout_s:g} s")
        return scrape
    for result in results:
        if isinstance(result, BaseException):
            scrape.errors.append(f"{type(result).__name__}: {result}"[:300])
        elif result.get("metrics") is None:
            scrape.errors.append(f"replica {result.get('replica_id')}: {result.get('error')}")
        else:
            scrape.replicas.append(ReplicaScrape(model, result["replica_id"], result["metrics"]))
    return scrape


def relabeled_text(scrapes: list[ReplicaScrape]) -> str:
    """The replicas' metrics as one Prometheus text, each sample labelled with its `model`
    and `replica`, each family's samples together under its first HELP/TYPE lines."""
    headers: dict[str, dict[str, str]] = {}  # family -> {"HELP": line, "TYPE": line}
    samples: dict[str, list[str]] = {}
    for scrape in scrapes:
        extra = f'model="{_escape(scrape.model)}",replica="{_escape(scrape.replica_id)}"'
        family = ""
        for line in scrape.text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    headers.setdefault(family, {}).setdefault(parts[1], line)
                continue
            name, relabeled = _with_labels(line, extra)
            owner = family if family and name.startswith(family) else name
            headers.setdefault(owner, {})
            samples.setdefault(owner, []).append(relabeled)
    lines: list[str] = []
    for family, header in headers.items():
        lines += [header[kind] for kind in ("HELP", "TYPE") if kind in header]
        lines += samples.get(family, [])
    return "\n".join(lines) + "\n" if lines else ""


def _with_labels(line: str, extra: str) -> tuple[str, str]:
    """(sample name, the line with `extra` labels first in its label set)."""
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        name, rest = line[:brace], line[brace + 1 :]
        separator = "" if rest.lstrip().startswith("}") else ","
        return name, f"{name}{{{extra}{separator}{rest}"
    name, rest = line[:space], line[space:]
    return name, f"{name}{{{extra}}}{rest}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
