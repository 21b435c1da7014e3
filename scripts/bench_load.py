"""Range load of scripts/bench.sh (copied to $WORK/load.py and run from there).

rss:  N clients, each on one keep-alive connection doing M GETs of random SIZE-byte ranges;
      every answer must be 206 with the right Content-Range and length, and (with --verify)
      the same bytes as the local file.
lat:  for each round and each offset, N concurrent fresh connections each GET one SIZE-byte
      range at that offset; per-request latency from connect to last byte. Prints means.
"""
import argparse, asyncio, json, mmap, os, random, statistics, sys, time
from urllib.parse import urlsplit

def parse_head(head):
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    h = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            h[k.strip().lower()] = v.strip()
    return status, h

async def get_range(reader, writer, host, path, start, size, total, ref):
    end = start + size - 1
    writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={start}-{end}\r\n"
                  f"Authorization: Bearer {os.environ.get('BENCH_TOKEN', '')}\r\n"
                  f"User-Agent: fwrepo-bench\r\n\r\n").encode())
    await writer.drain()
    status, h = parse_head(await reader.readuntil(b"\r\n\r\n"))
    if "content-length" not in h:
        raise RuntimeError(f"status {status} without Content-Length: {h}")
    n = int(h["content-length"])
    got, pos, same = 0, start, True
    while got < n:
        chunk = await reader.read(min(1 << 20, n - got))
        if not chunk:
            break
        if ref is not None and same and ref[pos:pos + len(chunk)] != chunk:
            same = False
        got += len(chunk); pos += len(chunk)
    want_cr = f"bytes {start}-{end}/{total}"
    if status != 206 or n != size or got != size or h.get("content-range") != want_cr or not same:
        raise RuntimeError(f"bad answer for {start}-{end}: status {status}, length {n}, read {got}, "
                           f"content-range {h.get('content-range')!r}, bytes match {same}")
    return got

async def rss_mode(a, host, port, path, ref):
    stats = {"ok": 0, "bytes": 0, "errors": []}
    go = asyncio.Event()
    async def client(i):
        rnd = random.Random(i)
        reader, writer = await asyncio.open_connection(host, port)
        await go.wait()
        try:
            for _ in range(a.reqs):
                start = rnd.randrange(0, a.total - a.size + 1)
                try:
                    n = await get_range(reader, writer, f"{host}:{port}", path,
                                        start, a.size, a.total, ref)
                    stats["bytes"] += n  # not `+= await ...`: that would race across clients
                    stats["ok"] += 1
                except Exception as e:  # noqa: BLE001
                    stats["errors"].append(str(e))
                    return
        finally:
            writer.close()
    tasks = [asyncio.create_task(client(i)) for i in range(a.clients)]
    await asyncio.sleep(0.5)  # let every client connect first, then start them together
    t0 = time.perf_counter(); go.set()
    await asyncio.gather(*tasks)
    stats["seconds"] = time.perf_counter() - t0
    stats["requests"] = a.clients * a.reqs
    stats["errors"] = stats["errors"][:5]
    print(json.dumps(stats))

async def one(host, port, path, start, size, total):
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await get_range(reader, writer, f"{host}:{port}", path, start, size, total, None)
    finally:
        writer.close()
    return time.perf_counter() - t0

async def lat_mode(a, host, port, path):
    offsets = [int(x) for x in a.offsets.split(",")]
    res = {o: [] for o in offsets}
    wall = {o: [] for o in offsets}
    for r in range(a.rounds + 1):  # round 0 warms up and is discarded
        order = offsets if r % 2 == 0 else offsets[::-1]
        for o in order:
            t0 = time.perf_counter()
            lats = await asyncio.gather(*[one(host, port, path, o, a.size, a.total)
                                          for _ in range(a.clients)])
            if r > 0:
                res[o].extend(lats); wall[o].append(time.perf_counter() - t0)
    print(json.dumps({str(o): {"mean": statistics.mean(v), "median": statistics.median(v),
                               "max": max(v), "n": len(v), "wall_mean": statistics.mean(wall[o])}
                      for o, v in res.items()}))

def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["rss", "lat"])
    p.add_argument("url")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--reqs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--offsets", default="0")
    p.add_argument("--verify", help="local copy of the file to compare bytes with")
    a = p.parse_args()
    u = urlsplit(a.url)
    path = u.path + (f"?{u.query}" if u.query else "")
    if a.mode == "rss":
        ref = None
        if a.verify:
            f = open(a.verify, "rb")
            ref = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        asyncio.run(rss_mode(a, u.hostname, u.port, path, ref))
    else:
        asyncio.run(lat_mode(a, u.hostname, u.port, path))

main()
