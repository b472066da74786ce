"""A bounded load generator for a served model (`mlflow models serve`): N concurrent clients
post one request body over and over for a fixed time, each waiting for its answer before the
next (closed loop, so the server is never sent more than N requests at once).

    stats = load(f"{url}/invocations", body, clients=8, seconds=60)

Returns requests, failures (any answer but 200, or no answer), requests per second and the
latency percentiles (p50, p99) of the answered requests, in milliseconds. bench/serve_load.py
measures the demo model with it; tests/serve/test_predict.py runs a small load in the suite.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadStats:
    requests: int
    failed: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    first_failure: str  # status and the start of the body of the first failed request, or ""


def load(url: str, body: bytes, clients: int = 8, seconds: float = 60.0, timeout: float = 60.0,
         per_client: int | None = None) -> LoadStats:
    """Post `body` (JSON bytes) to `url` from `clients` threads, each with its own connection,
    for `seconds` (or until each has sent `per_client` requests); see the module docstring."""
    import numpy as np
    import requests

    if clients < 1 or seconds <= 0:
        raise ValueError(f"clients ({clients}) must be at least 1 and seconds ({seconds}) above 0")
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[list[str]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(k: int) -> None:
        with requests.Session() as session:
            start.wait()
            while time.perf_counter() < deadline[0] and (per_client is None or
                                                         len(latencies[k]) + len(failures[k]) < per_client):
                t0 = time.perf_counter()
                try:
                    r = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout)
                    ok, what = r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
                except requests.RequestException as e:
                    ok, what = False, f"{type(e).__name__}: {e}"[:200]
                (latencies[k] if ok else failures[k]).append(time.perf_counter() - t0 if ok else what)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray([x for per in latencies for x in per]) * 1000
    failed = [x for per in failures for x in per]
    done = len(lat) + len(failed)
    p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if len(lat) else (float("nan"),) * 2
    return LoadStats(done, len(failed), wall, done / wall, p50, p99, failed[0] if failed else "")
