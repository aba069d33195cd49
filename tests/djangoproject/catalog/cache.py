"""The consumer side: the client named in settings.CACHESYNC["CLIENT"]."""

from typing import Any

from django.conf import settings

from cachesync import CacheSync

sync = CacheSync(
    settings.CACHESYNC["URL"],
    settings.CACHESYNC["CHANNEL"],
    connect_timeout=settings.CACHESYNC["CONNECT_TIMEOUT"],
)
reads: list[str] = []  # the owner reads, so tests can tell a hit from a miss


@sync.cached("currencies", ttl=3600)
def get_currency(code: str) -> dict[str, Any] | None:
    from .models import Currency

    reads.append(code)
    return Currency.objects.filter(code=code).values("code", "rate", "version").first()
