"""A small typed async client for the parts of the Hathora Cloud API fleetserve uses.

Hathora publishes no Python SDK; the shapes and paths here follow its official SDKs (see
`shared/hathora-api.md`). Every call sends `Authorization: Bearer <HATHORA_TOKEN>` except connection
info (which Hathora serves without auth). Errors become typed exceptions whose messages say what
failed and what to do; a 429 is retried after `Retry-After`, a 5xx or a network error a bounded number
of times with exponential backoff. The token never appears in a message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import time
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("fleetserve.hathora")

DEFAULT_API_URL = "https://api.hathora.dev"

REGIONS = ("Seattle", "Los_Angeles", "Washington_DC", "Chicago", "London", "Frankfurt", "Mumbai", "Singapore",
           "Tokyo", "Sydney", "Sao_Paulo", "Dallas", "Johannesburg", "Dubai")

TransportType = Literal["tcp", "udp", "tls"]


# ---------------------------------------------------------------------------------------------- errors

class HathoraError(RuntimeError):
    """A Hathora API call failed. `status` is the HTTP status (None for a network failure)."""

    hint = ""

    def __init__(self, operation: str, status: int | None, message: str):
        self.operation, self.status, self.detail = operation, status, message
        code = f"HTTP {status}" if status is not None else "no response"
        text = f"Hathora API {operation} failed ({code}): {message}"
        super().__init__(f"{text}. {self.hint}" if self.hint else text)


class HathoraBadRequest(HathoraError):
    hint = "The request was rejected as invalid; check the deployment spec (region, image, cpu, memory_mb)"


class HathoraAuthError(HathoraError):
    hint = "Check HATHORA_TOKEN: it must be a valid Hathora developer token for the app's organisation"


class HathoraPaymentRequired(HathoraError):
    hint = "The Hathora organisation needs a payment method or more credit"


class HathoraNotFound(HathoraError):
    hint = "Check HATHORA_APP_ID (or remove it to let fleetserve create an app)"


class HathoraValidationError(HathoraBadRequest):
    pass


class HathoraRateLimited(HathoraError):
    hint = "Hathora kept answering 429 Too Many Requests after the retries; try again later"


class HathoraServerError(HathoraError):
    hint = "Hathora's API had a server error after the retries; see https://status.hathora.dev"


class HathoraUnavailable(HathoraError):
    hint = "Could not reach the Hathora API; check HATHORA_API_URL and the network"


_BY_STATUS: dict[int, type[HathoraError]] = {400: HathoraBadRequest, 401: HathoraAuthError, 403: HathoraAuthError,
                                             402: HathoraPaymentRequired, 404: HathoraNotFound,
                                             422: HathoraValidationError, 429: HathoraRateLimited}


# ---------------------------------------------------------------------------------------------- models

class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Application(_Model):
    app_id: str = Field(alias="appId")
    app_name: str | None = Field(None, alias="appName")


class BuildV3(_Model):
    build_id: str = Field(alias="buildId")
    status: Literal["created", "running", "succeeded", "failed"]
    build_tag: str | None = Field(None, alias="buildTag")


class EnvVar(_Model):
    name: str
    value: str


class ContainerPort(_Model):
    transport_type: TransportType = Field(alias="transportType")
    port: int
    name: str | None = None


class DeploymentConfigV3(_Model):
    """The create-deployment body (all fields but the GPU and tag are required by Hathora)."""

    build_id: str = Field(alias="buildId")
    idle_timeout_enabled: bool = Field(alias="idleTimeoutEnabled")
    env: list[EnvVar]
    rooms_per_process: int = Field(alias="roomsPerProcess")
    transport_type: TransportType = Field(alias="transportType")
    container_port: int = Field(alias="containerPort")
    requested_memory_mb: float = Field(alias="requestedMemoryMB")
    requested_cpu: float = Field(alias="requestedCPU")
    requested_gpu: int | None = Field(None, alias="requestedGPU")
    deployment_tag: str | None = Field(None, alias="deploymentTag")

    def body(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)

    def __repr__(self) -> str:  # env holds secrets: never print the values
        return (f"DeploymentConfigV3(build_id={self.build_id!r}, env=[{', '.join(e.name for e in self.env)}], "
                f"cpu={self.requested_cpu}, memory_mb={self.requested_memory_mb})")

    __str__ = __repr__


class DeploymentV3(_Model):
    deployment_id: str = Field(alias="deploymentId")
    build_id: str = Field(alias="buildId")
    app_id: str | None = Field(None, alias="appId")
    deployment_tag: str | None = Field(None, alias="deploymentTag")
    build_tag: str | None = Field(None, alias="buildTag")
    env_names: list[str] = Field(default_factory=list)  # names only: values never kept in memory twice

    @classmethod
    def parse(cls, data: dict[str, Any]) -> DeploymentV3:
        out = cls.model_validate(data)
        out.env_names = [e.get("name", "") for e in data.get("env") or []]
        return out


class ExposedPort(_Model):
    host: str
    port: int
    transport_type: TransportType = Field(alias="transportType")
    name: str | None = None


class RoomConnection(_Model):
    """Create-room answer and connection info: `exposed_port` appears once the room's process runs."""

    room_id: str = Field(alias="roomId")
    process_id: str | None = Field(None, alias="processId")
    status: str  # starting | active (Hathora may add values: kept as a string)
    exposed_port: ExposedPort | None = Field(None, alias="exposedPort")


