"""Errors as concur answers them: JSON in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


def openai_error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error in OpenAI's shape, which OpenAI clients surface verbatim."""
    body = {"error": {"message": message, "type": type_, "code": code, "param": None}}
    return web.json_response(body, status=status, headers=headers)
