"""Walk the whole OpenAPI document: every operation but the declared public ones refuses an anonymous request."""

from __future__ import annotations

import ssl
import uuid

import httpx
import pytest
from cluster import ServerProc

PUBLIC_TAG = "public"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> ServerProc:
    s = ServerProc(home=tmp_path_factory.mktemp("openapi")).start()
    yield s
    s.stop()


def test_every_non_public_operation_refuses_anonymous(srv: ServerProc) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca)), base_url=srv.url) as http:
        doc = http.get("/openapi.json").json()
        public, checked = [], []
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if method not in ("get", "post", "put", "delete", "patch"):
                    continue
                if PUBLIC_TAG in op.get("tags", []):
                    public.append(f"{method.upper()} {path}")
                    continue
                url = path
                for param in op.get("parameters", []):
                    if param["in"] == "path":
                        url = url.replace("{" + param["name"] + "}", str(uuid.uuid4()))
                r = http.request(method.upper(), url, json={} if method in ("post", "put", "patch") else None)
                assert r.status_code == 401, f"{method.upper()} {path} answered {r.status_code} to an anonymous call"
                assert "error" in r.json()
                # a forged token is no better than none
                r = http.request(method.upper(), url, headers={"Authorization": "Bearer forged.token.value"},
                                 json={} if method in ("post", "put", "patch") else None)
                assert r.status_code == 401, f"{method.upper()} {path} accepted a forged token"
                checked.append(f"{method.upper()} {path}")
        assert len(checked) > 30, "the walk found too few operations"
        # the public ones are exactly what we declare public
        assert {p.split()[1] for p in public} <= {"/api/v1/health", "/api/v1/version", "/api/v1/auth/login",
                                                   "/api/v1/auth/oidc", "/api/v1/auth/x509/challenge",
                                                   "/api/v1/auth/x509", "/api/v1/auth/host"}
