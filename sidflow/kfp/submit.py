"""Submit the compiled sid-distill pipeline to a KFP API server, or schedule it, with typed parameter overrides.

    sidflow pipeline submit   [--host URL] [--namespace NS] [--experiment NAME] [--pipeline-root URI] key=value ...
    sidflow pipeline schedule [--host URL] ... --cron "0 0 3 * * *" key=value ...

Each `key=value` is parsed into the type the compiled pipeline declares for `key` (root.inputDefinitions), so the
API server receives JSON booleans and numbers. `kfp recurring-run create` sends every value as a string, which the
backend rejects for bool/int/float parameters, and `kfp run create` turns a numeric-looking string into a number
(README, "Run on a cluster"). A recurring run is always created enabled, with max_concurrency 1 and no catch-up.
"""

import contextlib
import difflib
import json
import math
import sys
import typing
from pathlib import Path

import yaml

from sidflow.kfp import sid_distill
from sidflow.kfp.compile import DEFAULT_OUT

KFP_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "STRUCT": dict,
             "LIST": list}
# The run parameters declared required (config.param): empty by default, and a run cannot do without them. The evaluate
# inputs are checked here because the evaluate task would otherwise fail only after the whole distill; finetune's
# only when finetune is on (check_required).
REQUIRED = tuple(p.name for p in sid_distill.PARAMS if p.required and p not in sid_distill.FINETUNE)
MAX_CONCURRENCY = 1  # two distills of one schedule never overlap
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly", "@every ")


def parameters(spec: dict) -> dict[str, tuple[type, typing.Any]]:
    """Return {name: (Python type, default)} of a pipeline spec's parameters (the first document of the IR YAML)."""
    params = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    return {name: (KFP_TYPES[p["parameterType"]], p.get("defaultValue")) for name, p in params.items()}


def package_parameters(package: str) -> dict[str, tuple[type, typing.Any]]:
    """Return {name: (Python type, default)} of the pipeline compiled at `package`."""
    return parameters(next(yaml.safe_load_all(Path(package).read_text())))


def parse_value(name: str, tp: type, text: str) -> typing.Any:
    """Return `text` converted to `tp` as the CLI converts a flag (sidflow.config.coerce), or raise a one-line
    ValueError naming the parameter; numbers must be finite."""
    from sidflow.config import coerce

    if tp is str and len(text) >= 2 and text[0] == text[-1] == '"':  # `kfp run create` habit: '"2024"' quotes a string
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(text)
    value = coerce(name, tp, text.strip() if tp is not str else text)
    if tp in (int, float) and not math.isfinite(value):
        raise ValueError(f"{name}={text!r} is not a finite number")
    return value


POD_COUNTS = ("gpus", "eval_gpus")  # become a pod's GPU request at run time: 'all' (fine on the CLI) cannot work
AUTO = "auto"  # = sidflow.sizing.AUTO: the sizing parameters' default, the teacher type's preset


def parse_overrides(pairs: list[str], params: dict[str, tuple[type, typing.Any]],
                    pipeline: str = "sid-distill") -> dict[str, typing.Any]:
    """Return {name: typed value} of `key=value` strings; anything malformed or unknown is a one-line ValueError."""
    split = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{pair!r} is not key=value")
        split.append((key.strip(), text))
    from sidflow.kfp.tasks import checked_overrides, override_keys

    # A setting without a run parameter of its own (None default, or left off the run form) goes into `overrides`.
    keys, routed = (override_keys() if "overrides" in params else {}), {}
    for key, text in split:
        if key not in params and key in keys:
            if key in routed:
                raise ValueError(f"{key} is given twice")
            routed[key] = text
    split = [(k, text) for k, text in split if k not in routed]
    unknown = [k for k, _ in split if k not in params]
    if unknown:
        close = difflib.get_close_matches(unknown[0], params, n=1)
        hint = f" (did you mean {close[0]}?)" if len(unknown) == 1 and close else ""
        raise ValueError(f"unknown {pipeline} parameter(s): {', '.join(unknown)}{hint}")
    out = {}
    for key, text in split:
        if key in out:
            raise ValueError(f"{key} is given twice")
        out[key] = parse_value(key, params[key][0], text)
        if key == "overrides":
            out[key] = checked_overrides(out[key])
        choices = _choices().get(key)
        if choices and out[key] not in choices:
            raise ValueError(f"{key}={out[key]!r} is not one of {list(choices)}")
        if key in POD_COUNTS and out[key] != AUTO and not (str(out[key]).isdigit() and int(out[key]) >= 1):
            raise ValueError(f"{key}={out[key]!r} must be a count or auto here: the pod requests that many GPUs")
    if routed:
        twice = sorted(set(routed) & set(out.get("overrides", {})))
        if twice:
            raise ValueError(f"{twice[0]} is given twice: as {twice[0]}=... and in overrides")
        out["overrides"] = {**out.get("overrides", {}), **checked_overrides(routed)}
    return out


