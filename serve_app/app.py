"""The Serve application builder named by serve_config.yaml (`serve_app.app:build_app`)."""

from typing import Any

import ray
from ray import serve
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.placement import alive_node_resources, unplaceable_models
from deployments.tgi_server import TGIServer
from serve_app.config import AppArgs, ModelConfig, TracingOptions


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` as AppArgs and compose one TGIServer deployment per model behind
    the HTTP ingress."""
    app_args = AppArgs.model_validate(args)
    # Built where Serve deploys it (`serve run` / the controller), so Ray is connected there;
    # without this check Serve would wait silently for a node that never comes.
    if app_args.check_placement and ray.is_initialized():
        problems = unplaceable_models(app_args.models, alive_node_resources())
        if problems:
            raise ValueError("; ".join(problems) + " (or set check_placement: false)")
    tracing = app_args.tracing
    models = [with_launcher_tracing(m, tracing) for m in app_args.models]
    servers = {
        model_cfg.name: serve.deployment(
            TGIServer, **TGIServer.get_deployment_options(model_cfg)
        ).bind(model_cfg, tracing=tracing)
        for model_cfg in models
    }
    facts = {m.name: {"model_id": m.model_id, "backend": m.engine} for m in models}
    ingress = serve.deployment(Ingress, **Ingress.get_deployment_options(app_args.ingress))
    return ingress.bind(servers, app_args.ingress, tracing=tracing, model_facts=facts)


def with_launcher_tracing(model_cfg: ModelConfig, tracing: TracingOptions | None) -> ModelConfig:
    """The model with the app's `launcher_otlp_endpoint` as its launcher's --otlp-endpoint,
    unless its own launcher_args name one."""
    if tracing is None or tracing.launcher_otlp_endpoint is None:
        return model_cfg
    if model_cfg.launcher_args.otlp_endpoint is not None:
        return model_cfg
    launcher_args = model_cfg.launcher_args.model_copy(
        update={"otlp_endpoint": tracing.launcher_otlp_endpoint}
    )
    return model_cfg.model_copy(update={"launcher_args": launcher_args})
