"""The PromQL queries of deploy/ (Grafana dashboard, Prometheus alert rules) and the metric
names each one reads; tests/deploy checks them, tests/integration against a real scrape."""

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ray-tgi-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# PromQL words that are not metric names (operators, modifiers, aggregation clauses).
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on",
                       "ignoring", "group_left", "group_right", "inf", "nan"})  # fmt: skip
_NAME = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")  # not a number's tail (5m)


def dashboard_queries() -> dict[str, list[str]]:
    """Panel title -> its queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}


def alert_queries() -> dict[str, str]:
    """Alert name -> its expression."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def all_queries() -> list[str]:
    panels = [expr for exprs in dashboard_queries().values() for expr in exprs]
    return panels + list(alert_queries().values())


def metric_names(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    # Label lists of aggregations and vector matching.
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in _NAME.finditer(expr):
        word = match.group(0)
        if word.lower() in _KEYWORDS or expr[match.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function call
        names.add(word)
    return names
