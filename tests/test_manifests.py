"""Offline validation of manifests/: Kubernetes schema (kubernetes-validate) and the S3/RBAC wiring."""

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
K8S_VERSION = "1.30"
# Kinds the bundled Kubernetes schema cannot know (CRDs); each must be added here deliberately. The TrainJob example
# is checked against Kubeflow Trainer's own CRD schema in tests/test_trainjob.py.
EXPECTED_SKIPPED_KINDS: set[str] = {"trainer.kubeflow.org/v1alpha1/TrainJob"}


def _yaml_files():
    return sorted(p for p in MANIFESTS.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_objects():
    return [(p, d) for p in _yaml_files() if p.name != "kustomization.yaml" for d in _docs(p)]


def _find(kind, name=None):
    hits = [d for _, d in _all_objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, (kind, name, len(hits))
    return hits[0]


def test_schema_version_shipped():
    assert f"{K8S_VERSION}.0" in kubernetes_validate.utils.all_versions()


def test_every_document_validates():
    assert _yaml_files()
    skipped, validated = set(), 0
    for path, doc in _all_objects():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            validated += 1
        except kubernetes_validate.utils.SchemaNotFoundError:
            skipped.add(f"{doc['apiVersion']}/{doc['kind']}")
        except kubernetes_validate.utils.ValidationError as e:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']}: {e.message}")
    assert skipped == EXPECTED_SKIPPED_KINDS
    assert validated == 6  # ConfigMap, Role, RoleBinding; the S3, hub and registry Secret templates in examples/


def test_validator_rejects_bad_objects():
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "bogus": 1}
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    crd = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_kustomization_resources_exist():
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization" and kust["resources"]
    for res in kust["resources"]:
        assert (BASE / res).is_file(), res
    listed = {(BASE / r).resolve() for r in kust["resources"]}
    on_disk = {p.resolve() for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk


def test_launcher_providers_reference_secret_template():
    cm = _find("ConfigMap", "kfp-launcher")
    assert cm["data"]["defaultPipelineRoot"].startswith("s3://")
    providers = yaml.safe_load(cm["data"]["providers"])
    s3 = providers["s3"]["default"]
    assert {"endpoint", "region", "disableSSL", "forcePathStyle", "credentials"} <= set(s3)
    assert isinstance(s3["disableSSL"], bool) and isinstance(s3["forcePathStyle"], bool)
    ref = s3["credentials"]["secretRef"]
    assert s3["credentials"]["fromEnv"] is False
    secret = _find("Secret", ref["secretName"])
    keys = set(secret["stringData"])
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= keys
    assert keys == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"}
    assert "REPLACE_ME" in secret["stringData"]["AWS_SECRET_ACCESS_KEY"]  # a template, never real creds


def test_rbac_lets_pipeline_runner_run_trainjobs():
    from sidflow.trainjob import RBAC_VERBS

    role = _find("Role")
    rules = [r for r in role["rules"] if "trainer.kubeflow.org" in r["apiGroups"] and "trainjobs" in r["resources"]]
    assert rules
    verbs = set().union(*(r["verbs"] for r in rules))
    assert verbs == set(RBAC_VERBS) == {"create", "get", "delete"}  # what the distill_trainjob component calls
    binding = _find("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"} in binding["subjects"]


def _kustomized_files(kdir: Path) -> list[Path]:
    """The resource files a kustomization pulls in, through its bases (what `kubectl apply -k` would create)."""
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    out = []
    for res in kust["resources"]:
        path = (kdir / res).resolve()
        out += _kustomized_files(path) if path.is_dir() else [path]
    return out


OVERLAYS = {"profile": ("kubeflow-user-example-com", "default-editor"), "standalone": ("kubeflow", "pipeline-runner")}


def test_no_kustomization_creates_placeholder_secrets_or_unused_volumes():
    for kdir in [BASE, *(MANIFESTS / "overlays" / name for name in OVERLAYS)]:
        kinds = {d["kind"] for p in _kustomized_files(kdir) for d in _docs(p)}
        assert kinds == {"ConfigMap", "Role", "RoleBinding"}, kdir  # Secrets are created out of band; no PVC
    assert "namespace" not in yaml.safe_load((BASE / "kustomization.yaml").read_text())  # the overlay's choice
    for name in ("s3-credentials-secret.yaml", "hf-secret.yaml"):
        assert "REPLACE_ME" in (MANIFESTS / "examples" / name).read_text()  # templates, never real credentials


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_puts_everything_in_its_namespace_and_binds_its_runner(overlay):
    namespace, runner = OVERLAYS[overlay]
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Role", "RoleBinding"]
    assert {d["metadata"]["namespace"] for d in docs} == {namespace}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": runner, "namespace": namespace}]


def test_recurring_run_example_avoids_traps():
    text = (MANIFESTS / "examples" / "recurring-run.md").read_text()
    for flag in ("kfp recurring-run create", "--enabled", "--max-concurrency 1", "--no-catchup",
                 '--cron-expression "0 0 3 * * *"'):
        assert flag in text, flag


def test_pipeline_mounts_the_secret_the_manifests_define():
    from sidflow.kfp.sid_distill import S3_SECRET

    secret = next(d for d in _docs(MANIFESTS / "examples" / "s3-credentials-secret.yaml") if d["kind"] == "Secret")
    assert secret["metadata"]["name"] == S3_SECRET
    from sidflow.kfp.sid_distill import HF_KEYS, HF_SECRET

    hub = _find("Secret", HF_SECRET)
    assert set(hub["stringData"]) == set(HF_KEYS)


def test_registry_secret_example_is_the_one_the_pipeline_reads():
    from sidflow import registry

    secret = _find("Secret", registry.SECRET)
    assert set(secret["stringData"]) <= set(registry.SECRET_KEYS)
    assert all("REPLACE_ME" in v for v in secret["stringData"].values())  # a template, never real credentials