ProcessStatus = Literal["starting", "running", "draining", "stopping", "stopped", "failed"]


class ProcessV3(_Model):
    process_id: str = Field(alias="processId")
    status: str  # ProcessStatus; unknown future values are kept rather than rejected
    region: str | None = None
    deployment_id: str | None = Field(None, alias="deploymentId")
    exposed_port: ExposedPort | None = Field(None, alias="exposedPort")
    started_at: str | None = Field(None, alias="startedAt")
    stopping_at: str | None = Field(None, alias="stoppingAt")
    terminated_at: str | None = Field(None, alias="terminatedAt")


class MetricValue(_Model):
    timestamp: float | str
    value: float


# ---------------------------------------------------------------------------------------------- client

def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:  # an HTTP date
        return max(0.0, email.utils.parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HathoraClient:
    """One client per token; safe to share between tasks. Close with `aclose()`."""

    def __init__(self, token: str, base_url: str = DEFAULT_API_URL, *, timeout_s: float = 30.0,
                 max_retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None, sleep=asyncio.sleep):
        if not token:
            raise HathoraAuthError("configuration", None, "HATHORA_TOKEN is not set")
        self._token = token
        self.base_url = base_url.rstrip("/")
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.sleep = sleep  # how backoff waits (tests record the delays instead)
        # httpx honours SSL_CERT_FILE / SSL_CERT_DIR for the CA bundle (trust_env, the default)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=transport,
                                       headers={"User-Agent": "fleetserve"})

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **kw) -> HathoraClient:
        env = os.environ if env is None else env
        return cls(env.get("HATHORA_TOKEN", ""), env.get("HATHORA_API_URL") or DEFAULT_API_URL, **kw)

    def __repr__(self) -> str:
        return f"HathoraClient(base_url={self.base_url!r}, token=***)"

    async def aclose(self) -> None:
        await self._http.aclose()

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    async def _request(self, operation: str, method: str, path: str, *, json: Any = None,
                       params: Any = None, auth: bool = True, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._token}"} if auth else {}
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self._http.request(method, path, json=json, params=params, headers=headers)
            except httpx.HTTPError as exc:
                if attempt > self.max_retries:
                    raise HathoraUnavailable(operation, None, self._redact(f"{type(exc).__name__}: {exc}")) from None
                await self._sleep(operation, attempt, None, f"network error {type(exc).__name__}")
                continue
            if resp.status_code in ok:
                return resp
            retryable = resp.status_code == 429 or resp.status_code >= 500
            if retryable and attempt <= self.max_retries:
                await self._sleep(operation, attempt, _retry_after(resp) if resp.status_code == 429 else None,
                                  f"HTTP {resp.status_code}")
                continue
            raise self._error(operation, resp)

    async def _sleep(self, operation: str, attempt: int, retry_after: float | None, why: str) -> None:
        delay = retry_after if retry_after is not None else self.backoff_s * 2 ** (attempt - 1)
        delay = min(delay, self.max_backoff_s)
        log.warning("Hathora API %s: %s; retrying in %.1fs (attempt %d of %d)", operation, why, delay,
                    attempt + 1, self.max_retries + 1)
        await self.sleep(delay)

    def _error(self, operation: str, resp: httpx.Response) -> HathoraError:
        try:
            body = resp.json()
            message = body.get("message") if isinstance(body, dict) else None
            message = str(message) if message else resp.text[:500]
        except ValueError:
            message = resp.text[:500]
        message = self._redact(message.strip() or resp.reason_phrase or "no message")
        status = resp.status_code
        cls = _BY_STATUS.get(status) or (HathoraServerError if status >= 500 else HathoraError)
        return cls(operation, status, message)

    # ---- apps

    async def create_app(self, app_name: str, auth_configuration: dict[str, Any] | None = None) -> Application:
        body = {"appName": app_name, "authConfiguration": auth_configuration or {"anonymous": {}}}
        resp = await self._request("create app", "POST", "/apps/v2/apps", json=body, ok=(200, 201))
        return Application.model_validate(resp.json())

    async def get_app(self, app_id: str) -> Application:
        resp = await self._request("get app", "GET", f"/apps/v2/apps/{app_id}")
        return Application.model_validate(resp.json())

    # ---- builds (v3, from a registry image)

    async def create_registry_build(self, build_tag: str | None = None, build_id: str | None = None) -> BuildV3:
        body = {k: v for k, v in (("buildTag", build_tag), ("buildId", build_id)) if v is not None}
        resp = await self._request("create build", "POST", "/builds/v3/builds/registry", json=body, ok=(200, 201))
        return BuildV3.model_validate(resp.json())

    async def run_registry_build(self, build_id: str, image: str, registry_url: str | None = None,
                                 auth: str | None = None) -> str:
        """Runs the build (Hathora pulls the image); returns the build log Hathora streams back."""
        body = {"image": image, **({"registryUrl": registry_url} if registry_url else {}),
                **({"auth": auth} if auth else {})}
        resp = await self._request("run build", "POST", f"/builds/v3/builds/{build_id}/runRegistry", json=body)
        return resp.text

    async def get_build(self, build_id: str) -> BuildV3:
        resp = await self._request("get build", "GET", f"/builds/v3/builds/{build_id}")
        return BuildV3.model_validate(resp.json())

    # ---- deployments (v3)

    async def create_deployment(self, app_id: str, config: DeploymentConfigV3) -> DeploymentV3:
        resp = await self._request("create deployment", "POST", f"/deployments/v3/apps/{app_id}/deployments",
                                   json=config.body(), ok=(200, 201))
        return DeploymentV3.parse(resp.json())

    async def latest_deployment(self, app_id: str) -> DeploymentV3 | None:
        """The app's newest deployment, or None when it has none (Hathora answers 404)."""
        try:
            resp = await self._request("get latest deployment", "GET",
                                       f"/deployments/v3/apps/{app_id}/deployments/latest")
        except HathoraNotFound:
            return None
        return DeploymentV3.parse(resp.json())

    # ---- rooms (v2)

    async def create_room(self, app_id: str, region: str, deployment_id: str | None = None,
                          room_id: str | None = None, room_config: str | None = None) -> RoomConnection:
        if region not in REGIONS:
            raise HathoraValidationError("create room", None, f"unknown region {region!r}; one of {', '.join(REGIONS)}")
        body: dict[str, Any] = {"region": region}
        if deployment_id is not None:
            body["deploymentId"] = deployment_id
        if room_config is not None:
            body["roomConfig"] = room_config
        resp = await self._request("create room", "POST", f"/rooms/v2/{app_id}/create", json=body,
                                   params={"roomId": room_id} if room_id else None, ok=(200, 201))
        return RoomConnection.model_validate(resp.json())

    async def connection_info(self, app_id: str, room_id: str) -> RoomConnection:
        resp = await self._request("get connection info", "GET", f"/rooms/v2/{app_id}/connectioninfo/{room_id}",
                                   auth=False)
        return RoomConnection.model_validate(resp.json())

    async def destroy_room(self, app_id: str, room_id: str) -> None:
        await self._request("destroy room", "POST", f"/rooms/v2/{app_id}/destroy/{room_id}", ok=(200, 204))

    # ---- processes (v3)

    async def get_process(self, app_id: str, process_id: str) -> ProcessV3:
        resp = await self._request("get process", "GET", f"/processes/v3/apps/{app_id}/processes/{process_id}")
        return ProcessV3.model_validate(resp.json())

    async def latest_processes(self, app_id: str, status: list[str] | None = None,
                               region: list[str] | None = None) -> list[ProcessV3]:
        params = [("status", s) for s in status or []] + [("region", r) for r in region or []]
        resp = await self._request("list latest processes", "GET", f"/processes/v3/apps/{app_id}/processes/latest",
                                   params=params or None)
        return [ProcessV3.model_validate(p) for p in resp.json()]

    async def stop_process(self, app_id: str, process_id: str) -> None:
        await self._request("stop process", "POST", f"/processes/v3/apps/{app_id}/processes/{process_id}/stop",
                            ok=(200, 204))

    async def process_metrics(self, app_id: str, process_id: str,
                              metrics: tuple[str, ...] = ("cpu", "memory")) -> dict[str, list[MetricValue]]:
        resp = await self._request("get process metrics", "GET",
                                   f"/processes/v3/apps/{app_id}/processes/process/{process_id}/metrics",
                                   params=[("metrics", m) for m in metrics])
        return {k: [MetricValue.model_validate(v) for v in vals] for k, vals in resp.json().items()
                if isinstance(vals, list)}

    # ---- logs (v1)

    async def process_logs(self, app_id: str, process_id: str, tail_lines: int = 100) -> list[str]:
        resp = await self._request("get process logs", "GET", f"/logs/v1/{app_id}/process/{process_id}",
                                   params={"tailLines": tail_lines, "follow": "false"})
        return resp.text.splitlines()[-tail_lines:] if tail_lines else resp.text.splitlines()
