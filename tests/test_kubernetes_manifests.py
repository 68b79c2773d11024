"""Kubernetes manifests, offline: core objects validated with kubernetes-validate (strict: unknown fields
are errors), the KEDA ScaledObject against KEDA's published CRD schema (tests/fixtures/kubernetes), and
`fleetserve deploy --provider kubernetes --dry-run -o yaml` printing them without a cluster."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from fleetserve.cli import app
from fleetserve.control.providers.images import DEFAULT_GPU_IMAGE, DEFAULT_IMAGE
from fleetserve.control.providers.kubernetes import deployment_manifest, manifests, to_yaml
from fleetserve.control.spec import DeploymentSpec

K8S = "1.37.0"
CRD = Path(__file__).parent / "fixtures" / "kubernetes" / "keda.sh_scaledobjects.yaml"
TOKEN = "hf_" + "k8s" * 12


def keda_schema() -> dict:
    crd = next(d for d in yaml.safe_load_all(CRD.read_text()) if d)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return _closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _closed(schema: dict) -> dict:
    """Structural CRD schemas prune unknown fields; for a test, make unknown fields errors instead."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for key in ("properties", "items", "additionalProperties"):
            sub = schema.get(key)
            if isinstance(sub, dict):
                if key == "properties":
                    for v in sub.values():
                        _closed(v)
                else:
                    _closed(sub)
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in schema.get(key, []):
                _closed(sub)
    return schema


def validate(obj: dict) -> None:
    if obj["kind"] == "ScaledObject":
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(obj, keda_schema())
    else:
        kubernetes_validate.validate(obj, K8S, strict=True)


def spec(**kw) -> DeploymentSpec:
    return DeploymentSpec(name="chat", provider="kubernetes", **kw)


@pytest.mark.parametrize("autoscaler", ["none", "hpa", "keda"])
def test_every_object_validates(autoscaler):
    s = spec(model="Qwen/Qwen2.5-0.5B-Instruct", replicas={"min": 1, "max": 4}, cpu=3.5, memory_mb=12288,
             gpu={"type": "H100", "count": 2}, image="ghcr.io/me/fleetserve:gpu", hf_token=TOKEN,
             kubernetes={"namespace": "llm", "autoscaler": autoscaler, "model_cache_claim": "models"})
    objs = manifests(s)
    kinds = [o["kind"] for o in objs]
    assert kinds[:3] == ["Secret", "Deployment", "Service"]
    assert kinds[3:] == {"none": [], "hpa": ["HorizontalPodAutoscaler"], "keda": ["ScaledObject"]}[autoscaler]
    for o in objs:
        validate(o)
        assert o["metadata"]["namespace"] == "llm"
    assert TOKEN not in json.dumps(objs)  # the Secret holds a placeholder, never the token


def test_deployment_shape():
    s = spec(gpu={"count": 1}, cpu=2, memory_mb=8192, max_model_len=2048, engine_args={"max_batch_tokens": 512})
    dep = deployment_manifest(s, replicas=3)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == DEFAULT_GPU_IMAGE and dep["spec"]["replicas"] == 3
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["resources"]["requests"]["cpu"] == "2"
    assert c["resources"]["requests"]["memory"] == "8192Mi"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] > 5 + 30  # preStop + the worker's drain
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "fleetserve-chat", "key": "HF_TOKEN",
                                                           "optional": True}
    assert json.loads(env["DEPLOYMENT_CONFIG_JSON"]["value"]) == {
        "model": "default", "precision": "auto", "device": "auto", "max_model_len": 2048, "max_batch_tokens": 512}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["model-cache"] == env["FLEETSERVE_HOME"]["value"]
    assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"]
    # the worker accepts exactly this env (secrets resolved by the kubelet)
    from fleetserve.config import load_serve_config

    plain = {k: e["value"] for k, e in env.items() if "value" in e}
    cfg, _ = load_serve_config({}, env={**plain, "HF_TOKEN": TOKEN})
    assert (cfg.port, cfg.host, cfg.served_model_name, cfg.max_batch_tokens) == (8000, "0.0.0.0", "chat", 512)
    no_gpu = deployment_manifest(spec())
    assert "nvidia.com/gpu" not in json.dumps(no_gpu) and "tolerations" not in no_gpu["spec"]["template"]["spec"]
    assert no_gpu["spec"]["template"]["spec"]["containers"][0]["image"] == DEFAULT_IMAGE


