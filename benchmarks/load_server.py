"""Load test of the HTTP server: N requests from C concurrent clients; throughput and latency percentiles.

    python -m benchmarks.load_server --config configs/infer/tiny/t2v_distill_4step.json --requests 20 --concurrency 4 \
        [--target_video_length 5] [--max_queue_size 10] [--out benchmarks/results/load_t2v]
    python -m benchmarks.load_server --url http://127.0.0.1:8000 --requests 20 --concurrency 4   # a running server

Without --url it starts its own server (`inference.server`, loopback, a free port, results in a temporary folder),
sends one warm-up request, then the timed ones. Each client submits a request, polls its status until it finishes
(an HTTP 429 from a full queue is retried after a short wait and counted), and moves on to its next request.
Only loopback URLs are accepted: this is a bounded local measurement, not a tool for loading other machines.

Reported (table + JSON): completed/failed/rejected counts, wall time, throughput (completed videos/s), and
p50/p90/max of the client-side latency (submit -> seen finished), the server's queue wait (submit -> start) and run
time (start -> end).

`--abuse` runs the hostile-but-fair cases of issue 15 instead and reports "held N of M": huge frames, area, steps,
prompt and body (plain and chunked) refused with the limit named, traversal and NUL bytes in paths, bodies that are
not a JSON object, a duplicate save_result_path (409), a cancel during a long run (stops within a layer), and a
second client's small request finishing in its normal time while another client abuses the server or a long task
is cancelled. Use a teacher config for a long run that can be cancelled (a distill config's runs are short):

    python -m benchmarks.load_server --config configs/infer/tiny/t2v_teacher.json --abuse \
        --out benchmarks/results/load_abuse
"""

from __future__ import annotations

import argparse
import functools
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


def shown_path(path: str | None) -> str | None:
    """A model folder as results files show it: relative to the working directory when inside it (no machine
    paths in committed results)."""
    if path is None:
        return None
    p = Path(path)
    return str(p.relative_to(Path.cwd())) if p.is_absolute() and p.is_relative_to(Path.cwd()) else path


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
    return {"url": url, "model": shown_path(service.get("model")), "device": service.get("device"),
            "requests": requests,
            "concurrency": concurrency, "request_fields": body, "completed": len(done),
            "failed": sum(r["status"] != "completed" for r in rows),
            "rejected_429": sum(r["rejected"] for r in rows), "wall_s": wall,
            "throughput_videos_per_s": len(done) / wall,
            "latency_s": percentiles([r["latency_s"] for r in done]),
            "queue_wait_s": percentiles([r["queue_wait_s"] for r in done]),
            "run_s": percentiles([r["run_s"] for r in done]),
            "errors": sorted({str(r.get("error")) for r in rows if r["status"] != "completed"})[:5]}


# ---- abuse cases (issue 15) ------------------------------------------------------------------------------------
SMALL_PROMPT = PROMPTS[0]


def _wait(client, task_id: str, until: tuple[str, ...] = FINISHED, timeout_s: float = 300.0,
          poll_s: float = 0.02) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.get(f"/v1/tasks/{task_id}/status").json()
        if st["status"] in until or time.monotonic() > deadline:
            return st
        time.sleep(poll_s)


def _timed_small(client, body: dict[str, Any]) -> tuple[float, str]:
    """Submit the small request and wait for it: (seconds, final status)."""
    t0 = time.monotonic()
    r = client.post("/v1/tasks/video/", json={"prompt": SMALL_PROMPT, **body})
    if r.status_code != 200:
        return time.monotonic() - t0, f"http {r.status_code}"
    st = _wait(client, r.json()["task_id"])
    return time.monotonic() - t0, st["status"]


def _refused(r, status: int, needle: str) -> tuple[bool, str]:
    text = r.text[:200]
    return r.status_code == status and needle in r.text, f"HTTP {r.status_code}: {text}"


def _refused_upload(send, needle: str) -> tuple[bool, str]:
    """A body over the limit: 413, or the connection closed by the server before the upload ended (it answers at
    once and does not read the rest: a client still writing may see the close before the answer)."""
    import httpx

    try:
        return _refused(send(), 413, needle)
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError) as e:
        return True, f"connection closed by the server during the upload ({type(e).__name__})"


