"""`flowers loadtest`: closed-loop HTTP clients against a predict route, one concurrency level at a time.

Method (written into the result beside the figures): at each level, `concurrency` clients each send
a request, wait for its answer and send the next (a closed loop: the offered load adapts to the
server, as real synchronous callers do). Each request carries `instances` real photos (the files'
own bytes, rotated through the photo set) in the chosen protocol: v1 {"instances": [{"b64": ...}]},
v2 the Open Inference Protocol's BYTES input "photos" as base64 JSON strings, v2-binary the same
input as raw bytes with Triton's binary-data extension (and binary outputs, tritonclient's
default). A level first sends `concurrency` untimed warm-up requests, then runs until `requests`
answers or `duration_s` seconds, whichever comes first. Latency is client-side: request sent to
answer read, successful requests only. requests/s counts every answer, images/s only successful
ones.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from flowers.errors import FlowersError

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
MAX_PHOTOS = 64
DEFAULT_ROUTE = "/predict"
PROTOCOLS = ("v1", "v2", "v2-binary")


@dataclass(frozen=True)
class LoadSettings:
    url: str  # the full predict URL
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int = 2000  # per level
    duration_s: float = 60.0  # per level
    instances: int = 1  # photos per request
    timeout_s: float = 30.0  # per request
    protocol: str = "v1"  # the body: one of PROTOCOLS

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise FlowersError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if not self.concurrency or min(self.concurrency) < 1 or max(self.concurrency) > 1024:
            raise FlowersError(f"--concurrency levels must be 1..1024, not {list(self.concurrency)}")
        for name, value in (("--requests", self.requests), ("--instances", self.instances)):
            if value < 1:
                raise FlowersError(f"{name} must be at least 1, not {value}")
        for name, value in (("--duration-s", self.duration_s), ("--timeout-s", self.timeout_s)):
            if not 0 < value <= 3600:
                raise FlowersError(f"{name} must be within (0, 3600], not {value}")


def parse_levels(text: str) -> tuple[int, ...]:
    """"1,4,16" -> (1, 4, 16)."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FlowersError(f"--concurrency must be comma-separated whole numbers, not {text!r}") from None
    if not levels:
        raise FlowersError("--concurrency names no level")
    return levels


