"""The Serve application builder named by serve_config.yaml (`serve_app.app:build_app`)."""

from typing import Any

import ray
from ray import serve
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.placement import alive_node_resources, unplaceable_models
from deployments.tgi_server import TGIServer
from serve_app.config import AppArgs


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
    servers = {
        model_cfg.name: serve.deployment(
            TGIServer, **TGIServer.get_deployment_options(model_cfg)
        ).bind(model_cfg)
        for model_cfg in app_args.models
    }
    ingress = serve.deployment(Ingress, **Ingress.get_deployment_options(app_args.ingress))
    return ingress.bind(servers, app_args.ingress)
