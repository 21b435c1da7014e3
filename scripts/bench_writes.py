"""Driver of scripts/bench_writes.sh: acknowledged (durable) API writes per second."""
import os
import sys
import threading
import time

sys.path.insert(0, os.environ["SCRIPTS"])
import benchlib as b  # noqa: E402

b.NAME = "bench_writes"
SECS = float(os.environ.get("BENCH_SECS", "10"))
LEVELS = [int(x) for x in os.environ.get("BENCH_LEVELS", "1,8,32").split(",")]
KINDS = {
    "device PUT": lambda i: ("PUT", f"/api/v1/devices/BENCH{i:09d}", {"model": "Dock"}),
    "token POST": lambda i: ("POST", "/api/v1/tokens", {"name": f"bench-{i}", "scopes": ["read"]}),
}


def run_level(port, kind, clients, base):
    make = KINDS[kind]
    lat, errors = [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + SECS

    def worker(w):
        http = b.Http(port)
        n = 0
        mine = []
        while time.monotonic() < stop_at:
            method, path, body = make(base + w * 1_000_000 + n)
            n += 1
            t = time.monotonic()
            status, answer = http.json(method, path, body)
            if 200 <= status < 300:
                mine.append(time.monotonic() - t)
            else:
                with lock:
                    errors.append(f"{status} {str(answer)[:120]}")
        http.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return len(lat) / wall, b.pct(lat, 50), b.pct(lat, 99), errors


def main():
    b.handle_signals()
    data = os.path.join(b.WORK, "data")
    http_port, mqtt_port = b.free_port(), b.free_port()
    server = b.spawn("server", [os.path.join(b.WORK, "fwrepo"), "serve", "--data-dir", data,
                                "--listen", f"127.0.0.1:{http_port}",
                                "--mqtt-listen", f"127.0.0.1:{mqtt_port}",
                                # the benchmark is one client address with one token
                                "--api-rate-limit", "1000000", "--api-burst", "1000000"])
    try:
        b.wait_line(server, "server", r"HTTP listening on", 30)
        b.read_token(data)
        rows = []
        base = 0
        for kind in KINDS:
            for clients in LEVELS:
                base += 100_000_000
                rate, p50, p99, errors = run_level(http_port, kind, clients, base)
                b.log(f"{kind} x{clients}: {rate:.0f}/s p50 {b.fmt_ms(p50)} ms p99 {b.fmt_ms(p99)} ms, {len(errors)} errors")
                if errors:
                    b.log(f"first error: {errors[0]}")
                rows.append((kind, clients, rate, p50, p99, len(errors)))
    finally:
        b.stop_all()
    out = [f"fwrepo {os.environ.get('REV', '?')} (built {os.environ.get('BIN_BUILT', '?')}), "
           f"{SECS:.0f} s per row, data dir on {b.WORK}",
           "",
           "| writes | clients | acknowledged/s | p50 ms | p99 ms | errors |",
           "|---|---:|---:|---:|---:|---:|"]
    for kind, clients, rate, p50, p99, errs in rows:
        out.append(f"| {kind} | {clients} | {rate:.0f} | {b.fmt_ms(p50)} | {b.fmt_ms(p99)} | {errs} |")
    report = "\n".join(out) + "\n"
    print(report)
    if os.environ.get("BENCH_REPORT"):
        with open(os.environ["BENCH_REPORT"], "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
