"""Load test of the HTTP server: N requests from C concurrent clients; throughput and latency percentiles.

    python -m benchmarks.load_server --config configs/tiny/t2v_distill_4step.json --requests 20 --concurrency 4 \
        [--target_video_length 5] [--max_queue_size 10] [--out benchmarks/results/load_t2v]
    python -m benchmarks.load_server --url http://127.0.0.1:8000 --requests 20 --concurrency 4   # a running server

Without --url it starts its own server (`inference.server`, loopback, a free port, results in a temporary folder),
sends one warm-up request, then the timed ones. Each client submits a request, polls its status until it finishes
(an HTTP 429 from a full queue is retried after a short wait and counted), and moves on to its next request.
Only loopback URLs are accepted: this is a bounded local measurement, not a tool for loading other machines.

Reported (table + JSON): completed/failed/rejected counts, wall time, throughput (completed videos/s), and
p50/p90/max of the client-side latency (submit -> seen finished), the server's queue wait (submit -> start) and run
time (start -> end).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS, MAX_CONCURRENCY = 1000, 64
FINISHED = ("completed", "failed", "cancelled")


def one_request(client, i: int, body: dict[str, Any], poll_s: float, timeout_s: float) -> dict[str, Any]:
    """Submit request i (retrying on 429), poll until it finishes; returns its timings and outcome."""
    import httpx

    t0 = time.perf_counter()
    rejected = 0
    while True:
        r = client.post("/v1/tasks/video/", json={**body, "prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
        if r.status_code != 429:
            break
        rejected += 1
        time.sleep(poll_s * 5)
        if time.perf_counter() - t0 > timeout_s:
            return {"index": i, "status": "rejected", "rejected": rejected}
    if r.status_code != 200:
        return {"index": i, "status": f"http {r.status_code}", "error": r.text, "rejected": rejected}
    task_id = r.json()["task_id"]
    while True:
        try:
            st = client.get(f"/v1/tasks/{task_id}/status").json()
        except httpx.HTTPError as e:
            return {"index": i, "status": "http error", "error": str(e), "rejected": rejected}
        if st["status"] in FINISHED:
            break
        if time.perf_counter() - t0 > timeout_s:
            client.delete(f"/v1/tasks/{task_id}")
            return {"index": i, "status": "timeout", "rejected": rejected}
        time.sleep(poll_s)
    return {"index": i, "status": st["status"], "error": st["error"], "rejected": rejected,
            "latency_s": time.perf_counter() - t0, "queue_wait_s": st["queue_wait_s"], "run_s": st["run_s"]}


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "max": float(a.max())}


def run_load(url: str, requests: int, concurrency: int, body: dict[str, Any] | None = None, poll_s: float = 0.02,
             timeout_s: float = 600.0, warmup: int = 1) -> dict[str, Any]:
    """Drive the server at `url` (loopback only) and summarise; `body` holds extra request fields."""
    import httpx

    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"--url must be a loopback address ({', '.join(LOOPBACK)}), got {url}")
    if not 1 <= requests <= MAX_REQUESTS or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"--requests must be in [1, {MAX_REQUESTS}] and --concurrency in [1, {MAX_CONCURRENCY}], "
                         f"got {requests} and {concurrency}")
    body = dict(body or {})
    local = threading.local()

    def client() -> httpx.Client:  # one connection pool per client thread
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=30.0)
        return local.client

    for i in range(warmup):
        one_request(client(), -1 - i, body, poll_s, timeout_s)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(lambda i: one_request(client(), i, body, poll_s, timeout_s), range(requests)))
    wall = time.perf_counter() - t0
    done = [r for r in rows if r["status"] == "completed"]
    service = httpx.get(url + "/v1/service/status", timeout=30.0).json()
    return {"url": url, "model": service.get("model"), "device": service.get("device"), "requests": requests,
            "concurrency": concurrency, "request_fields": body, "completed": len(done),
            "failed": sum(r["status"] != "completed" for r in rows),
            "rejected_429": sum(r["rejected"] for r in rows), "wall_s": wall,
            "throughput_videos_per_s": len(done) / wall,
            "latency_s": percentiles([r["latency_s"] for r in done]),
            "queue_wait_s": percentiles([r["queue_wait_s"] for r in done]),
            "run_s": percentiles([r["run_s"] for r in done]),
            "errors": sorted({str(r.get("error")) for r in rows if r["status"] != "completed"})[:5]}


def table(s: dict[str, Any]) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{s['requests']} requests, concurrency {s['concurrency']}, {s['device']}: {s['completed']} completed, "
             f"{s['failed']} not, {s['rejected_429']} HTTP 429 retries; {s['wall_s']:.2f} s wall, "
             f"**{s['throughput_videos_per_s']:.2f} videos/s**", "",
             "| seconds | p50 | p90 | max |", "|---|---|---|---|"]
    for key, label in (("latency_s", "latency (client)"), ("queue_wait_s", "queue wait"), ("run_s", "run")):
        p = s[key]
        lines.append(f"| {label} | {fmt(p['p50'])} | {fmt(p['p90'])} | {fmt(p['max'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", help="start a server with this inference config")
    target.add_argument("--url", help="use a running server (loopback only), e.g. http://127.0.0.1:8000")
    p.add_argument("--model_path")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max_queue_size", type=int, default=10, help="of the server started with --config")
    p.add_argument("--target_video_length", type=int, help="frames per video (4n+1), sent with every request")
    p.add_argument("--infer_steps", type=int, help="sent with every request (teacher configs)")
    p.add_argument("--poll_interval", type=float, default=0.02, help="seconds between status polls")
    p.add_argument("--out", help="write <out>.json and <out>.md")
    a = p.parse_args(argv)
    body = {k: v for k, v in (("target_video_length", a.target_video_length), ("infer_steps", a.infer_steps))
            if v is not None}
    if a.url:
        summary = run_load(a.url, a.requests, a.concurrency, body, a.poll_interval)
    else:
        from inference.server import BackgroundServer, build_manager, create_app

        with tempfile.TemporaryDirectory(prefix="load_server_") as out_dir:
            manager = build_manager(a.config, a.model_path, output_dir=out_dir, max_queue_size=a.max_queue_size)
            with BackgroundServer(create_app(manager)) as server:
                summary = run_load(server.url, a.requests, a.concurrency, body, a.poll_interval)
        summary["config"] = a.config
    print(table(summary))
    print(json.dumps(summary, indent=2))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        out.with_suffix(".md").write_text(table(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
