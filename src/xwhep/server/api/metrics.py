"""``GET /metrics``: the Prometheus text exposition (server/metrics.py).

Who may scrape: a bearer token equal to ``HOME/metrics.token`` (made at the first start; point Prometheus'
``authorization.credentials_file`` at a copy of it), or an administrator's token. Anybody else: 401, or 403 for
an authenticated non-administrator. Labels never carry logins (owner classes are user group labels).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from xwhep.server.api.deps import authenticate, state_dep
from xwhep.server.errors import ApiError
from xwhep.server.metrics import CONTENT_TYPE, check_token, metrics_token
from xwhep.server.state import ServerState

router = APIRouter(tags=["metrics"])
St = Annotated[ServerState, Depends(state_dep)]


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "The Prometheus text exposition format",
    "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}}})
async def metrics(request: Request, st: St) -> Response:
    """Prometheus metrics: works by status and owner class, dispatch and report rates, queue age, hosts alive by
    sharing, tunnels, transfers, request latencies, the server process. Needs the metrics token or an
    administrator's token."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if st.metrics.token is None:
        st.metrics.token = metrics_token(st.config.home)
    if not (scheme.lower() == "bearer" and check_token(token.strip(), st.metrics.token)):
        ident = await authenticate(st, header)
        request.state.ident = ident
        if not ident.is_admin:
            raise ApiError(403, f"{ident.login} may not read the metrics: scrape with the metrics token "
                                "(HOME/metrics.token) or an administrator's token")
    return Response(await st.metrics.render(st), media_type=CONTENT_TYPE)