def check_required(arguments: dict, params: dict[str, tuple[type, typing.Any]]) -> None:
    """Raise a one-line ValueError if a parameter in REQUIRED would be empty in the run."""
    value = lambda name: arguments.get(name, params[name][1]) if name in params else None  # noqa: E731
    for name in REQUIRED:
        if name in params and not value(name):
            raise ValueError(f"{name} is empty: pass {name}=<URI>")
    if value("eval_features") == "inception" and "inception_weights" in params and not value("inception_weights"):
        raise ValueError("inception_weights is empty: pass inception_weights=<URI of inception-2015-12-05.pt> (FID "
                         "features; or eval_features=toy:<evaluator URI>)")
    if value("finetune") and "finetune_data" in params and not value("finetune_data"):
        raise ValueError("finetune_data is empty: finetune=true needs finetune_data=<URI of text-image pairs> "
                         "(sidflow data pack writes them)")


def check_cron(cron: str) -> None:
    """Raise a one-line ValueError unless `cron` is a 6-field (seconds first) expression or a descriptor."""
    fields = cron.split()
    if cron.startswith(CRON_DESCRIPTORS) or len(fields) == 6:
        return
    example = "'0 0 3 * * *' = 03:00:00 every day"
    if len(fields) == 5:
        raise ValueError(f"cron {cron!r} has 5 fields, which KFP reads as 'second minute hour day month'; "
                         f"it needs 6 fields, seconds first: {example}")
    raise ValueError(f"cron {cron!r} must have 6 fields, seconds first ({example}), or be a descriptor like @daily")


def connect(host: str | None = None, namespace: str | None = None, existing_token: str | None = None):
    """Return a kfp.Client; host None: $KF_PIPELINES_ENDPOINT, then in-cluster or kubeconfig discovery."""
    import kfp

    with _api_errors(host), contextlib.redirect_stdout(sys.stderr):
        return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=existing_token)


def submit(client, arguments: dict, package: str = DEFAULT_OUT, experiment: str = "sidflow",
           run_name: str | None = None, namespace: str | None = None, pipeline_root: str | None = None,
           service_account: str | None = None) -> dict:
    """Start one run of the compiled pipeline; return {"run_id", "experiment", "url"}."""
    with _api_errors(client), contextlib.redirect_stdout(sys.stderr):  # kfp prints its own links; stdout is ours
        run = client.create_run_from_pipeline_package(
            package, arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace,
            pipeline_root=pipeline_root, service_account=service_account)
    return {"run_id": run.run_id, "experiment": experiment, "url": f"{_ui(client)}/#/runs/details/{run.run_id}"}


def schedule(client, arguments: dict, cron: str, name: str = "sid-distill", package: str = DEFAULT_OUT,
             experiment: str = "sidflow", namespace: str | None = None, pipeline_root: str | None = None,
             service_account: str | None = None) -> dict:
    """Create an enabled recurring run (max_concurrency 1, no catch-up); return {"recurring_run_id", ..., "url"}."""
    check_cron(cron)
    with _api_errors(client), contextlib.redirect_stdout(sys.stderr):
        exp = client.create_experiment(experiment, namespace=namespace)
        job = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=name, cron_expression=cron, max_concurrency=MAX_CONCURRENCY,
            no_catchup=True, enabled=True, params=arguments, pipeline_package_path=package,
            pipeline_root=pipeline_root, service_account=service_account)
    rid = job.recurring_run_id
    return {"recurring_run_id": rid, "experiment": experiment, "cron": cron,
            "url": f"{_ui(client)}/#/recurringrun/details/{rid}"}


def _ui(client) -> str:
    return client._get_url_prefix()  # the UI address kfp.Client resolved (ui_host, $KF_PIPELINES_UI_ENDPOINT, host)


@contextlib.contextmanager
def _api_errors(where):
    """Turn API and connection errors into one-line ConnectionErrors."""
    import kfp_server_api
    import urllib3

    host = where if isinstance(where, str) or where is None else where._existing_config.host
    try:
        yield
    except kfp_server_api.ApiException as e:
        try:
            detail = json.loads(e.body or "{}")
            detail = detail.get("message") or detail.get("error") or e.body
        except (TypeError, ValueError):
            detail = e.body
        raise ConnectionError(f"KFP API at {host}: {e.status} {e.reason}: {' '.join(str(detail).split())}") from None
    except (urllib3.exceptions.HTTPError, TimeoutError) as e:
        raise ConnectionError(f"cannot reach the KFP API at {host}: {' '.join(str(e).split())}") from None


def _choices() -> dict[str, tuple]:
    from sidflow.kfp.sid_distill import PARAMS

    return {p.name: p.choices for p in PARAMS if p.choices}
