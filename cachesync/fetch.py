"""HttpFetcher: read one entry from the owner's REST API, the fallback on a cache miss.

The fetcher is the body of a ``@sync.cached`` function::

    currencies = HttpFetcher("http://owner:8000", "/currencies/{key}", model=Currency)

    @sync.cached("currencies", ttl=3600)
    async def get_currency(code: str) -> Currency | None:
        return await currencies.get(code)

What it guarantees: a 404 is "absent" (``None``, which the cache may negative-cache); anything
else that is not a usable answer (5xx after the retries, a timeout, a refused connection, a body
that is not JSON or does not fit ``model``) raises :class:`~cachesync.errors.FetchError`, so the
cache stores nothing and may serve a stale value under ``stale_if_error``. Conditional requests
(``If-None-Match``) make a refetch of an unchanged entry cheap for the owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar, overload
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter, ValidationError

from .backoff import Backoff
from .errors import FetchError

__all__ = ["HttpFetcher", "Primeable"]

log = logging.getLogger("cachesync.fetch")

T = TypeVar("T")

# Statuses that say "try again later" rather than "this request is wrong".
_RETRY_STATUSES = frozenset({429, 502, 503, 504})


class Primeable(Protocol):
    """What :meth:`HttpFetcher.warm` needs of a cached function: ``prime`` (and, preferably,
    ``bulk()``, which ``@sync.cached`` functions have)."""

    def prime(self, key: str, value: Any, *, version: int | None = None) -> bool:
        """Store ``value`` for ``key`` as fresh; False if a newer entry or an event won."""
        ...


class HttpFetcher(Generic[T]):
    """Fetches entries of one resource from the owner's REST API with httpx.

    ``base_url`` and ``path`` (with a ``{key}`` placeholder, URL-quoted) name the entry.
    ``model`` is a pydantic model class or a :class:`~pydantic.TypeAdapter` the JSON body is
    validated into; without it the parsed JSON is returned as is.

    Failures: 5xx (and 429), timeouts and connection errors are retried up to ``retries``
    times with jittered exponential backoff, then raised as :class:`FetchError` carrying
    ``url`` and ``status``. Other 4xx are raised at once. 404 returns ``None``.

    ETags: the last good response of up to ``etag_cache_size`` keys is remembered with its
    ``ETag``; the next fetch of such a key sends ``If-None-Match``, and a 304 returns the
    remembered value without a body to parse.

    The fetcher owns its ``httpx.AsyncClient`` and closes it in :meth:`aclose` (or on leaving
    ``async with``) unless ``client`` was passed in, in which case the caller closes it.
    """

    @overload
    def __init__(
        self: HttpFetcher[Any],
        base_url: str,
        path: str,
        model: None = None,
        *,
        timeout: float = ...,
        retries: int = ...,
        backoff_initial: float = ...,
        backoff_max: float = ...,
        headers: dict[str, str] | None = ...,
        etag_cache_size: int = ...,
        client: httpx.AsyncClient | None = ...,
        many_path: str | None = ...,
        many_key: Callable[[Any], str] | None = ...,
        many_max: int = ...,
    ) -> None: ...

    @overload
    def __init__(
        self,
        base_url: str,
        path: str,
        model: type[T] | TypeAdapter[T],
        *,
        timeout: float = ...,
        retries: int = ...,
        backoff_initial: float = ...,
        backoff_max: float = ...,
        headers: dict[str, str] | None = ...,
        etag_cache_size: int = ...,
        client: httpx.AsyncClient | None = ...,
        many_path: str | None = ...,
        many_key: Callable[[Any], str] | None = ...,
        many_max: int = ...,
    ) -> None: ...

    def __init__(
        self,
        base_url: str,
        path: str,
        model: type[T] | TypeAdapter[T] | None = None,
        *,
        timeout: float = 5.0,
        retries: int = 2,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        headers: dict[str, str] | None = None,
        etag_cache_size: int = 10_000,
        client: httpx.AsyncClient | None = None,
        many_path: str | None = None,
        many_key: Callable[[Any], str] | None = None,
        many_max: int = 100,
    ) -> None:
        if not isinstance(base_url, str) or not base_url:
            raise ValueError("base_url must be a non-empty URL string")
        if "{key}" not in path:
            raise ValueError("path must contain the '{key}' placeholder, e.g. '/items/{key}'")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if etag_cache_size < 0:
            raise ValueError("etag_cache_size must be >= 0")
        if many_path is not None and "{keys}" not in many_path:
            raise ValueError(
                "many_path must contain the '{keys}' placeholder, e.g. '/items?keys={keys}'"
            )
        if many_max < 1:
            raise ValueError("many_max must be >= 1")
        self.many_path = many_path
        self._many_key = many_key
        self.many_max = many_max
        self.base_url = base_url.rstrip("/")
        self.path = path
        self.timeout = timeout
        self.retries = retries
        self._backoff_args = (backoff_initial, backoff_max)
        Backoff(initial=backoff_initial, maximum=backoff_max)  # validates the pair now
        self._adapter: TypeAdapter[T] | None
        if model is None:
            self._adapter = None
        elif isinstance(model, TypeAdapter):
            self._adapter = model
        else:
            self._adapter = TypeAdapter(model)
        self._headers = dict(headers or {})
        self._etags: OrderedDict[str, tuple[str, T | None]] = OrderedDict()
        self._etag_cache_size = etag_cache_size
        self._owns_client = client is None
        self._client = (
            client
            if client is not None
            else httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        )
        self._closed = False
        self.requests = 0
        self.retried = 0
        self.not_modified = 0
        self.errors = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the HTTP client if this fetcher created it. Safe to call twice.

        A fetcher runs nothing in the background, so it has no ``start``/``stop``; like the
        ``httpx.AsyncClient`` it wraps it is closed with ``aclose()`` or ``async with``."""
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the API ---------------------------------------------------------------------------

    def url_for(self, key: str) -> str:
        """The URL of entry ``key`` (the key is URL-quoted, so ``/`` cannot change the path)."""
        return self.base_url + self.path.format(key=quote(str(key), safe=""))

    async def get(self, key: str) -> T | None:
        """The owner's current value of ``key``, or ``None`` if the owner says 404.

        Raises :class:`FetchError` once the retries are used up, or at once for a 4xx other
        than 404 or a body that does not parse.
        """
        url = self.url_for(key)
        remembered = self._etags.get(key)
        headers = {"If-None-Match": remembered[0]} if remembered is not None else None
        response = await self._request(url, headers)
        if response.status_code == 304:
            # Look up again: a concurrent fetch may have replaced or evicted the entry while
            # this request was in flight.
            entry = self._etags.get(key)
            if entry is not None and remembered is not None and entry[0] == remembered[0]:
                self._etags.move_to_end(key)
                self.not_modified += 1
                return entry[1]
            # A 304 for a validator we no longer hold cannot be served: ask unconditionally.
            response = await self._request(url, None)
        if response.status_code == 404:
            self._etags.pop(key, None)
            return None
        value = self._parse(url, response)
        etag = response.headers.get("etag")
        if etag and self._etag_cache_size:
            self._etags[key] = (etag, value)
            self._etags.move_to_end(key)
            while len(self._etags) > self._etag_cache_size:
                self._etags.popitem(last=False)
        else:
            self._etags.pop(key, None)
        return value

    async def __call__(self, key: str) -> T | None:
        """Same as :meth:`get`, so the fetcher itself can be the body of a cached function."""
        return await self.get(key)

    async def get_many(self, keys: Iterable[str]) -> dict[str, T]:
        """The owner's current values of ``keys`` from its batch endpoint (``many_path``):
        a mapping of the keys found; a key the owner does not return is absent.

        The keys are URL-quoted and joined by ``,`` into ``{keys}``, at most ``many_max`` per
        request. The body is a JSON object ``{key: item}``, or a JSON array of items whose key
        ``many_key(item)`` gives. Raises :class:`FetchError` as :meth:`get` does, and for a
        body of another shape; a 404 means none of the keys exists.
        """
        if self.many_path is None:
            raise FetchError(
                "this HttpFetcher has no batch endpoint: pass many_path='/items?ids={keys}'"
            )
        wanted = list(dict.fromkeys(keys))
        found: dict[str, T] = {}
        for start in range(0, len(wanted), self.many_max):
            chunk = wanted[start : start + self.many_max]
            found.update(await self._get_chunk(chunk))
        return found

    async def _get_chunk(self, keys: list[str]) -> dict[str, T]:
        assert self.many_path is not None  # checked by get_many
        joined = ",".join(quote(str(key), safe="") for key in keys)
        url = self.base_url + self.many_path.format(keys=joined)
        response = await self._request(url, None)
        if response.status_code == 404:
            return {}
        raw = self._parse_json(url, response)
        if isinstance(raw, dict):
            pairs = list(raw.items())
        elif isinstance(raw, list) and self._many_key is not None:
            pairs = [(None, item) for item in raw]
        else:
            self.errors += 1
            shape = "an object {key: item}" + (" or an array" if self._many_key else "")
            raise FetchError(
                f"GET {url} returned {type(raw).__name__}, not {shape}"
                + ("" if self._many_key else " (pass many_key= to read an array)"),
                url=url,
                status=response.status_code,
            )
        asked = set(keys)
        found: dict[str, T] = {}
        for key, item in pairs:
            if item is None:
                continue
            try:
                value: T = (
                    item
                    if self._adapter is None
                    else self._adapter.validate_python(item, strict=False)
                )
                if key is None:
                    assert self._many_key is not None
                    key = self._many_key(value)
            except ValidationError as exc:
                self.errors += 1
                raise FetchError(
                    f"GET {url}: an item does not fit the model: {_first_error(exc)}",
                    url=url,
                    status=response.status_code,
                ) from exc
            if key in asked:  # an answer for a key not asked for is not ours to cache
                found[key] = value
        return found

    async def fetch_all(self, list_path: str) -> list[T]:
        """Every item of the JSON array at ``list_path``, each validated into ``model``."""
        url = self.base_url + list_path
        response = await self._request(url, None)
        if response.status_code == 404:
            raise FetchError(f"GET {url} returned 404: no list endpoint there", url=url, status=404)
        raw = self._parse_json(url, response)
        if not isinstance(raw, list):
            raise FetchError(f"GET {url} did not return a JSON array", url=url, status=200)
        if self._adapter is None:
            return raw
        adapter = self._adapter
        try:
            # strict=False: the items come from JSON, so lax python validation accepts what
            # JSON mode would (ISO dates as strings, and so on).
            return [adapter.validate_python(item, strict=False) for item in raw]
        except ValidationError as exc:
            raise FetchError(
                f"GET {url}: an item does not fit the model: {_first_error(exc)}",
                url=url,
                status=response.status_code,
            ) from exc

    async def warm(
        self,
        cached_fn: Primeable,
        list_path: str,
        key: Callable[[T], str],
        version: Callable[[T], int | None] | None = None,
    ) -> int:
        """Preload a namespace from a list endpoint (``GET {base_url}{list_path}``, a JSON
        array of items) so a new instance starts hot; ``key(item)`` is the cache key of an item.

        With a ``@sync.cached`` function, a bulk reservation is taken *before* the list is
        read (``cached_fn.bulk()``), so a key that an event changed while the list was on its
        way is left alone: the warm-up never stores a value older than an event. Objects that
        only have ``prime(key, value, version=...)`` get that instead. ``version(item)`` gives
        the owner's version of an item. Returns how many items were stored; raises
        :class:`FetchError` if the list cannot be read (nothing is stored then).
        """

        def version_of(item: T) -> int | None:
            return version(item) if version is not None else None

        bulk = getattr(cached_fn, "bulk", None)
        if bulk is not None:
            with bulk() as reservation:
                items = await self.fetch_all(list_path)
                stored = sum(
                    1 for item in items if reservation.put(key(item), item, version_of(item))
                )
        else:
            items = await self.fetch_all(list_path)
            stored = sum(
                1 for item in items if cached_fn.prime(key(item), item, version=version_of(item))
            )
        log.info(
            "cache warmed",
            extra={"url": self.base_url + list_path, "items": len(items), "stored": stored},
        )
        return stored

    def stats(self) -> dict[str, int]:
        """Counters: requests sent, retries, 304 answers, errors raised, ETags remembered."""
        return {
            "requests": self.requests,
            "retried": self.retried,
            "not_modified": self.not_modified,
            "errors": self.errors,
            "etags": len(self._etags),
        }

    # -- internals -------------------------------------------------------------------------

    async def _request(self, url: str, extra_headers: dict[str, str] | None) -> httpx.Response:
        if self._closed:
            raise FetchError("this HttpFetcher is closed", url=url)
        headers = {"Accept": "application/json", **self._headers, **(extra_headers or {})}
        backoff = Backoff(initial=self._backoff_args[0], maximum=self._backoff_args[1])
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            status: int | None = None
            try:
                response = await self._client.get(url, headers=headers, timeout=self.timeout)
            except httpx.TimeoutException as exc:
                reason: str = f"timed out after {self.timeout:g}s"
                cause: BaseException = exc
            except httpx.RequestError as exc:
                reason = f"connection failed: {exc!r}"
                cause = exc
            else:
                status = response.status_code
                if status < 400 or status == 404:
                    return response
                reason = f"returned {status}"
                cause = FetchError(reason, url=url, status=status)
                if status < 500 and status not in _RETRY_STATUSES:
                    self.errors += 1
                    raise FetchError(f"GET {url} {reason}", url=url, status=status)
            if attempt > self.retries:
                self.errors += 1
                raise FetchError(
                    f"GET {url} {reason} (after {attempt} attempts)", url=url, status=status
                ) from cause
            self.retried += 1
            delay = backoff.next_delay()
            log.warning(
                "fetch failed, retrying",
                extra={"url": url, "reason": reason, "attempt": attempt, "retry_in": delay},
            )
            await asyncio.sleep(delay)

    def _parse_json(self, url: str, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            self.errors += 1
            raise FetchError(
                f"GET {url} returned a body that is not JSON", url=url, status=response.status_code
            ) from exc

    def _parse(self, url: str, response: httpx.Response) -> T | None:
        if self._adapter is None:
            parsed: T | None = self._parse_json(url, response)
            return parsed
        try:
            return self._adapter.validate_json(response.content)
        except ValidationError as exc:
            self.errors += 1
            raise FetchError(
                f"GET {url} returned a body that does not fit the model: {_first_error(exc)}",
                url=url,
                status=response.status_code,
            ) from exc


def _first_error(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"
