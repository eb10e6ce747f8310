"""deploy/: the Grafana dashboard has the panels operators need, the alert rules the two
conditions, and every query names metrics (that they are ones the app really exports is
checked against a real scrape in tests/integration/test_observability.py)."""

from deploy_queries import alert_queries, all_queries, dashboard_queries, metric_names


def test_metric_names_of_a_query():
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(ray_tgi_ingress_time_to_first_'
            'token_seconds_bucket{job=~"$job"}[$__rate_interval]))) > 2')  # fmt: skip
    assert metric_names(expr) == {"ray_tgi_ingress_time_to_first_token_seconds_bucket"}
    expr = ("1 - sum by (model, replica) (ray_tgi_kv_blocks_free) / sum by (model, replica) "
            '(ray_tgi_kv_blocks_total{job="x"}) and on (model) up offset 5m')  # fmt: skip
    assert metric_names(expr) == {"ray_tgi_kv_blocks_free", "ray_tgi_kv_blocks_total", "up"}


def test_the_dashboard_shows_queue_ttft_tokens_replicas_and_kv_usage():
    panels = dashboard_queries()
    names = {title: set().union(*map(metric_names, exprs)) for title, exprs in panels.items()}
    assert "tgi_queue_size" in names["Queue depth"]
    assert names["Time to first token"] == {"ray_tgi_ingress_time_to_first_token_seconds_bucket"}
    assert any("histogram_quantile(0.5," in e for e in panels["Time to first token"])
    assert any("histogram_quantile(0.95," in e for e in panels["Time to first token"])
    assert "ray_tgi_ingress_output_tokens_total" in names["Tokens per second"]
    assert names["Replicas"] == {"ray_tgi_engine_replicas_scraped"}
    assert {"tgi_batch_current_max_tokens", "tgi_batch_max_total_tokens"} <= names["KV cache usage"]
    # Each query selects the app's scrape job, so Ray's copies of the ingress series
    # (ray.serve.metrics, same names) are not counted twice.
    assert all('job=~"$job"' in e for exprs in panels.values() for e in exprs)


def test_alerts_on_sustained_queue_depth_and_p95_ttft():
    alerts = alert_queries()
    assert metric_names(alerts["RayTGIQueueDepthSustained"]) == {"tgi_queue_size"}
    ttft = alerts["RayTGITimeToFirstTokenP95High"]
    assert metric_names(ttft) == {"ray_tgi_ingress_time_to_first_token_seconds_bucket"}
    assert "histogram_quantile(0.95," in ttft


def test_every_query_reads_at_least_one_metric():
    for expr in all_queries():
        assert metric_names(expr), expr