def abuse_cases(client, service: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, check) pairs; check() -> (held, what happened)."""
    lim = service["limits"]
    teacher = service["model_cls"] != "wan2.1_distill"
    small = {"infer_steps": 4} if teacher else {}  # the small request: few teacher steps
    post = functools.partial(client.post, "/v1/tasks/video/")
    filler = b"x" * (lim["max_body_bytes"] + 2**20)

    def chunked():
        yield b'{"prompt": "'
        for i in range(0, len(filler), 2**20):
            yield filler[i:i + 2**20]
        yield b'"}'

    name = f"dup_{time.monotonic_ns()}.npy"
    return [
        ("huge frames (100001)", lambda: _refused(post(json={"prompt": SMALL_PROMPT, "target_video_length": 100001}),
                                                  422, "--max_frames")),
        ("huge area (8192x8192)", lambda: _refused(post(json={"prompt": SMALL_PROMPT, "target_height": 8192,
                                                              "target_width": 8192}), 422, "--max_pixels")),
        ("too many steps", lambda: _refused(post(json={"prompt": SMALL_PROMPT, "infer_steps": lim["max_steps"] + 1}),
                                            422, "--max_steps")),
        ("long prompt", lambda: _refused(post(json={"prompt": "a" * (lim["max_prompt_chars"] + 1)}), 422,
                                         "--max_prompt_chars")),
        ("huge body", lambda: _refused_upload(lambda: post(content=b'{"prompt": "' + filler + b'"}', headers={
            "Content-Type": "application/json"}), "--max_body_bytes")),
        ("huge chunked body", lambda: _refused_upload(lambda: post(content=chunked(), headers={
            "Content-Type": "application/json"}), "--max_body_bytes")),
        ("save path ../", lambda: _refused(post(json={"prompt": SMALL_PROMPT, "save_result_path": "../x.mp4"}),
                                           400, "'..'")),
        ("save path NUL byte", lambda: _refused(post(json={"prompt": SMALL_PROMPT, "save_result_path": "a\x00.mp4"}),
                                                400, "NUL")),
        ("body not JSON", lambda: _refused(post(content=b"{prompt: oops", headers={"Content-Type": "application/json"}),
                                           422, "json")),
        ("body a JSON list", lambda: _refused(post(json=[SMALL_PROMPT]), 422, "dictionary")),
        ("duplicate save_result_path", lambda: _duplicate(client, name, small)),
        ("cancel during a long run", lambda: _cancel_long(client, lim, teacher, small)),
        ("small request while another client abuses", lambda: _small_meanwhile(client, lim, small)),
    ]


def _duplicate(client, name: str, small: dict[str, Any]) -> tuple[bool, str]:
    first = client.post("/v1/tasks/video/", json={"prompt": SMALL_PROMPT, "save_result_path": name, **small})
    second = client.post("/v1/tasks/video/", json={"prompt": SMALL_PROMPT, "save_result_path": name, **small})
    if first.status_code == 200:
        _wait(client, first.json()["task_id"])
    return first.status_code == 200 and second.status_code == 409, \
        f"first HTTP {first.status_code}, second HTTP {second.status_code}: {second.text[:120]}"


def _cancel_long(client, lim: dict[str, int], teacher: bool, small: dict[str, Any]) -> tuple[bool, str]:
    """A long task (the largest the limits allow) cancelled mid-run, while a small one waits behind it."""
    body = {"prompt": SMALL_PROMPT, "target_video_length": lim["max_frames"], **({"infer_steps": lim["max_steps"]}
                                                                               if teacher else {})}
    task = client.post("/v1/tasks/video/", json=body).json()["task_id"]
    _wait(client, task, until=("processing", *FINISHED))
    time.sleep(1.0 if teacher else 0.0)  # well inside the run (a distill run is short: cancel at once)
    behind = client.post("/v1/tasks/video/", json={"prompt": SMALL_PROMPT, **small}).json()["task_id"]
    t0 = time.monotonic()
    deleted = client.delete(f"/v1/tasks/{task}")
    st = _wait(client, task)
    took = time.monotonic() - t0
    after = _wait(client, behind)
    small_s = time.monotonic() - t0
    what = (f"long task {st['status']} {took:.2f} s after DELETE (step {st['progress']['step']} of "
            f"{st['progress']['total']}); the small one behind it {after['status']} {small_s:.2f} s after")
    # Finished before the DELETE (409), or writing its result when it came (done within a second: an ignored cancel
    # of a long run would take the rest of the run): nothing to measure on this config.
    if deleted.status_code == 409 or (st["status"] == "completed" and took < 1.0):
        return None, f"not measured: the longest run allowed was over before the DELETE (use a teacher config); {what}"
    return st["status"] == "cancelled" and took < 2.0 and after["status"] == "completed", what


def _small_meanwhile(client, lim: dict[str, int], small: dict[str, Any]) -> tuple[bool, str]:
    """The small request alone, then again while another client keeps sending huge requests."""
    import httpx

    alone, status = _timed_small(client, small)
    stop, sent = threading.Event(), [0]

    def abuse() -> None:  # as fast as one client can send them, one after another
        huge = [{"prompt": SMALL_PROMPT, "target_video_length": 100001}, {"prompt": SMALL_PROMPT, "target_height":
                8192, "target_width": 8192}, {"prompt": "a" * (lim["max_prompt_chars"] + 1)}]
        with httpx.Client(base_url=str(client.base_url), timeout=30.0, headers=client.headers) as c:
            while not stop.is_set():
                c.post("/v1/tasks/video/", json=huge[sent[0] % len(huge)])
                sent[0] += 1

    thread = threading.Thread(target=abuse, daemon=True)
    thread.start()
    try:
        meanwhile, status2 = _timed_small(client, small)
    finally:
        stop.set()
        thread.join()
    held = status == status2 == "completed" and meanwhile <= max(3 * alone, alone + 2.0)
    return held, f"alone {alone:.2f} s, with {sent[0]} abusive requests meanwhile {meanwhile:.2f} s"


def run_abuse(url: str, api_key: str | None = None) -> dict[str, Any]:
    """Run every abuse case against the server at `url` (loopback only); 'held N of M'."""
    import httpx

    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"--url must be a loopback address ({', '.join(LOOPBACK)}), got {url}")
    headers = {"X-API-Key": api_key} if api_key else {}
    rows = []
    with httpx.Client(base_url=url, timeout=60.0, headers=headers) as client:
        service = client.get("/v1/service/status").json()
        for name, check in abuse_cases(client, service):
            t0 = time.monotonic()
            try:
                held, what = check()
            except Exception as e:  # noqa: BLE001 - a case that crashes the client did not hold
                held, what = False, f"{type(e).__name__}: {e}"
            rows.append({"case": name, "held": held if held is None else bool(held), "what": what,
                         "seconds": time.monotonic() - t0})
        alive = client.get("/v1/service/status").status_code == 200
    rows.append({"case": "server still serving", "held": alive, "what": "GET /v1/service/status", "seconds": 0.0})
    measured = [r for r in rows if r["held"] is not None]
    return {"url": url, "model": shown_path(service["model"]), "limits": service["limits"], "cases": rows,
            "held": sum(r["held"] for r in measured), "total": len(measured), "not_measured": len(rows) - len(measured)}


def abuse_table(s: dict[str, Any]) -> str:
    skipped = f", {s['not_measured']} not measured" if s["not_measured"] else ""
    lines = [f"**held {s['held']} of {s['total']}**{skipped} ({s['model']}; limits {s['limits']})", "",
             "| case | held | what happened | s |", "|---|---|---|---|"]
    for r in s["cases"]:
        what = r["what"].replace("|", "/").replace("\n", " ")
        held = "-" if r["held"] is None else "yes" if r["held"] else "**no**"
        lines.append(f"| {r['case']} | {held} | {what} | {r['seconds']:.2f} |")
    return "\n".join(lines)


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
    p.add_argument("--abuse", action="store_true", help="run the abuse cases instead of the load (held N of M)")
    p.add_argument("--api_key", help="the key of a --url server started with one")
    a = p.parse_args(argv)
    body = {k: v for k, v in (("target_video_length", a.target_video_length), ("infer_steps", a.infer_steps))
            if v is not None}

    def measure(url: str) -> dict[str, Any]:
        return run_abuse(url, a.api_key) if a.abuse else run_load(url, a.requests, a.concurrency, body,
                                                                  a.poll_interval)

    if a.url:
        summary = measure(a.url)
    else:
        from inference.server import BackgroundServer, build_manager, create_app

        with tempfile.TemporaryDirectory(prefix="load_server_") as out_dir:
            manager = build_manager(a.config, a.model_path, output_dir=out_dir, max_queue_size=a.max_queue_size)
            with BackgroundServer(create_app(manager)) as server:
                summary = measure(server.url)
        summary["config"] = a.config
    text = abuse_table(summary) if a.abuse else table(summary)
    print(text)
    print(json.dumps(summary, indent=2))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        out.with_suffix(".md").write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
