"""`flowers loadtest`: closed-loop HTTP clients against a predict route, one concurrency level at a time.

Method (written into the result beside the figures): at each level, `concurrency` clients each send
a request, wait for its answer and send the next (a closed loop: the offered load adapts to the
server, as real synchronous callers do). Each request carries `instances` real photos as base64 JPEG
(the files' own bytes, rotated through the photo set). A level first sends `concurrency` untimed
warm-up requests, then runs until `requests` answers or `duration_s` seconds, whichever comes first.
Latency is client-side: request sent to answer read, successful requests only. requests/s counts
every answer, images/s only successful ones.
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


@dataclass(frozen=True)
class LoadSettings:
    url: str  # the full predict URL
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int = 2000  # per level
    duration_s: float = 60.0  # per level
    instances: int = 1  # photos per request
    timeout_s: float = 30.0  # per request

    def __post_init__(self) -> None:
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


def predict_url(url: str, route: str | None, allow_remote: bool) -> str:
    """The predict URL from a server URL (its path, else `route`, else /predict).

    Raises:
        FlowersError: not an http(s) URL, or a host that is not this machine without allow_remote.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FlowersError(f"not an http:// or https:// URL: {url!r}")
    if not allow_remote and not _is_loopback(parts.hostname):
        raise FlowersError(f"{parts.hostname} is not this machine; a load test sends thousands of "
                           "requests, so other hosts need --allow-remote")
    path = route or (parts.path if parts.path not in ("", "/") else DEFAULT_ROUTE)
    return f"{parts.scheme}://{parts.netloc}{path if path.startswith('/') else '/' + path}"


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
    bodies = [json.dumps({"instances": [{"b64": photos[(i + k) % len(photos)]}
                                        for k in range(settings.instances)]}).encode()
              for i in range(len(photos))]
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


async def _level(settings: LoadSettings, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    latencies_ms: list[float] = []
    errors: Counter[str] = Counter()
    sent = 0

    async def one(session: aiohttp.ClientSession, body: bytes, record: bool) -> None:
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
