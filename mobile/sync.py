"""`SyncClient`: the same API for apps without asyncio; a private event loop runs in one thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, Generic, TypeVar

from mobile.client import Client, Stream

T = TypeVar("T")


class _Loop:
    """An event loop on a daemon thread; coroutines run there, callers block for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="meridian-mobile", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop; Ctrl-C (or any exception here) cancels it there."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class SyncStream(Generic[T]):
    """A streamed answer as a plain iterator; `close()` (or a `with` block) cancels it."""

    def __init__(self, stream: Stream[T], loop: _Loop) -> None:
        self._stream, self._loop = stream, loop
        self.meta = stream.meta

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return self._loop.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop the stream; the server stops generating."""
        self._loop.run(self._stream.aclose())

    def __enter__(self) -> SyncStream[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Namespace:
    """Mirrors an async namespace: every coroutine method becomes a blocking one."""

    def __init__(self, target: Any, loop: _Loop) -> None:
        self._target, self._loop = target, loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return _Namespace(attr, self._loop)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = self._loop.run(attr(*args, **kwargs))
            return SyncStream(result, self._loop) if isinstance(result, Stream) else result

        call.__doc__ = attr.__doc__
        return call


class SyncClient:
    """The blocking twin of `Client`: same arguments, same namespaces (chat.completions, completions,
    embeddings, models); streams are plain iterators."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        self._loop = _Loop()

        async def make() -> Client:
            return Client(base_url, **kwargs)

        try:
            self._client = self._loop.run(make())
        except BaseException:
            self._loop.stop()
            raise
        self.chat = _Namespace(self._client.chat, self._loop)
        self.completions = _Namespace(self._client.completions, self._loop)
        self.embeddings = _Namespace(self._client.embeddings, self._loop)
        self.models = _Namespace(self._client.models, self._loop)

    @property
    def transport(self):
        """The async client's transport (for diagnostics)."""
        return self._client.transport

    def network_changed(self) -> bool:
        """See `Client.network_changed`."""
        return self._loop.run(self._client.network_changed())

    def close(self) -> None:
        """Close connections and stop the private loop."""
        try:
            self._loop.run(self._client.aclose())
        finally:
            self._loop.stop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
