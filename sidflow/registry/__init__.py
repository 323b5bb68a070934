"""The model registry: numbered versions of a model and a `champion` alias, in the registry a URI names.

    s3://bucket/prefix, /a/path, file://...   sidflow's own registry: JSON objects in S3 or on disk (store.py)
    mlflow+http(s)://host:port                an MLflow tracking server's Model Registry (mlflow.py)
    kubeflow-mr+http(s)://host:port           a Kubeflow Model Registry server, REST API v1alpha3 (kubeflow_mr.py)

Every backend records the same `Version`, decides promotion with the same `beats`, and keeps the same promise:
two runs that register at once both get a version and neither is lost, and concurrent promotions crown one
champion, never one decided against a champion that had changed meanwhile. How each backend makes that true with
its server's atomic operations is written at the top of its module; docs/registries.md compares them.
"""

from __future__ import annotations

from types import ModuleType

from sidflow.registry.rule import RegistryError, Version, beats, check_metrics, check_name

__all__ = ["RegistryError", "Version", "beats", "champion", "check", "check_metrics", "check_name", "fingerprints",
           "get", "list_versions", "promote", "register"]

# The optional Kubernetes secret the pipeline's registry tasks read credentials from, and its keys: each server's
# own variables (mlflow.py, kubeflow_mr.py). Absent secret or key: the variable is simply unset.
SECRET = "sidflow-registry"
SECRET_KEYS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MODEL_REGISTRY_TOKEN")
SCHEMES = ("s3://", "file://", "a path", "mlflow+http(s)://", "kubeflow-mr+http(s)://")


def _backend(registry_uri: str) -> ModuleType:
    # Imported on use: `import sidflow` stays light, and a backend's dependencies load only where it is named.
    scheme = registry_uri.split("://", 1)[0] if "://" in registry_uri else ""
    if scheme in ("mlflow+http", "mlflow+https"):
        from sidflow.registry import mlflow as backend
    elif scheme in ("kubeflow-mr+http", "kubeflow-mr+https"):
        from sidflow.registry import kubeflow_mr as backend
    elif scheme in ("", "s3", "file"):
        from sidflow.registry import store as backend
    else:
        raise ValueError(f"registry {registry_uri!r} has an unknown scheme; use one of {', '.join(SCHEMES)}")
    return backend


def check(registry_uri: str) -> None:
    """Raise a one-line error unless the registry can be written: a known scheme, a reachable server that accepts
    the credentials in the environment (S3 or a path: conditional writes work)."""
    if not registry_uri:
        raise ValueError("registry is empty: give s3://bucket/prefix, a path, mlflow+http(s):// or "
                         "kubeflow-mr+http(s)://")
    _backend(registry_uri).check(registry_uri)


def get(registry_uri: str, name: str, version: int) -> Version:
    """Return version `version` of model `name`."""
    check_name(name)
    return _backend(registry_uri).get(registry_uri, name, int(version))


def list_versions(registry_uri: str, name: str, reindex: bool = False) -> list[Version]:
    """Return every version of model `name`, oldest first; `reindex` rebuilds the S3/path index first (the
    servers keep no index of sidflow's)."""
    check_name(name)
    return _backend(registry_uri).list_versions(registry_uri, name, reindex=reindex)


def champion(registry_uri: str, name: str) -> Version | None:
    """Return the champion version of model `name`, or None if none was promoted yet."""
    check_name(name)
    return _backend(registry_uri).champion(registry_uri, name)


def fingerprints(registry_uri: str, name: str) -> set[str]:
    """Return the teacher fingerprints already registered for model `name` (watch_teachers skips these)."""
    return {v.teacher_fingerprint for v in list_versions(registry_uri, name) if v.teacher_fingerprint}


def register(registry_uri: str, name: str, model_uri: str, metrics: dict, teacher_fingerprint: str, run_id: str,
             model_card: str = "", config: dict | None = None) -> Version:
    """Record a new version of model `name` under the next free number and return it; never overwrites one."""
    check_metrics(metrics)
    check_name(name)
    return _backend(registry_uri).register(registry_uri, name, model_uri, metrics, teacher_fingerprint, run_id,
                                           model_card=model_card, config=config)


def promote(registry_uri: str, name: str, version: int, require_better: bool = False,
            clip_floor: float | None = None) -> bool:
    """Make `version` the champion (only if it `beats` the current one when require_better); True if it did."""
    check_name(name)
    return _backend(registry_uri).promote(registry_uri, name, int(version), require_better=require_better,
                                          clip_floor=clip_floor)
