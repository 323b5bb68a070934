"""JSON over HTTP for the registry servers (MLflow, Kubeflow Model Registry): one request, one-line errors.

Plain urllib: both servers speak documented REST, and their Python clients would bring a large dependency tree
into the runtime image for a dozen calls.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

from sidflow.registry.rule import RegistryError

TIMEOUT_S = 60


def call(method: str, url: str, body: dict | None = None, headers: dict | None = None,
         context: ssl.SSLContext | None = None, query: dict | None = None) -> tuple[int, dict]:
    """Send one request; return (status, decoded JSON body) for any HTTP answer, raise RegistryError when there
    is none (refused, unresolvable, timed out, TLS failure)."""
    if query:
        url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Accept": "application/json", **({"Content-Type": "application/json"} if data is not None else {}),
        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S, context=context) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryError(f"{method} {url.split('?')[0]}: no answer ({reason})") from None
    try:
        return status, json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return status, {"message": raw[:200].decode(errors="replace")}
