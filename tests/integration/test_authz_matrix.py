"""The authorisation matrix, generated from the gateway's own OpenAPI spec: every
operation x (no key, a wrong key, a key of each scope, a key of each tenant) answers
exactly 401, 403 or admits the request, as the operation's declared scope says. A new
endpoint is in the spec, so it is in the matrix; one without a declared scope fails."""

from __future__ import annotations

import base64
import uuid

import pytest
from e2e_support import MODEL, wait_for

from embedstream.gateway.auth import ANY, PUBLIC_SCOPE, SCOPE_EXTENSION, SCOPES

TENANTS = ("tenant-a", "tenant-b")  # the scoped gateway's tenant-bound keys (conftest)
CALLERS = [None, "wrong", *SCOPES, "all", *TENANTS]
# Bodies of the operations we know, so the all-scopes key's answer must be a success.
# Unknown operations are sent without a body: still admitted or refused by the matrix.
_MEDIA = base64.b64encode(b"not really a picture").decode()
BODIES = {
    ("post", "/v1/events/text"): [{"text": "authorisation matrix"}],
    ("post", "/v1/events/image"): [{"data": _MEDIA}],
    ("post", "/v1/events/audio"): [{"data": _MEDIA}],
    ("post", "/v1/search"): {"text": "authorisation matrix", "k": 1},
    ("post", "/v1/embeddings"): {"model": MODEL, "input": "authorisation matrix"},
}


def refusal(res) -> tuple[str, str]:
    """(code, message) of a refusal: ours, or OpenAI's error shape on its endpoint."""
    body = res.json()
    if isinstance(body.get("error"), dict):
        return body["error"]["code"], body["error"]["message"]
    return body["error"], body["detail"]


def expected(scope: str, caller: str | None) -> int | str:
    if scope == PUBLIC_SCOPE:
        return "admitted"
    if caller in (None, "wrong"):
        return 401
    if scope == ANY or caller == "all" or caller in TENANTS or caller == scope:
        return "admitted"
    return 403


@pytest.fixture(scope="module")
def stored_id(scoped_gateway) -> str:
    """An untenanted document the all-scopes key can read."""
    event_id = f"matrix-{uuid.uuid4().hex[:8]}"
    client = scoped_gateway.client
    res = client.post("/v1/events/text", json=[{"id": event_id, "text": "matrix"}],
                      headers=scoped_gateway.as_key("all"))
    assert res.status_code == 202
    assert wait_for(lambda: client.get(f"/v1/embeddings/{MODEL}/{event_id}",
                                       headers=scoped_gateway.as_key("all")).status_code == 200)
    return event_id


def test_every_operation_answers_each_caller_as_its_scope_says(scoped_gateway, stored_id):
    client = scoped_gateway.client
    spec = client.get("/openapi.json").json()
    operations = [(path, method, op) for path, item in spec["paths"].items()
                  for method, op in item.items()]
    assert len(operations) >= 9
    mismatches = []
    for path, method, op in operations:
        scope = op.get(SCOPE_EXTENSION)
        assert scope in (*SCOPES, ANY, PUBLIC_SCOPE), f"{method} {path} declares no scope"
        url = path.format(model=MODEL, event_id=stored_id if method == "get" else
                          f"matrix-gone-{uuid.uuid4().hex[:6]}")
        for caller in CALLERS:
            headers = {"X-API-Key": "not-a-key"} if caller == "wrong" else \
                scoped_gateway.as_key(caller)
            body = BODIES.get((method, path))
            res = client.request(method.upper(), url, headers=headers,
                                 **({"json": body} if body is not None else {}))
            want = expected(scope, caller)
            got: int | str = res.status_code
            if res.status_code not in (401, 403) and res.status_code < 500:
                got = "admitted"
            if got != want:
                mismatches.append(f"{method.upper()} {path} [{scope}] as {caller}: "
                                  f"{res.status_code} {res.text[:120]}, want {want}")
            elif caller == "all" and ((method, path) in BODIES or method in ("get", "delete")):
                assert res.status_code < 300, f"{method} {path}: {res.status_code} {res.text}"
            if want == 403:
                code, message = refusal(res)
                assert code == "forbidden" and f"'{scope}'" in message
    assert mismatches == []
