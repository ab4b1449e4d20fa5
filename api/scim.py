"""SCIM 2.0 provisioning (`/scim/v2`): what Okta and Entra ID use to push users and groups.

The protocol (validation, filters, PATCH, PUT, ETags, errors in SCIM's own format) is
scim2-server's, without I/O; this module is its storage and its aiohttp binding. Reads come
from this replica's state after a read barrier; every write is a command through Raft
(cluster/scim_apply.py), stamped here with the id, dates and version, so the state machine
stays deterministic. Requests need an API key with the `scim` scope (or `admin`).
"""
from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

from aiohttp import web
from scim2_models import (NotFoundException, PreconditionFailedException, Resource, ResourceType,
                          ResponseParameters, SCIMException, ScimProvider, SearchRequest,
                          ServiceProviderConfig, UnauthorizedException, ForbiddenException,
                          UniquenessException)
from scim2_models import Meta
from scim2_server.applications.base import BaseApplication
from scim2_server.handler import AsyncScimHandler
from scim2_server.memory import InMemoryStorage
from scim2_server.requests import ScimRequest
from scim2_server.responses import ScimResponse
from scim2_server.routing import Operation
from scim2_server.service import ScimService
from scim2_server.storage import AsyncScimStorage, SearchPage, search_page
from scim2_server.utils import load_default_resource_types, load_default_schemas

from raftmesh.cluster.commands import ScimDelete, ScimPut
from raftmesh.cluster.raft import Raft

from . import auth
from .errors import APIError
from .routing import Ctx, _authenticate

PREFIX = "/scim/v2"
SCOPE = "scim"
MAX_RESULTS = 1000
# What this server announces (RFC 7643 §5); no bulk, no password changes.
CONFIG = {
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
    "patch": {"supported": True}, "bulk": {"supported": False, "maxOperations": 0,
                                           "maxPayloadSize": 0},
    "filter": {"supported": True, "maxResults": MAX_RESULTS},
    "changePassword": {"supported": False}, "sort": {"supported": True},
    "etag": {"supported": True},
    "authenticationSchemes": [{"type": "oauthbearertoken", "name": "Bearer token",
                               "description": "a raftmesh API key with the scim scope",
                               "primary": True}],
}


class Unavailable(SCIMException):
    status = 503
    _default_detail = "this replica cannot serve the request now; retry"


class ReplicatedStorage(AsyncScimStorage):
    """SCIM resources in the replicated state; one per request (it writes as its caller)."""

    def __init__(self, ctx: Ctx, service: ScimService):
        self.ctx, self.service = ctx, service

    def _model(self, resource_type: ResourceType) -> type[Resource[Any]]:
        return self.service.get_model(resource_type)

    def _load(self, resource_type: ResourceType, record: dict) -> Resource[Any]:
        return self._model(resource_type).model_validate(record)

    async def get(self, resource_type: ResourceType, resource_id: str, *,
                  response_parameters: ResponseParameters[Any] | None = None) -> Resource[Any]:
        with self.ctx.replica.store.read() as txn:
            record = txn.get("scim", f"{resource_type.name}/{resource_id}")
        if record is None:
            raise NotFoundException(detail=f"{resource_type.name} {resource_id!r} not found")
        return self._load(resource_type, record)

    async def search(self, resource_types: list[ResourceType], search_request: SearchRequest[Any],
                     *, position: Any = None) -> SearchPage:
        """scim2-server's own filtering, sorting and paging, over this replica's resources."""
        found = InMemoryStorage()
        with self.ctx.replica.store.read() as txn:
            found.resources = [self._load(rt, record) for rt in resource_types
                               for _, record in txn.items("scim", rt.name + "/")
                               if record.get("meta", {}).get("resourceType") == rt.name]
        return search_page(found, resource_types, search_request, position)

    async def create(self, resource_type: ResourceType, resource: Resource[Any]) -> Resource[Any]:
        resource = resource.model_copy(deep=True)
        resource.id = uuid.uuid4().hex
        now = _now()
        resource.meta = Meta(resource_type=resource_type.name, created=now, last_modified=now,
                             version=_new_version())
        return await self._put(resource_type, resource, True, None)

    async def update(self, resource_type: ResourceType, resource: Resource[Any], *,
                     expected_version: str | None = None) -> Resource[Any]:
        stored = await self.get(resource_type, resource.id)
        updated = resource.model_copy(deep=True)
        updated.meta = stored.meta.model_copy(update={"location": None, "last_modified": _now(),
                                                      "version": _new_version()})
        return await self._put(resource_type, updated, False, expected_version)

    async def delete(self, resource_type: ResourceType, resource_id: str, *,
                     expected_version: str | None = None) -> None:
        await self._write(ScimDelete(resource_type=resource_type.name, id=resource_id,
                                     expected_version=expected_version))

    async def _put(self, resource_type: ResourceType, resource: Resource[Any], create: bool,
                   expected_version: str | None) -> Resource[Any]:
        record = resource.model_dump(mode="json")
        await self._write(ScimPut(resource_type=resource_type.name, id=resource.id,
                                  resource=record, create=create, expected_version=expected_version))
        return self._load(resource_type, record)

    async def _write(self, cmd) -> dict:
        try:
            return await self.ctx.write(cmd)
        except APIError as e:
            raise _scim_error(e) from None


