"""Which engine the magic talks to: the shared one `connect()` finds, else an embedded demo engine."""

from __future__ import annotations


def open_client(url: str | None = None, token: str | None = None):
    """(client, one line saying which engine it is)."""
    from ..connect import connect

    client = connect(url, token, quiet=True)
    where = getattr(client, "url", None)
    if where:
        return client, f"lightllm: using the shared engine at {where} (model {client.model_name})"
    return client, (f"lightllm: no shared engine found; using an engine embedded in this kernel "
                    f"(model {client.model_name})")
