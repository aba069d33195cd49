"""redis-py's client-side cache read from several threads: reads completed per second.

    .venv/bin/python -m benchmarks.csc_threads [--threads 1,4] [--seconds 6]

One ``redis.Redis(protocol=3, cache_config=CacheConfig())`` shared by N reader threads that
``GET`` 2,000 keys at random while another client changes one every 20 ms (so invalidations
arrive). Prints the reads completed in each second. With redis-py 8.1 on this machine one thread
completes 10,000-20,000 reads every second; 4 threads complete none for seconds at a time, and
some invalidations fail ("OrderedDict mutated during iteration", logged by redis-py). That is
why the strategy comparison drives it from one thread per reader process. Talks to Redis on
127.0.0.1 only; lowers redis-py's server version gate as the ``-fixed`` strategy does (Redis
7.0 here); deletes its keys.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid

KEYS = 2_000


def run(threads: int, seconds: float, url: str) -> list[int]:
    """Reads completed in each second by ``threads`` threads sharing one cached client."""
    import redis
    from redis.cache import CacheConfig
    from redis.connection import CacheProxyConnection

    CacheProxyConnection.MIN_ALLOWED_VERSION = "6.0.0"
    prefix = f"csc-threads:{uuid.uuid4().hex[:8]}:"
    writer = redis.Redis.from_url(url)
    writer.mset({f"{prefix}{i}": "v" for i in range(KEYS)})
    client = redis.Redis.from_url(url, protocol=3, cache_config=CacheConfig(max_size=20_000))
    done = [0]
    errors = [0]
    stop = time.monotonic() + seconds

    def read() -> None:
        rng = random.Random()
        while time.monotonic() < stop:
            try:
                client.get(f"{prefix}{rng.randrange(KEYS)}")
                done[0] += 1
            except Exception:
                errors[0] += 1

    def write() -> None:
        rng = random.Random(1)
        while time.monotonic() < stop:
            writer.set(f"{prefix}{rng.randrange(KEYS)}", "v2")
            time.sleep(0.02)

    workers = [threading.Thread(target=read) for _ in range(threads)]
    workers.append(threading.Thread(target=write))
    for worker in workers:
        worker.start()
    per_second, last = [], 0
    for _ in range(int(seconds)):
        time.sleep(1.0)
        per_second.append(done[0] - last)
        last = done[0]
    for worker in workers:
        worker.join(timeout=30)
    writer.delete(*[f"{prefix}{i}" for i in range(KEYS)])
    client.close()
    writer.close()
    if errors[0]:
        print(f"  {errors[0]} reads failed")
    return per_second


def main(argv: list[str] | None = None) -> int:
    """Print the reads per second for each thread count."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    for n in (int(x) for x in args.threads.split(",")):
        counts = run(n, args.seconds, args.url)
        print(f"{n} thread(s): reads completed per second: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
