"""Forks a process whose client and publisher run in the background, and checks the child.

Run as ``python -m tests.syncapps.fork_child URL CHANNEL``; exits 0 when every check passed
(in the child and in the parent), else prints what failed and exits 1.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from cachesync import BlockingPublisher, CacheSync

url, channel = sys.argv[1], sys.argv[2]
owner = {"a": "v1"}
fetches: list[str] = []
sync = CacheSync(url, channel=channel, connect_timeout=5.0)
pub = BlockingPublisher(url, channel=channel, heartbeat_interval=0.2)


@sync.cached("items")
def get(key: str) -> str:
    fetches.append(key)
    return owner[key]


def wait_for(check: object, what: str, seconds: float = 5.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} not within {seconds}s")


def child() -> None:
    # At once: nothing inherited is trusted, reads go to the owner.
    assert not sync.listener_up, "the child trusts the parent's listener"
    owner["a"] = "v2"  # changed while no event can reach this process
    assert get("a") == "v2", "an inherited entry was served"
    wait_for(lambda: sync.listener_up, "the child's listener")
    before = len(fetches)
    assert get("a") == "v2" and get("a") == "v2"
    assert len(fetches) <= before + 1, "the child does not cache once live"
    # The parent's publisher works here too, as a source of its own.
    owner["a"] = "v3"
    parent_source = pub_source
    pub.changed("items", "a", version=3)
    assert pub.publisher.source != parent_source, "the child reuses the parent's source"
    wait_for(lambda: get("a") == "v3", "the child applying an event")


sync.start_in_background()
pub.start()
pub_source = pub.publisher.source
assert get("a") == "v1" and get("a") == "v1" and fetches == ["a"]

# Another thread holds the cache's lock when the fork is asked for: the fork waits for it, or
# the child would inherit a lock that no thread of its own can ever release.
held, release = threading.Event(), threading.Event()


def hold() -> None:
    with get.cache.lock:
        held.set()
        release.wait(0.3)


holder = threading.Thread(target=hold)
holder.start()
held.wait(5)
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a deadlocked child dies instead of hanging the test
    try:
        child()
    except BaseException as exc:  # report, then leave without the parent's cleanup
        print(f"child: {exc!r}", flush=True)
        os._exit(1)
    sync.stop_background()
    pub.close()
    os._exit(0)

holder.join(5)
deadline = time.monotonic() + 15
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() > deadline:  # hung (a deadlock): stop the child this script forked
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("child: hung", flush=True)
        sys.exit(1)
    time.sleep(0.05)
# The parent still works: its listener was not disturbed by the child.
assert sync.listener_up, "the parent's listener went down"
owner["a"] = "v4"
pub.changed("items", "a", version=4)
wait_for(lambda: get("a") == "v4", "the parent applying an event after the fork")
pub.close()
sync.stop_background()
sys.exit(os.waitstatus_to_exitcode(status))
