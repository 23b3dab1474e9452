"""deploy/: the Kubernetes manifests are valid.

What is checked, and against what:
* deploy/single-replica.yaml (Deployment + Service): the Kubernetes API's own JSON schemas
  (the ``kubernetes-validate`` package, latest bundled version, strict: unknown fields fail).
* deploy/rayservice.yaml (KubeRay's RayService, a CRD the Kubernetes schemas lack): a
  vendored subset of the CRD's schema (deploy/schemas/, unknown fields fail); every pod
  template in it against the Kubernetes core/v1 PodTemplateSpec schema (strict); its
  serveConfigV2 against Ray Serve's ``ServeDeploySchema``; and its import path builds a Serve
  application from its args.
* Both: readiness and liveness probes on /health at the port the server listens on.
"""

from __future__ import annotations

import importlib
import json
import os

import jsonschema
import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.ray

DEPLOY = os.path.join(os.path.dirname(__file__), os.pardir, "deploy")
K8S = kubernetes_validate.latest_version()


def load(name: str) -> list[dict]:
    with open(os.path.join(DEPLOY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def k8s_valid(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S, strict=True)


def check_probes(container: dict, port) -> None:
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", (container["name"], probe)
        assert get["port"] == port, (container["name"], probe)


def test_single_replica_deployment_and_service():
    docs = load("single-replica.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    for d in docs:
        k8s_valid(d)
    deployment, service = docs
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["parallax", "serve"]
    port = c["command"][c["command"].index("--port") + 1]
    assert c["ports"][0]["containerPort"] == int(port)
    check_probes(c, c["ports"][0]["name"])
    assert service["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    # the command parses with the real CLI
    from parallax.cli import build_parser
    args = build_parser().parse_args(c["command"][1:])
    assert args.tp == 2 and args.host == "0.0.0.0"


def test_rayservice_schema_pods_and_serve_config():
    from ray.serve.schema import ServeDeploySchema

    (doc,) = load("rayservice.yaml")
    with open(os.path.join(DEPLOY, "schemas", "rayservice-subset.schema.json")) as f:
        jsonschema.validate(doc, json.load(f))
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    for group in groups:
        k8s_valid({"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": "check"}, "template": group["template"]})
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    port = config.http_options.port
    for group in groups:
        for c in group["template"]["spec"]["containers"]:
            check_probes(c, port)
    (app,) = config.applications
    module, attr = app.import_path.split(":")
    built = getattr(importlib.import_module(module), attr)(app.args)
    from ray.serve import Application
    assert isinstance(built, Application)
    import ray
    assert cluster["rayVersion"] == ray.__version__


def test_schema_subset_refuses_a_typo():
    (doc,) = load("rayservice.yaml")
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with open(os.path.join(DEPLOY, "schemas", "rayservice-subset.schema.json")) as f:
        with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
            jsonschema.validate(doc, json.load(f))
