"""Bearer tokens from a provider the app supplies, asked again (refresh=True) after a 401."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Union

from mobile.errors import ConfigError

# provider(refresh) -> token; sync or async. refresh=True means "the last token was refused".
TokenProvider = Callable[[bool], Union[str, None, Awaitable[Union[str, None]]]]


class Auth:
    """Caches the provider's token; one refresh at a time even with many requests refused at once."""

    def __init__(self, api_key: str | None = None, token_provider: TokenProvider | None = None) -> None:
        if api_key is not None and token_provider is not None:
            raise ConfigError("give api_key or token_provider, not both")
        if token_provider is not None and not callable(token_provider):
            raise ConfigError("token_provider must be callable")
        self._provider = token_provider
        self._token = api_key
        self._lock = asyncio.Lock()

    async def token(self) -> str | None:
        """The current token (asks the provider the first time)."""
        if self._token is None and self._provider is not None:
            async with self._lock:
                if self._token is None:
                    self._token = await self._ask(False)
        return self._token

    async def refresh(self, refused: str | None) -> bool:
        """After a 401 with token `refused`: ask the provider again. False when nothing new came."""
        if self._provider is None:
            return False
        async with self._lock:
            if self._token != refused:  # another request refreshed it already
                return True
            fresh = await self._ask(True)
            if not fresh or fresh == refused:
                return False
            self._token = fresh
            return True

    async def _ask(self, refresh: bool) -> str | None:
        value = self._provider(refresh)
        if inspect.isawaitable(value):
            value = await value
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"token_provider returned {type(value).__name__}, expected str")
        return value