def parse_protocols(text: str) -> tuple[str, ...]:
    """"v1,v2" -> ("v1", "v2"), each one of PROTOCOLS."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown or not names:
        raise FlowersError(f"--protocols takes a comma-separated list of {', '.join(PROTOCOLS)}, "
                           f"not {text!r}")
    return names


def predict_url(url: str, route: str | None, allow_remote: bool, protocol: str = "v1") -> str:
    """The URL to load: `route`, else the URL's path, else the protocol's route (v1: /predict;
    v2: /v2/models/<the model>/infer, the model named by the server's GET /v2/models).

    Raises:
        FlowersError: not an http(s) URL, a host that is not this machine without allow_remote, or a
            v2 server that does not say its model.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FlowersError(f"not an http:// or https:// URL: {url!r}")
    if not allow_remote and not _is_loopback(parts.hostname):
        raise FlowersError(f"{parts.hostname} is not this machine; a load test sends thousands of "
                           "requests, so other hosts need --allow-remote")
    base = f"{parts.scheme}://{parts.netloc}"
    path = route or (parts.path if parts.path not in ("", "/") else None)
    if path is None:
        path = DEFAULT_ROUTE if protocol == "v1" else f"/v2/models/{_served_model(base)}/infer"
    return f"{base}{path if path.startswith('/') else '/' + path}"


def _served_model(base: str) -> str:
    """The one model a v2 server lists at GET /v2/models (KServe's and flowers' model list)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base}/v2/models", timeout=10) as response:
            models = json.loads(response.read()).get("models")
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as exc:
        raise FlowersError(f"cannot read the model name from {base}/v2/models ({exc}); give the "
                           "infer URL, e.g. http://127.0.0.1:8080/v2/models/<name>/infer") from None
    if not isinstance(models, list) or len(models) != 1 or not isinstance(models[0], str):
        raise FlowersError(f"{base}/v2/models lists {models!r}, not one model; give the infer URL")
    return models[0]


def request_bodies(protocol: str, photos: Sequence[str], instances: int) -> list[tuple[bytes, dict]]:
    """(body, headers) of each request: `instances` photos each, rotated through the set."""
    from flowers.serve import oip_codec

    bodies = []
    for first in range(len(photos)):
        chosen = [photos[(first + k) % len(photos)] for k in range(instances)]
        if protocol == "v1":
            content = {"instances": [{"b64": photo} for photo in chosen]}
        elif protocol == "v2":
            content = {"inputs": [{"name": oip_codec.PHOTOS, "datatype": "BYTES",
                                   "shape": [instances], "data": chosen}]}
        else:
            raw = oip_codec.serialize_bytes([base64.b64decode(photo) for photo in chosen])
            header = json.dumps({"inputs": [{"name": oip_codec.PHOTOS, "datatype": "BYTES",
                                             "shape": [instances],
                                             "parameters": {"binary_data_size": len(raw)}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            bodies.append((header + raw, {"Content-Type": "application/octet-stream",
                                          oip_codec.HEADER_LENGTH: str(len(header))}))
            continue
        bodies.append((json.dumps(content).encode(), {"Content-Type": "application/json"}))
    return bodies


def load_photos(folder: Path, limit: int = MAX_PHOTOS) -> list[str]:
    """Base64 of up to `limit` JPEG/PNG files under folder (sorted, so runs send the same photos)."""
    if not folder.is_dir():
        raise FlowersError(f"images folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if not files:
        raise FlowersError(f"no .jpg, .jpeg or .png files under {folder}")
    return [base64.b64encode(p.read_bytes()).decode("ascii") for p in files[:limit]]


def run_loadtest(settings: LoadSettings, photos: Sequence[str]) -> dict[str, Any]:
    """Every concurrency level in turn; returns {"url", "settings", "method", "levels": [...]}."""
    bodies = request_bodies(settings.protocol, photos, settings.instances)
    levels = [asyncio.run(_level(settings, bodies, c)) for c in settings.concurrency]
    return {"url": settings.url, "settings": asdict(settings), "photos": len(photos),
            "method": __doc__.split("Method (written into the result beside the figures): ")[1].strip(),
            "levels": levels}


def render_table(result: dict[str, Any]) -> str:
    header = ("concurrency", "requests", "errors", "requests/s", "images/s", "p50 ms", "p95 ms",
              "p99 ms")
    rows = [header]
    for level in result["levels"]:
        rows.append((str(level["concurrency"]), str(level["requests"]), str(level["errors"]),
                     f"{level['requests_per_s']:.1f}", f"{level['images_per_s']:.1f}",
                     *(_ms(level[f"latency_{p}_ms"]) for p in ("p50", "p95", "p99"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    for level in result["levels"]:
        if level["errors_by_kind"]:
            kinds = ", ".join(f"{kind}: {n}" for kind, n in level["errors_by_kind"].items())
            lines.append(f"errors at concurrency {level['concurrency']}: {kinds}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


async def _level(settings: LoadSettings, bodies: list[tuple[bytes, dict]],
                 concurrency: int) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    latencies_ms: list[float] = []
    errors: Counter[str] = Counter()
    sent = 0

    async def one(session: aiohttp.ClientSession, request: tuple[bytes, dict], record: bool) -> None:
        body, headers = request
        start = time.perf_counter()
        try:
            async with session.post(settings.url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            status = "timeout"
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
        if not record:
            return
        if status == 200:
            latencies_ms.append((time.perf_counter() - start) * 1000)
        else:
            errors[f"HTTP {status}" if isinstance(status, int) else status] += 1

    async def client(session: aiohttp.ClientSession, deadline: float) -> None:
        nonlocal sent
        while sent < settings.requests and time.perf_counter() < deadline:
            sent += 1
            await one(session, bodies[sent % len(bodies)], record=True)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(one(session, bodies[i % len(bodies)], record=False)
                               for i in range(concurrency)))
        start = time.perf_counter()
        deadline = start + settings.duration_s
        await asyncio.gather(*(client(session, deadline) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    answered = len(latencies_ms) + sum(errors.values())
    percentiles = ({p: float(np.percentile(latencies_ms, int(p[1:]))) for p in ("p50", "p95", "p99")}
                   if latencies_ms else dict.fromkeys(("p50", "p95", "p99")))
    return {
        "concurrency": concurrency, "requests": answered, "ok": len(latencies_ms),
        "errors": sum(errors.values()), "errors_by_kind": dict(errors), "duration_s": elapsed,
        "requests_per_s": answered / elapsed,
        "images_per_s": len(latencies_ms) * settings.instances / elapsed,
        **{f"latency_{p}_ms": value for p, value in percentiles.items()},
    }


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise FlowersError(f"cannot resolve host {host!r}") from None
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