def _scim_error(e: APIError) -> SCIMException:
    if e.code == "uniqueness":
        return UniquenessException(detail=e.message)
    if e.code == "precondition_failed":
        return PreconditionFailedException(detail=e.message)
    if e.code == "not_found":
        return NotFoundException(detail=e.message)
    if e.status == 401:
        return UnauthorizedException(detail=e.message)
    if e.status == 403:
        return ForbiddenException(detail=e.message)
    if e.status >= 500:
        return Unavailable(detail=f"{e.code}: {e.message}")
    return SCIMException(detail=f"{e.code}: {e.message}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_version() -> str:
    return f'W/"{uuid.uuid4().hex}"'


def provider() -> ScimProvider:
    return ScimProvider.from_discovery(load_default_schemas().values(),
                                       load_default_resource_types().values(),
                                       config=ServiceProviderConfig.model_validate(CONFIG))


class ScimEndpoint(BaseApplication):
    """scim2-server's application steps (errors, headers) served by aiohttp."""

    def __init__(self, replica: Raft):
        super().__init__(provider())
        self.replica = replica

    async def handle(self, request: web.Request) -> web.Response:
        scim_request = ScimRequest(
            method=request.method, base_url=str(request.url.with_path(PREFIX).with_query(None)),
            path=self.split_path(request.path.removeprefix("/scim")), query=dict(request.query),
            headers=list(request.headers.items()), body=await request.read())
        try:
            response = await self._serve(request, scim_request)
        except Exception as exception:  # SCIM errors in SCIM's format (bugs logged as 500)
            response = self.handle_exception(scim_request, exception)
        response = self.finalize_response(scim_request, response)
        body = None if response.body is None else json.dumps(response.body)
        return web.Response(status=int(response.status), text=body, headers=response.headers)

    async def _serve(self, request: web.Request, scim_request: ScimRequest) -> ScimResponse:
        ctx = Ctx(request, self.replica, "anonymous", [])
        if self.service.match(scim_request).operation is not Operation.service_provider_config:
            ctx.actor, ctx.scopes = await self._authenticate(request)
        try:
            await ctx.read_version()
        except APIError as e:
            raise Unavailable(detail=e.message) from None
        return await AsyncScimHandler(self.service, ReplicatedStorage(ctx, self.service)).handle(scim_request)

    async def _authenticate(self, request: web.Request) -> tuple[str, list[str]]:
        try:
            actor, scopes = await _authenticate(request, self.replica)
        except APIError as e:
            raise _scim_error(e) from None
        if not auth.allows(scopes, SCOPE):
            raise ForbiddenException(detail=f"SCIM needs an API key with scope 'scim'; this key "
                                     f"has {scopes}")
        return actor, scopes


def add_routes(app: web.Application, replica: Raft) -> None:
    endpoint = ScimEndpoint(replica)
    app.router.add_route("*", PREFIX, endpoint.handle)
    app.router.add_route("*", PREFIX + "/{tail:.*}", endpoint.handle)
