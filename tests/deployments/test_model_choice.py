"""Which model a request goes to, and the /stats helpers (pure functions, no Ray)."""

import pytest
from ray.serve.schema import ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

from deployments.app_stats import engine_queue, replica_counts
from deployments.model_choice import choose_model, requested_model

SERVED = ["smollm2", "smollm2-tiny"]


@pytest.mark.parametrize(
    ("path", "header", "body", "expected"),
    [
        ("a", "b", "c", "a"),  # the route prefix first
        (None, "b", "c", "b"),  # then the x-model header
        (None, None, "c", "c"),  # then the body's model
        (None, None, None, None),
        (None, None, 7, None),  # not a name: the engine's validation answers it
    ],
)
def test_requested_model_precedence(path, header, body, expected):
    assert requested_model(path, header, body) == expected


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("smollm2-tiny", "smollm2-tiny"),
        (None, "smollm2"),  # no name: the first model
        ("", "smollm2"),
        ("tgi", "smollm2"),  # TGI's conventional name
        ("default", "smollm2"),  # ray-tgi bench's default
        ("dummy", "smollm2"),  # huggingface_hub's InferenceClient with a base URL
        ("gpt-4o", None),  # unknown: refused, never sent elsewhere
    ],
)
def test_choose_model(requested, expected):
    assert choose_model(SERVED, requested) == expected


def test_a_model_named_tgi_is_chosen_by_its_name():
    assert choose_model(["first", "tgi"], "tgi") == "tgi"


def test_engine_queue_reads_tgis_gauges():
    metrics = "\n".join([
        "# HELP tgi_queue_size Requests waiting for a batch",
        "# TYPE tgi_queue_size gauge",
        "tgi_queue_size 3.0",
        "# HELP tgi_batch_current_size Requests in the running batch",
        "# TYPE tgi_batch_current_size gauge",
        "tgi_batch_current_size 2.0",
        "# TYPE tgi_request_count counter",
        "tgi_request_count_total 9.0",
    ])  # fmt: skip
    assert engine_queue(metrics) == {"queued_requests": 3, "running_requests": 2}
    assert engine_queue("") == {}


def test_replica_counts_from_serve_status():
    deployment = DeploymentStatusOverview(
        status="HEALTHY",
        status_trigger="CONFIG_UPDATE_COMPLETED",
        replica_states={"RUNNING": 2, "STARTING": 1},
        message="",
    )
    app = ApplicationStatusOverview(
        status="RUNNING", message="", last_deployed_time_s=0.0,
        deployments={"TGIServer:smollm2": deployment},
    )  # fmt: skip
    status = ServeStatus(applications={"ray-tgi": app})
    assert replica_counts(status, "ray-tgi", "TGIServer:smollm2") == {
        "status": "HEALTHY",
        "running_replicas": 2,
        "replica_states": {"RUNNING": 2, "STARTING": 1},
    }
    assert replica_counts(status, "other", "TGIServer:smollm2")["status"] == "NOT_FOUND"