def test_autoscalers_target_the_queue_depth_metric():
    s = spec(replicas={"min": 0, "max": 5}, autoscale={"target_concurrency": 6, "scale_to_zero_after_s": 120},
             kubernetes={"autoscaler": "keda", "namespace": "ml", "prometheus_url": "http://prom.ml:9090"})
    dep, so = manifests(s)[1], manifests(s)[3]
    assert "replicas" not in dep["spec"]  # the autoscaler owns the count
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["maxReplicaCount"] == 5
    assert so["spec"]["cooldownPeriod"] == 120 and so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "6"
    assert trigger["metadata"]["serverAddress"] == "http://prom.ml:9090"
    assert "fleetserve_queue_depth" in trigger["metadata"]["query"] and 'namespace="ml"' in trigger["metadata"]["query"]
    hpa = manifests(spec(replicas={"min": 0, "max": 3}, kubernetes={"autoscaler": "hpa"}))[3]
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == \
        "fleetserve_queue_depth"


def test_validators_catch_mistakes():
    """The checks are real: a wrong type or an unknown field fails."""
    bad = deployment_manifest(spec())
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    so = manifests(spec(kubernetes={"autoscaler": "keda"}))[3]
    so["spec"]["minReplicas"] = 1  # an HPA field, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        validate(so)
    del so["spec"]["minReplicas"]
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # KEDA metadata values are strings
    with pytest.raises(jsonschema.ValidationError):
        validate(so)


def test_cli_dry_run_prints_yaml_without_a_cluster_or_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = CliRunner().invoke(app, ["deploy", "Qwen/Qwen2.5-0.5B-Instruct", "-n", "qwen", "--provider", "kubernetes",
                                 "--gpus", "1", "--replicas", "2", "--namespace", "llm", "--autoscaler", "keda",
                                 "--dry-run", "-o", "yaml", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 0, r.output
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["kind"] for d in docs] == ["Secret", "Deployment", "Service", "ScaledObject"]
    for d in docs:
        validate(d)
    assert TOKEN not in r.output and docs[0]["stringData"]["HF_TOKEN"] == "${HF_TOKEN}"
    assert "&id" not in r.stdout  # plain YAML, no anchors
    assert to_yaml(docs) == r.stdout
    r = CliRunner().invoke(app, ["deploy", "default", "-n", "x", "--provider", "kubernetes", "--dry-run", "-o", "json"])
    assert r.exit_code == 0 and [o["kind"] for o in json.loads(r.stdout)["items"]] == ["Secret", "Deployment",
                                                                                       "Service"]
    r = CliRunner().invoke(app, ["deploy", "default", "-n", "x", "--dry-run"])
    assert r.exit_code == 2 and "--provider kubernetes" in r.output
    r = CliRunner().invoke(app, ["deploy", "default", "-n", "x", "--provider", "kubernetes", "--region", "Tokyo",
                                 "--dry-run"])
    assert r.exit_code == 2 and "region" in r.output


def test_engine_args_from_the_cli_reach_the_worker_config_and_bad_ones_exit_2():
    from fleetserve.config import check_backend, load_serve_config

    r = CliRunner().invoke(app, ["deploy", "default", "-n", "fast", "--provider", "kubernetes", "--dry-run", "-o",
                                 "json", "-e", "speculative=ngram", "-e", "speculative_num_steps=3",
                                 "--engine-arg", "kv_cache_dtype=fp8_e4m3", "-e", "max_batch_tokens=512"])
    assert r.exit_code == 0, r.output
    deployment = next(o for o in json.loads(r.stdout)["items"] if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    cfg_json = json.loads(env["DEPLOYMENT_CONFIG_JSON"])
    assert cfg_json["speculative"] == "ngram" and cfg_json["speculative_num_steps"] == 3
    assert cfg_json["kv_cache_dtype"] == "fp8_e4m3" and cfg_json["max_batch_tokens"] == 512
    cfg, _ = load_serve_config({}, env={"DEPLOYMENT_CONFIG_JSON": env["DEPLOYMENT_CONFIG_JSON"]})
    check_backend(cfg)  # the worker accepts what the deployment sends
    assert cfg.speculative == "ngram" and cfg.kv_cache_dtype == "fp8_e4m3" and cfg.max_batch_tokens == 512
    for bad, why in ((["-e", "speculative"], "KEY=VALUE"), (["-e", "quantization=awq"], "engine_args")):
        r = CliRunner().invoke(app, ["deploy", "default", "-n", "x", "--provider", "kubernetes", "--dry-run", *bad])
        assert r.exit_code == 2 and why in r.output, r.output
