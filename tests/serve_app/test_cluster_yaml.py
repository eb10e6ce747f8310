"""cluster.yaml is a valid Ray cluster launcher config (checked against Ray's own schema)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema():
    # What `ray up` does first: fill in the provider's defaults, then check the schema.
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)  # raises on unknown keys or wrong types
    gpu_nodes = [n for n in config["available_node_types"] if n != config["head_node_type"]]
    assert gpu_nodes, "cluster.yaml should declare GPU worker nodes"
