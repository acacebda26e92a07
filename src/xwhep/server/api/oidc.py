"""OpenID Connect discovery for clients: which issuers this server accepts, so ``xw login --oidc`` needs no setup."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from xwhep.server.api import schemas as S
from xwhep.server.api.deps import FastJSON, state_dep
from xwhep.server.state import ServerState

router = APIRouter(prefix="/api/v1")
St = Annotated[ServerState, Depends(state_dep)]


@router.get("/auth/oidc", tags=["public"], response_model=S.Issuers)
async def oidc_issuers(st: St) -> FastJSON:
    """The configured issuers: ``{"issuers": [{"issuer", "audience", "client_id"}, …]}`` (empty when none).

    Public on purpose: it holds nothing secret (the client id is a public client's) and a client asks it
    before it has any credential.
    """
    return FastJSON({"issuers": st.oidc.public_info()})
